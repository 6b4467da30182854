//! Retries: which failures are tried again, how long to wait first, and how many retries a route
//! may spend.
//!
//! A [`RetryPolicy`] is compiled with its route. The retry loop (`http::retries`) asks it, as each
//! attempt ends, whether the outcome is worth another attempt: for an attempt that got no
//! response, from the facts its error states ([`RetryPolicy::retries_failure`] over a
//! [`Failure`]), for a response from its status and headers ([`RetryPolicy::retries_response`]);
//! how long to back off ([`RetryPolicy::backoff`]); and asks the route's [`RetryBudget`] for
//! permission before every retry.
//!
//! Backoff is exponential with full jitter (the AWS architecture blog's "Exponential Backoff and
//! Jitter", 2015): retry n waits a uniform random time in [0, min(max, base x 2^(n-1))], which
//! spreads a burst of retries out instead of re-synchronising it. A `Retry-After` on a 503 or 429
//! (RFC 9110 §10.2.3) sets a floor under that wait, or, when it asks for longer than the policy's
//! longest backoff, means "not now": the response goes to the client.
//!
//! The budget is Linkerd's: over a sliding window of `ttl`, retries may be at most `percent` of the
//! requests plus a reserve of `min_retries_per_second` x ttl, so a failing upstream can never be
//! sent more than (1 + percent/100) times its normal load, however many retries each request may
//! ask for. The window is ten buckets of atomic counters, shared lock-free by every worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;
use http::header::RETRY_AFTER;
use remora_control_api::config::Invalid;
use remora_control_api::v1;
use remora_control_api::validate;

use crate::failure::{Failure, FailureKind};

const CONNECT_FAILURE: u16 = 1 << 0;
const REFUSED_STREAM: u16 = 1 << 1;
const RESET: u16 = 1 << 2;
const SERVER_ERROR: u16 = 1 << 3;
const GATEWAY_ERROR: u16 = 1 << 4;
const RETRIABLE_4XX: u16 = 1 << 5;
const RETRIABLE_STATUS_CODES: u16 = 1 << 6;
const GRPC_CANCELLED: u16 = 1 << 7;
const GRPC_DEADLINE_EXCEEDED: u16 = 1 << 8;
const GRPC_INTERNAL: u16 = 1 << 9;
const GRPC_RESOURCE_EXHAUSTED: u16 = 1 << 10;
const GRPC_UNAVAILABLE: u16 = 1 << 11;

const GRPC_ANY: u16 =
    GRPC_CANCELLED | GRPC_DEADLINE_EXCEEDED | GRPC_INTERNAL | GRPC_RESOURCE_EXHAUSTED | GRPC_UNAVAILABLE;

static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// Istio's default `retry_on`.
const DEFAULT_CONDITIONS: u16 =
    CONNECT_FAILURE | REFUSED_STREAM | GRPC_UNAVAILABLE | GRPC_CANCELLED | RETRIABLE_STATUS_CODES;

fn condition(name: &str) -> Option<u16> {
    Some(match name {
        "connect-failure" => CONNECT_FAILURE,
        "refused-stream" => REFUSED_STREAM,
        "reset" => RESET,
        "5xx" => SERVER_ERROR,
        "gateway-error" => GATEWAY_ERROR,
        "retriable-4xx" => RETRIABLE_4XX,
        "retriable-status-codes" => RETRIABLE_STATUS_CODES,
        "cancelled" => GRPC_CANCELLED,
        "deadline-exceeded" => GRPC_DEADLINE_EXCEEDED,
        "internal" => GRPC_INTERNAL,
        "resource-exhausted" => GRPC_RESOURCE_EXHAUSTED,
        "unavailable" => GRPC_UNAVAILABLE,
        _ => return None,
    })
}

/// A compiled retry policy.
#[derive(Debug)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    conditions: u16,
    status_codes: Vec<u16>,
    /// Limit on each attempt's wait for its response head.
    pub per_try_timeout: Option<Duration>,
    backoff_base: Duration,
    backoff_max: Duration,
    /// The route's retry budget.
    pub budget: RetryBudget,
    /// Bytes of request body kept for replay.
    pub replay_limit: usize,
    /// Send a hedged attempt after this long without a response head.
    pub hedge_delay: Option<Duration>,
}

