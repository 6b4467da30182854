//! Upstream HTTP connections, pooled per worker thread and per endpoint.
//!
//! A request enters [`send_http1`] or [`send_http2`] with its endpoint already chosen and leaves as
//! the endpoint's response, its body streaming (or, after `101 Switching Protocols`, as the
//! connection itself).
//!
//! Each worker thread runs one single-threaded runtime, so its pool is a plain thread-local: no lock,
//! no atomic, and a connection is only ever used by the thread that opened it.
//!
//! - HTTP/1.1 goes through [`h1`], the proxy's own client, which runs the exchange inside the
//!   request's task. Idle connections wait in a stack per endpoint (the most recently used is reused
//!   first: it is the least likely to have been closed by the server), up to
//!   `POOL_MAX_IDLE_PER_ENDPOINT`; the `POOL_WARM_PER_ENDPOINT` most recently used are closed after
//!   the cluster's idle timeout, the rest (what a burst leaves) after `POOL_SURPLUS_IDLE_TIMEOUT`.
//!   A connection comes back the moment its response ends.
//! - HTTP/2 goes through hyper's client: one multiplexed connection per endpoint per worker, opened
//!   by the first request that needs it while the others wait for it.
//! - A mesh cluster (`tls: mesh`) sends every request, whatever its version, as HTTP/2 inside
//!   mutual TLS to the endpoint's sidecar (`tls::MeshTls::connect`), on a pooled connection of its
//!   own, kept apart from plaintext HTTP/2 to the same address. The peer's proven identity is kept
//!   with the connection, and a cluster that expects someone else does not reuse it.
//! - HBONE tunnels ([`open_tunnel`]) are CONNECT streams on pooled HTTP/2 connections to the HBONE
//!   listener of the endpoint's host: as many connections as it takes to carry each at most
//!   `limits::HBONE_TUNNELS_PER_CONNECTION` tunnels at once (ztunnel's pool does the same), each
//!   tunnel holding its place on its connection until it is dropped.
//! - A mesh cluster with `http_over_hbone` (its endpoints speak HBONE but are not Remora sidecars:
//!   Istio's) sends HTTP in its own protocol inside tunnels: h2c on one tunnel per endpoint and
//!   worker, pooled like the rest; HTTP/1.1 through hyper's client, a tunnel per connection, the
//!   connections pooled per endpoint and each taken by one request at a time.
//!
//! A pooled connection can turn out to be dead (the server closed it while idle). When it fails
//! before the endpoint could have seen the request, the request is sent again on a fresh
//! connection; a request the endpoint may have acted on is never re-sent here.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use hyper::client::conn::{http1, http2};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tracing::debug;

use crate::http::body::{ProxyBody, UpstreamBody};
use crate::http::error::ProxyError;
pub use crate::http::settings::ClientSettings;
use crate::http::{h1, headers};
use crate::io::Held;
use crate::limits;
use crate::policy::breaker::Slot;
use crate::state::cluster::Cluster;
use crate::tls::{Alpn, TlsError};
use crate::{connect, timer};
use remora_control_api::identity::SpiffeId;

/// The HTTP version spoken to an endpoint for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge).
    Http2,
}

struct IdleConnection {
    /// Boxed for its whole life, so handing it between the pool, a request and a response body
    /// moves a pointer.
    connection: Box<h1::Connection>,
    expires: Instant,
    /// When it closes if it is among the endpoint's surplus (`limits::POOL_WARM_PER_ENDPOINT`).
    surplus_expires: Instant,
}

/// A pooled HTTP/2 connection, shared by this worker's requests (or tunnels).
type SharedHttp2 = Arc<Shared>;

#[derive(Default)]
struct Shared {
    /// The connection, once opened. The async mutex makes concurrent first requests wait for one
    /// connect instead of each opening a connection.
    slot: tokio::sync::Mutex<Option<Http2Connection>>,
    /// HBONE only: cloned by each tunnel open on it, or about to be (taken before its `CONNECT`
    /// is sent, so concurrent openers count each other). Read without the lock, so choosing a
    /// connection with room waits for nothing.
    tunnels: Arc<()>,
}

impl Shared {
    /// The tunnels open on it (or about to be).
    fn tunnels(&self) -> usize {
        Arc::strong_count(&self.tunnels) - 1
    }
}

