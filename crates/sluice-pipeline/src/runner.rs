//! The per-partition loop that drives the stages (SPEC §6): one task per assigned partition,
//! all partitions in parallel.
//!
//! Each batch goes through the stages in the order ARCHITECTURE.md states. Nothing is
//! committed before the index write and the dedup mark of every message up to that offset
//! succeeded, so a crash at any point replays from the last commit, and the dedup store plus
//! idempotent index writes keep the effects single.
//!
//! A partition has at most two batches in hand: the one being written (index, dead letters,
//! triggers, mark, commit) and the next, which meanwhile goes through the front stages (read,
//! validate, dedup check, merge), so the index is not idle while a partition does its own
//! bookkeeping. The front's dedup check runs before the batch being written is marked, so it
//! also drops that batch's keys. The next batch is written only after the one before it is
//! committed: per-user order and the trigger stage's profile reads see the same sequence as
//! one batch at a time. A read still waiting for records when the write ends is dropped; what
//! it pulled stays in the [`Batcher`].
//!
//! Memory: the batches in hand (checked, being written, or ahead) of all partitions together
//! hold at most `max_batches_in_hand` full batches of records. A partition takes its batch's share of that
//! budget after the read and before the check, and gives it back when the batch is committed
//! or dropped; past the budget, it waits. A batch being written never waits for the budget, so
//! shares always come back. Without it, a backlog on N partitions would have 2·N full batches
//! in memory at once.
//!
//! Recoverable failures (registry, dedup store, index storage, commit) are retried with
//! exponential backoff and jitter, forever, without moving past the batch. A stop request
//! abandons the batch being retried (it is not committed, so it is read again after restart).

use sluice_model::Recoverable;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::stop::Stop;
use futures_util::FutureExt;
use sluice_dedup::{Dedup, MessageKey};
use sluice_index::{EventDoc, Forget, Index, Refused, UserUpsert, WriteBatch};
use sluice_log::{Log, LogError, LogRecord, PartitionStream};
use sluice_model::{Kind, Patch};
use tracing::Instrument;

use crate::batch::{BatchConfig, Batcher, record_at};
use crate::dead_letter::{self, Stage};
pub use crate::error::PipelineError;
use crate::group::{self, Committed, Group, Partitions};
use crate::merge::{Fold, Identity, Item, merge};
use crate::retry::{Abandon, Policy};
use crate::trigger::{self, Triggers};
use crate::validate::{ValidMessage, Validator};

/// Longest a partition's start waits for its end offset (`Pipeline::replay_end`); past it, its
/// batches count as replays.
const REPLAY_END_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Consumer group on the log.
    pub group: String,
    pub batch: BatchConfig,
    /// Longest wait between two attempts of a failing step.
    pub max_retry_delay: Duration,
    /// The `[[triggers]]` rules (none by default).
    pub triggers: Triggers,
    /// Most records the batches of all partitions hold at once, in full batches
    /// (`batch.max_records` each; at least 1).
    pub max_batches_in_hand: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            group: "sluice-pipeline".into(),
            batch: BatchConfig::default(),
            max_retry_delay: Duration::from_secs(5),
            triggers: Triggers::default(),
            // The most 8 partitions (the embedded log's default) ever hold: fewer cost
            // end-to-end throughput, since the index commits the batches waiting for it as one
            // group (BENCHMARKS.md, issue 19). A node owning more partitions is bounded.
            max_batches_in_hand: 16,
        }
    }
}

/// Counters since start, shared by every partition task.
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub batches: AtomicU64,
    /// Records read from the log.
    pub records: AtomicU64,
    /// Messages dropped because they were already processed.
    pub duplicates: AtomicU64,
    /// Messages refused by validation or by the index (dead letters).
    pub dead_letters: AtomicU64,
    pub users_upserted: AtomicU64,
    pub events_indexed: AtomicU64,
    /// Trigger actions appended to their log (the dispatcher delivers the webhook ones).
    pub actions_fired: AtomicU64,
    /// Attempts that failed with a recoverable error and were retried.
    pub retries: AtomicU64,
    /// Consumer-group memberships rejoined after the log ended one on an error.
    pub rejoins: AtomicU64,
    /// Time spent in each step, summed over partitions, in microseconds: where a batch's time
    /// goes (read includes waiting for records to arrive, and for room among the records in
    /// hand).
    pub read_us: AtomicU64,
    pub validate_us: AtomicU64,
    pub dedup_check_us: AtomicU64,
    pub merge_us: AtomicU64,
    pub index_us: AtomicU64,
    /// Preparing and firing trigger actions.
    pub trigger_us: AtomicU64,
    pub mark_us: AtomicU64,
    pub commit_us: AtomicU64,
    /// The partitions this pipeline owns now, each with its committed offset (the next one to
    /// process): what partition lag is measured from.
    owned: std::sync::Mutex<std::collections::BTreeMap<u32, u64>>,
    /// The log's end offset of each partition, as [`PipelineStats::watch_lag`] last read it.
    ends: std::sync::Mutex<Vec<u64>>,
}

/// A partition's entry in [`PipelineStats`]'s owned partitions, for as long as its task runs.
struct Owned<'a> {
    stats: &'a PipelineStats,
    partition: u32,
}

impl<'a> Owned<'a> {
    fn new(stats: &'a PipelineStats, partition: u32, committed: u64) -> Owned<'a> {
        stats.set_committed(partition, committed);
        Owned { stats, partition }
    }
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        self.stats.owned_lock().remove(&self.partition);
    }
}

/// Adds the time since `*since` to `counter` and to the histogram of `stage`
/// (`sluice_pipeline_stage_duration_seconds`, one sample per batch), and restarts the clock.
fn lap(counter: &AtomicU64, stage: &'static str, since: &mut std::time::Instant) {
    let now = std::time::Instant::now();
    let took = now - *since;
    counter.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    metrics::histogram!("sluice_pipeline_stage_duration_seconds", "stage" => stage)
        .record(took.as_secs_f64());
    *since = now;
}

/// Describes the pipeline's metrics that are recorded as they happen (the counters of
/// [`PipelineStats`] are published at scrape time from `metrics()`), and creates the counters
/// that may stay at 0 so that their families are there from the start.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_histogram!(
        "sluice_pipeline_stage_duration_seconds",
        Unit::Seconds,
        "time a batch spent in each pipeline stage (read includes waiting for records)"
    );
    describe_histogram!(
        "sluice_index_bulk_duration_seconds",
        Unit::Seconds,
        "time of a batch's index write, retries of refused items included"
    );
    describe_counter!(
        "sluice_dead_letters_total",
        "messages dead-lettered, by the stage that refused them"
    );
    describe_counter!(
        "sluice_actions_total",
        "trigger actions by rule and outcome (fired: appended by the pipeline; delivered: a webhook call answered 2xx, or a topic rule's record appended; retried, dead_lettered: the dispatcher's webhook calls)"
    );
    metrics::describe_gauge!(
        "sluice_partition_lag",
        "records of the partition not yet processed and committed (the log's end minus the committed offset), for the partitions this node owns"
    );
    describe_counter!(
        "sluice_index_item_retries_total",
        "index documents the search engine failed with 429/5xx and the write sent again"
    );
    for stage in [Stage::Validate, Stage::Index, Stage::Trigger] {
        metrics::counter!("sluice_dead_letters_total", "stage" => stage.name()).increment(0);
    }
    metrics::counter!("sluice_index_item_retries_total").increment(0);
}

impl PipelineStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn owned_lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u32, u64>> {
        self.owned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_committed(&self, partition: u32, committed: u64) {
        self.owned_lock().insert(partition, committed);
    }

    /// The partitions owned now, with their committed offsets.
    pub fn owned(&self) -> Vec<(u32, u64)> {
        self.owned_lock().iter().map(|(&p, &c)| (p, c)).collect()
    }

