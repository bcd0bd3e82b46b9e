//! One message: a user-profile update or an event, as a client item is parsed into and as it is
//! written to the log.
//!
//! Parsing is zero-copy where it can be: `dataFields` stays the client's raw JSON text
//! (`RawValue`) from request body to log record, so the hot path never builds a JSON tree.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::time::{json_type_name, parse_timestamp_ms};

/// Version of the log value format (the `v` field).
pub const LOG_FORMAT_VERSION: u8 = 1;

/// Longest accepted `userId`, `email`, `eventName` or message id, in bytes.
pub const MAX_ID_BYTES: usize = 512;

/// What a message does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    UserUpdate,
    Event,
    /// Forget the user (GDPR erasure): its profile and every event of it leave the index.
    UserDelete,
}

/// The user a message belongs to, which is also what the log is partitioned by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserKey<'a> {
    Id(&'a str),
    Email(&'a str),
}

impl UserKey<'_> {
    /// The record key: `<org>:u:<userId>` or `<org>:e:<email>` (SPEC §5).
    pub fn record_key(&self, org: &str) -> Vec<u8> {
        let (tag, value) = match self {
            UserKey::Id(id) => ("u:", *id),
            UserKey::Email(email) => ("e:", *email),
        };
        let mut key = Vec::with_capacity(org.len() + 1 + tag.len() + value.len());
        key.extend_from_slice(org.as_bytes());
        key.push(b':');
        key.extend_from_slice(tag.as_bytes());
        key.extend_from_slice(value.as_bytes());
        key
    }
}

/// Why one item was refused. The message names the field and says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ItemError(pub String);

impl ItemError {
    fn new(msg: impl Into<String>) -> Self {
        ItemError(msg.into())
    }
}

/// A validated message, borrowing from the request body where it can.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub kind: Kind,
    pub message_id: Cow<'a, str>,
    pub user_id: Option<Cow<'a, str>>,
    pub email: Option<Cow<'a, str>>,
    /// A JSON object, as the client's text.
    pub data_fields: Option<Cow<'a, RawValue>>,
    /// Deep merge of nested objects for a user update (SPEC §6 step 4).
    pub merge_nested_objects: bool,
    pub event_name: Option<Cow<'a, str>>,
    /// Unix milliseconds.
    pub created_at: Option<i64>,
    /// When the client sent the message by its own clock (Segment's `sentAt`, unix ms): the
    /// log record's `createdAt` is corrected by `receivedAt - sentAt` (clock skew).
    pub sent_at: Option<i64>,
    /// Segment's fields kept beside the event as sent (`context`, `integrations`, `timestamp`,
    /// `originalTimestamp`, `sentAt`): a JSON object whose keys are those names.
    pub segment: Option<Cow<'a, RawValue>>,
}

