//! An endpoint written to hurt the proxy: endless headers, endless interim responses, a head over
//! 64 KiB or of 200 fields, chunk-size lines that never end, a `Content-Length` that lies either
//! way, `Content-Length` with `Transfer-Encoding`, NUL and CR inside header values, and a body cut
//! off half way.
//!
//! For each, the client gets a clean answer (a 502, or the connection ended in an error before the
//! response was whole, never a truncated body passed off as complete), the proxy reads a bounded amount of it, and no keep-alive
//! connection is left out of step: the next request on the client's connection (or on a new one,
//! where the proxy closed it) gets its own answer, never bytes left over from the abuse.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use remora_proxy::testing::config::{Cluster, Config, Listener, RouteTable};
use remora_proxy::testing::servers::full;
use remora_proxy::testing::{Client, TestProxy, eventually};

use crate::raw_upstream::{Answer, Ended, RawUpstream, ok};

/// How an abusive answer must reach the client.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The proxy's own error answer.
    Status(u16),
    /// The connection ended in an error before the response was whole (before its head, or in its
    /// body): the client can tell it is incomplete.
    Broken,
    /// A 200 with this whole body.
    Body(String),
}

/// The abusive answers, by request path, with what the client must see.
fn cases() -> Vec<(&'static str, Outcome)> {
    vec![
        ("/endless-headers", Outcome::Status(502)),
        ("/endless-interim", Outcome::Status(502)),
        ("/huge-head", Outcome::Status(502)),
        ("/many-fields", Outcome::Status(502)),
        ("/endless-chunk-size", Outcome::Broken),
        ("/endless-chunk-extension", Outcome::Broken),
        ("/short-length", Outcome::Broken),
        ("/long-length", Outcome::Body("hello".into())),
        ("/length-and-chunked", Outcome::Body("hello".into())),
        ("/nul-in-value", Outcome::Status(502)),
        ("/cr-in-value", Outcome::Status(502)),
        ("/space-before-colon", Outcome::Status(502)),
        ("/two-lengths", Outcome::Status(502)),
        ("/mid-body-close", Outcome::Broken),
        ("/mid-chunk-close", Outcome::Broken),
    ]
}

fn answer(line: &str) -> Answer {
    let path = line.split(' ').nth(1).unwrap_or("/");
    let bytes = |text: &str| text.as_bytes().to_vec();
    match path {
        "/endless-headers" => Answer::Endless { first: bytes("HTTP/1.1 200 OK\r\n"), repeat: bytes("x-a: b\r\n") },
        "/endless-interim" => Answer::Endless { first: Vec::new(), repeat: bytes("HTTP/1.1 100 Continue\r\n\r\n") },
        "/huge-head" => Answer::Bytes(
            format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-big: {}\r\n\r\n", "b".repeat(100_000)).into_bytes(),
        ),
        "/many-fields" => {
            let fields: String = (0..200).map(|i| format!("x-{i}: {i}\r\n")).collect();
            Answer::Bytes(format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n{fields}\r\n").into_bytes())
        }
        "/endless-chunk-size" => Answer::Endless {
            first: bytes("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
            repeat: bytes("0"),
        },
        "/endless-chunk-extension" => Answer::Endless {
            first: bytes("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext="),
            repeat: bytes("a"),
        },
        "/short-length" => Answer::ThenClose(bytes("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")),
        // Five bytes declared, a whole second response after them: it must never be read as the
        // answer to the next request.
        "/long-length" => Answer::Bytes([ok("hello"), ok("smuggled")].concat()),
        "/length-and-chunked" => Answer::Bytes(bytes(
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )),
        "/nul-in-value" => Answer::Bytes(bytes("HTTP/1.1 200 OK\r\nx-a: b\0c\r\ncontent-length: 2\r\n\r\nno")),
        "/cr-in-value" => Answer::Bytes(bytes("HTTP/1.1 200 OK\r\nx-a: b\rc\r\ncontent-length: 2\r\n\r\nno")),
        "/space-before-colon" => {
            Answer::Bytes(bytes("HTTP/1.1 200 OK\r\ncontent-length : 2\r\n\r\nnoHTTP/1.1 200 OK\r\n\r\n"))
        }
        "/two-lengths" => {
            Answer::Bytes(bytes("HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 10\r\n\r\nno_no_no_n"))
        }
        "/mid-body-close" => {
            Answer::ThenClose([bytes("HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"), vec![b'x'; 500]].concat())
        }
        "/mid-chunk-close" => {
            Answer::ThenClose(bytes("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n9\r\nhal"))
        }
        _ => Answer::Bytes(ok("fine")),
    }
}

/// Sends `GET path` and reads the answer whole.
async fn exchange(client: &mut Client, path: &str) -> Outcome {
    let request = client.request(Method::GET, "a", path).body(full(Bytes::new())).unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(10), client.send(request)).await;
    let Ok(response) = sent.unwrap_or_else(|_| panic!("{path}: no response head in 10 s")) else {
        return Outcome::Broken;
    };
    let status = response.status().as_u16();
    if status != 200 {
        return Outcome::Status(status);
    }
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("{path}: the body neither ended nor failed in 10 s"));
    match body {
        Err(_) => Outcome::Broken,
        Ok(body) => Outcome::Body(String::from_utf8_lossy(&body.to_bytes()).into_owned()),
    }
}

#[tokio::test]
async fn an_abusive_upstream_gets_clean_errors_and_never_a_connection_out_of_step() {
    let upstream = RawUpstream::start(std::sync::Arc::new(answer)).await;
    let config = Config::new()
        .with(Cluster::new("web").endpoints(&[upstream.address()]))
        .with(RouteTable::to("web", "web"))
        .with(Listener::new("in").http1());
    let proxy = TestProxy::start(&config.yaml());
    let address = proxy.address("in");

    for (path, expected) in cases() {
        let mut client = Client::http1(address).await;
        assert_eq!(client.get("a", "/").await.text(), "fine", "{path}: the warm-up");
        let outcome = exchange(&mut client, path).await;
        assert_eq!(outcome, expected, "{path}");
        // The same client connection (unless it broke) answers the next request with its own
        // answer; so does a new one, whichever upstream connection it is given.
        let next = exchange(&mut client, "/ok").await;
        if !(expected == Outcome::Broken && next == Outcome::Broken) {
            assert_eq!(next, Outcome::Body("fine".into()), "{path}: the connection that saw it");
        }
        let mut fresh = Client::http1(address).await;
        for _ in 0..3 {
            assert_eq!(exchange(&mut fresh, "/ok").await, Outcome::Body("fine".into()), "{path}: a new connection");
        }
    }

    // Each endless answer was cut off by the proxy closing its connection, not read on and on
    // (and not left open unread).
    eventually("the endless answers end", Duration::from_secs(10), || async { upstream.endless().len() == 4 }).await;
    for (line, ended) in upstream.endless() {
        assert_eq!(ended, Ended::Closed, "{line}");
    }
    let seen = upstream.seen();
    assert!(seen.iter().all(|s| !s.ambiguous), "a request went up with two framings");
    // After a response framed both ways, the endpoint's connection is not used again.
    let framed_twice = seen.iter().position(|s| s.head.starts_with("GET /length-and-chunked ")).unwrap();
    let connection = seen[framed_twice].connection;
    assert!(
        seen[framed_twice + 1..].iter().all(|s| s.connection != connection),
        "a connection that sent Content-Length with chunked was reused"
    );
}
