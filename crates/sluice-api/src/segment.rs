//! The Segment HTTP Tracking API routes (`/v1/identify`, `/v1/track`, ..., `/v1/batch`).
//! Auth: the standard headers, Basic auth with the key as user name, or `writeKey` in the body.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
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
    let message = parse_segment(item, Some(call)).map_err(|e| ApiError::BadRequest(e.0))?;
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
    let (parts, body) = read_request(request, app.limits.max_request_bytes).await?;
    let headers = &parts.headers;
    let envelope: SegmentEnvelope<'_> = serde_json::from_slice(&body)
        .map_err(|e| json_error(&e, "body must be {\"batch\": [...]}"))?;
    let org = authenticate(&app, headers, &envelope).await?;
    let items = envelope.batch.as_deref().ok_or_else(|| {
        ApiError::BadRequest("body must be {\"batch\": [...]}: missing field `batch`".into())
    })?;
    let (messages, failures) = parse_items(items, "batch", &app.limits, |item| {
        parse_segment(item, None)
    })?;
    accept(&app, &org, messages, failures).await
}
