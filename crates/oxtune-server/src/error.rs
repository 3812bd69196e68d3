//! The one error type of the server: every failure becomes an OpenAI error envelope
//! `{"error": {"message", "type", "param", "code"}}` with an HTTP status, or — once a stream
//! has started — an SSE event carrying the same envelope, followed by `data: [DONE]`.
//!
//! Messages are bounded ([`MAX_MESSAGE_CHARS`]) and never carry internals: a 5xx says what
//! happened in general terms and the details go to the server log.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Longest `message` a client gets; longer text is cut with an ellipsis.
pub const MAX_MESSAGE_CHARS: usize = 512;

/// Seconds a client is told to wait (`Retry-After`) after a 429 or 503.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Everything that can go wrong in a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// A bad request: malformed JSON, a parameter out of range, a prompt too long.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// `model` names neither the base model nor a served adapter.
    #[error("the model `{name}` does not exist here; GET /v1/models lists the served models")]
    ModelNotFound { name: String },
    /// No route at this path.
    #[error("no route {path}; the API is under /v1 (chat/completions, completions, models)")]
    RouteNotFound { path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// Missing or wrong API key.
    #[error(
        "missing or invalid API key; send it as `Authorization: Bearer <key>` (one of the --api_key values)"
    )]
    Unauthorized,
    #[error(
        "the request body is larger than this server's limit of {limit} bytes (--max_payload_size); send a smaller body"
    )]
    PayloadTooLarge { size: Option<u64>, limit: usize },
    #[error("the body must be JSON: send `Content-Type: application/json`{got}")]
    UnsupportedMediaType { got: String },
    /// The admission cap (`--max_concurrent_requests`, or the engine's queue) is reached.
    #[error(
        "the server is at its limit of {limit} concurrent requests; retry after {RETRY_AFTER_SECS} s"
    )]
    Overloaded { limit: usize },
    #[error("the server is shutting down and takes no new requests")]
    ShuttingDown,
    #[error("the model is still loading; retry shortly")]
    Starting,
    #[error("the engine has stopped; the server must be restarted")]
    EngineDead,
    #[error("the readiness check did not generate a token within {timeout_secs} s")]
    NotReady { timeout_secs: u64 },
    /// Something failed inside; `detail` goes to the log, never to the client.
    #[error("internal error while {context}; see the server log")]
    Internal {
        context: &'static str,
        detail: String,
    },
}

/// The envelope's body.
#[derive(Debug, Serialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

/// Which failure it was, attached to error responses so the metrics layer can count it under
/// `oxtune:request_failure_total{reason}`.
#[derive(Debug, Clone, Copy)]
pub struct FailureReason(pub &'static str);

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 500 whose `detail` is only logged.
    pub fn internal(context: &'static str, detail: impl std::fmt::Display) -> Self {
        Self::Internal {
            context,
            detail: detail.to_string(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound { .. } | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::ShuttingDown | Self::Starting | Self::EngineDead | Self::NotReady { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. }
            | Self::ModelNotFound { .. }
            | Self::PayloadTooLarge { .. }
            | Self::UnsupportedMediaType { .. }
            | Self::MethodNotAllowed { .. } => "invalid_request_error",
            Self::RouteNotFound { .. } => "not_found_error",
            Self::Unauthorized => "authentication_error",
            Self::Overloaded { .. } => "rate_limit_error",
            Self::ShuttingDown | Self::Starting | Self::EngineDead | Self::NotReady { .. } => {
                "service_unavailable_error"
            }
            Self::Internal { .. } => "server_error",
        }
    }

    /// OpenAI's `code`: a string or null (never the HTTP status).
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::InvalidRequest { code, .. } => *code,
            Self::ModelNotFound { .. } => Some("model_not_found"),
            Self::RouteNotFound { .. } => Some("not_found"),
            Self::MethodNotAllowed { .. } => Some("method_not_allowed"),
            Self::Unauthorized => Some("invalid_api_key"),
            Self::PayloadTooLarge { .. } => Some("payload_too_large"),
            Self::UnsupportedMediaType { .. } => Some("unsupported_media_type"),
            Self::Overloaded { .. } => Some("too_many_requests"),
            Self::ShuttingDown => Some("shutting_down"),
            Self::Starting => Some("starting"),
            Self::EngineDead => Some("engine_dead"),
            Self::NotReady { .. } => Some("not_ready"),
            Self::Internal { .. } => None,
        }
    }

    pub fn param(&self) -> Option<String> {
        match self {
            Self::InvalidRequest { param, .. } => param.clone(),
            Self::ModelNotFound { .. } => Some("model".into()),
            _ => None,
        }
    }

    /// The label under `oxtune:request_failure_total{reason}`.
    pub fn failure_reason(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. }
            | Self::PayloadTooLarge { .. }
            | Self::UnsupportedMediaType { .. }
            | Self::MethodNotAllowed { .. } => "invalid_request",
            Self::ModelNotFound { .. } | Self::RouteNotFound { .. } => "not_found",
            Self::Unauthorized => "unauthorized",
            Self::Overloaded { .. } => "overloaded",
            Self::ShuttingDown => "shutting_down",
            Self::Starting | Self::NotReady { .. } => "not_ready",
            Self::EngineDead => "engine_dead",
            Self::Internal { .. } => "internal",
        }
    }

    /// The envelope, with the message bounded.
    pub fn envelope(&self) -> ErrorEnvelope {
        ErrorEnvelope {
            error: ErrorBody {
                message: bounded(&self.to_string()),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        }
    }

    /// The envelope as JSON text (for an SSE `data:` line).
    pub fn envelope_json(&self) -> String {
        serde_json::to_string(&self.envelope()).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
                .to_owned()
        })
    }
}

