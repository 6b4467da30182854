//! Observability against real parts: an in-process OTLP collector (a tonic server from the
//! `opentelemetry-proto` service definitions, and a plain HTTP one for OTLP/HTTP) receiving the
//! proxy's spans, upstreams that record the trace headers they get, `/metrics` checked for exact
//! counts and by `promtool`, and the access log parsed as JSON.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use remora_proxy::testing::config::{Cluster, Config, Listener, Route, RouteTable};
use remora_proxy::testing::proxy::temp_dir;
use remora_proxy::testing::servers::{Handler, full};
use remora_proxy::testing::{Client, HttpServer, TestProxy, eventually};

use crate::{cluster, dead_address, listener};

/// Spans as the collector received them.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// A gRPC collector on `127.0.0.1:0`.
    async fn start() -> (Collector, SocketAddr) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (collector, address)
    }

    /// A gRPC collector over TLS on `127.0.0.1:0`, its certificate (for 127.0.0.1) from `ca`.
    async fn start_tls(ca: &remora_control_plane::testing::certs::TestCa) -> (Collector, SocketAddr) {
        let collector = Collector::default();
        let tls = ca.server_config(&["127.0.0.1"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let incoming = remora_control_plane::tls::incoming(listener, tls);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(incoming),
        );
        (collector, address)
    }

    /// What an OTLP/HTTP collector does with a request: protobuf bodies on `/v1/traces`.
    fn http_handler(&self) -> Handler {
        let spans = self.spans.clone();
        Arc::new(move |request| {
            let spans = spans.clone();
            Box::pin(async move {
                assert_eq!(request.uri().path(), "/v1/traces");
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let export: ExportTraceServiceRequest = prost::Message::decode(body).unwrap();
                let mut spans = spans.lock().unwrap();
                for resource in export.resource_spans {
                    for scope in resource.scope_spans {
                        spans.extend(scope.spans);
                    }
                }
                let mut response = Response::new(full(Vec::new()));
                response.headers_mut().insert("content-type", HeaderValue::from_static("application/x-protobuf"));
                response
            })
        })
    }

    /// An OTLP/HTTP collector on `127.0.0.1:0`.
    async fn start_http() -> (Collector, SocketAddr) {
        let collector = Collector::default();
        let server = HttpServer::with_handler(collector.http_handler()).await;
        let address = server.address();
        std::mem::forget(server);
        (collector, address)
    }

    /// An OTLP/HTTP collector over TLS on `127.0.0.1:0`, its certificate (for 127.0.0.1) from
    /// `ca`; `connections` counts the connections it accepted.
    async fn start_https(
        ca: &remora_control_plane::testing::certs::TestCa,
    ) -> (Collector, SocketAddr, Arc<AtomicUsize>) {
        let collector = Collector::default();
        let tls = ca.server_config(&["127.0.0.1"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut incoming = remora_control_plane::tls::incoming(listener, tls);
        let handler = collector.http_handler();
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        tokio::spawn(async move {
            while let Some(Ok(connection)) = futures_util::StreamExt::next(&mut incoming).await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let service = hyper::service::service_fn(move |request| {
                    let response = handler(request);
                    async move { Ok::<_, std::convert::Infallible>(response.await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(connection), service),
                );
            }
        });
        (collector, address, connections)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    async fn wait_for(&self, count: usize) -> Vec<Span> {
        eventually(&format!("{count} spans exported"), Duration::from_secs(10), || async {
            self.spans.lock().unwrap().len() >= count
        })
        .await;
        self.spans()
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()?.value.as_ref())
}

fn int_attribute(span: &Span, key: &str) -> Option<i64> {
    match attribute(span, key) {
        Some(Value::IntValue(v)) => Some(*v),
        _ => None,
    }
}

fn string_attribute(span: &Span, key: &str) -> Option<String> {
    match attribute(span, key) {
        Some(Value::StringValue(v)) => Some(v.clone()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An upstream that records every request's headers, and answers 503 to the first request for
/// `/flaky` (and 200 to everything else).
struct Recorder {
    server: HttpServer,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let flaky = Arc::new(AtomicUsize::new(0));
        let record = seen.clone();
        let handler: Handler = Arc::new(move |request| {
            record.lock().unwrap().push(request.headers().clone());
            let fail = request.uri().path() == "/flaky" && flaky.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                let mut response = Response::new(full("ok\n"));
                if fail {
                    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                }
                response
            })
        });
        Recorder { server: HttpServer::with_handler(handler).await, seen }
    }

    fn seen(&self) -> Vec<HeaderMap> {
        self.seen.lock().unwrap().clone()
    }
}

fn traced_proxy(upstream: SocketAddr, tracing: &str) -> TestProxy {
    TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  tracing: {tracing}\n---\nresources:\n{}{}  - {{kind: RouteTable, name: web, routes: [{{name: all, backends: [{{cluster: app}}], retry: {{attempts: 2, retry_on: [5xx], backoff_base: 0.001s, backoff_max: 0.002s}}}}]}}\n",
        cluster("app", "", &[upstream]),
        listener("in", ", protocol: http1"),
    ))
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// A request with a sampled `traceparent` whose first attempt fails: one server span, the child of
/// the caller's span, and two client spans under it (the retry shows); each attempt carried its own
/// span as the upstream's parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_shows_a_server_span_and_a_client_span_per_attempt() {
    let (collector, address) = Collector::start().await;
    let upstream = Recorder::start().await;
    let proxy =
        traced_proxy(upstream.server.address(), &format!("{{endpoint: \"http://{address}\", export_interval: 0.05s}}"));
    let mut client = Client::http1(proxy.address("in")).await;
    let request = client
        .request(Method::GET, "shop", "/flaky")
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .header("tracestate", "vendor=value")
        .body(full(Vec::new()))
        .unwrap();
    let reply = remora_proxy::testing::client::read(client.send(request).await.unwrap()).await;
    assert_eq!(reply.status, 200);

    let spans = collector.wait_for(3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert!(spans.iter().all(|s| hex(&s.trace_id) == TRACE_ID), "one trace");
    let server: Vec<&Span> = spans.iter().filter(|s| s.kind == SpanKind::Server as i32).collect();
    let clients: Vec<&Span> = spans.iter().filter(|s| s.kind == SpanKind::Client as i32).collect();
    assert_eq!((server.len(), clients.len()), (1, 2), "{spans:#?}");
    let server = server[0];
    assert_eq!(hex(&server.parent_span_id), PARENT_ID, "the caller's span is the server span's parent");
    assert_eq!(server.name, "GET web/all");
    assert_eq!(int_attribute(server, "http.response.status_code"), Some(200));
    assert_eq!(int_attribute(server, "remora.retries"), Some(1));
    assert_eq!(string_attribute(server, "http.route").as_deref(), Some("web/all"));
    assert_eq!(string_attribute(server, "url.path").as_deref(), Some("/flaky"));
    assert_eq!(string_attribute(server, "http.request.method").as_deref(), Some("GET"));
    for client_span in &clients {
        assert_eq!(client_span.parent_span_id, server.span_id, "attempts hang under the server span");
        assert_eq!(string_attribute(client_span, "remora.cluster").as_deref(), Some("app"));
    }
    let mut statuses: Vec<i64> =
        clients.iter().map(|s| int_attribute(s, "http.response.status_code").unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 503]);
    let retry = clients.iter().find(|s| int_attribute(s, "http.response.status_code") == Some(200)).unwrap();
    assert_eq!(int_attribute(retry, "http.request.resend_count"), Some(1));

    // What the upstream saw: each attempt's traceparent names that attempt's client span.
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    let client_ids: Vec<String> = clients.iter().map(|s| hex(&s.span_id)).collect();
    for headers in &seen {
        let traceparent = headers["traceparent"].to_str().unwrap();
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!((parts[0], parts[1], parts[3]), ("00", TRACE_ID, "01"), "{traceparent}");
        assert!(client_ids.contains(&parts[2].to_owned()), "{traceparent} names a client span");
        assert_eq!(headers["tracestate"], "vendor=value", "tracestate passes through");
        assert_eq!(headers.get_all("traceparent").iter().count(), 1, "the caller's traceparent was replaced");
    }
    eventually("the export counted", Duration::from_secs(5), || async {
        proxy.metric(r#"remora_trace_spans_total{result="exported"}"#).await == 3.0
    })
    .await;
}

/// B3, single and multi header: the trace continues under the caller's span, and the upstream gets
/// the context both as `traceparent` and in the B3 form the request came in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_context_continues_and_is_written_onward_as_b3() {
    let (collector, address) = Collector::start().await;
    let upstream = Recorder::start().await;
    let proxy =
        traced_proxy(upstream.server.address(), &format!("{{endpoint: \"http://{address}\", export_interval: 0.05s}}"));
    let mut client = Client::http1(proxy.address("in")).await;
    let single = client
        .request(Method::GET, "shop", "/")
        .header("b3", format!("{TRACE_ID}-{PARENT_ID}-1"))
        .body(full(Vec::new()))
        .unwrap();
    assert_eq!(client.send(single).await.unwrap().status(), 200);
    let multi = client
        .request(Method::GET, "shop", "/")
        .header("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7")
        .header("x-b3-spanid", "e457b5a2e4d86bd1")
        .header("x-b3-sampled", "1")
        .body(full(Vec::new()))
        .unwrap();
    assert_eq!(client.send(multi).await.unwrap().status(), 200);

    let spans = collector.wait_for(4).await;
    let servers: Vec<&Span> = spans.iter().filter(|s| s.kind == SpanKind::Server as i32).collect();
    let parents: Vec<(String, String)> = servers.iter().map(|s| (hex(&s.trace_id), hex(&s.parent_span_id))).collect();
    assert!(parents.contains(&(TRACE_ID.to_owned(), PARENT_ID.to_owned())), "{parents:?}");
    assert!(parents.contains(&("80f198ee56343ba864fe8b2a57d3eff7".to_owned(), "e457b5a2e4d86bd1".to_owned())));

    let seen = upstream.seen();
    let b3 = seen[0]["b3"].to_str().unwrap();
    assert!(b3.starts_with(&format!("{TRACE_ID}-")) && b3.contains("-1-"), "{b3}");
    assert!(seen[0]["traceparent"].to_str().unwrap().contains(TRACE_ID));
    assert_eq!(seen[1]["x-b3-traceid"], "80f198ee56343ba864fe8b2a57d3eff7");
    assert_ne!(seen[1]["x-b3-spanid"], "e457b5a2e4d86bd1", "the attempt's own span");
    assert_eq!(seen[1]["x-b3-sampled"], "1");
    assert_eq!(seen[1].get_all("x-b3-spanid").iter().count(), 1);
}

/// New traces are sampled at the configured ratio (0.25 of 800, within tolerance); the others get a
/// `traceparent` with the sampled flag clear, so the services behind agree. A caller's "not
/// sampled" is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_traces_are_sampled_at_the_ratio_and_callers_decisions_are_followed() {
    let (collector, address) = Collector::start().await;
    let upstream = Recorder::start().await;
    let proxy = traced_proxy(
        upstream.server.address(),
        &format!("{{endpoint: \"http://{address}\", export_interval: 0.05s, sampling_ratio: 0.25}}"),
    );
    let mut client = Client::http1(proxy.address("in")).await;
    for _ in 0..800 {
        assert_eq!(client.get("shop", "/").await.status, 200);
    }
    let unsampled = client
        .request(Method::GET, "shop", "/")
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-00"))
        .body(full(Vec::new()))
        .unwrap();
    assert_eq!(client.send(unsampled).await.unwrap().status(), 200);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 801);
    let flagged = seen[..800].iter().filter(|h| h["traceparent"].to_str().unwrap().ends_with("-01")).count();
    assert!((140..=260).contains(&flagged), "{flagged} of 800 sampled at 0.25");
    assert_eq!(
        seen[800]["traceparent"],
        format!("00-{TRACE_ID}-{PARENT_ID}-00").as_str(),
        "an unsampled context passes through as it came"
    );
    // Two spans (server and client) per sampled request, none for the rest.
    let spans = collector.wait_for(2 * flagged).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(collector.spans().len(), 2 * flagged, "{} spans", spans.len());
    assert!(collector.spans().iter().all(|s| hex(&s.trace_id) != TRACE_ID));
}

