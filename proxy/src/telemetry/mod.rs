//! Telemetry: the Prometheus registry and the pre-resolved counters the data path bumps (here),
//! latency histograms (`histogram`), traces exported over OTLP (`trace`, `export`), the access log
//! (`access_log`), and the process's log filter, changeable at runtime (`logging`).
//!
//! Label lookups (a hash and a lock in `prometheus-client`'s `Family`) happen when a snapshot is
//! built, or once when a route first sees a status code, never per request after that: each
//! listener, cluster and route backend gets a [`ListenerStats`] / [`ClusterStats`] /
//! [`RequestStats`] holding its counters, and the data path only does atomic adds on them. The same
//! labels always resolve to the same counters, so totals run on across config reloads. `/metrics`
//! renders the registry through [`Metrics::encode`].
//!
//! Labels are bounded by config (listener, route and cluster names), by HTTP (status codes, gRPC
//! status codes), or by a fixed list (reasons, results), never by traffic: no path, peer or
//! endpoint address is ever a label.

pub mod access_log;
pub mod export;
pub mod histogram;
pub mod logging;
mod otlp_http;
pub mod trace;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::balance::outlier::EjectReason;
use crate::policy::breaker::Breaker;
pub use histogram::Histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: String,
    direction: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterClassLabels {
    cluster: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterReasonLabels {
    cluster: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    cluster: String,
    breaker: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterResultLabels {
    cluster: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    direction: &'static str,
    route: String,
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    direction: &'static str,
    route: String,
    cluster: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    direction: &'static str,
    route: String,
    cluster: String,
    grpc_status: u32,
}

/// The metric families per route, shared (they are handles) by every [`RouteStats`].
#[derive(Clone, Debug, Default)]
struct RouteFamilies {
    requests: Family<CodeLabels, Counter>,
    grpc: Family<GrpcLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
}

/// The status codes whose counters a route keeps at hand, once first seen; others take a lookup.
const COMMON_CODES: [u16; 17] = [200, 201, 202, 204, 301, 302, 304, 400, 401, 403, 404, 408, 429, 500, 502, 503, 504];

/// gRPC status codes: 0 (OK) to 16 (UNAUTHENTICATED).
const GRPC_CODES: usize = 17;

/// What one route backend counts for one direction: responses by status code and gRPC status, and
/// the time to the response head.
#[derive(Debug)]
pub struct RequestStats {
    labels: RouteLabels,
    /// The route label again, shared with spans without a copy.
    route: Arc<str>,
    families: RouteFamilies,
    codes: [OnceLock<Counter>; COMMON_CODES.len()],
    grpc: [OnceLock<Counter>; GRPC_CODES],
    duration: Histogram,
}

impl RequestStats {
    fn new(families: &RouteFamilies, labels: RouteLabels) -> RequestStats {
        RequestStats {
            duration: families.duration.get_or_create_owned(&labels),
            route: labels.route.as_str().into(),
            families: families.clone(),
            labels,
            codes: Default::default(),
            grpc: Default::default(),
        }
    }

    /// The route label: `TABLE/ROUTE`, or empty for a listener's default cluster.
    pub fn route(&self) -> &Arc<str> {
        &self.route
    }

    /// Counts one response with `status`, `elapsed` after the request arrived.
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.duration.observe(elapsed);
        let code_labels = || CodeLabels {
            direction: self.labels.direction,
            route: self.labels.route.clone(),
            cluster: self.labels.cluster.clone(),
            code: status,
        };
        match COMMON_CODES.iter().position(|c| *c == status) {
            Some(i) => self.codes[i].get_or_init(|| self.families.requests.get_or_create_owned(&code_labels())).inc(),
            None => self.families.requests.get_or_create(&code_labels()).inc(),
        };
    }

    /// Counts one gRPC call that ended with `code` (codes above 16 count as 2, UNKNOWN).
    pub fn record_grpc(&self, code: u32) {
        let code = if (code as usize) < GRPC_CODES { code } else { 2 };
        let labels = || GrpcLabels {
            direction: self.labels.direction,
            route: self.labels.route.clone(),
            cluster: self.labels.cluster.clone(),
            grpc_status: code,
        };
        self.grpc[code as usize].get_or_init(|| self.families.grpc.get_or_create_owned(&labels())).inc();
    }
}

/// The counters of one route backend (a route and one of its clusters), per direction, made when
/// a listener of that direction first sends it a request (a route table may serve both).
#[derive(Debug)]
pub struct RouteStats {
    families: RouteFamilies,
    route: String,
    cluster: String,
    inbound: OnceLock<Arc<RequestStats>>,
    outbound: OnceLock<Arc<RequestStats>>,
}

impl RouteStats {
    /// The counters for requests from a listener of `direction` (`inbound` or `outbound`).
    pub fn for_direction(&self, direction: &'static str) -> &Arc<RequestStats> {
        let slot = if direction == "inbound" { &self.inbound } else { &self.outbound };
        slot.get_or_init(|| {
            let labels = RouteLabels { direction, route: self.route.clone(), cluster: self.cluster.clone() };
            Arc::new(RequestStats::new(&self.families, labels))
        })
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index into a `[Counter; 5]` of status classes. Codes hyper accepts but HTTP does not define
/// (600-999) count as 5xx: the server that sent them is broken.
fn class_index(status: u16) -> usize {
    (usize::from(status / 100)).clamp(1, 5) - 1
}

/// Counters of one listener.
#[derive(Debug)]
pub struct ListenerStats {
    /// Connections accepted.
    pub connections: Counter,
    /// Connections open now.
    pub active: Gauge,
    /// Connections that were served and have closed (rejected ones are counted apart).
    pub closed: Counter,
    /// Connections closed at once because the listener was at `max_connections`.
    pub rejected: Counter,
    /// Bytes read from downstream clients.
    pub bytes_received: Counter,
    /// Bytes written to downstream clients.
    pub bytes_sent: Counter,
    /// Connections closed at once because the listener's connection rate limit was spent.
    pub rate_limited: Counter,
    requests: [Counter; 5],
}

impl ListenerStats {
    /// Counts one HTTP response sent downstream with `status`.
    pub fn record_response(&self, status: u16) {
        self.requests[class_index(status)].inc();
    }
}

/// Counters and gauges of one cluster.
#[derive(Debug)]
pub struct ClusterStats {
    /// The cluster's name (for logs).
    pub name: Arc<str>,
    /// Upstream connections opened.
    pub connections: Counter,
    /// Connects refused or failed.
    pub connect_failures: Counter,
    /// Connects that hit the connect timeout.
    pub connect_timeouts: Counter,
    /// Opaque TCP bytes sent to the cluster's endpoints.
    pub tcp_bytes_sent: Counter,
    /// Opaque TCP bytes received from them.
    pub tcp_bytes_received: Counter,
    /// Upstream connections open now (every worker's).
    pub open_connections: Gauge,
    /// Requests in flight now (counted only with a `max_requests` breaker).
    pub active_requests: Gauge,
    /// Requests waiting for a new connection now (counted only with `max_pending_requests`).
    pub pending_requests: Gauge,
    /// Retries in flight now (counted only with `max_retries`).
    pub active_retries: Gauge,
    /// Retries sent (hedges included).
    pub retries: Counter,
    /// Hedged attempts sent.
    pub hedges: Counter,
    /// Retries not sent because the route's retry budget was spent.
    pub retry_budget_exhausted: Counter,
    /// Requests that timed out: the route's timeout, and attempts that hit their per-try timeout.
    pub request_timeouts: Counter,
    /// Attempts that hit their per-try timeout.
    pub per_try_timeouts: Counter,
    /// Response bodies cut off by their route's idle timeout.
    pub idle_timeouts: Counter,
    /// Mirrored copies sent, dropped (the per-worker cap), and failed (no answer).
    pub mirror_sent: Counter,
    /// See `mirror_sent`.
    pub mirror_dropped: Counter,
    /// See `mirror_sent`.
    pub mirror_failed: Counter,
    /// Health-check probes that passed and failed.
    pub health_checks_passed: Counter,
    /// See `health_checks_passed`.
    pub health_checks_failed: Counter,
    /// Endpoints healthy now (not ejected, passing health checks).
    pub healthy_endpoints: Gauge,
    /// Endpoints ejected by outlier detection now.
    pub ejected_endpoints: Gauge,
    /// Time from sending an attempt to its response head, per attempt.
    pub attempt_duration: Histogram,
    overflows: [Counter; 4],
    ejections: [Counter; 4],
    responses: [Counter; 5],
}

impl ClusterStats {
    /// Counts one response received from an endpoint of the cluster.
    pub fn record_response(&self, status: u16) {
        self.responses[class_index(status)].inc();
    }

    /// Counts a request refused by a circuit breaker.
    pub fn record_overflow(&self, breaker: Breaker) {
        let index = Breaker::ALL.iter().position(|b| *b == breaker).unwrap_or(0);
        self.overflows[index].inc();
    }

    /// Counts an ejection.
    pub fn record_ejection(&self, reason: EjectReason) {
        let index = EjectReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.ejections[index].inc();
    }

    /// Sets the healthy and ejected endpoint gauges.
    pub fn set_endpoint_health(&self, healthy: usize, ejected: usize) {
        self.healthy_endpoints.set(i64::try_from(healthy).unwrap_or(i64::MAX));
        self.ejected_endpoints.set(i64::try_from(ejected).unwrap_or(i64::MAX));
    }
}

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    listener_connections: Family<ListenerLabels, Counter>,
    listener_active: Family<ListenerLabels, Gauge>,
    listener_closed: Family<ListenerLabels, Counter>,
    listener_rejected: Family<ListenerLabels, Counter>,
    listener_received: Family<ListenerLabels, Counter>,
    listener_sent: Family<ListenerLabels, Counter>,
    listener_rate_limited: Family<ListenerLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    upstream_connections: Family<ClusterLabels, Counter>,
    upstream_connect_errors: Family<ClusterReasonLabels, Counter>,
    upstream_responses: Family<ClusterClassLabels, Counter>,
    upstream_tcp_sent: Family<ClusterLabels, Counter>,
    upstream_tcp_received: Family<ClusterLabels, Counter>,
    upstream_open: Family<ClusterLabels, Gauge>,
    upstream_active: Family<ClusterLabels, Gauge>,
    upstream_pending: Family<ClusterLabels, Gauge>,
    upstream_active_retries: Family<ClusterLabels, Gauge>,
    upstream_retries: Family<ClusterLabels, Counter>,
    upstream_hedges: Family<ClusterLabels, Counter>,
    upstream_budget_exhausted: Family<ClusterLabels, Counter>,
    upstream_timeouts: Family<ClusterReasonLabels, Counter>,
    upstream_overflow: Family<BreakerLabels, Counter>,
    mirror_requests: Family<ClusterResultLabels, Counter>,
    health_checks: Family<ClusterResultLabels, Counter>,
    endpoints_healthy: Family<ClusterLabels, Gauge>,
    endpoints_ejected: Family<ClusterLabels, Gauge>,
    ejections: Family<ClusterReasonLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    config_version: Family<VersionLabels, Gauge>,
    workers: Gauge,
    control_plane_connected: Gauge,
    xds_updates: Family<XdsLabels, Counter>,
    routes: RouteFamilies,
    upstream_duration: Family<ClusterLabels, Histogram>,
    spans: Family<ResultLabels, Counter>,
    access_log_lines: Family<ResultLabels, Counter>,
    mesh: MeshStats,
}

/// The identity and mTLS counters: handshakes, the certificate's expiry and renewals, and what
/// authorization policies decided.
#[derive(Clone, Debug, Default)]
pub struct MeshStats {
    handshakes: Family<HandshakeLabels, Counter>,
    peer_handshakes: Family<PeerHandshakeLabels, Counter>,
    certificate_expiry: Gauge,
    rotations: Counter,
    renewals: Family<ResultLabels, Counter>,
    denied: Family<PolicyLabels, Counter>,
    plaintext: Family<PlaintextLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    direction: &'static str,
    result: &'static str,
}

/// A handshake whose peer certificate the trust bundle verified: `peer` is an identity the mesh's
/// CA issued, so the label's values are bounded by the mesh's workloads, not by traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerHandshakeLabels {
    direction: &'static str,
    result: &'static str,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    listener: String,
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlaintextLabels {
    listener: String,
    policy: String,
    result: &'static str,
}

impl MeshStats {
    /// Counts a TLS handshake with a peer sidecar: `direction` inbound (we accepted) or outbound,
    /// `result` ok or the failure's kind.
    pub fn handshake(&self, direction: &'static str, result: &'static str) {
        self.handshakes.get_or_create(&HandshakeLabels { direction, result }).inc();
    }

    /// Counts a handshake whose peer proved `peer` (its certificate verified against the trust
    /// bundle): `result` ok, or identity when that peer was not the one expected.
    pub fn peer_handshake(&self, direction: &'static str, result: &'static str, peer: &str) {
        let labels = PeerHandshakeLabels { direction, result, peer: peer.to_owned() };
        self.peer_handshakes.get_or_create(&labels).inc();
    }

    /// A new certificate took over, valid until `not_after` (seconds since the epoch).
    pub fn rotated(&self, not_after: u64) {
        self.rotations.inc();
        self.certificate_expiry.set(i64::try_from(not_after).unwrap_or(i64::MAX));
    }

    /// A renewal attempt's result: ok, or failed.
    pub fn renewal(&self, result: &'static str) {
        self.renewals.get_or_create(&ResultLabels { result }).inc();
    }

    /// Certificates installed so far.
    pub fn rotations(&self) -> u64 {
        self.rotations.get()
    }

    /// The counters of authorization policy `policy` on listener `listener`, made when the policy
    /// is compiled, so judging a connection or request never builds a label.
    pub fn policy(&self, listener: &str, policy: &str) -> PolicyCounters {
        let labels = PolicyLabels { listener: listener.to_owned(), policy: policy.to_owned() };
        let plaintext = |result| PlaintextLabels { listener: listener.to_owned(), policy: policy.to_owned(), result };
        PolicyCounters {
            denied: self.denied.get_or_create_owned(&labels),
            plaintext_accepted: self.plaintext.get_or_create_owned(&plaintext("accepted")),
            plaintext_refused: self.plaintext.get_or_create_owned(&plaintext("refused")),
        }
    }
}

/// What one authorization policy decided: connections (TCP) and requests (HTTP) denied, plaintext
/// connections accepted (permissive) and refused (strict).
#[derive(Clone, Debug, Default)]
pub struct PolicyCounters {
    /// Denied connections and requests.
    pub denied: Counter,
    /// Plaintext connections let in by a permissive policy.
    pub plaintext_accepted: Counter,
    /// Plaintext connections closed by a strict policy.
    pub plaintext_refused: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XdsLabels {
    r#type: &'static str,
    result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with every metric family declared (and so listed by `/metrics`).
    pub fn new() -> Self {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("remora"),
            listener_connections: Family::default(),
            listener_active: Family::default(),
            listener_closed: Family::default(),
            listener_rejected: Family::default(),
            listener_received: Family::default(),
            listener_sent: Family::default(),
            listener_rate_limited: Family::default(),
            requests: Family::default(),
            upstream_connections: Family::default(),
            upstream_connect_errors: Family::default(),
            upstream_responses: Family::default(),
            upstream_tcp_sent: Family::default(),
            upstream_tcp_received: Family::default(),
            upstream_open: Family::default(),
            upstream_active: Family::default(),
            upstream_pending: Family::default(),
            upstream_active_retries: Family::default(),
            upstream_retries: Family::default(),
            upstream_hedges: Family::default(),
            upstream_budget_exhausted: Family::default(),
            upstream_timeouts: Family::default(),
            upstream_overflow: Family::default(),
            mirror_requests: Family::default(),
            health_checks: Family::default(),
            endpoints_healthy: Family::default(),
            endpoints_ejected: Family::default(),
            ejections: Family::default(),
            reloads: Family::default(),
            config_version: Family::default(),
            workers: Gauge::default(),
            control_plane_connected: Gauge::default(),
            xds_updates: Family::default(),
            routes: RouteFamilies::default(),
            upstream_duration: Family::default(),
            spans: Family::default(),
            access_log_lines: Family::default(),
            mesh: MeshStats::default(),
        };
        let r = &mut metrics.registry;
        r.register("listener_connections", "Downstream connections accepted", metrics.listener_connections.clone());
        r.register("listener_connections_active", "Downstream connections open now", metrics.listener_active.clone());
        r.register(
            "listener_connections_closed",
            "Downstream connections served and closed (those rejected at once are counted apart)",
            metrics.listener_closed.clone(),
        );
        r.register(
            "listener_connections_rejected",
            "Downstream connections closed at once because the listener was at max_connections",
            metrics.listener_rejected.clone(),
        );
        r.register("listener_received_bytes", "Bytes read from downstream clients", metrics.listener_received.clone());
        r.register("listener_sent_bytes", "Bytes written to downstream clients", metrics.listener_sent.clone());
        r.register(
            "listener_connections_rate_limited",
            "Downstream connections closed at once because the listener's connection rate limit was spent",
            metrics.listener_rate_limited.clone(),
        );
        r.register(
            "requests",
            "HTTP responses sent downstream, by listener and status class (local replies included)",
            metrics.requests.clone(),
        );
        r.register("upstream_connections", "Upstream connections opened", metrics.upstream_connections.clone());
        r.register(
            "upstream_connect_errors",
            "Upstream connects that failed, by reason (refused, timeout)",
            metrics.upstream_connect_errors.clone(),
        );
        r.register(
            "upstream_responses",
            "HTTP responses received from upstream endpoints, by cluster and status class",
            metrics.upstream_responses.clone(),
        );
        r.register("upstream_tcp_sent_bytes", "Opaque TCP bytes sent to a cluster", metrics.upstream_tcp_sent.clone());
        r.register(
            "upstream_tcp_received_bytes",
            "Opaque TCP bytes received from a cluster",
            metrics.upstream_tcp_received.clone(),
        );
        r.register("upstream_connections_active", "Upstream connections open now", metrics.upstream_open.clone());
        r.register(
            "upstream_requests_active",
            "Requests in flight to a cluster now (kept for clusters with a max_requests breaker)",
            metrics.upstream_active.clone(),
        );
        r.register(
            "upstream_requests_pending",
            "Requests waiting for a new upstream connection now (kept with a max_pending_requests breaker)",
            metrics.upstream_pending.clone(),
        );
        r.register(
            "upstream_retries_active",
            "Retries in flight now (kept for clusters with a max_retries breaker)",
            metrics.upstream_active_retries.clone(),
        );
        r.register("upstream_retries", "Retries sent, hedged attempts included", metrics.upstream_retries.clone());
        r.register("upstream_hedges", "Hedged attempts sent", metrics.upstream_hedges.clone());
        r.register(
            "upstream_retry_budget_exhausted",
            "Retries not sent because the route's retry budget was spent",
            metrics.upstream_budget_exhausted.clone(),
        );
        r.register(
            "upstream_timeouts",
            "Requests that timed out, by reason (request: the route's timeout; per_try: one attempt's; idle: a response body that stalled past its route's idle_timeout)",
            metrics.upstream_timeouts.clone(),
        );
        r.register(
            "upstream_overflow",
            "Requests failed at once by a circuit breaker, by breaker",
            metrics.upstream_overflow.clone(),
        );
        r.register(
            "mirror_requests",
            "Mirrored copies of requests, by result (sent, dropped at the per-worker cap, failed)",
            metrics.mirror_requests.clone(),
        );
        r.register(
            "health_checks",
            "Active health-check probes, by result (pass, fail)",
            metrics.health_checks.clone(),
        );
        r.register(
            "upstream_endpoints_healthy",
            "Endpoints of a cluster healthy now (not ejected, passing health checks)",
            metrics.endpoints_healthy.clone(),
        );
        r.register(
            "upstream_endpoints_ejected",
            "Endpoints of a cluster ejected by outlier detection now",
            metrics.endpoints_ejected.clone(),
        );
        r.register("outlier_ejections", "Outlier-detection ejections, by reason", metrics.ejections.clone());
        r.register("config_reloads", "Config reloads, by result (applied, rejected)", metrics.reloads.clone());
        r.register("config_version", "1 for the version of the config serving now", metrics.config_version.clone());
        r.register("workers", "Worker threads", metrics.workers.clone());
        r.register(
            "control_plane_connected",
            "1 while the stream to the control plane is open",
            metrics.control_plane_connected.clone(),
        );
        r.register(
            "xds_updates",
            "Control-plane updates, by resource type and result (ack, nack)",
            metrics.xds_updates.clone(),
        );
        r.register(
            "route_requests",
            "HTTP responses sent downstream for requests a route (or a listener's default cluster, route \"\") took, by direction, route, cluster and status code",
            metrics.routes.requests.clone(),
        );
        r.register(
            "route_grpc_responses",
            "gRPC calls answered, by direction, route, cluster and grpc-status (from the trailers, or the headers of a trailers-only answer)",
            metrics.routes.grpc.clone(),
        );
        r.register(
            "route_request_duration_seconds",
            "Time from a request's arrival to its response head, by direction, route and cluster",
            metrics.routes.duration.clone(),
        );
        r.register(
            "upstream_request_duration_seconds",
            "Time from sending one attempt to an endpoint to its response head, by cluster (every attempt, retries included)",
            metrics.upstream_duration.clone(),
        );
        r.register(
            "trace_spans",
            "Spans finished, by result (exported; dropped: the export queue was full; failed: the collector refused or could not be reached)",
            metrics.spans.clone(),
        );
        r.register(
            "access_log_lines",
            "Access log lines, by result (written; dropped: the writer fell behind and its queue was full)",
            metrics.access_log_lines.clone(),
        );
        let mesh = &metrics.mesh;
        r.register(
            "tls_handshakes",
            "TLS handshakes with peer sidecars, by direction and result (ok, or what failed: timeout, certificate, identity, protocol)",
            mesh.handshakes.clone(),
        );
        r.register(
            "tls_peer_handshakes",
            "TLS handshakes with peer sidecars whose certificate the trust bundle verified, by direction, result (ok; identity: not the peer expected) and the peer's SPIFFE ID",
            mesh.peer_handshakes.clone(),
        );
        r.register(
            "identity_certificate_expiry_seconds",
            "When this proxy's certificate expires, in seconds since the Unix epoch",
            mesh.certificate_expiry.clone(),
        );
        r.register("identity_rotations", "Certificates installed (the first one included)", mesh.rotations.clone());
        r.register(
            "identity_renewals",
            "Certificate renewals from the CA or the files, by result (ok, failed)",
            mesh.renewals.clone(),
        );
        r.register(
            "authorization_denied",
            "Connections (TCP) and requests (HTTP, answered 403) an authorization policy denied",
            mesh.denied.clone(),
        );
        r.register(
            "authorization_plaintext",
            "Plaintext connections to a port an authorization policy covers, by result (accepted: permissive; refused: strict)",
            mesh.plaintext.clone(),
        );
        metrics
    }

    /// The identity, mTLS and authorization counters.
    pub fn mesh(&self) -> &MeshStats {
        &self.mesh
    }

    /// The counters of one route backend: `route` (its table and name) sending to `cluster`.
    pub fn route(&self, route: &str, cluster: &str) -> RouteStats {
        RouteStats {
            families: self.routes.clone(),
            route: route.to_owned(),
            cluster: cluster.to_owned(),
            inbound: OnceLock::new(),
            outbound: OnceLock::new(),
        }
    }

    /// The span counters: exported, dropped, failed.
    pub fn span_counters(&self) -> [Counter; 3] {
        ["exported", "dropped", "failed"].map(|result| self.spans.get_or_create_owned(&ResultLabels { result }))
    }

    /// The access-log counters: written, dropped.
    pub fn access_log_counters(&self) -> [Counter; 2] {
        ["written", "dropped"].map(|result| self.access_log_lines.get_or_create_owned(&ResultLabels { result }))
    }

    /// The counters of listener `name`; the same name always yields the same counters.
    pub fn listener(&self, name: &str, direction: &'static str) -> Arc<ListenerStats> {
        let labels = ListenerLabels { listener: name.to_owned(), direction };
        let requests = STATUS_CLASSES.map(|status_class| {
            self.requests.get_or_create_owned(&RequestLabels { listener: name.to_owned(), direction, status_class })
        });
        Arc::new(ListenerStats {
            connections: self.listener_connections.get_or_create_owned(&labels),
            active: self.listener_active.get_or_create_owned(&labels),
            closed: self.listener_closed.get_or_create_owned(&labels),
            rejected: self.listener_rejected.get_or_create_owned(&labels),
            bytes_received: self.listener_received.get_or_create_owned(&labels),
            bytes_sent: self.listener_sent.get_or_create_owned(&labels),
            rate_limited: self.listener_rate_limited.get_or_create_owned(&labels),
            requests,
        })
    }

    /// The counters of cluster `name`; the same name always yields the same counters.
    pub fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        let labels = ClusterLabels { cluster: name.to_owned() };
        let reason = |reason| ClusterReasonLabels { cluster: name.to_owned(), reason };
        let responses = STATUS_CLASSES.map(|status_class| {
            self.upstream_responses.get_or_create_owned(&ClusterClassLabels { cluster: name.to_owned(), status_class })
        });
        let result = |result| ClusterResultLabels { cluster: name.to_owned(), result };
        let overflows = Breaker::ALL.map(|b| {
            self.upstream_overflow.get_or_create_owned(&BreakerLabels { cluster: name.to_owned(), breaker: b.as_str() })
        });
        let ejections = EjectReason::ALL.map(|r| self.ejections.get_or_create_owned(&reason(r.as_str())));
        Arc::new(ClusterStats {
            name: name.into(),
            connections: self.upstream_connections.get_or_create_owned(&labels),
            connect_failures: self.upstream_connect_errors.get_or_create_owned(&reason("refused")),
            connect_timeouts: self.upstream_connect_errors.get_or_create_owned(&reason("timeout")),
            tcp_bytes_sent: self.upstream_tcp_sent.get_or_create_owned(&labels),
            tcp_bytes_received: self.upstream_tcp_received.get_or_create_owned(&labels),
            open_connections: self.upstream_open.get_or_create_owned(&labels),
            active_requests: self.upstream_active.get_or_create_owned(&labels),
            pending_requests: self.upstream_pending.get_or_create_owned(&labels),
            active_retries: self.upstream_active_retries.get_or_create_owned(&labels),
            retries: self.upstream_retries.get_or_create_owned(&labels),
            hedges: self.upstream_hedges.get_or_create_owned(&labels),
            retry_budget_exhausted: self.upstream_budget_exhausted.get_or_create_owned(&labels),
            request_timeouts: self.upstream_timeouts.get_or_create_owned(&reason("request")),
            per_try_timeouts: self.upstream_timeouts.get_or_create_owned(&reason("per_try")),
            idle_timeouts: self.upstream_timeouts.get_or_create_owned(&reason("idle")),
            mirror_sent: self.mirror_requests.get_or_create_owned(&result("sent")),
            mirror_dropped: self.mirror_requests.get_or_create_owned(&result("dropped")),
            mirror_failed: self.mirror_requests.get_or_create_owned(&result("failed")),
            health_checks_passed: self.health_checks.get_or_create_owned(&result("pass")),
            health_checks_failed: self.health_checks.get_or_create_owned(&result("fail")),
            healthy_endpoints: self.endpoints_healthy.get_or_create_owned(&labels),
            ejected_endpoints: self.endpoints_ejected.get_or_create_owned(&labels),
            attempt_duration: self.upstream_duration.get_or_create_owned(&labels),
            overflows,
            ejections,
            responses,
        })
    }

    /// Counts a reload attempt.
    pub fn record_reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Marks `version` as the config serving now (and no other).
    pub fn set_config_version(&self, version: &str) {
        self.config_version.clear();
        self.config_version.get_or_create(&VersionLabels { version: version.to_owned() }).set(1);
    }

    /// Records whether the control-plane stream is open.
    pub fn set_control_plane_connected(&self, connected: bool) {
        self.control_plane_connected.set(i64::from(connected));
    }

    /// Counts a control-plane update of `kind`, accepted or rejected.
    pub fn record_xds_update(&self, kind: &'static str, accepted: bool) {
        let result = if accepted { "ack" } else { "nack" };
        self.xds_updates.get_or_create(&XdsLabels { r#type: kind, result }).inc();
    }

    /// Records the number of worker threads.
    pub fn set_workers(&self, workers: usize) {
        self.workers.set(i64::try_from(workers).unwrap_or(i64::MAX));
    }

    /// Renders every metric in the OpenMetrics text format (what Prometheus asks for first).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Renders every metric in the Prometheus text format 0.0.4 (what `promtool`, older scrapers
    /// and people with curl read): the OpenMetrics text, with each counter's `HELP` and `TYPE`
    /// naming its `_total` samples, and no `# EOF`.
    pub fn encode_prometheus(&self) -> String {
        let open_metrics = self.encode();
        let mut out = String::with_capacity(open_metrics.len());
        let mut help: Option<&str> = None;
        for line in open_metrics.lines() {
            if line.starts_with("# HELP ") {
                if let Some(previous) = help.replace(line) {
                    out.push_str(previous);
                    out.push('\n');
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if kind == "counter" { "_total" } else { "" };
                if let Some(help_line) = help.take() {
                    let text = help_line.strip_prefix("# HELP ").and_then(|h| h.split_once(' ')).map_or("", |(_, t)| t);
                    out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
                }
                out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
                continue;
            }
            if line == "# EOF" || line.starts_with("# UNIT ") {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_for_one_name_share_counters_and_render() {
        let metrics = Metrics::new();
        let a = metrics.listener("web", "outbound");
        let b = metrics.listener("web", "outbound");
        a.record_response(200);
        b.record_response(204);
        b.record_response(503);
        b.record_response(700);
        metrics.cluster("shop").record_response(404);
        let text = metrics.encode();
        assert!(
            text.contains(r#"remora_requests_total{listener="web",direction="outbound",status_class="2xx"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"status_class="5xx"} 2"#), "{text}");
        assert!(text.contains(r#"remora_upstream_responses_total{cluster="shop",status_class="4xx"} 1"#), "{text}");
    }

    #[test]
    fn the_prometheus_text_names_counters_by_their_samples() {
        let metrics = Metrics::new();
        metrics.listener("web", "outbound").record_response(200);
        let text = metrics.encode_prometheus();
        assert!(text.contains("# TYPE remora_requests_total counter\n"), "{text}");
        assert!(text.contains("# HELP remora_requests_total HTTP responses"), "{text}");
        assert!(text.contains("# TYPE remora_workers gauge\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn only_the_current_version_is_marked() {
        let metrics = Metrics::new();
        metrics.set_config_version("aaa");
        metrics.set_config_version("bbb");
        let text = metrics.encode();
        assert!(text.contains(r#"remora_config_version{version="bbb"} 1"#), "{text}");
        assert!(!text.contains("aaa"), "{text}");
    }
}
