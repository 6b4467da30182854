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
//!
//! # Layout
//! - here: the connection, [`exchange`] (one request and its response head) and its errors;
//! - `head` — the request head as the client sees it ([`Head`]) and its encoding, framing chosen;
//! - `upload` — the request body's resumable upload;
//! - `response` — the response head: read, parsed (RFC 9112), hop-by-hop fields left out, framing;
//! - `decode` — the response [`Body`]: length, chunked with trailers, or until close;
//! - `differential` (tests) — this client against hyper's over generated responses.

mod decode;
#[cfg(test)]
mod differential;
mod head;
mod response;
mod upload;

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Response, StatusCode};
use tokio::net::TcpStream;

use crate::policy::breaker::Slot;
pub use decode::Body;
use decode::{Decoder, UploadState};
pub use head::Head;
pub(crate) use head::write_field;
use head::{encode_head, request_framing};
use response::{Field, poll_response_head};
use upload::Upload;

/// Most header fields in a response head or a trailer section.
const MAX_HEADERS: usize = 128;

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 16 * 1024;

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

    /// Lets go of the buffers an idle connection keeps for its next exchange (the read buffer, empty
    /// between exchanges, the request-head buffer and the field positions): a pooled connection
    /// that sat through a sweep costs its socket, not its last response's buffers.
    pub fn shed_buffers(&mut self) {
        if self.read.is_empty() {
            self.read = BytesMut::new();
        }
        self.head = BytesMut::new();
        self.fields = Vec::new();
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

/// What an exchange produced.
#[derive(Debug)]
pub enum Exchanged<B> {
    /// A response, its body streaming from the connection.
    Response(Response<Body<B>>),
    /// `101 Switching Protocols`: the response head, and the connection for the tunnel with the
    /// bytes the endpoint already sent after the head.
    Switched(Response<()>, TcpStream, Bytes),
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
    let mut interim = 0;
    let parsed = poll_fn(|cx| {
        if !upload.is_done()
            && let Poll::Ready(Err(error)) = upload.poll_drive(cx, &mut connection.stream)
        {
            if matches!(error, Error::RequestBody(_)) {
                return Poll::Ready(Err(error));
            }
            upload_error = Some(error);
        }
        poll_response_head(&mut connection, &mut interim, cx)
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
    let body = Body::new(connection, decoder, upload, keep_alive, on_release);
    Ok(Exchanged::Response(response.map(|()| body)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::cell::RefCell;

    use http::Request;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use http::HeaderMap;
    use http::header::HeaderName;
    use http_body::Frame;

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
}
