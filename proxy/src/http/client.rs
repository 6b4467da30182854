//! Upstream HTTP connections, pooled per worker thread and per endpoint.
//!
//! A request enters [`send`] with its endpoint already chosen and leaves as the endpoint's response
//! (plus, for HTTP/1.1, the [`PoolTicket`] that returns the connection when the response body ends).
//!
//! Each worker thread runs one single-threaded runtime, so its pool is a plain thread-local: no lock,
//! no atomic, and a connection is only ever used by the thread that opened it. HTTP/1.1 connections
//! are kept idle in a stack per endpoint (the most recently used is reused first: it is the least
//! likely to have been closed by the server) up to `POOL_MAX_IDLE_PER_ENDPOINT`, and closed after the
//! cluster's idle timeout. HTTP/2 uses one multiplexed connection per endpoint per worker, opened by
//! the first request that needs it while the others wait for it.
//!
//! A pooled connection can turn out to be dead (the server closed it while idle). When hyper reports
//! that the request was not written, the request is sent again on the next connection; a request that
//! was written is never re-sent here, because the server may have acted on it.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::debug;

use crate::http::error::ProxyError;
use crate::limits;
use crate::state::cluster::Cluster;
use crate::tcp;

/// The HTTP version spoken to an endpoint for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge).
    Http2,
}

/// Connection settings for upstream connections, built once.
#[derive(Debug)]
pub struct ClientSettings {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        let mut h1 = http1::Builder::new();
        h1.max_buf_size(limits::H1_MAX_BUF_SIZE);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(limits::H2_STREAM_WINDOW)
            .initial_connection_window_size(limits::H2_CONNECTION_WINDOW)
            .max_send_buf_size(limits::H2_MAX_SEND_BUF_SIZE)
            .max_header_list_size(limits::H2_MAX_HEADER_LIST_SIZE)
            .max_pending_accept_reset_streams(limits::H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(limits::H2_MAX_LOCAL_ERROR_RESET_STREAMS);
        ClientSettings { http1: h1, http2: h2 }
    }
}

struct IdleConnection {
    sender: http1::SendRequest<Incoming>,
    expires: Instant,
}

/// The HTTP/2 connection to one endpoint, shared by this worker's requests. The async mutex makes
/// concurrent first requests wait for one connect instead of each opening a connection.
type SharedHttp2 = Arc<tokio::sync::Mutex<Option<Http2Connection>>>;

struct Http2Connection {
    sender: http2::SendRequest<Incoming>,
    expires: Instant,
}

#[derive(Default)]
struct Pool {
    // foldhash: probed twice per request; randomly seeded, so endpoints chosen by a client (the
    // original destinations of a pass-through cluster) cannot be picked to collide.
    http1: foldhash::HashMap<SocketAddr, Vec<IdleConnection>>,
    http2: foldhash::HashMap<SocketAddr, SharedHttp2>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
    /// This worker's clock as of its last [`tick`]. Idle deadlines need no finer grain than the
    /// tick, and a clock read per request is a measurable cost on the hot path.
    static CLOCK: Cell<Instant> = Cell::new(Instant::now());
}

fn coarse_now() -> Instant {
    CLOCK.try_with(Cell::get).unwrap_or_else(|_| Instant::now())
}

fn with_pool<R>(f: impl FnOnce(&mut Pool) -> R) -> Option<R> {
    // Fails only while the thread is being torn down; there is nothing to pool then.
    POOL.try_with(|pool| f(&mut pool.borrow_mut())).ok()
}

/// An HTTP/1.1 connection lent to one request; [`PoolTicket::release`] gives it back.
#[derive(Debug)]
pub struct PoolTicket {
    endpoint: SocketAddr,
    sender: http1::SendRequest<Incoming>,
    idle_timeout: Duration,
}

impl PoolTicket {
    /// Returns the connection to this worker's pool, to be reused until it has been idle for the
    /// cluster's idle timeout. A closed connection, or one over the pool's bound, is dropped.
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let expires = coarse_now() + self.idle_timeout;
        with_pool(|pool| {
            let idle = pool.http1.entry(self.endpoint).or_default();
            if idle.len() < limits::POOL_MAX_IDLE_PER_ENDPOINT {
                idle.push(IdleConnection { sender: self.sender, expires });
            }
        });
    }
}

/// An endpoint's response, and the ticket returning its connection (HTTP/1.1 only).
#[derive(Debug)]
pub struct Sent {
    /// The response head and streaming body.
    pub response: Response<Incoming>,
    /// Returns the connection once the body is done.
    pub ticket: Option<PoolTicket>,
}

/// Sends `request` to `endpoint`, reusing a pooled connection when one is alive.
///
/// `dedicated` asks for a fresh HTTP/1.1 connection that is never pooled (an `Upgrade` request takes
/// the connection over). The request must already be in the form `version` needs (see `headers`).
pub async fn send(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
    version: Version,
    request: Request<Incoming>,
    dedicated: bool,
) -> Result<Sent, ProxyError> {
    match version {
        Version::Http1 => send_http1(settings, cluster, endpoint, request, dedicated).await,
        // Boxed: the HTTP/2 path's future (connection lock, handshake) is twice the HTTP/1 one's,
        // and an unboxed one would be carried and copied by every HTTP/1 request too.
        Version::Http2 => {
            let sending = Box::pin(send_http2(settings, cluster, endpoint, request));
            sending.await
        }
    }
}