    /// Reads the log's end offsets every `every`, for as long as it runs, and publishes
    /// `sluice_partition_lag{partition}` (the log's end minus the committed offset) for the
    /// partitions owned; [`PipelineStats::snapshot`] shows the same. A partition no longer
    /// owned stops being updated; the recorder drops idle gauges.
    pub async fn watch_lag(self: Arc<Self>, log: Arc<dyn Log>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let owned = self.owned();
            if owned.is_empty() {
                continue;
            }
            match log.end_offsets().await {
                Ok(ends) => {
                    self.ends
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone_from(&ends);
                    for (partition, committed) in owned {
                        let end = ends.get(partition as usize).copied().unwrap_or(committed);
                        metrics::gauge!("sluice_partition_lag", "partition" => partition.to_string())
                            .set(end.saturating_sub(committed) as f64);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "pipeline: cannot read the log's end offsets for lag")
                }
            }
        }
    }

    /// The time spent in each stage so far (µs summed over partitions), in stage order.
    /// `read` includes waiting for records; `actions` is preparing and appending them.
    pub fn stage_micros(&self) -> [(&'static str, u64); 8] {
        [
            ("read", &self.read_us),
            ("validate", &self.validate_us),
            ("dedup", &self.dedup_check_us),
            ("merge", &self.merge_us),
            ("index", &self.index_us),
            ("actions", &self.trigger_us),
            ("mark", &self.mark_us),
            ("commit", &self.commit_us),
        ]
        .map(|(stage, micros)| (stage, Self::get(micros)))
    }

    /// What `/stats` shows of the pipeline (SPEC §9): its totals, each owned partition's
    /// committed and end offsets and lag, and the time per batch of each stage.
    pub fn snapshot(&self) -> serde_json::Value {
        let ends = self
            .ends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let partitions: Vec<serde_json::Value> = self
            .owned()
            .into_iter()
            .map(|(partition, committed)| {
                // The end is read every few seconds and the commit moves on meanwhile: an end
                // behind the commit is stale, and the partition has no lag.
                let end = ends.get(partition as usize).map(|&end| end.max(committed));
                serde_json::json!({
                    "partition": partition,
                    "committed": committed,
                    "end": end,
                    "lag": end.map(|end| end.saturating_sub(committed)),
                })
            })
            .collect();
        let batches = Self::get(&self.batches);
        let stages: Vec<serde_json::Value> = self
            .stage_micros()
            .into_iter()
            .map(|(stage, micros)| {
                let total_ms = micros as f64 / 1000.0;
                serde_json::json!({
                    "stage": stage,
                    "total_ms": total_ms,
                    "per_batch_ms": if batches == 0 { 0.0 } else { total_ms / batches as f64 },
                })
            })
            .collect();
        serde_json::json!({
            "batches_total": batches,
            "records_total": Self::get(&self.records),
            "dedup_drops_total": Self::get(&self.duplicates),
            "users_upserted_total": Self::get(&self.users_upserted),
            "events_indexed_total": Self::get(&self.events_indexed),
            "retries_total": Self::get(&self.retries),
            "partitions": partitions,
            "stages": stages,
        })
    }

    /// The counters as Prometheus samples: (name, type, help, value).
    pub fn metrics(&self) -> Vec<(&'static str, &'static str, &'static str, f64)> {
        let counter =
            |name, help, value: &AtomicU64| (name, "counter", help, Self::get(value) as f64);
        vec![
            counter(
                "sluice_pipeline_batches_total",
                "batches processed and committed since start",
                &self.batches,
            ),
            counter(
                "sluice_pipeline_records_total",
                "log records read by the pipeline since start",
                &self.records,
            ),
            counter(
                "sluice_pipeline_duplicates_total",
                "messages dropped as already processed since start",
                &self.duplicates,
            ),
            counter(
                "sluice_users_upserted_total",
                "profile upserts written to the index since start",
                &self.users_upserted,
            ),
            counter(
                "sluice_events_indexed_total",
                "events written to the index since start",
                &self.events_indexed,
            ),
            counter(
                "sluice_actions_fired_total",
                "trigger actions appended to their log (the actions log, or a topic rule's topic) since start",
                &self.actions_fired,
            ),
            counter(
                "sluice_pipeline_retries_total",
                "attempts that failed with a recoverable error and were retried since start",
                &self.retries,
            ),
            counter(
                "sluice_pipeline_rejoins_total",
                "consumer-group memberships rejoined after the log ended one on an error, since start",
                &self.rejoins,
            ),
        ]
    }
}

/// The stages and their backends, shared by every partition task.
pub struct Pipeline {
    log: Arc<dyn Log>,
    /// Where refused messages go (`dead_letter`): `sluice.dlq` or the embedded `dlq` log.
    dead_letters: Arc<dyn Log>,
    validator: Validator,
    pub(crate) dedup: Arc<dyn Dedup>,
    pub(crate) index: Arc<dyn Index>,
    pub(crate) config: PipelineConfig,
    pub(crate) stats: Arc<PipelineStats>,
    /// Permits are records in hand (`max_batches_in_hand` × `batch.max_records`).
    budget: Arc<Semaphore>,
    budget_total: u32,
}

/// A batch through the front stages (validate, dedup check, merge), ready to be written.
struct Checked {
    records: Vec<LogRecord>,
    /// How many of the pending records the check covered: all, or those before a forget
    /// (`forget_cut`).
    size: usize,
    valid: Vec<ValidMessage>,
    /// Positions in `valid` of the messages not processed before, in log order.
    fresh: Vec<usize>,
    /// Dead letters of the validate stage.
    dead: Vec<sluice_log::Record>,
    write: Arc<WriteBatch>,
    /// What the trigger rules match: (rule, position in `fresh`).
    matches: Vec<(usize, usize)>,
    /// The merge stage's snapshots of matched events (by position in `fresh`): the user's
    /// updates before the event in the batch, folded.
    snapshots: HashMap<usize, UserUpsert>,
    /// When the batch was validated: the time its dead letters carry.
    now: i64,
    /// The batch's share of the records in hand, given back when the batch is dropped.
    _budget: Option<OwnedSemaphorePermit>,
}

impl Checked {
    fn first(&self) -> u64 {
        self.records.first().map_or(0, |r| r.offset)
    }

    fn last(&self) -> u64 {
        self.records.last().map_or(0, |r| r.offset)
    }

    fn fresh(&self) -> Vec<&ValidMessage> {
        self.fresh.iter().map(|&i| &self.valid[i]).collect()
    }

    /// The dedup keys of the messages the batch processes.
    fn keys(&self) -> HashSet<MessageKey<'_>> {
        self.fresh
            .iter()
            .map(|&i| message_key(&self.valid[i]))
            .collect()
    }
}

/// Why the front stages have no batch to hand on.
enum Halt {
    /// The partition is closed or revoked: not ours to read any more.
    Released,
    /// A stop was requested while retrying a step.
    Stopped,
    /// Reading the log failed with a recoverable error: read again after a pause.
    Read(LogError),
    /// The partition stops.
    Failed(PipelineError),
}

/// A panic caught in a stage, as the error that stops the partition: it names the batch (its
/// offsets and the message ids at both ends) and the panic's message, and is logged.
fn panicked(
    partition: u32,
    records: &[LogRecord],
    panic: &(dyn std::any::Any + Send),
) -> PipelineError {
    let first = records.first().map_or(0, |r| r.offset);
    let last = records.last().map_or(0, |r| r.offset);
    let cause = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into());
    let ids = batch_message_ids(records);
    tracing::error!(partition, first, last, message_ids = %ids, %cause, "pipeline: a stage panicked; this partition stops");
    stream_error(
        partition,
        first,
        last,
        format!("a stage panicked: {cause} (batch of messages {ids})"),
    )
}

