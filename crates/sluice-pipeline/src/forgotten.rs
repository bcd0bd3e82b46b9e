//! Dropping the pending trigger actions of a forgotten user (SPEC §4, §6).
//!
//! Two ways, because an action may be anywhere between the trigger stage and its target:
//! - **In the actions log, in order.** When the pipeline processes a `user_delete`, it appends a
//!   forget marker (`{"forget": {...}}`) to the actions log under the user's key, behind every
//!   action of the user's earlier events. The dispatcher reads a window and drops every action
//!   of a user that comes before that user's last marker in it: never sent, not a dead letter
//!   (which would keep the forgotten user's data).
//! - **In flight.** An action already being retried when its window was read (its target is
//!   down) does not see a later window. The pipeline also notes the forget in [`Forgotten`],
//!   which the dispatcher of the same process checks before every attempt: an action appended
//!   before the forget is dropped. On several ingest nodes the partition of the actions log may
//!   be dispatched by another node than the one that processed the forget; there the marker
//!   drops what was not yet in flight.

use std::collections::HashMap;
use std::sync::Mutex;

use sluice_index::Forget;
use sluice_log::Record;

/// How long a forget is remembered for in-flight actions: as long as an action may wait
/// (`action_max_age`'s default; an older action is a dead letter anyway).
const REMEMBERED_MS: i64 = 24 * 3600 * 1000;

/// Users forgotten in this process: record key (`<org>:<userKey>`) → when (unix ms).
#[derive(Debug, Default)]
pub struct Forgotten {
    at: Mutex<HashMap<Vec<u8>, i64>>,
}

impl Forgotten {
    /// Notes that the users of `forgets` were forgotten at `now`; forgets older than a day
    /// are let go.
    pub fn note(&self, forgets: &[Forget], now: i64) {
        let mut at = self
            .at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if at.len() > 10_000 {
            at.retain(|_, &mut when| now - when < REMEMBERED_MS);
        }
        for forget in forgets {
            at.insert(record_key(forget), now);
        }
    }

    /// Whether an action under `key` appended at `appended_ms` belongs to a user forgotten
    /// after that.
    pub fn drops(&self, key: &[u8], appended_ms: i64) -> bool {
        let at = self
            .at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        at.get(key).is_some_and(|&when| appended_ms < when)
    }
}

fn record_key(forget: &Forget) -> Vec<u8> {
    format!("{}:{}", forget.org, forget.user_key).into_bytes()
}

/// The marker records of `forgets`, for the actions log.
pub fn markers(forgets: &[Forget], now: i64) -> Vec<Record> {
    forgets
        .iter()
        .map(|forget| Record {
            key: record_key(forget),
            value: serde_json::json!({"forget": {"org": forget.org, "userKey": forget.user_key}})
                .to_string()
                .into_bytes(),
            timestamp_ms: now,
        })
        .collect()
}

/// How every marker starts (`markers` writes it; an action is a payload object whose first
/// key is never `forget`). The dispatcher checks every record it reads: a prefix, not a parse.
const MARKER_PREFIX: &[u8] = br#"{"forget":"#;

/// Whether an actions-log record is a forget marker.
pub fn is_marker(value: &[u8]) -> bool {
    value.starts_with(MARKER_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_keyed_like_the_users_actions_and_recognised() {
        let forget = Forget {
            org: "acme".into(),
            user_key: "u:1".into(),
            version: 3,
        };
        let marked = markers(std::slice::from_ref(&forget), 5);
        assert_eq!(marked[0].key, b"acme:u:1");
        assert!(is_marker(&marked[0].value));
        assert!(!is_marker(br#"{"rule":"welcome","idempotencyKey":"k"}"#));
        assert!(!is_marker(b"not json"));
    }

    #[test]
    fn only_actions_appended_before_the_forget_are_dropped() {
        let forgotten = Forgotten::default();
        let forget = Forget {
            org: "acme".into(),
            user_key: "u:1".into(),
            version: 3,
        };
        forgotten.note(&[forget], 1_000);
        assert!(forgotten.drops(b"acme:u:1", 999));
        assert!(
            !forgotten.drops(b"acme:u:1", 1_000),
            "appended after the forget"
        );
        assert!(!forgotten.drops(b"acme:u:2", 999), "another user");
        assert!(!forgotten.drops(b"other:u:1", 999), "another org");
    }
}
