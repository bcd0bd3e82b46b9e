//! `sluice` with shared backends by URL, against real servers: `--dedup redis://...`
//! (127.0.0.1:6379, keys under a prefix unique to the test, deleted at the end),
//! `--registry postgres://...` (127.0.0.1:5432, database `test`, a schema of the test's own,
//! dropped at the end) and `--index http://...` (an osmem-server started for the test binary,
//! indexes under a prefix of the test's own).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::client::Connection;

use sluice_registry::testing::Schema;

mod support;
use support::{REDIS, RedisKeys, Server, redis_cli, run_ok, sluice};

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
async fn serve_with_redis_dedup_and_an_opensearch_index_drops_a_reposted_id() {
    let keys = RedisKeys::new("serve");
    let prefix = keys.0.clone();
    let index_prefix = format!("serve-{}-{}", std::process::id(), support::unique());
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("node"),
        &[
            "--dedup",
            REDIS,
            "--dedup-key-prefix",
            &prefix,
            "--index",
            &support::osmem().url,
            "--index-prefix",
            &index_prefix,
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
        redis_cli(REDIS, &["EXISTS", &format!("{prefix}:default:upd-1")]),
        "1"
    );
    let ttl: i64 = redis_cli(REDIS, &["TTL", &format!("{prefix}:default:upd-2")])
        .parse()
        .expect("ttl");
    assert!(ttl > 6 * 24 * 3600, "ttl {ttl}");

    // The profile the API read is the one in the OpenSearch index.
    let osmem: std::net::SocketAddr = support::osmem()
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("osmem address");
    let mut conn = Connection::connect(osmem).await.expect("connect to osmem");
    let stored = conn
        .get(&format!("/{index_prefix}-users/_doc/default:u:r1"), &[])
        .await
        .expect("GET the stored profile")
        .json();
    assert_eq!(
        stored["_source"]["dataFields"],
        json!({"a": 1, "b": 1}),
        "{stored}"
    );
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