impl Pipeline {
    pub fn new(
        log: Arc<dyn Log>,
        dead_letters: Arc<dyn Log>,
        validator: Validator,
        dedup: Arc<dyn Dedup>,
        index: Arc<dyn Index>,
        config: PipelineConfig,
    ) -> Arc<Pipeline> {
        let budget_total = u32::try_from(
            config
                .max_batches_in_hand
                .max(1)
                .saturating_mul(config.batch.max_records.max(1)),
        )
        .unwrap_or(u32::MAX);
        Arc::new(Pipeline {
            log,
            dead_letters,
            validator,
            dedup,
            index,
            config,
            stats: Arc::default(),
            budget: Arc::new(Semaphore::new(budget_total as usize)),
            budget_total,
        })
    }

    pub fn stats(&self) -> Arc<PipelineStats> {
        self.stats.clone()
    }

    /// Consumes the log as a member of the pipeline's group (`group`: a task per owned
    /// partition, rejoined after a recoverable end) until `stop` turns true (then finishes
    /// each partition's batch in flight and commits it) or a partition task fails.
    pub async fn run(self: Arc<Self>, stop: Stop) -> Result<(), PipelineError> {
        let log = Arc::clone(&self.log);
        let group = Group {
            log: log.as_ref(),
            name: &self.config.group,
            max_pause: self.config.max_retry_delay,
            rejoins: &self.stats.rejoins,
        };
        group.run(Arc::clone(&self), stop).await
    }

    async fn process_partition(
        self: Arc<Self>,
        mut stream: Box<dyn PartitionStream>,
        mut stop: Stop,
    ) -> Result<(), PipelineError> {
        let partition = stream.partition();
        tracing::info!(
            partition,
            position = stream.position(),
            "pipeline: partition assigned"
        );
        let _owned = Owned::new(&self.stats, partition, stream.position());
        let replay_end = self.replay_end(partition).await;
        let mut batcher = Batcher::new(self.config.batch);
        // The next batch, read and checked while the one before it was written.
        let mut ahead: Option<Checked> = None;
        let mut front_stop = stop.clone();
        let nothing_in_flight = HashSet::new();
        loop {
            if stop.is_requested() {
                break;
            }
            let batch = match ahead.take() {
                Some(batch) => batch,
                None => {
                    let front = self.front(
                        partition,
                        &mut batcher,
                        &mut *stream,
                        &nothing_in_flight,
                        replay_end,
                        &mut front_stop,
                    );
                    let checked = tokio::select! {
                        biased;
                        _ = stop.requested() => break,
                        checked = front => checked,
                    };
                    match self.ahead_or_halt(partition, checked).await? {
                        Some(batch) => batch,
                        None if stop.is_requested() => break,
                        None => continue,
                    }
                }
            };
            let (written, next) = self
                .write_reading_ahead(
                    &batch,
                    &mut batcher,
                    &mut *stream,
                    replay_end,
                    &mut stop,
                    &mut front_stop,
                )
                .await;
            match written {
                Ok(()) => {}
                Err(None) => break,
                Err(Some(e)) => return Err(e),
            }
            if !self.commit_after(&batch, &mut *stream, &mut stop).await? {
                return Ok(());
            }
            if let Some(checked) = next {
                ahead = self.ahead_or_halt(partition, checked).await?;
            }
        }
        tracing::info!(
            partition,
            position = stream.position(),
            "pipeline: partition released"
        );
        Ok(())
    }

