//! Tuners: what fine-tuning trains instead of (or besides) the base weights.
//!
//! - [`lora`]: LoRA (`W x + s B A x`, s = alpha / r, or alpha / sqrt(r) with rsLoRA) and DoRA
//!   (the LoRA-updated weight's direction, rescaled by a trained magnitude per output),
//!   attached to a model's linear layers as [`oxtune_models::transformer::Adapter`]s;
//! - [`peft`]: `adapter_config.json` + `adapter_model.safetensors` exactly as peft writes and
//!   reads them, and merging an adapter into the base weights.

pub mod lora;
pub mod peft;

pub use lora::{LoraAdapter, LoraSettings, LoraTuner, TargetModules};

/// Errors of the tuners.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Adapter {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(
        "target_modules {requested:?} match no linear layer of the model\nhint: the model's linear layers are named {available}; use `all-linear` or those names"
    )]
    NoTargets {
        requested: Vec<String>,
        available: String,
    },
    #[error("invalid LoRA setting `{name}`: {message}")]
    Setting { name: &'static str, message: String },
    #[error(transparent)]
    Model(#[from] oxtune_models::Error),
    #[error(transparent)]
    Tensor(#[from] oxtune_tensor::candle::Error),
    #[error("cannot write {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
