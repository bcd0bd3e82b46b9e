//! The operations routes every node serves (SPEC §9): `/healthz`, `/readyz`, `/metrics`,
//! `/stats` (the JSON of the dashboard) and `/` (the dashboard, `dashboard.html`, compiled
//! into the binary: one page with its styles and script inline, nothing fetched elsewhere; it
//! polls `/stats` every second).
//!
//! [`Operations`] is what they read, shared with the node that runs them: how its writes are
//! made durable (an API node: the spill bridge in front of the log; an ingest node: the log it
//! consumes), whether it drains, why its pipeline stopped, the health checks of the backends it
//! uses, and the metrics and `/stats` sections its pipeline adds. The API's router merges
//! [`router`]; `sluice ingest` serves it alone.
//!
//! Invariant: `/readyz` answers 200 only when nothing of the node's own says otherwise: not
//! draining, no pipeline failure, writes can be made durable, and every watched backend
//! answered its check within [`HEALTH_TIMEOUT`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use sluice_log::Log;
use sluice_spill::Bridge;

/// Sets values kept elsewhere (gauges, counts in atomics of their own) just before `/metrics`
/// renders; see [`publish`].
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

/// A part of `/stats` kept elsewhere (the pipeline's, the actions'), read at each request.
pub type Section = Arc<dyn Fn() -> Value + Send + Sync>;

/// A backend's health check: `Err` says what is wrong.
pub type HealthCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// How long `/readyz` waits for each backend's health check.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// How the node's writes become durable.
enum Writes {
    /// An API node: the log behind the spill buffer.
    Bridge(Bridge),
    /// A node that only consumes: the log itself.
    Log(Arc<dyn Log>),
}

/// The state of the operations routes (one `Arc`, cheap to clone).
#[derive(Clone)]
pub struct Operations(Arc<Inner>);

struct Inner {
    writes: Writes,
    /// Set when the node starts draining: `/readyz` turns 503 so balancers stop sending.
    draining: AtomicBool,
    /// Why the pipeline of this process stopped, if it stopped on an unknown error (a bug):
    /// shown on `/readyz` while the process drains before exiting non-zero.
    pipeline_failure: Mutex<Option<String>>,
    /// What `/metrics` refreshes before it renders (the pipeline's counters in a process
    /// that runs one).
    refreshers: Mutex<Vec<Refresh>>,
    /// The backends `/readyz` checks, by name (`index`, `dedup`, `registry`).
    backends: Mutex<Vec<(&'static str, HealthCheck)>>,
    /// `/stats` sections by name (`pipeline`, `dead_letters`, `actions`).
    sections: Mutex<Vec<(&'static str, Section)>>,
    /// `admin_token`: when set, `/`, `/stats` and `/metrics` need `Authorization: Bearer
    /// <token>`.
    admin_token: OnceLock<String>,
    /// What the node is (`serve`, `api`, `ingest`), for the dashboard.
    role: OnceLock<&'static str>,
    started: std::time::Instant,
}

impl Operations {
    /// An API node's: its writes go through `bridge`.
    pub fn for_bridge(bridge: Bridge) -> Operations {
        Operations::new(Writes::Bridge(bridge))
    }

    /// A consuming node's: it writes nothing, its log is `log`.
    pub fn for_log(log: Arc<dyn Log>) -> Operations {
        Operations::new(Writes::Log(log))
    }

    fn new(writes: Writes) -> Operations {
        Operations(Arc::new(Inner {
            writes,
            draining: AtomicBool::new(false),
            pipeline_failure: Mutex::new(None),
            refreshers: Mutex::new(Vec::new()),
            backends: Mutex::new(Vec::new()),
            sections: Mutex::new(Vec::new()),
            admin_token: OnceLock::new(),
            role: OnceLock::new(),
            started: std::time::Instant::now(),
        }))
    }

    /// Names the node on the dashboard (`serve`, `api`, `ingest`; once).
    pub fn set_role(&self, role: &'static str) {
        let _ = self.0.role.set(role);
    }

    /// Adds `section` to `/stats` under `name` (a second section of a name replaces the
    /// first).
    pub fn on_stats(&self, name: &'static str, section: Section) {
        let mut sections = self
            .0
            .sections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        sections.retain(|(n, _)| *n != name);
        sections.push((name, section));
    }

    /// Makes `/`, `/stats` and `/metrics` require `Authorization: Bearer <token>` (once;
    /// empty: open).
    pub fn require_token(&self, token: &str) {
        if !token.is_empty() {
            let _ = self.0.admin_token.set(token.to_string());
        }
    }

    /// Whether `headers` carry the admin token, when one is required.
    fn admitted(&self, headers: &HeaderMap) -> bool {
        let Some(token) = self.0.admin_token.get() else {
            return true;
        };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(given_token)
            .unwrap_or_default();
        bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_bytes(),
            token.as_bytes(),
        ))
    }

