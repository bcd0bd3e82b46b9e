//! Consumer-group membership, shared by the pipeline and the action dispatcher: one task per
//! owned partition, run by a [`Partitions`] implementation, until a stop request.
//!
//! Protocol:
//! 1. join the group; each `Assigned` partition gets a task and a stop channel of its own;
//! 2. `Revoked` stops that partition's task (it finishes or abandons its batch and commits
//!    what it finished; the log waits for it before handing the partition on);
//! 3. a stop request stops every task and returns once all have ended;
//! 4. a membership that ends on a recoverable log error (a static member fenced after a
//!    coordinator failover, say) is joined again after a pause, its tasks ended first, so the
//!    new membership reads uncommitted records again. More than [`MAX_REJOINS`] rejoins in a
//!    row, each membership shorter than [`STABLE_MEMBERSHIP`], are an error instead (another
//!    node may be running under the same instance id);
//! 5. a task that fails (or panics) ends the membership with its error.

use sluice_model::Recoverable;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::stop::{self, Stop, Stopper};
use sluice_log::{Assignment, Log, LogError, PartitionStream, Subscription};
use tokio::task::JoinSet;

use crate::error::PipelineError;
use crate::retry::Retrier;

/// Rejoins in a row, each after a membership shorter than [`STABLE_MEMBERSHIP`], before
/// giving up.
pub const MAX_REJOINS: u32 = 5;
/// A membership at least this long resets the rejoin count.
pub const STABLE_MEMBERSHIP: Duration = Duration::from_secs(60);
/// The pause before the n-th rejoin in a row is n times this, at most the caller's maximum.
const REJOIN_PAUSE: Duration = Duration::from_secs(1);

/// What runs one owned partition until its stop channel turns true.
pub(crate) trait Partitions: Send + Sync + 'static {
    fn run_partition(
        self: Arc<Self>,
        stream: Box<dyn PartitionStream>,
        stop: Stop,
    ) -> impl Future<Output = Result<(), PipelineError>> + Send + 'static;
}

/// A consumer group to take part in.
pub(crate) struct Group<'a> {
    pub log: &'a dyn Log,
    pub name: &'a str,
    /// The longest pause before a rejoin.
    pub max_pause: Duration,
    /// Counts rejoins.
    pub rejoins: &'a AtomicU64,
}

/// How one membership ended without a failure.
enum Membership {
    /// A stop request, or the subscription closed.
    Ended,
    /// The log ended the membership on an error.
    Failed(LogError),
}

impl Group<'_> {
    /// Takes part in the group with `runner` running each owned partition, until `stop`
    /// turns true (every task ended) or a failure (module docs).
    pub(crate) async fn run<P: Partitions>(
        &self,
        runner: Arc<P>,
        mut stop: Stop,
    ) -> Result<(), PipelineError> {
        let mut rejoins = 0;
        loop {
            let subscription =
                self.log
                    .subscribe(self.name)
                    .await
                    .map_err(|source| PipelineError::Subscribe {
                        group: self.name.to_string(),
                        source,
                    })?;
            let joined = tokio::time::Instant::now();
            let source = match membership(runner.clone(), subscription, &mut stop).await? {
                Membership::Ended => return Ok(()),
                Membership::Failed(source) => source,
            };
            if !source.is_recoverable() {
                return Err(PipelineError::Consumer {
                    group: self.name.to_string(),
                    source,
                });
            }
            rejoins = if joined.elapsed() >= STABLE_MEMBERSHIP {
                1
            } else {
                rejoins + 1
            };
            if rejoins > MAX_REJOINS {
                return Err(PipelineError::Rejoins {
                    group: self.name.to_string(),
                    rejoins: MAX_REJOINS,
                    source,
                });
            }
            self.rejoins.fetch_add(1, Ordering::Relaxed);
            let pause = (REJOIN_PAUSE * rejoins).min(self.max_pause.max(REJOIN_PAUSE));
            tracing::warn!(group = %self.name, error = %source, rejoin_in = ?pause, "the consumer group membership ended; rejoining");
            tokio::select! {
                biased;
                _ = stop.requested() => return Ok(()),
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// One membership: a task per assigned partition, until `stop`, the subscription's end or
/// failure, or a task's failure. Every task has ended on return.
async fn membership<P: Partitions>(
    runner: Arc<P>,
    mut subscription: Box<dyn Subscription>,
    stop: &mut Stop,
) -> Result<Membership, PipelineError> {
    let mut tasks = JoinSet::new();
    let mut partition_stops: HashMap<u32, Stopper> = HashMap::new();
    let mut result = Ok(Membership::Ended);
    loop {
        tokio::select! {
            _ = stop.requested() => break,
            assignment = subscription.next() => match assignment {
                Some(Assignment::Assigned(stream)) => {
                    let (tx, rx) = stop::channel();
                    partition_stops.insert(stream.partition(), tx);
                    tasks.spawn(runner.clone().run_partition(stream, rx));
                }
                Some(Assignment::Revoked(partition)) => {
                    if let Some(tx) = partition_stops.remove(&partition) {
                        tx.stop();
                    }
                }
                Some(Assignment::Failed(source)) => {
                    result = Ok(Membership::Failed(source));
                    break;
                }
                None => break,
            },
            Some(joined) = tasks.join_next() => {
                if let Err(e) = flatten(joined) {
                    result = Err(e);
                    break;
                }
            }
        }
    }
    for tx in partition_stops.values() {
        tx.stop();
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = flatten(joined)
            && result.is_ok()
        {
            result = Err(e);
        }
    }
    result
}

/// How [`commit`] ended, but for an error.
pub(crate) enum Committed {
    Done,
    /// The partition was revoked first: its next owner processes the records again.
    Revoked,
    /// A stop came while retrying.
    Stopped,
}

/// Commits `next_offset` on `stream`, retrying recoverable errors (waiting with `retrier`)
/// until `stop`; any other error is its text.
pub(crate) async fn commit(
    stream: &mut dyn PartitionStream,
    next_offset: u64,
    mut retrier: Retrier<'_>,
    stop: &mut Stop,
) -> Result<Committed, String> {
    loop {
        let error = match stream.commit(next_offset).await {
            Ok(()) => return Ok(Committed::Done),
            Err(LogError::Revoked(_)) => return Ok(Committed::Revoked),
            Err(e) if e.is_recoverable() => e,
            Err(e) => return Err(format!("commit: {e}")),
        };
        if retrier
            .wait(stop, "commit the offset", &error)
            .await
            .is_err()
        {
            return Ok(Committed::Stopped);
        }
    }
}

fn flatten(
    joined: Result<Result<(), PipelineError>, tokio::task::JoinError>,
) -> Result<(), PipelineError> {
    match joined {
        Ok(result) => result,
        Err(e) => Err(PipelineError::Panicked(e.to_string())),
    }
}
