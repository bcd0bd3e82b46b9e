//! Retention: delete records every group has committed, then enforce the age and size caps.
//!
//! Retention works in whole chunks (one group commit's records of a partition). Deletions and
//! the new start offset and byte count of a partition are one atomic batch, so a
//! crash in the middle leaves a consistent partition.

use fjall::PersistMode;

use super::{META_BYTES, META_START, Shared, codec, lock, meta_key, read_u64, reader};
use crate::LogError;

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub deleted: u64,
    pub freed_bytes: u64,
}

/// Chunk deletions per atomic batch.
const CHUNKS_PER_BATCH: usize = 1_000;

pub(super) fn enforce(shared: &Shared, now_ms: i64) -> Result<RetentionReport, LogError> {
    let mut report = RetentionReport::default();
    let age_floor = shared
        .config
        .retention_max_age
        .map(|age| now_ms.saturating_sub(age.as_millis() as i64));
    for partition in 0..shared.config.partitions {
        // Records below every group's commit are done with. No group: nothing is committed.
        let committed_floor = reader::all_committed(shared, partition)?
            .into_iter()
            .min()
            .unwrap_or(0);
        let done = delete_chunks(shared, partition, |chunk| {
            // A chunk goes only when every record in it may go.
            let committed = chunk.first + chunk.count <= committed_floor;
            let too_old = age_floor.is_some_and(|floor| chunk.newest < floor);
            let too_big = shared
                .config
                .retention_max_bytes
                .is_some_and(|cap| chunk.bytes_left > cap);
            committed || too_old || too_big
        })?;
        report.deleted += done.deleted;
        report.freed_bytes += done.freed_bytes;
    }
    Ok(report)
}

/// Deletes the chunks of `partition` that lie wholly before `offset` (`Log::delete_before`).
pub(super) fn delete_before(
    shared: &Shared,
    partition: u32,
    offset: u64,
) -> Result<RetentionReport, LogError> {
    if partition >= shared.config.partitions {
        return Err(LogError::Config(format!(
            "no partition {partition}: the log has {}",
            shared.config.partitions
        )));
    }
    delete_chunks(shared, partition, |chunk| {
        chunk.first + chunk.count <= offset
    })
}

/// What `delete_chunks` asks about a chunk.
struct ChunkInfo {
    first: u64,
    count: u64,
    /// The newest record's timestamp.
    newest: i64,
    /// The partition's bytes if the chunks before this one go.
    bytes_left: u64,
}

/// Deletes the oldest chunks of `partition` while `may_go` says so. One deleter at a time
/// (retention and `delete_before`): each subtracts what it freed from the partition's extent.
fn delete_chunks(
    shared: &Shared,
    partition: u32,
    may_go: impl Fn(&ChunkInfo) -> bool,
) -> Result<RetentionReport, LogError> {
    let _one = lock(&shared.deleting);
    let p = partition as usize;
    let mut report = RetentionReport::default();
    loop {
        let (start, bytes) = {
            let e = lock(&shared.extents)[p];
            (e.start, e.bytes)
        };
        let end = *shared.high_watermarks[p].borrow();
        let mut batch = shared.db.batch().durability(Some(PersistMode::SyncAll));
        let mut new_start = start;
        let mut freed = 0u64;
        for guard in shared.parts[p]
            .range(start.to_be_bytes()..end.to_be_bytes())
            .take(CHUNKS_PER_BATCH)
        {
            let (key, chunk) = guard.into_inner().map_err(|e| shared.storage_error(e))?;
            let (Some(first), Some(count), Some((newest, size))) = (
                read_u64(&key),
                codec::chunk_len(&chunk),
                codec::chunk_summary(&chunk),
            ) else {
                return Err(shared.storage_error(format!(
                    "partition {partition}: malformed chunk during retention"
                )));
            };
            let info = ChunkInfo {
                first,
                count,
                newest,
                bytes_left: bytes - freed,
            };
            if !may_go(&info) {
                break;
            }
            batch.remove_weak(&shared.parts[p], key);
            new_start = first + count;
            freed += size;
        }
        if new_start == start {
            return Ok(report);
        }
        let deleted = new_start - start;
        let mut extents = lock(&shared.extents);
        // The writer may have added bytes since we looked; subtract from the current value.
        let remaining = extents[p].bytes.saturating_sub(freed);
        batch.insert(
            &shared.meta,
            meta_key(META_START, partition),
            new_start.to_be_bytes(),
        );
        batch.insert(
            &shared.meta,
            meta_key(META_BYTES, partition),
            remaining.to_be_bytes(),
        );
        batch.commit().map_err(|e| shared.storage_error(e))?;
        extents[p].start = new_start;
        extents[p].bytes = remaining;
        drop(extents);
        report.deleted += deleted;
        report.freed_bytes += freed;
    }
}
