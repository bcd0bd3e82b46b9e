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

pub(super) fn users() -> Value {
    json!({
        "settings": settings(),
        "mappings": {
            "dynamic_templates": data_fields_templates(),
            "properties": {
                "sluice": {"properties": {
                    "org": {"type": "keyword"},
                    "user": {"type": "keyword"},
                }},
                "userId": {"type": "keyword"},
                "email": {"type": "keyword", "normalizer": "sluice_lowercase"},
                "createdAt": {"type": "date", "format": DATE},
                "updatedAt": {"type": "date", "format": DATE},
                "dataFields": {"type": "object", "dynamic": true},
            }
        }
    })
}

pub(super) fn events() -> Value {
    json!({
        "settings": settings(),
        "mappings": {
            "dynamic_templates": data_fields_templates(),
            "properties": {
                "sluice": {"properties": {
                    "org": {"type": "keyword"},
                    "user": {"type": "keyword"},
                }},
                "messageId": {"type": "keyword"},
                "eventName": {"type": "keyword"},
                "userId": {"type": "keyword"},
                "email": {"type": "keyword", "normalizer": "sluice_lowercase"},
                "createdAt": {"type": "date", "format": DATE},
                "receivedAt": {"type": "date", "format": DATE},
                "dataFields": {"type": "object", "dynamic": true},
            }
        }
    })
}
