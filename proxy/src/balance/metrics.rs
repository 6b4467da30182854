//! Endpoint health's metrics, per cluster: active health checks by result, endpoints healthy and
//! ejected now, and outlier ejections by reason.
//!
//! [`families`] describes the families, which the cluster roster registers; each endpoint set
//! holds its cluster's [`HealthStats`], which outlier detection, the health checks and every
//! rebuild of the set's view update.

use std::sync::Arc;

use super::outlier::EjectReason;
use crate::telemetry::roster::{Count, Described, Level};

/// The endpoint-health families, over each cluster's [`HealthStats`] (the cluster roster
/// registers them).
pub fn families() -> Vec<Described<HealthStats>> {
    vec![
        Described::counts(
            "health_checks",
            "Active health-check probes, by result (pass, fail)",
            Some("result"),
            [("pass", |s: &HealthStats| &s.checks_passed), ("fail", |s: &HealthStats| &s.checks_failed)],
        ),
        Described::level(
            "upstream_endpoints_healthy",
            "Endpoints of a cluster healthy now (not ejected, passing health checks)",
            |s: &HealthStats| &s.healthy_endpoints,
        ),
        Described::level(
            "upstream_endpoints_ejected",
            "Endpoints of a cluster ejected by outlier detection now",
            |s: &HealthStats| &s.ejected_endpoints,
        ),
        Described::counts(
            "outlier_ejections",
            "Outlier-detection ejections, by reason",
            Some("reason"),
            [
                (EjectReason::ALL[0].as_str(), |s: &HealthStats| &s.ejections[0]),
                (EjectReason::ALL[1].as_str(), |s: &HealthStats| &s.ejections[1]),
                (EjectReason::ALL[2].as_str(), |s: &HealthStats| &s.ejections[2]),
                (EjectReason::ALL[3].as_str(), |s: &HealthStats| &s.ejections[3]),
            ],
        ),
    ]
}

/// One cluster's endpoint-health counters.
#[derive(Debug)]
pub struct HealthStats {
    /// The cluster's name (for logs).
    pub name: Arc<str>,
    /// Health-check probes that passed and failed.
    pub checks_passed: Count,
    /// See `checks_passed`.
    pub checks_failed: Count,
    /// Endpoints healthy now (not ejected, passing health checks).
    pub healthy_endpoints: Level,
    /// Endpoints ejected by outlier detection now.
    pub ejected_endpoints: Level,
    ejections: [Count; 4],
}

impl HealthStats {
    /// Cluster `name`'s counters, all zero.
    pub fn new(name: Arc<str>) -> HealthStats {
        HealthStats {
            name,
            checks_passed: Count::default(),
            checks_failed: Count::default(),
            healthy_endpoints: Level::default(),
            ejected_endpoints: Level::default(),
            ejections: Default::default(),
        }
    }

    /// Counters for `name` that belong to no registry (tests, benches).
    pub fn detached(name: &str) -> Arc<HealthStats> {
        Arc::new(HealthStats::new(name.into()))
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
