//! The Elasticsearch/OpenSearch index under the failures a real cluster produces: injected by a
//! proxy in front of the server (item-level 429/409 storms, whole requests failing, an outage),
//! and produced by the engine itself (documents refused for their content, a real OpenSearch
//! node with a tiny write queue answering 429, a closed index). Each test runs on a real
//! OpenSearch 2.19 node (one per test binary, indexes under a prefix of the test's own) and on
//! osmem-server (a fast imitation, one per test).

use sluice_model::Recoverable;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};
use sluice_index::testing::{FaultProxy, Osmem};
use sluice_index::{
    ElasticIndex, ElasticIndexConfig, EventDoc, Index, IndexError, Refused, SearchRequest, Target,
    UserUpsert, WriteBatch,
};
use sluice_model::Patch;
use sluice_testkit::OpenSearch;

/// The server a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    OpenSearch,
    Osmem,
}

/// A running server for one test: the binary's OpenSearch node, or an osmem-server of its own.
struct Backend {
    url: String,
    prefix_base: String,
    _osmem: Option<Osmem>,
}

impl Backend {
    fn start(server: Server) -> Backend {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        match server {
            Server::OpenSearch => Backend {
                url: opensearch().url.clone(),
                prefix_base: format!("faults-{}-{n}", std::process::id()),
                _osmem: None,
            },
            Server::Osmem => {
                let osmem = Osmem::start();
                Backend {
                    url: osmem.url.clone(),
                    prefix_base: "faults".into(),
                    _osmem: Some(osmem),
                }
            }
        }
    }

    /// A prefix unique to this test on its server.
    fn prefix(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix_base)
    }
}

/// One OpenSearch node for the whole test binary (it exits with this process).
fn opensearch() -> &'static OpenSearch {
    static NODE: OnceLock<OpenSearch> = OnceLock::new();
    NODE.get_or_init(OpenSearch::start)
}

macro_rules! on_both {
    ($($test:ident),* $(,)?) => {
        mod opensearch {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Server::OpenSearch).await
            })*
        }
        mod osmem {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Server::Osmem).await
            })*
        }
    };
}

on_both!(
    item_level_429_and_409_storms_are_retried_until_every_document_is_taken,
    documents_still_failing_make_a_recoverable_error_and_nothing_is_lost,
    an_outage_is_a_recoverable_error_and_writes_resume_when_it_ends,
    documents_rejected_for_their_content_are_refused_alone,
);

async fn open(url: &str, prefix: &str) -> ElasticIndex {
    let mut config = ElasticIndexConfig::new(url);
    config.prefix = prefix.into();
    config.item_attempts = 4;
    config.max_retry_delay = Duration::from_millis(100);
    config.timeout = Duration::from_secs(5);
    // The tests search right after writing.
    config.refresh_writes = true;
    ElasticIndex::open(config).await.expect("open")
}

fn user(id: usize, fields: Value, deep: bool) -> UserUpsert {
    let Value::Object(map) = fields else {
        panic!("fields must be an object")
    };
    UserUpsert {
        org: "acme".into(),
        user_key: format!("u:{id}"),
        user_id: Some(id.to_string()),
        email: None,
        patch: Patch::from_update(&map, deep),
        updated_at: 1_700_000_000_000 + id as i64,
        version: None,
    }
}

fn event(id: usize, data: Value) -> EventDoc {
    EventDoc {
        org: "acme".into(),
        message_id: format!("m{id}"),
        user_key: format!("u:{}", id % 50),
        user_id: Some((id % 50).to_string()),
        email: None,
        event_name: "click".into(),
        created_at: 1_700_000_000_000 + id as i64,
        received_at: 1_700_000_000_000 + id as i64,
        data_fields: serde_json::value::to_raw_value(&data).expect("raw"),
        segment: None,
    }
}

/// 200 users (half of them shallow object replacements, which take the read-modify-write
/// path) and 500 events.
fn batch(round: usize) -> WriteBatch {
    WriteBatch {
        users: (0..200)
            .map(|i| {
                if i % 2 == 0 {
                    user(i, json!({"round": round, "address": {"n": round}}), false)
                } else {
                    user(i, json!({"round": round, "nested": {"n": round}}), true)
                }
            })
            .collect(),
        events: (0..500)
            .map(|i| event(i, json!({"round": round})))
            .collect(),
        forgets: Vec::new(),
        unseen: false,
    }
}

