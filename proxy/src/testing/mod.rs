//! Fixtures for tests and benches (feature `testing`): real servers on `127.0.0.1:0`, a client, a
//! proxy started in-process from YAML, and waits with deadlines.
//!
//! Everything here runs for real on loopback: hyper servers and clients, TCP sockets, the proxy's
//! own threads. Nothing is mocked. Servers stop when dropped.
//!
//! # Layout
//! - [`servers`] — [`HttpServer`] (HTTP/1.1 and HTTP/2 on one port, a few useful routes),
//!   [`TcpEchoServer`], [`BannerServer`].
//! - [`scripted`] — [`ScriptedServer`], an upstream that fails, slows, hangs or fails its health
//!   check on cue, and records what it received.
//! - [`client`] — [`Client`], one HTTP/1.1 or HTTP/2 connection, and [`Reply`].
//! - [`h3`] — [`h3::H3Client`], one HTTP/3 connection.
//! - [`proxy`] — [`TestProxy`], a proxy running from a YAML file in a temporary directory.
//! - [`config`] — the typed builder of config documents (`remora_control_api::testing`):
//!   `TestProxy::start(&Config::new().with(...).yaml())`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod client;
pub mod h3;
pub mod proxy;
pub mod scripted;
pub mod servers;

use std::future::Future;
use std::time::Duration;

pub use client::{Client, Reply};
pub use proxy::TestProxy;
pub use remora_control_api::testing as config;
pub use scripted::{Script, ScriptedServer};
pub use servers::{BannerServer, HttpServer, TcpEchoServer};

/// CPU time (user + system) this process's proxy worker threads (`remora-worker-*`) have used so
/// far, from `/proc/self/task/*/stat`: what benches measure a proxy by when the load generator and
/// the upstreams share its process. Zero where `/proc` is missing.
pub fn worker_cpu() -> Duration {
    let ticks_per_second = 100.0; // CLK_TCK on Linux
    let mut ticks = 0_u64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Duration::ZERO };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // The name is in parentheses and may contain spaces; fields after it are space-separated.
        let Some((name, rest)) = stat.split_once(") ") else { continue };
        if !name.contains("remora-worker") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat, 12th and 13th after the name.
        ticks += fields.get(11).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        ticks += fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    }
    Duration::from_secs_f64(ticks as f64 / ticks_per_second)
}

/// Polls `check` every 10 ms until it returns true; panics naming `what` after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
