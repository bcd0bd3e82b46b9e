//! The action dispatcher (SPEC §6) against the real binary: webhook actions are delivered from
//! the actions log, so a target that refuses connections (for 40 s, under load) or answers
//! slowly never holds indexing; a target that keeps failing is probed at a growing interval,
//! not hammered; every action arrives once it is back, with the profile as it stood at its
//! event; an action older than `action_max_age` becomes a dead letter that `sluice dlq
//! replay` sends. (SIGKILL during dispatch: `tests/triggers.rs`; failover between ingest
//! nodes on Kafka: `tests/nodes.rs`.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;
use support::{Server, WebhookReceiver, post, run_ok, sluice};

/// The number of `signedUp` events searchable.
async fn signups_searchable(addr: std::net::SocketAddr, key: &str) -> u64 {
    let (status, found) = post(
        addr,
        key,
        "/api/search/events",
        json!({"query": "eventName:signedUp", "size": 0}),
    )
    .await;
    assert_eq!(status, 200, "{found}");
    found["total"].as_u64().expect("total")
}

/// Waits until at least `count` signups are searchable; returns how long that took.
async fn searchable_within(
    addr: std::net::SocketAddr,
    key: &str,
    count: u64,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    while signups_searchable(addr, key).await < count {
        assert!(
            started.elapsed() < limit,
            "signup {count} searchable within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// `/metrics`, as name → value.
async fn metrics(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    let mut conn = sluice::client::Connection::connect(addr)
        .await
        .expect("connect");
    let answer = conn.get("/metrics", &[]).await.expect("metrics");
    String::from_utf8_lossy(&answer.body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

async fn until(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signup(i: usize) -> Value {
    json!({"userId": format!("w{i}"), "eventName": "signedUp", "id": format!("s{i}"), "dataFields": {"n": i}})
}

/// Signups `0..count` of as many users, in one request.
async fn sign_up(server: &Server, count: usize) {
    let events: Vec<Value> = (0..count).map(signup).collect();
    let key = server.first_key.as_deref().expect("key");
    let (status, answer) = post(
        server.addr,
        key,
        "/api/events/trackBulk",
        json!({ "events": events }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}

/// How long the target refuses connections.
const OUTAGE: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_target_never_holds_indexing_and_gets_every_action_once_it_is_back() {
    let target = support::free_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = support::welcome_config(dir.path(), &format!("http://{target}/ok"));
    let mut server = Server::start(
        &dir.path().join("data"),
        &["--config", &config, "--batch-timeout", "50ms"],
    );
    let key = server.first_key.clone().expect("key");
    let addr = server.addr;

    // For 40 s while the target refuses connections, users are updated, sign up, and are
    // updated again; every 25th signup must be searchable within 3 s of its acknowledgement.
    let started = Instant::now();
    let mut posted = 0;
    let mut slowest = Duration::ZERO;
    while started.elapsed() < OUTAGE {
        let user = format!("w{posted}");
        let before = json!({"userId": user, "dataFields": {"step": "before", "n": posted}});
        let after = json!({"userId": user, "dataFields": {"step": "after"}});
        for (path, body) in [
            ("/api/users/update", before),
            ("/api/events/track", signup(posted)),
            ("/api/users/update", after),
        ] {
            let (status, answer) = post(addr, &key, path, body).await;
            assert_eq!(status, 200, "{path}: {answer}");
        }
        posted += 1;
        if posted % 25 == 0 {
            slowest = slowest
                .max(searchable_within(addr, &key, posted as u64, Duration::from_secs(3)).await);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "dispatch: {posted} signups, each sample searchable within {slowest:?} while the target was down for {OUTAGE:?}"
    );
    searchable_within(addr, &key, posted as u64, Duration::from_secs(3)).await;
    let before = metrics(addr).await;
    assert_eq!(before["sluice_actions_delivered_total"], 0.0);
    // The host's gate: one probe per (growing, at most 5 s) delay, not one call per pending
    // action.
    let retries = before["sluice_action_retries_total"];
    assert!(
        (1.0..60.0).contains(&retries),
        "{retries} failed calls for {posted} pending actions in {OUTAGE:?}"
    );

    // The target comes back: every action arrives, once, with the profile as it stood at the
    // signup.
    let receiver = WebhookReceiver::start_at(target, Duration::ZERO).await;
    until("every welcome", Duration::from_secs(60), || {
        receiver.distinct().len() >= posted
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let distinct = receiver.distinct();
    assert_eq!(distinct.len(), posted);
    assert_eq!(receiver.raw_count(), posted, "no action was sent twice");
    for i in 0..posted {
        let call = &distinct[&format!("default:s{i}:welcome-email")];
        assert_eq!(call.body["event"]["userId"], format!("w{i}"));
        assert_eq!(call.body["event"]["dataFields"]["n"], i);
        assert_eq!(
            call.body["profile"]["dataFields"],
            json!({"step": "before", "n": i}),
            "user w{i}: the profile at the signup"
        );
    }
    let after = metrics(addr).await;
    assert_eq!(after["sluice_actions_delivered_total"], posted as f64);
    assert!(server.sigterm().success(), "SIGTERM exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_target_does_not_slow_indexing() {
    let receiver = WebhookReceiver::start(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = support::welcome_config(dir.path(), &receiver.url("/ok"));
    let mut server = Server::start(
        &dir.path().join("data"),
        &["--config", &config, "--batch-timeout", "50ms"],
    );
    let key = server.first_key.clone().expect("key");
    let addr = server.addr;
    // 200 users sign up at once: called inline, 2 s each, they would hold their batches for
    // many seconds.
    sign_up(&server, 200).await;
    let took = searchable_within(addr, &key, 200, Duration::from_secs(3)).await;
    eprintln!(
        "dispatch: 200 signups searchable {took:?} after their ack, the target taking 2 s a call"
    );
    until("200 welcomes", Duration::from_secs(60), || {
        receiver.distinct().len() >= 200
    })
    .await;
    assert!(server.sigterm().success(), "SIGTERM exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_older_than_action_max_age_is_a_dead_letter_that_replay_sends() {
    let target = support::free_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = support::welcome_config(dir.path(), &format!("http://{target}/ok"));
    let mut server = Server::start(&data, &["--config", &config, "--action-max-age", "1s"]);
    let addr = server.addr;
    sign_up(&server, 3).await;
    let list = || -> Vec<Value> {
        run_ok(sluice(&data).args(["--config", &config, "dlq", "list", "--json"]))
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let letters = loop {
        let letters = list();
        if letters.len() >= 3 {
            break letters;
        }
        assert!(
            Instant::now() < deadline,
            "3 dead letters within 30 s: {letters:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(letters.len(), 3, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter["stage"], "trigger", "{letter}");
        assert_eq!(letter["rule"], "welcome-email", "{letter}");
        assert!(
            letter["reason"]
                .as_str()
                .is_some_and(|r| r.contains("older than action_max_age (1s)")),
            "{letter}"
        );
    }
    assert_eq!(metrics(addr).await["sluice_action_dead_letters_total"], 3.0);

    // The target is back: a replay sends the actions.
    let receiver = WebhookReceiver::start_at(target, Duration::ZERO).await;
    let out = run_ok(sluice(&data).args(["--config", &config, "dlq", "replay", "--all"]));
    assert!(out.contains("3 actions sent"), "{out}");
    let keys: std::collections::BTreeSet<String> = receiver.distinct().into_keys().collect();
    assert_eq!(
        keys,
        (0..3)
            .map(|i| format!("default:s{i}:welcome-email"))
            .collect()
    );
    assert!(server.sigterm().success(), "SIGTERM exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_users_pending_actions_are_dropped_not_sent() {
    let target = support::free_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = support::welcome_config(dir.path(), &format!("http://{target}/ok"));
    let mut server = Server::start(
        &dir.path().join("data"),
        &["--config", &config, "--batch-timeout", "50ms"],
    );
    let key = server.first_key.clone().expect("key");
    let addr = server.addr;
    // Ten signups while the target is down: their actions are pending, retried.
    sign_up(&server, 10).await;
    searchable_within(addr, &key, 10, Duration::from_secs(10)).await;
    // Users w0..w4 are forgotten, then sign up again (a new signup of a user created anew).
    for i in 0..5 {
        let mut conn = sluice::client::Connection::connect(addr)
            .await
            .expect("connect");
        let r = conn
            .send(
                axum::http::Method::DELETE,
                &format!("/api/users/w{i}"),
                &[("api-key", key.as_str())],
                bytes::Bytes::new(),
            )
            .await
            .expect("delete");
        assert_eq!(r.status.as_u16(), 202, "{:?}", r.json());
    }
    let again = json!({"userId": "w0", "eventName": "signedUp", "id": "again-0"});
    let (status, _) = post(addr, &key, "/api/events/track", again).await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while signups_searchable(addr, &key).await != 6 {
        assert!(
            Instant::now() < deadline,
            "the forgotten signups leave the index"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The target comes back: only the users not forgotten get their welcome, and w0's new one.
    let receiver = WebhookReceiver::start_at(target, Duration::ZERO).await;
    until(
        "the welcomes of w5..w9 and w0's new one",
        Duration::from_secs(60),
        || receiver.distinct().len() >= 6,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let keys: std::collections::BTreeSet<String> = receiver.distinct().into_keys().collect();
    let mut expected: std::collections::BTreeSet<String> = (5..10)
        .map(|i| format!("default:s{i}:welcome-email"))
        .collect();
    expected.insert("default:again-0:welcome-email".into());
    assert_eq!(keys, expected, "no action of a forgotten user was sent");
    let counted = metrics(addr).await;
    assert_eq!(
        counted["sluice_actions_forgotten_total"], 5.0,
        "{counted:?}"
    );
    assert_eq!(
        counted["sluice_action_dead_letters_total"], 0.0,
        "dropped, not dead letters"
    );
    assert!(server.sigterm().success(), "SIGTERM exits 0");
}
