//! Retries of recoverable failures, for every stage of the pipeline and the dispatcher:
//! exponential backoff with jitter from 50 ms up to a maximum, forever, until the step succeeds,
//! fails in a way retrying cannot help, or a stop is requested.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::watch;

/// Why a retried step gave up.
pub(crate) enum Abandon {
    /// A stop was requested while retrying.
    Stopped,
    /// A non-recoverable error.
    Fatal(String),
}

/// The first pause after a failure; each next one doubles, with jitter, up to the maximum.
pub(crate) const FIRST_DELAY: Duration = Duration::from_millis(50);

/// Exponential backoff with jitter between attempts of one failing step.
pub(crate) struct Retrier<'a> {
    delays: backon::ExponentialBackoff,
    max: Duration,
    /// Counts the retries.
    retries: &'a AtomicU64,
}

impl<'a> Retrier<'a> {
    pub(crate) fn new(max: Duration, retries: &'a AtomicU64) -> Retrier<'a> {
        Retrier {
            delays: ExponentialBuilder::default()
                .with_min_delay(FIRST_DELAY)
                .with_max_delay(max)
                .with_jitter()
                .without_max_times()
                .build(),
            max,
            retries,
        }
    }

    /// Logs the failure and sleeps before the next attempt; `Err` if a stop came first.
    pub(crate) async fn wait(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        what: &str,
        error: &(dyn std::fmt::Display + Sync),
    ) -> Result<(), Abandon> {
        self.retries.fetch_add(1, Ordering::Relaxed);
        let delay = self.delays.next().unwrap_or(self.max);
        tracing::warn!(step = what, error = %error, retry_in = ?delay, "recoverable error");
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Err(Abandon::Stopped),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }
}

/// Runs `attempt` until it succeeds, fails with an error `retriable` refuses, or `stop`,
/// waiting with `retrier` between attempts.
pub(crate) async fn retry<T, E, F, Fut>(
    mut retrier: Retrier<'_>,
    what: &str,
    stop: &mut watch::Receiver<bool>,
    mut attempt: F,
    retriable: impl Fn(&E) -> bool,
) -> Result<T, Abandon>
where
    E: std::fmt::Display + Sync,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if retriable(&e) => retrier.wait(stop, what, &e).await?,
            Err(e) => return Err(Abandon::Fatal(format!("{what}: {e}"))),
        }
    }
}