    /// Marks the node as draining (readyz fails from now on).
    pub fn start_draining(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
    }

    /// Runs `refresh` before each `/metrics` render.
    pub fn on_scrape(&self, refresh: Refresh) {
        self.0
            .refreshers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(refresh);
    }

    /// Makes `/readyz` check backend `name` with `check` (a second check of a name replaces
    /// the first).
    pub fn watch(&self, name: &'static str, check: HealthCheck) {
        let mut backends = self
            .0
            .backends
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        backends.retain(|(n, _)| *n != name);
        backends.push((name, check));
    }

    /// Records why the pipeline stopped (SPEC §6 "unknown" errors) and starts draining.
    pub fn pipeline_failed(&self, cause: String) {
        *self
            .0
            .pipeline_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(cause);
        self.start_draining();
    }

    fn pipeline_failure(&self) -> Option<String> {
        self.0
            .pipeline_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Each watched backend's verdict, checked at once: `"ok"` or what is wrong.
    async fn check_backends(&self) -> Vec<(&'static str, Result<(), String>)> {
        let backends = self
            .0
            .backends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // All at once, each bounded by the timeout.
        let running: Vec<_> = backends
            .into_iter()
            .map(|(name, check)| {
                let verdict = tokio::spawn(async move {
                    tokio::time::timeout(HEALTH_TIMEOUT, check())
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!(
                                "its health check did not answer within {HEALTH_TIMEOUT:?}"
                            ))
                        })
                });
                (name, verdict)
            })
            .collect();
        let mut verdicts = Vec::with_capacity(running.len());
        for (name, verdict) in running {
            let verdict = verdict
                .await
                .unwrap_or_else(|e| Err(format!("its health check failed: {e}")));
            verdicts.push((name, verdict));
        }
        verdicts
    }
}

/// `/healthz`, `/readyz`, `/metrics`, `/stats` and `/`.
pub fn router(operations: Operations) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/stats", get(stats))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(crate::openapi::openapi_json))
        .with_state(operations)
}

/// The token of an `Authorization` header: `Bearer <token>`, or `Basic` with the token as the
/// password (any user name), which is what a browser sends after its login prompt: the
/// dashboard's way in, and its fetches of `/stats` carry the same header.
fn given_token(authorization: &str) -> Option<String> {
    if let Some(token) = authorization.strip_prefix("Bearer ") {
        return Some(token.to_string());
    }
    let encoded = authorization.strip_prefix("Basic ")?;
    let decoded =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (_user, password) = decoded.split_once(':')?;
    Some(password.to_string())
}

/// The 401 of a route that needs the admin token. Two challenges: Bearer for programs, Basic
/// so that a browser asks for the token (as the password).
fn unauthorized(route: &str) -> Response {
    let mut answer = (
        StatusCode::UNAUTHORIZED,
        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({
            "code": "Unauthorized",
            "error": format!("{route} needs `Authorization: Bearer <admin_token>` (this server has an admin_token set; in a browser, give the token as the password)"),
        })),
    )
        .into_response();
    answer.headers_mut().append(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Basic realm=\"sluice\", charset=\"UTF-8\""),
    );
    answer
}

const DASHBOARD: &str = include_str!("dashboard.html");

/// The live dashboard (SPEC §9): one page, nothing fetched from elsewhere.
#[utoipa::path(
    get,
    path = "/",
    tag = "operations",
    security((), ("bearer" = []), ("basic" = [])),
    responses(
        (status = 200, description = "The page", content_type = "text/html"),
        (status = 401, description = "admin_token is set and was not given", body = crate::openapi::ErrorBody),
    ),
)]
pub(crate) async fn dashboard(State(ops): State<Operations>, headers: HeaderMap) -> Response {
    if !ops.admitted(&headers) {
        return unauthorized("/");
    }
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page's own inline style and script, and fetches of this origin only.
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD,
    )
        .into_response()
}

