//! The registry: orgs, API keys and banned users.
//!
//! `Registry` is the contract; `SqliteRegistry` is the embedded implementation (one SQLite file
//! in WAL mode, so admin commands can change it while a server runs), `PostgresRegistry` the
//! shared one for the distributed shape. API keys are random
//! 192-bit secrets; only their SHA-256 is stored, so a leaked registry leaks no key.
//!
//! Invariant: org names are `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`. They appear in log record keys
//! (`<org>:<userKey>`), so they never contain `:`.

mod keys;
mod postgres;
mod scope;
mod sql;
mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;

use async_trait::async_trait;

pub use keys::{generate_key, hash_key};
pub use postgres::PostgresRegistry;
pub use scope::{Access, KeyInfo, KeyScope};
pub use sqlite::SqliteRegistry;

/// The org every first start of an empty data dir creates.
pub const DEFAULT_ORG: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Org {
    pub id: i64,
    pub name: String,
    pub active: bool,
    /// Unix seconds.
    pub created_at: i64,
    /// The SendGrid Event Webhook verification key (base64 DER of an ECDSA P-256 public key);
    /// when set, webhook calls must carry a valid signature.
    pub sendgrid_key: Option<String>,
    /// The org's own rate limit (`sluice orgs set-limit`); `None`: the server's default.
    pub limit: Option<RateLimit>,
}

/// Messages per second an org may send, and how many above that rate at once (SPEC §3).
/// `per_second` 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry database {location}: {source}")]
    Database {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("registry database {location}: migration failed: {source}")]
    Migration {
        location: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("org {0:?} already exists")]
    OrgExists(String),
    #[error("no org named {0:?} (see `sluice orgs list`)")]
    NoSuchOrg(String),
    #[error("invalid org name {name:?}: {reason}")]
    InvalidOrgName { name: String, reason: &'static str },
    #[error("invalid user id: {0}")]
    InvalidUserId(&'static str),
    #[error(
        "no key has an id starting with {0:?} (ids are 8 to 12 hex digits; see `sluice keys list --org NAME`)"
    )]
    NoSuchKey(String),
    #[error(
        "more than one key has an id starting with {0:?}: give more of it (see `sluice keys list --org NAME`)"
    )]
    AmbiguousKey(String),
}

/// A database that cannot be reached, is restarting, busy or out of space may recover;
/// a wrong query, a failed migration or a refused name do not.
impl sluice_model::Recoverable for RegistryError {
    fn is_recoverable(&self) -> bool {
        match self {
            RegistryError::Database { source, .. } => database_may_recover(source),
            _ => false,
        }
    }
}

fn database_may_recover(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        // Closed at shutdown, while a stage may still be retrying: the stop ends it.
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLite's primary result codes: busy, locked, I/O error, full.
                code.parse::<u32>()
                    .is_ok_and(|code| matches!(code & 0xff, 5 | 6 | 10 | 13))
            } else {
                // PostgreSQL's SQLSTATE classes 08 (connection), 40 (transaction rollback),
                // 53 (insufficient resources), 57 (operator intervention: a shutdown or a
                // restart), and 55P03 (lock not available).
                ["08", "40", "53", "57"]
                    .iter()
                    .any(|class| code.starts_with(class))
                    || code == "55P03"
            }
        }
        _ => false,
    }
}

/// The result of an `UPDATE orgs … WHERE name = …` that changed `rows` rows.
pub(crate) fn org_updated(rows: u64, name: &str) -> Result<(), RegistryError> {
    if rows == 0 {
        return Err(RegistryError::NoSuchOrg(name.to_string()));
    }
    Ok(())
}

