//! The Kafka log against a real Kafka-protocol broker: tansu, started here on a free port
//! (`scripts/test` installs it and sets SLUICE_TANSU), with memory storage.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sluice_log::{KafkaLog, KafkaLogConfig, Log, LogError, Record};

/// A tansu broker process, killed on drop.
struct Broker {
    child: Child,
    addr: String,
}

impl Broker {
    fn start() -> Broker {
        let tansu = std::env::var("SLUICE_TANSU").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/tansu").to_string()
        });
        assert!(
            std::path::Path::new(&tansu).exists(),
            "no tansu broker at {tansu}: run ./scripts/test (it installs it), or set SLUICE_TANSU"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {addr} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker { child, addr }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn record(key: &str, value: &str) -> Record {
    Record {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        timestamp_ms: 1_700_000_000_000,
    }
}

/// Every record of `topic`, read by a plain librdkafka consumer: (partition, offset, key, value).
fn read_all(brokers: &str, topic: &str, partitions: u32) -> Vec<(u32, u64, String, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "sluice-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p as i32, Offset::Beginning)
            .expect("assign");
    }
    consumer.assign(&assignment).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut idle_since = Instant::now();
    while Instant::now() < deadline && idle_since.elapsed() < Duration::from_secs(2) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                idle_since = Instant::now();
                out.push((
                    m.partition() as u32,
                    m.offset() as u64,
                    String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                ));
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_acknowledged_on_the_murmur2_partition_in_order() {
    let broker = Broker::start();
    let log = KafkaLog::connect(KafkaLogConfig::new(&broker.addr, "sluice.ingest"))
        .await
        .expect("connect and create the topic");
    assert_eq!(log.partitions(), 8);

    let records: Vec<Record> = (0..200)
        .map(|i| {
            record(
                &format!("acme:u:user-{}", i % 13),
                &format!("{{\"n\":{i}}}"),
            )
        })
        .collect();
    let acks = log.append(records.clone()).await.expect("append");
    assert_eq!(acks.len(), records.len());
    let mut last_offset = std::collections::HashMap::new();
    for (record, ack) in records.iter().zip(&acks) {
        assert_eq!(
            ack.partition,
            sluice_model::partition_for_key(&record.key, 8),
            "same partition as the embedded log"
        );
        if let Some(previous) = last_offset.insert(ack.partition, ack.offset) {
            assert!(ack.offset > previous, "input order within a partition");
        }
    }

    // An independent client sees exactly these records where the acks said.
    let read = read_all(&broker.addr, "sluice.ingest", 8);
    assert_eq!(read.len(), records.len());
    for (record, ack) in records.iter().zip(&acks) {
        let found = read
            .iter()
            .find(|(p, o, _, _)| *p == ack.partition && *o == ack.offset)
            .expect("acknowledged record is in the topic");
        assert_eq!(found.2.as_bytes(), &record.key[..]);
        assert_eq!(found.3.as_bytes(), &record.value[..]);
    }
    log.close().await.expect("close");

    // Connecting again to the existing topic with another configured count uses the topic's.
    let mut config = KafkaLogConfig::new(&broker.addr, "sluice.ingest");
    config.partitions = 3;
    let again = KafkaLog::connect(config).await.expect("connect again");
    assert_eq!(again.partitions(), 8);
    again.close().await.expect("close");
}

#[tokio::test]
async fn an_unreachable_broker_is_a_clear_retriable_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let brokers = format!("127.0.0.1:{port}");
    let mut config = KafkaLogConfig::new(&brokers, "sluice.ingest");
    config.request_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let error = match KafkaLog::connect(config).await {
        Ok(_) => panic!("connected to a port where nothing listens"),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "fails within the timeout"
    );
    assert!(matches!(error, LogError::Broker { .. }), "{error:?}");
    assert!(error.is_retriable());
    assert!(error.to_string().contains(&brokers), "{error}");
}
