//! L7: serving HTTP/1.1 and HTTP/2 connections and proxying each request.
//!
//! A connection arrives from `listener` already classified; [`serve`] runs hyper's server on it with
//! the limits from `limits`, until the client closes, the idle timeout passes, or a drain asks it to
//! finish (HTTP/1.1: the request in flight completes with `Connection: close`; HTTP/2: GOAWAY, open
//! streams complete). Each request then goes through these phases, in this order, in `proxy`:
//!
//! 1. **route**: from the live snapshot, the listener's route table for the request's authority (or
//!    the connection's original destination), the first matching route, and a cluster by weight;
//!    the listener's default cluster when no table claims the destination. A route with a policy
//!    (`policy`) then admits the request: its rate limit (429) and its injected faults (a delay, an
//!    abort).
//! 2. **balance**: the cluster's next healthy endpoint (or the original destination, for a
//!    pass-through), within the cluster's circuit breakers (503 `upstream_overflow`).
//! 3. **prepare**: hop-by-hop headers stripped; target and `Host` reshaped for the upstream version.
//! 4. **connect**: a pooled connection to the endpoint, or a new one (`client`).
//! 5. **respond**: the endpoint's response streams back (its hop-by-hop headers were left out as it
//!    was read); a `101` becomes a tunnel, as does a `CONNECT` (`tunnel`).
//! 6. **record**: the listener's and the cluster's counters, by status class; the attempt's outcome
//!    and latency on its endpoint, for outlier detection and the ewma balancer.
//!
//! A route whose policy asks for more than admission (a delay, a timeout, retries, hedging, a
//! mirror, a fallback) prepares the request once and then runs phases 2, 4, 5 and 6 under
//! `forward`, once per attempt, with the timeout around them all. Any failure becomes a response in
//! one place, [`error::ProxyError::to_response`].

pub mod body;
pub mod client;
pub mod error;
mod forward;
pub mod h1;
pub mod headers;
mod mirror;
pub(crate) mod observe;
pub mod replay;
pub mod tunnel;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::{debug, info};

use crate::balance::{EndpointState, Observed};
use crate::io::{self, DownstreamStream, Meter, Watched, idle_watch};
use crate::limits;
use crate::listener::{DataPath, Open};
use crate::policy::Admission;
use crate::state::cluster::{Cluster, Picked, Targets, UpstreamProtocol};
use crate::state::{Direction, ListenerConfig};
use crate::timer::CoarseTimer;
use body::{ClientBody, InFlight, ProxyBody, UpstreamBody};
use client::Outcome;
use error::ProxyError;
use observe::{Finish, Observe};
use remora_control_api::identity::SpiffeId;

use crate::telemetry::trace::Traceparent;
use crate::telemetry::{self, RequestStats};

/// The HTTP version a downstream connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerVersion {
    /// HTTP/1.1 (and 1.0).
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

