//! API keys: `Authorization: Bearer <key>`, compared in constant time and case-sensitively.
//!
//! Keys are kept only as SHA-256 digests; a presented key is hashed and compared with every
//! digest by XOR-folding all 32 bytes (no early exit, no short-circuit over the key list), so
//! neither the position of the first wrong byte nor which key matched shows in the timing —
//! vLLM's approach (hash, then `compare_digest`). The scheme word `Bearer` is matched
//! case-insensitively (RFC 9110); the key itself never is (TGI's lower-casing is the
//! anti-pattern).
//!
//! Guarded: every route except `GET /health`, `GET /health/ready`, CORS preflight (`OPTIONS`)
//! and the web page's routes (`page.rs`; the page itself is static and calls `/v1` with the
//! key the user types). `/metrics` is guarded too: scrape it with Prometheus'
//! `authorization: {credentials: <key>}`.

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::ApiError;

/// Paths reachable without a key (probes).
pub const OPEN_PATHS: &[&str] = &["/health", "/health/ready"];

/// The accepted keys, as digests.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys(<{} redacted>)", self.digests.len())
    }
}

impl ApiKeys {
    pub fn new(keys: &[String]) -> Self {
        Self {
            digests: keys.iter().map(|key| digest(key)).collect(),
        }
    }

    /// No key configured: the server is open.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the keys (constant time in the key's content).
    pub fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented);
        let mut any = 0u8;
        for expected in &self.digests {
            let mut difference = 0u8;
            for (a, b) in expected.iter().zip(presented.iter()) {
                difference |= a ^ b;
            }
            // 1 when equal, 0 otherwise, without a branch on the bytes.
            any |= u8::from(difference == 0);
        }
        any == 1
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The key of an `Authorization: Bearer <key>` header.
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Middleware: 401 in the error envelope unless the request carries a valid key.
pub async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let keys = state.api_keys();
    if keys.is_empty()
        || request.method() == Method::OPTIONS
        || OPEN_PATHS.contains(&request.uri().path())
    {
        return next.run(request).await;
    }
    match bearer(&request) {
        Some(key) if keys.accepts(key) => next.run(request).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly_and_case_sensitively() {
        let keys = ApiKeys::new(&["Secret-1".into(), "other".into()]);
        assert!(keys.accepts("Secret-1"));
        assert!(keys.accepts("other"));
        assert!(!keys.accepts("secret-1"));
        assert!(!keys.accepts("Secret-1 "));
        assert!(!keys.accepts(""));
        assert!(!ApiKeys::new(&[]).accepts("Secret-1"));
        assert!(!format!("{keys:?}").contains("Secret"));
    }
}
