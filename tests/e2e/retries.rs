//! Retries against upstreams that fail in scripted ways: recovery, the budget under an outage, the
//! per-try timeout, hedging, `Retry-After`, and bodies (replayed whole, or too long to retry).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use remora_control_api::v1;
use remora_proxy::testing::client::read;
use remora_proxy::testing::config::{Cluster, Config, Listener, Route, RouteTable, secs};
use remora_proxy::testing::servers::full;
use remora_proxy::testing::{Client, ScriptedServer, TestProxy};

/// The config of a proxy with one route to cluster `app` over `endpoints`, whose retry policy
/// `retry` edits.
fn config(endpoints: &[&ScriptedServer], retry: impl FnOnce(&mut v1::RetryPolicy)) -> Config {
    let addresses: Vec<_> = endpoints.iter().map(|s| s.address()).collect();
    Config::new()
        .with(Cluster::new("app").endpoints(&addresses))
        .with(RouteTable::new("web").route(Route::to("app").retry(retry)))
        .with(Listener::new("in").http1())
}

/// A proxy serving [`config`].
fn proxy(endpoints: &[&ScriptedServer], retry: impl FnOnce(&mut v1::RetryPolicy)) -> TestProxy {
    TestProxy::start(&config(endpoints, retry).yaml())
}

/// `retry_on` of these conditions.
fn on(conditions: &[&str]) -> Vec<String> {
    conditions.iter().map(|c| (*c).to_owned()).collect()
}

/// A retry budget of `percent` of requests plus `min_per_second`, over `ttl` seconds if given.
fn budget(percent: f64, min_per_second: u32, ttl: Option<f64>) -> Option<v1::RetryBudget> {
    Some(v1::RetryBudget { percent: Some(percent), min_retries_per_second: Some(min_per_second), ttl: ttl.map(secs) })
}

