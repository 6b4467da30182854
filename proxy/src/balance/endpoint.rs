//! What the proxy knows about one endpoint at run time: its load, its latency, its health.
//!
//! An [`EndpointState`] is created the first time a cluster's endpoint set names an address and is
//! handed on to every later set of the same cluster that still names it, so load, latency history,
//! ejections and health-check results survive config changes. The data path updates it with atomic
//! operations only: [`EndpointState::start`] when a request is sent (active requests, for
//! least_request and ewma), [`EndpointState::observe`] when its response head arrives or it fails
//! (latency, consecutive failures, the interval's success counts). The monitor (`balance::monitor`)
//! reads the interval counts, ends ejections and records health-check results. Several workers
//! update one endpoint at once; where two updates race, one wins, which a moving average and a
//! failure streak tolerate.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::failure::Failure;

/// Peak EWMA's decay time: a latency sample weighs 1/e as much after this long (Linkerd's default).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// The latency estimate of an endpoint nothing has been measured on yet: a LAN round trip plus a
/// quick handler. Linkerd starts at 30 ms; in a mesh of sidecars a few milliseconds is nearer the
/// truth, and too high a start keeps a new endpoint idle for a long while.
pub(crate) const EWMA_INITIAL: Duration = Duration::from_millis(5);

/// Nanoseconds since the first call: a clock that fits in an atomic.
pub fn nanos_since_start(at: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
}

/// An endpoint's health as active health checks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Never checked (its cluster has had no health check). A set with a health check counts it as
    /// unknown; a set without one ignores health altogether.
    Unchecked = 0,
    /// Checked, no verdict yet: takes no traffic unless the cluster is in panic.
    Unknown = 1,
    /// Passing its checks.
    Healthy = 2,
    /// Failing its checks.
    Unhealthy = 3,
}

impl Health {
    fn from_u8(value: u8) -> Health {
        match value {
            1 => Health::Unknown,
            2 => Health::Healthy,
            3 => Health::Unhealthy,
            _ => Health::Unchecked,
        }
    }

    /// The name `/clusters` and logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unchecked => "unchecked",
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// How one attempt on an endpoint ended, as outlier detection and the balancers count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// A response below 500.
    Success,
    /// A 5xx response; `gateway` for 502, 503 and 504.
    ServerError {
        /// 502, 503 or 504.
        gateway: bool,
    },
    /// No response: the connect failed, the connection broke, or the attempt timed out. A gateway
    /// error and a 5xx alike.
    NoResponse,
}

impl Observed {
    /// Classifies a response status.
    pub fn from_status(status: u16) -> Observed {
        match status {
            502..=504 => Observed::ServerError { gateway: true },
            500..=599 => Observed::ServerError { gateway: false },
            _ => Observed::Success,
        }
    }

    /// What an attempt that ended without a response tells outlier detection and the ewma
    /// balancer: a failure that blames the endpoint counts as no response, one that does not (a
    /// breaker, the client's body, this proxy's own certificate) counts for nothing.
    pub fn from_failure(failure: Failure) -> Option<Observed> {
        failure.blames_endpoint.then_some(Observed::NoResponse)
    }
}

/// The run-time state of one endpoint of one cluster.
#[derive(Debug)]
pub struct EndpointState {
    active: AtomicU32,
    /// Peak-EWMA latency in nanoseconds (as f64 bits) and when it was last updated.
    ewma_ns: AtomicU64,
    ewma_stamp: AtomicU64,
    health: AtomicU8,
    /// What outlier detection counts, allocated when a set that detects outliers first counts it
    /// (most clusters never do).
    outlier: OnceLock<Box<OutlierCounters>>,
}

/// Counters outlier detection keeps per endpoint.
#[derive(Debug, Default)]
pub(crate) struct OutlierCounters {
    pub(crate) consecutive_5xx: AtomicU32,
    pub(crate) consecutive_gateway: AtomicU32,
    /// This interval's attempts, successes and summed latency (microseconds); the monitor takes
    /// and zeroes them every interval.
    pub(crate) requests: AtomicU32,
    pub(crate) successes: AtomicU32,
    pub(crate) latency_us: AtomicU64,
    /// Until when it is ejected, in nanoseconds since start; 0 when it is not.
    pub(crate) ejected_until: AtomicU64,
    /// How many times it has been ejected, less one for every interval it was not: the ejection
    /// time's multiplier.
    pub(crate) ejections: AtomicU32,
    /// Its latency smoothed across intervals, in microseconds (as f64 bits); 0 when none yet.
    pub(crate) smoothed_latency_us: AtomicU64,
}

impl EndpointState {
    /// A fresh state: idle, no history, `health` as given. (Its address is its set member's.)
    pub fn new(health: Health) -> EndpointState {
        EndpointState {
            active: AtomicU32::new(0),
            ewma_ns: AtomicU64::new((EWMA_INITIAL.as_nanos() as f64).to_bits()),
            ewma_stamp: AtomicU64::new(nanos_since_start(Instant::now())),
            health: AtomicU8::new(health as u8),
            outlier: OnceLock::new(),
        }
    }

    /// Its outlier-detection counters, made at the first call.
    pub(crate) fn outlier(&self) -> &OutlierCounters {
        self.outlier.get_or_init(Box::default)
    }

    /// Requests in flight to it now (counted only for clusters whose balancer uses them).
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn start(self: &std::sync::Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest { endpoint: self.clone() }
    }

    /// Its health-check state.
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Sets its health-check state; returns whether it changed.
    pub fn set_health(&self, health: Health) -> bool {
        self.health.swap(health as u8, Ordering::Relaxed) != health as u8
    }

