//! The Segment HTTP Tracking API mapped onto sluice messages (SPEC §4):
//! identify → user update (traits → dataFields); track → event (event → eventName,
//! properties → dataFields); page, screen, group, alias → events of that name. `messageId` is
//! the message id and `userId`, else `anonymousId`, the user key.
//!
//! Fidelity (SPEC §4): an event keeps `context`, `integrations`, `timestamp`,
//! `originalTimestamp` and `sentAt` as sent (the message's `segment` object); its `createdAt` is
//! `timestamp` (else `originalTimestamp`) corrected for the client's clock skew by
//! `receivedAt - sentAt` when the log record is made; `traits.email` of an identify is the
//! profile's email.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::message::{
    ItemError, Kind, Message, MessageBuilder, normalize_email, raw_time, user_id_text,
};

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
    #[serde(rename = "originalTimestamp", borrow, default)]
    original_timestamp: Option<&'a RawValue>,
    #[serde(rename = "sentAt", borrow, default)]
    sent_at: Option<&'a RawValue>,
    #[serde(borrow, default)]
    context: Option<&'a RawValue>,
    #[serde(borrow, default)]
    integrations: Option<&'a RawValue>,
}

/// Where RudderStack puts an identify's traits.
#[derive(Deserialize)]
struct ContextTraits<'a> {
    #[serde(borrow, default)]
    traits: Option<&'a RawValue>,
}

/// `context.traits`, if the call has a context object with traits.
fn context_traits(context: Option<&RawValue>) -> Result<Option<&RawValue>, ItemError> {
    match context {
        Some(c) if c.get().starts_with('{') => serde_json::from_str::<ContextTraits<'_>>(c.get())
            .map(|c| c.traits.filter(|t| t.get() != "null"))
            .map_err(|e| ItemError(format!("context is not valid JSON: {e}"))),
        _ => Ok(None),
    }
}

/// The one trait of an identify that sluice reads itself.
#[derive(Deserialize)]
struct TraitsEmail<'a> {
    #[serde(borrow, default)]
    email: Option<Cow<'a, str>>,
}

/// The body-level fields of a Segment request.
#[derive(Deserialize)]
pub struct SegmentEnvelope<'a> {
    #[serde(rename = "writeKey", borrow, default)]
    pub write_key: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub batch: Option<Vec<&'a RawValue>>,
    /// When the client sent the batch (the SDKs put it here rather than on each call).
    #[serde(rename = "sentAt", borrow, default)]
    pub sent_at: Option<&'a RawValue>,
}

impl SegmentEnvelope<'_> {
    /// The batch's `sentAt` in unix ms; a value that is not a time is ignored (it only
    /// corrects clock skew), as is a missing one.
    pub fn sent_at_ms(&self) -> Option<i64> {
        raw_time("sentAt", self.sent_at).ok().flatten()
    }
}

/// Maps one Segment call. `call` is the route's call, or `None` for a `/v1/batch` item, whose
/// `type` field says which call it is; `batch_sent_at` is the batch's `sentAt` (unix ms), used
/// when the call has none of its own.
pub fn parse_segment(
    item: &RawValue,
    call: Option<SegmentCall>,
    batch_sent_at: Option<i64>,
) -> Result<Message<'_>, ItemError> {
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
    let created_at = match raw_time("timestamp", raw.timestamp)? {
        Some(t) => Some(t),
        None => raw_time("originalTimestamp", raw.original_timestamp)?,
    };
    let sent_at = raw_time("sentAt", raw.sent_at)?.or(batch_sent_at);
    // RudderStack's SDKs send an identify's traits as `context.traits`.
    let traits = match raw.traits.filter(|t| t.get() != "null") {
        None if call == SegmentCall::Identify => context_traits(raw.context)?,
        traits => traits,
    };
    let email = match (call, traits) {
        (SegmentCall::Identify, Some(traits)) if traits.get().starts_with('{') => {
            traits_email(traits)
        }
        _ => None,
    };
    // Every call but identify is an event, which keeps Segment's own fields.
    let segment = if call == SegmentCall::Identify {
        None
    } else {
        kept_fields(&raw)?
    };
    let (kind, event_name, data_fields): (Kind, Option<Cow<'_, str>>, Option<Cow<'_, RawValue>>) =
        match call {
            SegmentCall::Identify => (
                Kind::UserUpdate,
                None,
                checked_object("traits", traits)?.map(Cow::Borrowed),
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
        email,
        data_fields,
        merge_nested_objects: false,
        event_name,
        created_at,
        sent_at,
        segment,
    }
    .build(kind)
}

