//! The trigger stage (SPEC §6 step 7): configured rules fire an action for each matching
//! event, at least once, with the idempotency key `<org>:<messageId>:<rule>`.
//!
//! An action is a record: on the actions log (a `webhook` rule: the dispatcher, `dispatch`,
//! POSTs it with header `Idempotency-Key`) or on the rule's own topic (a `topic` rule), keyed
//! like the event's record. Its value, the payload, carries the event and the user's profile
//! as it stood at that event in log order: the profile stored before the batch with the fold of
//! the user's earlier updates in the batch applied (the merge stage's snapshot). No call leaves
//! this stage, so a slow or down webhook target never holds the batch.
//!
//! How a crash keeps both "at least once" and "the right snapshot" (the runner drives this):
//! 1. before the index write, the payload of each action whose user has an update *later in
//!    the batch* than its event is *stashed* in the dedup store under `(<org>/<rule>,
//!    messageId)`; every other action only looks a stash up. An action that finds one uses
//!    it: it was computed before any write of an earlier attempt reached the index;
//! 2. the index is written, then the actions are appended (durably) to their logs;
//! 3. the batch's messages are marked, then the stashes of the appended actions dropped; then
//!    the offset is committed.
//!
//! A redelivered message was not marked, so its actions were not known to be appended: they
//! are appended again (at least once), with the same idempotency key and the same snapshot.
//! The snapshot is the same because either it was stashed, or the user had no update after
//! the event in the batch an earlier attempt wrote: then the stored profile is the one before
//! that batch with at most the updates before the event applied, and applying those again
//! changes nothing (patches are idempotent, `sluice_model::patch`). A message's mark stands
//! for its actions too: they are appended before it is marked, and never for a message the
//! index refused (which is not marked). `/` cannot occur in an org name, so stash keys never
//! meet a message's own.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sluice_dedup::{Dedup, MessageKey, Stash};
use sluice_index::{EventDoc, EventSource, Index, UserUpsert, WriteBatch, profile_after};
use sluice_log::{Log, LogRecord, Record};

use crate::batch::record_at;
use crate::retry::{Abandon, Policy};
use crate::stop::Stop;
use crate::validate::ValidMessage;

pub use reqwest::Url;

/// One `[[triggers]]` rule.
#[derive(Clone)]
pub struct Rule {
    /// Names the rule in idempotency keys and marks: `[A-Za-z0-9_.-]{1,64}`.
    pub name: String,
    /// The `eventName` it matches.
    pub event: String,
    pub action: Action,
}

/// What a rule does for each matching event.
#[derive(Clone)]
pub enum Action {
    /// POST the payload to this URL.
    Webhook(Url),
    /// Append the payload as a record to this topic, through this log.
    Topic { topic: String, log: Arc<dyn Log> },
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let action = match &self.action {
            Action::Webhook(url) => {
                format!("webhook {}", sluice_model::url::redacted(url.as_str()))
            }
            Action::Topic { topic, .. } => format!("topic {topic}"),
        };
        write!(f, "{} ({} → {action})", self.name, self.event)
    }
}

/// Whether a rule name is usable in keys: `[A-Za-z0-9_.-]{1,64}`.
pub fn valid_rule_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The rules, the log their webhook actions go to, and the HTTP client that delivers them.
#[derive(Clone)]
pub struct Triggers {
    rules: Vec<Rule>,
    http: reqwest::Client,
    /// The actions log, which the dispatcher reads: needed by webhook rules.
    actions: Option<Arc<dyn Log>>,
    /// Users the pipeline of this process forgot, for the dispatcher sharing these triggers.
    forgotten: Arc<crate::forgotten::Forgotten>,
}

impl std::fmt::Debug for Triggers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Triggers")
            .field("rules", &self.rules)
            .field("actions log", &self.actions.is_some())
            .finish()
    }
}

impl Default for Triggers {
    fn default() -> Self {
        Triggers::new(Vec::new())
    }
}

/// How long one webhook call may take before it counts as failed (and is retried).
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

