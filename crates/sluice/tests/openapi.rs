//! The OpenAPI document (`GET /openapi.json`, SPEC §9) against the server it describes:
//! schemathesis (PyPI, installed by `scripts/install-test-tools`) reads the document from a
//! live `sluice serve` and sends every operation what the schemas allow and what they do not
//! (its coverage and fuzzing phases, a fixed seed). Every answer must be a documented status,
//! with the documented content type and a body that matches its schema, and none may be a 5xx;
//! the server must still run at the end, having logged no panic. (The first run found one: an
//! event from the year 15 overflowed the embedded index's dates and stopped the pipeline.)

use std::process::Command;

use serde_json::Value;

mod support;
use support::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_every_answer_documented_and_no_server_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &["--batch-timeout", "50ms"]);
    let key = server.first_key.clone().expect("key");
    let url = format!("http://{}/openapi.json", server.addr);

    let mut conn = sluice::client::Connection::connect(server.addr)
        .await
        .expect("connect");
    let answer = conn.get("/openapi.json", &[]).await.expect("document");
    assert_eq!(answer.status, 200);
    let doc: Value = answer.json();
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );

    let schemathesis = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/schemathesis");
    let out = Command::new(schemathesis)
        .arg("run")
        .arg(&url)
        .args(["--header", &format!("Api-Key: {key}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "30",
            "--seed",
            "1",
            "--generation-database",
            "none",
            // One worker: with two threads, CPython 3.11's ast.parse (hypothesis describing
            // its strategies) can fail with "AST constructor recursion depth mismatch", an
            // interpreter race that CI hit, not a finding about sluice.
            "--workers",
            "1",
            "--request-timeout",
            "10",
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {schemathesis} (./scripts/test installs it): {e}")
        });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // On a failure, the server's log tail is printed when it is dropped.
    assert!(out.status.success(), "schemathesis failed:\n{said}");
    assert!(
        said.contains("31 selected / 31 total") || said.contains("Selected: 31/31"),
        "every operation is tested: {said}"
    );
    assert!(
        server.child.try_wait().expect("status").is_none(),
        "the server still runs"
    );
    let log = std::fs::read_to_string(&server.stderr).expect("server log");
    assert!(!log.contains("panicked"), "the server logged a panic");
    assert!(server.sigterm().success());
}
