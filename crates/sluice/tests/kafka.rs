//! sluice on Kafka, as a user runs it: `sluice serve --log kafka://...` against a broker of each
//! test's own — real Apache Kafka 4.1 (KRaft), and tansu as a fast extra case — and independent
//! Kafka clients reading and writing the same topic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::client::Connection;
use sluice_index::Index;
use sluice_log::kafka::testing::{committed_offsets, read_topic};
use sluice_log::{KafkaLog, KafkaLogConfig, Log, Record};

#[macro_use]
mod support;
use support::Server;
use support::{Broker, Engine};

on_both_brokers!(
    members_joining_under_load_rebalance_without_losing_or_doubling_anything,
    serve_on_kafka_indexes_every_acknowledged_message_and_commits_it_on_sigterm,
    an_independent_kafka_client_reads_what_sluice_writes_and_sluice_ingests_what_it_writes,
    sigkill_of_serve_on_kafka_under_load_loses_and_doubles_nothing,
    without_spilling_a_frozen_broker_is_a_503_with_retry_after_within_the_ack_timeout,
    api_and_ingest_nodes_share_kafka_postgres_redis_and_opensearch,
);

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
    committed_offsets(brokers, group, "sluice.ingest", 8)
        .into_iter()
        .enumerate()
        .map(|(p, offset)| (p as i32, offset as i64))
        .collect()
}

/// Per partition, how many records `per_user` records for each of `users` users named
/// `<prefix><n>` in org `default` make: the end offsets (offsets start at 0 and have no gaps
/// without transactions; tansu's own high watermark lags, so it is not used).
fn records_per_partition(prefix: &str, users: usize, per_user: usize) -> BTreeMap<i32, i64> {
    let mut counts: BTreeMap<i32, i64> = (0..8).map(|p| (p, 0)).collect();
    for u in 0..users {
        let key = format!("default:u:{prefix}{u}");
        let partition = sluice_model::partition_for_key(key.as_bytes(), 8) as i32;
        *counts.entry(partition).or_default() += per_user as i64;
    }
    counts
}

/// `sluice serve` flags for a node on `broker`: a short session timeout (so a stopped member
/// is noticed within the test) and short batches.
fn serve_args(broker: &Broker) -> Vec<String> {
    [
        "--log".to_string(),
        format!("kafka://{}", broker.addr),
        "--kafka-session-timeout".into(),
        "6s".into(),
        "--batch-timeout".into(),
        "50ms".into(),
    ]
    .into()
}

