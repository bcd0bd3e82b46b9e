//! The embedded index: two tantivy indexes under `<data_dir>/index/{users,events}`.
//!
//! - `schema`: fields and documents.
//! - `writer`: the writer thread (group commit, profile upserts).
//! - `search`: query string, org scope and aggregations.
//!
//! Reads run on the blocking pool against the last committed state; the writer thread reloads
//! the readers after each commit, so a write is visible to reads when `write` returns.

mod schema;
mod search;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::Value;
use tantivy::collector::TopDocs;
use tantivy::directory::MmapDirectory;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{IndexRecordOption, Schema, Value as _};
use tantivy::{
    DateTime, DocAddress, DocSet, IndexReader, Order, ReloadPolicy, Searcher, TERMINATED,
    TantivyDocument, Term,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Index, IndexError, MAX_SEARCH_SIZE, SearchRequest, SearchResponse, Target, WriteBatch,
    WriteOutcome,
};
use schema::Fields;

/// Settings of the embedded index.
#[derive(Debug, Clone)]
pub struct EmbeddedIndexConfig {
    /// Directory holding `users/` and `events/`.
    pub dir: PathBuf,
    /// Indexing threads per index.
    pub threads: usize,
    /// Indexing memory budget per index, in bytes (split between its threads; at least 15 MB
    /// per thread).
    pub heap_bytes: usize,
}

impl EmbeddedIndexConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        EmbeddedIndexConfig {
            dir: dir.into(),
            threads: cores.clamp(1, 4),
            heap_bytes: 64 << 20,
        }
    }
}

/// One of the two indexes, as the readers see it.
#[derive(Clone)]
pub(crate) struct Side {
    pub path: PathBuf,
    pub index: tantivy::Index,
    pub reader: IndexReader,
    pub fields: Fields,
}

impl Side {
    fn open(path: PathBuf, schema: Schema, fields: Fields) -> Result<Side, IndexError> {
        std::fs::create_dir_all(&path).map_err(|e| storage_error(&path, e))?;
        let directory = MmapDirectory::open(&path).map_err(|e| storage_error(&path, e))?;
        let index = tantivy::Index::open_or_create(directory, schema).map_err(|e| {
            storage_error(
                &path,
                format!(
                    "{e} (an index written by another sluice version? move it away to rebuild)"
                ),
            )
        })?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|e: tantivy::TantivyError| storage_error(&path, e))?;
        Ok(Side {
            path,
            index,
            reader,
            fields,
        })
    }

    /// The live document whose `_id` is `doc_id`, in the committed state.
    pub fn find(
        &self,
        searcher: &Searcher,
        doc_id: &str,
    ) -> Result<Option<DocAddress>, IndexError> {
        let term = Term::from_field_text(self.fields.id, doc_id);
        for (ordinal, segment) in searcher.segment_readers().iter().enumerate() {
            let inverted = segment
                .inverted_index(self.fields.id)
                .map_err(|e| storage_error(&self.path, e))?;
            let Some(mut postings) = inverted
                .read_postings(&term, IndexRecordOption::Basic)
                .map_err(|e| storage_error(&self.path, e))?
            else {
                continue;
            };
            let mut doc = postings.doc();
            while doc != TERMINATED {
                if !segment.is_deleted(doc) {
                    return Ok(Some(DocAddress::new(ordinal as u32, doc)));
                }
                doc = postings.advance();
            }
        }
        Ok(None)
    }

    /// The stored JSON of the live document `doc_id`.
    pub fn find_source(
        &self,
        searcher: &Searcher,
        doc_id: &str,
    ) -> Result<Option<Value>, IndexError> {
        match self.find(searcher, doc_id)? {
            Some(address) => self.source(searcher, address).map(Some),
            None => Ok(None),
        }
    }

    /// The stored JSON of a document.
    pub fn source(&self, searcher: &Searcher, address: DocAddress) -> Result<Value, IndexError> {
        let doc: TantivyDocument = searcher
            .doc(address)
            .map_err(|e| storage_error(&self.path, e))?;
        let bytes = doc
            .get_first(self.fields.source)
            .and_then(|v| v.as_bytes())
            .ok_or_else(|| storage_error(&self.path, "a document has no _source"))?;
        serde_json::from_slice(bytes).map_err(|e| storage_error(&self.path, e))
    }

    /// Top `limit` documents of `query` by a date field, newest first.
    fn newest(&self, query: &dyn Query, by: &str, limit: usize) -> Result<Vec<Value>, IndexError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let searcher = self.reader.searcher();
        let top = TopDocs::with_limit(limit).order_by_fast_field::<DateTime>(by, Order::Desc);
        let hits = searcher
            .search(query, &top)
            .map_err(|e| storage_error(&self.path, e))?;
        hits.into_iter()
            .map(|(_, address)| self.source(&searcher, address))
            .collect()
    }
}

