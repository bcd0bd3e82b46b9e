//! `cargo bench -p sluice-pipeline --bench pipeline`: the pipeline's throughput against the
//! embedded index's own, on the same documents.
//!
//! 1. Fills an embedded log with N messages (4 events : 1 user update, over U users).
//! 2. pipeline: runs the real `Pipeline` (validate → dedup → merge → index → mark → commit)
//!    over the log into a fresh index, until every partition has committed its last offset.
//! 3. raw index: the same messages, already validated and merged into the same per-partition
//!    batches, written straight to a fresh index (one writer task per partition, as the
//!    pipeline does): the ceiling the pipeline is measured against.
//! 4. one at a time: the first M messages written to a fresh index one message per write.
//!
//! On shared stores a raw phase into an index of its own runs before step 2 and is not
//! compared (a search server's first writes, JIT and fresh segments, would otherwise count
//! against whichever phase comes first); then a raw phase runs right before the pipeline too,
//! and the pipeline is compared with the mean of the raw phases on both sides of it.
//!
//! Settings by environment: SLUICE_BENCH_MESSAGES (default 400000), SLUICE_BENCH_USERS
//! (10000), SLUICE_BENCH_ONE_AT_A_TIME (500), SLUICE_BENCH_PARTITIONS (8), SLUICE_BENCH_WARMUPS
//! and SLUICE_BENCH_ROUNDS (see below); SLUICE_BENCH_PIPELINE_ONLY=1 stops after step 2
//! (for profiling); SLUICE_BENCH_LOG=kafka feeds the pipeline from a tansu broker;
//! SLUICE_BENCH_BACKENDS=shared runs on the distributed stores instead of the embedded ones:
//! Redis dedup (a redis-server started on a free port) and the OpenSearch index: a real
//! OpenSearch 2.19 node (`scripts/engine`, heap SLUICE_OPENSEARCH_HEAP, default 512m), or with
//! SLUICE_BENCH_SEARCH=osmem an osmem-server (from `scripts/install-test-tools`). SLUICE_BENCH_TRIGGER=topic adds a trigger
//! rule matching every event (4 in 5 messages) that appends its action to an embedded actions
//! log: the trigger stage's cost (profile reads, payloads, stash, append, mark).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use sluice_dedup::{Dedup, EmbeddedDedup, RedisDedup, RedisDedupConfig};
use sluice_index::{
    ElasticIndex, ElasticIndexConfig, EmbeddedIndex, EmbeddedIndexConfig, Index, WriteBatch,
};
use sluice_log::{EmbeddedLog, EmbeddedLogConfig, Log, Record};
use sluice_pipeline::validate::Validator;
use sluice_pipeline::{Pipeline, PipelineConfig, PipelineStats, runner::build_write};
use sluice_registry::{Registry, SqliteRegistry};

mod support;
use support::setting;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

/// The stores a run writes to: embedded in the temp dir, or Redis and OpenSearch servers
/// started for the run.
// One value per run: the variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Stores {
    Embedded,
    Shared {
        redis: sluice_dedup::testing::OwnRedis,
        search: SearchServer,
    },
}

/// The search server of the shared stores.
enum SearchServer {
    OpenSearch(sluice_testkit::OpenSearch),
    Osmem(sluice_index::testing::Osmem),
}

impl SearchServer {
    fn url(&self) -> &str {
        match self {
            SearchServer::OpenSearch(node) => &node.url,
            SearchServer::Osmem(osmem) => &osmem.url,
        }
    }
}

/// An index under measurement, with its backend's own counters.
enum BenchIndex {
    Embedded(Arc<EmbeddedIndex>),
    Elastic(Arc<ElasticIndex>),
}

impl BenchIndex {
    async fn open(
        stores: &Stores,
        dir: &std::path::Path,
        name: &str,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        Ok(match stores {
            Stores::Embedded => BenchIndex::Embedded(Arc::new(EmbeddedIndex::open(
                EmbeddedIndexConfig::new(dir.join(name)),
            )?)),
            Stores::Shared { search, .. } => {
                let mut config = ElasticIndexConfig::new(search.url());
                config.prefix = name.into();
                BenchIndex::Elastic(Arc::new(ElasticIndex::open(config).await?))
            }
        })
    }