/// hyper server settings with every limit applied, built once.
#[derive(Debug)]
pub struct ServerSettings {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        let mut h1 = http1::Builder::new();
        // The coarse timer: hyper arms the header-read timeout on every request (see `timer`). The
        // timeout itself is the listener's, set per connection in `serve`.
        h1.timer(CoarseTimer)
            .header_read_timeout(limits::DEFAULT_HEADER_TIMEOUT)
            .max_header_size(limits::MAX_HEADER_BYTES)
            .max_buf_size(limits::H1_MAX_BUF_SIZE)
            // A client that shuts down its sending side after the request still gets its response.
            .half_close(true)
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(limits::H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(limits::H2_MAX_HEADER_LIST_SIZE)
            .max_pending_accept_reset_streams(limits::H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(limits::H2_MAX_LOCAL_ERROR_RESET_STREAMS)
            .initial_stream_window_size(limits::H2_STREAM_WINDOW)
            .initial_connection_window_size(limits::H2_CONNECTION_WINDOW)
            .max_send_buf_size(limits::H2_MAX_SEND_BUF_SIZE);
        ServerSettings { http1: h1, http2: h2 }
    }
}

/// One downstream HTTP connection, shared by its requests and any tunnel made from it. It counts as
/// open (for drain and the active-connections gauge) until the last of them is done.
#[derive(Debug)]
pub struct HttpConnection {
    /// Process-wide state: the live snapshot, drain, settings.
    pub data: Arc<DataPath>,
    /// The listener's config as of accept: name, counters, idle timeout.
    pub listener: Arc<ListenerConfig>,
    /// Where the client was going, for transparent listeners.
    pub original_destination: Option<SocketAddr>,
    /// The client's address.
    pub peer: SocketAddr,
    /// Bytes moved on the connection.
    pub meter: Arc<Meter>,
    /// Keeps the connection counted as open.
    pub open: Open,
    /// The peer sidecar's identity, when the connection is mesh mTLS.
    pub peer_identity: Option<SpiffeId>,
    /// The same, as the value of the `x-remora-client-identity` header the app is given.
    pub peer_header: Option<http::HeaderValue>,
    /// The destination port authorization policies judge by: the original destination's, else the
    /// listener socket's own.
    pub destination_port: u16,
}

/// Serves one HTTP connection until it ends. `stream` replays whatever detection read.
pub async fn serve(stream: DownstreamStream, version: ServerVersion, connection: Arc<HttpConnection>) {
    let service = {
        let connection = connection.clone();
        service_fn(move |request| proxy(request, connection.clone()))
    };
    let io = TokioIo::new(stream);
    let settings = &connection.data.server;
    match version {
        ServerVersion::Http1 => {
            let mut http1 = settings.http1.clone();
            http1.header_read_timeout(connection.listener.header_timeout);
            let served = http1.serve_connection(io, service).with_upgrades();
            drive(served, |c| c.graceful_shutdown(), &connection).await;
        }
        ServerVersion::Http2 => {
            let served = settings.http2.serve_connection(io, service);
            drive(served, |c| c.graceful_shutdown(), &connection).await;
        }
    }
}

/// Runs a server connection to its end, asking it to finish gracefully (`shut_down`) when draining
/// starts, and closing it if it sits idle past the listener's idle timeout. The drain signal and the
/// idle timer are only polled when they wake (`io::watch`), not on every request.
async fn drive<C>(connection: C, shut_down: impl Fn(Pin<&mut C>), http: &HttpConnection)
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    enum Event {
        Drain,
        Idle,
    }
    let mut drain = http.data.drain.watch();
    let idle = idle_watch(&http.meter, &http.listener.stats, http.listener.idle_timeout);
    tokio::pin!(connection, idle);
    let mut draining = false;
    loop {
        let already_draining = draining;
        let watchers = async {
            if already_draining {
                (&mut idle).await;
                return Event::Idle;
            }
            tokio::select! {
                () = drain.signaled() => Event::Drain,
                () = &mut idle => Event::Idle,
            }
        };
        tokio::pin!(watchers);
        match io::watch(connection.as_mut(), watchers).await {
            Watched::Main(result) => {
                if let Err(error) = result {
                    debug!(listener = %http.listener.name, %error, "http connection ended with an error");
                }
                return;
            }
            Watched::Side(Event::Drain) => {
                draining = true;
                shut_down(connection.as_mut());
            }
            Watched::Side(Event::Idle) => {
                debug!(listener = %http.listener.name, "http connection idle timeout");
                return;
            }
        }
    }
}

