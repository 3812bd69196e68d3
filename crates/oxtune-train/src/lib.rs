//! Training: the pieces a recipe (`sft`, `pt`) is made of.
//!
//! - [`optimizer`]: AdamW as `torch.optim.AdamW` computes it, with fp32 master weights and
//!   moments for low-precision parameters, decoupled weight decay (none on norms, biases and
//!   magnitude vectors), global-norm clipping;
//! - [`schedule`]: the learning rate as a pure function of the step (linear, cosine,
//!   constant, with warmup), as transformers' schedulers compute it;
//! - [`loss`]: causal-LM cross-entropy summed over target tokens, for normalisation by the
//!   number of target tokens of a whole accumulation window;
//! - [`trainer`]: the loop (accumulation, clipping, non-finite guard, logging, evaluation,
//!   checkpoints, exact resume) and [`checkpoint`]: atomic `checkpoint-N/` folders.

pub mod checkpoint;
pub mod loss;
pub mod optimizer;
pub mod plot;
pub mod schedule;
pub mod synthetic;
pub mod trainer;

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tensor(#[from] oxtune_tensor::candle::Error),
    #[error(transparent)]
    Model(#[from] oxtune_models::Error),
    #[error(transparent)]
    Tuner(#[from] oxtune_tuners::Error),
    #[error("optimizer state: {0}")]
    State(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
