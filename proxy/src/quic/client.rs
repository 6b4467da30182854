//! HBONE over QUIC, out: opaque TCP to a cluster's endpoints as `CONNECT` tunnels on HTTP/3, one
//! pooled QUIC connection per endpoint host and worker.
//!
//! `tcp`'s relay asks [`open_tunnel`] for a tunnel to an endpoint of a cluster with `quic_port`.
//! The worker's connection to that host's `hbone_quic` listener is reused when it is up and its
//! peer is who the cluster expects of the endpoint; otherwise one is opened (mutual TLS from
//! [`MeshTls::quic_client`], the peer's SPIFFE ID checked). The tunnel is a `CONNECT endpoint`
//! stream answered `200`. Opening (the handshake if one is needed, and the `CONNECT`) must finish
//! within the cluster's `connect_timeout`: when it does not, or the connection cannot be made, the
//! path is taken to be blocking UDP, the relay is told to fall back ([`Opened::FallBack`]: the
//! cluster's TCP transport), and so is every connection to that host until a probe in the
//! background (every `QUIC_PROBE_INTERVAL`) gets a QUIC connection through again. A peer that
//! answers with another status, or proves the wrong identity, is a failure, not a reason to fall
//! back. [`sweep`] closes connections that carried no tunnel for the cluster's idle timeout.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::StatusCode;
use remora_control_api::identity::SpiffeId;
use tracing::debug;

use super::paths::{PathReport, PathReports};
use super::stream::{OutboundTunnel, TunnelStream};
use crate::http::error::ProxyError;
use crate::http::headers;
use crate::http::settings::ClientSettings;
use crate::io::Held;
use crate::limits;
use crate::state::cluster::Cluster;
use crate::tls::{Expected, MeshTls, TlsError};

/// What [`open_tunnel`] came to.
#[derive(Debug)]
pub enum Opened {
    /// A tunnel to the endpoint (boxed: two h3 stream halves, and a relay holds it for its life).
    Tunnel(Box<QuicUpstream>),
    /// QUIC does not get through to the endpoint's host: take the cluster's TCP transport.
    FallBack,
}

/// An open tunnel, holding its connection in the pool's count of tunnels.
pub type QuicUpstream = Held<OutboundTunnel>;

/// One pooled connection to a host's `hbone_quic` listener.
struct Pooled {
    connection: quinn::Connection,
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    peer: SpiffeId,
    /// Cloned by each tunnel: the connection is idle when only the pool holds it.
    tunnels: Arc<()>,
    expires: Instant,
    /// Packets sent and lost as of the last sweep, which counts what came since.
    counted: (u64, u64),
}

/// A host QUIC does not get through to, and whether a probe is out.
struct Blocked {
    next_probe: Instant,
    probing: bool,
}

type SharedConnection = Arc<tokio::sync::Mutex<Option<Pooled>>>;

