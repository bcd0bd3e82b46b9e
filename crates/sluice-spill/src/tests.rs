//! The bridge in front of a real embedded log that can be made to hang (a frozen broker: the
//! append completes only once it is up again) or to fail.

use std::collections::HashMap;
use std::sync::atomic::AtomicU8;

use async_trait::async_trait;
use sluice_log::{Ack, EmbeddedLogConfig, Subscription};

use super::*;

const UP: u8 = 0;
/// Appends wait until the mode changes; the log still reports itself healthy.
const HANG: u8 = 1;
/// Appends fail at once, and the log reports that it cannot take writes.
const FAIL: u8 = 2;
/// As a Kafka producer while the brokers do not answer: the log keeps what it is given and
/// writes it once up, in the order given, even for callers that stopped waiting.
const QUEUE: u8 = 3;

struct FlakyLog {
    inner: EmbeddedLog,
    mode: AtomicU8,
    /// The next append fails at once, whatever the mode.
    fail_once: std::sync::atomic::AtomicBool,
    /// Reports the log down whatever the mode (librdkafka saw every broker go).
    reported_down: std::sync::atomic::AtomicBool,
    /// What `QUEUE` appends were given and the log has not written yet.
    queued: Mutex<Vec<Record>>,
}

impl FlakyLog {
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// Every record in the log, partition by partition, in offset order.
    fn records(&self) -> Vec<(u32, String)> {
        (0..self.inner.partitions())
            .flat_map(|p| {
                self.inner
                    .read(p, 0, usize::MAX)
                    .expect("read")
                    .into_iter()
                    .map(move |r| (p, String::from_utf8_lossy(&r.value).into_owned()))
            })
            .collect()
    }
}

#[async_trait]
impl Log for FlakyLog {
    fn partitions(&self) -> u32 {
        self.inner.partitions()
    }

