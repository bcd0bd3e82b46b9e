//! Real SDKs, unchanged and pointed at `sluice serve` with a write-scoped key (SPEC §4 "Segment
//! fidelity"): segment-analytics-python and rudder-sdk-python (PyPI; rudder gzips its bodies),
//! @segment/analytics-node (npm), and in Debian's headless Chromium analytics.js from
//! @segment/analytics-next and @rudderstack/analytics-js on a page of another origin, each
//! one call per request and batched. Every SDK's identify, track, page, group and alias arrive:
//! the profile is found by id and by the email of its traits, the events keep the SDK's
//! `context`, and `createdAt` is the call's time. An unknown key gives the SDK the server's
//! reason. `scripts/install-test-tools` installs the SDKs and the browser.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice::client::Connection;

mod support;
use support::{Server, run_ok, sluice};

fn node_modules() -> String {
    std::env::var("SLUICE_NODE_MODULES").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../.cache/browser/node_modules"
        )
        .to_string()
    })
}

/// Runs `program script args...` and reads the one JSON line it prints.
fn run_json(program: &str, script: &str, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = Command::new(program)
        .arg(&script)
        .args(args)
        .env("NODE_PATH", node_modules())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (./scripts/test installs what the SDK test needs): {e}")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let value: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{} printed {stdout:?} ({e}); stderr: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && value.get("error").is_none(),
        "{}: {value}; stderr: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    value
}

async fn get(addr: SocketAddr, key: &str, path: &str) -> (u16, Value) {
    let mut conn = Connection::connect(addr).await.expect("connect");
    let answer = conn.get(path, &[("api-key", key)]).await.expect("GET");
    let body = if answer.body.is_empty() {
        Value::Null
    } else {
        answer.json()
    };
    (answer.status.as_u16(), body)
}

/// What one SDK sent for `user`: the profile (found by id and by email) and its events, once
/// all of `events` are searchable.
async fn arrived(addr: SocketAddr, key: &str, user: &str, events: &[&str]) -> (Value, Vec<Value>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, profile) = get(addr, key, &format!("/api/users/{user}")).await;
        let (_, listed) = get(addr, key, &format!("/api/users/{user}/events?limit=50")).await;
        let listed: Vec<Value> = listed["events"].as_array().cloned().unwrap_or_default();
        let names: Vec<&str> = listed
            .iter()
            .filter_map(|e| e["eventName"].as_str())
            .collect();
        if status == 200 && events.iter().all(|e| names.contains(e)) {
            return (profile, listed);
        }
        assert!(
            Instant::now() < deadline,
            "{user}: profile {status} {profile}, events {names:?}, wanted {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The checks every SDK's user passes.
async fn check_user(addr: SocketAddr, key: &str, user: &str, events: &[&str], library: &str) {
    let started = sluice_model::time::now_ms() - 600_000;
    let (profile, listed) = arrived(addr, key, user, events).await;
    let email = format!("{user}@example.com");
    assert_eq!(profile["userId"], user, "{profile}");
    assert_eq!(profile["email"], email.as_str(), "traits.email: {profile}");
    assert_eq!(profile["dataFields"]["plan"], "pro", "{profile}");
    let (status, by_email) = get(addr, key, &format!("/api/users/by-email/{email}")).await;
    assert_eq!(status, 200, "{user}: by email {by_email}");
    assert_eq!(by_email["userId"], user);
    let track = listed
        .iter()
        .find(|e| e["eventName"] == "Order Completed")
        .expect("track");
    assert_eq!(track["dataFields"]["total"], 12.5, "{track}");
    let sdk = track["context"]["library"]["name"]
        .as_str()
        .unwrap_or_default();
    assert!(
        sdk.contains(library),
        "{user}: the SDK's context is kept ({library}): {track}"
    );
    for event in &listed {
        let created = event["createdAt"].as_i64().expect("createdAt");
        let received = event["receivedAt"].as_i64().expect("receivedAt");
        // Same machine, same clock: the skew correction leaves createdAt near its arrival.
        assert!(
            created >= started && (created - received).abs() < 60_000,
            "{user}: createdAt {created}, receivedAt {received}: {event}"
        );
    }
    let page = listed
        .iter()
        .find(|e| e["eventName"] == "page")
        .expect("page");
    assert_eq!(page["dataFields"]["name"], "Home", "{page}");
    let group = listed
        .iter()
        .find(|e| e["eventName"] == "group")
        .expect("group");
    assert_eq!(group["dataFields"]["groupId"], "g-1", "{group}");
    let alias = listed
        .iter()
        .find(|e| e["eventName"] == "alias")
        .expect("alias");
    assert_eq!(alias["dataFields"]["previousId"], format!("{user}-old"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sdks_and_browsers_send_to_sluice_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--batch-timeout", "50ms"]);
    let reader = server.first_key.clone().expect("key");
    let addr = server.addr;
    let writer =
        run_ok(sluice(&data).args(["keys", "create", "--org", "default", "--scope", "write"]))
            .trim()
            .to_string();
    let url = format!("http://{addr}");
    let prefix = format!("sdk{}", support::unique());
    let python = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python").to_string()
    });

    let py = run_json(&python, "interop/sdk_python.py", &[&url, &writer, &prefix]);
    for (sdk, library) in [
        ("segment", "analytics-python"),
        ("rudder", "analytics-python"),
    ] {
        let report = &py[sdk];
        assert_eq!(report["errors"], serde_json::json!([]), "{sdk}: {report}");
        let refused = &report["refused"];
        assert_eq!(
            refused["type"], "APIError",
            "{sdk}: the server's reason: {refused}"
        );
        assert_eq!(refused["status"], 401, "{sdk}: {refused}");
        assert!(
            refused["message"]
                .as_str()
                .is_some_and(|m| m.contains("key")),
            "{sdk}: {refused}"
        );
        let user = report["user"].as_str().expect("user");
        let events = ["Order Completed", "page", "screen", "group", "alias"];
        check_user(addr, &reader, user, &events, library).await;
    }

    let node = run_json("node", "interop/sdk_node.cjs", &[&url, &writer, &prefix]);
    assert_eq!(node["errors"], serde_json::json!([]), "{node}");
    assert_eq!(
        node["refused"][0]["code"], "delivery_failure",
        "an unknown key fails delivery: {node}"
    );
    let user = node["user"].as_str().expect("user");
    let events = ["Order Completed", "page", "screen", "group", "alias"];
    check_user(addr, &reader, user, &events, "analytics-node").await;

    let browser = run_json("node", "browser/sdks.cjs", &[&url, &writer, &prefix]);
    for (page, library) in [
        ("segment", "analytics.js"),
        ("segment-batch", "analytics.js"),
        ("rudder", "RudderLabs"),
        ("rudder-batch", "RudderLabs"),
    ] {
        let report = &browser[page];
        assert_eq!(report["delivered"], 5, "{page}: {report}");
        assert_eq!(report["page"], serde_json::json!([]), "{page}: {report}");
        let answers = report["answers"].as_array().expect("answers");
        assert!(
            answers.iter().all(|a| a["status"] == 200),
            "{page}: every request to sluice succeeded: {report}"
        );
        let batched = answers.iter().any(|a| a["calls"].as_u64() > Some(1));
        assert_eq!(batched, page.ends_with("batch"), "{page}: {report}");
        let user = report["user"].as_str().expect("user");
        let events = ["Order Completed", "page", "group", "alias"];
        check_user(addr, &reader, user, &events, library).await;
    }
}
