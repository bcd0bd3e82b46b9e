//! The write path: one `WriteBatch` as `_bulk` requests, and what to do with each item's
//! result.
//!
//! Users: a patch that only sets scalars and arrays and merges into nested objects is what the
//! cluster's partial update does, so it goes as `update` with `doc` (the patch) and `upsert`
//! (the new profile) — no read needed. A patch that replaces a key with an object (a shallow
//! update of a nested object) cannot be said as a partial update, which would merge the objects:
//! that profile is read (`_mget`, real-time), patched here exactly as the embedded index does
//! (`doc::upserted_profile`), and written back with `index` guarded by `if_seq_no` /
//! `if_primary_term` (or `create` if it did not exist), so a concurrent writer makes it a 409,
//! not a lost update. Events are `index` by doc id `<org>:<messageId>`: writing one again
//! replaces it.
//!
//! Upserts from the log carry a version, the log position after their last update
//! (`UserUpsert::version`): those are always read-modify-writes, written with `index`,
//! `version_type=external`, so the cluster keeps the highest version and a stale owner's or a
//! replay's upsert is a 409 `version_conflict_engine_exception`, which means its updates are in
//! already: done, counted in `ElasticStats::superseded_docs`.
//!
//! Item results: 2xx is done. 409, 429, 5xx (and 401/403/404/408, which an operator or the
//! cluster fixes) are sent again, alone, with exponential backoff and jitter — a read-modify-
//! write user is read again first. Any other 4xx (a mapping or parse error) refuses the document
//! for its content: it is reported in `WriteOutcome::refused` and never retried. A whole request
//! that fails with 429/5xx/a timeout counts as all its items failing. After `item_attempts`
//! attempts the write returns a recoverable error, so the caller retries and nothing is marked
//! processed or committed past a document the cluster has not taken.

use sluice_model::Recoverable;
use std::collections::HashMap;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use reqwest::{Method, StatusCode};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Value, json};
use sluice_model::{Op, Patch};

use super::{ElasticIndex, ErrorBody, add, describe};
use crate::doc::{
    EventSource, Internal, NOT_AN_OBJECT, event_doc_id, upserted_profile, user_doc_id,
};
use crate::{IndexError, Refused, UserUpsert, WriteBatch, WriteOutcome};

/// A document of the batch: a position in `users` or `events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Doc {
    User(usize),
    Event(usize),
}

/// A stored profile, read before a read-modify-write upsert.
struct Stored {
    source: Value,
    seq_no: u64,
    primary_term: u64,
}

