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
            let served = connection.data.server.http2.serve_connection(TokioIo::new(stream), service);
            let listener = &connection.listener;
            let idle = idle_watch(&connection.meter, &listener.stats, listener.idle_timeout);
            // Boxed: an HTTP/2 connection's state is large, and the task serves HTTP/1.1 as well.
            let serving =
                Box::pin(drive(served, |c| c.graceful_shutdown(), &connection.data.drain, idle, &listener.name));
            serving.await;
        }
    }
}

/// Runs a server connection to its end, asking it to finish gracefully (`shut_down`) when draining
/// starts, and closing it when `idle` resolves (the connection sat idle too long). The drain signal
/// and the idle timer are only polled when they wake (`io::watch`), not on every request.
pub(crate) async fn drive<C>(
    connection: C,
    shut_down: impl Fn(Pin<&mut C>),
    drain: &Drain,
    idle: impl Future<Output = ()>,
    listener: &str,
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    enum Event {
        Drain,
        Idle,
    }
    let mut drain = drain.watch();
    tokio::pin!(connection, idle);
    let mut draining = false;
    loop {
        let already_draining = draining;
        let watchers = async {
            if already_draining {
                (&mut idle).await;
                return Event::Idle;
            }
            tokio::select! {
                () = drain.signaled() => Event::Drain,
                () = &mut idle => Event::Idle,
            }
        };
        tokio::pin!(watchers);
        match io::watch(connection.as_mut(), watchers).await {
            Watched::Main(result) => {
                if let Err(error) = result {
                    debug!(listener, %error, "http connection ended with an error");
                }
                return;
            }
            Watched::Side(Event::Drain) => {
                draining = true;
                shut_down(connection.as_mut());
            }
            Watched::Side(Event::Idle) => {
                debug!(listener, "http connection idle timeout");
                return;
            }
        }
    }
}