struct Http2Connection {
    sender: http2::SendRequest<UpstreamBody>,
    expires: Instant,
    /// The peer sidecar's identity, on a mesh connection.
    peer: Option<SpiffeId>,
}

#[derive(Default)]
struct Pool {
    // foldhash: probed twice per request; randomly seeded, so endpoints chosen by a client (the
    // original destinations of a pass-through cluster) cannot be picked to collide.
    http1: foldhash::HashMap<SocketAddr, Vec<IdleConnection>>,
    /// Keyed by the address connected to and what the connection is.
    http2: foldhash::HashMap<(SocketAddr, Carrier), SharedHttp2>,
    /// To HBONE listeners (mutual TLS with ALPN `h2`, tunnels as CONNECT streams), by listener
    /// address: one connection, and another each time all of them carry as many tunnels as one may.
    hbone: foldhash::HashMap<SocketAddr, Vec<SharedHttp2>>,
    /// HTTP/1.1 inside HBONE tunnels (`http_over_hbone`), by endpoint: idle ones and ones a response
    /// is still streaming on, told apart by `is_ready`.
    tunnelled_http1: foldhash::HashMap<SocketAddr, Vec<TunnelledHttp1>>,
}

struct TunnelledHttp1 {
    sender: http1::SendRequest<UpstreamBody>,
    expires: Instant,
    /// The identity the HBONE connection under its tunnel proved.
    peer: Option<SpiffeId>,
}

/// What a pooled HTTP/2 connection for requests is, beside where it goes: the same address can be
/// reached either way, and each way gets a connection of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Carrier {
    /// h2c.
    Plain,
    /// HTTP/2 in mutual TLS to the endpoint's sidecar (ALPN `remora.h2`).
    Mesh,
    /// h2c inside an HBONE tunnel to the endpoint (`http_over_hbone`).
    Tunnelled,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

fn with_pool<R>(f: impl FnOnce(&mut Pool) -> R) -> Option<R> {
    // Fails only while the thread is being torn down; there is nothing to pool then.
    POOL.try_with(|pool| f(&mut pool.borrow_mut())).ok()
}

/// Takes an HTTP/1.1 connection back into this worker's pool, until it has been idle for its idle
/// timeout. Called by [`h1`] the moment a response ends on a reusable connection.
fn release_http1(connection: Box<h1::Connection>) {
    let now = timer::now();
    let expires = now + connection.idle_timeout();
    let surplus_expires = now + connection.idle_timeout().min(limits::POOL_SURPLUS_IDLE_TIMEOUT);
    with_pool(|pool| {
        let idle = pool.http1.entry(connection.endpoint()).or_default();
        if idle.len() < limits::POOL_MAX_IDLE_PER_ENDPOINT {
            idle.push(IdleConnection { connection, expires, surplus_expires });
        }
    });
}

/// What an endpoint sent back.
#[derive(Debug)]
pub enum Outcome {
    /// A response, its body streaming, its hop-by-hop headers already removed.
    Response(Response<ProxyBody>),
    /// `101 Switching Protocols` to an HTTP/1.1 upgrade: the response head, the connection, and the
    /// bytes the endpoint sent after the head.
    Switched(Response<()>, SwitchedStream, Bytes),
}

/// The endpoint's side of a switched protocol: the proxy's own HTTP/1.1 client's plaintext
/// connection (left), or the upgraded exchange inside mesh TLS to the endpoint's sidecar (right).
pub type SwitchedStream = Either<TcpStream, TokioIo<hyper::upgrade::Upgraded>>;

