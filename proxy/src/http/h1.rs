//! HTTP/1.1 to upstream endpoints: a client built for proxying.
//!
//! hyper's client runs every connection in a task of its own and passes each request, response and
//! body chunk across channels between that task and the request's task. Measured with callgrind on
//! the peers benchmark, that machinery was about 40% of the proxy's user-space instructions per
//! request. This client does the exchange inside the request's own task instead:
//!
//! 1. [`exchange`] writes the request head, and the body if there is one, with `writev` (a small
//!    request is one system call);
//! 2. it reads and parses the response head (httparse, RFC 9112 §4–§6), skipping interim 1xx
//!    responses;
//! 3. it returns the response with a [`Body`] that reads and decodes from the socket when the
//!    downstream server polls it: by length, chunked (trailers included), or until close. Body bytes
//!    are split off the read buffer without copying.
//!
//! The request body is uploaded by a resumable state machine that is driven while waiting for the
//! response head and again from the response body's poll, so an endpoint that answers while it is
//! still reading (an echo, a streaming RPC, an early 413) works in full duplex without a second task.
//!
//! A connection goes back to the worker's pool the moment a response ends, if the response and the
//! upload both finished cleanly and the endpoint allows keep-alive. A pooled connection whose peer
//! has closed it is noticed at checkout from its readiness alone (no system call). A reused
//! connection that fails before any response byte arrives hands the request back, if it had no body,
//! so the caller can send it again on a fresh connection: the endpoint closed an idle connection and
//! never saw it. A `101 Switching Protocols` hands the whole connection over, with any bytes already
//! read after the head, for an upgrade tunnel.

use std::fmt::Write as _;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, HOST, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::limits;
use crate::policy::breaker::Slot;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Most header fields in a response head or a trailer section.
const MAX_HEADERS: usize = 128;

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 16 * 1024;

/// Longest chunk-size line (hex size plus extensions) accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 1024;

/// Errors from a request body (any body type's error, boxed).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an exchange with an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading from or writing to the endpoint failed (reset, broken pipe).
    #[error("connection to endpoint: {0}")]
    Io(io::Error),
    /// The endpoint closed the connection before a complete response.
    #[error("the endpoint closed the connection before a complete response")]
    Closed,
    /// The endpoint sent something that is not a valid HTTP/1.1 response.
    #[error("invalid response from endpoint: {0}")]
    Protocol(&'static str),
    /// The downstream request body failed (the client went away mid-body).
    #[error("request body: {0}")]
    RequestBody(BoxError),
    /// The endpoint switched protocols although nobody asked it to.
    #[error("the endpoint switched protocols without an upgrade request")]
    UnexpectedSwitch,
}

/// An HTTP/1.1 connection to an endpoint, idle or in use.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    endpoint: SocketAddr,
    idle_timeout: Duration,
    /// Bytes read and not yet consumed.
    read: BytesMut,
    /// The request-head buffer, kept between requests to reuse its allocation.
    head: BytesMut,
    /// Where each response header's name and value sit in the head, reused between responses.
    fields: Vec<Field>,
    /// The connection's place under its cluster's `max_connections`, given back when it closes.
    _slot: Option<Slot>,
}

/// Offsets of one header's name and value within a response head.
#[derive(Clone, Copy, Debug)]
struct Field {
    name: (usize, usize),
    value: (usize, usize),
}

impl Connection {
    /// Wraps a socket connected to `endpoint`; pooled, it may idle for `idle_timeout`. `slot`
    /// counts it as open until it is dropped.
    pub fn new(stream: TcpStream, endpoint: SocketAddr, idle_timeout: Duration, slot: Option<Slot>) -> Self {
        Connection {
            stream,
            endpoint,
            idle_timeout,
            read: BytesMut::new(),
            head: BytesMut::new(),
            fields: Vec::new(),
            _slot: slot,
        }
    }

    /// The endpoint this connection goes to.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// How long this connection may sit idle in a pool.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Whether an idle connection can take a request: it must have nothing to read. A readable idle
    /// connection has been closed by the endpoint (or sent bytes nobody asked for). Uses the event
    /// loop's readiness only, so it costs no system call.
    pub fn is_reusable(&self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.stream.poll_read_ready(&mut cx), Poll::Pending)
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    ///
    /// Goes through `AsyncRead::poll_read`, which clears the socket's readiness after a short read;
    /// that is what lets [`Connection::is_reusable`] trust readiness on an idle connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
            self.read.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read)
    }
}

