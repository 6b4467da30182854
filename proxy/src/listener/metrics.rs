//! The listeners' metrics: connections accepted, open, closed and refused, bytes both ways, and HTTP
//! responses by status class.
//!
//! [`ListenerMetrics::register`] declares the families (the composition root calls it once); a
//! snapshot build asks [`ListenerMetrics::listener`] for each listener's [`ListenerStats`], whose
//! counters the accept loop, the byte meter and the HTTP server bump with atomic adds.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::telemetry::{Registry, STATUS_CLASSES, class_index};

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

/// The listener metric families.
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    connections: Family<ListenerLabels, Counter>,
    active: Family<ListenerLabels, Gauge>,
    closed: Family<ListenerLabels, Counter>,
    rejected: Family<ListenerLabels, Counter>,
    received: Family<ListenerLabels, Counter>,
    sent: Family<ListenerLabels, Counter>,
    rate_limited: Family<ListenerLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
}

impl ListenerMetrics {
    /// Declares the families in `registry`.
    pub fn register(registry: &mut Registry) -> ListenerMetrics {
        let m = ListenerMetrics::default();
        registry.register("listener_connections", "Downstream connections accepted", m.connections.clone());
        registry.register("listener_connections_active", "Downstream connections open now", m.active.clone());
        registry.register(
            "listener_connections_closed",
            "Downstream connections served and closed (those rejected at once are counted apart)",
            m.closed.clone(),
        );
        registry.register(
            "listener_connections_rejected",
            "Downstream connections closed at once because the listener was at max_connections",
            m.rejected.clone(),
        );
        registry.register("listener_received_bytes", "Bytes read from downstream clients", m.received.clone());
        registry.register("listener_sent_bytes", "Bytes written to downstream clients", m.sent.clone());
        registry.register(
            "listener_connections_rate_limited",
            "Downstream connections closed at once because the listener's connection rate limit was spent",
            m.rate_limited.clone(),
        );
        registry.register(
            "requests",
            "HTTP responses sent downstream, by listener and status class (local replies included)",
            m.requests.clone(),
        );
        m
    }

    /// The counters of listener `name`; the same name always yields the same counters.
    pub fn listener(&self, name: &str, direction: &'static str) -> Arc<ListenerStats> {
        let labels = ListenerLabels { listener: name.to_owned(), direction };
        let requests = STATUS_CLASSES.map(|status_class| {
            self.requests.get_or_create_owned(&RequestLabels { listener: name.to_owned(), direction, status_class })
        });
        Arc::new(ListenerStats {
            connections: self.connections.get_or_create_owned(&labels),
            active: self.active.get_or_create_owned(&labels),
            closed: self.closed.get_or_create_owned(&labels),
            rejected: self.rejected.get_or_create_owned(&labels),
            bytes_received: self.received.get_or_create_owned(&labels),
            bytes_sent: self.sent.get_or_create_owned(&labels),
            rate_limited: self.rate_limited.get_or_create_owned(&labels),
            requests,
        })
    }
}

/// Counters of one listener.
#[derive(Debug)]
pub struct ListenerStats {
    /// Connections accepted.
    pub connections: Counter,
    /// Connections open now.
    pub active: Gauge,
    /// Connections that were served and have closed (rejected ones are counted apart).
    pub closed: Counter,
    /// Connections closed at once because the listener was at `max_connections`.
    pub rejected: Counter,
    /// Bytes read from downstream clients.
    pub bytes_received: Counter,
    /// Bytes written to downstream clients.
    pub bytes_sent: Counter,
    /// Connections closed at once because the listener's connection rate limit was spent.
    pub rate_limited: Counter,
    requests: [Counter; 5],
}

impl ListenerStats {
    /// Counts one HTTP response sent downstream with `status`.
    pub fn record_response(&self, status: u16) {
        self.requests[class_index(status)].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{encode, registry};

    #[test]
    fn stats_for_one_name_share_counters_and_render() {
        let mut registry = registry();
        let metrics = ListenerMetrics::register(&mut registry);
        let a = metrics.listener("web", "outbound");
        let b = metrics.listener("web", "outbound");
        a.record_response(200);
        b.record_response(204);
        b.record_response(503);
        b.record_response(700);
        let text = encode(&registry);
        assert!(
            text.contains(r#"remora_requests_total{listener="web",direction="outbound",status_class="2xx"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"status_class="5xx"} 2"#), "{text}");
    }
}