/// Sends the request `head` with `body` to `endpoint` over HTTP/1.1, reusing a pooled connection
/// when one is alive.
///
/// `dedicated` asks for a fresh connection that is never pooled (an `Upgrade` request takes the
/// connection over). The request must already be in origin form (see `headers`). A new connection
/// must fit the cluster's `max_connections` and `max_pending_requests` breakers.
pub async fn send_http1<H: h1::Head>(
    cluster: &Cluster,
    endpoint: SocketAddr,
    mut head: H,
    mut body: UpstreamBody,
    dedicated: bool,
) -> Result<Outcome, ProxyError> {
    loop {
        let pooled = if dedicated { None } else { checkout_http1(endpoint) };
        let reused = pooled.is_some();
        let connection = match pooled {
            Some(connection) => connection,
            None => {
                // Boxed in its own statement (see `send_http2`): connecting is the cold path.
                let connecting = Box::pin(connect(cluster, endpoint));
                let (stream, slot) = connecting.await?;
                Box::new(h1::Connection::new(stream, endpoint, cluster.idle_timeout, Some(slot)))
            }
        };
        let release = if dedicated { drop_connection } else { release_http1 };
        match h1::exchange(connection, head, body, reused, release).await {
            Ok(h1::Exchanged::Response(response)) => return Ok(Outcome::Response(response.map(ProxyBody::http1))),
            Ok(h1::Exchanged::Switched(head, stream, early)) => {
                return Ok(Outcome::Switched(head, Either::Left(stream), early));
            }
            Err(h1::Failure::Stale(unsent, unread)) => {
                debug!(%endpoint, "pooled connection was closed; sending on another");
                (head, body) = (unsent, unread);
            }
            Err(h1::Failure::Failed(error)) => return Err(ProxyError::Http1(error)),
        }
    }
}

fn drop_connection(_: Box<h1::Connection>) {}

/// Opens a connection to `endpoint` for `cluster`, within its breakers.
async fn connect(cluster: &Cluster, endpoint: SocketAddr) -> Result<(TcpStream, Slot), ProxyError> {
    within_breakers(cluster, async { Ok(connect::connect(endpoint, cluster.connect_timeout, &cluster.stats).await?) })
        .await
}

/// Opens a connection for `cluster` with `opening`, within its breakers: the request counts as
/// pending while it waits, and the connection holds a `max_connections` slot until it closes.
async fn within_breakers<T>(
    cluster: &Cluster,
    opening: impl Future<Output = Result<T, ProxyError>>,
) -> Result<(T, Slot), ProxyError> {
    let overflow = |breaker| ProxyError::Overflow(cluster.name.clone(), breaker);
    let _pending = cluster.breakers.pending(&cluster.stats.breakers).map_err(overflow)?;
    let slot = cluster.breakers.connection(&cluster.stats.breakers).map_err(overflow)?;
    Ok((opening.await?, slot))
}

/// The most recently pooled live connection to `endpoint`, discarding dead and expired ones.
fn checkout_http1(endpoint: SocketAddr) -> Option<Box<h1::Connection>> {
    with_pool(|pool| {
        let idle = pool.http1.get_mut(&endpoint)?;
        let now = timer::now();
        while let Some(candidate) = idle.pop() {
            if candidate.expires > now && candidate.connection.is_reusable() {
                return Some(candidate.connection);
            }
        }
        None
    })
    .flatten()
}

/// Sends `request` to `endpoint` over HTTP/2, on this worker's connection to it (opened if needed).
///
/// Callers box this future: it is larger than the HTTP/1.1 one (connection lock, handshake), and an
/// unboxed one would be carried and copied by every HTTP/1.1 request's future too. (Box it in a
/// statement of its own: a temporary in an `.await` statement keeps its space in the state machine
/// even when moved into a box.)
pub async fn send_http2(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
    request: Request<UpstreamBody>,
) -> Result<Outcome, ProxyError> {
    let carrier = match &cluster.mesh {
        None => Carrier::Plain,
        Some(peers) if peers.http_over_hbone => Carrier::Tunnelled,
        Some(_) => Carrier::Mesh,
    };
    let Some(shared) = with_pool(|pool| pool.http2.entry((endpoint, carrier)).or_default().clone()) else {
        return Err(ProxyError::NoEndpoint(cluster.name.clone()));
    };
    let connect = || connect_http2(settings, cluster, endpoint);
    let (mut response, _) = send_pooled(settings, cluster, endpoint, &shared, false, connect, request).await?;
    headers::strip_hop_by_hop(response.headers_mut(), false);
    Ok(Outcome::Response(response.map(ProxyBody::http2)))
}

