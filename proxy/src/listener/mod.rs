//! Accepting connections and sending each one down the right path.
//!
//! `app` binds every listener with [`bind`] (one socket per worker thread, sharing the port with
//! `SO_REUSEPORT`, so the kernel spreads connections across workers and no accept crosses threads)
//! and hands each worker its socket. The worker runs [`accept_loop`] on it; for each connection:
//!
//! 1. **admit**: the listener's config is read from the live snapshot; a connection over its
//!    `connection_rate_limit` or its `max_connections` is closed at once and counted.
//! 2. **original destination**: on a transparent listener, `SO_ORIGINAL_DST` (IPv4 or IPv6) says
//!    where the client meant to go. A connection made straight to the listener has none.
//! 3. **detect**: `auto` listeners classify the first bytes (`detect`); others know their protocol.
//! 4. **mesh and authorization**: on an inbound listener of a proxy with an identity, a ClientHello
//!    offering a mesh ALPN protocol is terminated (`tls`), the peer's SPIFFE ID read and judged by
//!    the authorization policy covering the destination port (`state::authz`); plaintext to a port a
//!    strict policy covers is closed at once, and counted either way.
//! 5. **dispatch**: HTTP goes to `http::serve`; anything else to `tcp::proxy`, towards the route
//!    table that claims the original destination (its `tcp_cluster`) or the listener's default
//!    cluster.

pub(crate) mod hbone;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use remora_control_api::identity::SpiffeId;
use socket2::{Domain, Protocol as SocketProtocol, SockRef, Socket, Type};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::context::{DataPath, Open};
use crate::detect::{self, Protocol};
use crate::http::server::{self, HttpConnection, Origin, ServerVersion};
use crate::io::{DownstreamStream, Meter};
use crate::limits;
use crate::state::authz::Policy;
use crate::state::{Direction, ListenerConfig, ListenerProtocol};
use crate::tcp;
use crate::tls::{self, Alpn, MeshTls};

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("listener {name:?}: bind {address}: {error}")]
pub struct BindError {
    /// The listener.
    pub name: String,
    /// The address.
    pub address: SocketAddr,
    /// The OS error (address in use, permission denied, ...).
    pub error: std::io::Error,
}

/// A bound listening socket: TCP, or UDP for HTTP/3.
#[derive(Debug)]
pub enum ListenSocket {
    /// A TCP listening socket.
    Tcp(std::net::TcpListener),
    /// A UDP socket (QUIC).
    Udp(std::net::UdpSocket),
}

impl ListenSocket {
    /// The address it is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            ListenSocket::Tcp(socket) => socket.local_addr(),
            ListenSocket::Udp(socket) => socket.local_addr(),
        }
    }
}

/// Binds `copies` listening sockets (UDP ones when `udp`) to `address`, all sharing one port. Port
/// 0 picks a free port once, and every copy takes that same port.
pub fn bind(name: &str, address: SocketAddr, copies: usize, udp: bool) -> Result<Vec<ListenSocket>, BindError> {
    let fail = |address, error| BindError { name: name.to_owned(), address, error };
    let mut sockets = Vec::with_capacity(copies);
    let mut address = address;
    for _ in 0..copies.max(1) {
        let socket = bind_one(address, copies > 1, udp).map_err(|e| fail(address, e))?;
        if address.port() == 0 {
            address = socket.local_addr().map_err(|e| fail(address, e))?;
        }
        sockets.push(socket);
    }
    Ok(sockets)
}

