//! Tail latency under packet loss between two sidecars: HBONE (HTTP/2 tunnels on one TCP
//! connection) against HBONE over QUIC (HTTP/3 tunnels on one QUIC connection).
//!
//! `cargo bench --bench transport_loss` needs root: it makes a network namespace of its own, moves
//! this process's threads into it (so the two in-process sidecars, the echo server and the clients
//! all live there), sets its loopback MTU to 1500 (so a TCP segment and a QUIC packet are the same
//! size on the wire), and drops packets between the sidecars with `iptables -m statistic --mode
//! random` (no delay emulation exists on this kernel) on the tunnel port only, both ways. For each
//! loss rate in `LOSS` (default `0 1 3`, in percent) and each transport, `LOSS_STREAMS` (default
//! 64) connections through the pair each send a 1 KiB request to the echo server and wait for it
//! back, over and over, for `LOSS_SECONDS` (default 10): requests per second and p50/p99/p99.9
//! latency. Then, on the clean link, one connection moves `LOSS_MEGABYTES` (default 512) each way
//! through each transport: Gbit/s and both sidecars' CPU seconds per GB. The namespace is deleted
//! at the end. Traffic never leaves it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use remora_control_plane::testing::TestCa;
use remora_proxy::testing::{TcpEchoServer, TestProxy, worker_cpu};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TUNNEL_PORT: u16 = 15008;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?} failed");
}

/// A namespace of this process's own, deleted when dropped.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn main() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("transport_loss: skipped: needs root (a network namespace, iptables)");
        return;
    }
    let name = format!("remora-loss-{}", std::process::id());
    run("ip", &["netns", "add", &name]);
    let _namespace = Namespace(name.clone());
    // This thread moves in before any other starts: every thread made from now on is inside.
    let file = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network)).unwrap();
    run("ip", &["link", "set", "lo", "up", "mtu", "1500"]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(bench());
}