    async fn append(&self, records: Vec<Record>) -> Result<Vec<Ack>, LogError> {
        if self.fail_once.swap(false, Ordering::SeqCst) {
            return Err(LogError::Broker {
                brokers: "flaky".into(),
                message: "connection reset".into(),
            });
        }
        let mut records = Some(records);
        loop {
            match self.mode.load(Ordering::SeqCst) {
                UP => {
                    // What abandoned `QUEUE` appends left goes first, as a producer's queue.
                    let mut all = std::mem::take(&mut *lock_queued(&self.queued));
                    all.extend(records.take().unwrap_or_default());
                    return self.inner.append(all).await;
                }
                QUEUE => {
                    if let Some(records) = records.take() {
                        lock_queued(&self.queued).extend(records);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                FAIL => {
                    return Err(LogError::Broker {
                        brokers: "flaky".into(),
                        message: "all brokers down".into(),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscription>, LogError> {
        self.inner.subscribe(group).await
    }

    /// A hanging log looks healthy (a frozen broker's connections stay open); a failing one
    /// reports that it cannot take writes.
    fn is_healthy(&self) -> bool {
        self.mode.load(Ordering::SeqCst) != FAIL && !self.reported_down.load(Ordering::SeqCst)
    }

    async fn close(&self) -> Result<(), LogError> {
        self.inner.close().await
    }
}

fn lock_queued(queued: &Mutex<Vec<Record>>) -> std::sync::MutexGuard<'_, Vec<Record>> {
    queued
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Setup {
    _dir: tempfile::TempDir,
    spill_dir: std::path::PathBuf,
    log: Arc<FlakyLog>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let inner = EmbeddedLog::open(
        &dir.path().join("log"),
        EmbeddedLogConfig {
            partitions: 4,
            ..EmbeddedLogConfig::default()
        },
    )
    .expect("log");
    Setup {
        spill_dir: dir.path().join("spill"),
        _dir: dir,
        log: Arc::new(FlakyLog {
            inner,
            mode: AtomicU8::new(UP),
            fail_once: Default::default(),
            reported_down: Default::default(),
            queued: Default::default(),
        }),
    }
}

fn config() -> BridgeConfig {
    BridgeConfig {
        log_ack_timeout: Duration::from_millis(100),
        replay_interval: Duration::from_millis(10),
        max_replay_interval: Duration::from_millis(40),
        replay_batch: 7,
        replay_warn_after: Duration::from_millis(200),
        ..BridgeConfig::default()
    }
}

fn record(user: &str, seq: u32) -> Record {
    Record {
        key: format!("org:u:{user}").into_bytes(),
        value: format!("{user}/{seq}").into_bytes(),
        timestamp_ms: sluice_model::time::now_ms(),
    }
}

async fn append(bridge: &Bridge, user: &str, seq: u32) -> Result<Durable, BridgeError> {
    let make = || vec![record(user, seq)];
    bridge.append(make(), &make).await
}

/// Runs the replayer until the buffer is empty and the bridge is direct again.
async fn drain(bridge: &Bridge) {
    let (stop_tx, stop) = watch::channel(false);
    let replayer = tokio::spawn({
        let bridge = bridge.clone();
        async move { bridge.replay(stop).await }
    });
    wait_drained(bridge).await;
    stop_tx.send(true).expect("stop");
    replayer.await.expect("replayer");
}

async fn wait_drained(bridge: &Bridge) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = bridge.status();
        if !status.spilling && status.records == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "buffer did not drain: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// For each user, the sequence numbers in log order, keeping only the first copy of each
/// message (what the pipeline's dedup lets through).
fn first_copies(records: &[(u32, String)]) -> HashMap<String, Vec<u32>> {
    let mut seen = std::collections::HashSet::new();
    let mut by_user: HashMap<String, Vec<u32>> = HashMap::new();
    for (_, value) in records {
        if !seen.insert(value.clone()) {
            continue;
        }
        let (user, seq) = value.split_once('/').expect("user/seq");
        by_user
            .entry(user.to_string())
            .or_default()
            .push(seq.parse().expect("seq"));
    }
    by_user
}

#[tokio::test]
async fn a_healthy_log_takes_appends_directly() {
    let s = setup();
    let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config()).expect("bridge");
    for seq in 0..5 {
        assert_eq!(
            append(&bridge, "a", seq).await.expect("append"),
            Durable::Logged
        );
    }
    let status = bridge.status();
    assert!(!status.spilling && status.records == 0, "{status:?}");
    assert_eq!(s.log.records().len(), 5);
}

#[tokio::test]
async fn a_hanging_log_spills_after_the_timeout_and_everything_is_replayed_in_order() {
    let s = setup();
    let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config()).expect("bridge");
    append(&bridge, "a", 0).await.expect("direct");
    s.log.set(HANG);
    let started = tokio::time::Instant::now();
    assert_eq!(
        append(&bridge, "a", 1).await.expect("spill"),
        Durable::Spilled
    );
    assert!(started.elapsed() >= Duration::from_millis(100));
    // In spill mode, appends go straight to the buffer, even once the log is back.
    let started = tokio::time::Instant::now();
    for seq in 2..20 {
        assert_eq!(
            append(&bridge, "a", seq).await.expect("spill"),
            Durable::Spilled
        );
    }
    assert!(started.elapsed() < Duration::from_millis(100) * 18);
    s.log.set(UP);
    assert_eq!(
        append(&bridge, "a", 20).await.expect("spill"),
        Durable::Spilled
    );
    let status = bridge.status();
    assert!(status.spilling, "{status:?}");
    assert_eq!(status.records, 20);
    assert!(
        status.oldest_age_ms.is_some() && status.bytes > 0,
        "{status:?}"
    );

    drain(&bridge).await;
    assert_eq!(
        append(&bridge, "a", 21).await.expect("direct"),
        Durable::Logged
    );
    let records = s.log.records();
    assert_eq!(first_copies(&records)["a"], (0..22).collect::<Vec<_>>());
    assert_eq!(records.len(), 22);
    let status = bridge.status();
    assert_eq!((status.spilled_total, status.replayed_total), (20, 20));
}

#[tokio::test]
async fn a_failing_log_spills_at_once_and_waiting_appends_follow() {
    let s = setup();
    let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config()).expect("bridge");
    s.log.set(HANG);
    // Three appends wait for the hanging log; one fails at once and starts spill mode, and the
    // waiting ones spill then instead of waiting out their timeout.
    let waiting: Vec<_> = (0..3)
        .map(|i| {
            let bridge = bridge.clone();
            tokio::spawn(async move { append(&bridge, &format!("w{i}"), 0).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.log.fail_once.store(true, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    assert_eq!(
        append(&bridge, "f", 0).await.expect("spill"),
        Durable::Spilled
    );
    for task in waiting {
        assert_eq!(task.await.expect("task").expect("spill"), Durable::Spilled);
    }
    assert!(
        started.elapsed() < Duration::from_millis(80),
        "waiting appends should not wait out their timeout: {:?}",
        started.elapsed()
    );
    s.log.set(UP);
    drain(&bridge).await;
    let firsts = first_copies(&s.log.records());
    assert_eq!(firsts.len(), 4, "{firsts:?}");
}

#[tokio::test]
async fn a_full_buffer_refuses_without_losing_what_it_holds() {
    let s = setup();
    let mut config = config();
    config.max_bytes = 10 * (size_of(&[record("a", 0)]) + 1);
    let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config).expect("bridge");
    s.log.set(FAIL);
    let mut accepted = 0;
    let full = loop {
        match append(&bridge, "a", accepted).await {
            Ok(Durable::Spilled) => accepted += 1,
            Ok(Durable::Logged) => panic!("the log is down"),
            Err(e) => break e,
        }
        assert!(accepted < 100, "never full");
    };
    assert!(matches!(full, BridgeError::Full { .. }), "{full}");
    assert!(full.to_string().contains("spill buffer is full"), "{full}");
    assert!(!bridge.is_ready());
    assert!(accepted >= 5, "{accepted}");
    s.log.set(UP);
    drain(&bridge).await;
    assert_eq!(
        first_copies(&s.log.records())["a"],
        (0..accepted).collect::<Vec<_>>()
    );
    assert!(bridge.is_ready());
}

#[tokio::test]
async fn a_restart_replays_what_the_buffer_held_before_new_appends() {
    let s = setup();
    {
        let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config()).expect("bridge");
        s.log.set(FAIL);
        for seq in 0..10 {
            append(&bridge, "a", seq).await.expect("spill");
        }
        bridge.close().await.expect("close");
    }
    s.log.set(UP);
    assert_eq!(
        status_at(&s.spill_dir, 1 << 20).expect("status").records,
        10
    );
    let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config()).expect("reopen");
    assert!(bridge.status().spilling);
    // The log is up, yet a new append goes behind the old records.
    assert_eq!(
        append(&bridge, "a", 10).await.expect("spill"),
        Durable::Spilled
    );
    drain(&bridge).await;
    assert_eq!(
        first_copies(&s.log.records())["a"],
        (0..11).collect::<Vec<_>>()
    );
    bridge.close().await.expect("close");
    drop(bridge);
    let status = status_at(&s.spill_dir, 1 << 20).expect("status");
    assert_eq!((status.records, status.spilling), (0, false), "{status:?}");
}

#[tokio::test]
async fn without_a_buffer_a_slow_log_is_an_error() {
    let s = setup();
    let mut config = config();
    config.max_bytes = 0;
    let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config).expect("bridge");
    s.log.set(HANG);
    let e = append(&bridge, "a", 0).await.expect_err("timeout");
    assert!(matches!(e, BridgeError::Timeout(_)), "{e}");
    s.log.set(FAIL);
    let e = append(&bridge, "a", 0).await.expect_err("fail");
    assert!(e.to_string().contains("all brokers down"), "{e}");
    assert!(!s.spill_dir.exists());
}

/// A log that reports it cannot take writes is not waited for: the append spills at once
/// (here the log would hang for the whole 30 s timeout).
#[tokio::test]
async fn a_log_reporting_itself_down_spills_without_waiting() {
    let s = setup();
    let mut config = config();
    config.log_ack_timeout = Duration::from_secs(30);
    let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config).expect("bridge");
    s.log.set(HANG);
    s.log.reported_down.store(true, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    assert_eq!(
        append(&bridge, "a", 0).await.expect("spill"),
        Durable::Spilled
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Many users, each appending in sequence (the next message only after the previous one was
/// acknowledged), while the log flaps between up, hanging and failing and the replayer runs:
/// every acknowledged message is in the log, and each user's first copies are in ack order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_order_survives_a_flapping_log() {
    for seed in 0..3u64 {
        let s = setup();
        let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config()).expect("bridge");
        let (stop_tx, stop) = watch::channel(false);
        let replayer = tokio::spawn({
            let bridge = bridge.clone();
            async move { bridge.replay(stop).await }
        });
        let clients: Vec<_> = (0..16)
            .map(|u| {
                let bridge = bridge.clone();
                tokio::spawn(async move {
                    let user = format!("u{u}");
                    for seq in 0..60 {
                        append(&bridge, &user, seq).await.expect("durable");
                    }
                })
            })
            .collect();
        // A fixed pseudo-random flapping schedule per seed.
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        for _ in 0..12 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            s.log.set(((x >> 33) % 3) as u8);
            tokio::time::sleep(Duration::from_millis(20 + (x >> 40) % 60)).await;
        }
        s.log.set(UP);
        for client in clients {
            client.await.expect("client");
        }
        wait_drained(&bridge).await;
        stop_tx.send(true).expect("stop");
        replayer.await.expect("replayer");
        let firsts = first_copies(&s.log.records());
        for u in 0..16 {
            assert_eq!(
                firsts[&format!("u{u}")],
                (0..60).collect::<Vec<_>>(),
                "seed {seed}, user u{u}"
            );
        }
    }
}

/// A client that hangs up while its records are being spilled (the handler's future is
/// dropped) leaves no bookkeeping behind: the records are written and counted, and the bridge
/// still drains and leaves spill mode.
#[tokio::test]
async fn appends_dropped_while_spilling_are_still_written_and_counted() {
    let s = setup();
    let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config()).expect("bridge");
    s.log.set(FAIL);
    for seq in 0..20 {
        // Polled once (the direct append fails, the spill is admitted), then dropped.
        let mut attempt = std::pin::pin!(append(&bridge, "a", seq));
        let polled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(attempt.as_mut().poll(cx))).await;
        assert!(
            polled.is_pending(),
            "the append was still in progress when dropped"
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bridge.status().spilled_total < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            bridge.status()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.log.set(UP);
    drain(&bridge).await;
    let status = bridge.status();
    assert_eq!((status.spilled_total, status.replayed_total), (20, 20));
    assert_eq!(
        first_copies(&s.log.records())["a"],
        (0..20).collect::<Vec<_>>()
    );
}

/// A stop is not held up by a replay the log does not answer: the records stay in the buffer.
#[tokio::test]
async fn the_replayer_stops_promptly_while_the_log_hangs() {
    let s = setup();
    let mut config = config();
    config.replay_warn_after = Duration::from_secs(60);
    let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config).expect("bridge");
    s.log.set(FAIL);
    append(&bridge, "a", 0).await.expect("spill");
    s.log.set(HANG);
    let (stop_tx, stop) = watch::channel(false);
    let replayer = tokio::spawn({
        let bridge = bridge.clone();
        async move { bridge.replay(stop).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop_tx.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(2), replayer)
        .await
        .expect("the replayer stopped within 2 s")
        .expect("replayer");
    let status = bridge.status();
    assert_eq!(
        (status.records, status.replayed_total),
        (1, 0),
        "{status:?}"
    );
}

/// A replayed batch the log is slow to acknowledge is waited for, not sent again: a producer
/// that keeps what it was given writes each spilled record once, in order, when it is up.
/// (Sent again after a timeout, the batch would be written twice, and a first try written in
/// part would put a later record ahead of an earlier one's copy.)
#[tokio::test]
async fn a_slow_replay_is_waited_for_and_never_sent_twice() {
    let s = setup();
    let bridge = Bridge::open(s.log.clone(), &s.spill_dir, config()).expect("bridge");
    s.log.set(FAIL);
    for seq in 0..20 {
        assert_eq!(
            append(&bridge, "a", seq).await.expect("spill"),
            Durable::Spilled
        );
    }
    s.log.set(QUEUE);
    let (stop_tx, stop) = watch::channel(false);
    let replayer = tokio::spawn({
        let bridge = bridge.clone();
        async move { bridge.replay(stop).await }
    });
    // Three times the warning interval without an acknowledgement.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = bridge.status();
    assert_eq!(status.replayed_total, 0, "{status:?}");
    assert!(status.replay_failures >= 2, "each wait counted: {status:?}");
    s.log.set(UP);
    wait_drained(&bridge).await;
    stop_tx.send(true).expect("stop");
    replayer.await.expect("replayer");
    let records = s.log.records();
    assert_eq!(
        records.len(),
        20,
        "each spilled record written once: {records:?}"
    );
    assert_eq!(first_copies(&records)["a"], (0..20).collect::<Vec<_>>());
}
