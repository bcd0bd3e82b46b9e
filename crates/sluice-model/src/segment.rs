//! The Segment HTTP Tracking API mapped onto sluice messages (SPEC §4):
//! identify → user update (traits → dataFields); track → event (event → eventName,
//! properties → dataFields); page, screen, group, alias → events of that name. `messageId` is
//! the message id and `userId`, else `anonymousId`, the user key.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::message::{ItemError, Kind, Message, MessageBuilder, user_id_text};
use crate::time::parse_timestamp_ms;

/// The Segment call of a route or of a batch item's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentCall {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl SegmentCall {
    pub fn from_type(name: &str) -> Option<Self> {
        Some(match name {
            "identify" => SegmentCall::Identify,
            "track" => SegmentCall::Track,
            "page" => SegmentCall::Page,
            "screen" => SegmentCall::Screen,
            "group" => SegmentCall::Group,
            "alias" => SegmentCall::Alias,
            _ => return None,
        })
    }
}

#[derive(Deserialize)]
struct SegmentItem<'a> {
    #[serde(rename = "type", borrow, default)]
    call: Option<Cow<'a, str>>,
    #[serde(rename = "userId", borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(rename = "anonymousId", borrow, default)]
    anonymous_id: Option<&'a RawValue>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    properties: Option<&'a RawValue>,
    #[serde(borrow, default)]
    traits: Option<&'a RawValue>,
    #[serde(rename = "groupId", borrow, default)]
    group_id: Option<&'a RawValue>,
    #[serde(rename = "previousId", borrow, default)]
    previous_id: Option<&'a RawValue>,
}

/// The body-level fields of a Segment request.
#[derive(Deserialize)]
pub struct SegmentEnvelope<'a> {
    #[serde(rename = "writeKey", borrow, default)]
    pub write_key: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub batch: Option<Vec<&'a RawValue>>,
}

/// Maps one Segment call. `call` is the route's call, or `None` for a `/v1/batch` item, whose
/// `type` field says which call it is.
pub fn parse_segment(item: &RawValue, call: Option<SegmentCall>) -> Result<Message<'_>, ItemError> {
    let raw: SegmentItem<'_> = serde_json::from_str(item.get())
        .map_err(|e| ItemError(format!("not a Segment call: {e}")))?;
    let call = match call {
        Some(call) => call,
        None => {
            let name = raw
                .call
                .as_deref()
                .ok_or_else(|| ItemError("batch item has no \"type\"".into()))?;
            SegmentCall::from_type(name).ok_or_else(|| {
                ItemError(format!(
                    "unknown Segment type {name:?}: expected identify, track, page, screen, group or alias"
                ))
            })?
        }
    };
    let user_id = match raw.user_id.map(user_id_text).transpose()?.flatten() {
        Some(id) => Some(id),
        None => raw.anonymous_id.map(user_id_text).transpose()?.flatten(),
    };
    if user_id.is_none() {
        return Err(ItemError("userId or anonymousId is required".into()));
    }
    let created_at = match raw.timestamp {
        Some(t) if t.get() != "null" => {
            let value: Value = serde_json::from_str(t.get())
                .map_err(|e| ItemError(format!("timestamp is not valid JSON: {e}")))?;
            Some(
                parse_timestamp_ms(&value)
                    .map_err(|e| ItemError(e.replace("createdAt", "timestamp")))?,
            )
        }
        _ => None,
    };
    let (kind, event_name, data_fields): (Kind, Option<Cow<'_, str>>, Option<Cow<'_, RawValue>>) =
        match call {
            SegmentCall::Identify => (
                Kind::UserUpdate,
                None,
                checked_object("traits", raw.traits)?.map(Cow::Borrowed),
            ),
            SegmentCall::Track => {
                let event = raw
                    .event
                    .ok_or_else(|| ItemError("track needs \"event\"".into()))?;
                (
                    Kind::Event,
                    Some(event),
                    checked_object("properties", raw.properties)?.map(Cow::Borrowed),
                )
            }
            SegmentCall::Page | SegmentCall::Screen => {
                let name = if call == SegmentCall::Page {
                    "page"
                } else {
                    "screen"
                };
                let props = checked_object("properties", raw.properties)?;
                let fields = match raw.name {
                    Some(n) => Some(with_extra(props, "name", Value::String(n.into_owned()))?),
                    None => props.map(Cow::Borrowed),
                };
                (Kind::Event, Some(Cow::Borrowed(name)), fields)
            }
            SegmentCall::Group => {
                let traits = checked_object("traits", raw.traits)?;
                let fields = match raw.group_id {
                    Some(g) => Some(with_extra(traits, "groupId", raw_to_value(g)?)?),
                    None => traits.map(Cow::Borrowed),
                };
                (Kind::Event, Some(Cow::Borrowed("group")), fields)
            }
            SegmentCall::Alias => {
                let previous = raw
                    .previous_id
                    .ok_or_else(|| ItemError("alias needs \"previousId\"".into()))?;
                (
                    Kind::Event,
                    Some(Cow::Borrowed("alias")),
                    Some(with_extra(None, "previousId", raw_to_value(previous)?)?),
                )
            }
        };
    MessageBuilder {
        message_id: raw.message_id,
        user_id,
        email: None,
        data_fields,
        merge_nested_objects: false,
        event_name,
        created_at,
    }
    .build(kind)
}

