//! Per-route policy against real upstreams: the request timeout, fault injection, the rate limit.

use std::time::{Duration, Instant};

use remora_proxy::testing::{Client, HttpServer, TestProxy};

use crate::{cluster, listener};

fn config(upstream: &HttpServer, route_extra: &str) -> String {
    format!(
        "resources:\n{}{}  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: app}}]{route_extra}}}]}}\n",
        cluster("app", "", &[upstream.address()]),
        listener("in", ", protocol: http1"),
    )
}

/// A hung endpoint: the route's timeout answers 504 `request_timeout` on time, and the next request
/// on the same client connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_timeout_answers_504_when_the_endpoint_hangs() {
    let upstream = HttpServer::start("app").await;
    let proxy = TestProxy::start(&config(&upstream, ", timeout: 0.3s"));
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
    let proxy = TestProxy::start(&config(&upstream, ", fault: {abort: {percent: 100, status: 503}}"));
    let mut client = Client::http1(proxy.address("in")).await;
    let reply = client.get("x", "/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-remora-error"), "fault_injected");
    assert_eq!(upstream.hits(), 0);

    proxy.rewrite(&config(&upstream, ", fault: {abort: {percent: 30, status: 500}}"));
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
    let proxy = TestProxy::start(&config(&upstream, ", fault: {delay: {percent: 50, duration: 0.1s}}"));
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
    let proxy = TestProxy::start(&config(&upstream, ", rate_limit: {requests_per_second: 50, burst: 10}"));
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

/// Bad policy values are refused with the field named.
#[test]
fn bad_policy_values_name_their_field() {
    for (extra, field) in [
        (", timeout: 0s", "routes[0].timeout"),
        (", fault: {abort: {percent: 130, status: 503}}", "routes[0].fault.abort.percent"),
        (", fault: {abort: {percent: 10, status: 99}}", "routes[0].fault.abort.status"),
        (", fault: {delay: {percent: 10}}", "routes[0].fault.delay.duration"),
        (", rate_limit: {burst: 5}", "routes[0].rate_limit.requests_per_second"),
    ] {
        let yaml = format!(
            "resources:\n  - {{kind: Cluster, name: app}}\n  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: app}}]{extra}}}]}}\n"
        );
        let file = remora_control_api::config::parse(&yaml, "t").unwrap();
        let error = remora_control_api::validate::validate(&file.resources).unwrap_err().to_string();
        assert!(error.contains(field), "{extra}: {error}");
    }
}
