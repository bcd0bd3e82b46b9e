//! The HTTP API against a real server on port 0, with the real embedded log and registry on a
//! temp dir. Every accepted message is checked in the log itself, not just in the response.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use sluice::client::{Connection, Reply};
use sluice_api::{ApiConfig, AppState, Limits};
use sluice_log::{EmbeddedLog, EmbeddedLogConfig, Log, LogRecord};
use sluice_model::LogValue;
use sluice_registry::{Registry, SqliteRegistry};
use sluice_spill::Bridge;

struct TestServer {
    addr: std::net::SocketAddr,
    log: Arc<EmbeddedLog>,
    registry: Arc<SqliteRegistry>,
    state: AppState,
    key: String,
    _dir: tempfile::TempDir,
}

mod support;

use support::{registry_with_key, spawn_api};

/// An embedded index under `dir` (the API's read routes need one).
fn index_in(dir: &std::path::Path) -> Arc<dyn sluice_index::Index> {
    support::embedded_index(dir)
}

impl TestServer {
    async fn start(limits: Limits) -> TestServer {
        TestServer::start_with(ApiConfig {
            limits,
            ..ApiConfig::default()
        })
        .await
    }

    async fn start_with(config: ApiConfig) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let (registry, key) = registry_with_key(dir.path()).await;
        let log = Arc::new(
            EmbeddedLog::open(&dir.path().join("log"), EmbeddedLogConfig::default()).expect("log"),
        );
        let config = ApiConfig {
            key_cache_ttl: Duration::from_millis(50),
            ..config
        };
        let state = AppState::new(
            Bridge::without_spill(Arc::clone(&log) as Arc<dyn Log>, Duration::from_secs(5)),
            Arc::clone(&registry) as Arc<dyn Registry>,
            Some(index_in(dir.path())),
            &config,
        );
        let addr = spawn_api(state.clone()).await;
        TestServer {
            addr,
            log,
            registry,
            state,
            key,
            _dir: dir,
        }
    }

    async fn post(&self, path: &str, key: Option<&str>, body: impl Into<Bytes>) -> Reply {
        let mut conn = Connection::connect(self.addr).await.expect("connect");
        let headers: Vec<(&str, &str)> = key.map(|k| vec![("api-key", k)]).unwrap_or_default();
        conn.post(path, &headers, body.into())
            .await
            .expect("request")
    }

    async fn post_json(&self, path: &str, body: Value) -> Reply {
        self.post(path, Some(&self.key), body.to_string()).await
    }

    /// Every record in the log, partition by partition.
    fn records(&self) -> Vec<LogRecord> {
        (0..self.log.partitions())
            .flat_map(|p| self.log.read(p, 0, usize::MAX).expect("read"))
            .collect()
    }

    fn values(&self) -> Vec<Value> {
        self.records()
            .iter()
            .map(|r| serde_json::from_slice(&r.value).expect("record JSON"))
            .collect()
    }
}

/// The `error` text of an error body ("" if there is none, which fails the caller's check).
fn error_text(r: &Reply) -> String {
    r.json()["error"].as_str().unwrap_or_default().to_string()
}

