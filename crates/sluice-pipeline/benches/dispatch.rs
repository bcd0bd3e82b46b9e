//! `cargo bench -p sluice-pipeline --bench dispatch`: webhook actions per second the
//! dispatcher delivers from an embedded actions log to a local HTTP receiver (axum, in this
//! process, answering 200 at once), and the CPU it takes per action (the receiver's included:
//! both run in this process).
//!
//! Settings by environment: SLUICE_BENCH_ACTIONS (default 100000), SLUICE_BENCH_USERS (10000),
//! SLUICE_BENCH_PARTITIONS (8), SLUICE_BENCH_CONCURRENCY (users in flight per partition, the
//! dispatcher's default 64).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_log::{EmbeddedLog, EmbeddedLogConfig, Log, Record};
use sluice_pipeline::{Action, Dispatcher, DispatcherConfig, Rule, Triggers};

mod support;
use support::setting;

/// This process's CPU time so far (all threads).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

#[tokio::main]
async fn main() {
    let actions_count = setting("SLUICE_BENCH_ACTIONS", 100_000);
    let users = setting("SLUICE_BENCH_USERS", 10_000).max(1);
    let partitions = setting("SLUICE_BENCH_PARTITIONS", 8).max(1) as u32;
    let concurrency = setting(
        "SLUICE_BENCH_CONCURRENCY",
        DispatcherConfig::default().concurrency,
    );

    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let app = axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        async { "sent" }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let url = format!("http://{}/welcome", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("tempdir");
    let open = |name: &str, partitions: u32| -> Arc<dyn Log> {
        Arc::new(
            EmbeddedLog::open(
                &dir.path().join(name),
                EmbeddedLogConfig {
                    partitions,
                    ..EmbeddedLogConfig::default()
                },
            )
            .expect("embedded log"),
        )
    };
    let actions = open("actions", partitions);
    let dead_letters = open("dlq", 1);
    let now = sluice_model::time::now_ms();
    for chunk in (0..actions_count).collect::<Vec<_>>().chunks(10_000) {
        let records: Vec<Record> = chunk
            .iter()
            .map(|i| {
                let user = i % users;
                let key = format!("acme:m-{i}:welcome");
                let value = serde_json::json!({
                    "v": 1, "rule": "welcome", "idempotencyKey": key, "org": "acme",
                    "messageId": format!("m-{i}"),
                    "event": {"messageId": format!("m-{i}"), "eventName": "signedUp",
                              "userId": format!("user-{user}"), "receivedAt": now, "dataFields": {"n": i}},
                    "profile": {"userId": format!("user-{user}"), "dataFields": {"plan": "free"}},
                });
                Record {
                    key: format!("acme:u:user-{user}").into_bytes(),
                    value: value.to_string().into_bytes(),
                    timestamp_ms: now,
                }
            })
            .collect();
        actions.append(records).await.expect("append actions");
    }

    let triggers = Triggers::new(vec![Rule {
        name: "welcome".into(),
        event: "signedUp".into(),
        action: Action::Webhook(url.parse().expect("url")),
    }]);
    let dispatcher = Dispatcher::new(
        actions,
        dead_letters,
        triggers,
        DispatcherConfig {
            concurrency,
            ..DispatcherConfig::default()
        },
    );
    let stats = dispatcher.stats();
    let (stop, stop_rx) = sluice_pipeline::stop::channel();
    let (cpu0, started) = (cpu_time(), Instant::now());
    let task = tokio::spawn(dispatcher.run(stop_rx));
    while stats.delivered.load(Ordering::Relaxed) < actions_count as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "delivered {} of {actions_count} within 600 s",
            stats.delivered.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (elapsed, cpu) = (started.elapsed(), cpu_time() - cpu0);
    stop.stop();
    let _ = task.await;
    println!(
        "dispatch: {actions_count} webhook actions over {users} users, {partitions} partitions, {concurrency} users in flight per partition"
    );
    println!(
        "delivered: {:.2} s, {:.0} actions/s, cpu {:.2} s ({:.1} us per action, receiver included); received {}, retried {}, dead letters {}",
        elapsed.as_secs_f64(),
        actions_count as f64 / elapsed.as_secs_f64(),
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / actions_count as f64,
        received.load(Ordering::Relaxed),
        stats.retried.load(Ordering::Relaxed),
        stats.dead_letters.load(Ordering::Relaxed),
    );
}
