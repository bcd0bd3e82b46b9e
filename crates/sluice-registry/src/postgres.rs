//! The registry on PostgreSQL, for the distributed shape: every API and ingest node reads the
//! same orgs, keys and bans (they cache lookups for `key_cache_ttl`, so the database is not on
//! the per-message path). Same tables as the SQLite registry; migrations run at connect.
//!
//! The URL may carry connection options, e.g. a schema:
//! `postgres://user@host/db?options=-c%20search_path%3Dsluice`.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};

use crate::{Org, Registry, RegistryError, generate_key, hash_key, now_secs, validate_org_name};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

pub struct PostgresRegistry {
    pool: PgPool,
    location: String,
}

impl PostgresRegistry {
    /// Connects and applies migrations.
    pub async fn connect(url: &str) -> Result<Self, RegistryError> {
        let location = sluice_model::url::redacted(url);
        let db_err = |source| RegistryError::Database {
            location: location.clone(),
            source,
        };
        let options: PgConnectOptions = url.parse().map_err(db_err)?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
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
        Ok(PostgresRegistry { pool, location })
    }

    fn err(&self, source: sqlx::Error) -> RegistryError {
        RegistryError::Database {
            location: self.location.clone(),
            source,
        }
    }

    async fn org_id(&self, name: &str) -> Result<i64, RegistryError> {
        sqlx::query("SELECT id FROM orgs WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?
            .map(|row| row.get::<i64, _>(0))
            .ok_or_else(|| RegistryError::NoSuchOrg(name.to_string()))
    }
}

fn org_from_row(row: &sqlx::postgres::PgRow) -> Org {
    Org {
        id: row.get("id"),
        name: row.get("name"),
        active: row.get("active"),
        created_at: row.get("created_at"),
        sendgrid_key: row.get("sendgrid_key"),
    }
}

#[async_trait]
impl Registry for PostgresRegistry {
    async fn create_org(&self, name: &str) -> Result<Org, RegistryError> {
        validate_org_name(name)?;
        let created_at = now_secs();
        let result = sqlx::query(
            "INSERT INTO orgs (name, active, created_at) VALUES ($1, TRUE, $2) RETURNING id",
        )
        .bind(name)
        .bind(created_at)
        .fetch_one(&self.pool)
        .await;
        match result {
            Ok(row) => Ok(Org {
                id: row.get(0),
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
            "SELECT id, name, active, created_at, sendgrid_key FROM orgs WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(row.as_ref().map(org_from_row))
    }

    async fn set_org_active(&self, name: &str, active: bool) -> Result<(), RegistryError> {
        let done = sqlx::query("UPDATE orgs SET active = $1 WHERE name = $2")
            .bind(active)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        crate::org_updated(done.rows_affected(), name)
    }

    async fn set_sendgrid_key(&self, name: &str, key: Option<&str>) -> Result<(), RegistryError> {
        let done = sqlx::query("UPDATE orgs SET sendgrid_key = $1 WHERE name = $2")
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
            "INSERT INTO api_keys (key_hash, org_id, key_prefix, created_at) VALUES ($1, $2, $3, $4)",
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
            "SELECT o.id, o.name, o.active, o.created_at, o.sendgrid_key FROM api_keys k JOIN orgs o ON o.id = k.org_id WHERE k.key_hash = $1",
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
            "INSERT INTO banned_users (org_id, user_id, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
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
        let done = sqlx::query("DELETE FROM banned_users WHERE org_id = $1 AND user_id = $2")
            .bind(org_id)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(done.rows_affected() > 0)
    }

    async fn is_banned(&self, org_id: i64, user_id: &str) -> Result<bool, RegistryError> {
        let row = sqlx::query("SELECT 1 FROM banned_users WHERE org_id = $1 AND user_id = $2")
            .bind(org_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.is_some())
    }

    async fn banned_users(&self, org_id: i64) -> Result<Vec<String>, RegistryError> {
        sqlx::query_scalar("SELECT user_id FROM banned_users WHERE org_id = $1 ORDER BY user_id")
            .bind(org_id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))
    }
}
