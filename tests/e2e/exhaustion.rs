//! Attacks on the proxy's resources rather than its parsers: slow POST bodies, slow readers of
//! large responses, and connection floods to the listener's cap. Each holds what it costs to its
//! limit (a timeout, the buffers between two sockets, `max_connections`) while other clients, and
//! the admin port, are served. The slow request head (slowloris) is `http`'s
//! `slow_request_heads_and_idle_keep_alive_connections_are_closed`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use remora_proxy::testing::config::{Cluster, Config, Listener, Route, RouteTable, secs};
use remora_proxy::testing::servers::{Handler, TestBody, full};
use remora_proxy::testing::{Client, HttpServer, TestProxy, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::h2_limits::{END_HEADERS, END_STREAM, HEADERS, Raw, frame, get_block};
use crate::raw_upstream::kernel_buffer_max;

/// An endpoint that reads a request's body whole before answering (as most applications do).
async fn reading_endpoint() -> HttpServer {
    let handler: Handler = Arc::new(|request| {
        Box::pin(async move {
            let read = request.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
            Response::new(full(format!("read {read}")))
        })
    });
    HttpServer::with_handler(handler).await
}

/// Slow POST: 50 clients each send a head announcing 100 kB and then a byte every 200 ms. The
/// route's timeout answers each 504 on time (the bytes still trickling do not keep it alive) and
/// closes its connection; a client that stops sending its body altogether is cut off by the
/// listener's idle timeout; a prompt client is served all the while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_post_bodies_are_cut_off_and_others_are_served() {
    let upstream = reading_endpoint().await;
    let config = Config::new()
        .with(Cluster::new("app").endpoints(&[upstream.address()]))
        .with(RouteTable::new("web").route(Route::to("app").timeout(1.0)))
        .with(Listener::new("in").http1().set(|l| l.idle_timeout = Some(secs(1.0))));
    let proxy = TestProxy::start(&config.yaml());
    let address = proxy.address("in");

    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n").await.unwrap();
            let mut answer = Vec::new();
            let mut buffer = [0_u8; 1024];
            loop {
                tokio::select! {
                    read = stream.read(&mut buffer) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&buffer[..n]),
                    },
                    () = tokio::time::sleep(Duration::from_millis(200)) => {
                        if stream.write_all(b"x").await.is_err() {
                            break;
                        }
                    }
                }
                assert!(answer.len() < 64 * 1024);
                if started.elapsed() > Duration::from_secs(15) {
                    panic!("a slow POST was held for 15 s");
                }
            }
            (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
        }));
    }
    let mut stalled = TcpStream::connect(address).await.unwrap();
    stalled.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\nabc").await.unwrap();

    let mut client = Client::http1(address).await;
    for _ in 0..5 {
        let request = client.request(http::Method::POST, "a", "/upload").body(full("prompt")).unwrap();
        let reply = remora_proxy::testing::client::read(client.send(request).await.unwrap()).await;
        assert_eq!(reply.text(), "read 6", "a prompt client was served");
    }
    for task in slow {
        let (answer, took) = task.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
        // Trickled to its end, the body would take over five hours.
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(8), "{took:?}");
    }
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a stalled body held its connection for 10 s");
}

/// An endpoint answering every request with 256 MiB, counting what it has handed over so far.
async fn counting_endpoint(pulled: Arc<AtomicU64>) -> HttpServer {
    let handler: Handler = Arc::new(move |_| {
        let pulled = pulled.clone();
        Box::pin(async move {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let frames = futures_util::stream::unfold(0_u64, move |sent| {
                let (pulled, chunk) = (pulled.clone(), chunk.clone());
                async move {
                    if sent >= 256 << 20 {
                        return None;
                    }
                    pulled.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    let frame = Frame::data(chunk.clone());
                    Some((Ok::<_, Box<dyn std::error::Error + Send + Sync>>(frame), sent + chunk.len() as u64))
                }
            });
            let body: TestBody = StreamBody::new(frames).boxed();
            Response::new(body)
        })
    });
    HttpServer::with_handler(handler).await
}

