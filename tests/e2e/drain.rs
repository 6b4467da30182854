//! Drain: in-flight requests finish, HTTP/1.1 clients are told `Connection: close`, HTTP/2 clients
//! get GOAWAY, new connections are refused, and the drain time bounds the wait.

use std::time::Duration;

use remora_proxy::testing::{Client, HttpServer, Reply, TcpEchoServer, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{cluster, listener, route_all};

fn slow_proxy(upstream: &HttpServer, listener_extra: &str) -> TestProxy {
    TestProxy::start(&format!(
        "resources:\n{}{}{}",
        cluster("slow", "", &[upstream.address()]),
        route_all("slow", "slow"),
        listener("in", listener_extra),
    ))
}

/// Runs `request` and, 150 ms into it, a drain; returns the reply and whether the drain was clean.
async fn during_drain(proxy: &TestProxy, request: impl std::future::Future<Output = Reply>) -> (Reply, bool) {
    let drain = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        proxy.proxy().drain().await
    };
    tokio::join!(request, drain)
}

/// An HTTP/1.1 request in flight when the drain starts completes, with `Connection: close`; the
/// listener then refuses new connections, and the drain reports every connection closed.
#[tokio::test]
async fn http1_request_in_flight_finishes_during_drain() {
    let upstream = HttpServer::start("slow").await;
    let proxy = slow_proxy(&upstream, ", protocol: http1");
    let address = proxy.address("in");
    let mut client = Client::http1(address).await;
    let (reply, clean) = during_drain(&proxy, client.get("x", "/slow/600")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "slow done\n");
    assert_eq!(reply.header("connection"), "close");
    assert!(clean, "the drain did not see every connection close");
    assert!(TcpStream::connect(address).await.is_err(), "a draining listener accepted a connection");
    let (status, body) = proxy.admin_get("/ready").await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
}

/// An HTTP/2 stream in flight when the drain starts completes; the connection then gets GOAWAY, so
/// a new stream on it is refused.
#[tokio::test]
async fn http2_stream_in_flight_finishes_and_the_connection_goes_away() {
    let upstream = HttpServer::start("slow").await;
    let proxy = slow_proxy(&upstream, ", protocol: http2");
    let mut client = Client::http2(proxy.address("in")).await;
    let mut probe = Client::http2(proxy.address("in")).await;
    let (reply, clean) = during_drain(&proxy, client.get("x", "/slow/600")).await;
    assert_eq!(reply.status, 200);
    assert!(clean);
    let request = probe.request(http::Method::GET, "x", "/").body(remora_proxy::testing::servers::full("")).unwrap();
    assert!(probe.send(request).await.is_err(), "a drained HTTP/2 connection took a new stream");
}

/// Opaque TCP connections are not interrupted by a drain; the drain gives up after the drain time
/// and says so.
#[tokio::test]
async fn drain_time_bounds_the_wait_for_tcp_connections() {
    let echo = TcpEchoServer::start().await;
    let proxy = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  drain_time: 0.3s\nresources:\n{}{}",
        cluster("echo", "", &[echo.address()]),
        listener("tcp", ", protocol: tcp, default_cluster: echo"),
    ));
    let mut stream = TcpStream::connect(proxy.address("tcp")).await.unwrap();
    stream.write_all(b"before").await.unwrap();
    let mut got = [0_u8; 6];
    stream.read_exact(&mut got).await.unwrap();
    let started = tokio::time::Instant::now();
    assert!(!proxy.proxy().drain().await, "the drain claimed a clean finish with a tunnel open");
    assert!(started.elapsed() >= Duration::from_millis(300));
    stream.write_all(b"during").await.unwrap();
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"during");
}
