//! The live configuration: an immutable [`Snapshot`] of compiled listeners, route tables and
//! clusters, swapped whole behind an `ArcSwap`.
//!
//! A new resource set (from a reload) is validated and compiled into a fresh snapshot off the hot path
//! by [`Snapshot::build`]; [`LiveSnapshot::store`] then swaps it in. The data path calls
//! [`LiveSnapshot::load`] once per request or connection and resolves everything it needs (route,
//! cluster, endpoint) before its first await, so a swap never changes a request half-way: requests
//! already resolved finish on the old objects, the next request sees the new ones.
//!
//! Runtime state outlives snapshots where it should: counters are keyed by name in their families
//! ([`SnapshotMetrics`], registered by `app`), an
//! unchanged cluster keeps its endpoint set (and so its round-robin position), and pooled upstream
//! connections are keyed by address in `http::client`.

pub mod authz;
pub mod cluster;
pub mod compose;
pub mod filters;
pub mod route_metrics;
pub mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use remora_control_api::config::{FieldError, Invalid};
use remora_control_api::validate::{self, Destination, ValidationErrors};
use remora_control_api::{Encoded, Kind, Resource, v1};

use crate::limits;
use crate::listener::metrics::{CertificateReloads, ListenerMetrics, ListenerStats, TunnelStats};
use crate::policy::RateLimiter;
use crate::quic::{self, ServedCertificate};
use authz::{AuthzMetrics, ListenerAuthz};
use cluster::{Cluster, ClusterMetrics, OwnLocality};
use route_metrics::{RequestStats, RouteMetrics};
use routes::{RouteIndex, RouteTable};

/// The metric families a snapshot's compiled objects draw their counters from: each listener,
/// cluster, route backend and authorization policy gets its own when the snapshot is built.
#[derive(Clone, Debug, Default)]
pub struct SnapshotMetrics {
    /// Listeners' connections, bytes and responses.
    pub listeners: ListenerMetrics,
    /// Clusters' upstream connections and responses, breakers, policy counters, endpoint health.
    pub clusters: ClusterMetrics,
    /// Route backends' responses by status and their latency.
    pub routes: RouteMetrics,
    /// Authorization policies' decisions.
    pub authz: AuthzMetrics,
}

/// What a listener expects on its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerProtocol {
    /// Detect from the first bytes.
    Auto,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// Opaque TCP.
    Tcp,
    /// HBONE: mesh tunnels, each served as a connection detected as `Auto` is (`listener::hbone`).
    Hbone,
    /// HTTP/3 over QUIC, on UDP (`quic::server`).
    Http3,
    /// HBONE's tunnels over QUIC, on UDP (`quic::tunnels`).
    HboneQuic,
}

/// Which way traffic crosses the proxy on a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the local app out to the mesh: the clients are the app on this host.
    Outbound,
    /// From the mesh in to the local app: the clients are remote.
    Inbound,
}

impl Direction {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// A compiled listener: everything a connection accepted on it needs.
#[derive(Debug)]
pub struct ListenerConfig {
    /// The listener's name.
    pub name: Arc<str>,
    /// The address as configured (port 0 means "any free port" at bind time).
    pub address: SocketAddr,
    /// The other addresses the listener binds, as configured.
    pub additional_addresses: Vec<SocketAddr>,
    /// Which way traffic flows.
    pub direction: Direction,
    /// What the connections speak.
    pub protocol: ListenerProtocol,
    /// Whether to read SO_ORIGINAL_DST.
    pub transparent: bool,
    /// How long detection waits for the first bytes.
    pub detect_timeout: Duration,
    /// Close connections idle this long.
    pub idle_timeout: Duration,
    /// HTTP/1.1 request-head (and keep-alive idle) timeout.
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: i64,
    /// The token bucket new connections draw from, if the listener has one.
    pub connection_rate_limit: Option<RateLimiter>,
    /// Route tables by destination.
    pub routes: RouteIndex,
    /// Where unclaimed traffic goes.
    pub default_cluster: Option<Arc<Cluster>>,
    /// The counters of requests that went to the default cluster (route `""`).
    pub default_stats: Option<Arc<RequestStats>>,
    /// The listener's counters.
    pub stats: Arc<ListenerStats>,
    /// On an HBONE listener, its tunnels' counters.
    pub tunnels: Option<Arc<TunnelStats>>,
    /// On an HBONE listener, the inbound listener that serves its tunnels.
    pub inbound_listener: Option<Arc<str>>,
    /// The authorization policies that guard it, if any name it.
    pub authz: Option<ListenerAuthz>,
    /// Whether its traffic gets access-log lines (when the proxy has an access log).
    pub access_log: bool,
    /// On an HTTP/3 listener, its certificate (followed by `reload::watch_certificates`).
    pub tls: Option<Arc<ServedCertificate>>,
    /// On an HTTP/3 listener, the QUIC server config its connections are accepted with.
    pub quic: Option<quinn::ServerConfig>,
    /// The HTTP/3 listener this one advertises, by name.
    pub advertise_http3: Option<Arc<str>>,
    /// The `Alt-Svc` value every response of this listener carries: set once that listener's port
    /// is bound (`reload`), as it may be a port picked at bind time.
    pub alt_svc: std::sync::OnceLock<http::HeaderValue>,
}

impl ListenerConfig {
    /// Whether it binds UDP sockets (HTTP/3) rather than TCP.
    pub fn is_udp(&self) -> bool {
        matches!(self.protocol, ListenerProtocol::Http3 | ListenerProtocol::HboneQuic)
    }

