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
        let p = partition as usize;
        // Records below every group's commit are done with. No group: nothing is committed.
        let committed_floor = reader::all_committed(shared, partition)?
            .into_iter()
            .min()
            .unwrap_or(0);
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
                // A chunk goes only when every record in it may go.
                let committed = first + count <= committed_floor;
                let too_old = age_floor.is_some_and(|floor| newest < floor);
                let too_big = shared
                    .config
                    .retention_max_bytes
                    .is_some_and(|cap| bytes - freed > cap);
                if !(committed || too_old || too_big) {
                    break;
                }
                batch.remove_weak(&shared.parts[p], key);
                new_start = first + count;
                freed += size;
            }
            if new_start == start {
                break;
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
    Ok(report)
}
