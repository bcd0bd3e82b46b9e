//! The zero-loss bridge (SPEC §7) on a real broker: a `sluice api` node and a `sluice ingest`
//! node on tansu (Kafka protocol) and a PostgreSQL registry, under steady load from many
//! concurrent clients mixing user updates, events and SendGrid webhooks.
//!
//! 1. The broker is frozen (SIGSTOP) for 30 s, then resumed: the API spills and keeps
//!    answering 200, and replays once the broker is back.
//! 2. The broker is frozen again and the API process is SIGKILLed while spilling, then
//!    restarted while the broker is still frozen: it starts in spill mode, behind what the
//!    buffer held, and replays it all once the broker resumes.
//!
//! Afterwards: the buffer is empty; every acknowledged message is in the index exactly once in
//! effect; each user's messages are in the log, first copies taken (what dedup lets through),
//! in the order they were acknowledged; and no request got anything but a 200 (the requests
//! in flight on the killed process get a broken connection; they are sent again, same ids).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::client::Connection;
use sluice_index::{EmbeddedIndex, EmbeddedIndexConfig, Index};
use sluice_log::kafka::testing::{committed_offsets, end_offsets, read_topic};

#[macro_use]
mod support;
use support::Server;
use support::{Broker, Engine};

mod tansu {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frozen_broker_and_a_killed_api_lose_nothing_and_keep_each_users_order() {
        super::a_frozen_broker_and_a_killed_api_lose_nothing_and_keep_each_users_order(
            super::support::Engine::Tansu,
        )
        .await
    }
}

mod kafka {
    /// This failed once in CI (the pipeline never caught up), with no server log to show why.
    /// The likely cause is what `tests/brokers.rs` then showed: a broker restart made the
    /// coordinator fence the server's own static member, which stopped the pipeline and the
    /// server; a fenced member now rejoins. A failing run now prints the server's log tail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frozen_broker_and_a_killed_api_lose_nothing_and_keep_each_users_order() {
        super::a_frozen_broker_and_a_killed_api_lose_nothing_and_keep_each_users_order(
            super::support::Engine::Kafka,
        )
        .await
    }
}

const ORG: &str = "acme";
const CLIENTS: usize = 12;
/// Pause between a client's requests: steady load, not a flood.
const PACE: Duration = Duration::from_millis(10);

/// What a client had acknowledged, in order: (record key, message id).
#[derive(Default)]
struct Acked {
    messages: Vec<(String, String)>,
    /// Last acknowledged update per user id: its dataFields.
    last_update: HashMap<String, Value>,
    /// Acknowledged events per user key (`u:<id>` or `e:<email>`).
    events: HashMap<String, Vec<String>>,
}

#[derive(Default)]
struct Counts {
    ok: AtomicUsize,
    /// Answers other than 200: must stay 0.
    errors: AtomicUsize,
    /// When requests lost their connection (only when the API process is killed).
    broken: std::sync::Mutex<Vec<Instant>>,
}

/// What a request acknowledges when answered 200: (record key, message id, and for a user
/// update its dataFields).
type Acknowledges = Vec<(String, String, Option<Value>)>;

/// The `seq`-th request of client `c` in `round`: user updates, single and bulk events for
/// the client's users, and SendGrid webhooks for its email addresses. Returns the path, the
/// body, and what it acknowledges when answered 200: (record key, message id, update fields).
fn request(c: usize, round: usize, seq: usize, key: &str) -> (String, Value, Acknowledges) {
    let id = |item: usize| format!("r{round}-c{c}-{seq}-{item}");
    let user = |n: usize| format!("s{c}-u{n}");
    match seq % 5 {
        0 | 1 => {
            let fields = json!({"seq": seq, "round": round});
            let body = json!({"userId": user(seq % 3), "id": id(0), "dataFields": fields});
            let acked = vec![(format!("u:{}", user(seq % 3)), id(0), Some(fields))];
            ("/api/users/update".into(), body, acked)
        }
        2 => {
            let events: Vec<Value> = (0..5)
                .map(|i| json!({"userId": user(i % 3), "eventName": "e", "id": id(i), "dataFields": {"seq": seq}}))
                .collect();
            let acked = (0..5)
                .map(|i| (format!("u:{}", user(i % 3)), id(i), None))
                .collect();
            (
                "/api/events/trackBulk".into(),
                json!({"events": events}),
                acked,
            )
        }
        3 => {
            let email = |i: usize| format!("s{c}-m{}@example.test", i % 2);
            let events: Vec<Value> = (0..3)
                .map(|i| json!({"email": email(i), "event": if i == 0 {"delivered"} else {"open"}, "sg_event_id": id(i), "timestamp": 1_700_000_000 + seq}))
                .collect();
            let acked = (0..3)
                .map(|i| (format!("e:{}", email(i)), id(i), None))
                .collect();
            (
                format!("/webhooks/sendgrid?key={key}"),
                Value::Array(events),
                acked,
            )
        }
        _ => {
            let body = json!({"userId": user(seq % 3), "eventName": "single", "id": id(0)});
            (
                "/api/events/track".into(),
                body,
                vec![(format!("u:{}", user(seq % 3)), id(0), None)],
            )
        }
    }
}