    /// Every address it binds: `address`, then the additional ones.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        std::iter::once(self.address).chain(self.additional_addresses.iter().copied()).collect()
    }
}

/// One consistent, compiled version of the resources.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Identifies the resources this was built from.
    pub version: String,
    /// The resources as given, encoded, for `/config_dump` and for composing the next update with:
    /// shared with the reloader's own record of them (the file's, and the control plane's), never a
    /// second copy. They are decoded only to be compiled or shown.
    pub resources: Arc<[Encoded]>,
    // foldhash: looked up per request or connection, where SipHash's cost shows.
    listeners: foldhash::HashMap<Arc<str>, Arc<ListenerConfig>>,
    clusters: foldhash::HashMap<Arc<str>, Arc<Cluster>>,
}

impl Snapshot {
    /// Validates `resources` and compiles them. `previous` donates endpoint sets of clusters whose
    /// endpoints did not change, and the run-time state of endpoints that stay; `locality` is where
    /// this proxy runs; `metrics` supplies each listener's and cluster's counters. The resources
    /// are decoded for the while it takes, and held encoded.
    pub fn build(
        version: String,
        held: impl Into<Arc<[Encoded]>>,
        previous: Option<&Snapshot>,
        locality: &OwnLocality,
        metrics: &SnapshotMetrics,
    ) -> Result<Snapshot, ValidationErrors> {
        let held = held.into();
        let resources = decode_all(&held)?;
        Snapshot::build_decoded(version, held, resources, previous, locality, metrics)
    }

    /// [`Snapshot::build`] with the resources already decoded (`resources`, the same set as
    /// `held`): a reload has them from its parse, a control-plane update from its composition.
    pub fn build_decoded(
        version: String,
        held: Arc<[Encoded]>,
        resources: Vec<Resource>,
        previous: Option<&Snapshot>,
        locality: &OwnLocality,
        metrics: &SnapshotMetrics,
    ) -> Result<Snapshot, ValidationErrors> {
        validate::validate(&resources)?;
        let fail = |error: FieldError| ValidationErrors(vec![error]);

        let endpoints: HashMap<&str, &v1::Endpoints> = resources
            .iter()
            .filter_map(|r| match r {
                Resource::Endpoints(e) => Some((e.cluster.as_str(), e)),
                _ => None,
            })
            .collect();
        let mut clusters: foldhash::HashMap<Arc<str>, Arc<Cluster>> = foldhash::HashMap::default();
        for resource in &resources {
            let Resource::Cluster(c) = resource else { continue };
            let previous_cluster = previous.and_then(|p| p.clusters.get(c.name.as_str())).map(|c| &**c);
            let compiled = Cluster::compile(
                c,
                endpoints.get(c.name.as_str()).copied(),
                previous_cluster,
                locality,
                &metrics.clusters,
            )
            .map_err(|error| ValidationErrors(vec![error]))?;
            clusters.insert(compiled.name.clone(), Arc::new(compiled));
        }
        let find_cluster = |name: &str| clusters.get(name).cloned();

        let mut tables: Vec<(Arc<RouteTable>, Vec<Destination>)> = Vec::new();
        for resource in &resources {
            let Resource::RouteTable(t) = resource else { continue };
            let compiled = RouteTable::compile(t, &find_cluster, &metrics.routes)
                .map_err(|e| fail(e.of(Kind::RouteTable, &t.name)))?;
            let mut destinations = Vec::with_capacity(t.destinations.len());
            for (i, d) in t.destinations.iter().enumerate() {
                destinations.push(
                    Destination::parse(d).map_err(|m| {
                        fail(Invalid::new(format!("destinations[{i}]"), m).of(Kind::RouteTable, &t.name))
                    })?,
                );
            }
            tables.push((Arc::new(compiled), destinations));
        }

        let mut listeners = foldhash::HashMap::default();
        for resource in &resources {
            let Resource::Listener(l) = resource else { continue };
            let policies = resources.iter().filter_map(|r| match r {
                Resource::AuthorizationPolicy(p) if p.listener == l.name => Some(p),
                _ => None,
            });
            let config = compile_listener(
                l,
                &tables,
                &find_cluster,
                ListenerAuthz::compile(policies, &l.name, &metrics.authz),
                previous.and_then(|p| p.listeners.get(l.name.as_str())).map(|l| &**l),
                metrics,
            )
            .map_err(|e| fail(e.of(Kind::Listener, &l.name)))?;
            listeners.insert(config.name.clone(), Arc::new(config));
        }
        Ok(Snapshot { version, resources: held, listeners, clusters })
    }

