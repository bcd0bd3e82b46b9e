//! The HTTP ingestion API (SPEC §4): authenticate, parse and validate, unbatch into one message
//! per item, append to the log, and answer only once every accepted message is durable.
//!
//! Layout:
//! - `ingest`: the `/api/users/*` and `/api/events/*` routes.
//! - `segment`: the Segment HTTP Tracking API routes (`/v1/*`).
//! - `read`: profiles, a user's events, and search (`/api/users/{id}`, `/api/search/*`).
//! - `auth`: API key → org, through a TTL cache.
//! - `body`: body size limits; `error`: the error type and its status codes, in one place;
//!   `response`: the success body.
//!
//! - `inflight`: the bound on request bytes being handled at once (backpressure).
//! - `layers`: the two middlewares every route runs in (`front`: metrics, CORS policy, SDK
//!   error fields; `admit`: the in-flight bound and the body's coding), one layer each.
//! - `ops`: `/healthz`, `/readyz`, `/metrics`, `/stats` and the dashboard `/`, which every
//!   node serves (an ingest node alone).
//! - `metrics`: the process's Prometheus recorder, and the step that counts and times every
//!   request (`metrics::tracking`, in `layers::front` and on the operations routes);
//!   `recent`: the last minutes of acknowledged ingest, per second, for the dashboard's charts.
//!
//! Invariant: a handler answers 200 only after `Bridge::append` returned for every accepted
//! message: acknowledged by the log, or fsynced to the spill buffer (`sluice-spill`). Nothing
//! here holds a message in memory past its answer.

mod auth;
mod body;
pub mod cors;
mod error;
mod forget;
mod inflight;
mod ingest;
mod layers;
mod limit;
pub mod metrics;
pub mod openapi;
pub mod ops;
mod read;
pub mod recent;
mod response;
mod segment;
pub mod sendgrid;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sluice_index::Index;
use sluice_registry::Registry;
use sluice_spill::Bridge;

pub use auth::{Authenticator, KeySources};
pub use cors::CorsConfig;
pub use error::ApiError;
pub use ops::{HealthCheck, Operations, Refresh, Sample};
pub use response::{Accepted, Failure};

/// Request limits (SPEC §4 defaults).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_item_bytes: usize,
    pub max_request_bytes: usize,
    pub max_request_items: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_item_bytes: 32 << 10,
            max_request_bytes: 10 << 20,
            max_request_items: 10_000,
        }
    }
}

/// Settings of the API. (How long the log may take to acknowledge, and the spill buffer, are
/// the `Bridge`'s settings.)
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub limits: Limits,
    /// Most request body bytes handled at once; further requests wait for room, up to
    /// `in_flight_wait`, then get a 503.
    pub max_in_flight_bytes: usize,
    pub in_flight_wait: Duration,
    /// How long an API key lookup is cached.
    pub key_cache_ttl: Duration,
    /// How far a signed SendGrid webhook's timestamp may be from now (replay protection).
    pub sendgrid_max_age: Duration,
    /// Which browser origins may call which routes.
    pub cors: CorsConfig,
    /// Messages per second an org may send unless it has a limit of its own (0: unlimited).
    pub org_events_per_second: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            limits: Limits::default(),
            max_in_flight_bytes: 256 << 20,
            in_flight_wait: Duration::from_secs(5),
            key_cache_ttl: Duration::from_secs(5),
            sendgrid_max_age: Duration::from_secs(300),
            cors: CorsConfig::default(),
            org_events_per_second: 0,
        }
    }
}

/// Shared state of every handler: one `Arc`, so a request clones one pointer.
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

pub struct AppInner {
    /// The log, behind the spill buffer.
    pub(crate) bridge: Bridge,
    /// `None` on a node that only writes (`sluice api` without a shared index).
    index: Option<Arc<dyn Index>>,
    pub(crate) auth: Authenticator,
    pub(crate) limits: Limits,
    pub(crate) in_flight: inflight::InFlight,
    pub(crate) sendgrid_max_age: Duration,
    pub(crate) cors: Arc<CorsConfig>,
    pub(crate) rate_limits: limit::RateLimits,
    /// What `/healthz`, `/readyz` and `/metrics` read.
    operations: Operations,
}