#[derive(Default)]
struct Pool {
    /// This worker's client endpoints: IPv4, IPv6 (made on first use).
    endpoints: [Option<quinn::Endpoint>; 2],
    connections: foldhash::HashMap<SocketAddr, SharedConnection>,
    blocked: foldhash::HashMap<SocketAddr, Blocked>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

fn with_pool<R>(f: impl FnOnce(&mut Pool) -> R) -> Option<R> {
    POOL.try_with(|pool| f(&mut pool.borrow_mut())).ok()
}

/// Why opening a tunnel failed.
enum OpenError {
    /// Nothing came back in time, or the connection could not be made: the path blocks UDP.
    Unreachable(String),
    /// The peer answered the `CONNECT` with another status.
    Refused(StatusCode),
    /// The peer is not who it should be, or this proxy has no certificate.
    Tls(TlsError),
}

/// Opens a tunnel to `endpoint` of `cluster` on the `hbone_quic` listener at `port` of its host, or
/// says to fall back. Counted in the cluster's `upstream_tunnels_total`.
pub async fn open_tunnel(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
    port: u16,
) -> Result<Opened, ProxyError> {
    let listener = SocketAddr::new(endpoint.ip(), port);
    let count = |pick| cluster.count_tunnel(pick);
    let Some(mesh) = settings.mesh.clone() else {
        count(|c| &c.failed);
        return Err(TlsError::NoIdentity.into());
    };
    if blocked(listener, &mesh, cluster) {
        count(|c| &c.fell_back);
        return Ok(Opened::FallBack);
    }
    let opening = open(&mesh, cluster, endpoint, listener);
    let opened = match tokio::time::timeout(cluster.connect_timeout, opening).await {
        Ok(opened) => opened,
        Err(_) => Err(OpenError::Unreachable(format!("no answer within {:?}", cluster.connect_timeout))),
    };
    match opened {
        Ok(tunnel) => {
            count(|c| &c.opened);
            Ok(Opened::Tunnel(Box::new(tunnel)))
        }
        Err(OpenError::Unreachable(reason)) => {
            debug!(cluster = %cluster.name, %listener, %reason, "quic: unreachable; falling back to tcp");
            forget(listener);
            with_pool(|pool| {
                pool.blocked.insert(
                    listener,
                    Blocked { next_probe: Instant::now() + limits::QUIC_PROBE_INTERVAL, probing: false },
                )
            });
            count(|c| &c.fell_back);
            Ok(Opened::FallBack)
        }
        Err(OpenError::Refused(status)) => {
            count(|c| &c.refused);
            Err(ProxyError::TunnelRefused(status))
        }
        Err(OpenError::Tls(error)) => {
            count(|c| &c.failed);
            Err(error.into())
        }
    }
}

/// Whether QUIC to `listener` is known not to get through; starts a probe when one is due.
fn blocked(listener: SocketAddr, mesh: &Arc<MeshTls>, cluster: &Cluster) -> bool {
    let probe = with_pool(|pool| {
        let blocked = pool.blocked.get_mut(&listener)?;
        let due = !blocked.probing && blocked.next_probe <= Instant::now();
        blocked.probing |= due;
        Some(due)
    })
    .flatten();
    let Some(due) = probe else { return false };
    if due {
        let (mesh, timeout) = (mesh.clone(), cluster.connect_timeout);
        // The probe needs no particular identity: any mesh peer answering shows the path is open;
        // a tunnel then checks the endpoint's own.
        tokio::spawn(async move {
            let connected = tokio::time::timeout(timeout, connect(&mesh, listener, Expected::TrustDomain)).await;
            with_pool(|pool| match connected {
                Ok(Ok(pooled)) => {
                    pool.blocked.remove(&listener);
                    let shared = pool.connections.entry(listener).or_default().clone();
                    if let Ok(mut slot) = shared.try_lock() {
                        *slot = Some(pooled);
                    }
                }
                _ => {
                    if let Some(blocked) = pool.blocked.get_mut(&listener) {
                        blocked.probing = false;
                        blocked.next_probe = Instant::now() + limits::QUIC_PROBE_INTERVAL;
                    }
                }
            });
        });
    }
    true
}

/// Drops this worker's connection to `listener`.
fn forget(listener: SocketAddr) {
    with_pool(|pool| pool.connections.remove(&listener));
}

/// A tunnel on the pooled connection to `listener` (connected first if needed).
async fn open(
    mesh: &Arc<MeshTls>,
    cluster: &Cluster,
    endpoint: SocketAddr,
    listener: SocketAddr,
) -> Result<QuicUpstream, OpenError> {
    let expected = cluster.mesh.as_ref().map_or(Expected::TrustDomain, |peers| peers.expected(endpoint));
    let Some(shared) = with_pool(|pool| pool.connections.entry(listener).or_default().clone()) else {
        return Err(OpenError::Unreachable("the worker is shutting down".into()));
    };
    let (mut send, held) = {
        let mut slot = shared.lock().await;
        let fits = slot
            .as_ref()
            .is_some_and(|pooled| pooled.connection.close_reason().is_none() && mesh.accepts(expected, &pooled.peer));
        if !fits {
            *slot = Some(connect(mesh, listener, expected).await?);
        }
        let Some(pooled) = slot.as_mut() else {
            return Err(OpenError::Unreachable("no connection".into()));
        };
        pooled.expires = Instant::now() + cluster.idle_timeout;
        (pooled.send.clone(), pooled.tunnels.clone())
    };
    let request = headers::tunnel_connect(endpoint, true);
    let unreachable = |error: &dyn std::fmt::Display| OpenError::Unreachable(error.to_string());
    let mut stream = send.send_request(request).await.map_err(|e| unreachable(&e))?;
    let response = stream.recv_response().await.map_err(|e| unreachable(&e))?;
    if response.status() != StatusCode::OK {
        return Err(OpenError::Refused(response.status()));
    }
    let (send, recv) = stream.split();
    Ok(Held::new(TunnelStream::new(send, recv), held))
}

/// A QUIC connection to `listener` whose peer proves `expected`, with HTTP/3 running on it.
async fn connect(mesh: &Arc<MeshTls>, listener: SocketAddr, expected: Expected<'_>) -> Result<Pooled, OpenError> {
    let config = mesh.quic_client(super::mesh_transport()).map_err(OpenError::Tls)?;
    let endpoint = client_endpoint(listener).map_err(|e| OpenError::Unreachable(e.to_string()))?;
    // An IP address as the server name: no SNI is sent, and the verifier ignores the name.
    let connecting = endpoint
        .connect_with(config, listener, &listener.ip().to_string())
        .map_err(|e| OpenError::Unreachable(e.to_string()))?;
    let connection = match connecting.await {
        Ok(connection) => connection,
        Err(error) => {
            if let quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_) = error {
                // The peer answered and refused the handshake: a TLS failure, not a blocked path.
                mesh.stats().handshake("outbound", "handshake");
                return Err(OpenError::Tls(TlsError::Handshake(std::io::Error::other(error))));
            }
            return Err(OpenError::Unreachable(error.to_string()));
        }
    };
    let peer = mesh.quic_peer(&connection, "outbound", Some(expected)).map_err(OpenError::Tls)?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(connection.clone()))
        .await
        .map_err(|e| OpenError::Unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let closed = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        if !closed.is_h3_no_error() {
            debug!(%listener, error = %closed, "quic: mesh connection ended");
        }
    });
    Ok(Pooled { connection, send, peer, tunnels: Arc::new(()), expires: Instant::now(), counted: (0, 0) })
}

