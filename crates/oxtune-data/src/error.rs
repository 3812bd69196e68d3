//! The one error type of `oxtune-data`. Every variant names the file (and the line, where a
//! row is at fault) and, where there is one, says what to do (`hint:`).

use std::path::PathBuf;

/// Errors while reading, checking, scrubbing or writing a dataset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}:{line}: {message}\nhint: {hint}")]
    Row {
        path: PathBuf,
        line: u64,
        message: String,
        hint: String,
    },

    #[error(
        "{path}: cannot tell the file type from the extension `{extension}`\nhint: name the file .jsonl, .json or .csv"
    )]
    UnknownFileKind { path: PathBuf, extension: String },

    #[error("{path}:{line}: cannot tell the dataset format from the keys [{keys}]\nhint: {hint}")]
    UnknownFormat {
        path: PathBuf,
        line: u64,
        keys: String,
        hint: String,
    },

    #[error("{path}: {message}\nhint: {hint}")]
    Config {
        path: PathBuf,
        message: String,
        hint: String,
    },

    #[error(
        "{path} is the input file\nhint: choose another output path; the input is never modified"
    )]
    OutputIsInput { path: PathBuf },

    #[error(
        "{path}: cannot load the tokenizer: {message}\nhint: pass --model DIR where DIR/tokenizer.json is a Hugging Face tokenizer file"
    )]
    Tokenizer { path: PathBuf, message: String },

    #[error("{path}: cannot draw the chart: {message}")]
    Plot { path: PathBuf, message: String },

    #[error("{message}\nhint: {hint}")]
    Invalid { message: String, hint: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A problem with row `line` of `path`.
    pub(crate) fn row(
        path: &std::path::Path,
        line: u64,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::Row {
            path: path.to_path_buf(),
            line,
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub(crate) fn read(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Read {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn write(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Write {
            path: path.to_path_buf(),
            source,
        }
    }
}
