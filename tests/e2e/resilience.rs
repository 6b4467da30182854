//! Cluster protection against upstreams that fail in scripted ways: circuit breakers, the route
//! fallback, outlier detection (failure streaks and latency) and active health checks.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use remora_control_api::v1;
use remora_proxy::testing::config::{Cluster, Config, Listener, Route, RouteTable, secs};
use remora_proxy::testing::{Client, ScriptedServer, TestProxy, eventually};

/// A proxy's config: one route, as `route` edits it, to cluster `app` over `endpoints`, as
/// `cluster` edits it.
fn config(
    endpoints: &[&ScriptedServer],
    cluster: impl FnOnce(&mut v1::Cluster),
    route: impl FnOnce(&mut v1::Route),
) -> Config {
    let addresses: Vec<_> = endpoints.iter().map(|s| s.address()).collect();
    Config::new()
        .with(Cluster::new("app").endpoints(&addresses).set(cluster))
        .with(RouteTable::new("web").route(Route::to("app").set(route)))
        .with(Listener::new("in").http1())
}

/// A cluster with outlier detection as `edit` sets it, from its defaults.
fn outliers(edit: impl FnOnce(&mut v1::OutlierDetection)) -> impl FnOnce(&mut v1::Cluster) {
    |c| edit(c.outlier_detection.get_or_insert_with(Default::default))
}

/// The `/clusters` entry of `name`.
async fn clusters(proxy: &TestProxy, name: &str) -> serde_json::Value {
    let (status, body) = proxy.admin_get("/clusters").await;
    assert_eq!(status, 200);
    let all: serde_json::Value = serde_json::from_str(&body).unwrap();
    all["clusters"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap()
}

/// Who served `n` sequential requests on one connection.
async fn served_by(client: &mut Client, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let reply = client.get("x", "/").await;
        *counts.entry(reply.header("x-served-by").to_owned()).or_default() += 1;
    }
    counts
}

