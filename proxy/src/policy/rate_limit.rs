//! Local rate limiting: a token bucket as GCRA (the generic cell rate algorithm).
//!
//! A [`RateLimiter`] is built with the snapshot for each route (and listener) that asks for one and
//! is consulted with [`RateLimiter::acquire`] per request (or connection). The bucket is one atomic
//! "theoretical arrival time": lock-free, shared by every worker thread, and exact.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
}
