//! The search store (SPEC §6 step 5, and the read API of SPEC §4): where profiles and events end
//! up, and where they are read, filtered and aggregated.
//!
//! The `Index` trait is the whole contract:
//! - `write`: one bulk write of merged user upserts and events. When it returns `Ok`, every
//!   write in it is durable and visible to reads. Users are upserted by doc id
//!   `<org>:<userKey>`: the patch is applied to the stored profile. Events are written by doc id
//!   `<org>:<messageId>`, so writing one again replaces it instead of adding a copy.
//! - `get_user`, `get_user_by_email`, `user_events`: point reads, org-scoped.
//! - `search`: a Lucene-syntax query string plus Elasticsearch-style aggregations, org-scoped.
//!
//! `embedded` implements it on tantivy under the data dir; `elastic` on an Elasticsearch or
//! OpenSearch cluster over its HTTP API. Both give the same answers in the same shapes (`doc`
//! holds the documents they share).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use sluice_model::Patch;

mod doc;
pub mod elastic;
pub mod embedded;
#[cfg(feature = "testing")]
pub mod testing;

pub use doc::{EventSource, profile_after};
pub use elastic::{ElasticIndex, ElasticIndexConfig};
pub use embedded::{EmbeddedIndex, EmbeddedIndexConfig};

/// A merged update of one user: the fold of that user's updates in a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct UserUpsert {
    pub org: String,
    /// `u:<userId>` or `e:<email>`, as in the record key.
    pub user_key: String,
    /// The latest `userId` / `email` the updates carried (a profile keyed by userId can carry an
    /// email, and the other way round).
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub patch: Patch,
    /// `receivedAt` of the last folded update, unix ms.
    pub updated_at: i64,
    /// The log position after the last folded update (its offset + 1), when the upsert comes
    /// from the log. A search index stores it as the profile's version and refuses an upsert
    /// whose version is not above the stored one: that upsert's updates are already in (a
    /// replay), or it comes from a member that lost the partition while its write was on the
    /// way (a stale writer), which must not undo a newer owner's writes. A user's key maps to
    /// one partition, so its versions are comparable. The embedded index has one writer and
    /// ignores it.
    pub version: Option<u64>,
}

/// One event, as it is stored.
#[derive(Debug, Clone)]
pub struct EventDoc {
    pub org: String,
    pub message_id: String,
    pub user_key: String,
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub event_name: String,
    /// unix ms: the client's `createdAt`, else `receivedAt`.
    pub created_at: i64,
    pub received_at: i64,
    /// The event's `dataFields`: a JSON object, as the client wrote it.
    pub data_fields: Box<RawValue>,
    /// More top-level fields of the stored event, as sent: a JSON object whose keys are among
    /// Segment's `context`, `integrations`, `timestamp`, `originalTimestamp` and `sentAt`.
    pub segment: Option<Box<RawValue>>,
}

/// One bulk write. Users and events of many partitions may share one durable commit.
/// `forgets` are applied first: a user forgotten and then written again in one batch is
/// created anew.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    pub users: Vec<UserUpsert>,
    pub events: Vec<EventDoc>,
    pub forgets: Vec<Forget>,
    /// No earlier write can hold these events: their records were appended to the log after
    /// the writer took their partition, so this is the first time they are written. The
    /// embedded index then adds them without looking each one up (a lookup per event in every
    /// segment, the cost that grows with the index); when `false` (a replay, or unknown) it
    /// looks each up and replaces what it finds. A search server indexes by id either way.
    pub unseen: bool,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.events.is_empty() && self.forgets.is_empty()
    }

    pub fn len(&self) -> usize {
        self.users.len() + self.events.len() + self.forgets.len()
    }
}

/// Forgetting one user (a `user_delete`, SPEC §4): the profile with this key and every event
/// of it leave the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forget {
    pub org: String,
    /// `u:<userId>` or `e:<email>`.
    pub user_key: String,
    /// The log position after the `user_delete`: on a search server, the profile's delete is
    /// versioned with it like an upsert, so an older upsert replayed later does not bring the
    /// profile back while the server remembers the delete.
    pub version: u64,
}

/// A document the index refused for its content: an unrecoverable error (dead letter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    User { position: usize, reason: String },
    Event { position: usize, reason: String },
}

