//! The Segment HTTP Tracking API routes (`/v1/identify`, `/v1/track`, ..., `/v1/batch`, and
//! the one-letter forms analytics.js posts to: `/v1/i`, `/v1/t`, `/v1/p`, `/v1/s`, `/v1/g`,
//! `/v1/a`, `/v1/b`).
//! Auth: the standard headers, Basic auth with the key as user name, or `writeKey` in the body.
//! Bodies are JSON whatever the `Content-Type` (analytics.js sends `text/plain`, which spares
//! the browser a CORS preflight). Every error under `/v1/` also carries `message` and
//! `success: false` (`sdk_error_fields`), which is what the SDKs read.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde_json::Value;
use serde_json::value::RawValue;
use sluice_model::segment::{SegmentCall, SegmentEnvelope, parse_segment};
use sluice_registry::Org;

use crate::AppState;
use crate::auth::KeySources;
use crate::body::read_request;
use crate::error::{ApiError, json_error};
use crate::ingest::{accept, parse_items};
use crate::response::Accepted;

async fn authenticate(
    app: &AppState,
    headers: &HeaderMap,
    envelope: &SegmentEnvelope<'_>,
) -> Result<Arc<Org>, ApiError> {
    match &envelope.write_key {
        Some(key) if headers.get("api-key").is_none() && headers.get("authorization").is_none() => {
            app.auth
                .org_for_key(key, sluice_registry::Access::Write)
                .await
        }
        _ => {
            app.auth
                .authenticate(
                    headers,
                    KeySources::WithBasic,
                    sluice_registry::Access::Write,
                )
                .await
        }
    }
}

async fn one(
    app: &AppState,
    headers: &HeaderMap,
    body: &[u8],
    call: SegmentCall,
) -> Result<Accepted, ApiError> {
    let item: &RawValue = serde_json::from_slice(body).map_err(|e| json_error(&e, "body"))?;
    let envelope: SegmentEnvelope<'_> = serde_json::from_str(item.get())
        .map_err(|e| json_error(&e, "body must be a Segment call object"))?;
    let org = authenticate(app, headers, &envelope).await?;
    if item.get().len() > app.limits.max_item_bytes {
        return Err(ApiError::TooLarge(format!(
            "the message is {} bytes; the limit is {} bytes",
            item.get().len(),
            app.limits.max_item_bytes
        )));
    }
    let message = parse_segment(item, Some(call), None).map_err(|e| ApiError::BadRequest(e.0))?;
    accept(app, &org, vec![message], Vec::new()).await
}

macro_rules! segment_route {
    ($name:ident, $call:expr, $path:literal, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(
                                    post,
                                    path = $path,
                                    tag = "segment",
                                    request_body = crate::openapi::SegmentCall,
                                    security(("api_key" = []), ("bearer" = []), ("basic" = [])),
                                    responses(crate::openapi::IngestAnswers),
                                )]
        pub(crate) async fn $name(
            State(app): State<AppState>,
            request: Request,
        ) -> Result<Accepted, ApiError> {
            let (parts, body) = read_request(request, app.limits.max_request_bytes).await?;
            one(&app, &parts.headers, &body, $call).await
        }
    };
}

segment_route!(
    identify,
    SegmentCall::Identify,
    "/v1/identify",
    "Segment `identify`: a user-profile update from `traits`."
);
segment_route!(
    track,
    SegmentCall::Track,
    "/v1/track",
    "Segment `track`: an event named `event`."
);
segment_route!(
    page,
    SegmentCall::Page,
    "/v1/page",
    "Segment `page`: a page view."
);
segment_route!(
    screen,
    SegmentCall::Screen,
    "/v1/screen",
    "Segment `screen`: a screen view."
);
segment_route!(
    group,
    SegmentCall::Group,
    "/v1/group",
    "Segment `group`: the user joins a group."
);
segment_route!(
    alias,
    SegmentCall::Alias,
    "/v1/alias",
    "Segment `alias`: another id of the user."
);

/// Segment `batch`: calls of any type; invalid ones are listed in `failures`.
#[utoipa::path(
    post,
    path = "/v1/batch",
    tag = "segment",
    request_body = crate::openapi::SegmentBatch,
    security(("api_key" = []), ("bearer" = []), ("basic" = [])),
    responses(crate::openapi::IngestAnswers),
)]
pub(crate) async fn batch(
    State(app): State<AppState>,
    request: Request,
) -> Result<Accepted, ApiError> {
    batch_of(&app, request).await
}

/// `/v1/batch` as analytics.js calls it when it batches.
#[utoipa::path(
    post,
    path = "/v1/b",
    tag = "segment",
    request_body = crate::openapi::SegmentBatch,
    security(("api_key" = []), ("bearer" = []), ("basic" = [])),
    responses(crate::openapi::IngestAnswers),
)]
pub(crate) async fn batch_short(
    State(app): State<AppState>,
    request: Request,
) -> Result<Accepted, ApiError> {
    batch_of(&app, request).await
}

async fn batch_of(app: &AppState, request: Request) -> Result<Accepted, ApiError> {
    let (parts, body) = read_request(request, app.limits.max_request_bytes).await?;
    let headers = &parts.headers;
    let envelope: SegmentEnvelope<'_> = serde_json::from_slice(&body)
        .map_err(|e| json_error(&e, "body must be {\"batch\": [...]}"))?;
    let org = authenticate(app, headers, &envelope).await?;
    let items = envelope.batch.as_deref().ok_or_else(|| {
        ApiError::BadRequest("body must be {\"batch\": [...]}: missing field `batch`".into())
    })?;
    let sent_at = envelope.sent_at_ms();
    let (messages, failures) = parse_items(items, "batch", &app.limits, |item| {
        parse_segment(item, None, sent_at)
    })?;
    accept(app, &org, messages, failures).await
}

// The paths analytics.js posts to: the first letter of the call's type.
segment_route!(
    identify_short,
    SegmentCall::Identify,
    "/v1/i",
    "`/v1/identify` as analytics.js calls it."
);
segment_route!(
    track_short,
    SegmentCall::Track,
    "/v1/t",
    "`/v1/track` as analytics.js calls it."
);
segment_route!(
    page_short,
    SegmentCall::Page,
    "/v1/p",
    "`/v1/page` as analytics.js calls it."
);
segment_route!(
    screen_short,
    SegmentCall::Screen,
    "/v1/s",
    "`/v1/screen` as analytics.js calls it."
);
segment_route!(
    group_short,
    SegmentCall::Group,
    "/v1/g",
    "`/v1/group` as analytics.js calls it."
);
segment_route!(
    alias_short,
    SegmentCall::Alias,
    "/v1/a",
    "`/v1/alias` as analytics.js calls it."
);

/// Adds `message` (the text of `error`) and `success: false` to an error answered under
/// `/v1/`: segment-analytics-python and rudder-sdk-python raise `KeyError` on an error body
/// without `message`, hiding what was wrong. Only error answers are rewritten; they are small.
pub(crate) async fn sdk_error_fields<F, Fut>(request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let segment = request.uri().path().starts_with("/v1/");
    let response = inner(request).await;
    let status = response.status();
    if !segment || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, Body::empty());
    };
    let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    if let Some(error) = fields.get("error").cloned() {
        fields.entry("message").or_insert(error);
    }
    fields.insert("success".into(), Value::Bool(false));
    let Ok(rewritten) = serde_json::to_vec(&fields) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(rewritten))
}
