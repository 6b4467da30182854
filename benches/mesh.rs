//! The sidecar pair: what mutual TLS between two Remora sidecars adds, and what a handshake costs.
//!
//! `cargo bench --bench mesh` runs two measurements on loopback, with certificates made here:
//!
//! 1. **Added latency.** client → outbound sidecar → mTLS → inbound sidecar → backend, HTTP/1.1 with
//!    a 1 KiB response, at a fixed rate (`MESH_RATE`, default 1000 requests/s) spread over 16
//!    keep-alive connections (each sends on its own schedule, whether or not the previous answer was
//!    quick: an open loop), for `MESH_SECONDS` (default 10) after a 2 s warm-up; then the same
//!    straight to the backend, through one Remora, and through two sidecars without TLS, to tell
//!    what each layer adds. Prints p50/p90/p99 of each, what the mTLS pair adds over direct, and
//!    the CPU time the proxy processes spent per request together (from `/proc/PID/stat`).
//!    The **zero-config pair** is the same two sidecars as the automatic mesh runs them: a
//!    `remora control` (on CPU 0, idle while measured) meshing a Service from its manifests alone
//!    (Namespace, Service with `appProtocol: http`, Pods, an EndpointSlice naming the inbound
//!    sidecar), the client sidecar holding nothing but its outbound listener (the route by the
//!    Service's short name, the ewma cluster and its mTLS to the pod's identity come from the
//!    control plane), the server sidecar's inbound listener under the mesh's permissive policy. Its
//!    row is compared with the hand-configured mTLS pair's. The **HBONE pair** is the mTLS pair
//!    with HTTP sent as Istio's sidecars send it to an ambient pod (`http_over_hbone`): HTTP/1.1
//!    inside `CONNECT` tunnels on a pooled HBONE connection to the server sidecar's HBONE listener,
//!    which serves them through the same inbound listener.
//! 2. **Handshakes.** New mTLS connections (TLS 1.3, ECDSA P-256, client certificate required and
//!    verified, no resumption) opened and closed as fast as 8 concurrent clients can, for
//!    `MESH_SECONDS`, against the inbound sidecar (clients offering the post-quantum X25519MLKEM768
//!    first, as a sidecar does, then clients offering X25519 only) and against nginx doing the same
//!    termination; prints handshakes per second per core of the server (handshakes / its CPU
//!    seconds).
//!
//! The sidecars run as separate `remora proxy` processes (one worker each) pinned to CPU 1 with
//! `taskset`; this process (clients and the backend) pins itself to CPU 0. nginx must be installed
//! for the handshake comparison (it is skipped, saying so, if not).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/processes.rs"]
mod processes;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use remora_control_plane::testing::{IssuedPem, TestCa};
use remora_proxy::testing::HttpServer;
use remora_proxy::testing::servers::{Handler, full};

use processes::{
    Killed, admin_get, cpu_seconds, env, free_ports, pin_to_cpu, spawn_proxy, spawn_proxy_with, spawn_remora,
    wait_port, wait_ready,
};

const CONNECTIONS: usize = 16;
const HANDSHAKE_CLIENTS: usize = 8;

