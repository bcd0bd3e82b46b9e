//! The registry on PostgreSQL, for the distributed shape: every API and ingest node reads the
//! same orgs, keys and bans (they cache lookups for `key_cache_ttl`, so the database is not on
//! the per-message path). Same tables as the SQLite registry; migrations run at connect.
//!
//! The URL may carry connection options, e.g. a schema:
//! `postgres://user@host/db?options=-c%20search_path%3Dsluice`.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::{Org, Registry, RegistryError};

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
        Self::migrate(&MIGRATIONS, &pool, &location).await?;
        Ok(PostgresRegistry { pool, location })
    }
}

crate::sql::registry_impl!(PostgresRegistry, sqlx::Postgres, crate::sql::numbered);
