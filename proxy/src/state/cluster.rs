//! A cluster as the data path sees it: where its endpoints are, how to pick one and talk to it, the
//! limits on what it is sent, its counters.
//!
//! Built from a Cluster resource and its Endpoints resource when a snapshot is built
//! ([`Cluster::compile`]). The endpoint set (with its round-robin position) is carried over from the
//! previous snapshot when neither the endpoints nor the balancing settings changed; otherwise a new
//! set takes over the run-time state of every endpoint it shares with the old one. Counters and
//! breaker gauges are looked up by name, so they always carry over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use remora_control_api::v1;
use remora_control_api::validate;

use crate::balance::health::HealthCheckConfig;
use crate::balance::outlier::OutlierConfig;
use crate::balance::{
    Declared, Endpoint, EndpointSet, EndpointState, HashOn, LocalityPreference, Member, Proximity, SetConfig, Strategy,
};
use crate::limits;
use crate::policy::breaker::CircuitBreakers;
use crate::telemetry::{ClusterStats, Metrics};
use crate::tls::Expected;
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
    /// Active health checking, if asked for.
    pub health_check: Option<HealthCheckConfig>,
    /// Whether each attempt's outcome and latency are recorded on its endpoint (outlier detection
    /// or the ewma balancer need them).
    pub observes: bool,
    /// Whether each request counts as active on its endpoint while in flight (least_request and
    /// ewma pick by it).
    pub counts_active: bool,
    /// The cluster's counters.
    pub stats: Arc<ClusterStats>,
    /// With `tls: mesh`, who its endpoints' sidecars must prove to be.
    pub mesh: Option<MeshPeers>,
}

/// The identities a mesh cluster's endpoints may present.
#[derive(Debug, Default)]
pub struct MeshPeers {
    by_endpoint: foldhash::HashMap<SocketAddr, SpiffeId>,
    patterns: Vec<IdentityPattern>,
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
    /// Compiles cluster `c` with its endpoints `e` (if any). `previous` is the cluster of the same
    /// name in the snapshot serving now, whose endpoint set (or the endpoint states in it) carries
    /// over. Errors name the field.
    pub fn compile(
        c: &v1::Cluster,
        e: Option<&v1::Endpoints>,
        previous: Option<&Cluster>,
        locality: &OwnLocality,
        metrics: &Metrics,
    ) -> Result<Cluster, (String, String)> {
        let duration = |field: &str, value: Option<&pbjson_types::Duration>, default| {
            validate::duration(value).map(|d| d.unwrap_or(default)).map_err(|m| (field.to_owned(), m))
        };
        let stats = metrics.cluster(&c.name);
        let protocol: UpstreamProtocol = c.protocol().into();
        let health_check = c
            .health_check
            .as_ref()
            .map(|h| HealthCheckConfig::compile(h, &c.name, protocol == UpstreamProtocol::Http2))
            .transpose()?;
        let strategy = match c.balancer() {
            v1::cluster::Balancer::RoundRobin => Strategy::RoundRobin,
            v1::cluster::Balancer::Random => Strategy::Random,
            v1::cluster::Balancer::LeastRequest => Strategy::LeastRequest,
            v1::cluster::Balancer::Ewma => Strategy::Ewma,
            v1::cluster::Balancer::RingHash => Strategy::RingHash,
        };
        let outlier = c.outlier_detection.as_ref().map(OutlierConfig::compile).transpose()?;
        let targets = if c.original_destination {
            Targets::OriginalDestination
        } else {
            let hash_on = match c.hash_policy.as_ref().and_then(|h| h.key.as_ref()) {
                None => None,
                Some(v1::hash_policy::Key::Header(name)) => Some(HashOn::Header(
                    http::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| ("hash_policy.header".to_owned(), format!("{name:?} is not a header name")))?,
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
                outlier: outlier.clone(),
                health_checked: health_check.is_some(),
            };
            let mut list = Vec::new();
            for (i, endpoint) in e.map_or(&[][..], |e| &e.endpoints).iter().enumerate() {
                let address =
                    validate::parse_address(&endpoint.address).map_err(|m| (format!("endpoints[{i}].address"), m))?;
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
                let carried = |address: SocketAddr| old.and_then(|set| set.state_of(address)).cloned();
                Arc::new(EndpointSet::new(config, list, &carried, stats.clone()))
            }))
        };
        let mesh = match c.tls() {
            v1::cluster::Tls::None => None,
            v1::cluster::Tls::Mesh => {
                let patterns = identity::parse_patterns(&c.peer_identities)
                    .map_err(|(i, e)| (format!("peer_identities[{i}]"), e.to_string()))?;
                let mut by_endpoint = foldhash::HashMap::default();
                for (i, endpoint) in e.map_or(&[][..], |e| &e.endpoints).iter().enumerate() {
                    if endpoint.identity.is_empty() {
                        continue;
                    }
                    let id = SpiffeId::parse(&endpoint.identity)
                        .map_err(|e| (format!("endpoints[{i}].identity"), e.to_string()))?;
                    if let Ok(address) = validate::parse_address(&endpoint.address) {
                        by_endpoint.insert(address, id);
                    }
                }
                Some(MeshPeers { by_endpoint, patterns })
            }
        };
        Ok(Cluster {
            name: c.name.as_str().into(),
            protocol,
            connect_timeout: duration("connect_timeout", c.connect_timeout.as_ref(), limits::DEFAULT_CONNECT_TIMEOUT)?,
            idle_timeout: duration("idle_timeout", c.idle_timeout.as_ref(), limits::DEFAULT_POOL_IDLE_TIMEOUT)?,
            targets,
            breakers: CircuitBreakers::compile(c.circuit_breakers.as_ref()),
            health_check,
            observes: outlier.is_some() || strategy == Strategy::Ewma,
            counts_active: strategy.counts_active(),
            stats,
            mesh,
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
