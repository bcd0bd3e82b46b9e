//! The dedup store on Redis (SPEC §2, distributed shape): one key per processed message,
//! `<prefix>:<org>:<message id>`, set with the window as its time to live, so Redis forgets
//! marks by itself.
//!
//! A batch is one round trip either way: `check` pipelines one `EXISTS` per key, `mark` one
//! `SET key 1 EX <window> NX` per key (the first processing time stands). The connection
//! manager reconnects by itself; while Redis is unreachable every call fails with a retriable
//! error naming the server, and the pipeline retries with backoff without skipping or
//! committing anything.
//!
//! Durability is Redis's own: with persistence off, a Redis restart forgets the marks and
//! messages redelivered after it are processed again (the index writes are idempotent).

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::{Dedup, DedupError, MessageKey, Stash};

/// Settings of the Redis dedup store.
#[derive(Debug, Clone)]
pub struct RedisDedupConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// How long a mark is kept.
    pub window: Duration,
    /// Namespace of the keys.
    pub prefix: String,
    /// How long one round trip may take before it counts as failed.
    pub timeout: Duration,
}

impl RedisDedupConfig {
    pub fn new(url: impl Into<String>, window: Duration) -> Self {
        RedisDedupConfig {
            url: url.into(),
            window,
            prefix: "sluice:dedup".into(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// The dedup store on a Redis server.
#[derive(Clone)]
pub struct RedisDedup {
    connection: ConnectionManager,
    config: RedisDedupConfig,
    window_secs: u64,
    /// Pipelines sent (one per `check` or `mark` call), shared by clones, for benchmarks and
    /// stats.
    round_trips: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl RedisDedup {
    /// Connects (the first connection must succeed, so a wrong URL fails at start).
    pub async fn connect(config: RedisDedupConfig) -> Result<RedisDedup, DedupError> {
        let unavailable = |message: String| DedupError::Unavailable {
            server: sluice_model::url::redacted(&config.url),
            message,
        };
        let client = redis::Client::open(config.url.as_str()).map_err(|e| {
            DedupError::Config(format!("{}: {e}", sluice_model::url::redacted(&config.url)))
        })?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout));
        let connection = tokio::time::timeout(
            config.timeout * 2,
            ConnectionManager::new_with_config(client, manager),
        )
        .await
        .map_err(|_| unavailable(format!("no connection within {:?}", config.timeout * 2)))?
        .map_err(|e| unavailable(format!("cannot connect: {e}")))?;
        let window_secs = config.window.as_secs().max(1);
        Ok(RedisDedup {
            connection,
            config,
            window_secs,
            round_trips: Default::default(),
        })
    }

    /// Round trips to Redis so far: one per non-empty `check` and one per non-empty `mark`,
    /// whatever the number of ids (each is one pipeline).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_round_trip(&self) {
        self.round_trips
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn key(&self, key: &MessageKey<'_>) -> String {
        format!("{}:{}:{}", self.config.prefix, key.org, key.message_id)
    }

    /// Stashed payloads live under `<prefix>/stash:`, apart from every mark (`<prefix>:`).
    fn stash_key(&self, key: &MessageKey<'_>) -> String {
        format!(
            "{}/stash:{}:{}",
            self.config.prefix, key.org, key.message_id
        )
    }

    fn error(&self, what: &str, e: &redis::RedisError) -> DedupError {
        DedupError::Unavailable {
            server: sluice_model::url::redacted(&self.config.url),
            message: format!("{what}: {e}"),
        }
    }
}

#[async_trait]
impl Dedup for RedisDedup {
    async fn check(&self, keys: &[MessageKey<'_>]) -> Result<Vec<bool>, DedupError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.exists(self.key(key));
        }
        let mut connection = self.connection.clone();
        self.count_round_trip();
        pipe.query_async::<Vec<bool>>(&mut connection)
            .await
            .map_err(|e| self.error("checking message ids", &e))
    }

    async fn mark(&self, keys: &[MessageKey<'_>]) -> Result<(), DedupError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET")
                .arg(self.key(key))
                .arg(1)
                .arg("EX")
                .arg(self.window_secs)
                .arg("NX")
                .ignore();
        }
        let mut connection = self.connection.clone();
        self.count_round_trip();
        pipe.query_async::<()>(&mut connection)
            .await
            .map_err(|e| self.error("marking message ids", &e))
    }

    async fn stash(&self, entries: &[Stash<'_>]) -> Result<Vec<Option<Vec<u8>>>, DedupError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // Per entry, in one pipeline on one connection: for a kept entry SET NX, which answers
        // OK when its payload is stashed now; then GET, which reads whichever is stashed.
        let mut pipe = redis::pipe();
        for entry in entries {
            let key = self.stash_key(&entry.key);
            if entry.keep {
                pipe.cmd("SET")
                    .arg(&key)
                    .arg(entry.payload)
                    .arg("EX")
                    .arg(self.window_secs)
                    .arg("NX");
            }
            pipe.get(key);
        }
        let mut connection = self.connection.clone();
        self.count_round_trip();
        let failed = |e: redis::RedisError| self.error("stashing trigger payloads", &e);
        let mut answers = pipe
            .query_async::<Vec<redis::Value>>(&mut connection)
            .await
            .map_err(failed)?
            .into_iter();
        let mut found = Vec::with_capacity(entries.len());
        for entry in entries {
            let stashed_now = if entry.keep {
                let set: Option<String> =
                    redis::from_redis_value(answers.next().unwrap_or(redis::Value::Nil))
                        .map_err(|e| failed(e.into()))?;
                set.as_deref() == Some("OK")
            } else {
                false
            };
            let stored: Option<Vec<u8>> =
                redis::from_redis_value(answers.next().unwrap_or(redis::Value::Nil))
                    .map_err(|e| failed(e.into()))?;
            found.push(if stashed_now { None } else { stored });
        }
        Ok(found)
    }

    async fn health(&self) -> Result<(), DedupError> {
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map(|_| ())
            .map_err(|e| self.error("PING", &e))
    }

    async fn unstash(&self, keys: &[MessageKey<'_>]) -> Result<(), DedupError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.del(self.stash_key(key)).ignore();
        }
        let mut connection = self.connection.clone();
        self.count_round_trip();
        pipe.query_async::<()>(&mut connection)
            .await
            .map_err(|e| self.error("dropping fired trigger payloads", &e))
    }
}
