//! Endpoint health's metrics, per cluster: active health checks by result, endpoints healthy and
//! ejected now, and outlier ejections by reason.
//!
//! [`HealthMetrics::register`] declares the families (the composition root calls it once); each
//! endpoint set holds its cluster's [`HealthStats`], which outlier detection, the health checks and
//! every rebuild of the set's view update.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::outlier::EjectReason;
use crate::telemetry::Registry;
use crate::telemetry::family::Family;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    cluster: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    cluster: String,
    reason: &'static str,
}

/// The endpoint-health metric families.
#[derive(Clone, Debug, Default)]
pub struct HealthMetrics {
    health_checks: Family<ResultLabels, Counter>,
    healthy: Family<ClusterLabels, Gauge>,
    ejected: Family<ClusterLabels, Gauge>,
    ejections: Family<ReasonLabels, Counter>,
}

impl HealthMetrics {
    /// Declares the families in `registry`.
    pub fn register(registry: &mut Registry) -> HealthMetrics {
        let m = HealthMetrics::default();
        registry.register(
            "health_checks",
            "Active health-check probes, by result (pass, fail)",
            m.health_checks.clone(),
        );
        registry.register(
            "upstream_endpoints_healthy",
            "Endpoints of a cluster healthy now (not ejected, passing health checks)",
            m.healthy.clone(),
        );
        registry.register(
            "upstream_endpoints_ejected",
            "Endpoints of a cluster ejected by outlier detection now",
            m.ejected.clone(),
        );
        registry.register("outlier_ejections", "Outlier-detection ejections, by reason", m.ejections.clone());
        m
    }

    /// Drops cluster `name`'s series (the cluster left the config).
    pub fn forget(&self, name: &str) {
        let labels = ClusterLabels { cluster: name.to_owned() };
        for result in ["pass", "fail"] {
            self.health_checks.remove(&ResultLabels { cluster: name.to_owned(), result });
        }
        self.healthy.remove(&labels);
        self.ejected.remove(&labels);
        for r in EjectReason::ALL {
            self.ejections.remove(&ReasonLabels { cluster: name.to_owned(), reason: r.as_str() });
        }
    }

    /// The counters of cluster `name`; the same name always yields the same counters.
    pub fn cluster(&self, name: &str) -> Arc<HealthStats> {
        let labels = ClusterLabels { cluster: name.to_owned() };
        let result = |result| ResultLabels { cluster: name.to_owned(), result };
        Arc::new(HealthStats {
            name: name.into(),
            checks_passed: self.health_checks.get_or_create_owned(&result("pass")),
            checks_failed: self.health_checks.get_or_create_owned(&result("fail")),
            healthy_endpoints: self.healthy.get_or_create_owned(&labels),
            ejected_endpoints: self.ejected.get_or_create_owned(&labels),
            ejections: EjectReason::ALL.map(|r| {
                self.ejections.get_or_create_owned(&ReasonLabels { cluster: name.to_owned(), reason: r.as_str() })
            }),
        })
    }
}

/// One cluster's endpoint-health counters.
#[derive(Debug)]
pub struct HealthStats {
    /// The cluster's name (for logs).
    pub name: Arc<str>,
    /// Health-check probes that passed and failed.
    pub checks_passed: Counter,
    /// See `checks_passed`.
    pub checks_failed: Counter,
    /// Endpoints healthy now (not ejected, passing health checks).
    pub healthy_endpoints: Gauge,
    /// Endpoints ejected by outlier detection now.
    pub ejected_endpoints: Gauge,
    ejections: [Counter; 4],
}

impl HealthStats {
    /// Counters for `name` that belong to no registry (tests, benches).
    pub fn detached(name: &str) -> Arc<HealthStats> {
        HealthMetrics::default().cluster(name)
    }

    /// Counts an ejection.
    pub fn record_ejection(&self, reason: EjectReason) {
        let index = EjectReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.ejections[index].inc();
    }

    /// Sets the healthy and ejected endpoint gauges.
    pub fn set_endpoint_health(&self, healthy: usize, ejected: usize) {
        self.healthy_endpoints.set(i64::try_from(healthy).unwrap_or(i64::MAX));
        self.ejected_endpoints.set(i64::try_from(ejected).unwrap_or(i64::MAX));
    }
}
