//! A latency histogram the data path records into without a lock.
//!
//! `prometheus-client`'s own histogram takes a mutex per observation; this one keeps one atomic
//! counter per bucket and an atomic sum (in nanoseconds), so workers record side by side. A
//! request's duration enters through [`Histogram::observe`]; `/metrics` reads it out through
//! `prometheus-client`'s encoder, in seconds, as a classic cumulative histogram. A
//! [`LazyHistogram`] holds its buckets only from its first observation: one per cluster, most of
//! which a large config's proxy never sends a request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Bucket upper bounds, in seconds: from half a millisecond (a sidecar's own share) to ten
/// seconds (a slow upstream), roughly 1-2.5-5 per decade.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The bucket bounds in nanoseconds, compared against on every observation.
const BOUNDS_NANOS: [u64; 14] = {
    let mut nanos = [0; 14];
    let mut i = 0;
    while i < 14 {
        nanos[i] = (LATENCY_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};

#[derive(Debug, Default)]
struct Inner {
    /// Observations per bucket (not cumulative); the last is above every bound (+Inf).
    buckets: [AtomicU64; 15],
    sum_nanos: AtomicU64,
}

/// A latency histogram; clones share their counts.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    inner: Arc<Inner>,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let index = BOUNDS_NANOS.iter().position(|bound| nanos <= *bound).unwrap_or(BOUNDS_NANOS.len());
        self.inner.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode(Some(&self.inner), encoder)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A latency histogram whose buckets are allocated at its first observation; until then it reads
/// out as an empty one.
#[derive(Debug, Default)]
pub struct LazyHistogram(OnceLock<Box<Inner>>);

impl LazyHistogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let inner = self.0.get_or_init(Box::default);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let index = BOUNDS_NANOS.iter().position(|bound| nanos <= *bound).unwrap_or(BOUNDS_NANOS.len());
        inner.buckets[index].fetch_add(1, Ordering::Relaxed);
        inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for LazyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LazyHistogram {
    fn encode(&self, encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode(self.0.get().map(|inner| &**inner), encoder)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Writes `inner`'s counts (none: all zero) as a cumulative histogram in seconds.
fn encode(inner: Option<&Inner>, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
    let mut buckets = [(0.0, 0); 15];
    for (i, bucket) in buckets.iter_mut().enumerate() {
        let bound = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
        *bucket = (bound, inner.map_or(0, |inner| inner.buckets[i].load(Ordering::Relaxed)));
    }
    let count = buckets.iter().map(|(_, n)| n).sum();
    let sum = inner.map_or(0, |inner| inner.sum_nanos.load(Ordering::Relaxed)) as f64 / 1e9;
    encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use prometheus_client::registry::Registry;

    use super::*;

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(300));
        histogram.observe(Duration::from_micros(500));
        histogram.observe(Duration::from_millis(7));
        histogram.observe(Duration::from_secs(60));
        let mut registry = Registry::default();
        registry.register("latency_seconds", "test", histogram.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(r#"latency_seconds_bucket{le="0.0005"} 2"#), "{text}");
        assert!(text.contains(r#"latency_seconds_bucket{le="0.005"} 2"#), "{text}");
        assert!(text.contains(r#"latency_seconds_bucket{le="0.01"} 3"#), "{text}");
        assert!(text.contains(r#"latency_seconds_bucket{le="10.0"} 3"#), "{text}");
        assert!(text.contains(r#"latency_seconds_bucket{le="+Inf"} 4"#), "{text}");
        assert!(text.contains("latency_seconds_count 4"), "{text}");
        assert!(text.contains("latency_seconds_sum 60.0078"), "{text}");
        assert_eq!(histogram.count(), 4);
    }

    /// A lazy histogram the test keeps a hand on while the registry reads it.
    #[derive(Debug)]
    struct Shared(Arc<LazyHistogram>);

    impl TypedMetric for Shared {
        const TYPE: MetricType = MetricType::Histogram;
    }

    impl EncodeMetric for Shared {
        fn encode(&self, encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
            self.0.encode(encoder)
        }

        fn metric_type(&self) -> MetricType {
            Self::TYPE
        }
    }

    #[test]
    fn a_lazy_histogram_reads_empty_until_it_observes() {
        let histogram = Arc::new(LazyHistogram::default());
        let mut registry = Registry::default();
        registry.register("lazy_seconds", "test", Shared(histogram.clone()));
        let text = || {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text
        };
        assert!(text().contains(r#"lazy_seconds_bucket{le="+Inf"} 0"#), "{}", text());
        assert!(histogram.0.get().is_none(), "nothing held before an observation");
        histogram.observe(Duration::from_millis(3));
        assert!(text().contains(r#"lazy_seconds_bucket{le="0.005"} 1"#), "{}", text());
        assert!(text().contains("lazy_seconds_sum 0.003"), "{}", text());
    }
}
