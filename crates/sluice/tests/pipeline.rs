//! The whole stack in one process, as `sluice serve` wires it: the HTTP API on a real port, the
//! embedded log, and the pipeline consuming it into the index. Every test runs twice, by
//! `e2e!`: on the embedded backends (registry, dedup store and tantivy index in a temp dir) and
//! on the shared ones (PostgreSQL registry in a schema of its own, Redis dedup under a key
//! prefix of its own, OpenSearch index — a real osmem-server — under an index prefix of its
//! own). Everything is checked through the HTTP read and search routes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::client::{Connection, Reply};
use sluice_api::{ApiConfig, AppState};
use sluice_dedup::{Dedup, EmbeddedDedup, RedisDedup, RedisDedupConfig};
use sluice_index::{ElasticIndex, ElasticIndexConfig, Index};
use sluice_log::{EmbeddedLog, EmbeddedLogConfig, Log};
use sluice_pipeline::batch::BatchConfig;
use sluice_pipeline::validate::Validator;
use sluice_pipeline::{
    Action, Dispatcher, DispatcherConfig, Pipeline, PipelineConfig, PipelineError, PipelineStats,
    Rule, Triggers,
};
use sluice_registry::testing::Schema;
use sluice_registry::{PostgresRegistry, Registry, SqliteRegistry};
use sluice_spill::Bridge;

mod support;

/// Which registry, dedup store and index a stack runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backends {
    Embedded,
    Shared,
}

macro_rules! e2e {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Backends::Embedded).await
            })*
        }
        mod shared {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Backends::Shared).await
            })*
        }
    };
}

e2e!(
    posted_updates_and_events_become_readable_and_searchable,
    a_thousand_ordered_updates_per_user_end_at_the_last_value,
    deep_and_shallow_merges_follow_the_spec,
    reposting_the_same_message_ids_changes_nothing,
    banned_users_are_dead_lettered_and_the_rest_is_indexed,
    documents_the_index_refuses_are_dead_lettered_and_not_marked_processed,
    a_failing_index_is_retried_and_nothing_is_committed_past_it,
    users_named_like_routes_are_readable_and_wrong_methods_are_json_405,
    triggers_fire_once_per_event_with_the_profile_at_that_event,
    a_panicking_stage_stops_the_stream_and_a_restart_completes_the_work,
    a_copy_read_while_its_batch_is_written_is_a_duplicate,
);

/// A pipeline's or a dispatcher's task.
type Task = tokio::task::JoinHandle<Result<(), PipelineError>>;

struct Stack {
    addr: std::net::SocketAddr,
    key: String,
    registry: Arc<dyn Registry>,
    index: Arc<dyn Index>,
    log: Arc<EmbeddedLog>,
    /// The dead-letter log.
    dlq: Arc<EmbeddedLog>,
    stats: Arc<PipelineStats>,
    stop: sluice_pipeline::Stopper,
    pipeline: tokio::task::JoinHandle<Result<(), PipelineError>>,
    /// Builds another pipeline on the same backends (a restart).
    build: Box<dyn Fn() -> Arc<Pipeline> + Send + Sync>,
    /// The dispatcher of webhook actions (when a rule is a webhook), and its stop; it runs on
    /// across pipeline restarts.
    dispatcher: Option<(sluice_pipeline::Stopper, Task)>,
    _dir: tempfile::TempDir,
    /// The shared backends' test namespaces, removed on drop.
    _schema: Option<Schema>,
    _keys: Option<support::RedisKeys>,
}

impl Stack {
    async fn start(backends: Backends) -> Stack {
        Stack::start_with(backends, |index| index).await
    }

    /// A stack whose pipeline writes through `wrap(index)` (reads use the index directly).
    async fn start_with(
        backends: Backends,
        wrap: impl FnOnce(Arc<dyn Index>) -> Arc<dyn Index>,
    ) -> Stack {
        Stack::start_full(backends, wrap, Triggers::default()).await
    }