/// What to do after an attempt that the policy retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The outcome stands: it goes to the client.
    Final,
    /// Worth another attempt, after waiting at least this long (from `Retry-After`).
    Retry(Option<Duration>),
}

impl RetryPolicy {
    /// Compiles a route's `retry`, defaults applied. Errors name the field.
    pub fn compile(r: &v1::RetryPolicy) -> Result<RetryPolicy, Invalid> {
        let duration =
            |field: &str, value| validate::duration(value).map_err(|m| Invalid::new(format!("retry.{field}"), m));
        let mut conditions = 0;
        for (i, name) in r.retry_on.iter().enumerate() {
            conditions |= condition(name)
                .ok_or_else(|| Invalid::new(format!("retry.retry_on[{i}]"), format!("unknown condition {name:?}")))?;
        }
        if r.retry_on.is_empty() {
            conditions = DEFAULT_CONDITIONS;
        }
        let backoff_base = duration("backoff_base", r.backoff_base.as_ref())?.unwrap_or(Duration::from_millis(25));
        let backoff_max =
            duration("backoff_max", r.backoff_max.as_ref())?.unwrap_or(backoff_base * 10).max(backoff_base);
        let budget = r.budget.unwrap_or_default();
        let ttl = duration("budget.ttl", budget.ttl.as_ref())?.unwrap_or(Duration::from_secs(10));
        Ok(RetryPolicy {
            attempts: r.attempts.unwrap_or(2).min(validate::MAX_RETRIES),
            conditions,
            status_codes: if r.retriable_status_codes.is_empty() {
                vec![503]
            } else {
                r.retriable_status_codes.iter().map(|c| u16::try_from(*c).unwrap_or(0)).collect()
            },
            per_try_timeout: duration("per_try_timeout", r.per_try_timeout.as_ref())?,
            backoff_base,
            backoff_max,
            budget: RetryBudget::new(
                budget.percent.unwrap_or(20.0),
                budget.min_retries_per_second.unwrap_or(10),
                ttl.max(Duration::from_millis(100)),
            ),
            replay_limit: r.replay_buffer_bytes.unwrap_or(64 * 1024).min(validate::MAX_REPLAY_BUFFER) as usize,
            hedge_delay: match &r.hedge {
                Some(hedge) => duration("hedge.delay", hedge.delay.as_ref())?,
                None => None,
            },
        })
    }

    /// Whether an attempt that ended without a response is retried, by what its failure was.
    pub fn retries_failure(&self, failure: Failure) -> bool {
        let on = |flags: u16| self.conditions & flags != 0;
        match failure.kind {
            // A failed mTLS handshake is part of connecting: the request was never sent.
            FailureKind::Connect => on(CONNECT_FAILURE | SERVER_ERROR | GATEWAY_ERROR),
            FailureKind::RefusedStream => on(REFUSED_STREAM | RESET | SERVER_ERROR | GATEWAY_ERROR),
            FailureKind::Reset | FailureKind::PerTryTimeout => on(RESET | SERVER_ERROR | GATEWAY_ERROR),
            // An invalid response, the route's time running out, the client's own failure, or a
            // request that was never sent: another attempt would not fare better.
            FailureKind::Protocol | FailureKind::RequestTimeout | FailureKind::Client | FailureKind::NotSent => false,
        }
    }

    /// Whether a response (`status`, its HTTP `version` and `headers`) is retried, and after how
    /// long at least.
    pub fn retries_response(&self, status: u16, version: http::Version, headers: &HeaderMap) -> Verdict {
        let on = |flags: u16| self.conditions & flags != 0;
        let by_status = (on(SERVER_ERROR) && (500..=599).contains(&status))
            || (on(GATEWAY_ERROR) && (502..=504).contains(&status))
            || (on(RETRIABLE_4XX) && status == 409)
            || (on(RETRIABLE_STATUS_CODES) && self.status_codes.contains(&status));
        // gRPC puts its status in the headers only for trailers-only responses, the ones that
        // answer at once without a body; those are the ones that can be retried. gRPC is HTTP/2
        // with status 200, so nothing else pays for the lookup.
        let grpc = status == 200 && version == http::Version::HTTP_2 && on(GRPC_ANY);
        let code = if grpc {
            headers.get(&GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u8>().ok())
        } else {
            None
        };
        let by_grpc = match code {
            Some(1) => on(GRPC_CANCELLED),
            Some(4) => on(GRPC_DEADLINE_EXCEEDED),
            Some(8) => on(GRPC_RESOURCE_EXHAUSTED),
            Some(13) => on(GRPC_INTERNAL),
            Some(14) => on(GRPC_UNAVAILABLE),
            _ => false,
        };
        if !by_status && !by_grpc {
            return Verdict::Final;
        }
        match (status, retry_after(headers)) {
            (503 | 429, Some(wait)) if wait > self.backoff_max => Verdict::Final,
            (503 | 429, Some(wait)) => Verdict::Retry(Some(wait)),
            _ => Verdict::Retry(None),
        }
    }

