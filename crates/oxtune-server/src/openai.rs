//! The OpenAI routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//!
//! A request is parsed ([`ApiJson`]: content type, size, JSON, the field at fault), admitted
//! (503 draining, 429 over `--max_concurrent_requests`), checked ([`crate::validate`]),
//! rendered with the chat template and tokenized off the async threads, then submitted as one
//! engine request per choice (`n` per prompt, seeds `seed, seed+1, ...`). The choices' event
//! channels are merged ([`Choices`]): a non-streaming request collects them into one body; a
//! streaming one is an SSE stream fed by a task that stops — dropping the channels, which
//! aborts the engine requests — as soon as the client goes away. An engine failure mid-stream
//! becomes an SSE error event in the envelope, then `data: [DONE]`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use oxtune_engine::{EngineHandle, Event, FinishReason, Logprobs, Usage};
use oxtune_models::ChatMessage;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::StreamExt as _;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};

use crate::error::{ApiError, bounded};
use crate::protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatDelta, ChatLogprobs, ChatMessageIn, ChatMessageOut, ChatTokenLogprob, ChatTopLogprob,
    CommonParams, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, ContentIn,
    ModelCard, ModelList, PromptIn, UsageOut,
};
use crate::validate::{self, Plan};
use crate::{AppState, ServerConfig};

// ---------------------------------------------------------------------------------------------
// Parsing.

/// A JSON body: 415 unless `Content-Type: application/json`, 413 over the size limit, 400 on
/// malformed JSON or a field of the wrong type (naming the field).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        let mime = content_type
            .as_deref()
            .and_then(|value| value.split(';').next())
            .map(|value| value.trim().to_ascii_lowercase());
        let is_json = mime
            .as_deref()
            .is_some_and(|mime| mime == "application/json" || mime.ends_with("+json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType {
                got: match content_type {
                    None => " (none was sent)".into(),
                    Some(value) => format!(", not `{}`", bounded(&value)),
                },
            });
        }
        let limit = state.config().max_payload_size;
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { size: None, limit }
                } else {
                    ApiError::InvalidRequest {
                        message: "the request body could not be read".into(),
                        param: None,
                        code: None,
                    }
                }
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses `bytes` as `T`; errors name the field (`messages[0].role`) where there is one.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(json_error)?;
    deserializer
        .end()
        .map_err(|error| ApiError::InvalidRequest {
            message: bounded(&format!("the body is not valid JSON: {error}")),
            param: None,
            code: None,
        })?;
    Ok(value)
}

