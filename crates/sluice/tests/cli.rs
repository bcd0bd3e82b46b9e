//! The `sluice` binary as a user runs it: admin commands, `serve` with admin commands running
//! beside it, and the crash test (SIGKILL under concurrent load, restart, verify the log).

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sluice::client::Connection;
use sluice_log::{EmbeddedLog, EmbeddedLogConfig, Log};

mod support;
use support::{
    Server, check_index_matches_log, client_load, post, run_err, run_ok, send_position, sluice,
    wait_for_sentinels,
};

#[test]
fn admin_commands_manage_orgs_keys_and_bans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    run_ok(sluice(&data).args(["orgs", "create", "acme"]));
    let key = run_ok(sluice(&data).args(["keys", "create", "--org", "acme"]));
    assert!(
        key.starts_with("sk_") && key.trim_end().len() == 51 && key.lines().count() == 1,
        "only the key: {key:?}"
    );
    let list = run_ok(sluice(&data).args(["orgs", "list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("acme") && l.contains("active")),
        "{list}"
    );
    run_ok(sluice(&data).args(["orgs", "disable", "acme"]));
    assert!(
        run_ok(sluice(&data).args(["orgs", "list"]))
            .lines()
            .any(|l| l.starts_with("acme") && l.contains("disabled"))
    );
    run_ok(sluice(&data).args(["users", "ban", "--org", "acme", "u1"]));
    assert!(
        run_ok(sluice(&data).args(["users", "unban", "--org", "acme", "u1"])).contains("unbanned")
    );

    let err = run_err(sluice(&data).args(["keys", "create", "--org", "nope"]));
    assert!(err.contains("no org named \"nope\""), "{err}");
    let err = run_err(sluice(&data).args(["orgs", "create", "bad:name"]));
    assert!(err.contains("invalid org name"), "{err}");
    let err = run_err(sluice(&data).args(["orgs", "create", "acme"]));
    assert!(err.contains("already exists"), "{err}");
    // A SendGrid verification key (as SendGrid shows it: base64 DER of a P-256 public key).
    const SENDGRID_KEY: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqP1q7Hh2IvJUofwrQRiubNwsGq4lN7WmI5ODwhaEIaL3yDZXMKesEZCyo9wrLiRn14Qvkf001kLQZ85azqtCKw==";
    assert!(
        run_ok(sluice(&data).args(["orgs", "set-sendgrid-key", "acme", SENDGRID_KEY]))
            .contains("requires SendGrid webhook signatures")
    );
    let err = run_err(sluice(&data).args(["orgs", "set-sendgrid-key", "acme", "AAAA"]));
    assert!(err.contains("not an ECDSA P-256 public key"), "{err}");
    let err = run_err(sluice(&data).args(["orgs", "set-sendgrid-key", "nope", SENDGRID_KEY]));
    assert!(err.contains("no org named \"nope\""), "{err}");
    assert!(
        run_ok(sluice(&data).args(["orgs", "set-sendgrid-key", "acme", "--clear"]))
            .contains("no longer checks")
    );
    let err = run_err(sluice(&data).args(["--index", "solr://x:8983", "orgs", "list"]));
    assert!(err.contains("expected `embedded` or http(s)://"), "{err}");
    let err = run_err(sluice(&data).args(["ingest"]));
    assert!(err.contains("--log kafka://"), "{err}");
}

/// `sluice ingest` with a broker address where nothing listens: exits non-zero within its
/// timeout with an error that names the address and what was wrong there, and the producer's
/// repeated "connection refused" reports (about two a second) are logged once, not each time.
#[test]
fn an_ingest_node_whose_broker_refuses_connections_says_where_and_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let started = std::time::Instant::now();
    let out = sluice(&dir.path().join("data"))
        .args([
            "--log",
            &format!("kafka://127.0.0.1:{port}"),
            "--log-ack-timeout",
            "3s",
            "ingest",
        ])
        .output()
        .expect("sluice runs");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(elapsed < std::time::Duration::from_secs(30), "{elapsed:?}");
    assert!(
        stderr.contains(&format!(
            "cannot use the Kafka log at kafka://127.0.0.1:{port}"
        )) && stderr.contains(&format!(
            "no bootstrap address accepts connections: 127.0.0.1:{port} (Connection refused"
        )),
        "{stderr}"
    );
    let warnings = stderr.matches("kafka producer").count();
    assert!(
        warnings <= 4,
        "{warnings} producer warnings in {elapsed:?}: {stderr}"
    );
}