pub(super) async fn write(
    index: &ElasticIndex,
    batch: &WriteBatch,
) -> Result<WriteOutcome, IndexError> {
    let mut outcome = WriteOutcome::default();
    // Versioned upserts the cluster found superseded, in this write.
    let mut superseded = 0;
    let plan = Plan::new(batch);
    let mut pending = plan.docs();
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(index.config.max_retry_delay)
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempt = 1;
    loop {
        let mut failed: Vec<(Doc, String)> = Vec::new();
        let stored = match read_profiles(index, &plan, &pending).await {
            Ok(stored) => stored,
            // The users that needed a read wait for the next attempt; the rest go now.
            Err(e) if e.is_recoverable() => {
                let reason = e.to_string();
                pending.retain(|doc| {
                    let needs_read = plan.needs_read(*doc);
                    if needs_read {
                        failed.push((*doc, reason.clone()));
                    }
                    !needs_read
                });
                HashMap::new()
            }
            Err(e) => return Err(e),
        };
        let mut body: Vec<u8> = Vec::with_capacity(64 << 10);
        let mut chunk: Vec<Doc> = Vec::new();
        for &doc in &pending {
            let start = body.len();
            if let Err(reason) = encode(index, &plan, doc, &stored, &mut body) {
                body.truncate(start);
                plan.refuse(index, &mut outcome, doc, reason);
                continue;
            }
            if body.len() > index.config.bulk_max_bytes && !chunk.is_empty() {
                let tail = body.split_off(start);
                superseded += send(
                    index,
                    &plan,
                    std::mem::replace(&mut body, tail),
                    &mut chunk,
                    &mut outcome,
                    &mut failed,
                )
                .await?;
            }
            chunk.push(doc);
            if chunk.len() >= index.config.bulk_max_docs {
                superseded += send(
                    index,
                    &plan,
                    std::mem::take(&mut body),
                    &mut chunk,
                    &mut outcome,
                    &mut failed,
                )
                .await?;
            }
        }
        if !chunk.is_empty() {
            superseded += send(index, &plan, body, &mut chunk, &mut outcome, &mut failed).await?;
        }
        let Some((first, reason)) = failed.first() else {
            if superseded > 0 {
                tracing::info!(
                    superseded,
                    of = plan.users.len(),
                    "index: profile upserts already superseded by newer writes, left as they are (a replay after a restart or rebalance; if every write of a new log is superseded, the index holds the positions of an older log: use a new index prefix)"
                );
            }
            return Ok(outcome);
        };
        let first = plan.doc_id(*first);
        if attempt >= index.config.item_attempts {
            return Err(index.unavailable(format!(
                "{} of {} documents still not taken after {attempt} attempts; {first}: {reason}",
                failed.len(),
                batch.len()
            )));
        }
        add(&index.stats.retried_docs, failed.len());
        metrics::counter!("sluice_index_item_retries_total").increment(failed.len() as u64);
        let delay = delays.next().unwrap_or(index.config.max_retry_delay);
        tracing::warn!(
            attempt,
            failed = failed.len(),
            of = batch.len(),
            first = %first,
            reason = %reason,
            retry_in = ?delay,
            "index: the search store did not take some documents; sending them again"
        );
        tokio::time::sleep(delay).await;
        attempt += 1;
        pending = failed.into_iter().map(|(doc, _)| doc).collect();
    }
}

/// The documents to write: one per doc id. A user upserted more than once in the write is
/// folded into one upsert (as the merge stage does), and only the last copy of an event is
/// written: with item-level retries, two writes to one id could otherwise land out of order.
struct Plan<'a> {
    batch: &'a WriteBatch,
    /// Folded upserts, by the position of the user's last upsert.
    folded: HashMap<usize, UserUpsert>,
    /// Earlier positions folded into a user's last one (they share its refusal).
    earlier: HashMap<usize, Vec<usize>>,
    /// The position of each user's last upsert, and of each event id's last copy.
    users: Vec<usize>,
    events: Vec<usize>,
}