fn checked_object<'a>(
    field: &str,
    raw: Option<&'a RawValue>,
) -> Result<Option<&'a RawValue>, ItemError> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) if r.get().starts_with('{') => Ok(Some(r)),
        Some(_) => Err(ItemError(format!("{field} must be a JSON object"))),
    }
}

fn raw_to_value(raw: &RawValue) -> Result<Value, ItemError> {
    serde_json::from_str(raw.get()).map_err(|e| ItemError(format!("invalid JSON value: {e}")))
}

/// `base` (an object or nothing) with one more field, as new raw JSON.
fn with_extra(
    base: Option<&RawValue>,
    field: &str,
    value: Value,
) -> Result<Cow<'static, RawValue>, ItemError> {
    let mut map: Map<String, Value> = match base {
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|e| ItemError(format!("invalid object: {e}")))?,
        None => Map::new(),
    };
    map.entry(field.to_string()).or_insert(value);
    let text = serde_json::to_string(&map).map_err(|e| ItemError(e.to_string()))?;
    RawValue::from_string(text)
        .map(Cow::Owned)
        .map_err(|e| ItemError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LogValue;

    fn raw(s: &str) -> &RawValue {
        serde_json::from_str(s).expect("valid JSON")
    }

    #[test]
    fn identify_is_a_user_update_with_traits() {
        let m = parse_segment(
            raw(r#"{"userId":"u1","traits":{"plan":"pro"},"messageId":"m1","timestamp":"2024-01-01T00:00:00Z"}"#),
            Some(SegmentCall::Identify),
        )
        .expect("valid");
        assert_eq!(m.kind, Kind::UserUpdate);
        assert_eq!(m.user_id.as_deref(), Some("u1"));
        assert_eq!(m.message_id, "m1");
        assert_eq!(
            m.data_fields.as_deref().map(RawValue::get),
            Some(r#"{"plan":"pro"}"#)
        );
        assert_eq!(m.created_at, Some(1_704_067_200_000));
    }

    #[test]
    fn track_uses_anonymous_id_when_no_user_id() {
        let m = parse_segment(
            raw(r#"{"anonymousId":"anon-1","event":"Order Completed","properties":{"total":3}}"#),
            Some(SegmentCall::Track),
        )
        .expect("valid");
        assert_eq!(m.kind, Kind::Event);
        assert_eq!(m.user_id.as_deref(), Some("anon-1"));
        assert_eq!(m.event_name.as_deref(), Some("Order Completed"));
    }

    #[test]
    fn page_screen_group_alias_become_named_events() {
        let cases = [
            (
                r#"{"type":"page","userId":"u","name":"Home","properties":{"path":"/"}}"#,
                "page",
                r#"{"path":"/","name":"Home"}"#,
            ),
            (
                r#"{"type":"screen","userId":"u","name":"Main"}"#,
                "screen",
                r#"{"name":"Main"}"#,
            ),
            (
                r#"{"type":"group","userId":"u","groupId":"g1","traits":{"n":1}}"#,
                "group",
                r#"{"n":1,"groupId":"g1"}"#,
            ),
            (
                r#"{"type":"alias","userId":"u","previousId":"old"}"#,
                "alias",
                r#"{"previousId":"old"}"#,
            ),
        ];
        for (input, name, fields) in cases {
            let m = parse_segment(raw(input), None).expect(input);
            assert_eq!(m.event_name.as_deref(), Some(name));
            let (_, value) = m.to_record("o", 0).expect("encodes");
            let v: LogValue<'_> = serde_json::from_slice(&value).expect("log value");
            let got: Value =
                serde_json::from_str(v.data_fields.as_deref().map_or("null", RawValue::get))
                    .expect("json");
            let want: Value = serde_json::from_str(fields).expect("json");
            assert_eq!(got, want, "{input}");
        }
    }

    #[test]
    fn errors_are_specific() {
        let e =
            parse_segment(raw(r#"{"event":"x"}"#), Some(SegmentCall::Track)).expect_err("no user");
        assert_eq!(e.0, "userId or anonymousId is required");
        let e = parse_segment(raw(r#"{"userId":"u"}"#), Some(SegmentCall::Track))
            .expect_err("no event");
        assert!(e.0.contains("event"), "{e}");
        let e = parse_segment(raw(r#"{"type":"dance","userId":"u"}"#), None).expect_err("bad type");
        assert!(e.0.contains("unknown Segment type"), "{e}");
    }
}
