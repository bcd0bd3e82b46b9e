//! The consumer side of the Kafka log: a consumer-group member with one ordered stream per
//! assigned partition.
//!
//! - One thread per subscription polls the consumer's main queue. librdkafka runs the rebalance
//!   callbacks on that thread, so they may block without stalling the async runtime.
//! - On assign, each partition's queue is split off *before* librdkafka's `assign` runs (in
//!   `pre_rebalance`): a queue split that early is never forwarded back to the main queue, so
//!   every record of the partition arrives on its own stream, in offset order. A record seen on
//!   the main queue anyway would break that promise: the partition is marked broken and the
//!   subscription fails instead of letting a commit skip it.
//! - On revoke (a rebalance or the consumer closing), the callback announces `Revoked`, then
//!   waits until each revoked stream has been dropped, that is until its owner finished or
//!   abandoned its batch and committed, before librdkafka unassigns. A stream still alive after
//!   `revoke_timeout` is cut off: its commits fail with `LogError::Revoked`. A commit already
//!   in flight then gets [`COMMIT_GRACE`] more, never an unbounded wait: librdkafka may hold
//!   that commit until the rebalance this callback blocks is done. If it lands later, it is
//!   still an offset this member had processed up to, so it skips nothing; at worst the
//!   partition's next owner reads some records again, which dedup drops.
//! - A stream cut off that way loses its queue handle at once, in the callback, not when its
//!   owner finally drops it: every handle on a partition's queue is librdkafka's one fetch
//!   queue, and dropping a handle unsets that queue's wake-up callback, so a stale handle
//!   dropped after the partition came back would leave the new stream asleep for good (seen
//!   in CI after a frozen broker: the pipeline never read again).
//! - librdkafka's group state machine can stall: after a frozen coordinator it was seen (in CI
//!   and locally, about one run in four of `tests/spill.rs`) to revoke everything and never
//!   join again, with no error to show for it. Its statistics (every [`STATS_INTERVAL`]) say
//!   whether the membership is settled (state `up`, join state `steady`); one unsettled for
//!   longer than [`stall_timeout`] ends the subscription with a recoverable error, so the
//!   group's runner joins again with a new consumer. Every change of those states is logged.
//! - Offsets are committed only by `PartitionStream::commit`, synchronously (auto-commit and
//!   auto offset store are off); records older than the stream's position are dropped, so the
//!   stream never goes backwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::{Notify, mpsc};

use super::KafkaLogConfig;
use crate::{Assignment, LogError, LogRecord, PartitionStream, Subscription};

type GroupConsumer = BaseConsumer<GroupContext>;

/// How long the poll thread waits for an event before checking whether it should stop.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often librdkafka reports its statistics, the group's state among them.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// How long a membership may stay unsettled before the consumer is replaced, unless
/// configured. A rebalance waits for every member's revoke (at most `revoke_timeout` and
/// [`COMMIT_GRACE`]) and for members that died to time out (`session_timeout`); twice all
/// that, and at least a minute, is a stall, not a rebalance.
pub(super) fn stall_timeout(config: &KafkaLogConfig) -> Duration {
    config.stall_timeout.unwrap_or_else(|| {
        ((config.session_timeout + config.revoke_timeout + COMMIT_GRACE) * 2)
            .max(Duration::from_secs(60))
    })
}

