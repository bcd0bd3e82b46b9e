//! Configuration: defaults, then a TOML file (`--config`), then `SLUICE_*` environment variables,
//! then command-line flags, each layer overriding the one before (SPEC §2).
//!
//! clap reads a flag, else its `SLUICE_*` variable, into an `Option`; `Config::resolve` lays
//! those over the file, which lies over the defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

/// The resolved configuration. `Serialize` writes it with every secret redacted (passwords in
/// backend and webhook URLs, `[kafka_options]` values): what `sluice config check` prints.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: String,
    pub data_dir: PathBuf,
    pub log: LogBackend,
    pub dedup: DedupBackend,
    pub index: IndexBackend,
    pub registry: RegistryBackend,
    pub partitions: u32,
    #[serde(with = "duration")]
    pub log_ack_timeout: Duration,
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    pub max_item_bytes: usize,
    pub max_request_bytes: usize,
    pub max_request_items: usize,
    #[serde(with = "duration")]
    pub retention_max_age: Duration,
    pub retention_max_bytes: u64,
    #[serde(with = "duration")]
    pub key_cache_ttl: Duration,
    pub batch_size: usize,
    #[serde(with = "duration")]
    pub batch_timeout: Duration,
    #[serde(with = "duration")]
    pub dedup_window: Duration,
    pub topic: String,
    #[serde(with = "duration")]
    pub kafka_session_timeout: Duration,
    pub kafka_instance_id: String,
    /// Replication factor of the topics sluice creates; `None`: 3, or the broker count.
    pub kafka_replication_factor: Option<u32>,
    /// `min.insync.replicas` of those topics; `None`: 2 when the factor is 3 or more.
    pub kafka_min_insync_replicas: Option<u32>,
    /// `[kafka_options]`: librdkafka properties passed through unchanged. Only in the file.
    pub kafka_options: KafkaOptions,
    pub dedup_key_prefix: String,
    pub index_prefix: String,
    #[serde(with = "duration")]
    pub sendgrid_max_age: Duration,
    /// A webhook action older than this is a dead letter instead of a call (SPEC §6).
    #[serde(with = "duration")]
    pub action_max_age: Duration,
    pub spill_max_bytes: u64,
    #[serde(with = "duration")]
    pub replay_interval: Duration,
    pub max_in_flight_bytes: usize,
    /// When set, `/`, `/stats` and `/metrics` require `Authorization: Bearer <admin_token>`
    /// (SPEC §9).
    #[serde(serialize_with = "redacted_secret")]
    pub admin_token: String,
    /// How log lines are written to stderr.
    pub log_format: LogFormat,
    /// Browser origins that may call the write routes (`*`: any; SPEC §4).
    pub cors_origins: Vec<String>,
    /// Whether the read routes are offered to those origins too.
    pub cors_read: bool,
    /// Messages per second an org may send unless it has a limit of its own (0: unlimited).
    pub org_events_per_second: u32,
    /// `[[triggers]]` rules (SPEC §6 step 7). Only in the file: no env variable or flag.
    pub triggers: Vec<TriggerConfig>,
}

/// `log_format`: text for a terminal or journal, or one JSON object per line with the
/// structured fields (partition, offsets, org, route) for a log pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[kafka_options]`: librdkafka properties, name to value. Values may be secrets (SASL
/// passwords): `Debug` shows the names only. librdkafka reads every value as text, so a number
/// or a boolean (`"linger.ms" = 5`) is taken as its text; a table, an array or a date is an error.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct KafkaOptions(
    #[serde(deserialize_with = "option_values")] pub std::collections::BTreeMap<String, String>,
);

fn option_values<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<std::collections::BTreeMap<String, String>, D::Error> {
    let values = std::collections::BTreeMap::<String, toml::Value>::deserialize(deserializer)?;
    values
        .into_iter()
        .map(|(name, value)| {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(x) => x.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => {
                    return Err(serde::de::Error::custom(format!(
                        "[kafka_options] {name:?}: a librdkafka property is a string, number or boolean, not a table, an array or a date"
                    )));
                }
            };
            Ok((name, text))
        })
        .collect()
}

/// Names only, each value `***`.
impl Serialize for KafkaOptions {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.keys().map(|k| (k, "***")))
    }
}

impl std::fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "***")))
            .finish()
    }
}

/// One `[[triggers]]` rule: for each event named `event`, POST to `webhook` or append to
/// `topic` (exactly one of the two).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    pub name: String,
    pub event: String,
    #[serde(default, serialize_with = "redacted_url")]
    pub webhook: Option<String>,
    #[serde(default)]
    pub topic: Option<String>,
}

