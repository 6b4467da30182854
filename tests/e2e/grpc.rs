//! gRPC end to end: unary and bidirectional streaming calls with their trailers, and a
//! trailers-only error, through the proxy over HTTP/2.
//!
//! Both ends speak the gRPC wire format directly on hyper's HTTP/2 (length-prefixed messages,
//! `content-type: application/grpc`, `te: trailers`, `grpc-status` in trailers), which is exactly
//! what the proxy sees from any gRPC implementation.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use remora_proxy::testing::servers::{Handler, TestBody, full};
use remora_proxy::testing::{Client, HttpServer, TestProxy};
use tokio::sync::mpsc;

use crate::{cluster, listener, route_all};

/// One gRPC message: compressed flag 0, big-endian length, payload.
fn message(payload: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(5 + payload.len());
    framed.put_u8(0);
    framed.put_u32(payload.len() as u32);
    framed.put_slice(payload);
    framed.freeze()
}

fn trailers(status: &str, extra: Option<(&'static str, &'static str)>) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert("grpc-status", HeaderValue::from_str(status).unwrap());
    if let Some((name, value)) = extra {
        map.insert(name, HeaderValue::from_static(value));
    }
    map
}

type Frames = Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>;

/// A gRPC echo service: `/echo.Echo/Unary` answers the one message; `/echo.Echo/Stream` echoes each
/// request frame as it arrives and ends with trailers when the client does; `/echo.Echo/Missing`
/// answers trailers-only NOT_FOUND.
fn echo_service() -> Handler {
    Arc::new(|request| {
        Box::pin(async move {
            assert_eq!(request.headers()["content-type"], "application/grpc");
            assert_eq!(request.headers()["te"], "trailers", "te: trailers must reach the server");
            let path = request.uri().path().to_owned();
            let grpc_response = |body: TestBody| {
                let mut response = Response::new(body);
                response.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
                response
            };
            match path.as_str() {
                "/echo.Echo/Unary" => {
                    let whole = request.into_body().collect().await.unwrap().to_bytes();
                    let frames: Vec<Frames> = vec![
                        Ok(Frame::data(whole)),
                        Ok(Frame::trailers(trailers("0", Some(("x-echo-trailer", "unary"))))),
                    ];
                    grpc_response(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames))))
                }
                "/echo.Echo/Stream" => {
                    let echoed = request
                        .into_body()
                        .into_data_stream()
                        .map(|data| data.map(Frame::data).map_err(Into::into))
                        .chain(futures_util::stream::once(async {
                            Ok(Frame::trailers(trailers("0", Some(("x-echo-trailer", "stream")))))
                        }));
                    grpc_response(BodyExt::boxed(StreamBody::new(echoed)))
                }
                _ => {
                    let mut response = grpc_response(full(Bytes::new()));
                    response.headers_mut().insert("grpc-status", HeaderValue::from_static("5"));
                    response.headers_mut().insert("grpc-message", HeaderValue::from_static("no such method"));
                    response
                }
            }
        })
    })
}

fn grpc_proxy(upstream: &HttpServer, listener_protocol: &str) -> TestProxy {
    TestProxy::start(&format!(
        "resources:\n{}{}{}",
        cluster("grpc", ", protocol: http2", &[upstream.address()]),
        route_all("grpc", "grpc"),
        listener("in", &format!(", protocol: {listener_protocol}")),
    ))
}

fn call(client: &Client, method: &str, body: TestBody) -> http::Request<TestBody> {
    client
        .request(Method::POST, "echo.grpc", method)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

/// A unary call: request message in, response message and trailers (status and a custom one) out.
#[tokio::test]
async fn unary_call_carries_its_trailers() {
    let upstream = HttpServer::with_handler(echo_service()).await;
    for protocol in ["http2", "auto"] {
        let proxy = grpc_proxy(&upstream, protocol);
        let mut client = Client::http2(proxy.address("in")).await;
        let response = client.send(call(&client, "/echo.Echo/Unary", full(message(b"ping")))).await.unwrap();
        let reply = remora_proxy::testing::client::read(response).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, message(b"ping"));
        let trailers = reply.trailers.expect("trailers arrive");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-echo-trailer"], "unary");
    }
}

