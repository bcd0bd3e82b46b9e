//! Forgetting a user (SPEC §4, GDPR erasure): `DELETE /api/users/{userId}` and
//! `DELETE /api/users/by-email/{email}`, with a `full` key. The answer is
//! `202 {"code":"Accepted","messageId":...}` once a `user_delete` message is durable in the log
//! (the same path as any write: acknowledged by the log, or in the spill buffer). The pipeline
//! then processes it in the user's partition, in order with the user's other messages.
//!
//! By email: when this node can read the index, the profile with that email is looked up and,
//! if it has a `userId`, the message is keyed by that id (carrying the email too), so it lands
//! in the partition of the user's own messages; otherwise it is keyed by the email. (By id, the
//! pipeline forgets what was written under the profile's email as well: it reads the profile
//! in the user's partition, in order.)

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sluice_model::Message;

use crate::AppState;
use crate::auth::KeySources;
use crate::error::ApiError;
use crate::ingest::accept;

/// Forget the user with this id: its profile and every event of it.
#[utoipa::path(
    delete,
    path = "/api/users/{user_id}",
    tag = "forget",
    params(("user_id" = String, Path, description = "The user's id")),
    responses(crate::openapi::ForgetAnswers),
)]
pub(crate) async fn by_id(
    State(app): State<AppState>,
    Path(user_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let org = authenticate(&app, &headers).await?;
    let message = Message::forget(Some(&user_id), None).map_err(|e| ApiError::BadRequest(e.0))?;
    append(&app, &org, message).await
}

/// Forget the user with this email (compared lowercased).
#[utoipa::path(
    delete,
    path = "/api/users/by-email/{email}",
    tag = "forget",
    params(("email" = String, Path, description = "The user's email")),
    responses(crate::openapi::ForgetAnswers),
)]
pub(crate) async fn by_email(
    State(app): State<AppState>,
    Path(email): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let org = authenticate(&app, &headers).await?;
    let mut message = Message::forget(None, Some(&email)).map_err(|e| ApiError::BadRequest(e.0))?;
    if let Ok(index) = app.index() {
        let normalized = message.email.as_deref().unwrap_or(&email);
        let profile = index.get_user_by_email(&org.name, normalized).await?;
        if let Some(user_id) = profile.as_ref().and_then(|p| p["userId"].as_str()) {
            message.user_id = Some(user_id.to_owned().into());
        }
    }
    append(&app, &org, message).await
}

async fn authenticate(
    app: &AppState,
    headers: &HeaderMap,
) -> Result<std::sync::Arc<sluice_registry::Org>, ApiError> {
    app.auth
        .authenticate(
            headers,
            KeySources::Standard,
            sluice_registry::Access::Admin,
        )
        .await
}

async fn append(
    app: &AppState,
    org: &sluice_registry::Org,
    message: Message<'static>,
) -> Result<Response, ApiError> {
    let message_id = message.message_id.to_string();
    accept(app, org, vec![message], Vec::new()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"code": "Accepted", "messageId": message_id})),
    )
        .into_response())
}