/// One request through every phase; always yields a response.
///
/// Phases 1 to 3 run synchronously in [`plan`]; on the plain path the only await is the exchange
/// with the endpoint, called directly rather than through layers of `async fn`, because every layer
/// would carry its own copy of the request in this future (which hyper moves, and for HTTP/2
/// spawns, per request).
async fn proxy(
    mut request: Request<Incoming>,
    connection: Arc<HttpConnection>,
) -> Result<Response<ProxyBody>, Infallible> {
    let arrived = Instant::now();
    let (observe, unsampled) = observe::begin(&mut request, &connection);
    let grpc = observe::is_grpc(request.headers());
    let mut routed = None;
    let result = match plan(&mut request, &connection, &mut routed, observe.as_ref(), unsampled, arrived) {
        Err(error) => Err(error),
        Ok(Plan::Connect(cluster)) => {
            // Boxed in its own statement (see `client::send_http2`): rare, and large.
            let tunnel = Box::pin(tunnel::connect(request, &cluster, &connection));
            tunnel.await
        }
        Ok(Plan::Abort { status, delay }) => {
            tokio::time::sleep(delay).await;
            Err(ProxyError::FaultInjected(status))
        }
        Ok(Plan::Policed(policed)) => {
            // Boxed in its own statement: only routes with a policy come this way.
            let policed = Box::pin(forward::policed(request, policed, &connection));
            policed.await
        }
        Ok(Plan::Forward(Forward {
            cluster,
            endpoint,
            version,
            upgrade,
            downstream_upgrade,
            attempt,
            traceparent,
        })) => {
            // Phase 4, connect and send.
            let outcome = match version {
                client::Version::Http1 if cluster.mesh.is_some() => {
                    let request = request.map(|body| UpstreamBody::Direct(ClientBody::new(body, observe.as_ref())));
                    // Boxed in its own statement (see `client::send_http2`): rare.
                    let sending =
                        Box::pin(client::send_mesh_upgrade(&connection.data.client, &cluster, endpoint, request));
                    sending.await
                }
                client::Version::Http1 => {
                    let (parts, body) = request.into_parts();
                    let head = Outgoing { parts, traceparent };
                    let body = UpstreamBody::Direct(ClientBody::new(body, observe.as_ref()));
                    client::send_http1(&cluster, endpoint, head, body, upgrade).await
                }
                client::Version::Http2 => {
                    let request = request.map(|body| UpstreamBody::Direct(ClientBody::new(body, observe.as_ref())));
                    let sending = Box::pin(client::send_http2(&connection.data.client, &cluster, endpoint, request));
                    sending.await
                }
            };
            match outcome {
                Ok(outcome) => respond(outcome, &cluster, downstream_upgrade, &connection, attempt),
                Err(error) => {
                    let mut attempt = attempt;
                    attempt.failed(&cluster, &error);
                    Err(error)
                }
            }
        }
    };
    let response = result.unwrap_or_else(|error| {
        debug!(listener = %connection.listener.name, %error, "request failed");
        error.to_response()
    });
    // Phase 6, record (the listener's and the route's part; the rest when the body ends).
    let status = response.status().as_u16();
    connection.listener.stats.record_response(status);
    if let Some(stats) = &routed {
        stats.record(status, arrived.elapsed());
    }
    if observe.is_none() && !grpc {
        return Ok(response);
    }
    let finish = Finish::new(observe, &connection, routed.as_ref(), grpc, status, response.headers(), arrived);
    Ok(response.map(|body| body.finish(finish)))
}

/// What the data path keeps of one attempt on an endpoint: what outlier detection and the ewma
/// balancer learn from it, what counts it in flight, and its span when the request is traced.
#[derive(Debug)]
pub(crate) struct Attempt {
    /// The endpoint, when the cluster observes outcomes.
    observed: Option<Arc<EndpointState>>,
    started: Instant,
    in_flight: InFlight,
}

impl Attempt {
    /// Starts an attempt, at `started`, on `picked` for `cluster`, holding the breaker slot `slot`;
    /// counted by `observe` if something observes the request.
    fn start(
        cluster: &Cluster,
        picked: &Picked<'_>,
        slot: Option<crate::policy::breaker::Slot>,
        observe: Option<(&Observe, &HttpConnection)>,
        started: Instant,
    ) -> Attempt {
        let span = observe.and_then(|(observe, connection)| observe.attempt(connection, &cluster.name, picked.address));
        let Some(member) = picked.member else {
            return Attempt { observed: None, started, in_flight: InFlight { active: None, slot, span } };
        };
        Attempt {
            observed: cluster.observes.then(|| member.state.clone()),
            started,
            in_flight: InFlight { active: cluster.counts_active.then(|| member.state.start()), slot, span },
        }
    }

