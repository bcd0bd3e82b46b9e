//! The OpenAPI 3.1 document of the HTTP API, `GET /openapi.json` (SPEC §9).
//!
//! utoipa builds it at compile time from the `#[utoipa::path]` annotation each handler carries
//! (method, path, parameters, the statuses it answers) and from the schemas of the bodies: the
//! answers' own types derive theirs (`Accepted`'s body, `ErrorBody`, `Failure`); the request
//! items, which the handlers parse by hand from raw JSON for speed (`sluice_model`), are
//! described by the types below. `tests/openapi.rs` holds the two together: schemathesis sends
//! a live server what the document allows and what it does not, and every answer must be a
//! documented status with a body that matches its schema, never a 5xx.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

/// A time: unix seconds or milliseconds (a number above 10^11 is taken as milliseconds), or
/// an RFC 3339 string.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(crate) enum Timestamp {
    Unix(f64),
    Rfc3339(String),
}

// Ids (`userId`, `email`, `id`, `eventName`) are 1 to 512 bytes: at most 128 characters always
// fits. A `userId` may also be an integer; the schema names the string form.

/// A user-profile update: `userId` or `email` (or both) names the user.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct UserUpdate {
    #[schema(min_length = 1, max_length = 128)]
    user_id: Option<String>,
    #[schema(format = Email, min_length = 3, max_length = 128)]
    email: Option<String>,
    /// Top-level keys replace the stored ones (deep merge with `mergeNestedObjects`).
    data_fields: Option<BTreeMap<String, Value>>,
    merge_nested_objects: Option<bool>,
    /// The message id (made by sluice when absent); a repeated id is a duplicate.
    #[schema(min_length = 1, max_length = 128)]
    id: Option<String>,
}

/// An event of a user named by `userId` or `email`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct Event {
    #[schema(min_length = 1, max_length = 128)]
    user_id: Option<String>,
    #[schema(format = Email, min_length = 3, max_length = 128)]
    email: Option<String>,
    #[schema(min_length = 1, max_length = 128)]
    event_name: String,
    /// The message id (made by sluice when absent); a repeated id is a duplicate.
    #[schema(min_length = 1, max_length = 128)]
    id: Option<String>,
    created_at: Option<Timestamp>,
    data_fields: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct BulkUsers {
    users: Vec<UserUpdate>,
}

#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct BulkEvents {
    events: Vec<Event>,
}

/// The type of a `/v1/batch` item.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub(crate) enum SegmentType {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

/// A Segment call (identify, page, screen, group), as Segment's SDKs send it: `userId` or
/// `anonymousId` names the user.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct SegmentCall {
    #[schema(min_length = 1, max_length = 128)]
    user_id: Option<String>,
    #[schema(min_length = 1, max_length = 128)]
    anonymous_id: Option<String>,
    /// In a `/v1/batch` item: which call it is.
    #[serde(rename = "type")]
    call: Option<SegmentType>,
    /// The event of a `track` call.
    #[schema(min_length = 1, max_length = 128)]
    event: Option<String>,
    name: Option<String>,
    traits: Option<BTreeMap<String, Value>>,
    properties: Option<BTreeMap<String, Value>>,
    context: Option<BTreeMap<String, Value>>,
    #[schema(min_length = 1, max_length = 128)]
    message_id: Option<String>,
    /// When the call happened by the client's clock: the event's `createdAt`, corrected for
    /// clock skew by `receivedAt - sentAt`.
    #[schema(format = DateTime)]
    timestamp: Option<String>,
    /// Stands in for a missing `timestamp` (RudderStack's SDKs send this one).
    #[schema(format = DateTime)]
    original_timestamp: Option<String>,
    /// When the client sent the call, by its clock.
    #[schema(format = DateTime)]
    sent_at: Option<String>,
    /// Kept with the event as sent.
    integrations: Option<BTreeMap<String, Value>>,
    /// The other id of an `alias` call.
    #[schema(min_length = 1, max_length = 128)]
    previous_id: Option<String>,
    group_id: Option<String>,
    /// The API key, when no header carries it.
    write_key: Option<String>,
}

/// `/v1/batch`: calls of any type, each with its `type`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct SegmentBatch {
    batch: Vec<SegmentCall>,
    write_key: Option<String>,
    /// When the client sent the batch, by its clock: corrects the calls' `createdAt`.
    #[schema(format = DateTime)]
    sent_at: Option<String>,
}

/// One event of SendGrid's Event Webhook.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct SendgridEvent {
    #[schema(format = Email, min_length = 3, max_length = 128)]
    email: String,
    #[schema(min_length = 1, max_length = 64)]
    event: String,
    #[schema(min_length = 1, max_length = 128)]
    sg_event_id: Option<String>,
    timestamp: Option<i64>,
}

