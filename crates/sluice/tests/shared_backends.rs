//! `sluice` with shared backends by URL, against real servers: `--dedup redis://...`
//! (the test run's server, keys under a prefix unique to the test, deleted at the end),
//! `--registry postgres://...` (the test run's server, a schema of the test's own,
//! dropped at the end) and `--index http://...` (a real OpenSearch 2.19 node, and osmem-server
//! as a fast extra case, each started once for the test binary; indexes under a prefix of the
//! test's own).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::client::Connection;

use sluice_dedup::testing::OwnRedis;
use sluice_index::testing::FaultProxy;
use sluice_index::{ElasticIndex, ElasticIndexConfig};
use sluice_registry::testing::Schema;

mod support;

/// The search server a test's index is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Search {
    OpenSearch,
    Osmem,
}

impl Search {
    fn url(self) -> &'static str {
        match self {
            Search::OpenSearch => &support::opensearch().url,
            Search::Osmem => &support::osmem().url,
        }
    }

    /// Makes what the indexes under `prefix` hold searchable now (a real cluster refreshes
    /// every second; osmem-server at once).
    async fn refresh(self, prefix: &str) {
        let addr: std::net::SocketAddr = self
            .url()
            .trim_start_matches("http://")
            .parse()
            .expect("address");
        let mut conn = Connection::connect(addr).await.expect("connect");
        if self == Search::OpenSearch {
            let r = conn
                .post(&format!("/{prefix}-*/_refresh"), &[], Vec::new().into())
                .await
                .expect("refresh");
            assert_eq!(r.status.as_u16(), 200, "refresh: {}", r.json());
        }
    }
}

macro_rules! on_both_search_servers {
    ($($test:ident),* $(,)?) => {
        mod opensearch {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Search::OpenSearch).await
            })*
        }
        mod osmem {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Search::Osmem).await
            })*
        }
    };
}

on_both_search_servers!(
    serve_with_redis_dedup_and_an_opensearch_index_drops_a_reposted_id,
    serve_on_shared_backends_rides_out_429_storms_and_outages_of_each_backend,
);
use support::{RedisKeys, Server, TcpProxy, redis_cli, redis_url, run_ok, sluice};

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

