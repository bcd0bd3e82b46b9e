//! Backpressure: a bound on the request body bytes being handled at once. A request takes its
//! share (its `Content-Length`; the request limit for a chunked body of unknown length or a
//! compressed one; the minimum for a request without a body) before its body is read and holds it until it is
//! answered. When the bound is reached, requests
//! wait for room instead of failing; one that waits longer than `in_flight_wait` gets a 503
//! with `Retry-After`, having read nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::AppState;
use crate::error::ApiError;

/// Permits are KiB, so the semaphore's u32 counts cover terabytes.
const UNIT: usize = 1024;

pub(crate) struct InFlight {
    permits: Arc<Semaphore>,
    total: u32,
    wait: Duration,
}

impl InFlight {
    pub(crate) fn new(max_bytes: usize, wait: Duration) -> Self {
        let total = u32::try_from(max_bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        InFlight {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
            wait,
        }
    }

    /// The share of a request declaring `length` bytes (at most the whole bound, so one large
    /// request can always run alone).
    fn share(&self, length: Option<u64>, limit: usize) -> u32 {
        let bytes = length.map_or(limit as u64, |l| l.min(limit as u64));
        u32::try_from(bytes.div_ceil(UNIT as u64).max(1))
            .unwrap_or(u32::MAX)
            .min(self.total)
    }
}

/// On the data routes: `inner` runs once the request holds its share of the bound.
pub(crate) async fn bounded<F, Fut>(app: &AppState, request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let headers = request.headers();
    let length = match crate::body::declared_length(headers) {
        // A compressed body may decode to the request limit, whatever it declares.
        _ if crate::body::is_encoded(headers) => None,
        Some(length) => Some(length),
        // A body of unknown length: count it at the request limit.
        None if headers.contains_key(header::TRANSFER_ENCODING) => None,
        // No body at all (a GET, a read).
        None => Some(0),
    };
    let in_flight = &app.in_flight;
    let share = in_flight.share(length, app.limits.max_request_bytes);
    let permit = match tokio::time::timeout(
        in_flight.wait,
        Arc::clone(&in_flight.permits).acquire_many_owned(share),
    )
    .await
    {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) => {
            return ApiError::Unavailable("the server is shutting down".into()).into_response();
        }
        Err(_) => {
            return ApiError::Unavailable(format!(
                "the server is at its bound of {} KiB of requests in flight and no room came free within {:?}; retry the request",
                in_flight.total, in_flight.wait
            ))
            .into_response();
        }
    };
    let response = inner(request).await;
    drop(permit);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_kib_capped_at_the_limit_and_the_bound() {
        let f = InFlight::new(1 << 20, Duration::from_secs(1));
        assert_eq!(f.total, 1024);
        assert_eq!(f.share(Some(0), 10 << 20), 1);
        assert_eq!(f.share(Some(1025), 10 << 20), 2);
        // Undeclared: the request limit, capped at the whole bound.
        assert_eq!(f.share(None, 512 << 10), 512);
        assert_eq!(f.share(None, 10 << 20), 1024);
        assert_eq!(f.share(Some(u64::MAX), 10 << 20), 1024);
    }
}
