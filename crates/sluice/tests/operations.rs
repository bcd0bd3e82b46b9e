//! Operations (SPEC §9) against the real binary: `/metrics` is read by the Prometheus project's
//! own text parser (prometheus-client, PyPI), has the families the spec lists with the right
//! types and labels, and its values follow a known load exactly; request ids travel in
//! `x-request-id` and the access log at debug level.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

mod support;
use support::{Server, WebhookReceiver, post};

#[derive(Debug, Deserialize)]
struct Family {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    help: String,
    samples: Vec<Sample>,
}

#[derive(Debug, Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape, as the parser read it.
struct Scrape(Vec<Family>);

impl Scrape {
    /// `/metrics` of `addr`, through `tests/interop/prometheus_parse.py`.
    async fn of(addr: SocketAddr) -> Scrape {
        let mut conn = sluice::client::Connection::connect(addr)
            .await
            .expect("connect");
        let answer = conn.get("/metrics", &[]).await.expect("metrics");
        assert_eq!(answer.status, 200);
        let content_type = answer.headers["content-type"].to_str().expect("ascii");
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        Scrape(parse(&answer.body))
    }

    fn family(&self, name: &str) -> &Family {
        self.0
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no family {name} in {:?}", self.names()))
    }

    fn names(&self) -> Vec<&str> {
        self.0.iter().map(|f| f.name.as_str()).collect()
    }

    /// The value of the sample `name` whose labels include `labels`; none if absent, and a
    /// failure if more than one match.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .0
            .iter()
            .flat_map(|f| &f.samples)
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .collect();
        assert!(found.len() <= 1, "{name}{labels:?} matches {found:?}");
        found.first().copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }

    /// Checks the histogram `family`'s series with `labels`: buckets cumulative, `+Inf` equal
    /// to the count; returns the count.
    fn histogram(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        let f = self.family(family);
        assert_eq!(f.kind, "histogram", "{family}");
        let matches = |s: &&Sample| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        };
        let mut buckets: Vec<(f64, f64)> = f
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
            .filter(matches)
            .map(|s| {
                let le = &s.labels["le"];
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le")
                };
                (le, s.value)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.len() >= 10,
            "{family}{labels:?} has buckets {buckets:?}"
        );
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{family}{labels:?}: buckets are cumulative: {buckets:?}"
        );
        let count = self.value(&format!("{family}_count"), labels);
        let sum = self.value(&format!("{family}_sum"), labels);
        assert_eq!(buckets.last().map(|b| b.0), Some(f64::INFINITY));
        assert_eq!(
            buckets.last().map(|b| b.1),
            Some(count),
            "{family}{labels:?}: +Inf is the count"
        );
        assert!(
            sum >= 0.0 && (count == 0.0 || sum > 0.0),
            "{family}{labels:?}: sum {sum}"
        );
        count
    }
}

fn parse(text: &[u8]) -> Vec<Family> {
    use std::io::Write;
    let python = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python").to_string()
    });
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/prometheus_parse.py"
    );
    let mut child = std::process::Command::new(&python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {python} (run ./scripts/test, it installs it): {e}")
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text)
        .expect("write the scrape");
    let out = child.wait_with_output().expect("the parser runs");
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(text)
    );
    serde_json::from_slice(&out.stdout).expect("the parser's JSON")
}

async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signup(i: usize) -> Value {
    json!({"userId": format!("m{i}"), "eventName": "signedUp", "id": format!("s{i}"), "dataFields": {"n": i}})
}