async fn serve_with_redis_dedup_and_an_opensearch_index_drops_a_reposted_id(search: Search) {
    let keys = RedisKeys::new("serve");
    let prefix = keys.0.clone();
    let index_prefix = format!("serve-{}-{}", std::process::id(), support::unique());
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("node"),
        &[
            "--dedup",
            redis_url(),
            "--dedup-key-prefix",
            &prefix,
            "--index",
            search.url(),
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
        redis_cli(redis_url(), &["EXISTS", &format!("{prefix}:default:upd-1")]),
        "1"
    );
    let ttl: i64 = redis_cli(redis_url(), &["TTL", &format!("{prefix}:default:upd-2")])
        .parse()
        .expect("ttl");
    assert!(ttl > 6 * 24 * 3600, "ttl {ttl}");

    // The profile the API read is the one in the OpenSearch index.
    let server: std::net::SocketAddr = search
        .url()
        .trim_start_matches("http://")
        .parse()
        .expect("search server address");
    let mut conn = Connection::connect(server)
        .await
        .expect("connect to the search server");
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

/// `sluice serve` on Redis + PostgreSQL + OpenSearch under steady load while each backend
/// fails in turn: a storm of item-level 429s from the search store, the search store down for
/// 20 s, PostgreSQL unreachable for 8 s (from just before the search store comes back, so the
/// backlog meets it), Redis killed and restarted (empty). Clients retry
/// what is answered 503, as real producers do. Afterwards: every acknowledged message is in
/// the index exactly once in effect (each profile its user's last acknowledged update, each
/// event once); processing resumed by itself; and the failures were logged with their
/// partition and offsets.
async fn serve_on_shared_backends_rides_out_429_storms_and_outages_of_each_backend(search: Search) {
    let proxy = FaultProxy::start(search.url());
    let mut redis = Some(OwnRedis::start());
    let redis_port = redis.as_ref().map_or(0, |r| r.port);
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let schema = Schema::create();
    let pg_addr = postgres_addr();
    let pg = TcpProxy::start(pg_addr.parse().expect("address"));
    let registry = schema.url().replace(&pg_addr, &pg.addr.to_string());
    let index_prefix = format!("chaos-{}-{}", std::process::id(), support::unique());
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let mut server = Server::start(
        &data,
        &[
            "--dedup",
            &redis_url,
            "--registry",
            &registry,
            "--index",
            &proxy.url,
            "--index-prefix",
            &index_prefix,
            "--batch-timeout",
            "20ms",
            "--key-cache-ttl",
            "200ms",
        ],
    );
    let key = server.first_key.clone().expect("key");
    let until = Instant::now() + Duration::from_secs(40);
    let clients = support::retrying_clients(server.addr, &key, 4, until);
    let pause = |s: u64| tokio::time::sleep(Duration::from_secs(s));

    pause(2).await;
    eprintln!("chaos: item-level 429 storm");
    proxy.fail_items(429, 2, 1000);
    pause(3).await;
    eprintln!("chaos: the search store goes down for 20 s");
    proxy.go_down();
    pause(18).await;
    // PostgreSQL goes away just before the search store comes back, so the backlog meets it.
    eprintln!("chaos: PostgreSQL unreachable for 8 s");
    pg.set_down(true);
    pause(2).await;
    proxy.come_back();
    pause(6).await;
    pg.set_down(false);
    pause(2).await;
    eprintln!("chaos: Redis killed and restarted");
    drop(redis.take());
    redis = Some(OwnRedis::start_on(redis_port));
    let mut acked = Vec::new();
    let mut unavailable = 0;
    for c in clients {
        let (ids, n503) = c.await.expect("client");
        acked.extend(ids);
        unavailable += n503;
    }
    eprintln!(
        "chaos: {} messages acknowledged, {unavailable} answers 503 (retried), {} bulk items failed with 429",
        acked.len(),
        proxy.withheld()
    );
    assert!(acked.len() > 1000, "the load did real work");
    // Processing resumes by itself: a sentinel on every partition gets indexed.
    support::wait_for_sentinels(server.addr, &key).await;
    assert!(proxy.withheld() >= 1000, "the storm happened");
    assert!(server.sigterm().success());
    drop(redis);

    search.refresh(&index_prefix).await;
    let mut config = ElasticIndexConfig::new(search.url());
    config.prefix = index_prefix;
    let index = ElasticIndex::open(config).await.expect("index");
    support::check_index_matches_acked(&index, &acked).await;

    let stderr = std::fs::read_to_string(data.with_extension("stderr.log")).expect("stderr");
    for (what, needle) in [
        ("item-level 429s", "429"),
        ("the index outage", "the index at"),
        ("the Redis restart", "dedup"),
        ("the PostgreSQL outage", "registry"),
    ] {
        let line = stderr
            .lines()
            .find(|l| l.contains(needle) && l.contains("batch{partition="))
            .unwrap_or_else(|| {
                let other: Vec<&str> = stderr
                    .lines()
                    .filter(|l| !l.contains("elastic::bulk"))
                    .take(60)
                    .collect();
                panic!(
                    "no log line about {what} with its partition; lines other than bulk retries:\n{}",
                    other.join("\n")
                )
            });
        assert!(line.contains("first=") && line.contains("last="), "{line}");
    }
}

/// `host:port` of the test run's PostgreSQL.
fn postgres_addr() -> String {
    let url = sluice_registry::testing::postgres_url();
    let rest = url.split_once('@').map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// One request to the OpenSearch node; the answer must be a 200.
async fn opensearch(method: &str, path: &str, body: Value) -> Value {
    let addr = support::opensearch()
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("address");
    let mut conn = Connection::connect(addr).await.expect("connect");
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let method = method.parse().expect("method");
    let r = conn
        .send(method, path, &[], body.into())
        .await
        .expect("request");
    assert_eq!(r.status.as_u16(), 200, "{path}: {}", r.json());
    r.json()
}

/// Polls `/readyz` until `test` holds for (status, body), or fails after 60 s.
async fn wait_readyz(addr: std::net::SocketAddr, what: &str, test: impl Fn(u16, &Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn = Connection::connect(addr).await.expect("connect");
    loop {
        let r = conn.get("/readyz", &[]).await.expect("readyz");
        let body = r.json();
        if test(r.status.as_u16(), &body) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} within 60 s: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `sluice serve` in `dir` on the index at `url` (a search server, or a proxy in front of one).
fn serve_on_index(dir: &std::path::Path, url: &str, index_prefix: &str) -> Server {
    Server::start(
        &dir.join("node"),
        &[
            "--index",
            url,
            "--index-prefix",
            index_prefix,
            "--batch-timeout",
            "50ms",
        ],
    )
}

/// Redis killed makes `/readyz` a 503 that names the dedup store; back, the node is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_a_dedup_store_that_is_gone() {
    let redis = OwnRedis::start();
    let port = redis.port;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("node"),
        &["--dedup", &format!("redis://127.0.0.1:{port}")],
    );
    let addr = server.addr;
    wait_readyz(addr, "ready", |status, body| {
        status == 200 && body["dedup"] == "ok" && body["registry"] == "ok" && body["index"] == "ok"
    })
    .await;
    drop(redis);
    wait_readyz(addr, "readyz names the dedup store", |status, body| {
        status == 503
            && body["dedup"] == "down"
            && body["reasons"]
                .to_string()
                .contains("the dedup store does not answer")
    })
    .await;
    let _redis = OwnRedis::start_on(port);
    wait_readyz(addr, "ready once Redis is back", |status, body| {
        status == 200 && body["dedup"] == "ok"
    })
    .await;
}

/// PostgreSQL unreachable makes `/readyz` a 503 that names the registry; back, ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_a_registry_that_is_gone() {
    let schema = Schema::create();
    let pg_addr = postgres_addr();
    let pg = TcpProxy::start(pg_addr.parse().expect("address"));
    let registry = schema.url().replace(&pg_addr, &pg.addr.to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("node"), &["--registry", &registry]);
    let addr = server.addr;
    wait_readyz(addr, "ready", |status, body| {
        status == 200 && body["registry"] == "ok"
    })
    .await;
    pg.set_down(true);
    wait_readyz(addr, "readyz names the registry", |status, body| {
        status == 503
            && body["registry"] == "down"
            && body["reasons"]
                .to_string()
                .contains("the registry store does not answer")
    })
    .await;
    pg.set_down(false);
    wait_readyz(addr, "ready once PostgreSQL is back", |status, body| {
        status == 200 && body["registry"] == "ok"
    })
    .await;
}

/// A closed and a red index (real OpenSearch: a closed index reopened with its shards pinned to
/// a node that does not exist has no primary) make `/readyz` a 503 that names the index and
/// why; the API still acknowledges, and what it took is indexed once the index is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_a_closed_or_red_index_and_nothing_acknowledged_meanwhile_is_lost() {
    let index_prefix = format!("ready-{}-{}", std::process::id(), support::unique());
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve_on_index(
        dir.path(),
        support::opensearch().url.as_str(),
        &index_prefix,
    );
    let key = server.first_key.clone().expect("key");
    let addr = server.addr;
    let ready = |status: u16, body: &Value| status == 200 && body["index"] == "ok";
    wait_readyz(addr, "ready", ready).await;
    let mut conn = Connection::connect(addr).await.expect("connect");
    let users = format!("{index_prefix}-users");
    let events = format!("{index_prefix}-events");

    // Closed.
    opensearch("POST", &format!("/{users}/_close"), Value::Null).await;
    let closed = format!("index {users} is closed");
    wait_readyz(addr, "readyz names the closed index", |status, body| {
        status == 503 && body["index"] == "down" && body["reasons"].to_string().contains(&closed)
    })
    .await;
    post(
        &mut conn,
        &key,
        "/api/users/update",
        json!({"userId": "closed", "dataFields": {"while": "closed"}}),
    )
    .await;
    opensearch("POST", &format!("/{users}/_open"), Value::Null).await;
    wait_readyz(addr, "ready after the index reopens", ready).await;
    profile_once(&mut conn, &key, "closed", |p| {
        p["dataFields"]["while"] == "closed"
    })
    .await;

    // Red: no node may hold the events index's shards.
    opensearch("POST", &format!("/{events}/_close"), Value::Null).await;
    opensearch(
        "PUT",
        &format!("/{events}/_settings"),
        json!({"index.routing.allocation.require._name": "no-such-node"}),
    )
    .await;
    opensearch(
        "POST",
        &format!("/{events}/_open?wait_for_active_shards=0"),
        Value::Null,
    )
    .await;
    let red = format!("index {events} is red");
    wait_readyz(addr, "readyz names the red index", |status, body| {
        status == 503 && body["reasons"].to_string().contains(&red)
    })
    .await;
    post(
        &mut conn,
        &key,
        "/api/events/track",
        json!({"userId": "closed", "eventName": "while-red", "id": "red-1"}),
    )
    .await;
    opensearch(
        "PUT",
        &format!("/{events}/_settings"),
        json!({"index.routing.allocation.require._name": null}),
    )
    .await;
    wait_readyz(addr, "ready after the index turns green", ready).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = conn
            .get("/api/users/closed/events", &[("api-key", &key)])
            .await
            .expect("events");
        if r.json()["events"].to_string().contains("red-1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the event taken while red is indexed within 60 s: {}",
            r.json()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A search server down when `sluice serve` starts: the node runs, `/readyz` is a 503 naming
/// the index, the API acknowledges, and once the server answers the indexes are created with
/// sluice's mappings (not the dynamic ones a first write would make) and what was taken is
/// indexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_server_down_at_start_is_waited_for_and_nothing_acknowledged_is_lost() {
    let proxy = FaultProxy::start(&support::opensearch().url);
    proxy.go_down();
    let index_prefix = format!("late-{}-{}", std::process::id(), support::unique());
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve_on_index(dir.path(), &proxy.url, &index_prefix);
    let key = server.first_key.clone().expect("key");
    let addr = server.addr;
    wait_readyz(
        addr,
        "readyz names the unreachable index",
        |status, body| {
            status == 503
                && body["index"] == "down"
                && body["reasons"].to_string().contains(&proxy.url)
        },
    )
    .await;
    let mut conn = Connection::connect(addr).await.expect("connect");
    post(
        &mut conn,
        &key,
        "/api/users/update",
        json!({"userId": "early", "dataFields": {"plan": "pro"}}),
    )
    .await;
    proxy.come_back();
    wait_readyz(addr, "ready once the server answers", |status, body| {
        status == 200 && body["index"] == "ok"
    })
    .await;
    profile_once(&mut conn, &key, "early", |p| {
        p["dataFields"]["plan"] == "pro"
    })
    .await;
    let mapping = opensearch(
        "GET",
        &format!("/{index_prefix}-users/_mapping"),
        Value::Null,
    )
    .await;
    assert_eq!(
        mapping[format!("{index_prefix}-users")]["mappings"]["properties"]["sluice"]["properties"]
            ["org"]["type"],
        "keyword",
        "sluice's mapping, not a dynamic one: {mapping}"
    );
}
