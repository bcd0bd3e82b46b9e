//! Set-up shared by the test files: the embedded backends in a temp dir, the API on a free
//! port (in process), and the `sluice` binary as a child process.

// Each test file uses the part it needs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::client::Connection;
use sluice_api::AppState;
use sluice_index::{EmbeddedIndex, EmbeddedIndexConfig};
use sluice_registry::SqliteRegistry;

/// The Kafka-protocol broker a test runs on: real Apache Kafka 4.1 (KRaft), or tansu, a fast
/// imitation kept as an extra case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Kafka,
    Tansu,
}

/// A broker of the test's own (the binary uses fixed topic and group names).
pub struct Broker {
    /// `127.0.0.1:PORT`, for `kafka://` URLs and `bootstrap.servers`.
    pub addr: String,
    kafka: Option<sluice_testkit::Kafka>,
    tansu: Option<sluice_log::kafka::testing::Tansu>,
}

impl Broker {
    pub fn start(engine: Engine) -> Broker {
        match engine {
            Engine::Kafka => {
                let kafka = sluice_testkit::Kafka::single();
                Broker {
                    addr: kafka.bootstrap.clone(),
                    kafka: Some(kafka),
                    tansu: None,
                }
            }
            Engine::Tansu => {
                let tansu = sluice_log::kafka::testing::Tansu::start();
                Broker {
                    addr: tansu.addr.clone(),
                    kafka: None,
                    tansu: Some(tansu),
                }
            }
        }
    }

    /// The broker's process id (its JVM for Kafka), to freeze it with SIGSTOP.
    pub fn pid(&self) -> u32 {
        match (&self.kafka, &self.tansu) {
            (Some(kafka), _) => kafka.pid(1).expect("the broker runs"),
            (_, Some(tansu)) => tansu.pid(),
            _ => unreachable!("a broker is one of the two"),
        }
    }
}

/// Instantiates each `async fn test(engine: Engine)` once per broker, as `kafka::test` and
/// `tansu::test`.
#[allow(unused_macros)]
macro_rules! on_both_brokers {
    ($($test:ident),* $(,)?) => {
        mod kafka {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::support::Engine::Kafka).await
            })*
        }
        mod tansu {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::support::Engine::Tansu).await
            })*
        }
    };
}

/// A registry in `dir` with its first org and key, as `sluice serve` creates them.
pub async fn registry_with_key(dir: &std::path::Path) -> (Arc<SqliteRegistry>, String) {
    let registry = Arc::new(
        SqliteRegistry::open(&dir.join("registry.db"))
            .await
            .expect("registry"),
    );
    let key = sluice_registry::bootstrap(registry.as_ref())
        .await
        .expect("bootstrap")
        .expect("first key");
    (registry, key)
}

/// An embedded index under `dir/index`, with one indexing thread.
pub fn embedded_index(dir: &std::path::Path) -> Arc<EmbeddedIndex> {
    let mut config = EmbeddedIndexConfig::new(dir.join("index"));
    config.threads = 1;
    Arc::new(EmbeddedIndex::open(config).expect("index"))
}

/// The test run's Redis (tests use keys under a prefix of their own, see `RedisKeys`).
pub use sluice_dedup::testing::redis_url;