/// What a write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Documents refused for their content (positions in `WriteBatch::users` / `events`);
    /// everything else was written.
    pub refused: Vec<Refused>,
}

/// Which documents a search runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Users,
    Events,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Users => "users",
            Target::Events => "events",
        }
    }
}

/// `POST /api/search/users|events` body.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// Lucene syntax; empty or absent matches everything.
    #[serde(default)]
    pub query: String,
    #[serde(default = "default_size")]
    pub size: usize,
    /// Elasticsearch-style aggregations, passed through as JSON.
    #[serde(default)]
    pub aggs: Option<Value>,
}

fn default_size() -> usize {
    10
}

impl SearchRequest {
    /// Refuses what no backend runs: a `size` over `MAX_SEARCH_SIZE`.
    pub fn check(&self) -> Result<(), IndexError> {
        if self.size > MAX_SEARCH_SIZE {
            return Err(IndexError::BadRequest(format!(
                "size {} is too large: at most {MAX_SEARCH_SIZE}",
                self.size
            )));
        }
        Ok(())
    }
}

/// The largest `size` a search accepts.
pub const MAX_SEARCH_SIZE: usize = 10_000;

/// The answer to a search: the same shape on every backend.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SearchResponse {
    pub total: u64,
    pub hits: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregations: Option<Value>,
}

/// What can go wrong at the index boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IndexError {
    /// The client's query or aggregation is wrong (a 400).
    #[error("{0}")]
    BadRequest(String),
    #[error("index storage error at {path}: {message}")]
    Storage { path: String, message: String },
    /// The search store cannot be reached or does not take requests right now (connection,
    /// timeout, 429, 5xx, documents still failing after retries).
    #[error("the index at {server} is unavailable: {message}")]
    Unavailable { server: String, message: String },
    /// The search store refused a request it should have taken: a wrong URL, an incompatible
    /// server, a bug. Trying again does not help.
    #[error("the index at {server} refused a request: {message}")]
    Rejected { server: String, message: String },
    /// A setting is wrong (the index URL, say).
    #[error("{0}")]
    Config(String),
    #[error("the index is closed")]
    Closed,
}

impl sluice_model::Recoverable for IndexError {
    fn is_recoverable(&self) -> bool {
        matches!(
            self,
            IndexError::Storage { .. } | IndexError::Unavailable { .. }
        )
    }
}

/// The search store. See the crate docs for the guarantees.
#[async_trait]
pub trait Index: Send + Sync + 'static {
    /// Writes a batch; durable and visible when it returns `Ok`.
    async fn write(&self, batch: std::sync::Arc<WriteBatch>) -> Result<WriteOutcome, IndexError>;

    /// The profile with doc id `<org>:<user_key>`.
    async fn get_user(&self, org: &str, user_key: &str) -> Result<Option<Value>, IndexError>;

    /// The profiles of several `(org, user_key)`s, in order (the trigger stage's profiles
    /// before a batch). Backends with a multi-get override this one-by-one default.
    async fn get_users(&self, users: &[(&str, &str)]) -> Result<Vec<Option<Value>>, IndexError> {
        let mut profiles = Vec::with_capacity(users.len());
        for (org, user_key) in users {
            profiles.push(self.get_user(org, user_key).await?);
        }
        Ok(profiles)
    }

    /// The most recently updated profile that carries this email.
    async fn get_user_by_email(&self, org: &str, email: &str) -> Result<Option<Value>, IndexError>;

    /// A user's events, newest (`createdAt`) first.
    async fn user_events(
        &self,
        org: &str,
        user_key: &str,
        limit: usize,
    ) -> Result<Vec<Value>, IndexError>;

    async fn search(
        &self,
        org: &str,
        target: Target,
        request: &SearchRequest,
    ) -> Result<SearchResponse, IndexError>;

    /// Whether the index takes writes now; `Err` says what is wrong and where (a search
    /// index closed or red, the server unreachable). Cheap: `/readyz` asks it.
    async fn health(&self) -> Result<(), IndexError> {
        Ok(())
    }

    /// Finishes pending writes and releases resources.
    async fn close(&self) -> Result<(), IndexError>;
}
