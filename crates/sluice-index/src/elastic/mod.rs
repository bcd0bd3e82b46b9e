//! The index on an Elasticsearch or OpenSearch cluster, over its HTTP API (`--index
//! http(s)://host:9200`).
//!
//! - `mapping`: the two indexes (`<prefix>-users`, `<prefix>-events`), created at start.
//! - `bulk`: the write path: NDJSON `_bulk` requests split by count and bytes, item-level
//!   results (retry what failed with 429/5xx/409, refuse what was rejected for its content).
//! - `search`: `POST /api/search/*` as `query_string` + aggregations under an org filter.
//!
//! Documents are the same JSON the embedded index returns (`crate::doc`), plus one top-level
//! object `sluice` (`org`, `user`) that scopes reads and is removed from every answer.
//!
//! Visibility: a write is durable when `write` returns (the cluster acknowledged it). Reads by id
//! (`get_user`) are real-time; searches see it after the index's refresh interval (1 s by
//! default), as with any client of the cluster, or when `write` returns with
//! `refresh_writes`.

mod bulk;
mod forget;
mod mapping;
mod search;

use sluice_model::Recoverable;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    Index, IndexError, MAX_SEARCH_SIZE, SearchRequest, SearchResponse, Target, WriteBatch,
    WriteOutcome,
};

/// Settings of the Elasticsearch/OpenSearch index.
#[derive(Debug, Clone)]
pub struct ElasticIndexConfig {
    /// `http(s)://[user:password@]host:port[/path]`.
    pub url: String,
    /// Index names are `<prefix>-users` and `<prefix>-events`.
    pub prefix: String,
    /// Longest wait for one HTTP request.
    pub timeout: Duration,
    /// A bulk request holds at most this many bytes of NDJSON...
    pub bulk_max_bytes: usize,
    /// ...and at most this many documents; a larger write is split.
    pub bulk_max_docs: usize,
    /// Attempts at documents the cluster answered 429/5xx/409 for, within one `write`, before
    /// it returns a recoverable error (the caller then retries the whole write).
    pub item_attempts: u32,
    /// Longest wait between two such attempts (exponential backoff with jitter up to it).
    pub max_retry_delay: Duration,
    /// Each `_bulk` asks `refresh=true`, so that what `write` wrote is searchable when it
    /// returns. Off by default: a refresh per batch costs the cluster throughput. For tests that
    /// search right after writing, and for tiny deployments.
    pub refresh_writes: bool,
}

impl ElasticIndexConfig {
    pub fn new(url: impl Into<String>) -> Self {
        ElasticIndexConfig {
            url: url.into(),
            prefix: "sluice".into(),
            timeout: Duration::from_secs(30),
            bulk_max_bytes: 10 << 20,
            bulk_max_docs: 10_000,
            item_attempts: 8,
            max_retry_delay: Duration::from_secs(2),
            refresh_writes: false,
        }
    }
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct ElasticStats {
    /// `_bulk` requests sent.
    pub bulk_requests: AtomicU64,
    /// `_mget` requests sent (profiles read before a read-modify-write upsert).
    pub mget_requests: AtomicU64,
    /// Documents sent again because the cluster answered 429, 5xx or 409 for them.
    pub retried_docs: AtomicU64,
    /// Documents the cluster refused for their content.
    pub refused_docs: AtomicU64,
    /// Versioned profile upserts the cluster refused because the stored profile's version was
    /// not below theirs (a replay, or a stale owner of the partition).
    pub superseded_docs: AtomicU64,
}

/// The index on an Elasticsearch/OpenSearch cluster.
pub struct ElasticIndex {
    http: reqwest::Client,
    /// The URL without credentials.
    base: Url,
    /// `base` as shown in errors and logs.
    server: String,
    auth: Option<(String, Option<String>)>,
    users: String,
    events: String,
    config: ElasticIndexConfig,
    /// Whether a `dataFields.*` path is a text field (aggregations use its `.raw` keyword).
    text_fields: Mutex<HashMap<(Target, String), bool>>,
    stats: ElasticStats,
    /// Set once the cluster answered and both indexes exist with sluice's mappings; until
    /// then every operation tries that first (a cluster down at start is waited for).
    prepared: tokio::sync::OnceCell<()>,
}

/// An error object of the cluster's answers.
#[derive(Debug, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    caused_by: Option<Box<ErrorBody>>,
    #[serde(default)]
    root_cause: Vec<ErrorBody>,
    /// The index the error is about, where the cluster says.
    #[serde(default)]
    index: Option<String>,
}

