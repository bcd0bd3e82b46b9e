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
//! The embedded logs are locked by a running server: with them, stop the server first (its
//! drain finishes the batches in flight). With Kafka the commands work while servers run.

use std::collections::HashSet;

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

/// One dead letter as stored (see `sluice_pipeline::dead_letter`), or a replay marker.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    #[serde(default)]
    stage: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    failed_at: Option<i64>,
    #[serde(default)]
    org: Option<String>,
    #[serde(default)]
    message_id: Option<String>,
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

/// What `replay` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Original records appended to the ingest log.
    pub messages: usize,
    /// Refused actions sent again.
    pub actions: usize,
}

/// Replays `selected`: records to `ingest`, actions through `triggers`; then records the
/// replay markers in `dlq`.
pub async fn replay(
    selected: &[&Letter],
    dlq: &dyn Log,
    ingest: &dyn Log,
    triggers: &Triggers,
) -> anyhow::Result<Replayed> {
    let now = sluice_model::time::now_ms();
    let mut done = Replayed::default();
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

/// One line of `list`.
fn line(letter: &Letter) -> String {
    let s = &letter.stored;
    let failed = s
        .failed_at
        .map(sluice_model::time::format_ms)
        .unwrap_or_else(|| "-".into());
    let mut reason = s.reason.clone().unwrap_or_default();
    if reason.chars().count() > 80 {
        reason = reason.chars().take(77).collect::<String>() + "...";
    }
    format!(
        "{:<10} {:<8} {:<12} {:<24} {:<24} {:<8} {}",
        letter.id,
        s.stage.as_deref().unwrap_or("-"),
        s.org.as_deref().unwrap_or("-"),
        s.message_id.as_deref().unwrap_or("-"),
        failed,
        if letter.replayed { "replayed" } else { "-" },
        reason
    )
}

fn as_json(letter: &Letter) -> anyhow::Result<serde_json::Value> {
    let mut value: serde_json::Value = serde_json::from_str(letter.value.get())?;
    if let Some(map) = value.as_object_mut() {
        map.insert("id".into(), letter.id.clone().into());
        map.insert("replayed".into(), letter.replayed.into());
    }
    Ok(value)
}

pub async fn run(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    let dlq = crate::serve::open_dead_letters(config)
        .await
        .map_err(locked_hint)?;
    let letters = letters(dlq.as_ref()).await?;
    let find = |id: &str| {
        letters
            .iter()
            .find(|l| l.id == id)
            .with_context(|| format!("no dead letter {id:?} (IDs are <partition>-<offset>, as `sluice dlq list` shows them)"))
    };
    match command {
        DlqCommand::List { json } => {
            if json {
                for letter in &letters {
                    println!("{}", as_json(letter)?);
                }
            } else {
                println!(
                    "{:<10} {:<8} {:<12} {:<24} {:<24} {:<8} REASON",
                    "ID", "STAGE", "ORG", "MESSAGE ID", "FAILED AT", "REPLAYED"
                );
                for letter in &letters {
                    println!("{}", line(letter));
                }
                let open = letters.iter().filter(|l| !l.replayed).count();
                eprintln!("{} dead letters, {open} not replayed", letters.len());
            }
        }
        DlqCommand::Show { id } => {
            println!("{}", serde_json::to_string_pretty(&as_json(find(&id)?)?)?);
        }
        DlqCommand::Replay { ids, all } => {
            let selected: Vec<&Letter> = if all {
                letters.iter().filter(|l| !l.replayed).collect()
            } else if ids.is_empty() {
                bail!("name the letters to replay (IDs from `sluice dlq list`), or pass --all");
            } else {
                ids.iter()
                    .map(|id| find(id))
                    .collect::<anyhow::Result<_>>()?
            };
            if selected.is_empty() {
                println!("nothing to replay");
                return Ok(());
            }
            let (ingest, retention) = crate::serve::open_log(config, crate::serve::Role::Ingest)
                .await
                .map_err(locked_hint)?;
            if let Some(retention) = retention {
                retention.abort();
            }
            let triggers = crate::serve::open_triggers(config).await?;
            let done = replay(&selected, dlq.as_ref(), ingest.as_ref(), &triggers).await?;
            ingest.close().await.context("cannot close the log")?;
            println!(
                "replayed {} dead letters: {} messages appended to the log, {} actions sent",
                selected.len(),
                done.messages,
                done.actions
            );
        }
    }
    dlq.close()
        .await
        .context("cannot close the dead-letter log")?;
    Ok(())
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
