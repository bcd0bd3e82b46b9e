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

/// Decompressed doc-store blocks a reader keeps per segment (BENCHMARKS.md, memory).
const DOC_STORE_CACHE_BLOCKS: usize = 8;

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
    /// Nice value added to the index's threads (the writer thread, and tantivy's indexing and
    /// merge threads, which it starts): when the API and indexing both want the CPU, the
    /// API's threads get it first, so indexing cannot slow acknowledgements down; the index
    /// catches up when the load drops. 0 keeps the process's priority (Linux only).
    pub nice: i32,
}

impl EmbeddedIndexConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        EmbeddedIndexConfig {
            dir: dir.into(),
            threads: cores.clamp(1, 4),
            heap_bytes: 64 << 20,
            nice: 10,
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
            // Per segment, decompressed doc-store blocks kept: tantivy's 100 (up to ~1.6 MB
            // per segment) grew the process by tens of MB; reads here fetch few documents.
            .doc_store_cache_num_blocks(DOC_STORE_CACHE_BLOCKS)
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

/// Adds `nice` to the calling thread's nice value (Linux keeps one per thread; threads it
/// starts inherit it). Failing to is logged, not an error: the index works the same.
fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    // On Linux `None` is the calling thread, not the process.
    let lowered = rustix::process::getpriority_process(None)
        .and_then(|current| rustix::process::setpriority_process(None, (current + nice).min(19)));
    if let Err(e) = lowered {
        tracing::warn!(nice, error = %e, "index: cannot lower the index threads' priority");
    }
}

/// Segments the events index merges at once (tantivy's default, kept for profiles, is 8).
/// Events are appended and, since batches are mostly `unseen`, rarely looked up, so the
/// index can hold more segments: each event is then rewritten by merges about log₃₂ rather
/// than log₈ of the index's size, which is most of the pipeline's CPU once the index holds
/// millions of events (BENCHMARKS.md, "flat cost").
const EVENTS_MERGE_FACTOR: usize = 32;

fn events_merge_policy() -> tantivy::indexer::LogMergePolicy {
    let mut policy = tantivy::indexer::LogMergePolicy::default();
    policy.set_min_num_segments(EVENTS_MERGE_FACTOR);
    policy
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
        let (tx, rx) = mpsc::channel(64);
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let busy_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let (thread_users, thread_events) = (users.clone(), events.clone());
        let (thread_commits, thread_busy) = (Arc::clone(&commits), Arc::clone(&busy_us));
        let nice = config.nice;
        // The writers are made on the writer thread, after it lowered its priority: the
        // threads tantivy starts for them inherit it.
        let thread = std::thread::Builder::new()
            .name("sluice-index".into())
            .spawn(move || {
                lower_priority(nice);
                let writers = thread_users
                    .index
                    .writer_with_num_threads(threads, heap)
                    .map_err(|e| storage_error(&thread_users.path, e))
                    .and_then(|users_writer| {
                        thread_events
                            .index
                            .writer_with_num_threads(threads, heap)
                            .map_err(|e| storage_error(&thread_events.path, e))
                            .map(|events_writer| (users_writer, events_writer))
                    });
                let (users_writer, events_writer) = match writers {
                    Ok(writers) => {
                        writers.1.set_merge_policy(Box::new(events_merge_policy()));
                        let _ = opened_tx.send(Ok(()));
                        writers
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                writer::Writer {
                    users: thread_users,
                    events: thread_events,
                    users_writer,
                    events_writer,
                    pending_users: Default::default(),
                    pending_events: Default::default(),
                    forgot: false,
                    commits: thread_commits,
                    busy_us: thread_busy,
                }
                .run(rx)
            })
            .map_err(|e| storage_error(&config.dir, e))?;
        match opened_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(storage_error(
                    &config.dir,
                    "the index writer thread ended before opening the index",
                ));
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of each of this process's threads named `name*`.
    fn nice_of_threads(name: &str) -> Vec<i64> {
        let mut nice = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
            let task = task.expect("task").path();
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if !comm.starts_with(name) {
                continue;
            }
            let stat = std::fs::read_to_string(task.join("stat")).expect("stat");
            // Fields after the parenthesised name: state is field 3, nice field 19.
            let after = &stat[stat.rfind(')').expect("comm") + 2..];
            let value = after.split(' ').nth(16).expect("nice field");
            nice.push(value.parse().expect("nice"));
        }
        nice
    }

    #[test]
    fn the_index_threads_yield_the_cpu_to_the_rest_of_the_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = EmbeddedIndexConfig::new(dir.path());
        config.nice = 7;
        let own = nice_of_threads("").into_iter().min().expect("this thread");
        let index = EmbeddedIndex::open(config).expect("open");
        for name in ["sluice-index", "thrd-tantivy", "merge_thread"] {
            // A new thread names itself once it runs: until then it has its parent's name.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let nice = loop {
                let nice = nice_of_threads(name);
                if !nice.is_empty() || std::time::Instant::now() > deadline {
                    break nice;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            };
            assert!(!nice.is_empty(), "no {name} thread within 10 s");
            assert!(
                nice.iter().all(|n| *n >= own + 7),
                "{name} threads run at nice {nice:?}, the process at {own}"
            );
        }
        drop(index);
    }
}