fn bind_one(address: SocketAddr, share_port: bool, udp: bool) -> std::io::Result<ListenSocket> {
    let socket = if udp {
        Socket::new(Domain::for_address(address), Type::DGRAM, Some(SocketProtocol::UDP))?
    } else {
        Socket::new(Domain::for_address(address), Type::STREAM, Some(SocketProtocol::TCP))?
    };
    // Restarting proxies must not wait out TIME_WAIT on their own port.
    socket.set_reuse_address(true)?;
    // Only when there are several workers: a single-worker proxy keeps the port to itself, so a
    // second copy started by mistake fails to bind instead of silently sharing the traffic.
    if share_port {
        socket.set_reuse_port(true)?;
    }
    // An IPv6 address means IPv6 only (as Envoy without ipv4_compat), so `[::]:P` and `0.0.0.0:P`
    // can be one listener's two sockets.
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    if udp {
        return Ok(ListenSocket::Udp(socket.into()));
    }
    socket.listen(limits::LISTEN_BACKLOG)?;
    Ok(ListenSocket::Tcp(socket.into()))
}

/// Accepts connections on `socket` for listener `name` until `stop` turns true or draining starts.
/// Must run inside a worker's runtime.
pub async fn accept_loop(
    socket: std::net::TcpListener,
    name: Arc<str>,
    data: Arc<DataPath>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(socket) {
        Ok(listener) => listener,
        Err(error) => {
            warn!(listener = %name, %error, "cannot serve listener");
            return;
        }
    };
    let mut drain = data.drain.watch();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
            () = drain.signaled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(serve_connection(stream, peer, name.clone(), data.clone()));
            }
            Err(error) => {
                // Out of file descriptors or memory: back off rather than spin on the error.
                warn!(listener = %name, %error, "accept failed");
                tokio::time::sleep(limits::ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, name: Arc<str>, data: Arc<DataPath>) {
    // Admit.
    let Some(listener) = data.snapshot.load().listener(&name).cloned() else {
        return;
    };
    if !admit(&listener) {
        return;
    }
    let meter = Arc::new(Meter::default());
    let open = Open::new(listener.clone(), meter.clone(), data.drain.track());
    let _ = stream.set_nodelay(true);
    if listener.protocol == ListenerProtocol::Hbone {
        // Tunnels need this proxy's identity: without one there is nothing to terminate them with.
        let Some(mesh) = &data.client.mesh else { return };
        let accepted = Accepted { listener, peer, original_destination: None, destination_port: 0, meter, open };
        // Boxed, as every path but plain HTTP (see below).
        let serving = Box::pin(hbone::serve(stream, mesh, accepted, &data));
        serving.await;
        return;
    }
    // Original destination.
    let original_destination = if listener.transparent { original_destination(&stream) } else { None };
    // Detect.
    let (protocol, replay) = match listener.protocol {
        ListenerProtocol::Http1 => (Protocol::Http1, bytes::Bytes::new()),
        ListenerProtocol::Http2 => (Protocol::Http2, bytes::Bytes::new()),
        // (An HBONE listener's connections were served above; an HTTP/3 listener has no TCP ones.)
        ListenerProtocol::Tcp | ListenerProtocol::Hbone | ListenerProtocol::Http3 | ListenerProtocol::HboneQuic => {
            (Protocol::Opaque, bytes::Bytes::new())
        }
        // A destination declared opaque (a Service port's `appProtocol: tcp`) is not read first:
        // its server may be the one to speak first.
        ListenerProtocol::Auto if listener.routes.for_tcp(original_destination).is_some_and(|t| t.opaque) => {
            (Protocol::Opaque, bytes::Bytes::new())
        }
        ListenerProtocol::Auto => match detect::detect(&stream, listener.detect_timeout).await {
            Ok(detected) => detected,
            Err(error) => {
                debug!(listener = %name, %error, "connection failed during detection");
                return;
            }
        },
    };
    // Mesh: an inbound ClientHello offering a mesh protocol is terminated here, when this proxy has
    // an identity. Anything else is plaintext to authorization (TLS that is not ours included: it
    // passes through, unread).
    let destination_port = match listener.authz {
        None => 0,
        Some(_) => original_destination.or_else(|| stream.local_addr().ok()).map_or(0, |a| a.port()),
    };
    let policy = listener.authz.as_ref().and_then(|authz| authz.for_port(destination_port)).cloned();
    if protocol == Protocol::Tls
        && listener.direction == Direction::Inbound
        && let Some(mesh) = &data.client.mesh
        && tls::offers_mesh_alpn(&stream, listener.detect_timeout).await
    {
        let accepted = Accepted { listener, peer, original_destination, destination_port, meter, open };
        // Boxed, as every path but plain HTTP: the connection's task is sized for an idle
        // HTTP/1.1 connection (see `http::park`), not for the largest path.
        let serving = Box::pin(serve_mesh(stream, mesh, accepted, policy, &data));
        serving.await;
        return;
    }
    if let Some(policy) = &policy
        && refuses_plaintext(policy)
    {
        info!(listener = %name, policy = %policy.name, %peer, "plaintext connection refused: the policy is strict");
        return;
    }
    // Dispatch.
    let version = match protocol {
        Protocol::Http1 => ServerVersion::Http1,
        Protocol::Http2 => ServerVersion::Http2,
        Protocol::Tls | Protocol::Opaque => {
            if let Some(caller) = listener.stats.caller(None) {
                meter.attribute(caller);
            }
            let downstream = tcp::Downstream::Plain(stream, replay);
            let proxying = Box::pin(proxy_tcp(downstream, &listener, original_destination, &meter, &data));
            proxying.await;
            return;
        }
    };
    let downstream = DownstreamStream::new(stream, replay, meter.clone());
    let accepted = Accepted { listener, peer, original_destination, destination_port, meter, open };
    let connection = accepted.into_http(&data, None);
    match version {
        ServerVersion::Http1 => server::serve(downstream, version, connection).await,
        // On a task of its own, sized for it: this one ends here.
        ServerVersion::Http2 => server::spawn_http2(downstream, connection),
    }
}

/// A new connection meets the listener's gates: its connection rate limit, then its
/// `max_connections`. Counted either way; an admitted one is active until its `Open` drops.
pub(crate) fn admit(listener: &ListenerConfig) -> bool {
    let stats = &listener.stats;
    if let Some(limiter) = &listener.connection_rate_limit
        && limiter.acquire(std::time::Instant::now()).is_err()
    {
        stats.rate_limited.inc();
        return false;
    }
    if stats.active.inc() >= listener.max_connections {
        stats.active.dec();
        stats.rejected.inc();
        return false;
    }
    stats.connections.inc();
    true
}

/// Whether `policy` refuses a connection that came without mesh mTLS (it is strict); counted
/// either way.
pub(crate) fn refuses_plaintext(policy: &Policy) -> bool {
    if policy.strict {
        policy.counters.plaintext_refused.inc();
    } else {
        policy.counters.plaintext_accepted.inc();
    }
    policy.strict
}

/// An admitted connection's particulars, for the paths that serve it.
pub(crate) struct Accepted {
    pub(crate) listener: Arc<ListenerConfig>,
    pub(crate) peer: SocketAddr,
    pub(crate) original_destination: Option<SocketAddr>,
    pub(crate) destination_port: u16,
    pub(crate) meter: Arc<Meter>,
    pub(crate) open: Open,
}

impl Accepted {
    /// The HTTP server's view of the connection; `identity` is the peer sidecar's, over mesh TLS.
    pub(crate) fn into_http(self, data: &Arc<DataPath>, identity: Option<SpiffeId>) -> Arc<HttpConnection> {
        let Accepted { listener, peer, original_destination, destination_port, meter, open } = self;
        let caller = listener.stats.caller(identity.as_ref());
        if let Some(caller) = &caller {
            meter.attribute(caller.clone());
        }
        let origin = Origin::new(listener.name.clone(), peer, original_destination, destination_port, identity);
        Arc::new(HttpConnection {
            data: data.clone(),
            listener,
            meter,
            open,
            origin,
            caller,
            quiet: Default::default(),
        })
    }
}

/// Terminates mesh TLS from a peer sidecar, authorizes the peer, and serves what rides inside:
/// HTTP/2, or HTTP/1.1 for an upgrade (judged again per request, by route), or opaque TCP (judged
/// here, once).
async fn serve_mesh(
    stream: TcpStream,
    mesh: &MeshTls,
    accepted: Accepted,
    policy: Option<Arc<Policy>>,
    data: &Arc<DataPath>,
) {
    let (session, identity, alpn) = match mesh.accept(stream).await {
        Ok(accepted) => accepted,
        Err(error) => {
            // Counted in remora_tls_handshakes_total; at debug, so a scanner cannot flood the log.
            debug!(listener = %accepted.listener.name, peer = %accepted.peer, %error, "mesh tls handshake failed");
            return;
        }
    };
    let downstream = DownstreamStream::tls(session, accepted.meter.clone());
    match alpn {
        Alpn::Tcp => serve_mesh_tcp(downstream, accepted, identity, policy, data).await,
        Alpn::Http | Alpn::Http1 => {
            // HTTP/1.1 carries an upgrade the peer sidecar could not send over HTTP/2.
            let connection = accepted.into_http(data, Some(identity));
            if alpn == Alpn::Http {
                // On a task of its own, sized for it: this one, and its box, end here.
                server::spawn_http2(downstream, connection);
            } else {
                server::serve(downstream, ServerVersion::Http1, connection).await;
            }
        }
        // Not offered here (HBONE has listeners of its own), so never agreed.
        Alpn::Hbone => {}
    }
}

/// Opaque TCP from a peer sidecar, over mesh TLS or in an HBONE tunnel: judged once, here, by the
/// policy covering its port, then relayed.
async fn serve_mesh_tcp(
    downstream: DownstreamStream,
    accepted: Accepted,
    identity: SpiffeId,
    policy: Option<Arc<Policy>>,
    data: &Arc<DataPath>,
) {
    if let Some(policy) = &policy
        && !policy.allows(identity.as_str())
    {
        policy.counters.denied.inc();
        info!(listener = %accepted.listener.name, policy = %policy.name, peer = %identity, "tcp connection denied by authorization policy");
        return;
    }
    if let Some(caller) = accepted.listener.stats.caller(Some(&identity)) {
        accepted.meter.attribute(caller);
    }
    let downstream = tcp::Downstream::Mesh(downstream, Some(accepted.peer), identity);
    proxy_tcp(downstream, &accepted.listener, accepted.original_destination, &accepted.meter, data).await;
}

/// Opaque TCP towards the route table that claims the original destination (its `tcp_cluster`), or
/// the listener's default cluster.
async fn proxy_tcp(
    downstream: tcp::Downstream,
    listener: &ListenerConfig,
    original_destination: Option<SocketAddr>,
    meter: &Arc<Meter>,
    data: &DataPath,
) {
    let cluster = listener
        .routes
        .for_tcp(original_destination)
        .and_then(|table| table.tcp_cluster.clone())
        .or_else(|| listener.default_cluster.clone());
    match cluster {
        Some(cluster) => {
            let log = data.access_log_for(listener).map(Arc::as_ref);
            tcp::proxy(downstream, cluster, original_destination, listener, meter, &data.client, log).await;
        }
        None => debug!(listener = %listener.name, ?original_destination, "no cluster for opaque traffic; closing"),
    }
}

/// Where the client was going before an iptables REDIRECT brought it here. `None` when the socket
/// was not redirected (the original destination is the listener's own address) or the kernel has no
/// record.
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let socket = SockRef::from(stream);
    let original = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (original != local).then_some(original)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::http::settings::{ClientSettings, ServerSettings};

    /// A data path with no config, no identity and no telemetry.
    fn data_path() -> Arc<DataPath> {
        Arc::new(DataPath {
            snapshot: Default::default(),
            drain: Default::default(),
            server: ServerSettings::default(),
            client: ClientSettings::with_mesh(None),
            tracer: None,
            access_log: None,
            quic_paths: Default::default(),
        })
    }

    /// The listener `test` of the config `yaml`, compiled.
    fn listener_named_test(yaml: &str) -> Arc<ListenerConfig> {
        let file = remora_control_api::config::parse(yaml, "t").unwrap();
        let metrics = crate::state::SnapshotMetrics::default();
        let locality = crate::state::cluster::OwnLocality::default();
        let snapshot = crate::state::Snapshot::build(
            "v".into(),
            remora_control_api::Encoded::all(&file.resources),
            None,
            &locality,
            &metrics,
        )
        .unwrap();
        snapshot.listener("test").unwrap().clone()
    }

    /// A connection's task is allocated at its largest state's size for as long as it lives, and
    /// most of a sidecar's connections are idle HTTP/1.1 ones (see `http::park`): every other path
    /// is boxed so that the task is sized for that one (about 1.2 kB in a release build, a little
    /// more in a test build). Raise the bound only with a measured reason: the peer kit's
    /// `peers-conns.sh` (docs/benchmarks.md, "Memory per idle connection").
    #[tokio::test]
    async fn a_connection_task_is_sized_for_an_idle_http1_connection() {
        let data = data_path();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let task = serve_connection(stream, peer, "test".into(), data);
        let size = std::mem::size_of_val(&task);
        eprintln!("connection task future: {size} bytes");
        assert!(size <= 1400, "a connection's task grew to {size} bytes");
    }

    /// An opaque TCP connection's task holds its relay for as long as the connection is open, idle
    /// or not: two sockets, the splice's two directions (polled by hand: 48 bytes where `async`
    /// waiters made them 768), the idle timer and what each layer above keeps. Connecting (a TLS
    /// handshake, a tunnel's CONNECT) is boxed, and a TLS session besides: 5,216 bytes before
    /// (1,864 in a test build now). Raise the bound only with a measured reason:
    /// `benches/idle-tcp.sh` and the idle rows of `cargo bench --bench transports`.
    #[tokio::test]
    async fn an_opaque_tcp_connection_task_holds_its_relay_and_little_else() {
        let data = data_path();
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(socket.local_addr().unwrap()).await.unwrap();
        let (stream, _) = socket.accept().await.unwrap();
        let listener = listener_named_test(
            r#"{resources: [{kind: Listener, name: test, address: "127.0.0.1:0", protocol: tcp, default_cluster: c}, {kind: Cluster, name: c}]}"#,
        );
        let meter = Arc::new(Meter::default());
        let task = proxy_tcp(tcp::Downstream::Plain(stream, bytes::Bytes::new()), &listener, None, &meter, &data);
        let size = std::mem::size_of_val(&task);
        eprintln!("opaque tcp relay future: {size} bytes");
        assert!(size <= 2100, "an opaque TCP connection's relay grew to {size} bytes");
    }

    /// An HTTP/2 connection lives on a task of its own (`server::spawn_http2`), held for as long as
    /// the connection is open, idle or not: hyper's and h2's state (1.2 kB in a release build)
    /// and the watch around it (`server::Driven`, 0.1 kB; 1,344 bytes in all in a test build).
    /// Raise the bound only with a measured reason, as above (`MODE=h2` of `peers-conns.sh`).
    #[tokio::test]
    async fn an_http2_connection_task_holds_little_beyond_the_protocol_state() {
        let data = data_path();
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(socket.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = socket.accept().await.unwrap();
        let listener = listener_named_test(
            r#"{resources: [{kind: Listener, name: test, address: "127.0.0.1:0", protocol: http2}]}"#,
        );
        let meter = Arc::new(Meter::default());
        let open = Open::new(listener.clone(), meter.clone(), data.drain.track());
        let accepted = Accepted { listener, peer, original_destination: None, destination_port: 0, meter, open };
        let downstream = DownstreamStream::new(stream, bytes::Bytes::new(), accepted.meter.clone());
        let task = server::serve_http2(downstream, accepted.into_http(&data, None));
        let size = std::mem::size_of_val(&task);
        eprintln!("http/2 connection task future: {size} bytes");
        assert!(size <= 1400, "an HTTP/2 connection's task grew to {size} bytes");
    }
}
