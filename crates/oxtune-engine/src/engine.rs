//! The engine: one thread that owns the model and its KV cache and loops
//! `schedule -> execute -> sample -> update`, fed through a channel.
//!
//! Callers hold an [`EngineHandle`] (cheap to clone, shared by every server task). `submit`
//! validates a [`Request`] on the caller's thread — so a bad request is an immediate error
//! naming the parameter — then queues it; events come back on the request's own channel.
//! The engine checks every step whether a request's receiver is gone and aborts it, freeing
//! its KV blocks, so a client that disconnects costs at most one more step.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxtune_models::decode_graph::DecodeGraphs;
use oxtune_models::{ChatTemplate, LoadedModel, PagedKvCache, Tokenizer};
use oxtune_tensor::ops::argmax_last_dim;
use oxtune_tensor::{DType, Tensor};

use crate::block_manager::BlockManager;
use crate::grammar::{GrammarCompiler, TokenConstraint};
use crate::request::{
    Event, EventReceiver, EventSender, FinishReason, Logprobs, Request, Timings, TokenLogprob,
    Usage,
};
use crate::runner::{ModelRunner, Runner};
use crate::sampler::Sampler;
use crate::scheduler::{Batch, Scheduler, SchedulerConfig, Sequence};
use crate::stop::{Detokenizer, StopWordStream};
use crate::{Error, Result};

/// Sizes and limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// KV-cache blocks; `None` sizes the cache from memory (see the next two fields).
    pub num_blocks: Option<usize>,
    /// Fraction of the GPU's memory the process may use, the KV cache included.
    pub gpu_memory_utilization: f64,
    /// KV-cache size on the CPU, in bytes.
    pub cpu_kv_cache_bytes: usize,
    /// Most sequences decoding at once.
    pub max_num_seqs: usize,
    /// Most new tokens per step.
    pub max_num_batched_tokens: usize,
    /// Most requests accepted (queued plus running); beyond it `submit` says `Overloaded`.
    pub max_queued_requests: usize,
    pub enable_prefix_caching: bool,
    /// Most alternatives a request may ask log-probabilities for.
    pub max_logprobs: usize,
    /// Context length served (prompt plus output); `None` = the model's.
    pub max_model_len: Option<usize>,
    /// Run every step op by op: no CUDA graphs for decode steps (vLLM's `enforce_eager`).
    pub enforce_eager: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: None,
            gpu_memory_utilization: 0.9,
            cpu_kv_cache_bytes: 1 << 30,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_queued_requests: 1024,
            enable_prefix_caching: true,
            max_logprobs: 20,
            max_model_len: None,
            enforce_eager: false,
        }
    }
}

/// What the engine serves.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Names of the served adapters, in index order.
    pub adapters: Vec<String>,
    pub eos_token_ids: Vec<u32>,
}

/// A snapshot of the engine's state, for metrics and health.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    /// Fraction of KV-cache blocks in use, 0..=1.
    pub kv_cache_usage: f64,
    pub num_blocks: usize,
    pub used_blocks: usize,
    /// Prompt tokens looked up in the prefix cache, and those found.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub preemptions: u64,
    pub steps: u64,
}

enum Command {
    Submit(Box<Pending>),
    AbortAll,
    Shutdown,
}

/// A validated request on its way to the engine thread.
struct Pending {
    checked: Checked,
    events: EventSender,
}

/// What validation makes of a request.
struct Checked {
    request: Request,
    sampler: Sampler,
    constraint: Option<Box<dyn TokenConstraint>>,
    adapter: Option<usize>,
    max_tokens: usize,
    arrived: Instant,
}

struct Shared {
    stats: Mutex<EngineStats>,
    in_flight: AtomicUsize,
    accepting: AtomicBool,
    alive: AtomicBool,
}

