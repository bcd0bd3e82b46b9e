//! CORS for browsers (SPEC §4): the write routes (native ingest, `/v1/*`, webhooks) answer
//! preflights and carry `Access-Control-Allow-Origin` for the origins in `cors_origins`
//! (default `*`); the read routes do so only with `cors_read = true`, since a key that can
//! read should not sit in a web page. tower-http's CORS layer does the work.
//!
//! The layer covers every API route; [`policy`], in front of it, decides which keep what it
//! adds. A preflight from an origin not listed, or for a read while `cors_read` is off, gets a
//! 403 with the JSON error body and no CORS header (tower-http alone would answer it 200
//! without `Access-Control-Allow-Origin`, which a browser refuses just the same but says less
//! to whoever reads the exchange).

use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowHeaders, AllowOrigin, Any, CorsLayer};

use crate::error::ApiError;

/// Which browser origins may call sluice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsConfig {
    /// Origins (`https://app.example.com`), or `*` for any.
    pub origins: Vec<String>,
    /// Whether the read routes are offered cross-origin too.
    pub read: bool,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            origins: vec!["*".into()],
            read: false,
        }
    }
}

impl CorsConfig {
    /// Checks every origin: `*`, or `scheme://host[:port]` as a browser sends it.
    pub fn validate(&self) -> Result<(), String> {
        for origin in &self.origins {
            if origin == "*" {
                continue;
            }
            let well_formed = (origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.ends_with('/')
                && origin
                    .split("://")
                    .nth(1)
                    .is_some_and(|rest| !rest.is_empty() && !rest.contains(['/', '?', '#', ' ']))
                && HeaderValue::from_str(origin).is_ok();
            if !well_formed {
                return Err(format!(
                    "cors_origins: {origin:?} is not an origin: expected scheme://host[:port] (no path, no trailing slash) or \"*\""
                ));
            }
        }
        Ok(())
    }

    fn any(&self) -> bool {
        self.origins.iter().any(|o| o == "*")
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        self.any()
            || self
                .origins
                .iter()
                .any(|o| o.as_bytes() == origin.as_bytes())
    }

    /// The layer for the routes a browser may call.
    pub(crate) fn layer(&self) -> CorsLayer {
        let layer = CorsLayer::new()
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            // Whatever headers the page asks for: the SDKs add their own (analytics.js
            // `X-Retry-Count`; RudderStack's `AnonymousId`, `SentAt`, `Rsa-*`), and no browser
            // credential is honoured cross-origin (no cookies; a key authenticates), so a
            // header list would only break the next SDK release.
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([
                header::RETRY_AFTER,
                HeaderName::from_static(crate::metrics::REQUEST_ID),
            ])
            .max_age(Duration::from_secs(600));
        if self.any() {
            layer.allow_origin(Any)
        } else {
            // Validated at start: every listed origin is a header value.
            layer.allow_origin(AllowOrigin::list(
                self.origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            ))
        }
    }
}

/// Whether `method path` is a write a page may send: native ingest, `/v1/*`, webhooks.
fn is_write(method: &[u8], path: &str) -> bool {
    method == b"POST"
        && (path.starts_with("/api/events/")
            || path == "/api/users/update"
            || path == "/api/users/bulkUpdate"
            || path.starts_with("/v1/")
            || path.starts_with("/webhooks/"))
}

/// In front of the CORS layer (`inner`): which routes keep what it adds. A preflight from an
/// origin not listed, or for a read while `cors_read` is off, is a 403 with the JSON error
/// body; a read's answer loses the CORS headers while `cors_read` is off.
pub(crate) async fn policy<F, Fut>(config: &CorsConfig, request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let headers = request.headers();
    let path = request.uri().path();
    let offered = |method: &[u8]| config.read || is_write(method, path);
    if request.method() == Method::OPTIONS
        && let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)
        && let Some(origin) = headers.get(header::ORIGIN)
    {
        if !config.allows(origin) {
            return ApiError::Forbidden(format!(
                "origin {origin:?} is not in cors_origins: this server does not take requests from that page"
            ))
            .into_response();
        }
        if !offered(asked.as_bytes()) {
            return ApiError::Forbidden(format!(
                "{} {path} is not offered to browsers of other origins (cors_read = false: a key that can read does not belong in a web page)",
                String::from_utf8_lossy(asked.as_bytes())
            ))
            .into_response();
        }
    }
    // A preflight (let through above) is about the method it asks for.
    let method: &[u8] = match request.method() {
        &Method::OPTIONS => headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .map_or(b"OPTIONS", |m| m.as_bytes()),
        other => other.as_str().as_bytes(),
    };
    let read = !offered(method);
    let mut response = inner(request).await;
    if read {
        let cors: Vec<HeaderName> = response
            .headers()
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in cors {
            response.headers_mut().remove(name);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        let ok = CorsConfig {
            origins: vec![
                "*".into(),
                "https://app.example.com".into(),
                "http://127.0.0.1:8000".into(),
            ],
            read: false,
        };
        assert_eq!(ok.validate(), Ok(()));
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://x.com/path",
            "ftp://x",
            "https://",
        ] {
            let config = CorsConfig {
                origins: vec![bad.into()],
                read: false,
            };
            let error = config.validate().expect_err(bad);
            assert!(error.contains(bad), "{error}");
        }
    }
}