impl std::fmt::Display for ErrorBody {
    /// `type: reason`, then the innermost cause if it says more.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(reason) = &self.reason {
            write!(f, ": {reason}")?;
        }
        let mut cause = self.caused_by.as_deref();
        let mut innermost = None;
        while let Some(c) = cause {
            innermost = Some(c);
            cause = c.caused_by.as_deref();
        }
        if let Some(c) = innermost.or(self.root_cause.first())
            && let Some(reason) = &c.reason
            && self.reason.as_deref() != Some(reason)
        {
            write!(f, " ({reason})")?;
        }
        if let Some(index) = &self.index {
            write!(f, " [index {index}]")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: ErrorBody,
}

/// What an answer's body says went wrong, for messages.
fn describe(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorAnswer>(body) {
        Ok(answer) => format!("{status}: {}", answer.error),
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
            format!("{status}: {}", text.trim())
        }
    }
}

impl ElasticIndex {
    /// Connects, checks that the cluster answers, and creates the indexes if they are missing.
    pub async fn open(config: ElasticIndexConfig) -> Result<ElasticIndex, IndexError> {
        let mut base = Url::parse(&config.url).map_err(|e| {
            IndexError::Config(format!(
                "index URL {}: {e} (expected http(s)://host:port)",
                sluice_model::url::redacted(&config.url)
            ))
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(IndexError::Config(format!(
                "index URL {}: expected http(s)://host:port or \"embedded\"",
                sluice_model::url::redacted(&config.url)
            )));
        }
        let auth = (!base.username().is_empty()).then(|| {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(base.username()), base.password().map(decode))
        });
        // Cannot fail for http(s) URLs with a host.
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let server = base.as_str().trim_end_matches('/').to_owned();
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        if config.prefix.is_empty()
            || config.prefix.starts_with(['_', '-', '+'])
            || config
                .prefix
                .chars()
                .any(|c| c.is_ascii_uppercase() || "\\/*?\"<>| ,#:".contains(c))
        {
            return Err(IndexError::Config(format!(
                "index prefix {:?}: index names must be lowercase, must not start with _, - or +, and must not contain \\ / * ? \" < > | space , # :",
                config.prefix
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| IndexError::Config(format!("cannot build the HTTP client: {e}")))?;
        let index = ElasticIndex {
            http,
            users: format!("{}-users", config.prefix),
            events: format!("{}-events", config.prefix),
            base,
            server,
            auth,
            config,
            text_fields: Mutex::new(HashMap::new()),
            stats: ElasticStats::default(),
            prepared: tokio::sync::OnceCell::new(),
        };
        match index.prepare().await {
            Ok(()) => {}
            // Down for now: the node runs, `/readyz` says why, and writes wait for it.
            Err(e) if e.is_recoverable() => tracing::warn!(
                error = %e,
                "index: the cluster cannot be used yet; the indexes are created once it answers"
            ),
            Err(e) => return Err(e),
        }
        Ok(index)
    }

    /// Checks the cluster answers and creates both indexes with sluice's mappings if missing,
    /// once; an error (the cluster down, say) leaves it to the next call. Every operation calls
    /// it first, so no document is written before its index has the mappings (a write to a
    /// missing index would create it with dynamic ones).
    async fn prepare(&self) -> Result<(), IndexError> {
        self.prepared
            .get_or_try_init(|| async {
                let (status, body) = self.request(Method::GET, &[], None).await?;
                if !status.is_success() {
                    return Err(self.rejected("GET /", status, &body));
                }
                for (name, body) in [
                    (&self.users, mapping::users()),
                    (&self.events, mapping::events()),
                ] {
                    self.create_index(name, body).await?;
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// The names of the two indexes.
    pub fn index_names(&self) -> (&str, &str) {
        (&self.users, &self.events)
    }

    pub fn stats(&self) -> &ElasticStats {
        &self.stats
    }

    fn index_name(&self, target: Target) -> &str {
        match target {
            Target::Users => &self.users,
            Target::Events => &self.events,
        }
    }

    async fn create_index(&self, name: &str, body: Value) -> Result<(), IndexError> {
        let (status, answer) = self
            .request(Method::PUT, &[name], Some(json_body(&body)?))
            .await?;
        if status.is_success() {
            tracing::info!(index = name, server = %self.server, "index: created");
            return Ok(());
        }
        match serde_json::from_slice::<ErrorAnswer>(&answer) {
            Ok(e) if e.error.kind == "resource_already_exists_exception" => Ok(()),
            _ => Err(self.rejected(&format!("creating index {name}"), status, &answer)),
        }
    }

    /// `POST /_mget` of the user documents with these ids, real time: one [`Got`] per id, in
    /// order. A document the cluster could not read is `Unavailable`; an answer that does not
    /// match the request is `Rejected`.
    async fn mget_users(&self, ids: &[String]) -> Result<Vec<Got>, IndexError> {
        let what = "POST /_mget";
        let docs: Vec<Value> = ids
            .iter()
            .map(|id| json!({"_index": self.users, "_id": id}))
            .collect();
        let body = json_body(&json!({ "docs": docs }))?;
        let (status, answer) = self.request(Method::POST, &["_mget"], Some(body)).await?;
        if !status.is_success() {
            return Err(self.rejected(what, status, &answer));
        }
        #[derive(Deserialize)]
        struct Answer {
            docs: Vec<Got>,
        }
        let answer: Answer = serde_json::from_slice(&answer)
            .map_err(|e| self.unavailable(format!("{what}: unexpected answer: {e}")))?;
        if answer.docs.len() != ids.len() {
            return Err(IndexError::Rejected {
                server: self.server.clone(),
                message: format!(
                    "{what} answered {} documents for {} ids",
                    answer.docs.len(),
                    ids.len()
                ),
            });
        }
        if let Some(error) = answer.docs.iter().find_map(|got| got.error.as_ref()) {
            return Err(self.unavailable(format!("{what}: {error}")));
        }
        Ok(answer.docs)
    }

    /// One request; `path` segments are percent-encoded. Transport failures are `Unavailable`.
    async fn request(
        &self,
        method: Method,
        path: &[&str],
        body: Option<(Bytes, &'static str)>,
    ) -> Result<(StatusCode, Bytes), IndexError> {
        self.request_query(method, path, &[], body).await
    }

    async fn request_query(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, &str)],
        body: Option<(Bytes, &'static str)>,
    ) -> Result<(StatusCode, Bytes), IndexError> {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(path);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let what = format!("{method} /{}", path.join("/"));
        let mut request = self.http.request(method, url);
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, password.as_ref());
        }
        if let Some((bytes, content_type)) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes);
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.unavailable(format!("{what}: {}", transport(&e))))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| {
            self.unavailable(format!("{what}: reading the answer: {}", transport(&e)))
        })?;
        Ok((status, bytes))
    }

    fn unavailable(&self, message: String) -> IndexError {
        IndexError::Unavailable {
            server: self.server.clone(),
            message,
        }
    }

    /// The error for a non-2xx answer: recoverable when retrying can help (429, 5xx, 408, and
    /// 401/403, which an operator fixes without restarting us), else `Rejected`.
    fn rejected(&self, what: &str, status: StatusCode, body: &[u8]) -> IndexError {
        let message = format!("{what}: {}", describe(status, body));
        if status.is_server_error()
            || matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::REQUEST_TIMEOUT
                    | StatusCode::UNAUTHORIZED
                    | StatusCode::FORBIDDEN
            )
        {
            self.unavailable(message)
        } else {
            IndexError::Rejected {
                server: self.server.clone(),
                message,
            }
        }
    }

    /// `_search` on one index; a 400 is the client's query or aggregation.
    async fn search_raw(&self, target: Target, body: &Value) -> Result<SearchAnswer, IndexError> {
        let index = self.index_name(target);
        let (status, answer) = self
            .request(Method::POST, &[index, "_search"], Some(json_body(body)?))
            .await?;
        if status == StatusCode::BAD_REQUEST {
            let reason = match serde_json::from_slice::<ErrorAnswer>(&answer) {
                Ok(e) => e.error.to_string(),
                Err(_) => String::from_utf8_lossy(&answer).into_owned(),
            };
            return Err(IndexError::BadRequest(format!("search: {reason}")));
        }
        if !status.is_success() {
            return Err(self.rejected(&format!("POST /{index}/_search"), status, &answer));
        }
        serde_json::from_slice(&answer)
            .map_err(|e| self.unavailable(format!("POST /{index}/_search: unexpected answer: {e}")))
    }

    /// The sources of a search's hits, without our own fields.
    async fn sources(&self, target: Target, body: &Value) -> Result<Vec<Value>, IndexError> {
        self.prepare().await?;
        let answer = self.search_raw(target, body).await?;
        Ok(answer
            .hits
            .hits
            .into_iter()
            .map(|hit| without_internal(hit.source))
            .collect())
    }
}

/// One document as `GET /<index>/_doc/<id>` and each of `_mget`'s `docs` answer it.
#[derive(Deserialize)]
pub(crate) struct Got {
    #[serde(default)]
    found: bool,
    #[serde(rename = "_source", default)]
    source: Value,
    #[serde(rename = "_seq_no", default)]
    seq_no: Option<u64>,
    #[serde(rename = "_primary_term", default)]
    primary_term: Option<u64>,
    /// `_mget` only: why this document could not be read.
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct SearchAnswer {
    hits: Hits,
    #[serde(default)]
    aggregations: Option<Value>,
}

#[derive(Deserialize)]
struct Hits {
    #[serde(default)]
    total: Option<Total>,
    hits: Vec<Hit>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Total {
    Object { value: u64 },
    Number(u64),
}

#[derive(Deserialize)]
struct Hit {
    #[serde(rename = "_source", default)]
    source: Value,
}

/// A document's source as readers see it: without the `sluice` object.
fn without_internal(mut source: Value) -> Value {
    if let Value::Object(map) = &mut source {
        map.remove("sluice");
    }
    source
}

fn json_body(value: &Value) -> Result<(Bytes, &'static str), IndexError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| IndexError::Config(format!("cannot encode a request: {e}")))?;
    Ok((Bytes::from(bytes), "application/json"))
}

/// A reqwest error with its causes (reqwest's own message is often just "error sending
/// request").
fn transport(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[async_trait]
impl Index for ElasticIndex {
    async fn write(&self, batch: std::sync::Arc<WriteBatch>) -> Result<WriteOutcome, IndexError> {
        if batch.is_empty() {
            return Ok(WriteOutcome::default());
        }
        self.prepare().await?;
        if !batch.forgets.is_empty() {
            forget::apply(self, &batch.forgets).await?;
        }
        if batch.users.is_empty() && batch.events.is_empty() {
            return Ok(WriteOutcome::default());
        }
        bulk::write(self, &batch).await
    }

    async fn get_user(&self, org: &str, user_key: &str) -> Result<Option<Value>, IndexError> {
        self.prepare().await?;
        let id = crate::doc::user_doc_id(org, user_key);
        let (status, answer) = self
            .request(Method::GET, &[&self.users, "_doc", &id], None)
            .await?;
        if status == StatusCode::NOT_FOUND
            && let Ok(got) = serde_json::from_slice::<Got>(&answer)
            && !got.found
        {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(self.rejected(&format!("GET /{}/_doc/{id}", self.users), status, &answer));
        }
        let got: Got = serde_json::from_slice(&answer).map_err(|e| {
            self.unavailable(format!(
                "GET /{}/_doc/{id}: unexpected answer: {e}",
                self.users
            ))
        })?;
        Ok(got.found.then(|| without_internal(got.source)))
    }

    async fn get_users(&self, users: &[(&str, &str)]) -> Result<Vec<Option<Value>>, IndexError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        self.prepare().await?;
        let ids: Vec<String> = users
            .iter()
            .map(|(org, user_key)| crate::doc::user_doc_id(org, user_key))
            .collect();
        Ok(self
            .mget_users(&ids)
            .await?
            .into_iter()
            .map(|got| got.found.then(|| without_internal(got.source)))
            .collect())
    }

    async fn get_user_by_email(&self, org: &str, email: &str) -> Result<Option<Value>, IndexError> {
        let body = json!({
            "size": 1,
            "query": {"bool": {"filter": [
                {"term": {"sluice.org": org}},
                {"term": {"email": email}},
            ]}},
            "sort": [{"updatedAt": {"order": "desc"}}],
        });
        Ok(self.sources(Target::Users, &body).await?.into_iter().next())
    }

    async fn user_events(
        &self,
        org: &str,
        user_key: &str,
        limit: usize,
    ) -> Result<Vec<Value>, IndexError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let body = json!({
            "size": limit.min(MAX_SEARCH_SIZE),
            "query": {"bool": {"filter": [
                {"term": {"sluice.org": org}},
                {"term": {"sluice.user": crate::doc::user_doc_id(org, user_key)}},
            ]}},
            "sort": [{"createdAt": {"order": "desc"}}],
        });
        self.sources(Target::Events, &body).await
    }