/// Opens an HBONE tunnel for opaque TCP to `endpoint` of a mesh cluster: a `CONNECT endpoint`
/// stream on one of this worker's HTTP/2 connections to the HBONE listener at `port` of the
/// endpoint's host (mutual TLS, ALPN `h2`, the endpoint's expected identity proven): the first with
/// room for another tunnel, or a new one. The stream is the tunnel once the listener answers `200`.
pub async fn open_tunnel(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
    port: u16,
) -> Result<HboneTunnel, ProxyError> {
    let opening = open_tunnel_for(settings, cluster, endpoint, port, true);
    opening.await.map(|(tunnel, _)| tunnel)
}

/// [`open_tunnel`], for opaque TCP (said so on the `CONNECT`) or for HTTP; a tunnel for HTTP comes
/// with the identity its connection's peer proved, which its pooled HTTP connection checks again.
async fn open_tunnel_for(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
    port: u16,
    opaque: bool,
) -> Result<(HboneTunnel, Option<SpiffeId>), ProxyError> {
    let listener = SocketAddr::new(endpoint.ip(), port);
    let Some((connection, place)) = with_pool(|pool| take_place(pool.hbone.entry(listener).or_default())) else {
        return Err(ProxyError::NoEndpoint(cluster.name.clone()));
    };
    let connect = || connect_hbone(settings, cluster, endpoint, listener);
    let request = headers::tunnel_connect(endpoint, opaque).map(|()| UpstreamBody::Empty);
    let count = |pick| cluster.count_tunnel(pick);
    let sent = send_pooled(settings, cluster, endpoint, &connection, !opaque, connect, request).await;
    let (mut response, peer) = match sent {
        Ok(sent) => sent,
        Err(error) => {
            count(|c| &c.failed);
            return Err(error);
        }
    };
    if response.status() != http::StatusCode::OK {
        count(|c| &c.refused);
        return Err(ProxyError::TunnelRefused(response.status()));
    }
    match hyper::upgrade::on(&mut response).await {
        Ok(upgraded) => {
            count(|c| &c.opened);
            Ok((Held::new(TokioIo::new(upgraded), place), peer))
        }
        Err(error) => {
            count(|c| &c.failed);
            Err(ProxyError::Upstream(error))
        }
    }
}

/// An open HBONE tunnel: its CONNECT stream, holding its place on the pooled connection that
/// carries it until it is dropped.
pub type HboneTunnel = Held<TokioIo<Upgraded>>;

/// A place for one more tunnel on the first of `connections` with room for it, else on a new one:
/// the connection, and the tunnel's clone of its count.
fn take_place(connections: &mut Vec<SharedHttp2>) -> (SharedHttp2, Arc<()>) {
    let roomy = connections.iter().find(|c| c.tunnels() < limits::HBONE_TUNNELS_PER_CONNECTION);
    let connection = match roomy {
        Some(connection) => connection.clone(),
        None => {
            let connection = SharedHttp2::default();
            connections.push(connection.clone());
            connection
        }
    };
    let place = connection.tunnels.clone();
    (connection, place)
}

/// Sends `request` on this worker's pooled HTTP/2 connection `shared`, opening it with `connect` if
/// there is none, it died, or its peer is not one `cluster` accepts for `endpoint`. A request a
/// connection going away did not take is sent once more, on a fresh connection. With `want_peer`,
/// the response comes back with the identity the connection's peer proved (a copy: not for
/// every request).
async fn send_pooled<C, F>(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
    shared: &Shared,
    want_peer: bool,
    connect: C,
    mut request: Request<UpstreamBody>,
) -> Result<(Response<hyper::body::Incoming>, Option<SpiffeId>), ProxyError>
where
    C: Fn() -> F,
    F: Future<Output = Result<(http2::SendRequest<UpstreamBody>, Option<SpiffeId>), ProxyError>>,
{
    let mut force_new = false;
    loop {
        let (mut sender, peer) = {
            let mut slot = shared.slot.lock().await;
            let expires = timer::now() + cluster.idle_timeout;
            match slot.as_mut() {
                Some(connection)
                    if !force_new
                        && !connection.sender.is_closed()
                        && peer_fits(settings, cluster, endpoint, connection.peer.as_ref()) =>
                {
                    connection.expires = expires;
                    (connection.sender.clone(), connection.peer.as_ref().filter(|_| want_peer).cloned())
                }
                _ => {
                    let connecting = Box::pin(connect());
                    let (sender, peer) = connecting.await?;
                    let proven = peer.as_ref().filter(|_| want_peer).cloned();
                    *slot = Some(Http2Connection { sender: sender.clone(), expires, peer });
                    (sender, proven)
                }
            }
        };
        if let Err(error) = sender.ready().await {
            if force_new {
                return Err(ProxyError::Upstream(error));
            }
            force_new = true;
            continue;
        }
        match sender.try_send_request(request).await {
            Ok(response) => return Ok((response, peer)),
            Err(mut error) => match error.take_message() {
                Some(unsent) if !force_new => {
                    debug!(%endpoint, "http/2 connection was going away; sending on a new one");
                    request = unsent;
                    force_new = true;
                }
                _ => return Err(ProxyError::Upstream(error.into_error())),
            },
        }
    }
}