/// The defaults, taken from the crates' own settings wherever a crate has one, so each is
/// defined once; `DEFAULT_CONFIG_TOML` and the flags' `[default: …]` are tested against them.
impl Default for Config {
    fn default() -> Self {
        let log = sluice_log::EmbeddedLogConfig::default();
        let kafka = sluice_log::KafkaLogConfig::new("", "sluice.ingest");
        let batch = sluice_pipeline::batch::BatchConfig::default();
        let dispatcher = sluice_pipeline::DispatcherConfig::default();
        let limits = sluice_api::Limits::default();
        let api = sluice_api::ApiConfig::default();
        let bridge = sluice_spill::BridgeConfig::default();
        let redis = sluice_dedup::RedisDedupConfig::new("", sluice_dedup::DEFAULT_WINDOW);
        let elastic = sluice_index::ElasticIndexConfig::new("");
        Config {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./sluice-data"),
            log: LogBackend::Embedded,
            dedup: DedupBackend::Embedded,
            index: IndexBackend::Embedded,
            registry: RegistryBackend::Embedded,
            partitions: log.partitions,
            log_ack_timeout: bridge.log_ack_timeout,
            shutdown_timeout: Duration::from_secs(30),
            max_item_bytes: limits.max_item_bytes,
            max_request_bytes: limits.max_request_bytes,
            max_request_items: limits.max_request_items,
            retention_max_age: log.retention_max_age.unwrap_or_default(),
            retention_max_bytes: log.retention_max_bytes.unwrap_or_default(),
            key_cache_ttl: api.key_cache_ttl,
            batch_size: batch.max_records,
            batch_timeout: batch.timeout,
            dedup_window: redis.window,
            topic: kafka.topic,
            kafka_session_timeout: kafka.session_timeout,
            kafka_instance_id: String::new(),
            kafka_replication_factor: None,
            admin_token: String::new(),
            log_format: LogFormat::Text,
            cors_origins: api.cors.origins.clone(),
            cors_read: api.cors.read,
            org_events_per_second: api.org_events_per_second,
            kafka_min_insync_replicas: None,
            kafka_options: Default::default(),
            dedup_key_prefix: redis.prefix,
            index_prefix: elastic.prefix,
            sendgrid_max_age: api.sendgrid_max_age,
            action_max_age: dispatcher.action_max_age,
            spill_max_bytes: bridge.max_bytes,
            replay_interval: bridge.replay_interval,
            max_in_flight_bytes: api.max_in_flight_bytes,
            triggers: Vec::new(),
        }
    }
}

pub const DEFAULT_CONFIG_TOML: &str = r#"# sluice configuration. Every key is optional; shown here with its default.
# Precedence: this file < SLUICE_<KEY> environment variables < command-line flags
# (e.g. `listen` is SLUICE_LISTEN and --listen).

# Address the HTTP API listens on.
listen = "127.0.0.1:8080"

# Where embedded state lives: log/, dedup/, index/, registry.db, dead letters in dlq/, and
# the spill buffer spill/.
data_dir = "./sluice-data"

# Backends, by URL. The log is `embedded` or Kafka (`kafka://host:9092[,host:9093...]`); the
# dedup store `embedded` or Redis (`redis://host:6379[/db]`); the registry `embedded` or
# PostgreSQL (`postgres://user@host:5432/db`, options such as a schema may follow:
# `?options=-c%20search_path%3Dsluice`); the index `embedded` or Elasticsearch/OpenSearch
# (`http(s)://[user:password@]host:9200`).
log = "embedded"
dedup = "embedded"
index = "embedded"
registry = "embedded"

# Partitions of the log: the embedded log's, or those sluice creates its Kafka topics with.
# Fixed once created; an existing topic keeps its own count.
partitions = 8

# Kafka only. The topic of users and events (sluice also creates sluice.dlq and sluice.actions).
topic = "sluice.ingest"
# How long a consumer that stopped (crashed, killed) keeps its partitions before the group
# hands them to another ingest node.
kafka_session_timeout = "10s"
# Static group membership id of this consuming node: a node restarted within the session
# timeout gets its partitions back without a rebalance. Must be unique among running nodes.
# Empty: derived from the host name and the absolute data_dir.
kafka_instance_id = ""
# Replication of the topics sluice creates (sluice.ingest, sluice.dlq, sluice.actions and
# trigger topics; existing topics keep theirs). Unset: 3, or the broker count when the cluster
# has fewer; min.insync.replicas unset: 2 when the factor is 3 or more, else the broker's
# default. Appends wait for acks=all, so with 3 and 2 an acknowledged message survives the loss
# of any one broker. sluice.dlq is created with unlimited retention.
# kafka_replication_factor = 3
# kafka_min_insync_replicas = 2

# librdkafka properties for every Kafka client sluice makes, passed through unchanged (TLS,
# SASL, tuning), as in:
# [kafka_options]
# "security.protocol" = "SASL_SSL"
# "sasl.mechanisms" = "PLAIN"
# "sasl.username" = "sluice"
# "sasl.password" = "..."

# Redis dedup only: keys are `<dedup_key_prefix>:<org>:<message id>`, kept for dedup_window.
dedup_key_prefix = "sluice:dedup"

# Elasticsearch/OpenSearch index only: the indexes are `<index_prefix>-users` and
# `<index_prefix>-events`, created with their mappings at start if missing.
index_prefix = "sluice"

# SendGrid webhook: a signed request (org with `sluice orgs set-sendgrid-key`) is refused when
# its timestamp is further than this from now, so a captured request cannot be replayed later.
sendgrid_max_age = "5m"

# Trigger webhooks are delivered from the actions log by a dispatcher, retried while the
# target is down; an action older than this is not sent but becomes a dead letter
# (`sluice dlq replay` sends it).
action_max_age = "24h"

# How long a request waits for the log to acknowledge its messages. Past it (or when the log
# fails), the messages go to the local spill buffer (<data_dir>/spill, fsynced) and the client
# gets its 200; while the buffer holds anything, new messages go behind it, and a replayer
# appends them to the log oldest first (SPEC §7).
log_ack_timeout = "5s"

# Most bytes the spill buffer holds; beyond it the API answers 503 with Retry-After.
# 0 disables spilling: a log that does not acknowledge in time is a 503.
spill_max_bytes = 1073741824

# Pause between replay attempts while the log still fails; doubles per failure, up to 8x.
replay_interval = "1s"