    async fn search(
        &self,
        org: &str,
        target: Target,
        request: &SearchRequest,
    ) -> Result<SearchResponse, IndexError> {
        request.check()?;
        self.prepare().await?;
        search::search(self, org, target, request).await
    }

    /// Both indexes exist, are open, and are not red (`GET _cat/indices`, one request).
    async fn health(&self) -> Result<(), IndexError> {
        self.prepare().await?;
        let names = format!("{},{}", self.users, self.events);
        let (status, body) = self
            .request_query(
                Method::GET,
                &["_cat", "indices", &names],
                &[
                    ("format", "json"),
                    ("h", "index,health,status"),
                    ("expand_wildcards", "all"),
                ],
                None,
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Err(self.unavailable(format!(
                "index {} or {} does not exist: {}",
                self.users,
                self.events,
                describe(status, &body)
            )));
        }
        if !status.is_success() {
            return Err(self.rejected("GET /_cat/indices", status, &body));
        }
        let rows: Vec<CatIndex> = serde_json::from_slice(&body).map_err(|e| {
            self.unavailable(format!(
                "GET /_cat/indices: an answer that is not the expected JSON ({e})"
            ))
        })?;
        health_verdict(&[&self.users, &self.events], &rows).map_err(|m| self.unavailable(m))
    }

