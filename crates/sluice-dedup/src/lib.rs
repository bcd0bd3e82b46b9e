//! The dedup store (SPEC §6 step 3 and 6): which messages were already processed.
//!
//! A message is identified by (org, message id). `check` answers, for a batch of ids, which
//! were marked within the window (default 7 days); `mark` records a batch as processed. The
//! pipeline marks only after the index write succeeded and before it commits the offset, so a
//! redelivered message is recognised and skipped.
//!
//! `embedded` implements it on fjall under the data dir; `redis` on a Redis server, for the
//! distributed shape.

use async_trait::async_trait;

#[cfg(any(test, feature = "testing"))]
pub mod contract;
pub mod embedded;
pub mod redis;
#[cfg(feature = "testing")]
pub mod testing;

pub use embedded::EmbeddedDedup;
pub use redis::{RedisDedup, RedisDedupConfig};

/// Default dedup window: 7 days.
pub const DEFAULT_WINDOW: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// One message's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageKey<'a> {
    pub org: &'a str,
    pub message_id: &'a str,
}

/// One payload for [`Dedup::stash`].
#[derive(Debug, Clone, Copy)]
pub struct Stash<'a> {
    pub key: MessageKey<'a>,
    pub payload: &'a [u8],
    /// Whether to stash the payload if none is stashed under the key (`false` only looks an
    /// earlier one up).
    pub keep: bool,
}

impl<'a> Stash<'a> {
    /// `payload`, to stash under `key` unless one is stashed there.
    pub fn kept(key: MessageKey<'a>, payload: &'a [u8]) -> Stash<'a> {
        Stash {
            key,
            payload,
            keep: true,
        }
    }

    /// Only a look-up of what is stashed under `key` (`payload` is the one to use if nothing).
    pub fn looked_up(key: MessageKey<'a>, payload: &'a [u8]) -> Stash<'a> {
        Stash {
            key,
            payload,
            keep: false,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DedupError {
    #[error("dedup store error at {path}: {message}")]
    Storage { path: String, message: String },
    /// The server could not be reached or did not answer; retrying may succeed.
    #[error("dedup store {server}: {message}")]
    Unavailable { server: String, message: String },
    #[error("invalid dedup store configuration: {0}")]
    Config(String),
}

/// Storage errors (a full disk, say) and an unreachable server may pass; a wrong setting does
/// not.
impl sluice_model::Recoverable for DedupError {
    fn is_recoverable(&self) -> bool {
        !matches!(self, DedupError::Config(_))
    }
}

#[async_trait]
pub trait Dedup: Send + Sync + 'static {
    /// For each key, in order, whether it was marked within the window.
    async fn check(&self, keys: &[MessageKey<'_>]) -> Result<Vec<bool>, DedupError>;

    /// Marks every key as processed now. Durable when it returns.
    async fn mark(&self, keys: &[MessageKey<'_>]) -> Result<(), DedupError>;

    /// The trigger outbox (SPEC §6 step 7): for each entry, in order, the payload stashed
    /// under its key within the window, if there is one. When there is none the entry's own
    /// payload is the one, and it is stashed now if the entry says `keep`. Durable when it
    /// returns. Stashes live beside the marks, never mixed with them: a stashed key is not
    /// marked.
    async fn stash(&self, entries: &[Stash<'_>]) -> Result<Vec<Option<Vec<u8>>>, DedupError>;

    /// Drops the stashed payloads of these keys (their actions fired).
    async fn unstash(&self, keys: &[MessageKey<'_>]) -> Result<(), DedupError>;

    /// Whether the store answers (`/readyz`): a server is reached, a local store is open.
    async fn health(&self) -> Result<(), DedupError>;
}
