//! The response body: decoded from the connection as the downstream server polls it — by length,
//! chunked (trailers included), or until the endpoint closes — with body bytes split off the read
//! buffer without copying.
//!
//! Polling the [`Body`] also drives any unfinished request upload. When the body ends cleanly on a
//! keep-alive connection whose upload finished, the connection goes back to the pool at once; a
//! body dropped early closes it. A chunk-size line or a trailer section longer than its limit, a
//! size that is not hex or overflows, or a missing CRLF is a protocol error, never a guess.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};

use super::upload::Upload;
use super::{BoxError, Connection, Error, MAX_HEADERS};
use crate::limits;

/// Longest chunk-size line (hex size plus extensions) accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 1024;

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decoder {
    /// This many bytes are left.
    Length(u64),
    /// Chunked, in this state.
    Chunked(Chunk),
    /// Until the endpoint closes the connection.
    Eof,
    /// Complete.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: expecting trailer fields or the final CRLF.
    Trailers,
}

/// Where the request upload stands once the response has begun.
pub(super) enum UploadState<B> {
    /// Every byte was written.
    Complete,
    /// Abandoned (the endpoint stopped reading); the connection will not be reused.
    Failed,
    /// Still going; driven from the body's poll.
    Running(Box<Upload<B>>),
}

/// A response body streaming from an endpoint's HTTP/1.1 connection.
///
/// Polling it also drives any unfinished request upload. When the body ends cleanly on a keep-alive
/// connection whose upload finished, the connection is released for reuse; a body dropped early
/// closes it.
pub struct Body<B> {
    connection: Option<Box<Connection>>,
    decoder: Decoder,
    upload: UploadState<B>,
    keep_alive: bool,
    on_release: fn(Box<Connection>),
}

impl<B> std::fmt::Debug for Body<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body").field("decoder", &self.decoder).field("keep_alive", &self.keep_alive).finish()
    }
}

impl<B> Body<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// The body of a response on `connection`, delimited by `decoder`, with the request's `upload`
    /// where it stands; `on_release` takes the connection back if it may be reused.
    pub(super) fn new(
        connection: Box<Connection>,
        decoder: Decoder,
        upload: UploadState<B>,
        keep_alive: bool,
        on_release: fn(Box<Connection>),
    ) -> Body<B> {
        let mut body = Body { connection: Some(connection), decoder, upload, keep_alive, on_release };
        body.finish_if_complete();
        body
    }

    /// Hands the connection back if both directions are complete and it may be reused.
    fn finish_if_complete(&mut self) {
        if self.decoder != Decoder::Done {
            return;
        }
        match &mut self.upload {
            UploadState::Complete => {}
            UploadState::Failed => return,
            UploadState::Running(upload) => {
                if !upload.is_complete() {
                    return;
                }
                if let Some(connection) = self.connection.as_mut() {
                    connection.head = upload.take_head_buffer();
                }
                self.upload = UploadState::Complete;
            }
        }
        let Some(connection) = self.connection.take() else { return };
        if self.keep_alive && connection.read.is_empty() {
            (self.on_release)(connection);
        }
    }

    /// Drives the upload, if any is left. An upload that fails once the response has begun is
    /// abandoned: the endpoint has answered and stopped reading. The connection is then not reused.
    fn drive_upload(&mut self, cx: &mut Context<'_>) {
        if let (UploadState::Running(upload), Some(connection)) = (&mut self.upload, self.connection.as_mut())
            && !upload.is_done()
            && let Poll::Ready(Err(_)) = upload.poll_drive(cx, &mut connection.stream)
        {
            self.keep_alive = false;
            self.upload = UploadState::Failed;
        }
    }

    fn poll_decode(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            let Some(connection) = self.connection.as_mut() else { return Poll::Ready(None) };
            let buffer = &mut connection.read;
            match &mut self.decoder {
                Decoder::Done => return Poll::Ready(None),
                Decoder::Length(left) if !buffer.is_empty() => {
                    let take = (*left).min(buffer.len() as u64) as usize;
                    *left -= take as u64;
                    let data = buffer.split_to(take).freeze();
                    if *left == 0 {
                        self.decoder = Decoder::Done;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoder::Eof if !buffer.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(buffer.split().freeze()))));
                }
                Decoder::Chunked(state) if !buffer.is_empty() => match decode_chunk(state, buffer)? {
                    ChunkStep::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    ChunkStep::Continue => continue,
                    ChunkStep::NeedMore => {}
                    ChunkStep::End(trailers) => {
                        self.decoder = Decoder::Done;
                        if let Some(trailers) = trailers {
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        return Poll::Ready(None);
                    }
                },
                _ => {}
            }
            // Need more bytes.
            let read = ready!(connection.poll_fill(cx));
            match (read, self.decoder) {
                (Ok(0), Decoder::Eof) => {
                    self.decoder = Decoder::Done;
                    self.keep_alive = false;
                    return Poll::Ready(None);
                }
                (Ok(0), _) => return Poll::Ready(Some(Err(Error::Closed))),
                (Ok(_), _) => {}
                (Err(e), _) => return Poll::Ready(Some(Err(Error::Io(e)))),
            }
        }
    }
}

