//! Telemetry: the Prometheus registry and how it is rendered (here), lock-free latency histograms
//! (`histogram`), per-object series read at scrape time (`roster`), traces exported over OTLP
//! (`trace`, `export`), the access log (`access_log`), and the process's log filter, changeable at
//! runtime (`logging`).
//!
//! Every subsystem owns its metrics: it declares its families in a `register` function, which the
//! composition root (`app`) calls once with the one [`Registry`], and it hands out per-object
//! handles (a listener's, a cluster's, a route's counters) when a snapshot is built. Label lookups
//! (a hash and a lock in `prometheus-client`'s `Family`) happen then, or once when a route first
//! sees a status code, never per request after that: the data path only does atomic adds. A
//! cluster's forty-odd series live in one struct of its own, read out at scrape time (`roster`),
//! not as forty entries of forty families. The same labels always resolve to the same counters,
//! so totals run on across config reloads. `/metrics`
//! renders the registry through [`encode`] (OpenMetrics) or [`encode_prometheus`] (text 0.0.4).
//!
//! Labels are bounded by config (listener, route and cluster names), by HTTP (status codes, gRPC
//! status codes), by the mesh's identities, or by a fixed list (reasons, results), never by
//! traffic: no path, peer address or endpoint address is ever a label. This module's own metrics
//! are the trace and access-log queues' ([`TelemetryMetrics`]).

pub mod access_log;
pub mod export;
pub mod family;
pub mod histogram;
pub mod logging;
mod otlp_http;
pub mod roster;
pub mod trace;

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
pub use prometheus_client::registry::Registry;

pub use histogram::{Histogram, LazyHistogram};

/// A metrics table, read. A panic while it was held cannot have left it changed in a way that
/// matters more than losing the metrics would.
fn read<T>(table: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    table.read().unwrap_or_else(PoisonError::into_inner)
}

/// A metrics table, to change (see [`read`]).
fn write<T>(table: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    table.write().unwrap_or_else(PoisonError::into_inner)
}

/// Tables this small are left as they are when entries leave.
const MIN_CAPACITY: usize = 64;

/// Removes `key` from a metrics table; `true` if it was there. A table a removal leaves under a
/// quarter full gives its room back: series of a config that once held thousands of objects
/// would otherwise keep their tables for the life of the process.
fn remove_and_shrink<K, V, Q>(table: &RwLock<HashMap<K, V>>, key: &Q) -> bool
where
    K: Borrow<Q> + Hash + Eq,
    Q: Hash + Eq + ?Sized,
{
    let mut entries = write(table);
    let removed = entries.remove(key).is_some();
    if entries.capacity() > MIN_CAPACITY && entries.len() < entries.capacity() / 4 {
        entries.shrink_to_fit();
    }
    removed
}

/// A registry whose metrics are all named `remora_*`.
pub fn registry() -> Registry {
    Registry::with_prefix("remora")
}

/// The status classes a counter per class is kept for, in index order.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index into [`STATUS_CLASSES`]. Codes hyper accepts but HTTP does not define (600-999) count as
/// 5xx: the server that sent them is broken.
pub fn class_index(status: u16) -> usize {
    (usize::from(status / 100)).clamp(1, 5) - 1
}

/// gRPC status codes: 0 (OK) to 16 (UNAUTHENTICATED).
const GRPC_CODES: usize = 17;

/// One counter per gRPC status, each made the first time a call ends with it (most subjects see
/// few of the 17).
#[derive(Debug, Default)]
pub struct GrpcCounters([std::sync::OnceLock<Counter>; GRPC_CODES]);

impl GrpcCounters {
    /// Counts one call that ended with `code` (codes above 16 count as 2, UNKNOWN); `make` makes
    /// its counter the first time, given the code counted.
    pub fn inc(&self, code: u32, make: impl FnOnce(u32) -> Counter) {
        let code = if (code as usize) < GRPC_CODES { code } else { 2 };
        self.0[code as usize].get_or_init(|| make(code)).inc();
    }
}