    /// Whether outlier detection has it ejected at `now` (nanoseconds since start).
    pub fn is_ejected(&self, now: u64) -> bool {
        self.outlier.get().is_some_and(|o| o.ejected_until.load(Ordering::Relaxed) > now)
    }

    /// How much longer outlier detection has it ejected, at `now` (nanoseconds since start).
    pub fn ejected_for(&self, now: u64) -> Option<Duration> {
        let until = self.outlier.get().map_or(0, |o| o.ejected_until.load(Ordering::Relaxed));
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// The ejection multiplier: times ejected, less one for every interval back in rotation.
    pub fn ejections(&self) -> u32 {
        self.outlier.get().map_or(0, |o| o.ejections.load(Ordering::Relaxed))
    }

    /// The peak-EWMA latency estimate at `now` (nanoseconds since start), decayed for the time since
    /// the last sample so that an endpoint that was slow once is tried again eventually.
    pub fn ewma_ns(&self, now: u64) -> f64 {
        let cost = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.ewma_stamp.load(Ordering::Relaxed));
        cost * decay(elapsed)
    }

    /// Records how an attempt ended after `latency`. Updates the latency estimate (a sample above
    /// it replaces it at once: "peak") and, when `outliers` are detected, the failure streaks and
    /// the interval's counts; returns the streaks after this attempt (consecutive 5xx, consecutive
    /// gateway errors; none without `outliers`).
    pub fn observe(&self, observed: Observed, latency: Duration, now: u64, outliers: bool) -> (u32, u32) {
        let sample = latency.as_nanos() as f64;
        let elapsed = now.saturating_sub(self.ewma_stamp.swap(now, Ordering::Relaxed));
        // The weight of history falls with the time since the last sample.
        let w = decay(elapsed);
        let current = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed)) * w;
        let next = if sample > current { sample } else { current * w + sample * (1.0 - w) };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
        if !outliers {
            return (0, 0);
        }
        let o = self.outlier();
        o.requests.fetch_add(1, Ordering::Relaxed);
        o.latency_us.fetch_add(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        match observed {
            Observed::Success => {
                o.successes.fetch_add(1, Ordering::Relaxed);
                o.consecutive_5xx.store(0, Ordering::Relaxed);
                o.consecutive_gateway.store(0, Ordering::Relaxed);
                (0, 0)
            }
            Observed::ServerError { gateway: false } => {
                o.consecutive_gateway.store(0, Ordering::Relaxed);
                (o.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1, 0)
            }
            Observed::ServerError { gateway: true } | Observed::NoResponse => (
                o.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1,
                o.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1,
            ),
        }
    }

    /// Forgets the failure streaks and latency history (when an ejection ends: the endpoint is
    /// judged afresh).
    pub(crate) fn reset_history(&self) {
        if let Some(o) = self.outlier.get() {
            o.consecutive_5xx.store(0, Ordering::Relaxed);
            o.consecutive_gateway.store(0, Ordering::Relaxed);
            o.smoothed_latency_us.store(0, Ordering::Relaxed);
        }
        self.ewma_ns.store((EWMA_INITIAL.as_nanos() as f64).to_bits(), Ordering::Relaxed);
    }
}

/// exp(-elapsed / EWMA_DECAY).
fn decay(elapsed_ns: u64) -> f64 {
    (-(elapsed_ns as f64) / EWMA_DECAY.as_nanos() as f64).exp()
}

/// A request counted in flight on an endpoint until dropped.
#[derive(Debug)]
pub struct ActiveRequest {
    endpoint: std::sync::Arc<EndpointState>,
}

impl ActiveRequest {
    /// The endpoint.
    pub fn endpoint(&self) -> &std::sync::Arc<EndpointState> {
        &self.endpoint
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn state() -> Arc<EndpointState> {
        Arc::new(EndpointState::new(Health::Unchecked))
    }

    #[test]
    fn peak_ewma_jumps_up_at_once_and_decays_slowly() {
        let endpoint = state();
        let t0 = nanos_since_start(Instant::now());
        endpoint.observe(Observed::Success, Duration::from_millis(50), t0, true);
        assert!((endpoint.ewma_ns(t0) - 50e6).abs() < 1.0, "a slow response is taken at once");
        // A fast sample right after barely moves it; one long after counts for nearly everything.
        endpoint.observe(Observed::Success, Duration::from_millis(1), t0 + 1_000_000, true);
        assert!(endpoint.ewma_ns(t0 + 1_000_000) > 49e6);
        let later = t0 + 60_000_000_000;
        endpoint.observe(Observed::Success, Duration::from_millis(1), later, true);
        assert!(endpoint.ewma_ns(later) < 2e6, "{}", endpoint.ewma_ns(later));
        // With no samples at all, the estimate decays towards zero.
        assert!(endpoint.ewma_ns(later + 100_000_000_000) < 1e3);
    }

    #[test]
    fn streaks_count_and_reset() {
        let endpoint = state();
        let now = nanos_since_start(Instant::now());
        let ms = Duration::from_millis(1);
        assert_eq!(endpoint.observe(Observed::ServerError { gateway: false }, ms, now, true), (1, 0));
        assert_eq!(endpoint.observe(Observed::NoResponse, ms, now, true), (2, 1));
        assert_eq!(endpoint.observe(Observed::ServerError { gateway: true }, ms, now, true), (3, 2));
        assert_eq!(endpoint.observe(Observed::Success, ms, now, true), (0, 0));
        assert_eq!(endpoint.outlier().requests.load(Ordering::Relaxed), 4);
        assert_eq!(endpoint.outlier().successes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn active_requests_are_counted_until_dropped() {
        let endpoint = state();
        let a = endpoint.start();
        let b = endpoint.start();
        assert_eq!(endpoint.active(), 2);
        drop(a);
        drop(b);
        assert_eq!(endpoint.active(), 0);
    }
}