    /// The trace headers this attempt sends, when the request is traced.
    fn trace_headers(&self) -> Option<Vec<(http::header::HeaderName, http::HeaderValue)>> {
        self.in_flight.span.as_ref().map(|span| span.headers())
    }

    /// Records a response with `status`.
    fn observe_response(&mut self, cluster: &Cluster, status: u16) {
        // One clock read serves the histogram and the balancer's estimate.
        let ended = Instant::now();
        cluster.stats.attempt_duration.observe(ended.saturating_duration_since(self.started));
        if let Some(endpoint) = &self.observed {
            cluster.observe(endpoint, Observed::from_status(status), self.started, ended);
        }
        if let Some(span) = &mut self.in_flight.span {
            span.set_status(status);
        }
    }

    /// What keeps the request in flight until its response body is done.
    fn into_in_flight(self) -> InFlight {
        self.in_flight
    }

    /// Records a failure, if it says something about the endpoint.
    fn failed(&mut self, cluster: &Cluster, error: &ProxyError) {
        if let Some(span) = &mut self.in_flight.span {
            span.set_error(error.status_and_reason().1);
        }
        let endpoint_failed = matches!(
            error,
            ProxyError::Connect(_)
                | ProxyError::Mesh(_)
                | ProxyError::Upstream(_)
                | ProxyError::PerTryTimeout(_)
                | ProxyError::RequestTimeout(_)
                | ProxyError::Http1(h1::Error::Io(_) | h1::Error::Closed | h1::Error::Protocol(_))
        );
        if endpoint_failed && let Some(endpoint) = &self.observed {
            cluster.observe(endpoint, Observed::NoResponse, self.started, Instant::now());
        }
    }
}

/// A prepared request's destination.
struct Forward {
    cluster: Arc<Cluster>,
    endpoint: SocketAddr,
    version: client::Version,
    upgrade: bool,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    attempt: Attempt,
    /// A new unsampled trace's context, written after the head's fields (HTTP/1.1).
    traceparent: Option<Traceparent>,
}

/// An HTTP/1.1 request head on the plain path, with the `traceparent` of a new unsampled trace
/// written after its fields rather than inserted into them (the insert, and the header value's
/// allocation, would cost more than the request's share of sampled traces).
struct Outgoing {
    parts: http::request::Parts,
    traceparent: Option<Traceparent>,
}

impl h1::Head for Outgoing {
    fn method(&self) -> &Method {
        &self.parts.method
    }

    fn uri(&self) -> &http::Uri {
        &self.parts.uri
    }

    fn headers(&self) -> &http::HeaderMap {
        &self.parts.headers
    }

    fn write_extra(&self, out: &mut bytes::BytesMut) {
        if let Some(traceparent) = &self.traceparent {
            h1::write_field(out, b"traceparent", traceparent.as_bytes());
        }
    }
}

/// What to do with a request, decided before any await.
enum Plan {
    /// Open a `CONNECT` tunnel through this cluster.
    Connect(Arc<Cluster>),
    /// Send the (prepared) request to this endpoint.
    Forward(Forward),
    /// Forward under the route's policy (`forward`).
    Policed(forward::Policed),
    /// Fail with an injected status after an injected delay.
    Abort { status: u16, delay: std::time::Duration },
}

