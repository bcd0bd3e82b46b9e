//! The process's Prometheus metrics (SPEC §9), through the `metrics` crate and its Prometheus
//! exporter, and the HTTP layer that counts and times every request.
//!
//! - [`install`] puts one recorder in the process (the first call; later calls get the same
//!   handle). Every crate records with `metrics::counter!` / `histogram!` / `gauge!`; a process
//!   without a recorder (a benchmark's "without metrics" run, a unit test) records nothing.
//! - Histograms have [`LATENCY_BUCKETS`]; [`upkeep`] drains their samples into the buckets
//!   every few seconds, so memory stays flat between scrapes.
//! - [`track`] is the router's outermost layer: `sluice_http_requests_total{route,status}` and
//!   `sluice_http_request_duration_seconds{route}` (the route is the matched pattern, e.g.
//!   `/api/users/{userId}`, or `unmatched`), and at debug level one access-log line per
//!   request with its request id.
//!
//! Handles are cached per route and status: a request costs two atomic updates and two
//! read-locked lookups, no allocation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// Buckets of every duration histogram, in seconds: 250 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often [`upkeep`] drains histogram samples.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder (once) and returns its handle; `None` if another recorder
/// was installed first (then nothing of sluice's is recorded).
pub fn install() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            // Gauges nobody updates for a minute go (a partition this node no longer owns);
            // the ones set at scrape time are fresh at every render.
            let builder = PrometheusBuilder::new()
                .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(60)));
            let builder = match builder.set_buckets(LATENCY_BUCKETS) {
                Ok(builder) => builder,
                Err(e) => {
                    tracing::error!(error = %e, "metrics: invalid histogram buckets");
                    return None;
                }
            };
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: another recorder is installed; sluice's metrics are off");
                    None
                }
            }
        })
        .as_ref()
}

/// The installed recorder's handle, if [`install`] installed one.
pub fn handle() -> Option<&'static PrometheusHandle> {
    RECORDER.get().and_then(Option::as_ref)
}

/// Drains histogram samples into their buckets every [`UPKEEP_INTERVAL`], for the life of the
/// process (without it, samples pile up between scrapes).
pub async fn upkeep(handle: &'static PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// `sluice_log_append_duration_seconds`: how long a request waited for its messages to be
/// durable (in the log, or in the spill buffer). Cached: one per process.
pub(crate) fn log_append() -> &'static Histogram {
    static APPEND: OnceLock<Histogram> = OnceLock::new();
    APPEND.get_or_init(|| metrics::histogram!("sluice_log_append_duration_seconds"))
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_histogram!(
        "sluice_log_append_duration_seconds",
        Unit::Seconds,
        "time for a request's messages to become durable (the log's acknowledgement, or the spill buffer's fsync)"
    );
    describe_counter!(
        "sluice_http_requests_total",
        "HTTP requests answered, by route pattern and status"
    );
    describe_histogram!(
        "sluice_http_request_duration_seconds",
        Unit::Seconds,
        "time from a request's arrival to its answer, by route pattern"
    );
}

/// One route's handles.
struct Route {
    duration: Histogram,
    by_status: RwLock<HashMap<u16, Counter>>,
    name: Arc<str>,
}

impl Route {
    fn requests(&self, status: u16) -> Counter {
        if let Some(counter) = self
            .by_status
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&status)
        {
            return counter.clone();
        }
        let counter = metrics::counter!(
            "sluice_http_requests_total",
            "route" => self.name.to_string(),
            "status" => status.to_string()
        );
        self.by_status
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(status)
            .or_insert(counter)
            .clone()
    }
}

static ROUTES: OnceLock<RwLock<HashMap<Arc<str>, Arc<Route>>>> = OnceLock::new();

fn route(name: &str) -> Arc<Route> {
    let routes = ROUTES.get_or_init(Default::default);
    if let Some(route) = routes
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(name)
    {
        return Arc::clone(route);
    }
    let name: Arc<str> = Arc::from(name);
    let route = Arc::new(Route {
        duration: metrics::histogram!(
            "sluice_http_request_duration_seconds",
            "route" => name.to_string()
        ),
        by_status: RwLock::default(),
        name: Arc::clone(&name),
    });
    Arc::clone(
        routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name)
            .or_insert(route),
    )
}

/// `router` with [`track`] on every route, when a recorder is installed or debug logs are on
/// (with neither, it would have nothing to do). For the operations routes; the API's routes are
/// tracked by its front layer (`layers::front`).
pub fn tracked(router: axum::Router) -> axum::Router {
    if handle().is_some() || tracing::enabled!(tracing::Level::DEBUG) {
        router.layer(axum::middleware::from_fn(track))
    } else {
        router
    }
}

/// The header a request id travels in, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// Request ids this process makes: a per-process random prefix and a counter.
fn next_request_id() -> String {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = PREFIX.get_or_init(|| {
        let mut bytes = [0u8; 4];
        let _ = getrandom::fill(&mut bytes);
        u32::from_le_bytes(bytes)
    });
    format!("{prefix:08x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The layer: counts and times the request by its matched route; at debug level, logs it with
/// its request id (the client's `x-request-id`, or one made here) and sends that id back.
pub async fn track(request: Request, next: Next) -> Response {
    tracking(request, |request| next.run(request)).await
}

/// [`track`] around `inner`.
pub(crate) async fn tracking<F, Fut>(request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let logged = tracing::enabled!(tracing::Level::DEBUG);
    if !logged && handle().is_none() {
        return inner(request).await;
    }
    let started = Instant::now();
    let route = route(
        request
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", |path| path.as_str()),
    );
    let given = request.headers().get(REQUEST_ID).cloned();
    let method = logged.then(|| request.method().clone());
    let mut response = inner(request).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    route.duration.record(elapsed.as_secs_f64());
    route.requests(status).increment(1);
    if logged {
        let id = match given {
            Some(id) => id,
            None => HeaderValue::from_str(&next_request_id())
                .unwrap_or_else(|_| HeaderValue::from_static("-")),
        };
        tracing::debug!(
            request_id = id.to_str().unwrap_or("-"),
            method = %method.as_ref().map_or("", |m| m.as_str()),
            route = %route.name,
            status,
            micros = elapsed.as_micros() as u64,
            "request"
        );
        response.headers_mut().insert(REQUEST_ID, id);
    } else if let Some(id) = given {
        response.headers_mut().insert(REQUEST_ID, id);
    }
    response
}
