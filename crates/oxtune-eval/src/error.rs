//! The one error type of `oxtune-eval`: every variant names the file and line at fault, or
//! the option, and says what to do (`hint:`).

use std::path::PathBuf;

/// Errors while reading predictions and references or computing metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Data(#[from] oxtune_data::Error),

    #[error("{path}:{line}: {message}\nhint: {hint}")]
    Row {
        path: PathBuf,
        line: u64,
        message: String,
        hint: String,
    },

    #[error(
        "{predictions} has {prediction_count} rows but {references} has {reference_count}\nhint: predictions and references are matched line by line; both files need one row per sample"
    )]
    CountMismatch {
        predictions: PathBuf,
        prediction_count: usize,
        references: PathBuf,
        reference_count: usize,
    },

    #[error("unknown metric `{name}`\nhint: available metrics: {available}")]
    UnknownMetric { name: String, available: String },

    #[error("unknown {what} `{name}`\nhint: choose one of: {available}")]
    UnknownOption {
        what: &'static str,
        name: String,
        available: String,
    },

    #[error("{message}\nhint: {hint}")]
    Invalid { message: String, hint: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
