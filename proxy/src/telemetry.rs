//! Metrics: the Prometheus registry and the pre-resolved counters the data path bumps.
//!
//! Label lookups (a hash and a lock in `prometheus-client`'s `Family`) happen when a snapshot is
//! built, never per request: each listener and cluster gets a [`ListenerStats`] / [`ClusterStats`]
//! holding its counters, and the data path only does atomic adds on them. The same labels always
//! resolve to the same counters, so totals run on across config reloads. `/metrics` renders the
//! registry through [`Metrics::encode`].
//!
//! Labels are bounded by config (listener and cluster names, status classes), never by traffic.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: String,
    direction: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterClassLabels {
    cluster: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterReasonLabels {
    cluster: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index into a `[Counter; 5]` of status classes. Codes hyper accepts but HTTP does not define
/// (600-999) count as 5xx: the server that sent them is broken.
fn class_index(status: u16) -> usize {
    (usize::from(status / 100)).clamp(1, 5) - 1
}

/// Counters of one listener.
#[derive(Debug)]
pub struct ListenerStats {
    /// Connections accepted.
    pub connections: Counter,
    /// Connections open now.
    pub active: Gauge,
    /// Connections closed at once because the listener was at `max_connections`.
    pub rejected: Counter,
    /// Bytes read from downstream clients.
    pub bytes_received: Counter,
    /// Bytes written to downstream clients.
    pub bytes_sent: Counter,
    requests: [Counter; 5],
}

impl ListenerStats {
    /// Counts one HTTP response sent downstream with `status`.
    pub fn record_response(&self, status: u16) {
        self.requests[class_index(status)].inc();
    }
}

/// Counters of one cluster.
#[derive(Debug)]
pub struct ClusterStats {
    /// Upstream connections opened.
    pub connections: Counter,
    /// Connects refused or failed.
    pub connect_failures: Counter,
    /// Connects that hit the connect timeout.
    pub connect_timeouts: Counter,
    /// Opaque TCP bytes sent to the cluster's endpoints.
    pub tcp_bytes_sent: Counter,
    /// Opaque TCP bytes received from them.
    pub tcp_bytes_received: Counter,
    responses: [Counter; 5],
}

impl ClusterStats {
    /// Counts one response received from an endpoint of the cluster.
    pub fn record_response(&self, status: u16) {
        self.responses[class_index(status)].inc();
    }
}

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    listener_connections: Family<ListenerLabels, Counter>,
    listener_active: Family<ListenerLabels, Gauge>,
    listener_rejected: Family<ListenerLabels, Counter>,
    listener_received: Family<ListenerLabels, Counter>,
    listener_sent: Family<ListenerLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    upstream_connections: Family<ClusterLabels, Counter>,
    upstream_connect_errors: Family<ClusterReasonLabels, Counter>,
    upstream_responses: Family<ClusterClassLabels, Counter>,
    upstream_tcp_sent: Family<ClusterLabels, Counter>,
    upstream_tcp_received: Family<ClusterLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    config_version: Family<VersionLabels, Gauge>,
    workers: Gauge,
    control_plane_connected: Gauge,
    xds_updates: Family<XdsLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XdsLabels {
    r#type: &'static str,
    result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with every metric family declared (and so listed by `/metrics`).
    pub fn new() -> Self {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("remora"),
            listener_connections: Family::default(),
            listener_active: Family::default(),
            listener_rejected: Family::default(),
            listener_received: Family::default(),
            listener_sent: Family::default(),
            requests: Family::default(),
            upstream_connections: Family::default(),
            upstream_connect_errors: Family::default(),
            upstream_responses: Family::default(),
            upstream_tcp_sent: Family::default(),
            upstream_tcp_received: Family::default(),
            reloads: Family::default(),
            config_version: Family::default(),
            workers: Gauge::default(),
            control_plane_connected: Gauge::default(),
            xds_updates: Family::default(),
        };
        let r = &mut metrics.registry;
        r.register("listener_connections", "Downstream connections accepted", metrics.listener_connections.clone());
        r.register("listener_connections_active", "Downstream connections open now", metrics.listener_active.clone());
        r.register(
            "listener_connections_rejected",
            "Downstream connections closed at once because the listener was at max_connections",
            metrics.listener_rejected.clone(),
        );
        r.register("listener_received_bytes", "Bytes read from downstream clients", metrics.listener_received.clone());
        r.register("listener_sent_bytes", "Bytes written to downstream clients", metrics.listener_sent.clone());
        r.register(
            "requests",
            "HTTP responses sent downstream, by listener and status class (local replies included)",
            metrics.requests.clone(),
        );
        r.register("upstream_connections", "Upstream connections opened", metrics.upstream_connections.clone());
        r.register(
            "upstream_connect_errors",
            "Upstream connects that failed, by reason (refused, timeout)",
            metrics.upstream_connect_errors.clone(),
        );
        r.register(
            "upstream_responses",
            "HTTP responses received from upstream endpoints, by cluster and status class",
            metrics.upstream_responses.clone(),
        );
        r.register("upstream_tcp_sent_bytes", "Opaque TCP bytes sent to a cluster", metrics.upstream_tcp_sent.clone());
        r.register(
            "upstream_tcp_received_bytes",
            "Opaque TCP bytes received from a cluster",
            metrics.upstream_tcp_received.clone(),
        );
        r.register("config_reloads", "Config reloads, by result (applied, rejected)", metrics.reloads.clone());
        r.register("config_version", "1 for the version of the config serving now", metrics.config_version.clone());
        r.register("workers", "Worker threads", metrics.workers.clone());
        r.register(
            "control_plane_connected",
            "1 while the stream to the control plane is open",
            metrics.control_plane_connected.clone(),
        );
        r.register(
            "xds_updates",
            "Control-plane updates, by resource type and result (ack, nack)",
            metrics.xds_updates.clone(),
        );
        metrics
    }

    /// The counters of listener `name`; the same name always yields the same counters.
    pub fn listener(&self, name: &str, direction: &'static str) -> Arc<ListenerStats> {
        let labels = ListenerLabels { listener: name.to_owned(), direction };
        let requests = STATUS_CLASSES.map(|status_class| {
            self.requests.get_or_create_owned(&RequestLabels { listener: name.to_owned(), direction, status_class })
        });
        Arc::new(ListenerStats {
            connections: self.listener_connections.get_or_create_owned(&labels),
            active: self.listener_active.get_or_create_owned(&labels),
            rejected: self.listener_rejected.get_or_create_owned(&labels),
            bytes_received: self.listener_received.get_or_create_owned(&labels),
            bytes_sent: self.listener_sent.get_or_create_owned(&labels),
            requests,
        })
    }

    /// The counters of cluster `name`; the same name always yields the same counters.
    pub fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        let labels = ClusterLabels { cluster: name.to_owned() };
        let reason = |reason| ClusterReasonLabels { cluster: name.to_owned(), reason };
        let responses = STATUS_CLASSES.map(|status_class| {
            self.upstream_responses.get_or_create_owned(&ClusterClassLabels { cluster: name.to_owned(), status_class })
        });
        Arc::new(ClusterStats {
            connections: self.upstream_connections.get_or_create_owned(&labels),
            connect_failures: self.upstream_connect_errors.get_or_create_owned(&reason("refused")),
            connect_timeouts: self.upstream_connect_errors.get_or_create_owned(&reason("timeout")),
            tcp_bytes_sent: self.upstream_tcp_sent.get_or_create_owned(&labels),
            tcp_bytes_received: self.upstream_tcp_received.get_or_create_owned(&labels),
            responses,
        })
    }

    /// Counts a reload attempt.
    pub fn record_reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Marks `version` as the config serving now (and no other).
    pub fn set_config_version(&self, version: &str) {
        self.config_version.clear();
        self.config_version.get_or_create(&VersionLabels { version: version.to_owned() }).set(1);
    }

    /// Records whether the control-plane stream is open.
    pub fn set_control_plane_connected(&self, connected: bool) {
        self.control_plane_connected.set(i64::from(connected));
    }

    /// Counts a control-plane update of `kind`, accepted or rejected.
    pub fn record_xds_update(&self, kind: &'static str, accepted: bool) {
        let result = if accepted { "ack" } else { "nack" };
        self.xds_updates.get_or_create(&XdsLabels { r#type: kind, result }).inc();
    }

    /// Records the number of worker threads.
    pub fn set_workers(&self, workers: usize) {
        self.workers.set(i64::try_from(workers).unwrap_or(i64::MAX));
    }

    /// Renders every metric in the OpenMetrics text format that Prometheus scrapes.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_for_one_name_share_counters_and_render() {
        let metrics = Metrics::new();
        let a = metrics.listener("web", "outbound");
        let b = metrics.listener("web", "outbound");
        a.record_response(200);
        b.record_response(204);
        b.record_response(503);
        b.record_response(700);
        metrics.cluster("shop").record_response(404);
        let text = metrics.encode();
        assert!(
            text.contains(r#"remora_requests_total{listener="web",direction="outbound",status_class="2xx"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"status_class="5xx"} 2"#), "{text}");
        assert!(text.contains(r#"remora_upstream_responses_total{cluster="shop",status_class="4xx"} 1"#), "{text}");
    }

    #[test]
    fn only_the_current_version_is_marked() {
        let metrics = Metrics::new();
        metrics.set_config_version("aaa");
        metrics.set_config_version("bbb");
        let text = metrics.encode();
        assert!(text.contains(r#"remora_config_version{version="bbb"} 1"#), "{text}");
        assert!(!text.contains("aaa"), "{text}");
    }
}