fn json_error(error: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    let text = inner.to_string();
    if matches!(
        inner.classify(),
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof
    ) {
        return ApiError::InvalidRequest {
            message: bounded(&format!("the body is not valid JSON: {text}")),
            param: None,
            code: None,
        };
    }
    let param = if path == "." {
        text.strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned)
    } else {
        Some(path)
    };
    let message = match &param {
        Some(param) => format!("invalid `{param}`: {text}"),
        None => format!("invalid request body: {text}"),
    };
    ApiError::InvalidRequest {
        message: bounded(&message),
        param: param.map(|param| bounded(&param)),
        code: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers.

/// The name a request's answer reports (the one asked for, else the served name) and what it
/// runs: the base model or one adapter.
fn requested_model(
    common: &CommonParams,
    config: &ServerConfig,
    engine: &EngineHandle,
) -> Result<(String, validate::Target), ApiError> {
    let model = common
        .model
        .clone()
        .unwrap_or_else(|| config.served_model_name.clone());
    let target = validate::resolve_model(
        common.model.as_deref(),
        &config.served_model_name,
        &engine.info().adapters,
    )?;
    Ok((model, target))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(mut body): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let (engine, permit) = state.admit()?;
    let config = state.config();
    let common = body.common();
    let (model, target) = requested_model(&common, config, &engine)?;
    if body.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages is empty; send at least one message",
        ));
    }
    if body.tools.as_ref().is_some_and(|tools| !tools.is_empty()) {
        return Err(ApiError::invalid(
            "tools",
            "tool calls are not supported by the native backend yet; leave `tools` out",
        ));
    }
    let logprobs = validate::chat_logprobs(body.logprobs, body.top_logprobs, config.max_logprobs)?;
    let max_tokens = body.max_completion_tokens.or(common.max_tokens);
    let plan = validate::plan(common, max_tokens, logprobs, target, config)?;
    let messages = chat_messages(std::mem::take(&mut body.messages))?;
    let prompt = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || chat_prompt(&engine, &messages))
            .await
            .map_err(|error| ApiError::internal("tokenizing", error))??
    };
    let id = format!("chatcmpl-{:032x}", rand::random::<u128>());
    log_request(&state, &id, &model, &[prompt.0.as_str()]);
    let choices = Choices::submit(
        &state,
        &engine,
        &plan,
        &id,
        vec![prompt.1],
        Endpoint::Chat,
        start,
    )?;
    let meta = Meta {
        id,
        model,
        created: now(),
    };
    if plan.stream {
        Ok(stream(choices, permit, plan, meta, Endpoint::Chat))
    } else {
        let _permit = permit;
        Ok(Json(collect_chat(choices, &plan, meta).await?).into_response())
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    ApiJson(mut body): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let (engine, permit) = state.admit()?;
    let config = state.config();
    let common = body.common();
    let (model, target) = requested_model(&common, config, &engine)?;
    if body.echo == Some(true) {
        return Err(ApiError::invalid(
            "echo",
            "echo is not supported; leave it out",
        ));
    }
    if body
        .suffix
        .as_deref()
        .is_some_and(|suffix| !suffix.is_empty())
    {
        return Err(ApiError::invalid(
            "suffix",
            "suffix is not supported; leave it out",
        ));
    }
    let logprobs = validate::completion_logprobs(body.logprobs, config.max_logprobs)?;
    let max_tokens = common.max_tokens;
    let plan = validate::plan(common, max_tokens, logprobs, target, config)?;
    let prompt = std::mem::replace(&mut body.prompt, PromptIn::Tokens(Vec::new()));
    let count = match &prompt {
        PromptIn::Text(_) | PromptIn::Tokens(_) => 1,
        PromptIn::Texts(list) => list.len(),
        PromptIn::TokenLists(list) => list.len(),
    };
    if count == 0 {
        return Err(ApiError::invalid("prompt", "prompt is empty"));
    }
    if count > config.max_batch_size {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "at most {} prompts per request (--max_batch_size), not {count}",
                config.max_batch_size
            ),
        ));
    }
    let (texts, prompts) = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || completion_prompts(&engine, prompt))
            .await
            .map_err(|error| ApiError::internal("tokenizing", error))??
    };
    let id = format!("cmpl-{:032x}", rand::random::<u128>());
    let text_refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    log_request(&state, &id, &model, &text_refs);
    let choices = Choices::submit(
        &state,
        &engine,
        &plan,
        &id,
        prompts,
        Endpoint::Completion,
        start,
    )?;
    let meta = Meta {
        id,
        model,
        created: now(),
    };
    if plan.stream {
        Ok(stream(choices, permit, plan, meta, Endpoint::Completion))
    } else {
        let _permit = permit;
        Ok(Json(collect_completion(choices, &plan, meta).await?).into_response())
    }
}

/// `GET /v1/models`: the base model, then one entry per adapter with `parent` = the base.
pub async fn list_models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    Ok(Json(ModelList {
        object: "list",
        data: model_cards(&state)?,
    }))
}

/// `GET /v1/models/{id}`.
pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    model_cards(&state)?
        .into_iter()
        .find(|card| card.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::ModelNotFound { name: bounded(&id) })
}

