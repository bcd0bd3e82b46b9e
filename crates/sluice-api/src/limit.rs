//! Per-org rate limits (SPEC §3): a token bucket per org (governor's GCRA), counted in
//! messages. A request is admitted whole or not at all: its n messages are checked at once,
//! before anything is written, and a refused request gets a 429 with `Retry-After` (the
//! seconds until n messages fit) and writes nothing. A request of more messages than the
//! org's burst can never fit: a 413 that says so.
//!
//! The limit is the org's own (`sluice orgs set-limit`), else `org_events_per_second` (0:
//! none). Each API node keeps its own buckets: on N nodes an org may send up to N times its
//! limit in all. A bucket is kept per (org, rate, burst), so a changed limit takes effect
//! with the org's next lookup (within `key_cache_ttl`).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use moka::future::Cache;
use sluice_registry::{Org, RateLimit};

use crate::error::ApiError;

type Bucket = Arc<DefaultDirectRateLimiter>;

pub(crate) struct RateLimits {
    /// `org_events_per_second` (with a burst of one second's worth); `None`: unlimited.
    default: Option<RateLimit>,
    buckets: Cache<(i64, u32, u32), Bucket>,
}

impl RateLimits {
    pub(crate) fn new(events_per_second: u32) -> RateLimits {
        RateLimits {
            default: (events_per_second > 0).then_some(RateLimit {
                per_second: events_per_second,
                burst: events_per_second,
            }),
            buckets: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// Takes `messages` from the org's bucket, or says when they would fit.
    pub(crate) async fn admit(&self, org: &Org, messages: usize) -> Result<(), ApiError> {
        let Some(limit) = org.limit.or(self.default) else {
            return Ok(());
        };
        let (Some(rate), Some(n)) = (
            NonZeroU32::new(limit.per_second),
            NonZeroU32::new(u32::try_from(messages).unwrap_or(u32::MAX)),
        ) else {
            return Ok(()); // a rate of 0 is no limit; no message takes nothing
        };
        let burst = NonZeroU32::new(limit.burst).unwrap_or(rate);
        let bucket = self
            .buckets
            .get_with((org.id, rate.get(), burst.get()), async move {
                Arc::new(RateLimiter::direct(
                    Quota::per_second(rate).allow_burst(burst),
                ))
            })
            .await;
        match bucket.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(ApiError::RateLimited {
                    message: format!(
                        "org {:?} is over its rate limit of {} messages per second (burst {}): this request's {messages} messages were not written; retry after the Retry-After seconds",
                        org.name, rate, burst
                    ),
                    retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                })
            }
            Err(_) => Err(ApiError::TooLarge(format!(
                "the request has {messages} messages, more than org {:?}'s burst of {burst} can ever admit at once: send at most {burst} per request",
                org.name
            ))),
        }
    }
}