/// A search: a Lucene query (empty: everything), how many hits, and Elasticsearch-style
/// aggregations.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct Search {
    query: Option<String>,
    #[schema(minimum = 0, maximum = 10000)]
    size: Option<u32>,
    aggs: Option<BTreeMap<String, Value>>,
}

/// The answer of a search.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct SearchResult {
    total: u64,
    hits: Vec<BTreeMap<String, Value>>,
    aggregations: Option<BTreeMap<String, Value>>,
}

/// A stored profile.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct Profile {
    user_id: Option<String>,
    email: Option<String>,
    data_fields: BTreeMap<String, Value>,
    created_at: Option<Value>,
    updated_at: Option<Value>,
}

/// A user's events, newest `createdAt` first.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct UserEvents {
    events: Vec<BTreeMap<String, Value>>,
}

/// The operations routes' JSON answers (`/healthz`, `/readyz`, `/stats`).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct Status {
    /// `ok` (`/healthz`), `ready` or `not ready`.
    status: String,
}

/// The success body of every ingest route (`crate::response::Accepted`).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct AcceptedBody {
    /// `Success`.
    code: String,
    accepted: u64,
    failed: u64,
    failures: Vec<crate::response::Failure>,
    /// The id of each accepted message, in request order.
    message_ids: Vec<String>,
}

/// Every error's body (`crate::error::ApiError`): a code and what is wrong, where.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct ErrorBody {
    code: String,
    error: String,
    /// With "no valid item": why each item was refused.
    failures: Option<Vec<crate::response::Failure>>,
    /// On `/v1/*` routes: the same text as `error`, where the Segment and RudderStack SDKs
    /// read it.
    message: Option<String>,
    /// On `/v1/*` routes: `false`.
    success: Option<bool>,
}

/// The answers of a write.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum IngestAnswers {
    /// Every accepted message is durable (acknowledged by the log, or in the spill buffer);
    /// invalid items of a bulk request are listed by index in `failures`.
    #[response(status = 200)]
    Accepted(AcceptedBody),
    /// Malformed JSON (with line and column), or no valid item.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No key, an unknown key, or a disabled org.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The key's scope does not cover writing (a `read` key).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The body (decoded), an item or the item count is over its limit.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// A `Content-Encoding` other than gzip, deflate or identity.
    #[response(status = 415)]
    UnsupportedEncoding(ErrorBody),
    /// The org is over its rate limit: nothing was written; retry after `Retry-After` seconds.
    #[response(status = 429)]
    RateLimited(ErrorBody),
    /// The messages cannot be made durable now: nothing was acknowledged; retry after
    /// `Retry-After` seconds.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The body of `202 Accepted`: the `user_delete` message is durable.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct ForgetBody {
    /// `Accepted`.
    code: String,
    /// The id of the `user_delete` message.
    message_id: String,
}

