//! Dead letters (SPEC §6): a message the pipeline will not process, because validation refused
//! it (unknown or disabled org, banned user, malformed fields) or the index refused its
//! document, becomes a record of the dead-letter log: the Kafka topic `sluice.dlq`, or the
//! embedded log under `<data_dir>/dlq`. The record keeps the original key (so dead letters are
//! partitioned like the messages they hold) and its value says what failed, where and when,
//! with the original record:
//!
//! ```json
//! {"v":1,"stage":"validate","reason":"user u:42 is banned in org acme","failedAt":1700000000000,
//!  "source":{"partition":3,"offset":1234},"org":"acme","messageId":"m-1","record":{...}}
//! ```
//!
//! `record` is the original value as JSON, or as a string when it was not JSON. A refused
//! action's letter (`"stage":"trigger"`) also has its `rule` and `action` (the webhook body).
//!
//! This module owns the format: it writes letters, reads them back ([`letters`]), and replays
//! them ([`Session::replay`]). A letter's ID is `<partition>-<offset>` in the dead-letter log.
//! Replaying a `validate` or `index` letter appends its original record, unchanged, to the
//! ingest log: the pipeline processes it like any message (its dedup mark was never set).
//! Replaying a `trigger` letter sends the action again, as its rule is configured now, with
//! the same `Idempotency-Key`. The log is append-only, so a replay is recorded as a marker
//! record in the dead-letter log, `{"v":1,"replayed":ID,"at":...}`: a letter with a marker is
//! `replayed`, and `replay --all` skips it.

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sluice_log::{Log, LogError, LogRecord, Record};

use crate::trigger::{Action, Triggers, WebhookError};

/// Which stage refused the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Validate,
    Index,
    /// A trigger's webhook refused the action.
    Trigger,
}

impl Stage {
    /// As in the record (`validate`, `index`, `trigger`).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Validate => "validate",
            Stage::Index => "index",
            Stage::Trigger => "trigger",
        }
    }
}

/// How many letters of each stage this process wrote, and the latest it made: what `/stats`
/// shows (the letters themselves are in the dead-letter log).
struct Tally {
    by_stage: [u64; 3],
    /// Newest last, at most [`LATEST`].
    latest: VecDeque<serde_json::Value>,
}

/// How many of the latest letters [`tally`] keeps.
pub const LATEST: usize = 10;

static TALLY: Mutex<Tally> = Mutex::new(Tally {
    by_stage: [0; 3],
    latest: VecDeque::new(),
});

fn tally_lock() -> std::sync::MutexGuard<'static, Tally> {
    TALLY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts `count` letters of `stage` written: `sluice_dead_letters_total{stage}` and
/// [`tally`].
pub fn counted(stage: Stage, count: u64) {
    if count == 0 {
        return;
    }
    metrics::counter!("sluice_dead_letters_total", "stage" => stage.name()).increment(count);
    tally_lock().by_stage[stage as usize] += count;
}

/// This process's letters: `{"total", "by_stage": {stage: n}, "latest": [letter, newest
/// first]}`, each latest letter with its stage, reason, where it came from and when.
pub fn tally() -> serde_json::Value {
    let tally = tally_lock();
    let by_stage: serde_json::Map<String, serde_json::Value> =
        [Stage::Validate, Stage::Index, Stage::Trigger]
            .into_iter()
            .map(|stage| {
                (
                    stage.name().to_string(),
                    tally.by_stage[stage as usize].into(),
                )
            })
            .collect();
    serde_json::json!({
        "total": tally.by_stage.iter().sum::<u64>(),
        "by_stage": by_stage,
        "latest": tally.latest.iter().rev().collect::<Vec<_>>(),
    })
}

