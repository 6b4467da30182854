//! The request body's upload: the head, then the body's frames in the framing chosen, written by a
//! resumable state machine (a partial write is remembered, never lost).
//!
//! `exchange` drives it while it waits for the response head, and the response body drives it
//! again from its own poll, so an endpoint that answers while it is still reading (an echo, a
//! streaming RPC, an early 413) works in full duplex without a second task. A body longer or
//! shorter than its `Content-Length`, or data from a request that declared none, fails the upload
//! as the client's error; a write that fails is the connection's.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use tokio::io::AsyncWrite;

use super::head::Framing;
use super::{BoxError, Error};

/// Uploads a request: the head, then the body frames in the framing chosen, as a resumable state
/// machine (a partial write is remembered, never lost).
#[derive(Debug)]
pub(super) struct Upload<B> {
    head: BytesMut,
    head_sent: usize,
    body: Option<B>,
    framing: Framing,
    /// Bytes of the body still allowed by `Content-Length`.
    remaining: u64,
    /// Framing bytes before the current data (a chunk-size line).
    prefix: Bytes,
    data: Bytes,
    /// Framing bytes after the current data (CRLF, or the last-chunk and trailer section).
    suffix: Bytes,
    body_polled: bool,
    body_ended: bool,
    failed: bool,
}

