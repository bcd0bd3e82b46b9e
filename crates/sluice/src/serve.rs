//! `sluice serve`, `sluice api` and `sluice ingest`: one process running the HTTP API, the
//! pipeline, or both (`Role`). Opens the registry (creating org `default` on first start of an
//! API node), the log (embedded or Kafka), and for ingesting nodes the dedup store and the
//! index; drains cleanly on SIGTERM/SIGINT: the API stops taking requests and finishes the ones
//! in flight, then each partition finishes and commits its batch.
//!
//! If the pipeline stops on an unknown error (a bug), the server drains too and the process
//! exits non-zero, so a supervisor restarts it; it resumes from the last commit.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use sluice_api::{ApiConfig, AppState, HealthCheck, Limits, Operations};
use sluice_dedup::Dedup;
use sluice_index::Index;

use sluice_pipeline::batch::BatchConfig;
use sluice_pipeline::validate::Validator;
use sluice_pipeline::{Dispatcher, DispatcherConfig, Pipeline, PipelineConfig};
use sluice_registry::Registry;
use sluice_spill::{Bridge, BridgeConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::backends::{
    Connect, open_dead_letters, open_dedup, open_index, open_log, open_registry, open_triggers,
};
use crate::config::{Config, IndexBackend, LogBackend};

/// Which parts of sluice a process runs (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `sluice serve`: the HTTP API and the pipeline in one process.
    Serve,
    /// `sluice api`: HTTP → log only (the log must be shared: Kafka).
    Api,
    /// `sluice ingest`: log → pipeline only (the log must be shared: Kafka).
    Ingest,
}

impl Role {
    fn accepts(self) -> bool {
        matches!(self, Role::Serve | Role::Api)
    }

    fn ingests(self) -> bool {
        matches!(self, Role::Serve | Role::Ingest)
    }

    fn name(self) -> &'static str {
        match self {
            Role::Serve => "serve",
            Role::Api => "api",
            Role::Ingest => "ingest",
        }
    }
}

/// How often `sluice_partition_lag` is measured (a watermark request per partition on Kafka).
const LAG_INTERVAL: Duration = Duration::from_secs(5);

