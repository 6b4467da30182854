//! The downstream connection as the HTTP server reads it, and the per-connection byte meter.
//!
//! [`DownstreamStream`] wraps an accepted socket (or the mesh TLS session terminated on it, or one
//! tunnel of an HBONE connection): it first replays any bytes protocol detection had to take out,
//! then reads and writes the socket itself, counting bytes into the connection's [`Meter`]. The
//! meter feeds two things: the listener's byte counters, and on an inbound listener the calling
//! workload's (flushed when the connection closes and whenever the idle check runs), and the idle
//! timeout, which [`idle_watch`] applies by noticing that the counts stopped moving. One atomic add
//! per read or write; no clock reads on the data path. Outbound, a tunnel opened on a pooled
//! connection (HBONE's, HBONE-over-QUIC's) comes back [`Held`]: its stream, and its place in that
//! connection's count of tunnels until it is dropped.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::listener::metrics::{CallerStats, ListenerStats};
use crate::quic::stream::InboundTunnel;
use crate::timer::Deadline;
use crate::tls::ServerStream;

/// Bytes moved on one connection, and how much of that the listener's counters have seen.
#[derive(Debug, Default)]
pub struct Meter {
    received: AtomicU64,
    sent: AtomicU64,
    flushed_received: AtomicU64,
    flushed_sent: AtomicU64,
    /// On an inbound listener, the calling workload, whose counters see what the listener's do.
    caller: OnceLock<Arc<CallerStats>>,
}

impl Meter {
    /// Counts the connection, and its bytes from now on, to `caller` (once: the first caller
    /// named stays).
    pub fn attribute(&self, caller: Arc<CallerStats>) {
        if self.caller.set(caller).is_ok()
            && let Some(caller) = self.caller.get()
        {
            caller.connections.inc();
        }
    }

    /// Counts bytes read from the client.
    pub fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts bytes written to the client.
    pub fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes written to the client so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Total bytes moved either way; idle detection only cares whether it changed.
    pub fn activity(&self) -> u64 {
        self.received.load(Ordering::Relaxed).wrapping_add(self.sent.load(Ordering::Relaxed))
    }

    /// Publishes what moved to the listener's counters, and says whether anything moved since
    /// the count was `last` (updated).
    pub fn moved_since(&self, last: &mut u64, stats: &ListenerStats) -> bool {
        self.flush(stats);
        let now = self.activity();
        std::mem::replace(last, now) != now
    }

    /// Adds what was moved since the last flush to the listener's counters.
    pub fn flush(&self, stats: &ListenerStats) {
        let received = self.received.load(Ordering::Relaxed);
        let sent = self.sent.load(Ordering::Relaxed);
        let before_received = self.flushed_received.swap(received, Ordering::Relaxed);
        let before_sent = self.flushed_sent.swap(sent, Ordering::Relaxed);
        let (received, sent) = (received.saturating_sub(before_received), sent.saturating_sub(before_sent));
        stats.bytes_received.inc_by(received);
        stats.bytes_sent.inc_by(sent);
        if let Some(caller) = self.caller.get() {
            caller.received.inc_by(received);
            caller.sent.inc_by(sent);
        }
    }
}

/// Resolves once `meter` shows no traffic for `timeout` (within a quarter of it), flushing the
/// meter into `stats` at each check so long-lived connections show up in metrics as they go. The
/// checks run on a `timer::Deadline` (a slot in the worker's alarms), not a tokio interval, which
/// would hold a boxed timer-wheel entry for every connection's life.
pub async fn idle_watch(meter: &Meter, stats: &ListenerStats, timeout: Duration) {
    let mut last = meter.activity();
    quiet_for(timeout, move || meter.moved_since(&mut last, stats)).await;
}

