//! The engines start, serve, take faults and stop with their test process.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_testkit::{Kafka, OpenSearch};

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_broker_kraft_cluster_survives_a_killed_broker_and_takes_it_back() {
    let kafka = Kafka::start(3, &[]);
    assert_eq!(kafka.broker_count(), 3);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .create()
        .expect("admin");
    let created = admin
        .create_topics(
            [
                &NewTopic::new("engines-test", 1, TopicReplication::Fixed(3))
                    .set("min.insync.replicas", "2"),
            ],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create topics");
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let send = |n: u32| {
        let producer = producer.clone();
        async move {
            producer
                .send(
                    FutureRecord::to("engines-test")
                        .key("k")
                        .payload(&format!("{n}")),
                    Duration::from_secs(30),
                )
                .await
                .map(|d| d.offset)
                .map_err(|(e, _)| e.to_string())
        }
    };
    send(0).await.expect("a record on the healthy cluster");

    // Kill the partition's leader: a follower must take over.
    let leader = kafka.leader("engines-test", 0).expect("a leader") as usize;
    let pid = kafka.pid(leader).expect("the leader runs");
    kafka.kill(leader);
    assert!(!alive(pid), "the leader's JVM is gone after kill");
    send(1).await.expect("a record with the old leader down");
    assert_ne!(kafka.leader("engines-test", 0), Some(leader as i32));

    kafka.restart(leader);
    kafka.wait_for_brokers(3);
    send(2).await.expect("a record after the restart");
}

#[test]
fn an_opensearch_node_serves_and_a_dropped_engine_leaves_no_jvm() {
    let search = OpenSearch::start();
    let (status, body) = search.get("/").expect("the node answers");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"number\" : \"2.19."),
        "OpenSearch 2.19: {body}"
    );
    let pid = search.pid().expect("the node runs");
    drop(search);
    assert!(!alive(pid), "the JVM is gone once the engine is dropped");
}