pub fn redis_cli(url: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-u", url])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Kafka and the shared stores for a test's nodes: the run's PostgreSQL (a schema of the
/// test's own, dropped at the end), its Redis (keys under a prefix of the test's own) and a
/// search server (indexes under a prefix of the test's own).
pub struct SharedStores {
    pub log: String,
    pub schema: sluice_registry::testing::Schema,
    pub keys: RedisKeys,
    pub index_prefix: String,
}

impl SharedStores {
    pub fn new(what: &str, brokers: &str) -> SharedStores {
        SharedStores {
            log: format!("kafka://{brokers}"),
            schema: sluice_registry::testing::Schema::create(),
            keys: RedisKeys::new(what),
            index_prefix: format!("{what}-{}-{}", std::process::id(), unique()),
        }
    }

    pub fn registry(&self) -> String {
        self.schema.url()
    }

    /// A node's flags: these stores, the index at `index` (a search server, or a proxy in
    /// front of one), a short session timeout and short batches.
    pub fn args(&self, index: &str, session: Duration) -> Vec<String> {
        let session = format!("{}ms", session.as_millis());
        [
            "--log",
            &self.log,
            "--registry",
            &self.registry(),
            "--dedup",
            redis_url(),
            "--dedup-key-prefix",
            &self.keys.0,
            "--index",
            index,
            "--index-prefix",
            &self.index_prefix,
            "--kafka-session-timeout",
            &session,
            "--batch-timeout",
            "50ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// `args` as the `&str`s `Server::start_as` takes.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A key prefix unique to this test, on the machine's Redis; its keys are deleted on drop.
pub struct RedisKeys(pub String);

impl RedisKeys {
    pub fn new(what: &str) -> RedisKeys {
        RedisKeys(format!(
            "sluice-test:{what}:{}:{}",
            std::process::id(),
            unique()
        ))
    }
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let pattern = format!("{}:*", self.0);
        let keys = redis_cli(redis_url(), &["--scan", "--pattern", &pattern]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        for chunk in keys.chunks(1000) {
            let mut args = vec!["DEL"];
            args.extend(chunk);
            redis_cli(redis_url(), &args);
        }
    }
}

/// A number no other call in this process gets.
pub fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One osmem-server (OpenSearch-compatible, in memory) per test binary; it exits with it.
/// Tests use index prefixes of their own on it.
/// One real OpenSearch node for the whole test binary (it exits with this process).
pub fn opensearch() -> &'static sluice_testkit::OpenSearch {
    static NODE: std::sync::OnceLock<sluice_testkit::OpenSearch> = std::sync::OnceLock::new();
    NODE.get_or_init(sluice_testkit::OpenSearch::start)
}

pub fn osmem() -> &'static sluice_index::testing::Osmem {
    static OSMEM: std::sync::OnceLock<sluice_index::testing::Osmem> = std::sync::OnceLock::new();
    OSMEM.get_or_init(sluice_index::testing::Osmem::start)
}

/// Serves the API for `state` on a free port.
pub async fn spawn_api(state: AppState) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // As `serve` does: one recorder for the test process, every request counted.
    sluice_api::metrics::install();
    let app = sluice_api::router(state);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// What servers log: warnings, and the consumer's assignments (a failing test prints the
/// tail). `SLUICE_TEST_LOG` replaces it, to look into a failure.
fn server_log_filter() -> String {
    std::env::var("SLUICE_TEST_LOG")
        .unwrap_or_else(|_| "warn,sluice_log::kafka::consumer=info".to_string())
}

pub fn sluice(data_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.arg("--data-dir").arg(data_dir).env("RUST_LOG", "warn");
    cmd
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("sluice runs");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Creates `org` in the registry at `registry` (a URL) with admin commands run from `admin_dir`,
/// and returns a new API key of it.
pub fn org_with_key(admin_dir: &Path, registry: &str, org: &str) -> String {
    run_ok(sluice(admin_dir).args(["--registry", registry, "orgs", "create", org]));
    run_ok(sluice(admin_dir).args(["--registry", registry, "keys", "create", "--org", org]))
        .trim()
        .to_string()
}

pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("sluice runs");
    assert!(!out.status.success(), "{cmd:?} should fail");
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

/// A `sluice serve` (or `api`, or `ingest`) child process.
pub struct Server {
    pub child: Child,
    /// Where it listens (`0.0.0.0:0` for an ingest node, which does not).
    pub addr: SocketAddr,
    /// The key printed in the banner on first start.
    pub first_key: Option<String>,
    /// Where its standard error goes; its tail is printed when a test fails.
    pub stderr: PathBuf,
}

impl Server {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_as("serve", data_dir, extra)
    }

    /// `sluice <role>`, once its banner's last line says it runs. It listens on a free port
    /// unless `extra` has a `--listen`.
    pub fn start_as(role: &str, data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_logging(role, data_dir, extra, &server_log_filter())
    }

    /// `start_as` with `RUST_LOG=<filter>` (tests read what the node logs from its stderr file).
    pub fn start_logging(role: &str, data_dir: &Path, extra: &[&str], filter: &str) -> Server {
        let listen: &[&str] = if extra.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let stderr = data_dir.with_extension("stderr.log");
        let mut child = sluice(data_dir)
            .env("RUST_LOG", filter)
            .arg(role)
            .args(listen)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&stderr)
                    .expect("stderr file"),
            ))
            .spawn()
            .expect("spawn sluice");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = None;
        let mut first_key = None;
        for line in lines.by_ref() {
            let line = line.expect("banner line");
            if let Some(rest) = line.split("api key: ").nth(1) {
                first_key = Some(rest.trim().to_string());
            }
            // An ingest node adds what it serves after the address.
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let at = rest.split_whitespace().next().unwrap_or_default();
                addr = Some(at.parse().expect("listen address"));
                break;
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr: addr.expect("banner has the address"),
            first_key,
            stderr,
        }
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        wait_timeout(&mut self.child, Duration::from_secs(30)).expect("exits after SIGTERM")
    }

    /// Peak resident memory so far (`VmHWM` of /proc), in MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    eprintln!("sluice (pid {}) had exited: {status}", self.child.id())
                }
                _ => eprintln!("sluice (pid {}) still ran", self.child.id()),
            }
            let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            if let Ok(dir) = std::env::var("SLUICE_TEST_KEEP_LOGS") {
                // The whole log, kept past the test's temporary directory.
                let name = format!(
                    "{}-{}",
                    self.child.id(),
                    self.stderr
                        .file_name()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default()
                );
                let _ = std::fs::copy(&self.stderr, Path::new(&dir).join(name));
            }
            eprintln!(
                "last lines of {}:\n{}",
                self.stderr.display(),
                tail.join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// What one client saw: the message ids the server acknowledged, in the order it sent them.
pub type Acked = Vec<String>;

/// The `seq`-th request of a load client: every fourth a bulk of 10 events over the client's 3
/// users, the others one update of one of them. Ids are `r<round>-c<client>-<seq>-<item>`;
/// users are `c<client>-u<n>`.
pub fn load_request(client: usize, round: usize, seq: usize) -> (&'static str, Value, Vec<String>) {
    if seq % 4 == 3 {
        let ids: Vec<String> = (0..10)
            .map(|i| format!("r{round}-c{client}-{seq}-{i}"))
            .collect();
        let events: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| json!({"userId": format!("c{client}-u{}", i % 3), "eventName": "e", "id": id, "dataFields": {"seq": seq}}))
            .collect();
        ("/api/events/trackBulk", json!({"events": events}), ids)
    } else {
        let id = format!("r{round}-c{client}-{seq}-0");
        let body = json!({"userId": format!("c{client}-u{}", seq % 3), "id": id, "dataFields": {"seq": seq, "round": round}});
        ("/api/users/update", body, vec![id])
    }
}

