//! The listeners' metrics: connections accepted, open, closed and refused, bytes both ways, HTTP
//! responses by status class, and, on inbound listeners, per calling workload: connections, bytes
//! both ways, requests by status class and by gRPC status, and their latency.
//!
//! [`ListenerMetrics::register`] declares the families (the composition root calls it once); a
//! snapshot build asks [`ListenerMetrics::listener`] for each listener's [`ListenerStats`], whose
//! counters the accept loop, the byte meter and the HTTP server bump with atomic adds. An inbound
//! connection takes its caller's [`CallerStats`] once, when it is accepted
//! ([`ListenerStats::caller`]: the namespace and service account of the identity its mTLS peer
//! proved, both empty for plaintext), and each request on it is counted there with no lookup; its
//! byte meter flushes into the caller's byte counters as into the listener's.
//! The callers' labels come only from identities the mesh's CA signed, so they are bounded by the
//! mesh's service accounts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remora_control_api::identity::SpiffeId;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::telemetry::{GrpcCounters, Histogram, Registry, STATUS_CLASSES, class_index};

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
struct TunnelLabels {
    listener: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerLabels {
    listener: String,
    client_namespace: String,
    client_account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerRequestLabels {
    #[prometheus(flatten)]
    caller: CallerLabels,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerGrpcLabels {
    #[prometheus(flatten)]
    caller: CallerLabels,
    grpc_status: u32,
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
    caller_requests: Family<CallerRequestLabels, Counter>,
    caller_duration: Family<CallerLabels, Histogram>,
    caller_grpc: Family<CallerGrpcLabels, Counter>,
    caller_connections: Family<CallerLabels, Counter>,
    caller_received: Family<CallerLabels, Counter>,
    caller_sent: Family<CallerLabels, Counter>,
    tunnels: Family<TunnelLabels, Counter>,
    tunnels_active: Family<ListenerLabels, Gauge>,
    certificate_reloads: Family<TunnelLabels, Counter>,
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
        registry.register(
            "inbound_caller_requests",
            "HTTP responses sent on an inbound listener, by the calling workload (the namespace and service account its mTLS identity names; both empty for plaintext) and status class",
            m.caller_requests.clone(),
        );
        registry.register(
            "inbound_caller_request_duration_seconds",
            "Time from a request's arrival on an inbound listener to its response head, by the calling workload",
            m.caller_duration.clone(),
        );
        registry.register(
            "inbound_caller_grpc_responses",
            "gRPC calls answered on an inbound listener, by the calling workload and grpc-status",
            m.caller_grpc.clone(),
        );
        registry.register(
            "inbound_caller_connections",
            "Connections accepted on an inbound listener, by the calling workload (HTTP and opaque TCP alike)",
            m.caller_connections.clone(),
        );
        registry.register(
            "inbound_caller_received_bytes",
            "Bytes read from the calling workload on an inbound listener (after mTLS is taken off)",
            m.caller_received.clone(),
        );
        registry.register(
            "inbound_caller_sent_bytes",
            "Bytes written to the calling workload on an inbound listener (before mTLS is put on)",
            m.caller_sent.clone(),
        );
        registry.register(
            "listener_tunnels",
            "CONNECT streams on an HBONE listener, by result: opened, or refused as bad_request, misdirected (not an address of this host), denied (authorization) or unavailable",
            m.tunnels.clone(),
        );
        registry.register(
            "listener_tunnels_active",
            "Tunnels open now on an HBONE listener (each also counts as a connection while it is served)",
            m.tunnels_active.clone(),
        );
        registry.register(
            "listener_certificate_reloads",
            "Re-reads of an HTTP/3 listener's certificate files after they changed, by result: ok, or failed (the certificate in use kept serving)",
            m.certificate_reloads.clone(),
        );
        m
    }

    /// The certificate reload counters of HTTP/3 listener `name`.
    pub fn certificate_reloads(&self, name: &str) -> CertificateReloads {
        let result =
            |result| self.certificate_reloads.get_or_create_owned(&TunnelLabels { listener: name.to_owned(), result });
        CertificateReloads { ok: result("ok"), failed: result("failed") }
    }

    /// The tunnel counters of HBONE listener `name`.
    pub fn tunnels(&self, name: &str) -> Arc<TunnelStats> {
        let result = |result| self.tunnels.get_or_create_owned(&TunnelLabels { listener: name.to_owned(), result });
        let labels = ListenerLabels { listener: name.to_owned(), direction: "inbound" };
        Arc::new(TunnelStats {
            active: self.tunnels_active.get_or_create_owned(&labels),
            opened: result("opened"),
            refused: TunnelRefusal::ALL.map(|refusal| result(refusal.label())),
        })
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
            callers: (direction == "inbound").then(|| Callers {
                families: self.clone(),
                listener: name.to_owned(),
                known: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// The calling workloads an inbound listener has seen, each with its counters.
#[derive(Debug)]
struct Callers {
    families: ListenerMetrics,
    listener: String,
    /// By SPIFFE ID (empty for plaintext): a caller's counters, made on its first connection.
    known: Mutex<HashMap<String, Arc<CallerStats>>>,
}

impl Callers {
    fn caller(&self, identity: Option<&SpiffeId>) -> Arc<CallerStats> {
        let id = identity.map_or("", SpiffeId::as_str);
        let mut known = self.known.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(stats) = known.get(id) {
            return stats.clone();
        }
        let (client_namespace, client_account) = workload(identity);
        let labels = CallerLabels { listener: self.listener.clone(), client_namespace, client_account };
        let requests = STATUS_CLASSES.map(|status_class| {
            self.families
                .caller_requests
                .get_or_create_owned(&CallerRequestLabels { caller: labels.clone(), status_class })
        });
        let families = &self.families;
        let stats = Arc::new(CallerStats {
            requests,
            duration: families.caller_duration.get_or_create_owned(&labels),
            connections: families.caller_connections.get_or_create_owned(&labels),
            received: families.caller_received.get_or_create_owned(&labels),
            sent: families.caller_sent.get_or_create_owned(&labels),
            grpc: Default::default(),
            family: families.caller_grpc.clone(),
            labels,
        });
        known.insert(id.to_owned(), stats.clone());
        stats
    }
}

/// The namespace and service account a SPIFFE ID of the form `spiffe://TD/ns/NS/sa/SA` names; an ID
/// of another form is its whole path as the account, in no namespace; no ID, both empty.
fn workload(identity: Option<&SpiffeId>) -> (String, String) {
    let Some(id) = identity else { return (String::new(), String::new()) };
    let path = id.path();
    match path.strip_prefix("/ns/").and_then(|rest| rest.split_once("/sa/")) {
        Some((namespace, account)) if !namespace.contains('/') && !account.contains('/') => {
            (namespace.to_owned(), account.to_owned())
        }
        _ => (String::new(), path.to_owned()),
    }
}

/// What one calling workload's connections and requests on one inbound listener count.
#[derive(Debug)]
pub struct CallerStats {
    requests: [Counter; 5],
    duration: Histogram,
    /// Connections accepted.
    pub connections: Counter,
    /// Bytes read from it.
    pub received: Counter,
    /// Bytes written to it.
    pub sent: Counter,
    /// Per gRPC status, its counter, made on its first call that ends so.
    grpc: GrpcCounters,
    family: Family<CallerGrpcLabels, Counter>,
    labels: CallerLabels,
}

impl CallerStats {
    /// Counts one response with `status`, `elapsed` after the request arrived.
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.requests[class_index(status)].inc();
        self.duration.observe(elapsed);
    }

    /// Counts one gRPC call that ended with `code` (codes above 16 count as 2, UNKNOWN).
    pub fn record_grpc(&self, code: u32) {
        self.grpc.inc(code, |grpc_status| {
            self.family.get_or_create_owned(&CallerGrpcLabels { caller: self.labels.clone(), grpc_status })
        });
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
    /// On an inbound listener, its callers' counters.
    callers: Option<Callers>,
}

/// An HTTP/3 listener's certificate reloads, by result.
#[derive(Clone, Debug, Default)]
pub struct CertificateReloads {
    /// The files changed and their new set serves.
    pub ok: Counter,
    /// The files changed and did not load; the certificate in use kept serving.
    pub failed: Counter,
}

/// Why a tunnel was refused: the `result` label of `listener_tunnels`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelRefusal {
    /// Not a `CONNECT ip:port` (answered 400).
    BadRequest,
    /// To an address that is not this host's (answered 400).
    Misdirected,
    /// The authorization policy covering the port allows the peer nothing (answered 401).
    Denied,
    /// The listener is going away, or the proxy is draining (answered 503).
    Unavailable,
}

impl TunnelRefusal {
    const ALL: [TunnelRefusal; 4] =
        [TunnelRefusal::BadRequest, TunnelRefusal::Misdirected, TunnelRefusal::Denied, TunnelRefusal::Unavailable];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            TunnelRefusal::BadRequest => "bad_request",
            TunnelRefusal::Misdirected => "misdirected",
            TunnelRefusal::Denied => "denied",
            TunnelRefusal::Unavailable => "unavailable",
        }
    }
}

/// One HBONE listener's tunnel counters.
#[derive(Debug)]
pub struct TunnelStats {
    /// Tunnels open now.
    pub active: Gauge,
    opened: Counter,
    refused: [Counter; 4],
}

impl TunnelStats {
    /// Counts a tunnel opened (a `200` sent).
    pub fn opened(&self) {
        self.opened.inc();
    }

    /// Counts a tunnel refused for `refusal`.
    pub fn refused(&self, refusal: TunnelRefusal) {
        self.refused[refusal as usize].inc();
    }
}

impl ListenerStats {
    /// The counters of the workload calling on a new connection, proven by `identity` (`None`:
    /// plaintext); none on an outbound listener, whose caller is the sidecar's own app.
    pub fn caller(&self, identity: Option<&SpiffeId>) -> Option<Arc<CallerStats>> {
        self.callers.as_ref().map(|callers| callers.caller(identity))
    }

    /// Counts one HTTP response sent downstream with `status`.
    pub fn record_response(&self, status: u16) {
        self.requests[class_index(status)].inc();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

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

    /// An inbound listener counts each calling workload apart, by the namespace and account its
    /// identity names (plaintext with both empty): responses by status class and gRPC status,
    /// latency, connections and the bytes its connections' meters flush (a connection counts to
    /// the first caller named); an outbound one has no callers.
    #[test]
    fn inbound_requests_count_per_calling_workload() {
        let mut registry = registry();
        let metrics = ListenerMetrics::register(&mut registry);
        let inbound = metrics.listener("inbound", "inbound");
        let web = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").ok();
        let odd = SpiffeId::parse("spiffe://example.org/agent/7").ok();
        let first = inbound.caller(web.as_ref()).unwrap();
        let again = inbound.caller(web.as_ref()).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "one caller, one set of counters");
        first.record(200, Duration::from_millis(3));
        again.record(503, Duration::from_millis(3));
        inbound.caller(None).unwrap().record(200, Duration::from_millis(1));
        inbound.caller(odd.as_ref()).unwrap().record(200, Duration::from_millis(1));
        first.record_grpc(14);
        first.record_grpc(99);
        let meter = crate::io::Meter::default();
        meter.attribute(first.clone());
        meter.attribute(inbound.caller(None).unwrap());
        meter.add_received(10);
        meter.add_sent(4);
        meter.flush(&inbound);
        meter.add_received(5);
        meter.flush(&inbound);
        assert!(metrics.listener("outbound", "outbound").caller(web.as_ref()).is_none());
        let text = encode(&registry);
        for series in [
            r#"remora_inbound_caller_requests_total{listener="inbound",client_namespace="shop",client_account="web",status_class="2xx"} 1"#,
            r#"remora_inbound_caller_requests_total{listener="inbound",client_namespace="shop",client_account="web",status_class="5xx"} 1"#,
            r#"remora_inbound_caller_requests_total{listener="inbound",client_namespace="",client_account="",status_class="2xx"} 1"#,
            r#"remora_inbound_caller_requests_total{listener="inbound",client_namespace="",client_account="/agent/7",status_class="2xx"} 1"#,
            r#"remora_inbound_caller_request_duration_seconds_count{listener="inbound",client_namespace="shop",client_account="web"} 2"#,
            r#"remora_inbound_caller_grpc_responses_total{listener="inbound",client_namespace="shop",client_account="web",grpc_status="14"} 1"#,
            r#"remora_inbound_caller_grpc_responses_total{listener="inbound",client_namespace="shop",client_account="web",grpc_status="2"} 1"#,
            r#"remora_inbound_caller_connections_total{listener="inbound",client_namespace="shop",client_account="web"} 1"#,
            r#"remora_inbound_caller_connections_total{listener="inbound",client_namespace="",client_account=""} 0"#,
            r#"remora_inbound_caller_received_bytes_total{listener="inbound",client_namespace="shop",client_account="web"} 15"#,
            r#"remora_inbound_caller_sent_bytes_total{listener="inbound",client_namespace="shop",client_account="web"} 4"#,
            r#"remora_inbound_caller_received_bytes_total{listener="inbound",client_namespace="",client_account=""} 0"#,
        ] {
            assert!(text.contains(series), "{series}\n{text}");
        }
    }
}
