//! Reading a request body within the size limit, and parsing it as JSON with errors that point
//! at the problem.
//!
//! Compressed bodies (`Content-Encoding: gzip` or `deflate`, SPEC §4) are decoded on the way in
//! by tower-http's decompression layer (`crate::router`), so the limit applies to the decoded
//! bytes: a decompression bomb is cut off with a 413 once it passes the limit, having decoded
//! at most that much. [`known_encoding`] refuses other encodings first, with a JSON 415.

use axum::extract::Request;
use axum::http::header;
use bytes::Bytes;

use crate::error::ApiError;

/// Splits a request into its headers and its body, read within `limit` bytes (else 413).
pub(crate) async fn read_request(
    req: Request,
    limit: usize,
) -> Result<(axum::http::request::Parts, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    let body = read_body(&parts.headers, body, limit).await?;
    Ok((parts, body))
}

/// The content codings a request body may have.
const ENCODINGS: [&str; 3] = ["gzip", "deflate", "identity"];

/// A `Content-Encoding` sluice cannot decode is a 415 that names it; a known one is passed on
/// to `inner` in lower case (codings are case-insensitive; the decoder matches lower case).
pub(crate) async fn known_encoding<F, Fut>(
    mut request: axum::extract::Request,
    inner: F,
) -> axum::response::Response
where
    F: FnOnce(axum::extract::Request) -> Fut,
    Fut: Future<Output = axum::response::Response>,
{
    use axum::response::IntoResponse;
    if let Some(encoding) = request.headers().get(header::CONTENT_ENCODING) {
        let known = encoding.to_str().ok().and_then(|e| {
            ENCODINGS
                .iter()
                .find(|known| e.trim().eq_ignore_ascii_case(known))
        });
        let Some(known) = known else {
            let refused = ApiError::UnsupportedEncoding(format!(
                "Content-Encoding {encoding:?} is not supported: send the body as gzip, deflate or uncompressed"
            ));
            drain(request.into_body()).await;
            return refused.into_response();
        };
        request.headers_mut().insert(
            header::CONTENT_ENCODING,
            axum::http::HeaderValue::from_static(known),
        );
    }
    inner(request).await
}

/// Whether the body comes compressed (its declared length is not what it decodes to).
pub(crate) fn is_encoded(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// The body size a request declares (`Content-Length`), if it declares one.
pub(crate) fn declared_length(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// How much of a refused body is read and thrown away, and for how long, so that a client
/// that sends its whole body before it reads (Python's urllib and requests) gets the answer
/// instead of a reset connection (SPEC §4). Past either bound the connection is closed.
const DRAIN_BYTES: u64 = 64 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and discards what is left of `body`, within [`DRAIN_BYTES`] and [`DRAIN_TIME`].
pub(crate) async fn drain(mut body: axum::body::Body) {
    use http_body_util::BodyExt;
    let mut left = DRAIN_BYTES;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            let size = frame.data_ref().map_or(0, |d| d.len() as u64);
            left = left.saturating_sub(size);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

async fn read_body(
    headers: &axum::http::HeaderMap,
    mut body: axum::body::Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let too_large = |size: Option<u64>| {
        ApiError::TooLarge(match size {
            Some(size) => format!("request body is {size} bytes; the limit is {limit} bytes"),
            None => format!("request body is larger than the {limit}-byte limit"),
        })
    };
    let declared = declared_length(headers);
    if let Some(size) = declared
        && size > limit as u64
    {
        if size <= DRAIN_BYTES {
            drain(body).await;
        }
        return Err(too_large(Some(size)));
    }
    // One chunk (the usual case) is kept as it came; more are gathered into one buffer.
    let mut first: Option<Bytes> = None;
    let mut gathered = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            // A broken gzip or deflate stream ends up here too, with the decoder's words.
            let mut cause = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                cause = inner.to_string();
                source = inner.source();
            }
            ApiError::BadRequest(format!("could not read the request body: {cause}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let held = first.as_ref().map_or(0, Bytes::len) + gathered.len();
        if held + data.len() > limit {
            drain(body).await;
            return Err(too_large(None));
        }
        match first.take() {
            None if gathered.is_empty() => first = Some(data),
            None => gathered.extend_from_slice(&data),
            Some(kept) => {
                let expected = declared.map_or(0, |d| d as usize).min(limit);
                gathered.reserve(expected.max(kept.len() + data.len()));
                gathered.extend_from_slice(&kept);
                gathered.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| gathered.freeze()))
}
