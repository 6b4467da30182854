//! Span export: a bounded queue from the workers to one exporter thread, which sends batches to an
//! OTLP collector (gRPC, or HTTP with protobuf bodies) through `opentelemetry-otlp`, plaintext or
//! over TLS checked against `tracing.ca_file`.
//!
//! Workers hand finished spans to [`Queue::push`], which never waits: when the queue is full the
//! span is dropped and counted (`remora_trace_spans_total{result="dropped"}`). Nor does a push wake
//! the exporter, except the one that fills a batch: a wake per span would be a context switch per
//! span. The exporter thread ([`start`]) runs its own event loop: woken by a full batch or by the
//! export interval, it drains the queue in batches, sends each within the export timeout, and counts
//! it exported or failed. A dead or slow collector so costs at most the queue's spans and one batch
//! in flight, and no request ever waits for it.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use prometheus_client::metrics::counter::Counter;
use remora_control_api::grpc::{ControlTls, lazy_tls_channel};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use super::otlp_http::CollectorClient;
#[cfg(test)]
use super::trace::Decision;
use super::trace::Tracer;

/// How spans are counted.
#[derive(Clone, Debug, Default)]
pub struct SpanCounters {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans dropped because the queue was full.
    pub dropped: Counter,
    /// Spans in batches the collector refused, or that could not reach it in time.
    pub failed: Counter,
}

/// The workers' end of the export queue.
#[derive(Debug)]
pub struct Queue {
    sender: mpsc::Sender<SpanData>,
    dropped: Counter,
    /// Wakes the exporter when a batch is waiting.
    batch_ready: Arc<Notify>,
    batch: usize,
}

/// The exporter's end of the queue.
#[derive(Debug)]
pub struct Receiver {
    spans: mpsc::Receiver<SpanData>,
    batch_ready: Arc<Notify>,
}

impl Queue {
    /// A queue holding up to `capacity` spans that wakes its exporter when `batch` are waiting,
    /// and its receiving end.
    pub fn new(capacity: usize, batch: usize, counters: SpanCounters) -> (Queue, Receiver) {
        let (sender, spans) = mpsc::channel(capacity.max(1));
        let batch_ready = Arc::new(Notify::new());
        let queue = Queue { sender, dropped: counters.dropped, batch_ready: batch_ready.clone(), batch: batch.max(1) };
        (queue, Receiver { spans, batch_ready })
    }

    /// Queues a span, or drops and counts it when the queue is full (or the exporter is gone).
    pub fn push(&self, span: SpanData) {
        if self.sender.try_send(span).is_err() {
            self.dropped.inc();
            return;
        }
        if self.sender.max_capacity() - self.sender.capacity() >= self.batch {
            self.batch_ready.notify_one();
        }
    }
}

/// Where and how spans go.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportSettings {
    /// The collector's URL (for HTTP, `/v1/traces` is appended unless the URL has a path).
    pub endpoint: String,
    /// `grpc` or `http/protobuf`.
    pub http: bool,
    /// For an `https://` collector: the PEM roots its certificate must chain to.
    pub ca_file: Option<std::path::PathBuf>,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// The `service.instance.id` resource attribute (the node id).
    pub instance: String,
    /// Share of new traces sampled.
    pub sampling_ratio: f64,
    /// Whether a new, unsampled trace still carries a `traceparent` upstream.
    pub propagate_unsampled: bool,
    /// Spans held waiting for export.
    pub max_queue: usize,
    /// Spans per export request.
    pub max_batch: usize,
    /// How long a partial batch waits for more spans.
    pub interval: Duration,
    /// How long one export may take.
    pub timeout: Duration,
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The exporter rejected its settings (a malformed endpoint, ...).
    #[error("tracing: the OTLP exporter for {endpoint}: {message}")]
    Build {
        /// The collector.
        endpoint: String,
        /// What the exporter said.
        message: String,
    },
    /// The exporter thread could not be started.
    #[error("tracing: start the exporter thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Starts the exporter thread; the tracer it returns feeds it. The thread ends when the last
