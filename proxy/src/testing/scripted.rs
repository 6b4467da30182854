//! An upstream that misbehaves on cue: fails a share of requests, slows down, hangs, fails its
//! health check, and records what it received.
//!
//! [`ScriptedServer`] answers like [`HttpServer`](super::HttpServer)'s default route (`hello from
//! {name}`, `x-served-by`) unless its [`Script`] says otherwise. The script is a set of atomics a
//! test changes while traffic flows:
//!
//! | setting | effect |
//! | --- | --- |
//! | `fail(n, period, status)` | of every `period` requests it receives, the first `n` get `status` |
//! | `fail_all(status)` / `heal()` | every request gets `status` / back to normal |
//! | `delay(ms)` | every answer waits this long first |
//! | `retry_after(s)` | failed answers carry `Retry-After: s` |
//! | `fail_grpc(n, period, code)` | as `fail`, but a gRPC trailers-only answer: 200 with `grpc-status: code` |
//! | `health(status)` | what `GET /health` answers (default 200); health probes never fail otherwise |
//!
//! `GET /stall` answers 200, sends `partial` and then nothing, ever.
//!
//! It counts requests (health probes apart) and keeps the `Host` and body of its first 10,000.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::servers::{Handler, HttpServer, full};

/// What a [`ScriptedServer`] does, changeable at any time.
#[derive(Debug, Default)]
pub struct Script {
    fail_count: AtomicU32,
    fail_period: AtomicU32,
    fail_status: AtomicU16,
    fail_grpc: std::sync::atomic::AtomicBool,
    delay_ms: AtomicU64,
    retry_after: AtomicU64,
    health_status: AtomicU16,
    requests: AtomicUsize,
    health_probes: AtomicUsize,
    seen: Mutex<Vec<(String, Bytes)>>,
}

impl Script {
    /// Of every `period` requests, the first `n` get `status`.
    pub fn fail(&self, n: u32, period: u32, status: u16) {
        self.fail_status.store(status, Ordering::SeqCst);
        self.fail_period.store(period.max(1), Ordering::SeqCst);
        self.fail_count.store(n, Ordering::SeqCst);
    }

    /// Of every `period` requests, the first `n` get a gRPC trailers-only answer with status `code`.
    pub fn fail_grpc(&self, n: u32, period: u32, code: u16) {
        self.fail_grpc.store(true, Ordering::SeqCst);
        self.fail(n, period, code);
    }

    /// Every request gets `status`.
    pub fn fail_all(&self, status: u16) {
        self.fail(1, 1, status);
    }

    /// Back to answering normally (delay and health unchanged).
    pub fn heal(&self) {
        self.fail_count.store(0, Ordering::SeqCst);
    }

    /// Every answer waits `ms` first.
    pub fn delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Failed answers carry `Retry-After: seconds` (0: none).
    pub fn retry_after(&self, seconds: u64) {
        self.retry_after.store(seconds, Ordering::SeqCst);
    }

    /// What `GET /health` answers.
    pub fn health(&self, status: u16) {
        self.health_status.store(status, Ordering::SeqCst);
    }

    /// Requests received, health probes not counted.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Health probes received.
    pub fn health_probes(&self) -> usize {
        self.health_probes.load(Ordering::SeqCst)
    }

    /// Each request's `Host` (or authority) and body, in arrival order (the first 10,000).
    pub fn seen(&self) -> Vec<(String, Bytes)> {
        self.seen.lock().unwrap().clone()
    }
}

/// An HTTP/1.1 + HTTP/2 upstream that follows a [`Script`].
pub struct ScriptedServer {
    server: HttpServer,
    /// What it does; change it while it runs.
    pub script: Arc<Script>,
}

impl ScriptedServer {
    /// Starts a server answering as `name`, behaving normally until told otherwise.
    pub async fn start(name: &str) -> ScriptedServer {
        let script = Arc::new(Script::default());
        script.health(200);
        let name: Arc<str> = name.into();
        let shared = script.clone();
        let handler: Handler = Arc::new(move |request| Box::pin(answer(name.clone(), shared.clone(), request)));
        ScriptedServer { server: HttpServer::with_handler(handler).await, script }
    }

    /// Where it listens.
    pub fn address(&self) -> std::net::SocketAddr {
        self.server.address()
    }
}

async fn answer(name: Arc<str>, script: Arc<Script>, request: Request<Incoming>) -> Response<super::servers::TestBody> {
    if request.uri().path() == "/health" {
        script.health_probes.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(script.health_status.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK);
        let mut response = Response::new(full("health\n"));
        *response.status_mut() = status;
        return response;
    }
    if request.uri().path() == "/stall" {
        let frames = futures_util::stream::once(async {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(Bytes::from_static(b"partial")))
        })
        .chain(futures_util::stream::pending());
        let mut response = Response::new(BodyExt::boxed(http_body_util::StreamBody::new(frames)));
        response.headers_mut().insert("x-served-by", HeaderValue::from_str(&name).unwrap());
        return response;
    }
    let n = script.requests.fetch_add(1, Ordering::SeqCst) as u32;
    let host = crate::http::headers::authority(&request).unwrap_or_default().to_owned();
    let body = request.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    {
        // Kept for tests to inspect; capped so a benchmark's millions of requests cost nothing.
        let mut seen = script.seen.lock().unwrap();
        if seen.len() < 10_000 {
            seen.push((host, body));
        }
    }
    let delay = script.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let period = script.fail_period.load(Ordering::SeqCst).max(1);
    let failing = n % period < script.fail_count.load(Ordering::SeqCst);
    let mut response = if failing && script.fail_grpc.load(Ordering::SeqCst) {
        let mut response = Response::new(full(Bytes::new()));
        let code = script.fail_status.load(Ordering::SeqCst);
        response.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
        response.headers_mut().insert("grpc-status", HeaderValue::from(code));
        response
    } else if failing {
        let status =
            StatusCode::from_u16(script.fail_status.load(Ordering::SeqCst)).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut response = Response::new(full(format!("{name} failed on purpose\n")));
        *response.status_mut() = status;
        let after = script.retry_after.load(Ordering::SeqCst);
        if after > 0 {
            response.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(after));
        }
        response
    } else {
        Response::new(full(format!("hello from {name}\n")))
    };
    response.headers_mut().insert("x-served-by", HeaderValue::from_str(&name).unwrap());
    response
}
