//! Traffic policy's metrics, per cluster: retries and hedges sent, retries the budget refused,
//! timeouts by kind, and what became of mirrored copies.
//!
//! [`PolicyMetrics::register`] declares the families (the composition root calls it once); each
//! compiled cluster holds its [`PolicyStats`], which the retry loop, the response body's idle
//! timeout and the mirror bump.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;

use crate::telemetry::Registry;
use crate::telemetry::family::Family;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    cluster: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    cluster: String,
    result: &'static str,
}

/// The policy metric families.
#[derive(Clone, Debug, Default)]
pub struct PolicyMetrics {
    retries: Family<ClusterLabels, Counter>,
    hedges: Family<ClusterLabels, Counter>,
    budget_exhausted: Family<ClusterLabels, Counter>,
    timeouts: Family<ReasonLabels, Counter>,
    mirror: Family<ResultLabels, Counter>,
}

impl PolicyMetrics {
    /// Declares the families in `registry`.
    pub fn register(registry: &mut Registry) -> PolicyMetrics {
        let m = PolicyMetrics::default();
        registry.register("upstream_retries", "Retries sent, hedged attempts included", m.retries.clone());
        registry.register("upstream_hedges", "Hedged attempts sent", m.hedges.clone());
        registry.register(
            "upstream_retry_budget_exhausted",
            "Retries not sent because the route's retry budget was spent",
            m.budget_exhausted.clone(),
        );
        registry.register(
            "upstream_timeouts",
            "Requests that timed out, by reason (request: the route's timeout; per_try: one attempt's; idle: a response body that stalled past its route's idle_timeout)",
            m.timeouts.clone(),
        );
        registry.register(
            "mirror_requests",
            "Mirrored copies of requests, by result (sent, dropped at the per-worker cap, failed)",
            m.mirror.clone(),
        );
        m
    }

    /// Drops cluster `name`'s series (the cluster left the config).
    pub fn forget(&self, name: &str) {
        let labels = ClusterLabels { cluster: name.to_owned() };
        for family in [&self.retries, &self.hedges, &self.budget_exhausted] {
            family.remove(&labels);
        }
        for reason in ["request", "per_try", "idle"] {
            self.timeouts.remove(&ReasonLabels { cluster: name.to_owned(), reason });
        }
        for result in ["sent", "dropped", "failed"] {
            self.mirror.remove(&ResultLabels { cluster: name.to_owned(), result });
        }
    }

    /// The counters of cluster `name`; the same name always yields the same counters.
    pub fn cluster(&self, name: &str) -> PolicyStats {
        let labels = ClusterLabels { cluster: name.to_owned() };
        let reason = |reason| ReasonLabels { cluster: name.to_owned(), reason };
        let result = |result| ResultLabels { cluster: name.to_owned(), result };
        PolicyStats {
            retries: self.retries.get_or_create_owned(&labels),
            hedges: self.hedges.get_or_create_owned(&labels),
            retry_budget_exhausted: self.budget_exhausted.get_or_create_owned(&labels),
            request_timeouts: self.timeouts.get_or_create_owned(&reason("request")),
            per_try_timeouts: self.timeouts.get_or_create_owned(&reason("per_try")),
            idle_timeouts: self.timeouts.get_or_create_owned(&reason("idle")),
            mirror_sent: self.mirror.get_or_create_owned(&result("sent")),
            mirror_dropped: self.mirror.get_or_create_owned(&result("dropped")),
            mirror_failed: self.mirror.get_or_create_owned(&result("failed")),
        }
    }
}

/// One cluster's policy counters.
#[derive(Debug, Default)]
pub struct PolicyStats {
    /// Retries sent (hedges included).
    pub retries: Counter,
    /// Hedged attempts sent.
    pub hedges: Counter,
    /// Retries not sent because the route's retry budget was spent.
    pub retry_budget_exhausted: Counter,
    /// Requests that ran out of their route's timeout.
    pub request_timeouts: Counter,
    /// Attempts that hit their per-try timeout.
    pub per_try_timeouts: Counter,
    /// Response bodies cut off by their route's idle timeout.
    pub idle_timeouts: Counter,
    /// Mirrored copies sent, dropped (the per-worker cap), and failed (no answer).
    pub mirror_sent: Counter,
    /// See `mirror_sent`.
    pub mirror_dropped: Counter,
    /// See `mirror_sent`.
    pub mirror_failed: Counter,
}
