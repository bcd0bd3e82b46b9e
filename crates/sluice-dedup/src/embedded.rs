//! The embedded dedup store: one fjall keyspace, key = `org \0 message id`, value = the time of
//! marking (unix ms, i64 big-endian).
//!
//! A mark older than the window counts as absent when checked, so correctness never depends on
//! cleanup; expired marks are dropped by a compaction filter as fjall compacts, so no scan of
//! the whole store is ever needed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fjall::compaction::filter::{CompactionFilter, Context, Factory, ItemAccessor, Verdict};
use fjall::config::PinningPolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use sluice_model::time::now_ms;

use crate::{Dedup, DedupError, MessageKey, Stash};

const KEYSPACE: &str = "seen";
/// The trigger outbox: key as in `seen`, value = time stashed (i64 big-endian) + payload.
const STASH: &str = "stash";

#[derive(Clone)]
pub struct EmbeddedDedup {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    db: Database,
    seen: Keyspace,
    stash: Keyspace,
    window_ms: i64,
}

fn encode_key(key: &MessageKey<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.org.len() + 1 + key.message_id.len());
    out.extend_from_slice(key.org.as_bytes());
    out.push(0);
    out.extend_from_slice(key.message_id.as_bytes());
    out
}

/// The time a value was written: its first 8 bytes.
fn decode_time(value: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// Drops marks older than the window when fjall compacts.
struct ExpiryFactory {
    window_ms: i64,
}

impl Factory for ExpiryFactory {
    fn name(&self) -> &str {
        "sluice-dedup-expiry"
    }

    fn make_filter(&self, _ctx: &Context) -> Box<dyn CompactionFilter> {
        Box::new(ExpiryFilter {
            floor_ms: now_ms().saturating_sub(self.window_ms),
        })
    }
}

struct ExpiryFilter {
    floor_ms: i64,
}

impl CompactionFilter for ExpiryFilter {
    fn filter_item(
        &mut self,
        item: ItemAccessor<'_>,
        _ctx: &Context,
    ) -> fjall::compaction::filter::CompactionFilterResult {
        let value = item.value()?;
        Ok(match decode_time(&value) {
            Some(marked) if marked < self.floor_ms => Verdict::Remove,
            _ => Verdict::Keep,
        })
    }
}

impl EmbeddedDedup {
    /// Opens (or creates) the store under `dir` with the given window.
    pub fn open(dir: &Path, window: Duration) -> Result<Self, DedupError> {
        let storage = |message: String| DedupError::Storage {
            path: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| storage(format!("cannot create the directory: {e}")))?;
        let window_ms = window.as_millis().min(i64::MAX as u128) as i64;
        let factory: Arc<dyn Factory> = Arc::new(ExpiryFactory { window_ms });
        let db = Database::builder(dir)
            // Data blocks only: the filters and index blocks are pinned (below). A 16 MB cache
            // and 4 MB memtables, down from 32 and 8, cost no measurable throughput
            // (BENCHMARKS.md).
            .cache_size(16 << 20)
            .worker_threads(1)
            .with_compaction_filter_factories(Arc::new(move |name: &str| {
                (name == KEYSPACE || name == STASH).then(|| Arc::clone(&factory))
            }))
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => storage("in use by another process (is another `sluice serve` running on this data dir?)".into()),
                e => storage(e.to_string()),
            })?;
        let seen = db
            .keyspace(KEYSPACE, || {
                // Nearly every check is for an id never seen, answered by the bloom filters
                // alone when they, and the index blocks, stay in memory at every level (about
                // 2 MB per million ids). Unpinned, they compete with data blocks for the cache
                // and the check gets ~10x dearer once the store outgrows it.
                KeyspaceCreateOptions::default()
                    .max_memtable_size(4 << 20)
                    .filter_block_pinning_policy(PinningPolicy::all(true))
                    .index_block_pinning_policy(PinningPolicy::all(true))
            })
            .map_err(|e| storage(e.to_string()))?;
        let stash = db
            .keyspace(STASH, KeyspaceCreateOptions::default)
            .map_err(|e| storage(e.to_string()))?;
        Ok(EmbeddedDedup {
            inner: Arc::new(Inner {
                path: dir.to_path_buf(),
                db,
                seen,
                stash,
                window_ms,
            }),
        })
    }

    fn error(&self, e: impl std::fmt::Display) -> DedupError {
        DedupError::Storage {
            path: self.inner.path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// `check` as of `now_ms`.
    pub fn check_at(&self, keys: &[MessageKey<'_>], now_ms: i64) -> Result<Vec<bool>, DedupError> {
        let floor = now_ms.saturating_sub(self.inner.window_ms);
        keys.iter()
            .map(|key| {
                let value = self
                    .inner
                    .seen
                    .get(encode_key(key))
                    .map_err(|e| self.error(e))?;
                Ok(value
                    .and_then(|v| decode_time(&v))
                    .is_some_and(|marked| marked >= floor))
            })
            .collect()
    }

    /// `mark` as of `now_ms`: one atomic batch, one fsync.
    pub fn mark_at(&self, keys: &[MessageKey<'_>], now_ms: i64) -> Result<(), DedupError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut batch = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        for key in keys {
            batch.insert(&self.inner.seen, encode_key(key), now_ms.to_be_bytes());
        }
        batch.commit().map_err(|e| self.error(e))
    }

    /// `stash` as of `now_ms`: one atomic batch, one fsync, for what is kept and was not
    /// stashed yet.
    pub fn stash_at(
        &self,
        entries: &[Stash<'_>],
        now_ms: i64,
    ) -> Result<Vec<Option<Vec<u8>>>, DedupError> {
        let floor = now_ms.saturating_sub(self.inner.window_ms);
        let mut batch = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        let mut found = Vec::with_capacity(entries.len());
        // Keys stashed by this call, and the entry whose payload was stashed.
        let mut fresh: std::collections::HashMap<Vec<u8>, usize> = Default::default();
        for (at, entry) in entries.iter().enumerate() {
            let encoded = encode_key(&entry.key);
            if let Some(&earlier) = fresh.get(&encoded) {
                found.push(Some(entries[earlier].payload.to_vec()));
                continue;
            }
            let existing = self
                .inner
                .stash
                .get(&encoded)
                .map_err(|e| self.error(e))?
                .filter(|v| decode_time(v).is_some_and(|at| at >= floor));
            match existing {
                Some(value) => found.push(Some(value[8..].to_vec())),
                None => {
                    if entry.keep {
                        let mut value = Vec::with_capacity(8 + entry.payload.len());
                        value.extend_from_slice(&now_ms.to_be_bytes());
                        value.extend_from_slice(entry.payload);
                        batch.insert(&self.inner.stash, encoded.clone(), value);
                        fresh.insert(encoded, at);
                    }
                    found.push(None);
                }
            }
        }
        if !fresh.is_empty() {
            batch.commit().map_err(|e| self.error(e))?;
        }
        Ok(found)
    }

    /// `unstash`: one atomic batch, not fsynced: a stash a crash brings back only takes space
    /// until it expires with the window (a marked action never reads it again).
    pub fn unstash_now(&self, keys: &[MessageKey<'_>]) -> Result<(), DedupError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut batch = self.inner.db.batch().durability(None);
        for key in keys {
            batch.remove(&self.inner.stash, encode_key(key));
        }
        batch.commit().map_err(|e| self.error(e))
    }
}

/// Owned copies of borrowed keys, to move into a blocking task.
fn owned(keys: &[MessageKey<'_>]) -> Vec<(String, String)> {
    keys.iter()
        .map(|k| (k.org.to_string(), k.message_id.to_string()))
        .collect()
}

fn borrowed(keys: &[(String, String)]) -> Vec<MessageKey<'_>> {
    keys.iter()
        .map(|(org, id)| MessageKey {
            org,
            message_id: id,
        })
        .collect()
}

#[async_trait]
impl Dedup for EmbeddedDedup {
    async fn check(&self, keys: &[MessageKey<'_>]) -> Result<Vec<bool>, DedupError> {
        let this = self.clone();
        let keys = owned(keys);
        tokio::task::spawn_blocking(move || this.check_at(&borrowed(&keys), now_ms()))
            .await
            .map_err(|e| self.error(format!("check task failed: {e}")))?
    }

    async fn mark(&self, keys: &[MessageKey<'_>]) -> Result<(), DedupError> {
        let this = self.clone();
        let keys = owned(keys);
        tokio::task::spawn_blocking(move || this.mark_at(&borrowed(&keys), now_ms()))
            .await
            .map_err(|e| self.error(format!("mark task failed: {e}")))?
    }

    async fn stash(&self, entries: &[Stash<'_>]) -> Result<Vec<Option<Vec<u8>>>, DedupError> {
        let this = self.clone();
        let keys = owned(&entries.iter().map(|e| e.key).collect::<Vec<_>>());
        // Only a kept entry's payload can be written (or found again by a repeated key): a
        // look-up's stays behind.
        let payloads: Vec<(Vec<u8>, bool)> = entries
            .iter()
            .map(|e| {
                (
                    if e.keep {
                        e.payload.to_vec()
                    } else {
                        Vec::new()
                    },
                    e.keep,
                )
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            let entries: Vec<Stash<'_>> = borrowed(&keys)
                .into_iter()
                .zip(&payloads)
                .map(|(key, (payload, keep))| Stash {
                    key,
                    payload,
                    keep: *keep,
                })
                .collect();
            this.stash_at(&entries, now_ms())
        })
        .await
        .map_err(|e| self.error(format!("stash task failed: {e}")))?
    }

    /// A local store has no server to lose: open is healthy. (A full disk shows on the
    /// writes, which fail with the path.)
    async fn health(&self) -> Result<(), DedupError> {
        Ok(())
    }

    async fn unstash(&self, keys: &[MessageKey<'_>]) -> Result<(), DedupError> {
        let this = self.clone();
        let keys = owned(keys);
        tokio::task::spawn_blocking(move || this.unstash_now(&borrowed(&keys)))
            .await
            .map_err(|e| self.error(format!("unstash task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn key<'a>(org: &'a str, id: &'a str) -> MessageKey<'a> {
        MessageKey {
            org,
            message_id: id,
        }
    }

    #[tokio::test]
    async fn marked_ids_are_seen_per_org_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let dedup = EmbeddedDedup::open(dir.path(), crate::DEFAULT_WINDOW).expect("open");
            assert_eq!(
                dedup
                    .check(&[key("a", "1"), key("b", "1")])
                    .await
                    .expect("check"),
                [false, false]
            );
            dedup.mark(&[key("a", "1")]).await.expect("mark");
            assert_eq!(
                dedup
                    .check(&[key("a", "1"), key("b", "1"), key("a", "2")])
                    .await
                    .expect("check"),
                [true, false, false],
                "same id in another org is another message"
            );
        }
        let dedup = EmbeddedDedup::open(dir.path(), crate::DEFAULT_WINDOW).expect("reopen");
        assert_eq!(
            dedup.check(&[key("a", "1")]).await.expect("check"),
            [true],
            "marks are durable"
        );
    }

    #[tokio::test]
    async fn a_stash_keeps_the_first_payload_until_unstashed_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let dedup = EmbeddedDedup::open(dir.path(), crate::DEFAULT_WINDOW).expect("open");
            crate::contract::stash_first(&dedup).await;
        }
        let dedup = EmbeddedDedup::open(dir.path(), crate::DEFAULT_WINDOW).expect("reopen");
        crate::contract::stash_then(&dedup).await;
        // An expired stash counts as absent.
        let old = dedup
            .stash_at(
                &[Stash::kept(key("acme/welcome", "m2"), b"newer")],
                now_ms() + 8 * 24 * 3600 * 1000,
            )
            .expect("stash");
        assert_eq!(old, [None]);
    }

    #[test]
    fn marks_expire_after_the_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dedup = EmbeddedDedup::open(dir.path(), Duration::from_secs(60)).expect("open");
        dedup.mark_at(&[key("o", "m")], 1_000_000).expect("mark");
        assert_eq!(
            dedup
                .check_at(&[key("o", "m")], 1_000_000 + 60_000)
                .expect("check"),
            [true],
            "window is inclusive"
        );
        assert_eq!(
            dedup
                .check_at(&[key("o", "m")], 1_000_000 + 60_001)
                .expect("check"),
            [false]
        );
    }

    #[test]
    fn compaction_drops_expired_marks_and_keeps_live_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dedup = EmbeddedDedup::open(dir.path(), Duration::from_secs(60)).expect("open");
        let now = now_ms();
        dedup
            .mark_at(&[key("o", "old")], now - 120_000)
            .expect("mark");
        dedup.mark_at(&[key("o", "new")], now).expect("mark");
        let seen = &dedup.inner.seen;
        seen.rotate_memtable_and_wait().expect("flush");
        seen.major_compact().expect("compact");
        assert!(
            seen.get(encode_key(&key("o", "old")))
                .expect("get")
                .is_none(),
            "expired mark removed"
        );
        assert!(
            seen.get(encode_key(&key("o", "new")))
                .expect("get")
                .is_some(),
            "live mark kept"
        );
    }

    #[test]
    fn a_second_process_cannot_open_the_same_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = EmbeddedDedup::open(dir.path(), crate::DEFAULT_WINDOW).expect("open");
        let err = EmbeddedDedup::open(dir.path(), crate::DEFAULT_WINDOW)
            .err()
            .expect("locked");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        Mark(Vec<(u8, u8)>),
        Check(Vec<(u8, u8)>),
        Wait(i64),
    }

    fn step() -> impl Strategy<Value = Step> {
        let ids = proptest::collection::vec((0u8..2, 0u8..6), 1..6);
        prop_oneof![
            ids.clone().prop_map(Step::Mark),
            ids.prop_map(Step::Check),
            (0i64..700).prop_map(Step::Wait),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Against a model (a map of id → time of last mark): an id is seen iff it was marked
        /// no longer than the window ago.
        #[test]
        fn check_agrees_with_a_windowed_model(steps in proptest::collection::vec(step(), 1..40)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let window = 1000;
            let dedup = EmbeddedDedup::open(dir.path(), Duration::from_millis(window as u64)).expect("open");
            let mut model: HashMap<(String, String), i64> = HashMap::new();
            let mut now = 1_000_000i64;
            for step in steps {
                match step {
                    Step::Wait(ms) => now += ms,
                    Step::Mark(ids) => {
                        let owned: Vec<(String, String)> = ids.iter().map(|(o, m)| (format!("org{o}"), format!("m{m}"))).collect();
                        dedup.mark_at(&borrowed(&owned), now).expect("mark");
                        for id in owned { model.insert(id, now); }
                    }
                    Step::Check(ids) => {
                        let owned: Vec<(String, String)> = ids.iter().map(|(o, m)| (format!("org{o}"), format!("m{m}"))).collect();
                        let got = dedup.check_at(&borrowed(&owned), now).expect("check");
                        let want: Vec<bool> = owned.iter().map(|id| model.get(id).is_some_and(|t| *t >= now - window)).collect();
                        prop_assert_eq!(got, want);
                    }
                }
            }
        }
    }
}