/// A bidirectional stream: each message comes back before the next is sent (nothing is buffered
/// until the end), and the trailers follow the client's end of stream.
#[tokio::test]
async fn bidirectional_stream_flows_message_by_message() {
    let upstream = HttpServer::with_handler(echo_service()).await;
    let proxy = grpc_proxy(&upstream, "http2");
    let mut client = Client::http2(proxy.address("in")).await;
    let (sender, receiver) = mpsc::channel::<Frames>(1);
    let body = BodyExt::boxed(StreamBody::new(tokio_stream(receiver)));
    let response = client.send(call(&client, "/echo.Echo/Stream", body)).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    for i in 0..5 {
        let sent = message(format!("message {i}").as_bytes());
        sender.send(Ok(Frame::data(sent.clone()))).await.unwrap();
        let mut got = BytesMut::new();
        while got.len() < sent.len() {
            let frame = body.frame().await.expect("stream ended early").unwrap();
            got.extend_from_slice(&frame.into_data().expect("data before trailers"));
        }
        assert_eq!(got.freeze(), sent);
    }
    drop(sender);
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        if let Ok(t) = frame.unwrap().into_trailers() {
            trailers = Some(t);
        }
    }
    let trailers = trailers.expect("trailers after the stream");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echo-trailer"], "stream");
}

/// A trailers-only response (an error status in the headers, no body) reaches the client intact.
#[tokio::test]
async fn trailers_only_errors_pass_through() {
    let upstream = HttpServer::with_handler(echo_service()).await;
    let proxy = grpc_proxy(&upstream, "http2");
    let mut client = Client::http2(proxy.address("in")).await;
    let response = client.send(call(&client, "/echo.Echo/Missing", full(message(b"x")))).await.unwrap();
    let reply = remora_proxy::testing::client::read(response).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("grpc-status"), "5");
    assert_eq!(reply.header("grpc-message"), "no such method");
}

fn tokio_stream<T: Send + 'static>(mut receiver: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// gRPC crosses two sidecars inside mutual TLS: a unary call and a trailers-only error arrive with
/// their trailers.
#[tokio::test]
async fn grpc_crosses_mutual_tls_between_sidecars() {
    let upstream = HttpServer::with_handler(echo_service()).await;
    let ca = remora_control_plane::testing::TestCa::new("cluster.local");
    let dir = remora_proxy::testing::proxy::temp_dir("remora-grpc-mesh");
    let boot = |name: &str, id: &str| {
        let identity = ca.issue(id).bootstrap_identity(&dir.join(name));
        format!("bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n{identity}---\n")
    };
    let server = TestProxy::start(&format!(
        "{}resources:\n{}{}",
        boot("api", "spiffe://cluster.local/ns/shop/sa/api"),
        cluster("grpc", ", protocol: http2", &[upstream.address()]),
        listener("in", ", direction: inbound, default_cluster: grpc"),
    ));
    let client_proxy = TestProxy::start(&format!(
        "{}resources:\n{}{}",
        boot("web", "spiffe://cluster.local/ns/shop/sa/web"),
        cluster(
            "api",
            ", tls: mesh, peer_identities: [\"spiffe://cluster.local/ns/shop/sa/api\"]",
            &[server.address("in")]
        ),
        listener("out", ", default_cluster: api"),
    ));
    let mut client = Client::http2(client_proxy.address("out")).await;
    let response = client.send(call(&client, "/echo.Echo/Unary", full(message(b"ping")))).await.unwrap();
    let reply = remora_proxy::testing::client::read(response).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, message(b"ping"));
    let trailers = reply.trailers.expect("trailers cross the mesh");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echo-trailer"], "unary");
    let response = client.send(call(&client, "/echo.Echo/Missing", full(message(b"x")))).await.unwrap();
    let reply = remora_proxy::testing::client::read(response).await;
    assert_eq!(reply.header("grpc-status"), "5");
    assert!(server.metric(r#"remora_tls_handshakes_total{direction="inbound",result="ok"}"#).await >= 1.0);
    let _ = std::fs::remove_dir_all(&dir);
}