/// One client: sequential requests over one connection, each user's messages in order, until
/// the server dies. Anything but 200 before that fails the test.
pub async fn client_load(addr: SocketAddr, key: String, client: usize, round: usize) -> Acked {
    client_load_counted(addr, key, client, round, Arc::default()).await
}

/// `client_load`, adding each acknowledged message to `progress` as its answer comes (so a
/// test can kill the server once the load did real work, however slow the machine is).
pub async fn client_load_counted(
    addr: SocketAddr,
    key: String,
    client: usize,
    round: usize,
    progress: Arc<std::sync::atomic::AtomicUsize>,
) -> Acked {
    let mut acked = Vec::new();
    let Ok(mut conn) = Connection::connect(addr).await else {
        return acked;
    };
    for seq in 0.. {
        let (path, body, ids) = load_request(client, round, seq);
        match conn
            .post(path, &[("api-key", &key)], body.to_string().into())
            .await
        {
            Ok(reply) if reply.status == 200 => {
                progress.fetch_add(ids.len(), std::sync::atomic::Ordering::Relaxed);
                acked.extend(ids);
            }
            Ok(reply) => panic!(
                "unexpected status {} before the kill: {:?}",
                reply.status,
                reply.json()
            ),
            Err(_) => return acked, // the server died under us
        }
    }
    acked
}