/// The way in: submit requests, read stats, stop the engine. Clone freely.
#[derive(Clone)]
pub struct EngineHandle {
    commands: Sender<Command>,
    shared: Arc<Shared>,
    info: Arc<ModelInfo>,
    tokenizer: Arc<Tokenizer>,
    chat_template: Option<Arc<ChatTemplate>>,
    grammar: Option<Arc<GrammarCompiler>>,
    config: Arc<EngineConfig>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// A model to serve and what turns its tokens into text.
pub struct ServedModel {
    pub model: oxtune_models::CausalLm,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Tokens that end a reply.
    pub eos_token_ids: Vec<u32>,
}

/// Everything an engine thread needs besides its configuration.
pub struct EngineParts {
    pub runner: Box<dyn Runner>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub info: ModelInfo,
    pub num_blocks: usize,
}

impl EngineHandle {
    /// Serves `model`, with the peft adapters `(name, dir)` side by side: sizes the KV cache,
    /// loads the adapters and starts the engine thread.
    pub fn start(
        model: LoadedModel,
        adapters: &[(String, PathBuf)],
        config: EngineConfig,
    ) -> Result<Self> {
        let eos_token_ids = model.eos_token_ids();
        let LoadedModel {
            model,
            tokenizer,
            chat_template,
            ..
        } = model;
        Self::start_model(
            ServedModel {
                model,
                tokenizer,
                chat_template,
                eos_token_ids,
            },
            adapters,
            config,
        )
    }

    /// [`EngineHandle::start`] from parts (a model built from a config, a stand-in tokenizer).
    pub fn start_model(
        served: ServedModel,
        adapters: &[(String, PathBuf)],
        config: EngineConfig,
    ) -> Result<Self> {
        let ServedModel {
            mut model,
            tokenizer,
            chat_template,
            eos_token_ids,
        } = served;
        let model_config = model.config().clone();
        let device = model.device().clone();
        ModelRunner::attach_adapters(&mut model, adapters, &device)?;
        let dtype: DType = model.dtype();
        let max_model_len = config
            .max_model_len
            .unwrap_or(model_config.max_position_embeddings)
            .min(model_config.max_position_embeddings);
        let num_blocks = match config.num_blocks {
            Some(blocks) => blocks,
            None => ModelRunner::num_blocks(
                &model,
                config.block_size,
                dtype,
                config.gpu_memory_utilization,
                config.cpu_kv_cache_bytes,
                config.max_num_seqs,
                max_model_len,
            )?,
        };
        let cache =
            PagedKvCache::new(&model_config, num_blocks, config.block_size, dtype, &device)?;
        let info = ModelInfo {
            max_model_len,
            vocab_size: model_config.vocab_size,
            adapters: adapters.iter().map(|(name, _)| name.clone()).collect(),
            eos_token_ids,
        };
        tracing::info!(
            num_blocks,
            block_size = config.block_size,
            kv_cache_mib = num_blocks
                * PagedKvCache::bytes_per_block(&model_config, config.block_size, dtype)
                / (1 << 20),
            max_model_len,
            adapters = info.adapters.len(),
            "engine ready"
        );
        Self::spawn(
            EngineParts {
                runner: Box::new(ModelRunner::new(
                    model,
                    cache,
                    (!config.enforce_eager).then(|| DecodeGraphs::new(max_model_len)),
                )),
                tokenizer,
                chat_template,
                info,
                num_blocks,
            },
            config,
        )
    }

