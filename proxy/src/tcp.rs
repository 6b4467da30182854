//! L4: connecting to endpoints, and forwarding opaque TCP both ways.
//!
//! [`proxy`] takes an accepted connection whose bytes the proxy will not interpret, picks an endpoint
//! from the cluster, connects (to a mesh cluster, inside mTLS or as an HBONE tunnel on a pooled
//! connection), replays any bytes detection consumed, and then [`forward`]s until both sides have
//! closed (or the idle timeout passes). On Linux the bytes never enter user space: each
//! direction moves them socket → pipe → socket with `splice(2)`, through a pipe it borrows from its
//! worker's spares only while bytes move (an idle connection holds its two sockets and nothing
//! more), and an end-of-stream on one side is passed on as a half-close (`shutdown(SHUT_WR)`) of
//! the other, so protocols that close their sending side and keep reading work. Elsewhere a
//! buffered copy does the same job.
//!
//! Sockets whose peer is the local app (the client side of an outbound listener, and any peer on this
//! host) get small fixed buffers, so spliced bytes are still in cache when the other side copies
//! them (`limits::LOCAL_SOCKET_BUFFER`); sockets across the network keep the kernel's autotuning.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
#[cfg(target_os = "linux")]
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use crate::balance::EndpointState;
use crate::balance::Observed;
use crate::connect::{ConnectError, connect};
use crate::failure::Failure;
use crate::http::client::{self, ClientSettings, HboneTunnel};
use crate::http::error::ProxyError;
use crate::io::{DownstreamStream, Meter, idle_watch};
use crate::limits;
use crate::quic::{
    self,
    client::{Opened, QuicUpstream},
};
use crate::state::cluster::Cluster;
use crate::state::{Direction, ListenerConfig};
use crate::telemetry::access_log::{AccessLog, Entry};
use crate::tls::{Alpn, ClientStream, TlsError};
use remora_control_api::identity::SpiffeId;
use tokio_util::either::Either;

/// An opaque connection as it reaches [`proxy`].
#[derive(Debug)]
pub enum Downstream {
    /// A plain socket, and the bytes detection already read from it (sent first).
    Plain(TcpStream, Bytes),
    /// TCP inside mesh TLS from a peer sidecar, terminated here: the peer's address and identity.
    Mesh(DownstreamStream, Option<SocketAddr>, SpiffeId),
}

/// Proxies one opaque connection to `cluster` until both sides close or it sits idle, then writes
/// its access log line if there is an access log.
///
/// The connection is closed without a word if the cluster has no endpoint or the connect (or, to a
/// mesh cluster, the mTLS handshake with the endpoint's sidecar, or the HBONE tunnel, made with
/// `settings`' identity) fails: there is no
/// protocol in which to say why, so the reason goes to the debug log, the cluster's counters and the
/// access log's `response_flags`. Plain to plain is spliced in the kernel; when either side is TLS
/// the bytes are copied through user space, where the TLS records are made and read.
pub async fn proxy(
    downstream: Downstream,
    cluster: Arc<Cluster>,
    original_destination: Option<SocketAddr>,
    listener: &ListenerConfig,
    meter: &Arc<Meter>,
    settings: &ClientSettings,
    access_log: Option<&AccessLog>,
) {
    let peer = match &downstream {
        Downstream::Plain(socket, _) => socket.peer_addr().ok(),
        Downstream::Mesh(_, peer, _) => *peer,
    };
    let run = Relay { cluster: &cluster, original_destination, listener, meter, settings };
    // Kept past the relay, which takes the stream: only when there is a line to write. (One relay
    // future either way: the task holds it, idle or not, for the connection's life.)
    let logging = access_log.map(|log| {
        let peer_identity = match &downstream {
            Downstream::Mesh(_, _, identity) => Some(identity.clone()),
            Downstream::Plain(..) => None,
        };
        (log, peer_identity, std::time::SystemTime::now(), std::time::Instant::now())
    });
    let (endpoint, flag) = run.relay(downstream, peer).await;
    let Some((log, peer_identity, start, started)) = logging else { return };
    let entry = Entry {
        start: Some(start),
        duration: started.elapsed(),
        protocol: "tcp",
        listener: &listener.name,
        direction: listener.direction.label(),
        bytes_received: Some(meter.received()),
        bytes_sent: Some(meter.sent()),
        cluster: Some(&cluster.name),
        endpoint,
        peer,
        peer_identity: peer_identity.as_ref().map(SpiffeId::as_str),
        flags: flag,
        ..Entry::default()
    };
    log.write(&entry, false);
}

