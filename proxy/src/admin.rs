//! The admin HTTP server (default 127.0.0.1:15000): health, metrics and the live config.
//!
//! | path | answers |
//! | --- | --- |
//! | `GET /live` | 200 while the process runs (a liveness probe) |
//! | `GET /ready` | 200 once every listener is bound and the first config applied (with a control plane: once every resource type has been received and applied, or the initial-fetch timeout passed) and, with an identity from the CA, the first certificate is in place; 503 before that and while draining (a readiness probe) |
//! | `GET /metrics` | every metric: in the OpenMetrics text format when the scraper asks for it (`Accept: application/openmetrics-text`, as Prometheus does), else in the Prometheus text format 0.0.4 |
//! | `GET /config_dump` | JSON: node id, config source and version, the bootstrap, the outcome of the last reload, the control-plane stream (per type: source version, last ACK, last NACK with its error; every resource received with its version and whether it serves or waits), and every resource serving now |
//! | `GET /logging` | the log filter in force (`RUST_LOG` syntax) |
//! | `POST /logging?filter=F` (or `?level=L`) | replaces the log filter, e.g. `filter=remora_proxy::http=debug,info` or `level=debug`; 400 with the reason if it does not parse; 403 unless the caller is on loopback (in a pod the admin server listens on the pod's address for kubelet and Prometheus, and only the pod itself may change it) |
//! | `GET /clusters` | JSON: every cluster serving now with its balancer, how many endpoints are healthy and ejected, whether it is in panic, and per endpoint its weight, locality tier, health, ejection (time left, and the multiplier), active requests and latency estimate |
//!
//! It runs on a thread of its own, apart from the workers and from the control thread, so a scrape
//! never takes a data-path thread's time and a probe is answered whatever the config side is doing
//! (a reload of 100,000 routes takes seconds; kubelet's probes time out after one). It reads the
//! data path's state only through shared, read-only views. The answers that grow with the config
//! (`/metrics`, `/config_dump`, `/clusters`) are rendered on the runtime's blocking pool, so a
//! large dump does not hold up the probes either.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tracing::{debug, warn};

use crate::context::DataPath;
use crate::limits;
use crate::telemetry::{self, Registry, logging};

/// The outcome of one reload, as `/config_dump` reports it.
#[derive(Clone, Debug)]
pub struct ReloadReport {
    /// Whether the new config is serving.
    pub applied: bool,
    /// The version that was tried.
    pub version: String,
    /// Why it was rejected.
    pub error: Option<String>,
    /// When.
    pub at: SystemTime,
}

/// What the admin server reports on.
#[derive(Debug)]
pub struct AdminState {
    /// The data path (live snapshot, drain state).
    pub data: Arc<DataPath>,
    /// The metrics registry.
    pub metrics: Arc<Registry>,
    /// This proxy's node id.
    pub node_id: String,
    /// Where the config comes from.
    pub source: String,
    /// The bootstrap section as loaded.
    pub bootstrap: serde_json::Value,
    ready: AtomicBool,
    /// Set while the proxy waits for its first certificate from the CA.
    identity_pending: AtomicBool,
    last_reload: Mutex<Option<ReloadReport>>,
    xds: Mutex<Option<serde_json::Value>>,
}

impl AdminState {
    /// State for a proxy that is not ready yet.
    pub fn new(
        data: Arc<DataPath>,
        metrics: Arc<Registry>,
        node_id: String,
        source: String,
        bootstrap: serde_json::Value,
    ) -> Self {
        AdminState {
            data,
            metrics,
            node_id,
            source,
            bootstrap,
            ready: AtomicBool::new(false),
            identity_pending: AtomicBool::new(false),
            last_reload: Mutex::new(None),
            xds: Mutex::new(None),
        }
    }

    /// Marks the proxy ready: listeners bound, first config applied.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Holds readiness back until [`AdminState::set_identity_ready`]: the proxy has asked the CA
    /// for its first certificate.
    pub fn set_identity_pending(&self) {
        self.identity_pending.store(true, Ordering::Release);
    }

    /// The first certificate is in place.
    pub fn set_identity_ready(&self) {
        self.identity_pending.store(false, Ordering::Release);
    }