/// How a message body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body.
    Empty,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// What an exchange produced.
#[derive(Debug)]
pub enum Exchanged<B> {
    /// A response, its body streaming from the connection.
    Response(Response<Body<B>>),
    /// `101 Switching Protocols`: the response head, and the connection for the tunnel with the
    /// bytes the endpoint already sent after the head.
    Switched(Response<()>, TcpStream, Bytes),
}

/// What the client reads of a request head: the request line and the headers. A request's own
/// `Parts`, or a reference to a head kept for several attempts (a retried request's), which then
/// need not be copied for each.
pub trait Head {
    /// The method.
    fn method(&self) -> &Method;
    /// The target (origin form).
    fn uri(&self) -> &http::Uri;
    /// The header fields, hop-by-hop ones removed.
    fn headers(&self) -> &HeaderMap;
    /// Writes fields after `headers` (an attempt's own trace context) with [`write_field`].
    fn write_extra(&self, _out: &mut BytesMut) {}
}

/// Writes one `name: value` field line.
pub(crate) fn write_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

impl Head for http::request::Parts {
    fn method(&self) -> &Method {
        &self.method
    }

    fn uri(&self) -> &http::Uri {
        &self.uri
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

impl<T: Head + ?Sized> Head for &T {
    fn method(&self) -> &Method {
        (**self).method()
    }

    fn uri(&self) -> &http::Uri {
        (**self).uri()
    }

    fn headers(&self) -> &HeaderMap {
        (**self).headers()
    }

    fn write_extra(&self, out: &mut BytesMut) {
        (**self).write_extra(out);
    }
}

/// An exchange that failed, and whether the request can be sent again.
#[derive(Debug)]
pub enum Failure<H, B> {
    /// The reused connection was dead before the endpoint saw anything: here is the request back.
    Stale(H, B),
    /// Any other failure; the request is gone.
    Failed(Error),
}

/// Sends the request `head` with `body` on `connection` and reads the response head.
///
/// The request must be in origin form with its hop-by-hop headers removed (`headers`). Framing
/// headers are written here: `content-length` when the body's size is known, chunked otherwise;
/// `Expect` is dropped (the downstream server answers `100 Continue` itself), and a missing `Host`
/// is filled with the endpoint's address. `reused` says the connection came from the pool, which
/// makes an early failure retryable. `on_release` is called with the connection if it can serve
/// another request once this response is complete.
pub async fn exchange<H: Head, B>(
    mut connection: Box<Connection>,
    request: H,
    body: B,
    reused: bool,
    on_release: fn(Box<Connection>),
) -> Result<Exchanged<B>, Failure<H, B>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let framing = request_framing(request.headers(), &body);
    let mut head = std::mem::take(&mut connection.head);
    encode_head(&request, framing, connection.endpoint, &mut head);
    let mut upload = Upload::new(head, body, framing);
    let head_only = request.method() == Method::HEAD;

    // An upload that fails does not end the exchange at once: an endpoint that answers early (a 413)
    // and stops reading makes writes fail, and its answer is what the client should see.
    let mut upload_error = None;
    let parsed = poll_fn(|cx| {
        if !upload.is_done()
            && let Poll::Ready(Err(error)) = upload.poll_drive(cx, &mut connection.stream)
        {
            if matches!(error, Error::RequestBody(_)) {
                return Poll::Ready(Err(error));
            }
            upload_error = Some(error);
        }
        poll_response_head(&mut connection, cx)
    })
    .await;

    let head = match parsed {
        Ok(head) => head,
        Err(error) => {
            let error = upload_error.unwrap_or(error);
            // A dead pooled connection: nothing came back and the body was never touched, so the
            // endpoint cannot have acted on the request.
            let nothing_back = connection.read.is_empty();
            if reused
                && nothing_back
                && upload.body_untouched()
                && !matches!(error, Error::RequestBody(_))
                && let Some(body) = upload.into_body()
            {
                return Err(Failure::Stale(request, body));
            }
            return Err(Failure::Failed(error));
        }
    };

    let mut response = Response::new(());
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        *response.headers_mut() = head.headers;
        let leftover = connection.read.split().freeze();
        return Ok(Exchanged::Switched(response, connection.stream, leftover));
    }