    /// `start_with`, and the pipeline fires these triggers; webhook actions go through an
    /// actions log of the stack's own and a dispatcher, as in `sluice serve`.
    async fn start_full(
        backends: Backends,
        wrap: impl FnOnce(Arc<dyn Index>) -> Arc<dyn Index>,
        triggers: Triggers,
    ) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(
            EmbeddedLog::open(&dir.path().join("log"), EmbeddedLogConfig::default()).expect("log"),
        );
        let one_partition = |name: &str| {
            Arc::new(
                EmbeddedLog::open(
                    &dir.path().join(name),
                    EmbeddedLogConfig {
                        partitions: 1,
                        ..EmbeddedLogConfig::default()
                    },
                )
                .expect("a log of one partition"),
            )
        };
        let dlq = one_partition("dlq");
        let mut dispatcher = None;
        let triggers = if triggers.has_webhooks() {
            let actions: Arc<dyn Log> = one_partition("actions");
            let triggers = triggers.with_actions_log(Arc::clone(&actions));
            let (stop, stop_rx) = sluice_pipeline::stop::channel();
            let task = tokio::spawn(
                Dispatcher::new(
                    actions,
                    Arc::clone(&dlq) as Arc<dyn Log>,
                    triggers.clone(),
                    DispatcherConfig::default(),
                )
                .run(stop_rx),
            );
            dispatcher = Some((stop, task));
            triggers
        } else {
            triggers
        };
        let (mut schema, mut keys) = (None, None);
        let (registry, dedup, index): (Arc<dyn Registry>, Arc<dyn Dedup>, Arc<dyn Index>) =
            match backends {
                Backends::Embedded => (
                    Arc::new(
                        SqliteRegistry::open(&dir.path().join("registry.db"))
                            .await
                            .expect("registry"),
                    ),
                    Arc::new(
                        EmbeddedDedup::open(
                            &dir.path().join("dedup"),
                            sluice_dedup::DEFAULT_WINDOW,
                        )
                        .expect("dedup"),
                    ),
                    support::embedded_index(dir.path()),
                ),
                Backends::Shared => {
                    let pg = Schema::create();
                    let registry = PostgresRegistry::connect(&pg.url())
                        .await
                        .expect("PostgreSQL registry");
                    schema = Some(pg);
                    let prefix = support::RedisKeys::new("e2e");
                    let mut config =
                        RedisDedupConfig::new(support::redis_url(), sluice_dedup::DEFAULT_WINDOW);
                    config.prefix = prefix.0.clone();
                    keys = Some(prefix);
                    let dedup = RedisDedup::connect(config).await.expect("Redis dedup");
                    let mut config = ElasticIndexConfig::new(&support::opensearch().url);
                    config.prefix = format!("e2e-{}-{}", std::process::id(), support::unique());
                    // The tests search as soon as a batch is processed: each bulk write asks
                    // for a refresh (a cluster otherwise shows writes to search within its
                    // refresh interval, 1 s).
                    config.refresh_writes = true;
                    let index = ElasticIndex::open(config).await.expect("OpenSearch index");
                    (Arc::new(registry), Arc::new(dedup), Arc::new(index))
                }
            };
        let key = sluice_registry::bootstrap(registry.as_ref())
            .await
            .expect("bootstrap")
            .expect("first key");
        let build = {
            let (log, dlq, registry) = (
                Arc::clone(&log) as Arc<dyn Log>,
                Arc::clone(&dlq) as Arc<dyn Log>,
                Arc::clone(&registry),
            );
            let write_index = wrap(Arc::clone(&index));
            move || {
                Pipeline::new(
                    Arc::clone(&log),
                    Arc::clone(&dlq),
                    Validator::new(Arc::clone(&registry), Duration::from_millis(50)),
                    Arc::clone(&dedup),
                    Arc::clone(&write_index),
                    PipelineConfig {
                        batch: BatchConfig {
                            max_records: 5000,
                            timeout: Duration::from_millis(20),
                        },
                        triggers: triggers.clone(),
                        ..PipelineConfig::default()
                    },
                )
            }
        };
        let pipeline = build();
        let stats = pipeline.stats();
        let (stop, stop_rx) = sluice_pipeline::stop::channel();
        let pipeline = tokio::spawn(pipeline.run(stop_rx));
        let state = AppState::new(
            Bridge::without_spill(Arc::clone(&log) as Arc<dyn Log>, Duration::from_secs(5)),
            Arc::clone(&registry),
            Some(Arc::clone(&index)),
            &ApiConfig::default(),
        );
        let addr = support::spawn_api(state).await;
        Stack {
            addr,
            key,
            registry,
            index,
            log,
            dlq,
            stats,
            stop,
            pipeline,
            build: Box::new(build),
            dispatcher,
            _dir: dir,
            _schema: schema,
            _keys: keys,
        }
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.post_as(&self.key, path, body).await
    }

    async fn post_as(&self, key: &str, path: &str, body: Value) -> Reply {
        let mut conn = Connection::connect(self.addr).await.expect("connect");
        conn.post(path, &[("api-key", key)], body.to_string().into())
            .await
            .expect("request")
    }

    async fn get(&self, path: &str) -> Reply {
        self.get_as(&self.key, path).await
    }

    async fn get_as(&self, key: &str, path: &str) -> Reply {
        let mut conn = Connection::connect(self.addr).await.expect("connect");
        conn.get(path, &[("api-key", key)]).await.expect("request")
    }

    /// Records appended to the log so far.
    fn log_end(&self) -> u64 {
        (0..self.log.partitions())
            .map(|p| self.log.read(p, 0, usize::MAX).expect("read").len() as u64)
            .sum()
    }

    /// Waits until the pipeline has read and finished every record in the log.
    async fn wait_processed(&self) {
        let end = self.log_end();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done = self.stats.records.load(Ordering::Relaxed);
            let batches_idle = done >= end;
            if batches_idle {
                // `records` counts a batch when it starts; its write and commit may still be
                // running. A second look after the batch window settles it.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if self.stats.records.load(Ordering::Relaxed) == done && self.committed() >= end {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the pipeline processed {done} of {end} records within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sum over partitions of the pipeline group's committed offsets.
    fn committed(&self) -> u64 {
        (0..self.log.partitions())
            .map(|p| {
                self.log
                    .committed("sluice-pipeline", p)
                    .expect("committed offset")
                    .unwrap_or(0)
            })
            .sum()
    }

    async fn search(&self, target: &str, body: Value) -> Value {
        let r = self.post(&format!("/api/search/{target}"), body).await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        r.json()
    }

    /// Starts a new pipeline on the same backends, as a restarted process would, once the
    /// running one ended (the test awaited `self.pipeline`).
    fn restart_pipeline(&mut self) {
        assert!(self.pipeline.is_finished(), "the pipeline still runs");
        let (stop, stop_rx) = sluice_pipeline::stop::channel();
        let pipeline = (self.build)();
        self.stats = pipeline.stats();
        self.pipeline = tokio::spawn(pipeline.run(stop_rx));
        self.stop = stop;
    }

    /// Waits until every partition is committed to the end of the log.
    async fn wait_committed(&self) {
        let end = self.log_end();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.committed() < end {
            assert!(
                Instant::now() < deadline,
                "committed {} of {end} records within 60 s",
                self.committed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.stop.stop();
        self.pipeline
            .await
            .expect("pipeline task")
            .expect("pipeline stops cleanly");
        if let Some((stop, task)) = self.dispatcher {
            stop.stop();
            task.await
                .expect("dispatcher task")
                .expect("dispatcher stops cleanly");
        }
        self.index.close().await.expect("close index");
        self.log.close().await.expect("close log");
    }
}

/// Waits up to 30 s for `done`, polling.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn posted_updates_and_events_become_readable_and_searchable(backends: Backends) {
    let stack = Stack::start(backends).await;
    for (user, plan, email) in [("1", "pro", "Ann@X.io"), ("2", "free", "bob@x.io")] {
        let r = stack
            .post(
                "/api/users/update",
                json!({"userId": user, "email": email, "dataFields": {"plan": plan, "age": 30}}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    let events: Vec<Value> = (0..5)
        .map(|i| json!({"userId": "1", "eventName": if i < 3 {"click"} else {"purchase"}, "id": format!("ev{i}"), "createdAt": 1_700_000_000 + i, "dataFields": {"amount": i * 10}}))
        .collect();
    let r = stack
        .post("/api/events/trackBulk", json!({ "events": events }))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    stack.wait_processed().await;

    let profile = stack.get("/api/users/1").await;
    assert_eq!(profile.status, 200);
    let profile = profile.json();
    assert_eq!(profile["dataFields"], json!({"plan": "pro", "age": 30}));
    assert_eq!(profile["email"], "ann@x.io");
    let by_email = stack.get("/api/users/by-email/ANN@x.io").await;
    assert_eq!(by_email.status, 200);
    assert_eq!(by_email.json()["userId"], "1");
    let missing = stack.get("/api/users/nobody").await;
    assert_eq!(missing.status, 404);
    assert!(
        missing.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("nobody")
    );

    let listed = stack.get("/api/users/1/events?limit=2").await;
    assert_eq!(listed.status, 200);
    let ids: Vec<String> = listed.json()["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["messageId"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(ids, ["ev4", "ev3"], "newest first");
    assert_eq!(stack.get("/api/users/1/events?limit=x").await.status, 400);

    let found = stack
        .search(
            "users",
            json!({"query": "dataFields.plan:pro AND dataFields.age:[18 TO 40]"}),
        )
        .await;
    assert_eq!(found["total"], 1);
    assert_eq!(found["hits"][0]["userId"], "1");

    let aggs = stack
        .search(
            "events",
            json!({"query": "", "size": 0, "aggs": {
                "names": {"terms": {"field": "eventName"}},
                "spent": {"sum": {"field": "dataFields.amount"}},
            }}),
        )
        .await;
    assert_eq!(aggs["total"], 5);
    assert_eq!(aggs["hits"], json!([]));
    assert_eq!(aggs["aggregations"]["spent"]["value"], json!(100.0));
    assert_eq!(aggs["aggregations"]["names"]["buckets"][0]["key"], "click");

    let bad = stack
        .post("/api/search/users", json!({"query": "plan:(pro"}))
        .await;
    assert_eq!(bad.status, 400, "{:?}", bad.json());
    let bad = stack.post("/api/search/users", json!({"qeury": "x"})).await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap_or("").contains("qeury"));
    let unauthorized = stack.get_as("nope", "/api/users/1").await;
    assert_eq!(unauthorized.status, 401);

    // Another org sees none of it.
    stack.registry.create_org("other").await.expect("org");
    let other_key = stack.registry.create_key("other").await.expect("key");
    assert_eq!(stack.get_as(&other_key, "/api/users/1").await.status, 404);
    let r = stack
        .post_as(&other_key, "/api/search/events", json!({}))
        .await;
    assert_eq!(r.json()["total"], 0);
    stack.stop().await;
}

async fn a_thousand_ordered_updates_per_user_end_at_the_last_value(backends: Backends) {
    let stack = Arc::new(Stack::start(backends).await);
    const USERS_PER_CLIENT: usize = 8;
    const CLIENTS: usize = 5;
    const UPDATES: usize = 1000;
    // Each client owns its users and sends their updates in order, in bulk requests that
    // interleave users and carry an event after every tenth update.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let stack = Arc::clone(&stack);
            tokio::spawn(async move {
                let mut events = 0;
                for chunk in 0..UPDATES / 50 {
                    let mut users = Vec::new();
                    let mut tracked = Vec::new();
                    for seq in chunk * 50..(chunk + 1) * 50 {
                        for u in 0..USERS_PER_CLIENT {
                            let user = format!("c{c}-u{u}");
                            users.push(json!({"userId": user, "dataFields": {"seq": seq, "last": {"by": c}}}));
                            if seq % 10 == 0 {
                                tracked.push(json!({"userId": user, "eventName": "tick", "dataFields": {"seq": seq}}));
                            }
                        }
                    }
                    let r = stack.post("/api/users/bulkUpdate", json!({ "users": users })).await;
                    assert_eq!(r.status, 200);
                    events += tracked.len();
                    let r = stack.post("/api/events/trackBulk", json!({ "events": tracked })).await;
                    assert_eq!(r.status, 200);
                }
                events
            })
        })
        .collect();
    let mut events = 0;
    for c in clients {
        events += c.await.expect("client");
    }
    stack.wait_processed().await;
    for c in 0..CLIENTS {
        for u in 0..USERS_PER_CLIENT {
            let profile = stack.get(&format!("/api/users/c{c}-u{u}")).await.json();
            assert_eq!(
                profile["dataFields"],
                json!({"seq": UPDATES - 1, "last": {"by": c}}),
                "c{c}-u{u}"
            );
        }
    }
    let users = stack.search("users", json!({"size": 0})).await;
    assert_eq!(users["total"], CLIENTS * USERS_PER_CLIENT);
    let found = stack.search("events", json!({"size": 0})).await;
    assert_eq!(found["total"], events);
    let partitions: std::collections::HashSet<u32> = (0..CLIENTS)
        .flat_map(|c| (0..USERS_PER_CLIENT).map(move |u| format!("default:u:c{c}-u{u}")))
        .map(|key| sluice_model::partition_for_key(key.as_bytes(), 8))
        .collect();
    assert!(
        partitions.len() >= 6,
        "users spread over partitions: {partitions:?}"
    );
    let stats = Arc::try_unwrap(stack).ok().expect("clients are done");
    assert!(
        stats.stats.users_upserted.load(Ordering::Relaxed)
            < (CLIENTS * USERS_PER_CLIENT * UPDATES) as u64,
        "updates of a user within a batch were folded"
    );
    stats.stop().await;
}

async fn deep_and_shallow_merges_follow_the_spec(backends: Backends) {
    let stack = Stack::start(backends).await;
    let steps = [
        json!({"userId": "m", "dataFields": {"address": {"city": "Paris", "zip": "75001"}, "plan": "free"}}),
        // Deep: merges into address, keeps zip.
        json!({"userId": "m", "dataFields": {"address": {"city": "Lyon"}}, "mergeNestedObjects": true}),
        // Shallow: replaces tags and keeps the rest.
        json!({"userId": "m", "dataFields": {"tags": {"a": 1}}}),
        json!({"userId": "m", "dataFields": {"tags": {"b": 2}}}),
    ];
    for step in &steps {
        assert_eq!(
            stack.post("/api/users/update", step.clone()).await.status,
            200
        );
    }
    // The same four again, in one bulk request: folded in one batch, same result.
    let bulk: Vec<Value> = steps
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s["userId"] = json!("n");
            s
        })
        .collect();
    assert_eq!(
        stack
            .post("/api/users/bulkUpdate", json!({ "users": bulk }))
            .await
            .status,
        200
    );
    stack.wait_processed().await;
    let expected =
        json!({"address": {"city": "Lyon", "zip": "75001"}, "plan": "free", "tags": {"b": 2}});
    for user in ["m", "n"] {
        let profile = stack.get(&format!("/api/users/{user}")).await.json();
        assert_eq!(profile["dataFields"], expected, "{user}");
    }
    stack.stop().await;
}

/// Totals and every document (sorted JSON text) of both indexes.
async fn snapshot(stack: &Stack) -> (Value, Value, Vec<String>) {
    let users = stack.search("users", json!({"size": 100})).await;
    let events = stack.search("events", json!({"size": 100})).await;
    let mut all: Vec<String> = users["hits"]
        .as_array()
        .into_iter()
        .chain(events["hits"].as_array())
        .flatten()
        .map(Value::to_string)
        .collect();
    all.sort();
    (users["total"].clone(), events["total"].clone(), all)
}

async fn reposting_the_same_message_ids_changes_nothing(backends: Backends) {
    let stack = Stack::start(backends).await;
    let users: Vec<Value> = (0..20)
        .map(|i| json!({"userId": format!("u{i}"), "id": format!("up{i}"), "dataFields": {"n": i}}))
        .collect();
    let events: Vec<Value> = (0..50)
        .map(|i| json!({"userId": format!("u{}", i % 20), "eventName": "e", "id": format!("ev{i}"), "dataFields": {"n": i}}))
        .collect();
    let post_all = || async {
        assert_eq!(
            stack
                .post("/api/users/bulkUpdate", json!({ "users": users }))
                .await
                .status,
            200
        );
        assert_eq!(
            stack
                .post("/api/events/trackBulk", json!({ "events": events }))
                .await
                .status,
            200
        );
    };
    post_all().await;
    stack.wait_processed().await;
    let before = snapshot(&stack).await;
    assert_eq!((before.0.clone(), before.1.clone()), (json!(20), json!(50)));

    // The same ids again, twice, with different content: all dropped as duplicates.
    post_all().await;
    let changed: Vec<Value> = (0..20)
        .map(
            |i| json!({"userId": format!("u{i}"), "id": format!("up{i}"), "dataFields": {"n": -1}}),
        )
        .collect();
    assert_eq!(
        stack
            .post("/api/users/bulkUpdate", json!({ "users": changed }))
            .await
            .status,
        200
    );
    stack.wait_processed().await;
    assert_eq!(snapshot(&stack).await, before);
    assert_eq!(stack.stats.duplicates.load(Ordering::Relaxed), 90);
    stack.stop().await;
}

async fn banned_users_are_dead_lettered_and_the_rest_is_indexed(backends: Backends) {
    let stack = Stack::start(backends).await;
    stack
        .registry
        .ban_user("default", "bad")
        .await
        .expect("ban");
    let events: Vec<Value> = ["good", "bad", "good"]
        .iter()
        .enumerate()
        .map(|(i, u)| json!({"userId": u, "eventName": "e", "id": format!("x{i}")}))
        .collect();
    assert_eq!(
        stack
            .post("/api/events/trackBulk", json!({ "events": events }))
            .await
            .status,
        200
    );
    // And a record another producer put on the log that is no sluice message at all.
    stack
        .log
        .append(vec![sluice_log::Record {
            key: b"default:u:good".to_vec(),
            value: b"{\"v\":1,\"kind\":\"event\",\"org\":\"default\"".to_vec(),
            timestamp_ms: 0,
        }])
        .await
        .expect("append");
    stack.wait_processed().await;
    assert_eq!(stack.stats.dead_letters.load(Ordering::Relaxed), 2);
    // The dead letters are durable, with the original message, the stage and the reason.
    let dead = stack.dlq.read(0, 0, 10).expect("read the dead-letter log");
    assert_eq!(dead.len(), 2);
    let letters: Vec<Value> = dead
        .iter()
        .map(|d| serde_json::from_slice(&d.value).expect("JSON"))
        .collect();
    // Partitions run in parallel: the two letters come in either order.
    let (at, invalid) = letters
        .iter()
        .enumerate()
        .find(|(_, l)| l["messageId"].is_null())
        .expect("the invalid record's letter");
    assert_eq!(invalid["stage"], "validate");
    assert!(
        invalid["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("not a sluice log record")),
        "{invalid}"
    );
    assert_eq!(
        invalid["record"],
        "{\"v\":1,\"kind\":\"event\",\"org\":\"default\""
    );
    assert_eq!(&dead[1 - at].key[..], b"default:u:bad");
    let letter = &letters[1 - at];
    assert_eq!(letter["stage"], "validate");
    assert_eq!(letter["messageId"], "x1");
    assert_eq!(letter["org"], "default");
    assert_eq!(letter["record"]["userId"], "bad");
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("banned")),
        "{letter}"
    );
    let found = stack.search("events", json!({})).await;
    assert_eq!(found["total"], 2);
    assert_eq!(
        stack.get("/api/users/bad/events").await.json()["events"],
        json!([])
    );
    stack.stop().await;
}

