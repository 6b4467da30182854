//! The balancers against real upstreams: least request and peak EWMA routing around a slow endpoint
//! (p99 measured beside round robin), ring hash keeping keys in place, and zone-aware routing.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use http::Method;
use remora_proxy::testing::client::read;
use remora_proxy::testing::servers::full;
use remora_proxy::testing::{Client, ScriptedServer, TestProxy, eventually};

use crate::listener;

fn endpoints_yaml(cluster: &str, servers: &[&ScriptedServer]) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("{{address: \"{}\"}}", s.address())).collect();
    format!("  - {{kind: Endpoints, cluster: {cluster}, endpoints: [{}]}}\n", list.join(", "))
}

/// The `p`th percentile of `samples` (sorted).
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Three endpoints, one answering in 100 ms, eight clients: round robin sends it a third of the
/// requests, so its p95 and p99 are the slow endpoint's; least request sends it a few percent (the
/// p90 is the fast endpoints'); peak EWMA almost nothing (the p99 is the fast endpoints'). Same
/// endpoints, same load, one test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_and_ewma_route_around_a_slow_endpoint() {
    let slow = ScriptedServer::start("slow").await;
    slow.script.delay(100);
    let fast1 = ScriptedServer::start("fast1").await;
    let fast2 = ScriptedServer::start("fast2").await;
    let servers = [&slow, &fast1, &fast2];
    let mut yaml = String::from("resources:\n");
    for balancer in ["round_robin", "least_request", "ewma"] {
        yaml.push_str(&format!("  - {{kind: Cluster, name: {balancer}, balancer: {balancer}}}\n"));
        yaml.push_str(&endpoints_yaml(balancer, &servers));
        yaml.push_str(&format!(
            "  - {{kind: RouteTable, name: {balancer}, destinations: [{balancer}], routes: [{{backends: [{{cluster: {balancer}}}]}}]}}\n"
        ));
    }
    yaml.push_str(&listener("in", ", protocol: http1"));
    let proxy = TestProxy::start(&yaml);
    let address = proxy.address("in");

    let mut p99s = HashMap::new();
    for balancer in ["round_robin", "least_request", "ewma"] {
        let before = slow.script.requests();
        let clients: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn(async move {
                    let mut client = Client::http1(address).await;
                    let mut latencies = Vec::new();
                    for _ in 0..100 {
                        let started = Instant::now();
                        assert_eq!(client.get(balancer, "/").await.status, 200);
                        latencies.push(started.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for client in clients {
            latencies.extend(client.await.unwrap());
        }
        let share = (slow.script.requests() - before) as f64 / latencies.len() as f64;
        latencies.sort();
        let (p50, p95, p99) = (percentile(&latencies, 50), percentile(&latencies, 95), percentile(&latencies, 99));
        eprintln!(
            "{balancer:>13}: p50 {p50:>10.1?}  p95 {p95:>10.1?}  p99 {p99:>10.1?}  slow endpoint's share {share:.3}"
        );
        p99s.insert(balancer, (percentile(&latencies, 90), p99, share));
    }
    let (_, rr, rr_share) = p99s["round_robin"];
    assert!(rr >= Duration::from_millis(95), "round robin p99 {rr:?}");
    assert!((rr_share - 1.0 / 3.0).abs() < 0.02, "round robin sent the slow endpoint {rr_share:.3}");
    // Peak EWMA sees the latency itself: the slow endpoint gets (next to) nothing, which its share
    // says; the latencies say it too, at the p90, which a loaded test machine's stalls (the whole
    // suite runs at once on two cores) cannot reach the way they can reach the top three requests.
    let (ewma90, ewma, ewma_share) = p99s["ewma"];
    // (Thresholds at half the slow endpoint's latency: the fast endpoints answer in a millisecond or
    // two, more when the test machine is loaded; the slow one never in under 100 ms.)
    assert!(ewma_share < 0.01, "ewma sent the slow endpoint {ewma_share:.3} of requests (p99 {ewma:?})");
    assert!(ewma90 < Duration::from_millis(50), "ewma p90 {ewma90:?} (round robin {rr:?}), slow share {ewma_share:.3}");
    // Least request sees only queues: the slow endpoint keeps about as many requests in flight as
    // each fast one, so its share is the ratio of their latencies (a few percent here, under a
    // debug build's slow fast path, more when the machine is loaded) and shows in the p99 but not
    // the p90.
    let (lr90, _, lr_share) = p99s["least_request"];
    assert!(lr90 < Duration::from_millis(50), "least_request p90 {lr90:?}, slow share {lr_share:.3}");
    assert!(lr_share < rr_share / 5.0, "least_request sent the slow endpoint {lr_share:.3} of requests");
}

/// Ring hash on a header: each user's requests stay on one endpoint; when an endpoint leaves, only
/// the users it served move (about a quarter of four), and everyone else stays put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_keeps_keys_in_place_and_moves_few() {
    let servers: Vec<ScriptedServer> =
        futures_util::future::join_all((0..4).map(|i| async move { ScriptedServer::start(&format!("s{i}")).await }))
            .await;
    let refs: Vec<&ScriptedServer> = servers.iter().collect();
    let config = |members: &[&ScriptedServer]| {
        format!(
            "resources:\n  - {{kind: Cluster, name: app, balancer: ring_hash, hash_policy: {{header: x-user}}}}\n{}  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: app}}]}}]}}\n{}",
            endpoints_yaml("app", members),
            listener("in", ", protocol: http1"),
        )
    };
    let proxy = TestProxy::start(&config(&refs));
    let mut client = Client::http1(proxy.address("in")).await;
    const USERS: usize = 400;
    let mut before = Vec::new();
    for user in 0..USERS {
        let request =
            client.request(Method::GET, "x", "/").header("x-user", format!("user-{user}")).body(full("")).unwrap();
        let first = read(client.send(request).await.unwrap()).await.header("x-served-by").to_owned();
        for _ in 0..2 {
            let again =
                client.request(Method::GET, "x", "/").header("x-user", format!("user-{user}")).body(full("")).unwrap();
            assert_eq!(read(client.send(again).await.unwrap()).await.header("x-served-by"), first, "user-{user} moved");
        }
        before.push(first);
    }
    assert_eq!(before.iter().collect::<HashSet<_>>().len(), 4, "every endpoint owns some users");

    proxy.rewrite(&config(&refs[..3]));
    proxy.reload().unwrap();
    let mut client = Client::http1(proxy.address("in")).await;
    let mut moved = 0;
    for (user, old) in before.iter().enumerate() {
        let request =
            client.request(Method::GET, "x", "/").header("x-user", format!("user-{user}")).body(full("")).unwrap();
        let now = read(client.send(request).await.unwrap()).await.header("x-served-by").to_owned();
        if &now != old {
            assert_eq!(old, "s3", "user-{user} moved off {old}, which stayed");
            moved += 1;
        }
    }
    let fair = USERS as f64 / 4.0;
    assert!((moved as f64) < fair * 1.5 && moved > 0, "{moved} of {USERS} users moved (fair share {fair})");
    assert_eq!(moved, before.iter().filter(|o| *o == "s3").count(), "exactly the removed endpoint's users moved");
}

/// Zone-aware routing: the proxy's own zone takes everything while it is healthy; when its
/// endpoints fail their health checks, traffic spills to the next zone of the region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_prefers_the_local_zone_and_fails_over() {
    let local1 = ScriptedServer::start("local1").await;
    let local2 = ScriptedServer::start("local2").await;
    let remote = ScriptedServer::start("remote").await;
    let proxy = TestProxy::start(&format!(
        r#"bootstrap:
  admin_address: 127.0.0.1:0
  workers: 1
  locality: {{region: eu, zone: eu-1a}}
resources:
  - kind: Cluster
    name: app
    locality_preference: {{}}
    # Two of three down is below the default panic threshold; this test is about the spill.
    panic_threshold: 0
    health_check: {{interval: 0.05s, unhealthy_threshold: 1, healthy_threshold: 1, http: {{path: /health}}}}
  - kind: Endpoints
    cluster: app
    endpoints:
      - {{address: "{}", locality: {{region: eu, zone: eu-1a}}}}
      - {{address: "{}", locality: {{region: eu, zone: eu-1a}}}}
      - {{address: "{}", locality: {{region: eu, zone: eu-1b}}}}
  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: app}}]}}]}}
{}"#,
        local1.address(),
        local2.address(),
        remote.address(),
        listener("in", ", protocol: http1"),
    ));
    let healthy = r#"remora_upstream_endpoints_healthy{cluster="app"}"#;
    eventually("all healthy", Duration::from_secs(3), || async { proxy.metric(healthy).await == 3.0 }).await;
    let mut client = Client::http1(proxy.address("in")).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        *counts.entry(client.get("x", "/").await.header("x-served-by").to_owned()).or_default() += 1;
    }
    assert!(!counts.contains_key("remote"), "the other zone got traffic while the local one was healthy: {counts:?}");

    local1.script.health(503);
    local2.script.health(503);
    eventually("the local zone down", Duration::from_secs(3), || async { proxy.metric(healthy).await == 1.0 }).await;
    for _ in 0..10 {
        assert_eq!(client.get("x", "/").await.header("x-served-by"), "remote");
    }
}
