//! The trigger acceptance test (issue 7): `sluice serve` with a `[[triggers]]` welcome-email
//! rule pointed at a real HTTP receiver. 10,000 users each sign up once (every tenth posts
//! the same signup again later), between a profile update before and one after. The process
//! is SIGKILLed while the actions fire and started again. The receiver, deduplicating by
//! `Idempotency-Key` as a real email service would, must end with exactly one call per user,
//! carrying the profile as it stood at the signup; the test reports raw calls and distinct
//! keys.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;
use support::{Server, WebhookReceiver, post};

const USERS: usize = 10_000;
const CHUNK: usize = 1_000;

fn profile_before(i: usize) -> Value {
    json!({"name": format!("user {i}"), "plan": "free", "n": i})
}

/// Posts `body` until it is acknowledged (the server may be restarting).
async fn post_ok(addr: std::net::SocketAddr, key: &str, path: &str, body: Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, answer) = post(addr, key, path, body.clone()).await;
        if status == 200 {
            assert_eq!(answer["failed"], 0, "{answer}");
            return;
        }
        assert!(Instant::now() < deadline, "{path}: {status} {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_signups_send_one_welcome_each_across_a_sigkill() {
    // Each call takes 20 ms, so the actions are still firing when the process is killed.
    let receiver = WebhookReceiver::start(Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = support::welcome_config(dir.path(), &receiver.url("/ok"));
    let config = config.as_str();
    let mut server = Server::start(&data, &["--config", config]);
    let key = server.first_key.clone().expect("first start prints a key");
    let addr = server.addr;

    for start in (0..USERS).step_by(CHUNK) {
        let users = start..start + CHUNK;
        let before: Vec<Value> = users
            .clone()
            .map(|i| json!({"userId": format!("u{i}"), "dataFields": profile_before(i)}))
            .collect();
        post_ok(
            addr,
            &key,
            "/api/users/bulkUpdate",
            json!({ "users": before }),
        )
        .await;
        let signups: Vec<Value> = users
            .clone()
            .map(|i| {
                json!({"userId": format!("u{i}"), "eventName": "signedUp", "id": format!("signup-{i}"),
                       "dataFields": {"source": "test"}})
            })
            .collect();
        post_ok(
            addr,
            &key,
            "/api/events/trackBulk",
            json!({ "events": signups }),
        )
        .await;
        let after: Vec<Value> = users
            .clone()
            .map(|i| json!({"userId": format!("u{i}"), "dataFields": {"plan": "pro", "coupon": format!("c{i}")}}))
            .collect();
        post_ok(
            addr,
            &key,
            "/api/users/bulkUpdate",
            json!({ "users": after }),
        )
        .await;
    }

    // SIGKILL once a fair share of the welcomes went out, while the rest are in flight.
    let deadline = Instant::now() + Duration::from_secs(120);
    while receiver.raw_count() < USERS / 4 {
        assert!(
            Instant::now() < deadline,
            "only {} calls within 120 s",
            receiver.raw_count()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.sigkill();
    let at_kill = receiver.raw_count();
    let mut server = Server::start(&data, &["--config", config, "--listen", &addr.to_string()]);

    // Every tenth user signs up again with the same id, after the later update: a duplicate
    // that must not fire (it would carry the later profile).
    let again: Vec<Value> = (0..USERS)
        .step_by(10)
        .map(|i| json!({"userId": format!("u{i}"), "eventName": "signedUp", "id": format!("signup-{i}")}))
        .collect();
    post_ok(
        addr,
        &key,
        "/api/events/trackBulk",
        json!({ "events": again }),
    )
    .await;

    // Done when every user got a welcome and no call came for a while.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last = (receiver.raw_count(), Instant::now());
    loop {
        let raw = receiver.raw_count();
        if raw != last.0 {
            last = (raw, Instant::now());
        }
        if receiver.distinct().len() >= USERS && last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} distinct welcomes of {USERS} within 180 s",
            receiver.distinct().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.sigterm().success(), "a drained shutdown exits 0");

    let calls = receiver.calls();
    let distinct = receiver.distinct();
    eprintln!(
        "welcome calls: {} raw, {} distinct keys ({} raw at the SIGKILL)",
        calls.len(),
        distinct.len(),
        at_kill
    );
    assert_eq!(distinct.len(), USERS, "one welcome per user");
    let mut per_key: HashMap<&str, Vec<&Value>> = HashMap::new();
    for call in &calls {
        assert_eq!(call.path, "/ok");
        let key = call
            .idempotency_key
            .as_deref()
            .expect("every call has an Idempotency-Key");
        per_key.entry(key).or_default().push(&call.body);
    }
    for i in 0..USERS {
        let key = format!("default:signup-{i}:welcome-email");
        let bodies = per_key
            .get(key.as_str())
            .unwrap_or_else(|| panic!("no welcome for user {i}"));
        let body = bodies[0];
        assert_eq!(body["idempotencyKey"], key);
        assert_eq!(body["event"]["messageId"], format!("signup-{i}"));
        assert_eq!(body["event"]["userId"], format!("u{i}"));
        assert_eq!(
            body["profile"]["dataFields"],
            profile_before(i),
            "user {i}: the profile at the signup, not after the later update"
        );
        assert!(
            bodies.iter().all(|b| *b == body),
            "user {i}: a repeated call carries the same payload"
        );
    }
    // A key with several calls is one the kill interrupted: never more than once after it.
    let repeated = per_key.values().filter(|b| b.len() > 1).count();
    assert!(
        repeated <= at_kill,
        "{repeated} keys called more than once, {at_kill} calls before the kill"
    );
}