/// Resolves once `moved` (asked every quarter of `timeout`, from 10 ms to 15 s: whether anything
/// happened since it was last asked) has said no for `timeout`, on a `timer::Deadline`.
pub async fn quiet_for(timeout: Duration, mut moved: impl FnMut() -> bool) {
    let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(15));
    let mut check = Deadline::at(tokio::time::Instant::now() + tick);
    let mut quiet = Duration::ZERO;
    loop {
        (&mut check).await;
        if moved() {
            quiet = Duration::ZERO;
        } else {
            quiet += tick;
            if quiet >= timeout {
                return;
            }
        }
        check.reset(tokio::time::Instant::now() + tick);
    }
}

/// Which of [`watch`]'s two futures finished first.
#[derive(Debug)]
pub enum Watched<M, S> {
    /// The main future.
    Main(M),
    /// The watcher.
    Side(S),
}

/// Marks the watcher as woken and wakes the task: a task that polls its watchers only when they
/// woke it creates one, registers its own waker in `task` at each poll, and polls its watchers
/// with `Waker::from` it when `take_woken` says so.
#[derive(Debug)]
pub(crate) struct SideWaker {
    woken: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl SideWaker {
    /// A side waker, woken (so that the watchers are polled, and register, at the first poll).
    pub(crate) fn new() -> Arc<SideWaker> {
        Arc::new(SideWaker { woken: AtomicBool::new(true), task: Default::default() })
    }

    /// Registers the task's waker, and says whether the watchers woke since last asked.
    pub(crate) fn take_woken(&self, task: &Waker) -> bool {
        self.task.register(task);
        self.woken.swap(false, Ordering::AcqRel)
    }

    /// Has the watchers polled at the next `take_woken`.
    pub(crate) fn set_woken(&self) {
        self.woken.store(true, Ordering::Release);
    }
}

impl std::task::Wake for SideWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Runs `main` and `side` together until one finishes, polling `main` on every wake-up of the task
/// but `side` only when `side` itself was woken.
///
/// `tokio::select!` polls every branch on every wake-up; for a connection that wakes for each
/// request while its watchers (drain signal, idle timer) almost never have news, that was hundreds
/// of instructions per request spent asking them.
pub async fn watch<M: Future, S: Future>(main: Pin<&mut M>, side: Pin<&mut S>) -> Watched<M::Output, S::Output> {
    let mut main = main;
    let mut side = side;
    let signal = SideWaker::new();
    let side_waker = Waker::from(signal.clone());
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = main.as_mut().poll(cx) {
            return Poll::Ready(Watched::Main(output));
        }
        if signal.take_woken(cx.waker())
            && let Poll::Ready(output) = side.as_mut().poll(&mut Context::from_waker(&side_waker))
        {
            return Poll::Ready(Watched::Side(output));
        }
        Poll::Pending
    })
    .await
}

/// An accepted connection: detection's replay bytes first, then the socket (or the mesh TLS session
/// on it), metered. The meter counts the bytes the app-level protocol moved: plaintext, inside TLS.
#[derive(Debug)]
pub struct DownstreamStream {
    socket: Transport,
    replay: Bytes,
    meter: Arc<Meter>,
}

/// What carries a downstream connection's bytes.
#[derive(Debug)]
enum Transport {
    Plain(TcpStream),
    // Boxed: a TLS session is a few KiB, and most connections are plain.
    Tls(Box<ServerStream>),
    /// A tunnel of an HBONE connection: its HTTP/2 CONNECT stream, after the `200`.
    Tunnel(Box<TokioIo<Upgraded>>),
    /// A tunnel of an HBONE-over-QUIC connection: its HTTP/3 CONNECT stream, after the `200`.
    QuicTunnel(Box<InboundTunnel>),
}

/// A tunnel's stream, HBONE's or HBONE-over-QUIC's, once its `CONNECT` is answered: read first by
/// detection, then served as a downstream connection.
pub trait TunnelIo: AsyncRead + Unpin + Send + 'static {
    /// The downstream connection it carries, replaying `replay` (bytes detection already took from
    /// it, counted here) first.
    fn into_downstream(self, replay: Bytes, meter: Arc<Meter>) -> DownstreamStream;
}

