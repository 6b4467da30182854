//! The downstream side of L7: hyper's server on one connection, with every limit applied.
//!
//! A connection arrives from `listener` already classified (and, over mesh TLS, with its peer's
//! identity); [`serve`] runs hyper's HTTP/1.1 or HTTP/2 server on it, with the limits from
//! `limits`, until the client closes, the idle timeout passes, or a drain asks it to finish
//! (HTTP/1.1: the request in flight completes with `Connection: close`; HTTP/2: GOAWAY, open
//! streams complete). Each request it reads goes to `http::proxy`, which always answers.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use remora_control_api::identity::SpiffeId;
use tracing::debug;

use crate::context::{DataPath, Open};
use crate::drain::DrainSignal;
use crate::http::body::RequestBody;
use crate::http::park::Quiet;
pub use crate::http::settings::ServerSettings;
use crate::io::{self, DownstreamStream, Meter};
use crate::limits;
use crate::listener::metrics::CallerStats;
use crate::state::ListenerConfig;
use crate::timer::Deadline;

/// The HTTP version a downstream connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerVersion {
    /// HTTP/1.1 (and 1.0).
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

/// One downstream HTTP connection, shared by its requests and any tunnel made from it. It counts as
/// open (for drain and the active-connections gauge) until the last of them is done.
#[derive(Debug)]
pub struct HttpConnection {
    /// Process-wide state: the live snapshot, drain, settings.
    pub data: Arc<DataPath>,
    /// The listener's config as of accept: name, counters, idle timeout.
    pub listener: Arc<ListenerConfig>,
    /// Bytes moved on the connection.
    pub meter: Arc<Meter>,
    /// Keeps the connection counted as open.
    pub open: Open,
    /// Who is calling and where they were going: what routing reads of the connection.
    pub origin: Origin,
    /// On an inbound listener, the calling workload's counters.
    pub caller: Option<Arc<CallerStats>>,
    /// Whether an HTTP/1.1 connection is between requests (`http::park`).
    pub(crate) quiet: Quiet,
}

/// What routing, authorization and balancing read of the connection a request came on.
#[derive(Debug)]
pub struct Origin {
    /// The listener's name: routing looks it up in the snapshot serving now.
    pub listener: Arc<str>,
    /// Where the client was going, for transparent listeners.
    pub original_destination: Option<SocketAddr>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The peer sidecar, when the connection is mesh mTLS. Boxed: most connections have none, and
    /// every connection holds its origin for as long as it lives, idle or not.
    mesh_peer: Option<Box<MeshPeer>>,
    /// The destination port authorization policies judge by: the original destination's, else the
    /// listener socket's own.
    pub destination_port: u16,
}

/// A peer sidecar's proven identity.
#[derive(Debug)]
struct MeshPeer {
    identity: SpiffeId,
    /// The same, as the value of the `x-remora-client-identity` header the app is given.
    header: Option<http::HeaderValue>,
}

impl Origin {
    /// A connection from `peer` on listener `listener`, with the peer sidecar's proven `identity`
    /// over mesh TLS.
    pub fn new(
        listener: Arc<str>,
        peer: SocketAddr,
        original_destination: Option<SocketAddr>,
        destination_port: u16,
        identity: Option<SpiffeId>,
    ) -> Origin {
        let mesh_peer = identity.map(|identity| {
            let header = http::HeaderValue::from_str(identity.as_str()).ok();
            Box::new(MeshPeer { identity, header })
        });
        Origin { listener, original_destination, peer, mesh_peer, destination_port }
    }

    /// The peer sidecar's identity, when the connection is mesh mTLS.
    pub fn peer_identity(&self) -> Option<&SpiffeId> {
        self.mesh_peer.as_ref().map(|peer| &peer.identity)
    }

    /// The peer sidecar's identity as the value of the `x-remora-client-identity` header the app
    /// is given.
    pub fn peer_header(&self) -> Option<&http::HeaderValue> {
        self.mesh_peer.as_ref().and_then(|peer| peer.header.as_ref())
    }
}