/// Joins `group` and starts the thread that serves its events.
pub(super) fn subscribe(
    config: &KafkaLogConfig,
    group: &str,
    slots: &Slots,
) -> Result<(Box<dyn Subscription>, std::thread::JoinHandle<()>), LogError> {
    let slot = slots.take();
    let instance_id = config.instance_id.as_ref().map(|id| match slot.index {
        0 => id.clone(),
        n => format!("{id}-{}", n + 1),
    });
    let broker_error = |message: String| LogError::Broker {
        brokers: config.brokers.clone(),
        message,
    };
    let (events, receiver) = mpsc::unbounded_channel();
    let context = GroupContext {
        consumer: OnceLock::new(),
        topic: config.topic.clone(),
        brokers: config.brokers.clone(),
        group: group.to_string(),
        events,
        owned: Mutex::new(HashMap::new()),
        revoke_timeout: config.revoke_timeout,
        health: Mutex::new(Health::new(Instant::now())),
        stall_timeout: stall_timeout(config),
    };
    let session_ms = config.session_timeout.as_millis().max(1);
    let mut client = ClientConfig::new();
    if let Some(id) = &instance_id {
        // Static membership (KIP-345): a restarted member with the same id gets its partitions
        // back without a rebalance, and closing does not leave the group.
        client.set("group.instance.id", id);
    }
    if let Ok(debug) = std::env::var("SLUICE_KAFKA_DEBUG") {
        // librdkafka's own debug contexts, e.g. `cgrp,fetch` (logged through tracing).
        client.set("debug", debug);
    }
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A new group starts at the beginning: nothing acknowledged before it joined is skipped.
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", session_ms.to_string())
        .set("heartbeat.interval.ms", (session_ms / 3).max(1).to_string())
        // Prefetch per partition (each has a queue of its own): 4 MiB is three batches of
        // 5,000 typical records. Every partition of a lagging node fills it, so it bounds the
        // node's memory: 16 MiB cost ~100 MB more RSS over 8 partitions (BENCHMARKS.md).
        .set("queued.max.messages.kbytes", "4096")
        .set("fetch.wait.max.ms", "100")
        .set(
            "statistics.interval.ms",
            STATS_INTERVAL.as_millis().to_string(),
        );
    let consumer: GroupConsumer = super::with_options(&mut client, config)
        .create_with_context(context)
        .map_err(|e| broker_error(format!("cannot create a consumer for group {group:?}: {e}")))?;
    let consumer = Arc::new(consumer);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    consumer.subscribe(&[&config.topic]).map_err(|e| {
        broker_error(format!(
            "cannot subscribe group {group:?} to topic {:?}: {e}",
            config.topic
        ))
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name(format!("kafka-group-{group}"))
        .spawn(move || poll_main_queue(consumer, &thread_stop))
        .map_err(|e| broker_error(format!("cannot start the consumer thread: {e}")))?;
    Ok((
        Box::new(KafkaSubscription {
            receiver,
            stop,
            _slot: slot,
        }),
        thread,
    ))
}

/// Instance-id suffixes held by live subscriptions: the first subscription of a log uses the
/// configured id as is, so a restarted node reclaims its static membership.
#[derive(Debug, Default, Clone)]
pub(super) struct Slots(Arc<Mutex<Vec<bool>>>);

impl Slots {
    fn take(&self) -> Slot {
        let mut taken = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let index = taken.iter().position(|t| !t).unwrap_or(taken.len());
        if index == taken.len() {
            taken.push(true);
        } else {
            taken[index] = true;
        }
        Slot {
            slots: self.clone(),
            index,
        }
    }
}

/// A held suffix, freed on drop.
struct Slot {
    slots: Slots,
    index: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self
            .slots
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = taken.get_mut(self.index) {
            *t = false;
        }
    }
}

/// Serves the main queue (rebalances, errors, statistics) until the subscription is dropped.
/// A stalled membership fails the subscription once; the thread keeps serving callbacks
/// until the runner drops the subscription (after its streams), so the consumer is closed
/// here, not by a stream dropped on the async runtime.
fn poll_main_queue(consumer: Arc<GroupConsumer>, stop: &AtomicBool) {
    let context = consumer.context();
    let mut failed = false;
    while !stop.load(Ordering::Acquire) {
        if !failed && let Some(stalled) = context.stalled(Instant::now()) {
            context.fail(stalled);
            failed = true;
        }
        match consumer.poll(POLL_INTERVAL) {
            None => {}
            Some(Ok(message)) => context.unexpected_main_queue_record(&message),
            Some(Err(e)) => {
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    context.fail(format!("fatal consumer error {code:?}: {reason}"));
                    break;
                }
                tracing::warn!(group = %context.group, brokers = %context.brokers, error = %e, "kafka: consumer error (librdkafka retries by itself)");
            }
        }
    }
    tracing::debug!(group = %context.group, "kafka: leaving the consumer group");
    // Dropping the last handle closes the consumer: a final revoke, then (for a dynamic member)
    // LeaveGroup. A static member stays in the group until its session times out, or until it
    // comes back under the same instance id.
}