fn model_cards(state: &AppState) -> Result<Vec<ModelCard>, ApiError> {
    let engine = state.engine()?;
    let config = state.config();
    let base = config.served_model_name.clone();
    let info = engine.info();
    let mut cards = vec![ModelCard {
        id: base.clone(),
        object: "model",
        created: state.created(),
        owned_by: "oxtune",
        root: base.clone(),
        parent: None,
        max_model_len: info.max_model_len,
    }];
    for adapter in &info.adapters {
        let root = config
            .adapter_roots
            .iter()
            .find(|(name, _)| name == adapter)
            .map_or_else(|| adapter.clone(), |(_, root)| root.clone());
        cards.push(ModelCard {
            id: adapter.clone(),
            object: "model",
            created: state.created(),
            owned_by: "oxtune",
            root,
            parent: Some(base.clone()),
            max_model_len: info.max_model_len,
        });
    }
    Ok(cards)
}

// ---------------------------------------------------------------------------------------------
// Prompts.

fn chat_messages(messages: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| {
            let content = match message.content {
                None => String::new(),
                Some(ContentIn::Text(text)) => text,
                Some(ContentIn::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(piece)) => text.push_str(&piece),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("messages[{index}].content"),
                                    format!(
                                        "only text content parts are served, not `{}`",
                                        bounded(kind)
                                    ),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(message.role, content))
        })
        .collect()
}

