//! Freshness probes (`sluice bench --probe-every`): how long after its acknowledgement an event
//! becomes searchable, measured while the load runs.
//!
//! The protocol, on connections of their own (the load's numbers do not include them):
//! - The sender posts probe `n` (0, 1, 2, …) every `every` to `/api/events/track`: user
//!   `probe<run>`, event `bench_probe`, `dataFields.n = n`, where `<run>` is random per run.
//!   It notes when the acknowledgement arrived. A probe that is refused, or whose answer is lost,
//!   is counted as failed and never waited for.
//! - The poller searches `userId:probe<run> AND dataFields.n:[k TO MAX]` every
//!   [`POLL_INTERVAL`], where `k` is the lowest probe not yet seen, and notes the time of the
//!   first poll that returned each `n`. All probes share one user, so one partition processes
//!   them in order and a search rarely returns more than a few.
//! - Freshness of a probe = first seen − acknowledged (0 if it was seen before its answer
//!   arrived). Its error is at most one poll interval, plus the search's own time.
//! - [`Probes::finish`] stops the sender and lets the poller wait up to [`SETTLE`] for the
//!   acknowledged probes still missing; those never seen are reported, not guessed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use crate::client::Connection;

/// How often the poller searches.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How long [`Probes::finish`] waits for acknowledged probes to become searchable.
pub const SETTLE: Duration = Duration::from_secs(60);

/// What the probes measured.
#[derive(Debug, Clone, Serialize)]
pub struct Freshness {
    /// Probes acknowledged.
    pub probes: u64,
    /// Probes refused, or whose answer was lost.
    pub failed: u64,
    /// Acknowledged probes not searchable when the poller gave up.
    pub never_seen: u64,
    /// Acknowledgement → searchable, over the probes seen.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// What the sender and the poller share: per probe, when it was acknowledged and first seen.
#[derive(Default)]
struct Timeline {
    acked: BTreeMap<u64, Instant>,
    seen: BTreeMap<u64, Instant>,
    failed: u64,
}

/// Probes being sent and watched.
pub struct Probes {
    stop: watch::Sender<bool>,
    sender: Option<tokio::task::JoinHandle<()>>,
    poller: tokio::task::JoinHandle<anyhow::Result<()>>,
    timeline: Arc<Mutex<Timeline>>,
}

impl Probes {
    /// Starts sending a probe every `every` and watching for them.
    pub fn start(addr: SocketAddr, key: &str, every: Duration) -> Probes {
        let run = format!("{:016x}", run_id());
        let timeline = Arc::new(Mutex::new(Timeline::default()));
        let (stop, stopped) = watch::channel(false);
        let sender = tokio::spawn(send(
            addr,
            key.to_string(),
            run.clone(),
            every,
            stopped.clone(),
            Arc::clone(&timeline),
        ));
        let poller = tokio::spawn(poll(
            addr,
            key.to_string(),
            run,
            stopped,
            Arc::clone(&timeline),
        ));
        Probes {
            stop,
            sender: Some(sender),
            poller,
            timeline,
        }
    }

    /// Probes acknowledged so far (they are events in the index too, once searchable).
    pub fn acknowledged(&self) -> u64 {
        lock(&self.timeline).acked.len() as u64
    }

    /// Stops sending and waits for the last probe's answer.
    pub async fn stop_sending(&mut self) {
        let _ = self.stop.send(true);
        if let Some(sender) = self.sender.take() {
            let _ = sender.await;
        }
    }

    /// Waits (up to [`SETTLE`]) until every acknowledged probe was seen, and reports.
    pub async fn finish(mut self) -> anyhow::Result<Freshness> {
        self.stop_sending().await;
        self.poller.await.context("probe poller panicked")??;
        let timeline = lock(&self.timeline);
        let mut histogram =
            Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).context("histogram bounds")?;
        let mut never_seen = 0;
        for (n, acked) in &timeline.acked {
            match timeline.seen.get(n) {
                Some(seen) => {
                    let micros = seen.saturating_duration_since(*acked).as_micros() as u64;
                    histogram.record(micros.max(1)).context("recording")?;
                }
                None => never_seen += 1,
            }
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Ok(Freshness {
            probes: timeline.acked.len() as u64,
            failed: timeline.failed,
            never_seen,
            p50_ms: ms(histogram.value_at_quantile(0.5)),
            p90_ms: ms(histogram.value_at_quantile(0.9)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        })
    }
}

fn lock(timeline: &Mutex<Timeline>) -> std::sync::MutexGuard<'_, Timeline> {
    timeline.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A run id: the clock in nanoseconds, distinct for every run against one server.
fn run_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_nanos() as u64)
}

async fn send(
    addr: SocketAddr,
    key: String,
    run: String,
    every: Duration,
    mut stopped: watch::Receiver<bool>,
    timeline: Arc<Mutex<Timeline>>,
) {
    let headers = [("api-key", key.as_str())];
    let mut connection: Option<Connection> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let body = format!(
            r#"{{"userId":"probe{run}","eventName":"bench_probe","dataFields":{{"n":{n}}}}}"#
        );
        let Ok(conn) = super::reconnected(&mut connection, addr).await else {
            lock(&timeline).failed += 1;
            continue;
        };
        match conn
            .post("/api/events/track", &headers, Bytes::from(body))
            .await
        {
            Ok(reply) if reply.status.is_success() => {
                lock(&timeline).acked.insert(n, Instant::now());
            }
            Ok(_) => lock(&timeline).failed += 1,
            Err(_) => {
                lock(&timeline).failed += 1;
                connection = None;
            }
        }
    }
}

async fn poll(
    addr: SocketAddr,
    key: String,
    run: String,
    stopped: watch::Receiver<bool>,
    timeline: Arc<Mutex<Timeline>>,
) -> anyhow::Result<()> {
    let headers = [("api-key", key.as_str())];
    let mut connection = Connection::connect(addr).await?;
    let mut give_up: Option<Instant> = None;
    loop {
        // The lowest acknowledged probe not yet seen; with none, the next one to be sent.
        let (from, waiting) = {
            let t = lock(&timeline);
            let missing = t.acked.keys().find(|n| !t.seen.contains_key(n)).copied();
            let next = t.acked.keys().next_back().map_or(0, |n| n + 1);
            (missing.unwrap_or(next), missing.is_some())
        };
        if *stopped.borrow() {
            if !waiting {
                return Ok(());
            }
            let deadline = *give_up.get_or_insert_with(|| Instant::now() + SETTLE);
            if Instant::now() > deadline {
                return Ok(());
            }
        }
        let query = serde_json::json!({
            "query": format!("userId:probe{run} AND dataFields.n:[{from} TO 1000000000000]"),
            "size": 100,
        });
        let reply = connection
            .post(
                "/api/search/events",
                &headers,
                Bytes::from(query.to_string()),
            )
            .await
            .context("probe search")?;
        let now = Instant::now();
        if !reply.status.is_success() {
            anyhow::bail!(
                "probe search answered {}: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        if let Some(hits) = reply.json()["hits"].as_array() {
            let mut t = lock(&timeline);
            for n in hits.iter().filter_map(|h| h["dataFields"]["n"].as_u64()) {
                t.seen.entry(n).or_insert(now);
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
