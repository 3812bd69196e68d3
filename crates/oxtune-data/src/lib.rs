//! `oxtune-data`: datasets in, clean datasets out.
//!
//! - [`reader`]: jsonl / json / csv records with their line numbers (streamed where the file
//!   kind allows), and [`writer`]: atomic outputs in the same layouts.
//! - [`format`]: which dataset format a row is in (messages, sharegpt, alpaca,
//!   query-response, preference, kto), whether it is well formed, and its conversation.
//! - [`pii`]: personal-data detection, replacement and the scrub report.
//! - [`check`], [`stats`], [`dedup`], [`split`]: the `oxtune data` subcommands' logic.
//! - [`html`]: the small kit the HTML reports are built with.
//!
//! Errors name the file and line at fault and say what to do (`hint:`).

pub mod check;
pub mod dedup;
pub mod error;
pub mod format;
pub mod html;
pub mod pii;
pub mod reader;
pub mod sft;
pub mod split;
pub mod stats;
pub mod writer;

pub use error::{Error, Result};
pub use format::{Format, Problem, Role, Severity, Turn};
pub use reader::{FileKind, RawBody, RawRecord, RecordReader, Row, RowReader};
pub use writer::{AtomicFile, RecordWriter};
