//! The body of every response the proxy sends downstream.
//!
//! One concrete type for both cases, so the server's service needs no boxing: a body streaming from
//! an upstream endpoint frame by frame (never buffered whole), or a short local reply. An upstream
//! body over a pooled HTTP/1.1 connection carries the connection's [`PoolTicket`] and gives it back to
//! the pool the moment the last frame has been read, which is the earliest the connection can take
//! another request. A body dropped before its end drops the ticket, and with it the connection, whose
//! framing is then unknown.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::http::client::PoolTicket;

/// A response body: streamed from upstream, or made locally.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streams from an endpoint.
    Upstream {
        /// The endpoint's body.
        inner: Incoming,
        /// The pooled connection it arrives on, returned at the end.
        ticket: Option<PoolTicket>,
    },
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

    /// An upstream body. If it is already complete (no body, or `Content-Length: 0`), the connection
    /// goes back to the pool now: the server may never poll a body it knows is empty.
    pub fn upstream(inner: Incoming, mut ticket: Option<PoolTicket>) -> Self {
        if inner.is_end_stream()
            && let Some(ticket) = ticket.take()
        {
            ticket.release();
        }
        ProxyBody::Upstream { inner, ticket }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream { inner, ticket } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let Some(ticket) = ticket.take() {
                            ticket.release();
                        }
                    }
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => {
                        if let Some(ticket) = ticket.take() {
                            ticket.release();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => *ticket = None,
                    _ => {}
                }
                polled
            }
            ProxyBody::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { inner, .. } => inner.is_end_stream(),
            ProxyBody::Local(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
            ProxyBody::Local(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