/// On the plain path (a route with no policy, HTTP/1.1 and HTTP/2 upstreams), an unsampled new
/// trace still carries its `traceparent` upstream, once; with `propagate_unsampled: false`, none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_path_carries_an_unsampled_traceparent() {
    let upstream = Recorder::start().await;
    for protocol in ["http1", "http2"] {
        let proxy = TestProxy::start(&format!(
            "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  tracing: {{endpoint: \"http://{}\", sampling_ratio: 0}}\n---\nresources:\n{}{}  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: app}}]}}]}}\n",
            dead_address(),
            cluster("app", &format!(", protocol: {protocol}"), &[upstream.server.address()]),
            listener("in", ", protocol: http1"),
        ));
        let mut client = Client::http1(proxy.address("in")).await;
        assert_eq!(client.get("shop", "/").await.status, 200);
        let seen = upstream.seen();
        let last = seen.last().unwrap();
        assert_eq!(last.get_all("traceparent").iter().count(), 1, "{protocol}: {last:?}");
        let value = last["traceparent"].to_str().unwrap();
        assert!(value.starts_with("00-") && value.ends_with("-00") && value.len() == 55, "{protocol}: {value}");
    }
    // Told not to, the proxy sends an unsampled new trace on with no context.
    let proxy = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  tracing: {{endpoint: \"http://{}\", sampling_ratio: 0, propagate_unsampled: false}}\n---\nresources:\n{}{}  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: app}}]}}]}}\n",
        dead_address(),
        cluster("app", "", &[upstream.server.address()]),
        listener("in", ", protocol: http1"),
    ));
    let mut client = Client::http1(proxy.address("in")).await;
    assert_eq!(client.get("shop", "/").await.status, 200);
    assert!(upstream.seen().last().unwrap().get("traceparent").is_none());
}

