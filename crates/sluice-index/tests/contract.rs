//! The `Index` contract, one suite run on every backend: the embedded index (tantivy files in
//! a temp dir) and the Elasticsearch/OpenSearch index, on a real OpenSearch 2.19 node and on
//! osmem-server (a fast imitation), each test in indexes of its own. Each test is written once
//! and instantiated per backend by `contract!`. One OpenSearch node and one osmem-server serve
//! the whole test binary.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value, json};
use sluice_index::testing::Osmem;
use sluice_index::{
    ElasticIndex, ElasticIndexConfig, EmbeddedIndex, EmbeddedIndexConfig, EventDoc, Forget, Index,
    IndexError, SearchRequest, Target, UserUpsert, WriteBatch,
};
use sluice_model::Patch;
use sluice_testkit::OpenSearch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Embedded,
    /// `ElasticIndex` on a real OpenSearch node.
    OpenSearch,
    /// `ElasticIndex` on osmem-server.
    Osmem,
}

/// One test's store: a temp dir, or an index prefix of its own on the shared server.
struct Store {
    backend: Backend,
    dir: tempfile::TempDir,
    prefix: String,
}

/// One osmem-server for the whole test binary (it exits with this process).
fn osmem() -> &'static Osmem {
    static OSMEM: OnceLock<Osmem> = OnceLock::new();
    OSMEM.get_or_init(Osmem::start)
}

/// One OpenSearch node for the whole test binary (it exits with this process).
fn opensearch() -> &'static OpenSearch {
    static NODE: OnceLock<OpenSearch> = OnceLock::new();
    NODE.get_or_init(OpenSearch::start)
}

impl Store {
    fn new(backend: Backend) -> Store {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        Store {
            backend,
            dir: tempfile::tempdir().expect("tempdir"),
            prefix: format!(
                "contract-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// Opens the store (again: a reopen sees what was written before).
    async fn open(&self) -> Box<dyn Index> {
        match self.backend {
            Backend::Embedded => {
                let mut config = EmbeddedIndexConfig::new(self.dir.path());
                config.threads = 1;
                Box::new(EmbeddedIndex::open(config).expect("open index"))
            }
            Backend::OpenSearch | Backend::Osmem => {
                let url = if self.backend == Backend::OpenSearch {
                    &opensearch().url
                } else {
                    &osmem().url
                };
                let mut config = ElasticIndexConfig::new(url);
                config.prefix = self.prefix.clone();
                // The contract searches right after writing.
                config.refresh_writes = true;
                Box::new(ElasticIndex::open(config).await.expect("open index"))
            }
        }
    }
}

/// Documents of an org, counted through search.
async fn count(index: &dyn Index, org: &str, target: Target) -> u64 {
    index
        .search(org, target, &search("", 0, None))
        .await
        .expect("count")
        .total
}

macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Backend::Embedded).await
            })*
        }
        mod opensearch {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Backend::OpenSearch).await
            })*
        }
        mod osmem {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Backend::Osmem).await
            })*
        }
    };
}

contract!(
    upserts_merge_into_the_stored_profile_and_survive_a_reopen,
    events_are_idempotent_by_id_and_listed_newest_first,
    by_email_finds_the_profile_carrying_that_email,
    search_queries_and_aggregations_are_org_scoped,
    bad_queries_and_aggregations_are_the_clients_fault,
    an_event_whose_data_fields_is_not_an_object_is_refused_alone,
    an_events_segment_fields_are_stored_beside_it,
    a_forgotten_user_leaves_no_profile_and_no_event,
);

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn raw(v: Value) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(&v).expect("raw JSON")
}

fn upsert(org: &str, id: &str, data: Value, deep: bool, at: i64) -> UserUpsert {
    UserUpsert {
        org: org.into(),
        user_key: format!("u:{id}"),
        user_id: Some(id.into()),
        email: None,
        patch: Patch::from_update(&fields(data), deep),
        updated_at: at,
        version: None,
    }
}

fn event(org: &str, user: &str, id: &str, name: &str, at: i64, data: Value) -> EventDoc {
    EventDoc {
        org: org.into(),
        message_id: id.into(),
        user_key: format!("u:{user}"),
        user_id: Some(user.into()),
        email: None,
        event_name: name.into(),
        created_at: at,
        received_at: at,
        data_fields: raw(data),
        segment: None,
    }
}

