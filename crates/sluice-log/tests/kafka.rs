//! The Kafka log against real brokers: Apache Kafka 4.1 (KRaft, one broker for the whole test
//! binary, each test on topics and groups of its own; a broker of its own for the test that
//! kills it), and tansu (a Kafka-protocol broker, memory storage, one per test) as a fast extra
//! case. Each test is written once and instantiated per broker by `on_both!`.

use sluice_model::Recoverable;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sluice_log::kafka::testing::{Tansu, read_topic};
use sluice_log::{
    Ack, Assignment, KafkaLog, KafkaLogConfig, Log, LogError, PartitionStream, Record, Subscription,
};
use sluice_testkit::Kafka;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Kafka,
    Tansu,
}

/// One test's broker and names: the binary's Kafka broker (or one of the test's own), or a
/// tansu of its own.
struct Broker {
    addr: String,
    /// The ingest topic of this test.
    topic: String,
    suffix: String,
    kafka: Option<Kafka>,
    tansu: Option<Tansu>,
}

/// One Kafka broker for the whole test binary (it exits with this process).
fn shared_kafka() -> &'static Kafka {
    static KAFKA: OnceLock<Kafka> = OnceLock::new();
    KAFKA.get_or_init(Kafka::single)
}

impl Broker {
    /// A broker to share (Kafka) or of the test's own (tansu).
    fn start(engine: Engine) -> Broker {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        match engine {
            Engine::Kafka => {
                let suffix = format!("{}", NEXT.fetch_add(1, Ordering::Relaxed));
                Broker {
                    addr: shared_kafka().bootstrap.clone(),
                    topic: format!("sluice.ingest.{suffix}"),
                    suffix,
                    kafka: None,
                    tansu: None,
                }
            }
            Engine::Tansu => Broker::tansu(),
        }
    }

    /// A broker of the test's own, to kill.
    fn own(engine: Engine) -> Broker {
        match engine {
            Engine::Kafka => {
                let kafka = Kafka::single();
                Broker {
                    addr: kafka.bootstrap.clone(),
                    topic: "sluice.ingest".into(),
                    suffix: String::new(),
                    kafka: Some(kafka),
                    tansu: None,
                }
            }
            Engine::Tansu => Broker::tansu(),
        }
    }

    fn tansu() -> Broker {
        let tansu = Tansu::start();
        Broker {
            addr: tansu.addr.clone(),
            topic: "sluice.ingest".into(),
            suffix: String::new(),
            kafka: None,
            tansu: Some(tansu),
        }
    }

    /// A consumer group name unique to this test on its broker.
    fn group(&self, name: &str) -> String {
        format!("{name}{}", self.suffix)
    }

    /// SIGKILLs the broker (one of the test's own).
    fn kill(&mut self) {
        if let Some(kafka) = &self.kafka {
            kafka.kill(1);
        }
        self.tansu = None;
    }
}

macro_rules! on_both {
    ($($test:ident),* $(,)?) => {
        mod kafka {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Engine::Kafka).await
            })*
        }
        mod tansu {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Engine::Tansu).await
            })*
        }
    };
}

on_both!(
    appends_are_acknowledged_on_the_murmur2_partition_in_order,
    a_group_reads_each_partition_in_order_and_resumes_after_its_commit,
    a_joining_member_takes_partitions_only_after_they_are_released,
    the_log_reports_unhealthy_once_every_broker_is_down,
);

fn record(key: &str, value: &str) -> Record {
    Record {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        timestamp_ms: 1_700_000_000_000,
    }
}

async fn appends_are_acknowledged_on_the_murmur2_partition_in_order(engine: Engine) {
    let broker = Broker::start(engine);
    let log = KafkaLog::connect(KafkaLogConfig::new(&broker.addr, &broker.topic))
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
    let mut last_offset = HashMap::new();
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
    let read = read_topic(&broker.addr, &broker.topic, 8);
    assert_eq!(read.len(), records.len());
    for (record, ack) in records.iter().zip(&acks) {
        let found = read
            .iter()
            .find(|r| r.partition == ack.partition && r.offset == ack.offset)
            .expect("acknowledged record is in the topic");
        assert_eq!(found.key, record.key);
        assert_eq!(found.value, record.value);
    }
    log.close().await.expect("close");

    // Connecting again to the existing topic with another configured count uses the topic's.
    let mut config = KafkaLogConfig::new(&broker.addr, &broker.topic);
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
    assert!(error.is_recoverable());
    assert!(
        error.to_string().contains(&format!(
            "no bootstrap address accepts connections: {brokers} (Connection refused"
        )),
        "{error}"
    );
}