    /// The back stages of `batch` while the next batch goes through the front stages (read,
    /// validate, dedup check, merge). The front's check cannot see this batch's marks yet, so
    /// it also drops what this batch holds. (A message of this batch that the index refuses is
    /// not marked, and a copy of it in the next batch is dropped all the same: its dead letter
    /// is what a replay processes.) A read still under way when the write ends is dropped:
    /// what it pulled stays in the batcher. `Err(None)`: stopped; `Err(Some)`: the partition
    /// stops on it (a panic in a stage is a bug, SPEC §6 "unknown": nothing of the batch is
    /// committed).
    async fn write_reading_ahead(
        &self,
        batch: &Checked,
        batcher: &mut Batcher,
        stream: &mut dyn PartitionStream,
        replay_end: u64,
        stop: &mut Stop,
        front_stop: &mut Stop,
    ) -> (
        Result<(), Option<PipelineError>>,
        Option<Result<Checked, Halt>>,
    ) {
        let partition = stream.partition();
        let (first, last) = (batch.first(), batch.last());
        // Every log line of the batch (retries, dead letters) names its partition and offsets.
        let span = tracing::warn_span!("batch", partition, first, last);
        let in_flight = batch.keys();
        let apply = AssertUnwindSafe(self.apply(batch, stop).instrument(span)).catch_unwind();
        let front = self.front(
            partition, batcher, stream, &in_flight, replay_end, front_stop,
        );
        tokio::pin!(apply, front);
        let mut next = None;
        let applied = loop {
            tokio::select! {
                biased;
                applied = &mut apply => break applied,
                checked = &mut front, if next.is_none() => next = Some(checked),
            }
        };
        let written = match applied {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Abandon::Stopped)) => Err(None),
            Ok(Err(Abandon::Fatal(message))) => {
                Err(Some(stream_error(partition, first, last, message)))
            }
            Err(panic) => Err(Some(panicked(partition, &batch.records, panic.as_ref()))),
        };
        (written, next)
    }

    /// Commits the offset after `batch`; `Ok(false)` when the partition ends here instead
    /// (revoked first, or stopped while retrying).
    async fn commit_after(
        &self,
        batch: &Checked,
        stream: &mut dyn PartitionStream,
        stop: &mut Stop,
    ) -> Result<bool, PipelineError> {
        let partition = stream.partition();
        let (first, last) = (batch.first(), batch.last());
        let mut clock = std::time::Instant::now();
        match group::commit(stream, last + 1, self.policy().retrier(), stop).await {
            Ok(Committed::Done) => {}
            Ok(Committed::Revoked) => {
                tracing::warn!(
                    partition,
                    first,
                    last,
                    "pipeline: the partition was revoked before its batch was committed; its next owner processes it again"
                );
                return Ok(false);
            }
            Ok(Committed::Stopped) => {
                tracing::info!(partition, "pipeline: stopped while retrying a commit");
                return Ok(false);
            }
            Err(message) => return Err(stream_error(partition, first, last, message)),
        }
        lap(&self.stats.commit_us, "commit", &mut clock);
        self.stats.set_committed(partition, last + 1);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// What the front stages gave: the checked batch, or `None` when there is none to
    /// process now (a read to retry after a pause, a released partition, a stop); an error
    /// stops the partition.
    async fn ahead_or_halt(
        &self,
        partition: u32,
        checked: Result<Checked, Halt>,
    ) -> Result<Option<Checked>, PipelineError> {
        match checked {
            Ok(batch) => Ok(Some(batch)),
            Err(Halt::Released | Halt::Stopped) => Ok(None),
            Err(Halt::Read(e)) => {
                tracing::warn!(partition, error = %e, "pipeline: reading the log failed; retrying");
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(None)
            }
            Err(Halt::Failed(e)) => Err(e),
        }
    }

    /// The front stages of one batch: read (batch) → validate → dedup check → merge.
    /// `in_flight` holds the keys of the batch being written meanwhile, not yet marked;
    /// records from `replay_end` on are written for the first time (`Pipeline::replay_end`).
    async fn front(
        &self,
        partition: u32,
        batcher: &mut Batcher,
        stream: &mut dyn PartitionStream,
        in_flight: &HashSet<MessageKey<'_>>,
        replay_end: u64,
        stop: &mut Stop,
    ) -> Result<Checked, Halt> {
        let mut clock = std::time::Instant::now();
        match batcher.fill(stream).await {
            Ok(()) => {}
            // Closed, or revoked and cut off: the partition is not ours to read any more.
            Err(LogError::Closed | LogError::Revoked(_)) => return Err(Halt::Released),
            Err(e) if e.is_recoverable() => return Err(Halt::Read(e)),
            Err(e) => return Err(Halt::Failed(stream_error(partition, 0, 0, e.to_string()))),
        }
        // The batch's share of the records in hand; waiting for it counts as reading.
        let share = u32::try_from(batcher.pending().len())
            .unwrap_or(u32::MAX)
            .min(self.budget_total);
        let Ok(budget) = Arc::clone(&self.budget).acquire_many_owned(share).await else {
            return Err(Halt::Stopped);
        };
        lap(&self.stats.read_us, "read", &mut clock);
        let records = batcher.pending();
        let (first, last) = match (records.first(), records.last()) {
            (Some(first), Some(last)) => (first.offset, last.offset),
            _ => return Err(Halt::Released),
        };
        let span = tracing::warn_span!("batch", partition, first, last);
        let checked = AssertUnwindSafe(
            self.check(records, in_flight, replay_end, stop)
                .instrument(span),
        )
        .catch_unwind()
        .await;
        match checked {
            // Counted once the check is complete: a check dropped halfway (the write before it
            // ended first) runs again on the same records.
            Ok(Ok(checked)) => {
                let records = batcher.take_first(checked.size);
                self.stats
                    .records
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                self.stats.duplicates.fetch_add(
                    (checked.valid.len() - checked.fresh.len()) as u64,
                    Ordering::Relaxed,
                );
                Ok(Checked {
                    records,
                    _budget: Some(budget),
                    ..checked
                })
            }
            Ok(Err(Abandon::Stopped)) => Err(Halt::Stopped),
            Ok(Err(Abandon::Fatal(message))) => {
                Err(Halt::Failed(stream_error(partition, first, last, message)))
            }
            Err(panic) => Err(Halt::Failed(panicked(partition, records, panic.as_ref()))),
        }
    }

    /// validate → dedup check → merge, for `records` (the returned batch's `records` are left
    /// empty for the caller to fill).
    async fn check(
        &self,
        records: &[LogRecord],
        in_flight: &HashSet<MessageKey<'_>>,
        replay_end: u64,
        stop: &mut Stop,
    ) -> Result<Checked, Abandon> {
        let mut clock = std::time::Instant::now();
        let mut validated = self
            .policy()
            .retry("validate", stop, || self.validator.validate(records))
            .await?;
        let size = forget_cut(&validated);
        validated.truncate(size);
        let records = &records[..size];
        let now = sluice_model::time::now_ms();
        let mut dead = Vec::new();
        let mut valid = Vec::with_capacity(validated.len());
        for result in validated {
            match result {
                Ok(message) => valid.push(message),
                Err(rejected) => {
                    tracing::warn!(offset = rejected.offset, reason = %rejected.reason, "pipeline: dead letter (validate)");
                    if let Some(record) = record_at(records, rejected.offset) {
                        dead.push(dead_letter::record(
                            Stage::Validate,
                            &rejected.reason,
                            record,
                            now,
                        ));
                    }
                }
            }
        }

        lap(&self.stats.validate_us, "validate", &mut clock);
        // Dedup: drop what was processed before, what the batch being written holds, and
        // repeats within the batch.
        let keys: Vec<MessageKey<'_>> = valid.iter().map(message_key).collect();
        let seen = self
            .policy()
            .retry("check the dedup store", stop, || self.dedup.check(&keys))
            .await?;
        let mut in_batch = HashSet::with_capacity(valid.len());
        let fresh: Vec<usize> = keys
            .iter()
            .zip(seen)
            .enumerate()
            .filter(|(_, (key, seen))| !seen && !in_flight.contains(*key) && in_batch.insert(**key))
            .map(|(i, _)| i)
            .collect();
        lap(&self.stats.dedup_check_us, "dedup", &mut clock);
        let refs: Vec<&ValidMessage> = fresh.iter().map(|&i| &valid[i]).collect();
        let matches = self.config.triggers.matches(&refs);
        let matched: HashSet<usize> = matches.iter().map(|&(_, at)| at).collect();
        let (mut write, snapshots) = merge_batch(&refs, &matched);
        write.unseen = records.first().is_some_and(|r| r.offset >= replay_end);
        lap(&self.stats.merge_us, "merge", &mut clock);
        Ok(Checked {
            records: Vec::new(),
            size,
            valid,
            fresh,
            dead,
            write: Arc::new(write),
            matches,
            snapshots,
            now,
            _budget: None,
        })
    }

    /// The back stages of one checked batch: index write (durable) → dead letters (durable)
    /// → trigger actions → mark processed.
    async fn apply(&self, batch: &Checked, stop: &mut Stop) -> Result<(), Abandon> {
        let mut clock = std::time::Instant::now();
        let fresh = batch.fresh();
        let records = batch.records.as_slice();
        let now = batch.now;
        let mut dead = batch.dead.clone();
        if fresh.is_empty() {
            return self.write_dead_letters(dead, batch.dead.len(), stop).await;
        }
        let write = &self.with_forgotten_emails(&batch.write, stop).await?;
        // Trigger payloads are computed and stashed before the index write changes the
        // profiles they start from (see `trigger`).
        let prepared = self
            .trigger_stage()
            .prepare_actions(&fresh, write, &batch.matches, &batch.snapshots, stop)
            .await?;
        lap(&self.stats.trigger_us, "prepare_actions", &mut clock);
        let (users, events) = (write.users.len() as u64, write.events.len() as u64);
        let outcome = self
            .policy()
            .retry("write to the index", stop, || {
                self.index.write(write.clone())
            })
            .await?;
        metrics::histogram!("sluice_index_bulk_duration_seconds")
            .record(clock.elapsed().as_secs_f64());
        // Messages whose document the index refused: dead letters, and not marked processed,
        // so a replay of the dead letter is processed again.
        let refused_offsets = refused(&outcome.refused, write, &fresh, records, now, &mut dead);
        self.stats
            .users_upserted
            .fetch_add(users, Ordering::Relaxed);
        self.stats
            .events_indexed
            .fetch_add(events, Ordering::Relaxed);
        lap(&self.stats.index_us, "index", &mut clock);
        self.trigger_stage()
            .forget_actions(&write.forgets, now, stop)
            .await?;
        let fired = self
            .trigger_stage()
            .fire_actions(prepared, &refused_offsets, records, now, stop)
            .await?;
        lap(&self.stats.trigger_us, "fire_actions", &mut clock);

        self.write_dead_letters(dead, batch.dead.len(), stop)
            .await?;
        // The batch's messages; a message's mark stands for its actions (see `trigger`).
        let processed: Vec<MessageKey<'_>> = fresh
            .iter()
            .filter(|m| !refused_offsets.contains(&m.offset))
            .map(|m| message_key(m))
            .collect();
        self.policy()
            .retry("mark processed", stop, || self.dedup.mark(&processed))
            .await?;
        let stashed: Vec<MessageKey<'_>> = fired.iter().filter_map(|a| a.stash_key()).collect();
        if !stashed.is_empty() {
            // Only space: a stash left behind expires with the window.
            if let Err(e) = self.dedup.unstash(&stashed).await {
                tracing::warn!(error = %e, "pipeline: cannot drop the payloads of fired actions");
            }
        }
        lap(&self.stats.mark_us, "mark", &mut clock);
        Ok(())
    }

    /// The batch's write, where a user forgotten by id has a profile with an email, with that
    /// email forgotten too: what was written under it (events sent before the user was
    /// identified) belongs to the same person. Read here, in the user's partition after every
    /// earlier message of it was applied, so the profile is the one the forget follows.
    async fn with_forgotten_emails(
        &self,
        write: &Arc<WriteBatch>,
        stop: &mut Stop,
    ) -> Result<Arc<WriteBatch>, Abandon> {
        let by_id: Vec<&Forget> = write
            .forgets
            .iter()
            .filter(|f| f.user_key.starts_with("u:"))
            .collect();
        if by_id.is_empty() {
            return Ok(Arc::clone(write));
        }
        let users: Vec<(&str, &str)> = by_id
            .iter()
            .map(|f| (f.org.as_str(), f.user_key.as_str()))
            .collect();
        let profiles = self
            .policy()
            .retry("read the profiles of forgotten users", stop, || {
                self.index.get_users(&users)
            })
            .await?;
        let mut forgets = write.forgets.clone();
        for (forget, profile) in by_id.into_iter().zip(profiles) {
            let Some(email) = profile.as_ref().and_then(|p| p["email"].as_str()) else {
                continue;
            };
            let user_key = format!("e:{email}");
            if !forgets
                .iter()
                .any(|f| f.org == forget.org && f.user_key == user_key)
            {
                forgets.push(Forget {
                    org: forget.org.clone(),
                    user_key,
                    version: forget.version,
                });
            }
        }
        if forgets.len() == write.forgets.len() {
            return Ok(Arc::clone(write));
        }
        Ok(Arc::new(WriteBatch {
            users: write.users.clone(),
            events: write.events.clone(),
            forgets,
            unseen: write.unseen,
        }))
    }

    /// Appends the batch's dead letters (durable before the batch is committed, like the index
    /// write): the first `validated` of the validate stage, the rest of the index's.
    async fn write_dead_letters(
        &self,
        dead: Vec<sluice_log::Record>,
        validated: usize,
        stop: &mut Stop,
    ) -> Result<(), Abandon> {
        if dead.is_empty() {
            return Ok(());
        }
        let count = dead.len() as u64;
        self.policy()
            .retry("write dead letters", stop, || {
                self.dead_letters.append(dead.clone())
            })
            .await?;
        self.stats.dead_letters.fetch_add(count, Ordering::Relaxed);
        let validated = validated as u64;
        dead_letter::counted(Stage::Validate, validated);
        dead_letter::counted(Stage::Index, count - validated);
        Ok(())
    }

    fn trigger_stage(&self) -> trigger::Context<'_> {
        trigger::Context {
            triggers: &self.config.triggers,
            dedup: self.dedup.as_ref(),
            index: self.index.as_ref(),
            retries: self.policy(),
            fired: &self.stats.actions_fired,
        }
    }

    /// Where the records of `partition` that were in the log when it was assigned end. Those
    /// before it may have been written by an earlier owner (or this process before a restart)
    /// whose batch was not committed; those from it on were appended since, so this owner is
    /// the first to write them, once (the dedup check and the in-flight keys drop repeats).
    /// When the log cannot say, every batch counts as a replay.
    async fn replay_end(&self, partition: u32) -> u64 {
        let asked = tokio::time::timeout(REPLAY_END_TIMEOUT, self.log.end_offset(partition));
        match asked.await {
            Ok(Ok(end)) => end,
            Ok(Err(e)) => {
                tracing::debug!(partition, error = %e, "pipeline: no end offset; every batch of the partition counts as a replay");
                u64::MAX
            }
            Err(_) => {
                tracing::debug!(
                    partition,
                    "pipeline: the end offset took too long; every batch of the partition counts as a replay"
                );
                u64::MAX
            }
        }
    }

    /// How every step of the pipeline retries.
    fn policy(&self) -> Policy<'_> {
        Policy {
            max_delay: self.config.max_retry_delay,
            retries: &self.stats.retries,
        }
    }
}