impl<'a> Plan<'a> {
    fn new(batch: &'a WriteBatch) -> Plan<'a> {
        let mut last_user: HashMap<(&str, &str), usize> = HashMap::new();
        let mut folded: HashMap<usize, UserUpsert> = HashMap::new();
        let mut earlier: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, upsert) in batch.users.iter().enumerate() {
            let key = (upsert.org.as_str(), upsert.user_key.as_str());
            if let Some(previous) = last_user.insert(key, i) {
                let before = folded
                    .remove(&previous)
                    .unwrap_or_else(|| batch.users[previous].clone());
                folded.insert(
                    i,
                    UserUpsert {
                        org: upsert.org.clone(),
                        user_key: upsert.user_key.clone(),
                        user_id: upsert.user_id.clone().or(before.user_id),
                        email: upsert.email.clone().or(before.email),
                        patch: before.patch.then(&upsert.patch),
                        updated_at: upsert.updated_at,
                        version: upsert.version.max(before.version),
                    },
                );
                let mut positions = earlier.remove(&previous).unwrap_or_default();
                positions.push(previous);
                earlier.insert(i, positions);
            }
        }
        let mut last_event: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, event) in batch.events.iter().enumerate() {
            last_event.insert((&event.org, &event.message_id), i);
        }
        let mut users: Vec<usize> = last_user.into_values().collect();
        users.sort_unstable();
        let mut events: Vec<usize> = last_event.into_values().collect();
        events.sort_unstable();
        Plan {
            batch,
            folded,
            earlier,
            users,
            events,
        }
    }

    fn docs(&self) -> Vec<Doc> {
        self.users
            .iter()
            .map(|&i| Doc::User(i))
            .chain(self.events.iter().map(|&i| Doc::Event(i)))
            .collect()
    }

    /// Whether a document is a user whose upsert reads the stored profile first: a versioned
    /// one (a partial update cannot carry an external version), or one whose patch the
    /// cluster's partial update would not apply exactly.
    fn needs_read(&self, doc: Doc) -> bool {
        self.versioned(doc)
            || matches!(doc, Doc::User(i) if !partial_update_applies(&self.user(i).patch))
    }

    /// Whether a document is a versioned user upsert.
    fn versioned(&self, doc: Doc) -> bool {
        matches!(doc, Doc::User(i) if self.user(i).version.is_some())
    }

    fn user(&self, i: usize) -> &UserUpsert {
        self.folded.get(&i).unwrap_or(&self.batch.users[i])
    }

    fn doc_id(&self, doc: Doc) -> String {
        match doc {
            Doc::User(i) => {
                let user = self.user(i);
                user_doc_id(&user.org, &user.user_key)
            }
            Doc::Event(i) => {
                let event = &self.batch.events[i];
                event_doc_id(&event.org, &event.message_id)
            }
        }
    }

    fn refuse(&self, index: &ElasticIndex, outcome: &mut WriteOutcome, doc: Doc, reason: String) {
        add(&index.stats.refused_docs, 1);
        match doc {
            Doc::User(position) => {
                for &earlier in self.earlier.get(&position).into_iter().flatten() {
                    outcome.refused.push(Refused::User {
                        position: earlier,
                        reason: reason.clone(),
                    });
                }
                outcome.refused.push(Refused::User { position, reason });
            }
            Doc::Event(position) => outcome.refused.push(Refused::Event { position, reason }),
        }
    }
}

/// Whether the cluster's partial update (which merges objects) applies `patch` exactly: no key
/// is replaced by an object.
fn partial_update_applies(patch: &Patch) -> bool {
    patch.0.values().all(|op| match op {
        Op::Set(Value::Object(_)) => false,
        Op::Set(_) => true,
        Op::Merge(nested) => partial_update_applies(nested),
    })
}

/// A patch as the `doc` of a partial update.
struct PartialDoc<'a>(&'a Patch);

impl Serialize for PartialDoc<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.0.len()))?;
        for (key, op) in &self.0.0 {
            match op {
                Op::Set(value) => map.serialize_entry(key, value)?,
                Op::Merge(nested) => map.serialize_entry(key, &PartialDoc(nested))?,
            }
        }
        map.end()
    }
}

/// The `doc` of a user's partial update.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UserPartial<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    updated_at: i64,
    data_fields: PartialDoc<'a>,
    sluice: Internal<'a>,
}

/// A bulk action line's metadata.
#[derive(Serialize)]
struct Meta<'a> {
    #[serde(rename = "_index")]
    index: &'a str,
    #[serde(rename = "_id")]
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    if_seq_no: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    if_primary_term: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_on_conflict: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version_type: Option<&'static str>,
}

fn line(body: &mut Vec<u8>, value: &impl Serialize) -> Result<(), String> {
    serde_json::to_writer(&mut *body, value).map_err(|e| format!("cannot encode: {e}"))?;
    body.push(b'\n');
    Ok(())
}

/// `{"<op>":<meta>}` and a newline.
fn action(body: &mut Vec<u8>, op: &str, meta: &Meta<'_>) -> Result<(), String> {
    body.extend_from_slice(b"{\"");
    body.extend_from_slice(op.as_bytes());
    body.extend_from_slice(b"\":");
    serde_json::to_writer(&mut *body, meta).map_err(|e| format!("cannot encode: {e}"))?;
    body.extend_from_slice(b"}\n");
    Ok(())
}

