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

use bytes::{Buf, Bytes};
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

/// The receiving half of an HTTP/3 request stream.
type H3Recv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;

/// Errors a body can end with.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A request body as the downstream server hands it over: hyper's (HTTP/1.1, HTTP/2), or an HTTP/3
/// request stream's (boxed: rarer, and larger).
#[derive(Debug)]
pub enum RequestBody {
    /// From hyper's server.
    Hyper(Incoming),
    /// From an HTTP/3 request stream.
    Http3(Box<RequestStreamBody>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            RequestBody::Http3(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(body) => body.is_end_stream(),
            RequestBody::Http3(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(body) => body.size_hint(),
            RequestBody::Http3(body) => body.size_hint(),
        }
    }
}

/// The client's request body as it arrives. When something observes the request (the access log,
/// a sampled trace), its data bytes are counted as they are read; otherwise it is the bare body. On
/// an HTTP/1.1 connection its end is told to the connection, which parks only between exchanges
/// (`http::park`).
#[derive(Debug)]
pub struct ClientBody {
    body: RequestBody,
    observe: Option<Arc<Observe>>,
    /// The connection to tell of the end, and the number of the exchange this body belongs to.
    exchange: Option<(Arc<HttpConnection>, u32)>,
}

impl ClientBody {
    /// `body`, counted into `observe` if there is one: the body of the exchange `connection` is in.
    pub(crate) fn new(
        body: RequestBody,
        observe: Option<&Arc<Observe>>,
        connection: &Arc<HttpConnection>,
    ) -> ClientBody {
        let quiet = &connection.quiet;
        let exchange = (quiet.enabled() && !body.is_end_stream()).then(|| (connection.clone(), quiet.exchange()));
        ClientBody { body, observe: observe.cloned(), exchange }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
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
            UpstreamBody::Direct(body) => Pin::new(body).poll_frame(cx),
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
    pub fn hold(&mut self, in_flight: InFlight) {
        self._in_flight = in_flight;
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
/// Where a request stream's body reading is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    Data,
    Trailers,
    Done,
}

/// An HTTP/3 request's body, read from its stream as the pipeline polls it: data frames, then the
/// trailers if any.
pub struct RequestStreamBody {
    stream: H3Recv,
    reading: Reading,
    /// Data read while finding out whether there is a body at all.
    first: Option<Bytes>,
    hint: SizeHint,
}

impl std::fmt::Debug for RequestStreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestStreamBody").field("reading", &self.reading).finish()
    }
}

impl RequestStreamBody {
    /// The body of `request`, read from `stream`. A request whose stream already ended with its
    /// head (a GET, mostly: the FIN rides with the HEADERS frame) is known to have no body, so it is
    /// forwarded without one, not as a stream of unknown length.
    pub(crate) fn new<T>(stream: H3Recv, request: &http::Request<T>) -> RequestStreamBody {
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let hint = declared.map_or_else(SizeHint::default, SizeHint::with_exact);
        let mut body = RequestStreamBody { stream, reading: Reading::Data, first: None, hint };
        // A look at what has arrived, without waiting: the real reads register their own wakers.
        body.peek(&mut Context::from_waker(std::task::Waker::noop()));
        body
    }

    fn peek(&mut self, cx: &mut Context<'_>) {
        match self.stream.poll_recv_data(cx) {
            Poll::Ready(Ok(Some(mut data))) => self.first = Some(data.copy_to_bytes(data.remaining())),
            Poll::Ready(Ok(None)) => {
                self.reading = Reading::Trailers;
                if let Poll::Ready(Ok(None)) = self.stream.poll_recv_trailers(cx) {
                    self.reading = Reading::Done;
                }
            }
            // An error shows again on the first real read.
            Poll::Ready(Err(_)) | Poll::Pending => {}
        }
    }
}

impl Body for RequestStreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            match this.reading {
                Reading::Done => return Poll::Ready(None),
                Reading::Data => match this.stream.poll_recv_data(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(Some(mut data))) => {
                        return Poll::Ready(Some(Ok(Frame::data(data.copy_to_bytes(data.remaining())))));
                    }
                    Poll::Ready(Ok(None)) => this.reading = Reading::Trailers,
                    Poll::Ready(Err(error)) => {
                        this.reading = Reading::Done;
                        return Poll::Ready(Some(Err(error.into())));
                    }
                },
                Reading::Trailers => {
                    let polled = this.stream.poll_recv_trailers(cx);
                    if polled.is_ready() {
                        this.reading = Reading::Done;
                    }
                    return match polled {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                        Poll::Ready(Ok(None)) => Poll::Ready(None),
                        Poll::Ready(Err(error)) => Poll::Ready(Some(Err(error.into()))),
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reading == Reading::Done && self.first.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() { SizeHint::with_exact(0) } else { self.hint }
    }
}

#[cfg(test)]
mod size {
    /// A response is moved from the codec to hyper five or six times per request, and a move of
    /// more than 256 bytes takes memcpy's long path: at 312 bytes (an HTTP/1.1 body with a frame
    /// slot it never used) the plain HTTP/1.1 path ran about 3.5% more instructions per request
    /// (`benches/callgrind-cost.sh h1`, docs/benchmarks.md).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_response_stays_small_enough_to_move_cheaply() {
        let size = std::mem::size_of::<http::Response<super::ProxyBody>>();
        assert!(size <= 256, "Response<ProxyBody> is {size} bytes");
    }
}
