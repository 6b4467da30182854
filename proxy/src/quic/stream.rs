//! A tunnelled connection's bytes on an HTTP/3 request stream, as `AsyncRead` + `AsyncWrite`.
//!
//! Once a `CONNECT` over HTTP/3 is answered `200`, the stream's DATA frames are the connection's
//! bytes both ways: [`TunnelStream`] reads them as they come (a frame larger than the reader's
//! buffer is kept and handed out in parts) and writes each buffer the relay gives it as one DATA
//! frame. h3 sends with `async fn`s that borrow the stream, so a send in flight owns its half in a
//! boxed future and gives it back when done: one allocation per buffer written (16 KiB in the
//! relay), none per byte. Shutting down the write side finishes the stream (a half-close); a
//! tunnel dropped while writing resets it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h3::error::{Code, StreamError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

type Sending<S> = Pin<Box<dyn Future<Output = (S, Result<(), StreamError>)> + Send>>;

/// The receiving half of a request stream, server's or client's.
pub trait RecvHalf: Send + Unpin + 'static {
    /// The next DATA frame's payload; `None` at the end of the stream.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>>;
}

/// The sending half of a request stream, server's or client's.
pub trait SendHalf: Sized + Send + Unpin + 'static {
    /// Sends `data` as one DATA frame.
    fn send(self, data: Bytes) -> Sending<Self>;
    /// Ends the stream.
    fn finish(self) -> Sending<Self>;
    /// Resets the stream.
    fn reset(&mut self);
}

macro_rules! halves {
    ($recv:ty, $send:ty) => {
        impl RecvHalf for $recv {
            fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>> {
                self.poll_recv_data(cx).map_ok(|data| data.map(|mut data| data.copy_to_bytes(data.remaining())))
            }
        }

        impl SendHalf for $send {
            fn send(mut self, data: Bytes) -> Sending<Self> {
                Box::pin(async move {
                    let sent = self.send_data(data).await;
                    (self, sent)
                })
            }

            fn finish(mut self) -> Sending<Self> {
                Box::pin(async move {
                    let finished = <$send>::finish(&mut self).await;
                    (self, finished)
                })
            }

            fn reset(&mut self) {
                self.stop_stream(Code::H3_REQUEST_CANCELLED);
            }
        }
    };
}

halves!(
    h3::server::RequestStream<h3_quinn::RecvStream, Bytes>,
    h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>
);
halves!(
    h3::client::RequestStream<h3_quinn::RecvStream, Bytes>,
    h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>
);

/// The sending half's state.
enum Writer<S> {
    /// Ready for the next buffer.
    Idle(S),
    /// A send (or the finish) in flight.
    Busy(Sending<S>),
    /// Finished, or failed.
    Done,
}

/// One tunnelled connection on an HTTP/3 request stream.
pub struct TunnelStream<S: SendHalf, R: RecvHalf> {
    recv: R,
    /// The part of the last DATA frame the reader has not taken yet.
    unread: Bytes,
    recv_ended: bool,
    /// A read error met while gathering what had arrived, for the next read.
    failed: Option<io::Error>,
    writer: Writer<S>,
    finished: bool,
}

impl<S: SendHalf, R: RecvHalf> std::fmt::Debug for TunnelStream<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream").field("recv_ended", &self.recv_ended).field("finished", &self.finished).finish()
    }
}

/// The inbound side's tunnel: an HBONE-over-QUIC listener's.
pub type InboundTunnel = TunnelStream<
    h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    h3::server::RequestStream<h3_quinn::RecvStream, Bytes>,
>;

/// The outbound side's tunnel: to a cluster's QUIC port.
pub type OutboundTunnel = TunnelStream<
    h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    h3::client::RequestStream<h3_quinn::RecvStream, Bytes>,
>;

impl<S: SendHalf, R: RecvHalf> TunnelStream<S, R> {
    /// The tunnel on a stream whose `CONNECT` was answered `200`.
    pub fn new(send: S, recv: R) -> Self {
        TunnelStream {
            recv,
            unread: Bytes::new(),
            recv_ended: false,
            failed: None,
            writer: Writer::Idle(send),
            finished: false,
        }
    }

    /// Drives the send in flight, if any, to its end.
    fn poll_writer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Writer::Busy(sending) = &mut self.writer {
            let (send, result) = ready!(sending.as_mut().poll(cx));
            match result {
                Ok(()) => self.writer = Writer::Idle(send),
                Err(error) => {
                    self.writer = Writer::Done;
                    return Poll::Ready(Err(io::Error::other(error)));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: SendHalf, R: RecvHalf> AsyncRead for TunnelStream<S, R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(error) = this.failed.take() {
            return Poll::Ready(Err(error));
        }
        while this.unread.is_empty() {
            if this.recv_ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Ok(Some(data)) => this.unread = data,
                Ok(None) => this.recv_ended = true,
                Err(error) => return Poll::Ready(Err(io::Error::other(error))),
            }
        }
        // What has arrived is handed over together: a write that came in several packets is passed
        // on in one piece when its parts are all here.
        loop {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread[..n]);
            this.unread.advance(n);
            if buf.remaining() == 0 || this.recv_ended {
                break;
            }
            match this.recv.poll_data(cx) {
                Poll::Ready(Ok(Some(data))) => this.unread = data,
                Poll::Ready(Ok(None)) => this.recv_ended = true,
                Poll::Ready(Err(error)) => {
                    // Reported on the next read.
                    this.failed = Some(io::Error::other(error));
                    break;
                }
                Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: SendHalf, R: RecvHalf> AsyncWrite for TunnelStream<S, R> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_writer(cx))?;
        let Writer::Idle(send) = std::mem::replace(&mut this.writer, Writer::Done) else {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        };
        this.writer = Writer::Busy(send.send(Bytes::copy_from_slice(buf)));
        // Taken: the frame is on its way (flushing waits for it).
        match this.poll_writer(cx) {
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            _ => Poll::Ready(Ok(buf.len())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_writer(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_writer(cx))?;
        if !this.finished {
            let Writer::Idle(send) = std::mem::replace(&mut this.writer, Writer::Done) else {
                return Poll::Ready(Ok(()));
            };
            this.writer = Writer::Busy(send.finish());
            this.finished = true;
        }
        this.poll_writer(cx)
    }
}

impl<S: SendHalf, R: RecvHalf> Drop for TunnelStream<S, R> {
    fn drop(&mut self) {
        // Not finished: the connection did not end cleanly on this side, and the peer must not
        // take the stream's end for a half-close.
        if !self.finished
            && let Writer::Idle(send) = &mut self.writer
        {
            send.reset();
        }
    }
}
