//! Per-route traffic policy: the request timeout, fault injection, and the local rate limit.
//!
//! A route's policy is compiled from its resource when the snapshot is built ([`RoutePolicy::compile`])
//! and consulted by the HTTP data path for each request the route matches: [`RoutePolicy::admit`]
//! runs before anything is sent (rate limit, then the fault's abort and delay decisions) and returns
//! what to do; the timeout bounds the wait for the response head. A route with no policy pays
//! nothing: it has no `RoutePolicy` at all.
//!
//! The rate limiter is GCRA (the generic cell rate algorithm), a token bucket held in one atomic
//! "theoretical arrival time": lock-free, shared by every worker thread, and exact.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use remora_control_api::v1;
use remora_control_api::validate;

/// What a route asks of each request it matches.
#[derive(Debug)]
pub struct RoutePolicy {
    /// How long to wait for the response head.
    pub timeout: Option<Duration>,
    delay: Option<(f64, Duration)>,
    abort: Option<(f64, u16)>,
    limiter: Option<RateLimiter>,
}

/// The verdict on one request, before it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send it (after `delay`, if any).
    Forward {
        /// An injected delay.
        delay: Option<Duration>,
    },
    /// Over the rate limit: 429, try again after this long.
    RateLimited(Duration),
    /// An injected failure with this status (after `delay`, if any).
    Abort {
        /// The status.
        status: u16,
        /// An injected delay first.
        delay: Option<Duration>,
    },
}

impl RoutePolicy {
    /// The route's policy, or `None` when it asks for nothing (the common case).
    pub fn compile(route: &v1::Route) -> Result<Option<RoutePolicy>, (String, String)> {
        let duration = |field: &str, value| validate::duration(value).map_err(|message| (field.to_owned(), message));
        let timeout = duration("timeout", route.timeout.as_ref())?;
        let fault = route.fault.as_ref();
        let delay = match fault.and_then(|f| f.delay.as_ref()) {
            Some(d) => duration("fault.delay.duration", d.duration.as_ref())?.map(|duration| (d.percent, duration)),
            None => None,
        };
        let abort = fault.and_then(|f| f.abort.as_ref()).map(|a| (a.percent, u16::try_from(a.status).unwrap_or(500)));
        let limiter = route.rate_limit.as_ref().map(|limit| {
            let burst = if limit.burst == 0 { limit.requests_per_second } else { limit.burst };
            RateLimiter::new(limit.requests_per_second, burst)
        });
        if timeout.is_none() && delay.is_none() && abort.is_none() && limiter.is_none() {
            return Ok(None);
        }
        Ok(Some(RoutePolicy { timeout, delay, abort, limiter }))
    }

    /// Decides what happens to one request.
    pub fn admit(&self) -> Admission {
        if let Some(limiter) = &self.limiter
            && let Err(wait) = limiter.acquire(Instant::now())
        {
            return Admission::RateLimited(wait);
        }
        let delay = self.delay.filter(|(percent, _)| chance(*percent)).map(|(_, d)| d);
        match self.abort {
            Some((percent, status)) if chance(percent) => Admission::Abort { status, delay },
            _ => Admission::Forward { delay },
        }
    }
}

/// True with probability `percent` / 100.
fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

/// A token bucket as GCRA: `rate` tokens a second, at most `burst` held.
#[derive(Debug)]
pub struct RateLimiter {
    origin: Instant,
    /// Nanoseconds between tokens.
    interval: u64,
    /// How far ahead of now the theoretical arrival time may run: (burst - 1) intervals.
    tolerance: u64,
    /// The theoretical arrival time of the next request, in nanoseconds since `origin`.
    tat: AtomicU64,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> RateLimiter {
        let interval = 1_000_000_000 / u64::from(rate.max(1));
        RateLimiter {
            origin: Instant::now(),
            interval,
            tolerance: interval * u64::from(burst.max(1) - 1),
            tat: AtomicU64::new(0),
        }
    }

    /// Takes a token at `now`, or says how long until one is due.
    pub fn acquire(&self, now: Instant) -> Result<(), Duration> {
        let now = u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            if start - now > self.tolerance {
                return Err(Duration::from_nanos(start - now - self.tolerance));
            }
            match self.tat.compare_exchange_weak(tat, start + self.interval, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_bucket_allows_its_burst_then_its_rate() {
        let limiter = RateLimiter::new(10, 5);
        let t0 = limiter.origin + Duration::from_secs(1);
        for _ in 0..5 {
            assert_eq!(limiter.acquire(t0), Ok(()));
        }
        let wait = limiter.acquire(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // One token every 100 ms after that, never more.
        let mut allowed = 0;
        for ms in (0..1000).step_by(10) {
            if limiter.acquire(t0 + Duration::from_millis(ms)).is_ok() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 9, "tokens due at 100, 200, ... 900 ms");
        // A long quiet spell refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        let burst = (0..20).filter(|_| limiter.acquire(later).is_ok()).count();
        assert_eq!(burst, 5);
    }

    #[test]
    fn concurrent_takers_never_exceed_the_bucket() {
        let limiter = std::sync::Arc::new(RateLimiter::new(1, 100));
        let now = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let limiter = limiter.clone();
                std::thread::spawn(move || (0..100).filter(|_| limiter.acquire(now).is_ok()).count())
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn routes_without_policy_compile_to_none() {
        assert!(RoutePolicy::compile(&v1::Route::default()).unwrap().is_none());
        let route = v1::Route {
            fault: Some(v1::Fault { abort: Some(v1::FaultAbort { percent: 100.0, status: 418 }), delay: None }),
            ..Default::default()
        };
        let policy = RoutePolicy::compile(&route).unwrap().unwrap();
        assert_eq!(policy.admit(), Admission::Abort { status: 418, delay: None });
    }

    #[test]
    fn chances_follow_their_percent() {
        assert!(!chance(0.0));
        assert!(chance(100.0));
        let hits = (0..100_000).filter(|_| chance(25.0)).count();
        assert!((23_500..26_500).contains(&hits), "{hits}");
    }
}
