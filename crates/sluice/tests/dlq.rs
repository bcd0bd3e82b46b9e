//! `sluice dlq list | show | replay` against the real binary and its embedded logs: a banned
//! user's message and a trigger action its webhook refused become dead letters. While the
//! server runs, the commands go through its admin socket: the message, replayed after the ban
//! is lifted, is processed; the action, still refused, stays a letter. With the server stopped
//! they open the logs themselves: after the webhook is fixed, `replay --all` sends the action.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;
use support::{Server, WebhookReceiver, post, run_err, run_ok, sluice, wait_for_sentinels};

fn write_config(path: &std::path::Path, webhook: &str) {
    std::fs::write(
        path,
        format!("[[triggers]]\nname = \"nudge\"\nevent = \"abandoned\"\nwebhook = \"{webhook}\"\n"),
    )
    .expect("write config");
}

async fn get(addr: std::net::SocketAddr, key: &str, path: &str) -> Value {
    let mut conn = sluice::client::Connection::connect(addr)
        .await
        .expect("connect");
    conn.get(path, &[("api-key", key)])
        .await
        .expect("get")
        .json()
}

/// Polls `path` until `done` holds for its JSON answer.
async fn wait_for(
    addr: std::net::SocketAddr,
    key: &str,
    path: &str,
    done: impl Fn(&Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = get(addr, key, path).await;
        if done(&answer) {
            return;
        }
        assert!(Instant::now() < deadline, "{path}: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_and_replayed() {
    let receiver = WebhookReceiver::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config_path = dir.path().join("sluice.toml");
    write_config(&config_path, &receiver.url("/refuse"));
    let config = config_path.to_str().expect("utf-8 path");
    let admin = |args: &[&str]| {
        let mut cmd = sluice(&data);
        cmd.args(["--config", config]).args(args);
        cmd
    };

    let mut server = Server::start(&data, &["--config", config, "--key-cache-ttl", "100ms"]);
    let key = server.first_key.clone().expect("first key");
    let addr = server.addr;
    run_ok(&mut admin(&["users", "ban", "--org", "default", "bad"]));
    // The pipeline caches an org's bans for key_cache_ttl.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = post(
        addr,
        &key,
        "/api/events/trackBulk",
        json!({"events": [
            {"userId": "bad", "eventName": "bought", "id": "b1"},
            {"userId": "good", "eventName": "bought", "id": "g1"},
            {"userId": "cid", "eventName": "abandoned", "id": "a1", "dataFields": {"cart": 3}},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // Every partition is past these messages once its sentinel is readable.
    wait_for_sentinels(addr, &key).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.raw_count() == 0 {
        assert!(Instant::now() < deadline, "the webhook was never called");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // While the server runs it holds the embedded logs; the commands go through its admin
    // socket.
    let listed = run_ok(&mut admin(&["dlq", "list", "--json"]));
    let letters: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(letters.len(), 2, "{listed}");
    let banned = letters
        .iter()
        .find(|l| l["messageId"] == "b1")
        .expect("the banned user's letter");
    assert_eq!(banned["stage"], "validate");
    assert_eq!(banned["replayed"], false);
    let refused = letters
        .iter()
        .find(|l| l["messageId"] == "a1")
        .expect("the refused action's letter");
    assert_eq!(refused["stage"], "trigger");
    assert_eq!(refused["rule"], "nudge");
    // Counted: /metrics shows the pipeline's counters.
    let mut conn = sluice::client::Connection::connect(addr)
        .await
        .expect("connect");
    let metrics = conn.get("/metrics", &[]).await.expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    for line in [
        "sluice_dead_letters_total{stage=\"validate\"} 1",
        "sluice_dead_letters_total{stage=\"trigger\"} 1",
        "sluice_dead_letters_total{stage=\"index\"} 0",
        "sluice_actions_total{rule=\"nudge\",outcome=\"dead_lettered\"} 1",
        "sluice_actions_fired_total 1",
        "sluice_action_dead_letters_total 1",
        "# TYPE sluice_events_indexed_total counter",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    let table = run_ok(&mut admin(&["dlq", "list"]));
    eprintln!("{table}");
    assert!(
        table.contains("banned") && table.contains("400"),
        "reasons are readable: {table}"
    );
    let id = banned["id"].as_str().expect("id");
    let shown: Value =
        serde_json::from_str(&run_ok(&mut admin(&["dlq", "show", id]))).expect("show prints JSON");
    assert_eq!(shown["record"]["userId"], "bad");
    let err = run_err(&mut admin(&["dlq", "show", "9-999"]));
    assert!(err.contains("no dead letter \"9-999\""), "{err}");
    let err = run_err(&mut admin(&["dlq", "replay", "9-999"]));
    assert!(err.contains("no dead letter \"9-999\""), "{err}");

    // Lift the ban and replay the message: the running server processes it.
    run_ok(&mut admin(&["users", "unban", "--org", "default", "bad"]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = run_ok(&mut admin(&["dlq", "replay", id]));
    assert!(
        out.contains("replayed 1 dead letters: 1 messages appended to the log, 0 actions sent"),
        "{out}"
    );
    wait_for(addr, &key, "/api/users/bad/events", |a| {
        a["events"][0]["messageId"] == "b1"
    })
    .await;
    // The action's target still refuses it: the replay says so, and the letter stays open.
    let refused_id = refused["id"].as_str().expect("id");
    let err = run_err(&mut admin(&["dlq", "replay", refused_id]));
    assert!(err.contains("400 Bad Request"), "{err}");
    assert!(server.sigterm().success());

    // With the server stopped the commands open the logs themselves. Fix the target, replay
    // what is left.
    write_config(&config_path, &receiver.url("/ok"));
    let out = run_ok(&mut admin(&["dlq", "replay", "--all"]));
    assert!(
        out.contains("replayed 1 dead letters: 0 messages appended to the log, 1 actions sent"),
        "{out}"
    );
    let sent: Vec<_> = receiver
        .calls()
        .into_iter()
        .filter(|c| c.path == "/ok")
        .collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].idempotency_key.as_deref(), Some("default:a1:nudge"));
    assert_eq!(sent[0].body["event"]["dataFields"], json!({"cart": 3}));
    let listed = run_ok(&mut admin(&["dlq", "list", "--json"]));
    assert!(
        listed
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).expect("JSON")["replayed"] == true),
        "{listed}"
    );
    assert!(run_ok(&mut admin(&["dlq", "replay", "--all"])).contains("nothing to replay"));
    assert!(
        !data.join("admin.sock").exists(),
        "the server removes its admin socket when it stops"
    );
}
