//! oxtune's OpenAI-compatible HTTP server over the engine ([`oxtune_engine::EngineHandle`]).
//!
//! - [`protocol`]: the OpenAI wire types;
//! - [`validate`]: request bodies -> engine requests, with every cap and range checked;
//! - [`openai`]: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, SSE streaming, n > 1;
//! - [`error`]: [`ApiError`], the one error type -> status + envelope, or an SSE error event;
//! - [`auth`]: API keys (constant-time), [`metrics`]: Prometheus, [`health`]: probes;
//! - [`page`]: the web page's routes (owned by the page's author).
//!
//! [`router`] builds the whole app from an [`AppState`]; [`serve`] runs it on a listener until
//! a shutdown signal, then drains: new requests get 503, in-flight ones may finish for
//! `shutdown_timeout`, the rest are aborted (`finish_reason: "abort"`), and the engine stops.
//! The engine may be attached after the listener opens ([`AppState::set_engine`]): until then
//! every inference route and `/health/ready` answer 503 `starting`.

pub mod auth;
pub mod error;
pub mod health;
pub mod metrics;
pub mod openai;
pub mod page;
pub mod protocol;
pub mod validate;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use oxtune_engine::{EngineHandle, SamplingParams};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use error::ApiError;
pub use metrics::Metrics;

use crate::auth::ApiKeys;
use crate::error::FailureReason;

/// Most requests `--max_concurrent_requests` may allow (the drain waits for all permits).
pub const MAX_CONCURRENT_LIMIT: usize = 1 << 20;

/// Start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How the server behaves; every field is a `oxtune deploy` flag (docs/deploy.md).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The base model's name in `/v1/models` and the `model` field.
    pub served_model_name: String,
    /// Accepted bearer keys; empty = no authentication.
    pub api_keys: Vec<String>,
    /// Requests handled at once; the next gets 429 with `Retry-After`.
    pub max_concurrent_requests: usize,
    /// Largest request body in bytes (413 beyond).
    pub max_payload_size: usize,
    /// Largest `n` (choices per request).
    pub max_n: usize,
    /// Largest `top_logprobs` / `logprobs`.
    pub max_logprobs: usize,
    /// Most `stop` strings per request.
    pub max_stop_sequences: usize,
    /// Most prompts in one `/v1/completions` request.
    pub max_batch_size: usize,
    /// Most `logit_bias` entries.
    pub max_logit_bias: usize,
    /// CORS origins allowed (`*` = any, without credentials); empty = CORS off.
    pub allowed_origins: Vec<String>,
    /// Log prompts and outputs (truncated to `max_log_len` characters).
    pub enable_log_requests: bool,
    pub max_log_len: usize,
    /// How long in-flight requests may finish after SIGTERM/SIGINT before they are aborted.
    pub shutdown_timeout: Duration,
    /// How long `/health/ready`'s one-token generation may take.
    pub ready_timeout: Duration,
    /// Sampling defaults for fields a request leaves out (the checkpoint's
    /// generation_config.json; OpenAI's defaults otherwise).
    pub default_sampling: SamplingParams,
    /// Adapter name -> where it was loaded from (shown as `root` in `/v1/models`).
    pub adapter_roots: Vec<(String, String)>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            served_model_name: "model".into(),
            api_keys: Vec::new(),
            max_concurrent_requests: 256,
            max_payload_size: 8 << 20,
            max_n: 16,
            max_logprobs: 20,
            max_stop_sequences: 16,
            max_batch_size: 32,
            max_logit_bias: 1024,
            allowed_origins: Vec::new(),
            enable_log_requests: false,
            max_log_len: 256,
            shutdown_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(20),
            default_sampling: SamplingParams {
                temperature: 1.0,
                ..SamplingParams::default()
            },
            adapter_roots: Vec::new(),
        }
    }
}