pub(crate) fn storage_error(path: &Path, e: impl std::fmt::Display) -> IndexError {
    IndexError::Storage {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn term_query(field: tantivy::schema::Field, value: &str) -> Box<dyn Query> {
    Box::new(TermQuery::new(
        Term::from_field_text(field, value),
        IndexRecordOption::Basic,
    ))
}

/// The embedded, tantivy-backed index.
pub struct EmbeddedIndex {
    users: Side,
    events: Side,
    commands: Mutex<Option<mpsc::Sender<writer::Command>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    commits: Arc<std::sync::atomic::AtomicU64>,
    busy_us: Arc<std::sync::atomic::AtomicU64>,
}

impl EmbeddedIndex {
    /// Opens (or creates) the index and starts its writer thread.
    pub fn open(config: EmbeddedIndexConfig) -> Result<EmbeddedIndex, IndexError> {
        let (users_schema, users_fields) = schema::users();
        let (events_schema, events_fields) = schema::events();
        let users = Side::open(config.dir.join("users"), users_schema, users_fields)?;
        let events = Side::open(config.dir.join("events"), events_schema, events_fields)?;
        let threads = config.threads.max(1);
        let heap = config.heap_bytes.max(threads * 15_000_000);
        let users_writer = users
            .index
            .writer_with_num_threads(threads, heap)
            .map_err(|e| storage_error(&users.path, e))?;
        let events_writer = events
            .index
            .writer_with_num_threads(threads, heap)
            .map_err(|e| storage_error(&events.path, e))?;
        let (tx, rx) = mpsc::channel(64);
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let busy_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = writer::Writer {
            users: users.clone(),
            events: events.clone(),
            users_writer,
            events_writer,
            pending_users: Default::default(),
            pending_events: Default::default(),
            forgot: false,
            commits: Arc::clone(&commits),
            busy_us: Arc::clone(&busy_us),
        };
        let thread = std::thread::Builder::new()
            .name("sluice-index".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| storage_error(&config.dir, e))?;
        Ok(EmbeddedIndex {
            users,
            events,
            commands: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            commits,
            busy_us,
        })
    }

    fn side(&self, target: Target) -> &Side {
        match target {
            Target::Users => &self.users,
            Target::Events => &self.events,
        }
    }

    /// Runs a read on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        target: Target,
        f: impl FnOnce(&Side) -> Result<T, IndexError> + Send + 'static,
    ) -> Result<T, IndexError> {
        let side = self.side(target).clone();
        tokio::task::spawn_blocking(move || f(&side))
            .await
            .map_err(|e| storage_error(&self.side(target).path, e))?
    }

    /// Group commits so far (one per group of write requests, covering both indexes).
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Time the writer thread spent applying and committing writes (it is idle otherwise).
    pub fn busy(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.busy_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Documents in each index (live, committed), for tests and stats.
    pub fn doc_counts(&self) -> (u64, u64) {
        (
            self.users.reader.searcher().num_docs(),
            self.events.reader.searcher().num_docs(),
        )
    }
}

#[async_trait]
impl Index for EmbeddedIndex {
    async fn write(&self, batch: Arc<WriteBatch>) -> Result<WriteOutcome, IndexError> {
        if batch.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let sender = self
            .commands
            .lock()
            .map_err(|_| IndexError::Closed)?
            .clone()
            .ok_or(IndexError::Closed)?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(writer::Command::Write(batch, reply))
            .await
            .map_err(|_| IndexError::Closed)?;
        answer.await.map_err(|_| IndexError::Closed)?
    }

    async fn get_user(&self, org: &str, user_key: &str) -> Result<Option<Value>, IndexError> {
        let doc_id = crate::doc::user_doc_id(org, user_key);
        self.read(Target::Users, move |side| {
            side.find_source(&side.reader.searcher(), &doc_id)
        })
        .await
    }

    /// One blocking task and one searcher for all of them.
    async fn get_users(&self, users: &[(&str, &str)]) -> Result<Vec<Option<Value>>, IndexError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = users
            .iter()
            .map(|(org, user_key)| crate::doc::user_doc_id(org, user_key))
            .collect();
        self.read(Target::Users, move |side| {
            let searcher = side.reader.searcher();
            ids.iter()
                .map(|id| side.find_source(&searcher, id))
                .collect()
        })
        .await
    }

    async fn get_user_by_email(&self, org: &str, email: &str) -> Result<Option<Value>, IndexError> {
        let (org, email) = (org.to_owned(), email.to_lowercase());
        self.read(Target::Users, move |side| {
            let query = BooleanQuery::new(vec![
                (Occur::Must, term_query(side.fields.org, &org)),
                (Occur::Must, term_query(side.fields.email, &email)),
            ]);
            Ok(side.newest(&query, "updatedAt", 1)?.into_iter().next())
        })
        .await
    }

    async fn user_events(
        &self,
        org: &str,
        user_key: &str,
        limit: usize,
    ) -> Result<Vec<Value>, IndexError> {
        let user = crate::doc::user_doc_id(org, user_key);
        let limit = limit.min(MAX_SEARCH_SIZE);
        self.read(Target::Events, move |side| {
            let Some(field) = side.fields.user else {
                return Ok(Vec::new());
            };
            side.newest(&*term_query(field, &user), "createdAt", limit)
        })
        .await
    }

    async fn search(
        &self,
        org: &str,
        target: Target,
        request: &SearchRequest,
    ) -> Result<SearchResponse, IndexError> {
        let (org, request) = (org.to_owned(), request.clone());
        self.read(target, move |side| search::search(side, &org, &request))
            .await
    }

    async fn close(&self) -> Result<(), IndexError> {
        let sender = self.commands.lock().map_err(|_| IndexError::Closed)?.take();
        drop(sender);
        let thread = self.thread.lock().map_err(|_| IndexError::Closed)?.take();
        if let Some(thread) = thread {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|e| storage_error(&self.users.path, e))?
                .map_err(|_| storage_error(&self.users.path, "the index writer thread panicked"))?;
        }
        Ok(())
    }
}