impl std::ops::Deref for AppState {
    type Target = AppInner;

    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl AppState {
    pub fn new(
        bridge: Bridge,
        registry: Arc<dyn Registry>,
        index: Option<Arc<dyn Index>>,
        config: &ApiConfig,
    ) -> Self {
        AppState(Arc::new(AppInner {
            index,
            auth: Authenticator::new(registry, config.key_cache_ttl),
            limits: config.limits,
            in_flight: inflight::InFlight::new(config.max_in_flight_bytes, config.in_flight_wait),
            sendgrid_max_age: config.sendgrid_max_age,
            cors: Arc::new(config.cors.clone()),
            rate_limits: limit::RateLimits::new(config.org_events_per_second),
            operations: Operations::for_bridge(bridge.clone()),
            bridge,
        }))
    }

    /// The index that read routes use, or why there is none on this node.
    pub(crate) fn index(&self) -> Result<&dyn Index, ApiError> {
        self.index.as_deref().ok_or_else(|| {
            ApiError::NotServed(
                "this node only accepts writes: its index is local (`embedded`) and the ingest nodes write theirs; read from a `sluice serve` node, or configure a shared index (--index http://host:9200)"
                    .into(),
            )
        })
    }

    /// What the operations routes of this API read (draining, backends, metrics).
    pub fn operations(&self) -> &Operations {
        &self.operations
    }
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let operations = ops::router(state.operations.clone());
    Router::new()
        // A user may be called "update" or "bulkUpdate": GET on these paths reads that user.
        .route(
            "/api/users/update",
            post(ingest::users_update).get(read::user_named_update),
        )
        .route(
            "/api/users/bulkUpdate",
            post(ingest::users_bulk_update).get(read::user_named_bulk_update),
        )
        .route("/api/events/track", post(ingest::events_track))
        .route("/api/events/trackBulk", post(ingest::events_track_bulk))
        .route(
            "/api/users/by-email/{email}",
            get(read::user_by_email).delete(forget::by_email),
        )
        .route(
            "/api/users/{user_id}",
            get(read::user_by_id).delete(forget::by_id),
        )
        .route("/api/users/{user_id}/events", get(read::user_events))
        .route("/api/search/users", post(read::search_users))
        .route("/api/search/events", post(read::search_events))
        .route("/v1/identify", post(segment::identify))
        .route("/v1/track", post(segment::track))
        .route("/v1/page", post(segment::page))
        .route("/v1/screen", post(segment::screen))
        .route("/v1/group", post(segment::group))
        .route("/v1/alias", post(segment::alias))
        .route("/v1/batch", post(segment::batch))
        .route("/v1/i", post(segment::identify_short))
        .route("/v1/t", post(segment::track_short))
        .route("/v1/p", post(segment::page_short))
        .route("/v1/s", post(segment::screen_short))
        .route("/v1/g", post(segment::group_short))
        .route("/v1/a", post(segment::alias_short))
        .route("/v1/b", post(segment::batch_short))
        .route("/webhooks/sendgrid", post(sendgrid::webhook))
        // Innermost first: bodies are decoded as the handler reads them, after the request
        // took its in-flight share and its encoding was checked (`layers::admit`).
        .route_layer(tower_http::decompression::RequestDecompressionLayer::new())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            layers::admit,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Browsers (SPEC §4): CORS on every API route, inside the front layer, which decides
        // which routes it stays on (`cors::policy`), and tracks every request.
        .layer(state.cors.layer())
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.cors),
            layers::front,
        ))
        .with_state(state)
        .merge(metrics::tracked(operations))
}

/// The operations routes alone (`sluice ingest`), with the API's answers for an unknown
/// route or method.
pub fn operations_router(operations: Operations) -> Router {
    metrics::tracked(
        ops::router(operations)
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({"code": "MethodNotAllowed", "error": format!("{method} is not allowed on {}", uri.path())})),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"code": "NotFound", "error": format!("no route {}", uri.path())})),
    )
        .into_response()
}