/// The error text of failure `i` of a bulk answer.
fn failure_text(r: &Reply, i: usize) -> String {
    r.json()["failures"][i]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn small_limits() -> Limits {
    Limits {
        max_item_bytes: 256,
        max_request_bytes: 4096,
        max_request_items: 5,
    }
}

#[tokio::test]
async fn single_routes_make_the_message_durable_before_answering() {
    let s = TestServer::start(Limits::default()).await;
    let r = s
        .post_json(
            "/api/users/update",
            json!({"userId": "u1", "dataFields": {"plan": "pro"}, "mergeNestedObjects": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let body = r.json();
    assert_eq!(body["code"], "Success");
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["failed"], 0);
    assert_eq!(body["failures"], json!([]));
    let id = body["messageIds"][0].as_str().expect("an id").to_string();
    assert_eq!(
        uuid_version(&id),
        Some('7'),
        "generated ids are UUIDv7: {id}"
    );

    let r = s.post_json("/api/events/track", json!({"email": "a@b.co", "eventName": "signedUp", "id": "evt-1", "createdAt": "2024-01-01T00:00:00Z", "dataFields": {"src": "ad"}})).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["messageIds"],
        json!(["evt-1"]),
        "client ids are kept"
    );

    // Already in the log when the 200 arrived.
    let records = s.records();
    assert_eq!(records.len(), 2);
    let user = records
        .iter()
        .find(|r| &r.key[..] == b"default:u:u1")
        .expect("user record");
    let v: LogValue<'_> = serde_json::from_slice(&user.value).expect("log value");
    assert_eq!(
        (v.v, v.org.as_ref(), v.message_id.as_ref()),
        (1, "default", id.as_str())
    );
    assert!(v.merge_nested_objects);
    let event = records
        .iter()
        .find(|r| &r.key[..] == b"default:e:a@b.co")
        .expect("event record");
    let v: Value = serde_json::from_slice(&event.value).expect("json");
    assert_eq!(v["kind"], "event");
    assert_eq!(v["eventName"], "signedUp");
    assert_eq!(v["createdAt"], 1_704_067_200_000_i64);
    assert_eq!(v["dataFields"], json!({"src": "ad"}));
    assert!(v["receivedAt"].as_i64().expect("receivedAt") > 1_704_067_200_000);
    assert_eq!(
        user.partition,
        sluice_model::partition_for_key(b"default:u:u1", 8)
    );
}

fn uuid_version(id: &str) -> Option<char> {
    id.chars().nth(14)
}

#[tokio::test]
async fn bulk_routes_unbatch_and_report_invalid_items_by_index() {
    let s = TestServer::start(Limits::default()).await;
    let r = s
        .post_json(
            "/api/users/bulkUpdate",
            json!({"users": [
                {"userId": "a", "dataFields": {"x": 1}},
                {"dataFields": {"x": 2}},
                {"userId": "b", "dataFields": "nope"},
                {"email": "C@example.com", "dataFields": {"x": 3}}
            ]}),
        )
        .await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["failed"], 2);
    assert_eq!(
        body["failures"][0],
        json!({"index": 1, "error": "userId or email is required"})
    );
    assert_eq!(body["failures"][1]["index"], 2);
    assert!(
        body["failures"][1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("dataFields must be a JSON object")
    );
    assert_eq!(body["messageIds"].as_array().map(Vec::len), Some(2));

    let r = s
        .post_json(
            "/api/events/trackBulk",
            json!({"events": [
                {"userId": "a", "eventName": "e1", "id": "1"},
                {"userId": "a", "eventName": "e2", "id": "2"},
                {"userId": "a", "id": "3"}
            ]}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["failures"],
        json!([{"index": 2, "error": "eventName is required"}])
    );

    let mut keys: Vec<String> = s
        .records()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "default:e:c@example.com",
            "default:u:a",
            "default:u:a",
            "default:u:a"
        ]
    );
    // Same user, same partition, in request order.
    let a_events: Vec<Value> = s
        .values()
        .into_iter()
        .filter(|v| v["kind"] == "event")
        .collect();
    assert_eq!(
        a_events
            .iter()
            .map(|v| v["messageId"].clone())
            .collect::<Vec<_>>(),
        [json!("1"), json!("2")]
    );
}

#[tokio::test]
async fn a_request_with_no_valid_item_is_400_with_every_failure() {
    let s = TestServer::start(Limits::default()).await;
    let r = s
        .post_json(
            "/api/events/trackBulk",
            json!({"events": [{"userId": "a"}, {"eventName": "x"}]}),
        )
        .await;
    assert_eq!(r.status, 400);
    let body = r.json();
    assert_eq!(body["code"], "BadRequest");
    assert_eq!(body["failures"].as_array().map(Vec::len), Some(2));
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("item 0: eventName is required")
    );
    let r = s
        .post_json("/api/users/bulkUpdate", json!({"users": []}))
        .await;
    assert_eq!(r.status, 400);
    let r = s
        .post_json("/api/users/bulkUpdate", json!({"people": []}))
        .await;
    assert_eq!(r.status, 400);
    assert!(error_text(&r).contains("missing field `users`"));
    let r = s
        .post_json("/api/events/track", json!({"userId": "a"}))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["error"].clone()),
        (400, json!("eventName is required"))
    );
    assert!(s.records().is_empty());
}

#[tokio::test]
async fn malformed_json_is_400_with_line_and_column() {
    let s = TestServer::start(Limits::default()).await;
    let r = s
        .post(
            "/api/users/update",
            Some(&s.key),
            "{\"userId\": \"a\",\n  \"dataFields\": {\"x\": }\n}",
        )
        .await;
    assert_eq!(r.status, 400);
    let body = r.json();
    assert_eq!(body["code"], "BadJson");
    assert_eq!(
        body["error"],
        "malformed JSON at line 2 column 23: expected value"
    );
    let r = s
        .post("/api/events/trackBulk", Some(&s.key), "{\"events\": [")
        .await;
    assert_eq!(r.status, 400);
    assert!(
        error_text(&r).starts_with("malformed JSON at line 1 column 12"),
        "{:?}",
        r.json()
    );
}

#[tokio::test]
async fn auth_failures_are_401() {
    let s = TestServer::start(Limits::default()).await;
    let body = json!({"userId": "a", "dataFields": {}}).to_string();
    let r = s.post("/api/users/update", None, body.clone()).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], "Unauthorized");
    assert!(error_text(&r).contains("missing API key"));
    let r = s
        .post("/api/users/update", Some("sk_not_a_key"), body.clone())
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["error"].clone()),
        (401, json!("unknown API key"))
    );

    let mut conn = Connection::connect(s.addr).await.expect("connect");
    let bearer = format!("Bearer {}", s.key);
    let r = conn
        .post(
            "/api/users/update",
            &[("authorization", &bearer)],
            body.clone().into(),
        )
        .await
        .expect("request");
    assert_eq!(r.status, 200, "Bearer works");
    let basic = "Basic c2tfYWJjOg==";
    let r = conn
        .post(
            "/api/users/update",
            &[("authorization", basic)],
            body.clone().into(),
        )
        .await
        .expect("request");
    assert_eq!(r.status, 401, "Basic is only for Segment routes");

    s.registry
        .set_org_active("default", false)
        .await
        .expect("disable");
    tokio::time::sleep(Duration::from_millis(120)).await; // past the key cache TTL
    let r = s.post("/api/users/update", Some(&s.key), body).await;
    assert_eq!(r.status, 401);
    assert!(error_text(&r).contains("disabled"));
    assert_eq!(s.records().len(), 1);
}

