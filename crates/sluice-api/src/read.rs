//! The read routes (SPEC §4): profiles, a user's events, and search with aggregations. Every
//! read is scoped to the org of the API key.

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use serde::Deserialize;
use serde_json::Value;
use sluice_index::{MAX_SEARCH_SIZE, SearchRequest, SearchResponse, Target};

use crate::AppState;
use crate::auth::KeySources;
use crate::body::read_request;
use crate::error::{ApiError, json_error};

/// The profile of a user, by id.
#[utoipa::path(
    get,
    path = "/api/users/{user_id}",
    tag = "read",
    params(("user_id" = String, Path, description = "The user's id")),
    responses(crate::openapi::ProfileAnswers),
)]
pub(crate) async fn user_by_id(
    State(app): State<AppState>,
    Path(user_id): Path<String>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    user(app, user_id, request).await
}

/// `GET /api/users/update`: the user whose id is "update" (the path is also a POST route).
pub(crate) async fn user_named_update(
    State(app): State<AppState>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    user(app, "update".into(), request).await
}

/// `GET /api/users/bulkUpdate`: the user whose id is "bulkUpdate".
pub(crate) async fn user_named_bulk_update(
    State(app): State<AppState>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    user(app, "bulkUpdate".into(), request).await
}

async fn user(app: AppState, user_id: String, request: Request) -> Result<Json<Value>, ApiError> {
    let org = app
        .auth
        .authenticate(
            request.headers(),
            KeySources::Standard,
            sluice_registry::Access::Read,
        )
        .await?;
    let profile = app
        .index()?
        .get_user(&org.name, &format!("u:{user_id}"))
        .await?;
    found(profile, "userId", &user_id, &org.name)
}

/// The profile of a user, by email (compared lowercased).
#[utoipa::path(
    get,
    path = "/api/users/by-email/{email}",
    tag = "read",
    params(("email" = String, Path, description = "The user's email")),
    responses(crate::openapi::ProfileAnswers),
)]
pub(crate) async fn user_by_email(
    State(app): State<AppState>,
    Path(email): Path<String>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let org = app
        .auth
        .authenticate(
            request.headers(),
            KeySources::Standard,
            sluice_registry::Access::Read,
        )
        .await?;
    let profile = app.index()?.get_user_by_email(&org.name, &email).await?;
    found(profile, "email", &email, &org.name)
}

/// The profile, or a 404 that says which lookup found nothing.
fn found(
    profile: Option<Value>,
    by: &str,
    value: &str,
    org: &str,
) -> Result<Json<Value>, ApiError> {
    profile
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no user with {by} {value:?} in org {org:?}")))
}

/// Default number of events `GET /api/users/{userId}/events` returns.
const DEFAULT_EVENTS_LIMIT: usize = 50;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsParams {
    limit: Option<usize>,
}

/// A user's events, newest `createdAt` first.
#[utoipa::path(
    get,
    path = "/api/users/{user_id}/events",
    tag = "read",
    params(
        ("user_id" = String, Path, description = "The user's id"),
        ("limit" = Option<u32>, Query, minimum = 0, maximum = 10000, description = "How many (default 50)"),
    ),
    responses(crate::openapi::EventsAnswers),
)]
pub(crate) async fn user_events(
    State(app): State<AppState>,
    Path(user_id): Path<String>,
    params: Result<Query<EventsParams>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let org = app
        .auth
        .authenticate(
            request.headers(),
            KeySources::Standard,
            sluice_registry::Access::Read,
        )
        .await?;
    let Query(params) = params.map_err(|e| {
        ApiError::BadRequest(format!(
            "query string: {} (expected ?limit=N)",
            e.body_text()
        ))
    })?;
    let limit = params.limit.unwrap_or(DEFAULT_EVENTS_LIMIT);
    if limit > MAX_SEARCH_SIZE {
        return Err(ApiError::BadRequest(format!(
            "limit {limit} is too large: at most {MAX_SEARCH_SIZE}"
        )));
    }
    let events = app
        .index()?
        .user_events(&org.name, &format!("u:{user_id}"), limit)
        .await?;
    Ok(Json(serde_json::json!({ "events": events })))
}

/// Searches profiles (Lucene query syntax, Elasticsearch aggregations).
#[utoipa::path(
    post,
    path = "/api/search/users",
    tag = "read",
    request_body = crate::openapi::Search,
    responses(crate::openapi::SearchAnswers),
)]
pub(crate) async fn search_users(
    State(app): State<AppState>,
    request: Request,
) -> Result<Json<SearchResponse>, ApiError> {
    search(&app, request, Target::Users).await
}

/// Searches events (Lucene query syntax, Elasticsearch aggregations).
#[utoipa::path(
    post,
    path = "/api/search/events",
    tag = "read",
    request_body = crate::openapi::Search,
    responses(crate::openapi::SearchAnswers),
)]
pub(crate) async fn search_events(
    State(app): State<AppState>,
    request: Request,
) -> Result<Json<SearchResponse>, ApiError> {
    search(&app, request, Target::Events).await
}

async fn search(
    app: &AppState,
    request: Request,
    target: Target,
) -> Result<Json<SearchResponse>, ApiError> {
    let (parts, body) = read_request(request, app.limits.max_request_bytes).await?;
    let org = app
        .auth
        .authenticate(
            &parts.headers,
            KeySources::Standard,
            sluice_registry::Access::Read,
        )
        .await?;
    let search: SearchRequest = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_str("{}").map_err(|e| json_error(&e, "search request"))?
    } else {
        serde_json::from_slice(&body).map_err(|e| json_error(&e, "search request"))?
    };
    Ok(Json(app.index()?.search(&org.name, target, &search).await?))
}
