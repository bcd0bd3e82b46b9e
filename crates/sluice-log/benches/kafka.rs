//! How fast the Kafka log moves records on this machine, against a local tansu broker (memory
//! storage): appends acknowledged per second, and records read per second through the consumer
//! group's partition streams (what feeds the pipeline).
//!
//! `cargo bench -p sluice-log --bench kafka` (RECORDS=n to change the count; needs tansu, which
//! `scripts/install-test-tools` installs). Under `cargo test` it does a small smoke run.

use std::time::{Duration, Instant};

use sluice_log::kafka::testing::Tansu;
use sluice_log::{Assignment, KafkaLog, KafkaLogConfig, Log, Record};

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let records: usize = std::env::var("RECORDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if smoke { 2_000 } else { 400_000 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(records));
}

async fn run(count: usize) {
    let broker = Tansu::start();
    let mut config = KafkaLogConfig::new(&broker.addr, "sluice.ingest");
    config.instance_id = Some("bench".into());
    let log = std::sync::Arc::new(KafkaLog::connect(config).await.expect("connect"));
    let value = br#"{"v":1,"kind":"event","org":"default","messageId":"0195f0c2-7d7e-7cc3-9d1e-3a0b4c5d6e7f","userId":"user-000000","receivedAt":1700000000000,"eventName":"open","dataFields":{"campaign":42,"tags":["a","b"]}}"#;
    let started = Instant::now();
    let mut appends = tokio::task::JoinSet::new();
    for chunk in 0..count.div_ceil(1000) {
        let batch: Vec<Record> = (chunk * 1000..((chunk + 1) * 1000).min(count))
            .map(|i| Record {
                key: format!("default:u:user-{}", i % 10_000).into_bytes(),
                value: value.to_vec(),
                timestamp_ms: 1_700_000_000_000,
            })
            .collect();
        let log = std::sync::Arc::clone(&log);
        appends.spawn(async move { log.append(batch).await });
        if appends.len() == 8 {
            appends
                .join_next()
                .await
                .expect("a task")
                .expect("no panic")
                .expect("append");
        }
    }
    while let Some(done) = appends.join_next().await {
        done.expect("no panic").expect("append");
    }
    let produce = started.elapsed();
    println!(
        "append: {count} records in {:.2}s: {:.0} records/s acknowledged (8 requests of 1000 in flight)",
        produce.as_secs_f64(),
        count as f64 / produce.as_secs_f64()
    );

    let started = Instant::now();
    let mut subscription = log.subscribe("bench").await.expect("subscribe");
    let mut tasks = tokio::task::JoinSet::new();
    let mut assigned = 0;
    while assigned < log.partitions() {
        match tokio::time::timeout(Duration::from_secs(30), subscription.next()).await {
            Ok(Some(Assignment::Assigned(mut stream))) => {
                assigned += 1;
                tasks.spawn(async move {
                    let mut read = 0usize;
                    while let Ok(Ok(batch)) =
                        tokio::time::timeout(Duration::from_secs(3), stream.next_batch(5000)).await
                    {
                        read += batch.len();
                    }
                    read
                });
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("the group did not assign every partition"),
        }
    }
    let joined = started.elapsed();
    let mut read = 0;
    while let Some(n) = tasks.join_next().await {
        read += n.expect("reader");
    }
    // Each reader stops after 3 s without records.
    let reading = started.elapsed() - joined - Duration::from_secs(3);
    assert_eq!(read, count, "every record read once");
    println!(
        "read: {count} records in {:.2}s after the group join ({:.2}s): {:.0} records/s",
        reading.as_secs_f64(),
        joined.as_secs_f64(),
        count as f64 / reading.as_secs_f64()
    );
    drop(subscription);
    log.close().await.expect("close");
}