    /// Whether `/ready` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.identity_pending.load(Ordering::Acquire)
            && !self.data.drain.is_draining()
    }

    /// Records a reload's outcome.
    pub fn record_reload(&self, report: ReloadReport) {
        if let Ok(mut last) = self.last_reload.lock() {
            *last = Some(report);
        }
    }

    /// Records the control-plane stream's state for `/config_dump`.
    pub fn set_xds_report(&self, report: serde_json::Value) {
        if let Ok(mut xds) = self.xds.lock() {
            *xds = Some(report);
        }
    }

    /// The last reload's outcome, if there was one.
    pub fn last_reload(&self) -> Option<ReloadReport> {
        self.last_reload.lock().ok().and_then(|last| last.clone())
    }

    fn config_dump(&self) -> serde_json::Value {
        let snapshot = self.data.snapshot.load_full();
        let resources: Vec<serde_json::Value> = snapshot.resources.iter().map(|r| r.to_json()).collect();
        let last_reload = self.last_reload().map(|r| {
            json!({
                "result": if r.applied { "applied" } else { "rejected" },
                "version": r.version,
                "error": r.error,
                "at_unix_seconds": r.at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            })
        });
        json!({
            "node_id": self.node_id,
            "source": self.source,
            "version": snapshot.version,
            "bootstrap": self.bootstrap,
            "last_reload": last_reload,
            "control_plane": self.xds.lock().ok().and_then(|x| x.clone()),
            "resources": resources,
        })
    }
}

impl AdminState {
    fn clusters(&self) -> serde_json::Value {
        let snapshot = self.data.snapshot.load_full();
        let mut clusters: Vec<&Arc<crate::state::cluster::Cluster>> = snapshot.clusters().collect();
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        let list: Vec<serde_json::Value> = clusters
            .into_iter()
            .map(|cluster| {
                // How connections to the cluster travel: h2c or plain TCP, mutual TLS to each
                // endpoint's sidecar, or (opaque TCP) HBONE tunnels to its host's HBONE listener,
                // over QUIC first when the cluster has a QUIC port.
                let transport = match &cluster.mesh {
                    None => "plaintext",
                    Some(peers) if peers.quic_port.is_some() => "quic",
                    Some(peers) if peers.hbone_port.is_some() => "hbone",
                    Some(_) => "mesh-tls",
                };
                let mut report = match &cluster.targets {
                    crate::state::cluster::Targets::Endpoints(set) => set.report(),
                    crate::state::cluster::Targets::OriginalDestination => json!({"original_destination": true}),
                };
                report["name"] = json!(cluster.name.as_ref());
                report["transport"] = json!(transport);
                report
            })
            .collect();
        let quic: Vec<serde_json::Value> = self
            .data
            .quic_paths
            .all()
            .into_iter()
            .map(|path| {
                json!({
                    "peer": path.peer.to_string(),
                    "worker": path.worker,
                    "state": path.state,
                    "identity": path.identity,
                    "rtt_ms": path.rtt.as_secs_f64() * 1e3,
                    "sent_packets": path.sent_packets,
                    "lost_packets": path.lost_packets,
                    "congestion_window": path.congestion_window,
                    "tunnels": path.tunnels,
                })
            })
            .collect();
        json!({ "version": snapshot.version, "clusters": list, "quic_paths": quic })
    }
}

/// Serves the admin API on `socket` until the runtime stops.
pub async fn serve(socket: std::net::TcpListener, state: Arc<AdminState>) {
    let listener = match tokio::net::TcpListener::from_std(socket) {
        Ok(listener) => listener,
        Err(error) => {
            warn!(%error, "cannot serve the admin API");
            return;
        }
    };
    let mut builder = http1::Builder::new();
    // half_close: a probe that shuts down its sending side after the request still gets an answer.
    builder.timer(TokioTimer::new()).header_read_timeout(limits::DEFAULT_HEADER_TIMEOUT).half_close(true);
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(limits::ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let local = peer.ip().is_loopback();
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&request, state, local).await) }
            });
            if let Err(error) = builder.serve_connection(TokioIo::new(stream), service).await {
                debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

/// Answers one request; `local`: whether the caller is on loopback.
async fn respond(request: &Request<Incoming>, state: Arc<AdminState>, local: bool) -> Response<Full<Bytes>> {
    if request.uri().path() == "/logging" {
        return logging(request, local);
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "the admin API only answers GET (and POST /logging)\n");
    }
    let report = match request.uri().path() {
        "/live" => return text(StatusCode::OK, "live\n"),
        "/ready" if state.is_ready() => return text(StatusCode::OK, "ready\n"),
        "/ready" if state.data.drain.is_draining() => return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/ready" => return text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let open_metrics = request
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            Report::Metrics { open_metrics }
        }
        "/config_dump" => Report::ConfigDump,
        "/clusters" => Report::Clusters,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found; try /live, /ready, /metrics, /config_dump, /clusters or /logging\n",
            );
        }
    };
    match tokio::task::spawn_blocking(move || report.render(&state)).await {
        Ok(response) => response,
        Err(error) => {
            warn!(%error, "an admin report failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "the report failed; see the proxy's log\n")
        }
    }
}

