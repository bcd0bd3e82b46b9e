//! The consumer side: ordered reads, committed offsets, and subscriptions.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fjall::PersistMode;
use tokio::sync::watch;

use super::{Shared, codec, lock, read_u64};
use crate::{Assignment, LogError, LogRecord, PartitionStream, Subscription};

fn offset_key(group: &str, partition: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(group.len() + 5);
    key.extend_from_slice(group.as_bytes());
    key.push(0);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// Every group's committed offset on `partition`.
pub(super) fn all_committed(shared: &Shared, partition: u32) -> Result<Vec<u64>, LogError> {
    let mut out = Vec::new();
    for guard in shared.offsets.iter() {
        let (key, value) = guard.into_inner().map_err(|e| shared.storage_error(e))?;
        let Some(split) = key.len().checked_sub(5) else {
            continue;
        };
        if key[split] == 0
            && key[split + 1..] == partition.to_be_bytes()
            && let Some(offset) = read_u64(&value)
        {
            out.push(offset);
        }
    }
    Ok(out)
}

pub(super) fn read_range(
    shared: &Shared,
    partition: u32,
    from: u64,
    max: usize,
) -> Result<Vec<LogRecord>, LogError> {
    let keyspace = shared.partition(partition)?;
    let end = *shared.high_watermarks[partition as usize].borrow();
    if from >= end || max == 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(max.min((end - from) as usize).min(8192));
    // Start at the chunk holding `from`: the last chunk whose first offset is at most `from`.
    let start_key = match keyspace.range(..=from.to_be_bytes()).next_back() {
        Some(guard) => guard.key().map_err(|e| shared.storage_error(e))?.to_vec(),
        None => from.to_be_bytes().to_vec(),
    };
    for guard in keyspace.range(start_key..end.to_be_bytes().to_vec()) {
        if out.len() >= max {
            break;
        }
        let (key, chunk) = guard.into_inner().map_err(|e| shared.storage_error(e))?;
        let first = read_u64(&key).ok_or_else(|| {
            shared.storage_error(format!(
                "partition {partition}: malformed chunk key {key:?}"
            ))
        })?;
        codec::decode_chunk(partition, first, &chunk, from, end, max, &mut out).ok_or_else(
            || {
                shared.storage_error(format!(
                    "partition {partition} chunk at offset {first}: malformed record"
                ))
            },
        )?;
    }
    Ok(out)
}

pub(super) fn committed(
    shared: &Shared,
    group: &str,
    partition: u32,
) -> Result<Option<u64>, LogError> {
    shared.partition(partition)?;
    Ok(shared
        .offsets
        .get(offset_key(group, partition))
        .map_err(|e| shared.storage_error(e))?
        .and_then(|v| read_u64(&v)))
}

pub(super) fn commit(
    shared: &Shared,
    group: &str,
    partition: u32,
    next_offset: u64,
) -> Result<(), LogError> {
    shared.partition(partition)?;
    let end = *shared.high_watermarks[partition as usize].borrow();
    if next_offset > end {
        return Err(LogError::CommitBeyondEnd {
            partition,
            offset: next_offset,
            end,
        });
    }
    let mut batch = shared.db.batch().durability(Some(PersistMode::SyncAll));
    batch.insert(
        &shared.offsets,
        offset_key(group, partition),
        next_offset.to_be_bytes(),
    );
    batch.commit().map_err(|e| shared.storage_error(e))
}

pub(super) fn subscribe(
    shared: &Arc<Shared>,
    active_groups: &Arc<Mutex<Vec<String>>>,
    group: &str,
) -> Result<Box<dyn Subscription>, LogError> {
    {
        let mut active = lock(active_groups);
        if active.iter().any(|g| g == group) {
            return Err(LogError::GroupBusy(group.to_string()));
        }
        active.push(group.to_string());
    }
    let guard = GroupGuard {
        active_groups: Arc::clone(active_groups),
        group: group.to_string(),
    };
    // A new group starts at the beginning of what is stored, and from now on holds retention.
    let mut positions = Vec::with_capacity(shared.parts.len());
    for p in 0..shared.config.partitions {
        let position = match committed(shared, group, p)? {
            Some(offset) => offset,
            None => {
                let start = lock(&shared.extents)[p as usize].start;
                commit(shared, group, p, start)?;
                start
            }
        };
        positions.push(position);
    }
    let guard = Arc::new(guard);
    let streams = positions
        .into_iter()
        .enumerate()
        .map(|(p, position)| EmbeddedPartitionStream {
            shared: Arc::clone(shared),
            group: group.to_string(),
            partition: p as u32,
            position,
            watermark: shared.high_watermarks[p].subscribe(),
            _guard: Arc::clone(&guard),
        })
        .collect();
    Ok(Box::new(EmbeddedSubscription { pending: streams }))
}

/// Frees the group name when the last stream of a subscription is dropped.
struct GroupGuard {
    active_groups: Arc<Mutex<Vec<String>>>,
    group: String,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        lock(&self.active_groups).retain(|g| g != &self.group);
    }
}

/// The embedded log has one consumer per group, so it is assigned every partition at once and
/// nothing is ever revoked.
struct EmbeddedSubscription {
    pending: Vec<EmbeddedPartitionStream>,
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn next(&mut self) -> Option<Assignment> {
        if self.pending.is_empty() {
            // Nothing else will happen for this member; wait until the caller drops it.
            std::future::pending::<()>().await;
        }
        let stream = self.pending.remove(0);
        Some(Assignment::Assigned(Box::new(stream)))
    }
}

struct EmbeddedPartitionStream {
    shared: Arc<Shared>,
    group: String,
    partition: u32,
    position: u64,
    watermark: watch::Receiver<u64>,
    _guard: Arc<GroupGuard>,
}

#[async_trait]
impl PartitionStream for EmbeddedPartitionStream {
    fn partition(&self) -> u32 {
        self.partition
    }

    fn position(&self) -> u64 {
        self.position
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<LogRecord>, LogError> {
        let position = self.position;
        self.watermark
            .wait_for(|end| *end > position)
            .await
            .map_err(|_| LogError::Closed)?;
        let shared = Arc::clone(&self.shared);
        let partition = self.partition;
        let records =
            tokio::task::spawn_blocking(move || read_range(&shared, partition, position, max))
                .await
                .map_err(|e| self.shared.storage_error(format!("read task failed: {e}")))??;
        if let Some(first) = records.first()
            && first.offset > position
        {
            tracing::warn!(
                partition,
                group = %self.group,
                from = position,
                to = first.offset,
                "records were deleted by retention before this group read them"
            );
        }
        if let Some(last) = records.last() {
            self.position = last.offset + 1;
        }
        Ok(records)
    }

    async fn commit(&mut self, next_offset: u64) -> Result<(), LogError> {
        let shared = Arc::clone(&self.shared);
        let group = self.group.clone();
        let partition = self.partition;
        tokio::task::spawn_blocking(move || commit(&shared, &group, partition, next_offset))
            .await
            .map_err(|e| {
                self.shared
                    .storage_error(format!("commit task failed: {e}"))
            })?
    }
}
