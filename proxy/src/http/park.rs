//! Idle HTTP/1.1 connections parked: between requests a keep-alive connection holds its socket and
//! a few pointers, not a whole HTTP server.
//!
//! hyper's HTTP/1.1 server keeps what it allocated for as long as the connection lives: an 8 KiB
//! read buffer, a slot the size of a request's future, the last response's header map, its write
//! buffer. A client pool of thousands of idle keep-alive connections would hold all of that
//! (19 kB each, where nginx, which frees its buffers between requests, holds 0.5 kB). So
//! [`serve`] runs hyper on a connection only while it has work: once the connection has been
//! quiet for [`limits::H1_PARK_AFTER`] — no exchange open, the last response flushed, hyper
//! waiting on a read that found nothing, and no byte moved since — it shuts hyper down (which,
//! between requests, closes nothing on the wire), takes the socket back with any bytes hyper had
//! read but not used, and waits for the socket to become readable with nothing else held: on a
//! worker, a plain TCP socket waits in the worker's lot (`http::lot`) and the task ends; anything
//! else (a TLS session) waits in its task. When the next request arrives a new hyper connection
//! takes the socket. A parked connection still ends on the listener's header timeout (how long
//! hyper itself keeps an idle keep-alive connection), its idle timeout, or a drain.
//!
//! Whether hyper is between requests is read from the outside, from flags in [`Quiet`]: set by the
//! socket wrapper [`ParkableIo`] as hyper reads and writes, by `http::proxy` when an exchange
//! begins, by the response body when hyper drops it, and by the request body when it ends. A
//! request body the proxy never read to its end keeps the connection unparked (hyper drains or
//! closes it), and bytes of a next head that arrived first keep hyper running, so its header timeout
//! still stops slow clients.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper::service::{HttpService, service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use super::lot;
use crate::drain::DrainWatch;
use crate::http::body::{ProxyBody, RequestBody};
use crate::http::server::HttpConnection;
use crate::io::{self, DownstreamStream, Watched, idle_watch};
use crate::limits;
use crate::timer::Deadline;

/// What tells, from outside hyper, whether a connection is between requests. Written and read
/// only by the connection's own worker thread, so every access is a relaxed load or store.
#[derive(Debug, Default)]
pub(crate) struct Quiet {
    /// The connection is HTTP/1.1 and may park (HTTP/2 connections never do).
    enabled: AtomicBool,
    /// A response has been asked for and its body not yet dropped by hyper.
    response_open: AtomicBool,
    /// The request has a body not yet read to its end.
    body_open: AtomicBool,
    /// Counts exchanges, so that the end of an earlier request's body cannot mark a later one's.
    exchange: AtomicU32,
    /// hyper's last read found nothing to read.
    read_pending: AtomicBool,
    /// Bytes were written since the last completed flush.
    unflushed: AtomicBool,
    /// Bytes arrived since the last exchange ended: the start of a next request head.
    head_started: AtomicBool,
    /// hyper is being shut down to park the connection: its shutdown must not reach the socket.
    parking: AtomicBool,
}

impl Quiet {
    /// Whether this connection parks when idle (HTTP/1.1).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// hyper handed a request to the proxy; `has_body` if it has a body still to read.
    pub(crate) fn exchange_begins(&self, has_body: bool) {
        let exchange = self.exchange.load(Ordering::Relaxed).wrapping_add(1);
        self.exchange.store(exchange, Ordering::Relaxed);
        self.response_open.store(true, Ordering::Relaxed);
        self.body_open.store(has_body, Ordering::Relaxed);
        self.head_started.store(false, Ordering::Relaxed);
    }

    /// The number of the exchange under way, for [`Quiet::body_done`].
    pub(crate) fn exchange(&self) -> u32 {
        self.exchange.load(Ordering::Relaxed)
    }

    /// hyper dropped the response body: the response is written (perhaps not yet flushed).
    pub(crate) fn response_done(&self) {
        self.response_open.store(false, Ordering::Relaxed);
    }

    /// The request body of exchange number `exchange` was read to its end.
    pub(crate) fn body_done(&self, exchange: u32) {
        if self.exchange.load(Ordering::Relaxed) == exchange {
            self.body_open.store(false, Ordering::Relaxed);
        }
    }

    /// Whether hyper is waiting for a next request with nothing read, nothing to write.
    fn is_quiet(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
            && self.read_pending.load(Ordering::Relaxed)
            && !self.response_open.load(Ordering::Relaxed)
            && !self.body_open.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
            && !self.head_started.load(Ordering::Relaxed)
    }
}

/// Ends an exchange when dropped with the response body (see [`Quiet::response_done`]).
#[derive(Debug)]
pub(crate) struct ExchangeEnd(Arc<HttpConnection>);

