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
//!
//! Invariant: a handler answers 200 only after `Bridge::append` returned for every accepted
//! message: acknowledged by the log, or fsynced to the spill buffer (`sluice-spill`). Nothing
//! here holds a message in memory past its answer.

mod auth;
mod body;
mod error;
mod inflight;
mod ingest;
mod read;
mod response;
mod segment;
pub mod sendgrid;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sluice_index::Index;
use sluice_registry::Registry;
use sluice_spill::Bridge;

pub use auth::{Authenticator, KeySources};
pub use error::ApiError;
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
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            limits: Limits::default(),
            max_in_flight_bytes: 256 << 20,
            in_flight_wait: Duration::from_secs(5),
            key_cache_ttl: Duration::from_secs(5),
            sendgrid_max_age: Duration::from_secs(300),
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
    /// Set when the server starts draining: `/readyz` turns 503 so balancers stop sending.
    pub(crate) draining: AtomicBool,
    /// Why the pipeline of this process stopped, if it stopped on an unknown error (a bug):
    /// shown on `/readyz` while the process drains before exiting non-zero.
    pipeline_failure: std::sync::Mutex<Option<String>>,
    /// More metrics for `/metrics` (the pipeline's counters in a process that runs one).
    more_metrics: std::sync::OnceLock<MetricsSource>,
    /// The index this process's pipeline writes, whose health `/readyz` reports.
    pipeline_index: std::sync::OnceLock<Arc<dyn Index>>,
}

/// One Prometheus sample: name, type (`counter`/`gauge`), help text, value.
pub type Metric = (&'static str, &'static str, &'static str, f64);

/// Metrics `/metrics` adds to its own, read at each scrape.
pub type MetricsSource = Arc<dyn Fn() -> Vec<Metric> + Send + Sync>;

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
            bridge,
            index,
            auth: Authenticator::new(registry, config.key_cache_ttl),
            limits: config.limits,
            in_flight: inflight::InFlight::new(config.max_in_flight_bytes, config.in_flight_wait),
            sendgrid_max_age: config.sendgrid_max_age,
            draining: AtomicBool::new(false),
            pipeline_failure: std::sync::Mutex::new(None),
            more_metrics: std::sync::OnceLock::new(),
            pipeline_index: std::sync::OnceLock::new(),
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

    /// Marks the server as draining (readyz fails from now on).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Adds `source`'s metrics to `/metrics` (once; a second source is ignored).
    pub fn add_metrics(&self, source: MetricsSource) {
        let _ = self.more_metrics.set(source);
    }

    /// Makes `/readyz` report `index`'s health: the pipeline of this process writes it (once;
    /// a second index is ignored).
    pub fn watch_index(&self, index: Arc<dyn Index>) {
        let _ = self.pipeline_index.set(index);
    }

    /// Records why the pipeline stopped (SPEC §6 "unknown" errors) and starts draining.
    pub fn pipeline_failed(&self, cause: String) {
        *self
            .pipeline_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cause);
        self.start_draining();
    }

    fn pipeline_failure(&self) -> Option<String> {
        self.pipeline_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let operations = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
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
        .route("/api/users/by-email/{email}", get(read::user_by_email))
        .route("/api/users/{user_id}", get(read::user_by_id))
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
        .route("/webhooks/sendgrid", post(sendgrid::webhook))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            inflight::bounded,
        ))
        .merge(operations)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// How long `/readyz` waits for the index's health check.
const INDEX_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Ready when not draining and an append can be made durable: the log takes writes, or the
/// spill buffer has room (SPEC §4); and, in a process whose pipeline writes an index, when
/// that index takes writes. The body shows the spill buffer either way.
async fn readyz(State(state): State<AppState>) -> Response {
    let mut reasons = Vec::new();
    let failure = state.pipeline_failure();
    if let Some(cause) = &failure {
        reasons.push(format!(
            "the pipeline stopped on an unexpected error: {cause}"
        ));
    }
    if state.draining.load(Ordering::SeqCst) {
        reasons.push("draining: the server is shutting down".into());
    }
    let spill = state.bridge.status();
    if !state.bridge.is_ready() {
        reasons.push(
            if spill.max_bytes == 0 {
                "the log cannot accept writes (and spilling is disabled)"
            } else {
                "the log cannot accept writes and the spill buffer is full"
            }
            .into(),
        );
    }
    let log = match (spill.spilling, spill.log_healthy) {
        (true, _) => "spilling",
        (false, true) => "ok",
        (false, false) => "down",
    };
    let index = match state.pipeline_index.get() {
        None => None,
        Some(index) => Some(
            match tokio::time::timeout(INDEX_HEALTH_TIMEOUT, index.health()).await {
                Ok(Ok(())) => "ok",
                Ok(Err(e)) => {
                    reasons.push(format!("the pipeline cannot write its index: {e}"));
                    "down"
                }
                Err(_) => {
                    reasons.push(format!(
                        "the pipeline cannot write its index: its health check did not answer within {INDEX_HEALTH_TIMEOUT:?}"
                    ));
                    "down"
                }
            },
        ),
    };
    if reasons.is_empty() {
        Json(json!({"status": "ready", "log": log, "index": index, "spill": spill})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "not ready",
                "reasons": reasons,
                "log": log,
                "index": index,
                "spill": spill,
                "pipeline": failure.map(|cause| json!({"status": "failed", "error": cause})),
            })),
        )
            .into_response()
    }
}

/// Prometheus text exposition of the spill bridge and, in a process that runs the pipeline,
/// its counters (SPEC §4 `/metrics`; the API's own request counters are not exported yet).
async fn metrics(State(state): State<AppState>) -> Response {
    let s = state.bridge.status();
    let oldest = s.oldest_age_ms.map_or(0.0, |ms| ms as f64 / 1000.0);
    let lines = [
        (
            "sluice_spill_mode",
            "gauge",
            "1 while appends go to the spill buffer instead of the log",
            s.spilling as u64 as f64,
        ),
        (
            "sluice_log_healthy",
            "gauge",
            "1 while the log reports that it takes writes",
            s.log_healthy as u64 as f64,
        ),
        (
            "sluice_spill_records",
            "gauge",
            "records in the spill buffer waiting to be replayed",
            s.records as f64,
        ),
        (
            "sluice_spill_bytes",
            "gauge",
            "bytes the spill buffer holds",
            s.bytes as f64,
        ),
        (
            "sluice_spill_max_bytes",
            "gauge",
            "the spill buffer's limit (0: spilling disabled)",
            s.max_bytes as f64,
        ),
        (
            "sluice_spill_oldest_age_seconds",
            "gauge",
            "age of the oldest record waiting in the spill buffer",
            oldest,
        ),
        (
            "sluice_spilled_records_total",
            "counter",
            "records written to the spill buffer since start",
            s.spilled_total as f64,
        ),
        (
            "sluice_replayed_records_total",
            "counter",
            "records replayed from the spill buffer into the log since start",
            s.replayed_total as f64,
        ),
        (
            "sluice_spill_replay_failures_total",
            "counter",
            "failed replay attempts since start",
            s.replay_failures as f64,
        ),
    ];
    let more = state
        .more_metrics
        .get()
        .map(|source| source())
        .unwrap_or_default();
    let mut body = String::new();
    for (name, kind, help, value) in lines.into_iter().chain(more) {
        body.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
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