    async fn close(&self) -> Result<(), IndexError> {
        Ok(())
    }
}

/// One row of `GET _cat/indices?format=json&h=index,health,status`.
#[derive(Debug, Deserialize)]
struct CatIndex {
    index: String,
    #[serde(default)]
    health: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

/// What is wrong with `names` according to `rows`, if anything.
fn health_verdict(names: &[&str], rows: &[CatIndex]) -> Result<(), String> {
    for name in names {
        let Some(row) = rows.iter().find(|r| r.index == *name) else {
            return Err(format!("index {name} does not exist"));
        };
        if row.status.as_deref() == Some("close") {
            return Err(format!(
                "index {name} is closed (open it: POST /{name}/_open)"
            ));
        }
        if row.health.as_deref() == Some("red") {
            return Err(format!(
                "index {name} is red: a primary shard is not allocated (see GET /_cluster/allocation/explain)"
            ));
        }
    }
    Ok(())
}

/// Counter helper.
fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_names_a_missing_closed_or_red_index_and_takes_yellow() {
        let rows = |json: &str| -> Vec<CatIndex> { serde_json::from_str(json).expect("rows") };
        let names = ["p-users", "p-events"];
        let yellow = r#"[{"index":"p-events","health":"yellow","status":"open"},{"index":"p-users","health":"green","status":"open"}]"#;
        assert_eq!(health_verdict(&names, &rows(yellow)), Ok(()));
        let missing = r#"[{"index":"p-users","health":"green","status":"open"}]"#;
        assert_eq!(
            health_verdict(&names, &rows(missing)),
            Err("index p-events does not exist".into())
        );
        // A closed index has no health column value in some versions.
        let closed = r#"[{"index":"p-users","health":null,"status":"close"},{"index":"p-events","health":"green","status":"open"}]"#;
        let error = health_verdict(&names, &rows(closed)).expect_err("closed");
        assert!(error.starts_with("index p-users is closed"), "{error}");
        let red = r#"[{"index":"p-users","health":"green","status":"open"},{"index":"p-events","health":"red","status":"open"}]"#;
        let error = health_verdict(&names, &rows(red)).expect_err("red");
        assert!(error.starts_with("index p-events is red"), "{error}");
    }

