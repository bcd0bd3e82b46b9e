//! Reading a request body within the size limit, and parsing it as JSON with errors that point
//! at the problem.

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

/// The body size a request declares (`Content-Length`), if it declares one.
pub(crate) fn declared_length(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

async fn read_body(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large = |size: Option<u64>| {
        ApiError::TooLarge(match size {
            Some(size) => format!("request body is {size} bytes; the limit is {limit} bytes"),
            None => format!("request body is larger than the {limit}-byte limit"),
        })
    };
    if let Some(size) = declared_length(headers)
        && size > limit as u64
    {
        return Err(too_large(Some(size)));
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes),
        Err(e) => {
            let is_limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if is_limit {
                Err(too_large(None))
            } else {
                Err(ApiError::BadRequest(format!(
                    "could not read the request body: {e}"
                )))
            }
        }
    }
}