enum ChunkStep {
    Data(Bytes),
    Continue,
    NeedMore,
    End(Option<HeaderMap>),
}

/// Advances the chunked decoder over `buffer` by one step.
fn decode_chunk(state: &mut Chunk, buffer: &mut BytesMut) -> Result<ChunkStep, Error> {
    match *state {
        Chunk::Size => {
            let Some(line_end) = find_crlf(buffer) else {
                return if buffer.len() > MAX_CHUNK_LINE {
                    Err(Error::Protocol("chunk-size line too long"))
                } else {
                    Ok(ChunkStep::NeedMore)
                };
            };
            if line_end > MAX_CHUNK_LINE {
                return Err(Error::Protocol("chunk-size line too long"));
            }
            let size = chunk_size(&buffer[..line_end])?;
            buffer.advance(line_end + 2);
            *state = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
            Ok(ChunkStep::Continue)
        }
        Chunk::Data(left) => {
            let take = left.min(buffer.len() as u64) as usize;
            let data = buffer.split_to(take).freeze();
            *state = if left == take as u64 { Chunk::DataEnd } else { Chunk::Data(left - take as u64) };
            Ok(ChunkStep::Data(data))
        }
        Chunk::DataEnd => {
            if buffer.len() < 2 {
                return Ok(ChunkStep::NeedMore);
            }
            if &buffer[..2] != b"\r\n" {
                return Err(Error::Protocol("missing CRLF after chunk data"));
            }
            buffer.advance(2);
            *state = Chunk::Size;
            Ok(ChunkStep::Continue)
        }
        Chunk::Trailers => {
            if buffer.starts_with(b"\r\n") {
                buffer.advance(2);
                return Ok(ChunkStep::End(None));
            }
            let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                return if buffer.len() > limits::MAX_HEADER_BYTES {
                    Err(Error::Protocol("trailer section too large"))
                } else {
                    Ok(ChunkStep::NeedMore)
                };
            };
            let section = buffer.split_to(end + 4);
            // Every trailer line ends in CRLF, as every chunk line must (and as hyper insists): a
            // bare LF is a line end to some parsers and not to others.
            if section.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r') || section.first() == Some(&b'\n') {
                return Err(Error::Protocol("trailer line not ended by CRLF"));
            }
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            // Trailers are rare; zeroed slots are fine here.
            let trailers = match httparse::parse_headers(&section, &mut slots) {
                Ok(httparse::Status::Complete((_, fields))) => {
                    let mut map = HeaderMap::with_capacity(fields.len());
                    for field in fields {
                        let name = HeaderName::from_bytes(field.name.as_bytes())
                            .map_err(|_| Error::Protocol("invalid trailer name"))?;
                        let value = HeaderValue::from_bytes(field.value)
                            .map_err(|_| Error::Protocol("invalid trailer value"))?;
                        map.append(name, value);
                    }
                    map
                }
                _ => return Err(Error::Protocol("malformed trailer section")),
            };
            Ok(ChunkStep::End(Some(trailers)))
        }
    }
}

/// Reads a chunk-size line (without its CRLF): hex digits, spaces or tabs, then extensions, which
/// are ignored but may hold no control character other than a tab. A CR or LF inside the line is a
/// line end to some parsers and not to others, so it is refused, as hyper refuses it.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(Error::Protocol("invalid chunk size"));
    }
    let size = line[..digits].iter().fold(0u64, |size, digit| {
        let value = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => digit - b'A' + 10,
        };
        size << 4 | u64::from(value)
    });
    let rest = &line[digits..];
    let extensions = &rest[rest.iter().take_while(|b| matches!(b, b' ' | b'\t')).count()..];
    if !extensions.is_empty() && extensions[0] != b';' {
        return Err(Error::Protocol("invalid chunk size"));
    }
    if extensions.iter().any(|b| (*b < b' ' && *b != b'\t') || *b == 0x7f) {
        return Err(Error::Protocol("control character in a chunk extension"));
    }
    Ok(size)
}

