//! HTTP/1.1 and HTTP/2 proxying: versions both ways, header hygiene, routing, weights, balancing,
//! and the proxy's own answers (404, 503, 400).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use remora_control_api::v1;
use remora_proxy::testing::config::{Cluster, Config, Listener, Route, RouteTable, secs};
use remora_proxy::testing::servers::{full, generated, read_generated};
use remora_proxy::testing::{Client, HttpServer, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dead_address;

/// A proxy with listener `in` (as `listener` makes it) sending everything to `cluster`, whose
/// endpoint is `upstream`.
fn one_upstream(upstream: &HttpServer, cluster: Cluster, listener: Listener) -> TestProxy {
    let config =
        Config::new().with(cluster.endpoints(&[upstream.address()])).with(RouteTable::to("web", "web")).with(listener);
    TestProxy::start(&config.yaml())
}

/// An HTTP/1.1 request crosses the proxy and back, twice on one keep-alive connection, with the
/// hop-by-hop headers (and the ones `Connection` names) removed on the way.
#[tokio::test]
async fn http1_request_and_response_cross_the_proxy_without_hop_by_hop_headers() {
    let upstream = HttpServer::start("a").await;
    let proxy = one_upstream(&upstream, Cluster::new("web"), Listener::new("in").http1());
    let mut client = Client::http1(proxy.address("in")).await;
    for _ in 0..2 {
        let request = client
            .request(Method::GET, "shop.local", "/hello")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("x-end-to-end", "1")
            .body(full(Bytes::new()))
            .unwrap();
        let reply = remora_proxy::testing::client::read(client.send(request).await.unwrap()).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "hello from a\n");
        assert_eq!(reply.header("x-seen-version"), "HTTP/1.1");
        assert_eq!(reply.header("x-seen-host"), "shop.local");
        let seen = reply.header("x-seen-headers");
        assert!(seen.contains("x-end-to-end"), "{seen}");
        for hop in ["x-hop", "keep-alive", "proxy-connection", "connection"] {
            assert!(!seen.split(',').any(|h| h == hop), "{hop} was forwarded: {seen}");
        }
    }
    assert_eq!(upstream.hits(), 2);
    assert_eq!(
        proxy.metric(r#"remora_upstream_connections_total{cluster="web"}"#).await,
        1.0,
        "one pooled upstream connection"
    );
}

/// h2c prior knowledge downstream, HTTP/1.1 upstream (the peers benchmark's shape), and the other
/// three combinations: the upstream sees the version the cluster asks for.
#[tokio::test]
async fn versions_convert_between_http1_and_http2_both_ways() {
    let upstream = HttpServer::start("a").await;
    use v1::cluster::Protocol;
    let cases = [
        (Protocol::Http1, Listener::new("in").http2(), true, "HTTP/1.1"),
        (Protocol::Http2, Listener::new("in").http1(), false, "HTTP/2.0"),
        (Protocol::Auto, Listener::new("in").http2(), true, "HTTP/2.0"),
        (Protocol::Auto, Listener::new("in"), false, "HTTP/1.1"),
    ];
    for (protocol, listener, h2_client, expected) in cases {
        let cluster_protocol = protocol.as_str_name();
        let proxy = one_upstream(&upstream, Cluster::new("web").protocol(protocol), listener);
        let mut client =
            if h2_client { Client::http2(proxy.address("in")).await } else { Client::http1(proxy.address("in")).await };
        for _ in 0..3 {
            let reply = client.get("shop.local:8080", "/x").await;
            assert_eq!(reply.status, 200, "{cluster_protocol}");
            assert_eq!(reply.header("x-seen-version"), expected, "cluster {cluster_protocol}, h2 client {h2_client}");
            assert_eq!(reply.header("x-seen-host"), "shop.local:8080");
        }
    }
}

/// Routes pick tables by host and routes by path, method, header and query; unmatched requests get
/// 404 from the proxy, with the reason in `x-remora-error`.
#[tokio::test]
async fn routes_match_on_host_path_method_headers_and_query() {
    let a = HttpServer::start("a").await;
    let b = HttpServer::start("b").await;
    let shop = RouteTable::new("shop")
        .destinations(&["shop.local", "*.shop.svc"])
        .route(Route::to("b").path_exact("/exact"))
        .route(Route::to("b").path_regex("/items/[0-9]+").method("DELETE"))
        .route(Route::to("b").header("x-canary", "yes"))
        .route(Route::to("b").query_present("beta"))
        .route(Route::to("a").path_prefix("/"));
    let other = RouteTable::new("other").destinations(&["other.local:8080"]).route(Route::to("b").path_prefix("/only"));
    let config = Config::new()
        .with(Cluster::new("a").endpoints(&[a.address()]))
        .with(Cluster::new("b").endpoints(&[b.address()]))
        .with(shop)
        .with(other)
        .with(Listener::new("in"));
    let proxy = TestProxy::start(&config.yaml());
    let mut client = Client::http1(proxy.address("in")).await;
    let served = |reply: &remora_proxy::testing::Reply| reply.header("x-served-by").to_owned();
    assert_eq!(served(&client.get("shop.local", "/exact").await), "b");
    assert_eq!(served(&client.get("shop.local", "/exact/more").await), "a");
    assert_eq!(served(&client.get("api.shop.svc", "/x?beta").await), "b");
    assert_eq!(served(&client.get("SHOP.local", "/x?alpha=1").await), "a");
    let delete = client.request(Method::DELETE, "shop.local", "/items/7").body(full(Bytes::new())).unwrap();
    let reply = remora_proxy::testing::client::read(client.send(delete).await.unwrap()).await;
    assert_eq!(served(&reply), "b");
    let canary =
        client.request(Method::GET, "shop.local", "/").header("x-canary", "yes").body(full(Bytes::new())).unwrap();
    let reply = remora_proxy::testing::client::read(client.send(canary).await.unwrap()).await;
    assert_eq!(served(&reply), "b");
    assert_eq!(served(&client.get("other.local:8080", "/only/x").await), "b");

    let unmatched = client.get("other.local:8080", "/elsewhere").await;
    assert_eq!(unmatched.status, 404);
    assert_eq!(unmatched.header("x-remora-error"), "no_route");
    let unknown_host = client.get("nobody.local", "/").await;
    assert_eq!(unknown_host.status, 404);
    assert_eq!(
        proxy.metric(r#"remora_requests_total{listener="in",direction="outbound",status_class="4xx"}"#).await,
        2.0
    );
}

/// A route's backends split traffic by weight; a cluster's endpoints take turns.
#[tokio::test]
async fn weighted_backends_split_traffic_and_endpoints_take_turns() {
    let a = HttpServer::start("a").await;
    let b = HttpServer::start("b").await;
    let c1 = HttpServer::start("c1").await;
    let c2 = HttpServer::start("c2").await;
    let config = Config::new()
        .with(Cluster::new("a").endpoints(&[a.address()]))
        .with(Cluster::new("b").endpoints(&[b.address()]))
        .with(Cluster::new("c").endpoints(&[c1.address(), c2.address()]))
        .with(RouteTable::new("split").destinations(&["split.local"]).route(Route::weighted(&[
            ("a", 80),
            ("b", 20),
            ("c", 0),
        ])))
        .with(RouteTable::new("turns").destinations(&["turns.local"]).route(Route::to("c")))
        .with(Listener::new("in"));
    let proxy = TestProxy::start(&config.yaml());
    let mut client = Client::http2(proxy.address("in")).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    const N: usize = 2000;
    for _ in 0..N {
        let reply = client.get("split.local", "/").await;
        *counts.entry(reply.header("x-served-by").to_owned()).or_default() += 1;
    }
    let share_a = counts["a"] as f64 / N as f64;
    // Binomial(2000, 0.8) has a standard deviation of 0.009; 0.05 is more than five of them.
    assert!((share_a - 0.8).abs() < 0.05, "a served {share_a:.3} of requests: {counts:?}");
    assert!(!counts.contains_key("c1") && !counts.contains_key("c2"), "weight 0 got traffic: {counts:?}");

    let mut turns = Vec::new();
    for _ in 0..6 {
        turns.push(client.get("turns.local", "/").await.header("x-served-by").to_owned());
    }
    assert!(turns.windows(2).all(|w| w[0] != w[1]), "endpoints did not alternate: {turns:?}");
}

/// A refused connect is a 503 at once (not after the connect timeout), named in `x-remora-error`;
/// a cluster with no endpoints is a 503 too.
#[tokio::test]
async fn dead_or_missing_endpoints_give_503_quickly() {
    let config = Config::new()
        .with(Cluster::new("dead").endpoints(&[dead_address()]).set(|c| c.connect_timeout = Some(secs(5.0))))
        .with(Cluster::new("empty"))
        .with(Cluster::original_destination("pass"))
        .with(RouteTable::to("dead", "dead").destinations(&["dead.local"]))
        .with(RouteTable::to("empty", "empty").destinations(&["empty.local"]))
        .with(Listener::new("in").default_cluster("pass"));
    let proxy = TestProxy::start(&config.yaml());
    let mut client = Client::http1(proxy.address("in")).await;
    let started = Instant::now();
    let reply = client.get("dead.local", "/").await;
    assert!(started.elapsed() < Duration::from_secs(5), "waited for the connect timeout");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-remora-error"), "connect_failed");
    let reply = client.get("empty.local", "/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-remora-error"), "no_healthy_upstream");
    assert_eq!(proxy.metric(r#"remora_upstream_connect_errors_total{cluster="dead",reason="refused"}"#).await, 1.0);
    // A pass-through cluster behind a connection that was not redirected has nowhere to go.
    let reply = client.get("elsewhere.local", "/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-remora-error"), "no_original_destination");
}

async fn raw_exchange(address: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// Malformed requests get a 4xx and a closed connection, never a hang; the proxy keeps serving.
#[tokio::test]
async fn malformed_requests_get_4xx_and_the_proxy_keeps_serving() {
    let upstream = HttpServer::start("a").await;
    let proxy = one_upstream(&upstream, Cluster::new("web"), Listener::new("in").http1());
    let address = proxy.address("in");
    let bad_header = raw_exchange(address, b"GET / HTTP/1.1\r\nHost: a\r\nthis is not a header\r\n\r\n").await;
    assert!(bad_header.starts_with("HTTP/1.1 400"), "{bad_header}");
    let bad_line = raw_exchange(address, b"GET /\x01\x02 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(bad_line.starts_with("HTTP/1.1 400"), "{bad_line}");
    let huge = format!("GET / HTTP/1.1\r\nHost: a\r\nx-big: {}\r\n\r\n", "x".repeat(100 * 1024));
    let too_large = raw_exchange(address, huge.as_bytes()).await;
    assert!(too_large.starts_with("HTTP/1.1 431"), "{}", &too_large[..too_large.len().min(80)]);
    let bad_length =
        raw_exchange(address, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello")
            .await;
    assert!(bad_length.starts_with("HTTP/1.1 400"), "{bad_length}");
    assert_eq!(upstream.hits(), 0, "no malformed request reached the upstream");

    let mut client = Client::http1(address).await;
    assert_eq!(client.get("a", "/").await.status, 200);
}

/// The header-count limit takes effect: a request of 100 fields is served, one of 150 (each small,
/// the head far under its byte limit) gets 431.
#[tokio::test]
async fn a_request_with_too_many_header_fields_gets_431() {
    let upstream = HttpServer::start("a").await;
    let proxy = one_upstream(&upstream, Cluster::new("web"), Listener::new("in").http1());
    let request = |fields: usize| {
        let extra: String = (1..fields).map(|i| format!("x-{i}: {i}\r\n")).collect();
        format!("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{extra}\r\n")
    };
    let served = raw_exchange(proxy.address("in"), request(99).as_bytes()).await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    let refused = raw_exchange(proxy.address("in"), request(150).as_bytes()).await;
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    assert_eq!(upstream.hits(), 1);
}

/// A client that sends a request head too slowly (slowloris), and a keep-alive connection left
/// idle, are both closed once the listener's header timeout passes; a prompt client is served.
#[tokio::test]
async fn slow_request_heads_and_idle_keep_alive_connections_are_closed() {
    let upstream = HttpServer::start("a").await;
    let listener = Listener::new("in").http1().set(|l| l.header_timeout = Some(secs(1.0)));
    let proxy = one_upstream(&upstream, Cluster::new("web"), listener);
    let address = proxy.address("in");

    let mut slow = TcpStream::connect(address).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    let mut idle = Client::http1(address).await;
    assert_eq!(idle.get("a", "/").await.status, 200);

    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the slow client was never cut off");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(500), "cut off before the timeout: {waited:?}");
    assert_eq!(upstream.hits(), 1, "the incomplete request reached the upstream");

    // The idle connection's timer was armed later than the slow one's, so it may fire one coarse
    // timer tick (1 s) after it.
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        while !idle.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle keep-alive connection was kept past the header timeout");
    let request = idle.request(Method::GET, "a", "/").body(full(Bytes::new())).unwrap();
    assert!(idle.send(request).await.is_err(), "a closed connection took a request");
}

/// An HTTP/2 connection left idle is closed once the listener's idle timeout passes (counted from
/// its last byte, through its tidying), and one its client keeps using is not.
#[tokio::test]
async fn idle_http2_connections_are_closed_and_busy_ones_kept() {
    let upstream = HttpServer::start("a").await;
    let listener = Listener::new("in").http2().set(|l| l.idle_timeout = Some(secs(0.6)));
    let proxy = one_upstream(&upstream, Cluster::new("web"), listener);
    let address = proxy.address("in");
    let mut idle = Client::http2(address).await;
    let mut busy = Client::http2(address).await;
    assert_eq!(idle.get("a", "/").await.status, 200);
    let started = Instant::now();
    let mut closed_after = None;
    // The busy client makes a request every 100 ms for 2 s, over three times the timeout.
    while started.elapsed() < Duration::from_secs(2) {
        assert_eq!(busy.get("a", "/").await.status, 200, "a busy connection was closed");
        if closed_after.is_none() && idle.is_closed() {
            closed_after = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed_after = closed_after.expect("the idle connection outlived its idle timeout");
    assert!(closed_after >= Duration::from_millis(500), "closed before its idle timeout: {closed_after:?}");
    assert!(!busy.is_closed(), "the busy connection was closed");
}

/// An upstream that silently closes keep-alive connections soon after answering (as Node.js does
/// after 5 s idle) costs no failed request: a dead pooled connection is noticed at checkout, and a
/// request that raced the close is sent again on a fresh connection.
#[tokio::test]
async fn upstreams_that_close_idle_connections_cost_no_failed_requests() {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = socket.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = socket.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0_u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                // Keep-alive was implied, but the server closes without saying so.
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
        }
    });
    let config = Config::new()
        .with(Cluster::new("flaky").endpoints(&[upstream]))
        .with(RouteTable::to("flaky", "flaky"))
        .with(Listener::new("in").http1());
    let proxy = TestProxy::start(&config.yaml());
    let mut client = Client::http1(proxy.address("in")).await;
    for _ in 0..10 {
        let reply = client.get("x", "/").await;
        assert_eq!((reply.status.as_u16(), reply.text().as_str()), (200, "ok"));
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(proxy.metric(r#"remora_upstream_connections_total{cluster="flaky"}"#).await >= 10.0);
}

/// A 16 MiB HTTP/2 body streams to the upstream and back through flow control, byte for byte.
#[tokio::test]
async fn large_http2_bodies_stream_through_flow_control() {
    let upstream = HttpServer::start("a").await;
    let cluster = Cluster::new("web").protocol(v1::cluster::Protocol::Http2);
    let proxy = one_upstream(&upstream, cluster, Listener::new("in").http2());
    let mut client = Client::http2(proxy.address("in")).await;
    const SIZE: u64 = 16 * 1024 * 1024;
    let request = client.request(Method::POST, "big.local", "/echo").body(generated(SIZE, 100_000)).unwrap();
    let response = client.send(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(read_generated(response.into_body()).await, SIZE);
}

/// A `random` cluster spreads requests by endpoint weight without a fixed rotation.
#[tokio::test]
async fn a_random_cluster_follows_endpoint_weights() {
    let a = HttpServer::start("a").await;
    let b = HttpServer::start("b").await;
    let weighted = |address: std::net::SocketAddr, weight| v1::Endpoint {
        address: address.to_string(),
        weight: Some(weight),
        ..Default::default()
    };
    let random = Cluster::new("r")
        .balancer(v1::cluster::Balancer::Random)
        .endpoints_with(|e| e.endpoints = vec![weighted(a.address(), 3), weighted(b.address(), 1)]);
    let config = Config::new().with(random).with(RouteTable::to("all", "r")).with(Listener::new("in"));
    let proxy = TestProxy::start(&config.yaml());
    let mut client = Client::http1(proxy.address("in")).await;
    let mut served = Vec::new();
    for _ in 0..2000 {
        served.push(client.get("x", "/").await.header("x-served-by").to_owned());
    }
    let share_a = served.iter().filter(|s| *s == "a").count() as f64 / served.len() as f64;
    // Binomial(2000, 0.75): standard deviation 0.01.
    assert!((share_a - 0.75).abs() < 0.05, "a served {share_a:.3}");
    // Not the round-robin schedule (a a b a, repeating): somewhere b follows b.
    assert!(served.windows(2).any(|w| w[0] == "b" && w[1] == "b"), "random picks look like a rotation");
}