/// OTLP over HTTP with protobuf bodies reaches a collector on `/v1/traces`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_export_over_otlp_http() {
    let (collector, address) = Collector::start_http().await;
    let upstream = Recorder::start().await;
    let proxy = traced_proxy(
        upstream.server.address(),
        &format!("{{endpoint: \"http://{address}\", protocol: http/protobuf, export_interval: 0.05s}}"),
    );
    let mut client = Client::http1(proxy.address("in")).await;
    assert_eq!(client.get("shop", "/").await.status, 200);
    let spans = collector.wait_for(2).await;
    assert_eq!(spans.len(), 2);
}

/// OTLP/gRPC over TLS to an `https://` collector whose certificate chains to `ca_file`; a collector
/// with a certificate from another CA gets nothing, and the spans count as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_export_over_otlp_grpc_with_tls() {
    let ca = remora_control_plane::testing::certs::TestCa::new("cluster.local");
    let (collector, address) = Collector::start_tls(&ca).await;
    let directory = remora_proxy::testing::proxy::temp_dir("remora-otlp-tls");
    let roots = directory.join("collector-ca.pem");
    std::fs::write(&roots, ca.serving(&["127.0.0.1"]).ca).unwrap();
    let upstream = Recorder::start().await;
    let proxy = traced_proxy(
        upstream.server.address(),
        &format!("{{endpoint: \"https://{address}\", ca_file: \"{}\", export_interval: 0.05s}}", roots.display()),
    );
    let mut client = Client::http1(proxy.address("in")).await;
    assert_eq!(client.get("shop", "/").await.status, 200);
    assert_eq!(collector.wait_for(2).await.len(), 2);

    // The same collector, trusted with the wrong roots: the handshake fails, nothing arrives.
    let other = remora_control_plane::testing::certs::TestCa::new("cluster.local");
    let wrong = directory.join("other-ca.pem");
    std::fs::write(&wrong, other.serving(&["127.0.0.1"]).ca).unwrap();
    let (refused, address) = Collector::start_tls(&ca).await;
    let proxy = traced_proxy(
        upstream.server.address(),
        &format!(
            "{{endpoint: \"https://{address}\", ca_file: \"{}\", export_interval: 0.05s, export_timeout: 0.5s}}",
            wrong.display()
        ),
    );
    let mut client = Client::http1(proxy.address("in")).await;
    assert_eq!(client.get("shop", "/").await.status, 200, "a collector it cannot trust never costs a request");
    eventually("the spans count as failed", Duration::from_secs(10), || async {
        proxy.metric("remora_trace_spans_total{result=\"failed\"}").await >= 2.0
    })
    .await;
    assert!(refused.spans().is_empty());
    let _ = std::fs::remove_dir_all(directory);
}