/// The subscription handed to the pipeline: assignment changes, in order.
struct KafkaSubscription {
    receiver: mpsc::UnboundedReceiver<Assignment>,
    stop: Arc<AtomicBool>,
    _slot: Slot,
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Assignment> {
        self.receiver.recv().await
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// What a stream may still do with its partition.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ownership {
    Owned,
    /// Revoked and not released in time: the stream must not commit.
    Revoked,
    /// A record of the partition bypassed the stream: committing could skip it.
    Broken(String),
}

/// State one partition's stream shares with the rebalance callback.
struct PartitionShared {
    /// Held only to read or change it, never across a call to the broker.
    ownership: Mutex<Ownership>,
    /// Held while a commit is in flight: a revoke waits for it (a while, see
    /// [`COMMIT_GRACE`]) after marking the partition revoked, so no commit starts after it.
    committing: Mutex<()>,
    /// The partition's queue, read by the stream; taken away (and dropped) by a revoke that
    /// cut the stream off (module docs). Held only for a poll that does not wait.
    queue: Mutex<Option<PartitionQueue<GroupContext>>>,
    /// Signalled by librdkafka when the queue becomes non-empty, and by a cut-off.
    ready: Arc<Notify>,
}

/// How long a revoke waits, past `revoke_timeout`, for commits already in flight (one bound
/// for all its partitions). A commit
/// can wait on the coordinator for as long as librdkafka's own rebalance waits on the revoke:
/// waiting for it without a bound deadlocks the consumer (seen with a frozen broker). A commit
/// that lands later is of an offset this member had processed up to: it skips nothing.
const COMMIT_GRACE: Duration = Duration::from_secs(5);

impl PartitionShared {
    /// Waits until `deadline` at most for a commit in flight to end; whether none is in
    /// flight now.
    fn wait_for_commit(&self, deadline: Instant) -> bool {
        loop {
            match self.committing.try_lock() {
                Ok(_) | Err(std::sync::TryLockError::Poisoned(_)) => return true,
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::sync::TryLockError::WouldBlock) => return false,
            }
        }
    }

    fn set(&self, to: Ownership) {
        let mut ownership = self
            .ownership
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *ownership == Ownership::Owned {
            *ownership = to;
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Option<PartitionQueue<GroupContext>>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Cuts a stream off that outlived its revoke: no commits, and no queue handle left to
    /// drop later (module docs).
    fn cut_off(&self) {
        self.set(Ownership::Revoked);
        drop(self.queue().take());
        // A read waiting for records ends with `Revoked` instead.
        self.ready.notify_one();
    }
}

/// The group membership as librdkafka's statistics report it.
#[derive(Debug)]
struct Health {
    /// librdkafka's group state and join state; empty before the first report.
    state: String,
    join_state: String,
    /// When the membership was last seen settled, or when the consumer started.
    settled_at: Instant,
}

impl Health {
    fn new(now: Instant) -> Health {
        Health {
            state: String::new(),
            join_state: String::new(),
            settled_at: now,
        }
    }

    /// Takes a report; whether the states changed.
    fn report(&mut self, state: &str, join_state: &str, now: Instant) -> bool {
        if state == "up" && join_state == "steady" {
            self.settled_at = now;
        }
        let changed = self.state != state || self.join_state != join_state;
        if changed {
            state.clone_into(&mut self.state);
            join_state.clone_into(&mut self.join_state);
        }
        changed
    }

    /// How long the membership has been unsettled, when longer than `timeout`.
    fn stalled_for(&self, now: Instant, timeout: Duration) -> Option<Duration> {
        let unsettled = now.saturating_duration_since(self.settled_at);
        (unsettled > timeout).then_some(unsettled)
    }
}

/// A partition this member owns, as the callback tracks it.
struct Owned {
    shared: Arc<PartitionShared>,
    /// Disconnects when the stream is dropped.
    released: std::sync::mpsc::Receiver<()>,
}

/// The consumer's callbacks: turns rebalances into `Assignment`s.
struct GroupContext {
    /// The consumer itself, to split partition queues in the callbacks.
    consumer: OnceLock<Weak<GroupConsumer>>,
    topic: String,
    brokers: String,
    group: String,
    events: mpsc::UnboundedSender<Assignment>,
    owned: Mutex<HashMap<i32, Owned>>,
    revoke_timeout: Duration,
    health: Mutex<Health>,
    stall_timeout: Duration,
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(cgrp) = statistics.cgrp else {
            return;
        };
        let changed = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .report(&cgrp.state, &cgrp.join_state, Instant::now());
        if changed {
            tracing::info!(
                group = %self.group,
                state = %cgrp.state,
                join_state = %cgrp.join_state,
                assigned = cgrp.assignment_size,
                "kafka: consumer group state"
            );
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &GroupConsumer, rebalance: &Rebalance<'_>) {
        let ours = |list: &TopicPartitionList| -> Vec<i32> {
            list.elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect()
        };
        match rebalance {
            Rebalance::Assign(list) => self.assign(&ours(list)),
            Rebalance::Revoke(list) => self.revoke(&ours(list)),
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "kafka: rebalance error");
            }
        }
    }
}

