//! HBONE listeners: mesh tunnels in, as Istio's ambient mode (ztunnel, waypoints) sends them.
//!
//! A connection to a listener with `protocol: hbone` is admitted like any other (`listener`), then
//! [`serve`] terminates its mutual TLS ([`MeshTls::accept_hbone`]: the mesh's certificate, a client
//! certificate required, ALPN `h2`) and runs an HTTP/2 server on it. Each stream must be a
//! `CONNECT` whose `:authority` is `ip:port`, an address of this host (the one the connection
//! reached); anything else is refused, counted and logged, and the connection goes on carrying
//! its other tunnels. A tunnel the authorization policy covering its port allows the peer nothing
//! on is refused too. An accepted tunnel is answered `200` and then served as a connection of the
//! HBONE listener's `inbound_listener`, under its routes, policies, limits and metrics: its
//! original destination is the `:authority`, its peer identity the connection's, and its first
//! bytes are classified as an `auto` listener's are, so HTTP gets the whole HTTP pipeline (routes,
//! per-request authorization, metrics, traces) and anything else is relayed as opaque TCP. The
//! tunnel counters are the HBONE listener's. The same [`Carrier`] judges and serves the tunnels of
//! an `hbone_quic` listener's connections (`quic::tunnels`), HTTP/3 instead of HTTP/2 beneath.
//!
//! Headers: `:authority`, and `x-remora-tunnel-protocol: tcp`, which Remora's own sidecars send
//! when what rides is opaque TCP (relayed unread, as over `remora.tcp`). `Forwarded`, `baggage` and
//! `traceparent`, which ztunnel sends on each CONNECT, are accepted and ignored (the peer's address
//! is the connection's; HTTP inside a tunnel carries its own trace context). Refusals use ztunnel's
//! statuses: 400 for a bad or misdirected CONNECT, 401 for authorization, 503 when the listener
//! is going away, the proxy is draining, or it is at `max_connections`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use remora_control_api::identity::SpiffeId;
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::metrics::{TunnelRefusal, TunnelStats};
use super::{Accepted, serve_mesh_tcp};
use crate::context::{DataPath, Open};
use crate::detect::{self, Protocol};
use crate::http::body::ProxyBody;
use crate::http::empty_reply;
use crate::http::headers;
use crate::http::server::{self, ServerVersion};
use crate::io::{Meter, TunnelIo};
use crate::state::ListenerConfig;
use crate::tls::MeshTls;

/// One HBONE connection (over TCP, or over QUIC: `quic::tunnels`): the peer sidecar (or ztunnel)
/// it came from, and the tunnels it carries.
pub(crate) struct Carrier {
    data: Arc<DataPath>,
    /// The HBONE listener's name.
    listener: Arc<str>,
    peer: SocketAddr,
    /// The address the connection reached: the only one its tunnels may name.
    local: IpAddr,
    identity: SpiffeId,
    /// Tunnels open now, and ever opened: the connection is idle when neither moves.
    open_tunnels: AtomicUsize,
    opened_tunnels: AtomicU64,
    /// Counted as a connection of the listener while it lives.
    _open: Open,
}

