//! The one error type of `oxtune-config`. Every variant names the key at fault and where it
//! was set (file, line and column, or the command line), and most say what to change
//! (`hint:`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A YAML file, at a 1-based line and column.
    File {
        path: Arc<Path>,
        line: u32,
        column: u32,
    },
    /// A command-line flag, as typed (`--learning_rate`).
    CommandLine { flag: String },
    /// Nobody set it: a default, or a value derived from other keys.
    Default,
}

impl Origin {
    /// Whether the value came from the command line (keys are then shown as `--key`).
    pub fn is_command_line(&self) -> bool {
        matches!(self, Self::CommandLine { .. })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, line, column } => write!(f, "{}:{line}:{column}", path.display()),
            Self::CommandLine { flag } => write!(f, "command line `{flag}`"),
            Self::Default => f.write_str("default value"),
        }
    }
}

/// A key that is not a setting, with the closest one when there is a close one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    /// The key as written (`learnig_rate`, or `parallelization.tp` inside a section).
    pub key: String,
    pub origin: Origin,
    /// A known key it was probably meant to be.
    pub suggestion: Option<String>,
}

impl fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.origin.is_command_line() {
            write!(f, "command line: unknown option `--{}`", self.key)?;
            match &self.suggestion {
                Some(known) => write!(f, "\nhint: did you mean `--{known}`?"),
                None => f.write_str("\nhint: docs/configuration.md lists every key"),
            }
        } else {
            write!(f, "{}: unknown key `{}`", self.origin, self.key)?;
            match &self.suggestion {
                Some(known) => write!(f, "\nhint: did you mean `{known}`?"),
                None => f.write_str("\nhint: docs/configuration.md lists every key"),
            }
        }
    }
}

/// Errors while reading, merging or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    /// Not valid YAML. `message` is the parser's report, with the file, line, column and the
    /// offending lines.
    #[error("{path}: not valid YAML\n{message}")]
    Yaml {
        path: PathBuf,
        line: Option<u64>,
        column: Option<u64>,
        message: String,
    },

    #[error(
        "{path}: the file must be a mapping of `key: value` settings, but it is {found}\nhint: write one setting per line, e.g. `learning_rate: 1e-4`"
    )]
    NotAMapping { path: PathBuf, found: String },

    /// Keys (from the file and the command line together) that are not settings. Checked
    /// before any value is.
    #[error("{}", display_list(.keys))]
    UnknownKeys { keys: Vec<UnknownKey> },

    /// The command line is malformed (a value without a `--key`, a `-c` without a file).
    #[error("command line: {message}\nhint: {hint}")]
    CommandLine { message: String, hint: String },

    /// The same setting twice in one file, possibly under an old and a new name.
    #[error(
        "{origin}: `{key}` sets the same thing as `{first_key}` at {first}\nhint: keep one of them"
    )]
    Duplicate {
        key: String,
        origin: Origin,
        first_key: String,
        first: Origin,
    },

    /// A value of the wrong type (`lora_rank: abc`).
    #[error("{origin}: `{key}` expects {expected}, got {got}{}", hint_line(.hint))]
    InvalidType {
        key: String,
        origin: Origin,
        expected: String,
        got: String,
        hint: Option<String>,
    },

    /// A value of the right type but outside what the key allows (`lora_dropout: 1.5`).
    #[error("{origin}: `{key}` {message}{}", hint_line(.hint))]
    InvalidValue {
        key: String,
        origin: Origin,
        message: String,
        hint: Option<String>,
    },

    /// A required key is missing.
    #[error("`{key}` is required\nhint: {hint}")]
    Missing { key: String, hint: String },

    /// A feature oxtune does not have yet (`sft_type: qlora`, `quantization_bit: 4`).
    #[error("{origin}: `{setting}`: {feature} is not supported yet\nhint: {hint}")]
    NotSupported {
        key: String,
        origin: Origin,
        /// `key: value` as written.
        setting: String,
        feature: String,
        hint: String,
    },

    /// A preference-training setting given to `sft` or `pt`.
    #[error(
        "{origin}: `{setting}`: preference training (DPO, ORPO, SimPO, CPO, KTO) is `oxtune rlhf`, which is not available yet\nhint: `oxtune {command}` trains without preference pairs: use `train_type: lora` or `full`, without `beta` or `preference_dataset`"
    )]
    NeedsRlhf {
        key: String,
        origin: Origin,
        setting: String,
        command: &'static str,
    },

    /// Tensor, pipeline or ZeRO parallelism asked for.
    #[error(
        "{origin}: `{setting}`: multi-GPU training is not supported yet\nhint: oxtune trains on one device for now; set `{key}` to {neutral} or remove it"
    )]
    MultiGpu {
        key: String,
        origin: Origin,
        setting: String,
        neutral: &'static str,
    },

    #[error("cannot write the resolved config as YAML: {message}")]
    Serialize { message: String },
}

fn hint_line(hint: &Option<String>) -> String {
    hint.as_ref()
        .map(|hint| format!("\nhint: {hint}"))
        .unwrap_or_default()
}

fn display_list(keys: &[UnknownKey]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
