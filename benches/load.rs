//! Load harness: real HTTP traffic through an in-process proxy on loopback, with the proxy worker's
//! own CPU time per request.
//!
//! `cargo bench --bench load` starts an upstream HTTP server, a proxy with one worker thread, and
//! keep-alive clients, all in this process; drives HTTP/1.1, HTTP/2 (prior knowledge) and HTTP/3
//! (QUIC, a certificate made here) through the proxy, each to the same route, for `LOAD_SECONDS`
//! (default 5) each with `LOAD_CONNECTIONS` (default 32) connections;
//! and prints requests per second, latency percentiles, and the CPU microseconds the proxy's worker
//! thread spent per request (read from `/proc/self/task/*/stat`, so the load generator and the
//! upstream, which share the process, are not counted).
//!
//! It is a regression harness for this repository. The comparison with nginx and HAProxy runs the
//! proxies as separate processes on their own core: `benches/peers.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use remora_proxy::testing::h3::H3Client;
use remora_proxy::testing::{Client, HttpServer, TestProxy, worker_cpu};

/// What a run speaks.
#[derive(Clone, Copy)]
enum Traffic {
    Http1,
    Http2,
    Http3,
}

fn main() {
    let seconds: u64 = std::env::var("LOAD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let connections: usize = std::env::var("LOAD_CONNECTIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(32);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let upstream = HttpServer::start("upstream").await;
        let certificate = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let dir = tempfile::tempdir().expect("temporary directory");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, certificate.cert.pem()).expect("write");
        std::fs::write(&key, certificate.signing_key.serialize_pem()).expect("write");
        let proxy = TestProxy::start(&format!(
            "resources:\n  - {{kind: Cluster, name: up, protocol: http1}}\n  - {{kind: Endpoints, cluster: up, endpoints: [{{address: \"{}\"}}]}}\n  - {{kind: RouteTable, name: all, routes: [{{backends: [{{cluster: up}}]}}]}}\n  - {{kind: Listener, name: h1, address: \"127.0.0.1:0\", protocol: http1}}\n  - {{kind: Listener, name: h2, address: \"127.0.0.1:0\", protocol: http2}}\n  - {{kind: Listener, name: h3, address: \"127.0.0.1:0\", protocol: http3, tls: {{certificate_file: \"{}\", private_key_file: \"{}\"}}}}\n",
            upstream.address(),
            cert.display(),
            key.display()
        ));
        let roots = certificate.cert.pem();
        println!("load harness: {connections} keep-alive connections, {seconds} s per run, proxy with 1 worker thread");
        println!("{:<8} {:>10} {:>10} {:>10} {:>16}", "traffic", "req/s", "p50 us", "p99 us", "proxy cpu us/req");
        for (name, listener, traffic) in
            [("http/1.1", "h1", Traffic::Http1), ("h2c", "h2", Traffic::Http2), ("http/3", "h3", Traffic::Http3)]
        {
            let address = proxy.address(listener);
            let report = run(address, traffic, &roots, connections, Duration::from_secs(seconds)).await;
            println!(
                "{:<8} {:>10.0} {:>10.0} {:>10.0} {:>16.2}",
                name, report.rate, report.p50_us, report.p99_us, report.worker_cpu_us_per_request
            );
        }
    });
}

struct Report {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    worker_cpu_us_per_request: f64,
}

/// One connection of a run's clients.
enum AnyClient {
    Tcp(Client),
    Quic(H3Client),
}

impl AnyClient {
    async fn connect(address: std::net::SocketAddr, traffic: Traffic, roots: &str) -> AnyClient {
        match traffic {
            Traffic::Http1 => AnyClient::Tcp(Client::http1(address).await),
            Traffic::Http2 => AnyClient::Tcp(Client::http2(address).await),
            Traffic::Http3 => AnyClient::Quic(H3Client::connect(address, roots.as_bytes(), "localhost").await),
        }
    }

    async fn get(&mut self) -> u16 {
        match self {
            AnyClient::Tcp(client) => client.get("bench", "/").await.status.as_u16(),
            AnyClient::Quic(client) => client.get("/").await.0.as_u16(),
        }
    }
}

async fn run(
    address: std::net::SocketAddr,
    traffic: Traffic,
    roots: &str,
    connections: usize,
    duration: Duration,
) -> Report {
    // Warm up: open the pools.
    for _ in 0..connections.min(8) {
        AnyClient::connect(address, traffic, roots).await.get().await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = worker_cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let stop = stop.clone();
        let roots = roots.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = AnyClient::connect(address, traffic, &roots).await;
            let mut latencies = Vec::with_capacity(100_000);
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let status = client.get().await;
                assert_eq!(status, 200, "the proxy failed a request under load");
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client task"));
    }
    let elapsed = started.elapsed();
    let cpu = worker_cpu() - cpu_before;
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    Report {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: at(0.50),
        p99_us: at(0.99),
        worker_cpu_us_per_request: cpu.as_secs_f64() * 1e6 / latencies.len() as f64,
    }
}