/// The chat template with the assistant turn opened, tokenized without adding special tokens
/// again (the template has them) — as `oxtune infer` does; models without a template get the
/// contents joined by newlines, with the tokenizer's special tokens.
fn chat_prompt(
    engine: &EngineHandle,
    messages: &[ChatMessage],
) -> Result<(String, Vec<u32>), ApiError> {
    let tokenizer = engine.tokenizer();
    let (text, add_special_tokens) = match engine.chat_template() {
        Some(template) => (
            template.render(messages, true).map_err(|error| {
                ApiError::invalid(
                    "messages",
                    format!("the chat template rejected the messages: {error}"),
                )
            })?,
            false,
        ),
        None => (
            messages
                .iter()
                .map(|message| message.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            true,
        ),
    };
    let ids = tokenizer
        .encode(&text, add_special_tokens)
        .map_err(|error| ApiError::internal("tokenizing", error))?;
    Ok((text, ids))
}

/// Text prompts tokenized with the tokenizer's special tokens (as vLLM does); token prompts
/// as given (the engine checks them against the vocabulary).
fn completion_prompts(
    engine: &EngineHandle,
    prompt: PromptIn,
) -> Result<(Vec<String>, Vec<Vec<u32>>), ApiError> {
    let tokenizer = engine.tokenizer();
    let encode = |text: &str| {
        tokenizer
            .encode(text, true)
            .map_err(|error| ApiError::internal("tokenizing", error))
    };
    Ok(match prompt {
        PromptIn::Text(text) => {
            let ids = if text.is_empty() {
                Vec::new()
            } else {
                encode(&text)?
            };
            (vec![text], vec![ids])
        }
        PromptIn::Texts(texts) => {
            let ids = texts
                .iter()
                .map(|text| {
                    if text.is_empty() {
                        Ok(Vec::new())
                    } else {
                        encode(text)
                    }
                })
                .collect::<Result<_, _>>()?;
            (texts, ids)
        }
        PromptIn::Tokens(ids) => (vec![format!("<{} token ids>", ids.len())], vec![ids]),
        PromptIn::TokenLists(lists) => (
            lists
                .iter()
                .map(|ids| format!("<{} token ids>", ids.len()))
                .collect(),
            lists,
        ),
    })
}

fn log_request(state: &AppState, id: &str, model: &str, prompts: &[&str]) {
    let config = state.config();
    if config.enable_log_requests {
        for prompt in prompts {
            tracing::info!(id, model, prompt = %truncate(prompt, config.max_log_len), "request");
        }
    } else {
        tracing::debug!(id, model, prompts = prompts.len(), "request");
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max_chars).collect();
    cut.push('…');
    cut
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

// ---------------------------------------------------------------------------------------------
// The choices of one request, merged.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    /// Engine errors name the engine's fields; say the endpoint's names instead.
    fn rename(self, error: ApiError) -> ApiError {
        match error {
            ApiError::InvalidRequest {
                message,
                param,
                code,
            } => {
                let param = param.map(|param| match (self, param.as_str()) {
                    (Self::Chat, "prompt") => "messages".to_owned(),
                    (Self::Chat, "logprobs") => "top_logprobs".to_owned(),
                    _ => param,
                });
                ApiError::InvalidRequest {
                    message,
                    param,
                    code,
                }
            }
            other => other,
        }
    }
}

struct Meta {
    id: String,
    model: String,
    created: u64,
}

enum Step {
    Token {
        index: usize,
        text: String,
        logprobs: Option<Logprobs>,
    },
    Finished {
        index: usize,
        reason: FinishReason,
        text: String,
        usage: Usage,
    },
    Failed,
}

/// The event channels of every choice, merged, with per-choice latency metrics. Dropping it
/// before every choice finished aborts the rest (the engine sees the channels close) and
/// counts a `client_disconnected` failure.
struct Choices {
    state: AppState,
    streams: StreamMap<usize, UnboundedReceiverStream<Event>>,
    count: usize,
    open: usize,
    start: Instant,
    last_token: Vec<Option<Instant>>,
    /// Output text per choice, kept only with `--enable_log_requests`.
    log: Option<Vec<String>>,
    id: String,
    settled: bool,
}

impl Choices {
    fn submit(
        state: &AppState,
        engine: &EngineHandle,
        plan: &Plan,
        id: &str,
        prompts: Vec<Vec<u32>>,
        endpoint: Endpoint,
        start: Instant,
    ) -> Result<Self, ApiError> {
        let requests = plan.requests(id, prompts);
        let count = requests.len();
        let mut streams = StreamMap::with_capacity(count);
        for (index, request) in requests.into_iter().enumerate() {
            // On an error the receivers so far are dropped: their requests are aborted.
            let receiver = engine
                .submit(request)
                .map_err(|error| endpoint.rename(ApiError::from(error)))?;
            streams.insert(index, UnboundedReceiverStream::new(receiver));
        }
        Ok(Self {
            state: state.clone(),
            streams,
            count,
            open: count,
            start,
            last_token: vec![None; count],
            log: state
                .config()
                .enable_log_requests
                .then(|| vec![String::new(); count]),
            id: id.to_owned(),
            settled: false,
        })
    }

    async fn next(&mut self) -> Option<Step> {
        if self.open == 0 {
            self.settled = true;
            return None;
        }
        let metrics = self.state.metrics();
        let Some((index, event)) = self.streams.next().await else {
            tracing::error!(id = %self.id, "the engine closed a request without a final event");
            return self.fail();
        };
        match event {
            Event::Token { text, logprobs, .. } => {
                let now = Instant::now();
                if let Some(last) = self.last_token.get_mut(index) {
                    match last {
                        None => metrics.observe_time_to_first_token(now - self.start),
                        Some(previous) => metrics.observe_inter_token_latency(now - *previous),
                    }
                    *last = Some(now);
                }
                if let Some(log) = self.log.as_mut().and_then(|log| log.get_mut(index)) {
                    log.push_str(&text);
                }
                Some(Step::Token {
                    index,
                    text,
                    logprobs,
                })
            }
            Event::Finished {
                reason,
                text,
                usage,
                timings,
            } => {
                self.open -= 1;
                metrics.record_finished(
                    reason.as_str(),
                    self.start.elapsed(),
                    timings.queue_time(),
                    &usage,
                );
                if let Some(log) = self.log.as_mut().and_then(|log| log.get_mut(index)) {
                    log.push_str(&text);
                    let max_log_len = self.state.config().max_log_len;
                    tracing::info!(id = %self.id, index, finish_reason = reason.as_str(), output = %truncate(log, max_log_len), "output");
                }
                Some(Step::Finished {
                    index,
                    reason,
                    text,
                    usage,
                })
            }
            Event::Error { message } => {
                tracing::error!(id = %self.id, index, message, "generation failed");
                self.fail()
            }
        }
    }

    fn fail(&mut self) -> Option<Step> {
        self.settled = true;
        self.state.metrics().record_failure("engine_error");
        Some(Step::Failed)
    }
}

impl Drop for Choices {
    fn drop(&mut self) {
        if !self.settled {
            tracing::debug!(id = %self.id, "client gone; aborting its requests");
            self.state.metrics().record_failure("client_disconnected");
        }
    }
}

fn generation_failed() -> ApiError {
    ApiError::Internal {
        context: "generating",
        detail: "the engine reported an error (logged above)".into(),
    }
}

/// Usage over all choices: each prompt counted once.
#[derive(Default)]
struct UsageSum {
    usage: UsageOut,
}

impl UsageSum {
    fn add(&mut self, index: usize, n: usize, usage: &Usage) {
        if index.is_multiple_of(n) {
            self.usage.prompt_tokens += usage.prompt_tokens;
            self.usage.prompt_tokens_details.cached_tokens += usage.cached_prompt_tokens;
        }
        self.usage.completion_tokens += usage.completion_tokens;
        self.usage.total_tokens = self.usage.prompt_tokens + self.usage.completion_tokens;
    }
}

fn chat_logprob(logprobs: &Logprobs) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: logprobs.chosen.text.clone(),
        logprob: logprobs.chosen.logprob,
        bytes: logprobs.chosen.bytes.clone(),
        top_logprobs: logprobs
            .top
            .iter()
            .map(|top| ChatTopLogprob {
                token: top.text.clone(),
                logprob: top.logprob,
                bytes: top.bytes.clone(),
            })
            .collect(),
    }
}

