//! The native ingest routes: `/api/users/update`, `/api/users/bulkUpdate`, `/api/events/track`,
//! `/api/events/trackBulk`.

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_log::Record;
use sluice_model::{ItemError, Message, parse_event, parse_user_update};
use sluice_registry::Org;
use sluice_spill::BridgeError;

use crate::auth::KeySources;
use crate::body::read_request;
use crate::error::{ApiError, json_error};
use crate::response::{Accepted, Failure};
use crate::{AppState, Limits};

type ItemParser = for<'a> fn(&'a RawValue) -> Result<Message<'a>, ItemError>;

/// One user-profile update.
#[utoipa::path(
    post,
    path = "/api/users/update",
    tag = "ingest",
    request_body = crate::openapi::UserUpdate,
    responses(crate::openapi::IngestAnswers),
)]
pub(crate) async fn users_update(
    State(app): State<AppState>,
    request: Request,
) -> Result<Accepted, ApiError> {
    let (parts, body) = read_request(request, app.limits.max_request_bytes).await?;
    single(&app, &parts.headers, &body, parse_user_update).await
}

/// One event.
#[utoipa::path(
    post,
    path = "/api/events/track",
    tag = "ingest",
    request_body = crate::openapi::Event,
    responses(crate::openapi::IngestAnswers),
)]
pub(crate) async fn events_track(
    State(app): State<AppState>,
    request: Request,
) -> Result<Accepted, ApiError> {
    let (parts, body) = read_request(request, app.limits.max_request_bytes).await?;
    single(&app, &parts.headers, &body, parse_event).await
}

#[derive(Deserialize)]
struct BulkUsers<'a> {
    #[serde(borrow)]
    users: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct BulkEvents<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

/// Pulls the items out of a bulk body in one typed pass.
type ExtractItems = for<'a> fn(&'a [u8]) -> Result<Vec<&'a RawValue>, serde_json::Error>;

fn users_items(body: &[u8]) -> Result<Vec<&RawValue>, serde_json::Error> {
    serde_json::from_slice::<BulkUsers<'_>>(body).map(|bulk| bulk.users)
}

fn events_items(body: &[u8]) -> Result<Vec<&RawValue>, serde_json::Error> {
    serde_json::from_slice::<BulkEvents<'_>>(body).map(|bulk| bulk.events)
}

/// Many user-profile updates; invalid items are listed in `failures`, the others accepted.
#[utoipa::path(
    post,
    path = "/api/users/bulkUpdate",
    tag = "ingest",
    request_body = crate::openapi::BulkUsers,
    responses(crate::openapi::IngestAnswers),
)]
pub(crate) async fn users_bulk_update(
    State(app): State<AppState>,
    request: Request,
) -> Result<Accepted, ApiError> {
    bulk(&app, request, "users", users_items, parse_user_update).await
}

/// Many events; invalid items are listed in `failures`, the others accepted.
#[utoipa::path(
    post,
    path = "/api/events/trackBulk",
    tag = "ingest",
    request_body = crate::openapi::BulkEvents,
    responses(crate::openapi::IngestAnswers),
)]
pub(crate) async fn events_track_bulk(
    State(app): State<AppState>,
    request: Request,
) -> Result<Accepted, ApiError> {
    bulk(&app, request, "events", events_items, parse_event).await
}

/// A bulk route: `{"<field>": [item, ...]}`, one message per valid item.
async fn bulk(
    app: &AppState,
    request: Request,
    field: &str,
    extract: ExtractItems,
    parse: ItemParser,
) -> Result<Accepted, ApiError> {
    let (parts, body) = read_request(request, app.limits.max_request_bytes).await?;
    let org = app
        .auth
        .authenticate(
            &parts.headers,
            KeySources::Standard,
            sluice_registry::Access::Write,
        )
        .await?;
    let items = extract(&body)
        .map_err(|e| json_error(&e, &format!("body must be {{\"{field}\": [...]}}")))?;
    let (messages, failures) = parse_items(&items, field, &app.limits, parse)?;
    accept(app, &org, messages, failures).await
}

