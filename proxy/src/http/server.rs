//! The downstream side of L7: hyper's server on one connection, with every limit applied.
//!
//! A connection arrives from `listener` already classified (and, over mesh TLS, with its peer's
//! identity); [`serve`] runs hyper's HTTP/1.1 or HTTP/2 server on it, with the limits from
//! `limits`, until the client closes, the idle timeout passes, or a drain asks it to finish
//! (HTTP/1.1: the request in flight completes with `Connection: close`; HTTP/2: GOAWAY, open
//! streams complete). Each request it reads goes to `http::proxy`, which always answers.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use remora_control_api::identity::SpiffeId;
use tracing::debug;

use crate::context::{DataPath, Open};
use crate::drain::Drain;
use crate::http::body::RequestBody;
use crate::http::park::Quiet;
pub use crate::http::settings::ServerSettings;
use crate::io::{self, DownstreamStream, Meter, Watched, idle_watch};
use crate::limits;
use crate::listener::metrics::CallerStats;
use crate::state::ListenerConfig;

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
    /// The peer sidecar's identity, when the connection is mesh mTLS.
    pub peer_identity: Option<SpiffeId>,
    /// The same, as the value of the `x-remora-client-identity` header the app is given.
    pub peer_header: Option<http::HeaderValue>,
    /// The destination port authorization policies judge by: the original destination's, else the
    /// listener socket's own.
    pub destination_port: u16,
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
        Origin {
            listener,
            original_destination,
            peer,
            peer_header: identity.as_ref().and_then(|id| http::HeaderValue::from_str(id.as_str()).ok()),
            peer_identity: identity,
            destination_port,
        }
    }
}

/// Serves one HTTP connection until it ends. `stream` replays whatever detection read.
pub async fn serve(stream: DownstreamStream, version: ServerVersion, connection: Arc<HttpConnection>) {
    match version {
        ServerVersion::Http1 => {
            // Not boxed: an idle HTTP/1.1 connection's task is this future, sized for it.
            super::park::serve(stream, connection).await;
        }
        ServerVersion::Http2 => {
            let service = {
                let connection = connection.clone();
                service_fn(move |request: http::Request<Incoming>| {
                    super::proxy(request.map(RequestBody::Hyper), connection.clone())
                })
            };
            // Boxed: an HTTP/2 connection's state is large (1.5 kB), and the task, which serves
            // HTTP/1.1 as well, is sized for a parked HTTP/1.1 connection. The rest fits in it.
            let mut served = Box::pin(connection.data.server.http2.serve_connection(TokioIo::new(stream), service));
            let listener = &connection.listener;
            let idle = pin!(idle_watch(&connection.meter, &listener.stats, listener.idle_timeout));
            let drain = &connection.data.drain;
            let meter = Some(&*connection.meter);
            drive(served.as_mut(), |c| c.graceful_shutdown(), drain, idle, meter, &listener.name).await;
        }
    }
}

/// Runs a server connection to its end, asking it to finish gracefully (`shut_down`) when draining
/// starts, and closing it when `idle` resolves (the connection sat idle too long). The drain signal
/// and the timers are only polled when they wake (`io::watch`), not on every request.
///
/// With a `meter` (an HTTP/2 connection's), once no byte has moved for `limits::H2_TIDY_AFTER` the
/// connection gets one tidying poll, in which h2 frees its read, write and Huffman buffers and its
/// stream and frame slabs (`h2::tidy`, Remora's patch in vendor/h2): an idle HTTP/2 connection then
/// holds its protocol state and no buffers. The next byte moved re-arms the watch. A busy
/// connection pays one comparison per wake-up and a timer check every 10 ms.
///
/// Both futures come pinned by the caller: an async function keeps its arguments' slots beside the
/// locals it would pin them into, so taking them by value held an HTTP/2 connection's state twice.
pub(crate) async fn drive<C, I>(
    mut connection: Pin<&mut C>,
    shut_down: impl Fn(Pin<&mut C>),
    drain: &Drain,
    mut idle: Pin<&mut I>,
    meter: Option<&Meter>,
    listener: &str,
) where
    C: Future<Output = Result<(), hyper::Error>>,
    I: Future<Output = ()>,
{
    enum Event {
        Drain,
        Idle,
        Quiet,
    }
    let mut drain = drain.watch();
    let mut draining = false;
    // The meter's count at the last tidying poll, until a byte moves again.
    let mut tidied_at: Option<u64> = None;
    loop {
        let already_draining = draining;
        let watch_quiet = if tidied_at.is_none() { meter } else { None };
        let watchers = async {
            let quiet = async {
                let Some(meter) = watch_quiet else { return std::future::pending().await };
                let mut last = meter.activity();
                io::quiet_for(limits::H2_TIDY_AFTER, || {
                    let now = meter.activity();
                    std::mem::replace(&mut last, now) != now
                })
                .await;
            };
            if already_draining {
                tokio::select! {
                    () = idle.as_mut() => Event::Idle,
                    () = quiet => Event::Quiet,
                }
            } else {
                tokio::select! {
                    () = drain.signaled() => Event::Drain,
                    () = idle.as_mut() => Event::Idle,
                    () = quiet => Event::Quiet,
                }
            }
        };
        tokio::pin!(watchers);
        let watched = match (tidied_at, meter) {
            (Some(at), Some(meter)) => io::watch_while(connection.as_mut(), watchers, || meter.activity() == at).await,
            _ => Some(io::watch(connection.as_mut(), watchers).await),
        };
        match watched {
            // Bytes moved since the tidying poll: watch for the next quiet spell.
            None => tidied_at = None,
            Some(Watched::Main(result)) => {
                if let Err(error) = result {
                    debug!(listener, %error, "http connection ended with an error");
                }
                return;
            }
            Some(Watched::Side(Event::Drain)) => {
                draining = true;
                shut_down(connection.as_mut());
            }
            Some(Watched::Side(Event::Idle)) => {
                debug!(listener, "http connection idle timeout");
                return;
            }
            Some(Watched::Side(Event::Quiet)) => {
                let tidied = std::future::poll_fn(|cx| Poll::Ready(h2::tidy(|| connection.as_mut().poll(cx)))).await;
                if let Poll::Ready(result) = tidied {
                    if let Err(error) = result {
                        debug!(listener, %error, "http connection ended with an error");
                    }
                    return;
                }
                tidied_at = meter.map(Meter::activity);
            }
        }
    }
}
