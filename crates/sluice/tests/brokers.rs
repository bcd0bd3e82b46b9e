//! Broker failures on a real three-broker Apache Kafka 4.1 cluster (KRaft), with sluice's
//! production defaults (replication factor 3, `min.insync.replicas` 2, `acks=all`), under API
//! load from well-behaved producers:
//! 1. the broker leading partition 0 is SIGKILLed: no request fails (no 5xx), the pipeline goes
//!    on, and the broker is started again;
//! 2. two brokers are SIGKILLed: appends cannot be acknowledged by 2 replicas, so the API
//!    spills to its local buffer and keeps answering 200; when they return, it replays.
//!
//! Afterwards every acknowledged message is in the topic, the first copy of each user's in
//! acknowledgement order, and the index matches the topic once in effect. (A produce that timed
//! out into the spill buffer may still land later beside its replayed copy; both keep the
//! message id and the pipeline's dedup drops the second.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_log::kafka::testing::read_topic;
use sluice_testkit::Kafka;

mod support;
use support::Server;

/// Polls `/readyz` until its `spill` object says `what` (a JSON field test), or panics.
async fn wait_readyz(addr: std::net::SocketAddr, what: &str, test: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut conn = sluice::client::Connection::connect(addr)
            .await
            .expect("connect");
        let r = conn.get("/readyz", &[]).await.expect("readyz");
        let body = r.json();
        if test(&body) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} within 60 s: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_costs_no_request_and_two_lost_brokers_spill_and_replay_in_order() {
    let cluster = Kafka::start(3, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let log = format!("kafka://{}", cluster.bootstrap);
    let mut server = Server::start(
        &data,
        &[
            "--log",
            &log,
            "--log-ack-timeout",
            "2s",
            "--kafka-session-timeout",
            "6s",
            "--batch-timeout",
            "50ms",
        ],
    );
    let key = server.first_key.clone().expect("key");
    let addr = server.addr;
    let until = Instant::now() + Duration::from_secs(40);
    let clients = support::retrying_clients(addr, &key, 6, until);

    // 1. The leader of partition 0 dies.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let leader = cluster
        .leader("sluice.ingest", 0)
        .expect("partition 0 has a leader") as usize;
    cluster.kill(leader);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster.restart(leader);
    cluster.wait_for_brokers(3);
    eprintln!(
        "brokers: leader {leader} down for {:?}",
        killed_at.elapsed()
    );

    // 2. Two brokers die: one replica is left, below min.insync.replicas.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a, b) = match leader {
        1 => (2, 3),
        2 => (1, 3),
        _ => (1, 2),
    };
    cluster.kill(a);
    cluster.kill(b);
    wait_readyz(addr, "the API spills", |v| {
        v["spill"]["spilling"].as_bool() == Some(true)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.restart(a);
    cluster.restart(b);
    cluster.wait_for_brokers(3);

    let mut acked = Vec::new();
    let mut unavailable = 0;
    for c in clients {
        let (a, n) = c.await.expect("client");
        acked.extend(a);
        unavailable += n;
    }
    assert_eq!(
        unavailable,
        0,
        "no request was answered 503 ({} acknowledged)",
        acked.len()
    );
    wait_readyz(addr, "the buffer drains", |v| {
        v["spill"]["spilling"].as_bool() == Some(false) && v["spill"]["records"].as_u64() == Some(0)
    })
    .await;
    support::wait_for_sentinels(addr, &key).await;
    assert!(server.sigterm().success());

    // Every acknowledged message is in the topic; per user, first copies in send order.
    let records = read_topic(&cluster.bootstrap, "sluice.ingest", 8);
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut last_seen: HashMap<String, (usize, usize, usize, usize)> = HashMap::new();
    let mut values = Vec::new();
    for record in &records {
        let v: Value = serde_json::from_slice(&record.value).expect("record JSON");
        let id = v["messageId"].as_str().unwrap_or_default().to_string();
        let copies = count.entry(id.clone()).or_default();
        *copies += 1;
        if *copies == 1 && id.starts_with('r') {
            let user = String::from_utf8_lossy(&record.key).into_owned();
            let position = support::send_position(&id);
            if let Some(before) = last_seen.insert(user.clone(), position) {
                assert!(
                    before < position,
                    "{user}: {id} after {before:?} in the topic, out of send order"
                );
            }
            values.push(record.value.clone());
        }
    }
    for id in &acked {
        assert!(count.contains_key(id), "acknowledged {id} is in the topic");
    }
    let copies = count.values().filter(|n| **n > 1).count();
    eprintln!(
        "brokers: {} acknowledged, {} records in the topic ({copies} messages with a second copy), 0 answers 503",
        acked.len(),
        records.len()
    );
    support::check_index_matches_log(&data.join("index"), &values).await;
}
