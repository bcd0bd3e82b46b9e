//! Authentication: which org a request belongs to.
//!
//! Keys come from `Api-Key: KEY`, `Authorization: Bearer KEY`, or (Segment routes)
//! `Authorization: Basic base64(KEY:)`. Lookups go through a short TTL cache so the hot path does
//! not touch the registry per request; a disabled org or a new key takes effect within the TTL.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use moka::future::Cache;
use sluice_registry::{Access, KeyScope, Org, Registry};

use crate::error::ApiError;

/// Which header forms a route accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySources {
    /// `Api-Key` and `Authorization: Bearer`.
    Standard,
    /// Also `Authorization: Basic` with the key as user name (Segment).
    WithBasic,
}

pub struct Authenticator {
    registry: Arc<dyn Registry>,
    /// key → org and scope (or `None` for an unknown key), kept for `ttl`.
    cache: Cache<String, Option<(Arc<Org>, KeyScope)>>,
}

impl Authenticator {
    pub fn new(registry: Arc<dyn Registry>, ttl: Duration) -> Self {
        Authenticator {
            registry,
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Finds the key in `headers` and resolves it to an active org whose key may do `access`.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        sources: KeySources,
        access: Access,
    ) -> Result<Arc<Org>, ApiError> {
        match key_from_headers(headers, sources)? {
            Some(key) => self.org_for_key(&key, access).await,
            None => Err(ApiError::Unauthorized(match sources {
                KeySources::Standard => "missing API key: send it in the Api-Key header or as Authorization: Bearer KEY".into(),
                KeySources::WithBasic => "missing API key: send it in the Api-Key header, as Authorization: Bearer KEY, as Basic auth user name, or as writeKey in the body".into(),
            })),
        }
    }

    /// Resolves a key to its org; unknown keys and disabled orgs are 401, a key whose scope
    /// does not cover `access` is 403.
    pub async fn org_for_key(&self, key: &str, access: Access) -> Result<Arc<Org>, ApiError> {
        // Fast path: a hit allocates nothing. A miss loads once for all concurrent callers.
        let found = match self.cache.get(key).await {
            Some(found) => found,
            None => {
                let registry = Arc::clone(&self.registry);
                let owned = key.to_string();
                self.cache
                    .try_get_with(owned.clone(), async move {
                        registry
                            .key_owner(&owned)
                            .await
                            .map(|o| o.map(|(org, scope)| (Arc::new(org), scope)))
                    })
                    .await
                    .map_err(|e| {
                        ApiError::Unavailable(format!("cannot check the API key right now: {e}"))
                    })?
            }
        };
        match found {
            Some((org, _)) if !org.active => Err(ApiError::Unauthorized(format!(
                "org {:?} of this API key is disabled",
                org.name
            ))),
            Some((org, scope)) if scope.allows(access) => Ok(org),
            Some((_, scope)) => Err(ApiError::Forbidden(format!(
                "this API key's scope is {scope}: it cannot {} (use a key of scope {})",
                match access {
                    Access::Write => "write",
                    Access::Read => "read or search",
                    Access::Admin => "do this",
                },
                match access {
                    Access::Write => "full or write",
                    Access::Read => "full or read",
                    Access::Admin => "full",
                }
            ))),
            None => Err(ApiError::Unauthorized("unknown API key".into())),
        }
    }
}

fn key_from_headers(
    headers: &HeaderMap,
    sources: KeySources,
) -> Result<Option<Cow<'_, str>>, ApiError> {
    if let Some(value) = headers.get("api-key") {
        let key = value
            .to_str()
            .map_err(|_| ApiError::Unauthorized("Api-Key header is not valid text".into()))?
            .trim();
        return Ok(Some(Cow::Borrowed(key)));
    }
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("Authorization header is not valid text".into()))?
        .trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Some(Cow::Borrowed(rest.trim())));
    }
    if scheme.eq_ignore_ascii_case("basic") && sources == KeySources::WithBasic {
        let decoded = decode_base64(rest.trim()).ok_or_else(|| {
            ApiError::Unauthorized("Authorization: Basic value is not valid base64".into())
        })?;
        let text = String::from_utf8(decoded).map_err(|_| {
            ApiError::Unauthorized("Authorization: Basic value is not valid text".into())
        })?;
        let user = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
        return Ok(Some(Cow::Owned(user.to_string())));
    }
    Err(ApiError::Unauthorized(format!(
        "unsupported Authorization scheme {scheme:?}: use Bearer{}",
        if sources == KeySources::WithBasic {
            " or Basic"
        } else {
            ""
        }
    )))
}

/// Standard base64, with or without padding (clients differ).
fn decode_base64(input: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(input).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_standard_and_unpadded() {
        assert_eq!(
            decode_base64("c2tfYWJjOg==").as_deref(),
            Some(&b"sk_abc:"[..])
        );
        assert_eq!(
            decode_base64("c2tfYWJjOg").as_deref(),
            Some(&b"sk_abc:"[..])
        );
        assert_eq!(decode_base64("YQ").as_deref(), Some(&b"a"[..]));
        assert_eq!(decode_base64("!!"), None);
    }

    #[test]
    fn key_sources() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer sk_1".parse().expect("header"));
        assert_eq!(
            key_from_headers(&h, KeySources::Standard)
                .ok()
                .flatten()
                .as_deref(),
            Some("sk_1")
        );
        h.insert(
            "authorization",
            "Basic c2tfYWJjOg==".parse().expect("header"),
        );
        assert!(
            key_from_headers(&h, KeySources::Standard).is_err(),
            "Basic only on Segment routes"
        );
        assert_eq!(
            key_from_headers(&h, KeySources::WithBasic)
                .ok()
                .flatten()
                .as_deref(),
            Some("sk_abc")
        );
        h.insert("api-key", "sk_2".parse().expect("header"));
        assert_eq!(
            key_from_headers(&h, KeySources::Standard)
                .ok()
                .flatten()
                .as_deref(),
            Some("sk_2")
        );
    }
}
