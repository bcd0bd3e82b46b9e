//! The registry's queries and their code, written once for both databases. The statements
//! use `?` placeholders (SQLite's); PostgreSQL gets them numbered `$1, $2, …` ([`numbered`]).
//! Everything else is SQL both accept (`RETURNING`, `ON CONFLICT DO NOTHING`, `TRUE`), and
//! [`registry_impl!`] writes the `Registry` implementation of each backend from one body.

pub(crate) const ORG_ID: &str = "SELECT id FROM orgs WHERE name = ?";
pub(crate) const INSERT_ORG: &str =
    "INSERT INTO orgs (name, active, created_at) VALUES (?, TRUE, ?) RETURNING id";
pub(crate) const LIST_ORGS: &str = "SELECT id, name, active, created_at, sendgrid_key, events_per_second, events_burst FROM orgs ORDER BY name";
pub(crate) const ORG: &str = "SELECT id, name, active, created_at, sendgrid_key, events_per_second, events_burst FROM orgs WHERE name = ?";
pub(crate) const SET_ACTIVE: &str = "UPDATE orgs SET active = ? WHERE name = ?";
pub(crate) const SET_SENDGRID_KEY: &str = "UPDATE orgs SET sendgrid_key = ? WHERE name = ?";
pub(crate) const SET_LIMIT: &str =
    "UPDATE orgs SET events_per_second = ?, events_burst = ? WHERE name = ?";
pub(crate) const INSERT_KEY: &str =
    "INSERT INTO api_keys (key_hash, org_id, key_prefix, created_at, scope) VALUES (?, ?, ?, ?, ?)";
pub(crate) const KEY_OWNER: &str = "SELECT o.id, o.name, o.active, o.created_at, o.sendgrid_key, o.events_per_second, o.events_burst, k.scope FROM api_keys k JOIN orgs o ON o.id = k.org_id WHERE k.key_hash = ?";
pub(crate) const LIST_KEYS: &str = "SELECT key_hash, key_prefix, scope, created_at FROM api_keys WHERE org_id = ? ORDER BY created_at, key_hash";
pub(crate) const KEYS_LIKE: &str = "SELECT k.key_hash, k.key_prefix, k.scope, k.created_at, o.name FROM api_keys k JOIN orgs o ON o.id = k.org_id WHERE k.key_hash LIKE ?";
pub(crate) const DELETE_KEY: &str = "DELETE FROM api_keys WHERE key_hash = ?";

/// How many hex digits of a key's hash make its id.
pub(crate) const KEY_ID_DIGITS: usize = 12;
/// The fewest `sluice keys revoke` takes.
const KEY_ID_MIN_DIGITS: usize = 8;

/// A stored scope; an unknown one (written by a newer sluice) is read as the narrowest.
pub(crate) fn scope(text: &str) -> crate::KeyScope {
    text.parse().unwrap_or(crate::KeyScope::Read)
}

/// `id` as a `LIKE` pattern for the hashes it starts, if it is a usable id (8 to 64 hex
/// digits; hashes are lowercase hex, so the pattern has no wildcard of its own).
pub(crate) fn key_id_pattern(id: &str) -> Result<String, crate::RegistryError> {
    let id = id.trim().to_ascii_lowercase();
    if !(KEY_ID_MIN_DIGITS..=64).contains(&id.len()) || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(crate::RegistryError::NoSuchKey(id));
    }
    Ok(format!("{id}%"))
}

pub(crate) const BAN: &str = "INSERT INTO banned_users (org_id, user_id, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING";
pub(crate) const UNBAN: &str = "DELETE FROM banned_users WHERE org_id = ? AND user_id = ?";
pub(crate) const IS_BANNED: &str = "SELECT 1 FROM banned_users WHERE org_id = ? AND user_id = ?";
pub(crate) const BANNED_USERS: &str =
    "SELECT user_id FROM banned_users WHERE org_id = ? ORDER BY user_id";

/// An org's stored limit.
pub(crate) fn limit(per_second: Option<i64>, burst: Option<i64>) -> Option<crate::RateLimit> {
    let per_second = u32::try_from(per_second?).ok()?;
    let burst = burst
        .and_then(|b| u32::try_from(b).ok())
        .unwrap_or(per_second);
    Some(crate::RateLimit { per_second, burst })
}

