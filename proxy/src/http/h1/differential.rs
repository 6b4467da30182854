//! The HTTP/1.1 client's response decoding against hyper's client, over generated responses.
//!
//! Each case is a response an endpoint could send: a status (sometimes after interim 100 and 103
//! responses), header fields, a body framed by length, chunked (chunk extensions, trailers) or by
//! closing, HTTP/1.0 or 1.1, keep-alive or `Connection: close`; and in some cases one byte of it
//! replaced. A loopback endpoint sends it to our client and to hyper's, then answers a second
//! request on the same connection if one comes. What each client made of it is compared: the status,
//! the end-to-end header fields (ours leaves hop-by-hop fields out, as a proxy must; hyper keeps
//! them, so they are left out of its side here), the body, the trailers, and whether the connection
//! served the second request.
//!
//! What must hold: a well-formed response is read the same by both; a damaged one that our client
//! accepts, hyper accepts too and reads the same. Our client may refuse what hyper lets pass (a
//! length with a body cut short and the connection closed, say), never the other way round.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Connection, Exchanged, Failure, exchange};
use crate::http::headers::strip_hop_by_hop;

/// How a generated body is framed.
#[derive(Clone, Debug)]
enum Framing {
    Length,
    /// Chunk boundaries (as cut points into the body), upper-case hex, an extension on each size,
    /// trailer fields.
    Chunked {
        cuts: Vec<usize>,
        upper: bool,
        extension: bool,
        trailers: Vec<(String, String)>,
    },
    Close,
}

/// One response an endpoint could send.
#[derive(Clone, Debug)]
struct Case {
    http10: bool,
    interim: Vec<u16>,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    framing: Framing,
    close: bool,
    /// One byte replaced: where (a fraction of the length) and by what.
    damage: Option<(f64, u8)>,
}

impl Case {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.http10 {
            for status in &self.interim {
                out.extend_from_slice(format!("HTTP/1.1 {status} Interim\r\nlink: </style.css>\r\n\r\n").as_bytes());
            }
        }
        let version = if self.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        out.extend_from_slice(format!("{version} {} Reason Phrase\r\n", self.status).as_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        let bodiless = self.status == 204 || self.status == 304;
        if self.close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if self.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        match &self.framing {
            _ if bodiless => out.extend_from_slice(b"\r\n"),
            Framing::Length => {
                out.extend_from_slice(format!("content-length: {}\r\n\r\n", self.body.len()).as_bytes());
                out.extend_from_slice(&self.body);
            }
            Framing::Close => {
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&self.body);
            }
            Framing::Chunked { cuts, upper, extension, trailers } => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                let mut bounds: Vec<usize> = cuts.iter().map(|cut| cut % (self.body.len() + 1)).collect();
                bounds.extend([0, self.body.len()]);
                bounds.sort_unstable();
                bounds.dedup();
                for pair in bounds.windows(2) {
                    let chunk = &self.body[pair[0]..pair[1]];
                    let size = if *upper { format!("{:X}", chunk.len()) } else { format!("{:x}", chunk.len()) };
                    let extension = if *extension { ";name=value" } else { "" };
                    out.extend_from_slice(format!("{size}{extension}\r\n").as_bytes());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n");
                for (name, value) in trailers {
                    out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
        }
        if let Some((at, byte)) = self.damage {
            let index = ((out.len() as f64 * at) as usize).min(out.len() - 1);
            out[index] = byte;
        }
        out
    }

    /// Whether the endpoint ends the body by closing.
    fn closes(&self) -> bool {
        matches!(self.framing, Framing::Close) && self.status != 204 && self.status != 304
    }
}

fn field() -> impl Strategy<Value = (String, String)> {
    let name = prop::sample::select(vec!["x-a", "X-Mixed-Case", "server", "cache-control", "set-cookie", "vary"]);
    (name, "[!-~]([ -~]{0,16}[!-~])?").prop_map(|(name, value)| (name.to_owned(), value))
}

fn case() -> impl Strategy<Value = Case> {
    let framing = prop_oneof![
        Just(Framing::Length),
        Just(Framing::Close),
        (
            prop::collection::vec(any::<usize>(), 0..4),
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(field(), 0..3)
        )
            .prop_map(|(cuts, upper, extension, trailers)| Framing::Chunked {
                cuts,
                upper,
                extension,
                trailers
            }),
    ];
    (
        any::<bool>(),
        prop::collection::vec(prop::sample::select(vec![100u16, 103]), 0..3),
        prop::sample::select(vec![200u16, 201, 204, 206, 301, 304, 404, 418, 500, 503]),
        prop::collection::vec(field(), 0..5),
        prop::collection::vec(any::<u8>(), 0..300),
        framing,
        any::<bool>(),
        prop::option::weighted(0.3, (0.0..1.0f64, any::<u8>())),
    )
        .prop_map(|(http10, interim, status, headers, body, framing, close, damage)| {
            // HTTP/1.0 has no chunked coding; a 1.0 response is framed by length or by closing.
            let framing = match framing {
                Framing::Chunked { .. } if http10 => Framing::Length,
                framing => framing,
            };
            Case { http10, interim, status, headers, body, framing, close, damage }
        })
}

/// What a client made of a response.
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // one per case, compared and dropped
enum Read {
    Refused,
    Response { status: u16, headers: HeaderMap, body: Bytes, trailers: Option<HeaderMap>, reused: bool },
}

const SECOND: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond";

/// An endpoint for one connection: sends `response` after the first request head, ends a body that
/// closes by closing, and answers a second request on the connection if one comes soon.
async fn endpoint(response: Vec<u8>, closes: bool) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        if read_head(&mut stream, Duration::from_secs(5)).await && stream.write_all(&response).await.is_ok() {
            if closes {
                return;
            }
            if read_head(&mut stream, Duration::from_millis(100)).await {
                let _ = stream.write_all(SECOND).await;
                let _ = read_head(&mut stream, Duration::from_millis(100)).await;
            }
        }
    });
    address
}

