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
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if args.is_empty() { vec![1, 100, 1000] } else { args };
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run(sizes));
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_remora"))
            .args(["control", "--listen", "127.0.0.1:0", "--config-dir"])
            .arg(dir)
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
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        ControlProcess { child, url: format!("http://{address}") }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    async fn metric(&self, series: &str) -> f64 {
        let address = self.url.trim_start_matches("http://");
        let output = tokio::task::spawn_blocking({
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
        .unwrap();
        output
            .lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the simulated proxies report to the bench.
#[derive(Default)]
struct Shared {
    ready: AtomicUsize,
    /// Set when a proxy ACKs a route-table update during the current edit.
    acked: Mutex<Vec<Option<Instant>>>,
}

async fn proxy(url: String, id: usize, shared: Arc<Shared>) {
    let types: Vec<(&str, HashMap<String, String>)> =
        Kind::ALL.iter().map(|k| (k.type_url(), HashMap::new())).collect();
    let mut client = GenericClient::connect(&url, &format!("sim-{id}"), &types).await;
    let mut first = 0;
    loop {
        let response = client.next().await;
        client.ack(&response).await;
        let now = Instant::now();
        if first < Kind::ALL.len() {
            first += 1;
            if first == Kind::ALL.len() {
                shared.ready.fetch_add(1, Ordering::SeqCst);
            }
            continue;
        }
        if response.type_url == Kind::RouteTable.type_url() && !response.resources.is_empty() {
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
        let shared = Arc::new(Shared { acked: Mutex::new(vec![None; n]), ..Shared::default() });
        let mut tasks = Vec::new();
        for id in 0..n {
            tasks.push(tokio::spawn(proxy(control.url.clone(), id, shared.clone())));
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
            loop {
                // An ACK from before the edit (a late answer to something earlier) does not count.
                let done = shared.acked.lock().unwrap().iter().all(|t| t.is_some_and(|t| t >= edited));
                if done {
                    break;
                }
                assert!(edited.elapsed() < Duration::from_secs(30), "an edit did not converge");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let times: Vec<Duration> =
                shared.acked.lock().unwrap().iter().map(|t| t.unwrap().saturating_duration_since(edited)).collect();
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
