//! The admin socket: a Unix socket at `<data_dir>/admin.sock` on which a server that holds
//! embedded logs serves the admin operations that need them (`sluice dlq`), so the commands
//! work while it runs. Who may use it is who may open the data dir: the socket is created
//! with mode 0600, like the files beside it; nothing is exposed on the HTTP port.
//!
//! Routes (HTTP/1.1, JSON):
//! - `GET /dlq/letters`: every dead letter (`dead_letter::Session::letters`).
//! - `POST /dlq/replay` with `{"ids": [...], "all": bool}`: `dead_letter::Session::replay`; 400 with
//!   `{"error": ...}` for an unknown ID, 500 if the replay failed.
//! - `POST /dlq/purge` with `{"org": ..., "userKey": ...}`: `dead_letter::Session::purge`.
//! - `POST /log/append` with `{"key": ..., "value": ...}` (the record's key and JSON value as
//!   text): appends one record to the ingest log (`sluice users forget`); 500 if the log
//!   refused it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::config::Config;
use sluice_pipeline::dead_letter::{ReplayError, ReplayReport, Session};

pub fn path(config: &Config) -> PathBuf {
    config.data_dir.join("admin.sock")
}

#[derive(Debug, Serialize, Deserialize)]
struct ReplayRequest {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
}

/// Binds the socket (replacing a stale one: the caller holds the data dir's locks, so no other
/// server uses it) and serves until `stop`. The socket file is removed when it stops.
pub fn serve(
    path: &Path,
    session: Arc<Session>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot remove the stale {}", path.display()));
        }
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot create the admin socket {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    let app = Router::new()
        .route("/dlq/letters", get(list))
        .route("/dlq/replay", post(replay))
        .route("/log/append", post(append))
        .route("/dlq/purge", post(purge))
        .with_state(session);
    let owned = path.to_path_buf();
    Ok(tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::warn!(error = %e, "admin socket failed");
        }
        let _ = std::fs::remove_file(&owned);
    }))
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn list(State(session): State<Arc<Session>>) -> Response {
    match session.letters().await {
        Ok(letters) => {
            let letters: Vec<Value> = letters.iter().map(|l| l.to_json()).collect();
            Json(letters).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn replay(
    State(session): State<Arc<Session>>,
    Json(request): Json<ReplayRequest>,
) -> Response {
    match session.replay(&request.ids, request.all).await {
        Ok(report) => Json(report).into_response(),
        Err(ReplayError::Usage(message)) => error(StatusCode::BAD_REQUEST, message),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct PurgeRequest {
    org: String,
    #[serde(rename = "userKey")]
    user_key: String,
}

async fn purge(State(session): State<Arc<Session>>, Json(request): Json<PurgeRequest>) -> Response {
    match session.purge(&request.org, &request.user_key).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /dlq/purge` on the server at `socket`.
pub async fn purge_at(
    socket: &Path,
    org: &str,
    user_key: &str,
) -> anyhow::Result<sluice_pipeline::dead_letter::PurgeReport> {
    let request = serde_json::to_value(PurgeRequest {
        org: org.to_string(),
        user_key: user_key.to_string(),
    })?;
    let answer = call(socket, Method::POST, "/dlq/purge", Some(request)).await?;
    serde_json::from_value(answer).context("admin socket: unexpected purge answer")
}

/// One record for the ingest log, as text.
#[derive(Debug, Serialize, Deserialize)]
struct AppendRequest {
    key: String,
    value: String,
}

async fn append(
    State(session): State<Arc<Session>>,
    Json(request): Json<AppendRequest>,
) -> Response {
    let record = sluice_log::Record {
        key: request.key.into_bytes(),
        value: request.value.into_bytes(),
        timestamp_ms: sluice_model::time::now_ms(),
    };
    match session.ingest.append(vec![record]).await {
        Ok(_) => Json(json!({"appended": 1})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /log/append` on the server at `socket`: the record is durable in its log on success.
pub async fn append_at(socket: &Path, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
    let request = serde_json::to_value(AppendRequest {
        key: String::from_utf8_lossy(key).into_owned(),
        value: String::from_utf8_lossy(value).into_owned(),
    })?;
    call(socket, Method::POST, "/log/append", Some(request)).await?;
    Ok(())
}

/// One request to the server at `socket`; the answer's JSON if it is a success.
async fn call(
    socket: &Path,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the server's admin socket {}",
            socket.display()
        )
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("admin socket: handshake failed")?;
    tokio::spawn(connection);
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "sluice")
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let response = sender
        .send_request(request)
        .await
        .context("admin socket: no answer")?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .context("admin socket: answer cut off")?
        .to_bytes();
    let value: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("admin socket: {uri} answered {status} with no JSON"))?;
    if !status.is_success() {
        anyhow::bail!(
            "{}",
            value["error"]
                .as_str()
                .unwrap_or("the server refused the request")
        );
    }
    Ok(value)
}

/// `GET /dlq/letters` on the server at `socket`.
pub async fn list_at(socket: &Path) -> anyhow::Result<Vec<Value>> {
    let answer = call(socket, Method::GET, "/dlq/letters", None).await?;
    serde_json::from_value(answer).context("admin socket: letters are not a list")
}

/// `POST /dlq/replay` on the server at `socket`.
pub async fn replay_at(socket: &Path, ids: &[String], all: bool) -> anyhow::Result<ReplayReport> {
    let request = serde_json::to_value(ReplayRequest {
        ids: ids.to_vec(),
        all,
    })?;
    let answer = call(socket, Method::POST, "/dlq/replay", Some(request)).await?;
    serde_json::from_value(answer).context("admin socket: unexpected replay answer")
}
