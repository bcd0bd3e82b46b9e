//! The success body of every ingest route (SPEC §4).

use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One refused item of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Failure {
    pub index: usize,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct Accepted {
    pub code: &'static str,
    pub accepted: usize,
    pub failed: usize,
    pub failures: Vec<Failure>,
    #[serde(rename = "messageIds")]
    pub message_ids: Vec<String>,
}

impl IntoResponse for Accepted {
    fn into_response(self) -> Response {
        axum::Json(self).into_response()
    }
}