/// Serves one HBONE connection: mutual TLS, then HTTP/2 with a `CONNECT` per tunnel, until the
/// peer closes it, a drain ends it, or it carries no tunnel for the listener's idle timeout.
pub(super) async fn serve(stream: TcpStream, mesh: &MeshTls, accepted: Accepted, data: &Arc<DataPath>) {
    let Accepted { listener, peer, open, .. } = accepted;
    let Ok(local) = stream.local_addr() else { return };
    let (session, identity) = match mesh.accept_hbone(stream).await {
        Ok(accepted) => accepted,
        Err(error) => {
            // Counted in remora_tls_handshakes_total; at debug, so a scanner cannot flood the log.
            debug!(listener = %listener.name, %peer, %error, "hbone: mesh tls handshake failed");
            return;
        }
    };
    let carrier = Carrier::new(data, listener.name.clone(), peer, local.ip(), identity, open);
    let service = {
        let carrier = carrier.clone();
        service_fn(move |request| {
            let response = carrier.open_tunnel(request);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let connection = data.server.hbone.serve_connection(TokioIo::new(session), service);
    // Draining asks the connection to finish gracefully: its open tunnels go on, new ones are
    // refused. It is closed once it has carried no tunnel for the listener's idle timeout.
    let last = carrier.opened_tunnels.load(Ordering::Relaxed);
    let activity = Tunnels { carrier, last, idle_timeout: listener.idle_timeout };
    let drain = data.drain.watch().into_signal();
    server::Driven::new(connection, |c| c.graceful_shutdown(), drain, activity).await;
}

/// An HBONE connection's activity: the tunnels it carries.
struct Tunnels {
    carrier: Arc<Carrier>,
    last: u64,
    idle_timeout: Duration,
}

impl server::Activity for Tunnels {
    fn moved(&mut self) -> bool {
        self.carrier.moved_since(&mut self.last)
    }

    fn bytes(&self) -> Option<u64> {
        None
    }

    fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    fn listener(&self) -> &str {
        &self.carrier.listener
    }
}

impl Carrier {
    /// A connection from `peer` (proven to be `identity`) to `local` on HBONE listener `listener`,
    /// counted open by `open`.
    pub(crate) fn new(
        data: &Arc<DataPath>,
        listener: Arc<str>,
        peer: SocketAddr,
        local: IpAddr,
        identity: SpiffeId,
        open: Open,
    ) -> Arc<Carrier> {
        Arc::new(Carrier {
            data: data.clone(),
            listener,
            peer,
            local: local.to_canonical(),
            identity,
            open_tunnels: AtomicUsize::new(0),
            opened_tunnels: AtomicU64::new(0),
            _open: open,
        })
    }

    /// Answers one HTTP/2 stream: `200` and a tunnel served behind it, or a refusal.
    fn open_tunnel(self: &Arc<Self>, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let tunnel = match self.accept(request.method(), request.uri(), request.headers()) {
            Ok(tunnel) => tunnel,
            Err(refused) => return empty_reply(refused),
        };
        let upgrade = hyper::upgrade::on(&mut request);
        let carrier = self.clone();
        tokio::spawn(async move {
            match upgrade.await {
                // Boxed: a tunnel's task holds whichever path serves it.
                Ok(upgraded) => Box::pin(carrier.serve_tunnel(TokioIo::new(upgraded), tunnel)).await,
                Err(error) => debug!(listener = %carrier.listener, %error, "hbone: tunnel was not established"),
            }
        });
        empty_reply(StatusCode::OK)
    }

    /// Judges a `CONNECT` (`method`, `uri`, `headers`): the tunnel, counted open on the inbound
    /// listener, to answer `200` and serve; or the status it is refused with (counted).
    pub(crate) fn accept(
        self: &Arc<Self>,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Tunnel, StatusCode> {
        let snapshot = self.data.snapshot.load();
        let Some(hbone) = snapshot.listener(&self.listener) else {
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        };
        // Gone if the listener was changed to another protocol: its HBONE connections take no more.
        let (Some(tunnels), Some(inbound)) = (&hbone.tunnels, &hbone.inbound_listener) else {
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        };
        let tunnels = tunnels.clone();
        // Validation makes sure the inbound listener exists; a config from a control plane may
        // still be waiting for it.
        let Some(listener) = snapshot.listener(inbound).cloned() else {
            tunnels.refused(TunnelRefusal::Unavailable);
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        };
        let target = match self.judge(&listener, method, uri) {
            Ok(target) => target,
            Err(refusal) => {
                tunnels.refused(refusal);
                return Err(refusal_status(refusal));
            }
        };
        let stats = &listener.stats;
        if stats.active.inc() >= listener.max_connections {
            stats.active.dec();
            stats.rejected.inc();
            tunnels.refused(TunnelRefusal::Unavailable);
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
        stats.connections.inc();
        let meter = Arc::new(Meter::default());
        let open = Open::new(listener.clone(), meter.clone(), self.data.drain.track());
        tunnels.opened();
        let opaque = headers.get(&headers::TUNNEL_PROTOCOL).is_some_and(|value| value == "tcp");
        let guard = TunnelGuard::new(self.clone(), tunnels);
        Ok(Tunnel { _guard: guard, listener, target, meter, open, opaque })
    }

    /// The tunnel's target, if this peer may open it.
    fn judge(&self, listener: &ListenerConfig, method: &Method, uri: &Uri) -> Result<SocketAddr, TunnelRefusal> {
        if self.data.drain.is_draining() {
            return Err(TunnelRefusal::Unavailable);
        }
        if method != Method::CONNECT {
            debug!(listener = %self.listener, peer = %self.peer, %method, "hbone: not a CONNECT");
            return Err(TunnelRefusal::BadRequest);
        }
        let target = uri
            .authority()
            .and_then(|authority| authority.as_str().parse::<SocketAddr>().ok())
            .ok_or(TunnelRefusal::BadRequest)?;
        if target.ip().to_canonical() != self.local {
            info!(listener = %self.listener, peer = %self.identity, %target, "hbone: tunnel to an address that is not this host's refused");
            return Err(TunnelRefusal::Misdirected);
        }
        if let Some(policy) = listener.authz.as_ref().and_then(|authz| authz.for_port(target.port()))
            && !policy.allows_anything(self.identity.as_str())
        {
            policy.counters.denied.inc();
            info!(listener = %self.listener, policy = %policy.name, peer = %self.identity, %target, "hbone: tunnel denied by authorization policy");
            return Err(TunnelRefusal::Denied);
        }
        Ok(target)
    }

    /// Serves an established tunnel as a connection of its own.
    pub(crate) async fn serve_tunnel(self: Arc<Self>, mut io: impl TunnelIo, tunnel: Tunnel) {
        let Tunnel { _guard, listener, target, meter, open, opaque } = tunnel;
        // A destination declared opaque, or a tunnel its sender says is opaque TCP, is not read
        // first: its server may be the one to speak.
        let opaque = opaque || listener.routes.for_tcp(Some(target)).is_some_and(|table| table.opaque);
        let (protocol, replay) = if opaque {
            (Protocol::Opaque, bytes::Bytes::new())
        } else {
            match detect::detect_read(&mut io, listener.detect_timeout).await {
                Ok(detected) => detected,
                Err(error) => {
                    debug!(listener = %listener.name, %error, "hbone: tunnel failed during detection");
                    return;
                }
            }
        };
        let stream = io.into_downstream(replay, meter.clone());
        let accepted = Accepted {
            listener: listener.clone(),
            peer: self.peer,
            original_destination: Some(target),
            destination_port: target.port(),
            meter,
            open,
        };
        let version = match protocol {
            Protocol::Http1 => ServerVersion::Http1,
            Protocol::Http2 => ServerVersion::Http2,
            Protocol::Tls | Protocol::Opaque => {
                let policy = listener.authz.as_ref().and_then(|authz| authz.for_port(target.port())).cloned();
                serve_mesh_tcp(stream, accepted, self.identity.clone(), policy, &self.data).await;
                return;
            }
        };
        server::serve(stream, version, accepted.into_http(&self.data, Some(self.identity.clone()))).await;
    }

    /// Resolves once the connection has carried no tunnel for `timeout` (within a quarter of it).
    pub(crate) async fn idle(&self, timeout: Duration) {
        let mut last = self.opened_tunnels.load(Ordering::Relaxed);
        crate::io::quiet_for(timeout, move || self.moved_since(&mut last)).await;
    }

    /// Whether it carries a tunnel now, or opened one since it had opened `last` (updated).
    fn moved_since(&self, last: &mut u64) -> bool {
        let opened = self.opened_tunnels.load(Ordering::Relaxed);
        std::mem::replace(last, opened) != opened || self.open_tunnels.load(Ordering::Relaxed) > 0
    }
}

/// An accepted tunnel, between its `200` and its serving.
pub(crate) struct Tunnel {
    _guard: TunnelGuard,
    listener: Arc<ListenerConfig>,
    target: SocketAddr,
    meter: Arc<Meter>,
    open: Open,
    /// Its sender says it carries opaque TCP: relayed unread.
    opaque: bool,
}

/// Counts a tunnel open, on its connection and its listener, until dropped.
struct TunnelGuard {
    carrier: Arc<Carrier>,
    stats: Arc<TunnelStats>,
}

impl TunnelGuard {
    fn new(carrier: Arc<Carrier>, stats: Arc<TunnelStats>) -> TunnelGuard {
        carrier.open_tunnels.fetch_add(1, Ordering::Relaxed);
        carrier.opened_tunnels.fetch_add(1, Ordering::Relaxed);
        stats.active.inc();
        TunnelGuard { carrier, stats }
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.carrier.open_tunnels.fetch_sub(1, Ordering::Relaxed);
        self.stats.active.dec();
    }
}

fn refusal_status(refusal: TunnelRefusal) -> StatusCode {
    match refusal {
        TunnelRefusal::BadRequest | TunnelRefusal::Misdirected => StatusCode::BAD_REQUEST,
        TunnelRefusal::Denied => StatusCode::UNAUTHORIZED,
        TunnelRefusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}