impl<B> Upload<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub(super) fn new(head: BytesMut, body: B, framing: Framing) -> Self {
        let remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let body_ended = framing == Framing::Empty || (framing == Framing::Length(0));
        Upload {
            head,
            head_sent: 0,
            body: Some(body),
            framing,
            remaining,
            prefix: Bytes::new(),
            data: Bytes::new(),
            suffix: Bytes::new(),
            body_polled: false,
            body_ended,
            failed: false,
        }
    }

    fn has_pending(&self) -> bool {
        self.head_sent < self.head.len() || !self.prefix.is_empty() || !self.data.is_empty() || !self.suffix.is_empty()
    }

    /// Everything was written, or the upload was abandoned.
    pub(super) fn is_done(&self) -> bool {
        self.failed || (self.body_ended && !self.has_pending())
    }

    /// Everything was written.
    pub(super) fn is_complete(&self) -> bool {
        !self.failed && self.body_ended && !self.has_pending()
    }

    pub(super) fn body_untouched(&self) -> bool {
        !self.body_polled
    }

    /// The body back, if it was never finished (a body taken to its end is gone).
    pub(super) fn into_body(mut self) -> Option<B> {
        self.body.take()
    }

    /// Writes as much as it can; `Ready(Ok)` when everything is written.
    pub(super) fn poll_drive<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut W,
    ) -> Poll<Result<(), Error>> {
        loop {
            while self.has_pending() {
                let head = &self.head[self.head_sent..];
                let slices = [
                    IoSlice::new(head),
                    IoSlice::new(&self.prefix),
                    IoSlice::new(&self.data),
                    IoSlice::new(&self.suffix),
                ];
                let written = match Pin::new(&mut *stream).poll_write_vectored(cx, &slices) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        self.failed = true;
                        return Poll::Ready(Err(Error::Io(e)));
                    }
                    Poll::Ready(Ok(0)) => {
                        self.failed = true;
                        return Poll::Ready(Err(Error::Closed));
                    }
                    Poll::Ready(Ok(n)) => n,
                };
                self.advance(written);
            }
            if self.body_ended {
                return Poll::Ready(Ok(()));
            }
            let Some(body) = self.body.as_mut() else { return Poll::Ready(Ok(())) };
            self.body_polled = true;
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.queue_data(data)?,
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.queue_end(Some(&trailers))?;
                        }
                    }
                },
                Some(Err(error)) => {
                    self.failed = true;
                    return Poll::Ready(Err(Error::RequestBody(error.into())));
                }
                None => self.queue_end(None)?,
            }
        }
    }

    fn advance(&mut self, mut n: usize) {
        let head_left = self.head.len() - self.head_sent;
        let step = n.min(head_left);
        self.head_sent += step;
        n -= step;
        for part in [&mut self.prefix, &mut self.data, &mut self.suffix] {
            let step = n.min(part.len());
            part.advance(step);
            n -= step;
        }
    }

    fn queue_data(&mut self, data: Bytes) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        match self.framing {
            Framing::Length(_) => {
                let length = data.len() as u64;
                if length > self.remaining {
                    self.failed = true;
                    return Err(Error::RequestBody("the request body is longer than its Content-Length".into()));
                }
                self.remaining -= length;
                self.data = data;
            }
            Framing::Chunked => {
                self.prefix = Bytes::from(format!("{:x}\r\n", data.len()));
                self.data = data;
                self.suffix = Bytes::from_static(b"\r\n");
            }
            Framing::Empty => {
                self.failed = true;
                return Err(Error::RequestBody("a request without a body produced data".into()));
            }
        }
        Ok(())
    }

    fn queue_end(&mut self, trailers: Option<&HeaderMap>) -> Result<(), Error> {
        match self.framing {
            Framing::Chunked => {
                let mut end = BytesMut::from(&b"0\r\n"[..]);
                for (name, value) in trailers.into_iter().flatten() {
                    end.extend_from_slice(name.as_str().as_bytes());
                    end.extend_from_slice(b": ");
                    end.extend_from_slice(value.as_bytes());
                    end.extend_from_slice(b"\r\n");
                }
                end.extend_from_slice(b"\r\n");
                self.suffix = end.freeze();
            }
            // Trailers cannot travel with a length-framed body; they are dropped, as by any
            // HTTP/1.1 intermediary that does not re-frame.
            Framing::Length(_) if self.remaining > 0 => {
                self.failed = true;
                return Err(Error::RequestBody("the request body ended before its Content-Length".into()));
            }
            Framing::Length(_) | Framing::Empty => {}
        }
        self.body_ended = true;
        self.body = None;
        Ok(())
    }

    /// Takes the head buffer back for the connection's next request.
    pub(super) fn take_head_buffer(&mut self) -> BytesMut {
        let mut head = std::mem::take(&mut self.head);
        head.clear();
        head
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::future::poll_fn;

    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type TestBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

    /// A peer that takes at most `per_write` bytes a call: every write may be partial.
    struct Trickle {
        written: Vec<u8>,
        per_write: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.per_write);
            self.written.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn body(parts: &[&'static [u8]], trailers: Option<HeaderMap>) -> TestBody {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p)))).collect();
        if let Some(trailers) = trailers {
            frames.push(Ok(Frame::trailers(trailers)));
        }
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    async fn upload(framing: Framing, body: TestBody, per_write: usize) -> (Result<(), Error>, String) {
        let mut upload = Upload::new(BytesMut::from(&b"HEAD\r\n\r\n"[..]), body, framing);
        let mut peer = Trickle { written: Vec::new(), per_write };
        let result = poll_fn(|cx| upload.poll_drive(cx, &mut peer)).await;
        (result, String::from_utf8(peer.written).unwrap())
    }

    /// Chunks are framed with their sizes and the trailers close the body, however small the writes.
    #[tokio::test]
    async fn chunked_uploads_frame_every_chunk_and_carry_trailers_through_partial_writes() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        for per_write in [1, 3, 1024] {
            let (result, written) =
                upload(Framing::Chunked, body(&[b"hello", b"", b"world!"], Some(trailers.clone())), per_write).await;
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(
                written, "HEAD\r\n\r\n5\r\nhello\r\n6\r\nworld!\r\n0\r\ngrpc-status: 0\r\n\r\n",
                "{per_write} a write"
            );
        }
    }

    /// A length-framed body goes out as it is; one that breaks its `Content-Length` either way is
    /// the client's error, and the upload stops.
    #[tokio::test]
    async fn length_framed_uploads_must_keep_to_their_length() {
        let (result, written) = upload(Framing::Length(5), body(&[b"he", b"llo"], None), 2).await;
        assert!(result.is_ok());
        assert_eq!(written, "HEAD\r\n\r\nhello");
        let (result, _) = upload(Framing::Length(2), body(&[b"hello"], None), 64).await;
        assert!(matches!(result, Err(Error::RequestBody(_))), "{result:?}");
        let (result, _) = upload(Framing::Length(9), body(&[b"hello"], None), 64).await;
        assert!(matches!(result, Err(Error::RequestBody(_))), "{result:?}");
        // A request framed as bodiless sends its head alone: its body is not read at all.
        let (result, written) = upload(Framing::Empty, body(&[b"x"], None), 64).await;
        assert!(result.is_ok());
        assert_eq!(written, "HEAD\r\n\r\n");
    }

    /// A peer that takes nothing more is the connection's failure, and the upload knows it is done.
    #[tokio::test]
    async fn a_closed_peer_fails_the_upload() {
        let mut upload = Upload::new(BytesMut::from(&b"HEAD\r\n\r\n"[..]), body(&[b"x"], None), Framing::Length(1));
        let mut closed = Trickle { written: Vec::new(), per_write: 0 };
        let result = poll_fn(|cx| upload.poll_drive(cx, &mut closed)).await;
        assert!(matches!(result, Err(Error::Closed)), "{result:?}");
        assert!(upload.is_done() && !upload.is_complete());
        assert!(upload.body_untouched(), "the body was never read: the request can go elsewhere");
    }
}
