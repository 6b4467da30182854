//! The proxy's end of the control-plane stream: each response applied, answered, and reported.
//!
//! The Delta-ADS stream itself is `remora_control_api::xds::client`; this module is the proxy's
//! [`Handler`] for it. Each response goes to the reloader, which applies it on top of the resources
//! held so far (composed with the file's static ones and warmed by `state::compose`), compiles the
//! serving set into a snapshot off the data path, binds new listeners and swaps — or, if any of
//! that fails, keeps the previous snapshot. The handler answers with an ACK (the update is serving)
//! or a NACK naming the resource and field, marks the proxy ready once every kind has been applied
//! once, and keeps `/config_dump`'s report of what was answered and when. Its metrics
//! ([`XdsMetrics`]): whether the stream is open, and updates by type and answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use remora_control_api::Kind;
use remora_control_api::grpc::ControlTls;
use remora_control_api::xds::client::{self, ClientConfig, Handler, Update};
use serde_json::json;
use tracing::{info, warn};

use crate::admin::AdminState;
use crate::reload::Reloader;
use crate::telemetry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XdsLabels {
    r#type: &'static str,
    result: &'static str,
}

/// The control-plane stream's metrics.
#[derive(Clone, Debug, Default)]
pub struct XdsMetrics {
    connected: Gauge,
    updates: Family<XdsLabels, Counter>,
}

impl XdsMetrics {
    /// Declares the families in `registry`.
    pub fn register(registry: &mut Registry) -> XdsMetrics {
        let m = XdsMetrics::default();
        registry.register(
            "control_plane_connected",
            "1 while the stream to the control plane is open",
            m.connected.clone(),
        );
        registry.register(
            "xds_updates",
            "Control-plane updates, by resource type and result (ack, nack)",
            m.updates.clone(),
        );
        m
    }

    /// Records whether the control-plane stream is open.
    fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
    }

    /// Counts a control-plane update of `kind`, accepted or rejected.
    fn record_update(&self, kind: &'static str, accepted: bool) {
        let result = if accepted { "ack" } else { "nack" };
        self.updates.get_or_create(&XdsLabels { r#type: kind, result }).inc();
    }
}

/// The last answer sent for one kind.
#[derive(Clone, Debug, Default)]
struct KindReport {
    system_version: String,
    last_ack: Option<SystemTime>,
    last_nack: Option<(SystemTime, String)>,
}

/// The proxy's [`Handler`]: applies updates through the reloader, answers, and reports.
#[derive(Debug)]
pub struct XdsHandler {
    reloader: Arc<Reloader>,
    admin: Arc<AdminState>,
    metrics: XdsMetrics,
    address: String,
    tls: Option<ControlTls>,
    token_file: Option<std::path::PathBuf>,
    connected: bool,
    acked: [bool; Kind::COUNT],
    reports: [KindReport; Kind::COUNT],
}

impl XdsHandler {
    /// A handler applying through `reloader`.
    pub fn new(reloader: Arc<Reloader>, admin: Arc<AdminState>, metrics: XdsMetrics, address: String) -> Self {
        XdsHandler {
            reloader,
            admin,
            metrics,
            address,
            tls: None,
            token_file: None,
            connected: false,
            acked: [false; Kind::COUNT],
            reports: Default::default(),
        }
    }

    /// Checks an `https://` control plane's certificate against `tls`.
    pub fn with_tls(mut self, tls: Option<ControlTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Authenticates the stream with the bearer token in `token_file` (the one the CA is asked
    /// with), for a control plane that serves only proxies it knows.
    pub fn with_token(mut self, token_file: Option<std::path::PathBuf>) -> Self {
        self.token_file = token_file;
        self
    }

    fn publish_report(&self) {
        let at = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut kinds = serde_json::Map::new();
        for kind in Kind::ALL {
            let report = &self.reports[kind.index()];
            kinds.insert(
                kind.as_str().to_owned(),
                json!({
                    "system_version": report.system_version,
                    "last_ack_unix_seconds": report.last_ack.map(at),
                    "last_nack": report.last_nack.as_ref().map(|(t, error)| json!({"unix_seconds": at(*t), "error": error})),
                }),
            );
        }
        self.admin.set_xds_report(json!({
            "address": self.address,
            "connected": self.connected,
            "types": kinds,
            "resources": self.reloader.dynamic_report(),
        }));
    }
}

impl Handler for XdsHandler {
    fn versions(&self, kind: Kind) -> HashMap<String, String> {
        self.reloader.dynamic_versions(kind)
    }

    fn apply(&mut self, update: Update) -> Result<(), String> {
        self.reloader.apply_update(&update).map(|_| ()).map_err(|e| e.to_string())
    }

    fn connected(&mut self, connected: bool) {
        self.connected = connected;
        self.metrics.set_connected(connected);
        self.publish_report();
    }

    fn answered(&mut self, kind: Kind, system_version: &str, nack: Option<&str>) {
        let report = &mut self.reports[kind.index()];
        self.metrics.record_update(kind.as_str(), nack.is_none());
        match nack {
            None => {
                report.system_version = system_version.to_owned();
                report.last_ack = Some(SystemTime::now());
                self.acked[kind.index()] = true;
                if self.acked.iter().all(|a| *a) && !self.admin.is_ready() {
                    info!("first configuration from the control plane applied; ready");
                    self.admin.set_ready();
                }
            }
            Some(error) => {
                warn!(r#type = %kind, %error, "rejected an update from the control plane; the previous config keeps serving");
                report.last_nack = Some((SystemTime::now(), error.to_owned()));
            }
        }
        self.publish_report();
    }
}

/// Runs the control-plane stream for ever (reconnecting), and marks the proxy ready after
/// `initial_fetch_timeout` even if the first configuration has not arrived by then.
pub async fn run(mut handler: XdsHandler, node_id: String, initial_fetch_timeout: Duration) {
    let admin = handler.admin.clone();
    let started = Instant::now();
    tokio::spawn(async move {
        tokio::time::sleep(initial_fetch_timeout).await;
        if !admin.is_ready() {
            warn!(waited = ?started.elapsed(), "no complete configuration from the control plane yet; ready with what there is");
            admin.set_ready();
        }
    });
    handler.publish_report();
    let config = ClientConfig {
        address: handler.address.clone(),
        node_id,
        kinds: Kind::ALL.to_vec(),
        tls: handler.tls.clone(),
        token_file: handler.token_file.clone(),
    };
    let error = client::run(config, &mut handler).await;
    warn!(%error, "control plane stream stopped");
}