# Most request body bytes handled at once; further requests wait (up to log_ack_timeout) for
# room, then get a 503. Bounds the API's memory under bursts.
max_in_flight_bytes = 268435456

# When set, the dashboard (/), /stats and /metrics require `Authorization: Bearer
# <admin_token>` (a 401 without it; in a browser, give the token as the password when it
# asks). /healthz and /readyz stay open for probes.
admin_token = ""

# Log lines on stderr: "text", or "json" (one object per line, with the fields of the
# partition, batch and request each line belongs to). RUST_LOG sets the levels.
log_format = "text"

# Browsers: the origins (scheme://host[:port]) whose pages may call the write routes (ingest,
# /v1/*, webhooks): they answer CORS preflights for them; "*" allows any. The read routes are
# offered cross-origin only with cors_read = true (a key that can read should not be in a
# web page).
cors_origins = ["*"]
cors_read = false

# Messages per second each org may send (per API node), with a burst of one second's worth;
# `sluice orgs set-limit NAME --events-per-second N [--burst M]` sets an org's own. A request
# over the limit gets 429 with Retry-After and none of its messages is written. 0: unlimited.
org_events_per_second = 0

# On SIGTERM/SIGINT: how long in-flight requests may take to finish before exit.
shutdown_timeout = "30s"

# Request limits: one item, one request body, items per bulk request.
max_item_bytes = 32768
max_request_bytes = 10485760
max_request_items = 10000

# Embedded log retention. Records every consumer group has committed are deleted; these caps
# delete older records even if not consumed. 0 disables the byte cap (per partition).
retention_max_age = "7days"
retention_max_bytes = 0

# How long an API key lookup is cached: a new key or a disabled org takes effect within this.
# The pipeline caches org and ban lookups for as long.
key_cache_ttl = "5s"

# Pipeline batches: up to batch_size messages per partition, or what arrived within
# batch_timeout of the batch's first message.
batch_size = 5000
batch_timeout = "250ms"

# A message id seen again within this window is dropped as a duplicate.
dedup_window = "7days"

# Triggers (none by default): for each event named `event`, after its batch is indexed and
# before it is committed, POST a JSON payload (the event and the user's profile as it stood at
# that event) to `webhook` with the header `Idempotency-Key: <org>:<messageId>:<name>`, or
# append it as a record to the Kafka topic `topic` (created if missing; with the embedded log,
# an embedded log under <data_dir>/actions/<topic>). Delivery is at least once: a redelivered
# message does not fire again once its action was marked done, but a crash between the call and
# the mark repeats the call with the same key. Webhooks are retried with backoff while the
# target answers 408, 409, 425, 429 or 5xx or cannot be reached; any other answer (a 4xx,
# a redirect) makes the action a dead letter.
#
# [[triggers]]
# name = "welcome-email"
# event = "signedUp"
# webhook = "http://127.0.0.1:9000/welcome"
#
# [[triggers]]
# name = "signups-to-crm"
# event = "signedUp"
# topic = "sluice.actions"
"#;

