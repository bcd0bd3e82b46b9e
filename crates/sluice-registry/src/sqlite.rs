//! The embedded registry on SQLite.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::{Org, Registry, RegistryError, generate_key, hash_key, now_secs, validate_org_name};

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
        MIGRATIONS
            .run(&pool)
            .await
            .map_err(|source| RegistryError::Migration {
                location: location.clone(),
                source,
            })?;
        Ok(SqliteRegistry { pool, location })
    }

    fn err(&self, source: sqlx::Error) -> RegistryError {
        RegistryError::Database {
            location: self.location.clone(),
            source,
        }
    }

    async fn org_id(&self, name: &str) -> Result<i64, RegistryError> {
        sqlx::query("SELECT id FROM orgs WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?
            .map(|row| row.get::<i64, _>(0))
            .ok_or_else(|| RegistryError::NoSuchOrg(name.to_string()))
    }
}

fn org_from_row(row: &sqlx::sqlite::SqliteRow) -> Org {
    Org {
        id: row.get("id"),
        name: row.get("name"),
        active: row.get::<i64, _>("active") != 0,
        created_at: row.get("created_at"),
        sendgrid_key: row.get("sendgrid_key"),
    }
}

#[async_trait]
impl Registry for SqliteRegistry {
    async fn create_org(&self, name: &str) -> Result<Org, RegistryError> {
        validate_org_name(name)?;
        let created_at = now_secs();
        let result = sqlx::query("INSERT INTO orgs (name, active, created_at) VALUES (?, 1, ?)")
            .bind(name)
            .bind(created_at)
            .execute(&self.pool)
            .await;
        match result {
            Ok(done) => Ok(Org {
                id: done.last_insert_rowid(),
                name: name.to_string(),
                active: true,
                created_at,
                sendgrid_key: None,
            }),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(RegistryError::OrgExists(name.to_string()))
            }
            Err(e) => Err(self.err(e)),
        }
    }

    async fn list_orgs(&self) -> Result<Vec<Org>, RegistryError> {
        let rows = sqlx::query(
            "SELECT id, name, active, created_at, sendgrid_key FROM orgs ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(org_from_row).collect())
    }

    async fn org(&self, name: &str) -> Result<Option<Org>, RegistryError> {
        let row = sqlx::query(
            "SELECT id, name, active, created_at, sendgrid_key FROM orgs WHERE name = ?",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(row.as_ref().map(org_from_row))
    }

    async fn set_org_active(&self, name: &str, active: bool) -> Result<(), RegistryError> {
        let done = sqlx::query("UPDATE orgs SET active = ? WHERE name = ?")
            .bind(i64::from(active))
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        crate::org_updated(done.rows_affected(), name)
    }

    async fn set_sendgrid_key(&self, name: &str, key: Option<&str>) -> Result<(), RegistryError> {
        let done = sqlx::query("UPDATE orgs SET sendgrid_key = ? WHERE name = ?")
            .bind(key)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        crate::org_updated(done.rows_affected(), name)
    }

    async fn create_key(&self, org: &str) -> Result<String, RegistryError> {
        let org_id = self.org_id(org).await?;
        let key = generate_key();
        sqlx::query(
            "INSERT INTO api_keys (key_hash, org_id, key_prefix, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(hash_key(&key))
        .bind(org_id)
        .bind(&key[..10])
        .bind(now_secs())
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(key)
    }

    async fn org_for_key(&self, key: &str) -> Result<Option<Org>, RegistryError> {
        let row = sqlx::query(
            "SELECT o.id, o.name, o.active, o.created_at, o.sendgrid_key FROM api_keys k JOIN orgs o ON o.id = k.org_id WHERE k.key_hash = ?",
        )
        .bind(hash_key(key))
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(row.as_ref().map(org_from_row))
    }

    async fn ban_user(&self, org: &str, user_id: &str) -> Result<(), RegistryError> {
        if user_id.is_empty() {
            return Err(RegistryError::InvalidUserId("it is empty"));
        }
        let org_id = self.org_id(org).await?;
        sqlx::query(
            "INSERT OR IGNORE INTO banned_users (org_id, user_id, created_at) VALUES (?, ?, ?)",
        )
        .bind(org_id)
        .bind(user_id)
        .bind(now_secs())
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn unban_user(&self, org: &str, user_id: &str) -> Result<bool, RegistryError> {
        let org_id = self.org_id(org).await?;
        let done = sqlx::query("DELETE FROM banned_users WHERE org_id = ? AND user_id = ?")
            .bind(org_id)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(done.rows_affected() > 0)
    }

    async fn is_banned(&self, org_id: i64, user_id: &str) -> Result<bool, RegistryError> {
        let row = sqlx::query("SELECT 1 FROM banned_users WHERE org_id = ? AND user_id = ?")
            .bind(org_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.is_some())
    }

    async fn banned_users(&self, org_id: i64) -> Result<Vec<String>, RegistryError> {
        sqlx::query_scalar("SELECT user_id FROM banned_users WHERE org_id = ? ORDER BY user_id")
            .bind(org_id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    // The behaviour every registry shares is tested on both in `tests/registry.rs`; these
    // are SQLite's own.
    use super::*;

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