/// The real index behind a switch that makes every write fail with a storage error, as a
/// full disk would. It also refuses, as a mapping conflict would, the profile of user
/// `refused` and events whose id starts with `refused-`, and writes the rest.
struct FailingWrites {
    inner: Arc<dyn Index>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    /// While set, a write holding event `boom` panics, as a bug in a stage would.
    panicking: Arc<std::sync::atomic::AtomicBool>,
    /// How long each write waits before it goes to the index, as a busy search server's would.
    slow: Duration,
}

const INJECTED_REFUSAL: &str = "injected: mapper_parsing_exception";

#[async_trait::async_trait]
impl Index for FailingWrites {
    async fn write(
        &self,
        batch: Arc<sluice_index::WriteBatch>,
    ) -> Result<sluice_index::WriteOutcome, sluice_index::IndexError> {
        use sluice_index::Refused;
        tokio::time::sleep(self.slow).await;
        if self.panicking.load(Ordering::SeqCst)
            && batch.events.iter().any(|e| e.message_id == "boom")
        {
            panic!("injected: a bug met event boom");
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(sluice_index::IndexError::Storage {
                path: "test".into(),
                message: "injected: no space left on device".into(),
            });
        }
        let mut kept = sluice_index::WriteBatch::default();
        let mut refused = Vec::new();
        for (position, user) in batch.users.iter().enumerate() {
            if user.user_key == "u:refused" {
                let reason = INJECTED_REFUSAL.to_string();
                refused.push(Refused::User { position, reason });
            } else {
                kept.users.push(user.clone());
            }
        }
        for (position, event) in batch.events.iter().enumerate() {
            if event.message_id.starts_with("refused-") {
                let reason = INJECTED_REFUSAL.to_string();
                refused.push(Refused::Event { position, reason });
            } else {
                kept.events.push(event.clone());
            }
        }
        let mut outcome = self.inner.write(Arc::new(kept)).await?;
        assert!(outcome.refused.is_empty(), "{:?}", outcome.refused);
        outcome.refused = refused;
        Ok(outcome)
    }
    async fn get_user(
        &self,
        org: &str,
        user_key: &str,
    ) -> Result<Option<Value>, sluice_index::IndexError> {
        self.inner.get_user(org, user_key).await
    }
    async fn get_user_by_email(
        &self,
        org: &str,
        email: &str,
    ) -> Result<Option<Value>, sluice_index::IndexError> {
        self.inner.get_user_by_email(org, email).await
    }
    async fn user_events(
        &self,
        org: &str,
        user_key: &str,
        limit: usize,
    ) -> Result<Vec<Value>, sluice_index::IndexError> {
        self.inner.user_events(org, user_key, limit).await
    }
    async fn search(
        &self,
        org: &str,
        target: sluice_index::Target,
        request: &sluice_index::SearchRequest,
    ) -> Result<sluice_index::SearchResponse, sluice_index::IndexError> {
        self.inner.search(org, target, request).await
    }
    async fn close(&self) -> Result<(), sluice_index::IndexError> {
        self.inner.close().await
    }
}

