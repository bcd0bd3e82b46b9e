//! The action dispatcher (SPEC §6): delivers the webhook actions the trigger stage appended to
//! the actions log, so a slow or down target never holds the pipeline's commits.
//!
//! An action record is keyed like its event (`<org>:<userKey>`, so one user's actions share a
//! partition) and its value is the webhook body: the trigger stage's payload, which names its
//! `rule` and `idempotencyKey`. Records of `topic` rules may share the topic; the dispatcher
//! leaves them alone.
//!
//! Protocol, per owned partition of the actions log (a consumer group of its own):
//! 1. read up to `batch_size` records: a window;
//! 2. group them by key: each user's actions are delivered one after another in log order
//!    (so in order per (rule, user)), up to `concurrency` users at once;
//! 3. each action: a rule that is no longer a configured webhook, or an action older than
//!    `action_max_age` (by its record's timestamp), is a dead letter; otherwise it is POSTed
//!    with its `Idempotency-Key` until the target answers 2xx (delivered) or another 4xx
//!    than 408/409/425/429 (a dead letter with the answer). Any other failure (5xx, those
//!    4xx, a timeout, no connection) is retried after the target host's gate opens;
//!    A forgotten user's actions are dropped, not sent (`crate::forgotten`): those before the
//!    user's last forget marker in the window, and, before each attempt, those appended
//!    before a forget this process's pipeline processed;
//! 4. the window's dead letters are appended to the dead-letter log, then its end is
//!    committed. A stop or a crash before the commit delivers the window again (at least
//!    once): a repeat carries the same `Idempotency-Key`.
//!
//! Hosts: every target host has a gate. A failed call closes it for an exponentially growing,
//! jittered delay (from 50 ms up to `max_retry_delay`); when it reopens, the first call to
//! come through probes while the others wait again, and the probe's success opens it for all.
//! A dead host thus gets one call per delay, not one per pending action.

use sluice_model::Recoverable;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use sluice_log::{Log, LogError, LogRecord, PartitionStream, Record};
use tokio::sync::Notify;

use crate::stop::Stop;
use tokio::time::Instant;

use crate::dead_letter::{self, Stage};
use crate::error::PipelineError;
use crate::group::{self, Committed, Group, Partitions};
use crate::retry::{Abandon, FIRST_DELAY, Retrier, retry};
use crate::trigger::{Action, Triggers, Url, WebhookError, count_actions};

/// Settings of the dispatcher.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Its consumer group on the actions log.
    pub group: String,
    /// Records read per window.
    pub batch_size: usize,
    /// Users whose actions are in flight at once, per partition.
    pub concurrency: usize,
    /// An action older than this is a dead letter instead of a call.
    pub action_max_age: Duration,
    /// Longest wait between two attempts (of a call, an append, a commit).
    pub max_retry_delay: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            group: "sluice-dispatcher".into(),
            batch_size: 1000,
            concurrency: 64,
            action_max_age: Duration::from_secs(24 * 3600),
            max_retry_delay: Duration::from_secs(5),
        }
    }
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct DispatchStats {
    /// Actions their target took (2xx).
    pub delivered: AtomicU64,
    /// Calls that failed and are tried again.
    pub retried: AtomicU64,
    /// Actions refused by their target, too old, or of a rule no longer configured.
    pub dead_letters: AtomicU64,
    /// Appends and commits retried after a recoverable log error.
    pub log_retries: AtomicU64,
    /// Consumer-group memberships rejoined.
    pub rejoins: AtomicU64,
    /// Actions dropped, never sent: their user was forgotten.
    pub forgotten: AtomicU64,
}