/// Keeps what `/stats` shows of a letter just made.
fn note(value: &Value<'_>) {
    let mut reason = value.reason.to_string();
    if reason.len() > 300 {
        let mut cut = 300;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push('…');
    }
    let shown = serde_json::json!({
        "stage": value.stage,
        "reason": reason,
        "failedAt": value.failed_at,
        "partition": value.source.partition,
        "offset": value.source.offset,
        "org": value.org,
        "messageId": value.message_id,
        "rule": value.rule,
    });
    let mut tally = tally_lock();
    if tally.latest.len() == LATEST {
        tally.latest.pop_front();
    }
    tally.latest.push_back(shown);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub partition: u32,
    pub offset: u64,
}

#[derive(Serialize)]
struct Value<'a> {
    v: u8,
    stage: Stage,
    reason: &'a str,
    #[serde(rename = "failedAt")]
    failed_at: i64,
    source: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    org: Option<Cow<'a, str>>,
    #[serde(rename = "messageId", skip_serializing_if = "Option::is_none")]
    message_id: Option<Cow<'a, str>>,
    record: Original<'a>,
    /// `trigger` only: the rule, and the action's payload (the webhook body).
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'a RawValue>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Original<'a> {
    Json(&'a RawValue),
    Text(Cow<'a, str>),
}

/// What the dead letter can tell about the message even when the rest of it is invalid.
#[derive(Deserialize, Default)]
struct Ids<'a> {
    #[serde(borrow, default)]
    org: Option<Cow<'a, str>>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<Cow<'a, str>>,
}

/// The dead-letter record of `source`, refused by `stage` for `reason` at `now_ms`.
pub fn record(stage: Stage, reason: &str, source: &LogRecord, now_ms: i64) -> Record {
    build(stage, reason, source, now_ms, None)
}

/// The dead-letter record of an action of `rule` for `source` that its target refused.
pub fn action_record(
    rule: &str,
    reason: &str,
    source: &LogRecord,
    payload: &[u8],
    now_ms: i64,
) -> Record {
    let action = serde_json::from_slice::<&RawValue>(payload).ok();
    build(Stage::Trigger, reason, source, now_ms, Some((rule, action)))
}

fn build(
    stage: Stage,
    reason: &str,
    source: &LogRecord,
    now_ms: i64,
    action: Option<(&str, Option<&RawValue>)>,
) -> Record {
    let original = match serde_json::from_slice::<&RawValue>(&source.value) {
        Ok(raw) => Original::Json(raw),
        Err(_) => Original::Text(String::from_utf8_lossy(&source.value)),
    };
    let ids: Ids<'_> = serde_json::from_slice(&source.value).unwrap_or_default();
    let value = Value {
        v: 1,
        stage,
        reason,
        failed_at: now_ms,
        source: Source {
            partition: source.partition,
            offset: source.offset,
        },
        org: ids.org,
        message_id: ids.message_id,
        record: original,
        rule: action.map(|(rule, _)| rule),
        action: action.and_then(|(_, payload)| payload),
    };
    note(&value);
    Record {
        key: source.key.to_vec(),
        // Serializing strings, integers and valid raw JSON into a Vec does not fail; if it
        // ever did, the reason alone still says what happened.
        value: serde_json::to_vec(&value)
            .unwrap_or_else(|e| format!("{{\"v\":1,\"reason\":{:?}}}", e.to_string()).into_bytes()),
        timestamp_ms: now_ms,
    }
}

/// A dead-letter log record as stored: a letter, or the marker of a replay.
#[derive(Deserialize)]
struct Stored {
    #[serde(default)]
    stage: Option<Stage>,
    #[serde(default)]
    record: Option<Box<RawValue>>,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    action: Option<Box<RawValue>>,
    /// A replay marker: the ID of the letter replayed.
    #[serde(default)]
    replayed: Option<String>,
}

/// A dead letter read back.
#[derive(Debug)]
pub struct Letter {
    /// `<partition>-<offset>` in the dead-letter log.
    pub id: String,
    pub key: Vec<u8>,
    /// The whole stored JSON.
    pub value: Box<RawValue>,
    pub stage: Stage,
    record: Option<Box<RawValue>>,
    rule: Option<String>,
    action: Option<Box<RawValue>>,
    /// A replay marker names it.
    pub replayed: bool,
}

impl Letter {
    /// The stored letter with its `id` and `replayed`, as `sluice dlq list --json` shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value: serde_json::Value =
            serde_json::from_str(self.value.get()).unwrap_or(serde_json::Value::Null);
        if let Some(map) = value.as_object_mut() {
            map.insert("id".into(), self.id.clone().into());
            map.insert("replayed".into(), self.replayed.into());
        }
        value
    }

    /// The original record, to append to the ingest log again.
    fn original(&self, now_ms: i64) -> Result<Record, ReplayError> {
        let record = self
            .record
            .as_ref()
            .ok_or_else(|| ReplayError::Incomplete {
                id: self.id.clone(),
                missing: "the original record",
            })?;
        // The JSON as stored, or the text of a value that was not JSON.
        let value = match serde_json::from_str::<String>(record.get()) {
            Ok(text) => text.into_bytes(),
            Err(_) => record.get().as_bytes().to_vec(),
        };
        Ok(Record {
            key: self.key.clone(),
            value,
            timestamp_ms: now_ms,
        })
    }

    fn replay_marker(&self, now_ms: i64) -> Record {
        replay_marker(self.key.clone(), &self.id, now_ms)
    }
}

