//! `sluice serve`: the embedded deployment in one process. Opens the registry (creating org
//! `default` on first start), the log, and the HTTP API, and drains cleanly on SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use sluice_api::{ApiConfig, AppState, Limits};
use sluice_log::{EmbeddedLog, EmbeddedLogConfig, Log};
use sluice_registry::{Registry, SqliteRegistry};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;

/// How often retention looks for deletable log records.
const RETENTION_INTERVAL: Duration = Duration::from_secs(30);

pub async fn run(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let registry: Arc<dyn Registry> =
        Arc::new(SqliteRegistry::open(&config.registry_path()).await?);
    let first_key = sluice_registry::bootstrap(registry.as_ref()).await?;

    let log = Arc::new(EmbeddedLog::open(
        &config.log_path(),
        EmbeddedLogConfig {
            partitions: config.partitions,
            retention_max_age: Some(config.retention_max_age).filter(|d| !d.is_zero()),
            retention_max_bytes: Some(config.retention_max_bytes).filter(|b| *b > 0),
            ..EmbeddedLogConfig::default()
        },
    )?);
    let retention = log.spawn_retention(RETENTION_INTERVAL);

    let api_config = ApiConfig {
        limits: Limits {
            max_item_bytes: config.max_item_bytes,
            max_request_bytes: config.max_request_bytes,
            max_request_items: config.max_request_items,
        },
        log_ack_timeout: config.log_ack_timeout,
        key_cache_ttl: config.key_cache_ttl,
    };
    let state = AppState::new(
        Arc::clone(&log) as Arc<dyn Log>,
        Arc::clone(&registry),
        &api_config,
    );

    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener
        .local_addr()
        .context("listener has no local address")?;
    // Install the handlers before the banner: once "listening on" is printed, SIGTERM drains.
    let signals = ShutdownSignals::install()?;
    print_banner(&config, addr, first_key.as_deref());

    // The signal handler flips this; the server stops accepting and `main` starts the clock.
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let drain_state = state.clone();
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("shutdown signal received: draining");
        drain_state.start_draining();
        let _ = stop_tx.send(true);
    });

    let app = sluice_api::router(state);
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let mut graceful_rx = stop_rx.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = graceful_rx.wait_for(|stop| *stop).await;
    });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        result = &mut server => result.context("HTTP server failed")?,
        () = async {
            let _ = stop_rx.wait_for(|stop| *stop).await;
            tokio::time::sleep(config.shutdown_timeout).await;
        } => {
            tracing::warn!(timeout = ?config.shutdown_timeout, "in-flight requests did not finish within the shutdown timeout");
        }
    }
    retention.abort();
    log.close().await.context("closing the log")?;
    tracing::info!("stopped");
    Ok(())
}

/// The banner. `listening on` is always the last line, so a supervisor or test that reads it
/// knows the server is accepting.
fn print_banner(config: &Config, addr: std::net::SocketAddr, first_key: Option<&str>) {
    println!(
        "sluice {} (embedded: data dir {}, {} log partitions)",
        env!("CARGO_PKG_VERSION"),
        config.data_dir.display(),
        config.partitions
    );
    if let Some(key) = first_key {
        println!("  first start: created org \"default\"; its API key (shown once):");
        println!("  api key: {key}");
    }
    println!("listening on http://{addr}");
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
