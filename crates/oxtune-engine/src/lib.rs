//! The serving engine: continuous batching over a paged KV cache, on its own thread.
//!
//! - [`engine`]: the handle callers submit requests to, and the engine thread's loop
//!   (`schedule -> execute -> sample -> update`);
//! - [`scheduler`] and [`block_manager`]: which sequences run each step, chunked prefill,
//!   preemption, and the KV-cache accounts with prefix caching (no tensors: unit-tested
//!   alone);
//! - [`runner`]: the model behind the engine (oxtune's transformer over the paged cache);
//! - [`sampler`]: logits -> next token (greedy, temperature, top-k, top-p, min-p,
//!   repetition / presence / frequency penalties, logit bias), seeded;
//! - [`grammar`]: constrained decoding for JSON and JSON Schema output;
//! - [`stop`]: incremental detokenization and stop words;
//! - [`request`]: what goes in and what comes out.

pub mod block_manager;
pub mod engine;
pub mod grammar;
pub mod request;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod stop;

pub use engine::{EngineConfig, EngineHandle, EngineParts, EngineStats, ModelInfo, ServedModel};
pub use request::{Event, EventReceiver, FinishReason, Logprobs, Request, TokenLogprob, Usage};
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
    /// A request the engine cannot run as given; `param` names the field at fault.
    #[error("{message}")]
    InvalidRequest {
        param: &'static str,
        /// OpenAI's error code where one applies (`context_length_exceeded`).
        code: Option<&'static str>,
        message: String,
    },
    #[error(
        "the model `{name}` is not served here\nhint: list the served models with GET /v1/models"
    )]
    UnknownAdapter { name: String },
    #[error("the server is at its limit of {limit} requests\nhint: retry later")]
    Overloaded { limit: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the engine has stopped")]
    EngineDead,
    #[error("adapter `{name}`: {message}")]
    Adapter { name: String, message: String },
    #[error("{0}")]
    Config(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
