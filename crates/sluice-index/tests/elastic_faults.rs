//! The Elasticsearch/OpenSearch index under the failures a real cluster produces, injected by a
//! proxy in front of a real osmem-server: item-level 429/409 storms, whole requests failing,
//! an outage, and documents refused for their content.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_index::testing::{FaultProxy, Osmem};
use sluice_index::{
    ElasticIndex, ElasticIndexConfig, EventDoc, Index, IndexError, Refused, SearchRequest, Target,
    UserUpsert, WriteBatch,
};
use sluice_model::Patch;

async fn open(url: &str, prefix: &str) -> ElasticIndex {
    let mut config = ElasticIndexConfig::new(url);
    config.prefix = prefix.into();
    config.item_attempts = 4;
    config.max_retry_delay = Duration::from_millis(100);
    config.timeout = Duration::from_secs(5);
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

#[tokio::test]
async fn item_level_429_and_409_storms_are_retried_until_every_document_is_taken() {
    let osmem = Osmem::start();
    let proxy = FaultProxy::start(&osmem.url);
    let index = open(&proxy.url, "storm").await;
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

#[tokio::test]
async fn documents_still_failing_make_a_recoverable_error_and_nothing_is_lost() {
    let osmem = Osmem::start();
    let proxy = FaultProxy::start(&osmem.url);
    let index = open(&proxy.url, "persistent").await;
    // More failures than 4 attempts can get through.
    proxy.fail_items(429, 1, 100_000);
    match index.write(Arc::new(batch(1))).await {
        Err(e @ IndexError::Unavailable { .. }) => {
            assert!(e.is_retriable());
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

#[tokio::test]
async fn an_outage_is_a_recoverable_error_and_writes_resume_when_it_ends() {
    let osmem = Osmem::start();
    let proxy = FaultProxy::start(&osmem.url);
    let index = open(&proxy.url, "outage").await;
    index
        .write(Arc::new(batch(0)))
        .await
        .expect("write round 0");
    proxy.go_down();
    let error = index
        .write(Arc::new(batch(1)))
        .await
        .expect_err("the store is down");
    assert!(error.is_retriable(), "{error}");
    assert!(error.to_string().contains(&proxy.url), "{error}");
    let read = index
        .get_user("acme", "u:0")
        .await
        .expect_err("reads fail too");
    assert!(read.is_retriable(), "{read}");
    proxy.come_back();
    index
        .write(Arc::new(batch(1)))
        .await
        .expect("write after the outage");
    assert_round_written(&index, 1).await;
}

#[tokio::test]
async fn documents_rejected_for_their_content_are_refused_alone() {
    let osmem = Osmem::start();
    let index = open(&osmem.url, "refused").await;
    index
        .write(Arc::new(WriteBatch {
            users: vec![user(1, json!({"age": 30}), false)],
            events: vec![event(1, json!({"amount": 5}))],
        }))
        .await
        .expect("write");
    // `age` and `amount` are numbers now; a string that is not one cannot be indexed.
    let outcome = index
        .write(Arc::new(WriteBatch {
            users: vec![
                user(2, json!({"age": "old"}), false),
                user(3, json!({"age": 40}), false),
            ],
            events: vec![
                event(2, json!({"amount": "lots"})),
                event(3, json!({"amount": 7})),
            ],
        }))
        .await
        .expect("write");
    assert_eq!(outcome.refused.len(), 2, "{:?}", outcome.refused);
    for refused in &outcome.refused {
        let (Refused::User {
            position: 0,
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
    assert_eq!(total(&index, Target::Events, "").await, 2);
}