impl TunnelIo for TokioIo<Upgraded> {
    fn into_downstream(self, replay: Bytes, meter: Arc<Meter>) -> DownstreamStream {
        DownstreamStream::tunnel(self, replay, meter)
    }
}

impl TunnelIo for InboundTunnel {
    fn into_downstream(self, replay: Bytes, meter: Arc<Meter>) -> DownstreamStream {
        meter.add_received(replay.len());
        DownstreamStream { socket: Transport::QuicTunnel(Box::new(self)), replay, meter }
    }
}

impl DownstreamStream {
    /// Wraps `socket`, replaying `replay` (bytes detection already took from it, counted here)
    /// before its own bytes.
    pub fn new(socket: TcpStream, replay: Bytes, meter: Arc<Meter>) -> Self {
        meter.add_received(replay.len());
        DownstreamStream { socket: Transport::Plain(socket), replay, meter }
    }

    /// Puts `bytes` (read from this stream and not used) back, to be read again first.
    pub fn replay_first(&mut self, bytes: Bytes) {
        if self.replay.is_empty() {
            self.replay = bytes;
        } else {
            let mut joined = bytes::BytesMut::with_capacity(bytes.len() + self.replay.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.replay);
            self.replay = joined.freeze();
        }
    }

    /// Waits until there is something to read: replay bytes, or the socket readable (data, an end
    /// or an error). Holds nothing but the socket's registration while it waits.
    pub async fn readable(&mut self) -> io::Result<()> {
        if !self.replay.is_empty() {
            return Ok(());
        }
        match &self.socket {
            Transport::Plain(stream) => stream.readable().await,
            Transport::Tls(stream) => stream.get_ref().0.readable().await,
            // A tunnel has no socket of its own to wait on (and never parks: see `http::park`).
            Transport::Tunnel(_) | Transport::QuicTunnel(_) => Ok(()),
        }
    }

    /// The socket itself, when this is a plain TCP connection with nothing left to replay.
    pub fn into_plain(self) -> Result<TcpStream, Self> {
        match self {
            DownstreamStream { socket: Transport::Plain(socket), replay, .. } if replay.is_empty() => Ok(socket),
            other => Err(other),
        }
    }

    /// Whether this is a tunnel of an HBONE connection (over TCP or QUIC).
    pub fn is_tunnel(&self) -> bool {
        matches!(self.socket, Transport::Tunnel(_) | Transport::QuicTunnel(_))
    }

    /// Wraps a mesh TLS session terminated on the connection.
    pub fn tls(session: ServerStream, meter: Arc<Meter>) -> Self {
        DownstreamStream { socket: Transport::Tls(Box::new(session)), replay: Bytes::new(), meter }
    }

    /// Wraps a tunnel an HBONE connection carries, replaying `replay` (bytes detection already
    /// took from it, counted here) first.
    pub fn tunnel(tunnel: TokioIo<Upgraded>, replay: Bytes, meter: Arc<Meter>) -> Self {
        meter.add_received(replay.len());
        DownstreamStream { socket: Transport::Tunnel(Box::new(tunnel)), replay, meter }
    }
}

macro_rules! on_transport {
    ($self:expr, $stream:ident => $body:expr) => {
        match &mut $self.socket {
            Transport::Plain($stream) => {
                let $stream = Pin::new($stream);
                $body
            }
            Transport::Tls($stream) => {
                let $stream = Pin::new(&mut **$stream);
                $body
            }
            Transport::Tunnel($stream) => {
                let $stream = Pin::new(&mut **$stream);
                $body
            }
            Transport::QuicTunnel($stream) => {
                let $stream = Pin::new(&mut **$stream);
                $body
            }
        }
    };
}

