//! A real Kafka-protocol broker for tests: the `tansu` binary (installed into `.venv` by
//! `scripts/install-test-tools`, or named by `SLUICE_TANSU`), started on a free port with memory
//! storage and killed on drop. Behind the `testing` feature, for this and other crates' tests.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running tansu broker.
pub struct Tansu {
    child: Child,
    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub addr: String,
}

impl Tansu {
    /// The tansu binary: `SLUICE_TANSU`, else the workspace's `.venv/bin/tansu`.
    pub fn binary() -> String {
        std::env::var("SLUICE_TANSU").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/tansu").to_string()
        })
    }

    /// Starts a broker and waits until it listens. Panics (it is for tests) when it cannot.
    pub fn start() -> Tansu {
        let tansu = Tansu::binary();
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
        Tansu { child, addr }
    }

    /// The broker's process id (to freeze it with SIGSTOP in chaos tests).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A record as an independent reader sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TopicRecord {
    pub partition: u32,
    pub offset: u64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Every record of `topic`'s first `partitions` partitions, read by a plain librdkafka consumer
/// (no group membership) at least up to each partition's end offset as it was when called, then
/// until nothing arrived for 2 s (tansu's end offsets can lag its records); sorted by
/// partition, then offset. Panics if those ends are not reached within 120 s. (Waiting only for
/// a quiet spell returned nothing when the broker was slow to answer the first fetch.)
pub fn read_topic(brokers: &str, topic: &str, partitions: u32) -> Vec<TopicRecord> {
    use rdkafka::Message;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let ends = end_offsets(brokers, topic, partitions);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
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
    // Per partition, the offset after the last record read.
    let mut next = vec![0u64; partitions as usize];
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut idle_since = Instant::now();
    loop {
        let behind: Vec<(u32, u64, u64)> = (0..partitions)
            .filter(|&p| next[p as usize] < ends[p as usize])
            .map(|p| (p, next[p as usize], ends[p as usize]))
            .collect();
        if behind.is_empty() && idle_since.elapsed() >= Duration::from_secs(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reading {topic:?} did not reach its end offsets within 120 s: (partition, next, end) {behind:?}"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                idle_since = Instant::now();
                let (partition, offset) = (m.partition() as u32, m.offset().max(0) as u64);
                if let Some(n) = next.get_mut(partition as usize) {
                    *n = (*n).max(offset + 1);
                }
                out.push(TopicRecord {
                    partition,
                    offset,
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                });
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    out.sort();
    out
}

/// The offsets `group` committed on `topic`'s first `partitions` partitions (0 where none).
pub fn committed_offsets(brokers: &str, group: &str, topic: &str, partitions: u32) -> Vec<u64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p as i32);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(|p| {
            match committed
                .find_partition(topic, p as i32)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o.max(0) as u64,
                _ => 0,
            }
        })
        .collect()
}

/// The end offset (high watermark) of each of `topic`'s first `partitions` partitions.
pub fn end_offsets(brokers: &str, topic: &str, partitions: u32) -> Vec<u64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p as i32, Duration::from_secs(10))
                .expect("watermarks")
                .1
                .max(0) as u64
        })
        .collect()
}