impl<'a> Message<'a> {
    /// The user this message is about: `userId` if present, else `email`.
    pub fn user_key(&self) -> UserKey<'_> {
        match (&self.user_id, &self.email) {
            (Some(id), _) => UserKey::Id(id),
            (None, Some(email)) => UserKey::Email(email),
            // Every constructor checks that one of the two is present.
            (None, None) => UserKey::Id(""),
        }
    }

    /// The log record for this message: its key and its JSON value (SPEC §5).
    /// Serialization of strings, integers and already-valid raw JSON into a `Vec` does not fail
    /// in practice; if it ever did, the error says so instead of writing an empty record.
    pub fn to_record(
        &self,
        org: &str,
        received_at_ms: i64,
    ) -> Result<(Vec<u8>, Vec<u8>), ItemError> {
        let key = self.user_key().record_key(org);
        let value = LogValue {
            v: LOG_FORMAT_VERSION,
            kind: self.kind,
            org: Cow::Borrowed(org),
            message_id: Cow::Borrowed(&self.message_id),
            user_id: self.user_id.as_deref().map(Cow::Borrowed),
            email: self.email.as_deref().map(Cow::Borrowed),
            received_at: received_at_ms,
            event_name: self.event_name.as_deref().map(Cow::Borrowed),
            created_at: self.created_at_received(received_at_ms),
            data_fields: self.data_fields.as_deref().map(Cow::Borrowed),
            merge_nested_objects: self.merge_nested_objects,
            segment: self.segment.as_deref().map(Cow::Borrowed),
        };
        let mut buf = Vec::with_capacity(
            160 + self.data_fields.as_ref().map_or(0, |d| d.get().len())
                + self.segment.as_ref().map_or(0, |d| d.get().len()),
        );
        serde_json::to_writer(&mut buf, &value).map_err(|e| {
            ItemError(format!(
                "message {} could not be encoded: {e}",
                self.message_id
            ))
        })?;
        Ok((key, buf))
    }

    /// `createdAt` as the log keeps it: corrected for the client's clock skew when the client
    /// said when it sent the message, as Segment does (`createdAt + receivedAt - sentAt`), and
    /// kept within the range sluice stores.
    fn created_at_received(&self, received_at_ms: i64) -> Option<i64> {
        let created = self.created_at?;
        Some(match self.sent_at {
            Some(sent) => created
                .saturating_add(received_at_ms.saturating_sub(sent))
                .clamp(0, crate::time::MAX_MS),
            None => created,
        })
    }
}

/// The JSON value of a log record (SPEC §5). Other Kafka producers may write this format too.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogValue<'a> {
    pub v: u8,
    pub kind: Kind,
    #[serde(borrow)]
    pub org: Cow<'a, str>,
    #[serde(rename = "messageId", borrow)]
    pub message_id: Cow<'a, str>,
    #[serde(
        rename = "userId",
        default,
        skip_serializing_if = "Option::is_none",
        borrow
    )]
    pub user_id: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub email: Option<Cow<'a, str>>,
    /// Unix milliseconds at which the API accepted the message.
    #[serde(rename = "receivedAt")]
    pub received_at: i64,
    #[serde(
        rename = "eventName",
        default,
        skip_serializing_if = "Option::is_none",
        borrow
    )]
    pub event_name: Option<Cow<'a, str>>,
    /// Unix milliseconds.
    #[serde(rename = "createdAt", default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<i64>,
    #[serde(
        rename = "dataFields",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub data_fields: Option<Cow<'a, RawValue>>,
    #[serde(
        rename = "mergeNestedObjects",
        default,
        skip_serializing_if = "is_false"
    )]
    pub merge_nested_objects: bool,
    /// Segment's `context`, `integrations`, `timestamp`, `originalTimestamp` and `sentAt`, as
    /// sent: an object with those keys, stored beside the event.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub segment: Option<Cow<'a, RawValue>>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A fresh message id: a UUIDv7, so ids sort by time of arrival.
pub fn new_message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl Message<'static> {
    /// A `user_delete` of the user with `user_id`, or else `email` (SPEC §4 "Forget a user"),
    /// with a new message id. The id or email is checked like an item's.
    pub fn forget(user_id: Option<&str>, email: Option<&str>) -> Result<Self, ItemError> {
        MessageBuilder {
            user_id: user_id.map(|id| Cow::Owned(id.to_owned())),
            email: email.map(|e| Cow::Owned(e.to_owned())),
            ..MessageBuilder::default()
        }
        .build(Kind::UserDelete)
    }
}

/// Builds a `Message` from already-extracted fields (used by the Segment and webhook mappings).
#[derive(Debug, Default)]
pub struct MessageBuilder<'a> {
    pub message_id: Option<Cow<'a, str>>,
    pub user_id: Option<Cow<'a, str>>,
    pub email: Option<Cow<'a, str>>,
    pub data_fields: Option<Cow<'a, RawValue>>,
    pub merge_nested_objects: bool,
    pub event_name: Option<Cow<'a, str>>,
    pub created_at: Option<i64>,
    pub sent_at: Option<i64>,
    pub segment: Option<Cow<'a, RawValue>>,
}

