//! End-to-end tests of the proxy: real sockets on loopback, real hyper servers and clients, a real
//! proxy, in-process (from `remora_proxy::testing`) or as the spawned `remora` binary (`cli`,
//! `transparent`). See `tests/README.md` for how they are organised.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod abusive_upstream;
mod automatic_capture;
mod automatic_mesh;
mod balancers;
mod capture;
mod cli;
mod control;
mod drain;
mod exhaustion;
mod filters;
mod gamma;
mod gateway_api;
mod grpc;
mod h2_limits;
mod hbone;
mod hbone_out;
mod hostile_control_plane;
mod http;
mod http3;
mod kubernetes;
mod kubernetes_api;
mod mesh;
mod netns;
mod policy;
mod quic_tunnels;
mod raw_upstream;
mod reload;
mod resilience;
mod retries;
mod smuggling;
mod tcp;
mod telemetry;
mod transparent;
mod tunnels;

use std::net::SocketAddr;

/// YAML (list items under `resources:`) for a cluster and its endpoints. `extra` adds fields to the
/// cluster, e.g. `", protocol: http2"`.
pub fn cluster(name: &str, extra: &str, endpoints: &[SocketAddr]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("{{address: \"{e}\"}}")).collect();
    format!(
        "  - {{kind: Cluster, name: {name}{extra}}}\n  - {{kind: Endpoints, cluster: {name}, endpoints: [{}]}}\n",
        list.join(", ")
    )
}

/// YAML for a listener on `127.0.0.1:0`. `extra` adds fields, e.g. `", protocol: http1"`.
pub fn listener(name: &str, extra: &str) -> String {
    format!("  - {{kind: Listener, name: {name}, address: \"127.0.0.1:0\"{extra}}}\n")
}

/// YAML for a catch-all route table sending everything to `cluster`.
pub fn route_all(table: &str, cluster: &str) -> String {
    format!("  - {{kind: RouteTable, name: {table}, routes: [{{backends: [{{cluster: {cluster}}}]}}]}}\n")
}

/// An address nothing listens on: a port bound and released.
pub fn dead_address() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// Sends `count` datagrams of random bytes (seeded by `seed`) to `target`, half of them shaped as
/// QUIC long-header (Initial) packets: what a QUIC listener must shrug off.
pub async fn junk_datagrams(target: SocketAddr, count: usize, seed: u64) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    for i in 0..count {
        let mut datagram = vec![0_u8; rng.usize(1..1400)];
        rng.fill(&mut datagram);
        if i % 2 == 0 {
            datagram[0] = 0xc0 | (datagram[0] & 0x0f);
        }
        let _ = socket.send_to(&datagram, target).await;
    }
}
