use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_model::partition_for_key;

use super::*;
use crate::{Assignment, Log, PartitionStream};

fn record(key: &str, value: &str, ts: i64) -> Record {
    Record {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        timestamp_ms: ts,
    }
}

fn config(partitions: u32) -> EmbeddedLogConfig {
    EmbeddedLogConfig {
        partitions,
        retention_max_age: None,
        retention_max_bytes: None,
        ..Default::default()
    }
}

fn open(dir: &Path, partitions: u32) -> Arc<EmbeddedLog> {
    Arc::new(EmbeddedLog::open(dir, config(partitions)).expect("log opens"))
}

async fn all_streams(log: &EmbeddedLog, group: &str) -> Vec<Box<dyn PartitionStream>> {
    let mut sub = log.subscribe(group).await.expect("subscribe");
    let mut streams = Vec::new();
    for _ in 0..log.partitions() {
        match sub.next().await {
            Some(Assignment::Assigned(s)) => streams.push(s),
            _ => panic!("embedded subscription assigns every partition"),
        }
    }
    streams.sort_by_key(|s| s.partition());
    streams
}

#[tokio::test]
async fn records_land_on_the_murmur2_partition_in_order_per_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), 8);
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for round in 0..20 {
        let batch: Vec<Record> = (0..50)
            .map(|u| {
                let key = format!("acme:u:{u}");
                let value = format!("{round}");
                sent.entry(key.clone()).or_default().push(value.clone());
                record(&key, &value, 0)
            })
            .collect();
        let acks = log.append(batch.clone()).await.expect("append");
        assert_eq!(acks.len(), batch.len());
        for (ack, rec) in acks.iter().zip(&batch) {
            assert_eq!(ack.partition, partition_for_key(&rec.key, 8));
        }
    }
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for p in 0..8 {
        let records = log.read(p, 0, usize::MAX).expect("read");
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.offset, i as u64, "offsets are contiguous from 0");
            assert_eq!(r.partition, p);
            seen.entry(String::from_utf8_lossy(&r.key).into_owned())
                .or_default()
                .push(String::from_utf8_lossy(&r.value).into_owned());
        }
    }
    assert_eq!(seen, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), 4);
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.append(vec![record(&format!("o:u:{i}"), "x", 0)]).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("append");
    }
    let stats = log.stats();
    assert_eq!(stats.requests, 500);
    assert_eq!(stats.records, 500);
    assert!(stats.syncs < stats.requests, "group commit: {stats:?}");
    let total: u64 = (0..4).map(|p| log.end_offset(p).expect("end")).sum();
    assert_eq!(total, 500);
}

#[tokio::test]
async fn reopening_keeps_records_offsets_and_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = open(dir.path(), 2);
        for i in 0..10 {
            log.append(vec![record("k", &i.to_string(), 0)])
                .await
                .expect("append");
        }
        let p = partition_for_key(b"k", 2);
        log.commit("g", p, 4).expect("commit");
        log.close().await.expect("close");
    }
    let log = open(dir.path(), 2);
    let p = partition_for_key(b"k", 2);
    assert_eq!(log.end_offset(p).expect("end"), 10);
    assert_eq!(log.committed("g", p).expect("committed"), Some(4));
    let acks = log
        .append(vec![record("k", "10", 0)])
        .await
        .expect("append");
    assert_eq!(acks[0].offset, 10);
    let mut streams = all_streams(&log, "g").await;
    let stream = &mut streams[p as usize];
    assert_eq!(stream.position(), 4);
    let batch = stream.next_batch(100).await.expect("batch");
    let values: Vec<_> = batch
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    assert_eq!(values, ["4", "5", "6", "7", "8", "9", "10"]);
}

#[tokio::test]
async fn partition_count_cannot_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    open(dir.path(), 4).close().await.expect("close");
    let err = EmbeddedLog::open(dir.path(), config(8))
        .err()
        .expect("mismatch refused");
    assert!(
        err.to_string()
            .contains("has 4 partitions but 8 are configured"),
        "{err}"
    );
}