async fn single(
    app: &AppState,
    headers: &HeaderMap,
    body: &[u8],
    parse: ItemParser,
) -> Result<Accepted, ApiError> {
    let org = app
        .auth
        .authenticate(
            headers,
            KeySources::Standard,
            sluice_registry::Access::Write,
        )
        .await?;
    let item: &RawValue = serde_json::from_slice(body).map_err(|e| json_error(&e, "body"))?;
    if item.get().len() > app.limits.max_item_bytes {
        return Err(ApiError::TooLarge(format!(
            "the message is {} bytes; the limit is {} bytes",
            item.get().len(),
            app.limits.max_item_bytes
        )));
    }
    let message = parse(item).map_err(|e| ApiError::BadRequest(e.0))?;
    accept(app, &org, vec![message], Vec::new()).await
}

/// Parses every item; invalid ones become failures by index and do not stop the others.
pub(crate) fn parse_items<'a>(
    items: &[&'a RawValue],
    field: &str,
    limits: &Limits,
    parse: impl Fn(&'a RawValue) -> Result<Message<'a>, ItemError>,
) -> Result<(Vec<Message<'a>>, Vec<Failure>), ApiError> {
    if items.len() > limits.max_request_items {
        return Err(ApiError::TooLarge(format!(
            "{field} has {} items; the limit is {} per request",
            items.len(),
            limits.max_request_items
        )));
    }
    if items.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "{field} is empty: nothing to ingest"
        )));
    }
    let mut messages = Vec::with_capacity(items.len());
    let mut failures = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let size = item.get().len();
        if size > limits.max_item_bytes {
            failures.push(Failure {
                index,
                error: format!(
                    "item is {size} bytes; the limit is {} bytes",
                    limits.max_item_bytes
                ),
            });
            continue;
        }
        match parse(item) {
            Ok(message) => messages.push(message),
            Err(e) => failures.push(Failure { index, error: e.0 }),
        }
    }
    Ok((messages, failures))
}

/// Appends the messages and answers once they are durable.
pub(crate) async fn accept(
    app: &AppState,
    org: &Org,
    messages: Vec<Message<'_>>,
    failures: Vec<Failure>,
) -> Result<Accepted, ApiError> {
    if messages.is_empty() {
        let summary = failures
            .first()
            .map_or_else(String::new, |f| format!("item {}: {}", f.index, f.error));
        return Err(ApiError::NoValidItem { summary, failures });
    }
    // All or nothing: the request's messages are admitted together, before any is written.
    app.rate_limits.admit(org, messages.len()).await?;
    let now = sluice_model::time::now_ms();
    let build = || {
        messages
            .iter()
            .map(|message| {
                let (key, value) = message.to_record(&org.name, now)?;
                Ok(Record {
                    key,
                    value,
                    timestamp_ms: now,
                })
            })
            .collect::<Result<Vec<Record>, ItemError>>()
    };
    let records = build().map_err(|e| ApiError::BadRequest(e.0))?;
    // The same records again, for the spill buffer if the log does not take them: the build
    // is deterministic and succeeded once (the bridge checks the count all the same).
    let again = || build().unwrap_or_default();
    let answer = Accepted::new(&messages, &failures);
    let started = std::time::Instant::now();
    let appended = app.bridge.append(records, &again).await;
    let waited = started.elapsed();
    crate::metrics::log_append().record(waited.as_secs_f64());
    if appended.is_ok() {
        crate::recent::recent().record(messages.len() as u64, waited);
    }
    appended.map_err(|e| match e {
            BridgeError::Timeout(timeout) => ApiError::Unavailable(format!(
                "the log did not acknowledge within {timeout:?}; nothing was acknowledged, retry the request"
            )),
            e => ApiError::Unavailable(format!("the messages could not be made durable: {e}")),
        })?;
    Ok(answer)
}
