//! The validate stage (SPEC §6 step 1): decode each record and check that its org exists and is
//! active, that the user is not banned, and that the fields are well-formed. A rejected record
//! becomes an unrecoverable error with a readable reason (the dead-letter path); a registry
//! that cannot be reached is a recoverable error for the whole batch.
//!
//! Each org's record and its whole ban list are loaded together and kept for a short TTL, so a
//! batch of thousands of records costs no registry query and no per-message cache lookup
//! (the last org seen is reused), and a ban or a disabled org takes effect within the TTL.
//! Ban lists are expected to be small (they are rare, human decisions).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use serde_json::value::RawValue;
use sluice_log::LogRecord;
use sluice_model::{Kind, LogValue};
use sluice_registry::{Org, Registry, RegistryError};

/// A record that passed validation, decoded.
#[derive(Debug, Clone)]
pub struct ValidMessage {
    pub offset: u64,
    pub org: Arc<Org>,
    pub kind: Kind,
    pub message_id: String,
    /// `u:<userId>` or `e:<email>`, as in the record key.
    pub user_key: String,
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub event_name: Option<String>,
    pub created_at: Option<i64>,
    pub received_at: i64,
    /// The `dataFields` JSON object, as written (`{}` when absent). Checked to be an object;
    /// parsed only where it is needed (the merge of updates, the index).
    pub data_fields: Box<RawValue>,
    pub merge_nested_objects: bool,
    /// An event's Segment fields kept as sent (`context`, `timestamp`, ...), if any.
    pub segment: Option<Box<RawValue>>,
}

/// Why a record was refused: the dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub offset: u64,
    pub reason: String,
}

pub struct Validator {
    registry: Arc<dyn Registry>,
    orgs: Cache<String, Option<Arc<OrgRules>>>,
}

/// What validation needs to know about one org.
#[derive(Debug)]
struct OrgRules {
    org: Arc<Org>,
    banned: HashSet<String>,
}