async fn serve_on_kafka_indexes_every_acknowledged_message_and_commits_it_on_sigterm(
    engine: Engine,
) {
    let broker = Broker::start(engine);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    // A trigger rule writing to the actions topic (created by sluice).
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        "[[triggers]]\nname = \"crm\"\nevent = \"signedUp\"\ntopic = \"sluice.actions\"\n",
    )
    .expect("write config");
    let mut args = serve_args(&broker);
    args.extend(["--config".to_string(), config.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start(&data, &args);
    let key = server.first_key.clone().expect("first start prints a key");

    load(server.addr, &key).await;
    wait_indexed(server.addr, &key).await;

    // Graceful stop: everything processed is committed, up to the end of every partition.
    let status = server.sigterm();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        committed(&broker.addr, "sluice-pipeline"),
        records_per_partition("k-", USERS, 2 * ROUNDS),
        "every partition committed up to its end"
    );

    // A restart resumes after the commit: the data is still there and nothing is redone.
    support::run_ok(support::sluice(&data).args(["users", "ban", "--org", "default", "banned"]));
    let server = Server::start(&data, &args);
    let mut conn = Connection::connect(server.addr).await.expect("connect");
    let (status, profile) = get(&mut conn, &key, "/api/users/k-7").await;
    assert_eq!(status, 200);
    assert_eq!(profile["dataFields"], json!({"round": ROUNDS - 1, "u": 7}));
    let (_, events) = get(&mut conn, &key, "/api/users/k-7/events?limit=1000").await;
    assert_eq!(events["events"].as_array().map_or(0, Vec::len), ROUNDS);

    // A signup fires the trigger: a record on sluice.actions, keyed like the event, with the
    // profile at the signup.
    post(
        &mut conn,
        &key,
        "/api/events/track",
        json!({"userId": "k-7", "eventName": "signedUp", "id": "welcome-1"}),
    )
    .await;
    let action = first_keyed(&broker.addr, "sluice.actions", b"default:u:k-7");
    assert_eq!(
        action["idempotencyKey"], "default:welcome-1:crm",
        "{action}"
    );
    assert_eq!(
        action["profile"]["dataFields"],
        json!({"round": ROUNDS - 1, "u": 7})
    );

    // A message of a banned user becomes a record of the dead-letter topic, under its key.
    post(
        &mut conn,
        &key,
        "/api/events/track",
        json!({"userId": "banned", "eventName": "e", "id": "dead-1"}),
    )
    .await;
    let letter = first_keyed(&broker.addr, "sluice.dlq", b"default:u:banned");
    assert_eq!(letter["stage"], "validate", "{letter}");
    assert_eq!(letter["messageId"], "dead-1", "{letter}");
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("banned")),
        "{letter}"
    );

    // With Kafka, `sluice dlq` works while the server runs: list the letter, lift the ban,
    // replay it, and the server processes it.
    let dlq = |extra: &[&str]| {
        let mut cmd = support::sluice(&data);
        cmd.args(&args).arg("dlq").args(extra);
        support::run_ok(&mut cmd)
    };
    let listed = dlq(&["list", "--json"]);
    let letters: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(letters.len(), 1, "{listed}");
    assert_eq!(letters[0]["messageId"], "dead-1");
    support::run_ok(support::sluice(&data).args(["users", "unban", "--org", "default", "banned"]));
    // The pipeline sees the lifted ban within key_cache_ttl (5 s); replayed sooner, the
    // message would be refused again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let out = dlq(&["replay", "--all"]);
    assert!(out.contains("1 messages appended to the log"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, events) = get(&mut conn, &key, "/api/users/banned/events").await;
        if events["events"][0]["messageId"] == "dead-1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replayed letter was not processed: {events}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(dlq(&["list", "--json"]).contains("\"replayed\":true"));
}

/// The JSON value of the first record of `topic` (8 partitions) keyed `key`, waiting up to
/// 60 s for it.
fn first_keyed(brokers: &str, topic: &str, key: &[u8]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = read_topic(brokers, topic, 8)
            .into_iter()
            .find(|r| r.key == key);
        if let Some(record) = found {
            return serde_json::from_slice(&record.value).expect("JSON");
        }
        assert!(
            Instant::now() < deadline,
            "no record keyed {:?} on {topic} within 60 s",
            String::from_utf8_lossy(key)
        );
    }
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

