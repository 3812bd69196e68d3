//! What a client hands the engine and what it gets back.
//!
//! A [`Request`] carries token ids (the server renders the chat template and tokenizes), how to
//! sample, when to stop, and which adapter to run. The engine answers on the request's own
//! channel with [`Event`]s: one [`Event::Token`] per generated token (with the text it
//! completes, held back while it could still become a stop word), then exactly one
//! [`Event::Finished`] or [`Event::Error`]. Dropping the receiver aborts the request: the engine
//! notices within one step and frees its KV blocks.

use std::time::{Duration, Instant};

use crate::grammar::ResponseFormat;
use crate::sampler::SamplingParams;

/// One generation to run.
#[derive(Debug, Clone)]
pub struct Request {
    /// The caller's id, echoed in logs (never the prompt itself).
    pub id: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Most tokens to generate; `None` means up to the model's context.
    pub max_tokens: Option<usize>,
    /// Generation ends when the text contains one of these; it is not part of the output.
    pub stop: Vec<String>,
    /// Generation ends at any of these tokens, in addition to the model's end-of-sequence tokens
    /// (unless `ignore_eos`). The stop token is not part of the output.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Return the chosen token's log-probability and this many alternatives (0 = just the
    /// chosen one); `None` = no log-probabilities.
    pub logprobs: Option<usize>,
    /// Adapter name (as given to the engine at start-up); `None` = the base model.
    pub adapter: Option<String>,
    /// Constrain the output (JSON object or JSON Schema).
    pub response_format: Option<ResponseFormat>,
}

impl Request {
    /// A greedy request for `prompt_token_ids` with the defaults of every other field.
    pub fn new(id: impl Into<String>, prompt_token_ids: Vec<u32>) -> Self {
        Self {
            id: id.into(),
            prompt_token_ids,
            sampling: SamplingParams::default(),
            max_tokens: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            adapter: None,
            response_format: None,
        }
    }
}

/// A log-probability entry: the token, its text and its natural-log probability under the
/// model (before sampling adjustments, as vLLM reports by default).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    /// The token on its own, decoded (may be a partial character: then lossy).
    pub text: String,
    /// The token's raw bytes, for the OpenAI `bytes` field.
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// The chosen token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    pub chosen: TokenLogprob,
    /// Best first, `Request::logprobs` of them.
    pub top: Vec<TokenLogprob>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token, a stop word, or a completed grammar.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
    /// Aborted: the client went away or the server is shutting down.
    Abort,
}

impl FinishReason {
    /// The OpenAI name: `stop`, `length` or `abort` (vLLM's name for the last).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose keys/values came from the prefix cache.
    pub cached_prompt_tokens: usize,
}

/// When things happened to a request (monotonic clock).
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// Accepted by the engine.
    pub arrived: Instant,
    /// First scheduled (end of queueing).
    pub scheduled: Option<Instant>,
    /// First token sampled.
    pub first_token: Option<Instant>,
    pub finished: Instant,
}

impl Timings {
    /// Time spent waiting before the first step that ran it.
    pub fn queue_time(&self) -> Duration {
        self.scheduled.unwrap_or(self.finished) - self.arrived
    }

    /// Time to the first token.
    pub fn time_to_first_token(&self) -> Option<Duration> {
        self.first_token.map(|t| t - self.arrived)
    }

    /// End-to-end latency inside the engine.
    pub fn end_to_end(&self) -> Duration {
        self.finished - self.arrived
    }
}

/// What the engine sends back on a request's channel.
#[derive(Debug, Clone)]
pub enum Event {
    /// One generated token. `text` is the newly released text (may be empty while a
    /// multi-byte character or a possible stop word is incomplete).
    Token {
        token_id: u32,
        text: String,
        logprobs: Option<Logprobs>,
    },
    /// The request ended; `text` is released text that was still held back (if any).
    Finished {
        reason: FinishReason,
        text: String,
        usage: Usage,
        timings: Timings,
    },
    /// The request failed after it was accepted (a model error); nothing more follows.
    Error { message: String },
}

/// The receiving end of a request's events.
pub type EventReceiver = tokio::sync::mpsc::UnboundedReceiver<Event>;
/// The engine's end of a request's events.
pub type EventSender = tokio::sync::mpsc::UnboundedSender<Event>;