fn main() {
    let seconds: u64 = env("MESH_SECONDS", 10);
    let rate: u64 = env("MESH_RATE", 1000);
    pin_to_cpu(0);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async move {
        let dir = std::env::temp_dir().join(format!("remora-bench-mesh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let body = Bytes::from(vec![b'x'; 1024]);
        let handler: Handler = Arc::new(move |_| {
            let body = body.clone();
            Box::pin(async move { http::Response::new(full(body)) })
        });
        let backend = HttpServer::with_handler(handler).await;
        let ca = TestCa::new("cluster.local");
        let api = ca.issue("spiffe://cluster.local/ns/bench/sa/api");
        let web = ca.issue("spiffe://cluster.local/ns/bench/sa/web");
        let [inbound, outbound, inbound_admin, outbound_admin] = free_ports();
        let [plain_in, plain_out, plain_in_admin, plain_out_admin] = free_ports();
        let [single, single_admin, ..] = free_ports();
        let server_config = |admin: u16, port: u16, identity: &str| {
            format!(
                "bootstrap:\n  admin_address: \"127.0.0.1:{admin}\"\n  workers: 1\n{identity}---\nresources:\n  - {{kind: Cluster, name: app, protocol: http1}}\n  - {{kind: Endpoints, cluster: app, endpoints: [{{address: \"{}\"}}]}}\n  - {{kind: Listener, name: in, address: \"127.0.0.1:{port}\", direction: inbound, default_cluster: app}}\n",
                backend.address()
            )
        };
        let client_config = |admin: u16, port: u16, upstream: SocketAddr, tls: &str, identity: &str| {
            format!(
                "bootstrap:\n  admin_address: \"127.0.0.1:{admin}\"\n  workers: 1\n{identity}---\nresources:\n  - {{kind: Cluster, name: api, tls: {tls}, protocol: http1}}\n  - {{kind: Endpoints, cluster: api, endpoints: [{{address: \"{upstream}\"}}]}}\n  - {{kind: Listener, name: out, address: \"127.0.0.1:{port}\", protocol: http1, default_cluster: api}}\n"
            )
        };
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let api_identity = api.bootstrap_identity(&dir.join("api"));
        let web_identity = web.bootstrap_identity(&dir.join("web"));
        let server = spawn_proxy(&dir, "server", &server_config(inbound_admin, inbound, &api_identity), inbound);
        let client = spawn_proxy(
            &dir,
            "client",
            &client_config(outbound_admin, outbound, local(inbound), "mesh", &web_identity),
            outbound,
        );

        println!("sidecar pair: HTTP/1.1, 1 KiB responses, {rate} requests/s over {CONNECTIONS} connections, {seconds} s");
        println!("(nginx, one proxy: a single nginx or Remora in front of the backend; plain pair: two sidecars without TLS)");
        let duration = Duration::from_secs(seconds);
        let direct = (fixed_rate(backend.address(), rate, duration).await, 0.0);
        let one = {
            let config = client_config(single_admin, single, backend.address(), "none", "");
            let proxy = spawn_proxy(&dir, "single", &config, single);
            measured(&[&proxy], local(single), rate, duration).await
        };
        let nginx = match spawn_nginx_proxy(&dir, backend.address()) {
            Some((nginx, port)) => Some(measured(&[&nginx], local(port), rate, duration).await),
            None => None,
        };
        let plain = {
            let server = spawn_proxy(&dir, "plain-server", &server_config(plain_in_admin, plain_in, ""), plain_in);
            let config = client_config(plain_out_admin, plain_out, local(plain_in), "none", "");
            let client = spawn_proxy(&dir, "plain-client", &config, plain_out);
            measured(&[&server, &client], local(plain_out), rate, duration).await
        };
        let paired = measured(&[&server, &client], local(outbound), rate, duration).await;
        let hbone = {
            let [hbone_in, hbone_out, hbone_in_admin, hbone_out_admin] = free_ports();
            let [hbone_port, ..] = free_ports();
            let mut config = server_config(hbone_in_admin, hbone_in, &api_identity);
            config.push_str(&format!(
                "  - {{kind: Listener, name: hbone, address: \"127.0.0.1:{hbone_port}\", direction: inbound, protocol: hbone, inbound_listener: in}}\n"
            ));
            let server = spawn_proxy(&dir, "hbone-server", &config, hbone_in);
            let tls = format!("mesh, hbone_port: {hbone_port}, http_over_hbone: true");
            let config = client_config(hbone_out_admin, hbone_out, local(hbone_in), &tls, &web_identity);
            let client = spawn_proxy(&dir, "hbone-client", &config, hbone_out);
            let run = measured(&[&server, &client], local(hbone_out), rate, duration).await;
            assert!(admin_get(hbone_in_admin, "/metrics").contains(r#"remora_listener_tunnels_total{listener="hbone",result="opened"}"#), "the HBONE pair tunnelled");
            run
        };
        let automatic = {
            let [control_port, auto_in, auto_out, ..] = free_ports();
            let [auto_in_admin, auto_out_admin, ..] = free_ports();
            let manifests = dir.join("mesh");
            std::fs::create_dir_all(&manifests).unwrap();
            std::fs::write(manifests.join("bench.yaml"), service_manifests(local(auto_in))).unwrap();
            let _control = spawn_control(&manifests, control_port);
            let control = format!("http://127.0.0.1:{control_port}");
            // Without capture there is no original destination: the server sidecar's app is named
            // in its file, as its pod's address would be found by one.
            let config = format!(
                "bootstrap:\n  admin_address: \"127.0.0.1:{auto_in_admin}\"\n  workers: 1\n{api_identity}---\nresources:\n  - {{kind: Cluster, name: app, protocol: http1}}\n  - {{kind: Endpoints, cluster: app, endpoints: [{{address: \"{}\"}}]}}\n  - {{kind: Listener, name: inbound, address: \"127.0.0.1:{auto_in}\", direction: inbound, default_cluster: app}}\n",
                backend.address()
            );
            let server = spawn_proxy_with(&dir, "auto-server", &config, auto_in, &["--control", &control, "--node-id", "api-0.bench"]);
            let config = format!(
                "bootstrap:\n  admin_address: \"127.0.0.1:{auto_out_admin}\"\n  workers: 1\n{web_identity}---\nresources:\n  - {{kind: Listener, name: outbound, address: \"127.0.0.1:{auto_out}\", protocol: http1, direction: outbound}}\n"
            );
            let client = spawn_proxy_with(&dir, "auto-client", &config, auto_out, &["--control", &control, "--node-id", "web-0.bench"]);
            wait_ready(auto_in_admin);
            wait_ready(auto_out_admin);
            let run = measured(&[&server, &client], local(auto_out), rate, duration).await;
            let proved = r#"remora_tls_peer_handshakes_total{direction="outbound",result="ok",peer="spiffe://cluster.local/ns/bench/sa/api"}"#;
            assert!(admin_get(auto_out_admin, "/metrics").contains(proved), "the zero-config pair spoke mTLS");
            run
        };
        println!("{:<11} {:>8} {:>8} {:>8} {:>8} {:>7} {:>14}", "path", "p50 us", "p90 us", "p99 us", "ok", "errors", "proxy cpu us/req");
        let [d50, d90, d99] = direct.0.percentiles();
        let rows = [
            ("direct", Some(&direct)),
            ("nginx", nginx.as_ref()),
            ("one proxy", Some(&one)),
            ("plain pair", Some(&plain)),
            ("mTLS pair", Some(&paired)),
            ("HBONE pair", Some(&hbone)),
            ("zero-config", Some(&automatic)),
        ];
        for (name, (run, cpu)) in rows.into_iter().filter_map(|(name, row)| row.map(|r| (name, r))) {
            let [p50, p90, p99] = run.percentiles();
            println!("{name:<11} {p50:>8.0} {p90:>8.0} {p99:>8.0} {:>8} {:>7} {cpu:>14.1}", run.latencies.len(), run.errors);
        }
        let [p50, p90, p99] = paired.0.percentiles();
        println!("mTLS pair adds over direct: p50 {:.0} us, p90 {:.0} us, p99 {:.0} us", p50 - d50, p90 - d90, p99 - d99);
        let [a50, a90, a99] = automatic.0.percentiles();
        println!("zero-config pair adds over direct: p50 {:.0} us, p90 {:.0} us, p99 {:.0} us", a50 - d50, a90 - d90, a99 - d99);
        let change = |auto: f64, hand: f64| (auto - hand) / hand * 100.0;
        println!(
            "zero-config pair against the mTLS pair: CPU per request {:+.1}%, added p50 {:+.1}%, added p99 {:+.1}%",
            change(automatic.1, paired.1),
            change(a50 - d50, p50 - d50),
            change(a99 - d99, p99 - d99)
        );
        println!("\nnew mTLS handshakes (TLS 1.3, P-256, client certificate verified), {HANDSHAKE_CLIENTS} clients, {seconds} s");
        let inbound_address = SocketAddr::from(([127, 0, 0, 1], inbound));
        for (label, key_exchange) in [("remora pq", KeyExchange::PostQuantum), ("remora", KeyExchange::Classical)] {
            let result =
                handshakes(&web, inbound_address, remora_proxy::tls::ALPN_HTTP, key_exchange, server.id(), duration).await;
            println!("{label:<10} {:>10.0} handshakes/s per core ({} handshakes, {} failed)", result.0, result.1, result.2);
        }
        drop(server);
        drop(client);
        match spawn_nginx(&dir, &api) {
            Some((nginx, port)) => {
                let address = SocketAddr::from(([127, 0, 0, 1], port));
                let result = handshakes(&web, address, b"http/1.1", KeyExchange::Classical, nginx.id(), duration).await;
                println!("{:<10} {:>10.0} handshakes/s per core ({} handshakes, {} failed)", "nginx", result.0, result.1, result.2);
            }
            None => println!("nginx       skipped: not installed"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// nginx as a plain HTTP/1.1 reverse proxy to `backend` (keep-alive upstream) on CPU 1, or `None`
/// if it is not installed: the yardstick for one proxy at this rate.
fn spawn_nginx_proxy(dir: &Path, backend: SocketAddr) -> Option<(Killed, u16)> {
    run_nginx(dir, "nginx-proxy", |port| {
        format!(
            "  upstream backend {{ server {backend}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n"
        )
    })
}

/// nginx terminating the same TLS (1.3 only, client certificate verified) on CPU 1, or `None` if
/// it is not installed.
fn spawn_nginx(dir: &Path, identity: &IssuedPem) -> Option<(Killed, u16)> {
    let [cert, key, ca] = identity.write(&dir.join("nginx"));
    run_nginx(dir, "nginx", |port| {
        format!(
            "  server {{\n    listen 127.0.0.1:{port} ssl backlog=4096;\n    ssl_protocols TLSv1.3;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    ssl_client_certificate {ca};\n    ssl_verify_client on;\n    ssl_session_cache off;\n    ssl_session_tickets off;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n",
            cert = cert.display(),
            key = key.display(),
            ca = ca.display(),
        )
    })
}

/// One nginx worker on CPU 1 with the `http` block `http(port)` on a free port, named `name` in
/// `dir`; waits for the port. `None` if nginx is not installed.
fn run_nginx(dir: &Path, name: &str, http: impl FnOnce(u16) -> String) -> Option<(Killed, u16)> {
    let [port, ..] = free_ports();
    let config = dir.join(format!("{name}.conf"));
    std::fs::write(
        &config,
        format!(
            "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {pid};\nerror_log {err} warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n{}}}\n",
            http(port),
            pid = dir.join(format!("{name}.pid")).display(),
            err = dir.join(format!("{name}.err")).display(),
        ),
    )
    .unwrap();
    let child =
        Command::new("taskset").args(["-c", "1", "nginx", "-c"]).arg(&config).stdout(Stdio::null()).spawn().ok()?;
    let child = Killed(child);
    wait_port(port);
    Some((child, port))
}

/// `remora control` on CPU 0 serving `manifests`, its Delta ADS on `port`.
fn spawn_control(manifests: &Path, port: u16) -> Killed {
    let listen = format!("127.0.0.1:{port}");
    spawn_remora(0, &["control", "--listen", &listen, "--config-dir", manifests.to_str().unwrap()], port)
}

/// The Kubernetes objects of one meshed Service, `api` in namespace `bench` (HTTP/1.1 by its
/// `appProtocol`), whose one pod's sidecar listens at `endpoint`, and its caller's pod `web-0`.
fn service_manifests(endpoint: SocketAddr) -> String {
    let pod = |name: &str, account: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: bench, name: {name}, uid: uid-{name}}}\nspec: {{serviceAccountName: {account}, containers: [{{name: app}}, {{name: remora-proxy}}]}}\n"
        )
    };
    [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n".to_owned(),
        "apiVersion: v1\nkind: Service\nmetadata: {namespace: bench, name: api}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]\n".to_owned(),
        pod("api-0", "api"),
        pod("web-0", "web"),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: bench, name: api-1, labels: {{kubernetes.io/service-name: api}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints:\n  - {{addresses: [\"{}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, namespace: bench, name: api-0, uid: uid-api-0}}}}\n",
            endpoint.port(),
            endpoint.ip()
        ),
    ]
    .join("---\n")
}

/// A fixed-rate run through `proxies` (entering at `address`), and their CPU microseconds per
/// request together (warm-up requests included in both counts).
async fn measured(proxies: &[&Killed], address: SocketAddr, rate: u64, duration: Duration) -> (Run, f64) {
    let before: f64 = proxies.iter().map(|p| cpu_seconds(p.id())).sum();
    let run = fixed_rate(address, rate, duration).await;
    let after: f64 = proxies.iter().map(|p| cpu_seconds(p.id())).sum();
    let requests = (run.latencies.len() + run.errors + run.warmup).max(1);
    let cpu = (after - before) * 1e6 / requests as f64;
    (run, cpu)
}

struct Run {
    latencies: Vec<Duration>,
    errors: usize,
    warmup: usize,
}

impl Run {
    fn percentiles(&self) -> [f64; 3] {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        [0.50, 0.90, 0.99].map(|p| {
            let index = ((sorted.len().max(1) - 1) as f64 * p).round() as usize;
            sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        })
    }
}

/// `rate` requests/s to `address` over `CONNECTIONS` keep-alive connections, each on a fixed
/// schedule, for 2 s of warm-up and then `duration`. Latency is from writing a request to the end of
/// its response.
async fn fixed_rate(address: SocketAddr, rate: u64, duration: Duration) -> Run {
    let interval = Duration::from_secs_f64(CONNECTIONS as f64 / rate as f64);
    let warmup = Duration::from_secs(2);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let measured_from = start + warmup;
    let end = measured_from + duration;
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let offset = interval.mul_f64(c as f64 / CONNECTIONS as f64);
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(connection);
            let (mut latencies, mut errors, mut warm) = (Vec::new(), 0, 0);
            let mut next = start + offset;
            while next < end {
                tokio::time::sleep_until(next).await;
                next += interval;
                let request = http::Request::get("/").header("host", "api").body(Empty::<Bytes>::new()).unwrap();
                let sent = Instant::now();
                let ok = match sender.send_request(request).await {
                    Ok(response) => response.status() == 200 && response.into_body().collect().await.is_ok(),
                    Err(_) => false,
                };
                let took = sent.elapsed();
                if tokio::time::Instant::now() < measured_from {
                    warm += 1;
                } else if ok {
                    latencies.push(took);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors, warm)
        }));
    }
    let mut run = Run { latencies: Vec::new(), errors: 0, warmup: 0 };
    for task in tasks {
        let (latencies, errors, warm) = task.await.unwrap();
        run.latencies.extend(latencies);
        run.errors += errors;
        run.warmup += warm;
    }
    run
}

/// What the benchmark's clients offer to agree a key with.
#[derive(Clone, Copy)]
enum KeyExchange {
    /// X25519MLKEM768 first, as a Remora sidecar does.
    PostQuantum,
    /// X25519 and P-256 only, as a client without post-quantum support.
    Classical,
}

impl KeyExchange {
    /// Mesh TLS to `address` as `identity`, offering `alpn` and this key exchange.
    async fn connect(
        self,
        identity: &IssuedPem,
        address: SocketAddr,
        alpn: &[u8],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        match self {
            KeyExchange::PostQuantum => identity.connect_post_quantum(address, alpn).await,
            KeyExchange::Classical => identity.connect(address, alpn).await,
        }
    }
}

/// New TLS connections to `address` as `identity`, offering `alpn` and `key_exchange`, from
/// `HANDSHAKE_CLIENTS` concurrent clients for `duration`: (handshakes per second per core of
/// process `pid`, handshakes, failures).
async fn handshakes(
    identity: &IssuedPem,
    address: SocketAddr,
    alpn: &[u8],
    key_exchange: KeyExchange,
    pid: u32,
    duration: Duration,
) -> (f64, u64, u64) {
    let identity =
        Arc::new(IssuedPem { cert: identity.cert.clone(), key: identity.key.clone(), ca: identity.ca.clone() });
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Warm-up.
    let _ = key_exchange.connect(&identity, address, alpn).await;
    let before = cpu_seconds(pid);
    let mut tasks = Vec::new();
    for _ in 0..HANDSHAKE_CLIENTS {
        let (identity, done, failed, stop, alpn) =
            (identity.clone(), done.clone(), failed.clone(), stop.clone(), alpn.to_vec());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match key_exchange.connect(&identity, address, &alpn).await {
                    Ok(stream) => {
                        drop(stream);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let cpu = cpu_seconds(pid) - before;
    let handshakes = done.load(Ordering::Relaxed);
    (handshakes as f64 / cpu.max(1e-9), handshakes, failed.load(Ordering::Relaxed))
}