impl Triggers {
    pub fn new(rules: Vec<Rule>) -> Triggers {
        // Redirects are not followed: a POST turned into a GET would not deliver the action.
        let http = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot configure the webhook client; using defaults");
                reqwest::Client::new()
            });
        Triggers {
            rules,
            http,
            actions: None,
            forgotten: Arc::default(),
        }
    }

    /// The users forgotten in this process (shared by every clone of these triggers).
    pub fn forgotten(&self) -> &crate::forgotten::Forgotten {
        &self.forgotten
    }

    /// The same rules, their webhook actions appended to `actions` (the dispatcher's log).
    pub fn with_actions_log(mut self, actions: Arc<dyn Log>) -> Triggers {
        self.actions = Some(actions);
        self
    }

    /// The log webhook actions are appended to, if one was given.
    pub fn actions_log(&self) -> Option<&Arc<dyn Log>> {
        self.actions.as_ref()
    }

    /// Whether some rule is a webhook (and so needs the actions log and a dispatcher).
    pub fn has_webhooks(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.action, Action::Webhook(_)))
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Every (rule, position in `messages`) an event matches, in log order.
    pub(crate) fn matches(&self, messages: &[&ValidMessage]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        if self.rules.is_empty() {
            return out;
        }
        for (position, message) in messages.iter().enumerate() {
            let Some(event) = message.event_name.as_deref() else {
                continue;
            };
            for (rule, r) in self.rules.iter().enumerate() {
                if r.event == event {
                    out.push((rule, position));
                }
            }
        }
        out
    }

    /// POSTs one action. `Ok` on 2xx.
    pub async fn send(
        &self,
        url: &Url,
        idempotency_key: &str,
        payload: &[u8],
    ) -> Result<(), WebhookError> {
        let target = sluice_model::url::redacted(url.as_str());
        let answer = self
            .http
            .post(url.clone())
            .header("content-type", "application/json")
            .header("idempotency-key", idempotency_key)
            .body(payload.to_vec())
            .send()
            .await
            .map_err(|e| WebhookError::Failed(format!("POST {target}: {}", chain(&e))))?;
        let status = answer.status();
        if status.is_success() {
            return Ok(());
        }
        let body = answer.bytes().await.unwrap_or_default();
        let excerpt = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        let message = format!("POST {target} answered {status}: {excerpt}");
        let retriable =
            status.is_server_error() || matches!(status.as_u16(), 408 | 409 | 425 | 429);
        Err(if retriable {
            WebhookError::Failed(message)
        } else {
            WebhookError::Refused(message)
        })
    }
}

/// Why a webhook call did not deliver.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The target could not be reached, timed out, or answered a status worth retrying.
    #[error("{0}")]
    Failed(String),
    /// The target refused the action (a 4xx other than 408/409/425/429, or a redirect).
    #[error("{0}")]
    Refused(String),
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// The pseudo-org of a rule's stash: `<org>/<rule>`.
pub(crate) fn stash_org(org: &str, rule: &str) -> String {
    format!("{org}/{rule}")
}

/// `<org>:<messageId>:<rule>`.
pub fn idempotency_key(org: &str, message_id: &str, rule: &str) -> String {
    format!("{org}:{message_id}:{rule}")
}

/// What an action delivers (the webhook body, the topic record's value).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Payload<'a> {
    v: u8,
    rule: &'a str,
    idempotency_key: &'a str,
    org: &'a str,
    message_id: &'a str,
    event: EventSource<'a>,
    /// The profile as it stood at the event; `null` if the user had none yet.
    profile: Option<&'a Value>,
}

/// The payload of `rule` for `event`, with `profile` as it stood at the event.
pub(crate) fn payload(
    rule: &str,
    idempotency_key: &str,
    event: &EventDoc,
    profile: Option<&Value>,
) -> Vec<u8> {
    let payload = Payload {
        v: 1,
        rule,
        idempotency_key,
        org: &event.org,
        message_id: &event.message_id,
        event: EventSource::public(event),
        profile,
    };
    // Strings, integers, a JSON value and valid raw JSON always serialize.
    serde_json::to_vec(&payload).unwrap_or_default()
}

/// An action ready to fire, with the payload it fires with.
pub(crate) struct Prepared<'a> {
    rule: usize,
    message: &'a ValidMessage,
    /// `<org>/<rule>`: the org of its stash.
    stash_org: String,
    payload: Vec<u8>,
    /// Whether its payload is in the stash (to drop once it fired).
    stashed: bool,
}

impl Prepared<'_> {
    /// Its stash's key, if its payload is stashed.
    pub(crate) fn stash_key(&self) -> Option<MessageKey<'_>> {
        self.stashed.then_some(MessageKey {
            org: &self.stash_org,
            message_id: &self.message.message_id,
        })
    }
}

/// What the trigger stage works with: the rules, the stores it reads and stashes in, and the
/// counters it adds to (borrowed from the pipeline for one batch).
pub(crate) struct Context<'p> {
    pub triggers: &'p Triggers,
    pub dedup: &'p dyn Dedup,
    pub index: &'p dyn Index,
    pub retries: Policy<'p>,
    pub fired: &'p AtomicU64,
}

