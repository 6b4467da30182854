//! Outlier detection: taking failing endpoints out of rotation for a while.
//!
//! Two kinds of evidence, as Envoy's outlier detection:
//!
//! - **streaks**, judged on the data path as each attempt ends ([`super::EndpointSet::observe`]): so
//!   many 5xx responses (or gateway errors) in a row eject the endpoint at once;
//! - **comparisons**, judged every `interval` by the cluster's monitor ([`evaluate`]) over the
//!   interval's attempts: an endpoint whose success rate is far below the cluster's, or whose latency
//!   is a multiple of the cluster's median, is ejected.
//!
//! An ejection lasts `base_ejection_time` times the number of times the endpoint has been ejected
//! (that count falls by one for each interval it spends in rotation), at most
//! `max_ejection_time`; never more than `max_ejection_percent` of the endpoints are out at once
//! (but one always may be). When an ejection ends the endpoint's streaks and latency history are
//! forgotten, so it is judged on what it does next, not on what got it ejected.
//!
//! Latency ejection is what Envoy lacks (envoyproxy/envoy#3398, open since 2018). It is made robust
//! against the ways a naive one misfires: it needs a minimum number of endpoints and of requests
//! per endpoint before it judges anyone; it compares with the *median*, which one slow endpoint
//! cannot drag up; an absolute floor (`min_latency`) keeps sub-millisecond jitter from ever
//! counting; a failed or timed-out attempt counts its elapsed time, so an endpoint that hangs looks
//! slow rather than absent; and each interval's mean is smoothed with the previous (each weighs
//! half), so one bad interval alone ejects only an endpoint that was far over the line.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use remora_control_api::config::Invalid;
use remora_control_api::v1;
use remora_control_api::validate;

use super::EndpointSet;
use super::endpoint::nanos_since_start;

/// Why an endpoint was ejected (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EjectReason {
    /// `consecutive_5xx` failures in a row.
    Consecutive5xx,
    /// `consecutive_gateway_errors` in a row.
    ConsecutiveGatewayErrors,
    /// Success rate well below the cluster's.
    SuccessRate,
    /// Latency a multiple of the cluster's median.
    Latency,
}

impl EjectReason {
    /// Every reason, in label order.
    pub const ALL: [EjectReason; 4] = [
        EjectReason::Consecutive5xx,
        EjectReason::ConsecutiveGatewayErrors,
        EjectReason::SuccessRate,
        EjectReason::Latency,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            EjectReason::Consecutive5xx => "consecutive_5xx",
            EjectReason::ConsecutiveGatewayErrors => "consecutive_gateway_errors",
            EjectReason::SuccessRate => "success_rate",
            EjectReason::Latency => "latency",
        }
    }
}

/// Compiled `outlier_detection`.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierConfig {
    /// Failures in a row that eject; 0: off.
    pub consecutive_5xx: u32,
    /// Gateway errors in a row that eject; 0: off.
    pub consecutive_gateway: u32,
    /// How often comparisons run and ejections end.
    pub interval: Duration,
    /// The first ejection's length.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
    /// The most endpoints out at once, in percent (at least one).
    pub max_ejection_percent: u32,
    /// Success-rate comparison, if on.
    pub success_rate: Option<SuccessRate>,
    /// Latency comparison, if on.
    pub latency: Option<Latency>,
}

/// Compiled `success_rate`.
#[derive(Clone, Debug, PartialEq)]
pub struct SuccessRate {
    /// Percentage points below the cluster's rate that eject.
    pub margin_percent: f64,
    /// Endpoints with enough requests needed to judge.
    pub minimum_hosts: u32,
    /// Requests in the interval an endpoint needs to be judged.
    pub request_volume: u32,
}

/// Compiled `latency`.
#[derive(Clone, Debug, PartialEq)]
pub struct Latency {
    /// Multiple of the median that ejects.
    pub multiple: f64,
    /// Latencies below this never eject.
    pub min_latency: Duration,
    /// Endpoints with enough requests needed to judge.
    pub minimum_hosts: u32,
    /// Requests in the interval an endpoint needs to be judged.
    pub request_volume: u32,
}

