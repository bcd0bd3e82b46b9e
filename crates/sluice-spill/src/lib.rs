//! The zero-loss bridge between the API and the log (SPEC §7).
//!
//! `Bridge::append` makes a request's records durable one of two ways:
//! - **direct**: `Log::append`, acknowledged by the log within `log_ack_timeout`;
//! - **spilled**: if the log does not acknowledge in time or fails, the records go to a local
//!   spill buffer instead (fsynced), and the request is answered as durable all the same.
//!
//! Once anything was spilled, the bridge is in *spill mode*: every new append goes to the
//! buffer, behind what is already there, so a user's messages reach the log in the order they
//! were acknowledged. A replayer (`Bridge::replay`) drains the buffer oldest first into the log,
//! and deletes entries only after the log acknowledged them; when the buffer is empty, appends
//! go direct again. A buffer at `max_bytes` refuses new appends (`BridgeError::Full`, a 503 for
//! the client): nothing acknowledged is ever dropped.
//!
//! The buffer is an `EmbeddedLog` with one partition (`buffer`): the same group commit, the same
//! crash safety. Replay progress is the committed offset of group `replay`; retention deletes
//! what was replayed. A crash between the log's acknowledgement and that commit replays the
//! batch again: the copies carry the same message ids, and the pipeline's dedup drops them.
//!
//! A replayed append is waited for until the log answers, however long: it is never abandoned
//! and sent again for being slow, because the log may still write what it was given, and the
//! second send would land behind it (a later message of a user ahead of an earlier one's copy,
//! if the first try was written in part). Only a failure the log reports is retried.
//!
//! Invariant: the bridge leaves spill mode only when no record accepted into the buffer is
//! still unreplayed (`State::pending == 0`, checked under the same lock that admits appends).

mod buffer;

use sluice_model::Recoverable;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_log::{EmbeddedLog, Log, LogError, Record};
use tokio::sync::{Notify, watch};

pub use buffer::{SpillStatus, status_at};

/// Settings of the bridge.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// How long a direct append may wait for the log before its records are spilled.
    pub log_ack_timeout: Duration,
    /// Most bytes the spill buffer holds; appends beyond it fail with `Full` (0: no spilling,
    /// a slow log is a 503).
    pub max_bytes: u64,
    /// Pause between replay attempts after a failure; doubles per failure up to
    /// `max_replay_interval`.
    pub replay_interval: Duration,
    pub max_replay_interval: Duration,
    /// Records per replayed append.
    pub replay_batch: usize,
    /// How long a replayed append may go unacknowledged before each warning (and a count in
    /// `replay_failures`). It is not abandoned: see `replay`.
    pub replay_warn_after: Duration,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            log_ack_timeout: Duration::from_secs(5),
            max_bytes: 1 << 30,
            replay_interval: Duration::from_secs(1),
            max_replay_interval: Duration::from_secs(8),
            replay_batch: 5_000,
            replay_warn_after: Duration::from_secs(30),
        }
    }
}

/// How the records of an append were made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// Acknowledged by the log.
    Logged,
    /// Fsynced to the spill buffer; the replayer will append them to the log.
    Spilled,
}

/// Why an append is not durable. Every variant means "nothing was acknowledged".
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(
        "the log is not accepting writes and the spill buffer is full ({held} of {max} bytes held); retry later"
    )]
    Full { held: u64, max: u64 },
    #[error("the log did not acknowledge within {0:?} (spilling is disabled)")]
    Timeout(Duration),
    #[error("the log failed: {0}")]
    Log(LogError),
    #[error("the spill buffer failed: {0}")]
    Buffer(LogError),
}

/// Mode and admission, under one lock.
#[derive(Debug, Default)]
struct State {
    spilling: bool,
    /// Records admitted into the buffer and not yet replayed (including appends in progress).
    pending: u64,
    /// Bytes of buffer appends in progress, not yet counted by the buffer.
    reserved_bytes: u64,
    /// An append found the buffer full, and nothing was replayed since.
    full: bool,
}

#[derive(Default)]
struct Counters {
    spilled_records: AtomicU64,
    replayed_records: AtomicU64,
    replay_failures: AtomicU64,
}

