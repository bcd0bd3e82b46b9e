//! The embedded log: N partitions on one fjall database on local disk.
//!
//! Storage layout (one fjall `Database` under `<data_dir>/log`):
//! - keyspace `p<N>` per partition: chunks of records, one per group commit, keyed by the
//!   offset of their first record (`codec`).
//! - keyspace `meta`: per partition, the first retained offset (`start:<p>`) and the bytes held
//!   (`bytes:<p>`), written in the same atomic batch as the records they describe.
//! - keyspace `offsets`: committed position per (group, partition).
//!
//! Durability: one writer thread owns appends. It takes every append request that is waiting,
//! writes them as one atomic batch with `PersistMode::SyncAll` (one fsync for the whole group),
//! and only then answers each request. fjall's journal is checksummed and recovers to the last
//! complete batch after a crash, so a torn write loses only unacknowledged data.

mod codec;
mod reader;
mod retention;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::{Ack, LogError, Record, Subscription};
pub use retention::RetentionReport;

/// Settings of the embedded log.
#[derive(Debug, Clone)]
pub struct EmbeddedLogConfig {
    /// Number of partitions. Fixed when the log is created; reopening with another count fails.
    pub partitions: u32,
    /// Delete records older than this even if a group has not committed them (`None`: keep).
    pub retention_max_age: Option<Duration>,
    /// Per-partition cap on stored bytes; the oldest records go first (`None`: no cap).
    pub retention_max_bytes: Option<u64>,
    /// Most bytes of appends queued for the writer at once; further appends wait (backpressure).
    pub max_queued_bytes: usize,
}

impl Default for EmbeddedLogConfig {
    fn default() -> Self {
        EmbeddedLogConfig {
            partitions: 8,
            retention_max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_max_bytes: None,
            max_queued_bytes: 64 << 20,
        }
    }
}

/// Counters that show group commit at work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Append requests acknowledged.
    pub requests: u64,
    /// Records acknowledged.
    pub records: u64,
    /// Batches written, each with one fsync.
    pub syncs: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    records: AtomicU64,
    syncs: AtomicU64,
}