    /// The listener called `name`, if this snapshot has it.
    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerConfig>> {
        self.listeners.get(name)
    }

    /// Every listener.
    pub fn listeners(&self) -> impl Iterator<Item = &Arc<ListenerConfig>> {
        self.listeners.values()
    }

    /// The cluster called `name`, if this snapshot has it.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }

    /// Every cluster.
    pub fn clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.clusters.values()
    }
}

/// Decodes what a snapshot holds, for compiling or composing. Bytes the proxy encoded itself
/// always decode; were they not to, the resource is named as invalid rather than dropped.
pub(crate) fn decode_all(held: &[Encoded]) -> Result<Vec<Resource>, ValidationErrors> {
    decode_all_of(held.iter())
}

/// [`decode_all`] over any list of them.
/// Decoded apart (`memory::apart`): the decoded resources live only while they are compiled.
pub(crate) fn decode_all_of<'a>(
    held: impl Iterator<Item = &'a Encoded> + Send,
) -> Result<Vec<Resource>, ValidationErrors> {
    crate::memory::apart(|| {
        held.map(|encoded| {
            encoded.decode().map_err(|error| {
                ValidationErrors(vec![FieldError {
                    subject: remora_control_api::resource::describe(encoded.kind(), encoded.name()),
                    field: String::new(),
                    message: error.to_string(),
                }])
            })
        })
        .collect()
    })
}