/// Flags (with their `SLUICE_*` variables) that override the file. Global to every command.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, global = true, env = "SLUICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, global = true, env = "SLUICE_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory of embedded state [default: ./sluice-data].
    #[arg(long, global = true, env = "SLUICE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log backend: `embedded` [default] or kafka://host:9092[,host:9093...].
    #[arg(long, global = true, env = "SLUICE_LOG", value_name = "URL")]
    pub log: Option<String>,
    /// Dedup backend: `embedded` [default] or redis://host:6379[/db].
    #[arg(long, global = true, env = "SLUICE_DEDUP", value_name = "URL")]
    pub dedup: Option<String>,
    /// Index backend: `embedded` [default] or http(s)://host:9200 (Elasticsearch/OpenSearch).
    #[arg(long, global = true, env = "SLUICE_INDEX", value_name = "URL")]
    pub index: Option<String>,
    /// Registry backend: `embedded` [default] or postgres://user@host:5432/db.
    #[arg(long, global = true, env = "SLUICE_REGISTRY", value_name = "URL")]
    pub registry: Option<String>,
    /// Partitions of the embedded log [default: 8].
    #[arg(long, global = true, env = "SLUICE_PARTITIONS")]
    pub partitions: Option<u32>,
    /// Wait this long for a durable log ack before 503 [default: 5s].
    #[arg(long, global = true, env = "SLUICE_LOG_ACK_TIMEOUT", value_parser = parse_duration)]
    pub log_ack_timeout: Option<Duration>,
    /// Time allowed for a draining shutdown [default: 30s].
    #[arg(long, global = true, env = "SLUICE_SHUTDOWN_TIMEOUT", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// Largest item, in bytes [default: 32768].
    #[arg(long, global = true, env = "SLUICE_MAX_ITEM_BYTES")]
    pub max_item_bytes: Option<usize>,
    /// Largest request body, in bytes [default: 10485760].
    #[arg(long, global = true, env = "SLUICE_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Most items in one bulk request [default: 10000].
    #[arg(long, global = true, env = "SLUICE_MAX_REQUEST_ITEMS")]
    pub max_request_items: Option<usize>,
    /// Delete log records older than this [default: 7days].
    #[arg(long, global = true, env = "SLUICE_RETENTION_MAX_AGE", value_parser = parse_duration)]
    pub retention_max_age: Option<Duration>,
    /// Per-partition byte cap of the log, 0 for none [default: 0].
    #[arg(long, global = true, env = "SLUICE_RETENTION_MAX_BYTES")]
    pub retention_max_bytes: Option<u64>,
    /// How long API key lookups are cached [default: 5s].
    #[arg(long, global = true, env = "SLUICE_KEY_CACHE_TTL", value_parser = parse_duration)]
    pub key_cache_ttl: Option<Duration>,
    /// Most messages per pipeline batch [default: 5000].
    #[arg(long, global = true, env = "SLUICE_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Longest a pipeline batch waits to fill [default: 250ms].
    #[arg(long, global = true, env = "SLUICE_BATCH_TIMEOUT", value_parser = parse_duration)]
    pub batch_timeout: Option<Duration>,
    /// Dedup window of message ids [default: 7days].
    #[arg(long, global = true, env = "SLUICE_DEDUP_WINDOW", value_parser = parse_duration)]
    pub dedup_window: Option<Duration>,
    /// Kafka topic of users and events [default: sluice.ingest].
    #[arg(long, global = true, env = "SLUICE_TOPIC")]
    pub topic: Option<String>,
    /// Kafka consumer session timeout [default: 10s].
    #[arg(long, global = true, env = "SLUICE_KAFKA_SESSION_TIMEOUT", value_parser = parse_duration)]
    pub kafka_session_timeout: Option<Duration>,
    /// Kafka static membership id of this node [default: from host name and data dir].
    #[arg(long, global = true, env = "SLUICE_KAFKA_INSTANCE_ID")]
    pub kafka_instance_id: Option<String>,
    /// Replication factor of the Kafka topics sluice creates [default: 3, or the broker count].
    #[arg(long, global = true, env = "SLUICE_KAFKA_REPLICATION_FACTOR")]
    pub kafka_replication_factor: Option<u32>,
    /// min.insync.replicas of those topics [default: 2 when the factor is 3 or more].
    #[arg(long, global = true, env = "SLUICE_KAFKA_MIN_INSYNC_REPLICAS")]
    pub kafka_min_insync_replicas: Option<u32>,
    /// Key prefix of the Redis dedup store [default: sluice:dedup].
    #[arg(long, global = true, env = "SLUICE_DEDUP_KEY_PREFIX")]
    pub dedup_key_prefix: Option<String>,
    /// Name prefix of the Elasticsearch/OpenSearch indexes [default: sluice].
    #[arg(long, global = true, env = "SLUICE_INDEX_PREFIX")]
    pub index_prefix: Option<String>,
    /// Largest age of a signed SendGrid webhook request [default: 5m].
    #[arg(long, global = true, env = "SLUICE_SENDGRID_MAX_AGE", value_parser = parse_duration)]
    pub sendgrid_max_age: Option<Duration>,
    /// Age past which a webhook action becomes a dead letter [default: 24h].
    #[arg(long, global = true, env = "SLUICE_ACTION_MAX_AGE", value_parser = parse_duration)]
    pub action_max_age: Option<Duration>,
    /// Most bytes the spill buffer holds, 0 to disable spilling [default: 1073741824].
    #[arg(long, global = true, env = "SLUICE_SPILL_MAX_BYTES")]
    pub spill_max_bytes: Option<u64>,
    /// Pause between spill replay attempts while the log fails [default: 1s].
    #[arg(long, global = true, env = "SLUICE_REPLAY_INTERVAL", value_parser = parse_duration)]
    pub replay_interval: Option<Duration>,
    /// Most request body bytes handled at once [default: 268435456].
    #[arg(long, global = true, env = "SLUICE_MAX_IN_FLIGHT_BYTES")]
    pub max_in_flight_bytes: Option<usize>,
    /// Token `/`, `/stats` and `/metrics` require as `Authorization: Bearer` (unset: open)
    /// [default: ].
    #[arg(long, global = true, env = "SLUICE_ADMIN_TOKEN", value_name = "TOKEN")]
    pub admin_token: Option<String>,
    /// Log lines on stderr: text or json [default: text].
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Browser origins that may call the write routes, comma-separated (default: *, any).
    #[arg(
        long,
        global = true,
        env = "SLUICE_CORS_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Option<Vec<String>>,
    /// Offer the read routes to those origins too [default: false].
    #[arg(long, global = true, env = "SLUICE_CORS_READ", value_name = "BOOL")]
    pub cors_read: Option<bool>,
    /// Messages per second each org may send, per API node; 0: unlimited [default: 0].
    #[arg(
        long,
        global = true,
        env = "SLUICE_ORG_EVENTS_PER_SECOND",
        value_name = "N"
    )]
    pub org_events_per_second: Option<u32>,
}

/// Kafka's legal topic names (also safe as a directory name); `.` and `..` excluded.
fn valid_topic(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 250ms, 5s, 2m, 7days)"))
}

/// Where the log lives (`log`): the embedded log under the data dir, or a Kafka cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum LogBackend {
    Embedded,
    /// `kafka://host:9092[,host:9093...]`.
    Kafka {
        url: String,
        brokers: String,
    },
}

/// Where the dedup store lives (`dedup`): embedded, or a Redis server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum DedupBackend {
    Embedded,
    /// `redis://host:6379[/db]` (or `rediss://`).
    Redis {
        url: String,
    },
}

/// Where the index lives (`index`): embedded, or Elasticsearch/OpenSearch.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum IndexBackend {
    Embedded,
    /// `http(s)://host:9200`.
    Elastic {
        url: String,
    },
}

/// Where the registry lives (`registry`): SQLite under the data dir, or PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum RegistryBackend {
    Embedded,
    /// `postgres://user@host:5432/db`.
    Postgres {
        url: String,
    },
}

