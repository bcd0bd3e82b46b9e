//! Opens the backends the configuration names (`config::{Log,Dedup,Index,Registry}Backend`,
//! parsed once when the configuration is resolved): the ingest log, the dead-letter and actions
//! logs beside it, the trigger rules, the dedup store, the index and the registry. `serve`,
//! `dlq` and `admin` open what they need here and nowhere else.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sluice_dedup::{Dedup, EmbeddedDedup, RedisDedup, RedisDedupConfig};
use sluice_index::{ElasticIndex, ElasticIndexConfig, EmbeddedIndex, EmbeddedIndexConfig, Index};
use sluice_log::{EmbeddedLog, EmbeddedLogConfig, KafkaLog, Log};
use sluice_pipeline::{Action, Rule, Triggers};
use sluice_registry::{PostgresRegistry, Registry, SqliteRegistry};

use crate::config::{Config, DedupBackend, IndexBackend, LogBackend, RegistryBackend};

/// How often retention looks for deletable log records.
const RETENTION_INTERVAL: Duration = Duration::from_secs(30);

/// When a Kafka log connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    /// Before `open_log` returns: a broker that cannot be reached is an error.
    Now,
    /// In the background: an API node starts while Kafka is down and spills until it is back.
    Lazily,
}

/// The log, as configured: embedded (with its retention task) or Kafka.
pub async fn open_log(
    config: &Config,
    connect: Connect,
) -> anyhow::Result<(Arc<dyn Log>, Option<tokio::task::JoinHandle<()>>)> {
    let LogBackend::Kafka { url, brokers } = &config.log else {
        let log = Arc::new(EmbeddedLog::open(
            &config.log_path(),
            EmbeddedLogConfig {
                partitions: config.partitions,
                retention_max_age: Some(config.retention_max_age).filter(|d| !d.is_zero()),
                retention_max_bytes: Some(config.retention_max_bytes).filter(|b| *b > 0),
                ..EmbeddedLogConfig::default()
            },
        )?);
        let retention = log.spawn_retention(RETENTION_INTERVAL);
        return Ok((log, Some(retention)));
    };
    let kafka = config.kafka_log_config(brokers, &config.topic);
    if connect == Connect::Now {
        let log = KafkaLog::connect(kafka)
            .await
            .with_context(|| format!("cannot use the Kafka log at {url}"))?;
        return Ok((Arc::new(log), None));
    }
    let log = KafkaLog::connect_lazily(kafka)
        .with_context(|| format!("cannot use the Kafka log at {url}"))?;
    match tokio::time::timeout(config.log_ack_timeout, log.prepared()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "kafka is not reachable yet: accepting into the spill buffer until it is");
        }
        Err(_) => tracing::warn!(
            timeout = ?config.log_ack_timeout,
            "kafka did not answer: accepting into the spill buffer until it does"
        ),
    }
    Ok((Arc::new(log), None))
}

/// The dead-letter log (SPEC §6): the Kafka topic `sluice.dlq` with a Kafka log, else an
/// embedded log under `<data_dir>/dlq` (one partition, kept until deleted: no retention).
pub async fn open_dead_letters(config: &Config) -> anyhow::Result<Arc<dyn Log>> {
    open_side_log(config, DEAD_LETTER_TOPIC, &config.dlq_path(), "dead-letter").await
}

/// A log beside the ingest log that only sluice appends to and nothing consumes as a group:
/// the Kafka topic `topic`, or an embedded log with one partition at `path`, kept until
/// deleted (no retention). `what` names it in errors.
async fn open_side_log(
    config: &Config,
    topic: &str,
    path: &std::path::Path,
    what: &str,
) -> anyhow::Result<Arc<dyn Log>> {
    let LogBackend::Kafka { url, brokers } = &config.log else {
        let log = EmbeddedLog::open(
            path,
            EmbeddedLogConfig {
                partitions: 1,
                retention_max_age: None,
                retention_max_bytes: None,
                ..EmbeddedLogConfig::default()
            },
        )
        .with_context(|| format!("cannot open the {what} log at {}", path.display()))?;
        return Ok(Arc::new(log));
    };
    let mut kafka = config.kafka_log_config(brokers, topic);
    // A side log consumed as a group (the actions topic, by the dispatcher) joins as the
    // ingest topic's pipeline does: same session, drain and static membership.
    kafka.other_topics = Vec::new();
    let log = KafkaLog::connect(kafka)
        .await
        .with_context(|| format!("cannot use the {what} topic {topic} at {url}"))?;
    Ok(Arc::new(log))
}