impl AsyncRead for DownstreamStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = on_transport!(this, stream => stream.poll_read(cx, buf));
        this.meter.add_received(buf.filled().len() - before);
        result
    }
}

impl AsyncWrite for DownstreamStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = on_transport!(this, stream => stream.poll_write(cx, buf));
        if let Poll::Ready(Ok(n)) = result {
            this.meter.add_sent(n);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = on_transport!(this, stream => stream.poll_write_vectored(cx, bufs));
        if let Poll::Ready(Ok(n)) = result {
            this.meter.add_sent(n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        match &self.socket {
            Transport::Plain(stream) => stream.is_write_vectored(),
            Transport::Tls(stream) => stream.is_write_vectored(),
            Transport::Tunnel(stream) => stream.is_write_vectored(),
            Transport::QuicTunnel(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_transport!(self, stream => stream.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_transport!(self, stream => stream.poll_shutdown(cx))
    }
}

/// A tunnel's stream, holding its place on the pooled connection that carries it: one clone of the
/// connection's count (`Arc::strong_count` less the pool's own), given back when dropped.
#[derive(Debug)]
pub struct Held<S> {
    stream: S,
    _place: Arc<()>,
}

impl<S> Held<S> {
    /// `stream`, counted by `place` (a clone of its connection's count).
    pub fn new(stream: S, place: Arc<()>) -> Held<S> {
        Held { stream, _place: place }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn replays_then_reads_and_meters_both_ways() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let meter = Arc::new(Meter::default());
        let mut stream = DownstreamStream::new(server, Bytes::from_static(b"he"), meter.clone());
        client.write_all(b"llo").await.unwrap();
        let mut got = [0_u8; 5];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        stream.write_all(b"back").await.unwrap();
        assert_eq!(meter.received.load(Ordering::Relaxed), 5);
        assert_eq!(meter.sent.load(Ordering::Relaxed), 4);
        let stats = crate::listener::metrics::ListenerMetrics::default().listener("l", "outbound");
        meter.flush(&stats);
        meter.flush(&stats);
        assert_eq!(stats.bytes_received.get(), 5);
        assert_eq!(stats.bytes_sent.get(), 4);
    }

    /// The main future is polled on every wake-up; the watcher only when it was woken itself.
    #[tokio::test]
    async fn watch_polls_the_watcher_only_when_it_wakes() {
        let main_polls = std::cell::Cell::new(0);
        let side_polls = std::cell::Cell::new(0);
        let main = std::future::poll_fn(|cx| {
            main_polls.set(main_polls.get() + 1);
            if main_polls.get() == 50 {
                return Poll::Ready("main");
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        let side = std::future::poll_fn(|_| {
            side_polls.set(side_polls.get() + 1);
            Poll::<()>::Pending
        });
        tokio::pin!(main, side);
        assert!(matches!(watch(main, side).await, Watched::Main("main")));
        assert_eq!(main_polls.get(), 50);
        assert_eq!(side_polls.get(), 1, "the watcher was polled on wake-ups that were not its own");

        let (sender, receiver) = tokio::sync::oneshot::channel::<u8>();
        let never = std::future::pending::<()>();
        let side = async move {
            tokio::task::yield_now().await;
            receiver.await.unwrap_or(0)
        };
        tokio::pin!(never, side);
        let _ = sender.send(7);
        assert!(matches!(watch(never, side).await, Watched::Side(7)));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_watch_fires_only_after_a_quiet_timeout() {
        let meter = Meter::default();
        let stats = crate::listener::metrics::ListenerMetrics::default().listener("l", "outbound");
        let timeout = Duration::from_secs(8);
        let start = tokio::time::Instant::now();
        let busy = async {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                meter.add_received(1);
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = idle_watch(&meter, &stats, timeout) => {}
            () = busy => unreachable!(),
        }
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(18) && waited <= Duration::from_secs(21), "{waited:?}");
    }
}
