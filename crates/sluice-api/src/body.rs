//! Reading a request body within the size limit, and parsing it as JSON with errors that point
//! at the problem.

use axum::extract::{FromRef, FromRequest, Request};
use axum::http::header;
use bytes::Bytes;

use crate::error::ApiError;
use crate::Limits;

/// The raw body of a request, at most `Limits::max_request_bytes` long (else 413).
pub struct LimitedBody(pub Bytes);

impl<S> FromRequest<S> for LimitedBody
where
    Limits: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = Limits::from_ref(state).max_request_bytes;
        let too_large = |size: Option<u64>| {
            ApiError::TooLarge(match size {
                Some(size) => format!("request body is {size} bytes; the limit is {limit} bytes"),
                None => format!("request body is larger than the {limit}-byte limit"),
            })
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(size) = declared {
            if size > limit as u64 {
                return Err(too_large(Some(size)));
            }
        }
        match axum::body::to_bytes(req.into_body(), limit).await {
            Ok(bytes) => Ok(LimitedBody(bytes)),
            Err(e) => {
                let is_limit = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
                if is_limit {
                    Err(too_large(None))
                } else {
                    Err(ApiError::BadRequest(format!("could not read the request body: {e}")))
                }
            }
        }
    }
}