/// Whether a pooled connection's peer is one `cluster` accepts for `endpoint` (always, off the mesh).
fn peer_fits(settings: &ClientSettings, cluster: &Cluster, endpoint: SocketAddr, peer: Option<&SpiffeId>) -> bool {
    match (&cluster.mesh, peer, &settings.mesh) {
        (None, _, _) => true,
        (Some(peers), Some(peer), Some(mesh)) => mesh.accepts(peers.expected(endpoint), peer),
        _ => false,
    }
}

/// Sends HTTP/1.1 `request` (already prepared for HTTP/1.1) to `endpoint` of a mesh cluster through
/// hyper's client: to a Remora sidecar, only an upgrade (a WebSocket, say), inside mTLS (ALPN
/// `remora.h1`) on a connection of its own, since HTTP/2 between sidecars cannot switch protocols;
/// with `http_over_hbone`, any request, inside an HBONE tunnel ([`send_tunnelled_http1`]). A `101`
/// to an upgrade hands the connection over for the tunnel (its `max_connections` slot ends there,
/// as on a plaintext switch); any other answer is the response.
pub async fn send_mesh_http1(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
    request: Request<UpstreamBody>,
) -> Result<Outcome, ProxyError> {
    let peers = cluster.mesh.as_ref().ok_or(TlsError::NoIdentity)?;
    if peers.http_over_hbone {
        return send_tunnelled_http1(settings, cluster, endpoint, request).await;
    }
    let (stream, slot) = connect(cluster, endpoint).await?;
    let mesh = settings.mesh.as_ref().ok_or(TlsError::NoIdentity)?;
    let (tls, _) = mesh.connect(stream, endpoint, Alpn::Http1, peers.expected(endpoint)).await?;
    let mut sender = handshake_http1(TokioIo::new(tls), endpoint, slot).await?;
    let response = sender.send_request(request).await.map_err(ProxyError::Upstream)?;
    switched_or_response(response).await
}

/// HTTP/1.1 to `endpoint` of an `http_over_hbone` cluster: on a pooled connection inside an HBONE
/// tunnel that no other request is using, else on a new tunnel (each a `max_connections` place,
/// as a TCP connection would be). An upgrade takes a new one, never pooled. A request a pooled
/// connection did not take (the peer had closed it) is sent once more, on a new one.
async fn send_tunnelled_http1(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
    mut request: Request<UpstreamBody>,
) -> Result<Outcome, ProxyError> {
    let upgrade = headers::is_upgrade(&request);
    let mut fresh = upgrade;
    loop {
        let pooled = if fresh { None } else { checkout_tunnelled_http1(settings, cluster, endpoint) };
        let reused = pooled.is_some();
        let (mut sender, peer) = match pooled {
            Some(pooled) => pooled,
            None => {
                let opening = Box::pin(open_http_tunnel(settings, cluster, endpoint));
                let ((tunnel, peer), slot) = opening.await?;
                (handshake_http1(TokioIo::new(tunnel), endpoint, slot).await?, peer)
            }
        };
        match sender.try_send_request(request).await {
            Ok(response) => {
                if !upgrade {
                    let expires = timer::now() + cluster.idle_timeout;
                    release_tunnelled_http1(endpoint, TunnelledHttp1 { sender, expires, peer });
                }
                return switched_or_response(response).await;
            }
            Err(mut error) => match error.take_message() {
                Some(unsent) if reused => {
                    debug!(%endpoint, "pooled tunnelled connection was closed; sending on another");
                    request = unsent;
                    fresh = true;
                }
                _ => return Err(ProxyError::Upstream(error.into_error())),
            },
        }
    }
}

