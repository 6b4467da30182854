//! Per-route policy against real upstreams: the request timeout, fault injection, the rate limit.

use std::time::{Duration, Instant};

use remora_control_api::v1;
use remora_proxy::testing::config::{Cluster, Config, Listener, Route, RouteTable, secs};
use remora_proxy::testing::{Client, HttpServer, TestProxy};

/// A proxy's config: one route to cluster `app` at `upstream`, as `route` edits it.
fn config(upstream: std::net::SocketAddr, route: impl FnOnce(&mut v1::Route)) -> String {
    Config::new()
        .with(Cluster::new("app").endpoints(&[upstream]))
        .with(RouteTable::new("web").route(Route::to("app").set(route)))
        .with(Listener::new("in").http1())
        .yaml()
}

/// A fault that aborts `percent` of requests with `status`.
fn abort(percent: f64, status: u32) -> Option<Box<v1::Fault>> {
    Some(Box::new(v1::Fault { abort: Some(v1::FaultAbort { percent, status }), delay: None }))
}

/// A hung endpoint: the route's timeout answers 504 `request_timeout` on time, and the next request
/// on the same client connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_timeout_answers_504_when_the_endpoint_hangs() {
    let upstream = HttpServer::start("app").await;
    let proxy = TestProxy::start(&config(upstream.address(), |r| r.timeout = Some(secs(0.3))));
    let mut client = Client::http1(proxy.address("in")).await;
    let started = Instant::now();
    let reply = client.get("x", "/slow/5000").await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504);
    assert_eq!(reply.header("x-remora-error"), "request_timeout");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1500), "{took:?}");
    let reply = client.get("x", "/slow/50").await;
    assert_eq!(reply.status, 200, "a response within the timeout is served");
}

/// Aborts: every request at 100%; about the configured share at 30% (1000 requests, within 5
/// points), and the rest reach the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_aborts_hit_their_share_of_requests() {
    let upstream = HttpServer::start("app").await;
    let proxy = TestProxy::start(&config(upstream.address(), |r| r.fault = abort(100.0, 503)));
    let mut client = Client::http1(proxy.address("in")).await;
    let reply = client.get("x", "/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-remora-error"), "fault_injected");
    assert_eq!(upstream.hits(), 0);

    proxy.rewrite(&config(upstream.address(), |r| r.fault = abort(30.0, 500)));
    proxy.reload().unwrap();
    let mut client = Client::http1(proxy.address("in")).await;
    let mut aborted = 0;
    for _ in 0..1000 {
        let reply = client.get("x", "/").await;
        match reply.status.as_u16() {
            500 => aborted += 1,
            200 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert!((250..=350).contains(&aborted), "{aborted} of 1000 aborted at 30%");
    assert_eq!(upstream.hits(), 1000 - aborted);
}

/// Delays: a delayed share of requests takes at least the delay; the rest do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_delays_hit_their_share_of_requests() {
    let upstream = HttpServer::start("app").await;
    let proxy = TestProxy::start(&config(upstream.address(), |r| {
        let delay = v1::FaultDelay { percent: 50.0, duration: Some(secs(0.1)) };
        r.fault = Some(Box::new(v1::Fault { delay: Some(delay), abort: None }));
    }));
    let mut client = Client::http1(proxy.address("in")).await;
    let mut delayed = 0;
    for _ in 0..100 {
        let started = Instant::now();
        assert_eq!(client.get("x", "/").await.status, 200);
        if started.elapsed() >= Duration::from_millis(100) {
            delayed += 1;
        }
    }
    assert!((30..=70).contains(&delayed), "{delayed} of 100 delayed at 50%");
}

/// A 50 requests/s limit with a burst of 10, hammered for two seconds from four connections: about
/// 10 + 2 × 50 requests pass (within 10%), the rest get 429 with `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_passes_its_rate_and_refuses_the_rest() {
    let upstream = HttpServer::start("app").await;
    let proxy = TestProxy::start(&config(upstream.address(), |r| {
        r.rate_limit = Some(v1::RateLimit { requests_per_second: 50, burst: 10 });
    }));
    let address = proxy.address("in");
    let window = Duration::from_secs(2);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut client = Client::http1(address).await;
            let (mut passed, mut limited) = (0, 0);
            while started.elapsed() < window {
                let reply = client.get("x", "/").await;
                match reply.status.as_u16() {
                    200 => passed += 1,
                    429 => {
                        assert_eq!(reply.header("x-remora-error"), "rate_limited");
                        assert_eq!(reply.header("retry-after"), "1");
                        limited += 1;
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
            (passed, limited)
        }));
    }
    let (mut passed, mut limited) = (0, 0);
    for task in tasks {
        let (p, l) = task.await.unwrap();
        passed += p;
        limited += l;
    }
    let expected = 10.0 + 50.0 * started.elapsed().as_secs_f64();
    let error = (passed as f64 - expected).abs() / expected;
    assert!(error < 0.10, "{passed} passed, expected about {expected:.0}");
    assert!(limited > passed, "the load was not high enough to test the limit ({limited} limited)");
}