/// OTLP/HTTP over TLS: batches reach an `https://` collector whose certificate chains to
/// `ca_file`, one kept-alive connection carrying them all; with the wrong roots nothing arrives and
/// the spans count as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_export_over_otlp_http_with_tls() {
    let ca = remora_control_plane::testing::certs::TestCa::new("cluster.local");
    let (collector, address, connections) = Collector::start_https(&ca).await;
    let directory = remora_proxy::testing::proxy::temp_dir("remora-otlp-https");
    let roots = directory.join("collector-ca.pem");
    std::fs::write(&roots, ca.serving(&["127.0.0.1"]).ca).unwrap();
    let upstream = Recorder::start().await;
    let tracing = |roots: &std::path::Path| {
        format!(
            "{{endpoint: \"https://{address}\", protocol: http/protobuf, ca_file: \"{}\", export_interval: 0.05s, \
             export_timeout: 0.5s}}",
            roots.display()
        )
    };
    let proxy = traced_proxy(upstream.server.address(), &tracing(&roots));
    let mut client = Client::http1(proxy.address("in")).await;
    for round in 1..=3 {
        assert_eq!(client.get("shop", "/").await.status, 200);
        // Each request's two spans leave in their own batch (the export interval passes between).
        assert_eq!(collector.wait_for(2 * round).await.len(), 2 * round);
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1, "the batches share one connection");
    drop(proxy);

    let other = remora_control_plane::testing::certs::TestCa::new("cluster.local");
    let wrong = directory.join("other-ca.pem");
    std::fs::write(&wrong, other.serving(&["127.0.0.1"]).ca).unwrap();
    let before = collector.spans().len();
    let proxy = traced_proxy(upstream.server.address(), &tracing(&wrong));
    let mut client = Client::http1(proxy.address("in")).await;
    assert_eq!(client.get("shop", "/").await.status, 200, "a collector it cannot trust never costs a request");
    eventually("the spans count as failed", Duration::from_secs(10), || async {
        proxy.metric("remora_trace_spans_total{result=\"failed\"}").await >= 2.0
    })
    .await;
    assert_eq!(collector.spans().len(), before, "nothing reached the collector");
    let _ = std::fs::remove_dir_all(directory);
}

