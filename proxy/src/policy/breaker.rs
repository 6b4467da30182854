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
//! The counts are the cluster's gauges, [`BreakerStats`] (so they survive config changes and show on
//! `/metrics`), shared by every worker; [`families`] describes their families. A limit not set
//! costs nothing: its count is not kept (open connections are always counted; that happens only on
//! connect and close).

use std::sync::Arc;

use remora_control_api::v1;

use crate::telemetry::roster::{Count, Described, Level};

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

/// The circuit breakers' families, over each cluster's [`BreakerStats`] (the cluster roster
/// registers them): what each counts now, and what each refused.
pub fn families() -> Vec<Described<BreakerStats>> {
    vec![
        Described::level("upstream_connections_active", "Upstream connections open now", |s: &BreakerStats| {
            &s.open_connections
        }),
        Described::level(
            "upstream_requests_active",
            "Requests in flight to a cluster now (kept for clusters with a max_requests breaker)",
            |s: &BreakerStats| &s.active_requests,
        ),
        Described::level(
            "upstream_requests_pending",
            "Requests waiting for a new upstream connection now (kept with a max_pending_requests breaker)",
            |s: &BreakerStats| &s.pending_requests,
        ),
        Described::level(
            "upstream_retries_active",
            "Retries in flight now (kept for clusters with a max_retries breaker)",
            |s: &BreakerStats| &s.active_retries,
        ),
        Described::counts(
            "upstream_overflow",
            "Requests failed at once by a circuit breaker, by breaker",
            Some("breaker"),
            [
                (Breaker::Connections.as_str(), |s: &BreakerStats| &s.overflows[0]),
                (Breaker::Pending.as_str(), |s: &BreakerStats| &s.overflows[1]),
                (Breaker::Requests.as_str(), |s: &BreakerStats| &s.overflows[2]),
                (Breaker::Retries.as_str(), |s: &BreakerStats| &s.overflows[3]),
            ],
        ),
    ]
}

/// One cluster's breaker counts, shared by every worker.
#[derive(Debug, Default)]
pub struct BreakerStats {
    /// Upstream connections open now (every worker's).
    pub open_connections: Level,
    /// Requests in flight now (counted only with a `max_requests` breaker).
    pub active_requests: Level,
    /// Requests waiting for a new connection now (counted only with `max_pending_requests`).
    pub pending_requests: Level,
    /// Retries in flight now (counted only with `max_retries`).
    pub active_retries: Level,
    overflows: [Count; 4],
}

impl BreakerStats {
    /// Counts a request refused by `breaker`.
    fn record_overflow(&self, breaker: Breaker) {
        let index = Breaker::ALL.iter().position(|b| *b == breaker).unwrap_or(0);
        self.overflows[index].inc();
    }

    /// Requests `breaker` has refused so far.
    pub fn overflows(&self, breaker: Breaker) -> u64 {
        let index = Breaker::ALL.iter().position(|b| *b == breaker).unwrap_or(0);
        self.overflows[index].get()
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
pub struct Slot {
    stats: Arc<BreakerStats>,
    count: fn(&BreakerStats) -> &Level,
}

impl Drop for Slot {
    fn drop(&mut self) {
        (self.count)(&self.stats).dec();
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
    pub fn request(&self, stats: &Arc<BreakerStats>) -> Result<Option<Slot>, Breaker> {
        take(self.max_requests, |s| &s.active_requests, stats, Breaker::Requests)
    }

    /// A retry slot, or `Ok(None)` when retries are not limited.
    pub fn retry(&self, stats: &Arc<BreakerStats>) -> Result<Option<Slot>, Breaker> {
        take(self.max_retries, |s| &s.active_retries, stats, Breaker::Retries)
    }

    /// A slot for waiting on a new connection, or `Ok(None)` when waiting is not limited.
    pub fn pending(&self, stats: &Arc<BreakerStats>) -> Result<Option<Slot>, Breaker> {
        take(self.max_pending, |s| &s.pending_requests, stats, Breaker::Pending)
    }

    /// A slot for a new upstream connection, held by the connection until it closes. Always
    /// counted.
    pub fn connection(&self, stats: &Arc<BreakerStats>) -> Result<Slot, Breaker> {
        let gauge = &stats.open_connections;
        if self.max_connections > 0 && gauge.inc() >= i64::from(self.max_connections) {
            gauge.dec();
            stats.record_overflow(Breaker::Connections);
            return Err(Breaker::Connections);
        }
        if self.max_connections == 0 {
            gauge.inc();
        }
        Ok(Slot { stats: stats.clone(), count: |s| &s.open_connections })
    }
}

fn take(
    limit: u32,
    count: fn(&BreakerStats) -> &Level,
    stats: &Arc<BreakerStats>,
    breaker: Breaker,
) -> Result<Option<Slot>, Breaker> {
    if limit == 0 {
        return Ok(None);
    }
    let gauge = count(stats);
    if gauge.inc() >= i64::from(limit) {
        gauge.dec();
        stats.record_overflow(breaker);
        return Err(breaker);
    }
    Ok(Some(Slot { stats: stats.clone(), count }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::telemetry::roster::Roster;
    use crate::telemetry::{encode, registry};

    #[test]
    fn limits_hold_and_slots_come_back() {
        let mut registry = registry();
        let roster = Roster::new("cluster");
        for family in families() {
            roster.register(&mut registry, family);
        }
        let stats = roster.member("c", |_| BreakerStats::default());
        let breakers = CircuitBreakers::compile(Some(&v1::CircuitBreakers { max_requests: 2, ..Default::default() }));
        let a = breakers.request(&stats).unwrap();
        let b = breakers.request(&stats).unwrap();
        assert!(a.is_some() && b.is_some());
        assert_eq!(breakers.request(&stats).unwrap_err(), Breaker::Requests);
        drop(a);
        assert!(breakers.request(&stats).unwrap().is_some());
        assert!(breakers.retry(&stats).unwrap().is_none(), "no limit, no count");
        let text = encode(&registry);
        assert!(text.contains(r#"remora_upstream_overflow_total{cluster="c",breaker="max_requests"} 1"#), "{text}");
    }

    #[test]
    fn connections_are_always_counted() {
        let stats = Arc::new(BreakerStats::default());
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
