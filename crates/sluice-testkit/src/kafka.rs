//! An Apache Kafka 4 cluster in KRaft mode: `brokers` combined broker+controller nodes with a
//! static quorum, formatted with one cluster id.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::node::{Node, wait_until};

/// A running cluster. Dropping it stops every broker and removes their data.
pub struct Kafka {
    /// `bootstrap.servers`: every broker's `127.0.0.1:PORT`.
    pub bootstrap: String,
    ports: Vec<u16>,
    nodes: Vec<Mutex<Node>>,
    _dir: tempfile::TempDir,
}

impl Kafka {
    /// One broker, internal topics with replication factor 1.
    pub fn single() -> Kafka {
        Kafka::start(1, &[])
    }

    /// `brokers` nodes (3 for a cluster that survives one loss: internal topics are then
    /// replicated 3 times with min.insync.replicas 2), with extra broker `settings`
    /// (`key=value`), and waits until every broker is in the cluster's metadata.
    pub fn start(brokers: usize, settings: &[&str]) -> Kafka {
        assert!(brokers >= 1, "a cluster needs a broker");
        let dir = tempfile::Builder::new()
            .prefix("sluice-kafka.")
            .tempdir()
            .expect("tempdir");
        let ports: Vec<u16> = (0..brokers).map(|_| crate::free_port()).collect();
        let controller_ports: Vec<u16> = (0..brokers).map(|_| crate::free_port()).collect();
        let voters = controller_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = cluster_id();
        let mut extra: Vec<String> = Vec::new();
        if brokers >= 3 {
            extra.extend(
                [
                    "offsets.topic.replication.factor=3",
                    "transaction.state.log.replication.factor=3",
                    "transaction.state.log.min.isr=2",
                ]
                .map(String::from),
            );
        }
        extra.extend(settings.iter().map(|s| s.to_string()));
        for i in 0..brokers {
            let node_dir = dir.path().join(format!("node{}", i + 1));
            let mut args: Vec<String> = [
                "kafka-format",
                "--cluster-id",
                &cluster_id,
                "--dir",
                &node_dir.to_string_lossy(),
                "--id",
                &(i + 1).to_string(),
                "--port",
                &ports[i].to_string(),
                "--controller-port",
                &controller_ports[i].to_string(),
                "--voters",
                &voters,
            ]
            .map(String::from)
            .to_vec();
            for s in &extra {
                args.push("--set".into());
                args.push(s.clone());
            }
            let out = std::process::Command::new(crate::engine_script())
                .args(&args)
                .output()
                .expect("scripts/engine runs");
            assert!(
                out.status.success(),
                "kafka-format of broker {}: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let nodes: Vec<Mutex<Node>> = (0..brokers)
            .map(|i| {
                let node_dir = dir.path().join(format!("node{}", i + 1));
                Mutex::new(Node::start(
                    &format!("kafka broker {}", i + 1),
                    vec![
                        "kafka-node".into(),
                        "--dir".into(),
                        node_dir.to_string_lossy().into_owned(),
                    ],
                    &node_dir,
                ))
            })
            .collect();
        let bootstrap = ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let kafka = Kafka {
            bootstrap,
            ports,
            nodes,
            _dir: dir,
        };
        kafka.wait_for_brokers(brokers);
        kafka
    }

    /// Waits (up to 120 s) until the cluster's metadata lists `count` brokers.
    pub fn wait_for_brokers(&self, count: usize) {
        wait_until(
            Duration::from_secs(120),
            || {
                for (i, node) in self.nodes.iter().enumerate() {
                    let mut node = node.lock().expect("node");
                    if node.pid().is_some() {
                        node.assert_alive(&format!("the cluster's {count} brokers ({i})"));
                    }
                }
                self.broker_count() >= count
            },
            || {
                let logs: String = self
                    .nodes
                    .iter()
                    .map(|n| n.lock().expect("node").log_tail())
                    .collect();
                format!(
                    "the Kafka cluster at {} did not show {count} brokers within 120 s{logs}",
                    self.bootstrap
                )
            },
        );
    }

    /// How many brokers the metadata lists now (0 when no broker answers).
    pub fn broker_count(&self) -> usize {
        let consumer: BaseConsumer = match ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("log_level", "0")
            .create()
        {
            Ok(c) => c,
            Err(_) => return 0,
        };
        consumer
            .fetch_metadata(None, Duration::from_secs(2))
            .map_or(0, |m| m.brokers().len())
    }

    /// Broker `i`'s (1-based, its node id) `127.0.0.1:PORT`.
    pub fn broker_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i - 1])
    }

    fn node(&self, i: usize) -> std::sync::MutexGuard<'_, Node> {
        self.nodes[i - 1].lock().expect("node")
    }

    /// Broker `i`'s JVM process id, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.node(i).pid()
    }

    /// SIGKILLs broker `i` (1-based).
    pub fn kill(&self, i: usize) {
        self.node(i).kill();
    }

    /// SIGTERMs broker `i` and waits for its clean shutdown.
    pub fn terminate(&self, i: usize) {
        self.node(i).terminate();
    }

    /// SIGSTOPs broker `i`: it holds its connections and answers nothing.
    pub fn freeze(&self, i: usize) {
        self.node(i).freeze();
    }

    /// SIGCONTs broker `i` after `freeze`.
    pub fn thaw(&self, i: usize) {
        self.node(i).thaw();
    }

    /// Starts broker `i` again on its data dir (after `kill` or `terminate`).
    pub fn restart(&self, i: usize) {
        self.node(i).restart();
    }

    /// The id of the broker leading `topic`'s `partition`, from the metadata.
    pub fn leader(&self, topic: &str, partition: i32) -> Option<i32> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .ok()?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()?;
        let topic = metadata.topics().first()?;
        topic
            .partitions()
            .iter()
            .find(|p| p.id() == partition)
            .map(|p| p.leader())
            .filter(|l| *l >= 0)
    }

    /// The engine log's last lines of every broker (for a failing test's message).
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.lock().expect("node").log_tail())
            .collect()
    }
}

/// A fresh KRaft cluster id: 16 random bytes in URL-safe base64 without padding, the form
/// `kafka-storage random-uuid` prints, never starting with '-'.
fn cluster_id() -> String {
    use base64::Engine;
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = Vec::with_capacity(16);
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        bytes.extend_from_slice(&h.finish().to_le_bytes());
    }
    let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    // A leading '-' reads as an option to kafka-storage (Kafka's own generator avoids it too);
    // any other first character is as valid.
    match id.strip_prefix('-') {
        Some(rest) => format!("A{rest}"),
        None => id,
    }
}