/// The answers of forgetting a user.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum ForgetAnswers {
    /// The `user_delete` message is durable; the pipeline removes the profile and every event
    /// of the user in order with the user's other messages.
    #[response(status = 202)]
    Accepted(ForgetBody),
    /// An id or email that cannot be a user's.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The key is not a `full` key.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The org is over its rate limit.
    #[response(status = 429)]
    RateLimited(ErrorBody),
    /// The message cannot be made durable now, or the index cannot be read to find the email.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The answers of a profile read.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum ProfileAnswers {
    #[response(status = 200)]
    Found(Profile),
    #[response(status = 400)]
    BadRequest(ErrorBody),
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The key's scope does not cover reading (a `write` key).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such user in the key's org.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// This node has no index to read (an API-only node with the embedded index).
    #[response(status = 501)]
    NotServed(ErrorBody),
    /// The index cannot be read now.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The answers of a user's events.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum EventsAnswers {
    #[response(status = 200)]
    Found(UserEvents),
    /// A wrong query string, or a limit over 10,000.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The key's scope does not cover reading (a `write` key).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    #[response(status = 501)]
    NotServed(ErrorBody),
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The answers of a search.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum SearchAnswers {
    #[response(status = 200)]
    Found(SearchResult),
    /// Malformed JSON, a query or aggregation the index refuses, a size over 10,000.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The key's scope does not cover reading (a `write` key).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    #[response(status = 413)]
    TooLarge(ErrorBody),
    #[response(status = 415)]
    UnsupportedEncoding(ErrorBody),
    #[response(status = 501)]
    NotServed(ErrorBody),
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("Api-Key"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "key_query",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("key"))),
        );
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sluice",
        description = "Ingestion of user-profile updates and events: each message is durable before the answer (SPEC §4).",
        license(name = "Apache-2.0"),
    ),
    paths(
        crate::ingest::users_update,
        crate::ingest::users_bulk_update,
        crate::ingest::events_track,
        crate::ingest::events_track_bulk,
        crate::read::user_by_id,
        crate::read::user_by_email,
        crate::forget::by_id,
        crate::forget::by_email,
        crate::read::user_events,
        crate::read::search_users,
        crate::read::search_events,
        crate::segment::identify,
        crate::segment::track,
        crate::segment::page,
        crate::segment::screen,
        crate::segment::group,
        crate::segment::alias,
        crate::segment::batch,
        crate::segment::identify_short,
        crate::segment::track_short,
        crate::segment::page_short,
        crate::segment::screen_short,
        crate::segment::group_short,
        crate::segment::alias_short,
        crate::segment::batch_short,
        crate::sendgrid::webhook,
        crate::ops::healthz,
        crate::ops::readyz,
        crate::ops::stats,
        crate::ops::metrics,
        crate::ops::dashboard,
        openapi_json,
    ),
    components(schemas(
        AcceptedBody,
        ErrorBody,
        crate::response::Failure,
        Profile,
        UserEvents,
        SearchResult,
        Status,
    )),
    modifiers(&Security),
    security(("api_key" = []), ("bearer" = [])),
    tags(
        (name = "ingest", description = "Writes: 200 only once every accepted message is durable."),
        (name = "read", description = "Profiles, events and search, scoped to the key's org."),
        (name = "forget", description = "Forgetting a user (GDPR erasure), with a `full` key."),
        (name = "segment", description = "Segment's HTTP Tracking API."),
        (name = "webhooks", description = "Email platforms' webhooks."),
        (name = "operations", description = "Probes, metrics, the dashboard and this document."),
    ),
)]
pub struct ApiDoc;

/// The document as JSON, built once.
pub fn document() -> &'static [u8] {
    static DOCUMENT: OnceLock<Vec<u8>> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        // What the derive cannot say: which of the optional ids a message needs, and which
        // fields each Segment call needs.
        let schemas = &mut doc["components"]["schemas"];
        let one_of = |fields: &[&str]| {
            Value::Array(
                fields
                    .iter()
                    .map(|f| serde_json::json!({"required": [f]}))
                    .collect(),
            )
        };
        for name in ["UserUpdate", "Event"] {
            schemas[name]["anyOf"] = one_of(&["userId", "email"]);
        }
        schemas["SegmentCall"]["anyOf"] = one_of(&["userId", "anonymousId"]);
        schemas["SegmentCall"]["allOf"] = serde_json::json!([
            {"if": {"properties": {"type": {"const": "track"}}, "required": ["type"]}, "then": {"required": ["event"]}},
            {"if": {"properties": {"type": {"const": "alias"}}, "required": ["type"]}, "then": {"required": ["previousId"]}},
        ]);
        for (path, field) in [
            ("/v1/track", "event"),
            ("/v1/t", "event"),
            ("/v1/alias", "previousId"),
            ("/v1/a", "previousId"),
        ] {
            doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"] = serde_json::json!({
                "allOf": [{"$ref": "#/components/schemas/SegmentCall"}],
                "required": [field],
            });
        }
        // A derived document of strings, numbers and maps serializes.
        serde_json::to_vec(&doc).unwrap_or_default()
    })
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)),
)]
pub(crate) async fn openapi_json() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let doc: Value = serde_json::from_slice(document()).expect("JSON");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1")),
            "{}",
            doc["openapi"]
        );
        let paths = doc["paths"].as_object().expect("paths");
        for (path, method) in [
            ("/api/users/update", "post"),
            ("/api/users/bulkUpdate", "post"),
            ("/api/events/track", "post"),
            ("/api/events/trackBulk", "post"),
            ("/api/users/{user_id}", "get"),
            ("/api/users/by-email/{email}", "get"),
            ("/api/users/{user_id}/events", "get"),
            ("/api/search/users", "post"),
            ("/api/search/events", "post"),
            ("/v1/identify", "post"),
            ("/v1/batch", "post"),
            ("/webhooks/sendgrid", "post"),
            ("/healthz", "get"),
            ("/readyz", "get"),
            ("/stats", "get"),
            ("/metrics", "get"),
            ("/", "get"),
            ("/openapi.json", "get"),
        ] {
            assert!(paths[path][method].is_object(), "{method} {path}");
        }
        let event = &doc["components"]["schemas"]["Event"];
        assert_eq!(event["required"], serde_json::json!(["eventName"]));
        assert!(event["properties"]["dataFields"].is_object());
    }
}