/// One connection's relay and what it needs.
struct Relay<'a> {
    cluster: &'a Cluster,
    original_destination: Option<SocketAddr>,
    listener: &'a ListenerConfig,
    meter: &'a Arc<Meter>,
    settings: &'a ClientSettings,
}

/// A relayed connection's upstream side: plain TCP, or to a mesh cluster, mutual TLS or an HBONE
/// tunnel (over TCP or QUIC). Held inline by the connection's task for its whole life, idle or not:
/// a TLS session (1 kB and more) is boxed, as most relays have none.
type Upstream = Either<TcpStream, Either<Box<ClientStream>, Either<HboneTunnel, Box<QuicUpstream>>>>;

impl Relay<'_> {
    /// The connection's life: the endpoint it went to, and what cut it short (an `x-remora-error`
    /// style name), if anything did.
    async fn relay(
        &self,
        downstream: Downstream,
        peer: Option<SocketAddr>,
    ) -> (Option<SocketAddr>, Option<&'static str>) {
        let Relay { cluster, original_destination, listener, meter, .. } = *self;
        let Some(picked) = cluster.pick(original_destination, None, peer, &[]) else {
            debug!(listener = %listener.name, cluster = %cluster.name, "tcp: no endpoint; closing");
            return (None, Some("no_healthy_upstream"));
        };
        let endpoint = picked.address;
        // The connection holds its place under max_connections (and, for least_request and ewma,
        // counts as active on its endpoint) until it closes.
        let _slot = match cluster.breakers.connection(&cluster.stats.breakers) {
            Ok(slot) => slot,
            Err(breaker) => {
                debug!(listener = %listener.name, cluster = %cluster.name, breaker = breaker.as_str(), "tcp: overflow; closing");
                return (Some(endpoint), Some("upstream_overflow"));
            }
        };
        let state = picked.member.and_then(|member| member.state.shared());
        let _active = state.as_ref().filter(|_| cluster.counts_active).map(|state| state.start());
        // Boxed: connecting (a TLS handshake, a tunnel's CONNECT) takes kilobytes the connection
        // holds no more once it is open.
        let upstream = match Box::pin(self.open(endpoint, state.as_deref())).await {
            Ok(upstream) => upstream,
            Err(flag) => return (Some(endpoint), Some(flag)),
        };
        // (No tuple to match on: it would be kept beside the relay for the connection's life.)
        let flag = match downstream {
            Downstream::Plain(socket, replay) => match upstream {
                Either::Left(upstream) => self.splice(socket, replay, upstream).await,
                upstream => self.copy(DownstreamStream::new(socket, replay, meter.clone()), upstream).await,
            },
            Downstream::Mesh(stream, ..) => self.copy(stream, upstream).await,
        };
        (Some(endpoint), flag)
    }

    /// Connects to `endpoint`: plain TCP; to a mesh cluster, a tunnel on the pooled QUIC connection
    /// to its host (falling back to TCP when QUIC does not get through), TCP inside mutual TLS to the
    /// endpoint's sidecar, or a tunnel on the pooled HBONE connection to its host. For opaque TCP,
    /// opening the connection is all there is to judge an endpoint by (outlier detection counts a
    /// failure as a gateway error). On failure: the access log's name for it.
    async fn open(&self, endpoint: SocketAddr, state: Option<&EndpointState>) -> Result<Upstream, &'static str> {
        let Relay { cluster, listener, settings, .. } = *self;
        let started = std::time::Instant::now();
        if let Some(port) = cluster.mesh.as_ref().and_then(|peers| peers.quic_port) {
            let opening = Box::pin(quic::client::open_tunnel(settings, cluster, endpoint, port));
            match opening.await {
                Ok(Opened::Tunnel(tunnel)) => {
                    self.observe(state, None, started);
                    return Ok(Either::Right(Either::Right(Either::Right(tunnel))));
                }
                // On to the cluster's TCP transport.
                Ok(Opened::FallBack) => {}
                Err(error) => {
                    self.observe(state, Some(error.failure()), started);
                    debug!(listener = %listener.name, cluster = %cluster.name, %error, "tcp: quic tunnel failed; closing");
                    return Err(error.status_and_reason().1);
                }
            }
        }
        if let Some(port) = cluster.mesh.as_ref().and_then(|peers| peers.hbone_port) {
            let opening = Box::pin(client::open_tunnel(settings, cluster, endpoint, port));
            let opened = opening.await;
            self.observe(state, opened.as_ref().err().map(ProxyError::failure), started);
            return opened.map(|tunnel| Either::Right(Either::Right(Either::Left(tunnel)))).map_err(|error| {
                debug!(listener = %listener.name, cluster = %cluster.name, %error, "tcp: hbone tunnel failed; closing");
                error.status_and_reason().1
            });
        }
        let connected = connect(endpoint, cluster.connect_timeout, &cluster.stats).await;
        self.observe(state, connected.as_ref().err().map(ConnectError::failure), started);
        let upstream = connected.map_err(|error| {
            debug!(listener = %listener.name, cluster = %cluster.name, %error, "tcp: closing");
            if matches!(error, ConnectError::Timeout(_)) { "connect_timeout" } else { "connect_failed" }
        })?;
        let Some(peers) = &cluster.mesh else {
            return Ok(Either::Left(upstream));
        };
        let secured = match &settings.mesh {
            Some(mesh) => mesh.connect(upstream, endpoint, Alpn::Tcp, peers.expected(endpoint)).await,
            None => Err(TlsError::NoIdentity),
        };
        match secured {
            Ok((tls, _)) => Ok(Either::Right(Either::Left(Box::new(tls)))),
            Err(error) => {
                debug!(listener = %listener.name, cluster = %cluster.name, %error, "tcp: mesh handshake failed; closing");
                Err("upstream_tls")
            }
        }
    }

    /// Tells the endpoint's outlier detection and balancer how opening a connection to it went
    /// (`failure`: none when it opened).
    fn observe(&self, state: Option<&EndpointState>, failure: Option<Failure>, started: std::time::Instant) {
        let observed = match failure {
            None => Some(Observed::Success),
            Some(failure) => Observed::from_failure(failure),
        };
        if self.cluster.observes
            && let (Some(state), Some(observed)) = (state, observed)
        {
            self.cluster.observe(state, observed, started, std::time::Instant::now());
        }
    }

    /// Plain to plain, in the kernel.
    async fn splice(&self, downstream: TcpStream, replay: Bytes, mut upstream: TcpStream) -> Option<&'static str> {
        let Relay { cluster, listener, meter, .. } = *self;
        if !replay.is_empty() {
            if let Err(error) = upstream.write_all(&replay).await {
                debug!(cluster = %cluster.name, %error, "tcp: upstream write failed");
                return Some("upstream_reset");
            }
            cluster.stats.tcp_bytes_sent.inc_by(replay.len() as u64);
        }
        // The side (or sides) facing the local app get small fixed buffers: see LOCAL_SOCKET_BUFFER.
        if listener.direction == Direction::Outbound || is_same_host(&downstream) {
            fit_for_local_peer(&downstream);
        }
        if is_same_host(&upstream) {
            fit_for_local_peer(&upstream);
        }
        let stats = &cluster.stats;
        let to_upstream = |n: usize| {
            meter.add_received(n);
            stats.tcp_bytes_sent.inc_by(n as u64);
        };
        let to_downstream = |n: usize| {
            meter.add_sent(n);
            stats.tcp_bytes_received.inc_by(n as u64);
        };
        tokio::select! {
            result = forward(&downstream, &upstream, &to_upstream, &to_downstream) => {
                if let Err(error) = result {
                    debug!(listener = %listener.name, cluster = %cluster.name, %error, "tcp: connection ended with an error");
                    return Some("connection_reset");
                }
                None
            }
            () = idle_watch(meter, &listener.stats, listener.idle_timeout) => {
                debug!(listener = %listener.name, cluster = %cluster.name, "tcp: idle timeout");
                Some("idle_timeout")
            }
        }
    }

    /// Either side TLS: copied through user space, half-closes passed on (a TLS side's as its
    /// close_notify). The downstream stream meters as it goes; the cluster's byte counters are
    /// added when the connection ends.
    async fn copy(&self, mut downstream: DownstreamStream, mut upstream: Upstream) -> Option<&'static str> {
        let Relay { cluster, listener, meter, .. } = *self;
        // Through a tunnel every write is an HTTP/2 DATA frame: larger ones cost less per byte.
        let tunnelled = downstream.is_tunnel() || matches!(upstream, Either::Right(Either::Right(_)));
        let size = if tunnelled { limits::TUNNEL_COPY_BUFFER } else { limits::COPY_BUFFER };
        let copied = crate::relay::copy_both(&mut downstream, &mut upstream, size);
        tokio::select! {
            result = copied => match result {
                Ok((sent, received)) => {
                    cluster.stats.tcp_bytes_sent.inc_by(sent);
                    cluster.stats.tcp_bytes_received.inc_by(received);
                    None
                }
                Err(error) => {
                    debug!(listener = %listener.name, cluster = %cluster.name, %error, "tcp: connection ended with an error");
                    Some("connection_reset")
                }
            },
            () = idle_watch(meter, &listener.stats, listener.idle_timeout) => {
                debug!(listener = %listener.name, cluster = %cluster.name, "tcp: idle timeout");
                Some("idle_timeout")
            }
        }
    }
}