/// Kills `server` under load: `clients` tasks of `client_load` run for at least `run_for` and
/// until they have `at_least` acknowledgements (at most 60 s more: a machine busy with other
/// tests' brokers can be slow to start; CI once saw 312 in two rounds of 4 s), then SIGKILL.
/// Returns what was acknowledged.
pub async fn load_then_kill(
    server: &mut Server,
    key: &str,
    clients: usize,
    round: usize,
    run_for: Duration,
    at_least: usize,
) -> Acked {
    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            tokio::spawn(client_load_counted(
                server.addr,
                key.to_string(),
                c,
                round,
                Arc::clone(&progress),
            ))
        })
        .collect();
    tokio::time::sleep(run_for).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.load(std::sync::atomic::Ordering::Relaxed) < at_least
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.sigkill();
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("client task"));
    }
    acked
}

/// One client as a well-behaved producer through backend outages: until `until`, it sends the
/// same requests as `client_load`, one per `pace`, and on a 503 (or a dropped connection) waits
/// briefly and sends the same request again. Returns what was acknowledged and how many 503s it
/// got.
pub async fn client_load_retrying(
    addr: SocketAddr,
    key: String,
    client: usize,
    round: usize,
    until: Instant,
    pace: Duration,
) -> (Acked, usize) {
    let mut acked = Vec::new();
    let mut unavailable = 0;
    let mut conn = None;
    let mut seq = 0;
    while Instant::now() < until {
        let (path, body, ids) = load_request(client, round, seq);
        if conn.is_none() {
            conn = Connection::connect(addr).await.ok();
        }
        let Some(c) = conn.as_mut() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        match c
            .post(path, &[("api-key", &key)], body.to_string().into())
            .await
        {
            Ok(reply) if reply.status == 200 => {
                acked.extend(ids);
                seq += 1;
                tokio::time::sleep(pace).await;
            }
            Ok(reply) if reply.status == 503 => {
                unavailable += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(reply) => panic!("unexpected status {}: {:?}", reply.status, reply.json()),
            Err(_) => {
                conn = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    (acked, unavailable)
}

/// `clients` tasks of `client_load_retrying` (round 0, one request per 5 ms each) until `until`.
pub fn retrying_clients(
    addr: SocketAddr,
    key: &str,
    clients: usize,
    until: Instant,
) -> Vec<tokio::task::JoinHandle<(Acked, usize)>> {
    (0..clients)
        .map(|c| {
            tokio::spawn(client_load_retrying(
                addr,
                key.to_string(),
                c,
                0,
                until,
                Duration::from_millis(5),
            ))
        })
        .collect()
}

/// Every acknowledged message of `load_request` clients is in the index exactly once in
/// effect: each user's profile is its last acknowledged update, and each user has exactly as
/// many events as were acknowledged for it (event doc ids are message ids, so none is there
/// twice). For loads too large to list every event.
pub async fn check_index_matches_acked(index: &dyn sluice_index::Index, acked: &[String]) {
    use sluice_index::{SearchRequest, Target};
    let mut last_update: HashMap<String, (usize, usize)> = HashMap::new();
    let mut events: HashMap<String, u64> = HashMap::new();
    for id in acked {
        let (round, client, seq, item) = send_position(id);
        if seq % 4 == 3 {
            *events
                .entry(format!("c{client}-u{}", item % 3))
                .or_default() += 1;
        } else {
            let last = last_update
                .entry(format!("c{client}-u{}", seq % 3))
                .or_default();
            *last = (*last).max((round, seq));
        }
    }
    for (user, (round, seq)) in &last_update {
        let profile = profile_of(index, user).await;
        assert_eq!(
            profile["dataFields"],
            json!({"seq": seq, "round": round}),
            "{user}: the last acknowledged update"
        );
    }
    for (user, expected) in &events {
        let request = SearchRequest {
            query: format!("userId:\"{user}\""),
            size: 0,
            aggs: None,
        };
        let found = index
            .search("default", Target::Events, &request)
            .await
            .expect("search");
        assert_eq!(
            found.total, *expected,
            "{user}: each acknowledged event once"
        );
    }
    eprintln!(
        "index matches what was acknowledged: {} profiles, {} events",
        last_update.len(),
        events.values().sum::<u64>()
    );
}

/// A TCP proxy (to make a server such as PostgreSQL unreachable for a while): while down,
/// open connections are cut and new ones are closed at once. Runs on a thread of its own.
pub struct TcpProxy {
    pub addr: SocketAddr,
    down: tokio::sync::watch::Sender<bool>,
    _thread: std::thread::JoinHandle<()>,
}

impl TcpProxy {
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let (down, down_rx) = tokio::sync::watch::channel(false);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if *down_rx.borrow() {
                        continue; // dropped: closed at once
                    }
                    let mut down = down_rx.clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = down.wait_for(|d| *d) => {}
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        }
                    });
                }
            });
        });
        TcpProxy {
            addr,
            down,
            _thread: thread,
        }
    }

    pub fn set_down(&self, down: bool) {
        let _ = self.down.send(down);
    }
}

