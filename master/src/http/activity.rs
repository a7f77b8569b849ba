//! What the core tells the monitor as it goes: finished jobs per time bucket (the overview's
//! throughput chart) and job durations (the Prometheus histogram).
//!
//! Kept in memory and bounded: [`BUCKETS`] buckets of [`BUCKET_MS`]. The histogram is rebuilt
//! from the store when the master starts; the throughput chart starts empty.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::metrics::Metrics;

/// Width of one throughput bucket.
pub const BUCKET_MS: u64 = 10_000;
/// Buckets kept (one hour).
pub const BUCKETS: usize = 360;

/// Shared between the core (writer) and the HTTP handlers (readers).
#[derive(Debug, Default)]
pub struct Activity {
    pub metrics: Metrics,
    finished: Mutex<VecDeque<(u64, u64)>>,
}

impl Activity {
    /// Records one finished attempt (any final state), `duration_ms` long, at `now_ms`.
    pub fn finished(&self, now_ms: u64, duration_ms: Option<u64>) {
        if let Some(d) = duration_ms {
            #[allow(clippy::cast_precision_loss)]
            self.metrics.observe_duration(d as f64 / 1000.0);
        }
        let bucket = now_ms / BUCKET_MS;
        if let Ok(mut q) = self.finished.lock() {
            match q.back_mut() {
                Some((b, n)) if *b == bucket => *n += 1,
                _ => q.push_back((bucket, 1)),
            }
            while q
                .front()
                .is_some_and(|(b, _)| *b + (BUCKETS as u64) <= bucket)
            {
                q.pop_front();
            }
        }
    }

    /// Jobs finished per bucket over the last hour, oldest first, with empty buckets as zeros:
    /// `(bucket start in ms, count)`.
    pub fn throughput(&self, now_ms: u64) -> Vec<(u64, u64)> {
        let last = now_ms / BUCKET_MS;
        let first = (last + 1).saturating_sub(BUCKETS as u64);
        let q = self.finished.lock().map(|q| q.clone()).unwrap_or_default();
        (first..=last)
            .map(|b| {
                let n = q.iter().find(|(x, _)| *x == b).map_or(0, |(_, n)| *n);
                (b * BUCKET_MS, n)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_fill_and_age_out() {
        let a = Activity::default();
        a.finished(0, Some(1000));
        a.finished(5_000, None);
        a.finished(25_000, Some(10));
        let t = a.throughput(25_000);
        assert_eq!(t.len(), 3);
        assert_eq!(t, vec![(0, 2), (10_000, 0), (20_000, 1)]);
        // An hour later the first bucket is gone.
        a.finished(3_600_000, None);
        let t = a.throughput(3_600_000);
        assert_eq!(t.len(), BUCKETS);
        assert_eq!(t.iter().map(|(_, n)| n).sum::<u64>(), 2);
    }
}
