//! Control-plane convergence: from a file edit in the GitOps directory to every connected proxy
//! having ACKed the change.
//!
//! Runs the real `remora control` binary (a separate process, so its memory can be read on its
//! own) on a directory holding a listener, a route table and 100 clusters of 100 endpoints each
//! (10,000 endpoints), and connects N simulated proxies to it from this process: each is a Delta-ADS
//! stream built from Envoy's discovery types alone, subscribing to every type and ACKing every
//! response as soon as it arrives. For each N it then edits the route file (an atomic rename, as git
//! does) repeatedly, one edit at a time, and records when each proxy ACKed the new route.
//!
//! Reported per N: per-proxy convergence p50/p99 over all edits, and the time until the last proxy
//! ACKed (p50/p99 over edits). At the largest N it also changes one endpoint and reports the bytes
//! pushed per proxy, and reads the control plane's resident memory.
//!
//!     cargo bench --bench convergence                 # N = 1, 100, 1000
//!     cargo bench --bench convergence -- 1 10         # other N
//!     cargo bench --bench convergence -- kubernetes   # the cluster at scale, below
//!
//! `kubernetes` measures the automatic mesh at a cluster's scale instead: a stand-in API server
//! (`TestApiServer`, in this process) holding 2,000 Services of 10 pods each (20,000 pods, with
//! sidecars, in 20 namespaces), `remora control --kubernetes-mesh` following it. Reported: the time
//! from starting the control plane to a proxy holding every Service's cluster (its first full
//! view), the control plane's resident memory then; with 1,000 proxies connected (in the 20
//! namespaces, so 20 views), the time from one endpoint's change at the API server to each
//! proxy's ACK of it (p50/p99 over 10 changes) and the bytes pushed per proxy for one change.
//!
//!     cargo bench --bench convergence -- kubernetes narrowed  # each namespace `remora.dev/egress: ./*`
//!
//! `narrowed` annotates every namespace so that its proxies are sent its own 100 Services alone (a
//! change is then timed at the proxies of its Service's namespace).
//!
//!     cargo bench --bench convergence -- gateway [N]  # and 1,000 HTTPRoutes
//!
//! `gateway` adds 1,000 HTTPRoutes to that cluster, one on each of 1,000 Services (a header rule
//! to the Service, and a catch-all splitting 90/10 with another Service), and reports the time from
//! starting the control plane to a proxy holding every route's table, and, with N proxies
//! connected, the time from one route's edit at the API server (its split) to each proxy's ACK of
//! the new table.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use remora_control_api::Kind;
use remora_control_plane::testing::{GenericClient, fresh_dir};

const CLUSTERS: usize = 100;
const ENDPOINTS_PER_CLUSTER: usize = 100;

fn main() {
    let gateway = std::env::args().any(|a| a == "gateway");
    let kubernetes = gateway || std::env::args().any(|a| a == "kubernetes");
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if args.is_empty() { vec![1, 100, 1000] } else { args };
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if kubernetes {
        let narrowed = std::env::args().any(|a| a == "narrowed");
        runtime.block_on(cluster_scale(*sizes.iter().max().unwrap_or(&1000), gateway, narrowed));
    } else {
        runtime.block_on(run(sizes));
    }
}

fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
    let _ = setrlimit(Resource::Nofile, raised);
}

fn endpoints_yaml(changed: Option<usize>) -> String {
    let mut text = String::from("resources:\n");
    for c in 0..CLUSTERS {
        text.push_str(&format!(
            "  - {{kind: Cluster, name: c{c}}}\n  - kind: Endpoints\n    cluster: c{c}\n    endpoints:\n"
        ));
        for e in 0..ENDPOINTS_PER_CLUSTER {
            let port = if changed == Some(c * ENDPOINTS_PER_CLUSTER + e) { 9090 } else { 8080 };
            text.push_str(&format!("      - address: \"10.{}.{}.{}:{port}\"\n", c, e / 250, e % 250 + 1));
        }
    }
    text
}

fn routes_yaml(edit: usize) -> String {
    format!(
        "resources:\n  - {{kind: Listener, name: out, address: \"127.0.0.1:15001\", route_tables: [web]}}\n  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: c{}}}]}}]}}\n",
        edit % CLUSTERS
    )
}

struct ControlProcess {
    child: Child,
    url: String,
}

impl ControlProcess {
    fn start(dir: &std::path::Path) -> ControlProcess {
        ControlProcess::start_with(dir, &[])
    }