impl GroupContext {
    fn owned(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Owned>> {
        self.owned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Splits each partition's queue off the main queue and hands out its stream.
    fn assign(&self, partitions: &[i32]) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        for &partition in partitions {
            if let Some(stale) = self.owned().remove(&partition) {
                // An assign without a revoke in between: the old stream must not commit, nor
                // keep a handle on the queue the new one reads.
                stale.shared.cut_off();
            }
            let Some(mut queue) = consumer.split_partition_queue(&self.topic, partition) else {
                self.fail(format!(
                    "cannot split the queue of partition {partition} of topic {:?}",
                    self.topic
                ));
                continue;
            };
            let ready = Arc::new(Notify::new());
            let notify = Arc::clone(&ready);
            queue.set_nonempty_callback(move || notify.notify_one());
            let shared = Arc::new(PartitionShared {
                ownership: Mutex::new(Ownership::Owned),
                committing: Mutex::new(()),
                queue: Mutex::new(Some(queue)),
                ready,
            });
            let (release, released) = std::sync::mpsc::channel();
            self.owned().insert(
                partition,
                Owned {
                    shared: Arc::clone(&shared),
                    released,
                },
            );
            let stream = KafkaPartitionStream {
                _release: release,
                consumer: Arc::clone(&consumer),
                topic: self.topic.clone(),
                partition,
                position: 0,
                shared,
            };
            tracing::info!(group = %self.group, partition, "kafka: partition assigned");
            let _ = self.events.send(Assignment::Assigned(Box::new(stream)));
        }
    }

    /// Announces the revocation, then waits for the streams to be released (their last batch
    /// finished and committed), up to `revoke_timeout` in all.
    fn revoke(&self, partitions: &[i32]) {
        let revoked: Vec<(i32, Owned)> = {
            let mut owned = self.owned();
            partitions
                .iter()
                .filter_map(|p| owned.remove(p).map(|o| (*p, o)))
                .collect()
        };
        for (partition, _) in &revoked {
            let _ = self.events.send(Assignment::Revoked(*partition as u32));
        }
        let deadline = Instant::now() + self.revoke_timeout;
        for (partition, owned) in revoked {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                owned.released.recv_timeout(left)
            {
                tracing::warn!(
                    group = %self.group,
                    partition,
                    timeout = ?self.revoke_timeout,
                    "kafka: a revoked partition was not released in time; its commits are refused from now on"
                );
            }
            owned.shared.cut_off();
            if !owned.shared.wait_for_commit(deadline + COMMIT_GRACE) {
                tracing::warn!(
                    group = %self.group,
                    partition,
                    "kafka: a commit of a revoked partition is still in flight; revoking anyway (it commits only what this member processed)"
                );
            }
            tracing::info!(group = %self.group, partition, "kafka: partition revoked");
        }
    }

    /// Why the membership counts as stalled (module docs), if it does.
    fn stalled(&self, now: Instant) -> Option<String> {
        let health = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let unsettled = health.stalled_for(now, self.stall_timeout)?;
        Some(format!(
            "the membership has not settled for {}s (librdkafka's group state {:?}, join state {:?}); joining again with a new consumer",
            unsettled.as_secs(),
            health.state,
            health.join_state
        ))
    }

    /// A record arrived on the main queue instead of its partition's stream.
    fn unexpected_main_queue_record(&self, message: &BorrowedMessage<'_>) {
        let reason = format!(
            "record at offset {} of partition {} arrived outside its partition stream",
            message.offset(),
            message.partition()
        );
        if let Some(owned) = self.owned().get(&message.partition()) {
            owned.shared.set(Ownership::Broken(reason.clone()));
        }
        self.fail(reason);
    }

    /// Ends the subscription with an error.
    fn fail(&self, message: String) {
        tracing::error!(group = %self.group, brokers = %self.brokers, %message, "kafka: consumer failed");
        let _ = self.events.send(Assignment::Failed(LogError::Broker {
            brokers: self.brokers.clone(),
            message: format!("consumer group {:?}: {message}", self.group),
        }));
    }
}

/// One assigned partition, read from its own queue.
struct KafkaPartitionStream {
    /// Dropped with the stream, first (fields drop in order): tells a waiting revoke that the
    /// partition is released, before the consumer handles below may close the consumer.
    _release: std::sync::mpsc::Sender<()>,
    consumer: Arc<GroupConsumer>,
    topic: String,
    partition: i32,
    /// Offset after the last record returned; 0 until the first.
    position: u64,
    shared: Arc<PartitionShared>,
}

impl KafkaPartitionStream {
    fn check_owned(&self) -> Result<(), LogError> {
        let ownership = self
            .shared
            .ownership
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ownership_result(&ownership, self.partition)
    }

