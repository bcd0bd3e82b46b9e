//! `sluice dlq list | show ID | replay [ID...] [--all]` (SPEC §8): inspect and re-inject dead
//! letters.
//!
//! A dead letter's ID is `<partition>-<offset>` in the dead-letter log (the Kafka topic
//! `sluice.dlq`, or `<data_dir>/dlq`). Replaying a letter refused by `validate` or `index`
//! appends its original record, unchanged, to the ingest log: the pipeline processes it like
//! any message (its dedup mark was never set). Replaying a letter of a refused trigger action
//! sends the action again, as its rule is configured now, with the same `Idempotency-Key`.
//! The log is append-only, so a replay is recorded as a marker record in the dead-letter log
//! (`{"v":1,"replayed":ID,...}`); `list` shows it and `replay --all` skips replayed letters.
//!
//! The commands read and write the logs themselves when they can (Kafka, or embedded logs no
//! server holds). A running `sluice serve` holds its embedded logs; it then serves the same
//! operations (`Session`) on its admin socket, `<data_dir>/admin.sock` (`admin_socket`), and
//! the commands go through it.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_log::{Log, LogError, Record};
use sluice_pipeline::{Action, Triggers};

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first per partition.
    List {
        /// One JSON object per letter, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Print one dead letter as JSON.
    Show {
        /// `<partition>-<offset>`, as `list` shows it.
        id: String,
    },
    /// Re-inject dead letters: messages go back to the ingest log, refused actions are sent
    /// again.
    Replay {
        /// Letters to replay, by ID.
        ids: Vec<String>,
        /// Every letter not replayed yet.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

/// What a replay needs of a dead letter as stored (see `sluice_pipeline::dead_letter`), or a
/// replay marker.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    #[serde(default)]
    stage: Option<String>,
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
    pub id: String,
    pub key: Vec<u8>,
    /// The whole stored JSON.
    pub value: Box<RawValue>,
    stored: Stored,
    pub replayed: bool,
}

/// How many records one read asks for.
const READ_CHUNK: usize = 10_000;

/// Every dead letter of `dlq`, with whether it was replayed.
pub async fn letters(dlq: &dyn Log) -> anyhow::Result<Vec<Letter>> {
    let mut letters = Vec::new();
    let mut replayed = HashSet::new();
    for partition in 0..dlq.partitions() {
        let mut from = 0;
        loop {
            let records = match dlq.read(partition, from, READ_CHUNK).await {
                Ok(records) => records,
                // Kafka answers a timeout when there is nothing at all to read.
                Err(LogError::Timeout(_)) if from == 0 => Vec::new(),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot read dead letters of partition {partition}")
                    });
                }
            };
            let Some(last) = records.last() else { break };
            from = last.offset + 1;
            for record in records {
                let id = format!("{}-{}", record.partition, record.offset);
                let (value, stored) = match serde_json::from_slice::<Box<RawValue>>(&record.value)
                    .and_then(|raw| Ok((serde_json::from_str::<Stored>(raw.get())?, raw)))
                {
                    Ok((stored, raw)) => (raw, stored),
                    Err(e) => {
                        tracing::warn!(%id, error = %e, "skipping a dead-letter record that is not a dead letter");
                        continue;
                    }
                };
                if let Some(of) = &stored.replayed {
                    replayed.insert(of.clone());
                    continue;
                }
                letters.push(Letter {
                    id,
                    key: record.key.to_vec(),
                    value,
                    stored,
                    replayed: false,
                });
            }
        }
    }
    for letter in &mut letters {
        letter.replayed = replayed.contains(&letter.id);
    }
    Ok(letters)
}

/// Replays `selected`: records to `ingest`, actions through `triggers`; then records the
/// replay markers in `dlq`.
pub async fn replay(
    selected: &[&Letter],
    dlq: &dyn Log,
    ingest: &dyn Log,
    triggers: &Triggers,
) -> anyhow::Result<ReplayReport> {
    let now = sluice_model::time::now_ms();
    let mut done = ReplayReport {
        letters: selected.len(),
        ..ReplayReport::default()
    };
    let mut records = Vec::new();
    for letter in selected {
        if letter.stored.stage.as_deref() == Some("trigger") {
            replay_action(letter, triggers, now).await?;
            done.actions += 1;
            continue;
        }
        let Some(record) = &letter.stored.record else {
            bail!("dead letter {} holds no record to replay", letter.id);
        };
        // The original value: the JSON as stored, or the text of a value that was not JSON.
        let value = match serde_json::from_str::<String>(record.get()) {
            Ok(text) => text.into_bytes(),
            Err(_) => record.get().as_bytes().to_vec(),
        };
        records.push(Record {
            key: letter.key.clone(),
            value,
            timestamp_ms: now,
        });
    }
    done.messages = records.len();
    if !records.is_empty() {
        ingest
            .append(records)
            .await
            .context("cannot append the replayed messages to the log")?;
    }
    let markers: Vec<Record> = selected
        .iter()
        .map(|letter| Record {
            key: letter.key.clone(),
            value: serde_json::json!({"v": 1, "replayed": letter.id, "at": now})
                .to_string()
                .into_bytes(),
            timestamp_ms: now,
        })
        .collect();
    if !markers.is_empty() {
        dlq.append(markers)
            .await
            .context("replayed, but cannot record the replay in the dead-letter log")?;
    }
    Ok(done)
}