impl ExchangeEnd {
    /// For a response on `connection`, when it is one that parks.
    pub(crate) fn of(connection: &Arc<HttpConnection>) -> Option<ExchangeEnd> {
        connection.quiet.enabled().then(|| ExchangeEnd(connection.clone()))
    }
}

impl Drop for ExchangeEnd {
    fn drop(&mut self) {
        self.0.quiet.response_done();
    }
}

/// The downstream stream as hyper sees it on a parkable connection: every read, write and flush
/// noted in the connection's [`Quiet`].
#[derive(Debug)]
pub(super) struct ParkableIo {
    stream: DownstreamStream,
    connection: Arc<HttpConnection>,
}

impl AsyncRead for ParkableIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let quiet = &this.connection.quiet;
        match polled {
            Poll::Pending => quiet.read_pending.store(true, Ordering::Relaxed),
            Poll::Ready(_) => {
                quiet.read_pending.store(false, Ordering::Relaxed);
                if buf.filled().len() > before && !quiet.response_open.load(Ordering::Relaxed) {
                    quiet.head_started.store(true, Ordering::Relaxed);
                }
            }
        }
        polled
    }
}

impl AsyncWrite for ParkableIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.connection.quiet.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.connection.quiet.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.connection.quiet.unflushed.store(false, Ordering::Relaxed);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.connection.quiet.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// hyper's HTTP/1.1 server on one connection, serving `S`.
type Served<S> = hyper::server::conn::http1::UpgradeableConnection<TokioIo<ParkableIo>, S>;

/// What the proxy's service is to hyper, named once for the functions that hold its connection.
trait Service:
    HttpService<Incoming, ResBody = ProxyBody, Error = Infallible, Future: Send> + Unpin + Send + 'static
{
}
impl<S> Service for S where
    S: HttpService<Incoming, ResBody = ProxyBody, Error = Infallible, Future: Send> + Unpin + Send + 'static
{
}

/// Serves one HTTP/1.1 connection until it ends, parked whenever it is quiet.
pub(super) async fn serve(mut stream: DownstreamStream, connection: Arc<HttpConnection>) {
    // Not in an HBONE tunnel: its HTTP/2 stream holds buffers of its own whatever hyper does, and
    // there is no socket to wait on alone.
    connection.quiet.enabled.store(!stream.is_tunnel(), Ordering::Relaxed);
    let mut drain = connection.data.drain.watch();
    let idle = idle_watch(&connection.meter, &connection.listener.stats, connection.listener.idle_timeout);
    tokio::pin!(idle);
    let mut draining = false;
    loop {
        // Boxed, so that a parked connection's task does not carry hyper's size.
        let mut served = Box::new(start(stream, &connection));
        let quiet_since = match run(&mut served, &connection, &mut drain, idle.as_mut(), &mut draining).await {
            Step::Ended => return,
            Step::Quiet(since) => since,
        };
        // Between requests: hyper closes at once, writing nothing; its socket comes back.
        connection.quiet.parking.store(true, Ordering::Relaxed);
        Pin::new(&mut *served).graceful_shutdown();
        // Were hyper not between requests after all, it would finish the exchange first (with
        // `Connection: close`): the idle timeout still bounds the wait.
        let finishing = std::future::poll_fn(|cx| Pin::new(&mut *served).poll(cx));
        let finished = tokio::select! {
            finished = finishing => finished,
            () = idle.as_mut() => return,
        };
        connection.quiet.parking.store(false, Ordering::Relaxed);
        let (io, read_buf) = match (finished, served.into_parts()) {
            (Ok(()), Some(parts)) => (parts.io, parts.read_buf),
            _ => return,
        };
        stream = io.into_inner().stream;
        if !read_buf.is_empty() {
            // Part of a next request was read: hyper goes on at once, its header timeout running.
            stream.replay_first(read_buf);
            connection.quiet.head_started.store(true, Ordering::Relaxed);
            continue;
        }
        // An empty buffer still holds hyper's read buffer: let it go before waiting.
        drop(read_buf);
        // On a worker, the connection waits in its lot and this task ends.
        let listener = &connection.listener;
        let until = quiet_since + listener.header_timeout.min(listener.idle_timeout);
        stream = match lot::park(stream, &connection, until.into_std()) {
            Ok(()) => return,
            Err(stream) => stream,
        };
        let wait = park(&mut stream, &connection, &mut drain, idle.as_mut(), quiet_since);
        if !wait.await {
            return;
        }
    }
}

