//! sluice on Kafka, as a user runs it: `sluice serve --log kafka://...` against a real
//! Kafka-protocol broker (tansu, started here on a free port), and independent Kafka clients
//! reading and writing the same topic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use sluice::client::Connection;
use sluice_log::kafka::testing::Tansu;

mod support;
use support::Server;

const USERS: usize = 30;
const ROUNDS: usize = 40;

async fn post(conn: &mut Connection, key: &str, path: &str, body: Value) -> Value {
    let r = conn
        .post(path, &[("api-key", key)], body.to_string().into())
        .await
        .expect("request");
    assert_eq!(r.status.as_u16(), 200, "{path}: {}", r.json());
    r.json()
}

async fn get(conn: &mut Connection, key: &str, path: &str) -> (u16, Value) {
    let r = conn.get(path, &[("api-key", key)]).await.expect("request");
    (r.status.as_u16(), r.json())
}

/// Sends ROUNDS rounds; in each, one update and one event per user, in two bulk requests.
async fn load(addr: SocketAddr, key: &str) {
    let mut conn = Connection::connect(addr).await.expect("connect");
    for round in 0..ROUNDS {
        let users: Vec<Value> = (0..USERS)
            .map(|u| json!({"userId": format!("k-{u}"), "dataFields": {"round": round, "u": u}}))
            .collect();
        post(
            &mut conn,
            key,
            "/api/users/bulkUpdate",
            json!({ "users": users }),
        )
        .await;
        let events: Vec<Value> = (0..USERS)
            .map(|u| {
                json!({"userId": format!("k-{u}"), "eventName": "tick", "id": format!("tick-{u}-{round}"),
                       "dataFields": {"round": round}})
            })
            .collect();
        post(
            &mut conn,
            key,
            "/api/events/trackBulk",
            json!({ "events": events }),
        )
        .await;
    }
}