impl Context<'_> {
    /// Step 1 of the module docs, before the index write: the actions of `fresh`, each with
    /// its payload: the one stashed by an earlier attempt, or one computed now (and stashed
    /// when the user has a later update in the batch).
    pub(crate) async fn prepare_actions<'a>(
        &self,
        fresh: &[&'a ValidMessage],
        write: &WriteBatch,
        matches: &[(usize, usize)],
        snapshots: &HashMap<usize, UserUpsert>,
        stop: &mut Stop,
    ) -> Result<Vec<Prepared<'a>>, Abandon> {
        if matches.is_empty() {
            return Ok(Vec::new());
        }
        let rules = self.triggers.rules();
        let user = |m: &'a ValidMessage| (m.org.name.as_str(), m.user_key.as_str());

        // The profiles before this batch, of every user with an action to fire.
        let mut users: Vec<(&str, &str)> = matches.iter().map(|&(_, at)| user(fresh[at])).collect();
        users.sort_unstable();
        users.dedup();
        let profiles = self
            .retries
            .retry("read profiles for triggers", stop, || {
                self.index.get_users(&users)
            })
            .await?;
        // A user the batch forgets has no stored profile for its events: the forget is
        // applied first and leads the batch (see `runner::forget_cut`).
        let forgotten: std::collections::HashSet<(&str, &str)> = write
            .forgets
            .iter()
            .map(|f| (f.org.as_str(), f.user_key.as_str()))
            .collect();
        let stored: HashMap<(&str, &str), Option<Value>> = users
            .into_iter()
            .zip(profiles)
            .map(|(user, profile)| (user, profile.filter(|_| !forgotten.contains(&user))))
            .collect();
        // Each user's last update in the batch: an action before it is stashed.
        let last_update: HashMap<(&str, &str), usize> = fresh
            .iter()
            .enumerate()
            .filter(|(_, m)| m.kind == sluice_model::Kind::UserUpdate)
            .map(|(at, m)| (user(m), at))
            .collect();
        // The merge stage's event documents are the batch's events in order.
        let mut event_docs = write.events.iter();
        let event_at: HashMap<usize, &EventDoc> = fresh
            .iter()
            .enumerate()
            .filter(|(_, m)| m.kind == sluice_model::Kind::Event)
            .filter_map(|(at, _)| Some((at, event_docs.next()?)))
            .collect();

        let mut prepared = Vec::with_capacity(matches.len());
        for &(rule, at) in matches {
            let message = fresh[at];
            let Some(event) = event_at.get(&at) else {
                continue;
            };
            let before = stored.get(&user(message)).cloned().flatten();
            // The stored profile, with the user's updates earlier in the batch applied.
            let profile = match snapshots.get(&at) {
                Some(upsert) => Some(profile_after(before, upsert)),
                None => before,
            };
            let rule_name = &rules[rule].name;
            let key = idempotency_key(&message.org.name, &message.message_id, rule_name);
            prepared.push(Prepared {
                rule,
                message,
                stash_org: stash_org(&message.org.name, rule_name),
                payload: payload(rule_name, &key, event, profile.as_ref()),
                stashed: last_update
                    .get(&user(message))
                    .is_some_and(|&last| last > at),
            });
        }
        let entries: Vec<Stash<'_>> = prepared
            .iter()
            .map(|p| Stash {
                key: MessageKey {
                    org: &p.stash_org,
                    message_id: &p.message.message_id,
                },
                payload: &p.payload,
                keep: p.stashed,
            })
            .collect();
        let found = self
            .retries
            .retry("stash trigger payloads", stop, || {
                self.dedup.stash(&entries)
            })
            .await?;
        drop(entries);
        for (p, earlier) in prepared.iter_mut().zip(found) {
            if let Some(payload) = earlier {
                p.payload = payload;
                p.stashed = true;
            }
        }
        Ok(prepared)
    }

    /// The batch forgets users: their pending actions are dropped (`forgotten`): a marker
    /// per user goes to the actions log behind their actions, and this process's dispatcher
    /// learns of it at once.
    pub(crate) async fn forget_actions(
        &self,
        forgets: &[sluice_index::Forget],
        now: i64,
        stop: &mut Stop,
    ) -> Result<(), Abandon> {
        if forgets.is_empty() {
            return Ok(());
        }
        if let Some(actions) = &self.triggers.actions {
            let markers = crate::forgotten::markers(forgets, now);
            self.retries
                .retry("append forget markers to the actions log", stop, || {
                    actions.append(markers.clone())
                })
                .await?;
        }
        self.triggers.forgotten.note(forgets, now);
        Ok(())
    }

    /// Step 2: appends every prepared action whose message was not refused by the index to
    /// its log: one append per log, in log order (so one user's actions there stay in order).
    /// Returns the actions appended, whose stashes are to be dropped once their messages are
    /// marked.
    pub(crate) async fn fire_actions<'a>(
        &self,
        prepared: Vec<Prepared<'a>>,
        refused: &HashSet<u64>,
        records: &[LogRecord],
        now: i64,
        stop: &mut Stop,
    ) -> Result<Vec<Prepared<'a>>, Abandon> {
        let triggers = self.triggers;
        let rules = triggers.rules();
        let mut prepared: Vec<Prepared<'a>> = prepared
            .into_iter()
            .filter(|p| !refused.contains(&p.message.offset))
            .collect();
        if prepared.is_empty() {
            return Ok(prepared);
        }
        let record = |p: &mut Prepared<'_>| Record {
            key: record_at(records, p.message.offset)
                .map(|r| r.key.to_vec())
                .unwrap_or_default(),
            value: std::mem::take(&mut p.payload),
            timestamp_ms: now,
        };

        // One append per log (a rule's topic, or the actions log of the webhook rules), each
        // in log order.
        let mut appends: Vec<(&Arc<dyn Log>, &Rule, Vec<Record>)> = Vec::new();
        for p in &mut prepared {
            let rule = &rules[p.rule];
            let log = match (&rule.action, &triggers.actions) {
                (Action::Topic { log, .. }, _) => log,
                (Action::Webhook(_), Some(actions)) => actions,
                (Action::Webhook(_), None) => {
                    return Err(Abandon::Fatal(format!(
                        "rule {} is a webhook rule, but the pipeline has no actions log",
                        rule.name
                    )));
                }
            };
            match appends.iter_mut().find(|(l, ..)| Arc::ptr_eq(l, log)) {
                Some((_, _, batch)) => batch.push(record(p)),
                None => appends.push((log, rule, vec![record(p)])),
            }
        }
        for (log, rule, batch) in appends {
            let what = match &rule.action {
                Action::Topic { topic, .. } => format!("append actions to topic {topic}"),
                Action::Webhook(_) => "append webhook actions to the actions log".to_string(),
            };
            self.retries
                .retry(&what, stop, || log.append(batch.clone()))
                .await?;
        }
        // Counted by rule once all are appended (webhook rules share the actions log).
        let mut fired = vec![0u64; rules.len()];
        for p in &prepared {
            fired[p.rule] += 1;
        }
        for (rule, count) in rules.iter().zip(fired) {
            if count > 0 {
                count_actions(&rule.name, "fired", count);
                if let Action::Topic { .. } = rule.action {
                    // A topic rule's action is done once in its topic.
                    count_actions(&rule.name, "delivered", count);
                }
            }
        }
        self.fired
            .fetch_add(prepared.len() as u64, Ordering::Relaxed);
        Ok(prepared)
    }
}

