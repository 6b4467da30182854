//! Request smuggling: requests framed so that the proxy and the application behind it could
//! disagree on where one ends, over HTTP/1.1 and from HTTP/2 down to an HTTP/1.1 endpoint.
//!
//! Each request hides a second one, `GET /smuggled`, where a lax reader would find it. The
//! endpoint behind the proxy is [`RawUpstream`], which keeps the exact head of everything that
//! reaches it: the hidden request must never arrive as a request of its own, no forwarded head may
//! carry two framings, and no header the client smuggled into a value (CR LF inside it) may arrive as
//! a field. The client gets a 4xx or its stream reset, never a hung connection, and the proxy then
//! serves the next client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use remora_control_api::v1::cluster::Protocol;
use remora_proxy::testing::TestProxy;
use remora_proxy::testing::config::{Cluster, Config, Listener, RouteTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::h2_limits::{DATA, END_HEADERS, END_STREAM, HEADERS, Raw, frame, literal};
use crate::raw_upstream::{Answer, RawUpstream, Seen, ok};

/// A proxy with an `http1` listener `h1` and an `http2` listener `h2`, both sending everything to
/// one raw endpoint over HTTP/1.1.
async fn setup() -> (RawUpstream, TestProxy) {
    let upstream = RawUpstream::start(Arc::new(|_: &str| Answer::Bytes(ok("fine")))).await;
    let config = Config::new()
        .with(Cluster::new("web").protocol(Protocol::Http1).endpoints(&[upstream.address()]))
        .with(RouteTable::to("web", "web"))
        .with(Listener::new("h1").http1())
        .with(Listener::new("h2").http2());
    let proxy = TestProxy::start(&config.yaml());
    (upstream, proxy)
}

/// Nothing the client hid reached the endpoint as a request or a header of its own, and nothing
/// went up framed two ways.
fn assert_nothing_smuggled(seen: &[Seen], case: &str) {
    for request in seen {
        let line = request.head.lines().next().unwrap_or_default();
        assert!(!line.contains("/smuggled"), "{case}: the hidden request reached the endpoint: {seen:#?}");
        assert!(!request.ambiguous, "{case}: a request went up framed two ways: {}", request.head);
        let smuggled_field = request.head.lines().any(|l| l.to_ascii_lowercase().starts_with("x-smuggled"));
        assert!(!smuggled_field, "{case}: a header hidden in a value arrived as a field: {}", request.head);
    }
}

/// Sends `request` on a new connection and reads until the proxy closes it (at most 5 s).
async fn h1_exchange(address: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    assert!(read.is_ok(), "the connection was held open: {response}");
    response
}

const HIDDEN: &str = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";

/// HTTP/1.1 requests whose framing is ambiguous or malformed are refused with a 400, or (a
/// `Content-Length` beside chunked) read as chunked and the connection closed after the answer, as
/// RFC 9112 §6.3 says; the request hidden after them never reaches the endpoint.
#[tokio::test]
async fn ambiguous_http1_framing_smuggles_nothing() {
    let (upstream, proxy) = setup().await;
    let address = proxy.address("h1");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "CL.TE",
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{HIDDEN}"
            ),
            "HTTP/1.1 200",
        ),
        (
            "TE.CL",
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{HIDDEN}"
            ),
            "HTTP/1.1 200",
        ),
        (
            "chunked not last",
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{HIDDEN}"
            ),
            "HTTP/1.1 400",
        ),
        (
            "unknown coding",
            format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{HIDDEN}"),
            "HTTP/1.1 400",
        ),
        (
            "space before colon",
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{HIDDEN}"
            ),
            "HTTP/1.1 400",
        ),
        (
            "folded coding",
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{HIDDEN}"
            ),
            "HTTP/1.1 400",
        ),
        (
            "two lengths",
            format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n{HIDDEN}"),
            "HTTP/1.1 400",
        ),
        ("signed length", format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +40\r\n\r\n{HIDDEN}"), "HTTP/1.1 400"),
        (
            "chunk size overflow",
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000001\r\na\r\n0\r\n\r\n{HIDDEN}"
            ),
            "HTTP/1.1 400",
        ),
        (
            "HTTP/1.0 chunked",
            format!("POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{HIDDEN}"),
            "HTTP/1.1 400",
        ),
        (
            "bare CR in a value",
            format!("GET / HTTP/1.1\r\nHost: a\r\nx-a: b\rx-smuggled: 1\r\n\r\n{HIDDEN}"),
            "HTTP/1.1 400",
        ),
    ];
    for (case, request, expected) in cases {
        let response = h1_exchange(address, request.as_bytes()).await;
        assert!(response.starts_with(expected), "{case}: {response}");
        assert_eq!(response.matches("HTTP/1.1 ").count(), 1, "{case}: more than one answer: {response}");
        assert_nothing_smuggled(&upstream.seen(), case);
    }
    let served = upstream.seen();
    assert_eq!(served.len(), 2, "CL.TE and TE.CL went up once each: {served:#?}");
    assert!(served.iter().all(|s| s.body.is_empty()), "their bodies were the empty chunked ones");
    let response = h1_exchange(address, b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

/// A request header block of `fields` after the pseudo-headers of `POST /` (or `path`).
fn block(path: &[u8], fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in [(":method", b"POST" as &[u8]), (":scheme", b"http"), (":path", path), (":authority", b"a")] {
        literal(name, value, &mut out);
    }
    for (name, value) in fields {
        literal(name, value, &mut out);
    }
    out
}

/// Sends one request on a new raw HTTP/2 connection and reads until the stream ends or is reset;
/// true if it was refused (a reset, a GOAWAY, or a 4xx).
async fn h2_refused(address: SocketAddr, frames: Vec<u8>) -> bool {
    let mut raw = Raw::connect(address).await;
    raw.send(&frames).await;
    raw.refused().await
}

/// HTTP/2 requests that would be smuggling once written as HTTP/1.1: a body longer than its
/// `content-length` (the rest a second request), `transfer-encoding` (not allowed in HTTP/2), CR
/// LF inside a value, the path or the authority, and a connection-specific field. Each is refused
/// on its stream, and nothing it hid reaches the HTTP/1.1 endpoint.
#[tokio::test]
async fn http2_requests_cannot_smuggle_into_http1() {
    let (upstream, proxy) = setup().await;
    let address = proxy.address("h2");
    let body = format!("hello{HIDDEN}");
    let with_body = |fields: &[(&str, &[u8])]| {
        let mut frames = frame(HEADERS, END_HEADERS, 1, &block(b"/", fields));
        frames.extend(frame(DATA, END_STREAM, 1, body.as_bytes()));
        frames
    };
    let headers_only =
        |path: &[u8], fields: &[(&str, &[u8])]| frame(HEADERS, END_HEADERS | END_STREAM, 1, &block(path, fields));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("content-length shorter than the body", with_body(&[("content-length", b"5")])),
        ("transfer-encoding", with_body(&[("transfer-encoding", b"chunked")])),
        ("CR LF in a value", headers_only(b"/", &[("x-a", b"b\r\nx-smuggled: 1")])),
        ("LF in a value", headers_only(b"/", &[("x-a", b"b\nx-smuggled: 1")])),
        ("NUL in a value", headers_only(b"/", &[("x-a", b"b\0x-smuggled: 1")])),
        ("CR LF in the path", headers_only(b"/ HTTP/1.1\r\nx-smuggled: 1\r\n\r\nGET /smuggled", &[])),
        ("a space in the path", headers_only(b"/ HTTP/1.1", &[])),
        ("upper case in a name", headers_only(b"/", &[("X-Smuggled", b"1")])),
        ("a connection-specific field", headers_only(b"/", &[("connection", b"keep-alive")])),
        ("keep-alive", headers_only(b"/", &[("keep-alive", b"timeout=5")])),
        ("upgrade", headers_only(b"/", &[("upgrade", b"websocket")])),
    ];
    for (case, frames) in cases {
        assert!(h2_refused(address, frames).await, "{case}: served");
        assert_nothing_smuggled(&upstream.seen(), case);
    }
    // A request whose content-length is right crosses, framed once.
    assert!(!h2_refused(address, with_body(&[("content-length", body.len().to_string().as_bytes())])).await);
    let seen = upstream.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.body, body.as_bytes(), "the body went up whole, as a body");
    assert_nothing_smuggled(&seen, "a true content-length");
}
