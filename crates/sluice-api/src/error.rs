//! The API's error type and the one place its variants map to HTTP statuses and codes.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::response::Failure;

/// Every way a request can fail. The message says what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON at line {line} column {column}: {message}")]
    MalformedJson {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{0}")]
    BadRequest(String),
    /// Every item of the request was invalid.
    #[error("no valid item in the request: {summary}")]
    NoValidItem {
        summary: String,
        failures: Vec<Failure>,
    },
    #[error("{0}")]
    Unauthorized(String),
    /// Known, but not allowed (a browser origin not listed).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    /// A `Content-Encoding` other than gzip, deflate or identity.
    #[error("{0}")]
    UnsupportedEncoding(String),
    #[error("{0}")]
    Unavailable(String),
    /// The org is over its rate limit; nothing of the request was written.
    #[error("{message}")]
    RateLimited { message: String, retry_after: u64 },
    /// The route exists but this node does not serve it (e.g. reads on an API-only node).
    #[error("{0}")]
    NotServed(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::MalformedJson { .. } => (StatusCode::BAD_REQUEST, "BadJson"),
            ApiError::BadRequest(_) | ApiError::NoValidItem { .. } => {
                (StatusCode::BAD_REQUEST, "BadRequest")
            }
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "TooLarge"),
            ApiError::UnsupportedEncoding(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedEncoding")
            }
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "RateLimited"),
            ApiError::NotServed(_) => (StatusCode::NOT_IMPLEMENTED, "NotServed"),
        }
    }
}

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'static str,
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    failures: Option<&'a [Failure]>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request not accepted");
        }
        let retry_after = match &self {
            ApiError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        let failures = match &self {
            ApiError::NoValidItem { failures, .. } => Some(failures.as_slice()),
            _ => None,
        };
        let body = ErrorBody {
            code,
            error: self.to_string(),
            failures,
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

/// Turns a serde_json parse error into a 400 that points at the position.
pub(crate) fn json_error(e: &serde_json::Error, what: &str) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof => ApiError::MalformedJson {
            line: e.line(),
            column: e.column(),
            message: strip_position(&e.to_string()),
        },
        Category::Data | Category::Io => ApiError::BadRequest(format!(
            "{what}: {} (line {} column {})",
            strip_position(&e.to_string()),
            e.line(),
            e.column()
        )),
    }
}

/// serde_json appends " at line L column C"; we report the position in our own words.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

impl From<sluice_index::IndexError> for ApiError {
    fn from(e: sluice_index::IndexError) -> Self {
        match e {
            sluice_index::IndexError::BadRequest(message) => ApiError::BadRequest(message),
            other => ApiError::Unavailable(format!("cannot read the index right now: {other}")),
        }
    }
}