/// A collector that takes connections and never answers: requests are served as ever, and the
/// spans that cannot go are held only up to the queue's size; the rest are dropped and counted.
/// (Each export waits out its timeout, so the queue overflows whatever the machine's speed; a
/// collector that refuses connections outright fails each batch at once, and how many spans that
/// drains before the queue fills depends on how fast the requests come.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_a_bounded_queue_and_a_counter() {
    let upstream = Recorder::start().await;
    // Bound and listening, never accepting: the kernel completes the handshakes, nobody reads.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = traced_proxy(
        upstream.server.address(),
        &format!(
            "{{endpoint: \"http://{}\", max_queue_size: 64, max_export_batch_size: 16, export_interval: 0.05s, export_timeout: 0.2s}}",
            silent.local_addr().unwrap()
        ),
    );
    let mut client = Client::http1(proxy.address("in")).await;
    for _ in 0..500 {
        assert_eq!(client.get("shop", "/").await.status, 200);
    }
    let dropped = proxy.metric(r#"remora_trace_spans_total{result="dropped"}"#).await;
    let failed = proxy.metric(r#"remora_trace_spans_total{result="failed"}"#).await;
    let exported = proxy.metric(r#"remora_trace_spans_total{result="exported"}"#).await;
    assert_eq!(exported, 0.0);
    assert!(dropped > 0.0, "the queue overflowed and said so: dropped {dropped}, failed {failed}");
    // At most the queue and one batch are ever held: everything else was counted already.
    assert!(dropped + failed >= 1000.0 - 64.0 - 16.0, "dropped {dropped} + failed {failed} of 1000 spans");
}

/// A known mix of requests: the route counters by status code and the latency histogram match it
/// exactly, and `promtool check metrics` accepts the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_mix_exactly_and_pass_promtool() {
    let upstream = HttpServer::start("app").await;
    let config = Config::new()
        .with(Cluster::new("app").endpoints(&[upstream.address()]))
        .with(
            RouteTable::new("web").route(Route::to("app").named("api").path_prefix("/status")).route(Route::to("app")),
        )
        .with(Listener::new("in").http1().inbound());
    let proxy = TestProxy::start(&config.yaml());
    let mut client = Client::http1(proxy.address("in")).await;
    for path in ["/status/200", "/status/200", "/status/404", "/status/503", "/status/418", "/slow/30", "/slow/30"] {
        client.get("shop", path).await;
    }
    let (_, text) = proxy.admin_get("/metrics").await;
    let series = |labels: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(labels).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or_else(|| panic!("no series {labels} in\n{text}"))
    };
    let requests = |route: &str, code: u16| {
        series(&format!(
            r#"remora_route_requests_total{{direction="inbound",route="{route}",cluster="app",dst_namespace="",dst_service="",code="{code}"}}"#
        ))
    };
    assert_eq!(requests("web/api", 200), 2.0);
    assert_eq!(requests("web/api", 404), 1.0);
    assert_eq!(requests("web/api", 503), 1.0);
    assert_eq!(requests("web/api", 418), 1.0);
    assert_eq!(requests("web/#1", 200), 2.0);
    let duration = |route: &str, suffix: &str| {
        series(&format!(
            r#"remora_route_request_duration_seconds_{suffix}{{{}direction="inbound",route="{route}",cluster="app",dst_namespace="",dst_service=""}}"#,
            suffix.strip_prefix("bucket ").map(|le| format!(r#"le="{le}","#)).unwrap_or_default(),
            suffix = suffix.split(' ').next().unwrap(),
        ))
    };
    assert_eq!(duration("web/api", "count"), 5.0);
    assert_eq!(duration("web/api", "bucket +Inf"), 5.0);
    // The two slow requests (30 ms at the upstream) sit above the 25 ms bound, under the 50 ms one
    // with room; the fast ones below.
    assert_eq!(duration("web/#1", "count"), 2.0);
    assert_eq!(duration("web/#1", "bucket 0.025"), 0.0);
    assert_eq!(duration("web/#1", "bucket +Inf"), 2.0);
    assert_eq!(duration("web/api", "bucket 0.025"), 5.0);
    assert_eq!(series(r#"remora_upstream_request_duration_seconds_count{cluster="app"}"#), 7.0);
    assert!(!text.contains("127.0.0.1"), "no address is a label");

    // Every metric the Grafana dashboard queries is one the proxy registers (a family shows in
    // /metrics only once it has a series, so the registrations in the source are the list: each
    // subsystem registers its own).
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/remora-golden-metrics.json"))
            .unwrap();
    let registry = rust_sources(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy/src")));
    let names = regex::Regex::new(r"remora_[a-z_]+").unwrap();
    for name in names.find_iter(&dashboard).map(|m| m.as_str()) {
        let base = name.trim_start_matches("remora_");
        let base = base.strip_suffix("_bucket").or_else(|| base.strip_suffix("_total")).unwrap_or(base);
        assert!(registry.contains(&format!("\"{base}\",")), "the dashboard queries {name}, which the proxy lacks");
    }

    match std::process::Command::new("promtool")
        .arg("check")
        .arg("metrics")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Err(error) => eprintln!(
            "skipping the promtool check: promtool not runnable ({error}); install Debian's prometheus package"
        ),
        Ok(mut child) => {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let output = child.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// gRPC calls count by their final status: from the trailers, or from the head of a trailers-only
/// answer; per route on an outbound listener, and per calling workload on an inbound one (a
/// plaintext caller here, whose connection and bytes count too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_statuses_are_counted_from_trailers_and_trailers_only_answers() {
    let handler: Handler = Arc::new(|request| {
        let missing = request.uri().path() == "/echo.Echo/Missing";
        Box::pin(async move {
            let _ = request.into_body().collect().await;
            if missing {
                let mut response = Response::new(full(Vec::new()));
                response.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
                response.headers_mut().insert("grpc-status", HeaderValue::from_static("12"));
                return response;
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let body = http_body_util::StreamBody::new(futures_util::stream::iter([
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(http_body::Frame::data(bytes::Bytes::from_static(
                    b"\0\0\0\0\0",
                ))),
                Ok(http_body::Frame::trailers(trailers)),
            ]));
            let mut response = Response::new(BodyExt::boxed(body));
            response.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
            response
        })
    });
    let upstream = HttpServer::with_handler(handler).await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}{}  - {{kind: RouteTable, name: rpc, routes: [{{name: echo, backends: [{{cluster: grpc}}]}}]}}\n",
        cluster("grpc", ", protocol: http2", &[upstream.address()]),
        listener("in", ", protocol: http2")
            + &listener("callee", ", protocol: http2, direction: inbound, default_cluster: grpc"),
    ));
    let mut clients = [Client::http2(proxy.address("in")).await, Client::http2(proxy.address("callee")).await];
    for (i, method) in
        [(0, "/echo.Echo/Unary"), (0, "/echo.Echo/Unary"), (0, "/echo.Echo/Missing"), (1, "/echo.Echo/Missing")]
    {
        let client = &mut clients[i];
        let request = client
            .request(Method::POST, "echo.grpc", method)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(&b"\0\0\0\0\0"[..]))
            .unwrap();
        let reply = remora_proxy::testing::client::read(client.send(request).await.unwrap()).await;
        assert_eq!(reply.status, 200);
    }
    let grpc = |code: u32| {
        let labels = format!(
            r#"remora_route_grpc_responses_total{{direction="outbound",route="rpc/echo",cluster="grpc",dst_namespace="",dst_service="",grpc_status="{code}"}}"#
        );
        let proxy = &proxy;
        async move { proxy.metric(&labels).await }
    };
    assert_eq!(grpc(0).await, 2.0);
    assert_eq!(grpc(12).await, 1.0);
    let caller = r#"listener="callee",client_namespace="",client_account="""#;
    let from_caller = format!(r#"remora_inbound_caller_grpc_responses_total{{{caller},grpc_status="12"}}"#);
    assert_eq!(proxy.metric(&from_caller).await, 1.0);
    let connections = format!("remora_inbound_caller_connections_total{{{caller}}}");
    assert_eq!(proxy.metric(&connections).await, 1.0);
    drop(clients);
    let received = format!("remora_inbound_caller_received_bytes_total{{{caller}}}");
    eventually("the closed connection's bytes flushed to its caller", Duration::from_secs(10), || async {
        proxy.metric(&received).await > 0.0
    })
    .await;
}

/// The access log: one JSON line per HTTP request and per TCP connection, with the documented
/// fields; a chosen field list is honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_json_with_the_documented_fields() {
    let upstream = HttpServer::start("app").await;
    let echo = remora_proxy::testing::TcpEchoServer::start().await;
    let directory = temp_dir("access-log");
    let path = directory.join("access.log");
    let proxy = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  access_log: {{path: \"{}\"}}\n---\nresources:\n{}{}{}  - {{kind: RouteTable, name: web, routes: [{{name: all, backends: [{{cluster: app}}]}}]}}\n{}{}",
        path.display(),
        cluster("app", "", &[upstream.address()]),
        cluster("echo", "", &[echo.address()]),
        listener("in", ", protocol: http1"),
        listener("tcp", ", protocol: tcp, default_cluster: echo"),
        listener("quiet", ", protocol: http1, access_log: false"),
    ));
    // First, a request on a listener that keeps out of the log: no line comes before the others.
    assert_eq!(Client::http1(proxy.address("quiet")).await.get("shop.local", "/").await.status, 200);
    let mut client = Client::http1(proxy.address("in")).await;
    assert_eq!(client.get("shop.local", "/status/201?x=1").await.status, 201);
    // A chunked upload (no Content-Length): its bytes are counted as they stream through.
    let upload = client
        .request(Method::POST, "shop.local", "/echo")
        .body(remora_proxy::testing::servers::generated(100_000, 7_000))
        .unwrap();
    let echoed = client.send(upload).await.unwrap();
    assert_eq!(remora_proxy::testing::servers::read_generated(echoed.into_body()).await, 100_000);
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(proxy.address("tcp")).await.unwrap();
        tcp.write_all(b"hello").await.unwrap();
        let mut back = [0_u8; 5];
        tcp.read_exact(&mut back).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest).await.unwrap();
    }
    let read_lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    eventually("three access log lines", Duration::from_secs(5), || async { read_lines().len() >= 3 }).await;
    let lines = read_lines();
    assert!(lines.iter().all(|l| l["listener"] != "quiet"), "{lines:?}");
    let http = lines.iter().find(|l| l["protocol"] == "HTTP/1.1" && l["method"] == "GET").expect("an HTTP line");
    let expect: HashMap<&str, serde_json::Value> = [
        ("listener", "in".into()),
        ("direction", "outbound".into()),
        ("method", "GET".into()),
        ("authority", "shop.local".into()),
        ("path", "/status/201?x=1".into()),
        ("status", 201.into()),
        ("route", "web/all".into()),
        ("upstream_cluster", "app".into()),
        ("upstream_endpoint", upstream.address().to_string().into()),
        ("attempts", 1.into()),
        ("request_bytes", 0.into()),
        ("response_bytes", 11.into()),
        ("grpc_status", serde_json::Value::Null),
        ("trace_id", serde_json::Value::Null),
        ("response_flags", serde_json::Value::Null),
    ]
    .into();
    for (field, value) in &expect {
        assert_eq!(&http[field], value, "{field} in {http}");
    }
    assert!(http["start_time"].as_str().unwrap().ends_with('Z'), "{http}");
    assert!(http["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(http["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let upload = lines.iter().find(|l| l["method"] == "POST").expect("the upload's line");
    assert_eq!(upload["request_bytes"], 100_000, "{upload}");
    assert_eq!(upload["response_bytes"], 100_000, "{upload}");
    let tcp = lines.iter().find(|l| l["protocol"] == "tcp").expect("a TCP line");
    assert_eq!(tcp["listener"], "tcp");
    assert_eq!(tcp["upstream_cluster"], "echo");
    assert_eq!(tcp["bytes_received"], 5);
    assert_eq!(tcp["bytes_sent"], 5);
    assert!(tcp.get("method").is_none(), "HTTP-only fields stay off TCP lines: {tcp}");
    assert_eq!(proxy.metric(r#"remora_access_log_lines_total{result="written"}"#).await, 3.0);
    assert_eq!(proxy.metric(r#"remora_listener_connections_total{listener="tcp",direction="outbound"}"#).await, 1.0);
    eventually("the TCP connection counted closed", Duration::from_secs(5), || async {
        proxy.metric(r#"remora_listener_connections_closed_total{listener="tcp",direction="outbound"}"#).await == 1.0
    })
    .await;
}

/// The access log's queue is bounded: with its file a pipe nobody reads (the writer blocked), 20,000
/// requests are all served, and the lines past the queue's 16,384 (and what the pipe and the
/// writer's buffer hold) are dropped and counted rather than held. Once the pipe is read, every
/// line kept arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_access_log_drops_lines_and_never_requests() {
    use std::io::Read;
    let upstream = HttpServer::start("app").await;
    let directory = temp_dir("access-log-fifo");
    let path = directory.join("access.log");
    let made = std::process::Command::new("mkfifo").arg(&path).status().unwrap();
    assert!(made.success());
    // The read end, open (so the proxy's open of the write end does not wait) and not read.
    let flags = rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK;
    let mut reader = std::fs::File::from(rustix::fs::open(&path, flags, rustix::fs::Mode::empty()).unwrap());
    let proxy = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  access_log: {{path: \"{}\"}}\n---\nresources:\n{}{}  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: app}}]}}]}}\n",
        path.display(),
        cluster("app", "", &[upstream.address()]),
        listener("in", ", protocol: http2"),
    ));
    let address = proxy.address("in");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::http2(address).await;
                for _ in 0..2_500 {
                    assert_eq!(client.get("shop.local", "/").await.status, 200);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let written = r#"remora_access_log_lines_total{result="written"}"#;
    let dropped = proxy.metric(r#"remora_access_log_lines_total{result="dropped"}"#).await;
    // What a full queue, a full pipe (64 KiB) and the writer's 64 KiB buffer can hold, at the
    // shortest line these requests make.
    let line = 250.0;
    let held = 16_384.0 + 2.0 * 65_536.0 / line;
    assert!(dropped >= 20_000.0 - held, "{dropped} lines dropped of 20,000");
    println!("blocked access log: {dropped} of 20,000 lines dropped");

    let mut received = Vec::new();
    let mut buffer = vec![0_u8; 1 << 16];
    eventually("the kept lines arrive", Duration::from_secs(20), || {
        loop {
            match reader.read(&mut buffer) {
                Ok(n) if n > 0 => received.extend_from_slice(&buffer[..n]),
                _ => break,
            }
        }
        let lines = received.iter().filter(|b| **b == b'\n').count() as f64;
        let proxy = &proxy;
        async move { lines + dropped == 20_000.0 && proxy.metric(written).await + dropped == 20_000.0 }
    })
    .await;
    let shortest = received.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::len).min().unwrap();
    assert!(shortest as f64 >= line, "a line of {shortest} bytes");
}

/// A cluster that leaves the config takes its metric series with it (they would otherwise hold
/// memory, and show, for as long as the process runs); one that stays keeps its counts. (The
/// series of its routes' traffic belong to the routes, and stay.)
#[tokio::test]
async fn a_removed_clusters_series_leave_with_it() {
    let upstream = HttpServer::start("app").await;
    let config = |clusters: &[&str]| {
        let mut config = Config::new().with(Listener::new("in").http1());
        let mut table = RouteTable::new("web");
        for name in clusters {
            config = config.with(Cluster::new(name).endpoints(&[upstream.address()]));
            table = table.route(Route::to(name).path_prefix(&format!("/{name}")));
        }
        config.with(table).yaml()
    };
    let proxy = TestProxy::start(&config(&["stays", "goes"]));
    let mut client = Client::http1(proxy.address("in")).await;
    for path in ["/stays", "/goes"] {
        assert_eq!(client.get("x", path).await.status, 200);
    }
    let (_, before) = proxy.admin_get("/metrics").await;
    assert!(before.contains(r#"cluster="goes""#), "{before}");
    proxy.rewrite(&config(&["stays"]));
    proxy.reload().unwrap();
    let (_, after) = proxy.admin_get("/metrics").await;
    // The routes' series (made at a route's first request, labelled with its cluster too) are the
    // routes' own, and stay.
    let left: Vec<&str> =
        after.lines().filter(|l| l.contains(r#"cluster="goes""#) && !l.starts_with("remora_route_")).collect();
    assert!(left.is_empty(), "series of a removed cluster: {left:?}");
    let stays = r#"remora_upstream_responses_total{cluster="stays",status_class="2xx"}"#;
    assert_eq!(proxy.metric(stays).await, 1.0, "the remaining cluster keeps its count");
}

/// With `success_sampling_ratio`, a quarter of the successful requests get a line (within a
/// tolerance of 400), while every failure does: a 503 from the endpoint, and an answer the proxy
/// made itself (no endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_samples_successes_and_keeps_every_failure() {
    let upstream = HttpServer::start("app").await;
    let directory = temp_dir("access-log-sampled");
    let path = directory.join("access.log");
    let proxy = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  access_log: {{path: \"{}\", success_sampling_ratio: 0.25}}\n---\nresources:\n{}{}  - {{kind: RouteTable, name: web, routes: [{{name: dead, match: {{path: {{prefix: /dead}}}}, backends: [{{cluster: dead}}]}}, {{name: all, backends: [{{cluster: app}}]}}]}}\n{}",
        path.display(),
        cluster("app", "", &[upstream.address()]),
        cluster("dead", "", &[dead_address()]),
        listener("in", ", protocol: http1"),
    ));
    let mut client = Client::http1(proxy.address("in")).await;
    for _ in 0..400 {
        assert_eq!(client.get("shop.local", "/").await.status, 200);
    }
    assert_eq!(client.get("shop.local", "/status/503").await.status, 503);
    assert_eq!(client.get("shop.local", "/dead/end").await.status, 503);
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    eventually("the failures logged", Duration::from_secs(5), || async {
        lines().iter().filter(|l| l["status"] == 503).count() == 2
    })
    .await;
    let logged = lines();
    let successes = logged.iter().filter(|l| l["status"] == 200).count();
    assert!((60..=140).contains(&successes), "{successes} of 400 successes logged at 0.25");
    assert!(logged.iter().any(|l| l["path"] == "/dead/end" && !l["response_flags"].is_null()), "{logged:?}");
    let _ = std::fs::remove_dir_all(directory);
}

/// On the receiving side of mTLS, the server span (`remora.peer.identity`) and the access log
/// (`peer_identity`, HTTP and TCP) name the caller's SPIFFE ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_identity_is_in_the_span_and_the_access_log() {
    let (collector, otlp) = Collector::start().await;
    let app = HttpServer::start("app").await;
    let echo = remora_proxy::testing::TcpEchoServer::start().await;
    let ca = remora_control_plane::testing::TestCa::new("cluster.local");
    let directory = temp_dir("identity-telemetry");
    let log = directory.join("access.log");
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let server_identity = ca.issue("spiffe://cluster.local/ns/shop/sa/api").bootstrap_identity(&directory.join("api"));
    let server = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  tracing: {{endpoint: \"http://{otlp}\", export_interval: 0.1s}}\n  access_log: {{path: \"{}\", fields: [protocol, peer_identity]}}\n{server_identity}---\nresources:\n{}{}{}{}",
        log.display(),
        cluster("app", ", protocol: http1", &[app.address()]),
        cluster("echo", "", &[echo.address()]),
        listener("in", ", direction: inbound, default_cluster: app"),
        listener("in-tcp", ", direction: inbound, default_cluster: echo"),
    ));
    let client_identity = ca.issue(web).bootstrap_identity(&directory.join("web"));
    let client = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n{client_identity}---\nresources:\n{}{}{}{}",
        cluster("api", ", tls: mesh", &[server.address("in")]),
        cluster("api-tcp", ", tls: mesh", &[server.address("in-tcp")]),
        listener("out", ", default_cluster: api"),
        listener("out-tcp", ", protocol: tcp, default_cluster: api-tcp"),
    ));
    assert_eq!(Client::http1(client.address("out")).await.get("api", "/").await.status, 200);
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(client.address("out-tcp")).await.unwrap();
        tcp.write_all(b"hi").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut back = Vec::new();
        tcp.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hi");
    }
    let spans = collector.wait_for(2).await;
    let server_span = spans.iter().find(|s| s.kind == SpanKind::Server as i32).expect("a server span");
    assert_eq!(string_attribute(server_span, "remora.peer.identity").as_deref(), Some(web));
    let attempt = spans.iter().find(|s| s.kind == SpanKind::Client as i32).expect("a client span");
    assert_eq!(string_attribute(attempt, "remora.peer.identity"), None, "only the server span names the caller");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("an HTTP and a TCP line", Duration::from_secs(5), || async { read().lines().count() >= 2 }).await;
    let lines: Vec<serde_json::Value> = read().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for protocol in ["HTTP/2", "tcp"] {
        let line = lines.iter().find(|l| l["protocol"] == protocol).unwrap_or_else(|| panic!("no {protocol} line"));
        assert_eq!(line["peer_identity"], web, "{line}");
    }
    let _ = std::fs::remove_dir_all(&directory);
}

/// The text of every Rust file under `dir`.
fn rust_sources(dir: &std::path::Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            text.push_str(&rust_sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            text.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    text
}