/// Serves one HTTP connection until it ends. `stream` replays whatever detection read.
pub async fn serve(stream: DownstreamStream, version: ServerVersion, connection: Arc<HttpConnection>) {
    match version {
        ServerVersion::Http1 => {
            // Not boxed: an idle HTTP/1.1 connection's task is this future, sized for it.
            super::park::serve(stream, connection).await;
        }
        // Boxed: the task is sized for an idle HTTP/1.1 connection. Callers that can let their
        // task end spawn an HTTP/2 connection on one of its own instead (`spawn_http2`).
        ServerVersion::Http2 => Box::pin(serve_http2(stream, connection)).await,
    }
}

/// Serves one HTTP/2 connection on a task of its own and returns at once. For callers whose task
/// holds nothing the connection needs: that task is sized for the largest path a connection may
/// take (and for an HTTP/1.1 connection between requests, see `listener`), and an HTTP/2
/// connection lives on a task sized for it alone (`serve_http2`), which spares it about 1 kB.
pub fn spawn_http2(stream: DownstreamStream, connection: Arc<HttpConnection>) {
    tokio::spawn(serve_http2(stream, connection));
}

/// Serves one HTTP/2 connection until it ends.
pub(crate) fn serve_http2(stream: DownstreamStream, connection: Arc<HttpConnection>) -> impl Future<Output = ()> {
    let service = {
        let connection = connection.clone();
        service_fn(move |request: http::Request<Incoming>| {
            super::proxy(request.map(RequestBody::Hyper), connection.clone())
        })
    };
    let served = connection.data.server.http2.serve_connection(TokioIo::new(stream), service);
    let drain = connection.data.drain.watch().into_signal();
    Driven::new(served, |c| c.graceful_shutdown(), drain, Metered::new(connection))
}

/// What [`Driven`] watches of a connection besides its protocol state.
pub(crate) trait Activity {
    /// Whether the connection did anything since it was last asked (and a chance to publish its
    /// counters): it is idle once this has said no for the idle timeout.
    fn moved(&mut self) -> bool;

    /// The connection's byte count, when it is one that may be tidied (an HTTP/2 server
    /// connection with a meter).
    fn bytes(&self) -> Option<u64>;

    /// How long the connection may show nothing before it is closed.
    fn idle_timeout(&self) -> Duration;

    /// The listener's name, for logs.
    fn listener(&self) -> &str;
}

/// A downstream HTTP connection's activity: the bytes its meter counted, published to the
/// listener's counters as they are asked for.
pub(crate) struct Metered {
    connection: Arc<HttpConnection>,
    last: u64,
}

impl Metered {
    pub(crate) fn new(connection: Arc<HttpConnection>) -> Metered {
        let last = connection.meter.activity();
        Metered { connection, last }
    }
}

impl Activity for Metered {
    fn moved(&mut self) -> bool {
        self.connection.meter.moved_since(&mut self.last, &self.connection.listener.stats)
    }

    fn bytes(&self) -> Option<u64> {
        Some(self.connection.meter.activity())
    }

    fn idle_timeout(&self) -> Duration {
        self.connection.listener.idle_timeout
    }

    fn listener(&self) -> &str {
        &self.connection.listener.name
    }
}

pin_project_lite::pin_project! {
    /// A server connection run to its end: asked to finish gracefully (`shut_down`) when draining
    /// starts, closed once its [`Activity`] has shown nothing for its idle timeout.
    ///
    /// A connection that reports bytes (`Activity::bytes`, an HTTP/2 one) gets one tidying poll
    /// once no byte has moved for `limits::H2_TIDY_AFTER`, in which h2 frees its read, write and
    /// Huffman buffers, its stream and frame slabs, and the spare room of its HPACK tables
    /// (`h2::tidy`, Remora's patch in vendor/h2): an idle HTTP/2 connection then holds its protocol
    /// state and no buffers. The next byte moved re-arms the watch.
    ///
    /// Written out by hand rather than as an async function around `tokio::select!`, because it is
    /// most of what an idle HTTP/2 connection holds beside h2's state: one timer serves both the
    /// tidying and the idle timeout (every 10 ms until tidied, then every quarter of the idle
    /// timeout), and the drain signal and that timer are polled only when they wake the task
    /// (`io::SideWaker`), not on every request. A busy connection pays a flag check per wake-up
    /// and a timer check every 10 ms.
    pub(crate) struct Driven<C, S, A> {
        #[pin]
        connection: C,
        drain: DrainSignal,
        shut_down: S,
        activity: A,
        tick: Deadline,
        side: Arc<io::SideWaker>,
        // How long the activity has shown nothing, as of the last tick.
        quiet: Duration,
        // The byte count at the tidying poll, until a byte moves again.
        tidied_at: Option<u64>,
        draining: bool,
    }
}