impl Partitions for Pipeline {
    fn run_partition(
        self: Arc<Self>,
        stream: Box<dyn PartitionStream>,
        stop: Stop,
    ) -> impl std::future::Future<Output = Result<(), PipelineError>> + Send + 'static {
        self.process_partition(stream, stop)
    }
}

/// How many of a batch's validated records to process now: all, or those before the first
/// forget that follows other messages. A forget's index write deletes the user before
/// anything else of its batch is applied, so forgets lead their batch: whatever of the user
/// comes after them in it is written anew, and nothing before them is left out.
fn forget_cut(validated: &[Result<ValidMessage, crate::validate::Rejected>]) -> usize {
    let is_forget = |r: &Result<ValidMessage, _>| matches!(r, Ok(m) if m.kind == Kind::UserDelete);
    let leading = validated.iter().take_while(|r| is_forget(r)).count();
    validated[leading..]
        .iter()
        .position(is_forget)
        .map_or(validated.len(), |at| leading + at)
}

fn message_key(message: &ValidMessage) -> MessageKey<'_> {
    MessageKey {
        org: &message.org.name,
        message_id: &message.message_id,
    }
}

/// The offsets of the messages whose documents the index refused (`refusals`, by position in
/// `write`), each with its dead letter pushed to `dead`.
fn refused(
    refusals: &[Refused],
    write: &WriteBatch,
    fresh: &[&ValidMessage],
    records: &[LogRecord],
    now: i64,
    dead: &mut Vec<sluice_log::Record>,
) -> HashSet<u64> {
    let mut refused_offsets = HashSet::new();
    let offsets_where = |matches: &dyn Fn(&ValidMessage) -> bool| -> Vec<u64> {
        fresh
            .iter()
            .filter(|m| matches(m))
            .map(|m| m.offset)
            .collect()
    };
    for refused in refusals {
        let (offsets, reason): (Vec<u64>, &str) = match refused {
            Refused::User { position, reason } => {
                let user = write.users.get(*position);
                tracing::warn!(
                    org = user.map(|u| u.org.as_str()),
                    user = user.map(|u| u.user_key.as_str()),
                    %reason,
                    "pipeline: dead letter (the index refused the profile)"
                );
                let offsets = offsets_where(&|m| {
                    m.kind == Kind::UserUpdate
                        && user.is_some_and(|u| u.org == m.org.name && u.user_key == m.user_key)
                });
                (offsets, reason)
            }
            Refused::Event { position, reason } => {
                let event = write.events.get(*position);
                tracing::warn!(
                    org = event.map(|e| e.org.as_str()),
                    message_id = event.map(|e| e.message_id.as_str()),
                    %reason,
                    "pipeline: dead letter (the index refused the event)"
                );
                let offsets = offsets_where(&|m| {
                    m.kind == Kind::Event
                        && event
                            .is_some_and(|e| e.org == m.org.name && e.message_id == m.message_id)
                });
                (offsets, reason)
            }
        };
        for offset in offsets {
            if refused_offsets.insert(offset)
                && let Some(record) = record_at(records, offset)
            {
                let reason = format!("the index refused the document: {reason}");
                dead.push(dead_letter::record(Stage::Index, &reason, record, now));
            }
        }
    }
    refused_offsets
}

/// Merge stage output as one index write: one upsert per user (its updates folded in log
/// order) and every event.
pub fn build_write(messages: &[&ValidMessage]) -> WriteBatch {
    merge_batch(messages, &HashSet::new()).0
}

