//! The body of every response the proxy sends downstream.
//!
//! One concrete type for every case, so the server's service needs no boxing: a body streaming from
//! an HTTP/1.1 endpoint (through the proxy's own client, which also returns the connection to the
//! pool when the body ends), one streaming from an HTTP/2 endpoint, or a short local reply. Bodies
//! stream frame by frame; none is held whole.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::http::h1;

/// Errors a response body can end with.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A response body: streamed from upstream, or made locally.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streams from an HTTP/1.1 endpoint.
    Http1(h1::Body<Incoming>),
    /// Streams from an HTTP/2 endpoint.
    Http2(Incoming),
    /// A complete body held in memory (a local reply); `None` once sent.
    Local(Option<Bytes>),
}

impl ProxyBody {
    /// A local body holding `bytes`.
    pub fn local(bytes: Bytes) -> Self {
        ProxyBody::Local(Some(bytes))
    }

    /// An empty local body.
    pub fn empty() -> Self {
        ProxyBody::Local(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Http1(body) => body.is_end_stream(),
            ProxyBody::Http2(body) => body.is_end_stream(),
            ProxyBody::Local(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Http1(body) => body.size_hint(),
            ProxyBody::Http2(body) => body.size_hint(),
            ProxyBody::Local(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