impl OutlierConfig {
    /// Compiles the resource's settings, defaults applied. Errors name the field.
    pub fn compile(o: &v1::OutlierDetection) -> Result<OutlierConfig, Invalid> {
        let duration = |field: &str, value: Option<&pbjson_types::Duration>, default: Duration| {
            validate::duration(value)
                .map(|d| d.unwrap_or(default))
                .map_err(|m| Invalid::new(format!("outlier_detection.{field}"), m))
        };
        let base_ejection = duration("base_ejection_time", o.base_ejection_time.as_ref(), Duration::from_secs(30))?;
        Ok(OutlierConfig {
            consecutive_5xx: o.consecutive_5xx.unwrap_or(5),
            consecutive_gateway: o.consecutive_gateway_errors,
            interval: duration("interval", o.interval.as_ref(), Duration::from_secs(10))?,
            base_ejection,
            max_ejection: duration("max_ejection_time", o.max_ejection_time.as_ref(), Duration::from_secs(300))?
                .max(base_ejection),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(10).min(100),
            success_rate: o.success_rate.as_ref().map(|s| SuccessRate {
                margin_percent: s.margin_percent.unwrap_or(20.0),
                minimum_hosts: s.minimum_hosts.unwrap_or(3).max(1),
                request_volume: s.request_volume.unwrap_or(50).max(1),
            }),
            latency: match &o.latency {
                None => None,
                Some(l) => Some(Latency {
                    multiple: l.multiple.unwrap_or(3.0),
                    min_latency: duration("latency.min_latency", l.min_latency.as_ref(), Duration::from_millis(50))?,
                    minimum_hosts: l.minimum_hosts.unwrap_or(3).max(2),
                    request_volume: l.request_volume.unwrap_or(20).max(1),
                }),
            },
        })
    }

    /// How many of `weighted` endpoints may be ejected at once.
    pub fn max_ejections(&self, weighted: usize) -> usize {
        if self.max_ejection_percent == 0 {
            return 0;
        }
        (weighted * self.max_ejection_percent as usize / 100).max(1)
    }

