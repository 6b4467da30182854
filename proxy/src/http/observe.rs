//! What the proxy notes of one request for its server span, its access log line and its gRPC
//! status, and how those leave when the response ends.
//!
//! `http::proxy` asks [`begin`] on arrival: with tracing on, the request's trace context is read
//! and the sampling decided (`telemetry::trace`); when the request is sampled or the access log is
//! on, an [`Observe`] follows it down the data path, where the request body counts its bytes as the
//! client sends them (`body::ClientBody`), and each attempt counts itself, notes its endpoint and
//! starts its client span ([`Observe::attempt`]). With the response head, the
//! response body is given a [`Finish`]: it counts the bytes and reads the gRPC status as they
//! stream, and when the body ends (or is dropped) it ships the server span, writes the access log
//! line and counts the gRPC status. A request nobody observes (tracing off or unsampled, no access
//! log, not gRPC) costs none of this: one branch on arrival and one on the response.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, Uri};
use remora_control_api::identity::SpiffeId;

use super::error::ERROR_HEADER;
use super::server::HttpConnection;
use crate::state::route_metrics::RequestStats;
use crate::telemetry::access_log::Entry;
use crate::telemetry::trace::{ClientSpan, Decision, ServerContext, ServerSpan, Traceparent};

/// The per-request notes of an observed request, shared with its attempts.
#[derive(Debug)]
pub(crate) struct Observe {
    /// The server span's context, when the request is sampled.
    trace: Option<ServerContext>,
    start: SystemTime,
    method: Method,
    uri: Uri,
    authority: Option<String>,
    version: http::Version,
    /// Data bytes of the request body read from the client so far (`body::ClientBody`).
    request_bytes: AtomicU64,
    attempts: AtomicU32,
    /// The last attempt's cluster and endpoint. A lock, not for contention (a request's attempts
    /// all run on its worker) but because the request's future may move between threads.
    upstream: Mutex<Option<(Arc<str>, SocketAddr)>>,
}

/// Reads the request's trace context and decides whether anything observes it. Also returns the
/// `traceparent` of a new, unsampled trace, for the upstream request to carry.
pub(crate) fn begin<B>(
    request: &mut Request<B>,
    connection: &HttpConnection,
) -> (Option<Arc<Observe>>, Option<Traceparent>) {
    let data = &connection.data;
    let (trace, unsampled) = match data.tracer.as_ref().map(|t| t.begin(request.headers_mut())) {
        Some(Decision::Sampled(context)) => (Some(context), None),
        Some(Decision::Unsampled(traceparent)) => (None, Some(traceparent)),
        Some(Decision::PassThrough) | None => (None, None),
    };
    if trace.is_none() && data.access_log_for(&connection.listener).is_none() {
        return (None, unsampled);
    }
    let observe = Arc::new(Observe {
        trace,
        start: SystemTime::now(),
        method: request.method().clone(),
        uri: request.uri().clone(),
        authority: super::headers::authority(request).map(str::to_owned),
        version: request.version(),
        request_bytes: AtomicU64::new(0),
        attempts: AtomicU32::new(0),
        upstream: Mutex::new(None),
    });
    (Some(observe), unsampled)
}

/// Whether a request is a gRPC call (its status then counts when the response ends).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

impl Observe {
    /// Notes `len` bytes of the request body read from the client.
    pub(crate) fn received(&self, len: usize) {
        self.request_bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Counts an attempt on `endpoint` of `cluster`, and starts its client span if the request is
    /// traced.
    pub(crate) fn attempt(
        &self,
        connection: &HttpConnection,
        cluster: &Arc<str>,
        endpoint: SocketAddr,
    ) -> Option<Box<ClientSpan>> {
        let resend = self.attempts.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut upstream) = self.upstream.lock() {
            *upstream = Some((cluster.clone(), endpoint));
        }
        let trace = self.trace.as_ref()?;
        let tracer = connection.data.tracer.as_ref()?;
        Some(Box::new(tracer.start_client(trace, &self.method, cluster, endpoint, resend)))
    }
}

/// What a response body carries to its end, for the request's server span, access log line and
/// gRPC status.
#[derive(Debug)]
pub(crate) struct Finish {
    observe: Option<Arc<Observe>>,
    connection: Arc<HttpConnection>,
    stats: Option<Arc<RequestStats>>,
    grpc: bool,
    status: u16,
    flag: Option<HeaderValue>,
    grpc_status: Option<u32>,
    response_bytes: u64,
    started: Instant,
}