/// What the dashboard shows (SPEC §9), as JSON: the node's health (as `/readyz` sees it),
/// the last minutes of acknowledged ingest ([`crate::recent`]), the spill buffer, and the
/// sections the node added (`pipeline`, `dead_letters`, `actions`; `null` where the node
/// runs none), and the failure that stopped a stream.
#[utoipa::path(
    get,
    path = "/stats",
    tag = "operations",
    security((), ("bearer" = []), ("basic" = [])),
    responses(
        (status = 200, description = "What the dashboard shows", body = crate::openapi::Status),
        (status = 401, description = "admin_token is set and was not given", body = crate::openapi::ErrorBody),
    ),
)]
pub(crate) async fn stats(State(ops): State<Operations>, headers: HeaderMap) -> Response {
    if !ops.admitted(&headers) {
        return unauthorized("/stats");
    }
    let health = ops.health().await;
    let recent = crate::recent::recent();
    let series = recent.series();
    let now = series.last();
    let (p50, p99) = recent.quantiles();
    let mut backends = serde_json::Map::new();
    backends.insert("log".into(), json!(health.log));
    for (name, verdict) in &health.backends {
        backends.insert(
            (*name).into(),
            json!(if verdict.is_ok() { "ok" } else { "down" }),
        );
    }
    let mut body = json!({
        "at": sluice_model::time::now_ms(),
        "role": ops.0.role.get().copied().unwrap_or("serve"),
        "uptime_seconds": ops.0.started.elapsed().as_secs(),
        "status": if health.reasons.is_empty() { "ready" } else { "not ready" },
        "reasons": health.reasons,
        "backends": backends,
        "ingest": {
            "accepted_total": recent.total(),
            "rate_per_second": now.map_or(0.0, |p| p.rate),
            "p50_ms": p50,
            "p99_ms": p99,
            "point_seconds": crate::recent::POINT_SECONDS,
            "series": series,
        },
        "spill": health.spill,
        "pipeline": null,
        "dead_letters": {"total": 0, "by_stage": {}, "latest": []},
        "actions": [],
        "failure": health.failure.map(|error| json!({"error": error})),
    });
    let sections = ops
        .0
        .sections
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for (name, section) in sections {
        body[name] = section();
    }
    Json(body).into_response()
}

