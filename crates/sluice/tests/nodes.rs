//! The distributed shape as processes: one `sluice api` and three `sluice ingest` nodes on a
//! real Apache Kafka 4.1 broker, PostgreSQL, Redis and a real OpenSearch node, under a mixed
//! load (single updates, event bulks, signups) with a welcome-email trigger rule pointed at a
//! real HTTP receiver. While the load runs:
//! 1. an ingest node is SIGKILLed: the survivors process its partitions within the session
//!    timeout + 5 s, and the node, started again, gets partitions back;
//! 2. an ingest node is stopped with SIGTERM and a new one joins;
//! 3. every ingest node is restarted in turn (a rolling restart).
//!
//! Afterwards every partition is committed to its end, every acknowledged message is in the
//! index once in effect, and each acknowledged signup fired its welcome under one
//! `Idempotency-Key`, repeated calls carrying the same payload: the dispatcher's partitions
//! (a group of its own on `sluice.actions`) failed over with the nodes, and it committed the
//! actions log to its end.
//!
//! And a stale writer: an ingest node whose profile write is on its way (held by a proxy) when
//! it loses its partitions (SIGSTOP past the session timeout) must not undo the newer writes of
//! the node that took them over when that late write lands.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::client::Connection;
use sluice_index::testing::FaultProxy;
use sluice_index::{ElasticIndex, ElasticIndexConfig, Index};
use sluice_log::kafka::testing::{committed_offsets, end_offsets};
use sluice_testkit::Kafka;

mod support;
use support::{Server, WebhookReceiver};

/// `--kafka-session-timeout` of every node.
const SESSION: Duration = Duration::from_secs(6);

/// One user per partition, named `probe-<round>-<n>`, so a probe touches every partition.
fn probe_users(round: usize) -> Vec<String> {
    let mut users: HashMap<u32, String> = HashMap::new();
    for n in 0.. {
        if users.len() == 8 {
            break;
        }
        let user = format!("probe-{round}-{n}");
        let partition = sluice_model::partition_for_key(format!("default:u:{user}").as_bytes(), 8);
        users.entry(partition).or_insert(user);
    }
    users.into_values().collect()
}

