//! Choosing an endpoint for a request or connection, and a backend cluster for a route.
//!
//! An [`EndpointSet`] is built with each snapshot from a cluster's Endpoints resource; the data path
//! calls [`EndpointSet::pick`] once per request (or TCP connection, or retry) and gets a [`Member`]
//! back: its address, weight and run-time [`EndpointState`]. Sets whose endpoints and balancing
//! settings did not change are carried into the next snapshot whole (keeping the round-robin
//! position), and every set takes the endpoint states of the addresses it shares with its
//! predecessor, so load, latency, ejections and health survive any config change.
//!
//! A pick never scans the endpoints. Which endpoints may take traffic is decided ahead of time, in a
//! [`View`] held behind an `ArcSwap`, rebuilt by [`EndpointSet::refresh`] whenever an endpoint's
//! eligibility changes (an ejection starts or ends, a health check flips) and never by a request
//! that merely picks:
//!
//! - an endpoint is *healthy* when its weight is above zero, outlier detection has not ejected it,
//!   and its health check (if any) passes;
//! - when fewer than `panic_threshold` percent are healthy, health is ignored and every endpoint
//!   with a weight takes traffic (Envoy's panic mode);
//! - otherwise healthy endpoints are tiered by locality (`locality_preference`): the proxy's own
//!   zone, its region, anywhere; each tier takes traffic in proportion to its health, the rest
//!   spilling to the next.
//!
//! Within the chosen tier the strategy picks: smooth weighted round robin (nginx's: weights 5:1:1
//! give `a a b a c a a`, precomputed into a schedule, one atomic increment per pick), weighted
//! random, least request or peak EWMA over two weighted random draws (the power of two choices),
//! or a consistent-hash ring (`ring`). [`WeightedChoice`] splits a route's traffic between clusters.
//!
//! # Layout
//! - [`endpoint`] — [`EndpointState`]: active requests, peak-EWMA latency, failure streaks, health.
//! - [`ring`] — the consistent-hash ring and the stable key hash.
//! - [`outlier`] — outlier detection: ejection on failure streaks, success rate and latency.
//! - [`health`] — active health checks (HTTP and TCP probes).
//! - [`monitor`] — the background task per cluster that runs health checks and outlier intervals.

pub mod endpoint;
pub mod health;
pub mod metrics;
pub mod monitor;
pub mod outlier;
pub mod ring;
pub mod state_slot;
pub mod view;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::HeaderMap;
use http::header::{COOKIE, HeaderName};

use endpoint::{EWMA_INITIAL, nanos_since_start};
pub use endpoint::{EndpointState, Health, Observed};
use outlier::{EjectReason, OutlierConfig};
use ring::Ring;
use state_slot::StateSlot;

use metrics::HealthStats;
pub use view::View;
use view::{Members, Tier, draw, smooth_schedule, two_draws};

/// How an [`EndpointSet`] picks within the endpoints eligible for traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
    /// The fewer active requests per unit of weight, of two weighted random draws.
    LeastRequest,
    /// The lower peak-EWMA latency x (active + 1) per unit of weight, of two weighted random draws.
    Ewma,
    /// Consistent hashing on the request's key.
    RingHash,
}

impl Strategy {
    /// The configuration's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
            Strategy::LeastRequest => "least_request",
            Strategy::Ewma => "ewma",
            Strategy::RingHash => "ring_hash",
        }
    }

    /// Whether picks read active-request counts, so requests must keep them.
    pub fn counts_active(self) -> bool {
        matches!(self, Strategy::LeastRequest | Strategy::Ewma)
    }
}

/// What `ring_hash` hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address.
    SourceIp,
}

impl HashOn {
    /// The key of a request from `client` with `headers` (none for opaque TCP), or `None` when the
    /// request does not carry it.
    pub fn key(&self, headers: Option<&HeaderMap>, client: Option<SocketAddr>) -> Option<u64> {
        match self {
            HashOn::Header(name) => headers?.get(name).map(|value| ring::hash_key(value.as_bytes())),
            HashOn::Cookie(name) => {
                let headers = headers?;
                headers
                    .get_all(COOKIE)
                    .iter()
                    .filter_map(|value| value.to_str().ok())
                    .flat_map(|value| value.split(';'))
                    .find_map(|pair| {
                        let (key, value) = pair.trim().split_once('=')?;
                        (key == name).then(|| ring::hash_key(value.trim_matches('"').as_bytes()))
                    })
            }
            HashOn::SourceIp => match client?.ip() {
                IpAddr::V4(ip) => Some(ring::hash_key(&ip.octets())),
                IpAddr::V6(ip) => Some(ring::hash_key(&ip.octets())),
            },
        }
    }
}

/// Zone-aware routing settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityPreference {
    /// A tier takes all of its traffic while at least this percent of it is healthy.
    pub min_healthy_percent: u32,
}

/// How close an endpoint is to this proxy; lower is closer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proximity {
    /// Same region and zone.
    Zone = 0,
    /// Same region.
    Region = 1,
    /// Anywhere else, or unknown.
    Elsewhere = 2,
}