impl DispatchStats {
    /// The counters as Prometheus samples: (name, type, help, value).
    pub fn metrics(&self) -> Vec<(&'static str, &'static str, &'static str, f64)> {
        let counter = |name, help, value: &AtomicU64| {
            (name, "counter", help, value.load(Ordering::Relaxed) as f64)
        };
        vec![
            counter(
                "sluice_actions_delivered_total",
                "webhook actions their target took (2xx) since start",
                &self.delivered,
            ),
            counter(
                "sluice_action_retries_total",
                "webhook calls that failed and are tried again since start",
                &self.retried,
            ),
            counter(
                "sluice_action_dead_letters_total",
                "webhook actions refused by their target, too old, or of a rule no longer configured (dead letters) since start",
                &self.dead_letters,
            ),
            counter(
                "sluice_actions_forgotten_total",
                "webhook actions dropped unsent because their user was forgotten, since start",
                &self.forgotten,
            ),
            counter(
                "sluice_dispatcher_rejoins_total",
                "dispatcher consumer-group memberships rejoined since start",
                &self.rejoins,
            ),
        ]
    }
}

/// Where a webhook rule's actions go.
struct Target {
    url: Url,
    gate: Arc<Gate>,
}

/// Delivers the webhook actions of the actions log.
pub struct Dispatcher {
    actions: Arc<dyn Log>,
    dead_letters: Arc<dyn Log>,
    triggers: Triggers,
    /// Webhook rules by name.
    targets: HashMap<String, Target>,
    config: DispatcherConfig,
    stats: Arc<DispatchStats>,
}

/// What the dispatcher reads of an action record.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    rule: Cow<'a, str>,
    #[serde(rename = "idempotencyKey", borrow)]
    idempotency_key: Cow<'a, str>,
}

impl Dispatcher {
    /// A dispatcher of `triggers`' webhook rules, reading `actions`, refusing into
    /// `dead_letters`.
    pub fn new(
        actions: Arc<dyn Log>,
        dead_letters: Arc<dyn Log>,
        triggers: Triggers,
        config: DispatcherConfig,
    ) -> Arc<Dispatcher> {
        let mut gates: HashMap<String, Arc<Gate>> = HashMap::new();
        let mut targets = HashMap::new();
        for rule in triggers.rules() {
            let Action::Webhook(url) = &rule.action else {
                continue;
            };
            let host = format!(
                "{}:{}",
                url.host_str().unwrap_or_default(),
                url.port_or_known_default().unwrap_or_default()
            );
            let gate = gates
                .entry(host)
                .or_insert_with(|| Arc::new(Gate::new(config.max_retry_delay)));
            targets.insert(
                rule.name.clone(),
                Target {
                    url: url.clone(),
                    gate: Arc::clone(gate),
                },
            );
        }
        Arc::new(Dispatcher {
            actions,
            dead_letters,
            triggers,
            targets,
            config,
            stats: Arc::default(),
        })
    }

    pub fn stats(&self) -> Arc<DispatchStats> {
        Arc::clone(&self.stats)
    }

    /// Delivers actions as a member of its group until `stop` turns true or a partition
    /// fails (a bug: the module docs' steps never give up on a recoverable error).
    pub async fn run(self: Arc<Self>, stop: Stop) -> Result<(), PipelineError> {
        let actions = Arc::clone(&self.actions);
        let group = Group {
            log: actions.as_ref(),
            name: &self.config.group,
            max_pause: self.config.max_retry_delay,
            rejoins: &self.stats.rejoins,
        };
        group.run(Arc::clone(&self), stop).await
    }