/// Appends one document's two NDJSON lines, or says why it cannot be written.
fn encode(
    index: &ElasticIndex,
    plan: &Plan<'_>,
    doc: Doc,
    stored: &HashMap<usize, Option<Stored>>,
    body: &mut Vec<u8>,
) -> Result<(), String> {
    match doc {
        Doc::User(i) => encode_user(index, plan.user(i), stored.get(&i), body),
        Doc::Event(i) => {
            let event = &plan.batch.events[i];
            if !event.data_fields.get().trim_start().starts_with('{') {
                return Err(NOT_AN_OBJECT.into());
            }
            let id = event_doc_id(&event.org, &event.message_id);
            let user = user_doc_id(&event.org, &event.user_key);
            let meta = Meta {
                index: &index.events,
                id: &id,
                if_seq_no: None,
                if_primary_term: None,
                retry_on_conflict: None,
                version: None,
                version_type: None,
            };
            action(body, "index", &meta)?;
            let internal = Internal {
                org: &event.org,
                user: &user,
            };
            line(body, &EventSource::of(event, Some(internal)))
        }
    }
}

fn encode_user(
    index: &ElasticIndex,
    upsert: &UserUpsert,
    stored: Option<&Option<Stored>>,
    body: &mut Vec<u8>,
) -> Result<(), String> {
    let id = user_doc_id(&upsert.org, &upsert.user_key);
    let internal = || json!({"org": upsert.org, "user": id});
    let with_internal = |mut profile: Value| {
        if let Value::Object(map) = &mut profile {
            map.insert("sluice".into(), internal());
        }
        profile
    };
    let mut meta = Meta {
        index: &index.users,
        id: &id,
        if_seq_no: None,
        if_primary_term: None,
        retry_on_conflict: None,
        version: None,
        version_type: None,
    };
    if let (Some(version), Some(stored)) = (upsert.version, stored) {
        // Versioned: the cluster keeps the highest version (the log position), so a stale or
        // replayed upsert is a 409 (`send` takes it as done) instead of undoing a newer one.
        meta.version = Some(version);
        meta.version_type = Some("external");
        action(body, "index", &meta)?;
        let stored = stored.as_ref().map(|s| s.source.clone());
        return line(body, &with_internal(upserted_profile(stored, upsert)));
    }
    match stored {
        // A partial update.
        None => {
            meta.retry_on_conflict = Some(3);
            action(body, "update", &meta)?;
            let doc = UserPartial {
                user_id: upsert.user_id.as_deref(),
                email: upsert.email.as_deref(),
                updated_at: upsert.updated_at,
                data_fields: PartialDoc(&upsert.patch),
                sluice: Internal {
                    org: &upsert.org,
                    user: &id,
                },
            };
            let new_profile = with_internal(upserted_profile(None, upsert));
            line(body, &json!({"doc": doc, "upsert": new_profile}))
        }
        // Read-modify-write of a profile that did not exist.
        Some(None) => {
            action(body, "create", &meta)?;
            line(body, &with_internal(upserted_profile(None, upsert)))
        }
        Some(Some(stored)) => {
            meta.if_seq_no = Some(stored.seq_no);
            meta.if_primary_term = Some(stored.primary_term);
            action(body, "index", &meta)?;
            let profile = upserted_profile(Some(stored.source.clone()), upsert);
            line(body, &with_internal(profile))
        }
    }
}

/// Reads the stored profiles of the pending users whose patch needs a read-modify-write.
async fn read_profiles(
    index: &ElasticIndex,
    plan: &Plan<'_>,
    pending: &[Doc],
) -> Result<HashMap<usize, Option<Stored>>, IndexError> {
    let positions: Vec<usize> = pending
        .iter()
        .filter_map(|&doc| match doc {
            Doc::User(i) if plan.needs_read(doc) => Some(i),
            _ => None,
        })
        .collect();
    let mut stored = HashMap::with_capacity(positions.len());
    if positions.is_empty() {
        return Ok(stored);
    }
    let ids: Vec<String> = positions
        .iter()
        .map(|&i| {
            let user = plan.user(i);
            user_doc_id(&user.org, &user.user_key)
        })
        .collect();
    add(&index.stats.mget_requests, 1);
    let docs = index.mget_users(&ids).await?;
    for (i, got) in positions.into_iter().zip(docs) {
        let value = match (got.found, got.seq_no, got.primary_term) {
            (false, _, _) => None,
            (true, Some(seq_no), Some(primary_term)) => {
                let mut source = got.source;
                if let Value::Object(map) = &mut source {
                    map.remove("sluice");
                }
                Some(Stored {
                    source,
                    seq_no,
                    primary_term,
                })
            }
            (true, _, _) => {
                return Err(IndexError::Rejected {
                    server: index.server.clone(),
                    message: "POST /_mget: a found document has no _seq_no/_primary_term (a cluster older than Elasticsearch 6.7?)".into(),
                });
            }
        };
        stored.insert(i, value);
    }
    Ok(stored)
}