impl Proximity {
    /// The name `/clusters` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Proximity::Zone => "zone",
            Proximity::Region => "region",
            Proximity::Elsewhere => "elsewhere",
        }
    }

    /// How close an endpoint at (`region`, `zone`) is to a proxy at (`own_region`, `own_zone`).
    /// Empty strings are unknown, and unknown is never close.
    pub fn of(region: &str, zone: &str, own_region: &str, own_zone: &str) -> Proximity {
        let same_region = !own_region.is_empty() && region == own_region;
        if same_region && !own_zone.is_empty() && zone == own_zone {
            Proximity::Zone
        } else if same_region {
            Proximity::Region
        } else {
            Proximity::Elsewhere
        }
    }
}

/// An endpoint's place in its set, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub address: SocketAddr,
    /// Relative share of requests; 0 gets none.
    pub weight: u32,
    /// How close it is to this proxy (`Elsewhere` when the cluster has no locality preference).
    pub proximity: Proximity,
    /// What its owner declared of its health.
    pub declared: Declared,
}

/// An endpoint's health as its owner declares it (the resource's `health`), beside what the
/// proxy's own checks find.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Declared {
    /// Takes traffic.
    #[default]
    Healthy,
    /// Counts as failing: no traffic unless the cluster is in panic.
    Unhealthy,
    /// Finishing its work: never picked.
    Draining,
}

impl Declared {
    /// The name `/clusters` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Declared::Healthy => "healthy",
            Declared::Unhealthy => "unhealthy",
            Declared::Draining => "draining",
        }
    }
}

/// Everything that decides how a set picks; a set is reused by the next snapshot only if this is
/// unchanged.
#[derive(Clone, Debug, PartialEq)]
pub struct SetConfig {
    /// The strategy.
    pub strategy: Strategy,
    /// The key, for `RingHash`.
    pub hash_on: Option<HashOn>,
    /// Percent healthy below which health is ignored; 0: never.
    pub panic_threshold: u32,
    /// Zone-aware routing, if asked for.
    pub locality: Option<LocalityPreference>,
    /// Outlier detection, if asked for.
    pub outlier: Option<Box<OutlierConfig>>,
    /// Whether a health check decides endpoints' health.
    pub health_checked: bool,
}

impl SetConfig {
    /// Plain round robin: no health, no locality.
    pub fn round_robin() -> SetConfig {
        SetConfig::with_strategy(Strategy::RoundRobin)
    }

    /// `strategy` with the defaults for the rest.
    pub fn with_strategy(strategy: Strategy) -> SetConfig {
        SetConfig {
            strategy,
            hash_on: None,
            panic_threshold: crate::limits::DEFAULT_PANIC_THRESHOLD,
            locality: None,
            outlier: None,
            health_checked: false,
        }
    }

    /// Whether anything reads or writes its endpoints' run-time states: least_request and ewma
    /// (active requests, latency), outlier detection (ejections) and health checks. A set that
    /// needs none (round robin, random or ring hash alone) makes none: a cluster is held by the
    /// thousand, and a state is 64 bytes of heap per endpoint.
    pub fn keeps_states(&self) -> bool {
        self.makes_states_first() || matches!(self.strategy, Strategy::LeastRequest | Strategy::Ewma)
    }

    /// Whether its endpoints' states are made with the set: a health check or outlier detection
    /// writes them before any request. A balancer's alone are made by the first request to each
    /// endpoint ([`StateSlot::on_demand`]).
    fn makes_states_first(&self) -> bool {
        self.health_checked || self.outlier.is_some()
    }
}

/// One endpoint of a set.
#[derive(Debug)]
pub struct Member {
    /// Its configured address, weight and proximity.
    pub endpoint: Endpoint,
    /// Its run-time state, shared with the sets before and after this one; none when neither
    /// this set nor one before it kept one ([`SetConfig::keeps_states`]), made by the first request
    /// to it when only the balancer reads it.
    pub state: StateSlot,
}

impl Member {
    /// Where to connect.
    pub fn address(&self) -> SocketAddr {
        self.endpoint.address
    }

    /// Requests in flight on it (none counted without a state).
    fn active(&self) -> u32 {
        self.state.get().map_or(0, EndpointState::active)
    }

    /// Whether outlier detection has it ejected at `now`.
    fn is_ejected(&self, now: u64) -> bool {
        self.state.get().is_some_and(|state| state.is_ejected(now))
    }
}

/// The endpoints of one cluster and how to pick among them.
#[derive(Debug)]
pub struct EndpointSet {
    config: SetConfig,
    members: Vec<Member>,
    view: ArcSwap<View>,
    /// Serialises rebuilds of the view (never taken by a pick).
    refreshing: Mutex<()>,
    stats: Arc<HealthStats>,
}

impl EndpointSet {
    /// Builds a set over `endpoints`. `carried` gives the state of an address a previous set of this
    /// cluster had (so it survives, even through a set that does not read it); new addresses get
    /// fresh states when the set keeps states. `stats` counts ejections.
    pub fn new(
        config: SetConfig,
        endpoints: Vec<Endpoint>,
        carried: &dyn Fn(SocketAddr) -> Option<Arc<EndpointState>>,
        stats: Arc<HealthStats>,
    ) -> EndpointSet {
        let members = endpoints
            .into_iter()
            .map(|endpoint| {
                // A carried state is taken as it is: building a set must not change what the set
                // serving now sees (the new one may yet be rejected). Verdicts the new set's
                // settings do not ask for (a health state without a health check, an ejection
                // without outlier detection) are ignored by its view instead.
                let state = match carried(endpoint.address) {
                    Some(state) => StateSlot::holding(state),
                    None if config.makes_states_first() => {
                        let health = if config.health_checked { Health::Unknown } else { Health::Unchecked };
                        StateSlot::holding(Arc::new(EndpointState::new(health)))
                    }
                    None if config.keeps_states() => StateSlot::on_demand(),
                    None => StateSlot::none(),
                };
                Member { endpoint, state }
            })
            .collect();
        let set = EndpointSet {
            config,
            members,
            view: ArcSwap::from_pointee(View::default()),
            refreshing: Mutex::new(()),
            stats,
        };
        set.refresh();
        set
    }