impl<C, S, A> Driven<C, S, A>
where
    C: Future<Output = Result<(), hyper::Error>>,
    S: FnMut(Pin<&mut C>),
    A: Activity,
{
    pub(crate) fn new(connection: C, shut_down: S, drain: DrainSignal, activity: A) -> Self {
        let first = if activity.bytes().is_some() { TIDY_TICK } else { idle_tick(activity.idle_timeout()) };
        Driven {
            connection,
            drain,
            shut_down,
            activity,
            tick: Deadline::at(tokio::time::Instant::now() + first),
            side: io::SideWaker::new(),
            quiet: Duration::ZERO,
            tidied_at: None,
            draining: false,
        }
    }
}

/// How often a connection not yet tidied is asked whether it moved.
const TIDY_TICK: Duration = Duration::from_millis(10);

impl<C, S, A> Future for Driven<C, S, A>
where
    C: Future<Output = Result<(), hyper::Error>>,
    S: FnMut(Pin<&mut C>),
    A: Activity,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            if let Poll::Ready(result) = this.connection.as_mut().poll(cx) {
                if let Err(error) = result {
                    debug!(listener = this.activity.listener(), %error, "http connection ended with an error");
                }
                return Poll::Ready(());
            }
            if let Some(at) = *this.tidied_at
                && this.activity.bytes() != Some(at)
            {
                // Bytes moved since the tidying poll: watch for the next quiet spell.
                *this.tidied_at = None;
                *this.quiet = Duration::ZERO;
                this.tick.reset(tokio::time::Instant::now() + TIDY_TICK);
                this.side.set_woken();
            }
            if !this.side.take_woken(cx.waker()) {
                return Poll::Pending;
            }
            let side_waker = Waker::from(this.side.clone());
            let mut side = Context::from_waker(&side_waker);
            if !*this.draining && Pin::new(&mut *this.drain).poll(&mut side).is_ready() {
                *this.draining = true;
                (this.shut_down)(this.connection.as_mut());
                // Poll the connection (it sends its GOAWAY) and the timer again.
                this.side.set_woken();
                continue;
            }
            // Each time the timer goes off: has the connection moved since it last did? Then the
            // timer is set again, and polled so that it registers (or went off already).
            while Pin::new(&mut *this.tick).poll(&mut side).is_ready() {
                let idle_timeout = this.activity.idle_timeout();
                let tidying = this.tidied_at.is_none() && this.activity.bytes().is_some();
                let interval = if tidying { TIDY_TICK } else { idle_tick(idle_timeout) };
                if this.activity.moved() {
                    *this.quiet = Duration::ZERO;
                } else {
                    *this.quiet += interval;
                    if *this.quiet >= idle_timeout {
                        debug!(listener = this.activity.listener(), "http connection idle timeout");
                        return Poll::Ready(());
                    }
                }
                let mut next = interval;
                if tidying && *this.quiet >= limits::H2_TIDY_AFTER {
                    let connection = this.connection.as_mut();
                    if let Poll::Ready(result) = h2::tidy(|| connection.poll(cx)) {
                        if let Err(error) = result {
                            debug!(listener = this.activity.listener(), %error, "http connection ended with an error");
                        }
                        return Poll::Ready(());
                    }
                    *this.tidied_at = this.activity.bytes();
                    crate::memory::released();
                    next = idle_tick(idle_timeout);
                }
                this.tick.reset(tokio::time::Instant::now() + next);
            }
            return Poll::Pending;
        }
    }
}

/// How often a tidied connection is asked whether it moved: a quarter of its idle timeout, from
/// 10 ms to 15 s (as `io::quiet_for`).
fn idle_tick(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(15))
}