/// The record that says letter `id` (under `key`) was replayed.
fn replay_marker(key: Vec<u8>, id: &str, now_ms: i64) -> Record {
    Record {
        key,
        value: serde_json::json!({"v": 1, "replayed": id, "at": now_ms})
            .to_string()
            .into_bytes(),
        timestamp_ms: now_ms,
    }
}

/// How many records one read asks for.
const READ_CHUNK: usize = 10_000;

/// The records of `partition` before `end`, oldest first.
async fn read_partition(
    dlq: &dyn Log,
    partition: u32,
    end: u64,
) -> Result<Vec<LogRecord>, ReplayError> {
    let mut records = Vec::new();
    let mut from = 0;
    while from < end {
        let read = match dlq.read(partition, from, READ_CHUNK).await {
            Ok(read) => read,
            // Kafka answers a timeout when there is nothing at all to read.
            Err(LogError::Timeout(_)) if from == 0 => Vec::new(),
            Err(source) => return Err(ReplayError::Read { partition, source }),
        };
        let Some(last) = read.last() else { break };
        from = last.offset + 1;
        records.extend(read.into_iter().filter(|r| r.offset < end));
    }
    Ok(records)
}

/// Every dead letter of `dlq`, oldest first per partition, with whether it was replayed.
/// Records that are not dead letters are skipped with a warning.
pub async fn letters(dlq: &dyn Log) -> Result<Vec<Letter>, ReplayError> {
    let mut letters = Vec::new();
    let mut replayed = HashSet::new();
    for partition in 0..dlq.partitions() {
        for record in read_partition(dlq, partition, u64::MAX).await? {
            let id = format!("{}-{}", record.partition, record.offset);
            let decoded = serde_json::from_slice::<Box<RawValue>>(&record.value)
                .and_then(|raw| Ok((serde_json::from_str::<Stored>(raw.get())?, raw)));
            let (stored, value) = match decoded {
                Ok(decoded) => decoded,
                Err(e) => {
                    tracing::warn!(%id, error = %e, "skipping a dead-letter record that is not a dead letter");
                    continue;
                }
            };
            if let Some(of) = stored.replayed {
                replayed.insert(of);
                continue;
            }
            let Some(stage) = stored.stage else {
                tracing::warn!(%id, "skipping a dead-letter record with no stage");
                continue;
            };
            letters.push(Letter {
                id,
                key: record.key.to_vec(),
                value,
                stage,
                record: stored.record,
                rule: stored.rule,
                action: stored.action,
                replayed: false,
            });
        }
    }
    for letter in &mut letters {
        letter.replayed = replayed.contains(&letter.id);
    }
    Ok(letters)
}

