//! `sluice dlq list | show ID | replay [ID...] [--all]` (SPEC §8): inspect and re-inject dead
//! letters of the dead-letter log (the Kafka topic `sluice.dlq`, or `<data_dir>/dlq`).
//! `sluice_pipeline::dead_letter` owns the format, reading and replay; this module picks where
//! they run and renders them.
//!
//! The commands read and write the logs themselves when they can (Kafka, or embedded logs no
//! server holds). A running `sluice serve` holds its embedded logs; it then serves the same
//! operations (`dead_letter::Session`) on its admin socket, `<data_dir>/admin.sock`
//! (`admin_socket`), and the commands go through it.

use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use sluice_log::Log;
use sluice_pipeline::dead_letter::{self, Letter, Session, no_such_letter};

use crate::backends;
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
    /// Delete every dead letter of one user (after `sluice users forget`): the other letters
    /// of the same partitions are written again with new IDs, then the old records deleted.
    Purge {
        #[arg(long)]
        org: String,
        /// The user's id (with --by-email: the user's email).
        #[arg(long)]
        user: String,
        /// USER is an email: purges what was keyed by that email.
        #[arg(long)]
        by_email: bool,
    },
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
    Ok(dead_letter::letters(dlq)
        .await?
        .iter()
        .map(Letter::to_json)
        .collect())
}

/// Where the commands run: on the logs themselves, or through the server holding them.
enum Target {
    Direct(Arc<dyn Log>),
    Server(std::path::PathBuf),
}

pub async fn run(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    let target = match backends::open_dead_letters(config).await {
        Ok(dlq) => Target::Direct(dlq),
        Err(e) if backends::is_locked(&e) => {
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
    if let DlqCommand::Purge {
        org,
        user,
        by_email,
    } = &command
    {
        let user_key = if *by_email {
            format!("e:{}", user.trim().to_lowercase())
        } else {
            format!("u:{user}")
        };
        let report = match &target {
            Target::Direct(dlq) => sluice_pipeline::dead_letter::purge(
                dlq.as_ref(),
                format!("{org}:{user_key}").as_bytes(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?,
            Target::Server(socket) => crate::admin_socket::purge_at(socket, org, &user_key).await?,
        };
        println!(
            "purged {} dead letters of user {user:?} of org {org:?} ({} other records of their partitions written again with new IDs)",
            report.purged, report.kept
        );
        if let Target::Direct(dlq) = target {
            dlq.close()
                .await
                .context("cannot close the dead-letter log")?;
        }
        return Ok(());
    }
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
        DlqCommand::Purge { .. } => unreachable!("handled above"),
        DlqCommand::Replay { ids, all } => {
            let report = match &target {
                Target::Direct(dlq) => {
                    let (ingest, retention) = backends::open_log(config, backends::Connect::Now)
                        .await
                        .map_err(locked_hint)?;
                    if let Some(retention) = retention {
                        retention.abort();
                    }
                    let session = Session {
                        dlq: Arc::clone(dlq),
                        ingest: Arc::clone(&ingest),
                        triggers: backends::open_triggers(config).await?,
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

/// Adds what to do when an embedded log is held by a running server.
fn locked_hint(e: anyhow::Error) -> anyhow::Error {
    if backends::is_locked(&e) {
        e.context("a sluice server holds this data dir's logs: stop it (SIGTERM drains it), run the dlq command, and start it again")
    } else {
        e
    }
}