/// `text` cut to [`MAX_MESSAGE_CHARS`] characters.
pub fn bounded(text: &str) -> String {
    if text.chars().count() <= MAX_MESSAGE_CHARS {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(MAX_MESSAGE_CHARS - 1).collect();
    cut.push('…');
    cut
}

impl From<oxtune_engine::Error> for ApiError {
    fn from(error: oxtune_engine::Error) -> Self {
        use oxtune_engine::Error as E;
        match error {
            E::InvalidRequest {
                param,
                code,
                message,
            } => Self::InvalidRequest {
                message,
                param: Some(param.to_owned()),
                code,
            },
            E::InvalidParameter {
                name,
                value,
                expected,
            } => Self::invalid(name, format!("`{name}` = {value}: expected {expected}")),
            E::UnknownAdapter { name } => Self::ModelNotFound { name },
            E::Overloaded { limit } => Self::Overloaded { limit },
            E::ShuttingDown => Self::ShuttingDown,
            E::EngineDead => Self::EngineDead,
            other => Self::internal("submitting the request", other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal { context, detail } = &self {
            tracing::error!(context, detail, "internal error");
        }
        let status = self.status();
        let mut response = (status, axum::Json(self.envelope())).into_response();
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if matches!(self, Self::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
            .extensions_mut()
            .insert(FailureReason(self.failure_reason()));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_status_type_and_a_string_or_null_code() {
        let errors = [
            ApiError::invalid("temperature", "bad"),
            ApiError::ModelNotFound { name: "x".into() },
            ApiError::Unauthorized,
            ApiError::PayloadTooLarge {
                size: Some(10),
                limit: 1,
            },
            ApiError::Overloaded { limit: 1 },
            ApiError::ShuttingDown,
            ApiError::internal("testing", "/secret/path 0xdeadbeef"),
        ];
        for error in errors {
            let json = serde_json::to_value(error.envelope()).unwrap_or_default();
            let body = &json["error"];
            assert!(body["message"].is_string(), "{json}");
            assert!(body["type"].is_string(), "{json}");
            assert!(body["code"].is_string() || body["code"].is_null(), "{json}");
            assert!(!body["message"].as_str().unwrap_or("").contains("/secret"));
            assert!(error.status().as_u16() >= 400);
        }
    }

    #[test]
    fn messages_are_bounded() {
        let long = "x".repeat(100_000);
        let error = ApiError::invalid("prompt", long);
        assert!(error.envelope_json().len() < 1024);
    }

    #[test]
    fn engine_errors_keep_param_and_code() {
        let error = ApiError::from(oxtune_engine::Error::InvalidRequest {
            param: "max_tokens",
            code: Some("context_length_exceeded"),
            message: "too long".into(),
        });
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error.param().as_deref(), Some("max_tokens"));
        assert_eq!(error.code(), Some("context_length_exceeded"));
        let error = ApiError::from(oxtune_engine::Error::UnknownAdapter { name: "a".into() });
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        assert_eq!(error.param().as_deref(), Some("model"));
    }
}