async fn send_http1(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
    mut request: Request<Incoming>,
    dedicated: bool,
) -> Result<Sent, ProxyError> {
    loop {
        let pooled = if dedicated { None } else { checkout_http1(endpoint) };
        let reused = pooled.is_some();
        let mut sender = match pooled {
            Some(sender) => sender,
            // Boxed: connecting is the cold path, and its future would otherwise enlarge (and be
            // copied with) every request's future. The box is bound in its own statement because
            // a temporary in an `.await` statement keeps its space in the state machine anyway.
            None => {
                let connecting = Box::pin(connect_http1(settings, cluster, endpoint));
                connecting.await?
            }
        };
        // A pooled connection is returned as soon as its last response ended; hyper may need a moment
        // (one turn of the connection task) before it takes the next request.
        if !sender.is_ready()
            && let Err(error) = sender.ready().await
        {
            if reused {
                continue;
            }
            return Err(ProxyError::Upstream(error));
        }
        match sender.try_send_request(request).await {
            Ok(response) => {
                let ticket = (!dedicated).then(|| PoolTicket { endpoint, sender, idle_timeout: cluster.idle_timeout });
                return Ok(Sent { response, ticket });
            }
            Err(mut error) => match error.take_message() {
                Some(unsent) if reused => {
                    debug!(%endpoint, "pooled connection was closed; sending on another");
                    request = unsent;
                }
                _ => return Err(ProxyError::Upstream(error.into_error())),
            },
        }
    }
}

/// The most recently pooled live connection to `endpoint`, discarding dead and expired ones.
fn checkout_http1(endpoint: SocketAddr) -> Option<http1::SendRequest<Incoming>> {
    with_pool(|pool| {
        let idle = pool.http1.get_mut(&endpoint)?;
        let now = coarse_now();
        while let Some(connection) = idle.pop() {
            if connection.expires > now && !connection.sender.is_closed() {
                return Some(connection.sender);
            }
        }
        None
    })
    .flatten()
}

async fn connect_http1(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
) -> Result<http1::SendRequest<Incoming>, ProxyError> {
    let stream = tcp::connect(endpoint, cluster.connect_timeout, &cluster.stats).await?;
    let (sender, connection) = settings.http1.handshake(TokioIo::new(stream)).await.map_err(ProxyError::Upstream)?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            debug!(%endpoint, %error, "upstream http/1 connection ended with an error");
        }
    });
    Ok(sender)
}

async fn send_http2(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Sent, ProxyError> {
    let Some(shared) = with_pool(|pool| pool.http2.entry(endpoint).or_default().clone()) else {
        return Err(ProxyError::NoEndpoint(cluster.name.clone()));
    };
    let mut force_new = false;
    loop {
        let mut sender = {
            let mut slot = shared.lock().await;
            let expires = coarse_now() + cluster.idle_timeout;
            match slot.as_mut() {
                Some(connection) if !force_new && !connection.sender.is_closed() => {
                    connection.expires = expires;
                    connection.sender.clone()
                }
                _ => {
                    let connecting = Box::pin(connect_http2(settings, cluster, endpoint));
                    let sender = connecting.await?;
                    *slot = Some(Http2Connection { sender: sender.clone(), expires });
                    sender
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
            Ok(response) => return Ok(Sent { response, ticket: None }),
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

async fn connect_http2(
    settings: &ClientSettings,
    cluster: &Cluster,
    endpoint: SocketAddr,
) -> Result<http2::SendRequest<Incoming>, ProxyError> {
    let stream = tcp::connect(endpoint, cluster.connect_timeout, &cluster.stats).await?;
    let (sender, connection) = settings.http2.handshake(TokioIo::new(stream)).await.map_err(ProxyError::Upstream)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%endpoint, %error, "upstream http/2 connection ended with an error");
        }
    });
    Ok(sender)
}

/// Advances this worker's pool clock and closes its pooled connections that have passed their idle
/// timeout or died. Runs every `POOL_TICK` on every worker.
pub fn tick() {
    let now = Instant::now();
    let _ = CLOCK.try_with(|clock| clock.set(now));
    with_pool(|pool| {
        pool.http1.retain(|_, idle| {
            idle.retain(|c| c.expires > now && !c.sender.is_closed());
            !idle.is_empty()
        });
        pool.http2.retain(|_, shared| match shared.try_lock() {
            Ok(mut slot) => {
                if slot.as_ref().is_some_and(|c| c.expires <= now || c.sender.is_closed()) {
                    *slot = None;
                }
                slot.is_some()
            }
            // A request is connecting right now; keep it.
            Err(_) => true,
        });
    });
}