    fn start_with(dir: &std::path::Path, extra: &[String]) -> ControlProcess {
        // REMORA_CONTROL_WRAP (for example `heaptrack`) runs the control plane under a profiler (the
        // RSS then reported is the wrapper's). It runs in a process group of its own, ended whole.
        let mut command = match std::env::var("REMORA_CONTROL_WRAP") {
            Ok(wrapper) if !wrapper.is_empty() => {
                let mut command = Command::new(wrapper);
                command.arg(env!("CARGO_BIN_EXE_remora"));
                command
            }
            _ => Command::new(env!("CARGO_BIN_EXE_remora")),
        };
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command
            .args(["control", "--listen", "127.0.0.1:0", "--config-dir"])
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let address = loop {
            let line = lines.next().expect("remora control exited").unwrap();
            if line.contains("serving Delta ADS") {
                break line.rsplit("address=").next().unwrap().trim().to_owned();
            }
        };
        // Keep draining its log so it never blocks on a full pipe; pass on its warnings.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("remora control: {line}");
                }
            }
        });
        ControlProcess { child, url: format!("http://{address}") }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// The sum of every series of the metric `name` (all its labels).
    async fn metric_sum(&self, name: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
            .filter_map(|line| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    async fn metric(&self, series: &str) -> f64 {
        let output = self.metrics_text().await;
        output
            .lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    }

    async fn metrics_text(&self) -> String {
        let address = self.url.trim_start_matches("http://");
        tokio::task::spawn_blocking({
            let address = address.to_owned();
            move || {
                use std::io::{Read, Write};
                let mut stream = std::net::TcpStream::connect(address).unwrap();
                stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
                let mut text = String::new();
                stream.read_to_string(&mut text).unwrap();
                text
            }
        })
        .await
        .unwrap()
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        // The whole group: a wrapper's child too.
        let group = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the simulated proxies report to the bench.
struct Shared {
    ready: AtomicUsize,
    /// The kind whose updates are timed.
    timed: Kind,
    /// Set when a proxy ACKs an update of that kind during the current edit.
    acked: Mutex<Vec<Option<Instant>>>,
}

impl Shared {
    fn new(n: usize, timed: Kind) -> Shared {
        Shared { ready: AtomicUsize::new(0), timed, acked: Mutex::new(vec![None; n]) }
    }

    /// Waits (up to `limit`) until every proxy has ACKed an update of the timed kind at or after
    /// `changed` (an ACK from before, a late answer to something earlier, does not count); the
    /// time each took.
    async fn acks_since(&self, changed: Instant, limit: Duration) -> Vec<Duration> {
        self.acks_of_since(|_| true, changed, limit).await
    }

    /// [`Shared::acks_since`], of the proxies `which` picks (by index) alone.
    async fn acks_of_since(&self, which: impl Fn(usize) -> bool, changed: Instant, limit: Duration) -> Vec<Duration> {
        loop {
            let times: Option<Vec<Duration>> = self
                .acked
                .lock()
                .unwrap()
                .iter()
                .enumerate()
                .filter(|(id, _)| which(*id))
                .map(|(_, t)| t.filter(|t| *t >= changed).map(|t| t.saturating_duration_since(changed)))
                .collect();
            if let Some(times) = times {
                return times;
            }
            assert!(changed.elapsed() < limit, "a change did not converge");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// How long a simulated proxy's stream must be quiet, once every kind has answered, for its first
/// view to count as held (the changes timed after all proxies hold theirs must not queue behind
/// the parts of a first view still on their way).
const FIRST_VIEW_QUIET: Duration = Duration::from_millis(250);

async fn proxy(url: String, id: usize, node: String, shared: Arc<Shared>) {
    let types: Vec<(&str, HashMap<String, String>)> =
        Kind::ALL.iter().map(|k| (k.type_url(), HashMap::new())).collect();
    let mut client = GenericClient::connect(&url, &node, &types).await;
    // The first view comes in parts (a kind's resources in responses of bounded size): the proxy
    // holds it once every kind has answered and the stream has then been quiet for a while.
    let (mut answered, mut settled) = (std::collections::HashSet::new(), false);
    loop {
        let all_answered = answered.len() == Kind::ALL.len();
        let wait = if all_answered && !settled { FIRST_VIEW_QUIET } else { Duration::from_secs(600) };
        // A proxy may hear nothing for a while (another namespace's changes are not its own).
        let Some(response) = client.next_within(wait).await else {
            if all_answered && !settled {
                settled = true;
                shared.ready.fetch_add(1, Ordering::SeqCst);
            }
            continue;
        };
        client.ack(&response).await;
        let now = Instant::now();
        if !settled {
            answered.insert(response.type_url.clone());
            continue;
        }
        if response.type_url == shared.timed.type_url() && !response.resources.is_empty() {
            shared.acked.lock().unwrap()[id] = Some(now);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn run(sizes: Vec<usize>) {
    let dir = fresh_dir("remora-convergence");
    std::fs::write(dir.join("endpoints.yaml"), endpoints_yaml(None)).unwrap();
    std::fs::write(dir.join("routes.yaml"), routes_yaml(0)).unwrap();
    let control = ControlProcess::start(&dir);
    let idle_rss = control.rss_kib();
    println!(
        "remora control: {} clusters, {} endpoints; RSS with no proxies {:.1} MiB",
        CLUSTERS,
        CLUSTERS * ENDPOINTS_PER_CLUSTER,
        idle_rss as f64 / 1024.0
    );
    println!(
        "{:>6} {:>6} {:>16} {:>16} {:>18} {:>18}",
        "N", "edits", "proxy p50", "proxy p99", "all ACKed p50", "all ACKed p99"
    );
    let mut edit_number = 0;
    for &n in &sizes {
        let shared = Arc::new(Shared::new(n, Kind::RouteTable));
        let mut tasks = Vec::new();
        for id in 0..n {
            tasks.push(tokio::spawn(proxy(control.url.clone(), id, format!("sim-{id}"), shared.clone())));
        }
        let started = Instant::now();
        while shared.ready.load(Ordering::SeqCst) < n {
            assert!(started.elapsed() < Duration::from_secs(120), "proxies did not all connect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let edits = if n >= 1000 { 10 } else { 20 };
        let mut per_proxy = Vec::new();
        let mut all = Vec::new();
        for _ in 0..edits {
            edit_number += 1;
            shared.acked.lock().unwrap().iter_mut().for_each(|slot| *slot = None);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let staging = dir.join(".routes.yaml.new");
            std::fs::write(&staging, routes_yaml(edit_number)).unwrap();
            let edited = Instant::now();
            std::fs::rename(&staging, dir.join("routes.yaml")).unwrap();
            let times = shared.acks_since(edited, Duration::from_secs(30)).await;
            all.push(*times.iter().max().unwrap());
            per_proxy.extend(times);
        }
        per_proxy.sort();
        all.sort();
        println!(
            "{:>6} {:>6} {:>16} {:>16} {:>18} {:>18}",
            n,
            edits,
            ms(percentile(&per_proxy, 0.5)),
            ms(percentile(&per_proxy, 0.99)),
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99))
        );
        if n == *sizes.iter().max().unwrap() {
            let rss = control.rss_kib();
            let series = "remora_control_pushed_bytes_total{type=\"Endpoints\"}";
            let before = control.metric(series).await;
            std::fs::write(dir.join(".endpoints.yaml.new"), endpoints_yaml(Some(4242))).unwrap();
            std::fs::rename(dir.join(".endpoints.yaml.new"), dir.join("endpoints.yaml")).unwrap();
            let started = Instant::now();
            let mut after = before;
            while after == before && started.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                after = control.metric(series).await;
            }
            // Let every stream's push land before reading the total.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = control.metric(series).await;
            println!(
                "one endpoint changed: {:.0} bytes pushed per proxy (its cluster's {} endpoints), {} proxies",
                (after - before) / n as f64,
                ENDPOINTS_PER_CLUSTER,
                n
            );
            println!("remora control RSS with {n} proxies connected: {:.1} MiB", rss as f64 / 1024.0);
        }
        for task in tasks {
            task.abort();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cluster at scale: see the module documentation.
const SERVICES: usize = 2_000;
const PODS_PER_SERVICE: usize = 10;
const NAMESPACES: usize = 20;

/// Service `s`'s EndpointSlice, its endpoint `changed` (if it is one of them) on another address.
fn scale_slice(s: usize, changed: Option<usize>) -> serde_json::Value {
    let namespace = format!("ns-{}", s % NAMESPACES);
    let endpoints: Vec<serde_json::Value> = (0..PODS_PER_SERVICE)
        .map(|p| {
            let last = if changed == Some(p) { 250 } else { p + 1 };
            serde_json::json!({"addresses": [format!("10.{}.{}.{last}", s / 250, s % 250)], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": format!("svc-{s}-{p}"), "uid": format!("uid-{s}-{p}")}})
        })
        .collect();
    serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": namespace, "name": format!("svc-{s}-1"), "labels": {"kubernetes.io/service-name": format!("svc-{s}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints})
}

/// Gateway API routes at scale: one on each of the first [`ROUTES`] Services.
const ROUTES: usize = 1_000;

/// HTTPRoute `i` on Service `svc-i`: a header rule to it, and a catch-all sending `weight` of 100
/// to it and the rest to `svc-(i+1000)` (in the same namespace).
fn scale_route(i: usize, weight: u32) -> serde_json::Value {
    let namespace = format!("ns-{}", i % NAMESPACES);
    serde_json::json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"namespace": namespace, "name": format!("route-{i}")},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": format!("svc-{i}"), "port": 80}],
                 "rules": [
                     {"matches": [{"headers": [{"name": "x-canary", "value": "on"}]}],
                      "backendRefs": [{"name": format!("svc-{i}"), "port": 80}]},
                     {"backendRefs": [{"name": format!("svc-{i}"), "port": 80, "weight": weight},
                                      {"name": format!("svc-{}", i + ROUTES), "port": 80, "weight": 100 - weight}]}]}})
}

/// Whether a served route table (`Any`) holds an HTTPRoute's rules.
fn made_of_a_route(resource: &remora_control_api::xds::discovery::Resource) -> bool {
    use prost::Message;
    let Some(any) = &resource.resource else { return false };
    remora_control_api::v1::RouteTable::decode(any.value.as_ref())
        .is_ok_and(|t| t.routes.iter().any(|r| r.name.contains('#')))
}

async fn cluster_scale(n: usize, routes: bool, narrowed: bool) {
    use remora_control_plane::testing::{TestApiServer, TestCa};
    use serde_json::json;

    let api = TestApiServer::start(&TestCa::new("cluster.local")).await;
    for ns in 0..NAMESPACES {
        let mut namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{ns}")}});
        if narrowed {
            namespace["metadata"]["annotations"] = json!({"remora.dev/egress": "./*"});
        }
        api.put(namespace);
    }
    for s in 0..SERVICES {
        let namespace = format!("ns-{}", s % NAMESPACES);
        api.put(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": namespace, "name": format!("svc-{s}")},
            "spec": {"clusterIP": format!("10.96.{}.{}", s / 250, s % 250 + 1),
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "appProtocol": "http"}]}}));
        api.put(scale_slice(s, None));
        for p in 0..PODS_PER_SERVICE {
            api.put(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": namespace, "name": format!("svc-{s}-{p}"), "uid": format!("uid-{s}-{p}")},
                "spec": {"serviceAccountName": format!("svc-{s}"),
                         "containers": [{"name": "app", "image": "app"}, {"name": "remora-proxy", "image": "remora"}]}}));
        }
    }
    if routes {
        for i in 0..ROUTES {
            api.put(scale_route(i, 90));
        }
    }
    let dir = fresh_dir("remora-cluster-scale");
    let (api_args, _) = api.args(&dir.join("api"));
    let mesh = dir.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    let mut args = vec!["--kubernetes-mesh".to_owned()];
    args.extend(api_args);
    let started = Instant::now();
    let control = ControlProcess::start_with(&mesh, &args);
    // The first full view: a proxy holding every Service's cluster.
    let types: Vec<(&str, HashMap<String, String>)> = vec![(Kind::Cluster.type_url(), HashMap::new())];
    // (With `narrowed`, a node of no namespace sees every Service.)
    let first = if narrowed { "first-0" } else { "first-0.ns-0" };
    let mut client = GenericClient::connect(&control.url, first, &types).await;
    let mut clusters = 0;
    while clusters < SERVICES {
        let response = client.next().await;
        clusters += response.resources.len();
        client.ack(&response).await;
    }
    let first_view = started.elapsed();
    // With routes: a proxy holding every route's table.
    let routed = if routes {
        let tables: Vec<(&str, HashMap<String, String>)> = vec![(Kind::RouteTable.type_url(), HashMap::new())];
        let mut client = GenericClient::connect(&control.url, "routes-0.ns-0", &tables).await;
        let mut held: HashMap<String, bool> = HashMap::new();
        while held.values().filter(|routed| **routed).count() < ROUTES {
            let response = client.next().await;
            for resource in &response.resources {
                held.insert(resource.name.clone(), made_of_a_route(resource));
            }
            client.ack(&response).await;
        }
        Some(started.elapsed())
    } else {
        None
    };
    let rss = control.rss_kib();
    let view_bytes = control.metric_sum("remora_control_pushed_bytes_total").await;
    println!(
        "remora control --kubernetes-mesh: {SERVICES} Services of {PODS_PER_SERVICE} pods ({} pods, {NAMESPACES} namespaces): first full view {} ({:.1} MB of clusters), RSS {:.1} MiB",
        SERVICES * PODS_PER_SERVICE,
        ms(first_view),
        view_bytes / 1e6,
        rss as f64 / 1024.0
    );
    if let Some(routed) = routed {
        println!("with {ROUTES} HTTPRoutes: every route's table held {} after the control plane started", ms(routed));
    }
    drop(client);
    // A whole view (every type), as each proxy below is first sent.
    let before = control.metric_sum("remora_control_pushed_bytes_total").await;
    let all: Vec<(&str, HashMap<String, String>)> = Kind::ALL.iter().map(|k| (k.type_url(), HashMap::new())).collect();
    let mut whole = GenericClient::connect(&control.url, "whole-0.ns-0", &all).await;
    // Read whole (responses are made as the stream takes them).
    while let Some(response) = whole.next_within(FIRST_VIEW_QUIET).await {
        whole.ack(&response).await;
    }
    drop(whole);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let whole_bytes = control.metric_sum("remora_control_pushed_bytes_total").await - before;
    println!("a proxy's first view, every type: {:.1} MB", whole_bytes / 1e6);

    // Proxies connect 50 at a time: each first view is every Service, and this process (which
    // decodes them all) must not be the bottleneck that times them out.
    let timed = if routes { Kind::RouteTable } else { Kind::Endpoints };
    let shared = Arc::new(Shared::new(n, timed));
    let mut tasks = Vec::new();
    let connecting = Instant::now();
    for id in 0..n {
        let node = format!("sim-{id}.ns-{}", id % NAMESPACES);
        tasks.push(tokio::spawn(proxy(control.url.clone(), id, node, shared.clone())));
        if (id + 1) % 50 == 0 || id + 1 == n {
            while shared.ready.load(Ordering::SeqCst) < id + 1 {
                assert!(connecting.elapsed() < Duration::from_secs(600), "proxies did not all connect");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let connected = connecting.elapsed();
    let series = format!("remora_control_pushed_bytes_total{{type=\"{}\"}}", timed.as_str());
    let series = series.as_str();
    let (mut per_proxy, mut all, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    for change in 0..10 {
        shared.acked.lock().unwrap().iter_mut().for_each(|slot| *slot = None);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = control.metric(series).await;
        let service = change * 97 % if routes { ROUTES } else { SERVICES };
        let changed = Instant::now();
        if routes {
            api.put(scale_route(service, 80));
        } else {
            api.put(scale_slice(service, Some(change % PODS_PER_SERVICE)));
        }
        // Narrowed, only the proxies of the Service's namespace see it.
        let sees = |id: usize| !narrowed || id % NAMESPACES == service % NAMESPACES;
        let times = shared.acks_of_since(sees, changed, Duration::from_secs(60)).await;
        all.push(*times.iter().max().unwrap());
        let receivers = times.len();
        per_proxy.extend(times);
        tokio::time::sleep(Duration::from_millis(300)).await;
        bytes.push((control.metric(series).await - before) / receivers as f64);
        // The next change puts it back.
        if routes {
            api.put(scale_route(service, 90));
        } else {
            api.put(scale_slice(service, None));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    per_proxy.sort();
    all.sort();
    let what = if routes { "one HTTPRoute edited" } else { "one endpoint changed" };
    let whose = if routes {
        "its Service's route table".to_owned()
    } else {
        format!("its Service's {PODS_PER_SERVICE} endpoints")
    };
    println!(
        "{n} proxies connected in {}; {what} at the API server, 10 times: per proxy p50 {} p99 {}, all ACKed p50 {} p99 {}; {:.0} bytes pushed per proxy per change ({whose}); RSS {:.1} MiB",
        ms(connected),
        ms(percentile(&per_proxy, 0.5)),
        ms(percentile(&per_proxy, 0.99)),
        ms(percentile(&all, 0.5)),
        ms(percentile(&all, 0.99)),
        bytes.iter().sum::<f64>() / bytes.len() as f64,
        control.rss_kib() as f64 / 1024.0
    );
    for task in tasks {
        task.abort();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
