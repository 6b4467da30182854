//! A cluster as the data path sees it: where its endpoints are, how to pick one and talk to it, the
//! limits on what it is sent, its counters.
//!
//! Built from a Cluster resource and its Endpoints resource when a snapshot is built
//! ([`Cluster::compile`]). The endpoint set (with its round-robin position) is carried over from the
//! previous snapshot when neither the endpoints nor the balancing settings changed; otherwise a new
//! set takes over the run-time state of every endpoint it shares with the old one. Counters and
//! breaker gauges are looked up by name, so they always carry over.
//!
//! A cluster's counters are a [`ClusterStats`], kept by name in the clusters' roster
//! ([`ClusterMetrics`], read at scrape time: `telemetry::roster`): the upstream connections and
//! responses counted here, with the parts its other subsystems own, describe and count themselves,
//! the circuit breakers' gauges (`policy::breaker`), the policy counters (`policy::metrics`) and
//! endpoint health (`balance::metrics`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use remora_control_api::config::{FieldError, Invalid};
use remora_control_api::validate;
use remora_control_api::{Kind, v1};

use crate::balance::health::HealthCheckConfig;
use crate::balance::metrics::HealthStats;
use crate::balance::outlier::OutlierConfig;
use crate::balance::{
    Declared, Endpoint, EndpointSet, EndpointState, HashOn, LocalityPreference, Member, Proximity, SetConfig, Strategy,
};
use crate::limits;
use crate::policy::breaker::{BreakerStats, CircuitBreakers};
use crate::policy::metrics::PolicyStats;
use crate::telemetry::family::Family;
use crate::telemetry::roster::{Count, Described, Roster};
use crate::telemetry::{LazyHistogram, Registry, STATUS_CLASSES, class_index};
use crate::tls::Expected;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use remora_control_api::identity::{self, IdentityPattern, SpiffeId};

/// The protocol spoken to a cluster's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// Whatever the downstream request used.
    Auto,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

impl From<v1::cluster::Protocol> for UpstreamProtocol {
    fn from(protocol: v1::cluster::Protocol) -> Self {
        match protocol {
            v1::cluster::Protocol::Auto => UpstreamProtocol::Auto,
            v1::cluster::Protocol::Http1 => UpstreamProtocol::Http1,
            v1::cluster::Protocol::Http2 => UpstreamProtocol::Http2,
        }
    }
}

/// Where a cluster's endpoints come from.
#[derive(Debug)]
pub enum Targets {
    /// A fixed set, balanced.
    Endpoints(Arc<EndpointSet>),
    /// Each connection's original destination (a pass-through cluster).
    OriginalDestination,
}

/// A compiled cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The cluster's name.
    pub name: Arc<str>,
    /// Protocol to the endpoints.
    pub protocol: UpstreamProtocol,
    /// Limit on each TCP connect.
    pub connect_timeout: Duration,
    /// How long a pooled connection may sit idle.
    pub idle_timeout: Duration,
    /// The endpoints.
    pub targets: Targets,
    /// The limits on what it is sent at once.
    pub breakers: CircuitBreakers,
    /// Active health checking, if asked for. (Boxed, as the mesh peers and the Service: a cluster
    /// is held by the thousand, most without them.)
    pub health_check: Option<Box<HealthCheckConfig>>,
    /// Whether each attempt's outcome and latency are recorded on its endpoint (outlier detection
    /// or the ewma balancer need them).
    pub observes: bool,
    /// Whether each request counts as active on its endpoint while in flight (least_request and
    /// ewma pick by it).
    pub counts_active: bool,
    /// The cluster's counters.
    pub stats: Arc<ClusterStats>,
    /// With `tls: mesh`, who its endpoints' sidecars must prove to be.
    pub mesh: Option<Box<MeshPeers>>,
    /// The Kubernetes Service its endpoints come from (`kubernetes_service`: namespace and name),
    /// which its routes' metrics name as the destination.
    pub service: Option<Box<(String, String)>>,
}