async fn total(index: &ElasticIndex, target: Target, query: &str) -> u64 {
    let request = SearchRequest {
        query: query.into(),
        size: 0,
        aggs: None,
    };
    index
        .search("acme", target, &request)
        .await
        .expect("search")
        .total
}

/// Every document of `batch(round)` is there with that round's content.
async fn assert_round_written(index: &ElasticIndex, round: usize) {
    let query = format!("dataFields.round:{round}");
    assert_eq!(
        total(index, Target::Users, &query).await,
        200,
        "users of round {round}"
    );
    assert_eq!(
        total(index, Target::Events, &query).await,
        500,
        "events of round {round}"
    );
    let even = index
        .get_user("acme", "u:0")
        .await
        .expect("get")
        .expect("u:0");
    assert_eq!(even["dataFields"]["address"], json!({"n": round}));
    let odd = index
        .get_user("acme", "u:1")
        .await
        .expect("get")
        .expect("u:1");
    assert_eq!(odd["dataFields"]["nested"], json!({"n": round}));
}

async fn item_level_429_and_409_storms_are_retried_until_every_document_is_taken(server: Server) {
    let backend = Backend::start(server);
    let proxy = FaultProxy::start(&backend.url);
    let index = open(&proxy.url, &backend.prefix("storm")).await;
    index
        .write(Arc::new(batch(0)))
        .await
        .expect("write round 0");

    // Every third item of each bulk request is withheld and answered 429, 300 in all.
    proxy.fail_items(429, 3, 300);
    let outcome = index
        .write(Arc::new(batch(1)))
        .await
        .expect("write round 1");
    assert!(outcome.refused.is_empty(), "{:?}", outcome.refused);
    assert_eq!(proxy.withheld(), 300);
    assert!(
        index
            .stats()
            .retried_docs
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 300
    );
    assert_round_written(&index, 1).await;

    // 409s: the read-modify-write users are read again before they are sent again.
    proxy.fail_items(409, 2, 150);
    index
        .write(Arc::new(batch(2)))
        .await
        .expect("write round 2");
    assert_eq!(proxy.withheld(), 450);
    assert_round_written(&index, 2).await;

    // Whole requests answered 503, then 429.
    proxy.fail_requests(503, 2);
    index
        .write(Arc::new(batch(3)))
        .await
        .expect("write round 3");
    proxy.fail_requests(429, 2);
    index
        .write(Arc::new(batch(4)))
        .await
        .expect("write round 4");
    assert_round_written(&index, 4).await;
}

async fn documents_still_failing_make_a_recoverable_error_and_nothing_is_lost(server: Server) {
    let backend = Backend::start(server);
    let proxy = FaultProxy::start(&backend.url);
    let index = open(&proxy.url, &backend.prefix("persistent")).await;
    // More failures than 4 attempts can get through.
    proxy.fail_items(429, 1, 100_000);
    match index.write(Arc::new(batch(1))).await {
        Err(e @ IndexError::Unavailable { .. }) => {
            assert!(e.is_recoverable());
            let message = e.to_string();
            assert!(
                message.contains("still not taken after 4 attempts"),
                "{message}"
            );
            assert!(message.contains("429"), "{message}");
        }
        other => panic!("expected a recoverable error, got {other:?}"),
    }
    // The storm ends; the caller's retry writes everything.
    proxy.fail_items(429, 1, 0);
    index.write(Arc::new(batch(1))).await.expect("retry");
    assert_round_written(&index, 1).await;
}

async fn an_outage_is_a_recoverable_error_and_writes_resume_when_it_ends(server: Server) {
    let backend = Backend::start(server);
    let proxy = FaultProxy::start(&backend.url);
    let index = open(&proxy.url, &backend.prefix("outage")).await;
    index
        .write(Arc::new(batch(0)))
        .await
        .expect("write round 0");
    proxy.go_down();
    let error = index
        .write(Arc::new(batch(1)))
        .await
        .expect_err("the store is down");
    assert!(error.is_recoverable(), "{error}");
    assert!(error.to_string().contains(&proxy.url), "{error}");
    let read = index
        .get_user("acme", "u:0")
        .await
        .expect_err("reads fail too");
    assert!(read.is_recoverable(), "{read}");
    proxy.come_back();
    index
        .write(Arc::new(batch(1)))
        .await
        .expect("write after the outage");
    assert_round_written(&index, 1).await;
}