    /// The wait before retry number `retry` (1 for the first), full jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        backoff(self.backoff_base, self.backoff_max, retry, fastrand::f64())
    }
}

/// Full-jitter backoff with a given uniform draw `unit` in [0, 1).
fn backoff(base: Duration, max: Duration, retry: u32, unit: f64) -> Duration {
    let exponent = retry.saturating_sub(1).min(30);
    let cap = base.saturating_mul(1 << exponent).min(max);
    cap.mul_f64(unit.clamp(0.0, 1.0))
}

/// `Retry-After` as a wait from now: delay-seconds or an HTTP-date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// Buckets in the budget's sliding window.
const BUCKETS: usize = 10;

/// A route's retry budget: see the module documentation.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    reserve: f64,
    bucket_nanos: u64,
    origin: Instant,
    buckets: [Bucket; BUCKETS],
}

#[derive(Debug, Default)]
struct Bucket {
    /// The window position (bucket number since `origin`) the counts belong to.
    epoch: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    /// A budget of `percent` of requests plus `min_per_second` x `ttl`, over a window of `ttl`.
    pub fn new(percent: f64, min_per_second: u32, ttl: Duration) -> RetryBudget {
        RetryBudget {
            ratio: percent / 100.0,
            reserve: f64::from(min_per_second) * ttl.as_secs_f64(),
            bucket_nanos: (u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX) / BUCKETS as u64).max(1),
            origin: Instant::now(),
            buckets: Default::default(),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX) / self.bucket_nanos
    }

    fn bucket(&self, epoch: u64) -> &Bucket {
        let bucket = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let seen = bucket.epoch.load(Ordering::Acquire);
        if seen != epoch && bucket.epoch.compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // This bucket last counted a window position that has slid out: start it over. (A
            // count racing this reset may be lost; the budget is a bound, not a ledger.)
            bucket.requests.store(0, Ordering::Relaxed);
            bucket.retries.store(0, Ordering::Relaxed);
        }
        bucket
    }

    /// Counts a request (the first attempt of one) at `now`.
    pub fn deposit(&self, now: Instant) {
        self.bucket(self.epoch(now)).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget at `now`; `false` if it is spent.
    pub fn withdraw(&self, now: Instant) -> bool {
        let epoch = self.epoch(now);
        let (mut requests, mut retries) = (0_u64, 0_u64);
        for bucket in &self.buckets {
            let at = bucket.epoch.load(Ordering::Acquire);
            if at + (BUCKETS as u64) > epoch && at <= epoch {
                requests += bucket.requests.load(Ordering::Relaxed);
                retries += bucket.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = self.ratio * requests as f64 + self.reserve;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        self.bucket(epoch).retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    fn policy(retry_on: &[&str]) -> RetryPolicy {
        RetryPolicy::compile(&v1::RetryPolicy {
            retry_on: retry_on.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn defaults_are_istios() {
        let p = policy(&[]);
        assert_eq!(p.attempts, 2);
        assert_eq!(p.replay_limit, 65536);
        assert_eq!(p.retries_response(503, http::Version::HTTP_11, &HeaderMap::new()), Verdict::Retry(None));
        assert_eq!(p.retries_response(500, http::Version::HTTP_11, &HeaderMap::new()), Verdict::Final);
        assert_eq!(
            p.retries_response(200, http::Version::HTTP_2, &headers(&[("grpc-status", "14")])),
            Verdict::Retry(None)
        );
        assert_eq!(p.retries_response(200, http::Version::HTTP_2, &headers(&[("grpc-status", "13")])), Verdict::Final);
        assert!(p.retries_failure(Failure::of_endpoint(FailureKind::Connect)));
        assert!(p.retries_failure(Failure::of_endpoint(FailureKind::RefusedStream)));
        assert!(!p.retries_failure(Failure::of_endpoint(FailureKind::Reset)));
        assert!(!p.retries_failure(Failure::not_the_endpoints(FailureKind::NotSent)));
    }

    #[test]
    fn conditions_cover_what_envoy_says() {
        let gateway = policy(&["gateway-error"]);
        assert_eq!(gateway.retries_response(502, http::Version::HTTP_11, &HeaderMap::new()), Verdict::Retry(None));
        assert_eq!(gateway.retries_response(500, http::Version::HTTP_11, &HeaderMap::new()), Verdict::Final);
        assert!(gateway.retries_failure(Failure::of_endpoint(FailureKind::PerTryTimeout)));
        assert!(gateway.retries_failure(Failure::of_endpoint(FailureKind::Reset)));
        assert!(!gateway.retries_failure(Failure::of_endpoint(FailureKind::RequestTimeout)));
        assert!(!gateway.retries_failure(Failure::of_endpoint(FailureKind::Protocol)));
        let any = policy(&["5xx", "retriable-4xx"]);
        assert_eq!(any.retries_response(500, http::Version::HTTP_11, &HeaderMap::new()), Verdict::Retry(None));
        assert_eq!(any.retries_response(409, http::Version::HTTP_11, &HeaderMap::new()), Verdict::Retry(None));
        assert_eq!(any.retries_response(404, http::Version::HTTP_11, &HeaderMap::new()), Verdict::Final);
    }

    #[test]
    fn retry_after_sets_a_floor_or_stops_the_retry() {
        let p = policy(&["5xx"]);
        assert_eq!(
            p.retries_response(503, http::Version::HTTP_11, &headers(&[("retry-after", "0")])),
            Verdict::Retry(Some(Duration::ZERO))
        );
        assert_eq!(
            p.retries_response(503, http::Version::HTTP_11, &headers(&[("retry-after", "120")])),
            Verdict::Final
        );
        let date = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(5));
        let mut past = HeaderMap::new();
        past.insert(RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
        assert_eq!(p.retries_response(503, http::Version::HTTP_11, &past), Verdict::Retry(Some(Duration::ZERO)));
    }

    #[test]
    fn the_budget_allows_its_share_and_its_reserve() {
        let budget = RetryBudget::new(20.0, 1, Duration::from_secs(10));
        let now = budget.origin + Duration::from_secs(1);
        for _ in 0..100 {
            budget.deposit(now);
        }
        // 20% of 100 plus 1/s x 10 s.
        let granted = (0..100).filter(|_| budget.withdraw(now)).count();
        assert_eq!(granted, 30);
        // The window slides: 20 s later nothing of it counts, and only the reserve is left.
        let later = now + Duration::from_secs(20);
        assert_eq!((0..100).filter(|_| budget.withdraw(later)).count(), 10);
    }

    proptest! {
        /// Backoff never exceeds min(max, base x 2^(n-1)) and never goes negative.
        #[test]
        fn backoff_stays_in_bounds(base_ms in 1_u64..1000, factor in 1_u64..20, retry in 1_u32..40, unit in 0.0_f64..1.0) {
            let base = Duration::from_millis(base_ms);
            let max = base * factor as u32;
            let wait = backoff(base, max, retry, unit);
            let cap = base.saturating_mul(1 << (retry - 1).min(30)).min(max);
            prop_assert!(wait <= cap);
            prop_assert!(wait <= max);
        }

        /// Whatever mix of requests and retry attempts arrives within one window, the retries granted
        /// never exceed percent x requests + reserve, and a retry is refused only when that is spent.
        #[test]
        fn the_budget_bounds_retries(percent in 0.0_f64..100.0, reserve in 0_u32..5, events in proptest::collection::vec(any::<bool>(), 0..400)) {
            let budget = RetryBudget::new(percent, reserve, Duration::from_secs(10));
            let now = budget.origin + Duration::from_secs(1);
            let (mut requests, mut granted) = (0_u64, 0_u64);
            for is_request in events {
                if is_request {
                    budget.deposit(now);
                    requests += 1;
                } else {
                    let allowed = percent / 100.0 * requests as f64 + f64::from(reserve) * 10.0;
                    let ok = budget.withdraw(now);
                    prop_assert_eq!(ok, (granted + 1) as f64 <= allowed);
                    if ok {
                        granted += 1;
                    }
                }
            }
        }
    }
}
