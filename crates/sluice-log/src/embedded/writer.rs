//! The writer thread: group commit.
//!
//! It blocks for one append request, then takes every other request already waiting (up to a
//! cap), assigns offsets, writes all records and the partitions' byte counters as one atomic
//! fjall batch with one fsync, and only then answers every request of the group.

use std::sync::atomic::Ordering;

use fjall::PersistMode;
use sluice_model::partition_for_key;
use tokio::sync::mpsc;

use super::{AppendRequest, META_BYTES, Shared, codec, lock, meta_key};
use crate::Ack;

/// Most records one group carries; more wait for the next fsync.
const MAX_GROUP_RECORDS: usize = 50_000;

/// Under load, wait this long for more requests before syncing (PostgreSQL's `commit_delay`).
/// Each fsync costs CPU in the kernel and one wake-up per group; waiting a fraction of an
/// fsync's latency for more requests makes groups several times larger.
const GROUP_DELAY: std::time::Duration = std::time::Duration::from_micros(200);

/// The delay applies only when the previous group had at least this many requests: a lone
/// request at low load is synced at once.
const BUSY_GROUP: usize = 4;

/// Moves every waiting request into the group, up to the record cap.
fn drain(
    receiver: &mut mpsc::Receiver<AppendRequest>,
    group: &mut Vec<AppendRequest>,
    records: &mut usize,
) {
    while *records < MAX_GROUP_RECORDS {
        match receiver.try_recv() {
            Ok(request) => {
                *records += request.records.len();
                group.push(request);
            }
            Err(_) => break,
        }
    }
}

pub(super) fn run(shared: &Shared, mut receiver: mpsc::Receiver<AppendRequest>) {
    let partitions = shared.config.partitions;
    let mut next: Vec<u64> = shared.high_watermarks.iter().map(|w| *w.borrow()).collect();
    let mut group: Vec<AppendRequest> = Vec::new();
    let mut touched = vec![false; partitions as usize];
    let mut added_bytes = vec![0u64; partitions as usize];
    // Per-partition chunk buffers, reused from group to group (fjall copies what it keeps).
    let mut buffers: Vec<Vec<u8>> = (0..partitions)
        .map(|_| Vec::with_capacity(64 << 10))
        .collect();

    let mut previous_group = 0;
    while let Some(first) = receiver.blocking_recv() {
        let mut records = first.records.len();
        group.push(first);
        drain(&mut receiver, &mut group, &mut records);
        if previous_group >= BUSY_GROUP && records < MAX_GROUP_RECORDS {
            std::thread::sleep(GROUP_DELAY);
            drain(&mut receiver, &mut group, &mut records);
        }
        previous_group = group.len();

        let before = next.clone();
        touched.fill(false);
        added_bytes.fill(0);
        let mut batch = shared.db.batch().durability(Some(PersistMode::SyncAll));
        let mut chunks: Vec<Option<codec::ChunkBuilder<'_>>> =
            (0..partitions).map(|_| None).collect();
        let mut free_buffers: Vec<Option<&mut Vec<u8>>> = buffers.iter_mut().map(Some).collect();
        let mut acks: Vec<Vec<Ack>> = Vec::with_capacity(group.len());
        for request in &group {
            let mut request_acks = Vec::with_capacity(request.records.len());
            for record in &request.records {
                let partition = partition_for_key(&record.key, partitions);
                let p = partition as usize;
                let offset = next[p];
                next[p] += 1;
                touched[p] = true;
                added_bytes[p] += codec::stored_len(record.key.len(), record.value.len());
                if chunks[p].is_none()
                    && let Some(buf) = free_buffers[p].take()
                {
                    chunks[p] = Some(codec::ChunkBuilder::new(offset, buf));
                }
                if let Some(chunk) = chunks[p].as_mut() {
                    chunk.push(record);
                }
                request_acks.push(Ack { partition, offset });
            }
            acks.push(request_acks);
        }
        for (p, chunk) in chunks.into_iter().enumerate() {
            if let Some(chunk) = chunk {
                let (first, bytes) = chunk.finish();
                batch.insert(&shared.parts[p], first.to_be_bytes(), bytes);
            }
        }

        // The byte counters go in the same batch; the extents lock keeps retention from
        // changing them between our read and the commit.
        let result = {
            let mut extents = lock(&shared.extents);
            for (p, extent) in extents.iter().enumerate() {
                if touched[p] {
                    let bytes = extent.bytes + added_bytes[p];
                    batch.insert(
                        &shared.meta,
                        meta_key(META_BYTES, p as u32),
                        bytes.to_be_bytes(),
                    );
                }
            }
            let result = batch.commit();
            if result.is_ok() {
                for (p, extent) in extents.iter_mut().enumerate() {
                    extent.bytes += added_bytes[p];
                }
            }
            result
        };

        match result {
            Ok(()) => {
                for (p, watermark) in shared.high_watermarks.iter().enumerate() {
                    if touched[p] {
                        watermark.send_replace(next[p]);
                    }
                }
                shared.counters.syncs.fetch_add(1, Ordering::Relaxed);
                shared
                    .counters
                    .requests
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
                shared
                    .counters
                    .records
                    .fetch_add(records as u64, Ordering::Relaxed);
                for (request, request_acks) in group.drain(..).zip(acks) {
                    // The requester may have given up (timeout); its records are durable anyway.
                    let _ = request.reply.send((Ok(request_acks), request.records));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, path = %shared.path.display(), "log append failed; the log stops accepting writes");
                shared.healthy.store(false, Ordering::Relaxed);
                next = before;
                let error = shared.storage_error(e);
                for request in group.drain(..) {
                    let _ = request.reply.send((Err(error.clone()), request.records));
                }
            }
        }
    }
}