#[derive(Deserialize)]
struct BulkAnswer {
    items: Vec<Item>,
}

/// One item of a bulk answer: an object with one key, the action.
#[derive(Deserialize)]
struct Item {
    index: Option<ItemResult>,
    create: Option<ItemResult>,
    update: Option<ItemResult>,
}

#[derive(Deserialize)]
struct ItemResult {
    status: u16,
    #[serde(default)]
    error: Option<ErrorBody>,
}

/// What to do with an item.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Done,
    Retry,
    Refuse,
}

fn verdict(status: u16, error: Option<&ErrorBody>) -> Verdict {
    match status {
        200..=299 => Verdict::Done,
        401 | 403 | 404 | 408 | 409 | 429 | 500..=599 => Verdict::Retry,
        // About the index, not the document: a closed index, a block (read-only after the
        // flood-stage disk watermark, or set by an operator), an index deleted while auto
        // creation is off. An operator fixes these; the document is fine.
        _ if error.is_some_and(|e| {
            matches!(
                e.kind.as_str(),
                "index_closed_exception"
                    | "cluster_block_exception"
                    | "index_not_found_exception"
                    | "no_shard_available_action_exception"
                    | "unavailable_shards_exception"
            )
        }) =>
        {
            Verdict::Retry
        }
        _ => Verdict::Refuse,
    }
}