/// A `result` label, the one label of many small families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// What happened.
    pub result: &'static str,
}

/// The trace exporter's and the access log's counters.
#[derive(Clone, Debug, Default)]
pub struct TelemetryMetrics {
    spans: Family<ResultLabels, Counter>,
    access_log_lines: Family<ResultLabels, Counter>,
}

impl TelemetryMetrics {
    /// Declares the families in `registry`.
    pub fn register(registry: &mut Registry) -> TelemetryMetrics {
        let metrics = TelemetryMetrics::default();
        registry.register(
            "trace_spans",
            "Spans finished, by result (exported; dropped: the export queue was full; failed: the collector refused or could not be reached)",
            metrics.spans.clone(),
        );
        registry.register(
            "access_log_lines",
            "Access log lines, by result (written; dropped: the writer fell behind and its queue was full)",
            metrics.access_log_lines.clone(),
        );
        metrics
    }

    /// The span counters: exported, dropped, failed.
    pub fn span_counters(&self) -> [Counter; 3] {
        ["exported", "dropped", "failed"].map(|result| self.spans.get_or_create_owned(&ResultLabels { result }))
    }

    /// The access-log counters: written, dropped.
    pub fn access_log_counters(&self) -> [Counter; 2] {
        ["written", "dropped"].map(|result| self.access_log_lines.get_or_create_owned(&ResultLabels { result }))
    }
}

/// Renders every metric of `registry` in the OpenMetrics text format (what Prometheus asks for
/// first).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Renders every metric of `registry` in the Prometheus text format 0.0.4 (what `promtool`, older
/// scrapers and people with curl read): the OpenMetrics text, with each counter's `HELP` and `TYPE`
/// naming its `_total` samples, and no `# EOF`.
pub fn encode_prometheus(registry: &Registry) -> String {
    let open_metrics = encode(registry);
    let mut out = String::with_capacity(open_metrics.len());
    let mut help: Option<&str> = None;
    for line in open_metrics.lines() {
        if line.starts_with("# HELP ") {
            if let Some(previous) = help.replace(line) {
                out.push_str(previous);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" { "_total" } else { "" };
            if let Some(help_line) = help.take() {
                let text = help_line.strip_prefix("# HELP ").and_then(|h| h.split_once(' ')).map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::gauge::Gauge;

    use super::*;

    /// Counters render under the registry's prefix, with the OpenMetrics `_total` suffix.
    #[test]
    fn families_render_under_the_prefix() {
        let mut registry = registry();
        let metrics = TelemetryMetrics::register(&mut registry);
        let [exported, ..] = metrics.span_counters();
        exported.inc_by(3);
        let text = encode(&registry);
        assert!(text.contains(r#"remora_trace_spans_total{result="exported"} 3"#), "{text}");
    }

    #[test]
    fn the_prometheus_text_names_counters_by_their_samples() {
        let mut registry = registry();
        let metrics = TelemetryMetrics::register(&mut registry);
        metrics.access_log_counters()[0].inc();
        registry.register("workers", "Worker threads", Gauge::<i64>::default());
        let text = encode_prometheus(&registry);
        assert!(text.contains("# TYPE remora_access_log_lines_total counter\n"), "{text}");
        assert!(text.contains("# HELP remora_access_log_lines_total Access log lines"), "{text}");
        assert!(text.contains("# TYPE remora_workers gauge\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn status_codes_fall_into_their_classes() {
        assert_eq!(STATUS_CLASSES[class_index(204)], "2xx");
        assert_eq!(STATUS_CLASSES[class_index(503)], "5xx");
        assert_eq!(STATUS_CLASSES[class_index(700)], "5xx", "beyond HTTP's codes: the server is broken");
        assert_eq!(STATUS_CLASSES[class_index(42)], "1xx");
    }
}
