//! Circuit breakers: limits on what one proxy sends a cluster at once.
//!
//! Compiled with the cluster ([`CircuitBreakers::compile`]). The data path takes a [`Slot`] before
//! sending a request ([`CircuitBreakers::request`]), before a retry ([`CircuitBreakers::retry`]),
//! while it waits for a new connection ([`CircuitBreakers::pending`]) and before it opens one
//! ([`CircuitBreakers::connection`]); the slot is given back when dropped (the request's response
//! has streamed, the retry is over, the connect is done, the connection is closed). Over a limit the
//! request fails at once with 503 `upstream_overflow`, and the cluster's overflow counter says which
//! limit it was, as Envoy's breakers do: a breaker sheds load early instead of queueing it behind a
//! struggling upstream.
//!
//! The counts are the cluster's gauges in `telemetry` (so they survive config changes and show on
//! `/metrics`), shared by every worker. A limit not set costs nothing: its count is not kept
//! (open connections are always counted; that happens only on connect and close).

use prometheus_client::metrics::gauge::Gauge;
use remora_control_api::v1;

use crate::telemetry::ClusterStats;

/// Which limit a request ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breaker {
    /// `max_connections`.
    Connections,
    /// `max_pending_requests`.
    Pending,
    /// `max_requests`.
    Requests,
    /// `max_retries`.
    Retries,
}

impl Breaker {
    /// Every breaker, in label order.
    pub const ALL: [Breaker; 4] = [Breaker::Connections, Breaker::Pending, Breaker::Requests, Breaker::Retries];

    /// The metric label and error text.
    pub fn as_str(self) -> &'static str {
        match self {
            Breaker::Connections => "max_connections",
            Breaker::Pending => "max_pending_requests",
            Breaker::Requests => "max_requests",
            Breaker::Retries => "max_retries",
        }
    }
}

/// A cluster's limits; 0 is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CircuitBreakers {
    max_connections: u32,
    max_pending: u32,
    max_requests: u32,
    max_retries: u32,
}

/// One unit of a counted resource, given back when dropped.
#[derive(Debug)]
pub struct Slot(Gauge);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl CircuitBreakers {
    /// The cluster's limits (none when absent).
    pub fn compile(breakers: Option<&v1::CircuitBreakers>) -> CircuitBreakers {
        breakers.map_or_else(CircuitBreakers::default, |b| CircuitBreakers {
            max_connections: b.max_connections,
            max_pending: b.max_pending_requests,
            max_requests: b.max_requests,
            max_retries: b.max_retries,
        })
    }

    /// A request slot, or `Ok(None)` when requests are not limited.
    pub fn request(&self, stats: &ClusterStats) -> Result<Option<Slot>, Breaker> {
        take(self.max_requests, &stats.active_requests, stats, Breaker::Requests)
    }

    /// A retry slot, or `Ok(None)` when retries are not limited.
    pub fn retry(&self, stats: &ClusterStats) -> Result<Option<Slot>, Breaker> {
        take(self.max_retries, &stats.active_retries, stats, Breaker::Retries)
    }

    /// A slot for waiting on a new connection, or `Ok(None)` when waiting is not limited.
    pub fn pending(&self, stats: &ClusterStats) -> Result<Option<Slot>, Breaker> {
        take(self.max_pending, &stats.pending_requests, stats, Breaker::Pending)
    }

    /// A slot for a new upstream connection, held by the connection until it closes. Always
    /// counted.
    pub fn connection(&self, stats: &ClusterStats) -> Result<Slot, Breaker> {
        let gauge = &stats.open_connections;
        if self.max_connections > 0 && gauge.inc() >= i64::from(self.max_connections) {
            gauge.dec();
            stats.record_overflow(Breaker::Connections);
            return Err(Breaker::Connections);
        }
        if self.max_connections == 0 {
            gauge.inc();
        }
        Ok(Slot(gauge.clone()))
    }
}

fn take(limit: u32, gauge: &Gauge, stats: &ClusterStats, breaker: Breaker) -> Result<Option<Slot>, Breaker> {
    if limit == 0 {
        return Ok(None);
    }
    if gauge.inc() >= i64::from(limit) {
        gauge.dec();
        stats.record_overflow(breaker);
        return Err(breaker);
    }
    Ok(Some(Slot(gauge.clone())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::telemetry::Metrics;

    #[test]
    fn limits_hold_and_slots_come_back() {
        let metrics = Metrics::new();
        let stats = metrics.cluster("c");
        let breakers = CircuitBreakers::compile(Some(&v1::CircuitBreakers { max_requests: 2, ..Default::default() }));
        let a = breakers.request(&stats).unwrap();
        let b = breakers.request(&stats).unwrap();
        assert!(a.is_some() && b.is_some());
        assert_eq!(breakers.request(&stats).unwrap_err(), Breaker::Requests);
        drop(a);
        assert!(breakers.request(&stats).unwrap().is_some());
        assert!(breakers.retry(&stats).unwrap().is_none(), "no limit, no count");
        let text = metrics.encode();
        assert!(text.contains(r#"remora_upstream_overflow_total{cluster="c",breaker="max_requests"} 1"#), "{text}");
    }

    #[test]
    fn connections_are_always_counted() {
        let stats = Metrics::new().cluster("c");
        let open = CircuitBreakers::default();
        let slot = open.connection(&stats).unwrap();
        assert_eq!(stats.open_connections.get(), 1);
        drop(slot);
        assert_eq!(stats.open_connections.get(), 0);
        let one = CircuitBreakers::compile(Some(&v1::CircuitBreakers { max_connections: 1, ..Default::default() }));
        let _held = one.connection(&stats).unwrap();
        assert_eq!(one.connection(&stats).unwrap_err(), Breaker::Connections);
    }
}