    fn index(&self) -> Arc<dyn Index> {
        match self {
            BenchIndex::Embedded(index) => Arc::clone(index) as Arc<dyn Index>,
            BenchIndex::Elastic(index) => Arc::clone(index) as Arc<dyn Index>,
        }
    }

    /// Where the index's time went, in its own terms.
    fn describe(&self, seconds: f64) -> String {
        match self {
            BenchIndex::Embedded(index) => format!(
                "{} index commits, index writer busy {:.0}%",
                index.commits(),
                100.0 * index.busy().as_secs_f64() / seconds
            ),
            BenchIndex::Elastic(index) => {
                let stats = index.stats();
                let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                format!(
                    "{} _bulk and {} _mget requests, {} documents retried",
                    get(&stats.bulk_requests),
                    get(&stats.mget_requests),
                    get(&stats.retried_docs)
                )
            }
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and then a small
    // run checks that the benchmark still works without spending CI time on measuring.
    let measuring = std::env::args().any(|a| a == "--bench");
    let (messages, users, singles) = if measuring {
        (
            setting("SLUICE_BENCH_MESSAGES", 400_000),
            setting("SLUICE_BENCH_USERS", 10_000).max(1),
            setting("SLUICE_BENCH_ONE_AT_A_TIME", 500),
        )
    } else {
        println!("smoke run (not `cargo bench`): numbers are not measurements");
        (2_000, 100, 5)
    };
    let dir = tempfile::tempdir()?;
    let stores = if std::env::var("SLUICE_BENCH_BACKENDS").as_deref() == Ok("shared") {
        let search = if std::env::var("SLUICE_BENCH_SEARCH").as_deref() == Ok("osmem") {
            SearchServer::Osmem(sluice_index::testing::Osmem::start())
        } else {
            SearchServer::OpenSearch(sluice_testkit::OpenSearch::start())
        };
        println!(
            "shared stores: Redis, and {}",
            match &search {
                SearchServer::OpenSearch(_) => "a real OpenSearch 2.19 node",
                SearchServer::Osmem(_) => "osmem-server",
            }
        );
        Stores::Shared {
            redis: sluice_dedup::testing::OwnRedis::start(),
            search,
        }
    } else {
        Stores::Embedded
    };
    let registry: Arc<dyn Registry> =
        Arc::new(SqliteRegistry::open(&dir.path().join("registry.db")).await?);
    sluice_registry::bootstrap(registry.as_ref()).await?;
    let log = Arc::new(EmbeddedLog::open(
        &dir.path().join("log"),
        EmbeddedLogConfig {
            partitions: setting("SLUICE_BENCH_PARTITIONS", 8).max(1) as u32,
            ..EmbeddedLogConfig::default()
        },
    )?);
    // SLUICE_BENCH_LOG=kafka: the same pipeline fed by a tansu broker on a free port instead
    // (pipeline part only; progress is records read, at most one batch per partition ahead).
    let kafka = if std::env::var("SLUICE_BENCH_LOG").as_deref() == Ok("kafka") {
        let broker = sluice_log::kafka::testing::Tansu::start();
        let mut config = sluice_log::KafkaLogConfig::new(&broker.addr, "sluice.ingest");
        config.instance_id = Some("bench".into());
        let kafka = Arc::new(sluice_log::KafkaLog::connect(config).await?);
        Some((broker, kafka))
    } else {
        None
    };
    let source: Arc<dyn Log> = match &kafka {
        Some((_, kafka)) => Arc::clone(kafka) as Arc<dyn Log>,
        None => Arc::clone(&log) as Arc<dyn Log>,
    };

    // 1. The log.
    let now = sluice_model::time::now_ms();
    let mut chunk = Vec::with_capacity(1000);
    for i in 0..messages {
        let user = i % users;
        let json = if i % 5 == 0 {
            format!(
                r#"{{"userId":"user-{user}","dataFields":{{"seq":{i},"plan":"pro","score":{},"address":{{"city":"c{}"}}}}}}"#,
                i % 100,
                i % 7
            )
        } else {
            format!(
                r#"{{"userId":"user-{user}","eventName":"page_view","dataFields":{{"seq":{i},"path":"/p/{}","ms":{}}}}}"#,
                i % 50,
                i % 1000
            )
        };
        let raw: Box<RawValue> = serde_json::from_str(&json)?;
        let message = if i % 5 == 0 {
            sluice_model::parse_user_update(&raw)?
        } else {
            sluice_model::parse_event(&raw)?
        };
        let (key, value) = message.to_record("default", now)?;
        chunk.push(Record {
            key,
            value,
            timestamp_ms: now,
        });
        if chunk.len() == 1000 {
            source.append(std::mem::take(&mut chunk)).await?;
        }
    }
    if !chunk.is_empty() {
        source.append(chunk).await?;
    }
    println!(
        "{messages} messages over {users} users in {} partitions",
        log.partitions()
    );

    // The batches of the raw index phase (3), prepared before anything is measured.
    let per_partition =
        if std::env::var_os("SLUICE_BENCH_PIPELINE_ONLY").is_some() || kafka.is_some() {
            Vec::new()
        } else {
            raw_batches(&log, &registry, PipelineConfig::default().batch.max_records).await?
        };
    // A search server's speed keeps changing for minutes (JIT compiles, fresh segments): on
    // shared stores, raw warm-up phases into indexes of their own run first, until two in a
    // row agree within 10% after at least 3 (at most SLUICE_BENCH_WARMUPS, default 5), and
    // are not compared.
    // Then SLUICE_BENCH_ROUNDS (default 2) rounds of a raw phase and a pipeline phase, and a
    // last raw phase: each pipeline phase is compared with the raw phases on both sides of it.
    let shared = matches!(stores, Stores::Shared { .. });
    let comparing = !per_partition.is_empty();
    if shared && comparing {
        println!("warm-up, not compared:");
        let mut last: Option<f64> = None;
        for n in 0..setting("SLUICE_BENCH_WARMUPS", 5).max(1) {
            let name = format!("index-warm-{n}");
            let phase = raw_phase(&stores, dir.path(), &name, &per_partition, messages).await?;
            let rate = messages as f64 / phase.secs;
            if n >= 2 && last.is_some_and(|last| (rate - last).abs() <= 0.1 * last) {
                break;
            }
            last = Some(rate);
        }
    }
    let rounds = if shared && comparing {
        setting("SLUICE_BENCH_ROUNDS", 2).max(1)
    } else {
        1
    };
    let run = PipelineRun {
        stores: &stores,
        dir: dir.path(),
        source: &source,
        log: &log,
        registry: &registry,
        from_kafka: kafka.is_some(),
        messages,
    };
    let mut raws = Vec::new();
    let mut pipelines = Vec::new();
    for round in 0..rounds {
        if shared && comparing {
            let name = format!("index-raw-{round}");
            raws.push(raw_phase(&stores, dir.path(), &name, &per_partition, messages).await?);
        }
        pipelines.push(pipeline_phase(&run, round).await?);
    }
    if !comparing {
        return Ok(());
    }

    // 3. The same batches straight into the index.
    let singles_source: Vec<Arc<WriteBatch>> = per_partition
        .iter()
        .flatten()
        .flat_map(|(b, _)| {
            b.users
                .iter()
                .map(|u| WriteBatch {
                    users: vec![u.clone()],
                    events: vec![],
                    forgets: Vec::new(),
                    unseen: false,
                })
                .chain(b.events.iter().map(|e| WriteBatch {
                    users: vec![],
                    events: vec![e.clone()],
                    forgets: Vec::new(),
                    unseen: false,
                }))
                .collect::<Vec<_>>()
        })
        .take(singles)
        .map(Arc::new)
        .collect();
    let name = "index-raw-last";
    raws.push(raw_phase(&stores, dir.path(), name, &per_partition, messages).await?);

    // 4. One message per write.
    let single_index = BenchIndex::open(&stores, dir.path(), "index-single")
        .await?
        .index();
    let started = Instant::now();
    for batch in &singles_source {
        single_index.write(Arc::clone(batch)).await?;
    }
    let single_secs = started.elapsed().as_secs_f64();
    single_index.close().await?;
    let single_rate = singles_source.len() as f64 / single_secs;
    println!(
        "one at a time: {single_secs:6.2} s  {single_rate:9.0} msg/s  ({} messages)",
        singles_source.len()
    );
    // Each pipeline phase against the raw phases on both sides of it (on the embedded stores,
    // the one raw phase after it).
    let mut ratios = Vec::new();
    for (n, pipeline) in pipelines.iter().enumerate() {
        let around = &raws[n.min(raws.len() - 1)..(n + 2).min(raws.len())];
        let raw_secs = around.len() as f64 / around.iter().map(|r| 1.0 / r.secs).sum::<f64>();
        let raw_steady = around.iter().map(|r| r.steady).sum::<f64>() / around.len() as f64;
        let (whole, steady) = (raw_secs / pipeline.secs, pipeline.steady / raw_steady);
        println!(
            "pipeline phase {}: raw index around it {:9.0} msg/s (steady {raw_steady:.0}); pipeline / raw index: {whole:.2} over the whole run, {steady:.2} steady",
            n + 1,
            messages as f64 / raw_secs,
        );
        ratios.push((whole, steady));
    }
    let count = ratios.len() as f64;
    let last_raw = raws.last().map_or(1.0, |r| messages as f64 / r.secs);
    println!(
        "pipeline / raw index, mean of {} phases: {:.2} over the whole run, {:.2} steady    batched raw / one at a time: {:.0}x",
        ratios.len(),
        ratios.iter().map(|r| r.0).sum::<f64>() / count,
        ratios.iter().map(|r| r.1).sum::<f64>() / count,
        last_raw / single_rate
    );
    Ok(())
}

/// What the pipeline phases share.
struct PipelineRun<'a> {
    stores: &'a Stores,
    dir: &'a std::path::Path,
    source: &'a Arc<dyn Log>,
    log: &'a Arc<EmbeddedLog>,
    registry: &'a Arc<dyn Registry>,
    /// The source is a Kafka broker: progress is records read (its commits are not readable
    /// here).
    from_kafka: bool,
    messages: usize,
}

/// One pipeline phase: the whole log through a `Pipeline` of its own (its own consumer group,
/// dedup namespace and index), until every partition has committed its last offset.
async fn pipeline_phase(
    run: &PipelineRun<'_>,
    round: usize,
) -> Result<Phase, Box<dyn std::error::Error>> {
    let PipelineRun {
        stores,
        dir,
        source,
        log,
        registry,
        from_kafka,
        messages,
    } = *run;
    let bench_index = BenchIndex::open(stores, dir, &format!("index-pipeline-{round}")).await?;
    let index = bench_index.index();
    let (dedup, redis): (Arc<dyn Dedup>, Option<Arc<RedisDedup>>) = match stores {
        Stores::Embedded => (
            Arc::new(EmbeddedDedup::open(
                &dir.join(format!("dedup-{round}")),
                sluice_dedup::DEFAULT_WINDOW,
            )?),
            None,
        ),
        Stores::Shared { redis, .. } => {
            let mut config = RedisDedupConfig::new(redis.url(), sluice_dedup::DEFAULT_WINDOW);
            config.prefix = format!("sluice:dedup:bench-{round}");
            let redis = Arc::new(RedisDedup::connect(config).await?);
            (Arc::clone(&redis) as Arc<dyn Dedup>, Some(redis))
        }
    };
    let mut config = PipelineConfig {
        group: format!("sluice-pipeline-{round}"),
        ..PipelineConfig::default()
    };
    if std::env::var("SLUICE_BENCH_TRIGGER").as_deref() == Ok("topic") {
        let actions: Arc<dyn Log> = Arc::new(EmbeddedLog::open(
            &dir.join(format!("actions-{round}")),
            EmbeddedLogConfig {
                partitions: 1,
                ..EmbeddedLogConfig::default()
            },
        )?);
        config.triggers = sluice_pipeline::Triggers::new(vec![sluice_pipeline::Rule {
            name: "bench".into(),
            event: "page_view".into(),
            action: sluice_pipeline::Action::Topic {
                topic: "sluice.actions".into(),
                log: actions,
            },
        }]);
        println!("with a trigger rule on every event (topic action)");
    }
    let dead_letters: Arc<dyn Log> = Arc::new(EmbeddedLog::open(
        &dir.join(format!("dlq-{round}")),
        EmbeddedLogConfig {
            partitions: 1,
            ..EmbeddedLogConfig::default()
        },
    )?);
    let pipeline = Pipeline::new(
        Arc::clone(source),
        dead_letters,
        Validator::new(Arc::clone(registry), Duration::from_secs(5)),
        dedup,
        Arc::clone(&index),
        config.clone(),
    );
    let stats = pipeline.stats();
    let (stop, stop_rx) = sluice_pipeline::stop::channel();
    let started = Instant::now();
    let cpu = cpu_seconds();
    let threads_before = cpu_by_thread();
    let task = tokio::spawn(pipeline.run(stop_rx));
    let mut steady = Steady::new(messages as u64);
    loop {
        let committed: u64 = if from_kafka {
            PipelineStats::get(&stats.records)
        } else {
            (0..log.partitions())
                .map(|p| log.committed(&config.group, p).ok().flatten().unwrap_or(0))
                .sum()
        };
        steady.sample(committed);
        if committed >= messages as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let pipeline_secs = started.elapsed().as_secs_f64();
    let pipeline_steady = steady.rate();
    let pipeline_cpu = cpu_seconds() - cpu;
    let threads_after = cpu_by_thread();
    stop.stop();
    task.await??;
    index.close().await?;
    let pipeline_rate = messages as f64 / pipeline_secs;
    println!("pipeline, steady (10%..90% committed): {pipeline_steady:9.0} msg/s");
    let batches = PipelineStats::get(&stats.batches);
    println!(
        "pipeline:      {pipeline_secs:6.2} s  {pipeline_rate:9.0} msg/s  cpu {pipeline_cpu:5.2} s  ({batches} batches, {})",
        bench_index.describe(pipeline_secs)
    );
    if let Some(redis) = &redis {
        println!(
            "  redis round trips: {} ({:.2} per batch: one pipelined check, one pipelined mark)",
            redis.round_trips(),
            redis.round_trips() as f64 / batches.max(1) as f64
        );
    }
    print_stages(&stats, pipeline_secs, log.partitions());
    let by_thread: Vec<String> = threads_after
        .iter()
        .map(|(name, after)| {
            (
                name,
                after - threads_before.get(name).copied().unwrap_or(0.0),
            )
        })
        .filter(|(_, cpu)| *cpu >= 0.01)
        .map(|(name, cpu)| format!("{name} {cpu:.2}"))
        .collect();
    println!("  cpu s by thread: {}", by_thread.join(", "));
    Ok(Phase {
        secs: pipeline_secs,
        steady: pipeline_steady,
    })
}

/// The log's messages validated and merged into the pipeline's batches, per partition, with
/// how many records each batch covers.
async fn raw_batches(
    log: &EmbeddedLog,
    registry: &Arc<dyn Registry>,
    max_records: usize,
) -> Result<Vec<Vec<(Arc<WriteBatch>, u64)>>, Box<dyn std::error::Error>> {
    let validator = Validator::new(Arc::clone(registry), Duration::from_secs(5));
    let mut per_partition: Vec<Vec<(Arc<WriteBatch>, u64)>> = Vec::new();
    for p in 0..log.partitions() {
        let mut batches = Vec::new();
        let mut offset = 0;
        loop {
            let records = log.read(p, offset, max_records)?;
            let Some(last) = records.last() else { break };
            offset = last.offset + 1;
            let valid: Vec<_> = validator
                .validate(&records)
                .await?
                .into_iter()
                .filter_map(Result::ok)
                .collect();
            let refs: Vec<_> = valid.iter().collect();
            batches.push((Arc::new(build_write(&refs)), records.len() as u64));
        }
        per_partition.push(batches);
    }
    Ok(per_partition)
}

/// What one phase measured.
struct Phase {
    secs: f64,
    steady: f64,
}

/// Writes `per_partition`'s batches straight into a fresh index `name`, one writer task per
/// partition (as the pipeline does), and prints what it took.
async fn raw_phase(
    stores: &Stores,
    dir: &std::path::Path,
    name: &str,
    per_partition: &[Vec<(Arc<WriteBatch>, u64)>],
    messages: usize,
) -> Result<Phase, Box<dyn std::error::Error>> {
    let raw_bench_index = BenchIndex::open(stores, dir, name).await?;
    let raw_index = raw_bench_index.index();
    let started = Instant::now();
    let cpu = cpu_seconds();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writers: Vec<_> = per_partition
        .iter()
        .cloned()
        .map(|batches| {
            let index = Arc::clone(&raw_index);
            let written = Arc::clone(&written);
            tokio::spawn(async move {
                for (batch, records) in batches {
                    index.write(batch).await?;
                    written.fetch_add(records, Ordering::Relaxed);
                }
                Ok::<_, sluice_index::IndexError>(())
            })
        })
        .collect();
    let mut steady = Steady::new(messages as u64);
    while !writers.iter().all(|w| w.is_finished()) {
        steady.sample(written.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for writer in writers {
        writer.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    steady.sample(written.load(Ordering::Relaxed));
    let raw_cpu = cpu_seconds() - cpu;
    raw_index.close().await?;
    println!(
        "raw index:     {secs:6.2} s  {:9.0} msg/s  cpu {raw_cpu:5.2} s  ({})",
        messages as f64 / secs,
        raw_bench_index.describe(secs)
    );
    Ok(Phase {
        secs,
        steady: steady.rate(),
    })
}

/// The rate between the moments 10% and 90% of the messages were done: the throughput without
/// the fixed costs at the ends (the first batches being read and checked before the index has
/// work; the last, partial batches waiting out `batch_timeout`).
struct Steady {
    total: u64,
    started: Instant,
    at_10: Option<(f64, u64)>,
    at_90: Option<(f64, u64)>,
}

impl Steady {
    fn new(total: u64) -> Self {
        Steady {
            total,
            started: Instant::now(),
            at_10: None,
            at_90: None,
        }
    }

    fn sample(&mut self, done: u64) {
        let now = self.started.elapsed().as_secs_f64();
        if self.at_10.is_none() && done * 10 >= self.total {
            self.at_10 = Some((now, done));
        }
        if self.at_90.is_none() && done * 10 >= self.total * 9 {
            self.at_90 = Some((now, done));
        }
    }

    fn rate(&self) -> f64 {
        match (self.at_10, self.at_90) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => (n1 - n0) as f64 / (t1 - t0),
            _ => 0.0,
        }
    }
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat (0 elsewhere).
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| stat_cpu_seconds(&stat))
        .unwrap_or(0.0)
}

/// utime + stime of a `/proc/.../stat` line, in seconds (clock ticks of 1/100 s).
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the command name, which is in parentheses and may hold spaces; utime and
    // stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// CPU seconds per thread name (threads alive now), from /proc/self/task.
fn cpu_by_thread() -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        // Group numbered threads ("merge_thread_0", "thrd-tantivy-index1") by their stem.
        let stem = name
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '_' || c == '-');
        *out.entry(stem.to_string()).or_insert(0.0) += stat_cpu_seconds(&stat).unwrap_or(0.0);
    }
    out
}

fn print_stages(stats: &PipelineStats, seconds: f64, partitions: u32) {
    let total = seconds * 1e6 * f64::from(partitions);
    for (name, micros) in stats.stage_micros() {
        let us = micros as f64;
        println!(
            "  {name:12} {:7.2} s summed over partitions ({:4.1}% of partition time)",
            us / 1e6,
            100.0 * us / total
        );
    }
}
