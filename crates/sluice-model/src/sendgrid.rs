//! The SendGrid Event Webhook mapped onto sluice messages (SPEC §4): each event of the posted
//! JSON array becomes an event `email_<event>` (`email_delivered`, `email_open`, ...) for the
//! user keyed by its `email`, with message id `sg_event_id`, `createdAt` from `timestamp` (unix
//! seconds), and every other field in `dataFields`.

use std::borrow::Cow;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::message::{ItemError, Kind, Message, MessageBuilder};
use crate::time::parse_timestamp_ms;

/// One SendGrid event as a message.
pub fn parse_sendgrid_event(item: &RawValue) -> Result<Message<'static>, ItemError> {
    let mut fields: Map<String, Value> = match serde_json::from_str(item.get()) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(ItemError("a SendGrid event must be a JSON object".into())),
        Err(e) => return Err(ItemError(format!("not a SendGrid event: {e}"))),
    };
    let event = match fields.remove("event") {
        Some(Value::String(event)) if !event.is_empty() => event,
        Some(_) => return Err(ItemError("\"event\" must be a non-empty string".into())),
        None => return Err(ItemError("\"event\" is required".into())),
    };
    let email = match fields.remove("email") {
        Some(Value::String(email)) => email,
        Some(_) => return Err(ItemError("\"email\" must be a string".into())),
        None => return Err(ItemError("\"email\" is required".into())),
    };
    let message_id = match fields.remove("sg_event_id") {
        Some(Value::String(id)) => Some(id),
        None | Some(Value::Null) => None,
        Some(_) => return Err(ItemError("\"sg_event_id\" must be a string".into())),
    };
    let created_at = match fields.remove("timestamp") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            parse_timestamp_ms(&value)
                .map_err(|e| ItemError(e.replace("createdAt", "timestamp")))?,
        ),
    };
    let data_fields = serde_json::value::to_raw_value(&fields)
        .map_err(|e| ItemError(format!("cannot encode the event's fields: {e}")))?;
    MessageBuilder {
        message_id: message_id.map(Cow::Owned),
        user_id: None,
        email: Some(Cow::Owned(email)),
        data_fields: Some(Cow::Owned(data_fields)),
        merge_nested_objects: false,
        event_name: Some(Cow::Owned(format!("email_{event}"))),
        created_at,
        ..MessageBuilder::default()
    }
    .build(Kind::Event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(v: Value) -> Box<RawValue> {
        serde_json::value::to_raw_value(&v).unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn an_event_becomes_email_event_for_the_address_with_its_id_and_time() {
        let item = raw(json!({
            "email": "Ann@Example.com", "timestamp": 1700000000, "event": "open",
            "sg_event_id": "sg-1", "sg_message_id": "m.1", "useragent": "Mozilla", "category": ["a"]
        }));
        let message = parse_sendgrid_event(&item).expect("valid");
        let (key, value) = message.to_record("acme", 5).expect("record");
        assert_eq!(key, b"acme:e:ann@example.com");
        let value: Value = serde_json::from_slice(&value).expect("json");
        assert_eq!(value["eventName"], "email_open");
        assert_eq!(value["messageId"], "sg-1");
        assert_eq!(value["createdAt"], 1_700_000_000_000i64);
        assert_eq!(
            value["dataFields"],
            json!({"sg_message_id": "m.1", "useragent": "Mozilla", "category": ["a"]})
        );
    }

    #[test]
    fn missing_or_wrong_fields_are_named() {
        for (item, needle) in [
            (json!({"email": "a@x.io"}), "\"event\" is required"),
            (json!({"event": "open"}), "\"email\" is required"),
            (json!({"event": 3, "email": "a@x.io"}), "\"event\" must be"),
            (
                json!({"event": "open", "email": "a@x.io", "sg_event_id": 7}),
                "sg_event_id",
            ),
            (
                json!({"event": "open", "email": "a@x.io", "timestamp": "soon"}),
                "timestamp",
            ),
            (json!([1]), "JSON object"),
        ] {
            let error = parse_sendgrid_event(&raw(item.clone())).expect_err("invalid");
            assert!(error.0.contains(needle), "{item}: {}", error.0);
        }
    }
}
