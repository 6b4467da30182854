//! Opaque TCP between two sidecars, by transport: a TLS connection per TCP connection (`tls`,
//! Remora's own), or a tunnel on one pooled HBONE connection (`hbone`, as Istio's ambient mode).
//!
//! `cargo bench --bench transports` runs, for each transport, on loopback, with certificates made
//! here:
//!
//! 1. **Throughput.** `iperf3 -c` through client sidecar → transport → server sidecar → `iperf3 -s`,
//!    one stream, for `TRANSPORT_SECONDS` (default 10): Gbit/s, and the CPU seconds both sidecars
//!    spent per GB moved.
//! 2. **Short connections.** `TRANSPORT_RATE` (default 1000) new connections a second, for
//!    `TRANSPORT_SECONDS`, each writing 64 bytes to an echo server through the pair, reading them
//!    back and closing: p50/p99 of that, failures, both sidecars' CPU microseconds per connection,
//!    and the TLS handshakes the server sidecar made.
//! 3. **Idle connections.** `TRANSPORT_IDLE` (default 2000) connections through the pair to the echo
//!    server, each echoing one byte and then left open: what each sidecar's resident memory grew
//!    by, per connection, measured after the proxies' 5 s memory give-back.
//! 4. **Idle HTTP between sidecars.** Per-request HTTP rides a pooled HTTP/2 connection in mutual
//!    TLS (ALPN `remora.h2`), one per endpoint. The client sidecar's cluster lists
//!    `TRANSPORT_IDLE` endpoints, every one the server sidecar's inbound listener on its own
//!    loopback address (`127.0.x.y`), and one keep-alive client sends as many requests, so round
//!    robin opens one mesh connection to each; then they sit idle in the pool. What each sidecar's
//!    resident memory grew by per mesh connection: the client's is an idle pooled outbound
//!    connection, the server's an idle inbound mTLS connection.
//!
//! The two sidecars run as `remora proxy` processes (one worker each) pinned to CPU 1; iperf3 and
//! this process (clients, echo server) run on CPU 0. iperf3 must be installed (the throughput half is
//! skipped, saying so, if not).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/processes.rs"]
mod processes;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use remora_control_plane::testing::TestCa;
use remora_proxy::testing::{Client, HttpServer, TcpEchoServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use processes::{Killed, admin_get, cpu_seconds, env, free_ports, pin_to_cpu, spawn_proxy, wait_port};

const TRANSPORTS: [&str; 2] = ["tls", "hbone"];

fn main() {
    let seconds = env("TRANSPORT_SECONDS", 10);
    let rate = env("TRANSPORT_RATE", 1000);
    pin_to_cpu(0);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async move {
        let dir = std::env::temp_dir().join(format!("remora-bench-transports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let echo = TcpEchoServer::start().await;
        let [iperf_port, ..] = free_ports();
        let iperf = spawn_iperf_server(iperf_port);
        let iperf_address = SocketAddr::from(([127, 0, 0, 1], iperf_port));
        let ca = TestCa::new("cluster.local");
        let api = ca.issue("spiffe://cluster.local/ns/bench/sa/api").bootstrap_identity(&dir.join("api"));
        let web = ca.issue("spiffe://cluster.local/ns/bench/sa/web").bootstrap_identity(&dir.join("web"));

        let [in_iperf, in_echo, hbone, server_admin] = free_ports();
        let [in_tunnels, in_http, ..] = free_ports();
        let app = HttpServer::start("app").await;
        let idle = env("TRANSPORT_IDLE", 2000) as usize;
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        // On every loopback address: the client sidecar reaches it at 2,000 of them.
        let in_http_listener = format!(
            "  - {{kind: Listener, name: in-http, address: \"0.0.0.0:{in_http}\", direction: inbound, default_cluster: app}}\n"
        );
        let server = spawn_proxy(
            &dir,
            "server",
            &format!(
                "bootstrap:\n  admin_address: \"127.0.0.1:{server_admin}\"\n  workers: 1\n{api}---\nresources:\n{}{}{}{}{}{}{}{}{}",
                cluster("iperf", "", iperf_address),
                cluster("echo", "", echo.address()),
                "  - {kind: Cluster, name: passthrough, original_destination: true}\n",
                listener("in-iperf", in_iperf, ", direction: inbound, default_cluster: iperf"),
                listener("in-echo", in_echo, ", direction: inbound, default_cluster: echo"),
                listener("hbone", hbone, ", direction: inbound, protocol: hbone, inbound_listener: in-tunnels"),
                listener("in-tunnels", in_tunnels, ", direction: inbound, default_cluster: passthrough"),
                cluster("app", ", protocol: http1", app.address()),
                in_http_listener,
            ),
            server_admin,
        );
        let [out_tls_iperf, out_tls_echo, out_hbone_iperf, out_hbone_echo] = free_ports();
        let [client_admin, out_http, ..] = free_ports();
        // One endpoint per mesh connection wanted: the server sidecar's inbound listener, each on
        // its own loopback address.
        let endpoints: Vec<String> =
            (0..idle).map(|i| format!("{{address: \"127.0.{}.{}:{in_http}\"}}", i / 250, i % 250 + 1)).collect();
        let mesh_http = format!(
            "  - {{kind: Cluster, name: mesh-http, tls: mesh, protocol: http1}}\n  - {{kind: Endpoints, cluster: mesh-http, endpoints: [{}]}}\n",
            endpoints.join(", ")
        );
        let via_hbone = format!(", tls: mesh, hbone_port: {hbone}");
        let client = spawn_proxy(
            &dir,
            "client",
            &format!(
                "bootstrap:\n  admin_address: \"127.0.0.1:{client_admin}\"\n  workers: 1\n{web}---\nresources:\n{}{}{}{}{}{}{}{}{mesh_http}{}",
                cluster("tls-iperf", ", tls: mesh", local(in_iperf)),
                cluster("tls-echo", ", tls: mesh", local(in_echo)),
                cluster("hbone-iperf", &via_hbone, iperf_address),
                cluster("hbone-echo", &via_hbone, echo.address()),
                listener("tls-iperf", out_tls_iperf, ", protocol: tcp, default_cluster: tls-iperf"),
                listener("tls-echo", out_tls_echo, ", protocol: tcp, default_cluster: tls-echo"),
                listener("hbone-iperf", out_hbone_iperf, ", protocol: tcp, default_cluster: hbone-iperf"),
                listener("hbone-echo", out_hbone_echo, ", protocol: tcp, default_cluster: hbone-echo"),
                listener("http-out", out_http, ", protocol: http1, default_cluster: mesh-http"),
            ),
            client_admin,
        );
        let proxies = [&server, &client];
        let duration = Duration::from_secs(seconds);

        println!("opaque TCP between two sidecars (one worker each, both on CPU 1), {seconds} s per run");
        match iperf {
            Some(_) => {
                println!("\n{:<7} {:>10} {:>14}", "iperf3", "Gbit/s", "cpu s/GB");
                for (transport, port) in TRANSPORTS.into_iter().zip([out_tls_iperf, out_hbone_iperf]) {
                    let before = total_cpu(&proxies);
                    let (bits_per_second, bytes) = run_iperf(local(port), seconds);
                    let cpu = total_cpu(&proxies) - before;
                    println!("{transport:<7} {:>10.2} {:>14.3}", bits_per_second / 1e9, cpu / (bytes / 1e9));
                }
            }
            None => println!("\niperf3: skipped, not installed"),
        }
        println!("\nshort connections: {rate}/s, 64 bytes echoed each");
        println!("{:<7} {:>8} {:>8} {:>8} {:>7} {:>12} {:>11}", "", "p50 us", "p99 us", "ok", "failed", "cpu us/conn", "handshakes");
        for (transport, port) in TRANSPORTS.into_iter().zip([out_tls_echo, out_hbone_echo]) {
            let handshakes_before = handshakes(server_admin);
            let before = total_cpu(&proxies);
            let run = short_connections(local(port), rate, duration).await;
            let cpu = total_cpu(&proxies) - before;
            let [p50, p99] = run.percentiles();
            let connections = (run.latencies.len() + run.failed).max(1) as f64;
            println!(
                "{transport:<7} {p50:>8.0} {p99:>8.0} {:>8} {:>7} {:>12.1} {:>11.0}",
                run.latencies.len(),
                run.failed,
                cpu * 1e6 / connections,
                handshakes(server_admin) - handshakes_before
            );
        }
        println!("\nidle connections: {idle}, one byte echoed on each, then left open");
        println!("{:<7} {:>16} {:>16}", "", "client kB/conn", "server kB/conn");
        for (transport, port) in TRANSPORTS.into_iter().zip([out_tls_echo, out_hbone_echo]) {
            let before = [rss_kb(client.id()), rss_kb(server.id())];
            let open = idle_connections(local(port), idle).await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            let after = [rss_kb(client.id()), rss_kb(server.id())];
            let per = |i: usize| (after[i] - before[i]) * 1.024 / open.len().max(1) as f64;
            println!("{transport:<7} {:>16.2} {:>16.2}   ({} open)", per(0), per(1), open.len());
            drop(open);
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
        println!("\nidle HTTP between sidecars: {idle} mesh connections (mTLS, HTTP/2), one request each, then idle");
        println!("{:<7} {:>16} {:>16}", "", "client kB/conn", "server kB/conn");
        let before = [rss_kb(client.id()), rss_kb(server.id())];
        let handshakes_before = handshakes(server_admin);
        let mut app_client = Client::http1(local(out_http)).await;
        let mut answered = 0;
        for _ in 0..idle {
            if app_client.get("app", "/").await.status == 200 {
                answered += 1;
            }
        }
        drop(app_client);
        tokio::time::sleep(Duration::from_secs(6)).await;
        let after = [rss_kb(client.id()), rss_kb(server.id())];
        let opened = handshakes(server_admin) - handshakes_before;
        let per = |i: usize| (after[i] - before[i]) * 1.024 / answered.max(1) as f64;
        println!("{:<7} {:>16.2} {:>16.2}   ({answered} answered, {opened:.0} handshakes)", "mesh", per(0), per(1));
        // The proxies go first: they follow their files, and would log the directory's removal.
        drop((server, client));
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Resident memory of process `pid`, in KiB.
fn rss_kb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap_or_default();
    line.split_whitespace().nth(1).and_then(|kb| kb.parse().ok()).unwrap_or(0.0)
}

/// `count` connections to `address`, each having echoed one byte, held open.
async fn idle_connections(address: SocketAddr, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut open = Vec::with_capacity(count);
    for _ in 0..count {
        let echoed = async {
            let mut stream = tokio::net::TcpStream::connect(address).await?;
            let mut back = [0_u8; 1];
            stream.write_all(&[7]).await?;
            stream.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(stream)
        };
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(5), echoed).await {
            open.push(stream);
        }
    }
    open
}

fn cluster(name: &str, extra: &str, endpoint: SocketAddr) -> String {
    format!(
        "  - {{kind: Cluster, name: {name}{extra}}}\n  - {{kind: Endpoints, cluster: {name}, endpoints: [{{address: \"{endpoint}\"}}]}}\n"
    )
}

fn listener(name: &str, port: u16, extra: &str) -> String {
    format!("  - {{kind: Listener, name: {name}, address: \"127.0.0.1:{port}\"{extra}}}\n")
}

fn total_cpu(proxies: &[&Killed]) -> f64 {
    proxies.iter().map(|p| cpu_seconds(p.id())).sum()
}

/// The server sidecar's completed inbound TLS handshakes so far.
fn handshakes(admin: u16) -> f64 {
    let metrics = admin_get(admin, "/metrics");
    let series = "remora_tls_handshakes_total{direction=\"inbound\",result=\"ok\"} ";
    metrics.lines().find_map(|line| line.strip_prefix(series)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// `iperf3 -s` on CPU 0, or `None` if iperf3 is not installed.
fn spawn_iperf_server(port: u16) -> Option<Killed> {
    let child = Command::new("taskset")
        .args(["-c", "0", "iperf3", "-s", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let child = Killed(child);
    wait_port(port);
    Some(child)
}

/// One iperf3 stream to `address` for `seconds`: (bits per second received, bytes received).
fn run_iperf(address: SocketAddr, seconds: u64) -> (f64, f64) {
    let out = Command::new("taskset")
        .args(["-c", "0", "iperf3", "-J", "-c", &address.ip().to_string(), "-p", &address.port().to_string()])
        .args(["-t", &seconds.to_string()])
        .output()
        .expect("iperf3");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3's JSON report");
    let received = &report["end"]["sum_received"];
    (received["bits_per_second"].as_f64().unwrap_or(0.0), received["bytes"].as_f64().unwrap_or(0.0))
}

struct Run {
    latencies: Vec<Duration>,
    failed: usize,
}

impl Run {
    fn percentiles(&self) -> [f64; 2] {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        [0.50, 0.99].map(|p| {
            let index = ((sorted.len().max(1) - 1) as f64 * p).round() as usize;
            sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        })
    }
}

/// `rate` new connections a second to `address` for `duration`, each started on schedule whether
/// or not the ones before it finished (an open loop): connect, write 64 bytes, read them back,
/// close.
async fn short_connections(address: SocketAddr, rate: u64, duration: Duration) -> Run {
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let end = tokio::time::Instant::now() + duration;
    let mut next = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    while next < end {
        tokio::time::sleep_until(next).await;
        next += interval;
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let exchange = async {
                let mut stream = tokio::net::TcpStream::connect(address).await?;
                stream.write_all(&[7; 64]).await?;
                let mut back = [0; 64];
                stream.read_exact(&mut back).await?;
                Ok::<_, std::io::Error>(back == [7; 64])
            };
            match tokio::time::timeout(Duration::from_secs(5), exchange).await {
                Ok(Ok(true)) => Some(started.elapsed()),
                _ => None,
            }
        }));
    }
    let mut run = Run { latencies: Vec::new(), failed: 0 };
    for task in tasks {
        match task.await.ok().flatten() {
            Some(took) => run.latencies.push(took),
            None => run.failed += 1,
        }
    }
    run
}