    /// The length of an endpoint's `times`-th ejection, in nanoseconds.
    pub fn ejection_time(&self, times: u32) -> u64 {
        let length = self.base_ejection.saturating_mul(times.max(1)).min(self.max_ejection);
        u64::try_from(length.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One interval's verdicts on a set, run by the monitor every `interval`: ends ejections that are
/// over, takes the interval's counts, compares success rates and latencies, ejects the outliers, and
/// rebuilds the view if anything changed.
pub fn evaluate(set: &EndpointSet, config: &OutlierConfig) {
    let now = nanos_since_start(Instant::now());
    let mut changed = false;
    // (member index, requests, successes, smoothed latency in µs) of endpoints in rotation.
    let mut judged: Vec<(usize, u32, u32, f64)> = Vec::new();
    for (index, member) in set.members().iter().enumerate() {
        // (A set with outlier detection keeps every endpoint's state.)
        let Some(state) = member.state.get() else { continue };
        let o = state.outlier();
        let requests = o.requests.swap(0, Ordering::Relaxed);
        let successes = o.successes.swap(0, Ordering::Relaxed);
        let latency_us = o.latency_us.swap(0, Ordering::Relaxed);
        let until = o.ejected_until.load(Ordering::Relaxed);
        if until != 0 {
            if until > now {
                continue;
            }
            // The ejection is over: back in rotation, judged afresh.
            o.ejected_until.store(0, Ordering::Relaxed);
            state.reset_history();
            changed = true;
            tracing::info!(cluster = %set.stats.name, endpoint = %member.address(), "endpoint back from ejection");
            continue;
        }
        // A whole interval in rotation earns back one ejection.
        let _ = o.ejections.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        let smoothed = if requests > 0 {
            let mean = latency_us as f64 / f64::from(requests);
            let previous = f64::from_bits(o.smoothed_latency_us.load(Ordering::Relaxed));
            let next = if previous > 0.0 { (previous + mean) / 2.0 } else { mean };
            o.smoothed_latency_us.store(next.to_bits(), Ordering::Relaxed);
            next
        } else {
            0.0
        };
        if member.endpoint.weight > 0 {
            judged.push((index, requests, successes, smoothed));
        }
    }

    let mut outliers: Vec<(usize, super::outlier::EjectReason)> = Vec::new();
    if let Some(rule) = &config.success_rate {
        let enough: Vec<&(usize, u32, u32, f64)> = judged.iter().filter(|j| j.1 >= rule.request_volume).collect();
        if enough.len() >= rule.minimum_hosts as usize {
            let (requests, successes) =
                enough.iter().fold((0_u64, 0_u64), |(r, s), j| (r + u64::from(j.1), s + u64::from(j.2)));
            let cluster_rate = successes as f64 / requests as f64 * 100.0;
            for (index, requests, successes, _) in &enough {
                let rate = f64::from(*successes) / f64::from(*requests) * 100.0;
                if rate < cluster_rate - rule.margin_percent {
                    outliers.push((*index, EjectReason::SuccessRate));
                }
            }
        }
    }
    if let Some(rule) = &config.latency {
        let enough: Vec<&(usize, u32, u32, f64)> =
            judged.iter().filter(|j| j.1 >= rule.request_volume && j.3 > 0.0).collect();
        if enough.len() >= rule.minimum_hosts as usize {
            let mut latencies: Vec<f64> = enough.iter().map(|j| j.3).collect();
            latencies.sort_by(f64::total_cmp);
            let median = median(&latencies);
            let floor = rule.min_latency.as_micros() as f64;
            for (index, _, _, latency) in &enough {
                if *latency > median * rule.multiple && *latency > floor && !outliers.iter().any(|o| o.0 == *index) {
                    outliers.push((*index, EjectReason::Latency));
                }
            }
        }
    }
    // Worst first, so the cap on ejections keeps the worst out.
    outliers.sort_by(|a, b| {
        let latency = |i: usize| judged.iter().find(|j| j.0 == i).map_or(0.0, |j| j.3);
        latency(b.0).total_cmp(&latency(a.0))
    });
    for (index, reason) in outliers {
        if let Some(state) = set.members().get(index).and_then(|member| member.state.get()) {
            // `eject` rebuilds the view itself.
            set.eject(state, reason, now);
        }
    }
    if changed {
        set.refresh();
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;
    use std::sync::Arc;

    use super::*;
    use crate::balance::metrics::HealthStats;
    use crate::balance::{Endpoint, Observed, Proximity, SetConfig, Strategy};

    fn config(extra: impl FnOnce(&mut OutlierConfig)) -> OutlierConfig {
        let mut config = OutlierConfig::compile(&v1::OutlierDetection::default()).unwrap();
        config.max_ejection_percent = 100;
        extra(&mut config);
        config
    }

    fn set(n: u16, outlier: OutlierConfig) -> EndpointSet {
        let endpoints = (0..n)
            .map(|i| Endpoint {
                address: SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
                weight: 1,
                proximity: Proximity::Elsewhere,
                declared: Default::default(),
            })
            .collect();
        let config = SetConfig {
            outlier: Some(Box::new(outlier)),
            panic_threshold: 0,
            ..SetConfig::with_strategy(Strategy::RoundRobin)
        };
        EndpointSet::new(config, endpoints, &|_| None, HealthStats::detached("c"))
    }

    /// An attempt start `latency` ago.
    fn ago(latency: Duration) -> Instant {
        Instant::now() - latency
    }

    fn served(set: &EndpointSet, picks: usize) -> Vec<u16> {
        let mut ports: Vec<u16> = (0..picks).map(|_| set.pick(None).unwrap().address().port() - 9000).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    #[test]
    fn defaults_follow_envoy() {
        let c = OutlierConfig::compile(&v1::OutlierDetection::default()).unwrap();
        assert_eq!((c.consecutive_5xx, c.consecutive_gateway, c.max_ejection_percent), (5, 0, 10));
        assert_eq!(
            (c.interval, c.base_ejection, c.max_ejection),
            (Duration::from_secs(10), Duration::from_secs(30), Duration::from_secs(300))
        );
        assert_eq!(c.max_ejections(3), 1, "at least one may always go");
        assert_eq!(c.max_ejections(50), 5);
        // Ejection time grows with each ejection, up to the maximum.
        assert_eq!(c.ejection_time(1), 30_000_000_000);
        assert_eq!(c.ejection_time(3), 90_000_000_000);
        assert_eq!(c.ejection_time(50), 300_000_000_000);
    }

    #[test]
    fn a_failure_streak_ejects_and_the_cap_holds() {
        let set = set(
            3,
            config(|c| {
                c.consecutive_5xx = 3;
                c.max_ejection_percent = 40;
            }),
        );
        let ms = Duration::from_millis(1);
        let [a, b, _] = [0, 1, 2].map(|i| set.members()[i].kept());
        for _ in 0..2 {
            assert!(!set.observe(&a, Observed::ServerError { gateway: false }, ago(ms), Instant::now()));
        }
        assert!(
            set.observe(&a, Observed::ServerError { gateway: false }, ago(ms), Instant::now()),
            "the third failure in a row ejects"
        );
        assert_eq!(served(&set, 30), [1, 2]);
        for _ in 0..3 {
            set.observe(&b, Observed::NoResponse, ago(ms), Instant::now());
        }
        assert_eq!(served(&set, 30), [1, 2], "40% of 3 allows one ejection at a time");
        assert_eq!(set.view().ejected(), 1);
    }

    #[test]
    fn successes_break_the_streak() {
        let set = set(2, config(|c| c.consecutive_gateway = 2));
        let a = set.members()[0].kept();
        let ms = Duration::from_millis(1);
        set.observe(&a, Observed::ServerError { gateway: true }, ago(ms), Instant::now());
        set.observe(&a, Observed::Success, ago(ms), Instant::now());
        assert!(!set.observe(&a, Observed::ServerError { gateway: true }, ago(ms), Instant::now()));
        assert!(set.observe(&a, Observed::ServerError { gateway: true }, ago(ms), Instant::now()));
    }

    fn feed(set: &EndpointSet, index: usize, requests: u32, failures: u32, latency: Duration) {
        let state = set.members()[index].kept();
        for i in 0..requests {
            let observed = if i < failures { Observed::ServerError { gateway: false } } else { Observed::Success };
            // Spread out, so streaks do not eject: this test is about the interval's comparison.
            state.outlier().consecutive_5xx.store(0, Ordering::Relaxed);
            state.observe(observed, latency, nanos_since_start(Instant::now()), true);
        }
    }

    #[test]
    fn a_low_success_rate_is_ejected_at_the_interval() {
        let set = set(
            4,
            config(|c| {
                c.consecutive_5xx = 0;
                c.success_rate = Some(SuccessRate { margin_percent: 20.0, minimum_hosts: 3, request_volume: 50 });
            }),
        );
        let ms = Duration::from_millis(1);
        for i in 0..3 {
            feed(&set, i, 100, 2, ms);
        }
        feed(&set, 3, 100, 50, ms);
        evaluate(&set, set.config().outlier.as_ref().unwrap());
        assert_eq!(served(&set, 40), [0, 1, 2]);
        assert_eq!(set.view().ejected(), 1);
    }

    #[test]
    fn success_rate_needs_enough_hosts_and_volume() {
        let set = set(
            3,
            config(|c| {
                c.consecutive_5xx = 0;
                c.success_rate = Some(SuccessRate { margin_percent: 20.0, minimum_hosts: 3, request_volume: 50 });
            }),
        );
        let ms = Duration::from_millis(1);
        feed(&set, 0, 100, 0, ms);
        feed(&set, 1, 100, 0, ms);
        feed(&set, 2, 20, 20, ms);
        evaluate(&set, set.config().outlier.as_ref().unwrap());
        assert_eq!(set.view().ejected(), 0, "20 requests are below the volume needed to judge");
    }

    #[test]
    fn a_slow_endpoint_is_ejected_but_small_differences_are_not() {
        let latency =
            Latency { multiple: 3.0, min_latency: Duration::from_millis(20), minimum_hosts: 3, request_volume: 10 };
        let set = set(
            4,
            config(|c| {
                c.consecutive_5xx = 0;
                c.latency = Some(latency);
            }),
        );
        let outlier = *set.config().outlier.clone().unwrap();
        // 1 ms against 3 ms: three times the median, but under the floor: nobody goes.
        for (i, ms) in [(0, 1), (1, 1), (2, 1), (3, 4)] {
            feed(&set, i, 20, 0, Duration::from_millis(ms));
        }
        evaluate(&set, &outlier);
        assert_eq!(set.view().ejected(), 0);
        // 1 ms against 60 ms (smoothed with its 4 ms past to 32 ms): out.
        for (i, ms) in [(0, 1), (1, 1), (2, 1), (3, 60)] {
            feed(&set, i, 20, 0, Duration::from_millis(ms));
        }
        evaluate(&set, &outlier);
        assert_eq!(served(&set, 40), [0, 1, 2]);
    }

    #[test]
    fn ejections_end_and_history_is_forgotten() {
        let set = Arc::new(set(
            2,
            config(|c| {
                c.consecutive_5xx = 1;
                c.base_ejection = Duration::from_millis(1);
            }),
        ));
        let a = set.members()[0].kept();
        assert!(set.observe(&a, Observed::NoResponse, ago(Duration::from_secs(1)), Instant::now()));
        assert_eq!(served(&set, 10), [1]);
        std::thread::sleep(Duration::from_millis(5));
        evaluate(&set, set.config().outlier.as_ref().unwrap());
        assert_eq!(served(&set, 10), [0, 1]);
        assert_eq!(a.outlier().smoothed_latency_us.load(Ordering::Relaxed), 0);
    }
}