fn push_completion_logprob(into: &mut CompletionLogprobs, logprobs: &Logprobs, offset: usize) {
    into.tokens.push(logprobs.chosen.text.clone());
    into.token_logprobs.push(logprobs.chosen.logprob);
    into.top_logprobs.push(
        logprobs
            .top
            .iter()
            .map(|top| (top.text.clone(), top.logprob))
            .collect::<BTreeMap<_, _>>(),
    );
    into.text_offset.push(offset);
}

async fn collect_chat(
    mut choices: Choices,
    plan: &Plan,
    meta: Meta,
) -> Result<ChatCompletion, ApiError> {
    let count = choices.count;
    let want_logprobs = plan.template.logprobs.is_some();
    let mut out: Vec<ChatChoice> = (0..count)
        .map(|index| ChatChoice {
            index,
            message: ChatMessageOut {
                role: "assistant",
                content: String::new(),
            },
            logprobs: want_logprobs.then(ChatLogprobs::default),
            finish_reason: None,
        })
        .collect();
    let mut usage = UsageSum::default();
    while let Some(step) = choices.next().await {
        match step {
            Step::Token {
                index,
                text,
                logprobs,
            } => {
                if let Some(choice) = out.get_mut(index) {
                    choice.message.content.push_str(&text);
                    if let (Some(all), Some(logprobs)) = (choice.logprobs.as_mut(), logprobs) {
                        all.content.push(chat_logprob(&logprobs));
                    }
                }
            }
            Step::Finished {
                index,
                reason,
                text,
                usage: choice_usage,
            } => {
                if let Some(choice) = out.get_mut(index) {
                    choice.message.content.push_str(&text);
                    choice.finish_reason = Some(reason.as_str());
                }
                usage.add(index, plan.n, &choice_usage);
            }
            Step::Failed => return Err(generation_failed()),
        }
    }
    Ok(ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        choices: out,
        usage: usage.usage,
    })
}