/// The identities a mesh cluster's endpoints may present.
#[derive(Debug, Default)]
pub struct MeshPeers {
    by_endpoint: foldhash::HashMap<SocketAddr, SpiffeId>,
    patterns: Vec<IdentityPattern>,
    /// The HBONE listener port of the endpoints' hosts, when opaque TCP rides HBONE.
    pub hbone_port: Option<u16>,
    /// The HBONE-over-QUIC listener port (UDP) of the endpoints' hosts, when opaque TCP rides QUIC.
    pub quic_port: Option<u16>,
    /// With `hbone_port`: HTTP rides HBONE tunnels too, in the cluster's own protocol, for peers
    /// that are not Remora sidecars.
    pub http_over_hbone: bool,
    /// With `hbone_port` or `quic_port`, the tunnels opened to the endpoints and what came of them.
    pub tunnels: Option<TunnelCounters>,
}

/// One tunnelling cluster's tunnels, by result (`upstream_tunnels_total`).
#[derive(Debug)]
pub struct TunnelCounters {
    /// Answered `200`.
    pub opened: Counter,
    /// Answered with another status by the peer's HBONE listener.
    pub refused: Counter,
    /// Not answered: the connect, the handshake or the HTTP/2 connection failed.
    pub failed: Counter,
    /// QUIC not reached in time (or failed to connect): the connection took the TCP transport.
    pub fell_back: Counter,
}

impl MeshPeers {
    /// What the sidecar at `endpoint` must prove: its own `identity`, else one of the cluster's
    /// `peer_identities`, else any identity in this proxy's trust domain.
    pub fn expected(&self, endpoint: SocketAddr) -> Expected<'_> {
        match self.by_endpoint.get(&endpoint) {
            Some(id) => Expected::Exact(id),
            None if !self.patterns.is_empty() => Expected::Any(&self.patterns),
            None => Expected::TrustDomain,
        }
    }
}

/// A picked endpoint: its address, and its state when the cluster keeps one for the data path.
#[derive(Debug)]
pub struct Picked<'a> {
    /// Where to connect.
    pub address: SocketAddr,
    /// The endpoint, for a balanced cluster.
    pub member: Option<&'a Member>,
}

/// Where this proxy runs, as the bootstrap says (for zone-aware routing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnLocality {
    /// The region, or empty.
    pub region: String,
    /// The zone, or empty.
    pub zone: String,
}

impl Cluster {
    /// Counts a tunnel to this cluster's endpoints by its result (`pick`), when the cluster
    /// tunnels (HBONE, over TCP or QUIC).
    pub fn count_tunnel(&self, pick: fn(&TunnelCounters) -> &Counter) {
        if let Some(counters) = self.mesh.as_ref().and_then(|peers| peers.tunnels.as_ref()) {
            pick(counters).inc();
        }
    }

