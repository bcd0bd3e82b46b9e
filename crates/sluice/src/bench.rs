//! `sluice bench`: a closed-loop HTTP load generator for the ingest API (SPEC §8).
//!
//! Each of `--connections` workers owns one keep-alive connection and sends requests back to
//! back (or paced, with `--rate`), recording each request's latency in an HDR histogram. With
//! `--baseline` it first runs the same load against `GET /healthz`, so the durable ingest rate
//! can be read as a fraction of what the HTTP stack does with a trivial handler in the same run.
//! With `--until-indexed` (events only) it then waits until every event it sent is searchable
//! and reports the end-to-end rate: events sent ÷ time from the first request until the last
//! event was searchable. With `--probe-every` it measures freshness while the load runs: how long
//! after its acknowledgement an event becomes searchable (`freshness`).

mod freshness;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use hyper::Method;
use serde::Serialize;

use crate::client::Connection;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchKind {
    Users,
    Events,
    Mixed,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Base URL of the sluice API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key to send.
    #[arg(long, env = "SLUICE_BENCH_KEY")]
    pub key: String,
    /// Cap on total requests per second (default: as fast as the server answers).
    #[arg(long)]
    pub rate: Option<u64>,
    /// How long to run: seconds, or a duration like 500ms or 1m.
    #[arg(long, default_value = "10", value_parser = parse_seconds)]
    pub duration: Duration,
    /// Distinct users to spread messages over.
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,
    /// Items per request: 1 uses the single routes, more the bulk routes.
    #[arg(long, default_value_t = 1)]
    pub bulk: usize,
    /// What to send.
    #[arg(long, value_enum, default_value_t = BenchKind::Events)]
    pub kind: BenchKind,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// First measure GET /healthz the same way, and report the ratio.
    #[arg(long)]
    pub baseline: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// After the load, wait until every sent event is searchable and report the end-to-end
    /// rate (API → index). Needs `--kind events`.
    #[arg(long)]
    pub until_indexed: bool,
    /// While the load runs, send one probe event this often (e.g. 500ms) on a connection of its
    /// own, and report how long after its acknowledgement each became searchable.
    #[arg(long, value_parser = parse_seconds)]
    pub probe_every: Option<Duration>,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if secs > 0.0 && secs.is_finite() {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err("duration must be positive".into());
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 10, 30s, 2m)"))
}

/// Results of one load run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub target: String,
    pub seconds: f64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub messages_ok: u64,
    pub requests_per_sec: f64,
    pub messages_per_sec: f64,
    pub latency_ms: Latency,
    /// Status code (or "io") → count, for failures.
    pub failures: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    kind: BenchKind,
    bulk: usize,
    connections: usize,
    rate: Option<u64>,
    users: u64,
    baseline: Option<RunReport>,
    ingest: RunReport,
    /// ingest requests/s ÷ baseline requests/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_to_baseline: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_to_end: Option<EndToEnd>,
    /// Acknowledgement → searchable, measured with `--probe-every`.
    #[serde(skip_serializing_if = "Option::is_none")]
    freshness: Option<freshness::Freshness>,
}

/// API → searchable, measured with `--until-indexed`.
#[derive(Debug, Serialize)]
struct EndToEnd {
    events: u64,
    /// From the first request until the last event was searchable.
    seconds: f64,
    events_per_sec: f64,
    /// How long after the last acknowledgement the last event became searchable.
    lag_seconds: f64,
}

