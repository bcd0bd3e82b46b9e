//! The SendGrid Event Webhook receiver against the real router on port 0, with the real
//! embedded log and registry in a temp dir. Signatures are made in the test with a real ECDSA
//! P-256 key pair generated here, as SendGrid makes them: base64 DER over timestamp + raw body.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey;
use serde_json::{Value, json};
use sluice::client::{Connection, Reply};
use sluice_api::sendgrid::{SIGNATURE_HEADER, TIMESTAMP_HEADER};
use sluice_api::{ApiConfig, AppState};
use sluice_log::{EmbeddedLog, EmbeddedLogConfig, Log};
use sluice_registry::{Registry, SqliteRegistry};
use sluice_spill::Bridge;

mod support;

struct Receiver {
    addr: std::net::SocketAddr,
    log: Arc<EmbeddedLog>,
    registry: Arc<SqliteRegistry>,
    key: String,
    _dir: tempfile::TempDir,
}

impl Receiver {
    async fn start() -> Receiver {
        let dir = tempfile::tempdir().expect("tempdir");
        let (registry, key) = support::registry_with_key(dir.path()).await;
        let log = Arc::new(
            EmbeddedLog::open(&dir.path().join("log"), EmbeddedLogConfig::default()).expect("log"),
        );
        let config = ApiConfig {
            key_cache_ttl: Duration::from_millis(20),
            ..ApiConfig::default()
        };
        let state = AppState::new(
            Bridge::without_spill(Arc::clone(&log) as Arc<dyn Log>, Duration::from_secs(5)),
            Arc::clone(&registry) as Arc<dyn Registry>,
            None,
            &config,
        );
        let addr = support::spawn_api(state).await;
        Receiver {
            addr,
            log,
            registry,
            key,
            _dir: dir,
        }
    }

    async fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let mut conn = Connection::connect(self.addr).await.expect("connect");
        conn.post(path, headers, body.to_string().into())
            .await
            .expect("request")
    }

    /// `body` with SendGrid's headers, signed by `key` at `timestamp`.
    async fn post_signed(&self, path: &str, key: &SigningKey, timestamp: i64, body: &str) -> Reply {
        let (signature, timestamp) = signed(key, timestamp, body);
        let headers = [
            (SIGNATURE_HEADER, signature.as_str()),
            (TIMESTAMP_HEADER, timestamp.as_str()),
        ];
        self.post(path, &headers, body).await
    }

    /// Every record value in the log.
    fn values(&self) -> Vec<Value> {
        (0..self.log.partitions())
            .flat_map(|p| self.log.read(p, 0, usize::MAX).expect("read"))
            .map(|r| serde_json::from_slice(&r.value).expect("JSON"))
            .collect()
    }
}

fn events() -> String {
    json!([
        {"email": "ann@example.com", "timestamp": 1_700_000_000, "event": "delivered", "sg_event_id": "sg-d-1", "sg_message_id": "m1", "smtp-id": "<x@y>"},
        {"email": "Ann@Example.com", "timestamp": 1_700_000_060, "event": "open", "sg_event_id": "sg-o-1", "useragent": "Mozilla/5.0"},
        {"email": "bob@example.com", "timestamp": 1_700_000_120, "event": "click", "sg_event_id": "sg-c-1", "url": "https://x.io/a"},
    ])
    .to_string()
}

fn key_pair() -> (SigningKey, String) {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("random bytes");
    let signing = SigningKey::from_bytes(&seed.into()).expect("a valid scalar");
    let public = p256::PublicKey::from(signing.verifying_key())
        .to_public_key_der()
        .expect("DER public key");
    let b64 = base64::engine::general_purpose::STANDARD.encode(public.as_bytes());
    (signing, b64)
}

/// SendGrid's headers for `body` signed at `timestamp` with `key`.
fn signed(key: &SigningKey, timestamp: i64, body: &str) -> (String, String) {
    let payload = format!("{timestamp}{body}");
    let signature: Signature = key.sign(payload.as_bytes());
    (
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes()),
        timestamp.to_string(),
    )
}

fn now() -> i64 {
    sluice_model::time::now_ms() / 1000
}

