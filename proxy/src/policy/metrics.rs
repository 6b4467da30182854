//! Traffic policy's metrics, per cluster: retries and hedges sent, retries the budget refused,
//! timeouts by kind, and what became of mirrored copies.
//!
//! [`families`] describes the families, which the cluster roster registers; each cluster's stats
//! hold its [`PolicyStats`], which the retry loop, the response body's idle timeout and the mirror
//! bump.

use crate::telemetry::roster::{Count, Described};

/// The policy families, over each cluster's [`PolicyStats`] (the cluster roster registers them).
pub fn families() -> Vec<Described<PolicyStats>> {
    vec![
        Described::count("upstream_retries", "Retries sent, hedged attempts included", |s: &PolicyStats| &s.retries),
        Described::count("upstream_hedges", "Hedged attempts sent", |s: &PolicyStats| &s.hedges),
        Described::count(
            "upstream_retry_budget_exhausted",
            "Retries not sent because the route's retry budget was spent",
            |s: &PolicyStats| &s.retry_budget_exhausted,
        ),
        Described::counts(
            "upstream_timeouts",
            "Requests that timed out, by reason (request: the route's timeout; per_try: one attempt's; idle: a response body that stalled past its route's idle_timeout)",
            Some("reason"),
            [
                ("request", |s: &PolicyStats| &s.request_timeouts),
                ("per_try", |s: &PolicyStats| &s.per_try_timeouts),
                ("idle", |s: &PolicyStats| &s.idle_timeouts),
            ],
        ),
        Described::counts(
            "mirror_requests",
            "Mirrored copies of requests, by result (sent, dropped at the per-worker cap, failed)",
            Some("result"),
            [
                ("sent", |s: &PolicyStats| &s.mirror_sent),
                ("dropped", |s: &PolicyStats| &s.mirror_dropped),
                ("failed", |s: &PolicyStats| &s.mirror_failed),
            ],
        ),
    ]
}

/// One cluster's policy counters.
#[derive(Debug, Default)]
pub struct PolicyStats {
    /// Retries sent (hedges included).
    pub retries: Count,
    /// Hedged attempts sent.
    pub hedges: Count,
    /// Retries not sent because the route's retry budget was spent.
    pub retry_budget_exhausted: Count,
    /// Requests that ran out of their route's timeout.
    pub request_timeouts: Count,
    /// Attempts that hit their per-try timeout.
    pub per_try_timeouts: Count,
    /// Response bodies cut off by their route's idle timeout.
    pub idle_timeouts: Count,
    /// Mirrored copies sent, dropped (the per-worker cap), and failed (no answer).
    pub mirror_sent: Count,
    /// See `mirror_sent`.
    pub mirror_dropped: Count,
    /// See `mirror_sent`.
    pub mirror_failed: Count,
}