/// A pooled HTTP/1.1-over-HBONE connection to `endpoint` ready for a request, over a peer `cluster`
/// accepts for it, taken out of the pool with that peer.
fn checkout_tunnelled_http1(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
) -> Option<(http1::SendRequest<UpstreamBody>, Option<SpiffeId>)> {
    with_pool(|pool| {
        let connections = pool.tunnelled_http1.get_mut(&endpoint)?;
        let now = timer::now();
        let ready = connections.iter().position(|c| {
            c.expires > now && c.sender.is_ready() && peer_fits(settings, cluster, endpoint, c.peer.as_ref())
        })?;
        let taken = connections.swap_remove(ready);
        Some((taken.sender, taken.peer))
    })
    .flatten()
}

/// Puts an HTTP/1.1-over-HBONE connection back in the pool as soon as its response head is in: it
/// is taken again once its response has ended (`is_ready`).
fn release_tunnelled_http1(endpoint: SocketAddr, connection: TunnelledHttp1) {
    with_pool(|pool| {
        let connections = pool.tunnelled_http1.entry(endpoint).or_default();
        if connections.len() < limits::POOL_MAX_IDLE_PER_ENDPOINT {
            connections.push(connection);
        }
    });
}

/// An HBONE tunnel to carry HTTP to `endpoint` of an `http_over_hbone` cluster, within the
/// cluster's breakers as a TCP connection of its own would be.
async fn open_http_tunnel(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
) -> Result<((HboneTunnel, Option<SpiffeId>), Slot), ProxyError> {
    let Some(port) = cluster.mesh.as_ref().and_then(|peers| peers.hbone_port) else {
        return Err(ProxyError::NoEndpoint(cluster.name.clone()));
    };
    within_breakers(cluster, open_tunnel_for(settings, cluster, endpoint, port, false)).await
}

/// hyper's HTTP/1.1 client on `io`, its connection driven by a task of its own that holds `slot` (a
/// `max_connections` place) until the connection ends or is handed over to an upgrade.
async fn handshake_http1<S>(
    io: TokioIo<S>,
    endpoint: SocketAddr,
    slot: Slot,
) -> Result<http1::SendRequest<UpstreamBody>, ProxyError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(io).await.map_err(ProxyError::Upstream)?;
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(error) = connection.with_upgrades().await {
            debug!(%endpoint, %error, "upstream http/1.1 connection ended with an error");
        }
    });
    Ok(sender)
}

/// An HTTP/1.1 response from hyper's client: a `101` is the switched connection, any other the
/// response, its hop-by-hop headers removed.
async fn switched_or_response(mut response: Response<hyper::body::Incoming>) -> Result<Outcome, ProxyError> {
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        headers::strip_hop_by_hop(response.headers_mut(), false);
        return Ok(Outcome::Response(response.map(ProxyBody::http2)));
    }
    let upgraded = hyper::upgrade::on(&mut response).await.map_err(ProxyError::Upstream)?;
    Ok(Outcome::Switched(response.map(|_| ()), Either::Right(TokioIo::new(upgraded)), Bytes::new()))
}

/// Opens an HTTP/2 connection to `endpoint`: h2c, or for a mesh cluster HTTP/2 inside mTLS to the
/// endpoint's sidecar, whose identity comes back with it.
async fn connect_http2(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
) -> Result<(http2::SendRequest<UpstreamBody>, Option<SpiffeId>), ProxyError> {
    if cluster.mesh.as_ref().is_some_and(|peers| peers.http_over_hbone) {
        let ((tunnel, peer), slot) = open_http_tunnel(settings, cluster, endpoint).await?;
        let sender = handshake_http2(&settings.http2, TokioIo::new(tunnel), endpoint, Some(slot)).await?;
        return Ok((sender, peer));
    }
    let (stream, slot) = connect(cluster, endpoint).await?;
    let Some(peers) = &cluster.mesh else {
        let sender = handshake_http2(&settings.http2, TokioIo::new(stream), endpoint, Some(slot)).await?;
        return Ok((sender, None));
    };
    let mesh = settings.mesh.as_ref().ok_or(TlsError::NoIdentity)?;
    let (tls, peer) = mesh.connect(stream, endpoint, Alpn::Http, peers.expected(endpoint)).await?;
    let sender = handshake_http2(&settings.http2, TokioIo::new(tls), endpoint, Some(slot)).await?;
    Ok((sender, Some(peer)))
}