const SINGLE: usize = 50;
const BULK: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_with_the_spec_families_and_follow_the_load() {
    let receiver = WebhookReceiver::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = support::welcome_config(dir.path(), &receiver.url("/ok"));
    let data = dir.path().join("data");
    let server = Server::start_logging(
        "serve",
        &data,
        &["--config", &config, "--batch-timeout", "50ms"],
        "info,sluice_api::metrics=debug",
    );
    let key = server.first_key.clone().expect("key");
    let addr = server.addr;

    let before = Scrape::of(addr).await;
    assert_eq!(
        before.get(
            "sluice_http_requests_total",
            &[("route", "/api/events/track")]
        ),
        None,
        "nothing was tracked yet"
    );

    // The load: 50 single events, one bulk of 100, three bad requests, one without a key, one
    // to no route.
    for i in 0..SINGLE {
        let (status, answer) = post(addr, &key, "/api/events/track", signup(i)).await;
        assert_eq!(status, 200, "{answer}");
    }
    let bulk: Vec<Value> = (SINGLE..SINGLE + BULK).map(signup).collect();
    let (status, answer) = post(
        addr,
        &key,
        "/api/events/trackBulk",
        json!({ "events": bulk }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut conn = sluice::client::Connection::connect(addr)
        .await
        .expect("connect");
    for (path, body) in [
        ("/api/events/track", &b"{not json"[..]),
        ("/api/events/track", br#"{"eventName": "signedUp"}"#),
        ("/api/users/update", br#"{"dataFields": {"a": 1}}"#),
    ] {
        let answer = conn
            .post(path, &[("api-key", &key)], body.to_vec().into())
            .await
            .expect("request");
        assert_eq!(answer.status, 400, "{path} {:?}", answer.body);
    }
    let answer = conn
        .post("/api/events/track", &[], signup(0).to_string().into())
        .await
        .expect("request");
    assert_eq!(answer.status, 401);
    // Request ids: the client's comes back, and one is made for a request without.
    let answer = conn
        .get("/no/such/route", &[("x-request-id", "ops-test-42")])
        .await
        .expect("request");
    assert_eq!(answer.status, 404);
    assert_eq!(answer.headers["x-request-id"], "ops-test-42");
    let answer = conn.get("/healthz", &[]).await.expect("healthz");
    let made = answer.headers["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(!made.is_empty());

    // Everything indexed, every welcome email delivered, and the lag back to 0 on every
    // partition.
    let total = (SINGLE + BULK) as f64;
    until(
        "every signup indexed and every action delivered",
        Duration::from_secs(30),
        || async {
            let s = Scrape::of(addr).await;
            s.get("sluice_events_indexed_total", &[]) == Some(total)
                && s.get("sluice_actions_delivered_total", &[]) == Some(total)
        },
    )
    .await;
    assert_eq!(receiver.distinct().len(), SINGLE + BULK);
    until(
        "every partition's lag published as 0",
        Duration::from_secs(20),
        || async {
            let s = Scrape::of(addr).await;
            (0..8).all(|p| {
                s.get("sluice_partition_lag", &[("partition", &p.to_string())]) == Some(0.0)
            })
        },
    )
    .await;

    let after = Scrape::of(addr).await;
    // Counters by route and status, exactly the load.
    let requests = |route: &str, status: &str| {
        after
            .get(
                "sluice_http_requests_total",
                &[("route", route), ("status", status)],
            )
            .unwrap_or(0.0)
    };
    assert_eq!(requests("/api/events/track", "200"), SINGLE as f64);
    assert_eq!(requests("/api/events/trackBulk", "200"), 1.0);
    assert_eq!(requests("/api/events/track", "400"), 2.0);
    assert_eq!(requests("/api/users/update", "400"), 1.0);
    assert_eq!(requests("/api/events/track", "401"), 1.0);
    assert_eq!(requests("unmatched", "404"), 1.0);
    assert_eq!(requests("/healthz", "200"), 1.0);
    assert!(requests("/metrics", "200") >= 2.0);
    let f = after.family("sluice_http_requests");
    assert_eq!(f.kind, "counter");
    assert!(!f.help.is_empty());

    // Latency histograms with buckets.
    assert_eq!(
        after.histogram(
            "sluice_http_request_duration_seconds",
            &[("route", "/api/events/track")]
        ),
        (SINGLE + 3) as f64
    );
    // One durable append per accepted request (the 400s and the 401 never reach the log).
    assert_eq!(
        after.histogram("sluice_log_append_duration_seconds", &[]),
        (SINGLE + 1) as f64
    );
    for stage in [
        "read",
        "validate",
        "dedup",
        "merge",
        "prepare_actions",
        "index",
        "fire_actions",
        "mark",
        "commit",
    ] {
        let count = after.histogram(
            "sluice_pipeline_stage_duration_seconds",
            &[("stage", stage)],
        );
        assert!(count >= 1.0, "stage {stage} timed {count} times");
    }
    let bulks = after.histogram("sluice_index_bulk_duration_seconds", &[]);
    assert!(bulks >= 1.0 && bulks <= total, "{bulks} bulk writes");

    // Lag, retries, dead letters, actions, spill.
    assert_eq!(after.family("sluice_partition_lag").kind, "gauge");
    assert_eq!(after.value("sluice_index_item_retries_total", &[]), 0.0);
    for stage in ["validate", "index", "trigger"] {
        assert_eq!(
            after
                .get("sluice_dead_letters_total", &[("stage", stage)])
                .unwrap_or(0.0),
            0.0,
            "{stage}"
        );
    }
    assert!(
        after
            .get("sluice_dead_letters_total", &[("stage", "validate")])
            .is_some()
    );
    for outcome in ["fired", "delivered"] {
        assert_eq!(
            after.value(
                "sluice_actions_total",
                &[("rule", "welcome-email"), ("outcome", outcome)]
            ),
            total,
            "{outcome}"
        );
    }
    assert_eq!(after.family("sluice_actions").kind, "counter");
    for gauge in [
        "sluice_spill_mode",
        "sluice_spill_records",
        "sluice_spill_bytes",
        "sluice_spill_oldest_age_seconds",
    ] {
        assert_eq!(after.family(gauge).kind, "gauge", "{gauge}");
        assert_eq!(after.value(gauge, &[]), 0.0, "{gauge}");
    }
    assert!(after.value("sluice_spill_max_bytes", &[]) > 0.0);
    assert_eq!(after.value("sluice_log_healthy", &[]), 1.0);

    // The values moved between the two scrapes.
    assert_eq!(before.get("sluice_events_indexed_total", &[]), Some(0.0));
    assert_eq!(after.value("sluice_events_indexed_total", &[]), total);
    assert!(
        after.value("sluice_pipeline_batches_total", &[])
            > before.value("sluice_pipeline_batches_total", &[])
    );

    // The access log at debug level has each request with its id.
    let log = std::fs::read_to_string(&server.stderr).expect("the server's log");
    for id in ["ops-test-42", made.as_str()] {
        let line = log
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("no access-log line with request id {id}"));
        assert!(line.contains("route="), "{line}");
        assert!(line.contains("status="), "{line}");
    }
}