    let decoder = match head.framing(head_only) {
        Ok(decoder) => decoder,
        Err(error) => return Err(Failure::Failed(error)),
    };
    let keep_alive = head.keep_alive && !matches!(decoder, Decoder::Eof);
    *response.headers_mut() = head.headers;
    // Most uploads (every bodiless request) are over by now; only a running one needs a home in the
    // body, and a box keeps the body small for everyone else.
    let upload = if upload.is_complete() {
        connection.head = upload.take_head_buffer();
        UploadState::Complete
    } else if upload.is_done() {
        UploadState::Failed
    } else {
        UploadState::Running(Box::new(upload))
    };
    let mut body = Body { connection: Some(connection), decoder, upload, keep_alive, on_release, pending_frame: None };
    body.finish_if_complete();
    Ok(Exchanged::Response(response.map(|()| body)))
}

/// How the request body will be framed.
fn request_framing<B: http_body::Body>(headers: &HeaderMap, body: &B) -> Framing {
    if body.is_end_stream() {
        // A POST with `Content-Length: 0` keeps saying so; a GET says nothing.
        if headers.contains_key(CONTENT_LENGTH) { Framing::Length(0) } else { Framing::Empty }
    } else {
        match body.size_hint().exact() {
            Some(length) => Framing::Length(length),
            None => Framing::Chunked,
        }
    }
}