/// Opens the HTTP/2 connection to the HBONE `listener` of `endpoint`'s host, whose sidecar must
/// prove the identity `cluster` expects of `endpoint`. It holds no `max_connections` slot: the
/// tunnels it carries do, one each.
async fn connect_hbone(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
    listener: SocketAddr,
) -> Result<(http2::SendRequest<UpstreamBody>, Option<SpiffeId>), ProxyError> {
    let peers = cluster.mesh.as_ref().ok_or(TlsError::NoIdentity)?;
    let mesh = settings.mesh.as_ref().ok_or(TlsError::NoIdentity)?;
    let stream = connect::connect(listener, cluster.connect_timeout, &cluster.stats).await?;
    let (tls, peer) = mesh.connect(stream, listener, Alpn::Hbone, peers.expected(endpoint)).await?;
    let sender = handshake_http2(&settings.hbone, TokioIo::new(tls), listener, None).await?;
    Ok((sender, Some(peer)))
}

async fn handshake_http2<S>(
    builder: &http2::Builder<super::tidy::UpstreamExecutor>,
    io: TokioIo<S>,
    endpoint: SocketAddr,
    slot: Option<Slot>,
) -> Result<http2::SendRequest<UpstreamBody>, ProxyError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = builder.handshake(io).await.map_err(ProxyError::Upstream)?;
    tokio::spawn(async move {
        // The connection counts against max_connections until this task ends.
        let _slot = slot;
        if let Err(error) = connection.await {
            debug!(%endpoint, %error, "upstream http/2 connection ended with an error");
        }
    });
    Ok(sender)
}

/// Closes this worker's pooled connections that have passed their idle timeout (for HTTP/1.1
/// connections beyond the endpoint's warm ones, `limits::POOL_SURPLUS_IDLE_TIMEOUT`) or died, and
/// lets the others go of their buffers (a busy connection is rarely in the pool when the sweep comes).
/// Runs every `TIMER_TICK` on every worker, after the clock ticks. (Idle deadlines use the worker's
/// coarse clock: a clock read per request is a measurable cost on the hot path.)
pub fn sweep() {
    let now = timer::now();
    with_pool(|pool| {
        pool.http1.retain(|_, idle| {
            // The stack's bottom holds the least recently used: past the warm ones, the surplus.
            let mut surplus = idle.len().saturating_sub(limits::POOL_WARM_PER_ENDPOINT);
            idle.retain_mut(|c| {
                let expires = if surplus > 0 { c.surplus_expires } else { c.expires };
                surplus = surplus.saturating_sub(1);
                let keep = expires > now && c.connection.is_reusable();
                if keep {
                    c.connection.shed_buffers();
                }
                keep
            });
            !idle.is_empty()
        });
        pool.http2.retain(|_, shared| keep_http2(shared, now));
        pool.hbone.retain(|_, connections| {
            connections.retain(|shared| keep_http2(shared, now));
            !connections.is_empty()
        });
        pool.tunnelled_http1.retain(|_, connections| {
            connections.retain(|c| c.expires > now && !c.sender.is_closed());
            !connections.is_empty()
        });
    });
}

/// Whether a pooled HTTP/2 connection stays in the pool: it is alive, and within its idle timeout
/// or carrying tunnels. Forgets it otherwise.
fn keep_http2(shared: &Shared, now: Instant) -> bool {
    match shared.slot.try_lock() {
        Ok(mut slot) => {
            let busy = shared.tunnels() > 0;
            if slot.as_ref().is_some_and(|c| (c.expires <= now && !busy) || c.sender.is_closed()) {
                *slot = None;
            }
            slot.is_some() || busy
        }
        // A request is connecting right now; keep it.
        Err(_) => true,
    }
}
