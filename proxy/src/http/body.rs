//! The bodies that cross the proxy: [`UpstreamBody`] for requests sent to endpoints, [`ProxyBody`]
//! for every response sent downstream.
//!
//! One concrete type for each direction, so neither the server's service nor the clients need
//! boxing. A request body goes upstream as the client sent it, or, when a retry, hedge or mirror may
//! need it again, through a [`ReplayBody`] reader. A response body streams from an HTTP/1.1 endpoint
//! (through the proxy's own client, which also returns the connection to the pool when the body
//! ends) or an HTTP/2 one, or is a short local reply. A streamed response may carry [`InFlight`]:
//! what counts its request as active (for the balancer and the circuit breakers) until the body is
//! done. Bodies stream frame by frame; none is held whole.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::balance::endpoint::ActiveRequest;
use crate::http::h1;
use crate::http::replay::ReplayBody;
use crate::policy::breaker::Slot;

/// Errors a body can end with.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way to an endpoint.
#[derive(Debug)]
pub enum UpstreamBody {
    /// The client's body, read once.
    Direct(Incoming),
    /// A reader of the client's body that can be replayed.
    Replay(ReplayBody),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Direct(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Replay(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Direct(body) => body.is_end_stream(),
            UpstreamBody::Replay(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Direct(body) => body.size_hint(),
            UpstreamBody::Replay(body) => body.size_hint(),
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
}

/// A response body: streamed from upstream, or made locally.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    /// Dropped with the body. Two pointers, `None` for clusters that count nothing.
    _in_flight: InFlight,
}

#[derive(Debug)]
enum Kind {
    Http1(h1::Body<UpstreamBody>),
    Http2(Incoming),
    /// A complete body held in memory (a local reply); `None` once sent.
    Local(Option<Bytes>),
}

impl ProxyBody {
    /// A body streaming from an HTTP/1.1 endpoint.
    pub fn http1(body: h1::Body<UpstreamBody>) -> Self {
        ProxyBody { kind: Kind::Http1(body), _in_flight: InFlight::default() }
    }

    /// A body streaming from an HTTP/2 endpoint.
    pub fn http2(body: Incoming) -> Self {
        ProxyBody { kind: Kind::Http2(body), _in_flight: InFlight::default() }
    }

    /// A local body holding `bytes`.
    pub fn local(bytes: Bytes) -> Self {
        ProxyBody { kind: Kind::Local(Some(bytes)), _in_flight: InFlight::default() }
    }

    /// An empty local body.
    pub fn empty() -> Self {
        ProxyBody { kind: Kind::Local(None), _in_flight: InFlight::default() }
    }

    /// Keeps `in_flight` until the body is dropped.
    pub fn hold(mut self, in_flight: InFlight) -> Self {
        self._in_flight = in_flight;
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Kind::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Kind::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Http1(body) => body.is_end_stream(),
            Kind::Http2(body) => body.is_end_stream(),
            Kind::Local(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Http1(body) => body.size_hint(),
            Kind::Http2(body) => body.size_hint(),
            Kind::Local(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