/// A new hyper connection on `stream`.
fn start(stream: DownstreamStream, connection: &Arc<HttpConnection>) -> Served<impl Service> {
    let service = {
        let connection = connection.clone();
        service_fn(move |request: http::Request<Incoming>| {
            super::proxy(request.map(RequestBody::Hyper), connection.clone())
        })
    };
    let mut http1 = connection.data.server.http1.clone();
    http1.header_read_timeout(connection.listener.header_timeout);
    let io = TokioIo::new(ParkableIo { stream, connection: connection.clone() });
    http1.serve_connection(io, service).with_upgrades()
}

/// How a run of hyper on the connection ended.
enum Step {
    /// The connection is done: closed, failed, upgraded, timed out or drained.
    Ended,
    /// Quiet since the given instant: time to park.
    Quiet(tokio::time::Instant),
}

/// Runs hyper until the connection ends or has been quiet for `H1_PARK_AFTER`. A drain asks hyper
/// to finish (the request in flight completes with `Connection: close`); the idle timeout closes.
async fn run<S: Service, I: Future<Output = ()>>(
    served: &mut Served<S>,
    connection: &HttpConnection,
    drain: &mut DrainWatch,
    mut idle: Pin<&mut I>,
    draining: &mut bool,
) -> Step {
    enum Event {
        Drain,
        Idle,
    }
    let mut timer: Option<QuietTimer> = None;
    loop {
        let already_draining = *draining;
        let watchers = async {
            if already_draining {
                idle.as_mut().await;
                return Event::Idle;
            }
            tokio::select! {
                () = drain.signaled() => Event::Drain,
                () = idle.as_mut() => Event::Idle,
            }
        };
        tokio::pin!(watchers);
        let main = std::future::poll_fn(|cx| poll_quiet(served, connection, &mut timer, already_draining, cx));
        tokio::pin!(main);
        match io::watch(main, watchers).await {
            Watched::Main(Some(since)) => return Step::Quiet(since),
            Watched::Main(None) => return Step::Ended,
            Watched::Side(Event::Drain) => {
                *draining = true;
                Pin::new(&mut *served).graceful_shutdown();
            }
            Watched::Side(Event::Idle) => {
                debug!(listener = %connection.listener.name, "http connection idle timeout");
                return Step::Ended;
            }
        }
    }
}

/// The timer that parks a quiet connection: its deadline, and the connection's byte count when it
/// was set.
struct QuietTimer {
    deadline: Deadline,
    activity: u64,
}

/// Polls hyper; `Ready(None)` when it is done, `Ready(Some(since))` when the connection has been
/// quiet since `since`, for at least `H1_PARK_AFTER` with no byte moved. The timer is set when the
/// connection first turns quiet and polled only while it is, so a busy connection pays for setting
/// it (a clock read, a slot in the worker's alarms) once per `H1_PARK_AFTER`, not per request.
fn poll_quiet<S: Service>(
    served: &mut Served<S>,
    connection: &HttpConnection,
    timer: &mut Option<QuietTimer>,
    draining: bool,
    cx: &mut Context<'_>,
) -> Poll<Option<tokio::time::Instant>> {
    if let Poll::Ready(result) = Pin::new(&mut *served).poll(cx) {
        if let Err(error) = result {
            debug!(listener = %connection.listener.name, %error, "http connection ended with an error");
        }
        return Poll::Ready(None);
    }
    if draining || !connection.quiet.is_quiet() {
        return Poll::Pending;
    }
    let timer = timer.get_or_insert_with(|| QuietTimer {
        deadline: Deadline::at(tokio::time::Instant::now() + limits::H1_PARK_AFTER),
        activity: connection.meter.activity(),
    });
    while Pin::new(&mut timer.deadline).poll(cx).is_ready() {
        let now = connection.meter.activity();
        if now == timer.activity {
            return Poll::Ready(Some(timer.deadline.deadline() - limits::H1_PARK_AFTER));
        }
        // Bytes moved since the timer was set: quiet from now on.
        timer.activity = now;
        timer.deadline.reset(tokio::time::Instant::now() + limits::H1_PARK_AFTER);
    }
    Poll::Pending
}

/// Waits, holding only the socket, for the next request. `true` when the socket is readable (or
/// has replay bytes); `false` when the connection should close: drained, idle past the listener's
/// idle timeout, or waiting for a request head longer than its header timeout (as hyper would).
async fn park<I: Future<Output = ()>>(
    stream: &mut DownstreamStream,
    connection: &HttpConnection,
    drain: &mut DrainWatch,
    idle: Pin<&mut I>,
    quiet_since: tokio::time::Instant,
) -> bool {
    let header_timeout = Deadline::at(quiet_since + connection.listener.header_timeout);
    tokio::select! {
        readable = stream.readable() => readable.is_ok(),
        () = drain.signaled() => false,
        () = idle => false,
        () = header_timeout => {
            debug!(listener = %connection.listener.name, "idle keep-alive connection closed at the header timeout");
            false
        }
    }
}
