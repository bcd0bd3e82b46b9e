//! The embedded registry on SQLite.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::{Org, Registry, RegistryError};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

pub struct SqliteRegistry {
    pool: SqlitePool,
    location: String,
}

impl SqliteRegistry {
    /// Opens (creating if needed) the registry file at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Self, RegistryError> {
        let location = path.display().to_string();
        let db_err = |source| RegistryError::Database {
            location: location.clone(),
            source,
        };
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(db_err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .idle_timeout(Duration::from_secs(60))
            .connect_with(options)
            .await
            .map_err(db_err)?;
        Self::migrate(&MIGRATIONS, &pool, &location).await?;
        Ok(SqliteRegistry { pool, location })
    }
}

crate::sql::registry_impl!(SqliteRegistry, sqlx::Sqlite, crate::sql::as_is);

#[cfg(test)]
mod tests {
    // The behaviour every registry shares is tested on both in `tests/registry.rs`; these
    // are SQLite's own.
    use super::*;
    use crate::hash_key;

    async fn registry() -> (tempfile::TempDir, SqliteRegistry) {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = SqliteRegistry::open(&dir.path().join("registry.db"))
            .await
            .expect("open");
        (dir, reg)
    }

    #[tokio::test]
    async fn keys_belong_to_exactly_one_org_and_only_hashes_are_stored() {
        let (_dir, reg) = registry().await;
        reg.create_org("acme").await.expect("create");
        reg.create_org("globex").await.expect("create");
        let acme = reg.create_key("acme").await.expect("key");
        let globex = reg.create_key("globex").await.expect("key");
        assert_eq!(
            reg.org_for_key(&acme)
                .await
                .expect("lookup")
                .map(|o| o.name),
            Some("acme".into())
        );
        assert_eq!(
            reg.org_for_key(&globex)
                .await
                .expect("lookup")
                .map(|o| o.name),
            Some("globex".into())
        );
        assert_eq!(reg.org_for_key("sk_nope").await.expect("lookup"), None);
        let stored: Vec<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
            .fetch_all(&reg.pool)
            .await
            .expect("query");
        assert!(!stored.contains(&acme) && stored.contains(&hash_key(&acme)));
    }

    #[tokio::test]
    async fn two_handles_on_one_file_see_each_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.db");
        let server = SqliteRegistry::open(&path).await.expect("open");
        let admin = SqliteRegistry::open(&path).await.expect("open again");
        admin.create_org("late").await.expect("create");
        let key = admin.create_key("late").await.expect("key");
        assert_eq!(
            server
                .org_for_key(&key)
                .await
                .expect("lookup")
                .map(|o| o.name),
            Some("late".into())
        );
    }
}