/// Phases 1 to 3. Route: resolved entirely from one snapshot load, before any await, so a config
/// swap can never change a request half-way. Balance: the cluster's next endpoint, within its
/// breakers. Prepare: the request reshaped, in place, for the endpoint's version.
/// `routed` receives the counters of the route (and cluster) that took the request.
fn plan(
    request: &mut Request<Incoming>,
    connection: &HttpConnection,
    routed: &mut Option<Arc<RequestStats>>,
    observe: Option<&Arc<Observe>>,
    unsampled: Option<Traceparent>,
    arrived: Instant,
) -> Result<Plan, ProxyError> {
    // Route.
    let (cluster, policy) = {
        let snapshot = connection.data.snapshot.load();
        let listener = snapshot.listener(&connection.listener.name).ok_or(ProxyError::ListenerRemoved)?;
        match listener.routes.for_http(headers::authority(request), connection.original_destination) {
            Some(table) => {
                let route =
                    table.route(request.method(), request.uri(), request.headers()).ok_or(ProxyError::NoRoute)?;
                authorize(listener, connection, Some((&table.name, &route.name)))?;
                let backend = route.pick_backend().ok_or(ProxyError::NoRoute)?;
                *routed = Some(backend.stats.for_direction(listener.direction.label()).clone());
                (backend.cluster.clone(), route.policy.clone())
            }
            None => {
                authorize(listener, connection, None)?;
                let cluster = listener.default_cluster.clone().ok_or(ProxyError::NoRoute)?;
                routed.clone_from(&listener.default_stats);
                (cluster, None)
            }
        }
    };
    // An inbound request tells the app who called: the mesh peer's proven identity, and never a
    // value the caller wrote itself.
    if connection.listener.direction == Direction::Inbound {
        let headers = request.headers_mut();
        headers.remove(&headers::CLIENT_IDENTITY);
        if let Some(identity) = &connection.peer_header {
            headers.insert(headers::CLIENT_IDENTITY.clone(), identity.clone());
        }
    }
    // Admit, by the route's policy.
    let mut delay = None;
    if let Some(policy) = &policy {
        match policy.admit(arrived) {
            Admission::Forward { delay: injected } => delay = injected,
            Admission::RateLimited(wait) => return Err(ProxyError::RateLimited(wait)),
            Admission::Abort { status, delay: None } => return Err(ProxyError::FaultInjected(status)),
            Admission::Abort { status, delay: Some(delay) } => return Ok(Plan::Abort { status, delay }),
        }
    }
    let upgrade = headers::is_upgrade(request);
    if request.method() == Method::CONNECT {
        return Ok(Plan::Connect(cluster));
    }
    let downstream_version = request.version();
    let version = upstream_version(&cluster, downstream_version, upgrade);
    // An upgrade to a mesh cluster takes a connection of its own (hyper's client, not ours) and
    // is never retried: it skips the policed path, its delays and timeouts.
    let mesh_upgrade = upgrade && cluster.mesh.is_some();
    let policed = policy.filter(|p| !mesh_upgrade && (delay.is_some() || p.forwards()));
    // A new unsampled trace's context: written by the plain HTTP/1.1 path itself, inserted for
    // the others.
    let traceparent = match unsampled {
        Some(value) if policed.is_some() || version == client::Version::Http2 || mesh_upgrade => {
            request.headers_mut().insert(telemetry::trace::TRACEPARENT, value.to_header_value());
            None
        }
        other => other,
    };
    if let Some(policy) = policed {
        // Prepared once for all attempts. The endpoint only fills in a missing HTTP/2 authority;
        // before any is picked, the original destination (or the listener) stands in.
        let host_fallback = connection.original_destination.unwrap_or(connection.listener.address);
        headers::prepare_request(request, version, host_fallback, upgrade);
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut *request));
        return Ok(Plan::Policed(forward::Policed {
            cluster,
            policy,
            observe: observe.cloned(),
            delay,
            version,
            downstream_version,
            upgrade,
            downstream_upgrade,
            arrived,
        }));
    }
    // Balance.
    let picked = cluster
        .pick(connection.original_destination, Some(request.headers()), Some(connection.peer), &[])
        .ok_or_else(|| no_endpoint(&cluster))?;
    let slot = cluster.breakers.request(&cluster.stats).map_err(|b| ProxyError::Overflow(cluster.name.clone(), b))?;
    let endpoint = picked.address;
    let attempt = Attempt::start(&cluster, &picked, slot, observe.map(|o| (&**o, connection)), arrived);
    // Prepare.
    headers::prepare_request(request, version, endpoint, upgrade);
    if let Some(trace) = attempt.trace_headers() {
        request.headers_mut().extend(trace);
    }
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut *request));
    Ok(Plan::Forward(Forward { cluster, endpoint, version, upgrade, downstream_upgrade, attempt, traceparent }))
}

