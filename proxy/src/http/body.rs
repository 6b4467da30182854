//! The bodies that cross the proxy: [`UpstreamBody`] for requests sent to endpoints, [`ProxyBody`]
//! for every response sent downstream.
//!
//! One concrete type for each direction, so neither the server's service nor the clients need
//! boxing. A request body goes upstream as the client sent it (a [`ClientBody`], which counts its
//! bytes for the access log when the request is observed), or, when a retry, hedge or mirror may
//! need it again, through a [`ReplayBody`] reader of it. A response body streams from an HTTP/1.1 endpoint
//! (through the proxy's own client, which also returns the connection to the pool when the body
//! ends) or an HTTP/2 one, or is a short local reply. A streamed response may carry [`InFlight`]:
//! what counts its request as active (for the balancer and the circuit breakers) until the body is
//! done; and a route may put it under an idle timeout. Bodies stream frame by frame; none is held
//! whole.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::balance::endpoint::ActiveRequest;
use crate::http::h1;
use crate::http::observe::{Finish, Observe};
use crate::http::park::ExchangeEnd;
use crate::http::replay::ReplayBody;
use crate::http::server::HttpConnection;
use crate::policy::breaker::Slot;
use crate::state::cluster::ClusterStats;
use crate::telemetry::trace::ClientSpan;
use crate::timer;

/// Errors a body can end with.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body as it arrives. When something observes the request (the access log,
/// a sampled trace), its data bytes are counted as they are read; otherwise it is the bare body. On
/// an HTTP/1.1 connection its end is told to the connection, which parks only between exchanges
/// (`http::park`).
#[derive(Debug)]
pub struct ClientBody {
    body: Incoming,
    observe: Option<Arc<Observe>>,
    /// The connection to tell of the end, and the number of the exchange this body belongs to.
    exchange: Option<(Arc<HttpConnection>, u32)>,
}