/// The outcomes of the actions of one rule in this process (for `/stats`).
#[derive(Default, Clone, Copy)]
struct Outcomes {
    fired: u64,
    delivered: u64,
    retried: u64,
    dead_lettered: u64,
}

static OUTCOMES: std::sync::Mutex<std::collections::BTreeMap<String, Outcomes>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// `sluice_actions_total{rule, outcome}` += `count`, and the same in [`outcomes`].
pub(crate) fn count_actions(rule: &str, outcome: &'static str, count: u64) {
    metrics::counter!("sluice_actions_total", "rule" => rule.to_string(), "outcome" => outcome)
        .increment(count);
    let mut all = OUTCOMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let tally = match all.get_mut(rule) {
        Some(tally) => tally,
        None => all.entry(rule.to_string()).or_default(),
    };
    match outcome {
        "fired" => tally.fired += count,
        "delivered" => tally.delivered += count,
        "retried" => tally.retried += count,
        // Dropped: the user was forgotten (counted by the metric only).
        "forgotten" => {}
        _ => tally.dead_lettered += count,
    }
}

/// Actions by rule in this process, for `/stats`: `[{"rule", "pending", "fired",
/// "delivered", "retried", "dead_lettered"}]`. `pending` is fired and not yet delivered or
/// dead-lettered; it is exact where one process fires and delivers (`serve`, or one ingest
/// node), and a lower bound when the dispatchers of other nodes deliver some.
pub fn outcomes() -> serde_json::Value {
    let all = OUTCOMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    all.iter()
        .map(|(rule, o)| {
            serde_json::json!({
                "rule": rule,
                "pending": o.fired.saturating_sub(o.delivered + o.dead_lettered),
                "fired": o.fired,
                "delivered": o.delivered,
                "retried": o.retried,
                "dead_lettered": o.dead_lettered,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_names_are_key_safe() {
        assert!(valid_rule_name("welcome-email"));
        assert!(valid_rule_name("a.b_c-1"));
        for bad in ["", "a/b", "a:b", "a b", &"x".repeat(65)] {
            assert!(!valid_rule_name(bad), "{bad:?}");
        }
    }
}
