//! Traffic-policy harness: what the balancers and retries buy against a bad endpoint, and what the
//! policies cost.
//!
//! `cargo bench --bench policy` runs, in this process, scripted upstreams on loopback and a proxy
//! with one worker thread, and drives HTTP/1.1 through it with `POLICY_CONNECTIONS` (default 16)
//! keep-alive connections for `POLICY_SECONDS` (default 5) per run:
//!
//! 1. **slow**: three endpoints, one answering in 50 ms; round_robin, least_request and ewma, no
//!    retries;
//! 2. **failing**: three endpoints, one failing 10% of its requests with 503; the same three
//!    balancers, with a retry policy (two retries on 5xx);
//! 3. **cost**: one healthy endpoint, every policy off, then every policy on (ewma with outlier
//!    detection by streaks, success rate and latency, circuit breakers, a TCP health check; a route
//!    with a timeout, retries with a budget, a per-try timeout, a rate limit and an idle timeout),
//!    and the proxy worker thread's CPU per request for each (read from `/proc/self/task/*/stat`,
//!    so the load generator and the upstreams, which share the process, are not counted).
//!    `POLICY_COST=each` adds the cluster's policies alone, the retry policy alone, and the route's
//!    timeouts and rate limit alone.
//!
//! For each it prints requests per second, the share of requests that succeeded, p50 and p99
//! latency, and retry amplification (attempts the upstreams saw per client request).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use remora_proxy::testing::{Client, ScriptedServer, TestProxy, worker_cpu};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() {
    let seconds = env("POLICY_SECONDS", 5);
    let connections = env("POLICY_CONNECTIONS", 16) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let duration = Duration::from_secs(seconds);
        println!(
            "policy harness: {connections} keep-alive HTTP/1.1 connections, {seconds} s per run, proxy with 1 worker thread\n"
        );
        let upstream = ScriptedServer::start("upstream").await;
        let config = |cluster_policy: &str, route_policy: &str| {
            format!(
                "resources:\n  - {{kind: Cluster, name: app, protocol: http1{cluster_policy}}}\n  - {{kind: Endpoints, cluster: app, endpoints: [{{address: \"{}\"}}]}}\n  - {{kind: RouteTable, name: all, routes: [{{backends: [{{cluster: app}}]{route_policy}}}]}}\n  - {{kind: Listener, name: in, address: \"127.0.0.1:0\", protocol: http1}}\n",
                upstream.address()
            )
        };
        let cluster_policy = ", balancer: ewma, circuit_breakers: {max_connections: 10000, max_pending_requests: 10000, max_requests: 10000, max_retries: 1000}, outlier_detection: {consecutive_5xx: 5, consecutive_gateway_errors: 5, interval: 1s, success_rate: {}, latency: {}}, health_check: {interval: 1s}";
        let retry = ", retry: {attempts: 2, retry_on: [5xx, reset, connect-failure], per_try_timeout: 2s}";
        let limits = ", timeout: 5s, idle_timeout: 30s, rate_limit: {requests_per_second: 10000000}";
        let mut variants = vec![
            ("policies off", config("", "")),
            ("policies on", config(cluster_policy, &format!("{retry}{limits}"))),
        ];
        if let Ok(only) = std::env::var("POLICY_ONLY") {
            // Profiling aid: one variant, once (e.g. under `perf record`).
            let (_, config) = [("off", config("", "")), ("retry", config("", retry)), ("on", config(cluster_policy, &format!("{retry}{limits}")))]
                .into_iter()
                .find(|(name, _)| *name == only)
                .expect("POLICY_ONLY is off, retry or on");
            let proxy = TestProxy::start(&config);
            if let Ok(requests) = std::env::var("POLICY_REQUESTS") {
                // A fixed count on one connection, for instruction counts (valgrind --tool=callgrind).
                let requests: usize = requests.parse().expect("POLICY_REQUESTS is a number");
                let mut client = Client::http1(proxy.address("in")).await;
                for _ in 0..requests {
                    assert_eq!(client.get("bench", "/").await.status, 200);
                }
                let retries = proxy.metric(r#"remora_upstream_retries_total{cluster="app"}"#).await;
                let opened = proxy.metric(r#"remora_upstream_connections_total{cluster="app"}"#).await;
                println!(
                    "{only}: {requests} requests, {retries} retries, {opened} upstream connections, upstream saw {}",
                    upstream.script.requests()
                );
                return;
            }
            let report = run(proxy.address("in"), connections * 2, duration).await;
            println!("{only}: {:.0} req/s", report.rate);
            return;
        }
        header();
        for (scenario, retry) in [("slow", ""), ("failing", ", retry: {attempts: 2, retry_on: [5xx]}")] {
            for balancer in ["round_robin", "least_request", "ewma"] {
                let bad = ScriptedServer::start("bad").await;
                let good1 = ScriptedServer::start("good1").await;
                let good2 = ScriptedServer::start("good2").await;
                match scenario {
                    "slow" => bad.script.delay(50),
                    _ => bad.script.fail(1, 10, 503),
                }
                let servers = [&bad, &good1, &good2];
                let endpoints: Vec<String> =
                    servers.iter().map(|s| format!("{{address: \"{}\"}}", s.address())).collect();
                let proxy = TestProxy::start(&format!(
                    "resources:\n  - {{kind: Cluster, name: app, balancer: {balancer}, protocol: http1}}\n  - {{kind: Endpoints, cluster: app, endpoints: [{}]}}\n  - {{kind: RouteTable, name: all, routes: [{{backends: [{{cluster: app}}]{retry}}}]}}\n  - {{kind: Listener, name: in, address: \"127.0.0.1:0\", protocol: http1}}\n",
                    endpoints.join(", ")
                ));
                let report = run(proxy.address("in"), connections, duration).await;
                let attempts: usize = servers.iter().map(|s| s.script.requests()).sum();
                row(&format!("{scenario} endpoint"), balancer, &report, attempts);
            }
        }
        println!();
        if std::env::var("POLICY_COST").is_ok_and(|v| v == "each") {
            variants.push(("cluster: ewma+outlier+breakers+health", config(cluster_policy, "")));
            variants.push(("route: retry", config("", retry)));
            variants.push(("route: timeouts+rate limit", config("", limits)));
        }
        println!("{:<40} {:>10} {:>16}", "cost", "req/s", "proxy cpu us/req");
        let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        // Interleaved, twice: the machine's drift hits every variant alike.
        for _ in 0..2 {
            for (i, (name, config)) in variants.iter().enumerate() {
                let proxy = TestProxy::start(config);
                let before = worker_cpu();
                let report = run(proxy.address("in"), connections * 2, duration).await;
                let per_request = (worker_cpu() - before).as_secs_f64() * 1e6 / report.requests as f64;
                println!("{name:<40} {:>10.0} {per_request:>16.2}", report.rate);
                cpu[i].push(per_request);
            }
        }
        let mean = |samples: &[f64]| samples.iter().sum::<f64>() / samples.len() as f64;
        let off = mean(&cpu[0]);
        for (i, (name, _)) in variants.iter().enumerate().skip(1) {
            println!("{name} cost {:+.1}% CPU per request (mean of two runs each)", (mean(&cpu[i]) / off - 1.0) * 100.0);
        }
    });
}

