//! One upstream attempt, from choosing its endpoint to settling how it went: written once, for the
//! plain path, the retry loop and mirroring alike, and the only caller of the upstream client.
//!
//! 1. **pick** ([`pick`]): the cluster's next endpoint (avoiding those already tried), within its
//!    `max_requests` breaker. The [`Attempt`] starts counting from here: in flight on its endpoint
//!    (least request, ewma), in the breaker, and as a client span when the request is traced.
//! 2. **prepare**: the head is made ready for the endpoint's version once, when the request is
//!    planned (`headers::prepare_request`); each attempt adds only its own trace headers
//!    ([`AttemptHead`]), written after the kept head's fields rather than copied into them.
//! 3. **send** ([`send`]): by version, mesh or not — HTTP/1.1 through the proxy's own client on a
//!    pooled connection, HTTP/2 through hyper's on this worker's connection to the endpoint, and to
//!    a mesh cluster HTTP/2 (or an upgrade's HTTP/1.1) inside mTLS to the endpoint's sidecar, or
//!    with `http_over_hbone` the cluster's own protocol inside HBONE tunnels. The
//!    returned [`Sending`] is the client's own future, unboxed for HTTP/1.1. The plain path calls
//!    the per-version functions ([`send_http1`], [`send_http2`], [`send_mesh_http1`]) itself, the
//!    same dispatch spelled out in `http::proxy`: a `Sending` returned and then awaited there would
//!    copy the HTTP/1.1 exchange once more, about 140 instructions a request under callgrind.
//! 4. **settle** ([`Attempt::record`], [`Attempt::respond`]): a response's status on the cluster's
//!    counters, its latency in the cluster's histogram, the outcome on the endpoint (outlier
//!    detection, ewma), the span's status; a failure that blames the endpoint counts against it.
//!    What counts the attempt in flight (its breaker slot, its endpoint's active count, its span)
//!    rides on the response body and is released when the body ends — or at once, on failure.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, Uri};
use pin_project_lite::pin_project;

use super::body::{InFlight, ProxyBody, UpstreamBody};
use super::client::{self, ClientSettings, Outcome, Version};
use super::error::ProxyError;
use super::observe::Observe;
use super::server::{HttpConnection, Origin};
use super::{h1, headers, tunnel};
use crate::balance::{EndpointState, Observed};
use crate::policy::breaker::Slot;
use crate::state::cluster::{Cluster, Picked, Targets, UpstreamProtocol};
use crate::telemetry::trace::Traceparent;

/// What the data path keeps of one attempt on an endpoint: what outlier detection and the ewma
/// balancer learn from it, what counts it in flight, and its span when the request is traced.
#[derive(Debug)]
pub(crate) struct Attempt {
    /// The endpoint, when the cluster observes outcomes.
    observed: Option<Arc<EndpointState>>,
    started: Instant,
    in_flight: InFlight,
}

/// Picks an endpoint of `cluster` for an attempt starting at `at`, avoiding `tried` where it can
/// (the connection's `origin` and the request's `headers` give ring hash its key), within the
/// cluster's `max_requests` breaker. The attempt is counted by `observe` when something observes
/// the request.
pub(crate) fn pick(
    cluster: &Cluster,
    origin: &Origin,
    headers: &HeaderMap,
    tried: &[SocketAddr],
    at: Instant,
    observe: Option<(&Observe, &HttpConnection)>,
) -> Result<(SocketAddr, Attempt), ProxyError> {
    let picked = cluster
        .pick(origin.original_destination, Some(headers), Some(origin.peer), tried)
        .ok_or_else(|| no_endpoint(cluster))?;
    let slot = cluster
        .breakers
        .request(&cluster.stats.breakers)
        .map_err(|breaker| ProxyError::Overflow(cluster.name.clone(), breaker))?;
    Ok((picked.address, Attempt::start(cluster, &picked, slot, observe, at)))
}

/// The error for a cluster with nothing to send to.
pub(crate) fn no_endpoint(cluster: &Cluster) -> ProxyError {
    match cluster.targets {
        Targets::OriginalDestination => ProxyError::NoOriginalDestination(cluster.name.clone()),
        Targets::Endpoints(_) => ProxyError::NoEndpoint(cluster.name.clone()),
    }
}