/// The bridge: the log, plus (when `max_bytes > 0`) the spill buffer. Cheap to clone.
#[derive(Clone)]
pub struct Bridge(Arc<Inner>);

struct Inner {
    log: Arc<dyn Log>,
    buffer: Option<Arc<EmbeddedLog>>,
    config: BridgeConfig,
    state: Mutex<State>,
    /// Wakes direct appends still waiting for the log once spill mode starts: they spill
    /// too instead of waiting out their timeout.
    spill_started: Notify,
    /// Wakes the replayer when something was spilled.
    spilled: Notify,
    /// Set while a replayer runs: two would append the same records twice.
    replaying: std::sync::atomic::AtomicBool,
    counters: Counters,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Bytes the buffer will hold for these records (key, value, and per-record framing).
fn size_of(records: &[Record]) -> u64 {
    records
        .iter()
        .map(|r| (r.key.len() + r.value.len() + 24) as u64)
        .sum()
}

impl Bridge {
    /// A bridge in front of `log`, with its spill buffer under `dir` (opened, or created). A
    /// buffer that still holds records from before a restart starts the bridge in spill mode.
    pub fn open(
        log: Arc<dyn Log>,
        dir: &std::path::Path,
        config: BridgeConfig,
    ) -> Result<Bridge, LogError> {
        if config.max_bytes == 0 {
            return Ok(Bridge::new(log, None, config, 0));
        }
        let buffer = buffer::open(dir)?;
        let pending = buffer::unreplayed(&buffer)?;
        if pending > 0 {
            tracing::warn!(
                records = pending,
                dir = %dir.display(),
                "the spill buffer holds records from before the restart: replaying them before any new message"
            );
        }
        Ok(Bridge::new(log, Some(Arc::new(buffer)), config, pending))
    }

    fn new(
        log: Arc<dyn Log>,
        buffer: Option<Arc<EmbeddedLog>>,
        config: BridgeConfig,
        pending: u64,
    ) -> Bridge {
        Bridge(Arc::new(Inner {
            log,
            buffer,
            config,
            state: Mutex::new(State {
                spilling: pending > 0,
                pending,
                ..State::default()
            }),
            spill_started: Notify::new(),
            spilled: Notify::new(),
            replaying: Default::default(),
            counters: Counters::default(),
        }))
    }

    /// A bridge without a spill buffer: a log that does not acknowledge within
    /// `log_ack_timeout` is an error for the caller.
    pub fn without_spill(log: Arc<dyn Log>, log_ack_timeout: Duration) -> Bridge {
        let config = BridgeConfig {
            log_ack_timeout,
            max_bytes: 0,
            ..BridgeConfig::default()
        };
        Bridge::new(log, None, config, 0)
    }

    /// The log behind the bridge.
    pub fn log(&self) -> &Arc<dyn Log> {
        &self.0.log
    }

    /// Makes `records` durable: in the log, or in the spill buffer if the log does not
    /// acknowledge them within `log_ack_timeout` or is already behind the buffer. `again`
    /// rebuilds the same records (same bytes) for the spill after a failed direct append, so
    /// the direct path needs no copy.
    pub async fn append(
        &self,
        records: Vec<Record>,
        again: &(dyn Fn() -> Vec<Record> + Sync),
    ) -> Result<Durable, BridgeError> {
        let inner = &*self.0;
        let Some(buffer) = &inner.buffer else {
            return match tokio::time::timeout(
                inner.config.log_ack_timeout,
                inner.log.append(records),
            )
            .await
            {
                Ok(Ok(_)) => Ok(Durable::Logged),
                Ok(Err(e)) => Err(BridgeError::Log(e)),
                Err(_) => Err(BridgeError::Timeout(inner.config.log_ack_timeout)),
            };
        };
        // Registered before the mode is read, so a spill that starts in between still wakes us.
        let spill_started = inner.spill_started.notified();
        tokio::pin!(spill_started);
        spill_started.as_mut().enable();
        let count = records.len() as u64;
        if lock(&inner.state).spilling {
            return self.spill(buffer, records).await;
        }
        if !inner.log.is_healthy() {
            // The log says it cannot take writes (Kafka: every broker down): spill now rather
            // than wait out the timeout. The replayer's first success clears the report.
            self.enter_spill_mode("the log reports that it cannot take writes");
            return self.spill(buffer, records).await;
        }
        let direct = tokio::time::timeout(inner.config.log_ack_timeout, inner.log.append(records));
        let why = tokio::select! {
            result = direct => match result {
                Ok(Ok(_)) => return Ok(Durable::Logged),
                Ok(Err(e)) if !e.is_recoverable() => return Err(BridgeError::Log(e)),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no acknowledgement within {:?}", inner.config.log_ack_timeout),
            },
            () = &mut spill_started => "another request started spilling".to_string(),
        };
        // The records may still reach the log from the abandoned append; the spilled copies
        // carry the same ids, and dedup drops the second one.
        let records = again();
        if records.len() as u64 != count {
            return Err(BridgeError::Log(LogError::Unexpected(format!(
                "{count} records to spill, but {} were rebuilt",
                records.len()
            ))));
        }
        self.enter_spill_mode(&why);
        self.spill(buffer, records).await
    }