/// Bad policy values are refused with the field named, on routes and on clusters.
#[test]
fn bad_policy_values_name_their_field() {
    for (extra, field) in [
        (", timeout: 0s", "routes[0].timeout"),
        (", fault: {abort: {percent: 130, status: 503}}", "routes[0].fault.abort.percent"),
        (", fault: {abort: {percent: 10, status: 99}}", "routes[0].fault.abort.status"),
        (", fault: {delay: {percent: 10}}", "routes[0].fault.delay.duration"),
        (", rate_limit: {burst: 5}", "routes[0].rate_limit.requests_per_second"),
        (", retry: {retry_on: [5xxx]}", "routes[0].retry.retry_on[0]: unknown condition \"5xxx\""),
        (", retry: {attempts: 50}", "routes[0].retry.attempts: must be at most 10"),
        (", retry: {backoff_base: 1s, backoff_max: 0.5s}", "routes[0].retry.backoff_max: must not be less"),
        (", retry: {hedge: {}}", "routes[0].retry.hedge.delay: is required"),
        (", retry: {replay_buffer_bytes: 9999999}", "routes[0].retry.replay_buffer_bytes: must be at most"),
        (", retry: {budget: {percent: 120}}", "routes[0].retry.budget.percent: must be 0 to 100"),
        (", mirror: {cluster: nowhere}", "routes[0].mirror.cluster: names cluster \"nowhere\""),
        (", fallback: {status: 700}", "routes[0].fallback.status: must be 200 to 599"),
    ] {
        let yaml = format!(
            "resources:\n  - {{kind: Cluster, name: app}}\n  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: app}}]{extra}}}]}}\n"
        );
        let file = remora_control_api::config::parse(&yaml, "t").unwrap();
        let error = remora_control_api::validate::validate(&file.resources).unwrap_err().to_string();
        assert!(error.contains(field), "{extra}: {error}");
    }
}

/// A mirrored route: the shadow cluster receives a copy (its host marked `-shadow`, its body whole)
/// while the client gets the primary's answer, and a shadow that takes seconds to answer does not
/// slow the primary down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_requests_reach_the_shadow_without_slowing_the_client() {
    use remora_proxy::testing::ScriptedServer;
    let primary = ScriptedServer::start("primary").await;
    let shadow = ScriptedServer::start("shadow").await;
    shadow.script.delay(2000);
    let mirrored = |percent: Option<f64>| {
        let mirror = v1::Mirror { cluster: "shadow".into(), percent };
        Config::new()
            .with(Cluster::new("app").endpoints(&[primary.address()]))
            .with(Cluster::new("shadow").endpoints(&[shadow.address()]))
            .with(RouteTable::new("web").route(Route::to("app").set(|r| r.mirror = Some(Box::new(mirror)))))
            .with(Listener::new("in").http1())
            .yaml()
    };
    let proxy = TestProxy::start(&mirrored(None));
    let mut client = Client::http1(proxy.address("in")).await;
    for i in 0..5 {
        let started = Instant::now();
        let body = format!("order {i}");
        let post = client
            .request(http::Method::POST, "shop.local", "/orders")
            .body(remora_proxy::testing::servers::full(body.clone()))
            .unwrap();
        let reply = remora_proxy::testing::client::read(client.send(post).await.unwrap()).await;
        assert_eq!((reply.status.as_u16(), reply.header("x-served-by")), (200, "primary"));
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "the slow shadow held the client: {:?}",
            started.elapsed()
        );
    }
    remora_proxy::testing::eventually("the shadow saw every copy", Duration::from_secs(5), || async {
        shadow.script.seen().len() == 5
    })
    .await;
    let seen = shadow.script.seen();
    assert!(seen.iter().all(|(host, _)| host == "shop.local-shadow"), "{seen:?}");
    let mut bodies: Vec<String> = seen.iter().map(|(_, b)| String::from_utf8_lossy(b).into_owned()).collect();
    bodies.sort();
    assert_eq!(bodies, (0..5).map(|i| format!("order {i}")).collect::<Vec<_>>());
    assert_eq!(primary.script.requests(), 5);

    // A share of 30%: about 300 of 1000 copied.
    proxy.rewrite(&mirrored(Some(30.0)));
    proxy.reload().unwrap();
    shadow.script.delay(0);
    let before = shadow.script.seen().len();
    for _ in 0..1000 {
        assert_eq!(client.get("x", "/").await.status, 200);
    }
    remora_proxy::testing::eventually("copies settle", Duration::from_secs(5), || async {
        proxy.metric(r#"remora_mirror_requests_total{cluster="shadow",result="sent"}"#).await
            == shadow.script.seen().len() as f64
    })
    .await;
    let copied = shadow.script.seen().len() - before;
    assert!((230..=370).contains(&copied), "{copied} of 1000 copied at 30%");
}

