//! The SendGrid Event Webhook receiver, `POST /webhooks/sendgrid` (SPEC §4).
//!
//! Auth: the API key as `?key=KEY`, or the usual headers (Basic auth with the key as user name
//! included), since SendGrid can put either in the webhook URL. When the org has a verification
//! key (`sluice orgs set-sendgrid-key`), the request must also carry SendGrid's signature: ECDSA
//! P-256 with SHA-256 over the `X-Twilio-Email-Event-Webhook-Timestamp` header followed by the
//! raw body, base64 DER in `X-Twilio-Email-Event-Webhook-Signature`, checked on the bytes as
//! received, with the timestamp within `sendgrid_max_age` of now (a replayed old request fails).
//!
//! Answers are chosen for SendGrid's retries (it retries a non-2xx for 24 hours): 200 only once
//! every accepted event is durable; 503 when it cannot be made durable now (SendGrid retries);
//! 400/401/413 for a request that cannot succeed as sent. Invalid events in a valid array are
//! listed in `failures` and do not stop the others.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use base64::Engine;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde_json::value::RawValue;
use sluice_model::sendgrid::parse_sendgrid_event;
use sluice_registry::Org;

use crate::AppState;
use crate::auth::KeySources;
use crate::body::read_request;
use crate::error::{ApiError, json_error};
use crate::ingest::{accept, parse_items};
use crate::response::Accepted;

pub const SIGNATURE_HEADER: &str = "x-twilio-email-event-webhook-signature";
pub const TIMESTAMP_HEADER: &str = "x-twilio-email-event-webhook-timestamp";

/// A verification key as SendGrid shows it (base64 of the DER public key), checked.
pub fn parse_verification_key(base64_der: &str) -> Result<VerifyingKey, String> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(base64_der.trim())
        .map_err(|e| format!("the SendGrid verification key is not valid base64: {e}"))?;
    VerifyingKey::from_public_key_der(&der).map_err(|e| {
        format!("the SendGrid verification key is not an ECDSA P-256 public key (base64 DER): {e}")
    })
}

/// SendGrid's Event Webhook: each event becomes event `email_<event>` of user `email`.
#[utoipa::path(
    post,
    path = "/webhooks/sendgrid",
    tag = "webhooks",
    params(("key" = Option<String>, Query, description = "The API key, when no header carries it")),
    request_body = Vec<crate::openapi::SendgridEvent>,
    security(("key_query" = []), ("api_key" = []), ("bearer" = []), ("basic" = [])),
    responses(crate::openapi::IngestAnswers),
)]
pub(crate) async fn webhook(
    State(app): State<AppState>,
    request: Request,
) -> Result<Accepted, ApiError> {
    let key_param = query_key(request.uri().query());
    let (parts, body) = read_request(request, app.limits.max_request_bytes).await?;
    let org: Arc<Org> = match key_param {
        Some(key) => {
            app.auth
                .org_for_key(&key, sluice_registry::Access::Write)
                .await?
        }
        None => {
            app.auth
                .authenticate(
                    &parts.headers,
                    KeySources::WithBasic,
                    sluice_registry::Access::Write,
                )
                .await?
        }
    };
    if let Some(key) = &org.sendgrid_key {
        verify(key, &parts.headers, &body, app.sendgrid_max_age)?;
    }
    let items: Vec<&RawValue> = serde_json::from_slice(&body)
        .map_err(|e| json_error(&e, "body must be a JSON array of SendGrid events"))?;
    let (messages, failures) = parse_items(&items, "the event array", &app.limits, |item| {
        parse_sendgrid_event(item)
    })?;
    accept(&app, &org, messages, failures).await
}

/// `key` from the query string, percent-decoded.
fn query_key(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(name, _)| name == "key")
        .map(|(_, value)| value.into_owned())
}

/// Checks SendGrid's signature over timestamp + raw body with the org's key.
fn verify(
    key: &str,
    headers: &HeaderMap,
    body: &[u8],
    max_age: std::time::Duration,
) -> Result<(), ApiError> {
    let unauthorized = |m: String| ApiError::Unauthorized(m);
    let key = parse_verification_key(key).map_err(|e| {
        unauthorized(format!(
            "{e}; set it again with `sluice orgs set-sendgrid-key`"
        ))
    })?;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .ok_or_else(|| {
                unauthorized(format!(
                    "this org verifies SendGrid signatures: header {name} is missing"
                ))
            })
    };
    let signature = header(SIGNATURE_HEADER)?;
    let timestamp = header(TIMESTAMP_HEADER)?;
    let seconds: i64 = timestamp.parse().map_err(|_| {
        unauthorized(format!(
            "{TIMESTAMP_HEADER} {timestamp:?} is not unix seconds"
        ))
    })?;
    let now = sluice_model::time::now_ms() / 1000;
    if (now - seconds).unsigned_abs() > max_age.as_secs() {
        return Err(unauthorized(format!(
            "{TIMESTAMP_HEADER} is {}s away from now (at most {}s): a stale or replayed request",
            now - seconds,
            max_age.as_secs()
        )));
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| unauthorized(format!("{SIGNATURE_HEADER} is not valid base64")))?;
    let signature = Signature::from_der(&der)
        .map_err(|_| unauthorized(format!("{SIGNATURE_HEADER} is not a DER ECDSA signature")))?;
    let mut signed = Vec::with_capacity(timestamp.len() + body.len());
    signed.extend_from_slice(timestamp.as_bytes());
    signed.extend_from_slice(body);
    key.verify(&signed, &signature).map_err(|_| {
        unauthorized(
            "the SendGrid signature does not verify with this org's key (tampered body, or another key)"
                .into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_comes_from_the_query_string_decoded() {
        assert_eq!(
            query_key(Some("key=sk_a%2Bb&x=1")).as_deref(),
            Some("sk_a+b")
        );
        assert_eq!(query_key(Some("x=1&key=abc")).as_deref(), Some("abc"));
        assert_eq!(query_key(Some("x=1")), None);
        assert_eq!(query_key(None), None);
    }

    #[test]
    fn a_bad_verification_key_is_explained() {
        let error = |key| parse_verification_key(key).expect_err("invalid key");
        assert!(error("not base64!").contains("base64"));
        assert!(error("AAAA").contains("P-256"));
    }
}