/// One client: requests one after another until `until`; a request whose connection breaks
/// is sent again (same ids) once the server answers again.
async fn client(
    addr: SocketAddr,
    key: String,
    c: usize,
    round: usize,
    until: Instant,
    counts: Arc<Counts>,
) -> Acked {
    let mut acked = Acked::default();
    let mut conn: Option<Connection> = None;
    let mut seq = 0;
    while Instant::now() < until {
        let (path, body, messages) = request(c, round, seq, &key);
        if conn.is_none() {
            conn = Connection::connect(addr).await.ok();
        }
        let Some(open) = conn.as_mut() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        match open
            .post(&path, &[("api-key", &key)], body.to_string().into())
            .await
        {
            Ok(reply) if reply.status == 200 => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                for (user, id, fields) in messages {
                    match fields {
                        Some(fields) => {
                            acked.last_update.insert(user.clone(), fields);
                        }
                        None => acked
                            .events
                            .entry(user.clone())
                            .or_default()
                            .push(id.clone()),
                    }
                    acked.messages.push((user, id));
                }
                seq += 1;
                tokio::time::sleep(PACE).await;
            }
            Ok(reply) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("error answer {}: {}", reply.status, reply.json());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => {
                counts.broken.lock().expect("lock").push(Instant::now());
                conn = None;
            }
        }
    }
    acked
}