/// Reads a request head (through its blank line) within `wait`; whether one came.
async fn read_head(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    };
    tokio::time::timeout(wait, read).await.unwrap_or(false)
}

thread_local! {
    static RELEASED: RefCell<Option<Box<Connection>>> = const { RefCell::new(None) };
}

fn release(connection: Box<Connection>) {
    RELEASED.with(|released| *released.borrow_mut() = Some(connection));
}

fn get() -> http::request::Parts {
    http::Request::get("/").header("host", "differential").body(()).unwrap().into_parts().0
}

async fn ours(case: &Case) -> Read {
    let address = endpoint(case.bytes(), case.closes()).await;
    let stream = TcpStream::connect(address).await.unwrap();
    let connection = Box::new(Connection::new(stream, address, Duration::from_secs(60), None));
    RELEASED.with(|released| *released.borrow_mut() = None);
    let response = match exchange(connection, get(), Empty::<Bytes>::new(), false, release).await {
        Ok(Exchanged::Response(response)) => response,
        Ok(Exchanged::Switched(..)) | Err(Failure::Failed(_) | Failure::Stale(..)) => return Read::Refused,
    };
    let (head, body) = response.into_parts();
    let Ok(collected) = body.collect().await else { return Read::Refused };
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    let mut reused = false;
    if let Some(connection) = RELEASED.with(|released| released.borrow_mut().take())
        && let Ok(Exchanged::Response(second)) = exchange(connection, get(), Empty::<Bytes>::new(), true, release).await
        && let Ok(collected) = second.into_body().collect().await
    {
        reused = collected.to_bytes() == "second";
    }
    Read::Response { status: head.status.as_u16(), headers: head.headers, body, trailers, reused }
}

async fn hypers(case: &Case) -> Read {
    let address = endpoint(case.bytes(), case.closes()).await;
    let stream = TcpStream::connect(address).await.unwrap();
    let Ok((mut sender, connection)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
        return Read::Refused;
    };
    tokio::spawn(connection);
    let request = || http::Request::get("/").header("host", "differential").body(Empty::<Bytes>::new()).unwrap();
    let Ok(response) = sender.send_request(request()).await else { return Read::Refused };
    let (mut head, body) = response.into_parts();
    let Ok(collected) = body.collect().await else { return Read::Refused };
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    let mut reused = false;
    if sender.ready().await.is_ok()
        && let Ok(second) = sender.send_request(request()).await
        && let Ok(collected) = second.into_body().collect().await
    {
        reused = collected.to_bytes() == "second";
    }
    strip_hop_by_hop(&mut head.headers, false);
    Read::Response { status: head.status.as_u16(), headers: head.headers, body, trailers, reused }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn responses_read_as_hyper_reads_them(case in case()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (ours, hypers) = runtime.block_on(async {
            let ours = tokio::time::timeout(Duration::from_secs(10), ours(&case)).await.expect("our client hung");
            let hypers = tokio::time::timeout(Duration::from_secs(10), hypers(&case)).await.expect("hyper hung");
            (ours, hypers)
        });
        let bytes = String::from_utf8_lossy(&case.bytes()).into_owned();
        if case.damage.is_none() {
            prop_assert!(ours != Read::Refused, "we refused a well-formed response:\n{bytes}");
            prop_assert_eq!(ours, hypers, "\n{}", bytes);
        } else if ours != Read::Refused {
            prop_assert_eq!(ours, hypers, "we accepted a damaged response:\n{}", bytes);
        }
    }
}