/// The version to speak to `cluster`, for a request in `downstream` version: a mesh cluster of
/// Remora sidecars gets HTTP/2, but for upgrades (HTTP/1.1 inside mesh TLS), others (HBONE peers
/// with `http_over_hbone` too) what their protocol says.
pub(crate) fn version_for(cluster: &Cluster, downstream: http::Version, upgrade: bool) -> Version {
    if cluster.mesh.as_ref().is_some_and(|peers| !peers.http_over_hbone) && !upgrade {
        return Version::Http2;
    }
    match (cluster.protocol, upgrade) {
        // Protocol switches exist only in HTTP/1.1.
        (_, true) | (UpstreamProtocol::Http1, false) => Version::Http1,
        (UpstreamProtocol::Http2, false) => Version::Http2,
        // A multiplexed downstream (HTTP/2, HTTP/3) is multiplexed upstream: trailers and all.
        (UpstreamProtocol::Auto, false) if downstream >= http::Version::HTTP_2 => Version::Http2,
        (UpstreamProtocol::Auto, false) => Version::Http1,
    }
}

/// A head an attempt can send: read in place by the HTTP/1.1 client, or made into a request for
/// hyper's HTTP/2 client.
pub(crate) trait Head: h1::Head {
    /// The head as a request with `body`.
    fn into_request(self, body: UpstreamBody) -> Request<UpstreamBody>;
}

impl Head for http::request::Parts {
    fn into_request(self, body: UpstreamBody) -> Request<UpstreamBody> {
        Request::from_parts(self, body)
    }
}

/// The plain path's head: the request's own, with the `traceparent` of a new unsampled trace
/// written after its fields rather than inserted into them (the insert, and the header value's
/// allocation, would cost more than the request's share of sampled traces).
pub(crate) struct Outgoing {
    pub(crate) parts: http::request::Parts,
    pub(crate) traceparent: Option<Traceparent>,
}

impl h1::Head for Outgoing {
    fn method(&self) -> &Method {
        &self.parts.method
    }

    fn uri(&self) -> &Uri {
        &self.parts.uri
    }

    fn headers(&self) -> &HeaderMap {
        &self.parts.headers
    }

    fn write_extra(&self, out: &mut bytes::BytesMut) {
        if let Some(traceparent) = &self.traceparent {
            h1::write_field(out, b"traceparent", traceparent.as_bytes());
        }
    }
}

impl Head for Outgoing {
    fn into_request(self, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut request = Request::from_parts(self.parts, body);
        if let Some(traceparent) = self.traceparent {
            request.headers_mut().insert(crate::telemetry::trace::TRACEPARENT, traceparent.to_header_value());
        }
        request
    }
}

/// A request's head, kept to build each attempt's (and a mirrored copy's) request from.
pub(crate) struct Template {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) version: http::Version,
    pub(crate) headers: HeaderMap,
}

impl Template {
    /// The head of `parts`, kept.
    pub(crate) fn new(parts: http::request::Parts) -> Template {
        Template { method: parts.method, uri: parts.uri, version: parts.version, headers: parts.headers }
    }

    /// A request with a copy of this head and `body`.
    pub(crate) fn request(&self, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// An attempt's head: the kept one, read in place, with the attempt's own trace headers when the
/// request is traced. An HTTP/1.1 attempt costs no copy of the head.
pub(crate) struct AttemptHead<'a> {
    pub(crate) template: &'a Template,
    pub(crate) trace: Option<Vec<(HeaderName, HeaderValue)>>,
}

impl h1::Head for AttemptHead<'_> {
    fn method(&self) -> &Method {
        &self.template.method
    }

    fn uri(&self) -> &Uri {
        &self.template.uri
    }

    fn headers(&self) -> &HeaderMap {
        &self.template.headers
    }