fn header() {
    println!(
        "{:<16} {:<14} {:>9} {:>9} {:>10} {:>10} {:>14}",
        "scenario", "balancer", "req/s", "success", "p50 ms", "p99 ms", "amplification"
    );
}

fn row(scenario: &str, balancer: &str, report: &Report, attempts: usize) {
    println!(
        "{scenario:<16} {balancer:<14} {:>9.0} {:>8.2}% {:>10.2} {:>10.2} {:>14.3}",
        report.rate,
        report.successes as f64 * 100.0 / report.requests as f64,
        report.p50.as_secs_f64() * 1e3,
        report.p99.as_secs_f64() * 1e3,
        attempts as f64 / report.requests as f64,
    );
}

struct Report {
    requests: usize,
    successes: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
}

async fn run(address: std::net::SocketAddr, connections: usize, duration: Duration) -> Report {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = Client::http1(address).await;
                let mut latencies = Vec::with_capacity(100_000);
                let mut successes = 0;
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let reply = client.get("bench", "/").await;
                    successes += usize::from(reply.status == 200);
                    latencies.push(sent.elapsed());
                }
                (latencies, successes)
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut successes) = (Vec::new(), 0);
    for task in tasks {
        let (l, s) = task.await.expect("client task");
        latencies.extend(l);
        successes += s;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    Report {
        requests: latencies.len(),
        successes,
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}