    fn retrier(&self) -> Retrier<'_> {
        Retrier::new(self.config.max_retry_delay, &self.stats.log_retries)
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
            "dispatcher: partition assigned"
        );
        let mut reads = self.retrier();
        loop {
            let read = tokio::select! {
                biased;
                _ = stop.requested() => return Ok(()),
                read = stream.next_batch(self.config.batch_size) => read,
            };
            let records = match read {
                Ok(records) if records.is_empty() => continue,
                Ok(records) => records,
                Err(LogError::Revoked(_)) => return Ok(()),
                Err(e) if e.is_recoverable() => {
                    match reads.wait(&mut stop, "read actions", &e).await {
                        Ok(()) => continue,
                        Err(_) => return Ok(()),
                    }
                }
                Err(e) => return Err(stream_error(partition, &[], format!("read: {e}"))),
            };
            reads = self.retrier();
            let next = records.last().map_or(0, |r| r.offset + 1);
            match self.window(&records, &mut stop).await {
                Ok(()) => {}
                Err(Abandon::Stopped) => return Ok(()),
                Err(Abandon::Fatal(message)) => {
                    return Err(stream_error(partition, &records, message));
                }
            }
            match group::commit(stream.as_mut(), next, self.retrier(), &mut stop).await {
                Ok(Committed::Done) => {}
                // Revoked: the next owner delivers the window again.
                Ok(Committed::Revoked | Committed::Stopped) => return Ok(()),
                Err(message) => return Err(stream_error(partition, &records, message)),
            }
        }
    }

    /// Steps 2–4 of the module docs for one window, but the commit.
    async fn window(&self, records: &[LogRecord], stop: &mut Stop) -> Result<(), Abandon> {
        let mut users: Vec<Vec<usize>> = Vec::new();
        let mut slot_of: HashMap<&[u8], usize> = HashMap::new();
        for (at, record) in records.iter().enumerate() {
            let slot = *slot_of.entry(&record.key[..]).or_insert_with(|| {
                users.push(Vec::new());
                users.len() - 1
            });
            if crate::forgotten::is_marker(&record.value) {
                // The user was forgotten: what came before in the window is not sent.
                for dropped in users[slot].drain(..) {
                    self.forgotten(&records[dropped]);
                }
            } else {
                users[slot].push(at);
            }
        }
        let outcomes: Vec<Result<Vec<Record>, Abandon>> =
            futures_util::stream::iter(users.into_iter().map(|actions| {
                let mut stop = stop.clone();
                async move {
                    let mut dead = Vec::new();
                    for at in actions {
                        dead.extend(self.deliver(&records[at], &mut stop).await?);
                    }
                    Ok(dead)
                }
            }))
            .buffer_unordered(self.config.concurrency.max(1))
            .collect()
            .await;
        let mut dead = Vec::new();
        for outcome in outcomes {
            dead.extend(outcome?);
        }
        if dead.is_empty() {
            return Ok(());
        }
        let count = dead.len() as u64;
        retry(
            self.retrier(),
            "append refused actions to the dead-letter log",
            stop,
            || self.dead_letters.append(dead.clone()),
        )
        .await?;
        self.stats.dead_letters.fetch_add(count, Ordering::Relaxed);
        dead_letter::counted(Stage::Trigger, count);
        Ok(())
    }

    /// Drops an action of a forgotten user.
    fn forgotten(&self, record: &LogRecord) {
        let rule = serde_json::from_slice::<Head<'_>>(&record.value)
            .map(|head| head.rule.into_owned())
            .unwrap_or_else(|_| "?".into());
        self.stats.forgotten.fetch_add(1, Ordering::Relaxed);
        count_actions(&rule, "forgotten", 1);
        tracing::info!(
            partition = record.partition,
            offset = record.offset,
            rule,
            "dispatcher: an action of a forgotten user dropped"
        );
    }

    /// One action: delivered (`None`), or its dead letter.
    async fn deliver(
        &self,
        record: &LogRecord,
        stop: &mut Stop,
    ) -> Result<Option<Record>, Abandon> {
        let refuse = |rule: &str, reason: String| {
            count_actions(rule, "dead_lettered", 1);
            tracing::warn!(
                partition = record.partition,
                offset = record.offset,
                rule,
                %reason,
                "dispatcher: dead letter"
            );
            Some(dead_letter::action_record(
                rule,
                &reason,
                record,
                &record.value,
                sluice_model::time::now_ms(),
            ))
        };
        let head: Head<'_> = match serde_json::from_slice(&record.value) {
            Ok(head) => head,
            Err(e) => return Ok(refuse("?", format!("not an action record: {e}"))),
        };
        let rule = head.rule.as_ref();
        let Some(target) = self.targets.get(rule) else {
            if self.triggers.rules().iter().any(|r| r.name == rule) {
                // A `topic` rule's record: that topic is where it is delivered.
                return Ok(None);
            }
            return Ok(refuse(
                rule,
                format!("trigger {rule:?} is not a configured webhook rule any more"),
            ));
        };
        let max_age = self.config.action_max_age;
        loop {
            let age_ms = sluice_model::time::now_ms().saturating_sub(record.timestamp_ms);
            if age_ms > max_age.as_millis() as i64 {
                return Ok(refuse(
                    rule,
                    format!(
                        "the action is {:?} old, older than action_max_age ({max_age:?}); not sent",
                        Duration::from_millis(age_ms as u64)
                    ),
                ));
            }
            target.gate.wait_turn(stop).await?;
            // Checked at each turn: the user may have been forgotten while the call waited.
            if self
                .triggers
                .forgotten()
                .drops(&record.key, record.timestamp_ms)
            {
                self.forgotten(record);
                return Ok(None);
            }
            match self
                .triggers
                .send(&target.url, &head.idempotency_key, &record.value)
                .await
            {
                Ok(()) => {
                    target.gate.opened();
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    count_actions(rule, "delivered", 1);
                    return Ok(None);
                }
                Err(WebhookError::Refused(reason)) => {
                    target.gate.opened();
                    return Ok(refuse(rule, reason));
                }
                Err(WebhookError::Failed(error)) => {
                    let delay = target.gate.failed();
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    count_actions(rule, "retried", 1);
                    tracing::warn!(rule, %error, retry_in = ?delay, "dispatcher: webhook call failed");
                }
            }
        }
    }
}

