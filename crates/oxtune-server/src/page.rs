//! The web chat page's routes — owned by the engineer building the page, not by the API.
//!
//! Whatever [`page_routes`] returns is merged into the server's router outside the API-key
//! layer (see `lib.rs::router`), so `GET /` can serve a static page; the page's own calls go to
//! the guarded `/v1` routes with the key its user enters. Add `.route("/", get(...))` here.

use axum::Router;

use crate::AppState;

/// The page's routes (none yet).
pub fn page_routes() -> Router<AppState> {
    Router::new()
}
