//! `remora demo`: a local mesh in one process — a control plane with its CA, a proxy it configures,
//! a second sidecar reached over mTLS, four samples.
//!
//! Starts three sample HTTP services on free ports, writes the mesh's resources into a temporary
//! directory, and starts `remora control` on that directory and a proxy that takes its configuration
//! from it (Delta ADS), shaped like the built-in defaults (a transparent, auto-detecting outbound
//! listener with a pass-through cluster) plus a route table balancing across the samples, with a
//! retry policy on the route and outlier detection on the cluster. It then runs three acts, printing
//! what the client saw in each (status codes, latency p50/p99, which sample served how many):
//!
//! 1. a burst of traffic through the proxy;
//! 2. a failure: sample-c starts answering 503 to everything, and a second burst shows the client
//!    unaffected: each failure retried on a healthy sample, and sample-c ejected after three in a
//!    row (read back from the proxy's metrics);
//! 3. a live change: with traffic still flowing, the route file is edited as a GitOps commit would,
//!    and the demo prints how long the proxy took to serve the new route and that no request failed;
//! 4. mutual TLS: the control plane also runs the CA, both the demo proxy and a second sidecar (in
//!    front of an `orders` sample) get their SPIFFE identities from it, and requests for
//!    `orders.demo` cross from one sidecar to the other inside mTLS, the orders app answering with
//!    the caller's identity as the inbound sidecar proved it.
//!
//! It keeps serving until Ctrl-C, which drains the proxy and exits.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use remora_control_plane::plane::{CaConfig, CaRoot, ControlConfig, ControlPlane};
use tokio::net::{TcpListener, TcpStream};

use remora_proxy::app::{Proxy, StartOptions};
use remora_proxy::bootstrap::ConfigSource;

/// What the demo binds.
#[derive(Clone, Debug)]
pub(crate) struct DemoOptions {
    /// The proxy's outbound listener (default 127.0.0.1:15001, as a sidecar's).
    pub listen: SocketAddr,
    /// The admin server (default 127.0.0.1:15000).
    pub admin: SocketAddr,
    /// The control plane (default 127.0.0.1:15010).
    pub control: SocketAddr,
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
            control: SocketAddr::from(([127, 0, 0, 1], 15010)),
            requests: 200,
            connections: 8,
        }
    }
}

/// The proxy's own file: bootstrap settings only (its identity from the control plane's CA, with
/// the token in `token_file`); every resource comes from the control plane.
pub(crate) fn proxy_config(
    options: &DemoOptions,
    control_plane: SocketAddr,
    ca_dir: &Path,
    token_file: &Path,
) -> String {
    format!(
        "# remora demo: the proxy's bootstrap; its resources come from the control plane, over TLS.\n\
         bootstrap:\n  node_id: demo\n  admin_address: {admin}\n  workers: 1\n  drain_time: 2s\n  \
         control_plane: https://{control_plane}\n  control_plane_ca_file: \"{root}\"\n  \
         initial_fetch_timeout: 10s\n  \
         identity: {{spiffe_id: \"{CLIENT_ID}\", token_file: \"{token}\"}}\n",
        admin = options.admin,
        root = ca_dir.join("ca.crt").display(),
        token = token_file.display(),
    )
}

/// The demo proxy's identity.
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
/// The orders sidecar's identity.
const ORDERS_ID: &str = "spiffe://cluster.local/ns/demo/sa/orders";

