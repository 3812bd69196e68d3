//! The one error type of `oxtune-models`. Every variant names the file, key or tensor at
//! fault and, where there is one, says what to do (`hint:`).

use std::path::PathBuf;

/// Errors while resolving, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("{path}: missing\nhint: {hint}")]
    MissingFile { path: PathBuf, hint: String },

    #[error("{path}: key `{key}`: {message}")]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },

    #[error(
        "{path}: architecture `{name}` is not supported\nhint: supported architectures: {supported}"
    )]
    UnsupportedArchitecture {
        path: PathBuf,
        name: String,
        supported: String,
    },

    #[error("tensor `{name}` not found in {location}\nhint: {hint}")]
    MissingTensor {
        name: String,
        location: String,
        hint: String,
    },

    #[error(
        "tensor `{name}` in {location} has shape {got:?}, but config.json implies {expected:?}\nhint: the weights do not match config.json; check that both come from the same checkpoint"
    )]
    ShapeMismatch {
        name: String,
        location: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error(
        "{path}: not a readable safetensors file: {message}\nhint: the file may be truncated or corrupt; download or export it again"
    )]
    Safetensors { path: PathBuf, message: String },

    #[error("{path}: cannot load the tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("tokenizer: {0}")]
    Tokenize(String),

    #[error("chat template from {source_file}: {message}")]
    Template {
        source_file: String,
        message: String,
    },

    #[error("model `{spec}` not found; looked in:\n{searched}\nhint: {hint}")]
    ModelNotFound {
        spec: String,
        searched: String,
        hint: String,
    },

    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),

    #[error(transparent)]
    Tensor(#[from] oxtune_tensor::candle::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads a file, naming it on failure.
pub(crate) fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and parses a JSON file, naming it (and the line, through serde's message) on failure.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