/// What a purge did.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReport {
    /// The user's dead letters deleted.
    pub purged: usize,
    /// Other records of the same partitions, written again (with new IDs) before the old
    /// ones were deleted.
    pub kept: usize,
}

/// Deletes every dead letter whose key is `key` (`<org>:<userKey>`: a forgotten user's) from
/// `dlq`, and the markers of their replays. A log only deletes a partition's oldest records, so
/// in each partition that holds such a letter, every other record before the partition's end
/// is first appended again (letters keep their content, get new IDs; a replayed one gets a
/// new marker), and only then is everything before that end deleted: a crash in between
/// leaves copies, never a loss. Records appended meanwhile are after the end and untouched.
pub async fn purge(dlq: &dyn Log, key: &[u8]) -> Result<PurgeReport, ReplayError> {
    let ends = dlq
        .end_offsets()
        .await
        .map_err(|source| ReplayError::Read {
            partition: 0,
            source,
        })?;
    let mut report = PurgeReport::default();
    for (partition, &end) in (0..dlq.partitions()).zip(&ends) {
        let records = read_partition(dlq, partition, end).await?;
        if !records.iter().any(|r| r.key[..] == *key) {
            continue;
        }
        // Each record once: the user's go, replay markers are made again below under the
        // kept letters' new IDs, the rest is appended again.
        let mut replayed = HashSet::new();
        let (mut old_ids, mut kept) = (Vec::new(), Vec::new());
        for record in &records {
            let marks = serde_json::from_slice::<Stored>(&record.value)
                .ok()
                .and_then(|s| s.replayed);
            match marks {
                Some(_) if record.key[..] == *key => {}
                Some(of) => {
                    replayed.insert(of);
                }
                None if record.key[..] == *key => report.purged += 1,
                None => {
                    old_ids.push(format!("{}-{}", record.partition, record.offset));
                    kept.push(Record {
                        key: record.key.to_vec(),
                        value: record.value.to_vec(),
                        timestamp_ms: record.timestamp_ms,
                    });
                }
            }
        }
        let keys: Vec<Vec<u8>> = kept.iter().map(|r| r.key.clone()).collect();
        let count = kept.len();
        let acks = dlq.append(kept).await.map_err(ReplayError::Append)?;
        let now = sluice_model::time::now_ms();
        let markers: Vec<Record> = old_ids
            .iter()
            .zip(keys)
            .zip(&acks)
            .filter(|((old, _), _)| replayed.contains(*old))
            .map(|((_, key), ack)| {
                replay_marker(key, &format!("{}-{}", ack.partition, ack.offset), now)
            })
            .collect();
        if !markers.is_empty() {
            dlq.append(markers).await.map_err(ReplayError::Marker)?;
        }
        dlq.delete_before(partition, end)
            .await
            .map_err(|source| ReplayError::Purge { partition, source })?;
        report.kept += count;
    }
    Ok(report)
}

/// What a replay did.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Letters replayed.
    pub letters: usize,
    /// Original records appended to the ingest log.
    pub messages: usize,
    /// Refused actions sent again.
    pub actions: usize,
}

/// Why a replay did not happen, or not all of it.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The request names no letter, or one that does not exist.
    #[error("{0}")]
    Usage(String),
    #[error("cannot read dead letters of partition {partition}: {source}")]
    Read { partition: u32, source: LogError },
    #[error("dead letter {id} has no {missing} to replay")]
    Incomplete { id: String, missing: &'static str },
    #[error("dead letter {id}: trigger {rule:?} is not in the configuration any more")]
    NoSuchRule { id: String, rule: String },
    #[error("dead letter {id}: trigger {rule}: {source}")]
    Send {
        id: String,
        rule: String,
        source: WebhookError,
    },
    #[error("dead letter {id}: cannot append to topic {topic}: {source}")]
    Topic {
        id: String,
        topic: String,
        source: LogError,
    },
    #[error("cannot append the replayed messages to the log: {0}")]
    Append(LogError),
    #[error("replayed, but cannot record the replay in the dead-letter log: {0}")]
    Marker(LogError),
    #[error("cannot delete the purged dead letters of partition {partition}: {source}")]
    Purge { partition: u32, source: LogError },
}