fn compile_listener(
    l: &v1::Listener,
    tables: &[(Arc<RouteTable>, Vec<Destination>)],
    find_cluster: &dyn Fn(&str) -> Option<Arc<Cluster>>,
    authz: Option<ListenerAuthz>,
    previous: Option<&ListenerConfig>,
    metrics: &SnapshotMetrics,
) -> Result<ListenerConfig, Invalid> {
    let address = validate::parse_address(&l.address).map_err(|m| Invalid::new("address", m))?;
    let mut additional_addresses = Vec::with_capacity(l.additional_addresses.len());
    for (i, other) in l.additional_addresses.iter().enumerate() {
        additional_addresses
            .push(validate::parse_address(other).map_err(|m| Invalid::new(format!("additional_addresses[{i}]"), m))?);
    }
    let duration = |field: &str, value: Option<&pbjson_types::Duration>, default| {
        validate::duration(value).map(|d| d.unwrap_or(default)).map_err(|m| Invalid::new(field, m))
    };
    let direction = match l.direction() {
        v1::listener::Direction::Outbound => Direction::Outbound,
        v1::listener::Direction::Inbound => Direction::Inbound,
    };
    let served: Vec<(Arc<RouteTable>, Vec<Destination>)> = tables
        .iter()
        .filter(|(t, _)| t.direction.is_none_or(|only| only == direction))
        .filter(|(t, _)| l.route_tables.is_empty() || l.route_tables.iter().any(|name| *name == *t.name))
        .cloned()
        .collect();
    let default_cluster =
        match l.default_cluster.as_str() {
            "" => None,
            name => Some(find_cluster(name).ok_or_else(|| {
                Invalid::new("default_cluster", format!("names cluster {name:?}, which is not defined"))
            })?),
        };
    let protocol = match l.protocol() {
        v1::listener::Protocol::Auto => ListenerProtocol::Auto,
        v1::listener::Protocol::Http1 => ListenerProtocol::Http1,
        v1::listener::Protocol::Http2 => ListenerProtocol::Http2,
        v1::listener::Protocol::Tcp => ListenerProtocol::Tcp,
        v1::listener::Protocol::Hbone => ListenerProtocol::Hbone,
        v1::listener::Protocol::Http3 => ListenerProtocol::Http3,
        v1::listener::Protocol::HboneQuic => ListenerProtocol::HboneQuic,
    };
    let tunnels = matches!(protocol, ListenerProtocol::Hbone | ListenerProtocol::HboneQuic);
    let idle_timeout = duration("idle_timeout", l.idle_timeout.as_ref(), limits::DEFAULT_IDLE_TIMEOUT)?;
    let (tls, quic) = match (&l.tls, protocol) {
        (Some(tls), ListenerProtocol::Http3) => {
            let previous = previous.and_then(|p| p.tls.as_ref());
            let (certificate, quic) =
                http3(tls, idle_timeout, previous, || metrics.listeners.certificate_reloads(&l.name))?;
            (Some(certificate), Some(quic))
        }
        _ => (None, None),
    };
    let max_connections = match l.max_connections {
        0 => limits::DEFAULT_MAX_CONNECTIONS,
        n => n,
    };
    Ok(ListenerConfig {
        name: l.name.as_str().into(),
        address,
        additional_addresses,
        direction,
        protocol,
        transparent: l.transparent,
        detect_timeout: duration("detect_timeout", l.detect_timeout.as_ref(), limits::DEFAULT_DETECT_TIMEOUT)?,
        idle_timeout,
        header_timeout: duration("header_timeout", l.header_timeout.as_ref(), limits::DEFAULT_HEADER_TIMEOUT)?,
        max_connections: i64::from(max_connections),
        connection_rate_limit: l.connection_rate_limit.as_ref().map(|limit| {
            let burst = if limit.burst == 0 { limit.connections_per_second } else { limit.burst };
            RateLimiter::new(limit.connections_per_second, burst)
        }),
        routes: RouteIndex::new(served),
        access_log: l.access_log.unwrap_or(true),
        default_stats: default_cluster
            .as_ref()
            .map(|c| metrics.routes.route("".into()).for_direction(direction.label(), c).clone()),
        default_cluster,
        stats: metrics.listeners.listener(&l.name, direction.label()),
        tunnels: tunnels.then(|| metrics.listeners.tunnels(&l.name)),
        inbound_listener: tunnels.then(|| l.inbound_listener.as_str().into()),
        authz,
        tls,
        quic,
        advertise_http3: (!l.advertise_http3.is_empty()).then(|| l.advertise_http3.as_str().into()),
        alt_svc: Default::default(),
    })
}

/// An HTTP/3 listener's certificate (the previous snapshot's, while the files are the same: the
/// certificate watch keeps it current) and its QUIC server config.
fn http3(
    tls: &v1::ListenerTls,
    idle_timeout: Duration,
    previous: Option<&Arc<ServedCertificate>>,
    reloads: impl FnOnce() -> CertificateReloads,
) -> Result<(Arc<ServedCertificate>, quinn::ServerConfig), Invalid> {
    let (certificate_file, private_key_file) =
        (std::path::Path::new(&tls.certificate_file), std::path::Path::new(&tls.private_key_file));
    let certificate = match previous {
        Some(served) if served.is_from(certificate_file, private_key_file) => served.clone(),
        _ => Arc::new(
            ServedCertificate::load(certificate_file, private_key_file, reloads())
                .map_err(|e| Invalid::new("tls", e.to_string()))?,
        ),
    };
    let quic = quic::server_config(certificate.clone(), idle_timeout).map_err(|m| Invalid::new("tls", m))?;
    Ok((certificate, quic))
}

/// The snapshot serving now, shared by every worker.
#[derive(Debug)]
pub struct LiveSnapshot {
    current: ArcSwap<Snapshot>,
    /// Bumped on every swap, for the background tasks that follow the config (`balance::monitor`).
    swaps: tokio::sync::watch::Sender<u64>,
}

impl Default for LiveSnapshot {
    fn default() -> Self {
        LiveSnapshot::new(Snapshot::default())
    }
}