    /// Compiles cluster `c` with its endpoints `e` (if any). `previous` is the cluster of the same
    /// name in the snapshot serving now, whose endpoint set (or the endpoint states in it) carries
    /// over. An error names the resource at fault (the cluster, or its endpoints) and the field.
    pub fn compile(
        c: &v1::Cluster,
        e: Option<&v1::Endpoints>,
        previous: Option<&Cluster>,
        locality: &OwnLocality,
        metrics: &ClusterMetrics,
    ) -> Result<Cluster, FieldError> {
        let invalid = |field: String, message: String| Invalid::new(field, message).of(Kind::Cluster, &c.name);
        let in_endpoints = |field: String, message: String| Invalid::new(field, message).of(Kind::Endpoints, &c.name);
        let duration = |field: &str, value: Option<&pbjson_types::Duration>, default| {
            validate::duration(value).map(|d| d.unwrap_or(default)).map_err(|m| invalid(field.to_owned(), m))
        };
        let stats = metrics.cluster(&c.name);
        let protocol: UpstreamProtocol = c.protocol().into();
        let health_check = c
            .health_check
            .as_ref()
            .map(|h| HealthCheckConfig::compile(h, &c.name, protocol == UpstreamProtocol::Http2))
            .transpose()
            .map_err(|e| e.of(Kind::Cluster, &c.name))?;
        let strategy = match c.balancer() {
            v1::cluster::Balancer::RoundRobin => Strategy::RoundRobin,
            v1::cluster::Balancer::Random => Strategy::Random,
            v1::cluster::Balancer::LeastRequest => Strategy::LeastRequest,
            v1::cluster::Balancer::Ewma => Strategy::Ewma,
            v1::cluster::Balancer::RingHash => Strategy::RingHash,
        };
        let outlier = c
            .outlier_detection
            .as_deref()
            .map(OutlierConfig::compile)
            .transpose()
            .map_err(|e| e.of(Kind::Cluster, &c.name))?;
        let targets = if c.original_destination {
            Targets::OriginalDestination
        } else {
            let hash_on = match c.hash_policy.as_ref().and_then(|h| h.key.as_ref()) {
                None => None,
                Some(v1::hash_policy::Key::Header(name)) => Some(HashOn::Header(
                    http::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| invalid("hash_policy.header".into(), format!("{name:?} is not a header name")))?,
                )),
                Some(v1::hash_policy::Key::Cookie(name)) => Some(HashOn::Cookie(name.clone())),
                Some(v1::hash_policy::Key::SourceIp(_)) => Some(HashOn::SourceIp),
            };
            let preference = c
                .locality_preference
                .as_ref()
                .map(|l| LocalityPreference { min_healthy_percent: l.min_healthy_percent.unwrap_or(70).clamp(1, 100) });
            let config = SetConfig {
                strategy,
                hash_on,
                panic_threshold: c.panic_threshold.unwrap_or(limits::DEFAULT_PANIC_THRESHOLD).min(100),
                locality: preference,
                outlier: outlier.clone().map(Box::new),
                health_checked: health_check.is_some(),
            };
            let mut list = Vec::new();
            for (i, endpoint) in e.map_or(&[][..], |e| &e.endpoints).iter().enumerate() {
                let address = validate::parse_address(&endpoint.address)
                    .map_err(|m| in_endpoints(format!("endpoints[{i}].address"), m))?;
                let proximity = match (&config.locality, &endpoint.locality) {
                    (Some(_), Some(l)) => Proximity::of(&l.region, &l.zone, &locality.region, &locality.zone),
                    _ => Proximity::Elsewhere,
                };
                let declared = match endpoint.health() {
                    v1::endpoint::Health::Healthy => Declared::Healthy,
                    v1::endpoint::Health::Unhealthy => Declared::Unhealthy,
                    v1::endpoint::Health::Draining => Declared::Draining,
                };
                list.push(Endpoint { address, weight: endpoint.weight.unwrap_or(1), proximity, declared });
            }
            let old = previous.and_then(|p| match &p.targets {
                Targets::Endpoints(set) => Some(set),
                Targets::OriginalDestination => None,
            });
            let reused = old.filter(|set| set.config() == &config && set.endpoints().eq(list.iter())).cloned();
            Targets::Endpoints(reused.unwrap_or_else(|| {
                let carried = |address: SocketAddr| old.and_then(|set| set.state_of(address));
                Arc::new(EndpointSet::new(config, list, &carried, stats.health.clone()))
            }))
        };
        let mesh = match c.tls() {
            v1::cluster::Tls::None => None,
            v1::cluster::Tls::Mesh => {
                let patterns = identity::parse_patterns(&c.peer_identities)
                    .map_err(|(i, e)| invalid(format!("peer_identities[{i}]"), e.to_string()))?;
                let mut by_endpoint = foldhash::HashMap::default();
                for (i, endpoint) in e.map_or(&[][..], |e| &e.endpoints).iter().enumerate() {
                    if endpoint.identity.is_empty() {
                        continue;
                    }
                    let id = SpiffeId::parse(&endpoint.identity)
                        .map_err(|e| in_endpoints(format!("endpoints[{i}].identity"), e.to_string()))?;
                    if let Ok(address) = validate::parse_address(&endpoint.address) {
                        by_endpoint.insert(address, id);
                    }
                }
                let hbone_port = u16::try_from(c.hbone_port).ok().filter(|port| *port != 0);
                let quic_port = u16::try_from(c.quic_port).ok().filter(|port| *port != 0);
                let tunnels = (hbone_port.is_some() || quic_port.is_some()).then(|| metrics.tunnels(&c.name));
                let http_over_hbone = c.http_over_hbone && hbone_port.is_some();
                Some(Box::new(MeshPeers { by_endpoint, patterns, hbone_port, quic_port, http_over_hbone, tunnels }))
            }
        };
        Ok(Cluster {
            // The name its stats already hold: one allocation for both.
            name: stats.name.clone(),
            protocol,
            connect_timeout: duration("connect_timeout", c.connect_timeout.as_ref(), limits::DEFAULT_CONNECT_TIMEOUT)?,
            idle_timeout: duration("idle_timeout", c.idle_timeout.as_ref(), limits::DEFAULT_POOL_IDLE_TIMEOUT)?,
            targets,
            breakers: CircuitBreakers::compile(c.circuit_breakers.as_deref()),
            health_check: health_check.map(Box::new),
            observes: outlier.is_some() || strategy == Strategy::Ewma,
            counts_active: strategy.counts_active(),
            stats,
            mesh,
            service: c.kubernetes_service.as_ref().map(|s| Box::new((s.namespace.clone(), s.name.clone()))),
        })
    }

    /// The endpoint for the next request or connection: the balancer's pick (avoiding `avoid`
    /// where it can; `headers` and `client` give ring_hash its key), or for a pass-through cluster
    /// the connection's original destination. `None` when there is none to be had.
    pub fn pick(
        &self,
        original_destination: Option<SocketAddr>,
        headers: Option<&HeaderMap>,
        client: Option<SocketAddr>,
        avoid: &[SocketAddr],
    ) -> Option<Picked<'_>> {
        match &self.targets {
            Targets::Endpoints(set) => {
                let key = set.config().hash_on.as_ref().and_then(|on| on.key(headers, client));
                let member = set.pick_avoiding(key, avoid)?;
                Some(Picked { address: member.address(), member: Some(member) })
            }
            Targets::OriginalDestination => original_destination.map(|address| Picked { address, member: None }),
        }
    }

    /// Whether any endpoint is healthy (a pass-through cluster always has its destination).
    pub fn has_healthy(&self) -> bool {
        match &self.targets {
            Targets::Endpoints(set) => set.has_healthy(),
            Targets::OriginalDestination => true,
        }
    }

    /// Records how an attempt on `endpoint` that ran from `started` to `ended` ended (for outlier
    /// detection and ewma).
    pub fn observe(
        &self,
        endpoint: &EndpointState,
        observed: crate::balance::Observed,
        started: std::time::Instant,
        ended: std::time::Instant,
    ) {
        if let Targets::Endpoints(set) = &self.targets {
            set.observe(endpoint, observed, started, ended);
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    cluster: String,
    result: &'static str,
}

/// The `result` values of `upstream_tunnels_total`.
const TUNNEL_RESULTS: [&str; 4] = ["opened", "refused", "failed", "fallback"];

/// The clusters' stats by name, and the families read from them: upstream connections and
/// responses here, and the families of the subsystems that count the rest of a cluster's work.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    roster: Roster<ClusterStats>,
    tunnels: Family<ResultLabels, Counter>,
}