impl Finish {
    /// The finish of a response with `headers` and `status`; `None` when nothing observes it.
    pub(crate) fn new(
        observe: Option<Arc<Observe>>,
        connection: &Arc<HttpConnection>,
        stats: Option<&Arc<RequestStats>>,
        grpc: bool,
        status: u16,
        headers: &HeaderMap,
        started: Instant,
    ) -> Option<Box<Finish>> {
        let grpc = grpc && (stats.is_some() || connection.caller.is_some());
        if observe.is_none() && !grpc {
            return None;
        }
        Some(Box::new(Finish {
            observe,
            connection: connection.clone(),
            stats: stats.cloned(),
            grpc,
            status,
            flag: headers.get(ERROR_HEADER).cloned(),
            // A trailers-only answer carries its status in the head.
            grpc_status: grpc_status(headers),
            response_bytes: 0,
            started,
        }))
    }

    /// Notes a data frame of `len` bytes sent.
    pub(crate) fn data(&mut self, len: usize) {
        self.response_bytes += len as u64;
    }

    /// Notes the trailers.
    pub(crate) fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(status) = grpc_status(trailers) {
            self.grpc_status = Some(status);
        }
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

impl Drop for Finish {
    fn drop(&mut self) {
        if self.grpc {
            // A gRPC answer that ended with no status is UNKNOWN (2).
            let code = self.grpc_status.unwrap_or(2);
            if let Some(stats) = &self.stats {
                stats.record_grpc(code);
            }
            if let Some(caller) = &self.connection.caller {
                caller.record_grpc(code);
            }
        }
        let Some(observe) = &self.observe else { return };
        let connection = &*self.connection;
        let listener = &connection.listener;
        let upstream = observe.upstream.lock().ok().and_then(|u| u.clone());
        let path = observe.uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = observe.authority.as_deref();
        let flag = self.flag.as_ref().and_then(|f| f.to_str().ok());
        let route = self.stats.as_ref().map(|s| s.route());
        let attempts = observe.attempts.load(Ordering::Relaxed);
        let grpc_status = if self.grpc { self.grpc_status } else { None };
        let end = SystemTime::now();
        if let (Some(context), Some(tracer)) = (&observe.trace, &connection.data.tracer) {
            tracer.finish_server(
                context,
                ServerSpan {
                    start: observe.start,
                    end,
                    method: &observe.method,
                    path,
                    authority,
                    protocol: match observe.version {
                        http::Version::HTTP_2 => "2",
                        http::Version::HTTP_3 => "3",
                        _ => "1.1",
                    },
                    peer: connection.origin.peer,
                    peer_identity: connection.origin.peer_identity().map(SpiffeId::as_str),
                    status: self.status,
                    route,
                    cluster: upstream.as_ref().map(|(c, _)| c),
                    endpoint: upstream.as_ref().map(|(_, e)| *e),
                    listener: &listener.name,
                    direction: listener.direction.label(),
                    attempts,
                    grpc_status,
                    flag,
                },
            );
        }
        if let Some(log) = connection.data.access_log_for(listener)
            && log.wants(self.status, grpc_status, flag)
        {
            let entry = Entry {
                start: Some(observe.start),
                duration: self.started.elapsed(),
                protocol: match observe.version {
                    http::Version::HTTP_2 => "HTTP/2",
                    http::Version::HTTP_3 => "HTTP/3",
                    _ => "HTTP/1.1",
                },
                listener: &listener.name,
                direction: listener.direction.label(),
                method: Some(observe.method.as_str()),
                authority,
                path: Some(path),
                status: Some(self.status),
                grpc_status,
                request_bytes: Some(observe.request_bytes.load(Ordering::Relaxed)),
                response_bytes: Some(self.response_bytes),
                route: route.map(|r| &**r),
                cluster: upstream.as_ref().map(|(c, _)| &**c),
                endpoint: upstream.as_ref().map(|(_, e)| *e),
                attempts: Some(attempts),
                peer: Some(connection.origin.peer),
                peer_identity: connection.origin.peer_identity().map(SpiffeId::as_str),
                trace_id: observe.trace.as_ref().map(|t| t.trace_id),
                flags: flag,
                ..Entry::default()
            };
            log.write(&entry, true);
        }
    }
}