/// `build_write`, and for each event at a position of `snapshot_at` (in `messages`) whose user
/// has updates before it in the batch, those updates folded as an upsert: what the trigger
/// stage applies to the stored profile to get the profile at the event.
pub fn merge_batch(
    messages: &[&ValidMessage],
    snapshot_at: &HashSet<usize>,
) -> (WriteBatch, HashMap<usize, UserUpsert>) {
    let items: Vec<Item<'_, (&str, &str)>> = messages
        .iter()
        .enumerate()
        .map(|(at, m)| {
            let user = (m.org.name.as_str(), m.user_key.as_str());
            match m.kind {
                Kind::UserUpdate => Item::Update {
                    user,
                    patch: parse_patch(m),
                    identity: Identity {
                        user_id: m.user_id.as_deref(),
                        email: m.email.as_deref(),
                        updated_at: m.received_at,
                        version: m.offset + 1,
                    },
                },
                Kind::Event => Item::Event {
                    user,
                    snapshot: snapshot_at.contains(&at),
                },
                Kind::UserDelete => Item::Forget { user },
            }
        })
        .collect();
    let merged = merge(&items);
    let upsert = |(org, user_key): (&str, &str), fold: Fold<'_>, version| UserUpsert {
        org: org.to_owned(),
        user_key: user_key.to_owned(),
        user_id: fold.identity.user_id.map(str::to_owned),
        email: fold.identity.email.map(str::to_owned),
        patch: fold.patch,
        updated_at: fold.identity.updated_at,
        version,
    };
    let snapshots = merged
        .event_snapshots
        .into_iter()
        .filter_map(|(at, fold)| {
            let m = messages[at];
            Some((
                at,
                upsert((m.org.name.as_str(), m.user_key.as_str()), fold?, None),
            ))
        })
        .collect();
    let users = merged
        .updates
        .into_iter()
        .map(|(user, fold)| {
            let version = Some(fold.identity.version);
            upsert(user, fold, version)
        })
        .collect();
    let events = messages
        .iter()
        .filter(|m| m.kind == Kind::Event)
        .map(|m| EventDoc {
            org: m.org.name.clone(),
            message_id: m.message_id.clone(),
            user_key: m.user_key.clone(),
            user_id: m.user_id.clone(),
            email: m.email.clone(),
            event_name: m.event_name.clone().unwrap_or_default(),
            created_at: m.created_at.unwrap_or(m.received_at),
            received_at: m.received_at,
            data_fields: m.data_fields.clone(),
            segment: m.segment.clone(),
        })
        .collect();
    // A forget by id that names the email too forgets what was written under the email.
    let forgets = messages
        .iter()
        .filter(|m| m.kind == Kind::UserDelete)
        .flat_map(|m| {
            let by_email = m
                .email
                .as_ref()
                .filter(|_| m.user_key.starts_with("u:"))
                .map(|email| format!("e:{email}"));
            std::iter::once(m.user_key.clone())
                .chain(by_email)
                .map(|user_key| Forget {
                    org: m.org.name.clone(),
                    user_key,
                    version: m.offset + 1,
                })
        })
        .collect();
    (
        WriteBatch {
            users,
            events,
            forgets,
            unseen: false,
        },
        snapshots,
    )
}

/// The patch of one validated update. Its dataFields text was checked to be a JSON object
/// when the record was validated, so this parse does not fail; if it ever did, the update
/// would count as empty rather than stop the partition.
fn parse_patch(message: &ValidMessage) -> Patch {
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(
        message.data_fields.get(),
    ) {
        Ok(fields) => Patch::from_update(&fields, message.merge_nested_objects),
        Err(e) => {
            tracing::error!(offset = message.offset, error = %e, "pipeline: dataFields of a validated update do not parse");
            Patch::default()
        }
    }
}

/// The message ids at both ends of a batch, `first..last`, for a report about the batch.
fn batch_message_ids(records: &[LogRecord]) -> String {
    #[derive(serde::Deserialize)]
    struct Id<'a> {
        #[serde(rename = "messageId", borrow)]
        message_id: Option<std::borrow::Cow<'a, str>>,
    }
    let id = |record: Option<&LogRecord>| {
        record
            .and_then(|r| serde_json::from_slice::<Id<'_>>(&r.value).ok())
            .and_then(|id| id.message_id)
            .map_or_else(|| "?".to_string(), |id| format!("{id:?}"))
    };
    format!("{}..{}", id(records.first()), id(records.last()))
}

fn stream_error(partition: u32, first: u64, last: u64, message: String) -> PipelineError {
    PipelineError::Stream {
        partition,
        first,
        last,
        message,
    }
}

#[cfg(test)]
mod tests {
    //! `Pipeline::run` end to end on the embedded backends (log, dedup, index, registry):
    //! what one run indexes, dead-letters, drops as a duplicate and commits.

    use std::time::Instant;

    use serde_json::{Value, json};
    use sluice_dedup::EmbeddedDedup;
    use sluice_index::{EmbeddedIndex, EmbeddedIndexConfig};
    use sluice_log::{EmbeddedLog, EmbeddedLogConfig, Record};
    use sluice_registry::{Registry, SqliteRegistry};

    use super::*;
    use crate::stop;

    const PARTITIONS: u32 = 2;

    fn record(user: &str, value: Value) -> Record {
        Record {
            key: format!("acme:u:{user}").into_bytes(),
            value: value.to_string().into_bytes(),
            timestamp_ms: 0,
        }
    }

    fn update(user: &str, id: &str, fields: Value) -> Record {
        record(
            user,
            json!({"v": 1, "kind": "user_update", "org": "acme", "messageId": id, "userId": user,
                   "receivedAt": 1, "dataFields": fields}),
        )
    }

    fn event(user: &str, id: &str) -> Record {
        record(
            user,
            json!({"v": 1, "kind": "event", "org": "acme", "messageId": id, "userId": user,
                   "receivedAt": 1, "eventName": "clicked", "dataFields": {"n": id}}),
        )
    }

    /// Embedded stores in a temp dir, with org `acme`.
    struct Stores {
        dir: tempfile::TempDir,
        log: Arc<EmbeddedLog>,
        dead_letters: Arc<EmbeddedLog>,
        registry: Arc<SqliteRegistry>,
        dedup: Arc<EmbeddedDedup>,
        index: Arc<EmbeddedIndex>,
    }

    impl Stores {
        async fn open() -> Stores {
            let dir = tempfile::tempdir().expect("tempdir");
            let registry = Arc::new(
                SqliteRegistry::open(&dir.path().join("registry.db"))
                    .await
                    .expect("registry"),
            );
            registry.create_org("acme").await.expect("org");
            Stores {
                log: Stores::open_log(&dir, "log"),
                dead_letters: Stores::open_log(&dir, "dlq"),
                registry,
                dedup: Arc::new(
                    EmbeddedDedup::open(&dir.path().join("dedup"), Duration::from_secs(3600))
                        .expect("dedup"),
                ),
                index: Arc::new(
                    EmbeddedIndex::open(EmbeddedIndexConfig::new(dir.path().join("index")))
                        .expect("index"),
                ),
                dir,
            }
        }

        fn open_log(dir: &tempfile::TempDir, name: &str) -> Arc<EmbeddedLog> {
            let config = EmbeddedLogConfig {
                partitions: PARTITIONS,
                ..EmbeddedLogConfig::default()
            };
            Arc::new(EmbeddedLog::open(&dir.path().join(name), config).expect("log"))
        }

        /// A pipeline on these stores: small batches, short retries, `triggers`.
        fn pipeline(&self, triggers: Triggers) -> Arc<Pipeline> {
            Pipeline::new(
                Arc::clone(&self.log) as Arc<dyn Log>,
                Arc::clone(&self.dead_letters) as Arc<dyn Log>,
                Validator::new(
                    Arc::clone(&self.registry) as Arc<dyn Registry>,
                    Duration::from_secs(1),
                ),
                Arc::clone(&self.dedup) as Arc<dyn Dedup>,
                Arc::clone(&self.index) as Arc<dyn Index>,
                PipelineConfig {
                    batch: BatchConfig {
                        max_records: 100,
                        timeout: Duration::from_millis(20),
                    },
                    max_retry_delay: Duration::from_millis(50),
                    triggers,
                    ..PipelineConfig::default()
                },
            )
        }