    fn broker_error(&self, message: String) -> LogError {
        LogError::Broker {
            brokers: self.consumer.context().brokers.clone(),
            message,
        }
    }
}

impl Drop for KafkaPartitionStream {
    fn drop(&mut self) {
        // The queue handle holds the consumer: left in the callback's map, it would keep the
        // consumer from closing.
        drop(self.shared.queue().take());
    }
}

fn ownership_result(ownership: &Ownership, partition: i32) -> Result<(), LogError> {
    match ownership {
        Ownership::Owned => Ok(()),
        Ownership::Revoked => Err(LogError::Revoked(partition as u32)),
        Ownership::Broken(reason) => Err(LogError::Unexpected(reason.clone())),
    }
}

#[async_trait]
impl PartitionStream for KafkaPartitionStream {
    fn partition(&self) -> u32 {
        self.partition as u32
    }

    fn position(&self) -> u64 {
        self.position
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<LogRecord>, LogError> {
        loop {
            self.check_owned()?;
            // Everything below runs without an await until it returns, so dropping this future
            // never loses a record taken off the queue.
            let mut records = Vec::new();
            let mut error = None;
            {
                let queue = self.shared.queue();
                let Some(queue) = queue.as_ref() else {
                    return Err(LogError::Revoked(self.partition as u32));
                };
                while records.len() < max.max(1) {
                    match queue.poll(Duration::ZERO) {
                        None => break,
                        Some(Ok(message)) => {
                            let offset = message.offset().max(0) as u64;
                            if offset < self.position {
                                tracing::debug!(
                                    partition = self.partition,
                                    offset,
                                    position = self.position,
                                    "kafka: dropped a record behind the stream's position"
                                );
                                continue;
                            }
                            self.position = offset + 1;
                            records.push(LogRecord {
                                partition: self.partition as u32,
                                offset,
                                timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
                                key: Bytes::copy_from_slice(message.key().unwrap_or_default()),
                                value: Bytes::copy_from_slice(
                                    message.payload().unwrap_or_default(),
                                ),
                            });
                        }
                        Some(Err(e)) => {
                            error = Some(e);
                            break;
                        }
                    }
                }
            }
            if !records.is_empty() {
                return Ok(records);
            }
            if let Some(e) = error {
                return Err(self.broker_error(format!(
                    "reading partition {} of {:?}: {e}",
                    self.partition, self.topic
                )));
            }
            self.shared.ready.notified().await;
        }
    }

    async fn commit(&mut self, next_offset: u64) -> Result<(), LogError> {
        let consumer = Arc::clone(&self.consumer);
        let shared = Arc::clone(&self.shared);
        let (topic, partition) = (self.topic.clone(), self.partition);
        let result = tokio::task::spawn_blocking(move || {
            let _committing = shared
                .committing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            {
                let ownership = shared
                    .ownership
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                ownership_result(&ownership, partition)?;
            }
            let mut list = TopicPartitionList::new();
            list.add_partition_offset(&topic, partition, Offset::Offset(next_offset as i64))
                .map_err(|e| commit_error(&consumer, partition, next_offset, &e))?;
            consumer
                .commit(&list, CommitMode::Sync)
                .map_err(|e| commit_error(&consumer, partition, next_offset, &e))
        })
        .await;
        match result {
            Ok(result) => result,
            Err(e) => Err(self.broker_error(format!("commit task failed: {e}"))),
        }
    }
}

fn commit_error(
    consumer: &GroupConsumer,
    partition: i32,
    offset: u64,
    error: &KafkaError,
) -> LogError {
    let context = consumer.context();
    LogError::Broker {
        brokers: context.brokers.clone(),
        message: format!(
            "cannot commit offset {offset} of partition {partition} for group {:?}: {error}",
            context.group
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    #[test]
    fn a_membership_unsettled_for_longer_than_the_stall_timeout_is_stalled() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut health = Health::new(start);
        // Joining takes a while: not stalled until the timeout has passed.
        assert!(health.report("wait-coord", "init", at(1)));
        assert!(health.report("up", "wait-join", at(2)));
        assert_eq!(health.stalled_for(at(60), TIMEOUT), None);
        assert!(health.report("up", "steady", at(61)));
        // Settled: the clock restarts at every steady report, changed or not.
        assert!(!health.report("up", "steady", at(100)));
        assert_eq!(health.stalled_for(at(150), TIMEOUT), None);
        // A session timeout, then a rejoin that never ends.
        assert!(health.report("up", "wait-unassign-to-complete", at(101)));
        assert!(health.report("up", "init", at(105)));
        assert!(!health.report("up", "init", at(150)));
        assert_eq!(health.stalled_for(at(160), TIMEOUT), None);
        assert_eq!(
            health.stalled_for(at(161), TIMEOUT),
            Some(Duration::from_secs(61))
        );
        // A coordinator that is down keeps it unsettled though the join state is steady.
        let mut health = Health::new(start);
        health.report("up", "steady", at(1));
        health.report("wait-coord", "steady", at(2));
        assert!(health.stalled_for(at(62), TIMEOUT).is_some());
    }

    #[test]
    fn the_stall_timeout_outlasts_a_rebalance_and_is_at_least_a_minute() {
        let mut config = KafkaLogConfig::new("127.0.0.1:9092", "t");
        // Defaults: a 10 s session and a 30 s revoke.
        assert_eq!(stall_timeout(&config), Duration::from_secs(90));
        config.session_timeout = Duration::from_secs(1);
        config.revoke_timeout = Duration::from_secs(1);
        assert_eq!(stall_timeout(&config), Duration::from_secs(60));
        config.stall_timeout = Some(Duration::from_secs(5));
        assert_eq!(stall_timeout(&config), Duration::from_secs(5));
    }

    /// A real consumer whose broker refuses every connection never settles: once the stall
    /// timeout has passed, its subscription ends with a recoverable error that says so, for
    /// the group's runner to join again with a new consumer.
    #[tokio::test]
    async fn a_consumer_that_never_settles_ends_its_subscription_with_a_recoverable_error() {
        use sluice_model::Recoverable;
        let refused = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let mut config = KafkaLogConfig::new(refused.to_string(), "t");
        config.stall_timeout = Some(Duration::from_secs(3));
        let (mut subscription, thread) =
            subscribe(&config, "g", &Slots::default()).expect("a consumer");
        let started = Instant::now();
        let next = tokio::time::timeout(Duration::from_secs(30), subscription.next())
            .await
            .expect("the subscription ends within 30 s");
        let Some(Assignment::Failed(error)) = next else {
            panic!("expected a failure, got an assignment");
        };
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "not before the timeout"
        );
        assert!(error.is_recoverable(), "{error}");
        assert!(error.to_string().contains("has not settled"), "{error}");
        drop(subscription);
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join")
            .expect("the poll thread ends once the subscription is dropped");
    }
}
