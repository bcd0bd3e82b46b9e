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