async fn collect_completion(
    mut choices: Choices,
    plan: &Plan,
    meta: Meta,
) -> Result<Completion, ApiError> {
    let count = choices.count;
    let want_logprobs = plan.template.logprobs.is_some();
    let mut out: Vec<CompletionChoice> = (0..count)
        .map(|index| CompletionChoice {
            index,
            text: String::new(),
            logprobs: want_logprobs.then(CompletionLogprobs::default),
            finish_reason: None,
        })
        .collect();
    let mut usage = UsageSum::default();
    while let Some(step) = choices.next().await {
        match step {
            Step::Token {
                index,
                text,
                logprobs,
            } => {
                if let Some(choice) = out.get_mut(index) {
                    let offset = choice.text.chars().count();
                    if let (Some(all), Some(logprobs)) = (choice.logprobs.as_mut(), logprobs) {
                        push_completion_logprob(all, &logprobs, offset);
                    }
                    choice.text.push_str(&text);
                }
            }
            Step::Finished {
                index,
                reason,
                text,
                usage: choice_usage,
            } => {
                if let Some(choice) = out.get_mut(index) {
                    choice.text.push_str(&text);
                    choice.finish_reason = Some(reason.as_str());
                }
                usage.add(index, plan.n, &choice_usage);
            }
            Step::Failed => return Err(generation_failed()),
        }
    }
    Ok(Completion {
        id: meta.id,
        object: "text_completion",
        created: meta.created,
        model: meta.model,
        choices: out,
        usage: Some(Some(usage.usage)),
    })
}

// ---------------------------------------------------------------------------------------------
// Streaming.

fn sse_json<T: Serialize>(value: &T) -> SseEvent {
    match serde_json::to_string(value) {
        Ok(json) => SseEvent::default().data(json),
        Err(error) => {
            SseEvent::default().data(ApiError::internal("encoding a chunk", error).envelope_json())
        }
    }
}

/// Builds the stream's chunks for one endpoint.
struct ChunkWriter {
    endpoint: Endpoint,
    meta: Meta,
    include_usage: bool,
    /// Chat: whether the role chunk went out; completions: characters so far (text_offset).
    started: Vec<bool>,
    offsets: Vec<usize>,
}

impl ChunkWriter {
    fn usage_field(&self) -> Option<Option<UsageOut>> {
        self.include_usage.then_some(None)
    }

