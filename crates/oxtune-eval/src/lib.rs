//! `oxtune-eval`: text metrics equal to the reference Python implementations, and file-mode
//! evaluation.
//!
//! - [`bleu`] + [`bleu_tokenize`]: corpus and sentence BLEU equal to sacrebleu 2.x (13a, zh,
//!   intl, char and none tokenizers; none/floor/add-k/exp smoothing; effective order).
//! - [`rouge`] + [`porter`]: ROUGE-N/L/Lsum equal to rouge-score 0.1.2 (with NLTK's Porter
//!   stemmer), and jieba segmentation for Chinese.
//! - [`input`]: predictions and references from jsonl/json/csv/txt files, matched by line.
//! - [`report`]: the evaluation result (JSON) and its HTML page.
//!
//! `tests/parity.rs` compares every metric with values written by
//! `tools/make_metric_fixtures.py` (pinned sacrebleu, rouge-score, nltk, jieba).

pub mod bleu;
pub mod bleu_tokenize;
pub mod error;
pub mod input;
pub mod porter;
pub mod report;
pub mod rouge;
pub mod text;

pub use bleu::{BleuConfig, BleuScore, Smoothing, corpus_bleu, sentence_bleu};
pub use bleu_tokenize::BleuTokenizer;
pub use error::{Error, Result};
pub use input::{Fields, Sample, read_samples};
pub use report::{EvalConfig, EvalReport, Metric, evaluate};
pub use rouge::{Prf, RougeScorer, RougeTokenizer, RougeType};
