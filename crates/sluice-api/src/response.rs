//! The success body of every ingest route (SPEC §4).

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::ser::SerializeSeq;
use sluice_model::Message;

/// One refused item of a request: its index in the request, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Failure {
    pub index: usize,
    pub error: String,
}

/// A 200 answer, serialized while the messages (and their ids) are still borrowed from the
/// request body, so no id is copied.
#[derive(Debug)]
pub struct Accepted {
    body: Vec<u8>,
}

#[derive(Serialize)]
struct AcceptedBody<'a> {
    code: &'static str,
    accepted: usize,
    failed: usize,
    failures: &'a [Failure],
    #[serde(rename = "messageIds")]
    message_ids: MessageIds<'a>,
}

struct MessageIds<'a>(&'a [Message<'a>]);

impl Serialize for MessageIds<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for message in self.0 {
            seq.serialize_element(message.message_id.as_ref())?;
        }
        seq.end()
    }
}

impl Accepted {
    pub fn new(messages: &[Message<'_>], failures: &[Failure]) -> Accepted {
        let body = AcceptedBody {
            code: "Success",
            accepted: messages.len(),
            failed: failures.len(),
            failures,
            message_ids: MessageIds(messages),
        };
        let mut buf = Vec::with_capacity(96 + 40 * messages.len());
        // Strings and integers into a Vec: serialization cannot fail.
        let _ = serde_json::to_writer(&mut buf, &body);
        Accepted { body: buf }
    }
}

impl IntoResponse for Accepted {
    fn into_response(self) -> Response {
        let mut response = self.body.into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}
