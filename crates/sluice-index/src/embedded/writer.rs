//! The writer thread: the only owner of the two `IndexWriter`s.
//!
//! Group commit, as in the log: the thread takes a write request, then every request already
//! queued behind it, applies them all, and makes them durable with one commit per index; then
//! it reloads the readers and answers every request of the group. Under load many partitions'
//! batches share one commit; when idle a lone batch commits at once (no timer to wait for).
//!
//! A profile upsert reads the stored profile, applies the patch and replaces the document. The
//! profile written earlier in the same (uncommitted) group is not visible to the searcher yet,
//! so the thread keeps the group's profiles in `pending_users` and reads those first.
//!
//! An event replaces the document of the same id: the thread looks it up in the committed index
//! (and in `pending_events`), unless the batch is `unseen` (first written: see `WriteBatch`), so
//! a log replay does not add an event twice. The events commit after the profiles, so a group
//! that fails between the two has committed no event.
//!
//! A batch's forgets go first: they delete the profile (by doc id) and every event of the user
//! (by the events' `_user` term, which also catches events added earlier in the group: a
//! tantivy delete applies to every document added before it), and leave `null` in
//! `pending_users`, so a later upsert in the group starts a new profile.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;
use tantivy::{IndexWriter, Term};
use tokio::sync::{mpsc, oneshot};

use super::schema;
use super::{Side, storage_error};
use crate::doc::{self, event_doc_id, user_doc_id};
use crate::{IndexError, Refused, WriteBatch, WriteOutcome};

pub(crate) enum Command {
    Write(
        Arc<WriteBatch>,
        oneshot::Sender<Result<WriteOutcome, IndexError>>,
    ),
}

pub(crate) struct Writer {
    pub users: Side,
    pub events: Side,
    pub users_writer: IndexWriter,
    pub events_writer: IndexWriter,
    /// Profiles written since the last commit, by doc id.
    pub pending_users: HashMap<String, Value>,
    /// Event doc ids written since the last commit.
    pub pending_events: HashSet<String>,
    /// Whether a forget deleted events since the last commit.
    pub forgot: bool,
    /// Group commits done (both indexes count as one), and microseconds spent applying and
    /// committing them.
    pub commits: Arc<std::sync::atomic::AtomicU64>,
    pub busy_us: Arc<std::sync::atomic::AtomicU64>,
}

type Reply = oneshot::Sender<Result<WriteOutcome, IndexError>>;

impl Writer {
    /// Runs until every sender is dropped, then commits what is left and waits for merges.
    pub fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut replies: Vec<(Reply, WriteOutcome)> = Vec::new();
        while let Some(first) = commands.blocking_recv() {
            let mut result = Ok(());
            let mut next = Some(first);
            let started = std::time::Instant::now();
            let mut docs = 0;
            while let Some(Command::Write(batch, reply)) = next.take() {
                let mut outcome = WriteOutcome::default();
                if result.is_ok() {
                    result = self.apply(&batch, &mut outcome);
                }
                docs += batch.len();
                replies.push((reply, outcome));
                next = commands.try_recv().ok();
            }
            let applied = started.elapsed();
            let result = result.and_then(|()| self.commit());
            self.commits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.busy_us.fetch_add(
                started.elapsed().as_micros() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            tracing::debug!(
                requests = replies.len(),
                docs,
                apply_ms = applied.as_millis() as u64,
                commit_ms = (started.elapsed() - applied).as_millis() as u64,
                "index: group committed"
            );
            if result.is_err() {
                self.rollback();
            }
            for (reply, outcome) in replies.drain(..) {
                let _ = reply.send(result.clone().map(|()| outcome));
            }
        }
        if let Err(e) = self.commit() {
            tracing::error!(error = %e, "index: final commit failed");
        }
        for (name, writer) in [("users", self.users_writer), ("events", self.events_writer)] {
            if let Err(e) = writer.wait_merging_threads() {
                tracing::warn!(index = name, error = %e, "index: waiting for merges failed");
            }
        }
    }