    /// From now on appends go to the buffer; appends still waiting on the log are woken to
    /// spill too.
    fn enter_spill_mode(&self, why: &str) {
        let inner = &*self.0;
        let started = {
            let mut state = lock(&inner.state);
            !std::mem::replace(&mut state.spilling, true)
        };
        if started {
            inner.spill_started.notify_waiters();
            tracing::warn!(
                reason = %why,
                "the log is not acknowledging: spilling to the local buffer until it does"
            );
        }
    }

    /// Admits `records` into the buffer and writes them. Cancel-safe: once admitted (no await
    /// before that), the write and its bookkeeping run in a task of their own, so a client that
    /// hangs up cannot leave an admitted record uncounted (which would keep spill mode on for
    /// ever) or its bytes reserved.
    async fn spill(
        &self,
        buffer: &Arc<EmbeddedLog>,
        records: Vec<Record>,
    ) -> Result<Durable, BridgeError> {
        let count = records.len() as u64;
        let bytes = size_of(&records);
        {
            let inner = &*self.0;
            let mut state = lock(&inner.state);
            let held = buffer::held_bytes(buffer) + state.reserved_bytes;
            if held + bytes > inner.config.max_bytes {
                state.full = true;
                return Err(BridgeError::Full {
                    held,
                    max: inner.config.max_bytes,
                });
            }
            state.pending += count;
            state.reserved_bytes += bytes;
        }
        let inner = Arc::clone(&self.0);
        let buffer = Arc::clone(buffer);
        let write = tokio::spawn(async move {
            let result = buffer.append(records).await;
            let mut state = lock(&inner.state);
            state.reserved_bytes -= bytes;
            match result {
                Ok(_) => {
                    drop(state);
                    inner
                        .counters
                        .spilled_records
                        .fetch_add(count, Ordering::Relaxed);
                    inner.spilled.notify_one();
                    Ok(Durable::Spilled)
                }
                Err(e) => {
                    state.pending -= count;
                    Err(BridgeError::Buffer(e))
                }
            }
        });
        write.await.map_err(|e| {
            BridgeError::Buffer(LogError::Unexpected(format!(
                "the spill write task failed: {e}"
            )))
        })?
    }

    /// Whether an append can succeed now: the log takes writes, or the buffer has room.
    pub fn is_ready(&self) -> bool {
        let inner = &*self.0;
        let (spilling, full) = {
            let state = lock(&inner.state);
            (state.spilling, state.full)
        };
        match &inner.buffer {
            Some(_) => (inner.log.is_healthy() && !spilling) || !full,
            None => inner.log.is_healthy(),
        }
    }

    /// Mode, depth, size and age of the buffer, and the counters since start.
    pub fn status(&self) -> SpillStatus {
        let inner = &*self.0;
        let spilling = lock(&inner.state).spilling;
        let mut status = match &inner.buffer {
            Some(buffer) => buffer::status(buffer, inner.config.max_bytes),
            None => SpillStatus::default(),
        };
        status.spilling = spilling;
        status.log_healthy = inner.log.is_healthy();
        status.spilled_total = inner.counters.spilled_records.load(Ordering::Relaxed);
        status.replayed_total = inner.counters.replayed_records.load(Ordering::Relaxed);
        status.replay_failures = inner.counters.replay_failures.load(Ordering::Relaxed);
        status
    }

