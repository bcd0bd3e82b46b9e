//! `sluice` with shared backends by URL, against the machine's servers: `--dedup redis://...`
//! (127.0.0.1:6379, keys under a prefix unique to the test, deleted at the end) and
//! `--registry postgres://...` (127.0.0.1:5432, database `test`, a schema of the test's own,
//! dropped at the end).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::client::Connection;

use sluice_registry::testing::Schema;

mod support;
use support::{Server, run_ok, sluice};

const REDIS: &str = "redis://127.0.0.1:6379";

fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-u", REDIS])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Deletes the test's keys when dropped.
struct Keys(String);

impl Drop for Keys {
    fn drop(&mut self) {
        let pattern = format!("{}:*", self.0);
        let keys = redis_cli(&["--scan", "--pattern", &pattern]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if !keys.is_empty() {
            let mut args = vec!["DEL"];
            args.extend(keys);
            redis_cli(&args);
        }
    }
}

async fn post(conn: &mut Connection, key: &str, path: &str, body: Value) {
    let r = conn
        .post(path, &[("api-key", key)], body.to_string().into())
        .await
        .expect("request");
    assert_eq!(r.status.as_u16(), 200, "{}", r.json());
}

async fn profile_once(
    conn: &mut Connection,
    key: &str,
    user: &str,
    until: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = conn
            .get(&format!("/api/users/{user}"), &[("api-key", key)])
            .await
            .expect("request");
        let body = r.json();
        if r.status.as_u16() == 200 && until(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{user} not as expected within 30 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_redis_dedup_drops_a_reposted_id_and_keeps_its_marks_in_redis() {
    let prefix = format!(
        "sluice-test-{}-{}",
        std::process::id(),
        sluice_model::time::now_ms()
    );
    let _cleanup = Keys(prefix.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("node"),
        &[
            "--dedup",
            REDIS,
            "--dedup-key-prefix",
            &prefix,
            "--batch-timeout",
            "20ms",
        ],
    );
    let key = server.first_key.clone().expect("key");
    let mut conn = Connection::connect(server.addr).await.expect("connect");

    post(
        &mut conn,
        &key,
        "/api/users/update",
        json!({"userId": "r1", "id": "upd-1", "dataFields": {"a": 1}}),
    )
    .await;
    profile_once(&mut conn, &key, "r1", |p| p["dataFields"]["a"] == 1).await;
    // The same id again, with other content: a duplicate, dropped. Then a new id.
    post(
        &mut conn,
        &key,
        "/api/users/update",
        json!({"userId": "r1", "id": "upd-1", "dataFields": {"a": 2}}),
    )
    .await;
    post(
        &mut conn,
        &key,
        "/api/users/update",
        json!({"userId": "r1", "id": "upd-2", "dataFields": {"b": 1}}),
    )
    .await;
    let profile = profile_once(&mut conn, &key, "r1", |p| p["dataFields"]["b"] == 1).await;
    assert_eq!(
        profile["dataFields"],
        json!({"a": 1, "b": 1}),
        "the reposted id was dropped"
    );

    // The marks live in Redis, with the dedup window as their time to live.
    assert_eq!(
        redis_cli(&["EXISTS", &format!("{prefix}:default:upd-1")]),
        "1"
    );
    let ttl: i64 = redis_cli(&["TTL", &format!("{prefix}:default:upd-2")])
        .parse()
        .expect("ttl");
    assert!(ttl > 6 * 24 * 3600, "ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_and_serve_share_a_postgres_registry() {
    let schema = Schema::create();
    let url = schema.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin_dir = dir.path().join("admin");
    // An admin on another machine (another data dir) creates the org and its key.
    run_ok(sluice(&admin_dir).args(["--registry", &url, "orgs", "create", "acme"]));
    let key =
        run_ok(sluice(&admin_dir).args(["--registry", &url, "keys", "create", "--org", "acme"]));
    let key = key.trim().to_string();
    run_ok(sluice(&admin_dir).args([
        "--registry",
        &url,
        "users",
        "ban",
        "--org",
        "acme",
        "spammer",
    ]));

    let server = Server::start(
        &dir.path().join("node"),
        &["--registry", &url, "--batch-timeout", "20ms"],
    );
    let mut conn = Connection::connect(server.addr).await.expect("connect");
    post(
        &mut conn,
        &key,
        "/api/users/update",
        json!({"userId": "p1", "dataFields": {"x": 1}}),
    )
    .await;
    post(
        &mut conn,
        &key,
        "/api/users/update",
        json!({"userId": "spammer", "dataFields": {"x": 1}}),
    )
    .await;
    post(
        &mut conn,
        &key,
        "/api/users/update",
        json!({"userId": "p2", "dataFields": {"x": 2}}),
    )
    .await;
    profile_once(&mut conn, &key, "p2", |p| p["dataFields"]["x"] == 2).await;
    profile_once(&mut conn, &key, "p1", |p| p["dataFields"]["x"] == 1).await;
    let r = conn
        .get("/api/users/spammer", &[("api-key", key.as_str())])
        .await
        .expect("request");
    assert_eq!(
        r.status.as_u16(),
        404,
        "the ban in PostgreSQL applies: {}",
        r.json()
    );
    let listed = run_ok(sluice(&admin_dir).args(["--registry", &url, "orgs", "list"]));
    // The registry already had an org, so the server's first start created no `default`.
    assert!(
        listed.contains("acme") && !listed.contains("default"),
        "{listed}"
    );
}