async fn bench() {
    let seconds = env("LOSS_SECONDS", 10);
    let streams = env("LOSS_STREAMS", 64) as usize;
    let megabytes = env("LOSS_MEGABYTES", 512);
    let losses: Vec<u64> = std::env::var("LOSS")
        .unwrap_or_else(|_| "0 1 3".into())
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let dir = std::env::temp_dir().join(format!("remora-bench-loss-{}", std::process::id()));
    let echo = TcpEchoServer::start_on("127.0.0.2:0".parse().unwrap()).await;
    let ca = TestCa::new("cluster.local");
    let api = ca.issue("spiffe://cluster.local/ns/bench/sa/api").bootstrap_identity(&dir.join("api"));
    let web = ca.issue("spiffe://cluster.local/ns/bench/sa/web").bootstrap_identity(&dir.join("web"));
    // The server sidecar's tunnel listeners on 127.0.0.2:15008, TCP and UDP; its tunnels relayed
    // to where they name.
    let _server = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.2:0\n  workers: 1\n{api}---\nresources:\n\
         - {{kind: Cluster, name: passthrough, original_destination: true}}\n\
         - {{kind: Listener, name: in, address: \"127.0.0.2:0\", direction: inbound, default_cluster: passthrough}}\n\
         - {{kind: Listener, name: hbone, address: \"127.0.0.2:{TUNNEL_PORT}\", direction: inbound, protocol: hbone, inbound_listener: in}}\n\
         - {{kind: Listener, name: quic, address: \"127.0.0.2:{TUNNEL_PORT}\", direction: inbound, protocol: hbone_quic, inbound_listener: in}}\n"
    ));
    let cluster = |name: &str, transport: &str| {
        format!(
            "- {{kind: Cluster, name: {name}, tls: mesh, connect_timeout: 10s, {transport}}}\n\
             - {{kind: Endpoints, cluster: {name}, endpoints: [{{address: \"{}\"}}]}}\n\
             - {{kind: Listener, name: {name}, address: \"127.0.0.1:0\", protocol: tcp, default_cluster: {name}}}\n",
            echo.address()
        )
    };
    let client = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n{web}---\nresources:\n{}{}",
        cluster("hbone", &format!("hbone_port: {TUNNEL_PORT}")),
        cluster("quic", &format!("quic_port: {TUNNEL_PORT}")),
    ));
    println!(
        "transport_loss: {streams} streams of 1 KiB request/response, {seconds} s each, loopback MTU 1500, random drop on the tunnel port both ways"
    );
    println!(
        "{:<7} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8} {:>14} {:>12}",
        "", "loss", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors", "quic lost/sent", "udp rcvbuf"
    );
    for &loss in &losses {
        for transport in ["hbone", "quic"] {
            set_loss(transport, loss);
            let (packets, drops) = (quic_packets(&client).await, udp_receive_buffer_errors());
            let report = requests(client.address(transport), streams, Duration::from_secs(seconds)).await;
            set_loss(transport, 0);
            let (sent, lost) = quic_packets(&client).await;
            println!(
                "{:<7} {:>5}% {:>10.0} {:>10.2} {:>10.2} {:>10.2} {:>8} {:>14} {:>12}",
                transport,
                loss,
                report.rate,
                report.p50_ms,
                report.p99_ms,
                report.p999_ms,
                report.errors,
                format!("{}/{}", lost - packets.1, sent - packets.0),
                udp_receive_buffer_errors() - drops
            );
        }
    }
    println!("one connection, {megabytes} MB each way, clean link:");
    for transport in ["hbone", "quic"] {
        let cpu = worker_cpu();
        let started = Instant::now();
        let moved = stream(client.address(transport), megabytes * 1_000_000).await;
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = (worker_cpu() - cpu).as_secs_f64();
        let gigabytes = moved as f64 / 1e9;
        println!(
            "{transport:<7} {:>6.2} Gbit/s  {:>6.3} CPU s/GB (both sidecars)",
            gigabytes * 8.0 / elapsed,
            cpu / gigabytes
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The client sidecar's QUIC packets sent and lost so far (its `/clusters`, refreshed every second).
async fn quic_packets(client: &TestProxy) -> (u64, u64) {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, clusters) = client.admin_get("/clusters").await;
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let paths = clusters["quic_paths"].as_array().cloned().unwrap_or_default();
    let sum = |field: &str| paths.iter().filter_map(|p| p[field].as_u64()).sum();
    (sum("sent_packets"), sum("lost_packets"))
}

/// Datagrams the namespace's UDP sockets dropped for a full receive buffer, so far.
fn udp_receive_buffer_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// Drops `percent` of the packets to and from the tunnel port of `transport`'s protocol (none: 0).
fn set_loss(transport: &str, percent: u64) {
    let protocol = if transport == "quic" { "udp" } else { "tcp" };
    let _ = Command::new("iptables").args(["-F", "INPUT"]).status();
    if percent == 0 {
        return;
    }
    let probability = format!("{:.4}", percent as f64 / 100.0);
    let port = TUNNEL_PORT.to_string();
    for direction in ["--dport", "--sport"] {
        run(
            "iptables",
            &[
                "-A",
                "INPUT",
                "-p",
                protocol,
                direction,
                &port,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &probability,
                "-j",
                "DROP",
            ],
        );
    }
}

struct Report {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: usize,
}

/// `streams` connections through `address`, each sending 1 KiB and reading it back, for `duration`.
async fn requests(address: SocketAddr, streams: usize, duration: Duration) -> Report {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let Ok(mut connection) = tokio::net::TcpStream::connect(address).await else { return (latencies, 1) };
            let _ = connection.set_nodelay(true);
            let request = vec![7_u8; 1024];
            let mut response = vec![0_u8; 1024];
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let exchanged = async {
                    connection.write_all(&request).await?;
                    connection.read_exact(&mut response).await
                };
                match tokio::time::timeout(Duration::from_secs(30), exchanged).await {
                    Ok(Ok(_)) => latencies.push(sent.elapsed()),
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (mine, failed) = task.await.unwrap();
        latencies.extend(mine);
        errors += failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let at = |p: f64| {
        latencies.get(((latencies.len().max(1) - 1) as f64 * p) as usize).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Report { rate: latencies.len() as f64 / elapsed, p50_ms: at(0.5), p99_ms: at(0.99), p999_ms: at(0.999), errors }
}

/// Sends `bytes` through `address` to the echo server while reading them back; how many came back.
async fn stream(address: SocketAddr, bytes: u64) -> u64 {
    let connection = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut reader, mut writer) = connection.into_split();
    let writing = tokio::spawn(async move {
        let chunk = vec![1_u8; 64 * 1024];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min((bytes - sent) as usize);
            writer.write_all(&chunk[..n]).await.unwrap();
            sent += n as u64;
        }
        writer.shutdown().await.unwrap();
    });
    let mut buffer = vec![0_u8; 64 * 1024];
    let mut received = 0;
    loop {
        let n = reader.read(&mut buffer).await.unwrap();
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    writing.await.unwrap();
    received
}
