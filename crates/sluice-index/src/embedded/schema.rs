//! The tantivy schemas of the two indexes, and the documents written into them.
//!
//! Every document stores its JSON as returned by the read API in `_source` (bytes): reads return
//! exactly what was written, and an upsert starts from it. The other fields exist to find and
//! aggregate: ids and names are raw strings (exact match, `terms` aggregations), timestamps are
//! millisecond dates (ranges, `date_histogram`), and `dataFields` is a JSON field whose strings
//! are tokenized for search (`dataFields.name:alice` finds "Alice Smith") and kept raw in the
//! fast columns for aggregations.

use serde_json::Value;
use tantivy::schema::{
    DateOptions, DateTimePrecision, FAST, Field, INDEXED, IndexRecordOption, JsonObjectOptions,
    STORED, STRING, Schema, TextFieldIndexing,
};
use tantivy::{DateTime, TantivyDocument};

use crate::EventDoc;
use crate::doc::{EventSource, NOT_AN_OBJECT, event_doc_id, user_doc_id};

/// The fields of both schemas; the ones a schema lacks are `None`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fields {
    pub id: Field,
    pub org: Field,
    pub user: Option<Field>,
    pub user_id: Field,
    pub email: Field,
    pub created_at: Field,
    pub updated_at: Option<Field>,
    pub received_at: Option<Field>,
    pub event_name: Option<Field>,
    pub message_id: Option<Field>,
    pub data_fields: Field,
    pub source: Field,
    /// What a bare word in a query searches.
    pub default_fields: &'static [&'static str],
}

fn date() -> DateOptions {
    DateOptions::from(INDEXED | FAST).set_precision(DateTimePrecision::Milliseconds)
}

fn data_fields_options() -> JsonObjectOptions {
    JsonObjectOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("default")
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        )
        .set_fast("raw")
        .set_expand_dots_enabled()
}

pub(crate) fn users() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let id = b.add_text_field("_id", STRING);
    let org = b.add_text_field("_org", STRING);
    let user_id = b.add_text_field("userId", STRING | FAST);
    let email = b.add_text_field("email", STRING | FAST);
    let created_at = b.add_date_field("createdAt", date());
    let updated_at = b.add_date_field("updatedAt", date());
    let data_fields = b.add_json_field("dataFields", data_fields_options());
    let source = b.add_bytes_field("_source", STORED);
    let fields = Fields {
        id,
        org,
        user: None,
        user_id,
        email,
        created_at,
        updated_at: Some(updated_at),
        received_at: None,
        event_name: None,
        message_id: None,
        data_fields,
        source,
        default_fields: &["userId", "email", "dataFields"],
    };
    (b.build(), fields)
}

pub(crate) fn events() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let id = b.add_text_field("_id", STRING);
    let org = b.add_text_field("_org", STRING);
    let user = b.add_text_field("_user", STRING);
    let message_id = b.add_text_field("messageId", STRING | FAST);
    let event_name = b.add_text_field("eventName", STRING | FAST);
    let user_id = b.add_text_field("userId", STRING | FAST);
    let email = b.add_text_field("email", STRING | FAST);
    let created_at = b.add_date_field("createdAt", date());
    let received_at = b.add_date_field("receivedAt", date());
    let data_fields = b.add_json_field("dataFields", data_fields_options());
    let source = b.add_bytes_field("_source", STORED);
    let fields = Fields {
        id,
        org,
        user: Some(user),
        user_id,
        email,
        created_at,
        updated_at: None,
        received_at: Some(received_at),
        event_name: Some(event_name),
        message_id: Some(message_id),
        data_fields,
        source,
        default_fields: &["eventName", "userId", "email", "dataFields"],
    };
    (b.build(), fields)
}

/// The tantivy document of a profile, or why it cannot be indexed.
pub(crate) fn user_document(
    f: &Fields,
    doc_id: &str,
    org: &str,
    profile: &Value,
) -> Result<TantivyDocument, String> {
    let mut doc = TantivyDocument::new();
    doc.add_text(f.id, doc_id);
    doc.add_text(f.org, org);
    if let Some(user_id) = profile.get("userId").and_then(Value::as_str) {
        doc.add_text(f.user_id, user_id);
    }
    if let Some(email) = profile.get("email").and_then(Value::as_str) {
        doc.add_text(f.email, email.to_lowercase());
    }
    if let Some(ms) = profile.get("createdAt").and_then(Value::as_i64) {
        doc.add_date(f.created_at, date_ms(ms));
    }
    if let (Some(field), Some(ms)) = (
        f.updated_at,
        profile.get("updatedAt").and_then(Value::as_i64),
    ) {
        doc.add_date(field, date_ms(ms));
    }
    if let Some(data_fields) = profile.get("dataFields").filter(|v| v.is_object()) {
        doc.add_field_value(f.data_fields, data_fields);
    }
    let source =
        serde_json::to_vec(profile).map_err(|e| format!("cannot encode the profile: {e}"))?;
    doc.add_bytes(f.source, &source);
    Ok(doc)
}

/// The tantivy document of an event, or why the event cannot be indexed.
pub(crate) fn event_document(f: &Fields, event: &EventDoc) -> Result<TantivyDocument, String> {
    let data_fields: Value = serde_json::from_str(event.data_fields.get())
        .map_err(|e| format!("dataFields is not valid JSON: {e}"))?;
    if !data_fields.is_object() {
        return Err(NOT_AN_OBJECT.into());
    }
    let source = serde_json::to_vec(&EventSource::of(event, None))
        .map_err(|e| format!("cannot encode the event: {e}"))?;
    let mut doc = TantivyDocument::new();
    doc.add_text(f.id, event_doc_id(&event.org, &event.message_id));
    doc.add_text(f.org, &event.org);
    if let Some(field) = f.user {
        doc.add_text(field, user_doc_id(&event.org, &event.user_key));
    }
    if let Some(field) = f.message_id {
        doc.add_text(field, &event.message_id);
    }
    if let Some(field) = f.event_name {
        doc.add_text(field, &event.event_name);
    }
    if let Some(user_id) = &event.user_id {
        doc.add_text(f.user_id, user_id);
    }
    if let Some(email) = &event.email {
        doc.add_text(f.email, email.to_lowercase());
    }
    doc.add_date(f.created_at, date_ms(event.created_at));
    if let Some(field) = f.received_at {
        doc.add_date(field, date_ms(event.received_at));
    }
    doc.add_field_value(f.data_fields, &data_fields);
    doc.add_bytes(f.source, &source);
    Ok(doc)
}

/// Unix milliseconds as a tantivy date (nanoseconds in an i64), clamped to the range it holds:
/// the API refuses times outside it, but a record another producer wrote to the log may carry
/// any number, and an overflow must not stop the index writer.
fn date_ms(ms: i64) -> DateTime {
    DateTime::from_timestamp_nanos(ms.saturating_mul(1_000_000))
}