    /// Starts an engine thread over any runner (tests use a mock).
    pub fn spawn(parts: EngineParts, config: EngineConfig) -> Result<Self> {
        let tokenizer = Arc::new(parts.tokenizer);
        let grammar = match GrammarCompiler::from_tokenizer(&tokenizer, &parts.info.eos_token_ids) {
            Ok(compiler) => Some(Arc::new(compiler)),
            Err(error) => {
                tracing::warn!(%error, "response_format is unavailable for this vocabulary");
                None
            }
        };
        let shared = Arc::new(Shared {
            stats: Mutex::new(EngineStats {
                num_blocks: parts.num_blocks,
                ..EngineStats::default()
            }),
            in_flight: AtomicUsize::new(0),
            accepting: AtomicBool::new(true),
            alive: AtomicBool::new(true),
        });
        let info = Arc::new(parts.info);
        let (commands, receiver) = std::sync::mpsc::channel();
        let mut engine = Engine {
            scheduler: Scheduler::new(
                SchedulerConfig {
                    max_num_seqs: config.max_num_seqs,
                    max_num_batched_tokens: config.max_num_batched_tokens,
                },
                BlockManager::new(
                    parts.num_blocks,
                    config.block_size,
                    config.enable_prefix_caching,
                ),
            ),
            runner: parts.runner,
            tokenizer: Arc::clone(&tokenizer),
            info: Arc::clone(&info),
            shared: Arc::clone(&shared),
            requests: HashMap::new(),
            next_id: 0,
            steps: 0,
        };
        let thread = std::thread::Builder::new()
            .name("oxtune-engine".into())
            .spawn(move || engine.run(&receiver))
            .map_err(|error| Error::Config(format!("cannot start the engine thread: {error}")))?;
        Ok(Self {
            commands,
            shared,
            info,
            tokenizer,
            chat_template: parts.chat_template.map(Arc::new),
            grammar,
            config: Arc::new(config),
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_deref()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> EngineStats {
        self.shared
            .stats
            .lock()
            .map(|stats| stats.clone())
            .unwrap_or_default()
    }

    /// False once the engine thread has stopped (shut down or died).
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Ends every request now with [`FinishReason::Abort`].
    pub fn abort_all(&self) {
        let _ = self.commands.send(Command::AbortAll);
    }

    /// Refuses new requests from now on (draining before shutdown).
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::SeqCst);
    }

    /// Requests accepted and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Aborts everything, stops the engine thread and waits for it (so the model and its
    /// device memory are released before the process goes on, or exits).
    pub fn shutdown(&self) {
        self.stop_accepting();
        let _ = self.commands.send(Command::Shutdown);
        let thread = self.thread.lock().ok().and_then(|mut slot| slot.take());
        if let Some(thread) = thread
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }

    /// Checks `request` and queues it; events arrive on the returned receiver. Never blocks.
    pub fn submit(&self, request: Request) -> Result<EventReceiver> {
        if !self.is_alive() {
            return Err(Error::EngineDead);
        }
        if !self.shared.accepting.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let checked = self.validate(request)?;
        let limit = self.config.max_queued_requests;
        if self.shared.in_flight.fetch_add(1, Ordering::SeqCst) >= limit {
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Overloaded { limit });
        }
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        let command = Command::Submit(Box::new(Pending { checked, events }));
        if self.commands.send(command).is_err() {
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::EngineDead);
        }
        Ok(receiver)
    }

    fn validate(&self, request: Request) -> Result<Checked> {
        let invalid = |param: &'static str, code: Option<&'static str>, message: String| {
            Err(Error::InvalidRequest {
                param,
                code,
                message,
            })
        };
        let info = &self.info;
        let prompt_len = request.prompt_token_ids.len();
        if prompt_len == 0 {
            return invalid("prompt", None, "the prompt is empty".into());
        }
        if let Some(&bad) = request
            .prompt_token_ids
            .iter()
            .find(|&&t| t as usize >= info.vocab_size)
        {
            return invalid(
                "prompt",
                None,
                format!(
                    "token id {bad} is out of the vocabulary (size {})",
                    info.vocab_size
                ),
            );
        }
        if prompt_len >= info.max_model_len {
            return invalid(
                "prompt",
                Some("context_length_exceeded"),
                format!(
                    "the prompt has {prompt_len} tokens and this model's context is {} tokens; shorten the prompt",
                    info.max_model_len
                ),
            );
        }
        let room = info.max_model_len - prompt_len;
        let max_tokens = match request.max_tokens {
            Some(0) => return invalid("max_tokens", None, "max_tokens must be at least 1".into()),
            Some(n) if n > room => {
                return invalid(
                    "max_tokens",
                    Some("context_length_exceeded"),
                    format!(
                        "the prompt ({prompt_len} tokens) plus max_tokens ({n}) exceeds this model's context of {} tokens; lower max_tokens or shorten the prompt",
                        info.max_model_len
                    ),
                );
            }
            Some(n) => n,
            None => room,
        };
        if let Some(n) = request.logprobs
            && n > self.config.max_logprobs
        {
            return invalid(
                "logprobs",
                None,
                format!(
                    "at most {} log-probabilities per token can be returned, not {n}",
                    self.config.max_logprobs
                ),
            );
        }
        for (param, ids) in [
            (
                "logit_bias",
                request
                    .sampling
                    .logit_bias
                    .iter()
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>(),
            ),
            ("stop_token_ids", request.stop_token_ids.clone()),
        ] {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= info.vocab_size) {
                return invalid(
                    param,
                    None,
                    format!(
                        "token id {bad} is out of the vocabulary (size {})",
                        info.vocab_size
                    ),
                );
            }
        }
        let adapter = match &request.adapter {
            None => None,
            Some(name) => Some(
                info.adapters
                    .iter()
                    .position(|a| a == name)
                    .ok_or_else(|| Error::UnknownAdapter { name: name.clone() })?,
            ),
        };
        let sampler = Sampler::new(request.sampling.clone()).map_err(|error| match error {
            Error::InvalidParameter {
                name,
                value,
                expected,
            } => Error::InvalidRequest {
                param: name,
                code: None,
                message: format!("`{name}` = {value}: expected {expected}"),
            },
            other => other,
        })?;
        let constraint = match &request.response_format {
            None => None,
            Some(format) => {
                let compiler = self.grammar.as_ref().ok_or_else(|| Error::InvalidRequest {
                    param: "response_format",
                    code: None,
                    message: "structured output is not available for this model's vocabulary"
                        .into(),
                })?;
                Some(
                    compiler
                        .compile(format)
                        .map_err(|error| Error::InvalidRequest {
                            param: "response_format",
                            code: None,
                            message: error.to_string(),
                        })?,
                )
            }
        };
        Ok(Checked {
            request,
            sampler,
            constraint,
            adapter,
            max_tokens,
            arrived: Instant::now(),
        })
    }
}