    /// How it picks.
    pub fn config(&self) -> &SetConfig {
        &self.config
    }

    /// Every endpoint, in configuration order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The configured endpoints, in order (what decides whether the next snapshot can reuse the set).
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.members.iter().map(|m| &m.endpoint)
    }

    /// The state of the endpoint at `address`, if the set has it and it has been made.
    pub fn state_of(&self, address: SocketAddr) -> Option<Arc<EndpointState>> {
        self.members.iter().find(|m| m.endpoint.address == address).and_then(|m| m.state.existing())
    }

    /// Which endpoints take traffic now.
    pub fn view(&self) -> arc_swap::Guard<Arc<View>> {
        self.view.load()
    }

    /// What `/clusters` shows of the set: the view's counts, and every endpoint's configuration and
    /// run-time state.
    pub fn report(&self) -> serde_json::Value {
        let now = nanos_since_start(Instant::now());
        let view = self.view.load();
        let endpoints: Vec<serde_json::Value> = self
            .members
            .iter()
            .map(|m| {
                let untouched;
                let state = match m.state.get() {
                    Some(state) => state,
                    None => {
                        untouched = EndpointState::new(Health::Unchecked);
                        &untouched
                    }
                };
                let health = match m.endpoint.declared {
                    Declared::Healthy if self.config.health_checked => state.health().as_str(),
                    Declared::Healthy => "unchecked",
                    declared => declared.as_str(),
                };
                let ejected = self.config.outlier.as_ref().and_then(|_| state.ejected_for(now));
                serde_json::json!({
                    "address": m.address().to_string(),
                    "weight": m.endpoint.weight,
                    "locality": m.endpoint.proximity.as_str(),
                    "health": health,
                    "ejected_for_seconds": ejected.map(|d| d.as_secs_f64()),
                    "ejections": state.ejections(),
                    "active_requests": state.active(),
                    "ewma_latency_ms": state.ewma_ns(now) / 1e6,
                })
            })
            .collect();
        serde_json::json!({
            "balancer": self.config.strategy.as_str(),
            "health_checked": self.config.health_checked,
            "outlier_detection": self.config.outlier.is_some(),
            "weighted": view.weighted,
            "healthy": view.healthy,
            "ejected": view.ejected,
            "panic": view.panic,
            "endpoints": endpoints,
        })
    }

    /// The endpoint for the next request, or `None` when no endpoint has a weight above zero.
    /// `key` is the request's hash key, for `RingHash` (a request without one goes to a random
    /// endpoint).
    pub fn pick(&self, key: Option<u64>) -> Option<&Member> {
        let view = self.view.load();
        let tier = view.tier()?;
        let index = match self.config.strategy {
            Strategy::RoundRobin => {
                let schedule = tier.schedule();
                let turn = tier.cursor.fetch_add(1, Ordering::Relaxed) % schedule.len().max(1);
                *schedule.get(turn)?
            }
            Strategy::Random => draw(tier)?,
            Strategy::LeastRequest => {
                let (a, b) = two_draws(tier)?;
                let (ma, mb) = (self.members.get(a as usize)?, self.members.get(b as usize)?);
                // active/weight, compared without division.
                let load = |m: &Member, other: &Member| u64::from(m.active()) * u64::from(other.endpoint.weight);
                if load(mb, ma) < load(ma, mb) { b } else { a }
            }
            Strategy::Ewma => {
                let (a, b) = two_draws(tier)?;
                if a == b {
                    a
                } else {
                    let now = nanos_since_start(Instant::now());
                    let cost = |i: u32| {
                        self.members.get(i as usize).map_or(f64::INFINITY, |m| {
                            let ewma = m.state.get().map_or(EWMA_INITIAL.as_nanos() as f64, |s| s.ewma_ns(now));
                            ewma * f64::from(m.active() + 1) / f64::from(m.endpoint.weight.max(1))
                        })
                    };
                    if cost(b) < cost(a) { b } else { a }
                }
            }
            Strategy::RingHash => match (key, &tier.ring) {
                (Some(key), Some(ring)) => ring.lookup(key)?,
                _ => draw(tier)?,
            },
        };
        self.members.get(index as usize)
    }

    /// Like [`EndpointSet::pick`], but for an endpoint not in `avoid` (the ones a retried request
    /// already tried). A hashed key moves to the next endpoint clockwise on the ring, so every retry
    /// of one key goes to the same second choice; other strategies draw again a couple of times,
    /// then take the first endpoint of the tier not avoided. Falls back to the first pick when every
    /// endpoint is avoided.
    pub fn pick_avoiding(&self, key: Option<u64>, avoid: &[SocketAddr]) -> Option<&Member> {
        let picked = self.pick(key)?;
        if avoid.is_empty() || !avoid.contains(&picked.address()) {
            return Some(picked);
        }
        let allowed = |index: u32| self.members.get(index as usize).filter(|m| !avoid.contains(&m.address()));
        let view = self.view.load();
        let Some(tier) = view.tier() else { return Some(picked) };
        if let (Strategy::RingHash, Some(key), Some(ring)) = (self.config.strategy, key, &tier.ring) {
            return ring.find_from(key, allowed).or(Some(picked));
        }
        for _ in 0..2 {
            if let Some(member) = self.pick(None).filter(|m| !avoid.contains(&m.address())) {
                return Some(member);
            }
        }
        let members = tier.members();
        let start = fastrand::usize(..members.len().max(1));
        let (after, before) = members.split_at(start.min(members.len()));
        before.iter().chain(after).find_map(|index| allowed(*index)).or(Some(picked))
    }

    /// Whether any endpoint is healthy now (a route's fallback serves when none is).
    pub fn has_healthy(&self) -> bool {
        self.view.load().healthy > 0
    }

    /// Records how an attempt on `member` that ran from `started` to `at` ended; ejects it if that
    /// completes a failure streak outlier detection counts. Returns whether it was ejected. The
    /// caller's clock read (`at`) serves the latency and the estimate's timestamp.
    pub fn observe(&self, member: &EndpointState, observed: Observed, started: Instant, at: Instant) -> bool {
        let now = nanos_since_start(at);
        let outlier = self.config.outlier.as_deref();
        let latency = at.saturating_duration_since(started);
        let (streak_5xx, streak_gateway) = member.observe(observed, latency, now, outlier.is_some());
        let Some(outlier) = outlier else { return false };
        let reason = if outlier.consecutive_5xx > 0 && streak_5xx >= outlier.consecutive_5xx {
            EjectReason::Consecutive5xx
        } else if outlier.consecutive_gateway > 0 && streak_gateway >= outlier.consecutive_gateway {
            EjectReason::ConsecutiveGatewayErrors
        } else {
            return false;
        };
        self.eject(member, reason, now)
    }

    /// Ejects `member` for `reason`, unless it already is or the cap on ejections is reached.
    /// Returns whether it was ejected.
    pub(crate) fn eject(&self, member: &EndpointState, reason: EjectReason, now: u64) -> bool {
        let Some(outlier) = &self.config.outlier else { return false };
        if member.is_ejected(now) {
            return false;
        }
        {
            let _guard = self.refreshing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let weighted = self.members.iter().filter(|m| m.endpoint.weight > 0).count();
            let ejected = self.members.iter().filter(|m| m.is_ejected(now)).count();
            if ejected >= outlier.max_ejections(weighted) || member.is_ejected(now) {
                return false;
            }
            let counters = member.outlier();
            let times = counters.ejections.fetch_add(1, Ordering::Relaxed) + 1;
            let until = now.saturating_add(outlier.ejection_time(times));
            counters.ejected_until.store(until, Ordering::Relaxed);
            counters.consecutive_5xx.store(0, Ordering::Relaxed);
            counters.consecutive_gateway.store(0, Ordering::Relaxed);
        }
        self.stats.record_ejection(reason);
        let address = self
            .members
            .iter()
            .find(|m| m.state.get().is_some_and(|state| std::ptr::eq(state, member)))
            .map(Member::address);
        tracing::info!(
            cluster = %self.stats.name,
            endpoint = %address.map_or_else(|| "?".to_owned(), |a| a.to_string()),
            reason = reason.as_str(),
            ejection = ?std::time::Duration::from_nanos(outlier.ejection_time(member.ejections())),
            "endpoint ejected"
        );
        self.refresh();
        true
    }

    /// Rebuilds the view from every endpoint's weight, health and ejection as of now. Called when
    /// any of them changes; cheap enough to call on every health-check round.
    pub fn refresh(&self) {
        let _guard = self.refreshing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let view = self.compute_view(nanos_since_start(Instant::now()));
        self.stats.set_endpoint_health(view.healthy, view.ejected);
        self.view.store(Arc::new(view));
    }

    fn compute_view(&self, now: u64) -> View {
        // A draining endpoint is out altogether: it counts for nothing, not even panic.
        let weighted: Vec<u32> = (0..self.members.len() as u32)
            .filter(|i| {
                let endpoint = &self.members[*i as usize].endpoint;
                endpoint.weight > 0 && endpoint.declared != Declared::Draining
            })
            .collect();
        // Only what this set's settings ask for counts: ejections with outlier detection, and with
        // a health check nothing but a passing verdict (never checked counts as unknown). An
        // endpoint declared unhealthy fails whatever the checks say.
        let ejected_now = |i: &u32| self.config.outlier.is_some() && self.members[*i as usize].is_ejected(now);
        let passes = |i: &u32| {
            let member = &self.members[*i as usize];
            member.endpoint.declared == Declared::Healthy
                && (!self.config.health_checked || member.state.get().is_some_and(|s| s.health() == Health::Healthy))
        };
        let healthy: Vec<u32> = weighted.iter().copied().filter(|i| !ejected_now(i) && passes(i)).collect();
        let ejected = weighted.iter().filter(|i| ejected_now(i)).count();
        let threshold = u64::from(self.config.panic_threshold);
        let panic = threshold > 0 && (healthy.len() as u64) * 100 < threshold * weighted.len() as u64;
        let mut view = View {
            first: None,
            farther: Vec::new(),
            shares: Vec::new(),
            weighted: weighted.len(),
            healthy: healthy.len(),
            ejected,
            panic,
        };
        if panic || self.config.locality.is_none() {
            let members = if panic { weighted } else { healthy };
            if !members.is_empty() {
                view.first = Some(self.tier(members));
            }
            return view;
        }
        let min_healthy = f64::from(self.config.locality.as_ref().map_or(100, |l| l.min_healthy_percent.max(1)));
        let mut remaining = 1.0_f64;
        let mut shares = Vec::new();
        for proximity in [Proximity::Zone, Proximity::Region, Proximity::Elsewhere] {
            let in_tier = |i: &u32| self.members[*i as usize].endpoint.proximity == proximity;
            let total = weighted.iter().filter(|i| in_tier(i)).count();
            let members: Vec<u32> = healthy.iter().copied().filter(|i| in_tier(i)).collect();
            if total == 0 || members.is_empty() || remaining <= 0.0 {
                continue;
            }
            // A tier at min_healthy percent or better takes all that is left; below it, in proportion.
            let load = (members.len() as f64 / total as f64 * 100.0 / min_healthy).min(1.0);
            let share = remaining.min(load);
            remaining -= share;
            shares.push(share);
            view.push(self.tier(members));
        }
        // Health left over (every tier below its minimum) is spread in proportion to what each took.
        let taken: f64 = shares.iter().sum();
        if !view.farther.is_empty() && taken > 0.0 {
            let mut cumulative = 0.0;
            view.shares = shares
                .iter()
                .map(|share| {
                    cumulative += share / taken;
                    cumulative
                })
                .collect();
            if let Some(last) = view.shares.last_mut() {
                *last = 1.0;
            }
        }
        view
    }

    fn tier(&self, members: Vec<u32>) -> Tier {
        let weights: Vec<u32> = members.iter().map(|i| self.members[*i as usize].endpoint.weight).collect();
        let mut schedule: Vec<u32> = smooth_schedule(&weights).into_iter().map(|slot| members[slot as usize]).collect();
        if schedule == members {
            schedule = Vec::new();
        }
        let schedule = schedule.into_boxed_slice();
        let ring = (self.config.strategy == Strategy::RingHash).then(|| {
            Ring::new(members.iter().map(|i| {
                let member = &self.members[*i as usize];
                (*i, member.endpoint.address, member.endpoint.weight)
            }))
        });
        // Start each new view's rotation somewhere random: many proxies rebuilding at the same moment
        // (a health check flipping for all of them) must not start in step.
        let cycle = if schedule.is_empty() { members.len() } else { schedule.len() };
        let cursor = AtomicUsize::new(fastrand::usize(..cycle.max(1)));
        Tier { members: Members::new(members), schedule, cursor, ring }
    }
}

