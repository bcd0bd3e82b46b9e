//! The documents every backend stores and returns: doc ids, the profile after an upsert, and
//! the JSON of an event. The read API returns exactly these shapes whatever the backend.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use sluice_model::segment::KeptFields;

use crate::{EventDoc, UserUpsert};

/// Doc id of a profile.
pub(crate) fn user_doc_id(org: &str, user_key: &str) -> String {
    format!("{org}:{user_key}")
}

/// Doc id of an event.
pub(crate) fn event_doc_id(org: &str, message_id: &str) -> String {
    format!("{org}:{message_id}")
}

/// The profile after `upsert`, starting from the stored one (if any): what every backend
/// stores, and what the trigger stage shows as the profile at an event.
pub fn profile_after(stored: Option<Value>, upsert: &UserUpsert) -> Value {
    upserted_profile(stored, upsert)
}

pub(crate) fn upserted_profile(stored: Option<Value>, upsert: &UserUpsert) -> Value {
    let mut profile = match stored {
        Some(Value::Object(map)) => map,
        _ => {
            let mut map = Map::new();
            map.insert("createdAt".into(), json!(upsert.updated_at));
            map
        }
    };
    if let Some(user_id) = &upsert.user_id {
        profile.insert("userId".into(), json!(user_id));
    }
    if let Some(email) = &upsert.email {
        profile.insert("email".into(), json!(email));
    }
    let data_fields = profile
        .entry("dataFields")
        .or_insert_with(|| Value::Object(Map::new()));
    if !data_fields.is_object() {
        *data_fields = Value::Object(Map::new());
    }
    if let Value::Object(map) = data_fields {
        upsert.patch.apply(map);
    }
    profile.insert("updatedAt".into(), json!(upsert.updated_at));
    Value::Object(profile)
}

/// The JSON of an event, as the read API returns it (and trigger payloads carry it).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventSource<'a> {
    message_id: &'a str,
    event_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    created_at: i64,
    received_at: i64,
    data_fields: &'a RawValue,
    /// Segment's `context`, `integrations`, `timestamp`, `originalTimestamp`, `sentAt`.
    #[serde(flatten)]
    kept: KeptFields<'a>,
    /// Fields of our own a backend stores beside the client's (never shown to readers).
    #[serde(skip_serializing_if = "Option::is_none")]
    sluice: Option<Internal<'a>>,
}

impl<'a> EventSource<'a> {
    /// The event as readers see it.
    pub fn public(event: &'a EventDoc) -> Self {
        EventSource::of(event, None)
    }

    pub(crate) fn of(event: &'a EventDoc, sluice: Option<Internal<'a>>) -> Self {
        EventSource {
            message_id: &event.message_id,
            event_name: &event.event_name,
            user_id: event.user_id.as_deref(),
            email: event.email.as_deref(),
            created_at: event.created_at,
            received_at: event.received_at,
            data_fields: &event.data_fields,
            kept: KeptFields::of(event.segment.as_deref()),
            sluice,
        }
    }
}

/// What a backend that keeps everything in one JSON document adds to it: the org and the user
/// doc id, to scope reads. Stored under the top-level key `sluice` and removed from answers.
#[derive(Serialize)]
pub(crate) struct Internal<'a> {
    pub org: &'a str,
    pub user: &'a str,
}

/// The refusal reason of an event whose `dataFields` is not an object.
pub(crate) const NOT_AN_OBJECT: &str = "dataFields is not a JSON object";

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_model::Patch;

    fn upsert(fields: Value, deep: bool, at: i64) -> UserUpsert {
        let Value::Object(map) = fields else {
            panic!("fields must be an object")
        };
        UserUpsert {
            org: "acme".into(),
            user_key: "u:1".into(),
            user_id: Some("1".into()),
            email: None,
            patch: Patch::from_update(&map, deep),
            updated_at: at,
            version: None,
        }
    }

    #[test]
    fn a_new_profile_gets_created_at_and_the_patch() {
        let profile = upserted_profile(None, &upsert(json!({"plan": "pro"}), false, 5));
        assert_eq!(
            profile,
            json!({"userId": "1", "dataFields": {"plan": "pro"}, "createdAt": 5, "updatedAt": 5})
        );
    }

    #[test]
    fn an_upsert_keeps_created_at_and_other_fields() {
        let stored = json!({"userId": "1", "email": "a@x.io", "dataFields": {"plan": "pro", "n": 1}, "createdAt": 5, "updatedAt": 5});
        let profile = upserted_profile(Some(stored), &upsert(json!({"n": 2}), false, 9));
        assert_eq!(
            profile,
            json!({"userId": "1", "email": "a@x.io", "dataFields": {"plan": "pro", "n": 2}, "createdAt": 5, "updatedAt": 9})
        );
    }
}