async fn replay_action(letter: &Letter, triggers: &Triggers, now: i64) -> anyhow::Result<()> {
    let (Some(rule_name), Some(action)) = (&letter.stored.rule, &letter.stored.action) else {
        bail!("dead letter {} has no rule or action to send", letter.id);
    };
    let rule = triggers
        .rules()
        .iter()
        .find(|r| &r.name == rule_name)
        .with_context(|| {
            format!(
                "dead letter {}: trigger {rule_name:?} is not in the configuration any more",
                letter.id
            )
        })?;
    #[derive(Deserialize)]
    struct Key {
        #[serde(rename = "idempotencyKey")]
        idempotency_key: String,
    }
    let key: Key = serde_json::from_str(action.get()).with_context(|| {
        format!(
            "dead letter {}: the action has no idempotencyKey",
            letter.id
        )
    })?;
    match &rule.action {
        Action::Webhook(url) => triggers
            .send(url, &key.idempotency_key, action.get().as_bytes())
            .await
            .with_context(|| format!("dead letter {}: trigger {rule_name}", letter.id)),
        Action::Topic { topic, log } => log
            .append(vec![Record {
                key: letter.key.clone(),
                value: action.get().as_bytes().to_vec(),
                timestamp_ms: now,
            }])
            .await
            .map(|_| ())
            .with_context(|| format!("dead letter {}: cannot append to topic {topic}", letter.id)),
    }
}

/// What `replay` reports.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ReplayReport {
    /// Letters replayed.
    pub letters: usize,
    /// Original records appended to the ingest log.
    pub messages: usize,
    /// Refused actions sent again.
    pub actions: usize,
}

/// The dead-letter operations on open logs: what the commands run, here or in the server that
/// holds the logs.
pub struct Session {
    pub dlq: Arc<dyn Log>,
    pub ingest: Arc<dyn Log>,
    pub triggers: Triggers,
}

impl Session {
    /// Every letter as JSON: the stored letter with its `id` and `replayed`.
    pub async fn list(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        list(self.dlq.as_ref()).await
    }

    /// Replays the letters named by `ids`, or with `all` every one not replayed yet.
    pub async fn replay(&self, ids: &[String], all: bool) -> Result<ReplayReport, ReplayError> {
        let letters = letters(self.dlq.as_ref()).await?;
        let selected: Vec<&Letter> = if all {
            letters.iter().filter(|l| !l.replayed).collect()
        } else if ids.is_empty() {
            return Err(ReplayError::Usage(
                "name the letters to replay (IDs from `sluice dlq list`), or pass --all".into(),
            ));
        } else {
            ids.iter()
                .map(|id| find(&letters, id).map_err(|e| ReplayError::Usage(e.to_string())))
                .collect::<Result<_, _>>()?
        };
        if selected.is_empty() {
            return Ok(ReplayReport::default());
        }
        Ok(replay(
            &selected,
            self.dlq.as_ref(),
            self.ingest.as_ref(),
            &self.triggers,
        )
        .await?)
    }
}

/// Why a replay did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The request names no letter, or one that does not exist.
    #[error("{0}")]
    Usage(String),
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

fn find<'a>(letters: &'a [Letter], id: &str) -> anyhow::Result<&'a Letter> {
    letters
        .iter()
        .find(|l| l.id == id)
        .with_context(|| no_such_letter(id))
}

fn no_such_letter(id: &str) -> String {
    format!("no dead letter {id:?} (IDs are <partition>-<offset>, as `sluice dlq list` shows them)")
}