async fn an_independent_kafka_client_reads_what_sluice_writes_and_sluice_ingests_what_it_writes(
    engine: Engine,
) {
    let broker = Broker::start(engine);
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

/// The stores in-process members share, under `dir`: a registry with the default org, a dedup
/// store and an index.
async fn member_stores(
    dir: &std::path::Path,
) -> (
    Arc<dyn sluice_registry::Registry>,
    Arc<dyn sluice_dedup::Dedup>,
    Arc<sluice_index::EmbeddedIndex>,
) {
    let (registry, _key) = support::registry_with_key(dir).await;
    let dedup: Arc<dyn sluice_dedup::Dedup> = Arc::new(
        sluice_dedup::EmbeddedDedup::open(&dir.join("dedup"), Duration::from_secs(3600))
            .expect("dedup"),
    );
    (registry, dedup, support::embedded_index(dir))
}

/// One ingest "node" in this process: its own Kafka consumer (group member) running the
/// pipeline into the shared dedup store and index.
struct Member {
    stop: sluice_pipeline::Stopper,
    task: tokio::task::JoinHandle<Result<(), sluice_pipeline::PipelineError>>,
    log: Arc<KafkaLog>,
    stats: Arc<sluice_pipeline::PipelineStats>,
}

async fn member(
    brokers: &str,
    name: &str,
    registry: Arc<dyn sluice_registry::Registry>,
    dedup: Arc<dyn sluice_dedup::Dedup>,
    index: Arc<dyn sluice_index::Index>,
) -> Member {
    let mut config = KafkaLogConfig::new(brokers, "sluice.ingest");
    config.session_timeout = Duration::from_secs(6);
    config.instance_id = Some(name.to_string());
    let log = Arc::new(KafkaLog::connect(config).await.expect("connect"));
    let mut dlq = KafkaLogConfig::new(brokers, "sluice.dlq");
    dlq.other_topics = Vec::new();
    let dlq = Arc::new(
        KafkaLog::connect(dlq)
            .await
            .expect("connect the dead-letter topic"),
    );
    let pipeline = sluice_pipeline::Pipeline::new(
        Arc::clone(&log) as Arc<dyn Log>,
        dlq,
        sluice_pipeline::validate::Validator::new(registry, Duration::from_secs(5)),
        dedup,
        index,
        sluice_pipeline::PipelineConfig {
            batch: sluice_pipeline::batch::BatchConfig {
                max_records: 500,
                timeout: Duration::from_millis(50),
            },
            ..sluice_pipeline::PipelineConfig::default()
        },
    );
    let stats = pipeline.stats();
    let (stop, stop_rx) = sluice_pipeline::stop::channel();
    let task = tokio::spawn(pipeline.run(stop_rx));
    Member {
        stop,
        task,
        log,
        stats,
    }
}

impl Member {
    /// Graceful stop: every partition finishes and commits its batch, then leaves.
    async fn stop(self) {
        self.stop.stop();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("stops within 30 s")
            .expect("no panic")
            .expect("no pipeline error");
        self.log.close().await.expect("close");
    }

    /// Waits until the pipeline has rejoined its group at least `n` times since start.
    async fn wait_rejoins(&self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self
            .stats
            .rejoins
            .load(std::sync::atomic::Ordering::Relaxed)
            < n
        {
            assert!(Instant::now() < deadline, "{n} rejoins within {within:?}");
            assert!(!self.task.is_finished(), "the pipeline stopped");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A log record in the documented format: update `seq` of user `u`, or its event `seq`.
fn log_record(u: usize, seq: usize, event: bool) -> Record {
    let value = if event {
        json!({"v": 1, "kind": "event", "org": "default", "messageId": format!("ev-{u}-{seq}"),
               "userId": format!("r-{u}"), "eventName": "step", "receivedAt": 1_700_000_000_000_i64,
               "createdAt": 1_700_000_000_000_i64 + seq as i64, "dataFields": {"seq": seq}})
    } else {
        json!({"v": 1, "kind": "user_update", "org": "default", "messageId": format!("up-{u}-{seq}"),
               "userId": format!("r-{u}"), "receivedAt": 1_700_000_000_000_i64,
               "dataFields": {"seq": seq, "u": u}})
    };
    Record {
        key: format!("default:u:r-{u}").into_bytes(),
        value: value.to_string().into_bytes(),
        timestamp_ms: 1_700_000_000_000,
    }
}

/// Appends step `step` of every user: its update, then its event.
async fn append_step(log: &KafkaLog, users: usize, step: usize) {
    let records: Vec<Record> = (0..users)
        .flat_map(|u| [log_record(u, step, false), log_record(u, step, true)])
        .collect();
    log.append(records).await.expect("append");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Waits until every user's profile shows its last step and it has all `steps` events, never
/// more (an event indexed twice would show up here: ids are per step).
async fn wait_complete(index: &dyn Index, users: usize, steps: usize) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for u in 0..users {
        let user_key = format!("u:r-{u}");
        loop {
            let profile = index.get_user("default", &user_key).await.expect("read");
            let events = index
                .user_events("default", &user_key, 10_000)
                .await
                .expect("events");
            assert!(
                events.len() <= steps,
                "user r-{u}: {} events, some twice",
                events.len()
            );
            let last = profile.as_ref().map(|p| p["dataFields"]["seq"].clone());
            if last == Some(json!(steps - 1)) && events.len() == steps {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "user r-{u} not complete within 90 s: last update {last:?}, {} events",
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn members_joining_under_load_rebalance_without_losing_or_doubling_anything(engine: Engine) {
    const USERS: usize = 40;
    const STEPS: usize = 300;
    let broker = Broker::start(engine);
    let dir = tempfile::tempdir().expect("tempdir");
    let (registry, dedup, index) = member_stores(dir.path()).await;
    let shared = |index: &Arc<sluice_index::EmbeddedIndex>| {
        Arc::clone(index) as Arc<dyn sluice_index::Index>
    };

    let producer = KafkaLog::connect(KafkaLogConfig::new(&broker.addr, "sluice.ingest"))
        .await
        .expect("producer");
    let a = member(
        &broker.addr,
        "node-a",
        Arc::clone(&registry),
        Arc::clone(&dedup),
        shared(&index),
    )
    .await;

    // Steps go out in order per user, one append per step for all users; a second member joins
    // a third of the way in and a third member two thirds in: rebalances under load.
    let mut b = None;
    let mut c = None;
    for step in 0..STEPS {
        append_step(&producer, USERS, step).await;
        let joining = match step {
            s if s == STEPS / 3 => Some(("node-b", &mut b)),
            s if s == 2 * STEPS / 3 => Some(("node-c", &mut c)),
            _ => None,
        };
        if let Some((name, slot)) = joining {
            let registry = Arc::clone(&registry);
            *slot = Some(
                member(
                    &broker.addr,
                    name,
                    registry,
                    Arc::clone(&dedup),
                    shared(&index),
                )
                .await,
            );
        }
    }
    wait_complete(index.as_ref(), USERS, STEPS).await;

    // Graceful stops: each member finishes and commits its batches.
    for member in [Some(a), b, c].into_iter().flatten() {
        member.stop().await;
    }
    // Every partition is committed up to its end.
    let expected = records_per_partition("r-", USERS, 2 * STEPS);
    assert_eq!(committed(&broker.addr, "sluice-pipeline"), expected);
}

/// Kafka fences a static member whose instance id another member joined under (FENCED_INSTANCE_ID,
/// fatal to the consumer). Kafka 4.1 also fences a member by its own id when a JoinGroup answer
/// is lost in a coordinator failover (the broker test hit that). A fenced member's pipeline
/// rejoins and goes on, losing and doubling nothing; two live members under one id fence each
/// other until one stops with an error that says so; the other goes on alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_member_rejoins_and_of_two_members_under_one_id_one_stops_with_a_clear_error() {
    const USERS: usize = 20;
    const STEPS: usize = 100;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let broker = Broker::start(Engine::Kafka);
    let dir = tempfile::tempdir().expect("tempdir");
    let (registry, dedup, index) = member_stores(dir.path()).await;
    let node = |name: &'static str| {
        member(
            &broker.addr,
            name,
            Arc::clone(&registry),
            Arc::clone(&dedup),
            Arc::clone(&index) as Arc<dyn Index>,
        )
    };
    let producer = KafkaLog::connect(KafkaLogConfig::new(&broker.addr, "sluice.ingest"))
        .await
        .expect("producer");

    // 1. One member; an intruder joins under its id, fencing it, and stops again.
    let a = node("twin").await;
    for step in 0..STEPS / 2 {
        append_step(&producer, USERS, step).await;
    }
    wait_complete(index.as_ref(), USERS, STEPS / 2).await;
    let intruder = node("twin").await;
    a.wait_rejoins(1, Duration::from_secs(30)).await;
    intruder.stop().await;
    for step in STEPS / 2..STEPS {
        append_step(&producer, USERS, step).await;
    }
    wait_complete(index.as_ref(), USERS, STEPS).await;
    assert!(!a.task.is_finished(), "the fenced member still runs");
    a.stop().await;
    let expected = records_per_partition("r-", USERS, 2 * STEPS);
    assert_eq!(committed(&broker.addr, "sluice-pipeline"), expected);

    // 2. Two live members under one id: each rejoin fences the other, until one gives up with
    // an error that says why; the other goes on as the id's only member.
    let (mut first, mut second) = (node("twin").await, node("twin").await);
    let ended = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::select! {
            ended = &mut first.task => (ended, second),
            ended = &mut second.task => (ended, first),
        }
    })
    .await;
    let (ended, survivor) = ended.expect("a member under a shared id stops within 120 s");
    let error = ended
        .expect("no panic")
        .expect_err("a member under a shared id fails")
        .to_string();
    assert!(
        error.contains("another node running with the same instance id"),
        "the error says why: {error}"
    );
    for step in STEPS..STEPS + 10 {
        append_step(&producer, USERS, step).await;
    }
    wait_complete(index.as_ref(), USERS, STEPS + 10).await;
    survivor.stop().await;
    let expected = records_per_partition("r-", USERS, 2 * (STEPS + 10));
    assert_eq!(committed(&broker.addr, "sluice-pipeline"), expected);
}

async fn sigkill_of_serve_on_kafka_under_load_loses_and_doubles_nothing(engine: Engine) {
    let broker = Broker::start(engine);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let args = serve_args(&broker);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut key = None;
    let mut acked: Vec<String> = Vec::new();
    // Killed while clients write and the pipeline indexes; restarted under the same static
    // member id, it resumes from its last commits.
    for (round, run_for) in [2500u64, 1500].into_iter().enumerate() {
        let mut server = Server::start(&data, &args);
        key = key.or_else(|| server.first_key.clone());
        let key = key.clone().expect("key from the first start");
        let run_for = Duration::from_millis(run_for);
        acked.extend(support::load_then_kill(&mut server, &key, 8, round, run_for, 300).await);
    }
    assert!(
        acked.len() > 500,
        "the load did real work: {} acks",
        acked.len()
    );
    let mut server = Server::start(&data, &args);
    let key = key.expect("key");
    support::wait_for_sentinels(server.addr, &key).await;
    assert!(server.sigterm().success());

    let values: Vec<Vec<u8>> = read_topic(&broker.addr, "sluice.ingest", 8)
        .into_iter()
        .map(|r| r.value)
        .collect();
    let ids: std::collections::HashMap<String, usize> =
        values.iter().fold(Default::default(), |mut ids, v| {
            let v: Value = serde_json::from_slice(v).expect("record JSON");
            *ids.entry(v["messageId"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
            ids
        });
    for id in &acked {
        assert_eq!(
            ids.get(id),
            Some(&1),
            "acknowledged {id} is in the topic once"
        );
    }
    let values: Vec<Vec<u8>> = values
        .into_iter()
        .filter(|v| !String::from_utf8_lossy(v).contains("\"sentinel-"))
        .collect();
    eprintln!(
        "kafka crash test: {} acknowledged messages over 2 SIGKILLs, {} records in the topic",
        acked.len(),
        values.len()
    );
    support::check_index_matches_log(&data.join("index"), &values).await;
}

/// With spilling disabled (`spill_max_bytes = 0`), a broker that does not acknowledge is a
/// 503 at the ack timeout. (With it, the default, see `tests/spill.rs`.)
async fn without_spilling_a_frozen_broker_is_a_503_with_retry_after_within_the_ack_timeout(
    engine: Engine,
) {
    let broker = Broker::start(engine);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("kafka://{}", broker.addr);
    let server = Server::start(
        &dir.path().join("node"),
        &[
            "--log",
            url.as_str(),
            "--log-ack-timeout",
            "1s",
            "--spill-max-bytes",
            "0",
        ],
    );
    let key = server.first_key.clone().expect("key");
    let mut conn = Connection::connect(server.addr).await.expect("connect");
    let event = |n: usize| json!({"userId": "f-1", "eventName": "e", "id": format!("f-{n}")});
    post(&mut conn, &key, "/api/events/track", event(0)).await;

    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &broker.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    signal("-STOP");
    let started = Instant::now();
    let reply = conn
        .post(
            "/api/events/track",
            &[("api-key", key.as_str())],
            event(1).to_string().into(),
        )
        .await
        .expect("request");
    let waited = started.elapsed();
    signal("-CONT");
    assert_eq!(reply.status.as_u16(), 503, "{}", reply.json());
    assert!(
        reply.headers.contains_key("retry-after"),
        "{:?}",
        reply.headers
    );
    assert!(
        reply.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not acknowledge")),
        "{}",
        reply.json()
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "answered after {waited:?}"
    );

    // The broker is back: requests succeed again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = conn
            .post(
                "/api/events/track",
                &[("api-key", key.as_str())],
                event(2).to_string().into(),
            )
            .await
            .expect("request");
        if reply.status.as_u16() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after the broker resumed",
            reply.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The distributed shape: a `sluice api` node and a `sluice ingest` node, sharing only Kafka,
/// PostgreSQL (the registry, managed by admin commands from a third data dir), Redis (dedup) and
/// OpenSearch (the index). What the API node accepts, the ingest node indexes, and the API
/// node reads it back from the shared index.
async fn api_and_ingest_nodes_share_kafka_postgres_redis_and_opensearch(engine: Engine) {
    let broker = Broker::start(engine);
    let stores = support::SharedStores::new("nodes", &broker.addr);
    // Real Kafka goes with real OpenSearch; tansu with osmem-server.
    let search = match engine {
        Engine::Kafka => &support::opensearch().url,
        Engine::Tansu => &support::osmem().url,
    };
    let args = stores.args(search, Duration::from_secs(6));
    let shared = support::strs(&args);
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = dir.path().join("admin");
    let key = support::org_with_key(&admin, &stores.registry(), "acme");
    let mut api = Server::start_as("api", &dir.path().join("api"), &shared);
    assert!(api.first_key.is_none(), "the registry already has an org");
    let mut ingest = Server::start_as("ingest", &dir.path().join("ingest"), &shared);

    let mut conn = Connection::connect(api.addr).await.expect("connect");
    for i in 0..20 {
        post(
            &mut conn,
            &key,
            "/api/users/update",
            json!({"userId": format!("n{i}"), "id": format!("up-{i}"), "dataFields": {"plan": if i % 2 == 0 {"pro"} else {"free"}}}),
        )
        .await;
        post(
            &mut conn,
            &key,
            "/api/events/track",
            json!({"userId": format!("n{i}"), "eventName": "signedUp", "id": format!("ev-{i}")}),
        )
        .await;
    }
    // Read back through the API node, which reads the index the ingest node writes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&mut conn, &key, "/api/users/n19/events").await;
        if status == 200 && body["events"].as_array().is_some_and(|e| !e.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "indexed within 60 s: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // n4 is on another partition than n19, which may be processed a moment later.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, profile) = loop {
        let (status, profile) = get(&mut conn, &key, "/api/users/n4").await;
        if status != 404 || Instant::now() > deadline {
            break (status, profile);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (status, &profile["dataFields"]),
        (200, &json!({"plan": "pro"}))
    );
    // Searchable within the index's refresh interval (1 s on a real cluster; reads by id, above,
    // see a write at once).
    let deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let found = post(
            &mut conn,
            &key,
            "/api/search/users",
            json!({"query": "dataFields.plan:pro", "size": 0, "aggs": {"plans": {"terms": {"field": "dataFields.plan"}}}}),
        )
        .await;
        if found["total"] == 10 || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(found["total"], 10, "{found}");
    assert_eq!(
        found["aggregations"]["plans"]["buckets"][0]["key"], "pro",
        "{found}"
    );
    // Marks are in the shared Redis, under this test's prefix.
    let marks = support::redis_cli(
        support::redis_url(),
        &["--scan", "--pattern", &format!("{}:acme:*", stores.keys.0)],
    );
    assert_eq!(marks.lines().count(), 40, "{marks}");
    // The ingest node serves its operations routes: its pipeline's /stats and the dashboard;
    // anything else is a 404 that names the route.
    let mut ops = Connection::connect(ingest.addr)
        .await
        .expect("connect to the ingest node");
    let stats = ops.get("/stats", &[]).await.expect("stats");
    assert_eq!(stats.status, 200);
    let stats = stats.json();
    assert_eq!(stats["role"], "ingest", "{stats}");
    assert!(
        stats["pipeline"]["events_indexed_total"].as_u64() >= Some(20),
        "{stats}"
    );
    assert_eq!(stats["backends"]["dedup"], "ok", "{stats}");
    let page = ops.get("/", &[]).await.expect("dashboard");
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("<title>sluice</title>"));
    let unknown = ops
        .get("/dashboard/nope", &[])
        .await
        .expect("unknown route");
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("/dashboard/nope")),
        "the 404 names the route"
    );
    assert!(ingest.sigterm().success());
    assert!(api.sigterm().success());
}