/// A broker that answers at its bootstrap address but advertises a listener this node cannot
/// reach (a container's hostname, the classic `advertised.listeners` mistake): connecting is a
/// retriable error that names the setting (and the advertised address, when the metadata naming
/// it arrived), within the timeout, instead of a bare timeout of the first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_advertising_an_unreachable_listener_is_a_clear_error() {
    let advertised = "kafka-0.sluice.invalid:9092";
    let broker = Kafka::start(
        1,
        &[&format!("advertised.listeners=PLAINTEXT://{advertised}")],
    );
    let mut config = KafkaLogConfig::new(&broker.bootstrap, "sluice.ingest");
    config.request_timeout = Duration::from_secs(3);
    let started = Instant::now();
    let error = match KafkaLog::connect(config).await {
        Ok(_) => panic!("connected through a listener nobody can reach"),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "fails within the timeout"
    );
    assert!(error.is_recoverable(), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains(&broker.bootstrap) && text.contains("advertised.listeners"),
        "{text}"
    );
    // librdkafka drops its bootstrap connection once it has learned the advertised brokers, so
    // the metadata naming them does not always arrive; when it does, the error names them.
    assert!(
        text.contains(&format!("broker 1 at {advertised}"))
            || text.contains("the bootstrap address accepts connections"),
        "{text}"
    );
}

/// Appends `count` records over 97 users (every partition gets some); returns each partition's expected (offset, value).
async fn fill(log: &KafkaLog, count: usize, tag: &str) -> BTreeMap<u32, Vec<(u64, String)>> {
    let records: Vec<Record> = (0..count)
        .map(|i| {
            record(
                &format!("acme:u:user-{}", i % 97),
                &format!("{{\"tag\":\"{tag}\",\"n\":{i}}}"),
            )
        })
        .collect();
    let acks: Vec<Ack> = log.append(records.clone()).await.expect("append");
    let mut expected: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
    for (record, ack) in records.iter().zip(acks) {
        expected.entry(ack.partition).or_default().push((
            ack.offset,
            String::from_utf8_lossy(&record.value).into_owned(),
        ));
    }
    expected
}

/// The next assignment change, within `within`.
async fn next_change(subscription: &mut Box<dyn Subscription>, within: Duration) -> Assignment {
    match tokio::time::timeout(within, subscription.next()).await {
        Ok(Some(change)) => change,
        Ok(None) => panic!("the subscription ended"),
        Err(_) => panic!("no assignment change within {within:?}"),
    }
}

/// Collects `Assigned` streams until `count` partitions are owned.
async fn assigned(
    subscription: &mut Box<dyn Subscription>,
    count: usize,
) -> BTreeMap<u32, Box<dyn PartitionStream>> {
    let mut streams = BTreeMap::new();
    while streams.len() < count {
        match next_change(subscription, Duration::from_secs(30)).await {
            Assignment::Assigned(stream) => {
                streams.insert(stream.partition(), stream);
            }
            Assignment::Revoked(p) => {
                streams.remove(&p);
            }
            Assignment::Failed(e) => panic!("subscription failed: {e}"),
        }
    }
    streams
}

/// Reads `count` records from a stream: (offset, value).
async fn read(stream: &mut dyn PartitionStream, count: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    while out.len() < count {
        let batch = tokio::time::timeout(Duration::from_secs(20), stream.next_batch(100))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "partition {}: only {} of {count} records within 20 s",
                    stream.partition(),
                    out.len()
                )
            })
            .expect("read");
        out.extend(
            batch
                .into_iter()
                .map(|r| (r.offset, String::from_utf8_lossy(&r.value).into_owned())),
        );
    }
    out
}

/// The expected records of a partition from offset `commit` on.
fn from_commit(expected: &[(u64, String)], commit: u64) -> Vec<(u64, String)> {
    expected
        .iter()
        .filter(|(offset, _)| *offset >= commit)
        .cloned()
        .collect()
}

type Owned = BTreeMap<u32, Box<dyn PartitionStream>>;

