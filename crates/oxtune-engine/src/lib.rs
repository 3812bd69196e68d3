//! Generation: turning a prompt into tokens with a model.
//!
//! - [`sampler`]: logits -> next token (greedy, temperature, top-k, top-p, min-p,
//!   repetition penalty), seeded so the same seed gives the same text;
//! - [`generate`]: the decode loop over a KV cache, stop tokens and stop words, streaming
//!   text out as whole characters.

pub mod generate;
pub mod sampler;

pub use generate::{FinishReason, GenerateOptions, Generation, Generator};
pub use sampler::{Sampler, SamplingParams};

/// Errors while generating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] oxtune_models::Error),
    #[error(transparent)]
    Tensor(#[from] oxtune_tensor::candle::Error),
    #[error("invalid sampling setting `{name}` = {value}: {expected}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the prompt is empty\nhint: give a non-empty prompt")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt_tokens} tokens and the model's context is {max_positions}\nhint: shorten the prompt"
    )]
    PromptTooLong {
        prompt_tokens: usize,
        max_positions: usize,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