impl<'a> MessageBuilder<'a> {
    /// Checks the fields and makes the message, with a new id if the client gave none.
    pub fn build(self, kind: Kind) -> Result<Message<'a>, ItemError> {
        if let Some(id) = &self.user_id {
            check_id("userId", id)?;
        }
        let email = match self.email {
            Some(email) => Some(normalize_email(email)?),
            None => None,
        };
        if self.user_id.is_none() && email.is_none() {
            return Err(ItemError::new("userId or email is required"));
        }
        if let Some(id) = &self.message_id {
            check_id("id", id)?;
        }
        if kind == Kind::Event {
            match &self.event_name {
                Some(name) => check_id("eventName", name)?,
                None => return Err(ItemError::new("eventName is required")),
            }
        }
        if let Some(fields) = &self.data_fields
            && !fields.get().starts_with('{')
        {
            return Err(ItemError::new("dataFields must be a JSON object"));
        }
        Ok(Message {
            kind,
            message_id: self
                .message_id
                .unwrap_or_else(|| Cow::Owned(new_message_id())),
            user_id: self.user_id,
            email,
            data_fields: self.data_fields,
            merge_nested_objects: self.merge_nested_objects,
            event_name: if kind == Kind::Event {
                self.event_name
            } else {
                None
            },
            created_at: self.created_at,
            sent_at: self.sent_at,
            segment: if kind == Kind::Event {
                self.segment
            } else {
                None
            },
        })
    }
}

fn check_id(field: &str, value: &str) -> Result<(), ItemError> {
    if value.is_empty() {
        return Err(ItemError(format!("{field} must not be empty")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(ItemError(format!(
            "{field} is {} bytes, longer than the {MAX_ID_BYTES}-byte limit",
            value.len()
        )));
    }
    Ok(())
}

/// Emails are keys: lowercase them so `Ann@x.com` and `ann@x.com` are one user.
pub(crate) fn normalize_email(email: Cow<'_, str>) -> Result<Cow<'_, str>, ItemError> {
    check_id("email", &email)?;
    let trimmed = email.trim();
    let at = trimmed.find('@');
    if at.is_none_or(|i| i == 0 || i == trimmed.len() - 1) || trimmed.contains(char::is_whitespace)
    {
        return Err(ItemError(format!(
            "email {trimmed:?} is not an email address"
        )));
    }
    if trimmed.len() == email.len() && !email.bytes().any(|b| b.is_ascii_uppercase()) {
        return Ok(email);
    }
    Ok(Cow::Owned(trimmed.to_lowercase()))
}

// ---- client items -------------------------------------------------------------------------

#[derive(Deserialize)]
struct RawItem<'a> {
    #[serde(rename = "userId", borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    email: Option<Cow<'a, str>>,
    #[serde(rename = "dataFields", borrow, default)]
    data_fields: Option<&'a RawValue>,
    #[serde(rename = "mergeNestedObjects", default)]
    merge_nested_objects: Option<bool>,
    #[serde(rename = "eventName", borrow, default)]
    event_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(rename = "createdAt", borrow, default)]
    created_at: Option<&'a RawValue>,
}

/// Parses one `/api/users/update` item.
pub fn parse_user_update(item: &RawValue) -> Result<Message<'_>, ItemError> {
    parse_item(item, Kind::UserUpdate)
}

/// Parses one `/api/events/track` item.
pub fn parse_event(item: &RawValue) -> Result<Message<'_>, ItemError> {
    parse_item(item, Kind::Event)
}