async fn documents_the_index_refuses_are_dead_lettered_and_not_marked_processed(
    backends: Backends,
) {
    let stack = Stack::start_with(backends, move |inner| {
        Arc::new(FailingWrites {
            inner,
            failing: Arc::default(),
            panicking: Arc::default(),
            slow: Duration::ZERO,
        }) as Arc<dyn Index>
    })
    .await;
    let posts = [
        (
            "/api/users/update",
            json!({"userId": "refused", "id": "up-1", "dataFields": {"a": 1}}),
        ),
        (
            "/api/users/update",
            json!({"userId": "refused", "id": "up-2", "dataFields": {"b": 2}}),
        ),
        (
            "/api/events/track",
            json!({"userId": "good", "eventName": "e", "id": "refused-1"}),
        ),
        (
            "/api/events/track",
            json!({"userId": "good", "eventName": "e", "id": "ok-1"}),
        ),
    ];
    for (path, body) in &posts {
        assert_eq!(stack.post(path, body.clone()).await.status, 200);
    }
    stack.wait_processed().await;
    let letters = |stack: &Stack| -> Vec<Value> {
        stack
            .dlq
            .read(0, 0, 100)
            .expect("read the dead-letter log")
            .iter()
            .map(|r| serde_json::from_slice(&r.value).expect("JSON"))
            .collect()
    };
    let dead = letters(&stack);
    // Both updates folded into the refused profile are dead letters, and the refused event.
    let mut ids: Vec<&str> = dead
        .iter()
        .filter_map(|l| l["messageId"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["refused-1", "up-1", "up-2"], "{dead:?}");
    for letter in &dead {
        assert_eq!(letter["stage"], "index", "{letter}");
        assert!(
            letter["reason"]
                .as_str()
                .is_some_and(|r| r.contains(INJECTED_REFUSAL)),
            "{letter}"
        );
    }
    assert_eq!(stack.stats.dead_letters.load(Ordering::Relaxed), 3);
    let events = stack.get("/api/users/good/events").await.json();
    assert_eq!(
        events["events"].as_array().map(Vec::len),
        Some(1),
        "{events}"
    );
    // Not marked processed: the same message again is processed again (and refused again),
    // where a processed one would be dropped as a duplicate.
    let (path, body) = &posts[2];
    assert_eq!(stack.post(path, body.clone()).await.status, 200);
    stack.wait_processed().await;
    assert_eq!(letters(&stack).len(), 4);
    assert_eq!(stack.stats.duplicates.load(Ordering::Relaxed), 0);
    stack.stop().await;
}

async fn a_failing_index_is_retried_and_nothing_is_committed_past_it(backends: Backends) {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let switch = Arc::clone(&failing);
    let stack = Stack::start_with(backends, move |inner| {
        Arc::new(FailingWrites {
            inner,
            failing: switch,
            panicking: Arc::default(),
            slow: Duration::ZERO,
        }) as Arc<dyn Index>
    })
    .await;
    let events: Vec<Value> = (0..10)
        .map(|i| json!({"userId": format!("u{i}"), "eventName": "e", "id": format!("f{i}")}))
        .collect();
    let r = stack
        .post("/api/events/trackBulk", json!({ "events": events }))
        .await;
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.stats.retries.load(Ordering::Relaxed) < 3 {
        assert!(Instant::now() < deadline, "the failing write is retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        stack.committed(),
        0,
        "no offset is committed while the index fails"
    );
    assert_eq!(stack.search("events", json!({})).await["total"], 0);

    failing.store(false, Ordering::SeqCst);
    stack.wait_processed().await;
    assert_eq!(stack.search("events", json!({})).await["total"], 10);
    assert_eq!(stack.committed(), 10);
    stack.stop().await;
}

async fn users_named_like_routes_are_readable_and_wrong_methods_are_json_405(backends: Backends) {
    let stack = Stack::start(backends).await;
    for name in ["update", "bulkUpdate"] {
        let r = stack
            .post(
                "/api/users/update",
                json!({"userId": name, "dataFields": {"name": name}}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    stack.wait_processed().await;
    for name in ["update", "bulkUpdate"] {
        let r = stack.get(&format!("/api/users/{name}")).await;
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(r.json()["dataFields"]["name"], name);
    }
    let r = stack.get("/api/events/track").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["code"], "MethodNotAllowed");
    assert!(r.json()["error"].as_str().unwrap_or("").contains("GET"));
    stack.stop().await;
}

/// SPEC §6 step 7: a webhook rule (its target fails once per key, then takes it), a topic rule,
/// and a rule whose target refuses. Each action fires once per event even when the event is
/// posted again; the payload's profile is the one at the event, not after later updates; the
/// refused action is a dead letter with its payload.
async fn triggers_fire_once_per_event_with_the_profile_at_that_event(backends: Backends) {
    let receiver = support::WebhookReceiver::start(Duration::ZERO).await;
    let actions_dir = tempfile::tempdir().expect("tempdir");
    let actions = Arc::new(
        EmbeddedLog::open(
            actions_dir.path(),
            EmbeddedLogConfig {
                partitions: 1,
                ..EmbeddedLogConfig::default()
            },
        )
        .expect("actions log"),
    );
    let webhook = |path: &str| Action::Webhook(receiver.url(path).parse().expect("url"));
    let rules = vec![
        Rule {
            name: "welcome".into(),
            event: "signedUp".into(),
            action: webhook("/flaky"),
        },
        Rule {
            name: "crm".into(),
            event: "signedUp".into(),
            action: Action::Topic {
                topic: "sluice.actions".into(),
                log: Arc::clone(&actions) as Arc<dyn Log>,
            },
        },
        Rule {
            name: "nudge".into(),
            event: "abandoned".into(),
            action: webhook("/refuse"),
        },
    ];
    let stack = Stack::start_full(backends, |index| index, Triggers::new(rules)).await;
    let ok = |r: Reply| assert_eq!(r.status, 200, "{:?}", r.json());
    // ann: a profile, the signup, then a later update (not in the signup's payload).
    ok(stack
        .post(
            "/api/users/update",
            json!({"userId": "ann", "email": "ann@example.com", "dataFields": {"plan": "free", "name": "Ann"}}),
        )
        .await);
    ok(stack
        .post(
            "/api/events/track",
            json!({"userId": "ann", "eventName": "signedUp", "id": "s1", "dataFields": {"source": "ad"}}),
        )
        .await);
    ok(stack
        .post(
            "/api/users/update",
            json!({"userId": "ann", "dataFields": {"plan": "pro", "coupon": "X"}}),
        )
        .await);
    // bob signs up with no profile; cid abandons a cart (its target refuses).
    ok(stack
        .post(
            "/api/events/trackBulk",
            json!({"events": [
                {"userId": "bob", "eventName": "signedUp", "id": "s2"},
                {"userId": "cid", "eventName": "abandoned", "id": "a1"},
                {"userId": "cid", "eventName": "other", "id": "o1"},
            ]}),
        )
        .await);
    stack.wait_processed().await;
    // Posted again: dropped as duplicates, nothing fires again.
    ok(stack
        .post(
            "/api/events/trackBulk",
            json!({"events": [
                {"userId": "ann", "eventName": "signedUp", "id": "s1"},
                {"userId": "bob", "eventName": "signedUp", "id": "s2"},
            ]}),
        )
        .await);
    stack.wait_processed().await;
    // The dispatcher delivers from the actions log: two welcomes (a 503, then the 200) and
    // the refused nudge, which becomes a dead letter.
    until("the dispatcher's calls and dead letter", || {
        receiver.raw_count() >= 5 && !stack.dlq.read(0, 0, 10).expect("dlq").is_empty()
    })
    .await;

    let calls = receiver.calls();
    let welcome: Vec<_> = calls.iter().filter(|c| c.path == "/flaky").collect();
    assert_eq!(
        welcome.len(),
        4,
        "each welcome: one 503, retried, one 200: {calls:#?}"
    );
    let distinct = receiver.distinct();
    let s1 = &distinct["default:s1:welcome"].body;
    assert_eq!(s1["rule"], "welcome");
    assert_eq!(s1["idempotencyKey"], "default:s1:welcome");
    assert_eq!(s1["event"]["eventName"], "signedUp");
    assert_eq!(s1["event"]["messageId"], "s1");
    assert_eq!(s1["event"]["dataFields"], json!({"source": "ad"}));
    assert_eq!(s1["profile"]["userId"], "ann");
    assert_eq!(s1["profile"]["email"], "ann@example.com");
    assert_eq!(
        s1["profile"]["dataFields"],
        json!({"plan": "free", "name": "Ann"}),
        "the profile at the signup, not after the later update"
    );
    let s2 = &distinct["default:s2:welcome"].body;
    assert_eq!(s2["profile"], Value::Null, "bob had no profile");
    assert_eq!(s2["event"]["userId"], "bob");
    for call in &welcome {
        let key = call.idempotency_key.as_deref().expect("Idempotency-Key");
        assert_eq!(
            call.body, distinct[key].body,
            "a retry sends the same payload"
        );
    }

    // The topic rule: one record per signup, keyed like the event, same payload shape.
    let records = actions.read(0, 0, 100).expect("read the actions log");
    assert_eq!(records.len(), 2, "{records:?}");
    // ann and bob are on different partitions: their records come in either order.
    let of = |key: &[u8]| -> Value {
        let record = records
            .iter()
            .find(|r| &r.key[..] == key)
            .unwrap_or_else(|| panic!("no action record keyed {key:?}"));
        serde_json::from_slice(&record.value).expect("JSON")
    };
    let crm = of(b"default:u:ann");
    assert_eq!(crm["idempotencyKey"], "default:s1:crm");
    assert_eq!(crm["profile"]["dataFields"], s1["profile"]["dataFields"]);
    assert_eq!(of(b"default:u:bob")["idempotencyKey"], "default:s2:crm");

    // The refused action: asked once, then a dead letter carrying the rule and the payload.
    let refused: Vec<_> = calls.iter().filter(|c| c.path == "/refuse").collect();
    assert_eq!(refused.len(), 1, "a 4xx is not retried");
    let dead = stack.dlq.read(0, 0, 10).expect("read the dead-letter log");
    assert_eq!(dead.len(), 1);
    let letter: Value = serde_json::from_slice(&dead[0].value).expect("JSON");
    assert_eq!(letter["stage"], "trigger");
    assert_eq!(letter["rule"], "nudge");
    assert_eq!(letter["messageId"], "a1");
    assert_eq!(letter["action"]["idempotencyKey"], "default:a1:nudge");
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("400") && r.contains("no such template")),
        "{letter}"
    );
    assert_eq!(stack.stats.actions_fired.load(Ordering::Relaxed), 5);
    // The profile itself moved on.
    let ann = stack.get("/api/users/ann").await.json();
    assert_eq!(ann["dataFields"]["plan"], "pro");
    stack.stop().await;
}

/// SPEC §6 "unknown" errors: a panic in a stage stops the pipeline with the partition, the
/// batch's offsets and message ids; nothing of the batch is committed. A restarted pipeline
/// on the same backends completes the work: every event indexed once, every action fired
/// once (the receiver sees no repeated key).
async fn a_panicking_stage_stops_the_stream_and_a_restart_completes_the_work(backends: Backends) {
    let receiver = support::WebhookReceiver::start(Duration::ZERO).await;
    let welcome = Rule {
        name: "welcome".into(),
        event: "signedUp".into(),
        action: Action::Webhook(receiver.url("/ok").parse().expect("url")),
    };
    let panicking = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let switch = Arc::clone(&panicking);
    let mut stack = Stack::start_full(
        backends,
        move |inner| {
            Arc::new(FailingWrites {
                inner,
                failing: Arc::default(),
                panicking: switch,
                slow: Duration::ZERO,
            }) as Arc<dyn Index>
        },
        Triggers::new(vec![welcome]),
    )
    .await;
    // Everyone in one partition (one user), so the panic blocks all that follows it.
    let events: Vec<Value> = (0..50)
        .map(|i| {
            let (name, id) = match i {
                10 => ("bought".to_string(), "boom".to_string()),
                _ => ("signedUp".to_string(), format!("s{i}")),
            };
            json!({"userId": "ann", "eventName": name, "id": id})
        })
        .collect();
    let r = stack
        .post("/api/events/trackBulk", json!({ "events": events }))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json());

    let failed = tokio::time::timeout(Duration::from_secs(30), &mut stack.pipeline)
        .await
        .expect("the pipeline stops")
        .expect("pipeline task");
    let error = failed.expect_err("a panic stops the pipeline").to_string();
    assert!(
        error.contains("a stage panicked: injected: a bug met event boom")
            && error.contains("partition ")
            && error.contains("offsets 0..="),
        "{error}"
    );
    assert!(
        error.contains("\"s0\".."),
        "the batch's message ids: {error}"
    );
    assert_eq!(stack.committed(), 0, "nothing of the batch is committed");
    assert_eq!(receiver.raw_count(), 0, "the panic came before any action");

    panicking.store(false, Ordering::SeqCst);
    stack.restart_pipeline();
    stack.wait_committed().await;
    let found = stack
        .search("events", json!({"query": "userId:ann", "size": 0}))
        .await;
    assert_eq!(found["total"], 50, "{found}");
    until("49 welcomes", || receiver.raw_count() >= 49).await;
    // A moment more for a repeat, which would show below.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let distinct = receiver.distinct();
    assert_eq!(distinct.len(), 49, "one welcome per signup");
    assert_eq!(receiver.raw_count(), 49, "and no call twice");
    stack.stop().await;
}

/// The next batch of a partition is read, validated and checked against the dedup store while
/// the batch before it is written, before that batch is marked: a copy of one of its messages
/// is still a duplicate, and the user's profile is not taken back to the copy's update.
async fn a_copy_read_while_its_batch_is_written_is_a_duplicate(backends: Backends) {
    let stack = Stack::start_with(backends, move |inner| {
        Arc::new(FailingWrites {
            inner,
            failing: Arc::default(),
            panicking: Arc::default(),
            slow: Duration::from_millis(600),
        }) as Arc<dyn Index>
    })
    .await;
    let update = |id: &str, fields: Value| json!({"userId": "ann", "id": id, "dataFields": fields});
    let first =
        json!({"users": [update("a1", json!({"plan": "a"})), update("a2", json!({"plan": "b"}))]});
    let r = stack.post("/api/users/bulkUpdate", first).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    // The first batch is in its (slow) write when the second arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.stats.records.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "the first batch was not read");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second =
        json!({"users": [update("a1", json!({"plan": "a"})), update("a3", json!({"step": 3}))]});
    let r = stack.post("/api/users/bulkUpdate", second).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    while stack.stats.records.load(Ordering::Relaxed) < 4 {
        assert!(Instant::now() < deadline, "the second batch was not read");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        stack.stats.batches.load(Ordering::Relaxed),
        0,
        "the second batch was read while the first was written"
    );
    stack.wait_processed().await;
    let user = stack.get("/api/users/ann").await.json();
    assert_eq!(user["dataFields"]["plan"], "b", "{user}");
    assert_eq!(user["dataFields"]["step"], 3, "{user}");
    assert_eq!(stack.stats.duplicates.load(Ordering::Relaxed), 1);
    stack.stop().await;
}
