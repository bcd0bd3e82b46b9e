//! Forgetting users on a search server (`WriteBatch::forgets`), before the batch's bulk write:
//! 1. `_refresh` the events index, so events indexed but not yet searchable are found;
//! 2. `_delete_by_query` (`conflicts=proceed`, `refresh=true`) of every event whose
//!    `sluice.user` is a forgotten user's doc id;
//! 3. a `_bulk` of profile `delete`s, versioned like upserts (`version_type=external`, the log
//!    position after the `user_delete`): a profile missing (404) is forgotten already, and one
//!    with a newer version (409) was written again by later messages, which stand.
//!
//! Each step is idempotent, and any failure is the write's error (recoverable when the server
//! is), so the pipeline retries the whole write and nothing is committed before the user is
//! gone.

use std::fmt::Write as _;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{ElasticIndex, ErrorBody};
use crate::doc::user_doc_id;
use crate::{Forget, IndexError, Target};

pub(super) async fn apply(index: &ElasticIndex, forgets: &[Forget]) -> Result<(), IndexError> {
    let events = index.index_name(Target::Events).to_owned();
    let users = index.index_name(Target::Users).to_owned();
    let ids: Vec<String> = forgets
        .iter()
        .map(|f| user_doc_id(&f.org, &f.user_key))
        .collect();

    let (status, body) = index
        .request(Method::POST, &[&events, "_refresh"], None)
        .await?;
    if !status.is_success() {
        return Err(index.rejected("refresh before forgetting users", status, &body));
    }
    let query = json!({"query": {"bool": {"filter": [{"terms": {"sluice.user": ids}}]}}});
    let (status, body) = index
        .request_query(
            Method::POST,
            &[&events, "_delete_by_query"],
            &[("conflicts", "proceed"), ("refresh", "true")],
            Some(super::json_body(&query)?),
        )
        .await?;
    if !status.is_success() {
        return Err(index.rejected("delete the events of forgotten users", status, &body));
    }
    let deleted: DeleteByQuery = serde_json::from_slice(&body).unwrap_or_default();
    if !deleted.failures.is_empty() {
        return Err(index.unavailable(format!(
            "deleting the events of forgotten users left failures: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )));
    }

    let mut bulk = String::new();
    for (forget, id) in forgets.iter().zip(&ids) {
        let action = json!({"delete": {
            "_index": users,
            "_id": id,
            "version": forget.version,
            "version_type": "external",
        }});
        let _ = writeln!(bulk, "{action}");
    }
    let (status, body) = index
        .request_query(
            Method::POST,
            &["_bulk"],
            &[("refresh", "true")],
            Some((bulk.into_bytes().into(), "application/x-ndjson")),
        )
        .await?;
    if !status.is_success() {
        return Err(index.rejected("delete forgotten profiles", status, &body));
    }
    let answer: BulkDeletes = serde_json::from_slice(&body).map_err(|e| {
        index.unavailable(format!(
            "the answer to deleting profiles is not a bulk answer: {e}"
        ))
    })?;
    for item in answer.items {
        let result = item.delete;
        let done = StatusCode::from_u16(result.status).is_ok_and(|s| {
            s.is_success() || s == StatusCode::NOT_FOUND || s == StatusCode::CONFLICT
        });
        if !done {
            let reason = result
                .error
                .map_or_else(|| format!("status {}", result.status), |e| e.to_string());
            return Err(index.unavailable(format!("deleting a forgotten profile: {reason}")));
        }
    }
    tracing::info!(
        users = forgets.len(),
        events = deleted.deleted,
        "index: forgot users"
    );
    Ok(())
}

#[derive(Deserialize, Default)]
struct DeleteByQuery {
    #[serde(default)]
    deleted: u64,
    #[serde(default)]
    failures: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct BulkDeletes {
    items: Vec<DeleteItem>,
}

#[derive(Deserialize)]
struct DeleteItem {
    delete: DeleteResult,
}

#[derive(Deserialize)]
struct DeleteResult {
    status: u16,
    #[serde(default)]
    error: Option<ErrorBody>,
}