async fn documents_rejected_for_their_content_are_refused_alone(server: Server) {
    let backend = Backend::start(server);
    let index = open(&backend.url, &backend.prefix("refused")).await;
    index
        .write(Arc::new(WriteBatch {
            users: vec![user(1, json!({"age": 30}), false)],
            events: vec![event(1, json!({"amount": 5}))],
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    // `age` and `amount` are numbers now; a string that is not one cannot be indexed.
    let outcome = index
        .write(Arc::new(WriteBatch {
            users: vec![
                user(2, json!({"age": "old"}), false),
                user(3, json!({"age": 40}), false),
                // A mapping conflict: an object where the field is a number.
                user(4, json!({"age": {"years": 40}}), false),
            ],
            events: vec![
                event(2, json!({"amount": "lots"})),
                event(3, json!({"amount": 7})),
            ],
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    assert_eq!(outcome.refused.len(), 3, "{:?}", outcome.refused);
    for refused in &outcome.refused {
        let (Refused::User {
            position: 0 | 2,
            reason,
        }
        | Refused::Event {
            position: 0,
            reason,
        }) = refused
        else {
            panic!("unexpected refusal {refused:?}");
        };
        assert!(
            reason.contains("400") && reason.contains("mapper_parsing_exception"),
            "{reason}"
        );
    }
    assert!(index.get_user("acme", "u:3").await.expect("get").is_some());
    assert!(index.get_user("acme", "u:2").await.expect("get").is_none());
    assert!(index.get_user("acme", "u:4").await.expect("get").is_none());
    assert_eq!(total(&index, Target::Events, "").await, 2);
}

/// Real 429s: a node whose write pool has one thread and a queue of one rejects bulk items with
/// `es_rejected_execution_exception` while eight writers send at once. Every rejected item is
/// sent again, and every document of every writer is there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_write_queue_rejection_storm_loses_nothing() {
    let node =
        OpenSearch::start_with(&["thread_pool.write.size=1", "thread_pool.write.queue_size=1"]);
    let mut writers = Vec::new();
    for w in 0..8 {
        let url = node.url.clone();
        writers.push(tokio::spawn(async move {
            let mut config = ElasticIndexConfig::new(&url);
            config.prefix = format!("queue-{w}");
            config.item_attempts = 1000;
            config.max_retry_delay = Duration::from_millis(200);
            config.bulk_max_docs = 100;
            let index = ElasticIndex::open(config).await.expect("open");
            for round in 0..3 {
                index
                    .write(Arc::new(batch(round)))
                    .await
                    .expect("every write is taken in the end");
            }
            index
        }));
    }
    let mut retried = 0;
    for writer in writers {
        let index = writer.await.expect("writer");
        retried += index.stats().retried_docs.load(Ordering::Relaxed);
        refresh(&node.url, &index).await;
        assert_round_written(&index, 2).await;
    }
    assert!(
        retried > 0,
        "the node rejected nothing: the test did not make a storm{}",
        node.log()
    );
    println!("documents sent again after a real 429: {retried}");
}

/// A closed index: writes and reads are a recoverable error that names the index and the
/// engine's reason (an operator reopens it; nothing is refused for its content), and writing
/// resumes once it is open again.
#[tokio::test]
async fn a_closed_index_is_a_recoverable_error_naming_it() {
    let url = &opensearch().url;
    let prefix = format!("closed-{}", std::process::id());
    let index = open(url, &prefix).await;
    index.write(Arc::new(batch(0))).await.expect("write");
    let (_, events) = index.index_names();
    let http = reqwest::Client::new();
    let closed = http
        .post(format!("{url}/{events}/_close"))
        .send()
        .await
        .expect("close");
    assert!(closed.status().is_success(), "{:?}", closed.text().await);

    let error = index
        .write(Arc::new(batch(1)))
        .await
        .expect_err("the events index is closed");
    assert!(error.is_recoverable(), "{error}");
    let message = error.to_string();
    assert!(message.contains(events), "{message}");
    assert!(message.contains("index_closed_exception"), "{message}");

    let opened = http
        .post(format!("{url}/{events}/_open?wait_for_active_shards=1"))
        .send()
        .await
        .expect("open");
    assert!(opened.status().is_success(), "{:?}", opened.text().await);
    index
        .write(Arc::new(batch(1)))
        .await
        .expect("write after reopening");
    assert_round_written(&index, 1).await;
}

async fn refresh(url: &str, index: &ElasticIndex) {
    let (users, events) = index.index_names();
    reqwest::Client::new()
        .post(format!("{url}/{users},{events}/_refresh"))
        .send()
        .await
        .expect("refresh");
}