        /// Waits (20 s at most) until every partition is committed to its end.
        async fn wait_committed_to_the_end(&self) {
            let deadline = Instant::now() + Duration::from_secs(20);
            let done = || {
                (0..PARTITIONS).all(|p| {
                    self.log
                        .committed("sluice-pipeline", p)
                        .expect("committed")
                        .unwrap_or(0)
                        == self.log.end_offset(p).expect("end")
                })
            };
            while !done() {
                assert!(Instant::now() < deadline, "not committed within 20 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    fn forget(user: &str, id: &str) -> Record {
        record(
            user,
            json!({"v": 1, "kind": "user_delete", "org": "acme", "messageId": id, "userId": user,
                   "receivedAt": 1}),
        )
    }

    #[test]
    fn a_forget_leads_its_batch() {
        let kinds = |kinds: &[Kind]| -> Vec<Result<ValidMessage, crate::validate::Rejected>> {
            kinds
                .iter()
                .enumerate()
                .map(|(i, &kind)| {
                    Ok(ValidMessage {
                        offset: i as u64,
                        org: Arc::new(sluice_registry::Org {
                            id: 1,
                            name: "acme".into(),
                            active: true,
                            created_at: 0,
                            sendgrid_key: None,
                            limit: None,
                        }),
                        kind,
                        message_id: format!("m{i}"),
                        user_key: "u:a".into(),
                        user_id: Some("a".into()),
                        email: None,
                        event_name: Some("e".into()),
                        created_at: None,
                        received_at: 0,
                        data_fields: serde_json::value::RawValue::from_string("{}".into())
                            .expect("json"),
                        merge_nested_objects: false,
                        segment: None,
                    })
                })
                .collect()
        };
        use Kind::{Event as E, UserDelete as D, UserUpdate as U};
        assert_eq!(forget_cut(&kinds(&[U, E, U])), 3, "no forget: all");
        assert_eq!(forget_cut(&kinds(&[U, E, D, U])), 2, "up to the forget");
        assert_eq!(
            forget_cut(&kinds(&[D, D, U, E, D])),
            4,
            "leading forgets stay"
        );
        assert_eq!(forget_cut(&kinds(&[D])), 1);
        assert_eq!(forget_cut(&kinds(&[])), 0);
    }

    /// An index whose writes wait until `open` turns true, and which notes each write's events
    /// (message ids) and whether the batch was `unseen`.
    struct Gated {
        inner: Arc<EmbeddedIndex>,
        open: tokio::sync::watch::Receiver<bool>,
        writes: std::sync::Mutex<Vec<(Vec<String>, bool)>>,
    }

    impl Gated {
        fn new(inner: &Arc<EmbeddedIndex>, open: tokio::sync::watch::Receiver<bool>) -> Gated {
            Gated {
                inner: Arc::clone(inner),
                open,
                writes: Default::default(),
            }
        }
    }

    #[async_trait::async_trait]
    impl Index for Gated {
        async fn write(
            &self,
            batch: Arc<WriteBatch>,
        ) -> Result<sluice_index::WriteOutcome, sluice_index::IndexError> {
            let mut open = self.open.clone();
            let _ = open.wait_for(|open| *open).await;
            let ids = batch.events.iter().map(|e| e.message_id.clone()).collect();
            self.writes
                .lock()
                .expect("not poisoned")
                .push((ids, batch.unseen));
            self.inner.write(batch).await
        }
        async fn get_user(
            &self,
            org: &str,
            user_key: &str,
        ) -> Result<Option<Value>, sluice_index::IndexError> {
            self.inner.get_user(org, user_key).await
        }
        async fn get_user_by_email(
            &self,
            org: &str,
            email: &str,
        ) -> Result<Option<Value>, sluice_index::IndexError> {
            self.inner.get_user_by_email(org, email).await
        }
        async fn user_events(
            &self,
            org: &str,
            user_key: &str,
            limit: usize,
        ) -> Result<Vec<Value>, sluice_index::IndexError> {
            self.inner.user_events(org, user_key, limit).await
        }
        async fn search(
            &self,
            org: &str,
            target: sluice_index::Target,
            request: &sluice_index::SearchRequest,
        ) -> Result<sluice_index::SearchResponse, sluice_index::IndexError> {
            self.inner.search(org, target, request).await
        }
        async fn close(&self) -> Result<(), sluice_index::IndexError> {
            self.inner.close().await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_partitions_hold_no_more_records_than_the_budget_while_the_index_is_slow() {
        let stores = Stores::open().await;
        let events: Vec<Record> = (0..600)
            .map(|i| event(&format!("user{i}"), &format!("e{i}")))
            .collect();
        stores.log.append(events).await.expect("append");
        let (open_tx, open) = tokio::sync::watch::channel(false);
        let index = Arc::new(Gated::new(&stores.index, open));
        let mut pipeline = Arc::into_inner(stores.pipeline(Triggers::default())).expect("one");
        pipeline.index = index;
        pipeline.config.max_batches_in_hand = 1;
        let pipeline = Pipeline::new(
            pipeline.log,
            pipeline.dead_letters,
            pipeline.validator,
            pipeline.dedup,
            pipeline.index,
            pipeline.config,
        );
        let stats = pipeline.stats();
        let (stopper, stop) = stop::channel();
        let running = tokio::spawn(pipeline.run(stop));
        // Both partitions have records to spare; with the index closed, one batch of 100 is
        // checked and stuck in its write, and nothing else may be taken in hand. (Without
        // the budget: a batch in write and one ahead per partition, 400 records.)
        tokio::time::sleep(Duration::from_millis(200)).await;
        let deadline = Instant::now() + Duration::from_millis(800);
        while Instant::now() < deadline {
            let held = PipelineStats::get(&stats.records);
            assert!(
                held <= 100,
                "{held} records checked while the index held one batch"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(PipelineStats::get(&stats.records), 100, "one full batch");
        // The budget comes back with each commit: everything gets through.
        open_tx.send_replace(true);
        stores.wait_committed_to_the_end().await;
        assert_eq!(PipelineStats::get(&stats.events_indexed), 600);
        stopper.stop();
        running.await.expect("task").expect("a clean stop");
    }

    /// A crash after the index write and before the commit: the next run reads the batch
    /// again. Records that were in the log when the partition was assigned are written as a
    /// replay (the embedded index looks each event up and replaces it); those appended since
    /// are `unseen` (added without a lookup). Either way each event is in the index once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_from_before_the_assignment_are_written_as_a_replay_and_later_ones_as_unseen() {
        let stores = Stores::open().await;
        let before: Vec<Record> = (0..20)
            .map(|i| event(&format!("user{i}"), &format!("e{i}")))
            .collect();
        stores.log.append(before).await.expect("append");
        // What the run that crashed wrote: the same events, neither marked nor committed.
        let earlier: Vec<EventDoc> = (0..20)
            .map(|i| EventDoc {
                org: "acme".into(),
                message_id: format!("e{i}"),
                user_key: format!("u:user{i}"),
                user_id: Some(format!("user{i}")),
                email: None,
                event_name: "clicked".into(),
                created_at: 1,
                received_at: 1,
                data_fields: serde_json::value::RawValue::from_string("{}".into()).expect("json"),
                segment: None,
            })
            .collect();
        stores
            .index
            .write(Arc::new(WriteBatch {
                events: earlier,
                unseen: true,
                ..WriteBatch::default()
            }))
            .await
            .expect("the earlier run's write");
        assert_eq!(stores.index.doc_counts().1, 20);

        let (_open_tx, open) = tokio::sync::watch::channel(true);
        let index = Arc::new(Gated::new(&stores.index, open));
        let mut pipeline = Arc::into_inner(stores.pipeline(Triggers::default())).expect("one");
        pipeline.index = Arc::clone(&index) as Arc<dyn Index>;
        let pipeline = Arc::new(pipeline);
        let (stopper, stop) = stop::channel();
        let running = tokio::spawn(pipeline.run(stop));
        stores.wait_committed_to_the_end().await;
        let after: Vec<Record> = (20..30)
            .map(|i| event(&format!("user{i}"), &format!("e{i}")))
            .collect();
        stores.log.append(after).await.expect("append");
        stores.wait_committed_to_the_end().await;
        stopper.stop();
        running.await.expect("task").expect("a clean stop");

        assert_eq!(
            stores.index.doc_counts().1,
            30,
            "each event once: the replayed ones replaced what the earlier run wrote"
        );
        let writes = index.writes.lock().expect("not poisoned");
        let number = |id: &String| id[1..].parse::<u32>().expect("e<n>");
        let mut written = 0;
        for (ids, unseen) in writes.iter() {
            for id in ids {
                written += 1;
                assert_eq!(
                    *unseen,
                    number(id) >= 20,
                    "{id} was in the log before the assignment iff it is written as a replay"
                );
            }
        }
        assert_eq!(written, 30);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forget_in_the_middle_of_a_batch_removes_what_came_before_and_keeps_what_follows() {
        let stores = Stores::open().await;
        // One partition's records, read as one batch: the forget cuts it in two.
        stores
            .log
            .append(vec![
                update("a", "a1", json!({"plan": "pro"})),
                event("a", "e1"),
                forget("a", "d1"),
                update("a", "a2", json!({"seen": true})),
                event("a", "e2"),
                event("a", "e1"),
            ])
            .await
            .expect("append");
        let pipeline = stores.pipeline(Triggers::default());
        let (stopper, stop) = stop::channel();
        let running = tokio::spawn(pipeline.run(stop));
        stores.wait_committed_to_the_end().await;
        stopper.stop();
        running.await.expect("task").expect("a clean stop");
        let index = &stores.index;
        let a = index
            .get_user("acme", "u:a")
            .await
            .expect("read")
            .expect("created anew after the forget");
        assert_eq!(a["dataFields"], json!({"seen": true}), "{a}");
        let events = index.user_events("acme", "u:a", 10).await.expect("list");
        let ids: Vec<&str> = events
            .iter()
            .filter_map(|e| e["messageId"].as_str())
            .collect();
        assert_eq!(
            ids,
            ["e2"],
            "e1 before the forget is gone, and sent again after it is still a duplicate"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_run_indexes_folds_dead_letters_drops_duplicates_and_commits_to_the_end() {
        let stores = Stores::open().await;
        let (log, index, dead_letters) = (&stores.log, &stores.index, &stores.dead_letters);
        stores
            .registry
            .ban_user("acme", "banned")
            .await
            .expect("ban");
        log.append(vec![
            update("a", "a1", json!({"plan": "free", "seen": 1})),
            event("a", "e1"),
            update("a", "a2", json!({"plan": "pro"})),
            event("a", "e1"),
            update("b", "b1", json!({"plan": "trial"})),
            event("banned", "x1"),
            record("a", json!("not a record")),
        ])
        .await
        .expect("append");

        let pipeline = stores.pipeline(Triggers::default());
        let stats = pipeline.stats();
        let (stopper, stop) = stop::channel();
        let running = tokio::spawn(pipeline.run(stop));
        stores.wait_committed_to_the_end().await;
        stopper.stop();
        running.await.expect("task").expect("a clean stop");

        let a = index
            .get_user("acme", "u:a")
            .await
            .expect("read")
            .expect("a");
        assert_eq!(
            a["dataFields"],
            json!({"plan": "pro", "seen": 1}),
            "folded in order"
        );
        let b = index
            .get_user("acme", "u:b")
            .await
            .expect("read")
            .expect("b");
        assert_eq!(b["dataFields"], json!({"plan": "trial"}));
        assert!(
            index
                .get_user("acme", "u:banned")
                .await
                .expect("read")
                .is_none()
        );
        let counted = |c: &AtomicU64| PipelineStats::get(c);
        assert_eq!(counted(&stats.records), 7);
        assert_eq!(counted(&stats.duplicates), 1, "e1 twice");
        assert_eq!(counted(&stats.events_indexed), 1);
        assert_eq!(
            counted(&stats.dead_letters),
            2,
            "the banned user and the non-record"
        );
        let mut letters = Vec::new();
        for p in 0..PARTITIONS {
            letters.extend(dead_letters.read(p, 0, 10).expect("read"));
        }
        let reasons: Vec<String> = letters
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_slice(&l.value).expect("json");
                v["reason"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        assert!(reasons.iter().any(|r| r.contains("banned")), "{reasons:?}");
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("not a sluice log record")),
            "{reasons:?}"
        );
    }

    fn signed_up(user: &str, id: &str) -> Record {
        record(
            user,
            json!({"v": 1, "kind": "event", "org": "acme", "messageId": id, "userId": user,
                   "receivedAt": 1, "eventName": "signed_up", "dataFields": {}}),
        )
    }

    /// A crash between the index write and the mark (here: the rule's topic refuses every
    /// append until the pipeline is stopped) leaves the batch's profiles in the index; the
    /// next run fires every action once, each with the profile as it stood at its event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn actions_replayed_after_the_index_write_keep_their_snapshots() {
        let stores = Stores::open().await;
        let (log, index, dedup) = (&stores.log, &stores.index, &stores.dedup);
        log.append(vec![
            update("a", "a1", json!({"plan": "free"})),
            signed_up("a", "e1"),
            update("a", "a2", json!({"plan": "pro", "paid": true})),
            signed_up("a", "e2"),
            signed_up("b", "f1"),
            update("c", "c1", json!({"n": 1})),
            signed_up("c", "f2"),
        ])
        .await
        .expect("append");
        let pipeline = |topic: &Arc<EmbeddedLog>| {
            stores.pipeline(Triggers::new(vec![trigger::Rule {
                name: "welcome".into(),
                event: "signed_up".into(),
                action: trigger::Action::Topic {
                    topic: "welcome".into(),
                    log: Arc::clone(topic) as Arc<dyn Log>,
                },
            }]))
        };
        let plan = || async {
            index
                .get_user("acme", "u:a")
                .await
                .expect("read")
                .map(|a| a["dataFields"]["plan"].clone())
        };

        // First run: the topic is closed, so the batch is indexed and then retried at the
        // append until the stop abandons it (not marked, not committed).
        let closed = Stores::open_log(&stores.dir, "closed-topic");
        closed.close().await.expect("close");
        let (stopper, stop) = stop::channel();
        let running = tokio::spawn(pipeline(&closed).run(stop));
        let deadline = Instant::now() + Duration::from_secs(20);
        while plan().await != Some(json!("pro"))
            || index.get_user("acme", "u:c").await.expect("read").is_none()
        {
            assert!(Instant::now() < deadline, "not indexed within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        stopper.stop();
        let _ = running.await.expect("task");
        for p in 0..PARTITIONS {
            assert_eq!(
                log.committed("sluice-pipeline", p)
                    .expect("committed")
                    .unwrap_or(0),
                0,
                "the first run committed nothing"
            );
        }

        // Second run, the topic open: every action once, with its snapshot.
        let topic = Stores::open_log(&stores.dir, "topic");
        let (stopper, stop) = stop::channel();
        let running = tokio::spawn(pipeline(&topic).run(stop));
        stores.wait_committed_to_the_end().await;
        stopper.stop();
        running.await.expect("task").expect("a clean stop");

        let mut profiles: Vec<(String, Value)> = Vec::new();
        for p in 0..PARTITIONS {
            for action in topic.read(p, 0, 100).expect("read") {
                let payload: Value = serde_json::from_slice(&action.value).expect("json");
                let id = payload["messageId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                profiles.push((id, payload["profile"]["dataFields"].clone()));
            }
        }
        profiles.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            profiles,
            [
                ("e1".to_string(), json!({"plan": "free"})),
                ("e2".to_string(), json!({"plan": "pro", "paid": true})),
                ("f1".to_string(), Value::Null),
                ("f2".to_string(), json!({"n": 1})),
            ],
            "each action once, with the profile at its event (e1 from its stash)"
        );
        let stash = |id: &'static str| sluice_dedup::Stash {
            key: MessageKey {
                org: "acme/welcome",
                message_id: id,
            },
            payload: b"",
            keep: false,
        };
        assert_eq!(
            dedup
                .stash(&[stash("e1"), stash("e2")])
                .await
                .expect("stash"),
            [None, None],
            "the stash of a fired action is dropped"
        );
    }
}
