//! L4 forwarding and protocol detection: echo with half-close, opaque and TLS bytes on an `auto`
//! listener, server-speaks-first protocols, a first packet too short to classify, the connection cap.

use std::time::Duration;

use remora_proxy::testing::{BannerServer, HttpServer, TcpEchoServer, TestProxy, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{cluster, listener};

/// A TCP listener forwards a 4 MiB stream to an echo server and back; the client's half-close
/// reaches the server, and the server's close comes back as EOF after every byte.
#[tokio::test]
async fn tcp_listener_forwards_both_ways_with_half_close() {
    let echo = TcpEchoServer::start().await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}{}",
        cluster("echo", "", &[echo.address()]),
        listener("tcp", ", protocol: tcp, default_cluster: echo"),
    ));
    let stream = TcpStream::connect(proxy.address("tcp")).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    const SIZE: usize = 4 * 1024 * 1024;
    let payload: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    let expected = payload.clone();
    let write = tokio::spawn(async move {
        writer.write_all(&payload).await.unwrap();
        writer.shutdown().await.unwrap();
        writer
    });
    let mut echoed = Vec::with_capacity(SIZE);
    tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut echoed))
        .await
        .expect("no EOF came back: the half-close was not passed on")
        .unwrap();
    let _writer = write.await.unwrap();
    assert_eq!(echoed.len(), SIZE);
    assert!(echoed == expected, "echoed bytes differ");
    eventually("tcp byte counters", Duration::from_secs(5), || async {
        proxy.metric(r#"remora_upstream_tcp_sent_bytes_total{cluster="echo"}"#).await == SIZE as f64
            && proxy.metric(r#"remora_upstream_tcp_received_bytes_total{cluster="echo"}"#).await == SIZE as f64
    })
    .await;
}

async fn exchange(address: std::net::SocketAddr, send: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(send).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut got))
        .await
        .expect("no EOF came back")
        .unwrap();
    got
}

/// On an `auto` listener, bytes that are not HTTP (binary, a TLS ClientHello) are forwarded
/// untouched to the default cluster, while HTTP on the same port is proxied as HTTP.
#[tokio::test]
async fn auto_listener_forwards_what_is_not_http_as_tcp() {
    let echo = TcpEchoServer::start().await;
    let web = HttpServer::start("web").await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}{}  - {{kind: RouteTable, name: web, destinations: [web.local], routes: [{{backends: [{{cluster: web}}]}}]}}\n{}",
        cluster("echo", "", &[echo.address()]),
        cluster("web", "", &[web.address()]),
        listener("in", ", default_cluster: echo"),
    ));
    let address = proxy.address("in");
    let binary = b"\x00\x00\x00\x10\x01binary protocol".to_vec();
    assert_eq!(exchange(address, &binary).await, binary);
    // The start of a TLS 1.2/1.3 ClientHello record.
    let client_hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03random...".to_vec();
    assert_eq!(exchange(address, &client_hello).await, client_hello);
    let http = exchange(address, b"GET / HTTP/1.1\r\nHost: web.local\r\nConnection: close\r\n\r\n").await;
    let http = String::from_utf8_lossy(&http);
    assert!(http.starts_with("HTTP/1.1 200") && http.contains("hello from web"), "{http}");
}

/// A server-speaks-first protocol: the client sends nothing, so after the detect timeout the proxy
/// connects as TCP and the server's banner reaches the client; the conversation then continues.
#[tokio::test]
async fn server_first_protocols_work_after_the_detect_timeout() {
    let banner = BannerServer::start(b"220 smtp.local ready\r\n").await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}{}",
        cluster("smtp", "", &[banner.address()]),
        listener("in", ", default_cluster: smtp, detect_timeout: 0.2s"),
    ));
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(proxy.address("in")).await.unwrap();
    let mut greeting = [0_u8; 22];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut greeting)).await.unwrap().unwrap();
    assert_eq!(&greeting, b"220 smtp.local ready\r\n");
    // The connection waited its detect timeout for a first byte before going to the server.
    assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
    stream.write_all(b"EHLO me\r\n").await.unwrap();
    let mut reply = [0_u8; 9];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"EHLO me\r\n");
}