/// `sql` as SQLite takes it.
pub(crate) fn as_is(sql: &'static str) -> sqlx::SqlStr {
    sqlx::SqlSafeStr::into_sql_str(sql)
}

/// `sql` with its `?` placeholders numbered `$1, $2, …`, as PostgreSQL takes it (no statement
/// here has a `?` inside a literal).
pub(crate) fn numbered(sql: &'static str) -> sqlx::SqlStr {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(out))
}

/// `impl Registry for $registry` (a struct with `pool` and `location`) on database `$db`, each
/// statement passed through `$sql` ([`as_is`] or [`numbered`]).
macro_rules! registry_impl {
    ($registry:ty, $db:ty, $sql:path) => {
        impl $registry {
            /// Runs `migrator`'s migrations not applied yet.
            async fn migrate(
                migrator: &sqlx::migrate::Migrator,
                pool: &sqlx::Pool<$db>,
                location: &str,
            ) -> Result<(), RegistryError> {
                migrator
                    .run(pool)
                    .await
                    .map_err(|source| RegistryError::Migration {
                        location: location.to_string(),
                        source,
                    })
            }

            fn err(&self, source: sqlx::Error) -> RegistryError {
                RegistryError::Database {
                    location: self.location.clone(),
                    source,
                }
            }

            async fn org_id(&self, name: &str) -> Result<i64, RegistryError> {
                sqlx::query($sql(crate::sql::ORG_ID))
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?
                    .map(|row| sqlx::Row::get::<i64, _>(&row, 0))
                    .ok_or_else(|| RegistryError::NoSuchOrg(name.to_string()))
            }
        }

        fn org_from_row(row: &<$db as sqlx::Database>::Row) -> Org {
            use sqlx::Row;
            Org {
                id: row.get("id"),
                name: row.get("name"),
                active: row.get("active"),
                created_at: row.get("created_at"),
                sendgrid_key: row.get("sendgrid_key"),
                limit: crate::sql::limit(
                    row.get::<Option<i64>, _>("events_per_second"),
                    row.get::<Option<i64>, _>("events_burst"),
                ),
            }
        }

        /// A key's hash, and what may be shown of it.
        fn key_from_row(row: &<$db as sqlx::Database>::Row) -> (String, crate::KeyInfo) {
            use sqlx::Row;
            let hash: String = row.get("key_hash");
            let scope: String = row.get("scope");
            let info = crate::KeyInfo {
                id: hash.chars().take(crate::sql::KEY_ID_DIGITS).collect(),
                prefix: row.get("key_prefix"),
                scope: crate::sql::scope(&scope),
                created_at: row.get("created_at"),
            };
            (hash, info)
        }

        #[async_trait::async_trait]
        impl Registry for $registry {
            async fn create_org(&self, name: &str) -> Result<Org, RegistryError> {
                crate::validate_org_name(name)?;
                let created_at = crate::now_secs();
                let result = sqlx::query($sql(crate::sql::INSERT_ORG))
                    .bind(name)
                    .bind(created_at)
                    .fetch_one(&self.pool)
                    .await;
                match result {
                    Ok(row) => Ok(Org {
                        id: sqlx::Row::get(&row, 0),
                        name: name.to_string(),
                        active: true,
                        created_at,
                        sendgrid_key: None,
                        limit: None,
                    }),
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                        Err(RegistryError::OrgExists(name.to_string()))
                    }
                    Err(e) => Err(self.err(e)),
                }
            }

            async fn list_orgs(&self) -> Result<Vec<Org>, RegistryError> {
                let rows = sqlx::query($sql(crate::sql::LIST_ORGS))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(rows.iter().map(org_from_row).collect())
            }

            async fn org(&self, name: &str) -> Result<Option<Org>, RegistryError> {
                let row = sqlx::query($sql(crate::sql::ORG))
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(row.as_ref().map(org_from_row))
            }

            async fn set_org_active(&self, name: &str, active: bool) -> Result<(), RegistryError> {
                let done = sqlx::query($sql(crate::sql::SET_ACTIVE))
                    .bind(active)
                    .bind(name)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                crate::org_updated(done.rows_affected(), name)
            }

            async fn set_sendgrid_key(
                &self,
                name: &str,
                key: Option<&str>,
            ) -> Result<(), RegistryError> {
                let done = sqlx::query($sql(crate::sql::SET_SENDGRID_KEY))
                    .bind(key)
                    .bind(name)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                crate::org_updated(done.rows_affected(), name)
            }

            async fn set_org_limit(
                &self,
                name: &str,
                limit: Option<crate::RateLimit>,
            ) -> Result<(), RegistryError> {
                let done = sqlx::query($sql(crate::sql::SET_LIMIT))
                    .bind(limit.map(|l| i64::from(l.per_second)))
                    .bind(limit.map(|l| i64::from(l.burst)))
                    .bind(name)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                crate::org_updated(done.rows_affected(), name)
            }

            async fn create_scoped_key(
                &self,
                org: &str,
                scope: crate::KeyScope,
            ) -> Result<String, RegistryError> {
                let org_id = self.org_id(org).await?;
                let key = crate::generate_key();
                sqlx::query($sql(crate::sql::INSERT_KEY))
                    .bind(crate::hash_key(&key))
                    .bind(org_id)
                    .bind(&key[..10])
                    .bind(crate::now_secs())
                    .bind(scope.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(key)
            }

            async fn key_owner(
                &self,
                key: &str,
            ) -> Result<Option<(Org, crate::KeyScope)>, RegistryError> {
                let row = sqlx::query($sql(crate::sql::KEY_OWNER))
                    .bind(crate::hash_key(key))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(row.as_ref().map(|row| {
                    let scope: String = sqlx::Row::get(row, "scope");
                    (org_from_row(row), crate::sql::scope(&scope))
                }))
            }

            async fn list_keys(&self, org: &str) -> Result<Vec<crate::KeyInfo>, RegistryError> {
                let rows = sqlx::query($sql(crate::sql::LIST_KEYS))
                    .bind(self.org_id(org).await?)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(rows.iter().map(|row| key_from_row(row).1).collect())
            }

            async fn revoke_key(
                &self,
                id: &str,
            ) -> Result<(String, crate::KeyInfo), RegistryError> {
                let rows = sqlx::query($sql(crate::sql::KEYS_LIKE))
                    .bind(crate::sql::key_id_pattern(id)?)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                let row = match rows.as_slice() {
                    [row] => row,
                    [] => return Err(RegistryError::NoSuchKey(id.to_string())),
                    _ => return Err(RegistryError::AmbiguousKey(id.to_string())),
                };
                let (hash, info) = key_from_row(row);
                sqlx::query($sql(crate::sql::DELETE_KEY))
                    .bind(&hash)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok((sqlx::Row::get(row, "name"), info))
            }

            async fn ban_user(&self, org: &str, user_id: &str) -> Result<(), RegistryError> {
                if user_id.is_empty() {
                    return Err(RegistryError::InvalidUserId("it is empty"));
                }
                let org_id = self.org_id(org).await?;
                sqlx::query($sql(crate::sql::BAN))
                    .bind(org_id)
                    .bind(user_id)
                    .bind(crate::now_secs())
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(())
            }

            async fn unban_user(&self, org: &str, user_id: &str) -> Result<bool, RegistryError> {
                let org_id = self.org_id(org).await?;
                let done = sqlx::query($sql(crate::sql::UNBAN))
                    .bind(org_id)
                    .bind(user_id)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(done.rows_affected() > 0)
            }

            async fn is_banned(&self, org_id: i64, user_id: &str) -> Result<bool, RegistryError> {
                let row = sqlx::query($sql(crate::sql::IS_BANNED))
                    .bind(org_id)
                    .bind(user_id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(row.is_some())
            }

            async fn banned_users(&self, org_id: i64) -> Result<Vec<String>, RegistryError> {
                sqlx::query_scalar($sql(crate::sql::BANNED_USERS))
                    .bind(org_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.err(e))
            }

            async fn health(&self) -> Result<(), RegistryError> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await
                    .map(|_| ())
                    .map_err(|e| self.err(e))
            }
        }
    };
}

pub(crate) use registry_impl;

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            super::numbered(super::UNBAN).as_str(),
            "DELETE FROM banned_users WHERE org_id = $1 AND user_id = $2"
        );
        assert_eq!(super::as_is(super::UNBAN).as_str(), super::UNBAN);
    }
}
