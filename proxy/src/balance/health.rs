//! Active health checks: probing every endpoint of a cluster on a timer.
//!
//! [`HealthCheckConfig`] is compiled with the cluster; the cluster's monitor (`balance::monitor`)
//! runs [`probe`] against each endpoint every interval and feeds the verdict to a [`Tally`], which
//! applies the thresholds and says when the endpoint's [`Health`] flips. A probe is either a TCP
//! connect or an HTTP GET on a connection of its own (HTTP/1.1, or HTTP/2 for an `http2` cluster),
//! passing on an expected status; either way it must finish within the timeout. Probes carry
//! `user-agent: remora-health-check` so an endpoint can tell them from traffic.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, HeaderValue, USER_AGENT};
use http::{Request, Uri};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_control_api::config::Invalid;
use remora_control_api::v1;
use remora_control_api::validate;
use tokio::net::TcpStream;

use super::Health;

/// Compiled `health_check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Time between probes of one endpoint (jittered by up to 10%).
    pub interval: Duration,
    /// A probe slower than this fails.
    pub timeout: Duration,
    /// Passes in a row that make an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// Failures in a row that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// The HTTP request, or `None` for a TCP connect.
    pub http: Option<HttpProbe>,
}

/// An HTTP probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProbe {
    /// Path (and query) to GET.
    pub path: String,
    /// Statuses that pass.
    pub expected: Vec<u16>,
    /// `Host` / `:authority`.
    pub host: String,
    /// Speak HTTP/2 (prior knowledge) rather than HTTP/1.1.
    pub http2: bool,
}

impl HealthCheckConfig {
    /// Compiles the cluster's `health_check`, defaults applied; `cluster` names the default host,
    /// `http2` says the endpoints speak HTTP/2 only.
    pub fn compile(check: &v1::HealthCheck, cluster: &str, http2: bool) -> Result<HealthCheckConfig, Invalid> {
        let duration = |field: &str, value: Option<&pbjson_types::Duration>, default: Duration| {
            validate::duration(value)
                .map(|d| d.unwrap_or(default))
                .map_err(|m| Invalid::new(format!("health_check.{field}"), m))
        };
        Ok(HealthCheckConfig {
            interval: duration("interval", check.interval.as_ref(), Duration::from_secs(10))?,
            timeout: duration("timeout", check.timeout.as_ref(), Duration::from_secs(1))?,
            healthy_threshold: check.healthy_threshold.unwrap_or(2).max(1),
            unhealthy_threshold: check.unhealthy_threshold.unwrap_or(3).max(1),
            http: check.http.as_ref().map(|h| HttpProbe {
                path: h.path.clone(),
                expected: if h.expected_statuses.is_empty() {
                    vec![200]
                } else {
                    h.expected_statuses.iter().map(|s| u16::try_from(*s).unwrap_or(0)).collect()
                },
                host: if h.host.is_empty() { cluster.to_owned() } else { h.host.clone() },
                http2,
            }),
        })
    }
}

/// Probes `endpoint` once: `Ok` if it passes, else why not.
pub async fn probe(endpoint: SocketAddr, config: &HealthCheckConfig) -> Result<(), String> {
    match tokio::time::timeout(config.timeout, probe_unbounded(endpoint, config)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", config.timeout)),
    }
}

async fn probe_unbounded(endpoint: SocketAddr, config: &HealthCheckConfig) -> Result<(), String> {
    let stream = TcpStream::connect(endpoint).await.map_err(|e| format!("connect: {e}"))?;
    let Some(http) = &config.http else { return Ok(()) };
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    let path = Uri::try_from(http.path.as_str()).map_err(|e| format!("path: {e}"))?;
    let host = HeaderValue::from_str(&http.host).map_err(|e| format!("host: {e}"))?;
    let agent = HeaderValue::from_static("remora-health-check");
    let status = if http.http2 {
        let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("http/2 handshake: {e}"))?;
        tokio::spawn(connection);
        let uri = format!("http://{}{}", http.host, http.path);
        let request = Request::get(uri).header(USER_AGENT, agent).body(Empty::<Bytes>::new());
        let request = request.map_err(|e| format!("request: {e}"))?;
        sender.send_request(request).await.map_err(|e| format!("request: {e}"))?.status()
    } else {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(connection);
        let mut request = Request::new(Empty::<Bytes>::new());
        *request.uri_mut() = path;
        request.headers_mut().insert(HOST, host);
        request.headers_mut().insert(USER_AGENT, agent);
        request.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        sender.send_request(request).await.map_err(|e| format!("request: {e}"))?.status()
    };
    if http.expected.contains(&status.as_u16()) { Ok(()) } else { Err(format!("status {}", status.as_u16())) }
}

/// Probe results in a row for one endpoint, and the thresholds that turn them into a verdict.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    passes: u32,
    failures: u32,
}

impl Tally {
    /// Counts one probe of an endpoint whose health is `current`; returns its new health if it
    /// flips. An unknown (or never checked) endpoint becomes healthy on its first pass, so a new
    /// endpoint joins quickly, and unhealthy after `unhealthy_threshold` failures.
    pub fn record(&mut self, passed: bool, current: Health, config: &HealthCheckConfig) -> Option<Health> {
        if passed {
            self.passes += 1;
            self.failures = 0;
            match current {
                Health::Unknown | Health::Unchecked => Some(Health::Healthy),
                Health::Unhealthy if self.passes >= config.healthy_threshold => Some(Health::Healthy),
                _ => None,
            }
        } else {
            self.failures += 1;
            self.passes = 0;
            match current {
                Health::Unknown | Health::Healthy | Health::Unchecked
                    if self.failures >= config.unhealthy_threshold =>
                {
                    Some(Health::Unhealthy)
                }
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config() -> HealthCheckConfig {
        HealthCheckConfig::compile(&v1::HealthCheck::default(), "shop", false).unwrap()
    }

    #[test]
    fn thresholds_decide_the_flips() {
        let config = config();
        let mut tally = Tally::default();
        assert_eq!(
            tally.record(true, Health::Unknown, &config),
            Some(Health::Healthy),
            "one pass admits a new endpoint"
        );
        assert_eq!(tally.record(false, Health::Healthy, &config), None);
        assert_eq!(tally.record(false, Health::Healthy, &config), None);
        assert_eq!(tally.record(false, Health::Healthy, &config), Some(Health::Unhealthy), "the third failure");
        assert_eq!(tally.record(true, Health::Unhealthy, &config), None);
        assert_eq!(tally.record(true, Health::Unhealthy, &config), Some(Health::Healthy), "the second pass");
    }

    #[tokio::test]
    async fn tcp_and_http_probes_against_real_sockets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut tcp = config();
        tcp.timeout = Duration::from_millis(500);
        assert!(probe(address, &tcp).await.is_ok());

        // An HTTP endpoint answering 503: the probe fails, naming the status.
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buffer = [0_u8; 1024];
                let _ = stream.read(&mut buffer).await;
                let _ = stream.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
            }
        });
        let mut http = tcp.clone();
        http.http = Some(HttpProbe { path: "/health".into(), expected: vec![200], host: "shop".into(), http2: false });
        assert_eq!(probe(address, &http).await, Err("status 503".into()));
        http.http.as_mut().unwrap().expected.push(503);
        assert!(probe(address, &http).await.is_ok());

        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(probe(dead, &tcp).await.unwrap_err().starts_with("connect"));
    }
}