/// This worker's client endpoint for `peer`'s address family.
fn client_endpoint(peer: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let index = usize::from(peer.is_ipv6());
    let found = with_pool(|pool| pool.endpoints[index].clone()).flatten();
    if let Some(endpoint) = found {
        return Ok(endpoint);
    }
    let bind: SocketAddr = if peer.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let endpoint = quinn::Endpoint::client(bind)?;
    with_pool(|pool| pool.endpoints[index] = Some(endpoint.clone()));
    Ok(endpoint)
}

/// Closes this worker's connections that carried no tunnel for their cluster's idle timeout, or
/// died, and reports the rest into `reports`. Runs every `TIMER_TICK` on every worker.
pub fn sweep(reports: &PathReports) {
    let now = Instant::now();
    let worker = std::thread::current().name().unwrap_or("").to_owned();
    let mut paths = Vec::new();
    with_pool(|pool| {
        pool.connections.retain(|_, shared| match shared.try_lock() {
            Ok(mut slot) => {
                let done = slot.as_ref().is_some_and(|pooled| {
                    pooled.connection.close_reason().is_some()
                        || (pooled.expires <= now && Arc::strong_count(&pooled.tunnels) == 1)
                });
                if done && let Some(pooled) = slot.take() {
                    pooled.connection.close(0u32.into(), b"idle");
                }
                if let Some(pooled) = slot.as_mut() {
                    let stats = pooled.connection.stats();
                    let (sent, lost) = (stats.path.sent_packets, stats.path.lost_packets);
                    reports.count_packets(sent.saturating_sub(pooled.counted.0), lost.saturating_sub(pooled.counted.1));
                    pooled.counted = (sent, lost);
                    paths.push(PathReport {
                        peer: pooled.connection.remote_address(),
                        worker: worker.clone(),
                        state: "connected",
                        identity: Some(pooled.peer.as_str().to_owned()),
                        rtt: stats.path.rtt,
                        sent_packets: stats.path.sent_packets,
                        lost_packets: stats.path.lost_packets,
                        congestion_window: stats.path.cwnd,
                        tunnels: Arc::strong_count(&pooled.tunnels) - 1,
                    });
                }
                slot.is_some()
            }
            Err(_) => true,
        });
        for peer in pool.blocked.keys() {
            paths.push(PathReport {
                peer: *peer,
                worker: worker.clone(),
                state: "fallback",
                identity: None,
                rtt: std::time::Duration::ZERO,
                sent_packets: 0,
                lost_packets: 0,
                congestion_window: 0,
                tunnels: 0,
            });
        }
    });
    reports.set(worker, paths);
}