fn find_crlf(buffer: &[u8]) -> Option<usize> {
    buffer.windows(2).position(|w| w == b"\r\n")
}

impl<B> http_body::Body for Body<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        this.drive_upload(cx);
        let polled = this.poll_decode(cx);
        match &polled {
            Poll::Ready(Some(Err(_))) => {
                this.keep_alive = false;
                this.connection = None;
            }
            Poll::Ready(_) => this.finish_if_complete(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.decoder == Decoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(left) => SizeHint::with_exact(left),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn chunk_decoder_rejects_garbage_sizes() {
        let mut state = Chunk::Size;
        let mut buffer = BytesMut::from(&b"zz\r\n"[..]);
        assert!(decode_chunk(&mut state, &mut buffer).is_err());
        let mut buffer = BytesMut::from(&b"ffffffffffffffff\r\n"[..]);
        assert!(decode_chunk(&mut Chunk::Size, &mut buffer).is_err(), "sizes that overflow are refused");
        for line in [&b" 5\r\n"[..], b"5 5\r\n", b"5x\r\n", b"5;a=\rb\r\n", b"5;a\nb\r\n", b"5;a\0\r\n"] {
            let mut buffer = BytesMut::from(line);
            assert!(decode_chunk(&mut Chunk::Size, &mut buffer).is_err(), "{line:?} is refused");
        }
        for (line, size) in [(&b"1F\r\n"[..], 31), (b"a \t;name=\"v\tw\"\r\n", 10), (b"0;x\r\n", 0)] {
            let mut state = Chunk::Size;
            let mut buffer = BytesMut::from(line);
            assert!(matches!(decode_chunk(&mut state, &mut buffer), Ok(ChunkStep::Continue)));
            let expected = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
            assert_eq!(state, expected, "{line:?}");
        }
        let mut state = Chunk::DataEnd;
        let mut buffer = BytesMut::from(&b"xx"[..]);
        assert!(decode_chunk(&mut state, &mut buffer).is_err());
    }
}

#[cfg(test)]
mod split_tests {
    //! The chunked decoder over the same bytes arriving in pieces of every size.

    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    const BODY: &[u8] =
        b"5;name=value\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\ngrpc-status: 0\r\nx-b: 2\r\n\r\n";

    /// Feeds `wire` to the decoder `step` bytes at a time; returns the data and the trailers.
    fn decode(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        let mut state = Chunk::Size;
        let mut buffer = BytesMut::new();
        let mut data = Vec::new();
        for piece in wire.chunks(step.max(1)) {
            buffer.extend_from_slice(piece);
            loop {
                match decode_chunk(&mut state, &mut buffer)? {
                    ChunkStep::Data(bytes) => data.extend_from_slice(&bytes),
                    ChunkStep::Continue => {}
                    ChunkStep::NeedMore => break,
                    ChunkStep::End(trailers) => return Ok((data, trailers)),
                }
                if buffer.is_empty() {
                    break;
                }
            }
        }
        Err(Error::Closed)
    }

    #[test]
    fn chunks_and_trailers_decode_whatever_the_reads() {
        let (data, trailers) = decode(BODY, 4096).unwrap();
        assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz");
        let trailers = trailers.unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-b"], "2");
        let (data, trailers) = decode(b"3\r\nabc\r\n0\r\n\r\n", 1).unwrap();
        assert_eq!((data, trailers), (b"abc".to_vec(), None));
        // A trailer line ended by a bare LF (found by the differential test against hyper).
        assert!(decode(b"0\r\nx-a: 0 \nx-a: !\r\n\r\n", 4096).is_err());
    }

    #[test]
    fn oversized_lines_and_sections_are_refused() {
        let long = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE + 10));
        assert!(decode(long.as_bytes(), 64).is_err());
        let mut huge = b"0\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', limits::MAX_HEADER_BYTES + 10));
        assert!(decode(&huge, 1024).is_err());
    }

    proptest! {
        /// Every split of the wire bytes decodes to the same data and trailers.
        #[test]
        fn every_split_decodes_alike(step in 1_usize..80) {
            let (data, trailers) = decode(BODY, step).unwrap();
            prop_assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz".to_vec());
            prop_assert_eq!(trailers.unwrap().len(), 2);
        }
    }
}