impl ClientBody {
    /// `body`, counted into `observe` if there is one: the body of the exchange `connection` is in.
    pub(crate) fn new(body: Incoming, observe: Option<&Arc<Observe>>, connection: &Arc<HttpConnection>) -> ClientBody {
        let quiet = &connection.quiet;
        let exchange = (quiet.enabled() && !body.is_end_stream()).then(|| (connection.clone(), quiet.exchange()));
        ClientBody { body, observe: observe.cloned(), exchange }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let (Some(observe), Poll::Ready(Some(Ok(frame)))) = (&this.observe, &polled)
            && let Some(data) = frame.data_ref()
        {
            observe.received(data.len());
        }
        let ended = matches!(polled, Poll::Ready(None)) || (polled.is_ready() && this.body.is_end_stream());
        if ended && let Some((connection, exchange)) = this.exchange.take() {
            connection.quiet.body_done(exchange);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body on its way to an endpoint.
#[derive(Debug)]
pub enum UpstreamBody {
    /// The client's body, read once.
    Direct(ClientBody),
    /// A reader of the client's body that can be replayed.
    Replay(ReplayBody),
    /// No body (the client sent none): every attempt can send it, nothing needs keeping.
    Empty,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Direct(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Replay(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Direct(body) => body.is_end_stream(),
            UpstreamBody::Replay(body) => body.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Direct(body) => body.size_hint(),
            UpstreamBody::Replay(body) => body.size_hint(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// What keeps a request counted as in flight until its response body is done.
#[derive(Debug, Default)]
pub struct InFlight {
    /// On its endpoint (least_request, ewma).
    pub active: Option<ActiveRequest>,
    /// On its cluster's `max_requests` breaker.
    pub slot: Option<Slot>,
    /// The answering attempt's span, for a traced request: it ends with the body.
    pub span: Option<Box<ClientSpan>>,
}

/// A response body: streamed from upstream, or made locally.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    /// Dropped with the body (before `finish`, so the attempt's span ends before the request's).
    /// Three pointers, `None` for clusters that count nothing and requests not traced.
    _in_flight: InFlight,
    /// The request's observers, told of each frame and of the end (`http::observe`).
    finish: Option<Box<Finish>>,
    /// On an HTTP/1.1 connection, ends the exchange when hyper drops the body (`http::park`).
    _exchange: Option<ExchangeEnd>,
}

#[derive(Debug)]
enum Kind {
    Http1(h1::Body<UpstreamBody>),
    Http2(Incoming),
    /// A complete body held in memory (a local reply); `None` once sent.
    Local(Option<Bytes>),
    /// Another body under a route's idle timeout (boxed: rare, and it holds a timer).
    Idle(Box<IdleBody>),
}

/// A body that fails if it sends nothing for `limit`. Each frame only notes the time; the timer is
/// moved on when it fires early, not on every frame (a timer-wheel update per frame would cost more
/// than the frame).
#[derive(Debug)]
struct IdleBody {
    inner: ProxyBody,
    limit: Duration,
    last_frame: tokio::time::Instant,
    timer: timer::Deadline,
    stats: Arc<ClusterStats>,
}

/// Why a response body was cut off.
#[derive(Debug, thiserror::Error)]
#[error("the response body sent nothing for the route's idle timeout of {0:?}")]
pub struct StreamIdle(Duration);

impl ProxyBody {
    /// A body streaming from an HTTP/1.1 endpoint.
    pub fn http1(body: h1::Body<UpstreamBody>) -> Self {
        ProxyBody { kind: Kind::Http1(body), _in_flight: InFlight::default(), finish: None, _exchange: None }
    }

    /// A body streaming from an HTTP/2 endpoint.
    pub fn http2(body: Incoming) -> Self {
        ProxyBody { kind: Kind::Http2(body), _in_flight: InFlight::default(), finish: None, _exchange: None }
    }

    /// A local body holding `bytes`.
    pub fn local(bytes: Bytes) -> Self {
        ProxyBody { kind: Kind::Local(Some(bytes)), _in_flight: InFlight::default(), finish: None, _exchange: None }
    }

    /// An empty local body.
    pub fn empty() -> Self {
        ProxyBody { kind: Kind::Local(None), _in_flight: InFlight::default(), finish: None, _exchange: None }
    }

    /// Cuts the body off (with an error, which resets the client's stream) when it sends nothing
    /// for `limit`; counted in `stats`.
    pub fn idle_timeout(self, limit: Duration, stats: Arc<ClusterStats>) -> Self {
        let last_frame = tokio::time::Instant::now();
        let timer = timer::Deadline::at(last_frame + limit);
        let idle = IdleBody { inner: self, limit, last_frame, timer, stats };
        ProxyBody { kind: Kind::Idle(Box::new(idle)), _in_flight: InFlight::default(), finish: None, _exchange: None }
    }

    /// Keeps `in_flight` until the body is dropped.
    pub fn hold(mut self, in_flight: InFlight) -> Self {
        self._in_flight = in_flight;
        self
    }

    /// Ends the exchange on its connection when the body is dropped.
    pub(crate) fn ends_exchange(&mut self, end: Option<ExchangeEnd>) {
        self._exchange = end;
    }

    /// Tells `finish` of the frames, and of the end when the body is dropped.
    pub(crate) fn finish(mut self, finish: Option<Box<Finish>>) -> Self {
        self.finish = finish;
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = this.poll_kind(cx);
        if let (Some(finish), Poll::Ready(Some(Ok(frame)))) = (&mut this.finish, &polled) {
            if let Some(data) = frame.data_ref() {
                finish.data(data.len());
            } else if let Some(trailers) = frame.trailers_ref() {
                finish.trailers(trailers);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Http1(body) => body.is_end_stream(),
            Kind::Http2(body) => body.is_end_stream(),
            Kind::Local(bytes) => bytes.is_none(),
            Kind::Idle(idle) => idle.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Http1(body) => body.size_hint(),
            Kind::Http2(body) => body.size_hint(),
            Kind::Local(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Idle(idle) => idle.inner.size_hint(),
        }
    }
}

impl ProxyBody {
    fn poll_kind(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.kind {
            Kind::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Kind::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Kind::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Idle(idle) => {
                let polled = idle.inner.poll_kind(cx);
                if polled.is_ready() {
                    idle.last_frame = tokio::time::Instant::now();
                    return polled;
                }
                while Pin::new(&mut idle.timer).poll(cx).is_ready() {
                    let due = idle.last_frame + idle.limit;
                    if due <= tokio::time::Instant::now() {
                        idle.stats.policy.idle_timeouts.inc();
                        return Poll::Ready(Some(Err(StreamIdle(idle.limit).into())));
                    }
                    // A frame came since the timer was set: it is due later.
                    idle.timer.reset(due);
                }
                Poll::Pending
            }
        }
    }
}