impl LiveSnapshot {
    /// Starts serving `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        LiveSnapshot { current: ArcSwap::from_pointee(snapshot), swaps: tokio::sync::watch::Sender::new(0) }
    }

    /// A receiver that sees every later swap as a change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.swaps.subscribe()
    }

    /// The snapshot serving now. Cheap (no reference-count traffic in the common case); do not hold
    /// the guard across an await.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The snapshot serving now, as an owned reference.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Swaps in `snapshot`; requests that already resolved their route keep the old one.
    pub fn store(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
        self.swaps.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn build(yaml: &str, previous: Option<&Snapshot>, metrics: &SnapshotMetrics) -> Result<Snapshot, ValidationErrors> {
        let file = remora_control_api::config::parse(yaml, "t").unwrap();
        Snapshot::build(
            "v".into(),
            remora_control_api::Encoded::all(&file.resources),
            previous,
            &OwnLocality::default(),
            metrics,
        )
    }

    const CONFIG: &str = r#"
resources:
  - {kind: Cluster, name: shop, protocol: http2, connect_timeout: 0.25s}
  - {kind: Endpoints, cluster: shop, endpoints: [{address: "127.0.0.1:9001"}, {address: "127.0.0.1:9002", weight: 2}]}
  - {kind: Cluster, name: pass, original_destination: true}
  - {kind: RouteTable, name: shop, destinations: [shop], routes: [{backends: [{cluster: shop}]}]}
  - {kind: Listener, name: out, address: "127.0.0.1:15001", transparent: true, default_cluster: pass}
"#;

    #[test]
    fn builds_listeners_and_clusters_with_defaults() {
        let metrics = SnapshotMetrics::default();
        let snapshot = build(CONFIG, None, &metrics).unwrap();
        let out = snapshot.listener("out").unwrap();
        assert_eq!(out.protocol, ListenerProtocol::Auto);
        assert_eq!(out.detect_timeout, limits::DEFAULT_DETECT_TIMEOUT);
        assert_eq!(out.max_connections, i64::from(limits::DEFAULT_MAX_CONNECTIONS));
        let dst: SocketAddr = "10.1.1.1:80".parse().unwrap();
        assert_eq!(out.default_cluster.as_ref().unwrap().pick(Some(dst), None, None, &[]).unwrap().address, dst);
        let table = out.routes.for_http(Some("shop"), None).unwrap();
        assert_eq!(&*table.name, "shop");
        let shop = snapshot.cluster("shop").unwrap();
        assert_eq!(shop.connect_timeout, Duration::from_millis(250));
        assert_eq!(shop.protocol, cluster::UpstreamProtocol::Http2);
    }

    #[test]
    fn unchanged_endpoints_keep_their_rotation_and_changed_ones_do_not() {
        let metrics = SnapshotMetrics::default();
        // Endpoint states are kept where the balancer reads them (ewma here).
        let config = CONFIG.replace("protocol: http2,", "protocol: http2, balancer: ewma,");
        let first = build(&config, None, &metrics).unwrap();
        let same = build(&config, Some(&first), &metrics).unwrap();
        let set = |s: &Snapshot| match &s.cluster("shop").unwrap().targets {
            cluster::Targets::Endpoints(set) => set.clone(),
            cluster::Targets::OriginalDestination => panic!(),
        };
        assert!(Arc::ptr_eq(&set(&first), &set(&same)));
        // The endpoint that stayed keeps its run-time state (which the balancer's first request to
        // it made); the new one starts afresh.
        let kept: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let requested = |s: &Snapshot| set(s).members().iter().find(|m| m.address() == kept).unwrap().state.shared();
        assert!(set(&first).state_of(kept).is_none(), "no state before the first request");
        let made = requested(&same).unwrap();
        let changed = build(&config.replace("9002", "9003"), Some(&same), &metrics).unwrap();
        assert!(!Arc::ptr_eq(&set(&same), &set(&changed)));
        assert!(Arc::ptr_eq(&made, &set(&changed).state_of(kept).unwrap()));
        let balanced = build(&config.replace("ewma", "least_request"), Some(&changed), &metrics).unwrap();
        assert!(!Arc::ptr_eq(&set(&changed), &set(&balanced)), "a new balancer builds a new set");
        assert!(Arc::ptr_eq(&made, &set(&balanced).state_of(kept).unwrap()));
        // Round robin reads none and makes none, but carries what it was given through.
        let plain = build(CONFIG, None, &metrics).unwrap();
        assert!(set(&plain).state_of(kept).is_none() && requested(&plain).is_none());
        let carried = build(CONFIG, Some(&balanced), &metrics).unwrap();
        assert!(Arc::ptr_eq(&made, &set(&carried).state_of(kept).unwrap()));
    }

    #[test]
    fn invalid_sets_are_refused() {
        let error =
            build(&CONFIG.replace("default_cluster: pass", "default_cluster: nope"), None, &SnapshotMetrics::default())
                .unwrap_err()
                .to_string();
        assert!(error.contains("listener \"out\": default_cluster: names cluster \"nope\""), "{error}");
    }
}