/// An upstream failing 30% of its requests (3 of every 10, in a row) is hidden entirely by three
/// retries, and the retries spent are exactly the failures: 3 for every 7 requests, within the
/// route's 50% budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_30_percent_failure_rate_within_budget() {
    let upstream = ScriptedServer::start("app").await;
    upstream.script.fail(3, 10, 503);
    let proxy = proxy(&[&upstream], |r| {
        (r.attempts, r.retry_on, r.backoff_base) = (Some(3), on(&["5xx"]), Some(secs(0.001)));
        r.budget = budget(50.0, 1, None);
    });
    let mut client = Client::http1(proxy.address("in")).await;
    const REQUESTS: usize = 700;
    for i in 0..REQUESTS {
        let reply = client.get("x", "/").await;
        assert_eq!(reply.status, 200, "request {i} failed: {}", reply.text());
    }
    let hits = upstream.script.requests();
    assert_eq!(hits, 1000, "each 7 requests cost 10 attempts");
    let amplification = hits as f64 / REQUESTS as f64;
    assert!((amplification - 10.0 / 7.0).abs() < 0.01, "{amplification}");
    assert_eq!(proxy.metric(r#"remora_upstream_retries_total{cluster="app"}"#).await, 300.0);
    assert_eq!(proxy.metric(r#"remora_upstream_retry_budget_exhausted_total{cluster="app"}"#).await, 0.0);
}

/// Under a total outage the budget caps what retries add: 20% of requests plus the reserve
/// (1/s x 10 s), however many retries each request may ask for. The client sees the upstream's 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_caps_retry_amplification_in_an_outage() {
    let upstream = ScriptedServer::start("app").await;
    upstream.script.fail_all(503);
    let proxy = proxy(&[&upstream], |r| {
        (r.attempts, r.retry_on, r.backoff_base) = (Some(5), on(&["5xx"]), Some(secs(0.001)));
        r.budget = budget(20.0, 1, Some(10.0));
    });
    let mut client = Client::http1(proxy.address("in")).await;
    const REQUESTS: usize = 500;
    for _ in 0..REQUESTS {
        let reply = client.get("x", "/").await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("x-remora-error"), "", "the upstream's own 503 reaches the client");
    }
    let hits = upstream.script.requests();
    let amplification = hits as f64 / REQUESTS as f64;
    // Without a budget: 6 attempts each, 6.0. With it: (500 + 0.2 x 500 + 10) / 500 = 1.22.
    assert!((1.15..=1.25).contains(&amplification), "retry amplification {amplification} ({hits} attempts)");
    assert!(proxy.metric(r#"remora_upstream_retry_budget_exhausted_total{cluster="app"}"#).await > 300.0);
}

/// One endpoint hangs: each attempt on it gives up after the per-try timeout and the retry goes to
/// the other endpoint, so every request succeeds in about the per-try timeout at worst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_and_a_retry_beat_a_hung_endpoint() {
    let hung = ScriptedServer::start("hung").await;
    hung.script.delay(10_000);
    let healthy = ScriptedServer::start("healthy").await;
    let proxy = proxy(&[&hung, &healthy], |r| {
        (r.attempts, r.retry_on, r.per_try_timeout) = (Some(2), on(&["reset"]), Some(secs(0.1)));
    });
    let mut client = Client::http1(proxy.address("in")).await;
    for _ in 0..10 {
        let started = Instant::now();
        let reply = client.get("x", "/").await;
        let took = started.elapsed();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-served-by"), "healthy");
        assert!(took < Duration::from_millis(600), "{took:?}");
    }
    assert!(hung.script.requests() >= 4, "round robin sent about half the first attempts to the hung endpoint");
    assert_eq!(
        proxy.metric(r#"remora_upstream_timeouts_total{cluster="app",reason="per_try"}"#).await,
        hung.script.requests() as f64
    );

    // Without retries, the per-try timeout is the client's answer: 504 per_try_timeout.
    proxy.rewrite(&config(&[&hung], |r| (r.attempts, r.per_try_timeout) = (Some(0), Some(secs(0.1)))).yaml());
    proxy.reload().unwrap();
    let mut client = Client::http1(proxy.address("in")).await;
    let reply = client.get("x", "/").await;
    assert_eq!((reply.status.as_u16(), reply.header("x-remora-error")), (504, "per_try_timeout"));
}

/// Hedging: an attempt still waiting after 50 ms gets a sibling on the other endpoint, and the first
/// answer wins, so a slow endpoint costs about the hedge delay instead of its own latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_requests_take_the_first_answer() {
    let slow = ScriptedServer::start("slow").await;
    slow.script.delay(1000);
    let fast = ScriptedServer::start("fast").await;
    let proxy = proxy(&[&slow, &fast], |r| {
        r.attempts = Some(1);
        r.hedge = Some(v1::HedgePolicy { delay: Some(secs(0.05)) });
    });
    let mut client = Client::http1(proxy.address("in")).await;
    for _ in 0..10 {
        let started = Instant::now();
        let reply = client.get("x", "/").await;
        assert_eq!((reply.status.as_u16(), reply.header("x-served-by")), (200, "fast"));
        assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    }
    let hedges = proxy.metric(r#"remora_upstream_hedges_total{cluster="app"}"#).await;
    assert_eq!(hedges, slow.script.requests() as f64, "every attempt on the slow endpoint was hedged");
    assert!(hedges >= 3.0, "{hedges}");
}

/// `Retry-After` on a 503 sets the least wait before the retry; one longer than the policy's
/// longest backoff means the 503 goes to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let upstream = ScriptedServer::start("app").await;
    upstream.script.fail(1, 2, 503);
    upstream.script.retry_after(1);
    let proxy = proxy(&[&upstream], |r| {
        (r.attempts, r.retry_on, r.backoff_max) = (Some(1), on(&["5xx"]), Some(secs(2.0)));
    });
    let mut client = Client::http1(proxy.address("in")).await;
    let started = Instant::now();
    let reply = client.get("x", "/").await;
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() >= Duration::from_secs(1), "retried before Retry-After: {:?}", started.elapsed());

    // The default longest backoff (250 ms) is shorter than Retry-After: no retry.
    proxy.rewrite(&config(&[&upstream], |r| (r.attempts, r.retry_on) = (Some(1), on(&["5xx"]))).yaml());
    proxy.reload().unwrap();
    let before = upstream.script.requests();
    let reply = client.get("x", "/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), "1");
    assert_eq!(upstream.script.requests(), before + 1);
}

/// A request body is replayed whole to the retry; one longer than the replay buffer streams to the
/// first attempt as usual and is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_replayed_unless_too_long() {
    let upstream = ScriptedServer::start("app").await;
    upstream.script.fail(1, 2, 503);
    let proxy = proxy(&[&upstream], |r| {
        (r.attempts, r.retry_on, r.replay_buffer_bytes) = (Some(1), on(&["5xx"]), Some(1024));
    });
    let mut client = Client::http1(proxy.address("in")).await;
    let body = Bytes::from(vec![b'x'; 1000]);
    let post = client.request(Method::POST, "x", "/upload").body(full(body.clone())).unwrap();
    let reply = read(client.send(post).await.unwrap()).await;
    assert_eq!(reply.status, 200);
    let seen = upstream.script.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|(_, b)| *b == body), "both attempts carried the whole body");

    let long = Bytes::from(vec![b'y'; 4096]);
    let post = client.request(Method::POST, "x", "/upload").body(full(long.clone())).unwrap();
    let reply = read(client.send(post).await.unwrap()).await;
    assert_eq!(reply.status, 503, "a body over the replay buffer is not retried");
    let seen = upstream.script.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].1, long, "the one attempt got the whole body");
}

/// gRPC over HTTP/2: a trailers-only `UNAVAILABLE` (status 14) is retried under the default
/// conditions, so the client sees the call succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_is_retried_by_default() {
    let upstream = ScriptedServer::start("grpc").await;
    upstream.script.fail_grpc(1, 2, 14);
    let config = Config::new()
        .with(Cluster::new("app").endpoints(&[upstream.address()]).protocol(v1::cluster::Protocol::Http2))
        .with(RouteTable::new("web").route(Route::to("app").retry(|_| {})))
        .with(Listener::new("in").http2());
    let proxy = TestProxy::start(&config.yaml());
    let mut client = Client::http2(proxy.address("in")).await;
    for _ in 0..5 {
        let reply = client.get("grpc.local", "/pkg.Service/Call").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("grpc-status"), "", "the retried UNAVAILABLE never reached the client");
        assert_eq!(reply.header("x-served-by"), "grpc");
    }
    assert_eq!(upstream.script.requests(), 10);
}