    #[test]
    fn errors_name_the_type_the_reason_and_the_innermost_cause() {
        let body = br#"{"error":{"type":"search_phase_execution_exception","reason":"all shards failed","caused_by":{"type":"query_shard_exception","reason":"Failed to parse query [a:(]","caused_by":{"type":"parse_exception","reason":"Encountered <EOF> at line 1, column 3."}}},"status":400}"#;
        assert_eq!(
            describe(StatusCode::BAD_REQUEST, body),
            "400 Bad Request: search_phase_execution_exception: all shards failed (Encountered <EOF> at line 1, column 3.)"
        );
        assert_eq!(
            describe(StatusCode::BAD_GATEWAY, b"upstream down\n"),
            "502 Bad Gateway: upstream down"
        );
    }

    #[tokio::test]
    async fn a_bad_url_or_prefix_is_a_config_error() {
        for url in ["not a url", "ftp://es:9200", "file:///tmp/x"] {
            match ElasticIndex::open(ElasticIndexConfig::new(url)).await {
                Err(IndexError::Config(message)) => assert!(message.contains("index URL")),
                Err(other) => panic!("{url}: {other}"),
                Ok(_) => panic!("{url}: opened"),
            }
        }
        let mut config = ElasticIndexConfig::new("http://127.0.0.1:1");
        config.prefix = "Sluice".into();
        assert!(matches!(
            ElasticIndex::open(config).await,
            Err(IndexError::Config(m)) if m.contains("lowercase")
        ));
    }