#[tokio::test]
async fn a_stream_waits_for_new_records_and_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), 1);
    let mut streams = all_streams(&log, "pipeline").await;
    let mut stream = streams.pop().expect("one partition");
    let waiting = tokio::time::timeout(Duration::from_millis(50), stream.next_batch(10)).await;
    assert!(waiting.is_err(), "no record yet: next_batch waits");
    log.append(vec![record("a", "1", 0), record("a", "2", 0)])
        .await
        .expect("append");
    let batch = tokio::time::timeout(Duration::from_secs(5), stream.next_batch(10))
        .await
        .expect("wakes up")
        .expect("batch");
    assert_eq!(batch.len(), 2);
    assert_eq!(stream.position(), 2);
    stream.commit(2).await.expect("commit");
    assert_eq!(log.committed("pipeline", 0).expect("committed"), Some(2));
    let err = stream.commit(3).await.expect_err("beyond the end");
    assert!(
        matches!(err, LogError::CommitBeyondEnd { end: 2, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_group_subscribes_once_per_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), 1);
    let streams = all_streams(&log, "g").await;
    assert!(matches!(
        log.subscribe("g").await.err(),
        Some(LogError::GroupBusy(_))
    ));
    drop(streams);
    log.subscribe("g").await.expect("free again once dropped");
}

#[tokio::test]
async fn retention_deletes_only_what_every_group_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), 1);
    for i in 0..100 {
        log.append(vec![record("k", &i.to_string(), 0)])
            .await
            .expect("append");
    }
    // No group: nothing is committed, nothing goes.
    assert_eq!(log.enforce_retention(0).expect("retention").deleted, 0);
    log.commit("fast", 0, 80).expect("commit");
    log.commit("slow", 0, 30).expect("commit");
    let report = log.enforce_retention(0).expect("retention");
    assert_eq!(report.deleted, 30);
    assert_eq!(log.start_offset(0).expect("start"), 30);
    assert_eq!(log.read(0, 0, 1).expect("read")[0].offset, 30);
    log.commit("slow", 0, 100).expect("commit");
    assert_eq!(log.enforce_retention(0).expect("retention").deleted, 50);
    assert_eq!(
        log.stored_bytes(0).expect("bytes"),
        20 * codec::stored_len(1, 2)
    );
    log.commit("fast", 0, 100).expect("commit");
    assert_eq!(log.enforce_retention(0).expect("retention").deleted, 20);
    assert_eq!(log.stored_bytes(0).expect("bytes"), 0);
    log.close().await.expect("close");
    drop(log);

    // Everything was deleted: offsets must continue, not restart at 0.
    let log = open(dir.path(), 1);
    assert_eq!(log.start_offset(0).expect("start"), 100);
    assert_eq!(log.end_offset(0).expect("end"), 100);
    let acks = log
        .append(vec![record("k", "new", 0)])
        .await
        .expect("append");
    assert_eq!(acks[0].offset, 100);
}

#[tokio::test]
async fn age_and_size_caps_delete_the_oldest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = EmbeddedLogConfig {
        partitions: 1,
        retention_max_age: Some(Duration::from_secs(60)),
        retention_max_bytes: Some(10 * codec::stored_len(1, 3)),
        ..Default::default()
    };
    let log = EmbeddedLog::open(dir.path(), cfg).expect("open");
    let now = 1_000_000_000;
    // 5 records older than a minute, then 20 fresh ones of 3-byte values.
    for i in 0..25 {
        let ts = if i < 5 { now - 120_000 } else { now };
        log.append(vec![record("k", &format!("{i:03}"), ts)])
            .await
            .expect("append");
    }
    let report = log.enforce_retention(now).expect("retention");
    assert_eq!(
        report.deleted, 15,
        "5 by age, then 10 more to get under the byte cap"
    );
    assert_eq!(log.start_offset(0).expect("start"), 15);
    assert_eq!(
        log.stored_bytes(0).expect("bytes"),
        10 * codec::stored_len(1, 3)
    );
}