    fn apply(&mut self, batch: &WriteBatch, outcome: &mut WriteOutcome) -> Result<(), IndexError> {
        for forget in &batch.forgets {
            let doc_id = user_doc_id(&forget.org, &forget.user_key);
            self.users_writer
                .delete_term(Term::from_field_text(self.users.fields.id, &doc_id));
            if let Some(user) = self.events.fields.user {
                self.events_writer
                    .delete_term(Term::from_field_text(user, &doc_id));
            }
            self.pending_users.insert(doc_id, Value::Null);
            self.forgot = true;
        }
        let users_searcher = self.users.reader.searcher();
        for (position, upsert) in batch.users.iter().enumerate() {
            let doc_id = user_doc_id(&upsert.org, &upsert.user_key);
            let stored = match self.pending_users.get(&doc_id) {
                Some(profile) => Some(profile.clone()),
                None => self.users.find_source(&users_searcher, &doc_id)?,
            };
            let existed = stored.is_some();
            let profile = doc::upserted_profile(stored, upsert);
            let doc =
                match schema::user_document(&self.users.fields, &doc_id, &upsert.org, &profile) {
                    Ok(doc) => doc,
                    Err(reason) => {
                        outcome.refused.push(Refused::User { position, reason });
                        continue;
                    }
                };
            if existed {
                self.users_writer
                    .delete_term(Term::from_field_text(self.users.fields.id, &doc_id));
            }
            self.users_writer
                .add_document(doc)
                .map_err(|e| storage_error(&self.users.path, e))?;
            self.pending_users.insert(doc_id, profile);
        }
        let events_searcher = self.events.reader.searcher();
        for (position, event) in batch.events.iter().enumerate() {
            let doc = match schema::event_document(&self.events.fields, event) {
                Ok(doc) => doc,
                Err(reason) => {
                    outcome.refused.push(Refused::Event { position, reason });
                    continue;
                }
            };
            let doc_id = event_doc_id(&event.org, &event.message_id);
            let existed = self.pending_events.contains(&doc_id)
                || (!batch.unseen && self.events.find(&events_searcher, &doc_id)?.is_some());
            if existed {
                self.events_writer
                    .delete_term(Term::from_field_text(self.events.fields.id, &doc_id));
            }
            self.events_writer
                .add_document(doc)
                .map_err(|e| storage_error(&self.events.path, e))?;
            self.pending_events.insert(doc_id);
        }
        Ok(())
    }

    /// Makes everything applied durable and visible: profiles first, so a failure between the
    /// two commits leaves no event of the group committed (a retry re-applies the profiles'
    /// patches, which is harmless, and adds the events again), and a reader never sees an
    /// event whose profile update is not visible yet.
    fn commit(&mut self) -> Result<(), IndexError> {
        if !self.pending_users.is_empty() {
            self.users_writer
                .commit()
                .map_err(|e| storage_error(&self.users.path, e))?;
            self.users
                .reader
                .reload()
                .map_err(|e| storage_error(&self.users.path, e))?;
            self.pending_users.clear();
        }
        if !self.pending_events.is_empty() || self.forgot {
            self.events_writer
                .commit()
                .map_err(|e| storage_error(&self.events.path, e))?;
            self.events
                .reader
                .reload()
                .map_err(|e| storage_error(&self.events.path, e))?;
            self.pending_events.clear();
            self.forgot = false;
        }
        Ok(())
    }

    /// Drops everything applied since the last commit (after a failure: the requests of the
    /// group all failed and will be retried).
    fn rollback(&mut self) {
        for (path, writer) in [
            (&self.users.path, &mut self.users_writer),
            (&self.events.path, &mut self.events_writer),
        ] {
            if let Err(e) = writer.rollback() {
                tracing::error!(path = %path.display(), error = %e, "index: rollback failed");
            }
        }
        self.pending_users.clear();
        self.pending_events.clear();
        self.forgot = false;
    }
}