fn parse_item(item: &RawValue, kind: Kind) -> Result<Message<'_>, ItemError> {
    let text = item.get();
    if !text.starts_with('{') {
        return Err(ItemError(format!(
            "item must be a JSON object, not {}",
            first_token_kind(text)
        )));
    }
    let raw: RawItem<'_> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return Err(diagnose(text, e)),
    };
    let user_id = match raw.user_id {
        None => None,
        Some(v) => user_id_text(v)?,
    };
    let data_fields = raw
        .data_fields
        .filter(|d| d.get() != "null")
        .map(Cow::Borrowed);
    if let Some(fields) = &data_fields
        && !fields.get().starts_with('{')
    {
        return Err(ItemError(format!(
            "dataFields must be a JSON object, not {}",
            first_token_kind(fields.get())
        )));
    }
    let created_at = raw_time("createdAt", raw.created_at)?;
    MessageBuilder {
        message_id: raw.id,
        user_id,
        email: raw.email,
        data_fields,
        merge_nested_objects: raw.merge_nested_objects.unwrap_or(false),
        event_name: raw.event_name,
        created_at,
        ..MessageBuilder::default()
    }
    .build(kind)
}

/// A time field as the client wrote it (`createdAt`, Segment's `timestamp`, ...): RFC 3339 or
/// unix seconds/ms; `null` or absent is `None`. Errors name `field`.
pub(crate) fn raw_time(field: &str, raw: Option<&RawValue>) -> Result<Option<i64>, ItemError> {
    let Some(raw) = raw.filter(|t| t.get() != "null") else {
        return Ok(None);
    };
    let value: Value = serde_json::from_str(raw.get())
        .map_err(|e| ItemError(format!("{field} is not valid JSON: {e}")))?;
    parse_timestamp_ms(&value)
        .map(Some)
        .map_err(|e| ItemError(e.replace("createdAt", field)))
}

/// `userId` may be a string or an integer (many clients send numeric ids); `null` means absent.
pub(crate) fn user_id_text(v: &RawValue) -> Result<Option<Cow<'_, str>>, ItemError> {
    let text = v.get();
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<Cow<'_, str>>(text)
            .map(Some)
            .map_err(|e| ItemError(format!("userId is not a valid string: {e}"))),
        Some(b'-' | b'0'..=b'9') if !text.contains(['.', 'e', 'E']) => {
            Ok(Some(Cow::Borrowed(text)))
        }
        _ if text == "null" => Ok(None),
        _ => Err(ItemError(format!(
            "userId must be a string or an integer, not {}",
            first_token_kind(text)
        ))),
    }
}

/// The fast typed parse failed: find which field is wrong and say so.
fn diagnose(text: &str, fallback: serde_json::Error) -> ItemError {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) else {
        return ItemError(format!("item is not valid JSON: {fallback}"));
    };
    let expect_string = ["email", "eventName", "id"];
    for field in expect_string {
        if let Some(v) = map.get(field)
            && !v.is_string()
            && !v.is_null()
        {
            return ItemError(format!(
                "{field} must be a string, not {}",
                json_type_name(v)
            ));
        }
    }
    if let Some(v) = map.get("mergeNestedObjects")
        && !v.is_boolean()
        && !v.is_null()
    {
        return ItemError(format!(
            "mergeNestedObjects must be true or false, not {}",
            json_type_name(v)
        ));
    }
    ItemError(format!("item is invalid: {fallback}"))
}