/// Writes the request line and headers into `out`.
fn encode_head(request: &impl Head, framing: Framing, endpoint: SocketAddr, out: &mut BytesMut) {
    let (method, uri, headers) = (request.method(), request.uri(), request.headers());
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(if target.is_empty() { b"/" } else { target.as_bytes() });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !headers.contains_key(HOST) {
        // Writing into a BytesMut cannot fail.
        let _ = write!(out, "host: {endpoint}\r\n");
    }
    for (name, value) in headers {
        // Framing is ours to write; `Expect: 100-continue` was answered downstream already.
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == EXPECT {
            continue;
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    request.write_extra(out);
    match framing {
        Framing::Empty => {}
        Framing::Length(length) => {
            let _ = write!(out, "content-length: {length}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Uploads a request: the head, then the body frames in the framing chosen, as a resumable state
/// machine (a partial write is remembered, never lost).
#[derive(Debug)]
struct Upload<B> {
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
    fn new(head: BytesMut, body: B, framing: Framing) -> Self {
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
    fn is_done(&self) -> bool {
        self.failed || (self.body_ended && !self.has_pending())
    }

    /// Everything was written.
    fn is_complete(&self) -> bool {
        !self.failed && self.body_ended && !self.has_pending()
    }

    fn body_untouched(&self) -> bool {
        !self.body_polled
    }

    /// The body back, if it was never finished (a body taken to its end is gone).
    fn into_body(mut self) -> Option<B> {
        self.body.take()
    }

    /// Writes as much as it can; `Ready(Ok)` when everything is written.
    fn poll_drive(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> Poll<Result<(), Error>> {
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
    fn take_head_buffer(&mut self) -> BytesMut {
        let mut head = std::mem::take(&mut self.head);
        head.clear();
        head
    }
}

/// A parsed response head, hop-by-hop headers already left out.
#[derive(Debug)]
struct ResponseHead {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    keep_alive: bool,
    /// `Some(true)` if `Transfer-Encoding` ends in `chunked`, `Some(false)` for any other coding.
    transfer_encoding: Option<bool>,
    /// The `Content-Length`, if one was given.
    content_length: Option<u64>,
}

impl ResponseHead {
    /// How the body is delimited (RFC 9112 §6.3).
    fn framing(&self, head_request: bool) -> Result<Decoder, Error> {
        let status = self.status;
        if head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Decoder::Done);
        }
        Ok(match (self.transfer_encoding, self.content_length) {
            // Transfer-Encoding wins over Content-Length; anything but chunked runs until close.
            (Some(true), _) => Decoder::Chunked(Chunk::Size),
            (Some(false), _) => Decoder::Eof,
            (None, Some(0)) => Decoder::Done,
            (None, Some(n)) => Decoder::Length(n),
            (None, None) => Decoder::Eof,
        })
    }
}

/// Reads until a final (non-1xx, or 101) response head is complete, and parses it.
fn poll_response_head(connection: &mut Connection, cx: &mut Context<'_>) -> Poll<Result<ResponseHead, Error>> {
    loop {
        if !connection.read.is_empty() {
            match parse_response_head(&mut connection.read, &mut connection.fields)? {
                Some(head) if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS => {
                    // 100 Continue, 103 Early Hints: not the answer; keep reading.
                    continue;
                }
                Some(head) => return Poll::Ready(Ok(head)),
                None if connection.read.len() > limits::MAX_HEADER_BYTES => {
                    return Poll::Ready(Err(Error::Protocol("response head too large")));
                }
                None => {}
            }
        }
        match ready!(connection.poll_fill(cx)) {
            Ok(0) => return Poll::Ready(Err(Error::Closed)),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(Error::Io(e))),
        }
    }
}

/// Parses a complete head at the start of `buffer` and consumes it; `None` if incomplete.
///
/// Header values share the buffer's memory (no copy); `fields` is scratch space for their offsets.
fn parse_response_head(buffer: &mut BytesMut, fields: &mut Vec<Field>) -> Result<Option<ResponseHead>, Error> {
    // Uninitialised slots: zeroing 128 of them per response is a measurable cost.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    // The default configuration is the strict one: no obsolete line folding, no spaces before colons.
    let length =
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buffer, &mut slots) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::Protocol("too many response headers")),
            Err(_) => return Err(Error::Protocol("malformed response head")),
        };
    let code = response.code.ok_or(Error::Protocol("malformed status line"))?;
    let status = StatusCode::from_u16(code).map_err(|_| Error::Protocol("invalid status code"))?;
    let version = if response.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let base = buffer.as_ptr() as usize;
    fields.clear();
    fields.extend(response.headers.iter().map(|header| Field {
        name: (header.name.as_ptr() as usize - base, header.name.len()),
        value: (header.value.as_ptr() as usize - base, header.value.len()),
    }));
    let head = buffer.split_to(length).freeze();
    let mut parsed = ResponseHead {
        status,
        version,
        headers: HeaderMap::with_capacity(fields.len()),
        keep_alive: version == Version::HTTP_11,
        transfer_encoding: None,
        content_length: None,
    };
    let mut connection_names = false;
    for field in fields.iter() {
        let (name_at, name_len) = field.name;
        let (value_at, value_len) = field.value;
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])
            .map_err(|_| Error::Protocol("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
            .map_err(|_| Error::Protocol("invalid header value"))?;
        // Hop-by-hop headers describe this connection only: they are read here and not kept, so the
        // response needs no cleaning later.
        if name == CONNECTION {
            for token in value.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    parsed.keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    parsed.keep_alive |= version == Version::HTTP_10;
                } else if !token.eq_ignore_ascii_case(b"upgrade") {
                    connection_names = true;
                }
            }
            continue;
        }
        if name == TRANSFER_ENCODING {
            let last = value.as_bytes().rsplit(|b| *b == b',').next().map(<[u8]>::trim_ascii);
            parsed.transfer_encoding = Some(last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")));
            continue;
        }
        if name == CONTENT_LENGTH {
            for part in value.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                let length = parse_decimal(part).ok_or(Error::Protocol("invalid Content-Length"))?;
                if parsed.content_length.is_some_and(|l| l != length) {
                    return Err(Error::Protocol("conflicting Content-Length values"));
                }
                parsed.content_length = Some(length);
            }
        } else if name == KEEP_ALIVE
            || name == PROXY_CONNECTION
            || name == TE
            || (name == UPGRADE && status != StatusCode::SWITCHING_PROTOCOLS)
        {
            continue;
        }
        parsed.headers.append(name, value);
    }
    if parsed.transfer_encoding.is_some() {
        // A response with both is a smuggling risk: Transfer-Encoding wins, the length goes, and
        // the connection closes after it (RFC 9112 §6.3).
        parsed.headers.remove(CONTENT_LENGTH);
        if parsed.content_length.take().is_some() {
            parsed.keep_alive = false;
        }
    }
    if connection_names {
        // Rare: the headers `Connection` names are hop-by-hop too.
        remove_connection_named(&head, fields, &mut parsed.headers);
    }
    Ok(Some(parsed))
}

/// Removes the headers named in `Connection` (other than the standard tokens).
fn remove_connection_named(head: &Bytes, fields: &[Field], headers: &mut HeaderMap) {
    for field in fields {
        let (name_at, name_len) = field.name;
        if !head[name_at..name_at + name_len].eq_ignore_ascii_case(b"connection") {
            continue;
        }
        let (value_at, value_len) = field.value;
        for token in head[value_at..value_at + value_len].split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if let Ok(name) = HeaderName::from_bytes(token) {
                headers.remove(name);
            }
        }
    }
}

