//! Traffic policy: what a route or cluster asks of each request beyond getting it there.
//!
//! A route's [`RoutePolicy`] is compiled from its resource when the snapshot is built
//! ([`RoutePolicy::compile`]) and consulted by the HTTP data path for each request the route
//! matches: [`RoutePolicy::admit`] runs before anything is sent (the rate limit, then the fault's
//! abort and delay decisions) and says what to do; the rest (the timeout on the response head,
//! retries and hedging, mirroring, the fallback answer) is carried out by `http::forward`. A route
//! with no policy pays nothing: it has no `RoutePolicy` at all.
//!
//! # Layout
//! - [`rate_limit`] — the GCRA token bucket behind route and listener rate limits.
//! - [`retry`] — retry conditions, backoff with full jitter, `Retry-After`, the retry budget.
//! - [`breaker`] — a cluster's circuit breakers (connections, pending, requests, retries).

pub mod breaker;
pub mod metrics;
pub mod rate_limit;
pub mod retry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use remora_control_api::config::Invalid;
use remora_control_api::v1;
use remora_control_api::validate;

pub use rate_limit::RateLimiter;
pub use retry::RetryPolicy;

use crate::state::cluster::Cluster;

/// What a route asks of each request it matches.
#[derive(Debug)]
pub struct RoutePolicy {
    /// How long to wait for the response head.
    pub timeout: Option<Duration>,
    delay: Option<(f64, Duration)>,
    abort: Option<(f64, u16)>,
    limiter: Option<RateLimiter>,
    /// Retries and hedging.
    pub retry: Option<RetryPolicy>,
    /// Traffic mirroring.
    pub mirror: Option<Mirror>,
    /// The answer when the cluster cannot take the request.
    pub fallback: Option<Arc<Fallback>>,
    /// How long a response body may stall.
    pub idle_timeout: Option<Duration>,
}

/// Where copies of a route's requests go.
#[derive(Debug)]
pub struct Mirror {
    /// The shadow cluster.
    pub cluster: Arc<Cluster>,
    percent: f64,
}

impl Mirror {
    /// Whether this request is copied.
    pub fn chosen(&self) -> bool {
        chance(self.percent)
    }
}

/// A route's static answer for when its cluster cannot take a request.
#[derive(Debug)]
pub struct Fallback {
    /// The status.
    pub status: StatusCode,
    /// Extra headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
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
    /// The route's policy, or `None` when it asks for nothing (the common case). `cluster` resolves
    /// the mirror's cluster.
    pub fn compile(
        route: &v1::Route,
        cluster: &dyn Fn(&str) -> Option<Arc<Cluster>>,
    ) -> Result<Option<RoutePolicy>, Invalid> {
        let duration = |field: &str, value| validate::duration(value).map_err(|message| Invalid::new(field, message));
        let timeout = duration("timeout", route.timeout.as_ref())?;
        let idle_timeout = duration("idle_timeout", route.idle_timeout.as_ref())?;
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
        let retry = route.retry.as_deref().map(RetryPolicy::compile).transpose()?;
        let mirror = match &route.mirror {
            None => None,
            Some(m) => Some(Mirror {
                cluster: cluster(&m.cluster).ok_or_else(|| {
                    Invalid::new("mirror.cluster", format!("names cluster {:?}, which is not defined", m.cluster))
                })?,
                percent: m.percent.unwrap_or(100.0),
            }),
        };
        let fallback = match &route.fallback {
            None => None,
            Some(f) => Some(Arc::new(compile_fallback(f)?)),
        };
        if timeout.is_none()
            && delay.is_none()
            && abort.is_none()
            && limiter.is_none()
            && retry.is_none()
            && mirror.is_none()
            && fallback.is_none()
            && idle_timeout.is_none()
        {
            return Ok(None);
        }
        Ok(Some(RoutePolicy { timeout, delay, abort, limiter, retry, mirror, fallback, idle_timeout }))
    }

    /// Whether requests need more than admission (a timeout, retries, a mirror, a fallback, an idle
    /// timeout), so they go through `http::forward` rather than the plain path.
    pub fn forwards(&self) -> bool {
        self.timeout.is_some()
            || self.retry.is_some()
            || self.mirror.is_some()
            || self.fallback.is_some()
            || self.idle_timeout.is_some()
    }

    /// Decides what happens to one request, arrived at `now`.
    pub fn admit(&self, now: Instant) -> Admission {
        if let Some(limiter) = &self.limiter
            && let Err(wait) = limiter.acquire(now)
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

fn compile_fallback(f: &v1::StaticResponse) -> Result<Fallback, Invalid> {
    let status = match f.status {
        0 => StatusCode::OK,
        code => u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| Invalid::new("fallback.status", format!("{code} is not a status")))?,
    };
    let mut headers = HeaderMap::with_capacity(f.headers.len());
    for (name, value) in &f.headers {
        let field = || format!("fallback.headers.{name}");
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| Invalid::new(field(), "is not a header name"))?;
        let value = HeaderValue::from_str(value).map_err(|_| Invalid::new(field(), "is not a valid header value"))?;
        headers.insert(name, value);
    }
    Ok(Fallback { status, headers, body: Bytes::from(f.body.clone()) })
}

/// True with probability `percent` / 100.
fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn routes_without_policy_compile_to_none() {
        let none = |_: &str| None;
        assert!(RoutePolicy::compile(&v1::Route::default(), &none).unwrap().is_none());
        let route = v1::Route {
            fault: Some(Box::new(v1::Fault {
                abort: Some(v1::FaultAbort { percent: 100.0, status: 418 }),
                delay: None,
            })),
            ..Default::default()
        };
        let policy = RoutePolicy::compile(&route, &none).unwrap().unwrap();
        assert_eq!(policy.admit(Instant::now()), Admission::Abort { status: 418, delay: None });
    }

    #[test]
    fn chances_follow_their_percent() {
        assert!(!chance(0.0));
        assert!(chance(100.0));
        let hits = (0..100_000).filter(|_| chance(25.0)).count();
        assert!((23_500..26_500).contains(&hits), "{hits}");
    }
}