/// One line of `list`, from a letter's JSON.
fn line(letter: &serde_json::Value) -> String {
    let text = |key: &str| letter[key].as_str().unwrap_or("-").to_string();
    let failed = letter["failedAt"]
        .as_i64()
        .map(sluice_model::time::format_ms)
        .unwrap_or_else(|| "-".into());
    let mut reason = letter["reason"].as_str().unwrap_or_default().to_string();
    if reason.chars().count() > 80 {
        reason = reason.chars().take(77).collect::<String>() + "...";
    }
    format!(
        "{:<10} {:<8} {:<12} {:<24} {:<24} {:<8} {}",
        text("id"),
        text("stage"),
        text("org"),
        text("messageId"),
        failed,
        if letter["replayed"] == true {
            "replayed"
        } else {
            "-"
        },
        reason
    )
}

/// Every letter of `dlq` as JSON: the stored letter with its `id` and `replayed`.
async fn list(dlq: &dyn Log) -> anyhow::Result<Vec<serde_json::Value>> {
    letters(dlq).await?.iter().map(as_json).collect()
}

fn as_json(letter: &Letter) -> anyhow::Result<serde_json::Value> {
    let mut value: serde_json::Value = serde_json::from_str(letter.value.get())?;
    if let Some(map) = value.as_object_mut() {
        map.insert("id".into(), letter.id.clone().into());
        map.insert("replayed".into(), letter.replayed.into());
    }
    Ok(value)
}

/// Where the commands run: on the logs themselves, or through the server holding them.
enum Target {
    Direct(Arc<dyn Log>),
    Server(std::path::PathBuf),
}

pub async fn run(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    let target = match crate::serve::open_dead_letters(config).await {
        Ok(dlq) => Target::Direct(dlq),
        Err(e) if is_locked(&e) => {
            let socket = crate::admin_socket::path(config);
            if !socket.exists() {
                return Err(e.context(format!(
                    "a sluice server holds this data dir's logs, and it has no admin socket at {}",
                    socket.display()
                )));
            }
            Target::Server(socket)
        }
        Err(e) => return Err(e),
    };
    let letters = match &target {
        Target::Direct(dlq) => list(dlq.as_ref()).await?,
        Target::Server(socket) => crate::admin_socket::list_at(socket).await?,
    };
    match command {
        DlqCommand::List { json } => {
            if json {
                for letter in &letters {
                    println!("{letter}");
                }
            } else {
                println!(
                    "{:<10} {:<8} {:<12} {:<24} {:<24} {:<8} REASON",
                    "ID", "STAGE", "ORG", "MESSAGE ID", "FAILED AT", "REPLAYED"
                );
                for letter in &letters {
                    println!("{}", line(letter));
                }
                let open = letters.iter().filter(|l| l["replayed"] != true).count();
                eprintln!("{} dead letters, {open} not replayed", letters.len());
            }
        }
        DlqCommand::Show { id } => {
            let letter = letters
                .iter()
                .find(|l| l["id"] == id.as_str())
                .with_context(|| no_such_letter(&id))?;
            println!("{}", serde_json::to_string_pretty(letter)?);
        }
        DlqCommand::Replay { ids, all } => {
            let report = match &target {
                Target::Direct(dlq) => {
                    let (ingest, retention) =
                        crate::serve::open_log(config, crate::serve::Role::Ingest)
                            .await
                            .map_err(locked_hint)?;
                    if let Some(retention) = retention {
                        retention.abort();
                    }
                    let session = Session {
                        dlq: Arc::clone(dlq),
                        ingest: Arc::clone(&ingest),
                        triggers: crate::serve::open_triggers(config).await?,
                    };
                    let report = session.replay(&ids, all).await;
                    ingest.close().await.context("cannot close the log")?;
                    report.map_err(|e| anyhow::anyhow!("{e}"))?
                }
                Target::Server(socket) => crate::admin_socket::replay_at(socket, &ids, all).await?,
            };
            if report.letters == 0 {
                println!("nothing to replay");
            } else {
                println!(
                    "replayed {} dead letters: {} messages appended to the log, {} actions sent",
                    report.letters, report.messages, report.actions
                );
            }
        }
    }
    if let Target::Direct(dlq) = target {
        dlq.close()
            .await
            .context("cannot close the dead-letter log")?;
    }
    Ok(())
}

fn is_locked(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<LogError>(),
            Some(LogError::Locked { .. })
        )
    })
}

/// Adds what to do when an embedded log is held by a running server.
fn locked_hint(e: anyhow::Error) -> anyhow::Error {
    let locked = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<LogError>(),
            Some(LogError::Locked { .. })
        )
    });
    if locked {
        e.context("a sluice server holds this data dir's logs: stop it (SIGTERM drains it), run the dlq command, and start it again")
    } else {
        e
    }
}
