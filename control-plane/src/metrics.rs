//! The control plane's metrics, rendered at `/metrics` of its port in the OpenMetrics text format.
//!
//! The ADS server counts streams, pushes, ACKs and NACKs per resource type and observes convergence
//! (from a change being published to each proxy's ACK of it); the time each publication took to
//! make; the sources count loads and failures
//! and gauge how many resources and registered endpoints they hold; the CA counts signing requests
//! by result; the injector counts its reviews and its checks of the webhook's `caBundle`, and the
//! control plane the renewals of its own serving certificates.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use remora_control_api::Kind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
    result: &'static str,
}

/// Every metric of the control plane.
#[derive(Debug)]
pub struct ControlMetrics {
    registry: Registry,
    connected: Gauge,
    streams: Counter,
    refused: Counter,
    revoked: Counter,
    pushes: Family<TypeLabels, Counter>,
    pushed_resources: Family<TypeLabels, Counter>,
    pushed_bytes: Family<TypeLabels, Counter>,
    acks: Family<TypeLabels, Counter>,
    nacks: Family<TypeLabels, Counter>,
    convergence: Histogram,
    publish: Family<MadeLabels, Histogram, fn() -> Histogram>,
    loads: Family<SourceLabels, Counter>,
    resources: Family<TypeLabels, Gauge>,
    registered: Gauge,
    signed: Family<ResultLabels, Counter>,
    reviews: Family<ResultLabels, Counter>,
    ca_bundle: Family<ResultLabels, Counter>,
    renewals: Family<ResultLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MadeLabels {
    made: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlMetrics {
    /// A registry with every family declared.
    pub fn new() -> Self {
        let mut m = ControlMetrics {
            registry: Registry::with_prefix("remora_control"),
            connected: Gauge::default(),
            streams: Counter::default(),
            refused: Counter::default(),
            revoked: Counter::default(),
            pushes: Family::default(),
            pushed_resources: Family::default(),
            pushed_bytes: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            // 1 ms to ~16 s.
            convergence: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            publish: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 16))),
            loads: Family::default(),
            resources: Family::default(),
            registered: Gauge::default(),
            signed: Family::default(),
            reviews: Family::default(),
            ca_bundle: Family::default(),
            renewals: Family::default(),
        };
        let r = &mut m.registry;
        r.register("connected_proxies", "Proxies with an open discovery stream", m.connected.clone());
        r.register("streams", "Discovery streams opened", m.streams.clone());
        r.register("streams_refused", "Discovery streams refused for want of a valid token", m.refused.clone());
        r.register(
            "streams_revoked",
            "Open discovery streams closed because their token is no longer accepted",
            m.revoked.clone(),
        );
        r.register("pushes", "Discovery responses sent, by resource type", m.pushes.clone());
        r.register("pushed_resources", "Resources sent (added or changed), by type", m.pushed_resources.clone());
        r.register("pushed_bytes", "Encoded bytes of discovery responses sent, by type", m.pushed_bytes.clone());
        r.register("acks", "Responses proxies accepted, by type", m.acks.clone());
        r.register("nacks", "Responses proxies rejected, by type", m.nacks.clone());
        r.register(
            "convergence_seconds",
            "Time from a change being published to a proxy's ACK of it",
            m.convergence.clone(),
        );
        r.register(
            "publish_seconds",
            "Time from a source's change to its set being published, by how the set was made (whole, or changes: the changed Services alone)",
            m.publish.clone(),
        );
        r.register("source_loads", "Reads of a config source, by source and result", m.loads.clone());
        r.register("resources", "Resources served now, by type", m.resources.clone());
        r.register("registry_endpoints", "Endpoints registered in etcd now", m.registered.clone());
        r.register(
            "certificate_requests",
            "Certificate signing requests, by result (signed, unauthenticated, denied, invalid, error)",
            m.signed.clone(),
        );
        r.register(
            "injector_reviews",
            "Admission reviews the sidecar injector answered, by result (injected, skipped, denied, invalid)",
            m.reviews.clone(),
        );
        r.register(
            "injector_ca_bundle_checks",
            "Checks of the webhook configuration's caBundle against the CA root, by result (current, patched, error)",
            m.ca_bundle.clone(),
        );
        r.register(
            "serving_certificate_renewals",
            "Renewals of the control plane's own serving certificates (its port's, the injector's), by result",
            m.renewals.clone(),
        );
        m
    }

    pub(crate) fn stream_opened(&self) {
        self.streams.inc();
        self.connected.inc();
    }

    pub(crate) fn stream_refused(&self) {
        self.refused.inc();
    }

    pub(crate) fn stream_revoked(&self) {
        self.revoked.inc();
    }

    pub(crate) fn stream_closed(&self) {
        self.connected.dec();
    }

    pub(crate) fn pushed(&self, kind: Kind, resources: usize, bytes: usize) {
        let labels = TypeLabels { r#type: kind.as_str() };
        self.pushes.get_or_create(&labels).inc();
        self.pushed_resources.get_or_create(&labels).inc_by(resources as u64);
        self.pushed_bytes.get_or_create(&labels).inc_by(bytes as u64);
    }

    pub(crate) fn acked(&self, kind: Kind, convergence: Option<std::time::Duration>) {
        self.acks.get_or_create(&TypeLabels { r#type: kind.as_str() }).inc();
        if let Some(elapsed) = convergence {
            self.convergence.observe(elapsed.as_secs_f64());
        }
    }

    pub(crate) fn nacked(&self, kind: Kind) {
        self.nacks.get_or_create(&TypeLabels { r#type: kind.as_str() }).inc();
    }

    pub(crate) fn published(&self, made: &'static str, took: std::time::Duration) {
        self.publish.get_or_create(&MadeLabels { made }).observe(took.as_secs_f64());
    }

    pub(crate) fn source_loaded(&self, source: &'static str, ok: bool) {
        self.loads.get_or_create(&SourceLabels { source, result: if ok { "ok" } else { "error" } }).inc();
    }

    pub(crate) fn set_resources(&self, kind: Kind, count: usize) {
        self.resources.get_or_create(&TypeLabels { r#type: kind.as_str() }).set(count as i64);
    }

    pub(crate) fn set_registered(&self, count: usize) {
        self.registered.set(count as i64);
    }

    pub(crate) fn injector_review(&self, result: &'static str) {
        self.reviews.get_or_create(&ResultLabels { result }).inc();
    }

    pub(crate) fn ca_bundle_checked(&self, result: &'static str) {
        self.ca_bundle.get_or_create(&ResultLabels { result }).inc();
    }

    pub(crate) fn serving_certificate_renewed(&self, ok: bool) {
        self.renewals.get_or_create(&ResultLabels { result: if ok { "renewed" } else { "error" } }).inc();
    }

    pub(crate) fn certificate_request(&self, result: &'static str) {
        self.signed.get_or_create(&ResultLabels { result }).inc();
    }

    /// Proxies connected now.
    pub fn connected_proxies(&self) -> i64 {
        self.connected.get()
    }

    /// Renders every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