    /// The replayer: drains the buffer into the log, oldest first, until `stop` turns true.
    /// Runs for the life of the API; does nothing while the buffer is empty.
    pub async fn replay(&self, mut stop: watch::Receiver<bool>) {
        let inner = &*self.0;
        let Some(buffer) = &inner.buffer else { return };
        if inner.replaying.swap(true, Ordering::SeqCst) {
            tracing::error!("a spill replayer is already running; not starting another");
            return;
        }
        let config = &inner.config;
        let mut delay = config.replay_interval;
        while !*stop.borrow() {
            let batch = match buffer::next_batch(buffer, config.replay_batch).await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spill buffer; retrying");
                    wait(&mut stop, delay).await;
                    delay = (delay * 2).min(config.max_replay_interval);
                    continue;
                }
            };
            let Some(next) = batch.last().map(|r| r.offset + 1) else {
                self.leave_spill_mode_if_drained();
                tokio::select! {
                    () = inner.spilled.notified() => {}
                    () = tokio::time::sleep(config.replay_interval) => {}
                    _ = stop.changed() => {}
                }
                continue;
            };
            let count = batch.len() as u64;
            let records = batch
                .into_iter()
                .map(|r| Record {
                    key: r.key.to_vec(),
                    value: r.value.to_vec(),
                    timestamp_ms: r.timestamp_ms,
                })
                .collect();
            // Waited for however long it takes, never sent again for being slow: the log may
            // still write what it was given, and a second send would land behind it (see
            // `Log::append`: a partly written first try plus a resend is a user's later
            // message ahead of an earlier one).
            let append = inner.log.append(records);
            tokio::pin!(append);
            let started = tokio::time::Instant::now();
            let acked = loop {
                tokio::select! {
                    acked = &mut append => break Some(acked),
                    // Stopping: the records stay in the buffer for the next start (any the
                    // log takes meanwhile come again then, and dedup drops the copies).
                    _ = stop.wait_for(|stop| *stop) => break None,
                    () = tokio::time::sleep(config.replay_warn_after) => {
                        inner.counters.replay_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            records = count,
                            waited = ?started.elapsed(),
                            "spill replay: the log has not acknowledged yet; still waiting"
                        );
                    }
                }
            };
            let Some(acked) = acked else { break };
            let failure = match acked {
                Ok(_) => match buffer::replayed(buffer, next).await {
                    Ok(()) => None,
                    Err(e) => Some(format!(
                        "the spill buffer cannot record replay progress: {e}"
                    )),
                },
                Err(e) => Some(e.to_string()),
            };
            match failure {
                None => {
                    {
                        let mut state = lock(&inner.state);
                        state.pending -= count;
                        state.full = false;
                    }
                    inner
                        .counters
                        .replayed_records
                        .fetch_add(count, Ordering::Relaxed);
                    delay = config.replay_interval;
                }
                Some(why) => {
                    // Retried as a whole: whatever part the log took comes again, with the
                    // same ids, and dedup drops it.
                    inner
                        .counters
                        .replay_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(reason = %why, retry_in = ?delay, records = count, "spill replay failed");
                    wait(&mut stop, delay).await;
                    delay = (delay * 2).min(config.max_replay_interval);
                }
            }
        }
        inner.replaying.store(false, Ordering::SeqCst);
    }

    fn leave_spill_mode_if_drained(&self) {
        let mut state = lock(&self.0.state);
        if state.spilling && state.pending == 0 {
            state.spilling = false;
            drop(state);
            tracing::info!("spill buffer drained: appending to the log directly again");
        }
    }

    /// Stops accepting appends into the buffer and flushes it. What it holds stays there for the
    /// next start.
    pub async fn close(&self) -> Result<(), LogError> {
        match &self.0.buffer {
            Some(buffer) => buffer.close().await,
            None => Ok(()),
        }
    }
}

async fn wait(stop: &mut watch::Receiver<bool>, delay: Duration) {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        _ = stop.changed() => {}
    }
}

#[cfg(test)]
mod tests;