/// `max_requests: 2` in front of a slow endpoint: of six requests sent at once, two are served and
/// four fail at once with 503 `upstream_overflow`, counted under their breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_fail_fast_at_their_limit() {
    let upstream = ScriptedServer::start("app").await;
    upstream.script.delay(500);
    let breakers = v1::CircuitBreakers { max_requests: 2, ..Default::default() };
    let proxy =
        TestProxy::start(&config(&[&upstream], |c| c.circuit_breakers = Some(Box::new(breakers)), |_| {}).yaml());
    let address = proxy.address("in");
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            tokio::spawn(async move {
                // The two that get through go first.
                tokio::time::sleep(Duration::from_millis(if i < 2 { 0 } else { 100 })).await;
                let mut client = Client::http1(address).await;
                let started = Instant::now();
                let reply = client.get("x", "/").await;
                (reply.status.as_u16(), reply.header("x-remora-error").to_owned(), started.elapsed())
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let served = outcomes.iter().filter(|o| o.0 == 200).count();
    let refused: Vec<_> = outcomes.iter().filter(|o| o.0 == 503).collect();
    assert_eq!((served, refused.len()), (2, 4), "{outcomes:?}");
    for (_, reason, took) in refused {
        assert_eq!(reason, "upstream_overflow");
        assert!(*took < Duration::from_millis(200), "a refusal waited {took:?}");
    }
    let overflow = r#"remora_upstream_overflow_total{cluster="app",breaker="max_requests"}"#;
    assert_eq!(proxy.metric(overflow).await, 4.0);
    // The slots come back when the responses end.
    assert_eq!(proxy.metric(r#"remora_upstream_requests_active{cluster="app"}"#).await, 0.0);
}

/// A route's fallback answers when its cluster has no healthy endpoint, or when a breaker is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_answers_when_the_cluster_cannot() {
    let upstream = ScriptedServer::start("app").await;
    upstream.script.delay(300);
    let headers = [("content-type", "application/json"), ("x-degraded", "yes")];
    let fallback = v1::StaticResponse {
        status: 200,
        headers: headers.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
        body: "[]".into(),
    };
    let breakers = v1::CircuitBreakers { max_requests: 1, ..Default::default() };
    let answer = fallback.clone();
    let config = config(
        &[&upstream],
        |c| c.circuit_breakers = Some(Box::new(breakers)),
        |r| r.fallback = Some(Box::new(answer)),
    )
    .with(Cluster::new("empty"))
    .with(
        RouteTable::new("empty")
            .destinations(&["empty.local"])
            .route(Route::to("empty").set(|r| r.fallback = Some(Box::new(fallback)))),
    );
    let proxy = TestProxy::start(&config.yaml());
    let mut client = Client::http1(proxy.address("in")).await;
    let reply = client.get("empty.local", "/").await;
    assert_eq!((reply.status.as_u16(), reply.text().as_str()), (200, "[]"));
    assert_eq!(reply.header("x-degraded"), "yes");
    assert_eq!(reply.header("x-remora-error"), "fallback");

    let address = proxy.address("in");
    let first = tokio::spawn(async move { Client::http1(address).await.get("x", "/").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = client.get("x", "/").await;
    assert_eq!((second.status.as_u16(), second.header("x-remora-error")), (200, "fallback"), "{}", second.text());
    let first = first.await.unwrap();
    assert_eq!((first.status.as_u16(), first.header("x-served-by")), (200, "app"));
}

/// Three 503s in a row eject an endpoint: it gets nothing more until its ejection time has passed,
/// then it is back in rotation (and, healed, serves again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_are_ejected_and_return() {
    let bad = ScriptedServer::start("bad").await;
    bad.script.fail_all(503);
    let good1 = ScriptedServer::start("good1").await;
    let good2 = ScriptedServer::start("good2").await;
    let detection = outliers(|o| {
        (o.consecutive_5xx, o.interval, o.base_ejection_time) = (Some(3), Some(secs(0.1)), Some(secs(1.0)));
        o.max_ejection_percent = Some(50);
    });
    let proxy = TestProxy::start(&config(&[&bad, &good1, &good2], detection, |_| {}).yaml());
    let mut client = Client::http1(proxy.address("in")).await;
    let counts = served_by(&mut client, 30).await;
    assert_eq!(bad.script.requests(), 3, "ejected on its third failure in a row: {counts:?}");
    assert_eq!(counts.get("bad").copied().unwrap_or(0), 3);
    let later = served_by(&mut client, 30).await;
    assert!(!later.contains_key("bad"), "{later:?}");
    assert_eq!(proxy.metric(r#"remora_outlier_ejections_total{cluster="app",reason="consecutive_5xx"}"#).await, 1.0);
    assert_eq!(proxy.metric(r#"remora_upstream_endpoints_ejected{cluster="app"}"#).await, 1.0);
    // /clusters shows who is out, for how long, and how often.
    let cluster = clusters(&proxy, "app").await;
    assert_eq!((cluster["healthy"].as_u64(), cluster["ejected"].as_u64()), (Some(2), Some(1)), "{cluster}");
    let ejected: Vec<&serde_json::Value> =
        cluster["endpoints"].as_array().unwrap().iter().filter(|e| !e["ejected_for_seconds"].is_null()).collect();
    assert_eq!(ejected.len(), 1, "{cluster}");
    assert_eq!(ejected[0]["address"], bad.address().to_string());
    assert_eq!(ejected[0]["ejections"], 1);
    assert!(ejected[0]["ejected_for_seconds"].as_f64().unwrap() <= 1.0);

    bad.script.heal();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let back = served_by(&mut client, 30).await;
    assert!(back.get("bad").copied().unwrap_or(0) >= 8, "back in rotation after its ejection: {back:?}");
    assert_eq!(proxy.metric(r#"remora_upstream_endpoints_ejected{cluster="app"}"#).await, 0.0);
}

/// An endpoint answering 60 ms where the others answer at once is ejected by latency at the next
/// interval, without a single error; the fast ones never are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_is_ejected_by_latency() {
    let slow = ScriptedServer::start("slow").await;
    slow.script.delay(60);
    let fast: Vec<ScriptedServer> =
        futures_util::future::join_all((0..3).map(|i| async move { ScriptedServer::start(&format!("fast{i}")).await }))
            .await;
    let mut endpoints = vec![&slow];
    endpoints.extend(fast.iter());
    let detection = outliers(|o| {
        (o.consecutive_5xx, o.interval, o.base_ejection_time) = (Some(0), Some(secs(0.3)), Some(secs(30.0)));
        o.latency = Some(v1::LatencyEjection {
            multiple: Some(3.0),
            min_latency: Some(secs(0.02)),
            request_volume: Some(3),
            ..Default::default()
        });
    });
    let proxy = TestProxy::start(&config(&endpoints, detection, |_| {}).yaml());
    let address = proxy.address("in");
    // Four clients, so the slow endpoint's requests do not hold everyone back.
    let started = Instant::now();
    let ejection = r#"remora_outlier_ejections_total{cluster="app",reason="latency"}"#;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::http1(address).await;
                while started.elapsed() < Duration::from_millis(900) {
                    assert_eq!(client.get("x", "/").await.status, 200);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(proxy.metric(ejection).await, 1.0, "exactly the slow endpoint");
    let before = slow.script.requests();
    let mut client = Client::http1(address).await;
    let counts = served_by(&mut client, 30).await;
    assert_eq!(slow.script.requests(), before, "{counts:?}");
}

/// An endpoint failing its health check leaves rotation and comes back when it passes again; an
/// endpoint added later with a failing check never takes traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_remove_and_restore_endpoints() {
    let a = ScriptedServer::start("a").await;
    let b = ScriptedServer::start("b").await;
    let checks = |c: &mut v1::Cluster| {
        c.health_check = Some(Box::new(v1::HealthCheck {
            interval: Some(secs(0.05)),
            timeout: Some(secs(0.5)),
            healthy_threshold: Some(2),
            unhealthy_threshold: Some(2),
            http: Some(v1::HttpHealthCheck { path: "/health".into(), ..Default::default() }),
        }))
    };
    let proxy = TestProxy::start(&config(&[&a, &b], checks, |_| {}).yaml());
    let mut client = Client::http1(proxy.address("in")).await;
    let healthy = r#"remora_upstream_endpoints_healthy{cluster="app"}"#;
    eventually("both endpoints healthy", Duration::from_secs(3), || async { proxy.metric(healthy).await == 2.0 }).await;
    assert_eq!(served_by(&mut client, 20).await.len(), 2);

    a.script.health(503);
    eventually("a leaves rotation", Duration::from_secs(3), || async { proxy.metric(healthy).await == 1.0 }).await;
    let counts = served_by(&mut client, 20).await;
    assert_eq!(counts.get("b"), Some(&20), "{counts:?}");
    let cluster = clusters(&proxy, "app").await;
    let health: Vec<(String, String)> = cluster["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["address"].as_str().unwrap().to_owned(), e["health"].as_str().unwrap().to_owned()))
        .collect();
    assert!(health.contains(&(a.address().to_string(), "unhealthy".into())), "{cluster}");
    assert!(health.contains(&(b.address().to_string(), "healthy".into())), "{cluster}");

    a.script.health(200);
    eventually("a returns", Duration::from_secs(3), || async { proxy.metric(healthy).await == 2.0 }).await;
    assert_eq!(served_by(&mut client, 20).await.len(), 2);

    // A newcomer is unknown until its first probe passes: failing, it never serves.
    let c = ScriptedServer::start("c").await;
    c.script.health(503);
    proxy.rewrite(&config(&[&a, &b, &c], checks, |_| {}).yaml());
    proxy.reload().unwrap();
    eventually("c probed", Duration::from_secs(3), || async { c.script.health_probes() >= 2 }).await;
    let counts = served_by(&mut client, 30).await;
    assert!(!counts.contains_key("c"), "{counts:?}");
    assert_eq!(c.script.requests(), 0);
    assert!(proxy.metric(r#"remora_health_checks_total{cluster="app",result="fail"}"#).await >= 2.0);
}