/// The node's health as `/readyz` and `/stats` show it.
struct Health {
    /// `ok`, `spilling` or `down`.
    log: &'static str,
    /// The bridge's status (`null` on a node without one).
    spill: Value,
    backends: Vec<(&'static str, Result<(), String>)>,
    failure: Option<String>,
    /// Why the node is not ready (empty: ready).
    reasons: Vec<String>,
}

impl Operations {
    async fn health(&self) -> Health {
        let mut reasons = Vec::new();
        let failure = self.pipeline_failure();
        if let Some(cause) = &failure {
            reasons.push(format!(
                "the pipeline stopped on an unexpected error: {cause}"
            ));
        }
        if self.0.draining.load(Ordering::SeqCst) {
            reasons.push("draining: the server is shutting down".into());
        }
        let (log, spill) = match &self.0.writes {
            Writes::Bridge(bridge) => {
                let spill = bridge.status();
                if !bridge.is_ready() {
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
                (log, serde_json::to_value(&spill).unwrap_or(Value::Null))
            }
            Writes::Log(log) => {
                if log.is_healthy() {
                    ("ok", Value::Null)
                } else {
                    reasons.push("the log is unreachable".into());
                    ("down", Value::Null)
                }
            }
        };
        let backends = self.check_backends().await;
        for (name, verdict) in &backends {
            if let Err(e) = verdict {
                reasons.push(match *name {
                    "index" => format!("the pipeline cannot write its index: {e}"),
                    other => format!("the {other} store does not answer: {e}"),
                });
            }
        }
        Health {
            log,
            spill,
            backends,
            failure,
            reasons,
        }
    }
}

/// The process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses((status = 200, description = "Alive", body = crate::openapi::Status)),
)]
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when not draining, writes can be made durable (the log takes them, or the spill
/// buffer has room, SPEC §4) and every watched backend answers. The body shows each part.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Ready: each part says `ok`", body = crate::openapi::Status),
        (status = 503, description = "Not ready: `reasons` says why", body = crate::openapi::Status),
    ),
)]
pub(crate) async fn readyz(State(ops): State<Operations>) -> Response {
    let health = ops.health().await;
    let mut body = json!({"log": health.log, "spill": health.spill, "index": null});
    for (name, verdict) in &health.backends {
        body[*name] = json!(if verdict.is_ok() { "ok" } else { "down" });
    }
    if health.reasons.is_empty() {
        body["status"] = json!("ready");
        Json(body).into_response()
    } else {
        body["status"] = json!("not ready");
        body["reasons"] = json!(health.reasons);
        body["pipeline"] = json!(
            health
                .failure
                .map(|cause| json!({"status": "failed", "error": cause}))
        );
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Prometheus text exposition (SPEC §9) of the process's recorder (`crate::metrics`), after
/// the scrape-time values were set: the spill bridge's gauges (or the log's health on a node
/// without one) and whatever the node added with [`Operations::on_scrape`].
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain"),
        (status = 401, description = "admin_token is set and was not given", body = crate::openapi::ErrorBody),
        (status = 404, description = "The process runs without metrics (SLUICE_METRICS=off)", body = crate::openapi::ErrorBody),
    ),
)]
pub(crate) async fn metrics(State(ops): State<Operations>, headers: HeaderMap) -> Response {
    if !ops.admitted(&headers) {
        return unauthorized("/metrics");
    }
    let Some(handle) = crate::metrics::handle() else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({
                "code": "NotFound",
                "error": "metrics are off in this process (SLUICE_METRICS=off)",
            })),
        )
            .into_response();
    };
    match &ops.0.writes {
        Writes::Bridge(bridge) => publish_spill(bridge),
        Writes::Log(log) => publish(&[(
            "sluice_log_healthy",
            "gauge",
            "1 while the log reports that it takes writes",
            log.is_healthy() as u64 as f64,
        )]),
    }
    let refreshers: Vec<Refresh> = ops
        .0
        .refreshers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for refresh in refreshers {
        refresh();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// A value kept elsewhere, published at scrape time: name, kind (`"gauge"`, set as is, or
/// `"counter"`, a count in an atomic of its own published as the counter's total), help text,
/// value.
pub type Sample = (&'static str, &'static str, &'static str, f64);

/// Publishes scrape-time samples to the recorder, describing each the first time.
pub fn publish(samples: &[Sample]) {
    static DESCRIBED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    {
        let mut described = DESCRIBED.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, kind, help, _) in samples {
            if !described.contains(name) {
                match *kind {
                    "counter" => metrics::describe_counter!(*name, *help),
                    _ => metrics::describe_gauge!(*name, *help),
                }
                described.push(name);
            }
        }
    }
    for (name, kind, _, value) in samples {
        match *kind {
            "counter" => metrics::counter!(*name).absolute(*value as u64),
            _ => metrics::gauge!(*name).set(*value),
        }
    }
}

fn publish_spill(bridge: &Bridge) {
    let s = bridge.status();
    let oldest = s.oldest_age_ms.map_or(0.0, |ms| ms as f64 / 1000.0);
    publish(&[
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
            "replay attempts that failed or waited past the warning interval, since start",
            s.replay_failures as f64,
        ),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_log::{EmbeddedLog, EmbeddedLogConfig};

    async fn answer(ops: &Operations) -> (StatusCode, Value) {
        let response = readyz(State(ops.clone())).await;
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, serde_json::from_slice(&body).expect("json"))
    }

    fn check(verdict: Option<Result<(), String>>) -> HealthCheck {
        Arc::new(move || {
            let verdict = verdict.clone();
            Box::pin(async move {
                match verdict {
                    Some(verdict) => verdict,
                    // Never answers.
                    None => std::future::pending().await,
                }
            })
        })
    }

    #[tokio::test(start_paused = true)]
    async fn readyz_names_each_backend_that_fails_or_does_not_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EmbeddedLog::open(dir.path(), EmbeddedLogConfig::default()).expect("log");
        let ops = Operations::for_log(Arc::new(log));
        ops.watch("index", check(Some(Ok(()))));
        ops.watch("dedup", check(Some(Ok(()))));
        let (status, body) = answer(&ops).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["log"], "ok");
        assert_eq!(body["index"], "ok");
        assert_eq!(body["dedup"], "ok");

        ops.watch("dedup", check(Some(Err("PING: connection refused".into()))));
        ops.watch("registry", check(None));
        let (status, body) = answer(&ops).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["index"], "ok");
        assert_eq!(body["dedup"], "down");
        assert_eq!(body["registry"], "down");
        let reasons = body["reasons"].to_string();
        assert!(
            reasons.contains("the dedup store does not answer: PING: connection refused"),
            "{reasons}"
        );
        assert!(
            reasons.contains(
                "the registry store does not answer: its health check did not answer within 2s"
            ),
            "{reasons}"
        );
    }
}