impl Default for ClusterMetrics {
    /// Stats that belong to no registry (tests, benches).
    fn default() -> Self {
        ClusterMetrics { roster: Roster::new("cluster"), tunnels: Family::default() }
    }
}

impl ClusterMetrics {
    /// Declares every cluster family in `registry`: the upstream ones, and those of the circuit
    /// breakers, traffic policy and endpoint health.
    pub fn register(registry: &mut Registry) -> ClusterMetrics {
        let m = ClusterMetrics::default();
        let own = [
            Described::count("upstream_connections", "Upstream connections opened", |s: &ClusterStats| &s.connections),
            Described::counts(
                "upstream_connect_errors",
                "Upstream connects that failed, by reason (refused, timeout)",
                Some("reason"),
                [
                    ("refused", |s: &ClusterStats| &s.connect_failures),
                    ("timeout", |s: &ClusterStats| &s.connect_timeouts),
                ],
            ),
            Described::counts(
                "upstream_responses",
                "HTTP responses received from upstream endpoints, by cluster and status class",
                Some("status_class"),
                [
                    (STATUS_CLASSES[0], |s: &ClusterStats| &s.responses[0]),
                    (STATUS_CLASSES[1], |s: &ClusterStats| &s.responses[1]),
                    (STATUS_CLASSES[2], |s: &ClusterStats| &s.responses[2]),
                    (STATUS_CLASSES[3], |s: &ClusterStats| &s.responses[3]),
                    (STATUS_CLASSES[4], |s: &ClusterStats| &s.responses[4]),
                ],
            ),
            Described::count("upstream_tcp_sent_bytes", "Opaque TCP bytes sent to a cluster", |s: &ClusterStats| {
                &s.tcp_bytes_sent
            }),
            Described::count(
                "upstream_tcp_received_bytes",
                "Opaque TCP bytes received from a cluster",
                |s: &ClusterStats| &s.tcp_bytes_received,
            ),
            Described::histogram(
                "upstream_request_duration_seconds",
                "Time from sending one attempt to an endpoint to its response head, by cluster (every attempt, retries included)",
                |s: &ClusterStats| &s.attempt_duration,
            ),
        ];
        let breakers =
            crate::policy::breaker::families().into_iter().map(|f| f.within(|s: &ClusterStats| &*s.breakers));
        let policy = crate::policy::metrics::families().into_iter().map(|f| f.within(|s: &ClusterStats| &s.policy));
        let health = crate::balance::metrics::families().into_iter().map(|f| f.within(|s: &ClusterStats| &*s.health));
        for family in own.into_iter().chain(breakers).chain(policy).chain(health) {
            m.roster.register(registry, family);
        }
        registry.register(
            "upstream_tunnels",
            "HBONE tunnels (over TCP or QUIC) opened to a cluster's endpoints, by result: opened, refused (the peer answered another status than 200), failed (no answer: connect, handshake or connection failed), fallback (QUIC not reached in time: the connection took the cluster's TCP transport)",
            m.tunnels.clone(),
        );
        m
    }