/// Checks an org name against the invariant in the crate docs.
pub fn validate_org_name(name: &str) -> Result<(), RegistryError> {
    let invalid = |reason| {
        Err(RegistryError::InvalidOrgName {
            name: name.to_string(),
            reason,
        })
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return invalid("it is empty"),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return invalid("it must start with a letter or digit");
        }
        Some(_) => {}
    }
    if name.len() > 64 {
        return invalid("it is longer than 64 characters");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return invalid("only letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

/// Orgs, keys and bans. Every method is one short query; callers cache hot lookups.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    async fn create_org(&self, name: &str) -> Result<Org, RegistryError>;
    async fn list_orgs(&self) -> Result<Vec<Org>, RegistryError>;
    async fn org(&self, name: &str) -> Result<Option<Org>, RegistryError>;
    /// Disables (or re-enables) an org: its keys stop working and its messages are refused.
    async fn set_org_active(&self, name: &str, active: bool) -> Result<(), RegistryError>;
    /// Sets (or, with `None`, clears) the org's SendGrid verification key. The caller checks
    /// that it is a valid key.
    async fn set_sendgrid_key(&self, name: &str, key: Option<&str>) -> Result<(), RegistryError>;
    /// Sets (or, with `None`, clears: the server's default applies) the org's rate limit.
    async fn set_org_limit(
        &self,
        name: &str,
        limit: Option<RateLimit>,
    ) -> Result<(), RegistryError>;
    /// Creates a key of `scope` for `org` and returns it; this is the only time the key is
    /// seen.
    async fn create_scoped_key(&self, org: &str, scope: KeyScope) -> Result<String, RegistryError>;
    /// A full key (see [`Registry::create_scoped_key`]).
    async fn create_key(&self, org: &str) -> Result<String, RegistryError> {
        self.create_scoped_key(org, KeyScope::Full).await
    }
    /// The org a key belongs to and the key's scope, if the key exists.
    async fn key_owner(&self, key: &str) -> Result<Option<(Org, KeyScope)>, RegistryError>;
    /// The org a key belongs to, if the key exists.
    async fn org_for_key(&self, key: &str) -> Result<Option<Org>, RegistryError> {
        Ok(self.key_owner(key).await?.map(|(org, _)| org))
    }
    /// The org's keys, oldest first (to the second), never the keys themselves.
    async fn list_keys(&self, org: &str) -> Result<Vec<KeyInfo>, RegistryError>;
    /// Deletes the key whose id starts with `id` (at least 8 hex digits of it), of any org,
    /// and returns its org and what `list_keys` showed of it; the key stops working within
    /// the nodes' `key_cache_ttl`.
    async fn revoke_key(&self, id: &str) -> Result<(String, KeyInfo), RegistryError>;
    async fn ban_user(&self, org: &str, user_id: &str) -> Result<(), RegistryError>;
    /// Returns whether the user was banned.
    async fn unban_user(&self, org: &str, user_id: &str) -> Result<bool, RegistryError>;
    async fn is_banned(&self, org_id: i64, user_id: &str) -> Result<bool, RegistryError>;
    /// Every banned user of an org (the pipeline holds this set in memory and refreshes it).
    async fn banned_users(&self, org_id: i64) -> Result<Vec<String>, RegistryError>;
    /// Whether the database answers a query (`/readyz`).
    async fn health(&self) -> Result<(), RegistryError>;
}

/// On an empty registry, creates org `default` and one key for it, and returns that key.
pub async fn bootstrap(registry: &dyn Registry) -> Result<Option<String>, RegistryError> {
    if !registry.list_orgs().await?.is_empty() {
        return Ok(None);
    }
    registry.create_org(DEFAULT_ORG).await?;
    registry.create_key(DEFAULT_ORG).await.map(Some)
}

pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_database_that_may_come_back_is_recoverable() {
        use sluice_model::Recoverable;
        let database = |source| RegistryError::Database {
            location: "test".into(),
            source,
        };
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(database(sqlx::Error::Io(refused)).is_recoverable());
        assert!(database(sqlx::Error::PoolTimedOut).is_recoverable());
        assert!(!database(sqlx::Error::RowNotFound).is_recoverable());
        assert!(!database(sqlx::Error::ColumnNotFound("x".into())).is_recoverable());
        assert!(!RegistryError::OrgExists("acme".into()).is_recoverable());
        assert!(!RegistryError::NoSuchOrg("acme".into()).is_recoverable());
    }

    #[test]
    fn org_names_follow_the_invariant() {
        for ok in ["default", "acme", "Acme-2", "a.b_c", "0"] {
            validate_org_name(ok).expect(ok);
        }
        for bad in ["", "-x", "a:b", "a b", "ü", &"x".repeat(65)] {
            assert!(validate_org_name(bad).is_err(), "{bad:?}");
        }
    }
}