/// A non-empty run of ASCII digits as a number (no sign, no spaces, no overflow).
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0_u64, |n, d| d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0')))
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decoder {
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
enum Chunk {
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
enum UploadState<B> {
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
    /// A frame decoded but not yet handed out (trailers after the last data).
    pending_frame: Option<Frame<Bytes>>,
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
    /// Hands the connection back if both directions are complete and it may be reused.
    fn finish_if_complete(&mut self) {
        if self.decoder != Decoder::Done || self.pending_frame.is_some() {
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
            if let Some(frame) = self.pending_frame.take() {
                return Poll::Ready(Some(Ok(frame)));
            }
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
            let line = &buffer[..line_end];
            let digits = line.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
            if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
                return Err(Error::Protocol("invalid chunk size"));
            }
            let size = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u64::from_str_radix(d, 16).ok())
                .ok_or(Error::Protocol("invalid chunk size"))?;
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
        self.decoder == Decoder::Done && self.pending_frame.is_none()
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
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::cell::RefCell;

    use http::Request;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    type TestBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

    fn body(bytes: &'static [u8]) -> TestBody {
        Full::new(Bytes::from_static(bytes)).map_err(|never| match never {}).boxed()
    }

    fn streamed(parts: Vec<&'static [u8]>) -> TestBody {
        let frames = futures_util::stream::iter(
            parts.into_iter().map(|p| Ok::<_, BoxError>(Frame::data(Bytes::from_static(p)))),
        );
        BodyExt::boxed(StreamBody::new(frames))
    }

    thread_local! {
        /// Connections released by this test's exchanges (each test runs on its own thread). Boxed
        /// because that is how the pool holds them and how `exchange` takes them back.
        #[allow(clippy::vec_box)]
        static RELEASED: RefCell<Vec<Box<Connection>>> = const { RefCell::new(Vec::new()) };
    }

    fn release(connection: Box<Connection>) {
        RELEASED.with(|released| released.borrow_mut().push(connection));
    }

    /// A scripted endpoint: answers each request read with the next canned response; returns what it
    /// read, request by request.
    async fn endpoint(responses: Vec<&'static [u8]>) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for response in responses {
                let mut buffer = [0_u8; 65536];
                let n = stream.read(&mut buffer).await.unwrap();
                seen.extend_from_slice(&buffer[..n]);
                stream.write_all(response).await.unwrap();
            }
            seen
        });
        (address, task)
    }

    async fn connect(address: SocketAddr) -> Box<Connection> {
        Box::new(Connection::new(TcpStream::connect(address).await.unwrap(), address, Duration::from_secs(60), None))
    }

    fn get(path: &str) -> Request<TestBody> {
        Request::get(path).header("host", "shop").body(body(b"")).unwrap()
    }

    async fn send(connection: Box<Connection>, request: Request<TestBody>) -> Response<Body<TestBody>> {
        let (head, body) = request.into_parts();
        match exchange(connection, head, body, false, release).await {
            Ok(Exchanged::Response(response)) => response,
            Ok(Exchanged::Switched(..)) => panic!("unexpected switch"),
            Err(Failure::Failed(e)) => panic!("{e}"),
            Err(Failure::Stale(..)) => panic!("stale"),
        }
    }

    async fn read_all(response: Response<Body<TestBody>>) -> (Bytes, Option<HeaderMap>) {
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn length_framed_response_then_reuse() {
        let (address, server) = endpoint(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye",
        ])
        .await;
        let response = send(connect(address).await, get("/one?q=1")).await;
        assert_eq!(response.headers()["x-a"], "1");
        assert_eq!(read_all(response).await.0, "hello");
        let reused = RELEASED.with(|r| r.borrow_mut().pop()).expect("connection released after the body");
        let response = send(reused, get("/two")).await;
        assert_eq!(read_all(response).await.0, "bye");
        let seen = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(seen.starts_with("GET /one?q=1 HTTP/1.1\r\nhost: shop\r\n\r\nGET /two HTTP/1.1\r\n"), "{seen}");
    }

    #[tokio::test]
    async fn chunked_response_with_trailers_and_interim_responses() {
        let (address, _server) = endpoint(vec![
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
        ])
        .await;
        let response = send(connect(address).await, get("/")).await;
        assert_eq!(response.status(), 200);
        let (data, trailers) = read_all(response).await;
        assert_eq!(data, "hello world");
        assert_eq!(trailers.unwrap()["x-sum"], "11");
    }

    #[tokio::test]
    async fn close_delimited_and_bodiless_responses() {
        let (address, _server) = endpoint(vec![b"HTTP/1.0 200 OK\r\n\r\nuntil close"]).await;
        let response = send(connect(address).await, get("/")).await;
        assert_eq!(read_all(response).await.0, "until close");

        let (address, _server) = endpoint(vec![b"HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"]).await;
        let response = send(connect(address).await, get("/")).await;
        assert!(http_body::Body::is_end_stream(response.body()));

        let (address, _server) = endpoint(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"]).await;
        let head = Request::head("/").header("host", "a").body(body(b"")).unwrap();
        let response = send(connect(address).await, head).await;
        assert!(http_body::Body::is_end_stream(response.body()), "HEAD responses have no body whatever they declare");
    }

    #[tokio::test]
    async fn invalid_responses_are_errors() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
        ] {
            let leaked: &'static [u8] = Box::leak(bad.to_vec().into_boxed_slice());
            let (address, _server) = endpoint(vec![leaked]).await;
            let (head, body) = get("/").into_parts();
            let result = exchange(connect(address).await, head, body, false, release).await;
            assert!(matches!(result, Err(Failure::Failed(Error::Protocol(_)))), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn request_bodies_are_framed_by_length_or_chunked() {
        let (address, server) = endpoint(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
        let post = Request::post("/up").header("host", "a").body(body(b"12345")).unwrap();
        let response = send(connect(address).await, post).await;
        read_all(response).await;
        let seen = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(seen.ends_with("content-length: 5\r\n\r\n12345"), "{seen}");

        let (address, server) = endpoint(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
        let post = Request::post("/up")
            .header("host", "a")
            .header("transfer-encoding", "chunked")
            .header("expect", "100-continue")
            .body(streamed(vec![b"ab", b"", b"cde"]))
            .unwrap();
        let response = send(connect(address).await, post).await;
        read_all(response).await;
        let seen = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(!seen.contains("expect"), "{seen}");
        assert_eq!(seen.matches("transfer-encoding").count(), 1, "{seen}");
        assert!(seen.ends_with("transfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"), "{seen}");
    }

    #[tokio::test]
    async fn a_dead_pooled_connection_hands_the_request_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connection = connect(address).await;
        let (server_side, _) = listener.accept().await.unwrap();
        drop(server_side);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!connection.is_reusable(), "a closed idle connection is noticed at checkout");
        let (head, body) = get("/again").into_parts();
        match exchange(connection, head, body, true, release).await {
            Err(Failure::Stale(head, _)) => assert_eq!(head.uri, "/again"),
            other => panic!("expected the request back, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn switching_protocols_hands_over_the_connection_and_early_bytes() {
        let (address, _server) = endpoint(vec![
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nEARLY",
        ])
        .await;
        let request = Request::get("/ws").header("host", "a").header("upgrade", "websocket").body(body(b"")).unwrap();
        let (parts, body) = request.into_parts();
        match exchange(connect(address).await, parts, body, false, release).await {
            Ok(Exchanged::Switched(head, _stream, leftover)) => {
                assert_eq!(head.status(), 101);
                assert_eq!(leftover, "EARLY");
            }
            other => panic!("expected a switch, got {other:?}"),
        }
    }

    /// Hop-by-hop headers (and those `Connection` names) never reach the response; with both
    /// `Transfer-Encoding` and `Content-Length`, chunked wins, the length goes, and the connection
    /// is not reused.
    #[tokio::test]
    async fn hop_by_hop_headers_are_left_out_and_smuggling_shapes_close_the_connection() {
        let (address, _server) = endpoint(vec![
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive, x-private\r\nx-private: 1\r\nkeep-alive: timeout=5\r\nx-kept: yes\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ])
        .await;
        let response = send(connect(address).await, get("/")).await;
        let names: Vec<&str> = response.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
        assert_eq!(read_all(response).await.0, "abc");
        assert!(RELEASED.with(|r| r.borrow().is_empty()), "a TE+CL response's connection was pooled");
    }

    #[test]
    fn chunk_decoder_rejects_garbage_sizes() {
        let mut state = Chunk::Size;
        let mut buffer = BytesMut::from(&b"zz\r\n"[..]);
        assert!(decode_chunk(&mut state, &mut buffer).is_err());
        let mut buffer = BytesMut::from(&b"ffffffffffffffff\r\n"[..]);
        assert!(decode_chunk(&mut Chunk::Size, &mut buffer).is_err(), "sizes that overflow are refused");
        let mut state = Chunk::DataEnd;
        let mut buffer = BytesMut::from(&b"xx"[..]);
        assert!(decode_chunk(&mut state, &mut buffer).is_err());
    }
}
