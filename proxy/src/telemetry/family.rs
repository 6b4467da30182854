//! A metric family whose series can be dropped, and whose memory then comes back.
//!
//! prometheus-client's `Family` keeps its hash table's capacity when series are removed: a config
//! that once held 2,000 clusters kept their tables (6 MB) after they left. This one is the same
//! otherwise (a series per label set, made on first use, encoded as one family) and shrinks its
//! table when a removal leaves it under a quarter full. Series are made where config is compiled
//! and then used through the handles [`Family::get_or_create_owned`] returns, so its lock is taken
//! there, at removal, and at scrape, never per request.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Series by label set; clones share them.
#[derive(Debug)]
pub struct Family<S, M> {
    series: Arc<RwLock<HashMap<S, M>>>,
}

impl<S, M> Clone for Family<S, M> {
    fn clone(&self) -> Self {
        Family { series: self.series.clone() }
    }
}

impl<S, M> Default for Family<S, M> {
    fn default() -> Self {
        Family { series: Arc::default() }
    }
}

impl<S: Clone + Hash + Eq, M: Clone + Default> Family<S, M> {
    /// The series of `labels` (made now if it does not exist): a handle sharing its value.
    pub fn get_or_create_owned(&self, labels: &S) -> M {
        if let Some(series) = self.read().get(labels) {
            return series.clone();
        }
        self.write().entry(labels.clone()).or_default().clone()
    }

    /// Drops the series of `labels`; `true` if there was one. Handles to it still work, unseen.
    pub fn remove(&self, labels: &S) -> bool {
        super::remove_and_shrink(&self.series, labels)
    }
}

impl<S, M> Family<S, M> {
    fn read(&self) -> RwLockReadGuard<'_, HashMap<S, M>> {
        super::read(&self.series)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<S, M>> {
        super::write(&self.series)
    }
}

impl<S, M: TypedMetric> TypedMetric for Family<S, M> {
    const TYPE: MetricType = M::TYPE;
}

impl<S: EncodeLabelSet, M: EncodeMetric + TypedMetric> EncodeMetric for Family<S, M> {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (labels, series) in self.read().iter() {
            series.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }

    fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;

    use super::*;
    use crate::telemetry::{MIN_CAPACITY, encode, registry};

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        cluster: String,
    }

    fn labels(i: usize) -> Labels {
        Labels { cluster: format!("c{i}") }
    }

    #[test]
    fn series_encode_as_one_family_and_removed_ones_give_their_table_back() {
        let mut registry = registry();
        let family: Family<Labels, Counter> = Family::default();
        registry.register("things", "Things", family.clone());
        for i in 0..2_000 {
            family.get_or_create_owned(&labels(i)).inc();
        }
        family.get_or_create_owned(&labels(7)).inc();
        let text = encode(&registry);
        assert!(text.contains("remora_things_total{cluster=\"c7\"} 2"), "{text}");
        let full = family.read().capacity();
        for i in 1..2_000 {
            assert!(family.remove(&labels(i)));
        }
        assert!(!family.remove(&labels(1)));
        assert!(family.read().capacity() <= MIN_CAPACITY, "{} of {full} kept", family.read().capacity());
        let text = encode(&registry);
        assert!(text.contains("remora_things_total{cluster=\"c0\"} 1") && !text.contains("c7"), "{text}");
    }
}