pub async fn run(config: Config, role: Role) -> anyhow::Result<()> {
    if role != Role::Serve && config.kafka_brokers().is_none() {
        anyhow::bail!(
            "`sluice {}` needs a log shared with the other nodes: set --log kafka://host:9092 (or run `sluice serve` for everything in one process)",
            role.name()
        );
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    // Before anything records. SLUICE_METRICS=off runs without a recorder: the benchmarks'
    // "without metrics" side (BENCHMARKS.md).
    if std::env::var("SLUICE_METRICS").as_deref() != Ok("off")
        && let Some(handle) = sluice_api::metrics::install()
    {
        tokio::spawn(sluice_api::metrics::upkeep(handle));
    }
    let registry: Arc<dyn Registry> = Arc::from(open_registry(&config).await?);
    let first_key = if role.accepts() {
        sluice_registry::bootstrap(registry.as_ref()).await?
    } else {
        None
    };

    let (log, retention) = open_log(
        &config,
        if role.ingests() {
            Connect::Now
        } else {
            Connect::Lazily
        },
    )
    .await?;
    // An API-only node reads from a shared index (Elasticsearch/OpenSearch); it has no
    // embedded index of its own (its reads then answer 501).
    let index: Option<Arc<dyn Index>> = if role.ingests() || config.index != IndexBackend::Embedded
    {
        Some(open_index(&config).await?)
    } else {
        None
    };
    let mut dlq_session = None;
    let mut dispatcher = None;
    let mut dedup = None;
    let pipeline = match &index {
        Some(index) if role.ingests() => {
            let dead_letters = open_dead_letters(&config).await?;
            let triggers = open_triggers(&config).await?;
            // Embedded logs are this process's alone: `sluice dlq` goes through it.
            if config.kafka_brokers().is_none() {
                dlq_session = Some(Arc::new(sluice_pipeline::dead_letter::Session {
                    dlq: Arc::clone(&dead_letters),
                    ingest: Arc::clone(&log),
                    triggers: triggers.clone(),
                }));
            }
            // Webhook actions are delivered from the actions log by the dispatcher.
            // (`open_triggers` opens the actions log only when a rule is a webhook.)
            if let Some(actions) = triggers.actions_log() {
                dispatcher = Some(Dispatcher::new(
                    Arc::clone(actions),
                    Arc::clone(&dead_letters),
                    triggers.clone(),
                    DispatcherConfig {
                        action_max_age: config.action_max_age,
                        ..DispatcherConfig::default()
                    },
                ));
            }
            let opened = open_dedup(&config).await?;
            dedup = Some(Arc::clone(&opened));
            Some(Pipeline::new(
                Arc::clone(&log),
                dead_letters,
                Validator::new(Arc::clone(&registry), config.key_cache_ttl),
                opened,
                Arc::clone(index),
                PipelineConfig {
                    batch: BatchConfig {
                        max_records: config.batch_size,
                        timeout: config.batch_timeout,
                    },
                    triggers,
                    ..PipelineConfig::default()
                },
            ))
        }
        _ => None,
    };
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin_socket = match dlq_session {
        Some(session) => {
            let socket = crate::admin_socket::path(&config);
            match crate::admin_socket::serve(&socket, session, admin_stop_rx) {
                Ok(task) => Some(task),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "no admin socket: `sluice dlq` needs this server stopped");
                    None
                }
            }
        }
        None => None,
    };

    // The API writes through the bridge: the log, or the spill buffer when the log does not
    // acknowledge in time (SPEC §7).
    let bridge = if role.accepts() {
        let bridge_config = BridgeConfig {
            log_ack_timeout: config.log_ack_timeout,
            max_bytes: config.spill_max_bytes,
            replay_interval: config.replay_interval,
            max_replay_interval: config.replay_interval * 8,
            ..BridgeConfig::default()
        };
        Some(
            Bridge::open(Arc::clone(&log), &config.spill_path(), bridge_config).with_context(
                || {
                    format!(
                        "cannot open the spill buffer at {}",
                        config.spill_path().display()
                    )
                },
            )?,
        )
    } else {
        None
    };
    let state = bridge.as_ref().map(|bridge| {
        let api_config = ApiConfig {
            limits: Limits {
                max_item_bytes: config.max_item_bytes,
                max_request_bytes: config.max_request_bytes,
                max_request_items: config.max_request_items,
            },
            max_in_flight_bytes: config.max_in_flight_bytes,
            in_flight_wait: config.log_ack_timeout,
            key_cache_ttl: config.key_cache_ttl,
            sendgrid_max_age: config.sendgrid_max_age,
            cors: config.cors(),
            org_events_per_second: config.org_events_per_second,
        };
        AppState::new(
            bridge.clone(),
            Arc::clone(&registry),
            index.clone(),
            &api_config,
        )
    });
    // What `/healthz`, `/readyz` and `/metrics` read: an API node's through its bridge, an
    // ingest node's from its log.
    let operations = match &state {
        Some(state) => state.operations().clone(),
        None => Operations::for_log(Arc::clone(&log)),
    };
    operations.require_token(&config.admin_token);
    watch_backends(
        &operations,
        &registry,
        pipeline.as_ref().and(index.as_ref()),
        dedup.as_ref(),
    );
    operations.set_role(role.name());
    let mut lag = None;
    if let Some(pipeline) = &pipeline {
        let stats = pipeline.stats();
        if sluice_api::metrics::handle().is_some() {
            sluice_pipeline::runner::describe_metrics();
        }
        lag = Some(tokio::spawn(
            Arc::clone(&stats).watch_lag(Arc::clone(&log), LAG_INTERVAL),
        ));
        let shown = Arc::clone(&stats);
        operations.on_stats("pipeline", Arc::new(move || shown.snapshot()));
        operations.on_stats(
            "dead_letters",
            Arc::new(sluice_pipeline::dead_letter::tally),
        );
        operations.on_stats("actions", Arc::new(sluice_pipeline::trigger::outcomes));
        let dispatch = dispatcher.as_ref().map(|d| d.stats());
        operations.on_scrape(Arc::new(move || {
            sluice_api::ops::publish(&stats.metrics());
            if let Some(dispatch) = &dispatch {
                sluice_api::ops::publish(&dispatch.metrics());
            }
        }));
    }
    let (replay_stop_tx, replay_stop_rx) = watch::channel(false);
    let replayer = bridge
        .clone()
        .map(|bridge| tokio::spawn(async move { bridge.replay(replay_stop_rx).await }));

    // Every node listens: an ingest node for its operations routes only.
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // Install the handlers before the banner: once the last line is printed, SIGTERM drains.
    let signals = ShutdownSignals::install()?;
    let addr = listener
        .local_addr()
        .context("listener has no local address")?;
    print_banner(&config, role, addr, first_key.as_deref());

    // A signal, or the pipeline failing, flips this; the server stops accepting and the
    // shutdown clock starts. It holds the moment the drain started.
    let (stop_tx, mut stop_rx) = watch::channel(None::<Instant>);
    let stop_tx = Arc::new(stop_tx);
    let drain_operations = operations.clone();
    let signal_stop = Arc::clone(&stop_tx);
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("shutdown signal received: draining");
        drain_operations.start_draining();
        signal_stop.send_if_modified(start_drain);
    });

    // The pipeline stops on its own `stop` only after the HTTP server has drained, so the
    // requests it acknowledged last are still picked up by a running pipeline if time allows.
    let (pipeline_stop_tx, pipeline_stop_rx) = sluice_pipeline::stop::channel();
    let mut pipeline_task = pipeline.map(|pipeline| {
        let pipeline_operations = operations.clone();
        let pipeline_failed_stop = Arc::clone(&stop_tx);
        tokio::spawn(async move {
            // The dispatcher stops with the pipeline; a failure of either stops both.
            let result = match dispatcher {
                Some(dispatcher) => tokio::try_join!(
                    pipeline.run(pipeline_stop_rx.clone()),
                    dispatcher.run(pipeline_stop_rx)
                )
                .map(|_| ()),
                None => pipeline.run(pipeline_stop_rx).await,
            };
            if let Err(e) = &result {
                tracing::error!(error = %e, "pipeline stopped on an unexpected error: shutting down");
                pipeline_operations.pipeline_failed(e.to_string());
                pipeline_failed_stop.send_if_modified(start_drain);
            }
            result
        })
    });

    let mut graceful_rx = stop_rx.clone();
    let stopped = async move {
        let _ = graceful_rx.wait_for(Option::is_some).await;
    };
    let app = match state {
        Some(state) => sluice_api::router(state),
        None => sluice_api::operations_router(operations),
    };
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .into_future();
    let drain_deadline =
        |stop: &Option<Instant>| stop.map_or_else(Instant::now, |at| at) + config.shutdown_timeout;
    tokio::select! {
        result = server => result.context("HTTP server failed")?,
        () = async {
            let deadline = stop_rx.wait_for(Option::is_some).await.map(|s| drain_deadline(&s));
            tokio::time::sleep_until(deadline.unwrap_or_else(|_| Instant::now())).await;
        } => {
            tracing::warn!(timeout = ?config.shutdown_timeout, "in-flight requests did not finish within the shutdown timeout");
        }
    }
    // The server has drained; now let each partition finish and commit its batch. The
    // deadline was set when the stop came, so the whole drain fits in shutdown_timeout.
    pipeline_stop_tx.stop();
    let deadline = drain_deadline(&stop_rx.borrow());
    let pipeline_result = match &mut pipeline_task {
        None => Ok(()),
        Some(task) => match tokio::time::timeout_at(deadline, &mut *task).await {
            Ok(Ok(result)) => result.map_err(anyhow::Error::from),
            Ok(Err(join)) => Err(anyhow::anyhow!("the pipeline task panicked: {join}")),
            Err(_) => {
                tracing::warn!(
                    "the pipeline did not finish its batches within the shutdown timeout; they will be processed again after restart"
                );
                task.abort();
                Ok(())
            }
        },
    };
    let _ = admin_stop_tx.send(true);
    if let Some(task) = admin_socket {
        let _ = task.await;
    }
    // What the spill buffer still holds stays there, durable, for the next start.
    let _ = replay_stop_tx.send(true);
    if let Some(replayer) = replayer {
        let _ = replayer.await;
    }
    if let Some(bridge) = &bridge {
        bridge.close().await.context("closing the spill buffer")?;
    }
    if let Some(retention) = retention {
        retention.abort();
    }
    if let Some(lag) = lag {
        lag.abort();
    }
    if let Some(index) = &index {
        index.close().await.context("closing the index")?;
    }
    log.close().await.context("closing the log")?;
    pipeline_result.context("the pipeline failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Makes `/readyz` check the backends this node uses besides its log: the registry always,
/// and for a node that runs the pipeline the index it writes and its dedup store.
fn watch_backends(
    operations: &Operations,
    registry: &Arc<dyn Registry>,
    index: Option<&Arc<dyn Index>>,
    dedup: Option<&Arc<dyn Dedup>>,
) {
    // Each store's `health()`, its error as text.
    macro_rules! check {
        ($store:expr) => {{
            let store = Arc::clone($store);
            let check: HealthCheck = Arc::new(move || {
                let store = Arc::clone(&store);
                Box::pin(async move { store.health().await.map_err(|e| e.to_string()) })
            });
            check
        }};
    }
    operations.watch("registry", check!(registry));
    if let Some(index) = index {
        operations.watch("index", check!(index));
    }
    if let Some(dedup) = dedup {
        operations.watch("dedup", check!(dedup));
    }
}

/// Marks the start of the drain, once.
fn start_drain(stop: &mut Option<Instant>) -> bool {
    if stop.is_some() {
        return false;
    }
    *stop = Some(Instant::now());
    true
}

/// The banner. `listening on` (or, for an ingest node, `ingesting from`) is always the last
/// line, so a supervisor or test that reads it knows the node is running.
fn print_banner(config: &Config, role: Role, addr: std::net::SocketAddr, first_key: Option<&str>) {
    let log = match &config.log {
        LogBackend::Kafka { brokers, .. } => {
            format!("log: kafka {brokers}, topic {}", config.topic)
        }
        LogBackend::Embedded => format!("log: embedded, {} partitions", config.partitions),
    };
    println!(
        "sluice {} {} (data dir {}, {log})",
        env!("CARGO_PKG_VERSION"),
        role.name(),
        config.data_dir.display(),
    );
    println!(
        "  dedup: {}, index: {}, registry: {}",
        config.dedup, config.index, config.registry
    );
    if let Some(key) = first_key {
        println!("  first start: created org \"default\"; its API key (shown once):");
        println!("  api key: {key}");
    }
    if role.accepts() {
        println!("listening on http://{addr}");
    } else {
        // An ingest node serves only /healthz, /readyz and /metrics.
        println!(
            "listening on http://{addr} (operations only; ingesting from {})",
            config.log
        );
    }
}

/// SIGINT and SIGTERM, registered up front so no signal can arrive unhandled.
struct ShutdownSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    async fn recv(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {},
            _ = self.terminate.recv() => {},
        }
    }
}