/// The Kafka topic of dead letters (SPEC §6).
const DEAD_LETTER_TOPIC: &str = "sluice.dlq";

/// The Kafka topic the trigger stage appends webhook actions to and the dispatcher reads
/// (SPEC §6); embedded: the actions log `<data_dir>/actions/sluice.actions`.
pub const ACTIONS_TOPIC: &str = "sluice.actions";

/// The `[[triggers]]` rules, with a log for each actions topic they name: that Kafka topic
/// (created if missing), or an embedded log under `<data_dir>/actions/<topic>`; webhook rules
/// append to the actions log ([`ACTIONS_TOPIC`]).
pub async fn open_triggers(config: &Config) -> anyhow::Result<Triggers> {
    let mut topics: std::collections::HashMap<&str, Arc<dyn Log>> = Default::default();
    if config.triggers.iter().any(|rule| rule.webhook.is_some()) {
        let log = open_side_log(
            config,
            ACTIONS_TOPIC,
            &config.actions_path(ACTIONS_TOPIC),
            "actions",
        )
        .await?;
        topics.insert(ACTIONS_TOPIC, log);
    }
    let mut rules = Vec::with_capacity(config.triggers.len());
    for rule in &config.triggers {
        let action = match (&rule.webhook, &rule.topic) {
            (Some(url), _) => Action::Webhook(
                url.parse()
                    .with_context(|| format!("trigger {}: webhook {url:?}", rule.name))?,
            ),
            (None, Some(topic)) => {
                let log = match topics.get(topic.as_str()) {
                    Some(log) => Arc::clone(log),
                    None => {
                        let log =
                            open_side_log(config, topic, &config.actions_path(topic), "actions")
                                .await?;
                        topics.insert(topic, Arc::clone(&log));
                        log
                    }
                };
                Action::Topic {
                    topic: topic.clone(),
                    log,
                }
            }
            (None, None) => anyhow::bail!("trigger {}: no webhook or topic", rule.name),
        };
        rules.push(Rule {
            name: rule.name.clone(),
            event: rule.event.clone(),
            action,
        });
    }
    if !rules.is_empty() {
        tracing::info!(rules = ?rules, "triggers");
    }
    let triggers = Triggers::new(rules);
    Ok(match topics.remove(ACTIONS_TOPIC) {
        Some(actions) => triggers.with_actions_log(actions),
        None => triggers,
    })
}

/// The dedup store, as configured: embedded under the data dir, or Redis.
pub async fn open_dedup(config: &Config) -> anyhow::Result<Arc<dyn Dedup>> {
    let DedupBackend::Redis { url } = &config.dedup else {
        return Ok(Arc::new(EmbeddedDedup::open(
            &config.dedup_path(),
            config.dedup_window,
        )?));
    };
    let mut redis = RedisDedupConfig::new(url, config.dedup_window);
    redis.prefix = config.dedup_key_prefix.clone();
    let dedup = RedisDedup::connect(redis)
        .await
        .context("cannot use the Redis dedup store")?;
    Ok(Arc::new(dedup))
}

/// The index, as configured: embedded under the data dir, or Elasticsearch/OpenSearch.
pub async fn open_index(config: &Config) -> anyhow::Result<Arc<dyn Index>> {
    let IndexBackend::Elastic { url } = &config.index else {
        return Ok(Arc::new(EmbeddedIndex::open(EmbeddedIndexConfig::new(
            config.index_path(),
        ))?));
    };
    let mut elastic = ElasticIndexConfig::new(url);
    elastic.prefix = config.index_prefix.clone();
    let index = ElasticIndex::open(elastic)
        .await
        .context("cannot use the Elasticsearch/OpenSearch index")?;
    Ok(Arc::new(index))
}

/// The registry, as configured: SQLite under the data dir, or PostgreSQL.
pub async fn open_registry(config: &Config) -> anyhow::Result<Box<dyn Registry>> {
    if let RegistryBackend::Postgres { url } = &config.registry {
        return Ok(Box::new(PostgresRegistry::connect(url).await?));
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    Ok(Box::new(
        SqliteRegistry::open(&config.registry_path()).await?,
    ))
}

/// Whether opening an embedded log failed because a running server holds it (then the admin
/// commands go through its admin socket).
pub(crate) fn is_locked(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sluice_log::LogError>(),
            Some(sluice_log::LogError::Locked { .. })
        )
    })
}