fn search(query: &str, size: usize, aggs: Option<Value>) -> SearchRequest {
    SearchRequest {
        query: query.into(),
        size,
        aggs,
    }
}

async fn upserts_merge_into_the_stored_profile_and_survive_a_reopen(backend: Backend) {
    let store = Store::new(backend);
    let index = store.open().await;
    let first = json!({"plan": "free", "address": {"city": "Paris", "zip": "75001"}});
    index
        .write(Arc::new(WriteBatch {
            users: vec![upsert("acme", "1", first, false, 10)],
            events: vec![],
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    // Same user twice in one batch (the second reads the first from the pending group), one
    // deep and one shallow.
    index
        .write(Arc::new(WriteBatch {
            users: vec![
                upsert("acme", "1", json!({"address": {"city": "Lyon"}}), true, 20),
                upsert("acme", "1", json!({"plan": "pro"}), false, 30),
            ],
            events: vec![],
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    let expected = json!({
        "userId": "1",
        "dataFields": {"plan": "pro", "address": {"city": "Lyon", "zip": "75001"}},
        "createdAt": 10,
        "updatedAt": 30,
    });
    assert_eq!(
        index.get_user("acme", "u:1").await.expect("get"),
        Some(expected.clone())
    );
    assert_eq!(
        count(&*index, "acme", Target::Users).await,
        1,
        "one document per user"
    );
    // Shallow: the nested object is replaced.
    index
        .write(Arc::new(WriteBatch {
            users: vec![upsert(
                "acme",
                "1",
                json!({"address": {"city": "Nice"}}),
                false,
                40,
            )],
            events: vec![],
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    index.close().await.expect("close");

    let index = store.open().await;
    let profile = index
        .get_user("acme", "u:1")
        .await
        .expect("get")
        .expect("profile");
    assert_eq!(
        profile["dataFields"],
        json!({"plan": "pro", "address": {"city": "Nice"}})
    );
    assert_eq!(count(&*index, "acme", Target::Users).await, 1);
    assert_eq!(
        index.get_user("other", "u:1").await.expect("get"),
        None,
        "org-scoped"
    );
    let many = index
        .get_users(&[("other", "u:1"), ("acme", "u:1"), ("acme", "u:2")])
        .await
        .expect("get_users");
    assert_eq!(many, [None, Some(profile), None], "in order, org-scoped");
    index.close().await.expect("close");
}

async fn events_are_idempotent_by_id_and_listed_newest_first(backend: Backend) {
    let store = Store::new(backend);
    let index = store.open().await;
    let events: Vec<EventDoc> = (0..5)
        .map(|i| {
            event(
                "acme",
                "1",
                &format!("m{i}"),
                "click",
                1000 + i,
                json!({"i": i}),
            )
        })
        .collect();
    index
        .write(Arc::new(WriteBatch {
            users: vec![],
            events: events.clone(),
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    // Replayed, in one batch with a changed copy of m0 and in a later batch.
    let mut changed = events[0].clone();
    changed.data_fields = raw(json!({"i": 100}));
    index
        .write(Arc::new(WriteBatch {
            users: vec![],
            events: vec![events[1].clone(), changed],
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    index
        .write(Arc::new(WriteBatch {
            users: vec![],
            events: events.clone(),
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    assert_eq!(count(&*index, "acme", Target::Events).await, 5);
    let listed = index.user_events("acme", "u:1", 3).await.expect("list");
    let ids: Vec<&str> = listed
        .iter()
        .filter_map(|e| e["messageId"].as_str())
        .collect();
    assert_eq!(ids, ["m4", "m3", "m2"]);
    assert_eq!(listed[0]["dataFields"], json!({"i": 4}));
    assert_eq!(
        index.user_events("other", "u:1", 3).await.expect("list"),
        Vec::<Value>::new()
    );
    index.close().await.expect("close");
}

async fn by_email_finds_the_profile_carrying_that_email(backend: Backend) {
    let store = Store::new(backend);
    let index = store.open().await;
    let mut by_id = upsert("acme", "7", json!({"n": 1}), false, 10);
    by_id.email = Some("Ann@Example.com".into());
    index
        .write(Arc::new(WriteBatch {
            users: vec![by_id],
            events: vec![],
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    let profile = index
        .get_user_by_email("acme", "ann@example.COM")
        .await
        .expect("get")
        .expect("found");
    assert_eq!(profile["userId"], "7");
    assert_eq!(
        index
            .get_user_by_email("other", "ann@example.com")
            .await
            .expect("get"),
        None
    );
    index.close().await.expect("close");
}

async fn search_queries_and_aggregations_are_org_scoped(backend: Backend) {
    let store = Store::new(backend);
    let index = store.open().await;
    let plans = ["free", "pro", "pro", "enterprise"];
    let users = (0..4)
        .map(|i| {
            upsert(
                "acme",
                &i.to_string(),
                json!({"plan": plans[i], "seq": i * 10, "name": format!("User Number{i}")}),
                false,
                1_700_000_000_000,
            )
        })
        .chain([upsert(
            "evil",
            "x",
            json!({"plan": "pro", "seq": 1000}),
            false,
            1,
        )])
        .collect();
    let day = 86_400_000;
    let events = (0..6)
        .map(|i| {
            event(
                "acme",
                &(i % 2).to_string(),
                &format!("e{i}"),
                if i < 4 { "click" } else { "purchase" },
                1_700_000_000_000 + (i / 2) * day,
                json!({"amount": i * 5}),
            )
        })
        .chain([event("evil", "x", "e0", "click", 1, json!({"amount": 999}))])
        .collect();
    index
        .write(Arc::new(WriteBatch {
            users,
            events,
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");

    let all = index
        .search("acme", Target::Users, &search("", 10, None))
        .await
        .expect("search");
    assert_eq!(all.total, 4, "only acme's users");

    let pro = index
        .search(
            "acme",
            Target::Users,
            &search("dataFields.plan:pro", 10, None),
        )
        .await
        .expect("search");
    assert_eq!(pro.total, 2);
    assert!(pro.hits.iter().all(|h| h["dataFields"]["plan"] == "pro"));

    let range = index
        .search(
            "acme",
            Target::Users,
            &search("dataFields.seq:[10 TO 20] AND NOT userId:2", 10, None),
        )
        .await
        .expect("search");
    assert_eq!(range.total, 1);
    assert_eq!(range.hits[0]["userId"], "1");
    for (query, expected) in [
        ("NOT userId:2", 3),
        ("dataFields.seq:[10 TO 20] -userId:2", 1),
        (
            "userId:1 OR (dataFields.seq:>=20 AND NOT dataFields.plan:enterprise)",
            2,
        ),
    ] {
        let found = index
            .search("acme", Target::Users, &search(query, 10, None))
            .await
            .expect("search");
        assert_eq!(found.total, expected, "{query}");
    }

    if backend == Backend::Embedded {
        // An extra of the embedded index: a field that is not in the schema is looked up in
        // dataFields (the spec addresses them as `dataFields.x`, which works everywhere).
        let found = index
            .search("acme", Target::Users, &search("plan:pro", 10, None))
            .await
            .expect("search");
        assert_eq!(found.total, 2);
    }

    let words = index
        .search(
            "acme",
            Target::Users,
            &search("dataFields.name:number3", 0, None),
        )
        .await
        .expect("search");
    assert_eq!(
        (words.total, words.hits.len()),
        (1, 0),
        "tokenized text, size 0"
    );

    let aggs = json!({
        "plans": {"terms": {"field": "dataFields.plan"}},
        "seq_avg": {"avg": {"field": "dataFields.seq"}},
        "seq_sum": {"sum": {"field": "dataFields.seq"}},
        "seq_min": {"min": {"field": "dataFields.seq"}},
        "seq_max": {"max": {"field": "dataFields.seq"}},
        "seq_count": {"value_count": {"field": "dataFields.seq"}},
        "distinct_plans": {"cardinality": {"field": "dataFields.plan"}},
        "seq_ranges": {"range": {"field": "dataFields.seq", "ranges": [{"to": 15}, {"from": 15}]}},
    });
    let users = index
        .search("acme", Target::Users, &search("", 0, Some(aggs)))
        .await
        .expect("search");
    let a = users.aggregations.expect("aggregations");
    let buckets: Vec<(String, u64)> = a["plans"]["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| {
            (
                b["key"].as_str().unwrap_or("").to_string(),
                b["doc_count"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(buckets[0], ("pro".to_string(), 2));
    assert_eq!(buckets.len(), 3);
    assert_eq!(a["seq_avg"]["value"].as_f64(), Some(15.0), "seq_avg");
    assert_eq!(a["seq_sum"]["value"].as_f64(), Some(60.0), "seq_sum");
    assert_eq!(a["seq_min"]["value"].as_f64(), Some(0.0), "seq_min");
    assert_eq!(a["seq_max"]["value"].as_f64(), Some(30.0), "seq_max");
    assert_eq!(a["seq_count"]["value"].as_f64(), Some(4.0), "seq_count");
    assert_eq!(
        a["distinct_plans"]["value"].as_f64(),
        Some(3.0),
        "distinct_plans"
    );
    let ranges: Vec<u64> = a["seq_ranges"]["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| b["doc_count"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(ranges, [2, 2]);

    let per_day = json!({"per_day": {"date_histogram": {"field": "createdAt", "fixed_interval": "1d"}},
                         "names": {"terms": {"field": "eventName"}}});
    let events = index
        .search(
            "acme",
            Target::Events,
            &search("eventName:click OR eventName:purchase", 2, Some(per_day)),
        )
        .await
        .expect("search");
    assert_eq!(events.total, 6);
    assert_eq!(events.hits.len(), 2);
    let a = events.aggregations.expect("aggregations");
    let counts: Vec<u64> = a["per_day"]["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| b["doc_count"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(counts, [2, 2, 2]);
    assert_eq!(a["names"]["buckets"][0]["key"], "click");
    assert_eq!(a["names"]["buckets"][0]["doc_count"], 4);

    let dated = index
        .search(
            "acme",
            Target::Events,
            &search("createdAt:[2023-11-15T00:00:00Z TO *]", 10, None),
        )
        .await
        .expect("search");
    assert_eq!(dated.total, 4, "RFC 3339 date ranges");
    index.close().await.expect("close");
}

async fn bad_queries_and_aggregations_are_the_clients_fault(backend: Backend) {
    let store = Store::new(backend);
    let index = store.open().await;
    let mut requests = vec![
        search("dataFields.plan:(pro", 10, None),
        search("", 10, Some(json!({"x": {"terms": {}}}))),
        search(
            "",
            10,
            Some(json!({"x": {"percentile_of_nothing": {"field": "x"}}})),
        ),
        search("", 10, Some(json!(["not", "an", "object"]))),
        search("", 10_001, None),
    ];
    if backend == Backend::Embedded {
        // Elasticsearch takes these: `lenient` query strings match nothing on a value of the
        // wrong type (a bare word must reach numeric dataFields), and the deprecated
        // `interval` still works there.
        requests.extend([
            search("_source:x", 10, None),
            search("createdAt:[yesterday TO *]", 10, None),
            search(
                "",
                10,
                Some(json!({"x": {"date_histogram": {"field": "createdAt", "interval": "30d"}}})),
            ),
        ]);
    }
    for request in requests {
        match index.search("acme", Target::Users, &request).await {
            Err(IndexError::BadRequest(message)) => assert!(!message.is_empty()),
            other => panic!("{request:?} gave {other:?}, expected a bad request"),
        }
    }
    index.close().await.expect("close");
}

async fn an_event_whose_data_fields_is_not_an_object_is_refused_alone(backend: Backend) {
    let store = Store::new(backend);
    let index = store.open().await;
    let mut bad = event("acme", "1", "bad", "click", 1, json!({}));
    bad.data_fields = raw(json!([1, 2]));
    let good = event("acme", "1", "good", "click", 2, json!({"ok": true}));
    let outcome = index
        .write(Arc::new(WriteBatch {
            users: vec![],
            events: vec![bad, good],
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    assert_eq!(outcome.refused.len(), 1);
    assert!(matches!(
        &outcome.refused[0],
        sluice_index::Refused::Event { position: 0, reason } if reason.contains("not a JSON object")
    ));
    assert_eq!(
        count(&*index, "acme", Target::Events).await,
        1,
        "the good event is written"
    );
    index.close().await.expect("close");
}

/// Search servers only (the embedded index has one writer and ignores versions): a profile
/// upsert from the log carries its log position as a version, and one not above the stored
/// version (a replay, or a stale owner's write landing after a newer owner's) is taken as done
/// without touching the profile; a higher one applies.
mod versioned {
    use super::*;

    #[tokio::test]
    async fn opensearch() {
        stale_and_replayed_upserts_do_not_undo_newer_ones(Backend::OpenSearch).await
    }

    #[tokio::test]
    async fn osmem() {
        stale_and_replayed_upserts_do_not_undo_newer_ones(Backend::Osmem).await
    }
}

async fn stale_and_replayed_upserts_do_not_undo_newer_ones(backend: Backend) {
    let store = Store::new(backend);
    let url = match backend {
        Backend::OpenSearch => &opensearch().url,
        _ => &osmem().url,
    };
    let mut config = ElasticIndexConfig::new(url);
    config.prefix = store.prefix.clone();
    let index = ElasticIndex::open(config).await.expect("open index");
    let versioned = |data: Value, at: i64, version: u64| UserUpsert {
        version: Some(version),
        ..upsert("acme", "1", data, false, at)
    };
    let write = |users: Vec<UserUpsert>| {
        let index = &index;
        async move {
            let outcome = index
                .write(Arc::new(WriteBatch {
                    users,
                    events: vec![],
                    forgets: Vec::new(),
                    unseen: false,
                }))
                .await
                .expect("write");
            assert!(outcome.refused.is_empty(), "{:?}", outcome.refused);
        }
    };
    write(vec![versioned(json!({"plan": "pro", "step": 2}), 20, 20)]).await;
    // The stale owner's older write lands late; the replay of the same position lands again.
    write(vec![versioned(json!({"plan": "free", "step": 1}), 10, 10)]).await;
    write(vec![versioned(json!({"plan": "replayed"}), 20, 20)]).await;
    assert_eq!(user_data(&index).await, json!({"plan": "pro", "step": 2}));
    assert_eq!(
        index.stats().superseded_docs.load(Ordering::Relaxed),
        2,
        "both taken as done"
    );
    // Newer positions apply; two of one user in a write fold to the higher version.
    write(vec![
        versioned(json!({"step": 3}), 30, 31),
        versioned(json!({"plan": "enterprise"}), 31, 32),
    ])
    .await;
    assert_eq!(
        user_data(&index).await,
        json!({"plan": "enterprise", "step": 3})
    );
    write(vec![versioned(json!({"plan": "late"}), 30, 31)]).await;
    assert_eq!(
        user_data(&index).await,
        json!({"plan": "enterprise", "step": 3})
    );
}

async fn user_data(index: &ElasticIndex) -> Value {
    index
        .get_user("acme", "u:1")
        .await
        .expect("get")
        .expect("a profile")["dataFields"]
        .clone()
}

async fn an_events_segment_fields_are_stored_beside_it(backend: Backend) {
    let store = Store::new(backend);
    let index = store.open().await;
    let mut e = event("acme", "1", "m1", "page", 1000, json!({"path": "/"}));
    e.segment = Some(raw(json!({
        "context": {"page": {"url": "https://shop.example/"}, "library": {"name": "analytics.js"}},
        "integrations": {"All": true},
        "timestamp": "2024-01-01T00:00:05.000Z",
        "sentAt": 1704067215000_i64,
        "unknown": "ignored",
    })));
    index
        .write(Arc::new(WriteBatch {
            users: vec![],
            events: vec![e],
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    let listed = index.user_events("acme", "u:1", 1).await.expect("list");
    assert_eq!(listed.len(), 1);
    let stored = &listed[0];
    assert_eq!(
        stored["context"],
        json!({"page": {"url": "https://shop.example/"}, "library": {"name": "analytics.js"}})
    );
    assert_eq!(stored["integrations"], json!({"All": true}));
    assert_eq!(stored["timestamp"], json!("2024-01-01T00:00:05.000Z"));
    assert_eq!(stored["sentAt"], json!(1704067215000_i64));
    assert_eq!(
        stored.get("unknown"),
        None,
        "only Segment's fields are kept"
    );
    assert_eq!(stored["createdAt"], json!(1000));
    let found = index
        .search("acme", Target::Events, &search("eventName:page", 10, None))
        .await
        .expect("search");
    assert_eq!(found.hits.len(), 1);
    assert_eq!(found.hits[0]["context"], stored["context"]);
    index.close().await.expect("close");
}

fn forget(org: &str, user: &str, version: u64) -> Forget {
    Forget {
        org: org.into(),
        user_key: format!("u:{user}"),
        version,
    }
}

async fn a_forgotten_user_leaves_no_profile_and_no_event(backend: Backend) {
    let store = Store::new(backend);
    let index = store.open().await;
    let mut first = upsert("acme", "1", json!({"plan": "pro"}), false, 10);
    first.email = Some("ann@x.io".into());
    let users = vec![
        first,
        upsert("acme", "2", json!({"plan": "free"}), false, 11),
        upsert("other", "1", json!({"plan": "org"}), false, 12),
    ];
    let events = vec![
        event("acme", "1", "a1", "click", 100, json!({})),
        event("acme", "1", "a2", "buy", 101, json!({})),
        event("acme", "2", "b1", "click", 102, json!({})),
        event("other", "1", "o1", "click", 103, json!({})),
    ];
    index
        .write(Arc::new(WriteBatch {
            users,
            events,
            forgets: Vec::new(),
            unseen: false,
        }))
        .await
        .expect("write");
    // The user's own latest event goes in the same batch as an earlier forget of another.
    index
        .write(Arc::new(WriteBatch {
            users: vec![],
            events: vec![event("acme", "1", "a3", "view", 104, json!({}))],
            forgets: vec![],
            unseen: false,
        }))
        .await
        .expect("write");
    index
        .write(Arc::new(WriteBatch {
            users: vec![],
            events: vec![],
            forgets: vec![forget("acme", "1", 20)],
            unseen: false,
        }))
        .await
        .expect("forget");
    assert_eq!(index.get_user("acme", "u:1").await.expect("get"), None);
    assert_eq!(
        index
            .get_user_by_email("acme", "ann@x.io")
            .await
            .expect("get"),
        None
    );
    assert_eq!(
        index.user_events("acme", "u:1", 10).await.expect("list"),
        Vec::<Value>::new()
    );
    assert_eq!(
        count(&*index, "acme", Target::Users).await,
        1,
        "user 2 stays"
    );
    assert_eq!(count(&*index, "acme", Target::Events).await, 1, "b1 stays");
    assert!(
        index.get_user("other", "u:1").await.expect("get").is_some(),
        "another org's user 1 stays"
    );
    assert_eq!(count(&*index, "other", Target::Events).await, 1);
    let found = index
        .search("acme", Target::Events, &search("eventName:click", 10, None))
        .await
        .expect("search");
    assert_eq!(found.total, 1);

    // Forgotten and written again in one batch: the forget goes first, the user is new.
    index
        .write(Arc::new(WriteBatch {
            users: vec![upsert("acme", "2", json!({"seen": true}), false, 31)],
            events: vec![event("acme", "2", "b2", "return", 105, json!({}))],
            forgets: vec![forget("acme", "2", 30)],
            unseen: false,
        }))
        .await
        .expect("forget and write");
    let profile = index
        .get_user("acme", "u:2")
        .await
        .expect("get")
        .expect("created anew");
    assert_eq!(profile["dataFields"], json!({"seen": true}), "{profile}");
    assert_eq!(profile["createdAt"], json!(31), "{profile}");
    let listed = index.user_events("acme", "u:2", 10).await.expect("list");
    let ids: Vec<&str> = listed
        .iter()
        .filter_map(|e| e["messageId"].as_str())
        .collect();
    assert_eq!(ids, ["b2"]);
    // Forgetting a user the index never had is done, not an error.
    index
        .write(Arc::new(WriteBatch {
            users: vec![],
            events: vec![],
            forgets: vec![forget("acme", "nobody", 40)],
            unseen: false,
        }))
        .await
        .expect("forget nobody");
    index.close().await.expect("close");
}