impl Validator {
    pub fn new(registry: Arc<dyn Registry>, ttl: Duration) -> Self {
        Validator {
            registry,
            orgs: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Validates a batch in order. `Err` only when the registry cannot be asked (retry later).
    pub async fn validate(
        &self,
        records: &[LogRecord],
    ) -> Result<Vec<Result<ValidMessage, Rejected>>, RegistryError> {
        let mut out = Vec::with_capacity(records.len());
        let mut last: Option<(String, Option<Arc<OrgRules>>)> = None;
        for record in records {
            out.push(self.validate_one(record, &mut last).await?);
        }
        Ok(out)
    }

    async fn validate_one(
        &self,
        record: &LogRecord,
        last: &mut Option<(String, Option<Arc<OrgRules>>)>,
    ) -> Result<Result<ValidMessage, Rejected>, RegistryError> {
        let reject = |reason: String| {
            Ok(Err(Rejected {
                offset: record.offset,
                reason,
            }))
        };
        let value: LogValue<'_> = match serde_json::from_slice(&record.value) {
            Ok(v) => v,
            Err(e) => {
                return reject(format!(
                    "not a sluice log record (expected the JSON of SPEC §5): {e}"
                ));
            }
        };
        if value.v != sluice_model::message::LOG_FORMAT_VERSION {
            return reject(format!("unsupported record format version {}", value.v));
        }
        let rules = match last {
            Some((name, rules)) if *name == *value.org => rules.clone(),
            _ => {
                let rules = self.org_rules(&value.org).await?;
                *last = Some((value.org.to_string(), rules.clone()));
                rules
            }
        };
        let Some(rules) = rules else {
            return reject(format!("org {:?} does not exist", value.org));
        };
        let org = &rules.org;
        if !org.active {
            return reject(format!("org {:?} is disabled", org.name));
        }
        let user_key = match (&value.user_id, &value.email) {
            (Some(id), _) if !id.is_empty() => format!("u:{id}"),
            (_, Some(email)) if !email.is_empty() => format!("e:{email}"),
            _ => return reject("the record has neither userId nor email".into()),
        };
        let key_matches = record.key.len() == org.name.len() + 1 + user_key.len()
            && record.key.starts_with(org.name.as_bytes())
            && record.key[org.name.len()] == b':'
            && record.key.ends_with(user_key.as_bytes());
        if !key_matches {
            return reject(format!(
                "record key {:?} does not match its value (expected \"{}:{user_key}\")",
                String::from_utf8_lossy(&record.key),
                org.name
            ));
        }
        if !rules.banned.is_empty() {
            for who in [value.user_id.as_deref(), value.email.as_deref()]
                .into_iter()
                .flatten()
            {
                if rules.banned.contains(who) {
                    return reject(format!("user {who:?} is banned in org {:?}", org.name));
                }
            }
        }
        if value.kind == Kind::Event && value.event_name.as_deref().is_none_or(str::is_empty) {
            return reject("an event without eventName".into());
        }
        // The log value parser already checked the JSON; an object starts with `{`.
        let data_fields = match value.data_fields.as_deref() {
            None => empty_object(),
            Some(raw) if raw.get().trim_start().starts_with('{') => raw.to_owned(),
            Some(_) => return reject("dataFields is not a JSON object".into()),
        };
        Ok(Ok(ValidMessage {
            offset: record.offset,
            org: Arc::clone(org),
            kind: value.kind,
            message_id: value.message_id.into_owned(),
            user_key,
            user_id: value.user_id.map(|s| s.into_owned()),
            email: value.email.map(|s| s.into_owned()),
            event_name: value.event_name.map(|s| s.into_owned()),
            created_at: value.created_at,
            received_at: value.received_at,
            data_fields,
            merge_nested_objects: value.merge_nested_objects,
            segment: value
                .segment
                .filter(|s| s.get().starts_with('{'))
                .map(|s| s.into_owned()),
        }))
    }

    /// The org and its ban list, through the TTL cache; `None` if the org does not exist.
    async fn org_rules(&self, name: &str) -> Result<Option<Arc<OrgRules>>, RegistryError> {
        if let Some(found) = self.orgs.get(name).await {
            return Ok(found);
        }
        let rules = match self.registry.org(name).await? {
            Some(org) => {
                let banned = self.registry.banned_users(org.id).await?;
                Some(Arc::new(OrgRules {
                    org: Arc::new(org),
                    banned: banned.into_iter().collect(),
                }))
            }
            None => None,
        };
        self.orgs.insert(name.to_string(), rules.clone()).await;
        Ok(rules)
    }
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_string()).unwrap_or_else(|_| unreachable!("{{}} is JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::{Value, json};
    use sluice_registry::SqliteRegistry;

    fn record(offset: u64, key: &str, value: Value) -> LogRecord {
        LogRecord {
            partition: 0,
            offset,
            timestamp_ms: 0,
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
        }
    }

    fn event(org: &str, user: &str, id: &str) -> Value {
        json!({"v": 1, "kind": "event", "org": org, "messageId": id, "userId": user,
               "receivedAt": 1, "eventName": "signedUp", "dataFields": {"plan": "pro"}})
    }

    async fn setup() -> (tempfile::TempDir, Arc<SqliteRegistry>, Validator) {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Arc::new(
            SqliteRegistry::open(&dir.path().join("r.db"))
                .await
                .expect("registry"),
        );
        registry.create_org("acme").await.expect("org");
        registry.create_org("gone").await.expect("org");
        registry
            .set_org_active("gone", false)
            .await
            .expect("disable");
        registry.ban_user("acme", "bad").await.expect("ban");
        registry.ban_user("acme", "spam@x.io").await.expect("ban");
        let validator = Validator::new(
            Arc::clone(&registry) as Arc<dyn Registry>,
            Duration::from_millis(50),
        );
        (dir, registry, validator)
    }

    #[tokio::test]
    async fn valid_records_are_decoded_and_bad_ones_get_reasons() {
        let (_dir, _registry, validator) = setup().await;
        let records = vec![
            record(0, "acme:u:ok", event("acme", "ok", "m0")),
            record(1, "nope:u:ok", event("nope", "ok", "m1")),
            record(2, "gone:u:ok", event("gone", "ok", "m2")),
            record(3, "acme:u:bad", event("acme", "bad", "m3")),
            record(
                4,
                "acme:e:spam@x.io",
                json!({"v": 1, "kind": "user_update", "org": "acme", "messageId": "m4", "email": "spam@x.io", "receivedAt": 1}),
            ),
            record(
                5,
                "acme:u:ok",
                json!({"v": 1, "kind": "event", "org": "acme", "messageId": "m5", "userId": "ok", "receivedAt": 1}),
            ),
            record(6, "acme:u:other", event("acme", "ok", "m6")),
            LogRecord {
                value: Bytes::from_static(b"not json"),
                ..record(7, "acme:u:ok", json!(null))
            },
            record(
                8,
                "acme:u:ok",
                json!({"v": 1, "kind": "user_update", "org": "acme", "messageId": "m8", "userId": "ok", "receivedAt": 1, "dataFields": {"a": {"b": 1}}, "mergeNestedObjects": true}),
            ),
        ];
        let results = validator
            .validate(&records)
            .await
            .expect("registry reachable");
        let valid = results[0].as_ref().expect("valid");
        assert_eq!(
            (
                valid.org.name.as_str(),
                valid.user_key.as_str(),
                valid.message_id.as_str()
            ),
            ("acme", "u:ok", "m0")
        );
        assert_eq!(valid.data_fields.get(), r#"{"plan":"pro"}"#);
        let reason = |i: usize| {
            results[i]
                .as_ref()
                .err()
                .map(|r| (r.offset, r.reason.clone()))
                .expect("rejected")
        };
        assert_eq!(reason(1), (1, "org \"nope\" does not exist".into()));
        assert_eq!(reason(2), (2, "org \"gone\" is disabled".into()));
        assert_eq!(
            reason(3),
            (3, "user \"bad\" is banned in org \"acme\"".into())
        );
        assert_eq!(reason(4).1, "user \"spam@x.io\" is banned in org \"acme\"");
        assert_eq!(reason(5).1, "an event without eventName");
        assert!(
            reason(6).1.contains("does not match its value"),
            "{}",
            reason(6).1
        );
        assert!(
            reason(7).1.starts_with("not a sluice log record"),
            "{}",
            reason(7).1
        );
        let update = results[8].as_ref().expect("valid update");
        assert!(update.merge_nested_objects);
        assert_eq!(update.kind, Kind::UserUpdate);
    }

    #[tokio::test]
    async fn bans_take_effect_within_the_cache_ttl() {
        let (_dir, registry, validator) = setup().await;
        let records = vec![record(0, "acme:u:late", event("acme", "late", "m"))];
        assert!(validator.validate(&records).await.expect("ok")[0].is_ok());
        registry.ban_user("acme", "late").await.expect("ban");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(validator.validate(&records).await.expect("ok")[0].is_err());
    }
}