/// Follows two members' assignment changes until the 8 partitions are split between them, each
/// owning some, within `within`.
async fn split(
    first: &mut Box<dyn Subscription>,
    second: &mut Box<dyn Subscription>,
    within: Duration,
) -> (Owned, Owned) {
    let (mut a, mut b) = (Owned::new(), Owned::new());
    let deadline = Instant::now() + within;
    while a.len() + b.len() < 8 || a.is_empty() || b.is_empty() {
        assert!(
            Instant::now() < deadline,
            "owned after {within:?}: {:?} + {:?}",
            a.keys(),
            b.keys()
        );
        tokio::select! {
            change = first.next() => match change.expect("the first member's subscription ended") {
                Assignment::Assigned(s) => { a.insert(s.partition(), s); }
                Assignment::Revoked(p) => { a.remove(&p); }
                Assignment::Failed(e) => panic!("{e}"),
            },
            change = second.next() => match change.expect("the second member's subscription ended") {
                Assignment::Assigned(s) => { b.insert(s.partition(), s); }
                Assignment::Revoked(p) => { b.remove(&p); }
                Assignment::Failed(e) => panic!("{e}"),
            },
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    (a, b)
}

fn group_config(broker: &Broker) -> KafkaLogConfig {
    let mut config = KafkaLogConfig::new(&broker.addr, &broker.topic);
    config.session_timeout = Duration::from_secs(6);
    config.instance_id = Some("node-1".into());
    config
}

async fn a_group_reads_each_partition_in_order_and_resumes_after_its_commit(engine: Engine) {
    let broker = Broker::start(engine);
    let log = KafkaLog::connect(group_config(&broker))
        .await
        .expect("connect");
    let expected = fill(&log, 400, "first").await;

    let mut subscription = log
        .subscribe(&broker.group("resume"))
        .await
        .expect("subscribe");
    let mut streams = assigned(&mut subscription, 8).await;
    let mut committed = BTreeMap::new();
    for (partition, stream) in &mut streams {
        let want = &expected[partition];
        let got = read(stream.as_mut(), want.len()).await;
        assert_eq!(&got, want, "partition {partition}: every record, in order");
        // Commit only the first half: the rest must be read again after rejoining.
        let half = want[want.len() / 2].0;
        stream.commit(half).await.expect("commit");
        committed.insert(*partition, half);
    }
    drop(streams);
    drop(subscription);

    let mut subscription = log
        .subscribe(&broker.group("resume"))
        .await
        .expect("subscribe again");
    let mut streams = assigned(&mut subscription, 8).await;
    for (partition, stream) in &mut streams {
        let want = from_commit(&expected[partition], committed[partition]);
        let got = read(stream.as_mut(), want.len()).await;
        assert_eq!(got, want, "partition {partition}: resumes at the commit");
    }
    drop(streams);
    drop(subscription);
    log.close().await.expect("close");
}

async fn a_joining_member_takes_partitions_only_after_they_are_released(engine: Engine) {
    let broker = Broker::start(engine);
    let mut config = group_config(&broker);
    config.revoke_timeout = Duration::from_secs(3);
    let log = KafkaLog::connect(config).await.expect("connect");
    let expected = fill(&log, 400, "share").await;

    let mut first = log
        .subscribe(&broker.group("share"))
        .await
        .expect("subscribe");
    let mut streams = assigned(&mut first, 8).await;
    for (partition, stream) in &mut streams {
        read(stream.as_mut(), expected[partition].len()).await;
    }

    // A second member joins: the first is asked to give everything back (eager protocol).
    let mut second = log
        .subscribe(&broker.group("share"))
        .await
        .expect("second member");
    let mut revoked = Vec::new();
    while revoked.len() < 8 {
        match next_change(&mut first, Duration::from_secs(30)).await {
            Assignment::Revoked(p) => revoked.push(p),
            Assignment::Assigned(s) => panic!("assigned {} before the revoke", s.partition()),
            Assignment::Failed(e) => panic!("{e}"),
        }
    }
    // Partitions 0..4 finish their "batch" and commit while the revoke waits for them, then
    // are released; 4..8 are held past the revoke timeout, so their late commits are refused.
    let mut held = BTreeMap::new();
    for (partition, mut stream) in std::mem::take(&mut streams) {
        let end = expected[&partition].last().expect("records").0 + 1;
        if partition < 4 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            stream.commit(end).await.expect("commit during the revoke");
        } else {
            held.insert(partition, (stream, end));
        }
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (partition, (stream, end)) in &mut held {
        match stream.commit(*end).await {
            Err(LogError::Revoked(p)) => assert_eq!(p, *partition),
            other => panic!("partition {partition}: a commit after the revoke gave {other:?}"),
        }
    }
    drop(held);

    // The group settles with the partitions split between the two members.
    let (mut a, mut b) = split(&mut first, &mut second, Duration::from_secs(40)).await;
    assert!(
        a.keys().all(|p| !b.contains_key(p)),
        "no partition owned twice"
    );
    // Committed partitions resume after their commit (nothing left); the others start over.
    for (partition, stream) in a.iter_mut().chain(b.iter_mut()) {
        let want: Vec<(u64, String)> = if *partition < 4 {
            Vec::new()
        } else {
            expected[partition].clone()
        };
        let got = if want.is_empty() {
            let next = tokio::time::timeout(Duration::from_secs(2), stream.next_batch(10)).await;
            assert!(
                next.is_err(),
                "partition {partition}: read past its commit: {next:?}"
            );
            Vec::new()
        } else {
            read(stream.as_mut(), want.len()).await
        };
        assert_eq!(got, want, "partition {partition}");
    }
    drop((a, b, first, second));
    log.close().await.expect("close");
}

async fn the_log_reports_unhealthy_once_every_broker_is_down(engine: Engine) {
    let mut broker = Broker::own(engine);
    let log = KafkaLog::connect(KafkaLogConfig::new(&broker.addr, &broker.topic))
        .await
        .expect("connect");
    log.append(vec![record("acme:u:1", "{}")])
        .await
        .expect("append");
    assert!(log.is_healthy());
    broker.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while log.is_healthy() {
        assert!(
            Instant::now() < deadline,
            "still healthy 20 s after the broker died"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Failover, on real Kafka only (tansu never hands a departed member's partitions to the
/// survivors): two nodes with static membership share the group; one goes away without leaving
/// it (a closed static member sends no LeaveGroup, as after a crash). Within the session
/// timeout + 5 s the survivor owns every partition, and reads each from the departed node's
/// last commit, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_static_member_s_partitions_go_to_the_survivor_after_its_session() {
    let broker = Broker::start(Engine::Kafka);
    let group = broker.group("failover");
    let node = |id: &str| {
        let mut config = group_config(&broker);
        config.instance_id = Some(id.into());
        config
    };
    let survivor_log = KafkaLog::connect(node("node-a")).await.expect("connect a");
    let departing_log = KafkaLog::connect(node("node-b")).await.expect("connect b");
    let expected = fill(&survivor_log, 400, "failover").await;

    let mut survivor = survivor_log.subscribe(&group).await.expect("subscribe a");
    let mut departing = departing_log.subscribe(&group).await.expect("subscribe b");
    let (mut a, mut b) = split(&mut survivor, &mut departing, Duration::from_secs(60)).await;
    // The departing node processes half of each of its partitions, commits, and goes away.
    let mut committed = BTreeMap::new();
    for (partition, stream) in &mut b {
        let half = expected[partition].len() / 2;
        read(stream.as_mut(), half).await;
        let at = expected[partition][half].0;
        stream.commit(at).await.expect("commit");
        committed.insert(*partition, at);
    }
    let moved: Vec<u32> = b.keys().copied().collect();
    drop(b);
    drop(departing);
    departing_log.close().await.expect("close b");
    let gone = Instant::now();

    // The eager protocol revokes the survivor's own partitions first: it releases them (as the
    // pipeline does after its batch), then gets all eight.
    let mut taken = BTreeMap::new();
    let limit = group_config(&broker).session_timeout + Duration::from_secs(5);
    while !moved.iter().all(|p| taken.contains_key(p)) {
        let left = limit.saturating_sub(gone.elapsed());
        assert!(
            !left.is_zero(),
            "the survivor took {:?} of {moved:?} within the session timeout + 5 s",
            taken.keys()
        );
        match next_change(&mut survivor, left.max(Duration::from_millis(1))).await {
            Assignment::Assigned(s) => {
                taken.insert(s.partition(), s);
            }
            Assignment::Revoked(p) => {
                a.remove(&p);
                taken.remove(&p);
            }
            Assignment::Failed(e) => panic!("{e}"),
        }
    }
    println!(
        "the survivor owned the departed member's partitions {:?} after it left",
        gone.elapsed()
    );
    for (partition, stream) in taken.iter_mut().filter(|(p, _)| moved.contains(p)) {
        let want = from_commit(&expected[partition], committed[partition]);
        let got = read(stream.as_mut(), want.len()).await;
        assert_eq!(
            got, want,
            "partition {partition}: from the departed node's commit"
        );
    }
    drop((a, taken, survivor));
    survivor_log.close().await.expect("close a");
}

/// A revoke that times out cuts the held stream off; the partition may come straight back to
/// the same member, on librdkafka's same fetch queue. The stale stream, dropped only later (its
/// owner stuck in a commit while the broker was frozen, as CI saw), must not silence the new
/// stream: every record appended after that drop is still read. (Kafka only: tansu does not
/// hand a departed member's partitions back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_released_after_its_revoke_timed_out_does_not_stall_its_successor() {
    let broker = Broker::start(Engine::Kafka);
    let group = broker.group("late-release");
    let mut config = group_config(&broker);
    config.revoke_timeout = Duration::from_secs(2);
    let log = KafkaLog::connect(config.clone()).await.expect("connect");
    let before = fill(&log, 160, "before").await;
    let mut member = log.subscribe(&group).await.expect("subscribe");
    let mut stale = assigned(&mut member, 8).await;
    for (partition, stream) in &mut stale {
        read(stream.as_mut(), before[partition].len()).await;
    }

    // A dynamic second member joins (everything is revoked; the streams are held past the
    // timeout), then leaves: the first member gets all eight partitions back.
    let mut visitor_config = config;
    visitor_config.instance_id = None;
    let visitor_log = KafkaLog::connect(visitor_config).await.expect("connect");
    let mut visitor = visitor_log.subscribe(&group).await.expect("visitor");
    let (a, b) = split(&mut member, &mut visitor, Duration::from_secs(60)).await;
    drop((a, b, visitor));
    visitor_log.close().await.expect("close the visitor");
    let mut back = assigned(&mut member, 8).await;

    // Only now are the cut-off streams dropped; then new records arrive.
    drop(stale);
    let after = fill(&log, 160, "after").await;
    for (partition, stream) in &mut back {
        let mut want = before[partition].clone();
        want.extend(after[partition].iter().cloned());
        let got = read(stream.as_mut(), want.len()).await;
        assert_eq!(
            got, want,
            "partition {partition}: read again from the start"
        );
    }
    drop((back, member));
    log.close().await.expect("close");
}

/// The topics' configs as the cluster reports them: (replication factor of partition 0,
/// `min.insync.replicas`, `retention.ms`, `retention.bytes`).
async fn topic_settings(brokers: &str, topic: &str) -> (usize, String, String, String) {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let replicas = metadata.topics()[0].partitions()[0].replicas().len();
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .expect("describe configs");
    let resource = described
        .into_iter()
        .next()
        .expect("one resource")
        .expect("the topic's configs");
    let value = |name: &str| {
        resource
            .get(name)
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    };
    (
        replicas,
        value("min.insync.replicas"),
        value("retention.ms"),
        value("retention.bytes"),
    )
}

/// SPEC §2 production settings, read back from a real three-broker cluster: by default the
/// topics sluice creates are replicated 3 times with min.insync.replicas 2, sluice.dlq keeps
/// its records forever, and explicit settings are used as given; a factor larger than the
/// cluster is a clear error; `options` reach librdkafka unchanged (an unknown property is
/// refused by librdkafka itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_with_production_replication_and_dead_letters_never_expire() {
    let cluster = Kafka::start(3, &[]);
    let mut config = KafkaLogConfig::new(&cluster.bootstrap, "sluice.ingest");
    config.other_topics = vec!["sluice.dlq".into(), "sluice.actions".into()];
    let log = KafkaLog::connect(config).await.expect("connect");
    log.append(vec![record("acme:u:1", "{}")])
        .await
        .expect("an append with acks=all on 3 replicas");
    log.close().await.expect("close");
    let ingest = topic_settings(&cluster.bootstrap, "sluice.ingest").await;
    assert_eq!((ingest.0, ingest.1.as_str()), (3, "2"), "{ingest:?}");
    assert_ne!(
        ingest.2, "-1",
        "the ingest topic keeps the broker's retention"
    );
    let dlq = topic_settings(&cluster.bootstrap, "sluice.dlq").await;
    assert_eq!(dlq, (3, "2".into(), "-1".into(), "-1".into()), "sluice.dlq");
    let actions = topic_settings(&cluster.bootstrap, "sluice.actions").await;
    assert_eq!((actions.0, actions.1.as_str()), (3, "2"), "{actions:?}");

    let mut config = KafkaLogConfig::new(&cluster.bootstrap, "explicit");
    config.other_topics = Vec::new();
    config.replication_factor = Some(2);
    config.min_insync_replicas = Some(1);
    KafkaLog::connect(config)
        .await
        .expect("connect")
        .close()
        .await
        .expect("close");
    let explicit = topic_settings(&cluster.bootstrap, "explicit").await;
    assert_eq!((explicit.0, explicit.1.as_str()), (2, "1"), "{explicit:?}");

    let mut config = KafkaLogConfig::new(&cluster.bootstrap, "too-wide");
    config.other_topics = Vec::new();
    config.replication_factor = Some(5);
    let error = match KafkaLog::connect(config).await {
        Ok(_) => panic!("created a topic with 5 replicas on 3 brokers"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("kafka_replication_factor = 5") && error.contains("3 broker"),
        "{error}"
    );

    let mut config = KafkaLogConfig::new(&cluster.bootstrap, "options");
    config.options = vec![("no.such.property".into(), "1".into())];
    let error = match KafkaLog::connect(config).await {
        Ok(_) => panic!("librdkafka took an unknown property"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("no.such.property"), "{error}");
}

/// A replication factor above the broker count is refused before any topic is created, with
/// an error that names the setting, both numbers and the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_factor_above_the_broker_count_is_a_clear_error() {
    let broker = Broker::start(Engine::Kafka);
    let mut config = KafkaLogConfig::new(&broker.addr, &broker.topic);
    config.other_topics = Vec::new();
    config.replication_factor = Some(3);
    let error = match KafkaLog::connect(config).await {
        Ok(_) => panic!("created topics with 3 replicas on one broker"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains(&broker.addr)
            && error.contains("kafka_replication_factor = 3, but the cluster has 1 broker(s)"),
        "{error}"
    );
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .create()
        .expect("consumer");
    let metadata =
        rdkafka::consumer::Consumer::fetch_metadata(&consumer, None, Duration::from_secs(10))
            .expect("metadata");
    assert!(
        metadata.topics().iter().all(|t| t.name() != broker.topic),
        "no topic {} was created",
        broker.topic
    );
}

/// With one broker, the default replication factor is the broker count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_single_broker_topics_have_one_replica() {
    let broker = Broker::start(Engine::Kafka);
    let mut config = KafkaLogConfig::new(&broker.addr, &broker.topic);
    config.other_topics = Vec::new();
    KafkaLog::connect(config)
        .await
        .expect("connect")
        .close()
        .await
        .expect("close");
    let settings = topic_settings(&broker.addr, &broker.topic).await;
    assert_eq!(settings.0, 1, "{settings:?}");
}

/// `delete_before` (what `sluice dlq purge` uses) on the real broker: the partition's records
/// before the offset are gone, the rest and the other partitions stay, and new appends go on
/// after the old end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_before_removes_a_partitions_records_before_an_offset() {
    let broker = Broker::start(Engine::Kafka);
    let log = KafkaLog::connect(KafkaLogConfig::new(&broker.addr, &broker.topic))
        .await
        .expect("connect");
    let acks = log
        .append(
            (0..10)
                .map(|i| record("acme:u:1", &format!("{{\"n\":{i}}}")))
                .chain(std::iter::once(record("acme:u:2", "{}")))
                .collect(),
        )
        .await
        .expect("append");
    let partition = acks[0].partition;
    let cut = acks[6].offset;
    log.delete_before(partition, cut).await.expect("delete");
    let left = log.read(partition, 0, 100).await.expect("read");
    let offsets: Vec<u64> = left.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (cut..cut + 4).collect::<Vec<u64>>(), "{offsets:?}");
    let other = acks[10];
    if other.partition != partition {
        let kept = log.read(other.partition, 0, 10).await.expect("read");
        assert_eq!(kept.len(), 1, "another partition is untouched");
    }
    let more = log
        .append(vec![record("acme:u:1", "{}")])
        .await
        .expect("append");
    assert_eq!(more[0].offset, acks[9].offset + 1, "offsets are not reused");
    log.close().await.expect("close");
}