#[test]
fn config_default_prints_a_file_the_server_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = run_ok(Command::new(env!("CARGO_BIN_EXE_sluice")).args(["config", "default"]));
    assert!(text.contains("log_ack_timeout = \"5s\""));
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, text.replace("partitions = 8", "partitions = 3")).expect("write");
    // Config file < env < flags: the env var beats the file, the flag beats the env var.
    let data = dir.path().join("data");
    run_ok(
        sluice(&data)
            .arg("--config")
            .arg(&path)
            .args(["orgs", "create", "from-file"]),
    );
    let err = run_err(
        sluice(&data)
            .arg("--config")
            .arg(&path)
            .env("SLUICE_INDEX", "solr://nowhere:8983")
            .args(["orgs", "list"]),
    );
    assert!(
        err.contains("index = \"solr://nowhere:8983\""),
        "env overrides the file: {err}"
    );
    run_ok(
        sluice(&data)
            .arg("--config")
            .arg(&path)
            .env("SLUICE_INDEX", "solr://nowhere:8983")
            .args(["--index", "embedded", "orgs", "list"]),
    );
    std::fs::write(&path, "partitons = 3\n").expect("write");
    let err = run_err(
        sluice(&data)
            .arg("--config")
            .arg(&path)
            .args(["orgs", "list"]),
    );
    assert!(
        err.contains("unknown field `partitons`") && err.contains("sluice.toml"),
        "{err}"
    );
}

#[test]
fn config_check_prints_the_resolved_configuration_or_exits_2_naming_the_key_and_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        "partitions = 3\ndedup = \"redis://:hunter2@cache:6379\"\n\n[[triggers]]\nname = \"welcome\"\nevent = \"signed_up\"\nwebhook = \"https://hooks.example/welcome\"\n",
    )
    .expect("write");
    let check = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command
            .env_remove("SLUICE_CONFIG")
            .arg("--config")
            .arg(&path)
            .args(["config", "check"]);
        command
    };
    let printed = run_ok(check().env("SLUICE_BATCH_SIZE", "77"));
    let resolved: toml::Table = toml::from_str(&printed).expect("TOML");
    assert_eq!(resolved["partitions"].as_integer(), Some(3), "{printed}");
    assert_eq!(
        resolved["batch_size"].as_integer(),
        Some(77),
        "env over file"
    );
    assert_eq!(resolved["log"].as_str(), Some("embedded"));
    assert!(
        !printed.contains("hunter2") && printed.contains("cache:6379"),
        "{printed}"
    );
    assert!(
        printed.contains("https://hooks.example/welcome"),
        "{printed}"
    );

    std::fs::write(
        &path,
        "[[triggers]]\nname = \"welcome\"\nevent = \"signed_up\"\nwebhook = \"ftp://hooks.example\"\n",
    )
    .expect("write");
    let output = check().output().expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("sluice.toml")
            && stderr.contains("[[triggers]] #1")
            && stderr.contains("webhook must be an http:// or https:// URL"),
        "{stderr}"
    );
    std::fs::write(&path, "batch_timeout = \"soon\"\n").expect("write");
    let output = check().output().expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("sluice.toml") && stderr.contains("batch_timeout"),
        "{stderr}"
    );
}

/// `--log-format json`: every line on stderr is one JSON object with level, message and the
/// fields of the span it was logged in. `--admin-token`: `/metrics` needs it.
#[tokio::test]
async fn json_logs_are_one_object_per_line_and_the_admin_token_guards_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_logging(
        "serve",
        &dir.path().join("data"),
        &["--log-format", "json", "--admin-token", "s3cret"],
        "info",
    );
    let mut conn = sluice::client::Connection::connect(server.addr)
        .await
        .expect("connect");
    assert_eq!(conn.get("/metrics", &[]).await.expect("get").status, 401);
    let allowed = conn
        .get("/metrics", &[("authorization", "Bearer s3cret")])
        .await
        .expect("get");
    assert_eq!(allowed.status, 200);
    assert!(server.sigterm().success());
    let stderr = std::fs::read_to_string(&server.stderr).expect("stderr");
    let lines: Vec<Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "no log line at info");
    for line in &lines {
        assert!(
            line["timestamp"].is_string()
                && line["level"].is_string()
                && line["fields"].is_object(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "stopped" && l["level"] == "INFO"),
        "{stderr}"
    );
}

