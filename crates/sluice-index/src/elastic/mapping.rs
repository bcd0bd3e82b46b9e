//! The two indexes' settings and mappings, the same fields as the embedded schemas:
//! - ids and names are `keyword` (exact match, `terms` aggregations); `email` is normalized to
//!   lowercase, so lookups by email ignore case as in the embedded index;
//! - timestamps are `date`s of unix milliseconds that also take RFC 3339 in queries;
//! - `dataFields` is dynamic: strings become `text` (tokenized: `dataFields.name:alice` finds
//!   "Alice Smith") with a `raw` keyword beside it for aggregations, numbers and booleans keep
//!   their type;
//! - `sluice.org` / `sluice.user` scope every read to an org and a user.

use serde_json::{Value, json};

const DATE: &str = "epoch_millis||strict_date_optional_time";

fn settings() -> Value {
    json!({
        "analysis": {"normalizer": {"sluice_lowercase": {"type": "custom", "filter": ["lowercase"]}}}
    })
}

fn data_fields_templates() -> Value {
    json!([{
        "data_fields_strings": {
            "path_match": "dataFields.*",
            "match_mapping_type": "string",
            "mapping": {
                "type": "text",
                "fields": {"raw": {"type": "keyword", "ignore_above": 1024}}
            }
        }
    }])
}

/// An index whose documents have the fields every document has, plus `fields`.
fn index(fields: Value) -> Value {
    let mut properties = json!({
        "sluice": {"properties": {
            "org": {"type": "keyword"},
            "user": {"type": "keyword"},
        }},
        "userId": {"type": "keyword"},
        "email": {"type": "keyword", "normalizer": "sluice_lowercase"},
        "createdAt": {"type": "date", "format": DATE},
        "dataFields": {"type": "object", "dynamic": true},
    });
    if let (Value::Object(all), Value::Object(more)) = (&mut properties, fields) {
        all.extend(more);
    }
    json!({
        "settings": settings(),
        "mappings": {
            "dynamic_templates": data_fields_templates(),
            "properties": properties,
        }
    })
}

pub(super) fn users() -> Value {
    index(json!({"updatedAt": {"type": "date", "format": DATE}}))
}

pub(super) fn events() -> Value {
    index(json!({
        "messageId": {"type": "keyword"},
        "eventName": {"type": "keyword"},
        "receivedAt": {"type": "date", "format": DATE},
        // Segment's times as the client sent them (createdAt is the one to query by).
        "timestamp": {"type": "keyword"},
        "originalTimestamp": {"type": "keyword"},
        "sentAt": {"type": "keyword"},
    }))
}
