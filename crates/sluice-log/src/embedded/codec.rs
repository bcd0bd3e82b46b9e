//! Encoding of one record in a partition keyspace: `[timestamp i64 BE][key len u32 BE][key][value]`.
//! fjall checksums the blocks and journal entries around it.

use bytes::Bytes;

use crate::{LogRecord, Record};

const HEADER: usize = 8 + 4;

/// Bytes a record occupies, as counted by size-based retention.
pub(crate) fn stored_len(key: usize, value: usize) -> u64 {
    (HEADER + key + value) as u64
}

pub(crate) fn encode(record: &Record) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER + record.key.len() + record.value.len());
    buf.extend_from_slice(&record.timestamp_ms.to_be_bytes());
    buf.extend_from_slice(&(record.key.len() as u32).to_be_bytes());
    buf.extend_from_slice(&record.key);
    buf.extend_from_slice(&record.value);
    buf
}

/// Decodes a stored record; `None` if the bytes are not a record (corruption fjall missed).
pub(crate) fn decode(partition: u32, offset: u64, stored: &[u8]) -> Option<LogRecord> {
    let timestamp_ms = i64::from_be_bytes(stored.get(0..8)?.try_into().ok()?);
    let key_len = u32::from_be_bytes(stored.get(8..12)?.try_into().ok()?) as usize;
    let key = stored.get(HEADER..HEADER + key_len)?;
    let value = stored.get(HEADER + key_len..)?;
    Some(LogRecord {
        partition,
        offset,
        timestamp_ms,
        key: Bytes::copy_from_slice(key),
        value: Bytes::copy_from_slice(value),
    })
}

/// Just the timestamp, for retention scans.
pub(crate) fn timestamp(stored: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(stored.get(0..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let r = Record { key: b"acme:u:1".to_vec(), value: br#"{"v":1}"#.to_vec(), timestamp_ms: -3 };
        let enc = encode(&r);
        assert_eq!(enc.len() as u64, stored_len(r.key.len(), r.value.len()));
        let d = decode(2, 7, &enc).expect("decodes");
        assert_eq!((d.partition, d.offset, d.timestamp_ms), (2, 7, -3));
        assert_eq!(&d.key[..], &r.key[..]);
        assert_eq!(&d.value[..], &r.value[..]);
        assert_eq!(timestamp(&enc), Some(-3));
    }

    #[test]
    fn truncated_bytes_do_not_decode() {
        let enc = encode(&Record { key: b"k".to_vec(), value: b"v".to_vec(), timestamp_ms: 0 });
        for cut in 0..13 {
            assert!(decode(0, 0, &enc[..cut]).is_none(), "cut at {cut}");
        }
    }
}