/// The dead-letter operations on open logs: what `sluice dlq` runs, in its own process or in
/// the server that holds the logs.
pub struct Session {
    pub dlq: Arc<dyn Log>,
    pub ingest: Arc<dyn Log>,
    pub triggers: Triggers,
}

impl Session {
    /// Every letter, oldest first per partition.
    pub async fn letters(&self) -> Result<Vec<Letter>, ReplayError> {
        letters(self.dlq.as_ref()).await
    }

    /// [`purge`] of the dead letters of one user of `org` (`user_key`: `u:<id>` or
    /// `e:<email>`).
    pub async fn purge(&self, org: &str, user_key: &str) -> Result<PurgeReport, ReplayError> {
        purge(self.dlq.as_ref(), format!("{org}:{user_key}").as_bytes()).await
    }

    /// Replays the letters named by `ids`, or with `all` every one not replayed yet:
    /// messages to the ingest log, actions through their rule; then records the replay
    /// markers.
    pub async fn replay(&self, ids: &[String], all: bool) -> Result<ReplayReport, ReplayError> {
        let letters = self.letters().await?;
        let selected: Vec<&Letter> = if all {
            letters.iter().filter(|l| !l.replayed).collect()
        } else if ids.is_empty() {
            return Err(ReplayError::Usage(
                "name the letters to replay (IDs from `sluice dlq list`), or pass --all".into(),
            ));
        } else {
            ids.iter()
                .map(|id| {
                    letters
                        .iter()
                        .find(|l| l.id == *id)
                        .ok_or_else(|| ReplayError::Usage(no_such_letter(id)))
                })
                .collect::<Result<_, _>>()?
        };
        let now = sluice_model::time::now_ms();
        let mut done = ReplayReport {
            letters: selected.len(),
            ..ReplayReport::default()
        };
        let mut records = Vec::new();
        for letter in &selected {
            match letter.stage {
                Stage::Trigger => {
                    self.replay_action(letter, now).await?;
                    done.actions += 1;
                }
                Stage::Validate | Stage::Index => records.push(letter.original(now)?),
            }
        }
        done.messages = records.len();
        if !records.is_empty() {
            self.ingest
                .append(records)
                .await
                .map_err(ReplayError::Append)?;
        }
        let markers: Vec<Record> = selected.iter().map(|l| l.replay_marker(now)).collect();
        if !markers.is_empty() {
            self.dlq
                .append(markers)
                .await
                .map_err(ReplayError::Marker)?;
        }
        Ok(done)
    }

    async fn replay_action(&self, letter: &Letter, now: i64) -> Result<(), ReplayError> {
        let id = || letter.id.clone();
        let (Some(rule_name), Some(action)) = (&letter.rule, &letter.action) else {
            return Err(ReplayError::Incomplete {
                id: id(),
                missing: "rule or action",
            });
        };
        let rule = self
            .triggers
            .rules()
            .iter()
            .find(|r| &r.name == rule_name)
            .ok_or_else(|| ReplayError::NoSuchRule {
                id: id(),
                rule: rule_name.clone(),
            })?;
        #[derive(Deserialize)]
        struct Key {
            #[serde(rename = "idempotencyKey")]
            idempotency_key: String,
        }
        let key: Key = serde_json::from_str(action.get()).map_err(|_| ReplayError::Incomplete {
            id: id(),
            missing: "idempotencyKey in its action",
        })?;
        match &rule.action {
            Action::Webhook(url) => self
                .triggers
                .send(url, &key.idempotency_key, action.get().as_bytes())
                .await
                .map_err(|source| ReplayError::Send {
                    id: id(),
                    rule: rule_name.clone(),
                    source,
                }),
            Action::Topic { topic, log } => log
                .append(vec![Record {
                    key: letter.key.clone(),
                    value: action.get().as_bytes().to_vec(),
                    timestamp_ms: now,
                }])
                .await
                .map(|_| ())
                .map_err(|source| ReplayError::Topic {
                    id: id(),
                    topic: topic.clone(),
                    source,
                }),
        }
    }
}