/// Bad cluster policy values are refused with the field named.
#[test]
fn bad_cluster_policy_values_name_their_field() {
    for (extra, field) in [
        (", balancer: ring_hash", "hash_policy: is required with balancer ring_hash"),
        (", hash_policy: {header: x-user}", "hash_policy: applies only to balancer ring_hash"),
        (", balancer: ring_hash, hash_policy: {header: \"bad header\"}", "hash_policy.header"),
        (", outlier_detection: {interval: 0s}", "outlier_detection.interval: must be greater than zero"),
        (
            ", outlier_detection: {max_ejection_percent: 101}",
            "outlier_detection.max_ejection_percent: must be 0 to 100",
        ),
        (", outlier_detection: {latency: {multiple: 1.1}}", "outlier_detection.latency.multiple: must be at least 1.5"),
        (", health_check: {http: {path: health}}", "health_check.http.path: must start with '/'"),
        (", health_check: {healthy_threshold: 0}", "health_check.healthy_threshold: must be above zero"),
        (", health_check: {http: {path: /h, expected_statuses: [42]}}", "health_check.http.expected_statuses[0]"),
        (", locality_preference: {min_healthy_percent: 0}", "locality_preference.min_healthy_percent"),
        (", panic_threshold: 150", "panic_threshold: must be 0 to 100"),
        (", original_destination: true, outlier_detection: {}", "original_destination: a pass-through cluster"),
    ] {
        let yaml = format!("resources:\n  - {{kind: Cluster, name: app{extra}}}\n");
        let file = remora_control_api::config::parse(&yaml, "t").unwrap();
        let error = remora_control_api::validate::validate(&file.resources).unwrap_err().to_string();
        assert!(error.contains(&format!("cluster \"app\": {field}")), "{extra}: {error}");
    }
    let yaml =
        "resources:\n  - {kind: Listener, name: l, address: \"127.0.0.1:0\", connection_rate_limit: {burst: 3}}\n";
    let file = remora_control_api::config::parse(yaml, "t").unwrap();
    let error = remora_control_api::validate::validate(&file.resources).unwrap_err().to_string();
    assert!(
        error.contains("listener \"l\": connection_rate_limit.connections_per_second: must be above zero"),
        "{error}"
    );
}

/// A response body that stalls past the route's idle timeout is cut off (the client's stream ends
/// in an error instead of hanging), and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_body_is_cut_off_by_the_idle_timeout() {
    use http_body_util::BodyExt;
    let upstream = remora_proxy::testing::ScriptedServer::start("app").await;
    let proxy = TestProxy::start(&config(upstream.address(), |r| r.idle_timeout = Some(secs(0.2))));
    let mut client = Client::http1(proxy.address("in")).await;
    let started = Instant::now();
    let request =
        client.request(http::Method::GET, "x", "/stall").body(remora_proxy::testing::servers::full("")).unwrap();
    let response = client.send(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect()).await;
    assert!(matches!(body, Ok(Err(_))), "the stalled body was not cut off: {body:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(2), "{took:?}");
    assert_eq!(proxy.metric(r#"remora_upstream_timeouts_total{cluster="app",reason="idle"}"#).await, 1.0);
}