#[tokio::test]
async fn keys_only_write_their_own_org() {
    let s = TestServer::start(Limits::default()).await;
    s.registry.create_org("acme").await.expect("org");
    s.registry.create_org("globex").await.expect("org");
    let acme = s.registry.create_key("acme").await.expect("key");
    let globex = s.registry.create_key("globex").await.expect("key");
    // A client cannot pick its org: an "org" field in the body is ignored.
    for (key, user) in [(&acme, "same-user"), (&globex, "same-user")] {
        let r = s
            .post(
                "/api/users/update",
                Some(key),
                json!({"userId": user, "org": "default", "dataFields": {}}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let mut seen: Vec<(String, String)> = s
        .values()
        .iter()
        .map(|v| {
            (
                v["org"].as_str().unwrap_or("").to_string(),
                v["userId"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("acme".into(), "same-user".into()),
            ("globex".into(), "same-user".into())
        ]
    );
    let keys: Vec<_> = s
        .records()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    assert!(
        keys.contains(&"acme:u:same-user".to_string())
            && keys.contains(&"globex:u:same-user".to_string())
    );
    s.registry
        .set_org_active("acme", false)
        .await
        .expect("disable");
    tokio::time::sleep(Duration::from_millis(120)).await;
    let ok = s
        .post(
            "/api/users/update",
            Some(&globex),
            json!({"userId": "x", "dataFields": {}}).to_string(),
        )
        .await;
    assert_eq!(ok.status, 200, "disabling one org leaves the other alone");
}

#[tokio::test]
async fn size_limits_are_413_and_oversized_bulk_items_are_failures() {
    let s = TestServer::start(small_limits()).await;
    let big = "x".repeat(5000);
    let r = s
        .post_json(
            "/api/users/update",
            json!({"userId": "a", "dataFields": {"big": big}}),
        )
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["code"], "TooLarge");
    assert!(error_text(&r).contains("limit is 4096 bytes"));

    let item = "y".repeat(300);
    let r = s
        .post_json(
            "/api/events/track",
            json!({"userId": "a", "eventName": "e", "dataFields": {"y": item}}),
        )
        .await;
    assert_eq!(r.status, 413, "one item over max_item_bytes");

    let r = s
        .post_json(
            "/api/events/trackBulk",
            json!({"events": [{"userId": "a", "eventName": "ok"}, {"userId": "a", "eventName": "e", "dataFields": {"y": item}}]}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["failures"][0]["index"], 1);
    assert!(failure_text(&r, 0).contains("limit is 256 bytes"));

    let six: Vec<Value> = (0..6)
        .map(|i| json!({"userId": i.to_string(), "eventName": "e"}))
        .collect();
    let r = s
        .post_json("/api/events/trackBulk", json!({"events": six}))
        .await;
    assert_eq!(r.status, 413);
    assert!(error_text(&r).contains("6 items; the limit is 5"));

    // A chunked body (no Content-Length) streamed past the limit is cut off too.
    let payload = hyper_body_over_limit();
    let stream = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let request = format!(
        "POST /api/users/update HTTP/1.1\r\nhost: x\r\napi-key: {}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        s.key,
        payload.len(),
        String::from_utf8_lossy(&payload)
    );
    let raw = raw_exchange(stream, request).await;
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    assert!(raw.contains("larger than the 4096-byte limit"), "{raw}");
    assert_eq!(s.records().len(), 1);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

/// HTTP's `deflate` is the zlib format.
fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("deflate");
    encoder.finish().expect("deflate")
}

#[tokio::test]
async fn gzip_and_deflate_bodies_are_decoded_and_limited_by_their_decoded_size() {
    let s = TestServer::start(Limits::default()).await;
    let mut conn = Connection::connect(s.addr).await.expect("connect");
    let events: Vec<Value> = (0..1000)
        .map(
            |i| json!({"userId": format!("z{}", i % 7), "eventName": "e", "id": format!("gz-{i}")}),
        )
        .collect();
    let plain = serde_json::to_vec(&json!({ "events": events })).expect("json");
    for (encoding, body) in [
        ("gzip", gzip(&plain)),
        ("deflate", deflate(&plain)),
        ("GZIP", gzip(&plain)),
    ] {
        assert!(body.len() < plain.len() / 4, "{encoding} compresses");
        let r = conn
            .post(
                "/api/events/trackBulk",
                &[("api-key", s.key.as_str()), ("content-encoding", encoding)],
                body.into(),
            )
            .await
            .expect("request");
        assert_eq!(r.status, 200, "{encoding}: {:?}", r.json());
        assert_eq!(r.json()["accepted"], 1000, "{encoding}");
    }
    // Three times the same 1,000 ids, each decoded as sent.
    let values = s.values();
    assert_eq!(values.len(), 3000);
    assert_eq!(
        values[0]["messageId"]
            .as_str()
            .map(|id| id.starts_with("gz-")),
        Some(true)
    );

    // A bomb: 200 MiB of zeros in about 200 KB of gzip, against the 10 MiB limit.
    let bomb = {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![b' '; 1 << 20];
        for _ in 0..200 {
            encoder.write_all(&zeros).expect("gzip");
        }
        encoder.finish().expect("gzip")
    };
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    let r = conn
        .post(
            "/api/events/trackBulk",
            &[("api-key", s.key.as_str()), ("content-encoding", "gzip")],
            bomb.into(),
        )
        .await
        .expect("request");
    assert_eq!(r.status, 413, "{:?}", r.json());
    assert_eq!(r.json()["code"], "TooLarge");
    assert!(
        error_text(&r).contains("10485760-byte limit"),
        "{}",
        error_text(&r)
    );

    // A broken stream: 400 with the decoder's words.
    let mut broken = gzip(&plain);
    let middle = broken.len() / 2;
    broken[middle..middle + 16].fill(0xff);
    let mut conn = Connection::connect(s.addr).await.expect("connect");
    let r = conn
        .post(
            "/api/users/bulkUpdate",
            &[("api-key", s.key.as_str()), ("content-encoding", "gzip")],
            broken.into(),
        )
        .await
        .expect("request");
    assert_eq!(r.status, 400, "{:?}", r.json());
    assert!(
        error_text(&r).contains("could not read the request body"),
        "{}",
        error_text(&r)
    );
    let r = conn
        .post(
            "/api/events/track",
            &[("api-key", s.key.as_str()), ("content-encoding", "deflate")],
            Bytes::from_static(b"not deflate at all"),
        )
        .await
        .expect("request");
    assert_eq!(r.status, 400, "{:?}", r.json());

    // An encoding sluice cannot decode: 415 naming it.
    let r = conn
        .post(
            "/api/events/track",
            &[("api-key", s.key.as_str()), ("content-encoding", "br")],
            Bytes::from_static(b"{}"),
        )
        .await
        .expect("request");
    assert_eq!(r.status, 415);
    assert_eq!(r.json()["code"], "UnsupportedEncoding");
    assert!(error_text(&r).contains("\"br\""), "{}", error_text(&r));
    // Segment and SendGrid routes decode too.
    let call =
        serde_json::to_vec(&json!({"userId": "seg", "event": "Signed Up", "messageId": "gz-seg"}))
            .expect("json");
    let r = conn
        .post(
            "/v1/track",
            &[("api-key", s.key.as_str()), ("content-encoding", "gzip")],
            gzip(&call).into(),
        )
        .await
        .expect("request");
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(s.values().len(), 3001);
}

/// What a Python HTTP client (`urllib` or `requests`) got for a body of `bytes` bytes sent
/// whole before reading the answer.
fn python_post(client: &str, url: &str, key: &str, bytes: usize, encoding: Option<&str>) -> Value {
    let python = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python").to_string()
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/early_error.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .args([client, url, key, &bytes.to_string()])
        .args(encoding)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (./scripts/test makes .venv): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_reaches_clients_that_send_the_whole_body_before_reading() {
    let s = TestServer::start(Limits::default()).await;
    let url = format!("http://{}/api/events/trackBulk", s.addr);
    let key = s.key.clone();
    let answers = tokio::task::spawn_blocking(move || {
        let mut answers = Vec::new();
        for client in ["urllib", "requests"] {
            // Declared too large (refused before reading), and a br body (refused likewise).
            answers.push((client, 413, python_post(client, &url, &key, 20 << 20, None)));
            answers.push((
                client,
                415,
                python_post(client, &url, &key, 2 << 20, Some("br")),
            ));
        }
        answers
    })
    .await
    .expect("clients");
    for (client, status, answer) in answers {
        assert_eq!(answer["status"], status, "{client}: {answer}");
        assert!(answer["body"]["error"].is_string(), "{client}: {answer}");
    }
    assert!(s.records().is_empty());
}

fn events(from: usize, count: usize) -> Value {
    let events: Vec<Value> = (from..from + count)
        .map(
            |i| json!({"userId": format!("r{}", i % 5), "eventName": "e", "id": format!("rl-{i}")}),
        )
        .collect();
    json!({ "events": events })
}

#[tokio::test]
async fn an_org_over_its_rate_limit_gets_429_and_nothing_of_the_request_is_written() {
    let s = TestServer::start(Limits::default()).await;
    let limit = sluice_registry::RateLimit {
        per_second: 100,
        burst: 100,
    };
    s.registry
        .set_org_limit("default", Some(limit))
        .await
        .expect("limit");
    let r = s.post_json("/api/events/trackBulk", events(0, 80)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    // 80 more right away: over the bucket; refused whole, with when to retry.
    let r = s.post_json("/api/events/trackBulk", events(80, 80)).await;
    assert_eq!(r.status, 429, "{:?}", r.json());
    assert_eq!(r.json()["code"], "RateLimited");
    assert!(
        error_text(&r).contains("100 messages per second"),
        "{}",
        error_text(&r)
    );
    let retry_after: u64 = r.headers["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(s.records().len(), 80, "nothing of the refused request");
    // More than the burst can ever admit at once: a 413 that says so.
    let r = s.post_json("/api/events/trackBulk", events(200, 150)).await;
    assert_eq!(r.status, 413, "{:?}", r.json());
    assert!(
        error_text(&r).contains("burst of 100"),
        "{}",
        error_text(&r)
    );
    // After Retry-After the same request goes through.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let r = s.post_json("/api/events/trackBulk", events(80, 80)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(s.records().len(), 160);

    // The limit is kept per API node: a second node on the same registry and log admits its
    // own bucket's worth.
    let second = AppState::new(
        Bridge::without_spill(Arc::clone(&s.log) as Arc<dyn Log>, Duration::from_secs(5)),
        Arc::clone(&s.registry) as Arc<dyn Registry>,
        None,
        &ApiConfig::default(),
    );
    let addr = spawn_api(second).await;
    let mut conn = Connection::connect(addr).await.expect("connect");
    let r = conn
        .post(
            "/api/events/trackBulk",
            &[("api-key", s.key.as_str())],
            events(300, 90).to_string().into(),
        )
        .await
        .expect("post");
    assert_eq!(r.status, 200, "{:?}", r.json());
    // Cleared: the server's default (here unlimited) applies again.
    s.registry
        .set_org_limit("default", None)
        .await
        .expect("clear");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = s.post_json("/api/events/trackBulk", events(400, 500)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
}

#[tokio::test]
async fn org_events_per_second_limits_orgs_without_a_limit_of_their_own() {
    let s = TestServer::start_with(ApiConfig {
        org_events_per_second: 50,
        ..ApiConfig::default()
    })
    .await;
    let r = s.post_json("/api/events/trackBulk", events(0, 50)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    // The bucket is empty; 50 more events need a second of refill (a request is admitted all
    // or nothing), so a slow machine between the two requests does not let them through.
    let r = s.post_json("/api/events/trackBulk", events(50, 50)).await;
    assert_eq!(r.status, 429, "{:?}", r.json());
    assert!(r.headers.contains_key("retry-after"));
}

/// A browser's preflight of `method path` from `origin`.
async fn preflight(addr: std::net::SocketAddr, path: &str, origin: &str) -> Reply {
    let mut conn = Connection::connect(addr).await.expect("connect");
    conn.send(
        axum::http::Method::OPTIONS,
        path,
        &[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "content-type,authorization,api-key,anonymousid,sentat",
            ),
        ],
        Bytes::new(),
    )
    .await
    .expect("preflight")
}

fn allow_origin(reply: &Reply) -> Option<&str> {
    reply
        .headers
        .get("access-control-allow-origin")
        .and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn browsers_may_call_the_write_routes_and_reads_only_with_cors_read() {
    // The default: any origin, writes only.
    let s = TestServer::start(Limits::default()).await;
    for path in ["/api/events/track", "/v1/track", "/api/users/bulkUpdate"] {
        let r = preflight(s.addr, path, "https://shop.example").await;
        assert!(r.status.is_success(), "{path}: {}", r.status);
        assert_eq!(allow_origin(&r), Some("*"), "{path}");
        let allowed = r.headers["access-control-allow-headers"]
            .to_str()
            .expect("text")
            .to_ascii_lowercase();
        // The SDKs' own headers too (RudderStack's analytics.js sends these two).
        for name in [
            "content-type",
            "authorization",
            "api-key",
            "anonymousid",
            "sentat",
        ] {
            assert!(allowed.contains(name), "{path}: {allowed}");
        }
    }
    let mut conn = Connection::connect(s.addr).await.expect("connect");
    let r = conn
        .post(
            "/api/events/track",
            &[
                ("api-key", s.key.as_str()),
                ("origin", "https://shop.example"),
            ],
            Bytes::from(json!({"userId": "b1", "eventName": "e"}).to_string()),
        )
        .await
        .expect("post");
    assert_eq!(r.status, 200);
    assert_eq!(allow_origin(&r), Some("*"));
    // Reads are not offered cross-origin by default.
    let r = preflight(s.addr, "/api/search/users", "https://shop.example").await;
    assert_eq!(allow_origin(&r), None, "{}", r.status);
    assert_eq!(r.status, 403);
    assert!(error_text(&r).contains("cors_read"), "{}", error_text(&r));
    let r = conn
        .get(
            "/api/users/b1",
            &[
                ("api-key", s.key.as_str()),
                ("origin", "https://shop.example"),
            ],
        )
        .await
        .expect("get");
    assert_eq!(allow_origin(&r), None);

    // Listed origins, reads included: an origin not listed gets a 403 and no CORS header.
    let s = TestServer::start_with(ApiConfig {
        cors: sluice_api::CorsConfig {
            origins: vec![
                "https://shop.example".into(),
                "http://127.0.0.1:9000".into(),
            ],
            read: true,
        },
        ..ApiConfig::default()
    })
    .await;
    let r = preflight(s.addr, "/api/events/track", "https://shop.example").await;
    assert!(r.status.is_success());
    assert_eq!(allow_origin(&r), Some("https://shop.example"));
    let r = preflight(s.addr, "/api/search/users", "http://127.0.0.1:9000").await;
    assert_eq!(
        allow_origin(&r),
        Some("http://127.0.0.1:9000"),
        "reads with cors_read"
    );
    let r = preflight(s.addr, "/api/events/track", "https://evil.example").await;
    assert_eq!(r.status, 403);
    assert_eq!(allow_origin(&r), None);
    assert_eq!(r.json()["code"], "Forbidden");
    assert!(
        error_text(&r).contains("https://evil.example"),
        "{}",
        error_text(&r)
    );
}

fn hyper_body_over_limit() -> Bytes {
    Bytes::from(format!(
        "{{\"userId\":\"a\",\"dataFields\":{{\"p\":\"{}\"}}}}",
        "z".repeat(8000)
    ))
}

#[tokio::test]
async fn segment_routes_map_calls_and_accept_basic_and_write_key() {
    let s = TestServer::start(Limits::default()).await;
    let mut conn = Connection::connect(s.addr).await.expect("connect");
    let basic = format!("Basic {}", base64(&format!("{}:", s.key)));
    let calls = [
        (
            "/v1/identify",
            json!({"userId": "u1", "traits": {"name": "Ann"}, "messageId": "s1"}),
        ),
        (
            "/v1/track",
            json!({"anonymousId": "anon", "event": "Clicked", "properties": {"b": 1}, "messageId": "s2"}),
        ),
        (
            "/v1/page",
            json!({"userId": "u1", "name": "Home", "messageId": "s3"}),
        ),
        (
            "/v1/screen",
            json!({"userId": "u1", "name": "Main", "messageId": "s4"}),
        ),
        (
            "/v1/group",
            json!({"userId": "u1", "groupId": "g", "messageId": "s5"}),
        ),
        (
            "/v1/alias",
            json!({"userId": "u1", "previousId": "old", "messageId": "s6"}),
        ),
    ];
    for (path, body) in calls {
        let r = conn
            .post(path, &[("authorization", &basic)], body.to_string().into())
            .await
            .expect("request");
        assert_eq!(r.status, 200, "{path}: {:?}", r.json());
    }
    let batch = json!({"writeKey": s.key, "batch": [
        {"type": "track", "userId": "u2", "event": "Bought", "messageId": "s7"},
        {"type": "dance", "userId": "u2"}
    ]});
    let r = s.post("/v1/batch", None, batch.to_string()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["failed"], 1);
    let r = s
        .post(
            "/v1/track",
            None,
            json!({"userId": "x", "event": "e"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 401);

    let values = s.values();
    let by_id = |id: &str| {
        values
            .iter()
            .find(|v| v["messageId"] == id)
            .cloned()
            .expect(id)
    };
    assert_eq!(by_id("s1")["kind"], "user_update");
    assert_eq!(by_id("s1")["dataFields"], json!({"name": "Ann"}));
    assert_eq!(by_id("s2")["userId"], "anon");
    assert_eq!(by_id("s2")["eventName"], "Clicked");
    for (id, name) in [
        ("s3", "page"),
        ("s4", "screen"),
        ("s5", "group"),
        ("s6", "alias"),
    ] {
        assert_eq!(by_id(id)["eventName"], name);
    }
    assert_eq!(by_id("s7")["eventName"], "Bought");
}

#[tokio::test]
async fn segment_fidelity_short_paths_kept_fields_skew_and_sdk_error_bodies() {
    let s = TestServer::start(Limits::default()).await;
    let mut conn = Connection::connect(s.addr).await.expect("connect");
    let basic = format!("Basic {}", base64(&format!("{}:", s.key)));
    // analytics.js: one-letter paths, text/plain, Basic auth and writeKey both.
    let calls = [
        (
            "/v1/i",
            json!({"userId": "u1", "traits": {"email": "Ann@Example.com", "plan": "pro"}, "messageId": "f1"}),
        ),
        (
            "/v1/t",
            json!({"userId": "u1", "event": "Clicked", "messageId": "f2",
            "context": {"page": {"url": "https://shop.example/"}}, "integrations": {"All": true},
            "timestamp": "2024-01-01T00:00:05.000Z", "sentAt": "2024-01-01T00:00:15.000Z"}),
        ),
        (
            "/v1/p",
            json!({"userId": "u1", "name": "Home", "messageId": "f3"}),
        ),
        (
            "/v1/s",
            json!({"userId": "u1", "name": "Main", "messageId": "f4"}),
        ),
        (
            "/v1/g",
            json!({"userId": "u1", "groupId": "g", "messageId": "f5"}),
        ),
        (
            "/v1/a",
            json!({"userId": "u1", "previousId": "old", "messageId": "f6"}),
        ),
        (
            "/v1/b",
            json!({"writeKey": s.key, "sentAt": "2024-01-01T00:00:15.000Z", "batch": [
            {"type": "track", "userId": "u2", "event": "Bought", "messageId": "f7",
             "originalTimestamp": "2024-01-01T00:00:05.000Z"}]}),
        ),
    ];
    for (path, mut body) in calls {
        body["writeKey"] = json!(s.key);
        let r = conn
            .post(
                path,
                &[("authorization", &basic), ("content-type", "text/plain")],
                body.to_string().into(),
            )
            .await
            .expect("request");
        assert_eq!(r.status, 200, "{path}: {:?}", r.json());
    }
    let values = s.values();
    let by_id = |id: &str| {
        values
            .iter()
            .find(|v| v["messageId"] == id)
            .cloned()
            .expect(id)
    };
    assert_eq!(by_id("f1")["kind"], "user_update");
    assert_eq!(
        by_id("f1")["email"],
        "ann@example.com",
        "traits.email is the profile's email"
    );
    assert_eq!(
        by_id("f1")["userId"],
        "u1",
        "the user stays keyed by userId"
    );
    let f2 = by_id("f2");
    assert_eq!(
        f2["segment"],
        json!({"context": {"page": {"url": "https://shop.example/"}}, "integrations": {"All": true},
            "timestamp": "2024-01-01T00:00:05.000Z", "sentAt": "2024-01-01T00:00:15.000Z"})
    );
    // The client's clock ran ahead by (sentAt - receivedAt): createdAt moves back by as much.
    let t = 1_704_067_205_000_i64;
    let sent = 1_704_067_215_000_i64;
    let received = f2["receivedAt"].as_i64().expect("receivedAt");
    assert_eq!(f2["createdAt"].as_i64(), Some(t + received - sent));
    let f7 = by_id("f7");
    let received = f7["receivedAt"].as_i64().expect("receivedAt");
    assert_eq!(
        f7["createdAt"].as_i64(),
        Some(t + received - sent),
        "the batch's sentAt corrects its calls; originalTimestamp stands in for timestamp"
    );
    for (id, name) in [
        ("f3", "page"),
        ("f4", "screen"),
        ("f5", "group"),
        ("f6", "alias"),
    ] {
        assert_eq!(by_id(id)["eventName"], name);
    }

    // Errors under /v1/ carry `message` and `success: false`, which the SDKs read.
    let cases = [
        (
            "/v1/track",
            None,
            json!({"userId": "x", "event": "e"}).to_string(),
            401,
        ),
        (
            "/v1/t",
            Some(s.key.as_str()),
            json!({"userId": "x"}).to_string(),
            400,
        ),
        (
            "/v1/batch",
            Some(s.key.as_str()),
            "{not json".to_string(),
            400,
        ),
        ("/v1/nothing", Some(s.key.as_str()), "{}".to_string(), 404),
    ];
    for (path, key, body, status) in cases {
        let r = s.post(path, key, body).await;
        assert_eq!(r.status, status, "{path}");
        let json = r.json();
        assert!(!error_text(&r).is_empty(), "{path}: {json}");
        assert_eq!(json["message"], json["error"], "{path}: {json}");
        assert_eq!(json["success"], false, "{path}: {json}");
    }
    let r = s
        .post(
            "/api/events/track",
            None,
            json!({"userId": "x"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json().get("message"),
        None,
        "only /v1/ answers carry SDK fields"
    );
}

fn base64(input: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = input.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn health_and_readiness() {
    let s = TestServer::start(Limits::default()).await;
    let mut conn = Connection::connect(s.addr).await.expect("connect");
    assert_eq!(
        conn.get("/healthz", &[]).await.expect("healthz").status,
        200
    );
    assert_eq!(conn.get("/readyz", &[]).await.expect("readyz").status, 200);
    s.state.operations().start_draining();
    let r = conn.get("/readyz", &[]).await.expect("readyz");
    assert_eq!(r.status, 503);
    assert!(
        r.json()["reasons"][0]
            .as_str()
            .expect("text")
            .contains("draining")
    );
    assert_eq!(
        conn.get("/healthz", &[]).await.expect("healthz").status,
        200,
        "alive while draining"
    );
    assert!(r.json()["pipeline"].is_null(), "{:?}", r.json());
    s.state
        .operations()
        .pipeline_failed("partition 3, offsets 10..=19: a stage panicked: boom".into());
    let r = conn.get("/readyz", &[]).await.expect("readyz");
    assert_eq!(r.status, 503);
    let body = r.json();
    assert_eq!(body["pipeline"]["status"], "failed");
    assert!(
        body["pipeline"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("partition 3, offsets 10..=19")),
        "{body}"
    );
    assert!(
        body["reasons"][0]
            .as_str()
            .is_some_and(|r| r.starts_with("the pipeline stopped on an unexpected error")),
        "{body}"
    );
}

#[tokio::test]
async fn an_admin_token_guards_metrics_and_leaves_the_probes_open() {
    let s = TestServer::start(Limits::default()).await;
    let mut conn = Connection::connect(s.addr).await.expect("connect");
    assert_eq!(
        conn.get("/metrics", &[]).await.expect("metrics").status,
        200
    );
    s.state.operations().require_token("t0ken-of-the-admin");
    let refused = conn.get("/metrics", &[]).await.expect("metrics");
    assert_eq!(refused.status, 401);
    assert!(
        refused.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("Authorization: Bearer")),
        "{:?}",
        refused.json()
    );
    for wrong in [
        "Bearer t0ken",
        "Bearer t0ken-of-the-admin2",
        "t0ken-of-the-admin",
    ] {
        let r = conn
            .get("/metrics", &[("authorization", wrong)])
            .await
            .expect("metrics");
        assert_eq!(r.status, 401, "{wrong}");
    }
    let r = conn
        .get(
            "/metrics",
            &[("authorization", "Bearer t0ken-of-the-admin")],
        )
        .await
        .expect("metrics");
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("sluice_spill_mode"));
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(
            conn.get(probe, &[]).await.expect("probe").status,
            200,
            "{probe}"
        );
    }
}

#[tokio::test]
async fn a_log_that_cannot_make_data_durable_gives_503_with_retry_after() {
    let s = TestServer::start(Limits::default()).await;
    s.log.close().await.expect("close");
    let r = s
        .post_json(
            "/api/events/track",
            json!({"userId": "a", "eventName": "e"}),
        )
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["code"], "Unavailable");
    assert!(error_text(&r).contains("could not be made durable"));
    let mut conn = Connection::connect(s.addr).await.expect("connect");
    assert_eq!(conn.get("/readyz", &[]).await.expect("readyz").status, 503);
}

#[tokio::test]
async fn retry_after_header_is_set_on_503() {
    let s = TestServer::start(Limits::default()).await;
    s.log.close().await.expect("close");
    let stream = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let body = json!({"userId": "a", "eventName": "e"}).to_string();
    let request = format!(
        "POST /api/events/track HTTP/1.1\r\nhost: x\r\napi-key: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        s.key,
        body.len(),
        body
    );
    let raw = raw_exchange(stream, request).await;
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("retry-after: 1"), "{raw}");
}

async fn raw_exchange(mut stream: tokio::net::TcpStream, request: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// A log that never acknowledges: the API must give up after `log_ack_timeout`.
struct StalledLog;

#[async_trait::async_trait]
impl Log for StalledLog {
    fn partitions(&self) -> u32 {
        1
    }
    async fn append(
        &self,
        _records: Vec<sluice_log::Record>,
    ) -> Result<Vec<sluice_log::Ack>, sluice_log::LogError> {
        std::future::pending().await
    }
    async fn subscribe(
        &self,
        group: &str,
    ) -> Result<Box<dyn sluice_log::Subscription>, sluice_log::LogError> {
        Err(sluice_log::LogError::GroupBusy(group.to_string()))
    }
    fn is_healthy(&self) -> bool {
        true
    }
    async fn close(&self) -> Result<(), sluice_log::LogError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_log_that_does_not_acknowledge_in_time_gives_503() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (registry, key) = registry_with_key(dir.path()).await;
    let addr = spawn_api(AppState::new(
        Bridge::without_spill(Arc::new(StalledLog), Duration::from_millis(200)),
        registry,
        Some(index_in(dir.path())),
        &ApiConfig::default(),
    ))
    .await;
    let mut conn = Connection::connect(addr).await.expect("connect");
    let started = std::time::Instant::now();
    let r = conn
        .post(
            "/api/events/track",
            &[("api-key", &key)],
            json!({"userId": "a", "eventName": "e"}).to_string().into(),
        )
        .await
        .expect("request");
    assert_eq!(r.status, 503);
    assert!(
        error_text(&r).contains("did not acknowledge within 200ms"),
        "{:?}",
        r.json()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answers at the timeout, not later"
    );
}

#[tokio::test]
async fn a_closed_log_spills_answers_200_and_readyz_shows_spill_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (registry, key) = registry_with_key(dir.path()).await;
    let log = Arc::new(
        EmbeddedLog::open(&dir.path().join("log"), EmbeddedLogConfig::default()).expect("log"),
    );
    log.close().await.expect("close");
    let bridge = Bridge::open(
        Arc::clone(&log) as Arc<dyn Log>,
        &dir.path().join("spill"),
        sluice_spill::BridgeConfig::default(),
    )
    .expect("bridge");
    let addr = spawn_api(AppState::new(
        bridge.clone(),
        registry,
        Some(index_in(dir.path())),
        &ApiConfig::default(),
    ))
    .await;
    let mut conn = Connection::connect(addr).await.expect("connect");
    for body in [
        json!({"userId": "a", "eventName": "e"}),
        json!({"userId": "a", "dataFields": {"x": 1}}),
    ] {
        let path = if body.get("eventName").is_some() {
            "/api/events/track"
        } else {
            "/api/users/update"
        };
        let r = conn
            .post(path, &[("api-key", &key)], body.to_string().into())
            .await
            .expect("request");
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    let status = bridge.status();
    assert!(status.spilling, "{status:?}");
    assert_eq!(status.records, 2);
    let r = conn.get("/readyz", &[]).await.expect("readyz");
    assert_eq!(r.status, 200, "spill available means ready: {:?}", r.json());
    assert_eq!(r.json()["log"], "spilling");
    assert_eq!(r.json()["spill"]["records"], 2);
    let r = conn.get("/metrics", &[]).await.expect("metrics");
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    for line in [
        "sluice_spill_mode 1",
        "sluice_spill_records 2",
        "sluice_spilled_records_total 2",
        "sluice_log_healthy 0",
        "# TYPE sluice_spilled_records_total counter",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
    }
}

/// Request bodies in flight are bounded: a request beyond the bound waits for room (and is
/// handled once there is), or gets a 503 when none comes free in time.
#[tokio::test]
async fn requests_beyond_the_in_flight_bound_wait_for_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (registry, key) = registry_with_key(dir.path()).await;
    let start = |wait| {
        let registry = Arc::clone(&registry);
        let index = index_in(&dir.path().join(format!("{wait:?}")));
        async move {
            spawn_api(AppState::new(
                Bridge::without_spill(Arc::new(StalledLog), Duration::from_millis(500)),
                registry,
                Some(index),
                &ApiConfig {
                    max_in_flight_bytes: 1024,
                    in_flight_wait: wait,
                    ..ApiConfig::default()
                },
            ))
            .await
        }
    };
    // 600 bytes each: two do not fit in 1 KiB at once.
    let body = json!({"userId": "a", "eventName": "e", "dataFields": {"pad": "x".repeat(540)}})
        .to_string();
    assert!(body.len() > 512 && body.len() < 1024, "{}", body.len());
    for (wait, waits_for_room) in [
        (Duration::from_secs(3), true),
        (Duration::from_millis(100), false),
    ] {
        let addr = start(wait).await;
        let post = |delay| {
            let (key, body) = (key.clone(), body.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut conn = Connection::connect(addr).await.expect("connect");
                let started = std::time::Instant::now();
                let r = conn
                    .post("/api/events/track", &[("api-key", &key)], body.into())
                    .await
                    .expect("request");
                (r, started.elapsed())
            })
        };
        let first = post(Duration::ZERO);
        let second = post(Duration::from_millis(50));
        let (first, _) = first.await.expect("first");
        let (second, took) = second.await.expect("second");
        // The stalled log answers both that reach it with "did not acknowledge".
        assert!(
            error_text(&first).contains("did not acknowledge"),
            "{:?}",
            first.json()
        );
        if waits_for_room {
            assert!(
                error_text(&second).contains("did not acknowledge"),
                "{:?}",
                second.json()
            );
            assert!(
                took >= Duration::from_millis(800),
                "waited for the first: {took:?}"
            );
        } else {
            assert_eq!(second.status, 503);
            assert!(
                error_text(&second).contains("in flight"),
                "{:?}",
                second.json()
            );
            assert!(took < Duration::from_millis(400), "{took:?}");
        }
    }
}

/// A read has no body: it takes the least room, and is not held up by the bodies in flight.
#[tokio::test]
async fn a_request_without_a_body_takes_the_least_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (registry, key) = registry_with_key(dir.path()).await;
    let addr = spawn_api(AppState::new(
        Bridge::without_spill(Arc::new(StalledLog), Duration::from_secs(2)),
        registry,
        Some(index_in(dir.path())),
        &ApiConfig {
            max_in_flight_bytes: 2048,
            in_flight_wait: Duration::from_millis(300),
            ..ApiConfig::default()
        },
    ))
    .await;
    // Holds 1 of the 2 KiB for 2 s (the log never answers).
    let writer = {
        let key = key.clone();
        tokio::spawn(async move {
            let mut conn = Connection::connect(addr).await.expect("connect");
            conn.post(
                "/api/events/track",
                &[("api-key", &key)],
                json!({"userId": "a", "eventName": "e"}).to_string().into(),
            )
            .await
            .expect("request")
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut conn = Connection::connect(addr).await.expect("connect");
    let read = conn
        .get("/api/users/nobody", &[("api-key", &key)])
        .await
        .expect("read");
    assert_eq!(read.status, 404, "{:?}", read.json());
    assert_eq!(writer.await.expect("writer").status, 503);
}