/// Waits until every user shows its last round and all its events.
async fn wait_indexed(addr: SocketAddr, key: &str) {
    let mut conn = Connection::connect(addr).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(120);
    for u in 0..USERS {
        loop {
            let (status, profile) = get(&mut conn, key, &format!("/api/users/k-{u}")).await;
            let (_, events) = get(
                &mut conn,
                key,
                &format!("/api/users/k-{u}/events?limit=1000"),
            )
            .await;
            let count = events["events"].as_array().map_or(0, Vec::len);
            if status == 200 && profile["dataFields"]["round"] == json!(ROUNDS - 1) {
                assert!(count <= ROUNDS, "user k-{u}: {count} events, some twice");
                if count == ROUNDS {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "user k-{u} not fully indexed within 120 s: {profile} / {count} events"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Per partition: the offset `group` committed.
fn committed(brokers: &str, group: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    for p in 0..8 {
        list.add_partition("sluice.ingest", p);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    (0..8)
        .map(|p| {
            let at = match committed
                .find_partition("sluice.ingest", p)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            };
            (p, at)
        })
        .collect()
}

/// Per partition, how many records `load` wrote: the end offset (offsets start at 0 and have
/// no gaps without transactions; tansu's own high watermark lags, so it is not used).
fn loaded_per_partition() -> BTreeMap<i32, i64> {
    let mut counts: BTreeMap<i32, i64> = (0..8).map(|p| (p, 0)).collect();
    for u in 0..USERS {
        let key = format!("default:u:k-{u}");
        let partition = sluice_model::partition_for_key(key.as_bytes(), 8) as i32;
        *counts.entry(partition).or_default() += (2 * ROUNDS) as i64;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_kafka_indexes_every_acknowledged_message_and_commits_it_on_sigterm() {
    let broker = Tansu::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let url = format!("kafka://{}", broker.addr);
    let args = [
        "--log",
        url.as_str(),
        "--kafka-session-timeout",
        "6s",
        "--batch-timeout",
        "50ms",
    ];
    let mut server = Server::start(&data, &args);
    let key = server.first_key.clone().expect("first start prints a key");

    load(server.addr, &key).await;
    wait_indexed(server.addr, &key).await;

    // Graceful stop: everything processed is committed, up to the end of every partition.
    let status = server.sigterm();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        committed(&broker.addr, "sluice-pipeline"),
        loaded_per_partition(),
        "every partition committed up to its end"
    );

    // A restart resumes after the commit: the data is still there and nothing is redone.
    let server = Server::start(&data, &args);
    let mut conn = Connection::connect(server.addr).await.expect("connect");
    let (status, profile) = get(&mut conn, &key, "/api/users/k-7").await;
    assert_eq!(status, 200);
    assert_eq!(profile["dataFields"], json!({"round": ROUNDS - 1, "u": 7}));
    let (_, events) = get(&mut conn, &key, "/api/users/k-7/events?limit=1000").await;
    assert_eq!(events["events"].as_array().map_or(0, Vec::len), ROUNDS);
}

/// Runs the independent client (`tests/interop/kafka_client.py`, confluent-kafka) and returns
/// its JSON lines.
fn kafka_client(args: &[&str], stdin: &str) -> Vec<Value> {
    use std::io::Write;
    let python = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python").to_string()
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/kafka_client.py");
    let mut child = std::process::Command::new(&python)
        .arg(script)
        .args(args)
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
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("client runs");
    assert!(
        out.status.success(),
        "kafka_client.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_kafka_client_reads_what_sluice_writes_and_sluice_ingests_what_it_writes() {
    let broker = Tansu::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("kafka://{}", broker.addr);
    let server = Server::start(
        &dir.path().join("node"),
        &["--log", url.as_str(), "--batch-timeout", "50ms"],
    );
    let key = server.first_key.clone().expect("key");
    let mut conn = Connection::connect(server.addr).await.expect("connect");

    // sluice → Kafka: users by id and by email, and events.
    for i in 0..10 {
        post(
            &mut conn,
            &key,
            "/api/users/update",
            json!({"userId": format!("s-{i}"), "dataFields": {"n": i}}),
        )
        .await;
        post(
            &mut conn,
            &key,
            "/api/events/track",
            json!({"email": format!("S-{i}@Example.com"), "eventName": "open", "id": format!("open-{i}"),
                   "createdAt": 1_700_000_000_000_i64 + i, "dataFields": {"campaign": i}}),
        )
        .await;
    }
    let read = kafka_client(&["read", &broker.addr, "sluice.ingest", "20"], "");
    assert_eq!(read.len(), 20);
    for record in &read {
        let key = record["key"].as_str().expect("key");
        let value = &record["value"];
        assert_eq!(
            record["partition"].as_u64(),
            Some(u64::from(sluice_model::partition_for_key(
                key.as_bytes(),
                8
            ))),
            "{key}: Kafka's murmur2 partition"
        );
        assert_eq!(value["v"], 1);
        assert_eq!(value["org"], "default");
        assert!(
            value["receivedAt"].as_i64().is_some_and(|t| t > 0),
            "{value}"
        );
        match value["kind"].as_str() {
            Some("user_update") => {
                let id = value["userId"].as_str().expect("userId");
                assert_eq!(key, format!("default:u:{id}"));
                let i: i64 = id.trim_start_matches("s-").parse().expect("n");
                assert_eq!(value["dataFields"], json!({"n": i}));
                assert!(value["messageId"].as_str().is_some_and(|m| !m.is_empty()));
            }
            Some("event") => {
                let email = value["email"].as_str().expect("email");
                assert_eq!(key, format!("default:e:{email}"));
                assert_eq!(email, email.to_lowercase(), "emails are keyed lowercased");
                assert_eq!(value["eventName"], "open");
                let id = value["messageId"].as_str().expect("messageId");
                let i: i64 = id.trim_start_matches("open-").parse().expect("n");
                assert_eq!(value["createdAt"], json!(1_700_000_000_000_i64 + i));
                assert_eq!(value["dataFields"], json!({"campaign": i}));
            }
            other => panic!("unexpected kind {other:?}: {value}"),
        }
    }

    // Kafka → sluice: records another producer wrote in the documented format are ingested.
    let mut lines = String::new();
    for i in 0..10 {
        let update = json!({"key": format!("default:u:py-{i}"), "value": {
            "v": 1, "kind": "user_update", "org": "default", "messageId": format!("py-u-{i}"),
            "userId": format!("py-{i}"), "receivedAt": 1_700_000_000_000_i64,
            "dataFields": {"from": "python", "i": i}}});
        let event = json!({"key": format!("default:u:py-{i}"), "value": {
            "v": 1, "kind": "event", "org": "default", "messageId": format!("py-e-{i}"),
            "userId": format!("py-{i}"), "eventName": "imported", "receivedAt": 1_700_000_000_000_i64,
            "createdAt": 1_700_000_000_000_i64}});
        lines.push_str(&format!("{update}\n{event}\n"));
    }
    let produced = kafka_client(&["produce", &broker.addr, "sluice.ingest"], &lines);
    assert_eq!(produced.len(), 20);
    for record in &produced {
        let key = record["key"].as_str().expect("key");
        assert_eq!(
            record["partition"].as_u64(),
            Some(u64::from(sluice_model::partition_for_key(
                key.as_bytes(),
                8
            ))),
            "{key}: the client's murmur2 partitioner agrees with sluice's"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..10 {
        loop {
            let (status, profile) = get(&mut conn, &key, &format!("/api/users/py-{i}")).await;
            let (_, events) = get(&mut conn, &key, &format!("/api/users/py-{i}/events")).await;
            if status == 200 && events["events"].as_array().is_some_and(|e| e.len() == 1) {
                assert_eq!(profile["dataFields"], json!({"from": "python", "i": i}));
                assert_eq!(events["events"][0]["eventName"], "imported");
                break;
            }
            assert!(Instant::now() < deadline, "py-{i} not ingested within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // And what sluice wrote itself was ingested too.
    let (status, profile) = get(&mut conn, &key, "/api/users/s-3").await;
    assert_eq!((status, &profile["dataFields"]), (200, &json!({"n": 3})));
}