    /// Drops every series of cluster `name`, its subsystems' too: it left the config, and its
    /// series would otherwise hold memory (and show in `/metrics`) for as long as the process
    /// runs. Added again, it starts from zero, which Prometheus reads as a counter reset.
    pub fn forget(&self, name: &str) {
        self.roster.remove(name);
        for result in TUNNEL_RESULTS {
            self.tunnels.remove(&ResultLabels { cluster: name.to_owned(), result });
        }
    }

    /// The tunnel counters of HBONE cluster `name` (made only for such clusters: most have none).
    fn tunnels(&self, name: &str) -> TunnelCounters {
        let [opened, refused, failed, fell_back] = TUNNEL_RESULTS
            .map(|result| self.tunnels.get_or_create_owned(&ResultLabels { cluster: name.to_owned(), result }));
        TunnelCounters { opened, refused, failed, fell_back }
    }

    /// The counters of cluster `name`; the same name always yields the same counters (until it is
    /// forgotten).
    pub fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        self.roster.member(name, ClusterStats::new)
    }
}

/// Counters and gauges of one cluster.
#[derive(Debug)]
pub struct ClusterStats {
    /// The cluster's name (for logs).
    pub name: Arc<str>,
    /// Upstream connections opened.
    pub connections: Count,
    /// Connects refused or failed.
    pub connect_failures: Count,
    /// Connects that hit the connect timeout.
    pub connect_timeouts: Count,
    /// Opaque TCP bytes sent to the cluster's endpoints.
    pub tcp_bytes_sent: Count,
    /// Opaque TCP bytes received from them.
    pub tcp_bytes_received: Count,
    /// Time from sending an attempt to its response head, per attempt.
    pub attempt_duration: LazyHistogram,
    responses: [Count; 5],
    /// The circuit breakers' counts (held by the slots they hand out).
    pub breakers: Arc<BreakerStats>,
    /// Retries, hedges, timeouts, mirrored copies.
    pub policy: PolicyStats,
    /// Endpoint health: checks, ejections, healthy and ejected endpoints (shared with the
    /// cluster's endpoint set).
    pub health: Arc<HealthStats>,
}