/// The CA's bootstrap tokens: one per sidecar, each entitled to its own identity only.
fn tokens() -> String {
    // Tokens are secrets: from the system's secure random source.
    let secure = rustls::crypto::ring::default_provider().secure_random;
    let token = || {
        let mut bytes = [0_u8; 16];
        if secure.fill(&mut bytes).is_err() {
            bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
        }
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    format!("{} {CLIENT_ID}\n{} {ORDERS_ID}\n", token(), token())
}

/// The orders sidecar's config: an inbound listener that terminates mTLS and lets only the demo
/// proxy's identity in (strict: no plaintext), in front of the orders sample.
fn orders_sidecar_config(control_plane: SocketAddr, ca_dir: &Path, token_file: &Path, orders: SocketAddr) -> String {
    format!(
        "# remora demo: the sidecar in front of the orders sample.\n\
         bootstrap:\n  node_id: orders\n  admin_address: 127.0.0.1:0\n  workers: 1\n  drain_time: 1s\n  \
         control_plane_ca_file: \"{root}\"\n  \
         identity: {{spiffe_id: \"{ORDERS_ID}\", token_file: \"{token}\", ca_address: \"https://{control_plane}\"}}\n\
         resources:\n\
         \x20 - {{kind: Listener, name: inbound, address: \"127.0.0.1:0\", direction: inbound, default_cluster: orders-app}}\n\
         \x20 - {{kind: Cluster, name: orders-app, protocol: http1}}\n\
         \x20 - {{kind: Endpoints, cluster: orders-app, endpoints: [{{address: \"{orders}\"}}]}}\n\
         \x20 - {{kind: AuthorizationPolicy, name: orders, listener: inbound, allow: [\"{CLIENT_ID}\"]}}\n",
        token = token_file.display(),
        root = ca_dir.join("ca.crt").display(),
    )
}

/// What the control plane adds once the orders sidecar listens at `sidecar`: a mesh cluster for it
/// and a route table for `orders.demo`.
fn orders_routes(sidecar: SocketAddr) -> String {
    format!(
        r#"resources:
  - kind: Cluster
    name: orders
    tls: mesh
    peer_identities: ["{ORDERS_ID}"]
  - kind: Endpoints
    cluster: orders
    endpoints: [{{address: "{sidecar}", identity: "{ORDERS_ID}"}}]
  - kind: RouteTable
    name: orders
    destinations: [orders.demo]
    routes: [{{name: all, backends: [{{cluster: orders}}]}}]
"#
    )
}

/// The control plane's directory: the built-in defaults' outbound listener and pass-through
/// cluster, the samples as clusters (`samples`, with outlier detection, holds all three), and (in
/// `routes.yaml`) the route table, sending everything to `samples` with retries.
pub(crate) fn mesh_files(options: &DemoOptions, samples: [SocketAddr; 3]) -> [(&'static str, String); 2] {
    let [sample_a, sample_b, sample_c] = samples;
    let mesh = format!(
        r#"# remora demo: what the control plane serves. Edit these files while the demo runs.
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
    # Three 5xx in a row take a sample out of rotation for 30 s (and longer each time it recurs).
    outlier_detection: {{consecutive_5xx: 3, interval: 1s, base_ejection_time: 30s, max_ejection_percent: 50}}
  - kind: Endpoints
    cluster: samples
    endpoints:
      - address: {sample_a}
      - address: {sample_b}
      - address: {sample_c}
  - kind: Cluster
    name: sample-b
  - kind: Endpoints
    cluster: sample-b
    endpoints:
      - address: {sample_b}
"#,
        listen = options.listen,
    );
    [("mesh.yaml", mesh), ("routes.yaml", routes("samples"))]
}

/// The demo's route table, sending everything to `cluster`; a 5xx or a failed connect is retried
/// (on another endpoint) up to twice.
pub(crate) fn routes(cluster: &str) -> String {
    format!(
        r#"resources:
  - kind: RouteTable
    name: demo
    routes:
      - name: everything
        match: {{path: {{prefix: /}}}}
        backends: [{{cluster: {cluster}}}]
        retry: {{attempts: 2, retry_on: [5xx, connect-failure]}}
"#
    )
}

/// Runs the demo until Ctrl-C.
pub(crate) fn run(options: DemoOptions) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the demo runtime")?;
    let dir = std::env::temp_dir().join(format!("remora-demo-{}", std::process::id()));
    let result = runtime.block_on(demo(options, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn demo(options: DemoOptions, dir: &Path) -> anyhow::Result<()> {
    // Listen for Ctrl-C before telling anyone to press it.
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).context("listen for Ctrl-C")?;
    let healthy = Arc::new(AtomicBool::new(false));
    let failing = Arc::new(AtomicBool::new(false));
    let sample_a = start_sample("sample-a", healthy.clone()).await?;
    let sample_b = start_sample("sample-b", healthy).await?;
    let sample_c = start_sample("sample-c", failing.clone()).await?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for (name, text) in mesh_files(&options, [sample_a, sample_b, sample_c]) {
        std::fs::write(dir.join(name), text).with_context(|| format!("write {name}"))?;
    }
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir).with_context(|| format!("create {}", ca_dir.display()))?;
    let tokens = tokens();
    std::fs::write(ca_dir.join("tokens"), &tokens).context("write the CA's tokens")?;
    let token_files: Vec<PathBuf> = tokens
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let path = ca_dir.join(format!("token-{i}"));
            std::fs::write(&path, line.split_whitespace().next().unwrap_or_default()).map(|()| path)
        })
        .collect::<Result<_, _>>()
        .context("write the sidecars' tokens")?;
    let control = ControlPlane::start(ControlConfig {
        listen: options.control,
        config_dir: Some(dir.to_path_buf()),
        ca: Some(CaConfig {
            root: CaRoot::Directory(ca_dir.clone()),
            trust_domain: "cluster.local".into(),
            tokens: Some(ca_dir.join("tokens")),
            token_audience: None,
            // Both sidecars have CA identities, so the control plane serves no one else.
            authenticate_xds: true,
            extra_roots: None,
            max_ttl: Duration::from_secs(24 * 3600),
            tls_names: vec!["127.0.0.1".into(), "localhost".into()],
        }),
        ..ControlConfig::default()
    })
    .await
    .context("start the demo control plane (is another Remora using its port? see --control)")?;
    let orders = start_sample("orders", Arc::new(AtomicBool::new(false))).await?;
    let orders_source = ConfigSource::Text {
        origin: "demo orders sidecar".into(),
        text: orders_sidecar_config(control.address(), &ca_dir, &token_files[1], orders),
    };
    let orders_sidecar = Proxy::start(orders_source).context("start the orders sidecar")?;
    let orders_inbound = orders_sidecar.listener_address("inbound").context("the orders sidecar has no listener")?;
    std::fs::write(dir.join("orders.yaml"), orders_routes(orders_inbound)).context("write orders.yaml")?;
    let source = ConfigSource::Text {
        origin: "demo bootstrap".into(),
        text: proxy_config(&options, control.address(), &ca_dir, &token_files[0]),
    };
    let proxy = Proxy::start_with(source, StartOptions::default())
        .context("start the demo proxy (is another Remora using its ports? see --listen/--admin)")?;
    let started = Instant::now();
    while !proxy.is_ready() {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(10), "the proxy got no configuration in 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let listen = proxy.listener_address("outbound").context("the demo proxy has no outbound listener")?;
    let admin = proxy.admin_address();

    println!(
        "Remora demo: a control plane with its CA, one Remora proxy it configures, a second sidecar, four sample services.\n"
    );
    println!("  sample-a   http://{sample_a}");
    println!("  sample-b   http://{sample_b}");
    println!("  sample-c   http://{sample_c}");
    println!("  orders     http://{orders}, behind its own sidecar at {orders_inbound} (mTLS only)");
    println!(
        "  control    {} (TLS) serving {} and signing certificates (root {})",
        control.address(),
        dir.display(),
        ca_dir.join("ca.crt").display()
    );
    println!("  proxy      outbound listener {listen} (transparent, protocol auto), admin {admin}");
    println!("             configured over Delta ADS, ready in {:.0} ms\n", started.elapsed().as_secs_f64() * 1e3);

    let burst = burst(listen, options.requests, options.connections).await;
    println!("Sent {} requests through the proxy over {} connections:", options.requests, options.connections);
    report(&burst);

    failure(&proxy, listen, &failing, &options).await;

    live_change(&proxy, listen, dir).await?;

    mutual_tls(&proxy, &orders_sidecar, listen).await;

    println!("\nWhere to look:");
    println!(
        "  metrics    http://{admin}/metrics   (Prometheus; the Grafana dashboard is deploy/grafana/remora-golden-metrics.json)"
    );
    match &proxy.bootstrap().tracing {
        Some(tracing) => println!(
            "  traces     exporting to {} over OTLP/{}, {:.0}% of new traces sampled",
            tracing.endpoint,
            if tracing.http { "HTTP" } else { "gRPC" },
            tracing.sampling_ratio * 100.0
        ),
        None => println!(
            "  traces     off; run the demo with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 to send them to a local collector"
        ),
    }
    println!("  logs       curl -X POST 'http://{admin}/logging?level=debug' to log why requests fail");
    println!("\nEverything keeps running. Try:");
    println!("  curl -i http://{listen}/");
    println!("  curl http://{admin}/config_dump      (versions, ACK/NACK per type)");
    println!("  curl http://{admin}/clusters         (endpoints: health, ejections, load)");
    println!("  curl -s http://{admin}/metrics | grep -E 'route_requests|retries|ejections'");
    println!(
        "  curl --cacert {} https://{}/metrics    (the control plane's)",
        ca_dir.join("ca.crt").display(),
        control.address()
    );
    println!("  edit {}/routes.yaml and curl again", dir.display());
    println!(
        "  curl -i -H 'host: orders.demo' http://{listen}/   (across mTLS; x-caller is who the orders sidecar saw)"
    );
    println!("Ctrl-C drains the proxy and stops the demo.");

    interrupt.recv().await;
    println!("\ndraining...");
    let clean = proxy.drain().await;
    drop(orders_sidecar);
    drop(control);
    println!("{}", if clean { "drained; bye" } else { "drain time passed; bye" });
    Ok(())
}

fn report(burst: &Burst) {
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
}

/// Makes sample-c fail every request, sends a burst, and reports what the client saw and what the
/// proxy did about it (from its metrics).
async fn failure(proxy: &Proxy, listen: SocketAddr, failing: &AtomicBool, options: &DemoOptions) {
    println!("\nA failure: sample-c now answers every request with 503.");
    println!("The route retries a 5xx on another sample; the cluster ejects a sample after 3 errors in a row.");
    failing.store(true, Ordering::Relaxed);
    let burst = burst(listen, options.requests, options.connections).await;
    println!("Sent {} more requests:", options.requests);
    report(&burst);
    let metrics = proxy.metrics();
    let retries = metric(&metrics, r#"remora_upstream_retries_total{cluster="samples"}"#);
    let failed = metric(&metrics, r#"remora_upstream_responses_total{cluster="samples",status_class="5xx"}"#);
    let ejected = metric(&metrics, r#"remora_outlier_ejections_total{cluster="samples",reason="consecutive_5xx"}"#);
    println!(
        "  behind it  sample-c answered 503 {failed} times, each retried on a healthy sample ({retries} retries); \
         ejected {ejected} time(s), for 30 s, after 3 errors in a row"
    );
}

/// The value of the metric series `series` in `text`, or 0.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .map_or(0, |value| value as u64)
}

/// Edits `routes.yaml` (everything to sample-b) while a client sends requests, and reports when the
/// new route served and what the client saw.
async fn live_change(proxy: &Proxy, listen: SocketAddr, dir: &Path) -> anyhow::Result<()> {
    println!("\nLive change: routes.yaml now sends everything to sample-b, written while traffic flows...");
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(steady(listen, stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let staging: PathBuf = dir.join(".routes.yaml.new");
    std::fs::write(&staging, routes("sample-b")).context("write routes.yaml")?;
    let edited = Instant::now();
    std::fs::rename(&staging, dir.join("routes.yaml")).context("replace routes.yaml")?;
    let mut applied = None;
    while edited.elapsed() < Duration::from_secs(5) {
        if applied.is_none() && routes_to(proxy, "sample-b") {
            applied = Some(edited.elapsed());
        }
        if applied.is_some_and(|a| edited.elapsed() > a + Duration::from_millis(300)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let seen = traffic.await.unwrap_or_default();
    match applied {
        Some(took) => println!("  applied    {:.0} ms after the edit (the proxy ACKed it)", took.as_secs_f64() * 1e3),
        None => println!("  not applied within 5 s: see the control plane's log"),
    }
    println!("  during the change, one client:");
    report(&seen);
    let after = burst(listen, 20, 1).await;
    println!("  after it:");
    report(&after);
    Ok(())
}

/// Sends requests for `orders.demo` through the demo proxy, which takes them across mTLS to the
/// orders sidecar; reports what came back and who each side proved to be.
async fn mutual_tls(proxy: &Proxy, orders_sidecar: &Proxy, listen: SocketAddr) {
    println!(
        "\nMutual TLS: requests for orders.demo cross to the orders sidecar inside mTLS (TLS 1.3, SPIFFE IDs from the CA)."
    );
    let started = Instant::now();
    while !routes_to(proxy, "orders") && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut out = Burst::default();
    let mut callers = BTreeMap::new();
    for _ in 0..20 {
        match orders_request(listen).await {
            Ok((status, caller, latency)) => {
                *out.statuses.entry(status).or_default() += 1;
                *out.served_by.entry("orders".into()).or_default() += usize::from(status == 200);
                *callers.entry(caller).or_insert(0_usize) += 1;
                out.latencies.push(latency);
            }
            Err(_) => out.failures += 1,
        }
    }
    out.latencies.sort();
    println!("Sent 20 requests:");
    report(&out);
    for (caller, n) in &callers {
        println!("  caller     the orders app was told {caller} on {n} request(s)");
    }
    let identity = |p: &Proxy| {
        let metrics = p.metrics();
        let handshakes = metric(&metrics, r#"remora_tls_handshakes_total{direction="inbound",result="ok"}"#)
            + metric(&metrics, r#"remora_tls_handshakes_total{direction="outbound",result="ok"}"#);
        let expiry = metric(&metrics, "remora_identity_certificate_expiry_seconds");
        let left = expiry.saturating_sub(std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_secs()));
        (handshakes, left / 3600)
    };
    let (client_handshakes, client_hours) = identity(proxy);
    let (orders_handshakes, _) = identity(orders_sidecar);
    println!(
        "  identities {CLIENT_ID} -> {ORDERS_ID}: {client_handshakes} handshake(s) out, {orders_handshakes} in \
         (HTTP/1.1 from the app rides one HTTP/2 connection); certificates valid {client_hours} h more, renewed at half-life"
    );
}

/// One request for `orders.demo`: its status, the caller identity the orders app echoed, its latency.
async fn orders_request(listen: SocketAddr) -> anyhow::Result<(u16, String, Duration)> {
    let stream = TcpStream::connect(listen).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get("/").header("host", "orders.demo").body(Empty::<Bytes>::new())?;
    let started = Instant::now();
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let caller = response.headers().get("x-caller").and_then(|v| v.to_str().ok()).unwrap_or("(no one)").to_owned();
    response.into_body().collect().await?;
    Ok((status, caller, started.elapsed()))
}

/// Whether a serving route table sends to `cluster`.
fn routes_to(proxy: &Proxy, cluster: &str) -> bool {
    proxy.snapshot().resources.iter().filter(|r| r.kind() == remora_control_api::Kind::RouteTable).any(|r| {
        match r.decode() {
            Ok(remora_control_api::Resource::RouteTable(t)) => {
                t.routes.iter().flat_map(|r| &r.backends).any(|b| b.cluster == cluster)
            }
            _ => false,
        }
    })
}

/// One keep-alive client sending requests until `stop`.
async fn steady(listen: SocketAddr, stop: Arc<AtomicBool>) -> Burst {
    let mut out = Burst::default();
    while !stop.load(Ordering::Relaxed) {
        if one_connection(listen, 20, &mut out).await.is_err() {
            out.failures += 1;
        }
    }
    out.latencies.sort();
    out
}

/// Starts a sample HTTP/1.1 service answering `hello from {name}` with an `x-served-by` header, or,
/// while `failing` is set, 503.
async fn start_sample(name: &'static str, failing: Arc<AtomicBool>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("bind a sample service")?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let failing = failing.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let failing = failing.load(Ordering::Relaxed);
                    let caller = request.headers().get("x-remora-client-identity").cloned();
                    async move {
                        let mut response = if failing {
                            let mut response = Response::new(Full::new(Bytes::from(format!("{name} is failing\n"))));
                            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            response
                        } else {
                            Response::new(Full::new(Bytes::from(format!("hello from {name}\n"))))
                        };
                        response.headers_mut().insert("x-served-by", http::HeaderValue::from_static(name));
                        if let Some(caller) = caller {
                            response.headers_mut().insert("x-caller", caller);
                        }
                        Ok::<_, Infallible>(response)
                    }
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
        let files = mesh_files(&options, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"].map(|a| a.parse().unwrap()));
        let mut resources = Vec::new();
        for (name, text) in &files {
            resources.extend(remora_control_api::config::parse(text, name).unwrap().resources);
        }
        remora_control_api::validate::validate(&resources).unwrap();
        assert_eq!(resources.len(), 7);
        let text = proxy_config(&options, options.control, Path::new("/tmp/ca"), Path::new("/tmp/token"));
        let loaded = remora_proxy::bootstrap::load(&ConfigSource::Text { origin: "demo".into(), text }).unwrap();
        assert_eq!(loaded.bootstrap.control_plane, "https://127.0.0.1:15010");
        let orders = orders_sidecar_config(
            options.control,
            Path::new("/tmp/ca"),
            Path::new("/tmp/token"),
            "127.0.0.1:4".parse().unwrap(),
        );
        let loaded =
            remora_proxy::bootstrap::load(&ConfigSource::Text { origin: "orders".into(), text: orders }).unwrap();
        assert_eq!(loaded.resources.len(), 4);
        let routes = remora_control_api::config::parse(&orders_routes("127.0.0.1:5".parse().unwrap()), "o").unwrap();
        assert_eq!(routes.resources.len(), 3);
    }

    #[test]
    fn percentiles_pick_from_sorted_samples() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&samples, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