/// tracer is dropped, after sending what is queued.
pub fn start(settings: &ExportSettings, counters: SpanCounters) -> Result<Arc<Tracer>, ExportError> {
    let (queue, receiver) = Queue::new(settings.max_queue, settings.max_batch, counters.clone());
    let (built_tx, built_rx) = std::sync::mpsc::sync_channel(1);
    let thread_settings = settings.clone();
    std::thread::Builder::new().name("remora-otlp".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                let _ = built_tx.send(Err(error.to_string()));
                return;
            }
        };
        runtime.block_on(async move {
            let exporter = match build(&thread_settings) {
                Ok(exporter) => {
                    let _ = built_tx.send(Ok(()));
                    exporter
                }
                Err(message) => {
                    let _ = built_tx.send(Err(message));
                    return;
                }
            };
            run(exporter, receiver, &thread_settings, &counters).await;
        });
    })?;
    match built_rx.recv() {
        Ok(Ok(())) => {
            info!(endpoint = %settings.endpoint, http = settings.http, ratio = settings.sampling_ratio, "exporting traces");
            Ok(Arc::new(
                Tracer::new(settings.sampling_ratio, queue).propagating_unsampled(settings.propagate_unsampled),
            ))
        }
        Ok(Err(message)) => Err(ExportError::Build { endpoint: settings.endpoint.clone(), message }),
        Err(_) => Err(ExportError::Build { endpoint: settings.endpoint.clone(), message: "the thread ended".into() }),
    }
}

fn build(settings: &ExportSettings) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    // TLS through the same rustls client as the control plane's (TLS 1.3, ring); both transports
    // connect on first use, so a collector that is down does not stop the start.
    let roots = match &settings.ca_file {
        Some(ca_file) => {
            let pem = std::fs::read(ca_file).map_err(|e| format!("ca_file {}: {e}", ca_file.display()))?;
            Some(ControlTls::from_pem(&pem).map_err(|e| format!("ca_file {}: {e}", ca_file.display()))?)
        }
        None => None,
    };
    let mut exporter = if settings.http {
        builder
            .with_http()
            .with_http_client(CollectorClient::new(roots.as_ref(), settings.timeout))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(http_endpoint(&settings.endpoint))
            .with_timeout(settings.timeout)
            .build()
    } else if let Some(roots) = &roots {
        let channel = lazy_tls_channel(&settings.endpoint, roots, settings.timeout).map_err(|e| e.to_string())?;
        builder.with_tonic().with_channel(channel).with_timeout(settings.timeout).build()
    } else {
        builder.with_tonic().with_endpoint(settings.endpoint.clone()).with_timeout(settings.timeout).build()
    }
    .map_err(|e| e.to_string())?;
    let resource = Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new("service.instance.id", settings.instance.clone()))
        .build();
    exporter.set_resource(&resource);
    Ok(exporter)
}

/// An HTTP endpoint given as a bare host:port (as `OTEL_EXPORTER_OTLP_ENDPOINT` is) gets the
/// traces path; one with a path is used as written.
fn http_endpoint(endpoint: &str) -> String {
    let after_scheme = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest);
    if after_scheme.trim_end_matches('/').contains('/') {
        endpoint.to_owned()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    }
}

async fn run(
    exporter: opentelemetry_otlp::SpanExporter,
    mut receiver: Receiver,
    settings: &ExportSettings,
    counters: &SpanCounters,
) {
    let max_batch = settings.max_batch.max(1);
    let mut closed = false;
    while !closed {
        tokio::select! {
            () = receiver.batch_ready.notified() => {}
            () = tokio::time::sleep(settings.interval) => {}
        }
        // Drain what is queued, a batch at a time; a partial batch is the last.
        loop {
            let mut batch = Vec::with_capacity(max_batch);
            while batch.len() < max_batch {
                match receiver.spans.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if batch.is_empty() {
                break;
            }
            let full = batch.len() == max_batch;
            export(&exporter, batch, settings.timeout, counters).await;
            if !full {
                break;
            }
        }
    }
    let _ = exporter.shutdown();
}

async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    timeout: Duration,
    counters: &SpanCounters,
) {
    let spans = batch.len() as u64;
    match tokio::time::timeout(timeout, exporter.export(batch)).await {
        Ok(Ok(())) => {
            counters.exported.inc_by(spans);
            debug!(spans, "exported spans");
        }
        Ok(Err(error)) => {
            counters.failed.inc_by(spans);
            warn!(%error, spans, "span export failed");
        }
        Err(_) => {
            counters.failed.inc_by(spans);
            warn!(spans, ?timeout, "span export timed out");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn http_endpoints_get_the_traces_path_unless_they_have_one() {
        assert_eq!(http_endpoint("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(http_endpoint("http://127.0.0.1:4318/"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(http_endpoint("http://collector/custom/path"), "http://collector/custom/path");
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let counters = SpanCounters::default();
        let (queue, _receiver) = Queue::new(2, 1, counters.clone());
        let tracer = Tracer::new(1.0, queue);
        let mut headers = http::HeaderMap::new();
        let super::Decision::Sampled(context) = tracer.begin(&mut headers) else { panic!("sampled at 1") };
        let tracer = Arc::new(tracer);
        for _ in 0..5 {
            drop(tracer.start_client(&context, &http::Method::GET, &"c".into(), ([127, 0, 0, 1], 1).into(), 0));
        }
        assert_eq!(counters.dropped.get(), 3);
    }
}