impl ClusterStats {
    /// Cluster `name`'s counters, all zero.
    fn new(name: Arc<str>) -> ClusterStats {
        ClusterStats {
            health: Arc::new(HealthStats::new(name.clone())),
            name,
            connections: Count::default(),
            connect_failures: Count::default(),
            connect_timeouts: Count::default(),
            tcp_bytes_sent: Count::default(),
            tcp_bytes_received: Count::default(),
            attempt_duration: LazyHistogram::default(),
            responses: Default::default(),
            breakers: Arc::default(),
            policy: PolicyStats::default(),
        }
    }

    /// Counters for `name` that belong to no registry (tests, benches).
    pub fn detached(name: &str) -> Arc<ClusterStats> {
        Arc::new(ClusterStats::new(name.into()))
    }

    /// Counts one response received from an endpoint of the cluster.
    pub fn record_response(&self, status: u16) {
        self.responses[class_index(status)].inc();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A compiled cluster, its endpoint set, its endpoints' states and its routes' backends are
    /// held by the thousand: what most leave out (health checks, mesh peers, a Service, outlier
    /// detection and its counters, a backend's labels) is boxed or made at first use, so it costs
    /// a pointer where it is absent. (360, 224, 104 and 208 bytes when they were inline.)
    #[test]
    fn a_compiled_cluster_holds_what_it_leaves_out_boxed() {
        assert!(std::mem::size_of::<Cluster>() <= 128, "{}", std::mem::size_of::<Cluster>());
        assert!(std::mem::size_of::<EndpointSet>() <= 128, "{}", std::mem::size_of::<EndpointSet>());
        // An endpoint's run-time state is one per endpoint: its address is its member's.
        assert!(std::mem::size_of::<EndpointState>() <= 40, "{}", std::mem::size_of::<EndpointState>());
        let backend = std::mem::size_of::<crate::state::routes::Backend>();
        assert!(backend <= 80, "{backend}");
    }

    fn compile(cluster: v1::Cluster, endpoints: Option<v1::Endpoints>) -> Result<Cluster, FieldError> {
        Cluster::compile(&cluster, endpoints.as_ref(), None, &OwnLocality::default(), &ClusterMetrics::default())
    }

    /// A compile error names the resource at fault: the cluster for its own fields, the endpoint
    /// set for its endpoints'.
    #[test]
    fn errors_name_the_cluster_or_its_endpoints() {
        let cluster = v1::Cluster { name: "shop".into(), ..Default::default() };
        let bad_address = v1::Endpoints {
            cluster: "shop".into(),
            endpoints: vec![v1::Endpoint { address: "nowhere".into(), ..Default::default() }],
        };
        let error = compile(cluster.clone(), Some(bad_address)).unwrap_err();
        assert_eq!((error.subject.as_str(), error.field.as_str()), ("endpoints \"shop\"", "endpoints[0].address"));
        let bad_timeout =
            v1::Cluster { connect_timeout: Some(pbjson_types::Duration { seconds: -1, nanos: 0 }), ..cluster.clone() };
        let error = compile(bad_timeout, None).unwrap_err();
        assert_eq!((error.subject.as_str(), error.field.as_str()), ("cluster \"shop\"", "connect_timeout"));
        let bad_outlier = v1::Cluster {
            outlier_detection: Some(Box::new(v1::OutlierDetection {
                interval: Some(pbjson_types::Duration { seconds: -5, nanos: 0 }),
                ..Default::default()
            })),
            ..cluster
        };
        let error = compile(bad_outlier, None).unwrap_err();
        assert_eq!(error.field, "outlier_detection.interval");
    }
}