#[tokio::test]
async fn appends_after_close_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), 1);
    log.close().await.expect("close");
    assert!(matches!(
        log.append(vec![record("a", "b", 0)]).await,
        Err(LogError::Closed)
    ));
    assert!(!log.is_healthy());
}

#[tokio::test]
async fn a_second_process_cannot_open_the_same_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _log = open(dir.path(), 1);
    let err = EmbeddedLog::open(dir.path(), config(1))
        .err()
        .expect("locked");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
}

#[tokio::test]
async fn reads_start_inside_a_chunk_and_retention_keeps_partly_committed_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path(), 1);
    // One append is one group commit: these 100 records share one chunk.
    let batch: Vec<Record> = (0..100).map(|i| record("k", &i.to_string(), 0)).collect();
    log.append(batch).await.expect("append");
    log.append(vec![record("k", "100", 0)])
        .await
        .expect("append");
    let window = log.read(0, 37, 10).expect("read");
    assert_eq!(
        window.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (37..47).collect::<Vec<_>>()
    );
    assert_eq!(&window[0].value[..], b"37");
    let tail = log.read(0, 99, 10).expect("read");
    assert_eq!(
        tail.iter().map(|r| r.offset).collect::<Vec<_>>(),
        [99, 100],
        "across the chunk boundary"
    );

    log.commit("g", 0, 50).expect("commit");
    assert_eq!(
        log.enforce_retention(0).expect("retention").deleted,
        0,
        "half the chunk is not committed"
    );
    assert_eq!(log.read(0, 0, 1).expect("read")[0].offset, 0);
    log.commit("g", 0, 100).expect("commit");
    assert_eq!(log.enforce_retention(0).expect("retention").deleted, 100);
    assert_eq!(log.start_offset(0).expect("start"), 100);
    log.close().await.expect("close");
    drop(log);
    let log = open(dir.path(), 1);
    assert_eq!(log.end_offset(0).expect("end"), 101);
    assert_eq!(
        log.read(0, 0, 10)
            .expect("read")
            .iter()
            .map(|r| r.offset)
            .collect::<Vec<_>>(),
        [100]
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// For any sequence of append requests (each a batch of records with keys from a small
        /// set), reading every partition back after a reopen gives: each record on its key's
        /// murmur2 partition, offsets contiguous from 0, and each key's values in append order.
        #[test]
        fn appends_keep_per_key_order_across_reopen(
            requests in proptest::collection::vec(proptest::collection::vec(0u8..12, 1..20), 1..25),
            partitions in 1u32..6,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let dir = tempfile::tempdir().expect("tempdir");
            let mut expected: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
            let mut n = 0u32;
            runtime.block_on(async {
                let log = open(dir.path(), partitions);
                for keys in &requests {
                    let batch: Vec<Record> = keys.iter().map(|k| {
                        n += 1;
                        let key = format!("org:u:{k}").into_bytes();
                        let value = n.to_string().into_bytes();
                        expected.entry(key.clone()).or_default().push(value.clone());
                        Record { key, value, timestamp_ms: 0 }
                    }).collect();
                    log.append(batch).await.expect("append");
                }
                log.close().await.expect("close");
            });
            let log = EmbeddedLog::open(dir.path(), config(partitions)).expect("reopen");
            let mut seen: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
            for p in 0..partitions {
                for (i, r) in log.read(p, 0, usize::MAX).expect("read").into_iter().enumerate() {
                    prop_assert_eq!(r.offset, i as u64);
                    prop_assert_eq!(partition_for_key(&r.key, partitions), p);
                    seen.entry(r.key.to_vec()).or_default().push(r.value.to_vec());
                }
            }
            prop_assert_eq!(seen, expected);
        }
    }
}