#[tokio::test]
async fn serve_prints_a_key_once_and_admin_commands_work_while_it_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &["--key-cache-ttl", "100ms"]);
    let key = server.first_key.clone().expect("first start prints a key");
    let (status, _) = post(
        server.addr,
        &key,
        "/api/events/track",
        json!({"userId": "u", "eventName": "e"}),
    )
    .await;
    assert_eq!(status, 200);

    // A new org and key, created by a second process while the server runs.
    run_ok(sluice(&data).args(["orgs", "create", "late"]));
    let late = run_ok(sluice(&data).args(["keys", "create", "--org", "late"]))
        .trim()
        .to_string();
    let (status, _) = post(
        server.addr,
        &late,
        "/api/users/update",
        json!({"userId": "u", "dataFields": {}}),
    )
    .await;
    assert_eq!(status, 200);
    run_ok(sluice(&data).args(["orgs", "disable", "late"]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = post(
        server.addr,
        &late,
        "/api/users/update",
        json!({"userId": "u", "dataFields": {}}),
    )
    .await;
    assert_eq!(status, 401, "{body}");

    let status = server.sigterm();
    assert!(
        status.success(),
        "drains and exits 0 on SIGTERM: {status:?}"
    );
    let again = Server::start(&data, &[]);
    assert!(
        again.first_key.is_none(),
        "the key is printed on first start only"
    );
}

/// Key scopes (SPEC §3): a `write` key ingests and cannot read, a `read` key reads and cannot
/// write (403 naming the scope); `keys list` never shows a key; a revoked key is a 401 within
/// key_cache_ttl; a wrong scope or id is a clear error.
#[tokio::test]
async fn scoped_keys_do_what_their_scope_says_revoked_keys_stop_and_org_limits_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--key-cache-ttl", "100ms"]);
    let full = server.first_key.clone().expect("first start prints a key");
    let create = |scope: &str| {
        run_ok(sluice(&data).args(["keys", "create", "--org", "default", "--scope", scope]))
            .trim()
            .to_string()
    };
    let (writer, reader) = (create("write"), create("read"));
    let mut conn = Connection::connect(server.addr).await.expect("connect");
    let get = |key: String| {
        let addr = server.addr;
        async move {
            let mut conn = Connection::connect(addr).await.expect("connect");
            let r = conn
                .get("/api/users/s1", &[("api-key", key.as_str())])
                .await
                .expect("get");
            (r.status.as_u16(), r.json())
        }
    };
    let event = json!({"userId": "s1", "eventName": "e"});
    let (status, body) = post(server.addr, &writer, "/api/events/track", event.clone()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(writer.clone()).await;
    assert_eq!(status, 403, "a write key cannot read: {body}");
    assert_eq!(body["code"], "Forbidden");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("scope is write")),
        "{body}"
    );
    let (status, body) = post(server.addr, &reader, "/api/events/track", event.clone()).await;
    assert_eq!(status, 403, "a read key cannot write: {body}");
    let r = conn
        .post(
            "/api/search/events",
            &[("api-key", reader.as_str())],
            "{}".into(),
        )
        .await
        .expect("search");
    assert_eq!(r.status, 200, "a read key searches");
    let (status, _) = post(server.addr, &full, "/api/events/track", event).await;
    assert_eq!(status, 200);
    assert_ne!(get(full.clone()).await.0, 403);

    // Listed without the keys; revoked by id.
    let listed = run_ok(sluice(&data).args(["keys", "list", "--org", "default", "--json"]));
    let keys: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(keys.len(), 3, "{listed}");
    for key in [&full, &writer, &reader] {
        assert!(!listed.contains(&key[10..]), "keys list shows no key");
    }
    let write_id = keys
        .iter()
        .find(|k| k["scope"] == "write")
        .and_then(|k| k["id"].as_str())
        .expect("the write key's id")
        .to_string();
    let text = run_ok(sluice(&data).args(["keys", "list", "--org", "default"]));
    assert!(text.contains(&write_id) && text.contains("write"), "{text}");
    let said = run_ok(sluice(&data).args(["keys", "revoke", &write_id[..8]]));
    assert!(said.contains(&write_id), "{said}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = post(
        server.addr,
        &writer,
        "/api/events/track",
        json!({"userId": "s1", "eventName": "e"}),
    )
    .await;
    assert_eq!(status, 401, "a revoked key: {body}");

    // An org's rate limit, set while the server runs.
    let said = run_ok(sluice(&data).args([
        "orgs",
        "set-limit",
        "default",
        "--events-per-second",
        "5",
        "--burst",
        "5",
    ]));
    assert!(said.contains("5 messages per second"), "{said}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let six: Vec<Value> = (0..6)
        .map(|i| json!({"userId": "s1", "eventName": "e", "id": format!("lim-{i}")}))
        .collect();
    let (status, body) = post(
        server.addr,
        &full,
        "/api/events/trackBulk",
        json!({"events": six}),
    )
    .await;
    assert_eq!(status, 413, "over the burst: {body}");
    let (status, body) = post(
        server.addr,
        &full,
        "/api/events/trackBulk",
        json!({"events": &six[..5]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(server.addr, &full, "/api/events/track", six[5].clone()).await;
    assert_eq!(status, 429, "{body}");
    run_ok(sluice(&data).args(["orgs", "set-limit", "default", "--clear"]));
    let err =
        run_err(sluice(&data).args(["orgs", "set-limit", "nope", "--events-per-second", "5"]));
    assert!(err.contains("no org named \"nope\""), "{err}");

    // Wrong input: a clear error, exit non-zero.
    let err =
        run_err(sluice(&data).args(["keys", "create", "--org", "default", "--scope", "admin"]));
    assert!(err.contains("expected full, write or read"), "{err}");
    let err = run_err(sluice(&data).args(["keys", "revoke", &write_id[..8]]));
    assert!(err.contains("no key has an id starting with"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut key = None;
    let mut all_acked: Vec<String> = Vec::new();
    for (round, run_for) in [700u64, 1300, 400].into_iter().enumerate() {
        let mut server = Server::start(&data, &[]);
        if key.is_none() {
            key = server.first_key.clone();
        }
        let key = key.clone().expect("key from the first start");
        let run_for = Duration::from_millis(run_for);
        all_acked.extend(support::load_then_kill(&mut server, &key, 16, round, run_for, 400).await);
    }
    eprintln!(
        "crash test: {} acknowledged messages over 3 SIGKILLs",
        all_acked.len()
    );
    assert!(
        all_acked.len() > 1000,
        "the load did real work: {} acks",
        all_acked.len()
    );

    // Restart once more: the data dir must open cleanly after the kills, and the pipeline
    // catches up. A sentinel event on every partition tells when: a partition is processed in
    // order, so once its sentinel is readable everything before it was indexed.
    let mut server = Server::start(&data, &[]);
    let key = key.expect("key");
    wait_for_sentinels(server.addr, &key).await;
    let status = server.sigterm();
    assert!(status.success());

    let log = Arc::new(
        EmbeddedLog::open(&data.join("log"), EmbeddedLogConfig::default()).expect("log reopens"),
    );
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut per_user: HashMap<String, Vec<(usize, usize, usize, usize)>> = HashMap::new();
    for p in 0..log.partitions() {
        let records = log.read(p, 0, usize::MAX).expect("read");
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.offset, i as u64, "partition {p}: offsets are contiguous");
            let v: Value = serde_json::from_slice(&r.value).expect("every record is intact JSON");
            let id = v["messageId"].as_str().expect("messageId").to_string();
            if id.starts_with("sentinel-") {
                continue;
            }
            let user = String::from_utf8_lossy(&r.key).into_owned();
            assert_eq!(
                user,
                format!("default:u:{}", v["userId"].as_str().expect("userId"))
            );
            *count.entry(id.clone()).or_default() += 1;
            per_user.entry(user).or_default().push(send_position(&id));
        }
    }
    let acked_in_log = all_acked
        .iter()
        .filter(|id| count.get(*id) == Some(&1))
        .count();
    assert_eq!(
        acked_in_log,
        all_acked.len(),
        "every acknowledged message is in the log exactly once"
    );
    assert!(
        count.values().all(|&n| n == 1),
        "no message is in the log twice"
    );
    for (user, positions) in per_user {
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{user}: log order follows send order: {positions:?}"
        );
    }
    let records = (0..log.partitions())
        .flat_map(|p| log.read(p, 0, usize::MAX).expect("read"))
        .map(|r| r.value.to_vec())
        .collect::<Vec<_>>();
    log.close().await.expect("close log");
    drop(log);
    check_index_matches_log(&data.join("index"), &records).await;
}

/// Drain (SPEC §6): SIGTERM under 16 clients' load. In-flight requests finish, the pipeline
/// finishes and commits its batches, the process exits 0 within `shutdown_timeout`. What it
/// committed is exactly what it indexed (nothing processed and left uncommitted, which a
/// restart would process again), and a restart completes the rest: every acknowledged message
/// in the log once, the index matching the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_within_the_timeout_and_a_restart_completes_the_rest() {
    use sluice_index::{EmbeddedIndex, EmbeddedIndexConfig, Index};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let timeout = Duration::from_secs(10);
    let args = ["--shutdown-timeout", "10s"];
    let mut server = Server::start(&data, &args);
    let key = server.first_key.clone().expect("first key");
    let clients: Vec<_> = (0..16)
        .map(|c| tokio::spawn(client_load(server.addr, key.clone(), c, 0)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent_at = std::time::Instant::now();
    let status = server.sigterm();
    let took = sent_at.elapsed();
    assert!(status.success(), "a drain exits 0: {status:?}");
    assert!(took < timeout, "the drain took {took:?}");
    let mut acked = Vec::new();
    for c in clients {
        acked.extend(c.await.expect("client task"));
    }
    eprintln!(
        "drain test: {} messages acknowledged, exit {took:?} after SIGTERM",
        acked.len()
    );
    assert!(
        acked.len() > 1000,
        "the load did real work: {}",
        acked.len()
    );

    // Committed ⇔ indexed, event by event.
    let log = EmbeddedLog::open(&data.join("log"), EmbeddedLogConfig::default()).expect("log");
    let index = EmbeddedIndex::open(EmbeddedIndexConfig::new(data.join("index"))).expect("index");
    let mut indexed: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    let (mut committed_events, mut pending_events) = (0, 0);
    for p in 0..log.partitions() {
        let committed = log
            .committed("sluice-pipeline", p)
            .expect("committed")
            .unwrap_or(0);
        for r in log.read(p, 0, usize::MAX).expect("read") {
            let v: Value = serde_json::from_slice(&r.value).expect("JSON");
            if v["kind"] != "event" {
                continue;
            }
            let user = v["userId"].as_str().expect("userId").to_string();
            if !indexed.contains_key(&user) {
                let events = index
                    .user_events("default", &format!("u:{user}"), 100_000)
                    .await
                    .expect("events");
                let ids = events
                    .iter()
                    .filter_map(|e| e["messageId"].as_str().map(str::to_owned))
                    .collect();
                indexed.insert(user.clone(), ids);
            }
            let id = v["messageId"].as_str().expect("messageId");
            let is_indexed = indexed[&user].contains(id);
            if r.offset < committed {
                committed_events += 1;
                assert!(
                    is_indexed,
                    "partition {p} offset {}: committed, not indexed",
                    r.offset
                );
            } else {
                pending_events += 1;
                assert!(
                    !is_indexed,
                    "partition {p} offset {}: indexed but not committed",
                    r.offset
                );
            }
        }
    }
    eprintln!(
        "drain test: {committed_events} events committed, {pending_events} left for the restart"
    );
    index.close().await.expect("close index");
    log.close().await.expect("close log");
    drop((index, log));

    let mut server = Server::start(&data, &args);
    wait_for_sentinels(server.addr, &key).await;
    assert!(server.sigterm().success());
    let log = EmbeddedLog::open(&data.join("log"), EmbeddedLogConfig::default()).expect("log");
    let records: Vec<Vec<u8>> = (0..log.partitions())
        .flat_map(|p| log.read(p, 0, usize::MAX).expect("read"))
        .map(|r| r.value.to_vec())
        .collect();
    let mut count: HashMap<String, usize> = HashMap::new();
    for value in &records {
        let v: Value = serde_json::from_slice(value).expect("JSON");
        *count
            .entry(v["messageId"].as_str().expect("id").to_string())
            .or_default() += 1;
    }
    assert!(
        acked.iter().all(|id| count.get(id) == Some(&1)),
        "every acknowledged message is in the log once"
    );
    log.close().await.expect("close log");
    drop(log);
    check_index_matches_log(&data.join("index"), &records).await;
}

/// A fresh server on `data`, and the report of `sluice bench --json` with `args` against it.
async fn bench_report(data: &std::path::Path, args: &[&str]) -> (Server, Value) {
    let server = Server::start(data, &[]);
    let key = server.first_key.clone().expect("first key");
    let url = format!("http://{}", server.addr);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        run_ok(
            Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args(["bench", "--url", &url, "--key", &key, "--json"])
                .args(&args),
        )
    })
    .await
    .expect("bench task");
    let report = serde_json::from_str(&out).expect("--json prints one JSON object");
    (server, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_exactly_what_the_server_made_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (mut server, report) = bench_report(
        &data,
        &[
            "--duration",
            "1",
            "--connections",
            "4",
            "--bulk",
            "5",
            "--kind",
            "mixed",
            "--users",
            "50",
        ],
    )
    .await;
    let ingest = &report["ingest"];
    let requests = ingest["requests_ok"].as_u64().expect("requests_ok");
    let messages = ingest["messages_ok"].as_u64().expect("messages_ok");
    assert!(requests > 10, "the bench sent real requests: {report}");
    assert_eq!(ingest["requests_failed"], 0, "{report}");
    assert_eq!(messages, requests * 5, "bulk of 5");
    assert!(ingest["latency_ms"]["p99"].as_f64().expect("p99") > 0.0);
    assert!(server.sigterm().success());

    let log = EmbeddedLog::open(&data.join("log"), EmbeddedLogConfig::default()).expect("log");
    let mut in_log = 0u64;
    let mut kinds: HashMap<String, u64> = HashMap::new();
    for p in 0..log.partitions() {
        for r in log.read(p, 0, usize::MAX).expect("read") {
            let v: Value = serde_json::from_slice(&r.value).expect("json");
            *kinds
                .entry(v["kind"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
            in_log += 1;
        }
    }
    assert_eq!(
        in_log, messages,
        "every message the bench counted is in the log, and no more"
    );
    assert!(
        kinds.get("user_update").copied().unwrap_or(0) > 0
            && kinds.get("event").copied().unwrap_or(0) > 0,
        "mixed: {kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_probes_measure_how_soon_acknowledged_events_become_searchable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (mut server, report) = bench_report(
        &data,
        &[
            "--duration",
            "2",
            "--connections",
            "2",
            "--bulk",
            "10",
            "--probe-every",
            "100ms",
            "--until-indexed",
        ],
    )
    .await;
    let freshness = &report["freshness"];
    let probes = freshness["probes"].as_u64().expect("probes");
    assert!(
        (10..=21).contains(&probes),
        "one probe each 100 ms for 2 s: {report}"
    );
    assert_eq!(freshness["failed"], 0, "{report}");
    assert_eq!(freshness["never_seen"], 0, "{report}");
    let (p50, max) = (
        freshness["p50_ms"].as_f64().expect("p50"),
        freshness["max_ms"].as_f64().expect("max"),
    );
    // The pipeline batches for up to 250 ms and the index commits after that: a probe cannot
    // be searchable the moment it is acknowledged.
    assert!(p50 > 1.0 && p50 <= max, "{report}");
    assert!(
        report["end_to_end"]["events"].as_u64() == report["ingest"]["messages_ok"].as_u64(),
        "the end-to-end count leaves the probes out: {report}"
    );
    assert!(server.sigterm().success());

    // Each probe the bench counted is one event in the log, beside the load's.
    let log = EmbeddedLog::open(&data.join("log"), EmbeddedLogConfig::default()).expect("log");
    let mut in_log = 0u64;
    for p in 0..log.partitions() {
        for r in log.read(p, 0, usize::MAX).expect("read") {
            let v: Value = serde_json::from_slice(&r.value).expect("json");
            if v["eventName"] == "bench_probe" {
                in_log += 1;
            }
        }
    }
    assert_eq!(in_log, probes, "{report}");
}

#[test]
fn buffer_status_reads_the_spill_buffer_from_disk_when_no_server_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = run_ok(sluice(dir.path()).args(["buffer", "status"]));
    assert!(text.contains("records: 0"), "{text}");
    assert!(text.contains("direct"), "{text}");
    assert!(text.contains("of 1073741824"), "the default limit: {text}");
    let json: serde_json::Value = serde_json::from_str(&run_ok(sluice(dir.path()).args([
        "--spill-max-bytes",
        "0",
        "buffer",
        "status",
        "--json",
    ])))
    .expect("json");
    assert_eq!(json["records"], 0);
    assert_eq!(json["max_bytes"], 0);
    assert_eq!(json["spilling"], false);
}

/// `GET path` with `key`: the status and the JSON body (`null` when there is none).
async fn get_json(addr: std::net::SocketAddr, key: &str, path: &str) -> (u16, Value) {
    let mut conn = Connection::connect(addr).await.expect("connect");
    let r = conn.get(path, &[("api-key", key)]).await.expect("get");
    let body = if r.body.is_empty() {
        Value::Null
    } else {
        r.json()
    };
    (r.status.as_u16(), body)
}

async fn delete(addr: std::net::SocketAddr, key: &str, path: &str) -> (u16, Value) {
    let mut conn = Connection::connect(addr).await.expect("connect");
    let r = conn
        .send(
            axum::http::Method::DELETE,
            path,
            &[("api-key", key)],
            bytes::Bytes::new(),
        )
        .await
        .expect("delete");
    (r.status.as_u16(), r.json())
}

/// Waits until `done` holds for what `path` answers.
async fn until_get(
    addr: std::net::SocketAddr,
    key: &str,
    path: &str,
    what: &str,
    done: impl Fn(u16, &Value) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get_json(addr, key, path).await;
        if done(status, &body) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {path} answers {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn event_ids(body: &Value) -> Vec<String> {
    body["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["messageId"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_user_leaves_the_index_in_order_by_api_and_by_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        &["--batch-timeout", "50ms", "--key-cache-ttl", "100ms"],
    );
    let key = server.first_key.clone().expect("key");
    let addr = server.addr;
    let writer =
        run_ok(sluice(&data).args(["keys", "create", "--org", "default", "--scope", "write"]))
            .trim()
            .to_string();
    let bulk = json!({"events": [
        {"userId": "f1", "eventName": "click", "id": "m1"},
        {"userId": "f1", "eventName": "buy", "id": "m2"},
        {"userId": "f2", "eventName": "click", "id": "m3"},
        {"userId": "f3", "eventName": "click", "id": "m4"},
    ]});
    let users = json!({"users": [
        {"userId": "f1", "email": "ann@x.io", "dataFields": {"plan": "pro"}},
        {"userId": "f2", "dataFields": {"plan": "free"}},
        {"userId": "f3", "email": "cy@x.io", "dataFields": {"plan": "team"}},
    ]});
    assert_eq!(
        post(addr, &key, "/api/users/bulkUpdate", users).await.0,
        200
    );
    assert_eq!(post(addr, &key, "/api/events/trackBulk", bulk).await.0, 200);
    // An event sent under f1's email only (before the app knew the id).
    let by_email = json!({"email": "ann@x.io", "eventName": "opened", "id": "m0"});
    assert_eq!(post(addr, &key, "/api/events/track", by_email).await.0, 200);
    until_get(addr, &key, "/api/users/f1/events", "f1's events", |_, b| {
        event_ids(b).len() == 2
    })
    .await;
    let opened = || async {
        let (status, found) = post(
            addr,
            &key,
            "/api/search/events",
            json!({"query": "eventName:opened", "size": 0}),
        )
        .await;
        assert_eq!(status, 200, "{found}");
        found["total"].as_u64().unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while opened().await != 1 {
        assert!(std::time::Instant::now() < deadline, "the email's event");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A write key may not forget; a full key may, and the answer waits for durability only.
    let (status, body) = delete(addr, &writer, "/api/users/f1").await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = delete(addr, &key, "/api/users/f1").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["code"], "Accepted");
    assert!(
        body["messageId"].as_str().is_some_and(|id| !id.is_empty()),
        "{body}"
    );
    // After the forget in the log: an update that starts the user anew, and m1 sent again.
    let again = json!({"userId": "f1", "dataFields": {"seen": true}});
    assert_eq!(post(addr, &key, "/api/users/update", again).await.0, 200);
    let replayed = json!({"userId": "f1", "eventName": "click", "id": "m1"});
    assert_eq!(post(addr, &key, "/api/events/track", replayed).await.0, 200);
    let sentinel = json!({"userId": "f2", "eventName": "sentinel", "id": "m5"});
    assert_eq!(post(addr, &key, "/api/events/track", sentinel).await.0, 200);
    until_get(
        addr,
        &key,
        "/api/users/f2/events",
        "the sentinel",
        |_, b| event_ids(b).contains(&"m5".to_string()),
    )
    .await;
    let (status, profile) = get_json(addr, &key, "/api/users/f1").await;
    assert_eq!(status, 200, "{profile}");
    assert_eq!(
        profile["dataFields"],
        json!({"seen": true}),
        "created anew: {profile}"
    );
    assert_eq!(profile.get("email"), None, "{profile}");
    let (_, events) = get_json(addr, &key, "/api/users/f1/events").await;
    assert_eq!(
        event_ids(&events),
        Vec::<String>::new(),
        "every event is gone, and m1 sent again is still a duplicate (dedup unaffected)"
    );
    let (status, _) = get_json(addr, &key, "/api/users/by-email/ann@x.io").await;
    assert_eq!(status, 404);
    assert_eq!(
        opened().await,
        0,
        "what was sent under the profile's email is gone too"
    );
    let (_, found) = get_json(addr, &key, "/api/users/f2").await;
    assert_eq!(found["dataFields"]["plan"], "free", "others stay: {found}");

    // By email: the API finds the user's id and forgets the user.
    let (status, body) = delete(addr, &key, "/api/users/by-email/Cy@X.io").await;
    assert_eq!(status, 202, "{body}");
    until_get(
        addr,
        &key,
        "/api/users/f3",
        "f3 forgotten by email",
        |s, _| s == 404,
    )
    .await;
    let (_, events) = get_json(addr, &key, "/api/users/f3/events").await;
    assert_eq!(event_ids(&events), Vec::<String>::new());

    // The CLI, while the server holds the log (through its admin socket).
    let said = run_ok(sluice(&data).args(["users", "forget", "--org", "default", "f2"]));
    assert!(said.contains("forgetting user \"f2\""), "{said}");
    until_get(
        addr,
        &key,
        "/api/users/f2",
        "f2 forgotten by the CLI",
        |s, _| s == 404,
    )
    .await;
    let (_, events) = get_json(addr, &key, "/api/users/f2/events").await;
    assert_eq!(event_ids(&events), Vec::<String>::new());
    let refused = run_err(sluice(&data).args(["users", "forget", "--org", "nope", "x"]));
    assert!(refused.contains("no org \"nope\""), "{refused}");

    // The dead letters of a forgotten user are purged on request; others' stay.
    for user in ["f4", "f5"] {
        run_ok(sluice(&data).args(["users", "ban", "--org", "default", user]));
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // the validator's org cache
    for user in ["f4", "f5"] {
        let event = json!({"userId": user, "eventName": "spam"});
        assert_eq!(post(addr, &key, "/api/events/track", event).await.0, 200);
    }
    let letters = || -> Vec<Value> {
        run_ok(sluice(&data).args(["dlq", "list", "--json"]))
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while letters().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "two dead letters");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let said = run_ok(sluice(&data).args(["dlq", "purge", "--org", "default", "--user", "f4"]));
    assert!(said.starts_with("purged 1 dead letters"), "{said}");
    let left = letters();
    let users: Vec<&str> = left
        .iter()
        .filter_map(|l| l["record"]["userId"].as_str())
        .collect();
    assert_eq!(users, ["f5"], "{left:?}");
}