    fn chat(&self, choice: ChatChunkChoice) -> SseEvent {
        sse_json(&ChatCompletionChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![choice],
            usage: self.usage_field(),
        })
    }

    fn completion(&self, choice: CompletionChoice) -> SseEvent {
        sse_json(&Completion {
            id: self.meta.id.clone(),
            object: "text_completion",
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![choice],
            usage: self.usage_field(),
        })
    }

    /// Chat: the role chunk, once per choice.
    fn open(&mut self, index: usize, events: &mut Vec<SseEvent>) {
        if self.endpoint == Endpoint::Chat
            && let Some(started) = self.started.get_mut(index)
            && !*started
        {
            *started = true;
            events.push(self.chat(ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            }));
        }
    }

    fn token(
        &mut self,
        index: usize,
        text: String,
        logprobs: Option<&Logprobs>,
        events: &mut Vec<SseEvent>,
    ) {
        self.open(index, events);
        if text.is_empty() && logprobs.is_none() {
            return;
        }
        match self.endpoint {
            Endpoint::Chat => events.push(self.chat(ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: None,
                    content: Some(text),
                },
                logprobs: logprobs.map(|logprobs| ChatLogprobs {
                    content: vec![chat_logprob(logprobs)],
                }),
                finish_reason: None,
            })),
            Endpoint::Completion => {
                let offset = self.offsets.get(index).copied().unwrap_or(0);
                let logprobs = logprobs.map(|logprobs| {
                    let mut out = CompletionLogprobs::default();
                    push_completion_logprob(&mut out, logprobs, offset);
                    out
                });
                if let Some(slot) = self.offsets.get_mut(index) {
                    *slot += text.chars().count();
                }
                events.push(self.completion(CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: None,
                }));
            }
        }
    }

    fn finish(
        &mut self,
        index: usize,
        reason: FinishReason,
        text: String,
        events: &mut Vec<SseEvent>,
    ) {
        if !text.is_empty() {
            self.token(index, text, None, events);
        }
        self.open(index, events);
        events.push(match self.endpoint {
            Endpoint::Chat => self.chat(ChatChunkChoice {
                index,
                delta: ChatDelta::default(),
                logprobs: None,
                finish_reason: Some(reason.as_str()),
            }),
            Endpoint::Completion => self.completion(CompletionChoice {
                index,
                text: String::new(),
                logprobs: None,
                finish_reason: Some(reason.as_str()),
            }),
        });
    }

    fn usage(&self, usage: UsageOut) -> SseEvent {
        match self.endpoint {
            Endpoint::Chat => sse_json(&ChatCompletionChunk {
                id: self.meta.id.clone(),
                object: "chat.completion.chunk",
                created: self.meta.created,
                model: self.meta.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
            Endpoint::Completion => sse_json(&Completion {
                id: self.meta.id.clone(),
                object: "text_completion",
                created: self.meta.created,
                model: self.meta.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
        }
    }
}

/// The SSE response: a task turns engine events into chunks and stops when the client goes.
fn stream(
    mut choices: Choices,
    permit: OwnedSemaphorePermit,
    plan: Plan,
    meta: Meta,
    endpoint: Endpoint,
) -> Response {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let count = choices.count;
    let mut writer = ChunkWriter {
        endpoint,
        meta,
        include_usage: plan.include_usage,
        started: vec![false; count],
        offsets: vec![0; count],
    };
    tokio::spawn(async move {
        // Held until the stream ends: the request counts against --max_concurrent_requests.
        let _permit = permit;
        let mut usage = UsageSum::default();
        loop {
            let step = tokio::select! {
                () = sender.closed() => return, // client gone: `choices` drops, aborting
                step = choices.next() => step,
            };
            let mut events = Vec::new();
            match step {
                None => break,
                Some(Step::Token {
                    index,
                    text,
                    logprobs,
                }) => writer.token(index, text, logprobs.as_ref(), &mut events),
                Some(Step::Finished {
                    index,
                    reason,
                    text,
                    usage: choice_usage,
                }) => {
                    usage.add(index, plan.n, &choice_usage);
                    writer.finish(index, reason, text, &mut events);
                }
                Some(Step::Failed) => {
                    events.push(SseEvent::default().data(generation_failed().envelope_json()));
                    events.push(SseEvent::default().data("[DONE]"));
                    for event in events {
                        if sender.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
            }
            for event in events {
                if sender.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
        if plan.include_usage {
            let _ = sender.send(Ok(writer.usage(usage.usage))).await;
        }
        let _ = sender.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ChatCompletionRequest;

    #[test]
    fn json_errors_name_the_field_and_stay_small() {
        let error =
            parse_json::<ChatCompletionRequest>(br#"{"messages": [], "temperature": "hot"}"#).err();
        assert_eq!(
            error.as_ref().and_then(ApiError::param).as_deref(),
            Some("temperature")
        );
        let error = parse_json::<ChatCompletionRequest>(br#"{"model": "x"}"#).err();
        assert_eq!(
            error.as_ref().and_then(ApiError::param).as_deref(),
            Some("messages")
        );
        let error = parse_json::<ChatCompletionRequest>(b"{not json").err();
        assert_eq!(error.as_ref().map(|e| e.status().as_u16()), Some(400));
        // Thousands of bad elements: one bounded message.
        let body = format!(r#"{{"messages": [{}]}}"#, vec!["1"; 2000].join(","));
        let error = parse_json::<ChatCompletionRequest>(body.as_bytes()).err();
        let size = error.map(|e| e.envelope_json().len()).unwrap_or(usize::MAX);
        assert!(size < 2048, "{size}");
    }
}
