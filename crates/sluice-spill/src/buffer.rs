//! The spill buffer's storage: an `EmbeddedLog` with one partition, so records keep one global
//! order, group commit gives one fsync for many requests, and a crash recovers to the last
//! complete write. Replay progress is the committed offset of group `replay`; replayed chunks
//! are deleted by the log's retention right after each commit.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_log::{EmbeddedLog, EmbeddedLogConfig, LogError, LogRecord};

const PARTITION: u32 = 0;
const GROUP: &str = "replay";

pub(crate) fn open(dir: &Path) -> Result<EmbeddedLog, LogError> {
    EmbeddedLog::open(
        dir,
        EmbeddedLogConfig {
            partitions: 1,
            // Never drop what was acknowledged: only replayed records are deleted.
            retention_max_age: None,
            retention_max_bytes: None,
            ..EmbeddedLogConfig::default()
        },
    )
}

/// First offset not yet replayed.
fn position(buffer: &EmbeddedLog) -> Result<u64, LogError> {
    let start = buffer.start_offset(PARTITION)?;
    Ok(buffer
        .committed(GROUP, PARTITION)?
        .unwrap_or(start)
        .max(start))
}

/// Records written and not yet replayed.
pub(crate) fn unreplayed(buffer: &EmbeddedLog) -> Result<u64, LogError> {
    Ok(buffer.end_offset(PARTITION)? - position(buffer)?)
}

/// Bytes the buffer holds on disk (replayed records go at the next retention pass).
pub(crate) fn held_bytes(buffer: &EmbeddedLog) -> u64 {
    buffer.stored_bytes(PARTITION).unwrap_or(0)
}

/// The oldest unreplayed records, up to `max` (empty when everything was replayed).
pub(crate) async fn next_batch(
    buffer: &Arc<EmbeddedLog>,
    max: usize,
) -> Result<Vec<LogRecord>, LogError> {
    let buffer = Arc::clone(buffer);
    tokio::task::spawn_blocking(move || {
        let from = position(&buffer)?;
        buffer.read(PARTITION, from, max)
    })
    .await
    .map_err(|e| LogError::Unexpected(format!("spill read task failed: {e}")))?
}

/// Records that everything before `next` is in the log, and deletes it from the buffer.
pub(crate) async fn replayed(buffer: &Arc<EmbeddedLog>, next: u64) -> Result<(), LogError> {
    let buffer = Arc::clone(buffer);
    tokio::task::spawn_blocking(move || {
        buffer.commit(GROUP, PARTITION, next)?;
        buffer.enforce_retention(sluice_model::time::now_ms())?;
        Ok(())
    })
    .await
    .map_err(|e| LogError::Unexpected(format!("spill commit task failed: {e}")))?
}

/// What `sluice buffer status`, `/readyz` and `/metrics` show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpillStatus {
    /// Whether appends currently go to the buffer instead of the log.
    pub spilling: bool,
    /// Whether the log reports that it takes writes.
    pub log_healthy: bool,
    /// Records waiting to be replayed.
    pub records: u64,
    /// Bytes the buffer holds, and its limit (0: spilling disabled).
    pub bytes: u64,
    pub max_bytes: u64,
    /// Age of the oldest record waiting, in milliseconds.
    pub oldest_age_ms: Option<u64>,
    /// Records spilled, replayed, and failed replay attempts since this process started.
    pub spilled_total: u64,
    pub replayed_total: u64,
    pub replay_failures: u64,
}

impl SpillStatus {
    pub fn oldest_age(&self) -> Option<Duration> {
        self.oldest_age_ms.map(Duration::from_millis)
    }
}

pub(crate) fn status(buffer: &EmbeddedLog, max_bytes: u64) -> SpillStatus {
    let records = unreplayed(buffer).unwrap_or(0);
    let oldest_age_ms = position(buffer)
        .and_then(|from| buffer.read(PARTITION, from, 1))
        .ok()
        .and_then(|first| first.first().map(|r| r.timestamp_ms))
        .map(|at| sluice_model::time::now_ms().saturating_sub(at).max(0) as u64);
    SpillStatus {
        records,
        bytes: held_bytes(buffer),
        max_bytes,
        oldest_age_ms,
        ..SpillStatus::default()
    }
}

/// The status of the buffer under `dir`, read from disk, when no server holds it. Fails with
/// `LogError::Locked` while a server runs on it (ask the server then).
pub fn status_at(dir: &Path, max_bytes: u64) -> Result<SpillStatus, LogError> {
    if !dir.exists() {
        return Ok(SpillStatus {
            max_bytes,
            ..SpillStatus::default()
        });
    }
    let buffer = open(dir)?;
    let mut status = status(&buffer, max_bytes);
    status.spilling = status.records > 0;
    Ok(status)
}
