//! The API's two per-route middlewares, each one `from_fn` composing the steps of its modules:
//!
//! - `front`, around every API route and the API's fallbacks, outside tower-http's CORS layer:
//!   metrics and request id (`metrics::tracking`), which routes keep CORS (`cors::policy`), the
//!   error fields the Segment SDKs read under `/v1/` (`segment::sdk_error_fields`);
//! - `admit`, around the data routes, inside the router: the in-flight bound
//!   (`inflight::bounded`), then the body's coding (`body::known_encoding`), then tower-http's
//!   decompression and the handler.
//!
//! Why two and not one layer per step: axum clones a route's whole layer stack for each request
//! (each layer's `Route` is a boxed service, and `from_fn` clones its inner stack again per
//! call), so every layer costs allocations on every request; five `from_fn` layers were ~28% of
//! the workers' CPU on single events (BENCHMARKS.md, issue 19). The order of the steps is the
//! order the separate layers had.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::cors::CorsConfig;
use crate::{AppState, body, cors, inflight, metrics, segment};

/// Outermost on the API's routes and fallbacks (the CORS layer is inside it).
pub(crate) async fn front(
    State(config): State<Arc<CorsConfig>>,
    request: Request,
    next: Next,
) -> Response {
    metrics::tracking(request, |request| {
        cors::policy(&config, request, |request| {
            segment::sdk_error_fields(request, |request| next.run(request))
        })
    })
    .await
}

/// Around the data routes: the request's share of the in-flight bound, then its coding.
pub(crate) async fn admit(State(app): State<AppState>, request: Request, next: Next) -> Response {
    inflight::bounded(&app, request, |request| {
        body::known_encoding(request, |request| next.run(request))
    })
    .await
}
