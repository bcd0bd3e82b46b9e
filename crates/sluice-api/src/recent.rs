//! The last minutes of acknowledged ingest, per second: how many messages were made durable
//! and how long their requests waited for it. The dashboard's rate and latency charts
//! (`/stats`, SPEC §9) read it; Prometheus has the same latency as a histogram for the long
//! run.
//!
//! One slot per second in a ring of [`SECONDS`]; a slot holds its second, a message count and
//! the latency counts in the buckets of [`crate::metrics::LATENCY_BUCKETS`] (and one past the
//! last). Recording is a few relaxed atomic adds, no lock and no allocation. The first
//! recorder of a new second resets the slot; a sample racing that reset may be lost or land in
//! the new second: a dashboard can afford that, nothing else reads it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::metrics::LATENCY_BUCKETS;

/// How far back the ring goes.
pub const SECONDS: u64 = 300;
/// The width of one point of [`Recent::series`].
pub const POINT_SECONDS: u64 = 10;

const BUCKETS: usize = LATENCY_BUCKETS.len() + 1;

struct Slot {
    second: AtomicU64,
    messages: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

/// The ring (one per process: [`recent`]).
pub struct Recent {
    slots: Box<[Slot]>,
    total: AtomicU64,
}

/// One point of the charts: `POINT_SECONDS` ending at `at` (unix seconds).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    pub at: u64,
    /// Messages acknowledged per second.
    pub rate: f64,
    /// The bucket bounds the median and 99th percentile fall in, in ms (none without
    /// requests).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// The ring of this process.
pub fn recent() -> &'static Recent {
    static RECENT: OnceLock<Recent> = OnceLock::new();
    RECENT.get_or_init(Recent::new)
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Default for Recent {
    fn default() -> Self {
        Recent::new()
    }
}

impl Recent {
    pub fn new() -> Recent {
        Recent {
            slots: (0..SECONDS)
                .map(|_| Slot {
                    second: AtomicU64::new(0),
                    messages: AtomicU64::new(0),
                    latency: std::array::from_fn(|_| AtomicU64::new(0)),
                })
                .collect(),
            total: AtomicU64::new(0),
        }
    }

    /// A request whose `messages` were acknowledged after `waited`.
    pub fn record(&self, messages: u64, waited: Duration) {
        self.record_at(unix_seconds(), messages, waited);
    }

    fn record_at(&self, second: u64, messages: u64, waited: Duration) {
        let slot = &self.slots[(second % SECONDS) as usize];
        let was = slot.second.load(Ordering::Relaxed);
        if was != second
            && slot
                .second
                .compare_exchange(was, second, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            slot.messages.store(0, Ordering::Relaxed);
            for bucket in &slot.latency {
                bucket.store(0, Ordering::Relaxed);
            }
        }
        let seconds = waited.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        slot.messages.fetch_add(messages, Ordering::Relaxed);
        slot.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(messages, Ordering::Relaxed);
    }

    /// Messages acknowledged since the process started.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The complete seconds before now, as points of [`POINT_SECONDS`], oldest first.
    pub fn series(&self) -> Vec<Point> {
        self.series_at(unix_seconds())
    }

    fn series_at(&self, now: u64) -> Vec<Point> {
        // The current second is still filling: points end at the one before it.
        let last = now.saturating_sub(1);
        let points = SECONDS / POINT_SECONDS - 1;
        (0..points)
            .rev()
            .map(|back| {
                let end = last.saturating_sub(back * POINT_SECONDS);
                self.point(end)
            })
            .collect()
    }

    /// The median and 99th percentile latency (ms) over the whole window, up to the second
    /// before now.
    pub fn quantiles(&self) -> (Option<f64>, Option<f64>) {
        let last = unix_seconds().saturating_sub(1);
        let (_, latency) = self.sum(last.saturating_sub(SECONDS - 2), last);
        (quantile(&latency, 0.50), quantile(&latency, 0.99))
    }

    /// The point of the `POINT_SECONDS` seconds ending at `end`.
    fn point(&self, end: u64) -> Point {
        let (messages, latency) = self.sum(end.saturating_sub(POINT_SECONDS - 1), end);
        Point {
            at: end,
            rate: messages as f64 / POINT_SECONDS as f64,
            p50_ms: quantile(&latency, 0.50),
            p99_ms: quantile(&latency, 0.99),
        }
    }

    /// Messages and latency counts of the seconds `first..=last`.
    fn sum(&self, first: u64, last: u64) -> (u64, [u64; BUCKETS]) {
        let mut messages = 0;
        let mut latency = [0u64; BUCKETS];
        for second in first..=last {
            let slot = &self.slots[(second % SECONDS) as usize];
            if slot.second.load(Ordering::Acquire) != second {
                continue;
            }
            messages += slot.messages.load(Ordering::Relaxed);
            for (sum, bucket) in latency.iter_mut().zip(&slot.latency) {
                *sum += bucket.load(Ordering::Relaxed);
            }
        }
        (messages, latency)
    }
}

/// The upper bound (ms) of the bucket holding quantile `q`; past the last bound, twice it.
fn quantile(counts: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let bound = LATENCY_BUCKETS
                .get(i)
                .copied()
                .unwrap_or(LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1] * 2.0);
            return Some(bound * 1000.0);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_sum_their_seconds_and_forget_older_ones() {
        let recent = Recent::new();
        let now = 1_000_000;
        // 100 messages a second for 20 s, each request 1 ms; one slow request of 2 s.
        for second in now - 20..now {
            for _ in 0..10 {
                recent.record_at(second, 10, Duration::from_micros(900));
            }
        }
        recent.record_at(now - 1, 1, Duration::from_secs(2));
        let series = recent.series_at(now);
        assert_eq!(series.len() as u64, SECONDS / POINT_SECONDS - 1);
        let last = series.last().expect("a point");
        assert_eq!(last.at, now - 1);
        assert_eq!(last.rate, 100.1);
        assert_eq!(last.p50_ms, Some(1.0));
        // 101 requests: the 100th is the 99th percentile, still 1 ms; the slow one is past.
        assert_eq!(last.p99_ms, Some(1.0));
        assert_eq!(series[series.len() - 2].rate, 100.0);
        assert_eq!(series[series.len() - 3].rate, 0.0);
        assert_eq!(series[series.len() - 3].p50_ms, None);
        assert_eq!(recent.total(), 20 * 100 + 1);

        // A whole ring later, the old seconds are gone though their slots were not reused.
        let later = recent.series_at(now + SECONDS + 5);
        assert!(later.iter().all(|p| p.rate == 0.0), "{later:?}");
        // Reusing a slot resets it.
        recent.record_at(now - 1 + SECONDS, 3, Duration::from_millis(30));
        let point = recent.point(now - 1 + SECONDS);
        assert_eq!(point.rate, 0.3);
        assert_eq!(point.p99_ms, Some(50.0));
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let mut counts = [0u64; BUCKETS];
        counts[2] = 98; // ≤ 1 ms
        counts[5] = 2; // ≤ 10 ms
        assert_eq!(quantile(&counts, 0.5), Some(1.0));
        assert_eq!(quantile(&counts, 0.99), Some(10.0));
        counts[BUCKETS - 1] = 1000;
        assert_eq!(quantile(&counts, 0.99), Some(20_000.0));
        assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
    }
}