/// One request a worker can send.
struct Shot {
    method: Method,
    path: &'static str,
    body: Bytes,
    messages: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.bulk == 0 || args.users == 0 {
        bail!("--connections, --bulk and --users must be at least 1");
    }
    if args.until_indexed && args.kind != BenchKind::Events {
        bail!("--until-indexed counts searchable events: use it with --kind events");
    }
    let addr = resolve(&args.url).await?;
    let baseline = if args.baseline {
        let shots = Arc::new(vec![Shot {
            method: Method::GET,
            path: "/healthz",
            body: Bytes::new(),
            messages: 0,
        }]);
        Some(load(&args, addr, "GET /healthz", Arc::new(vec![shots])).await?)
    } else {
        None
    };
    let per_worker: Vec<Arc<Vec<Shot>>> = (0..args.connections)
        .map(|w| Arc::new(shots(&args, w)))
        .collect();
    let label = format!(
        "{} {}",
        match args.kind {
            BenchKind::Users => "users",
            BenchKind::Events => "events",
            BenchKind::Mixed => "mixed",
        },
        if args.bulk == 1 {
            "single".to_string()
        } else {
            format!("bulk of {}", args.bulk)
        }
    );
    let indexed_before = if args.until_indexed {
        Some(indexed_events(addr, &args.key).await?)
    } else {
        None
    };
    let mut probes = args
        .probe_every
        .map(|every| freshness::Probes::start(addr, &args.key, every));
    let started = Instant::now();
    let ingest = load(&args, addr, &label, Arc::new(per_worker)).await?;
    let mut probed = 0;
    if let Some(probes) = &mut probes {
        probes.stop_sending().await;
        probed = probes.acknowledged();
    }
    let end_to_end = match indexed_before {
        Some(before) => {
            Some(wait_indexed(addr, &args.key, before + probed, &ingest, started).await?)
        }
        None => None,
    };
    let freshness = match probes {
        Some(probes) => Some(probes.finish().await?),
        None => None,
    };
    let ratio = baseline
        .as_ref()
        .filter(|b| b.requests_per_sec > 0.0)
        .map(|b| ingest.requests_per_sec / b.requests_per_sec);
    let report = BenchReport {
        kind: args.kind,
        bulk: args.bulk,
        connections: args.connections,
        rate: args.rate,
        users: args.users,
        baseline,
        ingest,
        ratio_to_baseline: ratio,
        end_to_end,
        freshness,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "sluice bench against {} ({} connections)",
            args.url, args.connections
        );
        if let Some(b) = &report.baseline {
            print_run(b);
        }
        print_run(&report.ingest);
        if let Some(r) = report.ratio_to_baseline {
            println!("durable ingest rate / healthz rate: {r:.2}");
        }
        if let Some(e) = &report.end_to_end {
            println!(
                "end to end: {} events searchable {:.2}s after the first request: {:.0} events/s (last one {:.2}s after its ack)",
                e.events, e.seconds, e.events_per_sec, e.lag_seconds
            );
        }
        if let Some(f) = &report.freshness {
            println!(
                "freshness (ack → searchable) over {} probes: p50 {:.0} ms  p90 {:.0} ms  p99 {:.0} ms  max {:.0} ms ({} failed, {} never searchable)",
                f.probes, f.p50_ms, f.p90_ms, f.p99_ms, f.max_ms, f.failed, f.never_seen
            );
        }
    }
    Ok(())
}

