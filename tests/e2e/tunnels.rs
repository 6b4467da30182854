//! Tunnels: a WebSocket session relayed through an `Upgrade`, and `CONNECT` tunnels over HTTP/1.1
//! and HTTP/2, to a cluster's endpoint and through a pass-through cluster.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use remora_proxy::testing::servers::{Handler, full};
use remora_proxy::testing::{Client, HttpServer, TcpEchoServer, TestProxy};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::{cluster, listener, route_all};

/// A WebSocket echo server: completes the handshake with hyper, then echoes every message.
pub(crate) fn websocket_echo() -> Handler {
    Arc::new(|mut request| {
        Box::pin(async move {
            let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
                let mut response = Response::new(full("not a websocket request"));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                return response;
            };
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let upgraded = upgrade.await.unwrap();
                let mut socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_close() {
                        break;
                    }
                    socket.send(message).await.unwrap();
                }
            });
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert("connection", HeaderValue::from_static("upgrade"));
            headers.insert("upgrade", HeaderValue::from_static("websocket"));
            headers.insert("sec-websocket-accept", HeaderValue::from_str(&derive_accept_key(key.as_bytes())).unwrap());
            response
        })
    })
}

/// A WebSocket handshake crosses the proxy (on an `auto` listener, to an `auto` cluster) and then
/// text and binary messages echo both ways until the client closes.
#[tokio::test]
async fn websocket_session_is_relayed() {
    let upstream = HttpServer::with_handler(websocket_echo()).await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}{}{}",
        cluster("ws", "", &[upstream.address()]),
        route_all("ws", "ws"),
        listener("in", ""),
    ));
    let stream = TcpStream::connect(proxy.address("in")).await.unwrap();
    let (mut socket, response) = tokio_tungstenite::client_async("ws://chat.local/socket", stream).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..3 {
        socket.send(Message::text(format!("hello {i}"))).await.unwrap();
        assert_eq!(socket.next().await.unwrap().unwrap(), Message::text(format!("hello {i}")));
    }
    let binary = Message::binary(vec![0_u8, 1, 2, 255]);
    socket.send(binary.clone()).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), binary);
    socket.close(None).await.unwrap();
    assert_eq!(proxy.metric(r#"remora_upstream_responses_total{cluster="ws",status_class="1xx"}"#).await, 1.0);
}

async fn echo_through<S: AsyncRead + AsyncWrite + Unpin>(mut tunnel: S) {
    tunnel.write_all(b"ping over the tunnel").await.unwrap();
    let mut echoed = [0_u8; 20];
    tunnel.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping over the tunnel");
    // Half-close: the echo server finishes and closes its side, which must come back as EOF.
    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), tunnel.read_to_end(&mut rest))
        .await
        .expect("no EOF came back through the tunnel")
        .unwrap();
    assert!(rest.is_empty());
}

/// `CONNECT host:port` over HTTP/1.1 to a route table's cluster, and to any `ip:port` through a
/// pass-through cluster: a 200, then an echo conversation and a clean half-close.
#[tokio::test]
async fn connect_tunnels_over_http1() {
    let echo = TcpEchoServer::start().await;
    let elsewhere = TcpEchoServer::start().await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}  - {{kind: Cluster, name: pass, original_destination: true}}\n  - {{kind: RouteTable, name: echo, destinations: [\"echo.local:7\"], routes: [{{backends: [{{cluster: echo}}]}}]}}\n{}",
        cluster("echo", "", &[echo.address()]),
        listener("in", ", default_cluster: pass"),
    ));
    for target in ["echo.local:7".to_owned(), elsewhere.address().to_string()] {
        echo_through(connect_through(proxy.address("in"), &target).await).await;
    }
}

/// A tunnel to `target` through the HTTP/1.1 proxy at `proxy`: `CONNECT`, and its 200 read.
pub(crate) async fn connect_through(proxy: SocketAddr, target: &str) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0_u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}");
    stream
}

/// `CONNECT` as an HTTP/2 stream: the stream becomes the tunnel.
#[tokio::test]
async fn connect_tunnels_over_http2() {
    let echo = TcpEchoServer::start().await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}  - {{kind: RouteTable, name: echo, destinations: [\"echo.local:7\"], routes: [{{backends: [{{cluster: echo}}]}}]}}\n{}",
        cluster("echo", "", &[echo.address()]),
        listener("in", ", protocol: http2"),
    ));
    let mut client = Client::http2(proxy.address("in")).await;
    let request = Request::builder().method(Method::CONNECT).uri("echo.local:7").body(full(Bytes::new())).unwrap();
    let mut response = client.send(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let tunnel = hyper::upgrade::on(&mut response).await.unwrap();
    echo_through(TokioIo::new(tunnel)).await;
}

/// A `CONNECT` through a pass-through cluster to a name (not an `ip:port`) is refused with 400: the
/// proxy does not resolve names for tunnels.
#[tokio::test]
async fn connect_to_a_name_through_a_pass_through_cluster_is_a_400() {
    let proxy = TestProxy::start(&format!(
        "resources:\n  - {{kind: Cluster, name: pass, original_destination: true}}\n{}",
        listener("in", ", default_cluster: pass"),
    ));
    let mut stream = TcpStream::connect(proxy.address("in")).await.unwrap();
    stream.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), stream.read_to_end(&mut response)).await.unwrap().unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("x-remora-error: bad_request"), "{response}");
}