const EMBEDDED: &str = "embedded";

/// `FromStr` from `String` (serde's `try_from`), and `Display` (and serde's `into`) as the
/// setting was written, passwords redacted.
macro_rules! backend_setting {
    ($backend:ident, $variant:ident, $parse:expr) => {
        impl $backend {
            /// The URL as written; `None` for `embedded`.
            fn url(&self) -> Option<&str> {
                match self {
                    $backend::Embedded => None,
                    $backend::$variant { url, .. } => Some(url),
                }
            }
        }

        impl std::str::FromStr for $backend {
            type Err = String;
            fn from_str(text: &str) -> Result<Self, String> {
                $parse(text)
            }
        }

        impl TryFrom<String> for $backend {
            type Error = String;
            fn try_from(text: String) -> Result<Self, String> {
                text.parse()
            }
        }

        impl std::fmt::Display for $backend {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&sluice_model::url::redacted(self.url().unwrap_or(EMBEDDED)))
            }
        }

        /// Serialized redacted, as `Display`.
        impl From<$backend> for String {
            fn from(backend: $backend) -> String {
                backend.to_string()
            }
        }
    };
}

backend_setting!(LogBackend, Kafka, |text: &str| {
    if text == EMBEDDED {
        return Ok(LogBackend::Embedded);
    }
    sluice_log::KafkaLogConfig::brokers_from_url(text)
        .map(|brokers| LogBackend::Kafka {
            url: text.to_string(),
            brokers,
        })
        .map_err(|e| format!("log = {text:?}: {e}"))
});

backend_setting!(DedupBackend, Redis, |text: &str| match text {
    EMBEDDED => Ok(DedupBackend::Embedded),
    url if url.starts_with("redis://") || url.starts_with("rediss://") => {
        Ok(DedupBackend::Redis { url: url.into() })
    }
    other => Err(format!(
        "dedup = {other:?}: expected `embedded` or redis://host:6379[/db]"
    )),
});

backend_setting!(IndexBackend, Elastic, |text: &str| match text {
    EMBEDDED => Ok(IndexBackend::Embedded),
    url if url.starts_with("http://") || url.starts_with("https://") => {
        Ok(IndexBackend::Elastic { url: url.into() })
    }
    other => Err(format!(
        "index = {:?}: expected `embedded` or http(s)://host:9200 (Elasticsearch/OpenSearch)",
        sluice_model::url::redacted(other)
    )),
});

backend_setting!(RegistryBackend, Postgres, |text: &str| match text {
    EMBEDDED => Ok(RegistryBackend::Embedded),
    url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
        Ok(RegistryBackend::Postgres { url: url.into() })
    }
    other => Err(format!(
        "registry = {:?}: expected `embedded` or postgres://user@host:5432/db",
        sluice_model::url::redacted(other)
    )),
});

/// A secret shown as `***` when set.
fn redacted_secret<S: serde::Serializer>(secret: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if secret.is_empty() { "" } else { "***" })
}

fn redacted_url<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => s.serialize_some(&sluice_model::url::redacted(url)),
        None => s.serialize_none(),
    }
}

mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Defaults < file < env < flags.
    pub fn resolve(args: &ConfigArgs) -> anyhow::Result<Config> {
        let mut config = match &args.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(n) = args.kafka_replication_factor {
            config.kafka_replication_factor = Some(n);
        }
        if let Some(n) = args.kafka_min_insync_replicas {
            config.kafka_min_insync_replicas = Some(n);
        }
        // Parsed here rather than by clap, whose error would repeat the value unredacted.
        macro_rules! overlay_backend {
            ($($field:ident),*) => { $( if let Some(v) = &args.$field { config.$field = v.parse().map_err(anyhow::Error::msg)?; } )* };
        }
        overlay_backend!(log, dedup, index, registry);
        macro_rules! overlay {
            ($($field:ident),*) => { $( if let Some(v) = &args.$field { config.$field = v.clone(); } )* };
        }
        overlay!(
            listen,
            data_dir,
            partitions,
            log_ack_timeout,
            shutdown_timeout,
            max_item_bytes,
            max_request_bytes,
            max_request_items,
            retention_max_age,
            retention_max_bytes,
            key_cache_ttl,
            batch_size,
            batch_timeout,
            dedup_window,
            topic,
            kafka_session_timeout,
            kafka_instance_id,
            dedup_key_prefix,
            index_prefix,
            sendgrid_max_age,
            action_max_age,
            spill_max_bytes,
            replay_interval,
            max_in_flight_bytes,
            admin_token,
            log_format,
            cors_origins,
            cors_read,
            org_events_per_second
        );
        config.validate().map_err(|e| {
            e.context(match &args.config {
                Some(path) => format!(
                    "invalid configuration ({} with the SLUICE_* variables and flags over it)",
                    path.display()
                ),
                None => "invalid configuration (the defaults with the SLUICE_* variables and flags over them)".to_string(),
            })
        })?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// The API's CORS settings.
    pub fn cors(&self) -> sluice_api::CorsConfig {
        sluice_api::CorsConfig {
            origins: self.cors_origins.clone(),
            read: self.cors_read,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.cors().validate().map_err(anyhow::Error::msg)?;
        if self.topic.trim().is_empty() {
            bail!("topic must not be empty");
        }
        if self.partitions == 0 {
            bail!("partitions must be at least 1");
        }
        if self.kafka_replication_factor == Some(0) {
            bail!("kafka_replication_factor must be at least 1");
        }
        if let (Some(min), factor) = (
            self.kafka_min_insync_replicas,
            self.kafka_replication_factor,
        ) && (min == 0 || factor.is_some_and(|f| min > f))
        {
            bail!(
                "kafka_min_insync_replicas = {min}: must be from 1 to kafka_replication_factor ({})",
                factor.map_or("3 by default".to_string(), |f| f.to_string())
            );
        }
        if let Some(key) = self.kafka_options.0.keys().find(|k| {
            matches!(
                k.as_str(),
                "bootstrap.servers" | "group.id" | "enable.auto.commit"
            )
        }) {
            bail!(
                "[kafka_options] {key:?}: set by sluice itself (bootstrap.servers comes from `log`; groups and commits are the pipeline's)"
            );
        }
        if let Some(key) = self.kafka_options.0.keys().find(|k| {
            matches!(
                k.as_str(),
                "message.timeout.ms" | "delivery.timeout.ms" | "enable.idempotence" | "acks"
            )
        }) {
            bail!(
                "[kafka_options] {key:?}: set by sluice itself: an idempotent acks=all producer whose records never time out is what keeps every acknowledged message, in each user's order (how long the API waits for the log is log_ack_timeout)"
            );
        }
        if self.batch_size == 0 {
            bail!("batch_size must be at least 1");
        }
        if self.max_item_bytes == 0 || self.max_request_bytes == 0 || self.max_request_items == 0 {
            bail!("max_item_bytes, max_request_bytes and max_request_items must be positive");
        }
        if self.max_in_flight_bytes == 0 {
            bail!("max_in_flight_bytes must be positive");
        }
        if self.replay_interval.is_zero() {
            bail!("replay_interval must be positive");
        }
        let mut names = std::collections::HashSet::new();
        for (i, rule) in self.triggers.iter().enumerate() {
            let place = format!("[[triggers]] #{} (name = {:?})", i + 1, rule.name);
            if !sluice_pipeline::trigger::valid_rule_name(&rule.name) {
                bail!(
                    "{place}: name must be 1 to 64 of A-Z a-z 0-9 _ . - (it is part of idempotency keys)"
                );
            }
            if !names.insert(rule.name.as_str()) {
                bail!("{place}: another trigger has the same name");
            }
            if rule.event.is_empty() {
                bail!("{place}: event must name the eventName to match");
            }
            match (&rule.webhook, &rule.topic) {
                (Some(url), None) => {
                    let parsed = sluice_pipeline::trigger::Url::parse(url).map_err(|e| {
                        anyhow::anyhow!(
                            "{place}: webhook {:?} is not a URL: {e}",
                            sluice_model::url::redacted(url)
                        )
                    })?;
                    if !matches!(parsed.scheme(), "http" | "https") {
                        bail!("{place}: webhook must be an http:// or https:// URL");
                    }
                }
                (None, Some(topic)) => {
                    if !valid_topic(topic) {
                        bail!(
                            "{place}: topic {topic:?} must be 1 to 249 of A-Z a-z 0-9 _ . - (a Kafka topic name)"
                        );
                    }
                }
                _ => bail!("{place}: set exactly one of webhook or topic"),
            }
        }
        Ok(())
    }

    pub fn registry_path(&self) -> PathBuf {
        self.data_dir.join("registry.db")
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join("log")
    }

    pub fn dlq_path(&self) -> PathBuf {
        self.data_dir.join("dlq")
    }

    /// The embedded log standing in for an actions topic.
    pub fn actions_path(&self, topic: &str) -> PathBuf {
        self.data_dir.join("actions").join(topic)
    }

    pub fn spill_path(&self) -> PathBuf {
        self.data_dir.join("spill")
    }

    pub fn dedup_path(&self) -> PathBuf {
        self.data_dir.join("dedup")
    }

    pub fn index_path(&self) -> PathBuf {
        self.data_dir.join("index")
    }

    /// A Kafka log's settings for `topic` on `brokers`: replication, the `[kafka_options]`
    /// passthrough, partitions, and how its consumer groups join (session timeout, drain on
    /// revoke, static membership). The caller sets what is particular to its use.
    pub fn kafka_log_config(&self, brokers: &str, topic: &str) -> sluice_log::KafkaLogConfig {
        let mut kafka = sluice_log::KafkaLogConfig::new(brokers, topic);
        kafka.partitions = self.partitions;
        kafka.replication_factor = self.kafka_replication_factor.map(|n| n as i32);
        kafka.min_insync_replicas = self.kafka_min_insync_replicas.map(|n| n as i32);
        kafka.options = self
            .kafka_options
            .0
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        kafka.session_timeout = self.kafka_session_timeout;
        kafka.revoke_timeout = self.shutdown_timeout;
        kafka.instance_id = Some(self.kafka_instance_id());
        kafka
    }

    /// The Kafka brokers, when the log is Kafka.
    pub fn kafka_brokers(&self) -> Option<String> {
        match &self.log {
            LogBackend::Kafka { brokers, .. } => Some(brokers.clone()),
            LogBackend::Embedded => None,
        }
    }

    /// `kafka_instance_id`, or one derived from the host name and the absolute data dir, which
    /// is stable across restarts and differs between nodes that do not share a data dir.
    pub fn kafka_instance_id(&self) -> String {
        if !self.kafka_instance_id.is_empty() {
            return self.kafka_instance_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".into());
        let dir = std::path::absolute(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
        // FNV-1a: a short, stable name for the directory.
        let hash = dir
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
        format!("sluice-{host}-{:08x}", hash as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_configuration_reads_back_and_hides_every_secret() {
        let defaults = Config::default();
        let text = toml::to_string(&defaults).expect("serializes");
        assert_eq!(
            toml::from_str::<Config>(&text).expect("reads back"),
            defaults,
            "{text}"
        );
        let mut config = Config {
            dedup: "redis://:hunter2@redis:6379".parse().expect("url"),
            registry: "postgres://sluice:hunter3@db/sluice".parse().expect("url"),
            ..Config::default()
        };
        config
            .kafka_options
            .0
            .insert("sasl.password".into(), "hunter4".into());
        config.triggers.push(TriggerConfig {
            name: "welcome".into(),
            event: "signed_up".into(),
            webhook: Some("https://bot:hunter5@hooks.example/welcome".into()),
            topic: None,
        });
        let text = toml::to_string(&config).expect("serializes");
        for secret in ["hunter2", "hunter3", "hunter4", "hunter5"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        for shown in [
            "sasl.password",
            "hooks.example/welcome",
            "redis:6379",
            "db/sluice",
        ] {
            assert!(text.contains(shown), "{shown} not in {text}");
        }
    }

    #[test]
    fn each_flags_stated_default_is_the_default() {
        let command = ConfigArgs::augment_args(clap::Command::new("sluice"));
        // `DEFAULT_CONFIG_TOML` is tested to be `Config::default()`.
        let defaults: toml::Table = toml::from_str(DEFAULT_CONFIG_TOML).expect("parses");
        let mut checked = 0;
        for arg in command.get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let Some(stated) = help
                .split("[default: ")
                .nth(1)
                .and_then(|rest| rest.split(']').next())
            else {
                continue;
            };
            let key = arg.get_id().as_str();
            let value = match defaults.get(key) {
                Some(toml::Value::String(text)) if text.is_empty() => continue,
                Some(toml::Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
                // Unset by default (the Kafka replication settings): the help says what then.
                None => continue,
            };
            assert_eq!(
                stated, value,
                "--{key}: the help's default is not the default"
            );
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} flags state a default");
    }

    #[test]
    fn the_printed_default_config_is_the_default() {
        let parsed: Config = toml::from_str(DEFAULT_CONFIG_TOML).expect("default config parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:9000\"\npartitions = 4\nlog_ack_timeout = \"2s\"\n",
        )
        .expect("write");
        let args = ConfigArgs {
            config: Some(path.clone()),
            partitions: Some(16),
            ..Default::default()
        };
        let config = Config::resolve(&args).expect("resolves");
        assert_eq!(config.listen, "0.0.0.0:9000", "from the file");
        assert_eq!(config.partitions, 16, "flag beats file");
        assert_eq!(config.log_ack_timeout, Duration::from_secs(2));
        assert_eq!(config.max_request_items, 10_000, "default kept");
    }

    #[test]
    fn the_kafka_instance_id_is_stable_per_data_dir_unless_set() {
        let at = |dir: &str| Config {
            data_dir: PathBuf::from(dir),
            ..Config::default()
        };
        assert_eq!(
            at("/srv/a").kafka_instance_id(),
            at("/srv/a").kafka_instance_id()
        );
        assert_ne!(
            at("/srv/a").kafka_instance_id(),
            at("/srv/b").kafka_instance_id()
        );
        assert!(at("/srv/a").kafka_instance_id().starts_with("sluice-"));
        let set = Config {
            kafka_instance_id: "ingest-3".into(),
            ..at("/srv/a")
        };
        assert_eq!(set.kafka_instance_id(), "ingest-3");
    }

    #[test]
    fn unknown_keys_and_unsupported_backends_are_explained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "listn = \"x\"\n").expect("write");
        let err = format!("{:#}", Config::from_file(&path).expect_err("typo"));
        assert!(
            err.contains("unknown field `listn`") && err.contains("bad.toml"),
            "{err}"
        );
        let args = ConfigArgs {
            index: Some("solr://elastic:secret@localhost:8983".into()),
            ..Default::default()
        };
        let err = Config::resolve(&args).expect_err("unknown").to_string();
        assert!(err.contains("http(s)://host:9200"), "{err}");
        assert!(!err.contains("secret"), "the password is not shown: {err}");
        std::fs::write(&path, "index = \"solr://elastic:secret@localhost:8983\"\n").expect("write");
        let err = format!("{:#}", Config::from_file(&path).expect_err("unknown"));
        // (The TOML error quotes the file's own line; the message after it redacts.)
        assert!(
            err.contains("bad.toml")
                && err.contains("\"solr://elastic:***@localhost:8983\": expected"),
            "{err}"
        );
        let err = "memcached://localhost"
            .parse::<DedupBackend>()
            .expect_err("unknown");
        assert!(err.contains("redis://"), "{err}");
        let err = "mysql://localhost"
            .parse::<RegistryBackend>()
            .expect_err("unknown");
        assert!(err.contains("postgres://"), "{err}");
        let err = "kafka://nohostport"
            .parse::<LogBackend>()
            .expect_err("bad url");
        assert!(err.contains("host:port"), "{err}");
        let args = ConfigArgs {
            log: Some("kafka://127.0.0.1:9092".into()),
            ..Default::default()
        };
        let config = Config::resolve(&args).expect("kafka is supported");
        assert_eq!(config.kafka_brokers().as_deref(), Some("127.0.0.1:9092"));
        assert_eq!(config.log.to_string(), "kafka://127.0.0.1:9092");
        assert_eq!(config.index.to_string(), "embedded");
        let postgres: RegistryBackend = "postgres://u:pw@db:5432/x".parse().expect("postgres");
        assert_eq!(
            postgres.to_string(),
            sluice_model::url::redacted("postgres://u:pw@db:5432/x")
        );
    }

    #[test]
    fn triggers_are_read_from_the_file_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sluice.toml");
        let resolve = |text: &str| {
            std::fs::write(&path, text).expect("write");
            Config::resolve(&ConfigArgs {
                config: Some(path.clone()),
                ..Default::default()
            })
        };
        let config = resolve(
            "[[triggers]]\nname = \"welcome-email\"\nevent = \"signedUp\"\nwebhook = \"http://127.0.0.1:9000/welcome\"\n\n\
             [[triggers]]\nname = \"crm\"\nevent = \"signedUp\"\ntopic = \"sluice.actions\"\n",
        )
        .expect("valid triggers");
        assert_eq!(
            config.triggers,
            [
                TriggerConfig {
                    name: "welcome-email".into(),
                    event: "signedUp".into(),
                    webhook: Some("http://127.0.0.1:9000/welcome".into()),
                    topic: None,
                },
                TriggerConfig {
                    name: "crm".into(),
                    event: "signedUp".into(),
                    webhook: None,
                    topic: Some("sluice.actions".into()),
                },
            ]
        );
        for (text, expected) in [
            (
                "[[triggers]]\nname = \"a\"\nevent = \"e\"\n",
                "exactly one of webhook or topic",
            ),
            (
                "[[triggers]]\nname = \"a\"\nevent = \"e\"\nwebhook = \"http://x\"\ntopic = \"t\"\n",
                "exactly one of webhook or topic",
            ),
            (
                "[[triggers]]\nname = \"a/b\"\nevent = \"e\"\ntopic = \"t\"\n",
                "#1 (name = \"a/b\"): name must be",
            ),
            (
                "[[triggers]]\nname = \"a\"\nevent = \"e\"\nwebhook = \"ftp://x\"\n",
                "http:// or https://",
            ),
            (
                "[[triggers]]\nname = \"a\"\nevent = \"e\"\nwebhook = \"not a url\"\n",
                "is not a URL",
            ),
            (
                "[[triggers]]\nname = \"a\"\nevent = \"e\"\ntopic = \"../x\"\n",
                "a Kafka topic name",
            ),
            (
                "[[triggers]]\nname = \"a\"\nevent = \"e\"\ntopic = \"t\"\n[[triggers]]\nname = \"a\"\nevent = \"f\"\ntopic = \"t\"\n",
                "#2 (name = \"a\"): another trigger has the same name",
            ),
            (
                "[[triggers]]\nname = \"a\"\nevnt = \"e\"\n",
                "unknown field `evnt`",
            ),
        ] {
            let err = format!("{:#}", resolve(text).expect_err(text));
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn kafka_replication_and_options_are_read_checked_and_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sluice.toml");
        let resolve = |text: &str, args: ConfigArgs| {
            std::fs::write(&path, text).expect("write");
            Config::resolve(&ConfigArgs {
                config: Some(path.clone()),
                ..args
            })
        };
        let config = resolve(
            "log = \"kafka://127.0.0.1:9092\"\nkafka_replication_factor = 3\n\
             [kafka_options]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.password\" = \"hunter2\"\n\
             \"linger.ms\" = 5\n\"enable.ssl.certificate.verification\" = false\n",
            ConfigArgs {
                kafka_min_insync_replicas: Some(2),
                ..Default::default()
            },
        )
        .expect("valid");
        let kafka = config.kafka_log_config("127.0.0.1:9092", "sluice.ingest");
        assert_eq!(kafka.replication_factor, Some(3));
        assert_eq!(
            kafka.min_insync_replicas,
            Some(2),
            "the flag lies over the file"
        );
        assert_eq!(
            kafka.options,
            vec![
                (
                    "enable.ssl.certificate.verification".to_string(),
                    "false".to_string()
                ),
                ("linger.ms".to_string(), "5".to_string()),
                ("sasl.password".to_string(), "hunter2".to_string()),
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
            ]
        );
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("sasl.password"),
            "{shown}"
        );
        let unset = Config::default().kafka_log_config("b:9092", "t");
        assert_eq!(
            (unset.replication_factor, unset.min_insync_replicas),
            (None, None)
        );
        assert!(
            unset
                .unlimited_retention
                .contains(&"sluice.dlq".to_string())
        );

        for (text, expected) in [
            (
                "kafka_replication_factor = 0\n",
                "kafka_replication_factor must be at least 1",
            ),
            (
                "kafka_replication_factor = 2\nkafka_min_insync_replicas = 3\n",
                "kafka_min_insync_replicas = 3: must be from 1 to kafka_replication_factor (2)",
            ),
            (
                "[kafka_options]\n\"bootstrap.servers\" = \"elsewhere:9092\"\n",
                "bootstrap.servers comes from `log`",
            ),
            (
                "[kafka_options]\n\"message.timeout.ms\" = 30000\n",
                "[kafka_options] \"message.timeout.ms\": set by sluice itself: an idempotent acks=all producer whose records never time out",
            ),
            (
                "[kafka_options]\n\"linger.ms\" = [5]\n",
                "[kafka_options] \"linger.ms\": a librdkafka property is a string, number or boolean",
            ),
        ] {
            let err = format!(
                "{:#}",
                resolve(text, ConfigArgs::default()).expect_err(text)
            );
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
