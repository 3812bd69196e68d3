//! The web chat page at `GET /`: one self-contained file (`page.html`: HTML, CSS and vanilla
//! JS, no CDN, no web fonts) compiled into the binary, so it works on an offline machine.
//!
//! [`page_routes`] is merged into the server's router outside the API-key layer (see
//! `lib.rs::router`): the page is static, and its own calls (`GET /v1/models`,
//! `POST /v1/chat/completions` with `stream: true`) go to the guarded `/v1` routes with the
//! key its user types. Tested end to end in headless Chromium: `tests/browser/`.

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;

use crate::AppState;

/// The page, HTML + CSS + JS in one file.
pub const PAGE_HTML: &str = include_str!("page.html");

/// `GET /` (and `HEAD /`): the chat page.
pub fn page_routes() -> Router<AppState> {
    Router::new().route("/", get(page))
}

/// `text/html; charset=utf-8`; `no-cache` so a new binary's page replaces the old one.
async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE_HTML))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_page_is_utf8_html_and_self_contained() {
        let response = page().await.into_response();
        assert_eq!(response.status(), axum::http::StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("an in-memory body");
        assert_eq!(body, PAGE_HTML.as_bytes());
        // The ids the browser test drives.
        for id in [
            "model",
            "system",
            "temperature",
            "top_p",
            "max_tokens",
            "seed",
            "api_key",
            "prompt",
            "send",
            "stop",
            "new_chat",
            "messages",
            "status",
        ] {
            assert!(PAGE_HTML.contains(&format!("id=\"{id}\"")), "no #{id}");
        }
        // Nothing from another host (the machine may be offline), and model output is never
        // parsed as HTML.
        assert!(!PAGE_HTML.contains("http://") && !PAGE_HTML.contains("https://"));
        assert!(!PAGE_HTML.contains("innerHTML"));
    }
}