/// Events of the key's org in the index now.
async fn indexed_events(addr: SocketAddr, key: &str) -> anyhow::Result<u64> {
    let mut conn = Connection::connect(addr).await?;
    let reply = conn
        .post(
            "/api/search/events",
            &[("api-key", key)],
            Bytes::from_static(br#"{"size":0}"#),
        )
        .await?;
    if !reply.status.is_success() {
        bail!(
            "POST /api/search/events answered {}: {:?}",
            reply.status,
            reply.json()
        );
    }
    reply.json()["total"]
        .as_u64()
        .context("search answer without a total")
}

/// Polls the index until it holds every event the load sent (`before`: what it held before,
/// and the probes acknowledged).
async fn wait_indexed(
    addr: SocketAddr,
    key: &str,
    before: u64,
    ingest: &RunReport,
    started: Instant,
) -> anyhow::Result<EndToEnd> {
    let target = before + ingest.messages_ok;
    let acked_at = Instant::now();
    let give_up = acked_at + Duration::from_secs(600);
    loop {
        let now = indexed_events(addr, key).await?;
        if now >= target {
            let seconds = started.elapsed().as_secs_f64();
            return Ok(EndToEnd {
                events: ingest.messages_ok,
                seconds,
                events_per_sec: ingest.messages_ok as f64 / seconds,
                lag_seconds: acked_at.elapsed().as_secs_f64(),
            });
        }
        if Instant::now() > give_up {
            bail!(
                "only {} of {} sent events searchable after 10 minutes",
                now.saturating_sub(before),
                ingest.messages_ok
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_run(r: &RunReport) {
    println!("{}:", r.target);
    println!(
        "  {} requests ok, {} failed in {:.2}s: {:.0} req/s, {:.0} msg/s",
        r.requests_ok, r.requests_failed, r.seconds, r.requests_per_sec, r.messages_per_sec
    );
    let l = &r.latency_ms;
    println!(
        "  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        l.p50, l.p90, l.p99, l.p999, l.max
    );
    for (what, n) in &r.failures {
        println!("  failures {what}: {n}");
    }
}

async fn resolve(url: &str) -> anyhow::Result<SocketAddr> {
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("invalid --url {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("--url {url:?}: only http:// is supported");
    }
    let host = uri
        .host()
        .with_context(|| format!("--url {url:?} has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))
}

/// Pre-built requests for worker `w`, cycling through users so load spreads over partitions.
fn shots(args: &BenchArgs, w: usize) -> Vec<Shot> {
    const DISTINCT: usize = 64;
    let mut out = Vec::with_capacity(DISTINCT);
    let mut n = (w as u64).wrapping_mul(7_919);
    for i in 0..DISTINCT {
        let users = match args.kind {
            BenchKind::Users => true,
            BenchKind::Events => false,
            BenchKind::Mixed => i % 2 == 0,
        };
        let mut items = Vec::with_capacity(args.bulk);
        for _ in 0..args.bulk {
            n = n.wrapping_add(1);
            let user = n % args.users;
            items.push(if users {
                format!(r#"{{"userId":"user-{user}","dataFields":{{"seq":{n},"plan":"pro","score":{}}}}}"#, n % 100)
            } else {
                format!(r#"{{"userId":"user-{user}","eventName":"page_view","dataFields":{{"seq":{n},"path":"/p/{}"}}}}"#, n % 50)
            });
        }
        let (path, body) = match (users, args.bulk) {
            (true, 1) => ("/api/users/update", items.remove(0)),
            (false, 1) => ("/api/events/track", items.remove(0)),
            (true, _) => (
                "/api/users/bulkUpdate",
                format!(r#"{{"users":[{}]}}"#, items.join(",")),
            ),
            (false, _) => (
                "/api/events/trackBulk",
                format!(r#"{{"events":[{}]}}"#, items.join(",")),
            ),
        };
        out.push(Shot {
            method: Method::POST,
            path,
            body: Bytes::from(body),
            messages: args.bulk as u64,
        });
    }
    out
}

struct WorkerResult {
    histogram: Histogram<u64>,
    ok: u64,
    messages: u64,
    failures: std::collections::BTreeMap<String, u64>,
}

async fn load(
    args: &BenchArgs,
    addr: SocketAddr,
    label: &str,
    shots: Arc<Vec<Arc<Vec<Shot>>>>,
) -> anyhow::Result<RunReport> {
    let done = Arc::new(AtomicU64::new(0));
    let progress = progress_bar(args, label);
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.connections as f64 / r.max(1) as f64));
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut workers = Vec::with_capacity(args.connections);
    for w in 0..args.connections {
        let my_shots = Arc::clone(&shots[w % shots.len()]);
        let key = args.key.clone();
        let done = Arc::clone(&done);
        workers.push(tokio::spawn(worker(
            addr, key, my_shots, deadline, interval, done,
        )));
    }
    let ticker = {
        let done = Arc::clone(&done);
        let progress = progress.clone();
        let duration = args.duration;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let elapsed = started.elapsed();
                progress.set_position(elapsed.min(duration).as_millis() as u64);
                let n = done.load(Ordering::Relaxed);
                progress.set_message(format!(
                    "{n} requests, {:.0} req/s",
                    n as f64 / elapsed.as_secs_f64()
                ));
            }
        })
    };
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")?;
    let (mut ok, mut messages) = (0, 0);
    let mut failures = std::collections::BTreeMap::new();
    for w in workers {
        let result = w.await.context("bench worker panicked")??;
        histogram
            .add(&result.histogram)
            .context("merging histograms")?;
        ok += result.ok;
        messages += result.messages;
        for (k, v) in result.failures {
            *failures.entry(k).or_insert(0) += v;
        }
    }
    ticker.abort();
    progress.finish_and_clear();
    // Real elapsed time, including the wait for the last in-flight responses: never overstates.
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(RunReport {
        target: label.to_string(),
        seconds,
        requests_ok: ok,
        requests_failed: failures.values().sum(),
        messages_ok: messages,
        requests_per_sec: ok as f64 / seconds,
        messages_per_sec: messages as f64 / seconds,
        latency_ms: Latency {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: histogram.max() as f64 / 1000.0,
        },
        failures,
    })
}

fn progress_bar(args: &BenchArgs, label: &str) -> indicatif::ProgressBar {
    if args.json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(args.duration.as_millis() as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_string());
    bar
}

/// The open connection, or a new one in its place after an error dropped it.
async fn reconnected(
    connection: &mut Option<Connection>,
    addr: SocketAddr,
) -> Result<&mut Connection, crate::client::ClientError> {
    let open = match connection.take() {
        Some(open) => open,
        None => Connection::connect(addr).await?,
    };
    Ok(connection.insert(open))
}

async fn worker(
    addr: SocketAddr,
    key: String,
    shots: Arc<Vec<Shot>>,
    deadline: Instant,
    interval: Option<Duration>,
    done: Arc<AtomicU64>,
) -> anyhow::Result<WorkerResult> {
    let mut result = WorkerResult {
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")?,
        ok: 0,
        messages: 0,
        failures: Default::default(),
    };
    let headers = [("api-key", key.as_str())];
    let mut connection: Option<Connection> = None;
    let mut next_send = Instant::now();
    let mut i = 0usize;
    while Instant::now() < deadline {
        if let Some(interval) = interval {
            let now = Instant::now();
            if next_send > now {
                tokio::time::sleep(next_send - now).await;
            }
            next_send += interval;
        }
        let Ok(conn) = reconnected(&mut connection, addr).await else {
            *result.failures.entry("connect".into()).or_insert(0) += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shot = &shots[i % shots.len()];
        i += 1;
        let start = Instant::now();
        match conn
            .send(shot.method.clone(), shot.path, &headers, shot.body.clone())
            .await
        {
            Ok(reply) if reply.status.is_success() => {
                let micros = start.elapsed().as_micros() as u64;
                let _ = result.histogram.record(micros.max(1));
                result.ok += 1;
                result.messages += shot.messages;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(reply) => {
                *result
                    .failures
                    .entry(reply.status.as_u16().to_string())
                    .or_insert(0) += 1;
            }
            Err(_) => {
                *result.failures.entry("io".into()).or_insert(0) += 1;
                connection = None;
            }
        }
    }
    Ok(result)
}