    fn write_extra(&self, out: &mut bytes::BytesMut) {
        for (name, value) in self.trace.iter().flatten() {
            h1::write_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

impl Head for AttemptHead<'_> {
    fn into_request(self, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut request = self.template.request(body);
        if let Some(trace) = self.trace {
            request.headers_mut().extend(trace);
        }
        request
    }
}

pin_project! {
    /// A request on its way to an endpoint, until its response head arrives: the upstream client's
    /// own future. HTTP/1.1's runs inline (it is the common case, and the smaller); the others are
    /// boxed, so they do not make every HTTP/1.1 request's future as large as theirs.
    #[project = SendingProjection]
    pub(crate) enum Sending<H1, H2, Upgrade> {
        /// The proxy's own HTTP/1.1 client.
        Http1 { #[pin] exchange: H1 },
        /// hyper's HTTP/2 client (plaintext, or mesh mTLS).
        Http2 { exchange: Pin<Box<H2>> },
        /// HTTP/1.1 to a mesh cluster: an upgrade inside mTLS, on a connection of its own, or any
        /// request inside an HBONE tunnel (`http_over_hbone`).
        MeshHttp1 { exchange: Pin<Box<Upgrade>> },
    }
}

impl<H1, H2, Upgrade> Future for Sending<H1, H2, Upgrade>
where
    H1: Future<Output = Result<Outcome, ProxyError>>,
    H2: Future<Output = Result<Outcome, ProxyError>>,
    Upgrade: Future<Output = Result<Outcome, ProxyError>>,
{
    type Output = Result<Outcome, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            SendingProjection::Http1 { exchange } => exchange.poll(cx),
            SendingProjection::Http2 { exchange } => exchange.as_mut().poll(cx),
            SendingProjection::MeshHttp1 { exchange } => exchange.as_mut().poll(cx),
        }
    }
}

/// HTTP/1.1 to `endpoint` of `cluster`, through the proxy's own client: its future, unwrapped, for
/// the plain path to await inline. `dedicated` asks for a connection of its own (an upgrade).
pub(crate) fn send_http1<'a, H: h1::Head + Send + 'a>(
    cluster: &'a Cluster,
    endpoint: SocketAddr,
    head: H,
    body: UpstreamBody,
    dedicated: bool,
) -> impl Future<Output = Result<Outcome, ProxyError>> + Send + 'a {
    client::send_http1(cluster, endpoint, head, body, dedicated)
}

/// HTTP/2 to `endpoint` of `cluster` (inside mTLS to its sidecar for a mesh cluster), on this
/// worker's connection to it. Large: callers box it.
pub(crate) fn send_http2<'a>(
    cluster: &'a Cluster,
    settings: &'a ClientSettings,
    endpoint: SocketAddr,
    request: Request<UpstreamBody>,
) -> impl Future<Output = Result<Outcome, ProxyError>> + Send + 'a {
    client::send_http2(settings, cluster, endpoint, request)
}

/// HTTP/1.1 to a mesh cluster: an upgrade inside mTLS to the endpoint's sidecar, on a connection
/// of its own, or with `http_over_hbone` any request inside an HBONE tunnel. Callers box it.
pub(crate) fn send_mesh_http1<'a>(
    cluster: &'a Cluster,
    settings: &'a ClientSettings,
    endpoint: SocketAddr,
    request: Request<UpstreamBody>,
) -> impl Future<Output = Result<Outcome, ProxyError>> + Send + 'a {
    client::send_mesh_http1(settings, cluster, endpoint, request)
}

/// Sends `head` with `body` to `endpoint` of `cluster` in `version` (see the module documentation).
/// `upgrade` asks HTTP/1.1 for a connection of its own, which the upgrade will take over; to a
/// mesh cluster of Remora sidecars an HTTP/1.1 request is always an upgrade (everything else goes
/// as HTTP/2).
pub(crate) fn send<'a, H: Head + Send + 'a>(
    cluster: &'a Cluster,
    settings: &'a ClientSettings,
    endpoint: SocketAddr,
    version: Version,
    head: H,
    body: UpstreamBody,
    upgrade: bool,
) -> Sending<
    impl Future<Output = Result<Outcome, ProxyError>> + Send + 'a,
    impl Future<Output = Result<Outcome, ProxyError>> + Send + 'a,
    impl Future<Output = Result<Outcome, ProxyError>> + Send + 'a,
> {
    match version {
        Version::Http1 if cluster.mesh.is_some() => {
            let request = head.into_request(body);
            Sending::MeshHttp1 { exchange: Box::pin(send_mesh_http1(cluster, settings, endpoint, request)) }
        }
        Version::Http1 => Sending::Http1 { exchange: send_http1(cluster, endpoint, head, body, upgrade) },
        Version::Http2 => {
            let request = head.into_request(body);
            Sending::Http2 { exchange: Box::pin(send_http2(cluster, settings, endpoint, request)) }
        }
    }
}