/// A request the engine thread is working on.
struct Active {
    request: Request,
    events: EventSender,
    sampler: Sampler,
    constraint: Option<Box<dyn TokenConstraint>>,
    max_tokens: usize,
    detokenizer: Detokenizer,
    stop: StopWordStream,
    arrived: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
}

impl Active {
    /// Greedy with nothing that needs the logits on the host (penalties, bias,
    /// log-probabilities, a grammar).
    fn is_plain_greedy(&self) -> bool {
        let p = &self.request.sampling;
        p.temperature == 0.0
            && (p.repetition_penalty - 1.0).abs() < f64::EPSILON
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
            && p.logit_bias.is_empty()
            && self.request.logprobs.is_none()
            && self.constraint.is_none()
    }
}

/// The engine thread's state.
struct Engine {
    scheduler: Scheduler,
    runner: Box<dyn Runner>,
    tokenizer: Arc<Tokenizer>,
    info: Arc<ModelInfo>,
    shared: Arc<Shared>,
    requests: HashMap<u64, Active>,
    next_id: u64,
    steps: u64,
}

/// How one sampled token ended (or did not end) its request.
struct Outcome {
    id: u64,
    token: u32,
    logprobs: Option<Logprobs>,
    /// A stop token: not part of the text.
    stop_token: bool,
}