/// Parses `r<round>-c<client>-<seq>-<item>` into a sortable send position.
pub fn send_position(id: &str) -> (usize, usize, usize, usize) {
    let parts: Vec<usize> = id
        .split('-')
        .map(|p| {
            p.trim_start_matches(['r', 'c'])
                .parse()
                .expect("numeric id part")
        })
        .collect();
    (parts[0], parts[1], parts[2], parts[3])
}

/// Posts one event for a user on each of the 8 partitions and waits until all are readable.
pub async fn wait_for_sentinels(addr: SocketAddr, key: &str) {
    let mut sentinels: HashMap<u32, String> = HashMap::new();
    for n in 0.. {
        if sentinels.len() == 8 {
            break;
        }
        let user = format!("sentinel-{n}");
        let partition = sluice_model::partition_for_key(format!("default:u:{user}").as_bytes(), 8);
        sentinels.entry(partition).or_insert(user);
    }
    for user in sentinels.values() {
        let (status, body) = post(
            addr,
            key,
            "/api/events/track",
            json!({"userId": user, "eventName": "sentinel", "id": user}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut conn = Connection::connect(addr).await.expect("connect");
    for user in sentinels.values() {
        loop {
            let r = conn
                .get(&format!("/api/users/{user}/events"), &[("api-key", key)])
                .await
                .expect("request");
            if r.json()["events"].as_array().is_some_and(|e| !e.is_empty()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the pipeline caught up within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every durable message is in the index exactly once in effect: each user's profile is the
/// last update of that user in the log, and each user's events are exactly the events in the
/// log, none twice. `records` are the log's values, each partition in offset order.
pub async fn check_index_matches_log(index_dir: &Path, records: &[Vec<u8>]) {
    use sluice_index::{EmbeddedIndex, EmbeddedIndexConfig, Index};
    let index = EmbeddedIndex::open(EmbeddedIndexConfig::new(index_dir.to_path_buf()))
        .expect("index reopens");
    check_matches_log(&index, records).await;
    index.close().await.expect("close index");
}

/// `check_index_matches_log` on any index.
pub async fn check_matches_log(index: &dyn sluice_index::Index, records: &[Vec<u8>]) {
    let mut last_update: HashMap<String, Value> = HashMap::new();
    let mut events: HashMap<String, Vec<String>> = HashMap::new();
    for value in records {
        let v: Value = serde_json::from_slice(value).expect("record JSON");
        let user = v["userId"].as_str().expect("userId").to_string();
        let id = v["messageId"].as_str().expect("messageId").to_string();
        match v["kind"].as_str() {
            Some("user_update") => {
                last_update.insert(user, v["dataFields"].clone());
            }
            Some("event") => events.entry(user).or_default().push(id),
            other => panic!("unexpected kind {other:?}"),
        }
    }
    let mut checked_events = 0;
    for (user, data_fields) in &last_update {
        let profile = profile_of(index, user).await;
        assert_eq!(
            &profile["dataFields"], data_fields,
            "{user}: the last update"
        );
    }
    for (user, ids) in &events {
        let mut indexed: Vec<String> = index
            .user_events("default", &format!("u:{user}"), 10_000)
            .await
            .expect("read")
            .iter()
            .map(|e| e["messageId"].as_str().unwrap_or("").to_string())
            .collect();
        indexed.sort();
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(indexed, expected, "{user}: each event exactly once");
        checked_events += ids.len();
    }
    eprintln!(
        "crash test: index matches the log: {} profiles, {checked_events} events",
        last_update.len()
    );
}

/// The profile of `user` (by userId) in org `default`; a test failure if there is none.
async fn profile_of(index: &dyn sluice_index::Index, user: &str) -> Value {
    index
        .get_user("default", &format!("u:{user}"))
        .await
        .expect("read")
        .unwrap_or_else(|| panic!("no profile for {user}"))
}

/// One JSON POST on a fresh connection: (status, body).
pub async fn post(addr: SocketAddr, key: &str, path: &str, body: Value) -> (u16, Value) {
    let mut conn = Connection::connect(addr).await.expect("connect");
    let r = conn
        .post(path, &[("api-key", key)], body.to_string().into())
        .await
        .expect("request");
    (r.status.as_u16(), r.json())
}

/// One call a `WebhookReceiver` got.
#[derive(Debug, Clone)]
pub struct WebhookCall {
    pub path: String,
    pub idempotency_key: Option<String>,
    pub body: Value,
}

/// A real HTTP server standing in for a trigger's target. It records every call and answers
/// by path: `/ok` 200 (after `delay`), `/refuse` 400, `/flaky` 503 to the first call with each
/// `Idempotency-Key` and 200 to the next ones.
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    calls: Arc<std::sync::Mutex<Vec<WebhookCall>>>,
    server: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start(delay: Duration) -> WebhookReceiver {
        WebhookReceiver::start_at("127.0.0.1:0".parse().expect("address"), delay).await
    }

    /// A receiver on `addr` (a port a test kept free, so its target was refusing connections
    /// until now).
    pub async fn start_at(addr: SocketAddr, delay: Duration) -> WebhookReceiver {
        use axum::http::{HeaderMap, StatusCode, Uri};
        let calls: Arc<std::sync::Mutex<Vec<WebhookCall>>> = Arc::default();
        let recorded = Arc::clone(&calls);
        let handler = move |uri: Uri, headers: HeaderMap, body: axum::body::Bytes| {
            let calls = Arc::clone(&recorded);
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let path = uri.path().to_owned();
                let call = WebhookCall {
                    path: path.clone(),
                    idempotency_key: key.clone(),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                };
                let seen_before = {
                    let mut calls = calls.lock().expect("calls");
                    let seen = calls
                        .iter()
                        .any(|c| c.path == path && c.idempotency_key == key);
                    calls.push(call);
                    seen
                };
                match path.as_str() {
                    "/refuse" => (StatusCode::BAD_REQUEST, "no such template"),
                    "/flaky" if !seen_before => (StatusCode::SERVICE_UNAVAILABLE, "try later"),
                    _ => {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        (StatusCode::OK, "sent")
                    }
                }
            }
        };
        let app = axum::Router::new().fallback(handler);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        WebhookReceiver {
            addr,
            calls,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<WebhookCall> {
        self.calls.lock().expect("calls").clone()
    }

    pub fn raw_count(&self) -> usize {
        self.calls.lock().expect("calls").len()
    }

    /// The receiver's dedup: the first call with each `Idempotency-Key`, by key.
    pub fn distinct(&self) -> HashMap<String, WebhookCall> {
        let mut first = HashMap::new();
        for call in self.calls() {
            if let Some(key) = &call.idempotency_key {
                first.entry(key.clone()).or_insert(call);
            }
        }
        first
    }
}

/// A loopback address where nothing listens (yet): connections to it are refused.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Writes `<dir>/sluice.toml` with one trigger rule, `welcome-email`: a `signedUp` event
/// calls `url`. Returns the file's path as a flag value.
pub fn welcome_config(dir: &Path, url: &str) -> String {
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[triggers]]\nname = \"welcome-email\"\nevent = \"signedUp\"\nwebhook = \"{url}\"\n"
        ),
    )
    .expect("write config");
    config.to_str().expect("utf-8 path").to_string()
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}