/// A random pick among choices in proportion to their weights (a route's backend clusters).
#[derive(Debug)]
pub struct WeightedChoice<T> {
    /// Each choice with the running total of weights up to and including it.
    choices: Vec<(T, u64)>,
    total: u64,
}

impl<T> WeightedChoice<T> {
    /// Builds the choice; zero weights are kept but never picked.
    pub fn new(choices: impl IntoIterator<Item = (T, u32)>) -> Self {
        let mut total = 0_u64;
        let choices = choices
            .into_iter()
            .map(|(choice, weight)| {
                total += u64::from(weight);
                (choice, total)
            })
            .collect();
        WeightedChoice { choices, total }
    }

    /// One choice, or `None` when every weight is zero. A single choice costs no random number.
    pub fn pick(&self) -> Option<&T> {
        match self.choices.as_slice() {
            [] => None,
            [(only, _)] => (self.total > 0).then_some(only),
            many => {
                if self.total == 0 {
                    return None;
                }
                let ticket = fastrand::u64(0..self.total);
                let index = many.partition_point(|(_, running)| *running <= ticket);
                many.get(index).map(|(choice, _)| choice)
            }
        }
    }
}

#[cfg(test)]
impl Member {
    /// Its state, which the set under test keeps (made now if promised).
    #[allow(clippy::expect_used)]
    pub(crate) fn kept(&self) -> Arc<EndpointState> {
        self.state.shared().expect("the set keeps no endpoint states")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;
    use std::time::Duration;

    use super::view::{MAX_SCHEDULE, gcd};

    use proptest::prelude::{any, prop_assert, prop_assert_eq, prop_assume, proptest};

    use super::*;

    fn endpoint(i: usize, weight: u32, proximity: Proximity) -> Endpoint {
        Endpoint {
            address: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
            weight,
            proximity,
            declared: Declared::Healthy,
        }
    }

    fn build(config: SetConfig, endpoints: Vec<Endpoint>) -> EndpointSet {
        EndpointSet::new(config, endpoints, &|_| None, HealthStats::detached("test"))
    }

    fn set_with(strategy: Strategy, weights: &[u32]) -> EndpointSet {
        let endpoints = weights.iter().enumerate().map(|(i, w)| endpoint(i, *w, Proximity::Elsewhere)).collect();
        build(SetConfig::with_strategy(strategy), endpoints)
    }

    fn set(weights: &[u32]) -> EndpointSet {
        set_with(Strategy::RoundRobin, weights)
    }

    fn port(member: &Member) -> usize {
        usize::from(member.address().port() - 9000)
    }

    fn ports(set: &EndpointSet, n: usize) -> Vec<usize> {
        (0..n).map(|_| port(set.pick(None).unwrap())).collect()
    }

    fn counts(set: &EndpointSet, n: usize) -> HashMap<usize, usize> {
        let mut counts = HashMap::new();
        for p in ports(set, n) {
            *counts.entry(p).or_default() += 1;
        }
        counts
    }

    /// `got` is `expected` started somewhere: each new view starts its rotation at random.
    fn is_rotation(got: &[usize], cycle: &[usize]) -> bool {
        (0..cycle.len()).any(|start| got.iter().enumerate().all(|(i, p)| *p == cycle[(start + i) % cycle.len()]))
    }

    #[test]
    fn random_picks_follow_the_weights() {
        let counts = counts(&set_with(Strategy::Random, &[3, 1, 0]), 40_000);
        assert!(!counts.contains_key(&2));
        assert!((29_000..31_000).contains(&counts[&0]), "{counts:?}");
    }

    #[test]
    fn equal_weights_rotate() {
        assert!(is_rotation(&ports(&set(&[1, 1, 1]), 6), &[0, 1, 2]));
    }

    #[test]
    fn weighted_rotation_is_smooth() {
        // nginx's documented sequence for weights 5, 1, 1.
        assert!(is_rotation(&ports(&set(&[5, 1, 1]), 14), &[0, 0, 1, 0, 2, 0, 0]));
    }

    #[test]
    fn zero_weights_get_nothing_and_all_zero_is_none() {
        assert_eq!(ports(&set(&[0, 2, 0]), 3), [1, 1, 1]);
        assert!(set(&[0, 0]).pick(None).is_none());
        assert!(set(&[]).pick(None).is_none());
    }

    #[test]
    fn huge_weights_keep_their_proportions() {
        let set = set(&[3_000_000, 1_000_000, 1]);
        let cycle = set.view().first.as_ref().unwrap().schedule().len();
        assert!(cycle as u64 <= MAX_SCHEDULE + 3);
        let counts = counts(&set, cycle);
        let ratio = counts[&0] as f64 / counts[&1] as f64;
        assert!((ratio - 3.0).abs() < 0.01, "{ratio}");
        assert_eq!(counts[&2], 1);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let set = set_with(Strategy::LeastRequest, &[1, 1, 1]);
        let busy: Vec<_> = (0..5).map(|_| set.members()[0].kept().start()).collect();
        let counts = counts(&set, 3000);
        // Endpoint 0 wins only when both draws are it: 1/9 of the time.
        assert!(counts.get(&0).copied().unwrap_or(0) < 500, "{counts:?}");
        drop(busy);
        let counts = self::counts(&set, 3000);
        assert!(counts[&0] > 700, "back in rotation when idle: {counts:?}");
    }

    #[test]
    fn ewma_avoids_the_slow_endpoint() {
        let set = set_with(Strategy::Ewma, &[1, 1, 1]);
        let now = nanos_since_start(Instant::now());
        set.members()[0].kept().observe(Observed::Success, Duration::from_millis(50), now, true);
        for member in &set.members()[1..] {
            member.kept().observe(Observed::Success, Duration::from_millis(1), now, true);
        }
        let counts = counts(&set, 3000);
        assert!(counts.get(&0).copied().unwrap_or(0) < 500, "{counts:?}");
    }

    #[test]
    fn ring_hash_keeps_a_key_on_one_endpoint() {
        let config = SetConfig { hash_on: Some(HashOn::SourceIp), ..SetConfig::with_strategy(Strategy::RingHash) };
        let set = build(config, (0..4).map(|i| endpoint(i, 1, Proximity::Elsewhere)).collect());
        let mut owners = HashMap::new();
        for user in 0..200_u32 {
            let key = ring::hash_key(&user.to_le_bytes());
            let first = port(set.pick(Some(key)).unwrap());
            assert!((0..10).all(|_| port(set.pick(Some(key)).unwrap()) == first));
            *owners.entry(first).or_insert(0) += 1;
        }
        assert_eq!(owners.len(), 4, "every endpoint owns some keys: {owners:?}");
        // A retry of a hashed request avoids the endpoints it tried, the same way every time.
        for user in 0..50_u32 {
            let key = ring::hash_key(&user.to_le_bytes());
            let first = set.pick(Some(key)).unwrap().address();
            let second = set.pick_avoiding(Some(key), &[first]).unwrap().address();
            assert_ne!(second, first);
            assert!((0..10).all(|_| set.pick_avoiding(Some(key), &[first]).unwrap().address() == second));
            let third = set.pick_avoiding(Some(key), &[first, second]).unwrap().address();
            assert!(third != first && third != second);
        }
    }

    #[test]
    fn retries_reach_the_one_endpoint_not_yet_tried() {
        for strategy in [Strategy::RoundRobin, Strategy::Random, Strategy::LeastRequest, Strategy::Ewma] {
            let set = build(
                SetConfig::with_strategy(strategy),
                (0..4).map(|i| endpoint(i, 1, Proximity::Elsewhere)).collect(),
            );
            let tried: Vec<SocketAddr> = set.members()[..3].iter().map(|m| m.address()).collect();
            let left = set.members()[3].address();
            assert!((0..200).all(|_| set.pick_avoiding(None, &tried).unwrap().address() == left), "{strategy:?}");
            // With every endpoint tried, a retry still goes somewhere.
            let all: Vec<SocketAddr> = set.members().iter().map(|m| m.address()).collect();
            assert!(set.pick_avoiding(None, &all).is_some());
        }
    }

    #[test]
    fn hash_keys_come_from_headers_cookies_and_addresses() {
        let mut headers = HeaderMap::new();
        headers.insert("x-user", "alice".parse().unwrap());
        headers.insert(COOKIE, "theme=dark; session=\"abc\"".parse().unwrap());
        let header = HashOn::Header(HeaderName::from_static("x-user"));
        assert_eq!(header.key(Some(&headers), None), Some(ring::hash_key(b"alice")));
        assert_eq!(HashOn::Cookie("session".into()).key(Some(&headers), None), Some(ring::hash_key(b"abc")));
        assert_eq!(HashOn::Cookie("missing".into()).key(Some(&headers), None), None);
        let client: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        assert_eq!(HashOn::SourceIp.key(None, Some(client)), Some(ring::hash_key(&[10, 1, 2, 3])));
    }

    #[test]
    fn unknown_and_unhealthy_endpoints_take_no_traffic_until_too_few_are_healthy() {
        let config = SetConfig { health_checked: true, ..SetConfig::round_robin() };
        let set = build(config, (0..4).map(|i| endpoint(i, 1, Proximity::Elsewhere)).collect());
        // All unknown: below the panic threshold, so everything takes traffic.
        assert!(set.view().panic());
        for member in &set.members()[..3] {
            member.kept().set_health(Health::Healthy);
        }
        set.refresh();
        assert!(!set.view().panic());
        assert_eq!(counts(&set, 300).len(), 3, "the unknown endpoint waits for its first pass");
        set.members()[1].kept().set_health(Health::Unhealthy);
        set.members()[2].kept().set_health(Health::Unhealthy);
        set.refresh();
        // One of four healthy is under 50%: panic, and all four take traffic again.
        assert!(set.view().panic());
        assert_eq!(counts(&set, 400).len(), 4);
        assert!(set.has_healthy());
    }

    #[test]
    fn declared_unhealthy_endpoints_wait_and_draining_ones_never_take_traffic() {
        let declared = [Declared::Healthy, Declared::Healthy, Declared::Unhealthy, Declared::Draining];
        let endpoints = || {
            declared
                .iter()
                .enumerate()
                .map(|(i, declared)| Endpoint { declared: *declared, ..endpoint(i, 1, Proximity::Elsewhere) })
                .collect()
        };
        let set = build(SetConfig::round_robin(), endpoints());
        // Two of the three that count are healthy (the draining one counts for nothing): no panic.
        assert_eq!((set.view().weighted, set.view().healthy, set.view().panic()), (3, 2, false));
        let picked = counts(&set, 300);
        assert_eq!(picked.keys().copied().collect::<std::collections::BTreeSet<_>>(), [0, 1].into());
        // In panic the unhealthy one is used again, the draining one still not.
        let set = build(SetConfig { panic_threshold: 90, ..SetConfig::round_robin() }, endpoints());
        assert!(set.view().panic());
        assert_eq!(counts(&set, 300).keys().copied().collect::<std::collections::BTreeSet<_>>(), [0, 1, 2].into());
        let report = set.report();
        assert_eq!(report["endpoints"][3]["health"], "draining");
        assert_eq!(report["endpoints"][2]["health"], "unhealthy");
    }

    fn zoned(min_healthy: u32) -> EndpointSet {
        let config = SetConfig {
            locality: Some(LocalityPreference { min_healthy_percent: min_healthy }),
            panic_threshold: 0,
            health_checked: true,
            ..SetConfig::round_robin()
        };
        let endpoints = vec![
            endpoint(0, 1, Proximity::Zone),
            endpoint(1, 1, Proximity::Zone),
            endpoint(2, 1, Proximity::Region),
            endpoint(3, 1, Proximity::Elsewhere),
        ];
        let set = build(config, endpoints);
        for member in set.members() {
            member.kept().set_health(Health::Healthy);
        }
        set.refresh();
        set
    }

    #[test]
    fn traffic_stays_in_the_zone_and_spills_as_it_loses_health() {
        let set = zoned(70);
        assert_eq!(counts(&set, 200).keys().copied().collect::<std::collections::BTreeSet<_>>(), [0, 1].into());
        // Half the zone healthy against a 70% minimum: the zone takes 50/70 of the traffic.
        set.members()[1].kept().set_health(Health::Unhealthy);
        set.refresh();
        let counts = counts(&set, 20_000);
        let zone = counts[&0] as f64 / 20_000.0;
        assert!((zone - 5.0 / 7.0).abs() < 0.02, "{counts:?}");
        assert!(!counts.contains_key(&3), "the region still had room: {counts:?}");
        // The whole zone down: the region takes it all.
        set.members()[0].kept().set_health(Health::Unhealthy);
        set.refresh();
        assert_eq!(self::counts(&set, 100).keys().copied().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn endpoint_states_carry_over_to_the_next_set_untouched() {
        let checked = SetConfig { health_checked: true, panic_threshold: 0, ..SetConfig::round_robin() };
        let first =
            build(checked.clone(), vec![endpoint(0, 1, Proximity::Elsewhere), endpoint(1, 1, Proximity::Elsewhere)]);
        first.members()[0].kept().set_health(Health::Unhealthy);
        first.members()[1].kept().set_health(Health::Healthy);
        first.refresh();
        let carried = |address| first.state_of(address);
        // A set without the check, built beside the serving one: it serves both endpoints, and the
        // serving set's view of them does not change.
        let endpoints = vec![endpoint(0, 1, Proximity::Elsewhere), endpoint(1, 1, Proximity::Elsewhere)];
        let next = EndpointSet::new(SetConfig::round_robin(), endpoints, &carried, HealthStats::detached("t"));
        assert!(Arc::ptr_eq(&first.members()[0].kept(), &next.members()[0].kept()));
        assert_eq!(counts(&next, 100).len(), 2);
        first.refresh();
        assert_eq!(counts(&first, 100).keys().copied().collect::<Vec<_>>(), [1]);
        // A never-checked endpoint in a checked set is unknown: no traffic until it passes.
        let fresh = EndpointSet::new(
            checked,
            vec![endpoint(7, 1, Proximity::Elsewhere), endpoint(1, 1, Proximity::Elsewhere)],
            &|a| next.state_of(a),
            HealthStats::detached("t"),
        );
        assert_eq!(fresh.members()[0].kept().health(), Health::Unknown);
        assert_eq!(counts(&fresh, 100).keys().copied().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn a_view_of_every_endpoint_in_order_holds_no_list_of_its_own() {
        let equal = (0..5).map(|i| endpoint(i, 1, Proximity::Elsewhere)).collect();
        let set = build(SetConfig::round_robin(), equal);
        let view = set.view();
        let tier = view.first.as_ref().unwrap();
        assert!(matches!(tier.members, Members::Leading(5)));
        assert_eq!((tier.members(), tier.schedule()), (&[0, 1, 2, 3, 4][..], &[0, 1, 2, 3, 4][..]));
        assert!(view.farther.is_empty() && view.shares.is_empty());
        // A set without state for its endpoints keeps none.
        assert!(set.members().iter().all(|m| m.state.is_none()));
        // One endpoint out of rotation: the others are listed.
        let one_out = (0..5).map(|i| endpoint(i, u32::from(i != 1), Proximity::Elsewhere)).collect();
        let set = build(SetConfig::round_robin(), one_out);
        let view = set.view();
        let tier = view.first.as_ref().unwrap();
        assert!(matches!(tier.members, Members::Listed(_)));
        assert_eq!(tier.members(), [0, 2, 3, 4]);
        assert_eq!(counts(&set, 400).len(), 4);
    }

    #[test]
    fn weighted_choice_follows_weights() {
        let choice = WeightedChoice::new([("a", 80), ("b", 20), ("c", 0)]);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for _ in 0..20_000 {
            *counts.entry(*choice.pick().unwrap()).or_default() += 1;
        }
        let share = counts["a"] as f64 / 20_000.0;
        assert!((share - 0.8).abs() < 0.02, "{share}");
        assert!(!counts.contains_key("c"));
        assert_eq!(WeightedChoice::new([("a", 0)]).pick(), None);
        assert_eq!(WeightedChoice::new([("a", 1)]).pick(), Some(&"a"));
    }

    proptest! {
        /// Over one full cycle, smooth weighted round robin gives every endpoint exactly its weight
        /// (weights already in lowest terms and under the schedule cap), in any order of weights.
        #[test]
        fn round_robin_gives_each_endpoint_its_weight(weights in proptest::collection::vec(0_u32..20, 1..8)) {
            let divisor = weights.iter().copied().filter(|w| *w > 0).fold(0_u64, |a, w| gcd(a, u64::from(w))).max(1);
            let set = set(&weights);
            let cycle: u64 = weights.iter().map(|w| u64::from(*w) / divisor).sum();
            prop_assume!(cycle > 0);
            let counts = counts(&set, cycle as usize);
            for (i, w) in weights.iter().enumerate() {
                prop_assert_eq!(counts.get(&i).copied().unwrap_or(0) as u64, u64::from(*w) / divisor);
            }
        }

        /// Random and least-request picks (idle endpoints) land within a few standard deviations of
        /// each endpoint's weighted share.
        #[test]
        fn weighted_draws_follow_weights(weights in proptest::collection::vec(1_u32..10, 2..6), least in any::<bool>()) {
            let strategy = if least { Strategy::LeastRequest } else { Strategy::Random };
            let set = set_with(strategy, &weights);
            let n = 8000;
            let counts = counts(&set, n);
            let total: u32 = weights.iter().sum();
            for (i, w) in weights.iter().enumerate() {
                let p = f64::from(*w) / f64::from(total);
                let expected = p * n as f64;
                let sd = (n as f64 * p * (1.0 - p)).sqrt();
                let got = counts.get(&i).copied().unwrap_or(0) as f64;
                prop_assert!((got - expected).abs() < 5.0 * sd + 5.0, "endpoint {} got {} of {}, expected {:.0}", i, got, n, expected);
            }
        }
    }
}