/// The error for an ID no letter has.
pub fn no_such_letter(id: &str) -> String {
    format!("no dead letter {id:?} (IDs are <partition>-<offset>, as `sluice dlq list` shows them)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_record(value: &[u8]) -> LogRecord {
        LogRecord {
            partition: 3,
            offset: 7,
            timestamp_ms: 0,
            key: bytes::Bytes::from_static(b"acme:u:42"),
            value: bytes::Bytes::copy_from_slice(value),
        }
    }

    #[test]
    fn a_dead_letter_carries_the_original_record_stage_reason_and_place() {
        let source =
            log_record(br#"{"v":1,"kind":"event","org":"acme","messageId":"m-1","userId":"42"}"#);
        let dead = record(Stage::Validate, "user u:42 is banned", &source, 1_700);
        assert_eq!(dead.key, b"acme:u:42");
        let v: serde_json::Value = serde_json::from_slice(&dead.value).expect("json");
        assert_eq!(v["stage"], "validate");
        assert_eq!(v["reason"], "user u:42 is banned");
        assert_eq!(v["failedAt"], 1_700);
        assert_eq!(
            v["source"],
            serde_json::json!({"partition": 3, "offset": 7})
        );
        assert_eq!(
            (&v["org"], &v["messageId"]),
            (&"acme".into(), &"m-1".into())
        );
        assert_eq!(v["record"]["userId"], "42");
    }

    #[test]
    fn a_record_that_is_not_json_is_kept_as_text() {
        let dead = record(Stage::Validate, "not JSON", &log_record(b"\xffnot json"), 0);
        let v: serde_json::Value = serde_json::from_slice(&dead.value).expect("json");
        assert_eq!(v["record"], "\u{fffd}not json");
        assert!(v.get("org").is_none() && v.get("messageId").is_none());
    }

    fn embedded(dir: &std::path::Path) -> Arc<dyn Log> {
        let config = sluice_log::EmbeddedLogConfig {
            partitions: 2,
            ..Default::default()
        };
        Arc::new(sluice_log::EmbeddedLog::open(dir, config).expect("log"))
    }

    #[tokio::test]
    async fn a_replay_reappends_the_original_once_and_marks_the_letter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let session = Session {
            dlq: embedded(&dir.path().join("dlq")),
            ingest: embedded(&dir.path().join("ingest")),
            triggers: Triggers::default(),
        };
        let banned = br#"{"v":1,"kind":"event","org":"acme","messageId":"m-1"}"#;
        let refused = record(Stage::Validate, "banned", &log_record(banned), 1);
        let text = record(Stage::Index, "refused", &log_record(b"\xffnot json"), 2);
        session
            .dlq
            .append(vec![refused, text])
            .await
            .expect("append");
        let letters = session.letters().await.expect("letters");
        assert_eq!(letters.len(), 2);
        assert!(letters.iter().all(|l| !l.replayed));
        let first = letters[0].id.clone();
        assert_eq!(letters[0].to_json()["stage"], "validate");
        assert_eq!(letters[0].to_json()["id"], first.as_str());

        let err = session
            .replay(&["9-9".into()], false)
            .await
            .expect_err("no such letter");
        assert!(matches!(err, ReplayError::Usage(m) if m.contains("\"9-9\"")));
        assert!(matches!(
            session.replay(&[], false).await,
            Err(ReplayError::Usage(_))
        ));

        let report = session
            .replay(std::slice::from_ref(&first), false)
            .await
            .expect("replay");
        assert_eq!((report.letters, report.messages, report.actions), (1, 1, 0));
        let letters = session.letters().await.expect("letters");
        assert_eq!(letters.len(), 2, "a marker is not a letter");
        assert!(
            letters
                .iter()
                .find(|l| l.id == first)
                .expect("letter")
                .replayed
        );

        // --all replays only the letter not replayed yet: the text one, as its bytes.
        let report = session.replay(&[], true).await.expect("replay all");
        assert_eq!((report.letters, report.messages), (1, 1));
        assert_eq!(session.replay(&[], true).await.expect("again").letters, 0);
        let mut appended = Vec::new();
        for partition in 0..2 {
            appended.extend(session.ingest.read(partition, 0, 10).await.expect("read"));
        }
        let values: Vec<&[u8]> = appended.iter().map(|r| r.value.as_ref()).collect();
        assert_eq!(values.len(), 2);
        assert!(values.contains(&banned.as_slice()));
        assert!(values.contains(&"\u{fffd}not json".as_bytes()));
        assert!(appended.iter().all(|r| r.key.as_ref() == b"acme:u:42"));
    }

    fn keyed(key: &str, value: &[u8]) -> LogRecord {
        LogRecord {
            key: bytes::Bytes::from(key.as_bytes().to_vec()),
            ..log_record(value)
        }
    }

    #[tokio::test]
    async fn a_purge_deletes_one_users_letters_and_keeps_the_others_with_their_replays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let session = Session {
            dlq: embedded(&dir.path().join("dlq")),
            ingest: embedded(&dir.path().join("ingest")),
            triggers: Triggers::default(),
        };
        let original = br#"{"v":1,"kind":"event","org":"acme","messageId":"m"}"#;
        // Users 1 and 2 of acme, and user 1 of another org, in every partition there is.
        let mut letters = Vec::new();
        for i in 0..6 {
            for key in ["acme:u:1", "acme:u:2", "other:u:1"] {
                letters.push(record(
                    Stage::Validate,
                    &format!("letter {i} of {key}"),
                    &keyed(key, original),
                    i,
                ));
            }
        }
        session.dlq.append(letters).await.expect("append");
        let all = session.letters().await.expect("letters");
        let of = |letters: &[Letter], key: &str| {
            letters.iter().filter(|l| l.key == key.as_bytes()).count()
        };
        assert_eq!(of(&all, "acme:u:1"), 6);
        // One letter of each acme user replayed.
        let replay: Vec<String> = ["acme:u:1", "acme:u:2"]
            .iter()
            .map(|k| {
                all.iter()
                    .find(|l| l.key == k.as_bytes())
                    .expect("letter")
                    .id
                    .clone()
            })
            .collect();
        session.replay(&replay, false).await.expect("replay");

        let report = session.purge("acme", "u:1").await.expect("purge");
        assert_eq!(report.purged, 6);
        let after = session.letters().await.expect("letters");
        assert_eq!(of(&after, "acme:u:1"), 0, "the user's letters are gone");
        assert_eq!(of(&after, "acme:u:2"), 6);
        assert_eq!(of(&after, "other:u:1"), 6, "another org's user 1 stays");
        let replayed: Vec<&Letter> = after.iter().filter(|l| l.replayed).collect();
        assert_eq!(replayed.len(), 1, "user 2's replay is kept");
        assert_eq!(replayed[0].key, b"acme:u:2");
        // Nothing of the user is left in the log itself, not even before the new start.
        for partition in 0..2 {
            let records = session.dlq.read(partition, 0, 1000).await.expect("read");
            assert!(
                records.iter().all(|r| r.key.as_ref() != b"acme:u:1"),
                "partition {partition}"
            );
        }
        // Purging again, or a user with no letter, does nothing.
        assert_eq!(session.purge("acme", "u:1").await.expect("again").purged, 0);
        assert_eq!(session.purge("acme", "u:9").await.expect("nobody").kept, 0);
    }
}