fn first_token_kind(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> &RawValue {
        serde_json::from_str(s).expect("test JSON is valid")
    }

    #[test]
    fn user_update_round_trips_through_the_log_value() {
        let item = raw(
            r#"{"userId":"42","dataFields":{"plan":"pro","n":{"a":1}},"mergeNestedObjects":true,"id":"m1"}"#,
        );
        let msg = parse_user_update(item).expect("valid");
        let (key, value) = msg.to_record("acme", 1_700_000_000_000).expect("encodes");
        assert_eq!(key, b"acme:u:42");
        let back: LogValue<'_> = serde_json::from_slice(&value).expect("log value parses");
        assert_eq!(back.kind, Kind::UserUpdate);
        assert_eq!(back.org, "acme");
        assert_eq!(back.message_id, "m1");
        assert_eq!(back.user_id.as_deref(), Some("42"));
        assert!(back.merge_nested_objects);
        assert_eq!(back.received_at, 1_700_000_000_000);
        assert_eq!(
            back.data_fields.as_deref().map(RawValue::get),
            Some(r#"{"plan":"pro","n":{"a":1}}"#)
        );
        assert!(back.event_name.is_none());
    }

    #[test]
    fn event_keyed_by_email_when_no_user_id() {
        let msg = parse_event(raw(
            r#"{"email":"Ann@Example.com","eventName":"signedUp","createdAt":1700000000}"#,
        ))
        .expect("valid");
        assert_eq!(msg.user_key(), UserKey::Email("ann@example.com"));
        assert_eq!(msg.created_at, Some(1_700_000_000_000));
        assert_eq!(
            uuid::Uuid::parse_str(&msg.message_id).map(|u| u.get_version_num()),
            Ok(7)
        );
        let (key, _) = msg.to_record("o", 0).expect("encodes");
        assert_eq!(key, b"o:e:ann@example.com");
    }

    #[test]
    fn numeric_user_id_is_accepted_as_text() {
        let msg = parse_user_update(raw(r#"{"userId":12345,"dataFields":{}}"#)).expect("valid");
        assert_eq!(msg.user_id.as_deref(), Some("12345"));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"dataFields":{}}"#, "userId or email is required"),
            (
                r#"{"userId":"1","dataFields":[1]}"#,
                "dataFields must be a JSON object, not an array",
            ),
            (
                r#"{"userId":true}"#,
                "userId must be a string or an integer, not a boolean",
            ),
            (
                r#"{"userId":"1","email":5}"#,
                "email must be a string, not a number",
            ),
            (
                r#"{"userId":"1","mergeNestedObjects":"yes"}"#,
                "mergeNestedObjects must be true or false",
            ),
            (r#"{"userId":""}"#, "userId must not be empty"),
            (r#"{"email":"nope"}"#, "is not an email address"),
            (r#"[1,2]"#, "item must be a JSON object, not an array"),
        ];
        for (input, expected) in cases {
            let err = parse_user_update(raw(input)).expect_err(input);
            assert!(
                err.0.contains(expected),
                "{input}: got {err:?}, wanted {expected:?}"
            );
        }
        let err = parse_event(raw(r#"{"userId":"1"}"#)).expect_err("no eventName");
        assert_eq!(err.0, "eventName is required");
        let err = parse_event(raw(r#"{"userId":"1","eventName":"x","createdAt":"soon"}"#))
            .expect_err("bad date");
        assert!(err.0.contains("createdAt"), "{err:?}");
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let msg = parse_event(raw(r#"{"userId":"a\"b","eventName":"caf\u00e9"}"#)).expect("valid");
        assert_eq!(msg.user_id.as_deref(), Some("a\"b"));
        assert_eq!(msg.event_name.as_deref(), Some("café"));
    }

    #[test]
    fn a_forget_is_keyed_like_the_user_and_carries_nothing_else() {
        let by_id = Message::forget(Some("42"), None).expect("valid");
        let (key, value) = by_id.to_record("acme", 7).expect("encodes");
        assert_eq!(key, b"acme:u:42");
        let back: LogValue<'_> = serde_json::from_slice(&value).expect("log value");
        assert_eq!(back.kind, Kind::UserDelete);
        assert!(back.data_fields.is_none() && back.event_name.is_none());
        let text = String::from_utf8(value).expect("utf-8");
        assert!(text.contains(r#""kind":"user_delete""#), "{text}");
        let by_email = Message::forget(None, Some("Ann@X.io")).expect("valid");
        assert_eq!(by_email.user_key(), UserKey::Email("ann@x.io"));
        assert!(Message::forget(None, None).is_err());
        assert!(Message::forget(Some(""), None).is_err());
    }
}