impl Engine {
    fn run(&mut self, commands: &Receiver<Command>) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.serve(commands);
        }));
        if result.is_err() {
            tracing::error!("the engine thread panicked; health checks now fail");
        }
        self.shared.alive.store(false, Ordering::SeqCst);
        self.shared.accepting.store(false, Ordering::SeqCst);
        for (_, active) in self.requests.drain() {
            let _ = active.events.send(Event::Error {
                message: "the engine stopped".into(),
            });
        }
    }

    fn serve(&mut self, commands: &Receiver<Command>) {
        loop {
            // Wait for work when idle; otherwise take what has arrived and keep stepping.
            if self.scheduler.is_idle() {
                match commands.recv_timeout(Duration::from_millis(100)) {
                    Ok(command) => {
                        if !self.handle(command) {
                            return;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(command) = commands.try_recv() {
                if !self.handle(command) {
                    return;
                }
            }
            self.drop_disconnected();
            if let Some(id) = self.scheduler.unschedulable_front() {
                self.fail(
                    id,
                    "the request needs more KV-cache blocks than the engine has; raise the cache size (--gpu_memory_utilization) or shorten the request",
                );
            }
            if !self.scheduler.is_idle() {
                self.step();
            }
            self.publish_stats();
        }
    }

    /// Applies a command; false means stop.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Submit(pending) => {
                let Pending {
                    checked:
                        Checked {
                            request,
                            sampler,
                            constraint,
                            adapter,
                            max_tokens,
                            arrived,
                        },
                    events,
                } = *pending;
                let id = self.next_id;
                self.next_id += 1;
                self.scheduler
                    .add(Sequence::new(id, request.prompt_token_ids.clone(), adapter));
                let stop = StopWordStream::new(request.stop.clone());
                self.requests.insert(
                    id,
                    Active {
                        request,
                        events,
                        sampler,
                        constraint,
                        max_tokens,
                        detokenizer: Detokenizer::default(),
                        stop,
                        arrived,
                        scheduled: None,
                        first_token: None,
                    },
                );
                true
            }
            Command::AbortAll => {
                for id in self.scheduler.ids() {
                    self.finish(id, FinishReason::Abort);
                }
                true
            }
            Command::Shutdown => {
                for id in self.scheduler.ids() {
                    self.finish(id, FinishReason::Abort);
                }
                false
            }
        }
    }

    /// Aborts requests whose receiver is gone (the client disconnected).
    fn drop_disconnected(&mut self) {
        let gone: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, active)| active.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            tracing::debug!(request = %self.requests[&id].request.id, "client gone; aborted");
            self.forget(id);
        }
    }

    fn step(&mut self) {
        let batch = self.scheduler.schedule();
        if batch.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        self.steps += 1;
        let now = Instant::now();
        for id in &batch.seq_ids {
            if let Some(active) = self.requests.get_mut(id) {
                active.scheduled.get_or_insert(now);
            }
        }
        let outcomes = match self.execute(&batch) {
            Ok(outcomes) => outcomes,
            Err(error) => {
                tracing::error!(%error, "a step failed; its requests get an error");
                for &id in &batch.seq_ids {
                    self.fail(id, &format!("generation failed: {error}"));
                }
                return;
            }
        };
        let sampled: Vec<Option<u32>> = batch
            .seq_ids
            .iter()
            .map(|id| outcomes.iter().find(|o| o.id == *id).map(|o| o.token))
            .collect();
        self.scheduler.update(&batch, &sampled);
        for outcome in outcomes {
            if let Err(error) = self.emit(&outcome) {
                self.fail(outcome.id, &error.to_string());
            }
        }
    }

    /// Runs the model and samples a token for every sequence whose prompt is fully read.
    fn execute(&mut self, batch: &Batch) -> Result<Vec<Outcome>> {
        let logits = self.runner.execute(batch)?;
        // Rows whose prompt is fully read get a next token.
        let (rows, ids): (Vec<u32>, Vec<u64>) = batch
            .seq_ids
            .iter()
            .zip(&batch.sample)
            .enumerate()
            .filter(|(_, (id, sample))| **sample && self.requests.contains_key(id))
            .map(|(row, (&id, _))| (u32::try_from(row).unwrap_or(u32::MAX), id))
            .unzip();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let logits = logits.index_select(&Tensor::new(rows.as_slice(), logits.device())?, 0)?;
        // Plain greedy rows need only the argmax: computed where the logits are, so a GPU
        // sends back 4 bytes per row instead of the vocabulary; otherwise all rows come back
        // in one transfer.
        let plain = ids
            .iter()
            .all(|id| self.requests.get(id).is_some_and(Active::is_plain_greedy));
        let host: Vec<Vec<f32>> = if plain { Vec::new() } else { logits.to_vec2()? };
        let argmax: Vec<u32> = if plain {
            argmax_last_dim(&logits)?.to_vec1()?
        } else {
            Vec::new()
        };
        let mut outcomes = Vec::with_capacity(ids.len());
        for (index, &id) in ids.iter().enumerate() {
            let (Some(active), Some(sequence)) =
                (self.requests.get_mut(&id), self.scheduler.get(id))
            else {
                continue;
            };
            let (token, logprobs) = if plain {
                (argmax[index], None)
            } else {
                let raw = &host[index];
                let mut logits = raw.clone();
                if let Some(constraint) = active.constraint.as_mut() {
                    let allowed = constraint.allowed().map_err(grammar_error)?;
                    // Logits past the tokenizer's vocabulary (padded embeddings) are never
                    // allowed.
                    for (index, logit) in logits.iter_mut().enumerate() {
                        if !allowed.get(index).copied().unwrap_or(false) {
                            *logit = f32::NEG_INFINITY;
                        }
                    }
                }
                let token =
                    active
                        .sampler
                        .sample(&mut logits, &sequence.tokens, sequence.prompt_len);
                if let Some(constraint) = active.constraint.as_mut() {
                    constraint.commit(token).map_err(grammar_error)?;
                }
                let logprobs = match active.request.logprobs {
                    Some(top) => Some(logprobs_of(&self.tokenizer, raw, token, top)?),
                    None => None,
                };
                (token, logprobs)
            };
            let stop_token = (!active.request.ignore_eos
                && self.info.eos_token_ids.contains(&token))
                || active.request.stop_token_ids.contains(&token);
            outcomes.push(Outcome {
                id,
                token,
                logprobs: logprobs.filter(|_| !stop_token),
                stop_token,
            });
        }
        Ok(outcomes)
    }

    /// Sends a token's event and finishes the request if it ended.
    fn emit(&mut self, outcome: &Outcome) -> Result<()> {
        let id = outcome.id;
        let (Some(active), Some(sequence)) = (self.requests.get_mut(&id), self.scheduler.get(id))
        else {
            return Ok(());
        };
        active.first_token.get_or_insert_with(Instant::now);
        let generated = sequence.generated();
        let mut reason = None;
        if outcome.stop_token {
            reason = Some(FinishReason::Stop);
        } else {
            let piece = active.detokenizer.step(&self.tokenizer, generated)?;
            let mut released = String::new();
            let stopped = active.stop.push(&piece, &mut |text| {
                released.push_str(text);
                Ok(())
            })?;
            let _ = active.events.send(Event::Token {
                token_id: outcome.token,
                text: released,
                logprobs: outcome.logprobs.clone(),
            });
            if stopped
                || active
                    .constraint
                    .as_ref()
                    .is_some_and(|constraint| constraint.is_finished())
            {
                reason = Some(FinishReason::Stop);
            }
        }
        if reason.is_none()
            && (generated.len() >= active.max_tokens
                || sequence.tokens.len() >= self.info.max_model_len)
        {
            reason = Some(FinishReason::Length);
        }
        if let Some(reason) = reason {
            self.finish(id, reason);
        }
        Ok(())
    }

    /// Ends a request: the held-back text, usage and timings go out; its blocks are freed.
    fn finish(&mut self, id: u64, reason: FinishReason) {
        let sequence = self.scheduler.remove(id);
        let Some(mut active) = self.requests.remove(&id) else {
            return;
        };
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut text = String::new();
        if reason != FinishReason::Abort {
            let _ = active.stop.finish(&mut |piece| {
                text.push_str(piece);
                Ok(())
            });
        }
        let usage = sequence.map_or_else(Usage::default, |sequence| Usage {
            prompt_tokens: sequence.prompt_len,
            completion_tokens: sequence.generated().len(),
            cached_prompt_tokens: sequence.cached_prompt_tokens.unwrap_or(0),
        });
        let _ = active.events.send(Event::Finished {
            reason,
            text,
            usage,
            timings: Timings {
                arrived: active.arrived,
                scheduled: active.scheduled,
                first_token: active.first_token,
                finished: Instant::now(),
            },
        });
    }

    /// Ends a request with an error event.
    fn fail(&mut self, id: u64, message: &str) {
        if let Some(active) = self.requests.get(&id) {
            let _ = active.events.send(Event::Error {
                message: message.to_owned(),
            });
        }
        self.forget(id);
    }

    /// Drops a request without a final event (its client is gone or already told).
    fn forget(&mut self, id: u64) {
        self.scheduler.remove(id);
        if self.requests.remove(&id).is_some() {
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn publish_stats(&self) {
        if let Ok(mut stats) = self.shared.stats.lock() {
            let blocks = self.scheduler.blocks();
            *stats = EngineStats {
                running: self.scheduler.num_running(),
                waiting: self.scheduler.num_waiting(),
                kv_cache_usage: blocks.usage(),
                num_blocks: blocks.num_blocks(),
                used_blocks: blocks.num_used(),
                prefix_cache_queries: blocks.prefix_queries,
                prefix_cache_hits: blocks.prefix_hits,
                preemptions: self.scheduler.preemptions,
                steps: self.steps,
            };
        }
    }
}

fn grammar_error(error: crate::grammar::GrammarError) -> Error {
    Error::Config(format!("structured output: {error}"))
}

/// The chosen token's log-probability and the `top` best alternatives, from raw logits.
fn logprobs_of(tokenizer: &Tokenizer, logits: &[f32], chosen: u32, top: usize) -> Result<Logprobs> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    #[expect(clippy::cast_possible_truncation, reason = "a log-probability")]
    let log_z = max + sum.ln() as f32;
    let entry = |token: u32| -> Result<TokenLogprob> {
        let text = tokenizer.decode(&[token], false)?;
        Ok(TokenLogprob {
            token_id: token,
            bytes: text.as_bytes().to_vec(),
            text,
            logprob: logits
                .get(token as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY)
                - log_z,
        })
    };
    let mut order: Vec<u32> = (0..u32::try_from(logits.len()).unwrap_or(u32::MAX)).collect();
    let top = top.min(order.len());
    if top > 0 {
        order.select_nth_unstable_by(top - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        order.truncate(top);
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    } else {
        order.clear();
    }
    Ok(Logprobs {
        chosen: entry(chosen)?,
        top: order.into_iter().map(entry).collect::<Result<_>>()?,
    })
}
