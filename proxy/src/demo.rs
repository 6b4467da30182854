//! `remora demo`: a local mesh in one process, on built-in defaults.
//!
//! Starts two sample HTTP services on free ports, a proxy in front of them shaped like the built-in
//! defaults (a transparent, auto-detecting outbound listener with a pass-through cluster), plus a
//! catch-all route table that balances across the two samples. It sends a burst of requests through
//! the proxy, prints what happened (status codes, latency p50/p99, which sample served how many), and
//! keeps serving until Ctrl-C, which drains the proxy and exits.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::app::Proxy;
use crate::bootstrap::ConfigSource;

/// What the demo binds.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// The proxy's outbound listener (default 127.0.0.1:15001, as a sidecar's).
    pub listen: SocketAddr,
    /// The admin server (default 127.0.0.1:15000).
    pub admin: SocketAddr,
    /// Requests in the opening burst.
    pub requests: usize,
    /// Connections the burst spreads over.
    pub connections: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 15001)),
            admin: SocketAddr::from(([127, 0, 0, 1], 15000)),
            requests: 200,
            connections: 8,
        }
    }
}

/// The demo's config: the built-in defaults' outbound listener and pass-through cluster, plus the
/// two samples behind a catch-all route table.
pub fn config(options: &DemoOptions, sample_a: SocketAddr, sample_b: SocketAddr) -> String {
    format!(
        r#"# remora demo: built-in defaults plus two sample services.
bootstrap:
  node_id: demo
  admin_address: {admin}
  workers: 1
  drain_time: 2s
resources:
  - kind: Listener
    name: outbound
    address: {listen}
    direction: outbound
    protocol: auto
    transparent: true
    default_cluster: passthrough
  - kind: Cluster
    name: passthrough
    original_destination: true
  - kind: Cluster
    name: samples
  - kind: Endpoints
    cluster: samples
    endpoints:
      - address: {sample_a}
      - address: {sample_b}
  - kind: RouteTable
    name: demo
    routes:
      - name: everything
        match: {{path: {{prefix: /}}}}
        backends: [{{cluster: samples}}]
"#,
        admin = options.admin,
        listen = options.listen,
    )
}

/// Runs the demo until Ctrl-C.
pub fn run(options: DemoOptions) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the demo runtime")?;
    runtime.block_on(async move {
        // Listen for Ctrl-C before telling anyone to press it.
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).context("listen for Ctrl-C")?;
        let sample_a = start_sample("sample-a").await?;
        let sample_b = start_sample("sample-b").await?;
        let source = ConfigSource::Text { origin: "demo config".into(), text: config(&options, sample_a, sample_b) };
        let proxy = Proxy::start(source)
            .context("start the demo proxy (is another Remora using its ports? see --listen/--admin)")?;
        let listen = proxy.listener_address("outbound").context("the demo proxy has no outbound listener")?;
        let admin = proxy.admin_address();

        println!("Remora demo: two sample services behind one Remora proxy, on built-in defaults.\n");
        println!("  sample-a   http://{sample_a}");
        println!("  sample-b   http://{sample_b}");
        println!("  proxy      outbound listener {listen} (transparent, protocol auto), admin {admin}\n");

        let burst = burst(listen, options.requests, options.connections).await;
        println!("Sent {} requests through the proxy over {} connections:", options.requests, options.connections);
        let statuses: Vec<String> = burst.statuses.iter().map(|(s, n)| format!("{s} x {n}")).collect();
        println!("  status     {}", statuses.join("   "));
        println!(
            "  latency    p50 {:.2} ms   p99 {:.2} ms",
            percentile(&burst.latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&burst.latencies, 0.99).as_secs_f64() * 1e3
        );
        let served: Vec<String> = burst.served_by.iter().map(|(s, n)| format!("{s} {n}")).collect();
        println!("  served by  {}", served.join("   "));
        if burst.failures > 0 {
            println!("  failures   {} (connection errors)", burst.failures);
        }
        println!("\nThe proxy keeps running. Try:");
        println!("  curl -i http://{listen}/");
        println!("  curl http://{admin}/metrics");
        println!("  curl http://{admin}/config_dump");
        println!("Ctrl-C drains the proxy and stops the demo.");

        interrupt.recv().await;
        println!("\ndraining...");
        let clean = proxy.drain().await;
        println!("{}", if clean { "drained; bye" } else { "drain time passed; bye" });
        Ok(())
    })
}

/// Starts a sample HTTP/1.1 service answering `hello from {name}` with an `x-served-by` header.
async fn start_sample(name: &'static str) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("bind a sample service")?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let service = service_fn(move |_request| async move {
                    let mut response = Response::new(Full::new(Bytes::from(format!("hello from {name}\n"))));
                    response.headers_mut().insert("x-served-by", http::HeaderValue::from_static(name));
                    Ok::<_, Infallible>(response)
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(address)
}

#[derive(Default)]
struct Burst {
    statuses: BTreeMap<u16, usize>,
    served_by: BTreeMap<String, usize>,
    latencies: Vec<Duration>,
    failures: usize,
}

/// Sends `requests` GETs through `proxy`, spread over `connections` keep-alive connections.
async fn burst(proxy: SocketAddr, requests: usize, connections: usize) -> Burst {
    let connections = connections.max(1);
    let results = Arc::new(std::sync::Mutex::new(Burst::default()));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let count = requests / connections + usize::from(c < requests % connections);
        let results = results.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Burst::default();
            match one_connection(proxy, count, &mut local).await {
                Ok(()) => {}
                Err(_) => local.failures += count.saturating_sub(local.latencies.len()),
            }
            if let Ok(mut all) = results.lock() {
                for (status, n) in local.statuses {
                    *all.statuses.entry(status).or_default() += n;
                }
                for (server, n) in local.served_by {
                    *all.served_by.entry(server).or_default() += n;
                }
                all.latencies.extend(local.latencies);
                all.failures += local.failures;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let mut all = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
    all.latencies.sort();
    all
}

async fn one_connection(proxy: SocketAddr, count: usize, out: &mut Burst) -> anyhow::Result<()> {
    let stream = TcpStream::connect(proxy).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    for _ in 0..count {
        let request = Request::get("/").header("host", "demo.local").body(Empty::<Bytes>::new())?;
        let started = Instant::now();
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let server = response
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(the proxy itself)")
            .to_owned();
        response.into_body().collect().await?;
        out.latencies.push(started.elapsed());
        *out.statuses.entry(status).or_default() += 1;
        *out.served_by.entry(server).or_default() += 1;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_demo_config_is_valid() {
        let options = DemoOptions::default();
        let text = config(&options, "127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        let loaded = crate::bootstrap::load(&ConfigSource::Text { origin: "demo".into(), text }).unwrap();
        assert_eq!(loaded.resources.len(), 5);
    }

    #[test]
    fn percentiles_pick_from_sorted_samples() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&samples, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