    #[tokio::test]
    async fn an_unreachable_cluster_is_waited_for_and_every_call_names_it() {
        let mut config = ElasticIndexConfig::new("http://user:pw@127.0.0.1:1");
        config.timeout = Duration::from_secs(2);
        // The node starts anyway; every call says what it waits for.
        let index = ElasticIndex::open(config)
            .await
            .expect("opens while the cluster is down");
        let health = index.health().await.expect_err("not healthy");
        let write = index
            .write(std::sync::Arc::new(WriteBatch {
                users: vec![],
                events: vec![crate::EventDoc {
                    org: "acme".into(),
                    message_id: "m".into(),
                    user_key: "u:1".into(),
                    user_id: Some("1".into()),
                    email: None,
                    event_name: "e".into(),
                    created_at: 0,
                    received_at: 0,
                    data_fields: serde_json::value::to_raw_value(&json!({})).expect("raw"),
                    segment: None,
                }],
                forgets: Vec::new(),
                unseen: false,
            }))
            .await
            .expect_err("no write");
        let read = index.get_user("acme", "u:1").await.expect_err("no read");
        for e in [health, write, read] {
            assert!(matches!(e, IndexError::Unavailable { .. }), "{e}");
            let message = e.to_string();
            assert!(message.contains("http://127.0.0.1:1"), "{message}");
            assert!(!message.contains("pw"), "{message}");
            assert!(e.is_recoverable());
        }
    }
}
