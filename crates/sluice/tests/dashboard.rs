//! The dashboard (`GET /`, SPEC §9) in a real browser: Debian's headless Chromium, driven by
//! playwright-core from npm (`tests/browser/dashboard.cjs`; `scripts/install-test-tools`
//! installs both). The page loads with no console error and no request to another origin, its
//! numbers are `/stats`'s, they change under load without a reload, and a stopped stream's
//! failure shows. Screenshots go to `target/test-artifacts/`.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::client::Connection;

mod support;
use support::{Server, WebhookReceiver, post, run_ok, sluice};

/// The browser, on one page of `url`.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

fn artifacts() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

impl Browser {
    fn open(url: &str, screenshot: &str) -> Browser {
        Browser::open_as(url, screenshot, None)
    }

    /// With `password`: the browser answers the login prompt with it.
    fn open_as(url: &str, screenshot: &str, password: Option<&str>) -> Browser {
        let modules = std::env::var("SLUICE_NODE_MODULES").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../.cache/browser/node_modules"
            )
            .to_string()
        });
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/dashboard.cjs");
        let mut child = Command::new("node")
            .arg(script)
            .arg(url)
            .arg(artifacts().join(screenshot))
            .args(password)
            .env("NODE_PATH", &modules)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run node (run ./scripts/test, it installs what the browser test needs): {e}"));
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Browser {
            child,
            stdin,
            stdout,
        }
    }

    fn ask(&mut self, line: &str) -> Value {
        writeln!(self.stdin, "{line}").expect("to the browser");
        let mut answer = String::new();
        self.stdout
            .read_line(&mut answer)
            .expect("from the browser");
        let value: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("the browser script said {answer:?}: {e}"));
        assert!(
            value.get("error").is_none(),
            "the browser script failed: {}",
            value["error"]
        );
        value
    }

    /// Screenshot, then what went wrong on the page: none of it may have.
    fn close(mut self) {
        let problems = self.ask("shoot");
        for kind in ["console", "page", "external"] {
            assert_eq!(problems[kind], json!([]), "{kind}: {problems}");
        }
        let _ = self.child.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// A number as the page shows it (`1,234`, `0.5`), or `None` for "–".
fn shown(text: &Value) -> Option<f64> {
    text.as_str()?.replace(',', "").parse().ok()
}

async fn stats(addr: SocketAddr) -> Value {
    let mut conn = Connection::connect(addr).await.expect("connect");
    let answer = conn.get("/stats", &[]).await.expect("stats");
    assert_eq!(answer.status, 200);
    answer.json()
}

async fn until_stats(addr: SocketAddr, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = stats(addr).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn signup(i: usize) -> Value {
    json!({"userId": format!("d{i}"), "eventName": "signedUp", "id": format!("s{i}")})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_stats_live_in_a_real_browser() {
    let receiver = WebhookReceiver::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = support::welcome_config(dir.path(), &receiver.url("/ok"));
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        &[
            "--config",
            &config,
            "--batch-timeout",
            "50ms",
            "--key-cache-ttl",
            "100ms",
        ],
    );
    let key = server.first_key.clone().expect("key");
    let addr = server.addr;
    run_ok(
        sluice(&data)
            .args(["--config", &config])
            .args(["users", "ban", "--org", "default", "spammer"]),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 20 signups, one sent twice (a dedup drop), and an event of a banned user (a dead letter).
    for i in 0..20 {
        let (status, answer) = post(addr, &key, "/api/events/track", signup(i)).await;
        assert_eq!(status, 200, "{answer}");
    }
    let (status, _) = post(addr, &key, "/api/events/track", signup(7)).await;
    assert_eq!(status, 200);
    let spam = json!({"userId": "spammer", "eventName": "signedUp", "id": "spam-1"});
    let (status, _) = post(addr, &key, "/api/events/track", spam).await;
    assert_eq!(status, 200);
    let settled = until_stats(addr, "the load processed", |s| {
        let p = &s["pipeline"];
        p["events_indexed_total"] == 20
            && p["dedup_drops_total"] == 1
            && s["dead_letters"]["total"] == 1
            && s["actions"][0]["delivered"] == 20
            && p["partitions"]
                .as_array()
                .is_some_and(|ps| ps.len() == 8 && ps.iter().all(|q| q["lag"] == 0))
    })
    .await;
    for q in settled["pipeline"]["partitions"]
        .as_array()
        .expect("partitions")
    {
        assert!(q["end"].as_u64() >= q["committed"].as_u64(), "{q}");
    }
    assert_eq!(settled["ingest"]["accepted_total"], 22);
    assert_eq!(settled["status"], "ready", "{settled}");

    let mut browser = Browser::open(&format!("http://{addr}/"), "dashboard.png");
    let first = browser.ask("look");
    let (page, s) = (&first["shown"], &first["stats"]);
    assert_eq!(
        shown(&page["accepted-total"]),
        s["ingest"]["accepted_total"].as_f64()
    );
    assert_eq!(shown(&page["accepted-total"]), Some(22.0));
    assert_eq!(shown(&page["dedup-drops"]), Some(1.0));
    assert_eq!(shown(&page["events-indexed"]), Some(20.0));
    assert_eq!(shown(&page["dead-letters-total"]), Some(1.0));
    assert_eq!(shown(&page["spill-records"]), Some(0.0));
    assert_eq!(page["status"], "ready");
    assert_eq!(page["failure_visible"], false);
    let lag = page["lag"].as_array().expect("lag cells");
    assert_eq!(lag.len(), 8, "{page}");
    assert!(lag.iter().all(|cell| cell[1] == "0"), "{page}");
    for backend in ["log: ok", "index: ok", "dedup: ok", "registry: ok"] {
        assert!(
            page["backends"]
                .as_array()
                .expect("badges")
                .contains(&json!(backend)),
            "{backend}: {page}"
        );
    }
    assert_eq!(
        page["actions"],
        json!([["welcome-email", "0", "20", "20", "0"]]),
        "pending, fired, delivered, failed"
    );
    let letter = &page["dead_letters"][0];
    assert_eq!(letter[0], "validate");
    assert!(
        letter[1].as_str().is_some_and(|r| r.contains("banned")),
        "{letter}"
    );
    assert!(shown(&page["ack-p50"]).is_some_and(|ms| ms > 0.0), "{page}");
    assert!(shown(&page["ack-p99"]) >= shown(&page["ack-p50"]), "{page}");

    // Under load the numbers move, with no reload.
    let events: Vec<Value> = (100..300).map(signup).collect();
    let (status, _) = post(
        addr,
        &key,
        "/api/events/trackBulk",
        json!({ "events": events }),
    )
    .await;
    assert_eq!(status, 200);
    let was = page["accepted-total"].as_str().expect("text").to_owned();
    let second = browser.ask(&format!("changed accepted-total {was}"));
    assert_eq!(shown(&second["shown"]["accepted-total"]), Some(222.0));
    assert!(
        shown(&second["shown"]["ingest-rate"]).is_some_and(|r| r > 0.0),
        "{}",
        second["shown"]
    );
    let was = second["shown"]["events-indexed"]
        .as_str()
        .expect("text")
        .to_owned();
    if was != "220" {
        let third = browser.ask(&format!("changed events-indexed {was}"));
        assert!(shown(&third["shown"]["events-indexed"]) > Some(20.0));
    }
    browser.close();
}

/// The failure that stopped a stream, as the pipeline reports it to the node (`serve` calls
/// `pipeline_failed` with the pipeline's error), shows as an alert; and with `admin_token`,
/// `/`, `/stats` and `/metrics` need it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_stream_shows_its_failure_and_the_admin_token_guards_the_dashboard() {
    use sluice_api::{ApiConfig, AppState};
    use sluice_log::Log;
    use sluice_log::embedded::{EmbeddedLog, EmbeddedLogConfig};
    use sluice_registry::Registry;
    use sluice_spill::Bridge;

    let dir = tempfile::tempdir().expect("tempdir");
    let (registry, _key) = support::registry_with_key(dir.path()).await;
    let log = Arc::new(
        EmbeddedLog::open(&dir.path().join("log"), EmbeddedLogConfig::default()).expect("log"),
    );
    let state = AppState::new(
        Bridge::without_spill(log as Arc<dyn Log>, Duration::from_secs(5)),
        registry as Arc<dyn Registry>,
        Some(support::embedded_index(dir.path())),
        &ApiConfig::default(),
    );
    let addr = support::spawn_api(state.clone()).await;
    let cause = "partition 3, offsets 10..=19 (message m-17): the index refused the batch: mapping conflict";
    state.operations().pipeline_failed(cause.into());

    let mut browser = Browser::open(&format!("http://{addr}/"), "dashboard-failure.png");
    let look = browser.ask("look");
    assert_eq!(look["shown"]["failure_visible"], true, "{look}");
    assert_eq!(look["shown"]["failure-error"], cause);
    assert_eq!(look["stats"]["failure"]["error"], cause);
    assert_eq!(look["shown"]["status"], "not ready");
    browser.close();

    state.operations().require_token("s3cret");
    let mut conn = Connection::connect(addr).await.expect("connect");
    for path in ["/", "/stats", "/metrics"] {
        let answer = conn.get(path, &[]).await.expect("request");
        assert_eq!(answer.status, 401, "{path}");
        assert_eq!(answer.headers["www-authenticate"], "Bearer");
        let answer = conn
            .get(path, &[("authorization", "Bearer s3cret")])
            .await
            .expect("request");
        assert_eq!(answer.status, 200, "{path}");
    }
    let page = conn
        .get("/", &[("authorization", "Bearer s3cret")])
        .await
        .expect("dashboard");
    assert!(
        page.headers["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/html"))
    );
    assert!(
        page.headers["content-security-policy"]
            .to_str()
            .is_ok_and(|csp| csp.contains("default-src 'none'")),
        "the page may fetch nothing from elsewhere"
    );
    assert_eq!(
        conn.get("/healthz", &[]).await.expect("healthz").status,
        200
    );
    // A wrong token, as Bearer or as a browser's Basic password, is refused.
    for wrong in [
        "Bearer s3cre".to_string(),
        format!("Basic {}", base64_encode("admin:wrong")),
    ] {
        let answer = conn
            .get("/stats", &[("authorization", wrong.as_str())])
            .await
            .expect("request");
        assert_eq!(answer.status, 401, "{wrong}");
        assert!(
            answer.json()["error"]
                .as_str()
                .is_some_and(|e| e.contains("admin_token")),
            "the error says what is needed"
        );
    }

    // In a browser: the 401 asks for a login (Basic), the token as the password opens the
    // page, and the page's own reads of /stats carry it.
    let mut browser = Browser::open_as(
        &format!("http://{addr}/"),
        "dashboard-token.png",
        Some("s3cret"),
    );
    let look = browser.ask("look");
    assert_eq!(look["shown"]["failure-error"], cause, "{look}");
    browser.close();
}

fn base64_encode(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}
