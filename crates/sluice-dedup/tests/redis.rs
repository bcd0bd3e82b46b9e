//! The Redis dedup store against real Redis servers: the test run's (`SLUICE_TEST_REDIS`, keys
//! under a prefix unique to each test, deleted at the end) and, for the outage test, a `redis-server`
//! started here on a free port.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_dedup::testing::{OwnRedis, redis_url};
use sluice_dedup::{Dedup, DedupError, MessageKey, RedisDedup, RedisDedupConfig};

fn key<'a>(org: &'a str, message_id: &'a str) -> MessageKey<'a> {
    MessageKey { org, message_id }
}

/// A store under a fresh prefix; its keys are deleted when the guard drops.
struct Scoped {
    store: RedisDedup,
    prefix: String,
}

async fn scoped(window: Duration) -> Scoped {
    let prefix = format!("sluice-test:{}", uuid_like());
    let mut config = RedisDedupConfig::new(redis_url(), window);
    config.prefix = prefix.clone();
    let store = RedisDedup::connect(config)
        .await
        .expect("connect to local redis");
    Scoped { store, prefix }
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

impl Drop for Scoped {
    fn drop(&mut self) {
        let _ = Command::new("redis-cli")
            .args(["-u", redis_url(), "--scan", "--pattern"])
            .arg(format!("{}*", self.prefix))
            .stdout(Stdio::piped())
            .output()
            .map(|out| {
                let keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect();
                if !keys.is_empty() {
                    let _ = Command::new("redis-cli")
                        .args(["-u", redis_url(), "DEL"])
                        .args(&keys)
                        .output();
                }
            });
    }
}

#[tokio::test]
async fn marks_are_seen_per_org_in_batch_order_with_the_window_as_ttl() {
    let s = scoped(Duration::from_secs(3600)).await;
    let batch = [key("acme", "m1"), key("acme", "m2"), key("globex", "m1")];
    assert_eq!(s.store.check(&batch).await.expect("check"), [false; 3]);
    s.store.mark(&batch[..2]).await.expect("mark");
    assert_eq!(
        s.store.check(&batch).await.expect("check"),
        [true, true, false],
        "marked in acme only"
    );
    // Marking again keeps the first mark (NX): the TTL is not extended.
    let ttl = |k: &str| {
        let out = Command::new("redis-cli")
            .args(["-u", redis_url(), "TTL"])
            .arg(format!("{}:acme:{k}", s.prefix))
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<i64>()
            .expect("ttl")
    };
    assert!((3590..=3600).contains(&ttl("m1")), "ttl {}", ttl("m1"));
    assert!(s.store.check(&[]).await.expect("empty").is_empty());
    s.store.mark(&[]).await.expect("empty mark");
    // Each call above with ids was one pipelined round trip (check, mark, check); empty ones
    // send nothing.
    assert_eq!(s.store.round_trips(), 3);
}

#[tokio::test]
async fn a_stash_keeps_the_first_payload_until_unstashed_apart_from_marks() {
    let s = scoped(Duration::from_secs(3600)).await;
    sluice_dedup::contract::stash_first(&s.store).await;
    let a = key("acme/welcome", "m1");
    s.store.mark(&[a]).await.expect("mark");
    sluice_dedup::contract::stash_then(&s.store).await;
    assert_eq!(
        s.store.check(&[a]).await.expect("check"),
        [true],
        "marks stay"
    );
}

#[tokio::test]
async fn marks_expire_after_the_window() {
    let s = scoped(Duration::from_secs(1)).await;
    s.store.mark(&[key("acme", "old")]).await.expect("mark");
    assert_eq!(
        s.store.check(&[key("acme", "old")]).await.expect("check"),
        [true]
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        s.store.check(&[key("acme", "old")]).await.expect("check"),
        [false],
        "forgotten after the window"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error_at_connect() {
    let port = free_port();
    let mut config =
        RedisDedupConfig::new(format!("redis://127.0.0.1:{port}"), Duration::from_secs(60));
    config.timeout = Duration::from_secs(1);
    let error = match RedisDedup::connect(config).await {
        Ok(_) => panic!("connected to a port where nothing listens"),
        Err(e) => e,
    };
    assert!(matches!(error, DedupError::Unavailable { .. }), "{error:?}");
    assert!(error.to_string().contains(&port.to_string()), "{error}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test]
async fn a_restarted_server_fails_calls_while_down_and_serves_them_again_after() {
    let server = OwnRedis::start();
    let port = server.port;
    let mut config =
        RedisDedupConfig::new(format!("redis://127.0.0.1:{port}"), Duration::from_secs(60));
    config.timeout = Duration::from_millis(500);
    let store = RedisDedup::connect(config).await.expect("connect");
    store.mark(&[key("acme", "before")]).await.expect("mark");

    drop(server);
    let error = store
        .check(&[key("acme", "before")])
        .await
        .expect_err("the server is down");
    assert!(matches!(error, DedupError::Unavailable { .. }), "{error:?}");
    assert!(error.to_string().contains(&port.to_string()), "{error}");

    // Back (empty: it keeps nothing on disk): the same store works again by itself.
    let _server = OwnRedis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match store.check(&[key("acme", "before")]).await {
            Ok(seen) => {
                assert_eq!(
                    seen,
                    [false],
                    "a restarted server without persistence forgot it"
                );
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "still failing 20 s after restart: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store
        .mark(&[key("acme", "after")])
        .await
        .expect("mark after restart");
    assert_eq!(
        store.check(&[key("acme", "after")]).await.expect("check"),
        [true]
    );
}