impl Partitions for Dispatcher {
    fn run_partition(
        self: Arc<Self>,
        stream: Box<dyn PartitionStream>,
        stop: Stop,
    ) -> impl std::future::Future<Output = Result<(), PipelineError>> + Send + 'static {
        self.process_partition(stream, stop)
    }
}

fn stream_error(partition: u32, records: &[LogRecord], message: String) -> PipelineError {
    PipelineError::Stream {
        partition,
        first: records.first().map_or(0, |r| r.offset),
        last: records.last().map_or(0, |r| r.offset),
        message,
    }
}

/// A target host's gate (module docs, "Hosts").
struct Gate {
    state: std::sync::Mutex<GateState>,
    reopened: Notify,
    max_delay: Duration,
}

struct GateState {
    /// Failed calls in a row.
    failures: u32,
    /// Closed until then.
    closed_until: Option<Instant>,
    delays: backon::ExponentialBackoff,
}

impl Gate {
    fn new(max_delay: Duration) -> Gate {
        Gate {
            state: std::sync::Mutex::new(GateState {
                failures: 0,
                closed_until: None,
                delays: Gate::delays(max_delay),
            }),
            reopened: Notify::new(),
            max_delay,
        }
    }

    fn delays(max: Duration) -> backon::ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(FIRST_DELAY)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times()
            .build()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until a call may go: the gate is open, or it reopened and this call is the probe
    /// (the others then wait for the probe's outcome or the next delay).
    async fn wait_turn(&self, stop: &mut Stop) -> Result<(), Abandon> {
        loop {
            let reopened = self.reopened.notified();
            let until = {
                let mut state = self.state();
                let now = Instant::now();
                match state.closed_until {
                    Some(until) if until > now => until,
                    _ => {
                        if state.failures > 0 {
                            let delay = state.delays.next().unwrap_or(self.max_delay);
                            state.closed_until = Some(now + delay);
                        }
                        return Ok(());
                    }
                }
            };
            tokio::select! {
                biased;
                _ = stop.requested() => return Err(Abandon::Stopped),
                () = reopened => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// A call got an answer: the host is up.
    fn opened(&self) {
        let mut state = self.state();
        if state.failures == 0 {
            return;
        }
        state.failures = 0;
        state.closed_until = None;
        state.delays = Gate::delays(self.max_delay);
        drop(state);
        self.reopened.notify_waiters();
    }

    /// A call failed: closes the gate for the next delay, which it returns.
    fn failed(&self) -> Duration {
        let mut state = self.state();
        state.failures += 1;
        let delay = state.delays.next().unwrap_or(self.max_delay);
        state.closed_until = Some(Instant::now() + delay);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stop;

    fn gate() -> Arc<Gate> {
        Arc::new(Gate::new(Duration::from_secs(2)))
    }

    fn record(offset: u64, key: &str, value: &[u8]) -> LogRecord {
        LogRecord {
            partition: 0,
            offset,
            timestamp_ms: sluice_model::time::now_ms(),
            key: bytes::Bytes::from(key.as_bytes().to_vec()),
            value: bytes::Bytes::from(value.to_vec()),
        }
    }

    #[tokio::test]
    async fn a_window_drops_the_actions_before_their_users_forget_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |name: &str| -> Arc<dyn Log> {
            Arc::new(
                sluice_log::EmbeddedLog::open(
                    &dir.path().join(name),
                    sluice_log::EmbeddedLogConfig::default(),
                )
                .expect("log"),
            )
        };
        let (actions, dead) = (open("actions"), open("dlq"));
        let url = "http://127.0.0.1:9/welcome".parse().expect("url");
        let triggers = Triggers::new(vec![crate::trigger::Rule {
            name: "welcome".into(),
            event: "signedUp".into(),
            action: Action::Webhook(url),
        }]);
        let dispatcher = Dispatcher::new(
            actions,
            Arc::clone(&dead),
            triggers,
            DispatcherConfig::default(),
        );
        let action = |id: &str| {
            serde_json::json!({"rule": "welcome", "idempotencyKey": id})
                .to_string()
                .into_bytes()
        };
        let forget = sluice_index::Forget {
            org: "acme".into(),
            user_key: "u:1".into(),
            version: 1,
        };
        let marker = crate::forgotten::markers(&[forget], 0).remove(0).value;
        let records = vec![
            record(0, "acme:u:1", &action("a")),
            record(1, "acme:u:1", &action("b")),
            record(2, "acme:u:1", &marker),
        ];
        let (_tx, mut stop) = stop::channel();
        // Nothing listens on port 9: an action that was not dropped would be retried forever.
        tokio::time::timeout(
            Duration::from_secs(5),
            dispatcher.window(&records, &mut stop),
        )
        .await
        .expect("every action dropped, none sent")
        .unwrap_or_else(|_| panic!("the window failed"));
        assert_eq!(dispatcher.stats.forgotten.load(Ordering::Relaxed), 2);
        assert_eq!(dispatcher.stats.dead_letters.load(Ordering::Relaxed), 0);
        let ends = dead.end_offsets().await.expect("ends");
        assert!(ends.iter().all(|&end| end == 0), "no dead letter: {ends:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_gate_lets_every_call_through() {
        let gate = gate();
        let (_tx, mut stop) = stop::channel();
        let started = Instant::now();
        for _ in 0..3 {
            assert!(gate.wait_turn(&mut stop).await.is_ok());
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_host_gets_one_probe_per_delay_and_its_recovery_opens_it_for_all() {
        let gate = gate();
        let (_tx, stop) = stop::channel();
        let delay = gate.failed();
        assert!(delay <= Duration::from_millis(100), "{delay:?}");
        // Three callers wait; the first through after the delay is the probe.
        let through = Arc::new(AtomicU64::new(0));
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let (gate, through, mut stop) = (gate.clone(), through.clone(), stop.clone());
            waiters.push(tokio::spawn(async move {
                gate.wait_turn(&mut stop)
                    .await
                    .map_err(|_| ())
                    .expect("no stop");
                through.fetch_add(1, Ordering::SeqCst);
            }));
        }
        tokio::time::sleep(delay + Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(through.load(Ordering::SeqCst), 1, "one probe");
        // The probe fails again: the next delay is longer, still one probe.
        let second = gate.failed();
        tokio::time::sleep(second + Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(through.load(Ordering::SeqCst), 2, "one probe per delay");
        // The probe succeeds: every waiter goes at once.
        gate.opened();
        for waiter in waiters {
            waiter.await.expect("waiter");
        }
        assert_eq!(through.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_a_wait_at_a_closed_gate() {
        let gate = gate();
        let (tx, mut stop) = stop::channel();
        gate.failed();
        gate.wait_turn(&mut stop)
            .await
            .map_err(|_| ())
            .expect("probe");
        let waiting = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.wait_turn(&mut stop).await.is_err() })
        };
        tx.stop();
        assert!(waiting.await.expect("task"), "stopped");
    }
}
