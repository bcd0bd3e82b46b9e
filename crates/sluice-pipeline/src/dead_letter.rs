//! Dead letters (SPEC §6): a message the pipeline will not process, because validation refused
//! it (unknown or disabled org, banned user, malformed fields) or the index refused its
//! document, becomes a record of the dead-letter log: the Kafka topic `sluice.dlq`, or the
//! embedded log under `<data_dir>/dlq`. The record keeps the original key (so dead letters are
//! partitioned like the messages they hold) and its value says what failed, where and when,
//! with the original record:
//!
//! ```json
//! {"v":1,"stage":"validate","reason":"user u:42 is banned in org acme","failedAt":1700000000000,
//!  "source":{"partition":3,"offset":1234},"org":"acme","messageId":"m-1","record":{...}}
//! ```
//!
//! `record` is the original value as JSON, or as a string when it was not JSON.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sluice_log::{LogRecord, Record};

/// Which stage refused the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Validate,
    Index,
    /// A trigger's webhook refused the action.
    Trigger,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub partition: u32,
    pub offset: u64,
}

#[derive(Serialize)]
struct Value<'a> {
    v: u8,
    stage: Stage,
    reason: &'a str,
    #[serde(rename = "failedAt")]
    failed_at: i64,
    source: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    org: Option<Cow<'a, str>>,
    #[serde(rename = "messageId", skip_serializing_if = "Option::is_none")]
    message_id: Option<Cow<'a, str>>,
    record: Original<'a>,
    /// `trigger` only: the rule, and the action's payload (the webhook body).
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'a RawValue>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Original<'a> {
    Json(&'a RawValue),
    Text(Cow<'a, str>),
}

/// What the dead letter can tell about the message even when the rest of it is invalid.
#[derive(Deserialize, Default)]
struct Ids<'a> {
    #[serde(borrow, default)]
    org: Option<Cow<'a, str>>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<Cow<'a, str>>,
}

/// The dead-letter record of `source`, refused by `stage` for `reason` at `now_ms`.
pub fn record(stage: Stage, reason: &str, source: &LogRecord, now_ms: i64) -> Record {
    build(stage, reason, source, now_ms, None)
}

/// The dead-letter record of an action of `rule` for `source` that its target refused.
pub fn action_record(
    rule: &str,
    reason: &str,
    source: &LogRecord,
    payload: &[u8],
    now_ms: i64,
) -> Record {
    let action = serde_json::from_slice::<&RawValue>(payload).ok();
    build(Stage::Trigger, reason, source, now_ms, Some((rule, action)))
}

fn build(
    stage: Stage,
    reason: &str,
    source: &LogRecord,
    now_ms: i64,
    action: Option<(&str, Option<&RawValue>)>,
) -> Record {
    let original = match serde_json::from_slice::<&RawValue>(&source.value) {
        Ok(raw) => Original::Json(raw),
        Err(_) => Original::Text(String::from_utf8_lossy(&source.value)),
    };
    let ids: Ids<'_> = serde_json::from_slice(&source.value).unwrap_or_default();
    let value = Value {
        v: 1,
        stage,
        reason,
        failed_at: now_ms,
        source: Source {
            partition: source.partition,
            offset: source.offset,
        },
        org: ids.org,
        message_id: ids.message_id,
        record: original,
        rule: action.map(|(rule, _)| rule),
        action: action.and_then(|(_, payload)| payload),
    };
    Record {
        key: source.key.to_vec(),
        // Serializing strings, integers and valid raw JSON into a Vec does not fail; if it
        // ever did, the reason alone still says what happened.
        value: serde_json::to_vec(&value)
            .unwrap_or_else(|e| format!("{{\"v\":1,\"reason\":{:?}}}", e.to_string()).into_bytes()),
        timestamp_ms: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_record(value: &[u8]) -> LogRecord {
        LogRecord {
            partition: 3,
            offset: 7,
            timestamp_ms: 0,
            key: bytes::Bytes::from_static(b"acme:u:42"),
            value: bytes::Bytes::copy_from_slice(value),
        }
    }

    #[test]
    fn a_dead_letter_carries_the_original_record_stage_reason_and_place() {
        let source =
            log_record(br#"{"v":1,"kind":"event","org":"acme","messageId":"m-1","userId":"42"}"#);
        let dead = record(Stage::Validate, "user u:42 is banned", &source, 1_700);
        assert_eq!(dead.key, b"acme:u:42");
        let v: serde_json::Value = serde_json::from_slice(&dead.value).expect("json");
        assert_eq!(v["stage"], "validate");
        assert_eq!(v["reason"], "user u:42 is banned");
        assert_eq!(v["failedAt"], 1_700);
        assert_eq!(
            v["source"],
            serde_json::json!({"partition": 3, "offset": 7})
        );
        assert_eq!(
            (&v["org"], &v["messageId"]),
            (&"acme".into(), &"m-1".into())
        );
        assert_eq!(v["record"]["userId"], "42");
    }

    #[test]
    fn a_record_that_is_not_json_is_kept_as_text() {
        let dead = record(Stage::Validate, "not JSON", &log_record(b"\xffnot json"), 0);
        let v: serde_json::Value = serde_json::from_slice(&dead.value).expect("json");
        assert_eq!(v["record"], "\u{fffd}not json");
        assert!(v.get("org").is_none() && v.get("messageId").is_none());
    }
}
