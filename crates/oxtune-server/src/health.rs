//! Probes and metrics: `GET /health` (liveness: 503 once the engine thread is dead),
//! `GET /health/ready` (readiness: a one-token generation within `ready_timeout`; 503 while
//! loading, draining or dead) and `GET /metrics` (Prometheus text).

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use oxtune_engine::{Event, Request};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;

/// `GET /health`: 200 while the engine thread runs (or the model is still loading).
pub async fn health(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match state.engine() {
        Ok(engine) if engine.is_alive() => Ok(Json(json!({"status": "ok"}))),
        Ok(_) => Err(ApiError::EngineDead),
        Err(_) => Ok(Json(json!({"status": "starting"}))),
    }
}

/// `GET /health/ready`: generates one token (greedy) and answers 200 when it arrives.
pub async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    let engine = state.engine()?;
    if !engine.is_alive() {
        return Err(ApiError::EngineDead);
    }
    let timeout = state.config().ready_timeout;
    let not_ready = ApiError::NotReady {
        timeout_secs: timeout.as_secs(),
    };
    let _one_at_a_time = state.ready_probe_lock().await;
    let token = engine.info().eos_token_ids.first().copied().unwrap_or(0);
    let mut request = Request::new("health-ready", vec![token]);
    request.max_tokens = Some(1);
    let mut events = engine
        .submit(request)
        .map_err(|error| match ApiError::from(error) {
            ApiError::Overloaded { .. } => not_ready.clone(),
            other => other,
        })?;
    let generated = tokio::time::timeout(timeout, async {
        loop {
            match events.recv().await {
                Some(Event::Token { .. }) => {}
                Some(Event::Finished { .. }) => return true,
                Some(Event::Error { .. }) | None => return false,
            }
        }
    })
    .await;
    match generated {
        Ok(true) => Ok(Json(json!({"status": "ready"}))),
        Ok(false) if !engine.is_alive() => Err(ApiError::EngineDead),
        _ => Err(not_ready),
    }
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let stats = state.engine().ok().map(oxtune_engine::EngineHandle::stats);
    let text = state.metrics().render(stats.as_ref());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