/// The per-request half of an inbound listener's authorization: a request from an mTLS peer on a
/// port a policy covers must be allowed by the policy, for the route it took (`route`: table and
/// route names), or the policy as a whole. Plaintext was judged when the connection was accepted.
fn authorize(
    listener: &ListenerConfig,
    connection: &HttpConnection,
    route: Option<(&str, &str)>,
) -> Result<(), ProxyError> {
    let (Some(peer), Some(authz)) = (&connection.peer_identity, &listener.authz) else {
        return Ok(());
    };
    let Some(policy) = authz.for_port(connection.destination_port) else { return Ok(()) };
    let allowed = match route {
        Some((table, route)) => policy.allows_route(table, route, peer.as_str()),
        None => policy.allows(peer.as_str()),
    };
    if allowed {
        return Ok(());
    }
    policy.counters.denied.inc();
    let (table, route) = route.unwrap_or_default();
    info!(listener = %listener.name, policy = %policy.name, peer = %peer, route_table = table, route, "request denied by authorization policy");
    Err(ProxyError::Unauthorized { policy: policy.name.clone(), peer: peer.to_string() })
}

/// The version to speak to `cluster`, for a request in `downstream` version: a mesh cluster gets
/// HTTP/2, but for upgrades (HTTP/1.1 inside mesh TLS), others what their protocol says.
fn upstream_version(cluster: &Cluster, downstream: http::Version, upgrade: bool) -> client::Version {
    if cluster.mesh.is_some() && !upgrade {
        return client::Version::Http2;
    }
    match (cluster.protocol, upgrade) {
        // Protocol switches exist only in HTTP/1.1.
        (_, true) | (UpstreamProtocol::Http1, false) => client::Version::Http1,
        (UpstreamProtocol::Http2, false) => client::Version::Http2,
        (UpstreamProtocol::Auto, false) if downstream == http::Version::HTTP_2 => client::Version::Http2,
        (UpstreamProtocol::Auto, false) => client::Version::Http1,
    }
}

/// The error for a cluster with nothing to send to.
fn no_endpoint(cluster: &Cluster) -> ProxyError {
    match cluster.targets {
        Targets::OriginalDestination => ProxyError::NoOriginalDestination(cluster.name.clone()),
        Targets::Endpoints(_) => ProxyError::NoEndpoint(cluster.name.clone()),
    }
}

/// Phase 5, respond, and the cluster's part of phase 6.
fn respond(
    outcome: Outcome,
    cluster: &Cluster,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    connection: &Arc<HttpConnection>,
    attempt: Attempt,
) -> Result<Response<ProxyBody>, ProxyError> {
    match (outcome, downstream_upgrade) {
        (Outcome::Response(response), _) => {
            let mut attempt = attempt;
            let status = response.status().as_u16();
            cluster.stats.record_response(status);
            attempt.observe_response(cluster, status);
            let in_flight = attempt.into_in_flight();
            Ok(response.map(|body| body.hold(in_flight)))
        }
        (Outcome::Switched(head, upstream, early), Some(downstream)) => {
            let mut attempt = attempt;
            let status = head.status().as_u16();
            cluster.stats.record_response(status);
            attempt.observe_response(cluster, status);
            tunnel::relay_upgrade(downstream, upstream, early, connection.clone());
            let mut response = head.map(|()| ProxyBody::empty());
            headers::strip_hop_by_hop(response.headers_mut(), true);
            Ok(response)
        }
        (Outcome::Switched(..), None) => Err(ProxyError::Http1(h1::Error::UnexpectedSwitch)),
    }
}