#[tokio::test]
async fn events_become_email_events_keyed_by_address_with_their_ids() {
    let r = Receiver::start().await;
    let reply = r
        .post(&format!("/webhooks/sendgrid?key={}", r.key), &[], &events())
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.json());
    assert_eq!(reply.json()["accepted"], 3);
    assert_eq!(
        reply.json()["messageIds"],
        json!(["sg-d-1", "sg-o-1", "sg-c-1"])
    );
    let mut values = r.values();
    values.sort_by_key(|v| v["messageId"].as_str().unwrap_or("").to_string());
    let names: Vec<(&str, &str, &str)> = values
        .iter()
        .map(|v| {
            (
                v["messageId"].as_str().unwrap_or(""),
                v["eventName"].as_str().unwrap_or(""),
                v["email"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("sg-c-1", "email_click", "bob@example.com"),
            ("sg-d-1", "email_delivered", "ann@example.com"),
            ("sg-o-1", "email_open", "ann@example.com"),
        ]
    );
    let open = &values[2];
    assert_eq!(open["createdAt"], 1_700_000_060_000i64);
    assert_eq!(open["dataFields"], json!({"useragent": "Mozilla/5.0"}));

    // Basic auth with the key as user name works too (SendGrid puts it in the URL).
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:", r.key))
    );
    let reply = r
        .post(
            "/webhooks/sendgrid",
            &[("authorization", &basic)],
            &events(),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.json());

    // A bad event is listed and the others go through; bad requests are 4xx with reasons.
    let mixed =
        json!([{"email": "c@x.io", "event": "open", "sg_event_id": "ok-1"}, {"event": "open"}]);
    let reply = r
        .post(
            &format!("/webhooks/sendgrid?key={}", r.key),
            &[],
            &mixed.to_string(),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["failed"], 1);
    assert!(
        reply.json()["failures"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("email")
    );
    let reply = r
        .post(
            &format!("/webhooks/sendgrid?key={}", r.key),
            &[],
            "{\"event\": 1}",
        )
        .await;
    assert_eq!(reply.status, 400, "not an array");
    let reply = r.post("/webhooks/sendgrid?key=nope", &[], &events()).await;
    assert_eq!(reply.status, 401);
    let reply = r.post("/webhooks/sendgrid", &[], &events()).await;
    assert_eq!(reply.status, 401, "no key at all");
    assert_eq!(r.values().len(), 7, "3 + 3 + 1 accepted, nothing else");
}

#[tokio::test]
async fn with_a_verification_key_only_fresh_valid_signatures_are_accepted() {
    let r = Receiver::start().await;
    let (signing, public) = key_pair();
    r.registry
        .set_sendgrid_key("default", Some(&public))
        .await
        .expect("set key");
    tokio::time::sleep(Duration::from_millis(50)).await; // the key cache's TTL
    let path = format!("/webhooks/sendgrid?key={}", r.key);
    let body = events();

    let (signature, timestamp) = signed(&signing, now(), &body);
    let headers = [
        (SIGNATURE_HEADER, signature.as_str()),
        (TIMESTAMP_HEADER, timestamp.as_str()),
    ];
    let reply = r.post(&path, &headers, &body).await;
    assert_eq!(reply.status, 200, "valid: {:?}", reply.json());

    // The same signature over a body changed by one byte.
    let tampered = body.replace("Mozilla/5.0", "Mozilla/5.1");
    let reply = r.post(&path, &headers, &tampered).await;
    assert_eq!(reply.status, 401, "tampered body");
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("does not verify")
    );

    // Signed by another key.
    let (other, _) = key_pair();
    let reply = r.post_signed(&path, &other, now(), &body).await;
    assert_eq!(reply.status, 401, "wrong key");

    // Correctly signed, but ten minutes old: a replay.
    let reply = r.post_signed(&path, &signing, now() - 600, &body).await;
    assert_eq!(reply.status, 401, "stale timestamp");
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("replayed")
    );

    // No signature at all.
    let reply = r.post(&path, &[], &body).await;
    assert_eq!(reply.status, 401, "unsigned");
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("missing")
    );

    assert_eq!(r.values().len(), 3, "only the valid request was accepted");
}