/// A request line split over several packets (the first too short to classify) is still detected
/// as HTTP, and the bytes detection read are replayed to the server.
#[tokio::test]
async fn detection_waits_for_a_decisive_prefix_and_replays_it() {
    let web = HttpServer::start("web").await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: web}}]}}]}}\n{}",
        cluster("web", "", &[web.address()]),
        listener("in", ""),
    ));
    let mut stream = TcpStream::connect(proxy.address("in")).await.unwrap();
    for piece in [&b"GE"[..], b"T /pie", b"ces HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"] {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response)).await.unwrap().unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("hello from web"), "{response}");
}

/// Over `max_connections`, new connections are closed at once and counted; existing ones are not
/// disturbed, and capacity returns when they close.
#[tokio::test]
async fn connection_cap_rejects_the_excess() {
    let echo = TcpEchoServer::start().await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}{}",
        cluster("echo", "", &[echo.address()]),
        listener("tcp", ", protocol: tcp, default_cluster: echo, max_connections: 2"),
    ));
    let address = proxy.address("tcp");
    let mut first = TcpStream::connect(address).await.unwrap();
    let mut second = TcpStream::connect(address).await.unwrap();
    for stream in [&mut first, &mut second] {
        stream.write_all(b"hi").await.unwrap();
        let mut got = [0_u8; 2];
        stream.read_exact(&mut got).await.unwrap();
    }
    let mut third = TcpStream::connect(address).await.unwrap();
    let mut buffer = [0_u8; 8];
    let closed = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buffer)).await.unwrap();
    assert!(matches!(closed, Ok(0) | Err(_)), "the third connection was served: {closed:?}");
    assert_eq!(
        proxy.metric(r#"remora_listener_connections_rejected_total{listener="tcp",direction="outbound"}"#).await,
        1.0
    );
    drop(first);
    eventually("a slot frees up", Duration::from_secs(5), || async {
        let Ok(mut stream) = TcpStream::connect(address).await else { return false };
        if stream.write_all(b"ok").await.is_err() {
            return false;
        }
        let mut got = [0_u8; 2];
        matches!(tokio::time::timeout(Duration::from_millis(500), stream.read_exact(&mut got)).await, Ok(Ok(_)))
    })
    .await;
    second.write_all(b"still").await.unwrap();
    let mut got = [0_u8; 5];
    second.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"still");
}

/// A connection rate limit of 5/s with a burst of 5: of 20 connections opened at once, 5 are served
/// and 15 are closed at once and counted; a second later, a token is back.
#[tokio::test]
async fn the_connection_rate_limit_closes_the_excess() {
    let echo = TcpEchoServer::start().await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}{}",
        cluster("echo", "", &[echo.address()]),
        listener(
            "tcp",
            ", protocol: tcp, default_cluster: echo, connection_rate_limit: {connections_per_second: 5, burst: 5}"
        ),
    ));
    let address = proxy.address("tcp");
    let mut served = 0;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let _ = stream.write_all(b"hi").await;
        let mut got = [0_u8; 2];
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut got)).await.unwrap() {
            Ok(2) => served += 1,
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("read {n} bytes"),
        }
    }
    // The burst, plus a token for every 200 ms the loop took (normally none: it takes a few ms).
    let refilled = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(served >= 5 && served <= 5 + refilled, "{served} of 20 served in {:?}", started.elapsed());
    let limited = r#"remora_listener_connections_rate_limited_total{listener="tcp",direction="outbound"}"#;
    assert_eq!(proxy.metric(limited).await, 20.0 - served as f64);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(b"ok").await.unwrap();
    let mut got = [0_u8; 2];
    stream.read_exact(&mut got).await.unwrap();
}