impl Attempt {
    /// Starts an attempt, at `started`, on `picked` for `cluster`, holding the breaker slot `slot`;
    /// counted by `observe` if something observes the request.
    fn start(
        cluster: &Cluster,
        picked: &Picked<'_>,
        slot: Option<Slot>,
        observe: Option<(&Observe, &HttpConnection)>,
        started: Instant,
    ) -> Attempt {
        let span = observe.and_then(|(observe, connection)| observe.attempt(connection, &cluster.name, picked.address));
        let Some(member) = picked.member else {
            return Attempt { observed: None, started, in_flight: InFlight { active: None, slot, span } };
        };
        // (A balancer's state is made by the first request to the endpoint.)
        let state = if cluster.observes || cluster.counts_active { member.state.shared() } else { None };
        let active = state.as_ref().filter(|_| cluster.counts_active).map(|state| state.start());
        Attempt { observed: state.filter(|_| cluster.observes), started, in_flight: InFlight { active, slot, span } }
    }

    /// The trace headers this attempt sends, when the request is traced.
    pub(crate) fn trace_headers(&self) -> Option<Vec<(HeaderName, HeaderValue)>> {
        self.in_flight.span.as_ref().map(|span| span.headers())
    }

    /// Records how the attempt ended on `cluster`'s counters and its endpoint: a response's status
    /// and latency, or a failure that blames the endpoint. A switched protocol is recorded by
    /// [`Attempt::respond`], which relays it.
    pub(crate) fn record(&mut self, cluster: &Cluster, result: &Result<Outcome, ProxyError>) {
        match result {
            Ok(Outcome::Response(response)) => self.responded(cluster, response.status().as_u16()),
            Ok(Outcome::Switched(..)) => {}
            Err(error) => self.failed(cluster, error),
        }
    }

    /// Settles an attempt whose outcome stands and makes the client's answer of it: a response
    /// keeps the attempt in flight until its body ends; a `101` joins the client's connection to
    /// the endpoint's (`tunnel`), if the client asked for an upgrade (`downstream_upgrade`).
    pub(crate) fn respond(
        mut self,
        cluster: &Cluster,
        result: Result<Outcome, ProxyError>,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
        connection: &Arc<HttpConnection>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        match (result, downstream_upgrade) {
            (Ok(Outcome::Response(mut response)), _) => {
                self.responded(cluster, response.status().as_u16());
                response.body_mut().hold(self.in_flight);
                Ok(response)
            }
            (Ok(Outcome::Switched(head, upstream, early)), Some(downstream)) => {
                self.responded(cluster, head.status().as_u16());
                tunnel::relay_upgrade(downstream, upstream, early, connection.clone());
                let mut response = head.map(|()| ProxyBody::empty());
                headers::strip_hop_by_hop(response.headers_mut(), true);
                Ok(response)
            }
            (Ok(Outcome::Switched(..)), None) => Err(ProxyError::Http1(h1::Error::UnexpectedSwitch)),
            (Err(error), _) => {
                self.failed(cluster, &error);
                Err(error)
            }
        }
    }

    /// The client's answer from an attempt already recorded ([`Attempt::record`]), when no retry
    /// may follow it.
    pub(crate) fn give_up(self, result: Result<Outcome, ProxyError>) -> Result<Response<ProxyBody>, ProxyError> {
        match result {
            Ok(Outcome::Response(mut response)) => {
                response.body_mut().hold(self.in_flight);
                Ok(response)
            }
            Ok(Outcome::Switched(..)) => Err(ProxyError::Http1(h1::Error::UnexpectedSwitch)),
            Err(error) => Err(error),
        }
    }

    /// Records a response with `status`.
    fn responded(&mut self, cluster: &Cluster, status: u16) {
        cluster.stats.record_response(status);
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

    /// Records a failure: on the span, and on the endpoint if the failure blames it.
    fn failed(&mut self, cluster: &Cluster, error: &ProxyError) {
        if let Some(span) = &mut self.in_flight.span {
            span.set_error(error.status_and_reason().1);
        }
        if let (Some(endpoint), Some(observed)) = (&self.observed, Observed::from_failure(error.failure())) {
            cluster.observe(endpoint, observed, self.started, Instant::now());
        }
    }
}