/// Sends one bulk request of `chunk`'s documents and sorts its items into done, `failed`
/// (to send again) and refused. Empties `chunk`. Returns how many versioned upserts the
/// cluster found superseded (done too).
async fn send(
    index: &ElasticIndex,
    plan: &Plan<'_>,
    body: Vec<u8>,
    chunk: &mut Vec<Doc>,
    outcome: &mut WriteOutcome,
    failed: &mut Vec<(Doc, String)>,
) -> Result<usize, IndexError> {
    let docs = std::mem::take(chunk);
    let mut superseded = 0;
    add(&index.stats.bulk_requests, 1);
    let refresh: &[(&str, &str)] = if index.config.refresh_writes {
        &[("refresh", "true")]
    } else {
        &[]
    };
    let result = index
        .request_query(
            Method::POST,
            &["_bulk"],
            refresh,
            Some((Bytes::from(body), "application/x-ndjson")),
        )
        .await
        .and_then(|(status, answer)| {
            if status == StatusCode::OK {
                Ok(answer)
            } else {
                Err(index.rejected("POST /_bulk", status, &answer))
            }
        });
    let answer = match result {
        Ok(answer) => answer,
        Err(e) if e.is_recoverable() => {
            let reason = e.to_string();
            failed.extend(docs.into_iter().map(|doc| (doc, reason.clone())));
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    let answer: BulkAnswer = serde_json::from_slice(&answer).map_err(|e| {
        index.unavailable(format!(
            "POST /_bulk: unexpected answer: {e}: {}",
            describe(StatusCode::OK, &answer)
        ))
    })?;
    if answer.items.len() != docs.len() {
        return Err(IndexError::Rejected {
            server: index.server.clone(),
            message: format!(
                "POST /_bulk answered {} items for {} documents",
                answer.items.len(),
                docs.len()
            ),
        });
    }
    for (doc, item) in docs.into_iter().zip(answer.items) {
        let Some(result) = item.index.or(item.create).or(item.update) else {
            return Err(IndexError::Rejected {
                server: index.server.clone(),
                message: "POST /_bulk: an item without an index/create/update result".into(),
            });
        };
        let reason = || match &result.error {
            Some(error) => format!("{} {error}", result.status),
            None => format!("status {}", result.status),
        };
        let stale = result.status == 409
            && plan.versioned(doc)
            && result
                .error
                .as_ref()
                .is_some_and(|e| e.kind == "version_conflict_engine_exception");
        if stale {
            // The stored profile's version is not below ours: our updates are in already.
            add(&index.stats.superseded_docs, 1);
            superseded += 1;
            continue;
        }
        match verdict(result.status, result.error.as_ref()) {
            Verdict::Done => {}
            Verdict::Retry => failed.push((doc, reason())),
            Verdict::Refuse => plan.refuse(index, outcome, doc, reason()),
        }
    }
    Ok(superseded)
}

/// The partial-update `doc` of a patch, for tests.
#[cfg(test)]
fn partial_doc(patch: &Patch) -> Value {
    serde_json::to_value(PartialDoc(patch)).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Map;
    use sluice_model::patch::testing::{json_object, obj, update};

    /// What the cluster does with a partial update (`XContentHelper.update`): objects merge
    /// key by key, anything else replaces.
    fn cluster_merge(stored: &mut Map<String, Value>, doc: &Map<String, Value>) {
        for (key, value) in doc {
            match (stored.get_mut(key), value) {
                (Some(Value::Object(old)), Value::Object(new)) => cluster_merge(old, new),
                _ => {
                    stored.insert(key.clone(), value.clone());
                }
            }
        }
    }

    #[test]
    fn items_are_retried_refused_or_done_by_status() {
        for status in [200, 201] {
            assert_eq!(verdict(status, None), Verdict::Done);
        }
        for status in [409, 429, 500, 502, 503, 404, 403] {
            assert_eq!(verdict(status, None), Verdict::Retry, "{status}");
        }
        for status in [400, 413, 422] {
            assert_eq!(verdict(status, None), Verdict::Refuse, "{status}");
        }
        let error = |kind: &str| -> ErrorBody {
            serde_json::from_value(serde_json::json!({"type": kind, "reason": "x"}))
                .expect("an error body")
        };
        assert_eq!(
            verdict(400, Some(&error("mapper_parsing_exception"))),
            Verdict::Refuse
        );
        for kind in ["index_closed_exception", "cluster_block_exception"] {
            assert_eq!(verdict(400, Some(&error(kind))), Verdict::Retry, "{kind}");
        }
    }

    #[test]
    fn a_shallow_object_replacement_needs_a_read() {
        assert!(partial_update_applies(&update(
            serde_json::json!({"a": 1, "b": [1, {"c": 2}], "n": null}),
            false
        )));
        assert!(partial_update_applies(&update(
            serde_json::json!({"a": {"b": {"c": 1}}}),
            true
        )));
        assert!(!partial_update_applies(&update(
            serde_json::json!({"a": {"b": 1}}),
            false
        )));
        assert!(!partial_update_applies(&update(
            serde_json::json!({"a": {}}),
            false
        )));
    }

    proptest! {
        // Most generated patches replace a key by an object (no partial update), so many
        // cases are rejected: allow for them rather than fail at random (1 run in ~10 did).
        #![proptest_config(ProptestConfig { max_global_rejects: 100_000, ..ProptestConfig::default() })]

        /// Whenever the partial update is used, the cluster's merge of its `doc` gives the
        /// same profile as applying the patch.
        #[test]
        fn a_partial_update_does_what_the_patch_does(
            stored in json_object(),
            updates in proptest::collection::vec((json_object(), proptest::bool::weighted(0.2)), 1..4),
        ) {
            let patch = updates
                .iter()
                .fold(Patch::default(), |p, (fields, deep)| p.then(&Patch::from_update(fields, *deep)));
            prop_assume!(partial_update_applies(&patch));
            let mut expected = stored.clone();
            patch.apply(&mut expected);
            let mut merged = stored;
            cluster_merge(&mut merged, &obj(partial_doc(&patch)));
            prop_assert_eq!(merged, expected);
        }
    }
}
