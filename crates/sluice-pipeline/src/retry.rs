//! Retries of recoverable failures, for every stage of the pipeline and the dispatcher:
//! exponential backoff with jitter from 50 ms up to a maximum, forever, until the step succeeds,
//! fails in a way retrying cannot help (the error is not [`Recoverable`]), or a stop is
//! requested.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::stop::Stop;
use backon::{BackoffBuilder, ExponentialBuilder};
use sluice_model::Recoverable;

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
        stop: &mut Stop,
        what: &str,
        error: &(dyn std::fmt::Display + Sync),
    ) -> Result<(), Abandon> {
        self.retries.fetch_add(1, Ordering::Relaxed);
        let delay = self.delays.next().unwrap_or(self.max);
        tracing::warn!(step = what, error = %error, retry_in = ?delay, "recoverable error");
        tokio::select! {
            biased;
            _ = stop.requested() => Err(Abandon::Stopped),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }
}

/// How a place retries: its longest pause and the counter of its retries.
#[derive(Clone, Copy)]
pub(crate) struct Policy<'a> {
    pub max_delay: Duration,
    pub retries: &'a AtomicU64,
}

impl<'a> Policy<'a> {
    pub(crate) fn retrier(self) -> Retrier<'a> {
        Retrier::new(self.max_delay, self.retries)
    }

    /// [`retry`] with a fresh [`Retrier`] of this policy.
    pub(crate) async fn retry<T, E, F, Fut>(
        self,
        what: &str,
        stop: &mut Stop,
        attempt: F,
    ) -> Result<T, Abandon>
    where
        E: Recoverable + std::fmt::Display + Sync,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        retry(self.retrier(), what, stop, attempt).await
    }
}

/// Runs `attempt` until it succeeds, fails with an error that is not [`Recoverable`], or
/// `stop`, waiting with `retrier` between attempts.
pub(crate) async fn retry<T, E, F, Fut>(
    mut retrier: Retrier<'_>,
    what: &str,
    stop: &mut Stop,
    mut attempt: F,
) -> Result<T, Abandon>
where
    E: Recoverable + std::fmt::Display + Sync,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if e.is_recoverable() => retrier.wait(stop, what, &e).await?,
            Err(e) => return Err(Abandon::Fatal(format!("{what}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stop;

    #[derive(Debug)]
    struct Failure {
        recoverable: bool,
    }

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "recoverable: {}", self.recoverable)
        }
    }

    impl Recoverable for Failure {
        fn is_recoverable(&self) -> bool {
            self.recoverable
        }
    }

    /// Fails `failures` times with `recoverable` errors, then succeeds.
    async fn run(failures: u32, recoverable: bool) -> (Result<u32, Abandon>, u64) {
        let retries = AtomicU64::new(0);
        let (_tx, mut stop) = stop::channel();
        let mut attempts = 0;
        let result = retry(
            Retrier::new(Duration::from_secs(1), &retries),
            "the step",
            &mut stop,
            || {
                attempts += 1;
                let failed = attempts <= failures;
                async move {
                    if failed {
                        Err(Failure { recoverable })
                    } else {
                        Ok(attempts)
                    }
                }
            },
        )
        .await;
        (result, retries.load(Ordering::Relaxed))
    }

    #[tokio::test(start_paused = true)]
    async fn a_recoverable_error_is_retried_until_the_step_succeeds() {
        let (result, retries) = run(20, true).await;
        assert!(matches!(result, Ok(21)));
        assert_eq!(retries, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_that_cannot_recover_abandons_at_once_naming_the_step() {
        let (result, retries) = run(1, false).await;
        match result {
            Err(Abandon::Fatal(message)) => assert_eq!(message, "the step: recoverable: false"),
            _ => panic!("not abandoned"),
        }
        assert_eq!(retries, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_the_wait_between_attempts() {
        let retries = AtomicU64::new(0);
        let (tx, mut stop) = stop::channel();
        let stopping = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            tx.stop();
        });
        let result: Result<(), Abandon> = retry(
            Retrier::new(Duration::from_secs(1), &retries),
            "the step",
            &mut stop,
            || async { Err(Failure { recoverable: true }) },
        )
        .await;
        assert!(matches!(result, Err(Abandon::Stopped)));
        // About one attempt a second once the delay reaches its maximum.
        assert!((3..=8).contains(&retries.load(Ordering::Relaxed)));
        stopping.await.expect("stopper");
    }
}