/// An answer that grows with the config, rendered off the admin thread.
enum Report {
    Metrics { open_metrics: bool },
    ConfigDump,
    Clusters,
}

impl Report {
    fn render(self, state: &AdminState) -> Response<Full<Bytes>> {
        match self {
            Report::Metrics { open_metrics: true } => with_type(
                StatusCode::OK,
                telemetry::encode(&state.metrics),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            Report::Metrics { open_metrics: false } => with_type(
                StatusCode::OK,
                telemetry::encode_prometheus(&state.metrics),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            Report::ConfigDump => {
                let body = serde_json::to_string_pretty(&state.config_dump()).unwrap_or_default();
                with_type(StatusCode::OK, body + "\n", "application/json")
            }
            Report::Clusters => {
                let body = serde_json::to_string_pretty(&state.clusters()).unwrap_or_default();
                with_type(StatusCode::OK, body + "\n", "application/json")
            }
        }
    }
}

/// `GET /logging` reads the log filter; `POST /logging?filter=...` (or `?level=...`) replaces it.
fn logging(request: &Request<Incoming>, local: bool) -> Response<Full<Bytes>> {
    let plain = |status, body: String| with_type(status, body, "text/plain; charset=utf-8");
    match *request.method() {
        Method::POST if !local => {
            plain(StatusCode::FORBIDDEN, "the log filter can be changed from loopback only\n".into())
        }
        Method::GET | Method::HEAD => match logging::current() {
            Some(filter) => plain(StatusCode::OK, format!("{filter}\n")),
            None => plain(StatusCode::NOT_FOUND, "the log filter cannot be changed in this process\n".into()),
        },
        Method::POST => {
            let query = request.uri().query().unwrap_or("");
            let wanted = query.split('&').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                matches!(key, "filter" | "level").then(|| percent_decode(value))
            });
            let Some(filter) = wanted else {
                return plain(StatusCode::BAD_REQUEST, "give the new filter as ?filter=... or ?level=...\n".into());
            };
            match logging::set(&filter) {
                Ok(()) => {
                    tracing::info!(%filter, "log filter changed");
                    plain(StatusCode::OK, format!("{filter}\n"))
                }
                Err(error @ logging::LoggingError::Invalid { .. }) => {
                    plain(StatusCode::BAD_REQUEST, format!("{error}\n"))
                }
                Err(error) => plain(StatusCode::NOT_FOUND, format!("{error}\n")),
            }
        }
        _ => plain(StatusCode::METHOD_NOT_ALLOWED, "/logging answers GET and POST\n".into()),
    }
}

/// Decodes `%XX` escapes and `+` (a space) in a query value; a malformed escape stays as written.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(status, body.to_owned(), "text/plain; charset=utf-8")
}

fn with_type(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Why [`wait_ready`] gave up.
#[derive(Debug, thiserror::Error)]
#[error("the proxy at {address} was not ready within {waited:?}{}", last.as_ref().map(|l| format!(" (last answer: {l})")).unwrap_or_default())]
pub struct NotReady {
    /// The admin address asked.
    pub address: std::net::SocketAddr,
    /// How long it waited.
    pub waited: std::time::Duration,
    /// The last status line or connection error.
    pub last: Option<String>,
}

/// Polls `GET /ready` on the admin server at `address` until it answers 200, for at most `timeout`
/// (`remora wait-ready`, the legacy sidecar's postStart hook). Blocking: it runs alone in its process.
pub fn wait_ready(address: std::net::SocketAddr, timeout: std::time::Duration) -> Result<(), NotReady> {
    use std::io::{Read, Write};
    const POLL: std::time::Duration = std::time::Duration::from_millis(200);
    let started = std::time::Instant::now();
    let mut last = None;
    while started.elapsed() < timeout {
        let answer = (|| {
            let mut stream = std::net::TcpStream::connect_timeout(&address, POLL)?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
            stream.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
            let mut head = [0u8; 64];
            let n = stream.read(&mut head)?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).lines().next().unwrap_or_default().to_owned())
        })();
        match answer {
            Ok(status) if status.starts_with("HTTP/1.1 200") => return Ok(()),
            Ok(status) => last = Some(status),
            Err(error) => last = Some(error.to_string()),
        }
        std::thread::sleep(POLL);
    }
    Err(NotReady { address, waited: timeout, last })
}