/// Moves bytes both ways between `a` and `b` until each side has sent its end-of-stream, passing each
/// on as a half-close. The first error ends both directions. `a_to_b` and `b_to_a` are told how many
/// bytes moved, as they move.
#[cfg(target_os = "linux")]
pub fn forward<'a>(
    a: &'a TcpStream,
    b: &'a TcpStream,
    a_to_b: &'a (dyn Fn(usize) + Sync),
    b_to_a: &'a (dyn Fn(usize) + Sync),
) -> impl Future<Output = io::Result<()>> + 'a {
    let mut ways = [OneWay::default(), OneWay::default()];
    std::future::poll_fn(move |cx| {
        let [there, back] = &mut ways;
        let there = there.poll(cx, a, b, a_to_b)?;
        let back = back.poll(cx, b, a, b_to_a)?;
        if there.is_ready() && back.is_ready() { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
}

#[cfg(not(target_os = "linux"))]
pub async fn forward(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &(dyn Fn(usize) + Sync),
    b_to_a: &(dyn Fn(usize) + Sync),
) -> io::Result<()> {
    tokio::try_join!(one_way(a, b, a_to_b), one_way(b, a, b_to_a)).map(|_| ())
}

/// Whether the socket's peer is on this host: a loopback address, or the socket's own address (a
/// pod reaching itself by its IP).
fn is_same_host(stream: &TcpStream) -> bool {
    match (stream.peer_addr(), stream.local_addr()) {
        (Ok(peer), Ok(local)) => peer.ip().is_loopback() || peer.ip() == local.ip(),
        _ => false,
    }
}

/// Gives a socket to a same-host peer fixed buffers of `LOCAL_SOCKET_BUFFER` bytes. Failure only
/// means the kernel keeps autotuning.
fn fit_for_local_peer(stream: &TcpStream) {
    let socket = socket2::SockRef::from(stream);
    let _ = socket.set_recv_buffer_size(crate::limits::LOCAL_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(crate::limits::LOCAL_SOCKET_BUFFER);
}

/// Signals end-of-stream to `to`'s peer. A peer that is already gone is not an error here: the other
/// direction will see it.
fn half_close(to: &TcpStream) {
    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
}

/// A pipe a direction of a spliced connection moves its bytes through, and what it holds.
#[cfg(target_os = "linux")]
struct Pipe {
    out: std::os::fd::OwnedFd,
    into: std::os::fd::OwnedFd,
    capacity: usize,
}

#[cfg(target_os = "linux")]
thread_local! {
    /// Empty pipes no connection of this thread holds right now (see `one_way`).
    static SPARE_PIPES: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty pipe: a spare of this thread's if it has one, else a new one.
#[cfg(target_os = "linux")]
fn borrow_pipe() -> io::Result<Pipe> {
    use rustix::pipe::{PipeFlags, fcntl_setpipe_size, pipe_with};
    if let Some(pipe) = SPARE_PIPES.with_borrow_mut(Vec::pop) {
        return Ok(pipe);
    }
    let (out, into) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    // A refused resize (per-user pipe limits) leaves the default 64 KiB pipe, which works too.
    let capacity = fcntl_setpipe_size(&into, crate::limits::SPLICE_PIPE_SIZE).unwrap_or(64 * 1024);
    Ok(Pipe { out, into, capacity })
}

/// Keeps an empty pipe for this thread's next splice, or closes it when the thread has spares
/// enough.
#[cfg(target_os = "linux")]
fn give_back_pipe(pipe: Pipe) {
    SPARE_PIPES.with_borrow_mut(|spares| {
        if spares.len() < crate::limits::SPARE_PIPES {
            spares.push(pipe);
        }
    });
}

/// One direction of a spliced connection: socket → pipe → socket. The pipe is borrowed when `from`
/// has bytes, and given back empty when `from` has no more for now: an idle connection holds no
/// pipe (two descriptors and a kernel pipe each way, which capped idle connections at a third of
/// the descriptor limit), and a busy one takes its pipe back from the thread's spares at each
/// wake-up, without a system call.
///
/// Polled by hand rather than written as an `async fn`: an idle connection's task holds both
/// directions for as long as it lives, and the futures of `readable()` and `async_io` (a waiter
/// each) made the two 768 bytes where these are 48. A direction is the only reader of `from` and
/// the only writer of `to`, so the sockets' own read and write wakers serve.
#[cfg(target_os = "linux")]
#[derive(Default)]
struct OneWay {
    /// The borrowed pipe, if any, and how many bytes it holds.
    held: Option<Pipe>,
    left: usize,
    done: bool,
}

#[cfg(target_os = "linux")]
impl OneWay {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        moved: &(dyn Fn(usize) + Sync),
    ) -> Poll<io::Result<()>> {
        use rustix::pipe::{SpliceFlags, splice};
        use tokio::io::Interest;

        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        while !self.done {
            if let Some(pipe) = self.held.as_ref().filter(|_| self.left > 0) {
                // Pipe to socket, until the pipe is empty again. (On an error the pipe is closed
                // with whatever it held.)
                ready!(to.poll_write_ready(cx))?;
                let left = self.left;
                match to.try_io(Interest::WRITABLE, || {
                    splice(&pipe.out, None, to, None, left, flags).map_err(io::Error::from)
                }) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(sent) => {
                        self.left -= sent;
                        moved(sent);
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => return Poll::Ready(Err(error)),
                }
                continue;
            }
            // Socket to pipe, once `from` is readable (a pipe still held was just emptied: try at
            // once); EAGAIN clears readiness, and the pipe goes back to the spares while `from`
            // waits.
            if self.held.is_none() {
                ready!(from.poll_read_ready(cx))?;
            }
            let pipe = match self.held.take() {
                Some(pipe) => pipe,
                None => borrow_pipe()?,
            };
            match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe.into, None, pipe.capacity, flags).map_err(io::Error::from)
            }) {
                Ok(0) => {
                    give_back_pipe(pipe);
                    half_close(to);
                    self.done = true;
                }
                Ok(filled) => {
                    self.left = filled;
                    self.held = Some(pipe);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => give_back_pipe(pipe),
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(not(target_os = "linux"))]
async fn one_way(from: &TcpStream, to: &TcpStream, moved: &(dyn Fn(usize) + Sync)) -> io::Result<()> {
    use tokio::io::Interest;

    let mut buffer = vec![0_u8; crate::limits::COPY_BUFFER_SIZE];
    loop {
        let n = from.async_io(Interest::READABLE, || from.try_read(&mut buffer)).await?;
        if n == 0 {
            half_close(to);
            return Ok(());
        }
        let mut written = 0;
        while written < n {
            written += to.async_io(Interest::WRITABLE, || to.try_write(&buffer[written..n])).await?;
        }
        moved(n);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// A loopback peer is on this host, and fitting its socket fixes the buffers (Linux reports
    /// twice the size asked, its bookkeeping share included).
    #[tokio::test]
    async fn same_host_sockets_get_the_local_buffer_size() {
        let (client, server) = pair().await;
        assert!(is_same_host(&client) && is_same_host(&server));
        fit_for_local_peer(&server);
        let socket = socket2::SockRef::from(&server);
        let size = crate::limits::LOCAL_SOCKET_BUFFER;
        assert!(socket.recv_buffer_size().unwrap() <= 2 * size);
        assert!(socket.send_buffer_size().unwrap() <= 2 * size);
        assert!(socket.recv_buffer_size().unwrap() >= size);
    }

    /// client ⇄ [a | proxy | b] ⇄ server: data both ways, then each side's EOF arrives separately.
    #[tokio::test]
    async fn forwards_both_ways_and_passes_half_closes_on() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let up = AtomicUsize::new(0);
        let down = AtomicUsize::new(0);
        let count_up = |n: usize| {
            up.fetch_add(n, Ordering::Relaxed);
        };
        let count_down = |n: usize| {
            down.fetch_add(n, Ordering::Relaxed);
        };
        let proxy = forward(&a, &b, &count_up, &count_down);
        let peers = async {
            let payload = vec![7_u8; 3 * 1024 * 1024];
            client.write_all(&payload).await.unwrap();
            client.shutdown().await.unwrap();
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.unwrap();
            assert_eq!(received.len(), payload.len(), "server sees the client's EOF after all bytes");
            // The server can still answer after the client stopped sending.
            server.write_all(b"late answer").await.unwrap();
            server.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, b"late answer");
        };
        let (result, ()) = tokio::join!(proxy, peers);
        result.unwrap();
        assert_eq!(up.load(Ordering::Relaxed), 3 * 1024 * 1024);
        assert_eq!(down.load(Ordering::Relaxed), 11);
    }
}