/// Posts an update of a user on every partition and returns how long until all of them are
/// readable through the API node (reads by id see a write at once), so some ingest node
/// processes every partition.
async fn probe(addr: SocketAddr, key: &str, round: usize, within: Duration) -> Duration {
    let start = Instant::now();
    let users = probe_users(round);
    for user in &users {
        let (status, body) = support::post(
            addr,
            key,
            "/api/users/update",
            json!({"userId": user, "id": user, "dataFields": {"probe": round}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut conn = Connection::connect(addr).await.expect("connect");
    let mut waiting: HashSet<&String> = users.iter().collect();
    while !waiting.is_empty() {
        assert!(
            start.elapsed() < within,
            "probe {round}: {waiting:?} not processed within {within:?}"
        );
        let mut done = Vec::new();
        for user in &waiting {
            let r = conn
                .get(&format!("/api/users/{user}"), &[("api-key", key)])
                .await
                .expect("read");
            if r.status == 200 && r.json()["dataFields"]["probe"] == round {
                done.push(*user);
            }
        }
        for user in done {
            waiting.remove(user);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// Signs up users `w<i>` one after another until `until`, retrying each until acknowledged;
/// returns how many were acknowledged.
async fn signups(addr: SocketAddr, key: String, until: Instant) -> usize {
    let mut i = 0;
    while Instant::now() < until {
        let body = json!({"userId": format!("w{i}"), "eventName": "signedUp", "id": format!("signup-{i}"),
                          "dataFields": {"n": i}});
        match Connection::connect(addr).await {
            Ok(mut conn) => {
                let r = conn
                    .post(
                        "/api/events/track",
                        &[("api-key", &key)],
                        body.to_string().into(),
                    )
                    .await;
                match r {
                    Ok(r) if r.status == 200 => i += 1,
                    Ok(r) if r.status == 503 => {}
                    Ok(r) => panic!("signup {i}: {} {:?}", r.status, r.json()),
                    Err(_) => {}
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    i
}

/// The ingest nodes, each on its own data directory (so its own static member id).
struct Nodes {
    dir: PathBuf,
    args: Vec<String>,
    running: Vec<(String, Server)>,
}

impl Nodes {
    fn data(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn start(&mut self, name: &str) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let server = Server::start_logging(
            "ingest",
            &self.data(name),
            &args,
            "warn,sluice_pipeline=info",
        );
        self.running.push((name.to_string(), server));
    }

    fn take(&mut self, name: &str) -> Server {
        let at = self
            .running
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} runs"));
        self.running.remove(at).1
    }

    fn names(&self) -> Vec<String> {
        self.running.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// How many times `data`'s node logged a partition assignment.
/// An ingest node serves its operations routes: ready with every backend it uses checked,
/// the pipeline's counters in `/metrics`, and nothing of the API.
async fn operations_only(name: &str, addr: SocketAddr) {
    let mut conn = Connection::connect(addr).await.expect("connect");
    let ready = conn.get("/readyz", &[]).await.expect("readyz");
    let body = ready.json();
    assert_eq!(ready.status, 200, "{name}: {body}");
    for backend in ["log", "index", "dedup", "registry"] {
        assert_eq!(body[backend], "ok", "{name}: {backend} in {body}");
    }
    let metrics = conn.get("/metrics", &[]).await.expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let batches = text
        .lines()
        .find_map(|l| l.strip_prefix("sluice_pipeline_batches_total "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(batches.is_some_and(|n| n >= 0.0), "{name}: {text}");
    assert!(text.contains("sluice_log_healthy 1"), "{name}: {text}");
    let api = conn.get("/api/users/x", &[]).await.expect("get");
    assert_eq!(api.status, 404, "{name}: an ingest node has no API routes");
}

fn assignments(data: &Path) -> usize {
    std::fs::read_to_string(data.with_extension("stderr.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("pipeline: partition assigned"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_nodes_fail_over_join_leave_and_roll_under_load_losing_and_doubling_nothing() {
    let kafka = Kafka::start(1, &[]);
    let receiver = WebhookReceiver::start(Duration::from_millis(2)).await;
    let stores = support::SharedStores::new("nodes", &kafka.bootstrap);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = vec![
        "--config".to_string(),
        support::welcome_config(dir.path(), &receiver.url("/ok")),
    ];
    args.extend(stores.args(&support::opensearch().url, SESSION));
    let key = support::org_with_key(&dir.path().join("admin"), &stores.registry(), "default");
    let mut api = Server::start_as("api", &dir.path().join("api"), &support::strs(&args));
    let addr = api.addr;
    let mut nodes = Nodes {
        dir: dir.path().to_path_buf(),
        args,
        running: Vec::new(),
    };
    for name in ["n1", "n2", "n3"] {
        nodes.start(name);
    }
    let settled = probe(addr, &key, 0, Duration::from_secs(60)).await;
    eprintln!("nodes: three ingest nodes process every partition after {settled:?}");
    for (name, node) in &nodes.running {
        operations_only(name, node.addr).await;
    }

    let until = Instant::now() + Duration::from_secs(80);
    let clients = support::retrying_clients(addr, &key, 6, until);
    let signing_up = tokio::spawn(signups(addr, key.clone(), until));
    tokio::time::sleep(Duration::from_secs(5)).await;

    // 1. SIGKILL: the survivors take the dead node's partitions once its session times out.
    nodes.take("n1").sigkill();
    let failover = probe(addr, &key, 1, SESSION + Duration::from_secs(5)).await;
    eprintln!("nodes: after a SIGKILL, every partition processed again within {failover:?}");
    let before = assignments(&nodes.data("n1"));
    nodes.start("n1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while assignments(&nodes.data("n1")) == before {
        assert!(
            Instant::now() < deadline,
            "the restarted node got no partition within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 2. One node leaves with SIGTERM, a new one joins.
    assert!(nodes.take("n2").sigterm().success(), "SIGTERM exits 0");
    nodes.start("n4");
    let joined = probe(addr, &key, 2, Duration::from_secs(30)).await;
    eprintln!("nodes: a node left and one joined; every partition processed within {joined:?}");

    // 3. Rolling restart.
    for (round, name) in nodes.names().into_iter().enumerate() {
        assert!(
            nodes.take(&name).sigterm().success(),
            "{name}: SIGTERM exits 0"
        );
        nodes.start(&name);
        let back = probe(addr, &key, 3 + round, Duration::from_secs(30)).await;
        eprintln!("nodes: {name} restarted; every partition processed within {back:?}");
    }
    assert!(
        Instant::now() < until,
        "the load outlasted the failures (make it longer)"
    );

    let mut acked = Vec::new();
    for c in clients {
        let (a, unavailable) = c.await.expect("client");
        assert_eq!(unavailable, 0, "Kafka stayed up: no 503");
        acked.extend(a);
    }
    let signed_up = signing_up.await.expect("signups");

    // Every partition committed to its end.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ends = end_offsets(&kafka.bootstrap, "sluice.ingest", 8);
        let committed = committed_offsets(&kafka.bootstrap, "sluice-pipeline", "sluice.ingest", 8);
        if committed == ends {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed {committed:?}, ends {ends:?} after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The dispatcher's group (whose partitions failed over with the nodes) delivers every
    // action and commits the actions log to its end.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ends = end_offsets(&kafka.bootstrap, "sluice.actions", 8);
        let committed =
            committed_offsets(&kafka.bootstrap, "sluice-dispatcher", "sluice.actions", 8);
        if committed == ends && receiver.distinct().len() >= signed_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dispatcher committed {committed:?}, actions log ends {ends:?}, {} of {signed_up} welcomes, after 60 s",
            receiver.distinct().len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut peaks = vec![format!("api {:.0}", api.peak_rss_mib().unwrap_or(0.0))];
    for (name, node) in &nodes.running {
        peaks.push(format!("{name} {:.0}", node.peak_rss_mib().unwrap_or(0.0)));
    }
    eprintln!("nodes: peak RSS, MiB: {}", peaks.join(", "));
    for (name, mut node) in std::mem::take(&mut nodes.running) {
        assert!(node.sigterm().success(), "{name}: SIGTERM exits 0");
    }
    assert!(api.sigterm().success());

    // The index holds every acknowledged message once in effect.
    let mut search = Connection::connect(
        support::opensearch()
            .url
            .trim_start_matches("http://")
            .parse()
            .expect("address"),
    )
    .await
    .expect("connect");
    let r = search
        .post(
            &format!("/{}-*/_refresh", stores.index_prefix),
            &[],
            Vec::new().into(),
        )
        .await
        .expect("refresh");
    assert_eq!(r.status.as_u16(), 200, "refresh: {}", r.json());
    let mut config = ElasticIndexConfig::new(&support::opensearch().url);
    config.prefix = stores.index_prefix.clone();
    let index = ElasticIndex::open(config).await.expect("index");
    support::check_index_matches_acked(&index, &acked).await;

    // One welcome per acknowledged signup, under one key; repeats carry the same payload.
    let calls = receiver.calls();
    let mut per_key: HashMap<String, Vec<Value>> = HashMap::new();
    for call in &calls {
        let key = call
            .idempotency_key
            .clone()
            .expect("every call has an Idempotency-Key");
        per_key.entry(key).or_default().push(call.body.clone());
    }
    let expected: HashSet<String> = (0..signed_up)
        .map(|i| format!("default:signup-{i}:welcome-email"))
        .collect();
    let got: HashSet<String> = per_key.keys().cloned().collect();
    assert_eq!(got, expected, "one welcome key per acknowledged signup");
    for (key, bodies) in &per_key {
        assert!(
            bodies.iter().all(|b| b == &bodies[0]),
            "{key}: a repeated call carries the same payload"
        );
    }
    let repeated = per_key.values().filter(|b| b.len() > 1).count();
    eprintln!(
        "nodes: {} messages and {signed_up} signups acknowledged, 0 answers 503; {} welcome calls, {} keys, {repeated} called more than once",
        acked.len(),
        calls.len(),
        per_key.len()
    );
}

/// The `dataFields` of user `x`, read by id (real-time) from the index.
async fn profile_x(index: &ElasticIndex) -> Value {
    index
        .get_user("default", "u:x")
        .await
        .expect("read")
        .map(|p| p["dataFields"].clone())
        .unwrap_or(Value::Null)
}

async fn wait_profile_x(index: &ElasticIndex, what: &str, test: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let profile = profile_x(index).await;
        if test(&profile) {
            return profile;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within 60 s: user x is {profile}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owners_late_profile_write_does_not_undo_the_new_owners() {
    let kafka = Kafka::start(1, &[]);
    let search = &support::opensearch().url;
    let proxy = FaultProxy::start(search);
    let stores = support::SharedStores::new("stale", &kafka.bootstrap);
    let dir = tempfile::tempdir().expect("tempdir");
    let args = |index: &str| stores.args(index, SESSION);
    let key = support::org_with_key(&dir.path().join("admin"), &stores.registry(), "default");
    let mut api = Server::start_as(
        "api",
        &dir.path().join("api"),
        &support::strs(&args(search)),
    );
    // A writes through the proxy; B straight to the node.
    let mut a = Server::start_as(
        "ingest",
        &dir.path().join("a"),
        &support::strs(&args(&proxy.url)),
    );
    let mut config = ElasticIndexConfig::new(search);
    config.prefix = stores.index_prefix.clone();
    let index = ElasticIndex::open(config).await.expect("index");
    let update = |step: usize, plan: &str| json!({"userId": "x", "id": format!("x-{step}"), "dataFields": {"step": step, "plan": plan}});
    let post = |body: Value| {
        let key = key.clone();
        async move {
            let (status, answer) = support::post(api.addr, &key, "/api/users/update", body).await;
            assert_eq!(status, 200, "{answer}");
        }
    };
    post(update(0, "trial")).await;
    wait_profile_x(&index, "A processes step 0", |p| p["step"] == 0).await;

    // A's write of step 1 is held on its way; A stops past its session.
    proxy.delay_bulks(Some(Duration::from_secs(25)));
    post(update(1, "free")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.bulks_held().0 == 0 {
        assert!(Instant::now() < deadline, "A sent no write within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let frozen = Command::new("kill")
        .args(["-STOP", &a.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(frozen.success());

    // B takes the partitions over from the last commit: steps 1 and 2.
    post(update(2, "pro")).await;
    let mut b = Server::start_as(
        "ingest",
        &dir.path().join("b"),
        &support::strs(&args(search)),
    );
    wait_profile_x(&index, "B processes steps 1 and 2", |p| p["step"] == 2).await;
    assert_eq!(
        proxy.bulks_held().1,
        0,
        "B wrote before A's held write landed (else the test proves nothing)"
    );

    // A's write of step 1 lands late: the profile stays at step 2.
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.bulks_held().1 == 0 {
        assert!(
            Instant::now() < deadline,
            "the held write was not forwarded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.delay_bulks(None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        profile_x(&index).await,
        json!({"step": 2, "plan": "pro"}),
        "the stale write did not undo the newer one"
    );

    // A comes back; the group goes on, whoever owns the partition.
    let thawed = Command::new("kill")
        .args(["-CONT", &a.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(thawed.success());
    post(update(3, "enterprise")).await;
    wait_profile_x(&index, "step 3 processed", |p| p["step"] == 3).await;
    assert!(a.sigterm().success(), "A: SIGTERM exits 0");
    assert!(b.sigterm().success(), "B: SIGTERM exits 0");
    assert!(api.sigterm().success());
    assert_eq!(
        profile_x(&index).await,
        json!({"step": 3, "plan": "enterprise"})
    );
}