/// `traits.email` when it is a usable email address (else it stays a trait only: an identify
/// is not refused for a trait sluice does not need).
fn traits_email(traits: &RawValue) -> Option<Cow<'_, str>> {
    let found: TraitsEmail<'_> = serde_json::from_str(traits.get()).ok()?;
    normalize_email(found.email?).ok()
}

/// The fields an event keeps as sent, built from the client's own text (`context` is not
/// parsed).
fn kept_fields<'a>(raw: &SegmentItem<'a>) -> Result<Option<Cow<'a, RawValue>>, ItemError> {
    let present = |v: Option<&'a RawValue>| v.filter(|v| v.get() != "null");
    let kept = KeptFields {
        context: checked_object("context", raw.context)?,
        integrations: checked_object("integrations", raw.integrations)?,
        timestamp: present(raw.timestamp),
        original_timestamp: present(raw.original_timestamp),
        sent_at: present(raw.sent_at),
    };
    if kept.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(&kept)
        .and_then(RawValue::from_string)
        .map(|v| Some(Cow::Owned(v)))
        .map_err(|e| ItemError(format!("the Segment fields could not be kept: {e}")))
}

/// Segment's fields an event keeps as sent: the `segment` object of a log record, and the
/// top-level fields of the stored event of the same names. Unknown keys are ignored.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct KeptFields<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub context: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub integrations: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub timestamp: Option<&'a RawValue>,
    #[serde(
        rename = "originalTimestamp",
        default,
        skip_serializing_if = "Option::is_none",
        borrow
    )]
    pub original_timestamp: Option<&'a RawValue>,
    #[serde(
        rename = "sentAt",
        default,
        skip_serializing_if = "Option::is_none",
        borrow
    )]
    pub sent_at: Option<&'a RawValue>,
}