pub(crate) struct Shared {
    path: PathBuf,
    db: Database,
    parts: Vec<Keyspace>,
    meta: Keyspace,
    offsets: Keyspace,
    /// Per partition: one past the last durable offset. Readers wait on it.
    high_watermarks: Vec<watch::Sender<u64>>,
    /// Per partition: first offset still stored, and bytes stored. Changed by the writer and by
    /// retention; this lock is what keeps the two consistent.
    extents: Mutex<Vec<Extent>>,
    /// Held by whoever deletes chunks (retention, `delete_before`): one at a time.
    deleting: Mutex<()>,
    counters: Counters,
    healthy: AtomicBool,
    config: EmbeddedLogConfig,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Extent {
    start: u64,
    bytes: u64,
}

impl Shared {
    fn storage_error(&self, e: impl std::fmt::Display) -> LogError {
        LogError::Storage {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn partition(&self, partition: u32) -> Result<&Keyspace, LogError> {
        self.parts
            .get(partition as usize)
            .ok_or(LogError::NoSuchPartition {
                partition,
                partitions: self.config.partitions,
            })
    }
}

/// The writer's answer to one append request, and the request's records handed back.
pub(crate) type AppendAnswer = (Result<Vec<Ack>, LogError>, Vec<Record>);

pub(crate) struct AppendRequest {
    records: Vec<Record>,
    /// The answer, with the records handed back so they are freed on the requester's thread,
    /// which allocated them (a glibc free from another thread takes that arena's lock).
    reply: tokio::sync::oneshot::Sender<AppendAnswer>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// The embedded log. Cheap to share behind an `Arc`.
pub struct EmbeddedLog {
    shared: Arc<Shared>,
    /// Appends go to the writer thread through this; `close` takes it to stop the writer.
    sender: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    /// Bounds the bytes queued for the writer (backpressure for the API).
    queued_bytes: Arc<Semaphore>,
    /// The writer thread; `close` joins it so every queued append is answered first.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Groups with a live subscription in this process.
    active_groups: Arc<Mutex<Vec<String>>>,
}

const META_START: &str = "start:";
const META_BYTES: &str = "bytes:";
const META_PARTITIONS: &[u8] = b"partitions";

fn meta_key(prefix: &str, partition: u32) -> Vec<u8> {
    format!("{prefix}{partition}").into_bytes()
}

fn read_u64(value: &[u8]) -> Option<u64> {
    value.try_into().ok().map(u64::from_be_bytes)
}

impl EmbeddedLog {
    /// Opens (or creates) the log under `dir`.
    pub fn open(dir: &Path, config: EmbeddedLogConfig) -> Result<Self, LogError> {
        if config.partitions == 0 {
            return Err(LogError::Config("partitions must be at least 1".into()));
        }
        let storage = |e: fjall::Error| LogError::Storage {
            path: dir.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| LogError::Storage {
            path: dir.display().to_string(),
            message: format!("cannot create the log directory: {e}"),
        })?;
        let db = Database::builder(dir)
            .cache_size(8 << 20)
            .worker_threads(1)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => LogError::Locked {
                    path: dir.display().to_string(),
                },
                e => storage(e),
            })?;
        // 1 MB memtables: every partition fills one, so at 4 MB each the log held ~36 MB in
        // memtables under a steady load; 1 MB cost no measurable throughput (BENCHMARKS.md).
        let opts = || KeyspaceCreateOptions::default().max_memtable_size(1 << 20);
        // Partitions are only ever range-scanned, never point-read: bloom filters would be
        // built on every flush for nothing.
        let partition_opts = || opts().filter_policy(fjall::config::FilterPolicy::disabled());
        let meta = db.keyspace("meta", opts).map_err(storage)?;
        let offsets = db.keyspace("offsets", opts).map_err(storage)?;

        match meta.get(META_PARTITIONS).map_err(storage)? {
            Some(v) => {
                let existing = read_u64(&v).unwrap_or(0);
                if existing != u64::from(config.partitions) {
                    return Err(LogError::Config(format!(
                        "the log at {} has {existing} partitions but {} are configured; the partition count of an existing log cannot change",
                        dir.display(),
                        config.partitions
                    )));
                }
            }
            None => {
                meta.insert(META_PARTITIONS, u64::from(config.partitions).to_be_bytes())
                    .map_err(storage)?;
                db.persist(PersistMode::SyncAll).map_err(storage)?;
            }
        }

        let mut parts = Vec::with_capacity(config.partitions as usize);
        let mut high_watermarks = Vec::with_capacity(config.partitions as usize);
        let mut extents = Vec::with_capacity(config.partitions as usize);
        for p in 0..config.partitions {
            let ks = db
                .keyspace(&format!("p{p}"), partition_opts)
                .map_err(storage)?;
            let start = meta
                .get(meta_key(META_START, p))
                .map_err(storage)?
                .and_then(|v| read_u64(&v))
                .unwrap_or(0);
            let bytes = meta
                .get(meta_key(META_BYTES, p))
                .map_err(storage)?
                .and_then(|v| read_u64(&v))
                .unwrap_or(0);
            let next = match ks.last_key_value() {
                Some(guard) => {
                    let (key, chunk) = guard.into_inner().map_err(storage)?;
                    match (read_u64(&key), codec::chunk_len(&chunk)) {
                        (Some(first), Some(count)) => first + count,
                        _ => {
                            return Err(LogError::Storage {
                                path: dir.display().to_string(),
                                message: format!("partition {p}: the last chunk is malformed"),
                            });
                        }
                    }
                }
                None => start,
            };
            parts.push(ks);
            high_watermarks.push(watch::Sender::new(next.max(start)));
            extents.push(Extent { start, bytes });
        }

        let shared = Arc::new(Shared {
            path: dir.to_path_buf(),
            db,
            parts,
            meta,
            offsets,
            high_watermarks,
            extents: Mutex::new(extents),
            deleting: Mutex::new(()),
            counters: Counters::default(),
            healthy: AtomicBool::new(true),
            config: config.clone(),
        });
        let (sender, receiver) = mpsc::channel(4096);
        let writer_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("sluice-log-writer".into())
            .spawn(move || writer::run(&writer_shared, receiver))
            .map_err(|e| LogError::Storage {
                path: dir.display().to_string(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(EmbeddedLog {
            shared,
            sender: Mutex::new(Some(sender)),
            queued_bytes: Arc::new(Semaphore::new(config.max_queued_bytes)),
            writer: Mutex::new(Some(writer)),
            active_groups: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Group-commit counters since open.
    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        LogStats {
            requests: c.requests.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
        }
    }

    /// First offset still stored in `partition`.
    pub fn start_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.shared.partition(partition)?;
        Ok(lock(&self.shared.extents)[partition as usize].start)
    }

    /// One past the last durable offset of `partition`.
    pub fn end_offset(&self, partition: u32) -> Result<u64, LogError> {
        self.shared.partition(partition)?;
        Ok(*self.shared.high_watermarks[partition as usize].borrow())
    }

    /// Bytes of records stored in `partition` (keys, values and timestamps).
    pub fn stored_bytes(&self, partition: u32) -> Result<u64, LogError> {
        self.shared.partition(partition)?;
        Ok(lock(&self.shared.extents)[partition as usize].bytes)
    }

    /// Reads up to `max` durable records of `partition` from `from` on, in offset order.
    pub fn read(
        &self,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<crate::LogRecord>, LogError> {
        reader::read_range(&self.shared, partition, from, max)
    }

    /// The committed position of `group` on `partition`, if it has one.
    pub fn committed(&self, group: &str, partition: u32) -> Result<Option<u64>, LogError> {
        reader::committed(&self.shared, group, partition)
    }

    /// Commits `next_offset` as `group`'s position on `partition`.
    pub fn commit(&self, group: &str, partition: u32, next_offset: u64) -> Result<(), LogError> {
        reader::commit(&self.shared, group, partition, next_offset)
    }

    /// Deletes what retention allows now: records every group has committed, and records past
    /// the age and size caps.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<RetentionReport, LogError> {
        retention::enforce(&self.shared, now_ms)
    }

    /// Runs `enforce_retention` every `interval` until the log is closed.
    pub fn spawn_retention(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let log = Arc::downgrade(self);
        tokio::spawn(async move {
            // The first pass runs one interval after start, not at start: a restart does no
            // heavy work before serving.
            let mut ticker =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(log) = log.upgrade() else { return };
                if !crate::Log::is_healthy(log.as_ref()) {
                    return;
                }
                let now = sluice_model::time::now_ms();
                match tokio::task::spawn_blocking(move || log.enforce_retention(now)).await {
                    Ok(Ok(report)) if report.deleted > 0 => {
                        tracing::info!(
                            deleted = report.deleted,
                            freed_bytes = report.freed_bytes,
                            "log retention"
                        );
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "log retention failed"),
                    Err(e) => tracing::warn!(error = %e, "log retention task failed"),
                }
            }
        })
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical section
/// here leaves the data consistent before anything that can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait]
impl crate::Log for EmbeddedLog {
    async fn read(
        &self,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<crate::LogRecord>, LogError> {
        EmbeddedLog::read(self, partition, from, max)
    }

    async fn end_offsets(&self) -> Result<Vec<u64>, LogError> {
        (0..self.shared.config.partitions)
            .map(|p| self.end_offset(p))
            .collect()
    }

    async fn end_offset(&self, partition: u32) -> Result<u64, LogError> {
        EmbeddedLog::end_offset(self, partition)
    }

    async fn delete_before(&self, partition: u32, offset: u64) -> Result<(), LogError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || retention::delete_before(&shared, partition, offset))
            .await
            .map_err(|e| LogError::Unexpected(format!("delete task failed: {e}")))??;
        Ok(())
    }

    fn partitions(&self) -> u32 {
        self.shared.config.partitions
    }

    async fn append(&self, records: Vec<Record>) -> Result<Vec<Ack>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let bytes: usize = records
            .iter()
            .map(|r| r.key.len() + r.value.len() + 16)
            .sum();
        // A single request larger than the whole queue still goes through, alone.
        let want = bytes.min(self.shared.config.max_queued_bytes) as u32;
        let permit = Arc::clone(&self.queued_bytes)
            .acquire_many_owned(want.max(1))
            .await
            .map_err(|_| LogError::Closed)?;
        let sender = lock(&self.sender).clone().ok_or(LogError::Closed)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        sender
            .send(AppendRequest {
                records,
                reply,
                _permit: permit,
            })
            .await
            .map_err(|_| LogError::Closed)?;
        let (result, records) = answer.await.map_err(|_| LogError::Closed)?;
        drop(records);
        result
    }

    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscription>, LogError> {
        reader::subscribe(&self.shared, &self.active_groups, group)
    }

    fn is_healthy(&self) -> bool {
        // Unhealthy after a storage error, after `close`, or if the writer thread is gone.
        self.shared.healthy.load(Ordering::Relaxed)
            && lock(&self.sender).as_ref().is_some_and(|s| !s.is_closed())
    }

    async fn close(&self) -> Result<(), LogError> {
        drop(lock(&self.sender).take());
        let writer = lock(&self.writer).take();
        if let Some(handle) = writer {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| LogError::Storage {
                    path: self.shared.path.display().to_string(),
                    message: format!("writer thread did not stop cleanly: {e}"),
                })?
                .map_err(|_| LogError::Storage {
                    path: self.shared.path.display().to_string(),
                    message: "writer thread panicked".into(),
                })?;
        }
        let stats = self.stats();
        tracing::info!(
            requests = stats.requests,
            records = stats.records,
            fsyncs = stats.syncs,
            requests_per_fsync = stats.requests as f64 / stats.syncs.max(1) as f64,
            "log closed"
        );
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.db.persist(PersistMode::SyncAll))
            .await
            .map_err(|e| self.shared.storage_error(e))?
            .map_err(|e| self.shared.storage_error(e))
    }
}

#[cfg(test)]
mod tests;
