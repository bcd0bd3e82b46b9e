//! Encoding of the partition keyspaces.
//!
//! A partition stores *chunks*: one fjall entry per partition per group commit, keyed by the
//! offset of its first record (u64 big-endian). Storing a group's records as one entry keeps
//! fjall's per-entry costs (memtable insert, journal framing, flush) per group instead of per
//! record. fjall checksums the blocks and journal entries around each chunk.
//!
//! chunk  = count: u32 BE, then `count` records
//! record = timestamp: i64 BE, key len: u32 BE, value len: u32 BE, key, value

use bytes::Bytes;

use crate::{LogRecord, Record};

const CHUNK_HEADER: usize = 4;
const RECORD_HEADER: usize = 8 + 4 + 4;

/// Bytes a record occupies, as counted by size-based retention.
pub(crate) fn stored_len(key: usize, value: usize) -> u64 {
    (RECORD_HEADER + key + value) as u64
}

/// A chunk being built by the writer, in a buffer the writer reuses from group to group.
pub(crate) struct ChunkBuilder<'a> {
    pub(crate) first_offset: u64,
    buf: &'a mut Vec<u8>,
    count: u32,
}

impl<'a> ChunkBuilder<'a> {
    pub(crate) fn new(first_offset: u64, buf: &'a mut Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(&0u32.to_be_bytes());
        ChunkBuilder {
            first_offset,
            buf,
            count: 0,
        }
    }

    pub(crate) fn push(&mut self, record: &Record) {
        self.buf
            .extend_from_slice(&record.timestamp_ms.to_be_bytes());
        self.buf
            .extend_from_slice(&(record.key.len() as u32).to_be_bytes());
        self.buf
            .extend_from_slice(&(record.value.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(&record.key);
        self.buf.extend_from_slice(&record.value);
        self.count += 1;
    }

    /// The first offset and the encoded chunk.
    pub(crate) fn finish(self) -> (u64, &'a [u8]) {
        self.buf[..CHUNK_HEADER].copy_from_slice(&self.count.to_be_bytes());
        (self.first_offset, self.buf.as_slice())
    }
}

/// Number of records in a stored chunk.
pub(crate) fn chunk_len(stored: &[u8]) -> Option<u64> {
    Some(u64::from(u32::from_be_bytes(
        stored.get(..CHUNK_HEADER)?.try_into().ok()?,
    )))
}

/// One record inside a chunk, as byte ranges into the chunk.
struct RawRecord {
    timestamp_ms: i64,
    key: std::ops::Range<usize>,
    value: std::ops::Range<usize>,
}

/// Walks the records of a chunk; stops (returning `None`) at the first malformed byte.
fn records(stored: &[u8]) -> impl Iterator<Item = Option<RawRecord>> + '_ {
    let count = chunk_len(stored).unwrap_or(0);
    let mut at = CHUNK_HEADER;
    (0..count).map(move |_| {
        let timestamp_ms = i64::from_be_bytes(stored.get(at..at + 8)?.try_into().ok()?);
        let key_len = u32::from_be_bytes(stored.get(at + 8..at + 12)?.try_into().ok()?) as usize;
        let value_len = u32::from_be_bytes(stored.get(at + 12..at + 16)?.try_into().ok()?) as usize;
        let key = at + RECORD_HEADER..at + RECORD_HEADER + key_len;
        let value = key.end..key.end + value_len;
        if value.end > stored.len() {
            return None;
        }
        at = value.end;
        Some(RawRecord {
            timestamp_ms,
            key,
            value,
        })
    })
}

/// Decodes the records of chunk `first_offset` whose offsets are in `from..end`, at most `max`,
/// appending them to `out`. `None` if the chunk is malformed.
pub(crate) fn decode_chunk(
    partition: u32,
    first_offset: u64,
    stored: &[u8],
    from: u64,
    end: u64,
    max: usize,
    out: &mut Vec<LogRecord>,
) -> Option<()> {
    let chunk = Bytes::copy_from_slice(stored);
    for (i, raw) in records(stored).enumerate() {
        let raw = raw?;
        let offset = first_offset + i as u64;
        if offset < from {
            continue;
        }
        if offset >= end || out.len() >= max {
            break;
        }
        out.push(LogRecord {
            partition,
            offset,
            timestamp_ms: raw.timestamp_ms,
            key: chunk.slice(raw.key),
            value: chunk.slice(raw.value),
        });
    }
    Some(())
}

/// The newest timestamp and the retention bytes of a chunk.
pub(crate) fn chunk_summary(stored: &[u8]) -> Option<(i64, u64)> {
    let mut newest = i64::MIN;
    let mut bytes = 0;
    for raw in records(stored) {
        let raw = raw?;
        newest = newest.max(raw.timestamp_ms);
        bytes += stored_len(raw.key.len(), raw.value.len());
    }
    Some((newest, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, value: &str, ts: i64) -> Record {
        Record {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            timestamp_ms: ts,
        }
    }

    #[test]
    fn chunks_round_trip_and_decode_a_window() {
        let mut buf = Vec::new();
        let mut chunk = ChunkBuilder::new(10, &mut buf);
        for i in 0..5 {
            chunk.push(&record("k", &format!("v{i}"), 100 + i));
        }
        let (first, stored) = chunk.finish();
        let stored = stored.to_vec();
        assert_eq!(first, 10);
        assert_eq!(chunk_len(&stored), Some(5));
        assert_eq!(chunk_summary(&stored), Some((104, 5 * stored_len(1, 2))));
        let mut out = Vec::new();
        decode_chunk(3, 10, &stored, 12, 14, 100, &mut out).expect("decodes");
        let got: Vec<_> = out
            .iter()
            .map(|r| (r.offset, String::from_utf8_lossy(&r.value).into_owned()))
            .collect();
        assert_eq!(got, [(12, "v2".to_string()), (13, "v3".to_string())]);
        assert!(out.iter().all(|r| r.partition == 3 && &r.key[..] == b"k"));
        out.clear();
        decode_chunk(3, 10, &stored, 0, u64::MAX, 2, &mut out).expect("decodes");
        assert_eq!(out.len(), 2, "max is respected");
    }

    #[test]
    fn truncated_chunks_are_reported_not_misread() {
        let mut buf = Vec::new();
        let mut chunk = ChunkBuilder::new(0, &mut buf);
        chunk.push(&record("key", "value", 1));
        let (_, stored) = chunk.finish();
        let stored = stored.to_vec();
        for cut in 4..stored.len() {
            let mut out = Vec::new();
            assert!(
                decode_chunk(0, 0, &stored[..cut], 0, u64::MAX, 10, &mut out).is_none(),
                "cut at {cut}"
            );
            assert!(chunk_summary(&stored[..cut]).is_none());
        }
    }
}