impl<'a> KeptFields<'a> {
    /// The fields of a log record's `segment` object; nothing if it is not one.
    pub fn of(segment: Option<&'a RawValue>) -> Self {
        segment
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.context.is_none()
            && self.integrations.is_none()
            && self.timestamp.is_none()
            && self.original_timestamp.is_none()
            && self.sent_at.is_none()
    }
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
            None,
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
            None,
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
            let m = parse_segment(raw(input), None, None).expect(input);
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
        let e = parse_segment(raw(r#"{"event":"x"}"#), Some(SegmentCall::Track), None)
            .expect_err("no user");
        assert_eq!(e.0, "userId or anonymousId is required");
        let e = parse_segment(raw(r#"{"userId":"u"}"#), Some(SegmentCall::Track), None)
            .expect_err("no event");
        assert!(e.0.contains("event"), "{e}");
        let e = parse_segment(raw(r#"{"type":"dance","userId":"u"}"#), None, None)
            .expect_err("bad type");
        assert!(e.0.contains("unknown Segment type"), "{e}");
    }

    fn log_value(m: &Message<'_>, received_at: i64) -> Value {
        let (_, value) = m.to_record("o", received_at).expect("encodes");
        serde_json::from_slice(&value).expect("JSON")
    }

    #[test]
    fn an_event_keeps_context_integrations_and_the_times_as_sent() {
        let m = parse_segment(
            raw(r#"{"userId":"u","event":"e","context":{"page":{"url":"https://x.io/"},"ip":"1.2.3.4"},"integrations":{"All":true},"timestamp":"2024-01-01T00:00:00Z","originalTimestamp":"2024-01-01T00:00:00.000Z","sentAt":"2024-01-01T00:00:00Z"}"#),
            Some(SegmentCall::Track),
            None,
        )
        .expect("valid");
        let v = log_value(&m, 1_704_067_200_000);
        assert_eq!(
            v["segment"],
            serde_json::json!({
                "context": {"page": {"url": "https://x.io/"}, "ip": "1.2.3.4"},
                "integrations": {"All": true},
                "timestamp": "2024-01-01T00:00:00Z",
                "originalTimestamp": "2024-01-01T00:00:00.000Z",
                "sentAt": "2024-01-01T00:00:00Z",
            })
        );
        let e = parse_segment(
            raw(r#"{"userId":"u","event":"e","context":"web"}"#),
            Some(SegmentCall::Track),
            None,
        )
        .expect_err("context must be an object");
        assert_eq!(e.0, "context must be a JSON object");
    }

    #[test]
    fn created_at_is_corrected_for_the_clients_clock_skew() {
        // The client's clock is 10 s ahead: it stamped the event at 00:00:05 and sent it at
        // 00:00:15 by its clock; sluice received it at 00:00:05 by its own.
        let received = 1_704_067_205_000;
        let m = parse_segment(
            raw(r#"{"userId":"u","event":"e","timestamp":"2024-01-01T00:00:05Z","sentAt":"2024-01-01T00:00:15Z"}"#),
            Some(SegmentCall::Track),
            None,
        )
        .expect("valid");
        assert_eq!(log_value(&m, received)["createdAt"], 1_704_067_195_000_i64);
        // The batch's sentAt serves calls without their own; originalTimestamp stands in for a
        // missing timestamp (RudderStack sends only that).
        let m = parse_segment(
            raw(r#"{"type":"track","userId":"u","event":"e","originalTimestamp":"2024-01-01T00:00:05Z"}"#),
            None,
            Some(1_704_067_215_000),
        )
        .expect("valid");
        assert_eq!(log_value(&m, received)["createdAt"], 1_704_067_195_000_i64);
        // No sentAt: no correction. No time at all: no createdAt (the pipeline uses receivedAt).
        let m = parse_segment(
            raw(r#"{"userId":"u","event":"e","timestamp":"2024-01-01T00:00:05Z"}"#),
            Some(SegmentCall::Track),
            None,
        )
        .expect("valid");
        assert_eq!(log_value(&m, 0)["createdAt"], 1_704_067_205_000_i64);
        let m = parse_segment(
            raw(r#"{"userId":"u","event":"e","sentAt":"2024-01-01T00:00:05Z"}"#),
            Some(SegmentCall::Track),
            None,
        )
        .expect("valid");
        assert!(log_value(&m, received).get("createdAt").is_none());
        let e = parse_segment(
            raw(r#"{"userId":"u","event":"e","sentAt":"yesterday"}"#),
            Some(SegmentCall::Track),
            None,
        )
        .expect_err("sentAt must be a time");
        assert!(e.0.starts_with("sentAt \"yesterday\""), "{e}");
    }

    #[test]
    fn traits_email_is_the_profiles_email() {
        let m = parse_segment(
            raw(r#"{"userId":"u1","traits":{"email":"Ann@Example.com","plan":"pro"}}"#),
            Some(SegmentCall::Identify),
            None,
        )
        .expect("valid");
        assert_eq!(m.email.as_deref(), Some("ann@example.com"));
        assert_eq!(m.user_key(), crate::UserKey::Id("u1"));
        assert!(m.segment.is_none(), "a profile keeps no Segment fields");
        for traits in [r#"{"email":"not an email"}"#, r#"{"email":5}"#] {
            let item = format!(r#"{{"userId":"u1","traits":{traits}}}"#);
            let m = parse_segment(raw(&item), Some(SegmentCall::Identify), None).expect(&item);
            assert_eq!(m.email, None, "{item}");
        }
        let m = parse_segment(
            raw(r#"{"userId":"u1","context":{"traits":{"email":"b@x.io","plan":"pro"}}}"#),
            Some(SegmentCall::Identify),
            None,
        )
        .expect("RudderStack's identify");
        assert_eq!(m.email.as_deref(), Some("b@x.io"));
        assert_eq!(
            m.data_fields.as_deref().map(RawValue::get),
            Some(r#"{"email":"b@x.io","plan":"pro"}"#),
            "context.traits are the traits when there are no others"
        );
        let m = parse_segment(
            raw(r#"{"userId":"u1","event":"e","traits":{"email":"a@x.io"}}"#),
            Some(SegmentCall::Track),
            None,
        )
        .expect("valid");
        assert_eq!(m.email, None, "only identify sets the profile's email");
    }
}