struct Inner {
    config: ServerConfig,
    keys: ApiKeys,
    engine: OnceLock<EngineHandle>,
    metrics: Metrics,
    permits: Arc<Semaphore>,
    draining: AtomicBool,
    /// Set once the drain gave up waiting and aborted what was left.
    aborted: AtomicBool,
    created: u64,
    /// One readiness generation at a time.
    ready_probe: tokio::sync::Mutex<()>,
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("served_model_name", &self.inner.config.served_model_name)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// A server without its engine yet (see [`AppState::set_engine`]).
    pub fn new(config: ServerConfig) -> Result<Self, Error> {
        if config.max_concurrent_requests == 0
            || config.max_concurrent_requests > MAX_CONCURRENT_LIMIT
        {
            return Err(Error::Config(format!(
                "--max_concurrent_requests must be in 1..={MAX_CONCURRENT_LIMIT}, not {}",
                config.max_concurrent_requests
            )));
        }
        if config.max_n == 0 {
            return Err(Error::Config("--max_n must be at least 1".into()));
        }
        if config.served_model_name.is_empty() {
            return Err(Error::Config(
                "--served_model_name must not be empty".into(),
            ));
        }
        cors_layer(&config.allowed_origins)?;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        Ok(Self {
            inner: Arc::new(Inner {
                keys: ApiKeys::new(&config.api_keys),
                permits: Arc::new(Semaphore::new(config.max_concurrent_requests)),
                config,
                engine: OnceLock::new(),
                metrics: Metrics::new(),
                draining: AtomicBool::new(false),
                aborted: AtomicBool::new(false),
                created,
                ready_probe: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// A server over a running engine.
    pub fn with_engine(config: ServerConfig, engine: EngineHandle) -> Result<Self, Error> {
        let state = Self::new(config)?;
        state.set_engine(engine);
        Ok(state)
    }

    /// Attaches the engine once it has started; later calls are ignored.
    pub fn set_engine(&self, engine: EngineHandle) {
        if self.inner.engine.set(engine).is_err() {
            tracing::warn!("the engine was already attached");
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn api_keys(&self) -> &ApiKeys {
        &self.inner.keys
    }

    pub(crate) fn created(&self) -> u64 {
        self.inner.created
    }

    /// The engine, or 503 while it loads.
    pub fn engine(&self) -> Result<&EngineHandle, ApiError> {
        self.inner.engine.get().ok_or(ApiError::Starting)
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Whether the drain has aborted the requests still running (after `shutdown_timeout`).
    pub fn has_aborted(&self) -> bool {
        self.inner.aborted.load(Ordering::SeqCst)
    }

    /// Requests being handled now.
    pub fn active_requests(&self) -> usize {
        self.inner.config.max_concurrent_requests - self.inner.permits.available_permits()
    }

    /// Admission: 503 while draining or loading, 429 beyond `max_concurrent_requests`.
    /// The permit is held until the response (or its stream) ends.
    pub fn admit(&self) -> Result<(EngineHandle, OwnedSemaphorePermit), ApiError> {
        if self.is_draining() {
            return Err(ApiError::ShuttingDown);
        }
        let engine = self.engine()?.clone();
        let permit = Arc::clone(&self.inner.permits)
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded {
                limit: self.inner.config.max_concurrent_requests,
            })?;
        Ok((engine, permit))
    }

    pub(crate) async fn ready_probe_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.ready_probe.lock().await
    }

    /// Stops admitting, lets in-flight requests finish for `shutdown_timeout`, then aborts the
    /// rest and waits (a little) for their final events to go out.
    pub async fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        let engine = self.inner.engine.get();
        if let Some(engine) = engine {
            engine.stop_accepting();
        }
        let timeout = self.inner.config.shutdown_timeout;
        let active = self.active_requests();
        tracing::info!(active, timeout_s = timeout.as_secs_f64(), "draining");
        if !self.wait_idle(timeout).await {
            tracing::warn!(
                active = self.active_requests(),
                "shutdown timeout: aborting the rest"
            );
            if let Some(engine) = engine {
                engine.abort_all();
            }
            self.inner.aborted.store(true, Ordering::SeqCst);
            if !self.wait_idle(Duration::from_secs(2)).await {
                tracing::warn!("requests still open after the abort; closing anyway");
            }
        }
    }

    /// Waits until every admission permit is back (no request in flight), up to `timeout`.
    async fn wait_idle(&self, timeout: Duration) -> bool {
        let all = u32::try_from(self.inner.config.max_concurrent_requests).unwrap_or(u32::MAX);
        let permits = Arc::clone(&self.inner.permits);
        matches!(
            tokio::time::timeout(timeout, permits.acquire_many_owned(all)).await,
            Ok(Ok(_))
        )
    }
}

/// The CORS layer for `origins` (None = CORS off).
fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, Error> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|origin| {
                HeaderValue::from_str(origin).map_err(|_| {
                    Error::Config(format!(
                        "--allowed_origins: `{origin}` is not a valid origin"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(values)
    };
    // Never credentials: with `*` that would let any site use a browser's cookies.
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(Duration::from_secs(600)),
    ))
}

/// The whole app: API routes behind the key check, probes, the page's routes, and outside
/// everything the failure counter and (when configured) CORS.
pub fn router(state: AppState) -> Router {
    let limit = state.config().max_payload_size;
    let guarded = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{*id}", get(openai::get_model))
        .route("/metrics", get(health::metrics))
        .route("/health", get(health::health))
        .route("/health/ready", get(health::ready))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    let mut app = guarded
        .merge(page::page_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_failures,
        ));
    // Validated in AppState::new; an invalid list cannot reach here.
    if let Ok(Some(cors)) = cors_layer(&state.config().allowed_origins) {
        app = app.layer(cors);
    }
    app.with_state(state)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::RouteNotFound {
        path: error::bounded(request.uri().path()),
    }
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed {
        method: request.method().to_string(),
        path: error::bounded(request.uri().path()),
    }
}

/// Counts error responses under `oxtune:request_failure_total{reason}`; rejects bodies whose
/// declared length is over the limit before they are read.
async fn count_failures(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.config().max_payload_size;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let response = match declared {
        Some(size) if size > limit as u64 => ApiError::PayloadTooLarge {
            size: Some(size),
            limit,
        }
        .into_response(),
        _ => next.run(request).await,
    };
    if let Some(FailureReason(reason)) = response.extensions().get::<FailureReason>() {
        state.metrics().record_failure(reason);
    }
    response
}

/// Runs the app on `listener` until `shutdown` resolves, then drains (see [`AppState::drain`])
/// and stops the engine.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let app = router(state.clone());
    let draining = state.clone();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let graceful = async move {
        shutdown.await;
        draining.drain().await;
        let _ = closed_tx.send(());
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(graceful);
    let server = std::pin::pin!(server.into_future());
    // After the drain, connections that stay open (an idle keep-alive client) get 2 s.
    let result = tokio::select! {
        result = server => result.map_err(Error::from),
        () = async {
            let _ = closed_rx.await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        } => Ok(()),
    };
    if let Ok(engine) = state.engine() {
        engine.shutdown();
    }
    result
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}