/// Waits until `pulled` stops growing, and returns it.
async fn settled(pulled: &AtomicU64) -> u64 {
    let mut last = pulled.load(Ordering::SeqCst);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = pulled.load(Ordering::SeqCst);
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Slow readers: clients that ask for 256 MiB and read none of it, ten over HTTP/1.1 (16 KiB
/// receive buffers) and ten over HTTP/2 (never opening the flow-control window past its first
/// 64 KiB). What the proxy takes from the endpoint stops at what its buffers and the sockets
/// between hold, whatever the response's size; then a reader that resumes gets its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_hold_buffers_not_responses() {
    let pulled = Arc::new(AtomicU64::new(0));
    let upstream = counting_endpoint(pulled.clone()).await;
    let config = Config::new()
        .with(Cluster::new("app").endpoints(&[upstream.address()]))
        .with(RouteTable::to("web", "app"))
        .with(Listener::new("h1").http1())
        .with(Listener::new("h2").http2());
    let proxy = TestProxy::start(&config.yaml());

    let mut readers = Vec::new();
    for _ in 0..10 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut stream = socket.connect(proxy.address("h1")).await.unwrap();
        stream.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        readers.push(stream);
    }
    let h1 = settled(&pulled).await;
    let mut h2 = Vec::new();
    for _ in 0..10 {
        let mut raw = Raw::connect(proxy.address("h2")).await;
        raw.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &get_block())).await;
        h2.push(raw);
    }
    // Read what flow control lets through (the first 64 KiB), so the socket is not what stops it.
    for raw in &mut h2 {
        while tokio::time::timeout(Duration::from_millis(200), raw.read()).await.is_ok_and(|f| f.is_some()) {}
    }
    let both = settled(&pulled).await;
    let per_h1 = h1 / 10;
    let per_h2 = (both - h1) / 10;
    println!("slow readers: the endpoint handed over {per_h1} bytes per HTTP/1.1 reader, {per_h2} per HTTP/2 reader");
    // Between the endpoint and a reader sit the endpoint's send buffer, the proxy's receive and
    // send buffers (the kernel grows each up to its maximum) and the reader's 16 KiB; beyond those,
    // at most 2 MiB may be held by the endpoint's HTTP library and the proxy.
    let (send, receive) = (kernel_buffer_max("tcp_wmem"), kernel_buffer_max("tcp_rmem"));
    let ceiling = 2 * send + receive + (2 << 20);
    assert!(per_h1 < ceiling, "{per_h1} bytes taken for an HTTP/1.1 reader that reads nothing (ceiling {ceiling})");
    assert!(per_h2 < 4 << 20, "{per_h2} bytes taken for an HTTP/2 reader whose window is shut");

    // One reader resumes, and its response streams on.
    let mut buffer = vec![0_u8; 1 << 20];
    let mut got = 0_u64;
    while got < 32 << 20 {
        got += readers[0].read(&mut buffer).await.unwrap() as u64;
    }
}

/// A connection flood: 400 connections against a listener capped at 64. The excess is closed at
/// once and counted, a client connected before the flood is still served, and the admin port
/// answers `/live` throughout; once the flood's connections go, new clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_stops_at_the_cap_and_admin_still_answers() {
    let upstream = HttpServer::start("app").await;
    let config = Config::new()
        .with(Cluster::new("app").endpoints(&[upstream.address()]))
        .with(RouteTable::to("web", "app"))
        .with(Listener::new("in").http1().set(|l| l.max_connections = 64));
    let proxy = TestProxy::start(&config.yaml());
    let address = proxy.address("in");
    let mut early = Client::http1(address).await;
    assert_eq!(early.get("a", "/").await.status, 200);

    let mut flood: Vec<TcpStream> = Vec::new();
    for _ in 0..400 {
        flood.push(TcpStream::connect(address).await.unwrap());
    }
    let rejected = r#"remora_listener_connections_rejected_total{listener="in",direction="outbound"}"#;
    eventually("the excess is counted", Duration::from_secs(20), || async { proxy.metric(rejected).await == 337.0 })
        .await;
    let started = Instant::now();
    let (status, _) = proxy.admin_get("/live").await;
    assert_eq!(status, 200);
    println!("admin /live during the flood: {:?}", started.elapsed());
    assert_eq!(early.get("a", "/").await.status, 200, "a client from before the flood");
    assert!(served(address).await.is_none(), "a new client over the cap was served");

    drop(flood);
    eventually("capacity returns", Duration::from_secs(20), || async { served(address).await == Some(200) }).await;
}

/// A GET on a new connection: its status, or `None` if the connection was closed.
async fn served(address: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect(address).await.ok()?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await.ok()?.ok()?;
    std::str::from_utf8(answer.get(9..12)?).ok()?.parse().ok()
}