async fn readyz(addr: SocketAddr) -> Value {
    let mut conn = Connection::connect(addr).await.expect("connect");
    conn.get("/readyz", &[]).await.expect("readyz").json()
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([name, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {name} {pid}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn a_frozen_broker_and_a_killed_api_lose_nothing_and_keep_each_users_order(engine: Engine) {
    let broker = Broker::start(engine);
    let schema = sluice_registry::testing::Schema::create();
    let registry = schema.url();
    let log = format!("kafka://{}", broker.addr);
    let listen = format!("127.0.0.1:{}", free_port());
    let shared = [
        "--log",
        log.as_str(),
        "--registry",
        registry.as_str(),
        "--kafka-session-timeout",
        "6s",
        "--batch-timeout",
        "50ms",
    ];
    let api_args: Vec<&str> = shared
        .iter()
        .copied()
        .chain([
            "--listen",
            listen.as_str(),
            "--log-ack-timeout",
            "2s",
            "--replay-interval",
            "200ms",
        ])
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = dir.path().join("admin");
    let api_dir = dir.path().join("api");
    let ingest_dir = dir.path().join("ingest");
    let key = support::org_with_key(&admin, &registry, ORG);
    let mut api = Server::start_as("api", &api_dir, &api_args);
    let mut ingest = Server::start_as("ingest", &ingest_dir, &shared);
    let addr = api.addr;
    let counts = Arc::new(Counts::default());
    let start_clients = |round: usize, until: Instant| -> Vec<tokio::task::JoinHandle<Acked>> {
        (0..CLIENTS)
            .map(|c| {
                tokio::spawn(client(
                    addr,
                    key.clone(),
                    c,
                    round,
                    until,
                    Arc::clone(&counts),
                ))
            })
            .collect()
    };
    let mut acked: Vec<Acked> = Vec::new();

    // 1. Frozen for 30 s under load.
    let until = Instant::now() + Duration::from_secs(45);
    let clients = start_clients(0, until);
    tokio::time::sleep(Duration::from_secs(5)).await;
    signal(broker.pid(), "-STOP");
    tokio::time::sleep(Duration::from_secs(30)).await;
    let frozen = readyz(addr).await;
    signal(broker.pid(), "-CONT");
    for c in clients {
        acked.push(c.await.expect("client"));
    }
    assert_eq!(frozen["log"], "spilling", "{frozen}");
    assert_eq!(frozen["status"], "ready", "spilling is ready: {frozen}");
    let spilled_in_run_1 = frozen["spill"]["spilled_total"].as_u64().unwrap_or(0);
    assert!(spilled_in_run_1 > 1000, "the freeze was spilled: {frozen}");
    assert!(counts.broken.lock().expect("lock").is_empty());
    let ok_in_run_1 = counts.ok.load(Ordering::Relaxed);

    // 2. Frozen again; the API is killed while spilling and restarted while still frozen.
    let until = Instant::now() + Duration::from_secs(40);
    let clients = start_clients(1, until);
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(broker.pid(), "-STOP");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = readyz(addr).await;
        if status["spill"]["records"].as_u64().unwrap_or(0) > 500 {
            break;
        }
        assert!(Instant::now() < deadline, "never spilled: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let killed_at = Instant::now();
    api.sigkill();
    let held = sluice_spill::status_at(&api_dir.join("spill"), 1 << 30).expect("buffer status");
    assert!(held.records > 500, "{held:?}");
    let mut api = Server::start_as("api", &api_dir, &api_args);
    let restarted_at = Instant::now();
    assert_eq!(api.addr, addr);
    let restarted = readyz(addr).await;
    assert_eq!(
        restarted["log"], "spilling",
        "starts behind its buffer: {restarted}"
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal(broker.pid(), "-CONT");
    for c in clients {
        acked.push(c.await.expect("client"));
    }

    // The buffer drains and the API appends directly again.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = readyz(addr).await;
        if status["log"] == "ok" && status["spill"]["records"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the buffer did not drain: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = support::run_ok(support::sluice(&api_dir).args([
        "--listen",
        listen.as_str(),
        "buffer",
        "status",
    ]));
    assert!(
        text.contains("records: 0") && text.contains("direct"),
        "{text}"
    );

    // The pipeline catches up with the whole topic.
    let topic = read_topic(&broker.addr, "sluice.ingest", 8);
    let ends = end_offsets(&broker.addr, "sluice.ingest", 8);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let committed = committed_offsets(&broker.addr, "sluice-pipeline", "sluice.ingest", 8);
        if committed.iter().zip(&ends).all(|(c, e)| c >= e) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pipeline did not catch up within 180 s: committed {committed:?}, topic ends {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(ingest.sigterm().success());
    assert!(api.sigterm().success());
    let after = sluice_spill::status_at(&api_dir.join("spill"), 1 << 30).expect("buffer status");
    assert_eq!((after.records, after.spilling), (0, false), "{after:?}");

    let total_ok = counts.ok.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    let broken = counts.broken.lock().expect("lock").clone();
    let messages: usize = acked.iter().map(|a| a.messages.len()).sum();
    eprintln!(
        "spill chaos: {total_ok} requests answered 200 ({ok_in_run_1} in run 1), {messages} messages, {errors} errors, {} broken by the kill; {spilled_in_run_1} spilled in run 1, {} held at the kill; {} records in the topic",
        broken.len(),
        held.records,
        topic.len()
    );
    assert_eq!(errors, 0, "no request was refused");
    assert!(
        broken
            .iter()
            .all(|at| *at >= killed_at && *at <= restarted_at + Duration::from_secs(2)),
        "connections broke only when the API was killed: {:?} after the kill",
        broken
            .iter()
            .map(|at| at.saturating_duration_since(killed_at))
            .collect::<Vec<_>>()
    );

    // Per user, the first copy of each message in the log is in acknowledgement order.
    let mut seen = HashSet::new();
    let mut in_log: HashMap<String, Vec<String>> = HashMap::new();
    for r in &topic {
        let v: Value = serde_json::from_slice(&r.value).expect("record JSON");
        let id = v["messageId"].as_str().expect("messageId").to_string();
        if seen.insert(id.clone()) {
            let key = String::from_utf8_lossy(&r.key).into_owned();
            let user = key.strip_prefix("acme:").expect("org prefix").to_string();
            in_log.entry(user).or_default().push(id);
        }
    }
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for a in &acked {
        for (user, id) in &a.messages {
            expected.entry(user.clone()).or_default().push(id.clone());
        }
    }
    for (user, ids) in &expected {
        let logged: Vec<&String> = in_log
            .get(user)
            .map(|l| l.iter().filter(|id| ids.contains(id)).collect())
            .unwrap_or_default();
        assert_eq!(
            logged.len(),
            ids.len(),
            "{user}: every acknowledged message is in the log"
        );
        assert!(
            logged.iter().zip(ids).all(|(a, b)| *a == b),
            "{user}: the log has the acknowledged messages in acknowledgement order"
        );
    }

    // Exactly once in effect in the index.
    let index =
        EmbeddedIndex::open(EmbeddedIndexConfig::new(ingest_dir.join("index"))).expect("index");
    let mut last_update: HashMap<String, Value> = HashMap::new();
    let mut events: HashMap<String, Vec<String>> = HashMap::new();
    for a in acked {
        // Clients own disjoint users, and runs are in order: later runs override.
        last_update.extend(a.last_update);
        for (user, ids) in a.events {
            events.entry(user).or_default().extend(ids);
        }
    }
    for (user, fields) in &last_update {
        let profile = index
            .get_user(ORG, user)
            .await
            .expect("read")
            .unwrap_or_else(|| panic!("no profile for {user}"));
        assert_eq!(
            &profile["dataFields"], fields,
            "{user}: the last acknowledged update"
        );
    }
    let mut checked = 0;
    for (user, ids) in &events {
        assert!(
            ids.len() < sluice_index::MAX_SEARCH_SIZE,
            "{user}: {} events is more than one read returns; pace the load",
            ids.len()
        );
        let mut indexed: Vec<String> = index
            .user_events(ORG, user, 100_000)
            .await
            .expect("read")
            .iter()
            .map(|e| e["messageId"].as_str().unwrap_or("").to_string())
            .collect();
        indexed.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(
            indexed, want,
            "{user}: each acknowledged event exactly once"
        );
        checked += want.len();
    }
    eprintln!(
        "spill chaos: index matches: {} profiles, {checked} events",
        last_update.len()
    );
    index.close().await.expect("close");
}
