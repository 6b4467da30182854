//! Traces: reading and writing trace context, the sampling decision, and the spans a request makes.
//!
//! A request arrives with W3C `traceparent` (and `tracestate`), B3 single (`b3`) or B3 multi
//! (`X-B3-TraceId`, ...) headers, or none. [`Tracer::begin`] reads them and decides, parent-based:
//! a context that says sampled (or not) is followed; a request with none starts a trace, sampled
//! at the configured ratio by its trace id. An unsampled request costs no span: its context passes
//! through as it came (a new trace gets a `traceparent` with the sampled flag clear, so the services
//! behind agree). A sampled one gets a [`ServerContext`]: the proxy's server span for the request,
//! and one [`ClientSpan`] per attempt under it, whose context each attempt writes onward (W3C, and
//! B3 in the form it came in) so the upstream's spans are the attempt's children. Spans leave as
//! `SpanData` through the export queue (`export`), never waiting on it.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use super::export::Queue;

/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The headers trace context came in, and so is written onward in (W3C always, besides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `traceparent`.
    W3c,
    /// `b3: {trace}-{span}-{sampled}`.
    B3Single,
    /// `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled`.
    B3Multi,
}

/// A trace context read from a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// The trace.
    pub trace_id: u128,
    /// The caller's span: the parent of the proxy's.
    pub span_id: u64,
    /// The caller's decision; `None` (B3 may defer) leaves it to the proxy.
    pub sampled: Option<bool>,
    /// Where it came from.
    pub format: Format,
}

/// The proxy's server span for a sampled request: what its attempts' spans hang under.
#[derive(Clone, Copy, Debug)]
pub struct ServerContext {
    /// The trace.
    pub trace_id: u128,
    /// The server span's own id.
    pub span_id: u64,
    /// The caller's span, if the request came with one.
    pub parent: Option<u64>,
    /// The headers the context came in.
    pub format: Format,
}

/// What [`Tracer::begin`] decided for a request.
#[derive(Debug)]
pub enum Decision {
    /// Traced: the proxy's server span, under which each attempt makes its own.
    Sampled(ServerContext),
    /// A new trace, not sampled: this `traceparent` (sampled flag clear) goes upstream, so the
    /// services behind decide alike.
    Unsampled(Traceparent),
    /// The caller's context says not sampled: it passes through as it came.
    PassThrough,
}

/// Reads trace context: `traceparent` first, then B3 single, then B3 multi. Malformed or all-zero
/// ids count as no context.
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    // One pass over the names, comparing by length first, costs less than three lookups (each
    // hashes its name) when, as usual, none of them is there.
    let (mut w3c, mut b3, mut b3_multi) = (false, false, false);
    for name in headers.keys() {
        match name.as_str().len() {
            11 => w3c |= *name == TRACEPARENT,
            2 => b3 |= *name == B3,
            12 => b3_multi |= *name == B3_TRACE_ID,
            _ => {}
        }
    }
    if !(w3c || b3 || b3_multi) {
        return None;
    }
    if let Some(value) = headers.get(TRACEPARENT) {
        return parse_traceparent(value.as_bytes());
    }
    if let Some(value) = headers.get(B3) {
        return parse_b3_single(value.as_bytes());
    }
    let trace_id = parse_hex_id(headers.get(B3_TRACE_ID)?.as_bytes())?;
    let span_id = u64::try_from(parse_hex_id(headers.get(B3_SPAN_ID)?.as_bytes())?).ok()?;
    let debug = headers.get(B3_FLAGS).is_some_and(|f| f.as_bytes() == b"1");
    let sampled = match headers.get(B3_SAMPLED).map(HeaderValue::as_bytes) {
        _ if debug => Some(true),
        Some(b"1" | b"true") => Some(true),
        Some(b"0" | b"false") => Some(false),
        _ => None,
    };
    valid(Incoming { trace_id, span_id, sampled, format: Format::B3Multi })
}

fn valid(incoming: Incoming) -> Option<Incoming> {
    (incoming.trace_id != 0 && incoming.span_id != 0).then_some(incoming)
}

/// `{version}-{trace-id}-{parent-id}-{flags}`; a later version may append fields.
fn parse_traceparent(value: &[u8]) -> Option<Incoming> {
    if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let version = u8::from_str_radix(std::str::from_utf8(&value[..2]).ok()?, 16).ok()?;
    if version == 0xff || (version == 0 && value.len() != 55) || (version > 0 && value.len() > 55 && value[55] != b'-')
    {
        return None;
    }
    let trace_id = hex(&value[3..35])?;
    let span_id = u64::try_from(hex(&value[36..52])?).ok()?;
    let flags = u8::try_from(hex(&value[53..55])?).ok()?;
    valid(Incoming { trace_id, span_id, sampled: Some(flags & 1 == 1), format: Format::W3c })
}

/// `{trace-id}-{span-id}[-{sampling}[-{parent}]]`. The sampling-only form (`b3: 0`) carries no
/// context: it is read as none.
fn parse_b3_single(value: &[u8]) -> Option<Incoming> {
    let mut fields = value.split(|b| *b == b'-');
    let trace_id = parse_hex_id(fields.next()?)?;
    let span_id = u64::try_from(parse_hex_id(fields.next()?)?).ok()?;
    let sampled = match fields.next() {
        None => None,
        Some(b"1" | b"d") => Some(true),
        Some(b"0") => Some(false),
        Some(_) => return None,
    };
    valid(Incoming { trace_id, span_id, sampled, format: Format::B3Single })
}

/// A 16- or 32-digit (trace id) or 16-digit (span id) hex id.
fn parse_hex_id(value: &[u8]) -> Option<u128> {
    matches!(value.len(), 16 | 32).then(|| hex(value)).flatten()
}

fn hex(digits: &[u8]) -> Option<u128> {
    let mut value = 0_u128;
    for digit in digits {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            b'A'..=b'F' => digit - b'A' + 10,
            _ => return None,
        };
        value = (value << 4) | u128::from(nibble);
    }
    Some(value)
}

/// Writes the low `digits` (even) hex digits of `value` into `out`, two per byte.
fn write_hex(out: &mut [u8], value: u128, digits: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let bytes = value.to_be_bytes();
    let first = bytes.len() - digits / 2;
    for (pair, byte) in out[..digits].chunks_exact_mut(2).zip(&bytes[first..]) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
}

/// A `traceparent` value, formatted and held inline: it costs an allocation only if it becomes a
/// `HeaderValue` (the plain HTTP/1.1 path writes the bytes straight into the request head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Traceparent([u8; 55]);

impl Traceparent {
    /// Version 00, the given ids and sampled flag.
    pub fn new(trace_id: u128, span_id: u64, sampled: bool) -> Traceparent {
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        write_hex(&mut out[3..35], trace_id, 32);
        write_hex(&mut out[36..52], u128::from(span_id), 16);
        if sampled {
            out[54] = b'1';
        }
        Traceparent(out)
    }

    /// The value's bytes (visible ASCII).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The value as a header value.
    pub fn to_header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.0).unwrap_or(HeaderValue::from_static("00-invalid"))
    }
}

/// A `traceparent` header value.
pub fn traceparent(trace_id: u128, span_id: u64, sampled: bool) -> HeaderValue {
    Traceparent::new(trace_id, span_id, sampled).to_header_value()
}

fn hex_value(value: u128, digits: usize) -> HeaderValue {
    let mut out = [0_u8; 32];
    write_hex(&mut out, value, digits);
    HeaderValue::from_bytes(&out[..digits]).unwrap_or(HeaderValue::from_static("0"))
}

/// A method as an attribute value: the standard ones without an allocation.
fn method_value(method: &Method) -> opentelemetry::Value {
    let known: Option<&'static str> = match *method {
        Method::GET => Some("GET"),
        Method::POST => Some("POST"),
        Method::PUT => Some("PUT"),
        Method::DELETE => Some("DELETE"),
        Method::HEAD => Some("HEAD"),
        Method::OPTIONS => Some("OPTIONS"),
        Method::PATCH => Some("PATCH"),
        Method::CONNECT => Some("CONNECT"),
        Method::TRACE => Some("TRACE"),
        _ => None,
    };
    match known {
        Some(name) => name.into(),
        None => method.as_str().to_owned().into(),
    }
}

/// A new, non-zero id.
fn new_id() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

/// What makes and ships spans: the sampler, the scope they are reported under, and the queue.
#[derive(Debug)]
pub struct Tracer {
    /// Sample a new trace when the top 63 bits of its id's low half fall under this (the
    /// OpenTelemetry `TraceIdRatioBased` rule, so every proxy decides a trace the same way).
    threshold: u64,
    always: bool,
    propagate_unsampled: bool,
    scope: InstrumentationScope,
    queue: Queue,
}

impl Tracer {
    /// A tracer sampling new traces at `ratio` (0 to 1) and shipping spans into `queue`.
    pub fn new(ratio: f64, queue: Queue) -> Tracer {
        let ratio = ratio.clamp(0.0, 1.0);
        Tracer {
            threshold: (ratio * (1_u64 << 63) as f64) as u64,
            always: ratio >= 1.0,
            propagate_unsampled: true,
            scope: InstrumentationScope::builder("remora").with_version(env!("CARGO_PKG_VERSION")).build(),
            queue,
        }
    }

    /// Whether a new trace that is not sampled still gets a `traceparent` (default yes).
    pub fn propagating_unsampled(mut self, propagate: bool) -> Tracer {
        self.propagate_unsampled = propagate;
        self
    }

    fn samples(&self, trace_id: u128) -> bool {
        self.always || ((trace_id as u64) >> 1) < self.threshold
    }

    /// Reads a request's trace context and decides; see the module documentation. For a sampled
    /// request, the context headers are taken off it (each attempt writes its own).
    pub fn begin(&self, headers: &mut HeaderMap) -> Decision {
        let incoming = extract(headers);
        let trace_id = incoming.map_or_else(|| (u128::from(new_id()) << 64) | u128::from(new_id()), |i| i.trace_id);
        let sampled = match incoming.and_then(|i| i.sampled) {
            Some(sampled) => sampled,
            None => self.samples(trace_id),
        };
        if !sampled {
            return match incoming {
                None if self.propagate_unsampled => Decision::Unsampled(Traceparent::new(trace_id, new_id(), false)),
                _ => Decision::PassThrough,
            };
        }
        if let Some(incoming) = incoming {
            let names: &[HeaderName] = match incoming.format {
                Format::W3c => &[TRACEPARENT],
                Format::B3Single => &[B3],
                Format::B3Multi => &[B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_SPAN_ID, B3_SAMPLED, B3_FLAGS],
            };
            for name in names {
                headers.remove(name);
            }
        }
        Decision::Sampled(ServerContext {
            trace_id,
            span_id: new_id(),
            parent: incoming.map(|i| i.span_id),
            format: incoming.map_or(Format::W3c, |i| i.format),
        })
    }

    /// Ships a finished span; dropped (and counted) if the queue is full.
    fn ship(&self, span: SpanData) {
        self.queue.push(span);
    }

    fn span(&self, context: SpanContextIds, kind: SpanKind, name: Cow<'static, str>) -> SpanData {
        let span_context = SpanContext::new(
            TraceId::from_bytes(context.trace_id.to_be_bytes()),
            SpanId::from_bytes(context.span_id.to_be_bytes()),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        );
        SpanData {
            span_context,
            parent_span_id: context.parent.map_or(SpanId::INVALID, |p| SpanId::from_bytes(p.to_be_bytes())),
            parent_span_is_remote: context.remote_parent,
            span_kind: kind,
            name,
            start_time: SystemTime::UNIX_EPOCH,
            end_time: SystemTime::UNIX_EPOCH,
            attributes: Vec::with_capacity(18),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: self.scope.clone(),
        }
    }

    /// Ships the server span of a request.
    pub fn finish_server(&self, context: &ServerContext, server: ServerSpan<'_>) {
        let name = match server.route {
            Some(route) if !route.is_empty() => Cow::Owned(format!("{} {route}", server.method)),
            _ => Cow::Owned(server.method.as_str().to_owned()),
        };
        let method = method_value(server.method);
        let ids = SpanContextIds {
            trace_id: context.trace_id,
            span_id: context.span_id,
            parent: context.parent,
            remote_parent: context.parent.is_some(),
        };
        let mut span = self.span(ids, SpanKind::Server, name);
        span.start_time = server.start;
        span.end_time = server.end;
        let a = &mut span.attributes;
        a.push(KeyValue::new("http.request.method", method));
        a.push(KeyValue::new("url.path", server.path.to_owned()));
        if let Some(authority) = server.authority {
            a.push(KeyValue::new("server.address", authority.to_owned()));
        }
        a.push(KeyValue::new("network.protocol.version", server.protocol));
        a.push(KeyValue::new("client.address", server.peer.ip().to_string()));
        a.push(KeyValue::new("client.port", i64::from(server.peer.port())));
        if let Some(identity) = server.peer_identity {
            a.push(KeyValue::new("remora.peer.identity", identity.to_owned()));
        }
        a.push(KeyValue::new("http.response.status_code", i64::from(server.status)));
        if let Some(route) = server.route {
            a.push(KeyValue::new("http.route", route.clone()));
        }
        if let Some(cluster) = server.cluster {
            a.push(KeyValue::new("remora.cluster", cluster.clone()));
        }
        if let Some(endpoint) = server.endpoint {
            a.push(KeyValue::new("remora.endpoint", endpoint.to_string()));
        }
        a.push(KeyValue::new("remora.listener", server.listener.clone()));
        a.push(KeyValue::new("remora.direction", server.direction));
        a.push(KeyValue::new("remora.retries", i64::from(server.attempts.saturating_sub(1))));
        if let Some(grpc) = server.grpc_status {
            a.push(KeyValue::new("rpc.grpc.status_code", i64::from(grpc)));
        }
        let error = server
            .flag
            .filter(|f| !f.is_empty())
            .map(str::to_owned)
            .or_else(|| (server.status >= 500).then(|| server.status.to_string()));
        if let Some(error) = error {
            a.push(KeyValue::new("error.type", error.clone()));
            span.status = Status::error(error);
        }
        self.ship(span);
    }

    /// Starts the span of one attempt under `context`; it ships when dropped.
    pub fn start_client(
        self: &Arc<Self>,
        context: &ServerContext,
        method: &Method,
        cluster: &Arc<str>,
        endpoint: SocketAddr,
        resend: u32,
    ) -> ClientSpan {
        ClientSpan {
            tracer: self.clone(),
            server: *context,
            span_id: new_id(),
            start: SystemTime::now(),
            method: method.clone(),
            cluster: cluster.clone(),
            endpoint,
            resend,
            status: None,
            error: None,
        }
    }
}

struct SpanContextIds {
    trace_id: u128,
    span_id: u64,
    parent: Option<u64>,
    remote_parent: bool,
}

/// What a server span reports: the request, and how it went.
#[derive(Debug)]
pub struct ServerSpan<'a> {
    /// When the request arrived.
    pub start: SystemTime,
    /// When its response ended.
    pub end: SystemTime,
    /// The request's method.
    pub method: &'a Method,
    /// Its path.
    pub path: &'a str,
    /// Its authority.
    pub authority: Option<&'a str>,
    /// `1.1` or `2`.
    pub protocol: &'static str,
    /// The client.
    pub peer: SocketAddr,
    /// The client's SPIFFE ID, proven by mTLS (inbound mesh connections).
    pub peer_identity: Option<&'a str>,
    /// The response status.
    pub status: u16,
    /// The route that took it (`TABLE/ROUTE`).
    pub route: Option<&'a Arc<str>>,
    /// The cluster it went to.
    pub cluster: Option<&'a Arc<str>>,
    /// The last endpoint tried.
    pub endpoint: Option<SocketAddr>,
    /// The listener.
    pub listener: &'a Arc<str>,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Attempts sent (retries and hedges included).
    pub attempts: u32,
    /// The gRPC status, for gRPC.
    pub grpc_status: Option<u32>,
    /// The proxy's `x-remora-error` for a local answer.
    pub flag: Option<&'a str>,
}

/// The span of one attempt on an endpoint, shipped when dropped: on failure at once, for the
/// attempt that answers when its response body ends.
#[derive(Debug)]
pub struct ClientSpan {
    tracer: Arc<Tracer>,
    server: ServerContext,
    span_id: u64,
    start: SystemTime,
    method: Method,
    cluster: Arc<str>,
    endpoint: SocketAddr,
    resend: u32,
    status: Option<u16>,
    error: Option<&'static str>,
}

impl ClientSpan {
    /// The trace headers the attempt carries to its endpoint: `traceparent`, and B3 in the form the
    /// request came with. `tracestate` passes through untouched.
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let (trace_id, span_id) = (self.server.trace_id, self.span_id);
        let mut headers = Vec::with_capacity(4);
        headers.push((TRACEPARENT, traceparent(trace_id, span_id, true)));
        match self.server.format {
            Format::W3c => {}
            Format::B3Single => {
                let mut value = *b"00000000000000000000000000000000-0000000000000000-1-0000000000000000";
                write_hex(&mut value[..32], trace_id, 32);
                write_hex(&mut value[33..49], u128::from(span_id), 16);
                write_hex(&mut value[52..68], u128::from(self.server.span_id), 16);
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    headers.push((B3, value));
                }
            }
            Format::B3Multi => {
                headers.push((B3_TRACE_ID, hex_value(trace_id, 32)));
                headers.push((B3_SPAN_ID, hex_value(u128::from(span_id), 16)));
                headers.push((B3_PARENT_SPAN_ID, hex_value(u128::from(self.server.span_id), 16)));
                headers.push((B3_SAMPLED, HeaderValue::from_static("1")));
            }
        }
        headers
    }

    /// Notes the endpoint's answer.
    pub fn set_status(&mut self, status: u16) {
        self.status = Some(status);
    }

    /// Notes why the attempt failed, if it did (the `x-remora-error` name of its error).
    pub fn set_error(&mut self, error: &'static str) {
        self.error = Some(error);
    }
}

impl Drop for ClientSpan {
    fn drop(&mut self) {
        let ids = SpanContextIds {
            trace_id: self.server.trace_id,
            span_id: self.span_id,
            parent: Some(self.server.span_id),
            remote_parent: false,
        };
        let method = method_value(&self.method);
        let name = match &method {
            opentelemetry::Value::String(name) => Cow::Owned(name.as_str().to_owned()),
            _ => Cow::Borrowed("HTTP"),
        };
        let mut span = self.tracer.span(ids, SpanKind::Client, name);
        span.start_time = self.start;
        span.end_time = SystemTime::now();
        let a = &mut span.attributes;
        a.push(KeyValue::new("http.request.method", method));
        a.push(KeyValue::new("server.address", self.endpoint.ip().to_string()));
        a.push(KeyValue::new("server.port", i64::from(self.endpoint.port())));
        a.push(KeyValue::new("remora.cluster", self.cluster.clone()));
        if self.resend > 0 {
            a.push(KeyValue::new("http.request.resend_count", i64::from(self.resend)));
        }
        if let Some(status) = self.status {
            a.push(KeyValue::new("http.response.status_code", i64::from(status)));
        }
        let error = match (self.error, self.status) {
            (Some(error), _) => Some(error.to_owned()),
            (None, Some(status))
                if StatusCode::from_u16(status).is_ok_and(|s| s.is_client_error() || s.is_server_error()) =>
            {
                Some(status.to_string())
            }
            (None, None) => Some("cancelled".to_owned()),
            _ => None,
        };
        if let Some(error) = error {
            a.push(KeyValue::new("error.type", error.clone()));
            span.status = Status::error(error);
        }
        self.tracer.ship(span);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn reads_w3c_and_both_b3_forms() {
        let w3c = extract(&headers(&[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]));
        assert_eq!(
            w3c,
            Some(Incoming {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                span_id: 0x00f067aa0ba902b7,
                sampled: Some(true),
                format: Format::W3c
            })
        );
        let single = extract(&headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0")])).unwrap();
        assert_eq!(single.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert_eq!(single.sampled, Some(false));
        assert_eq!(single.format, Format::B3Single);
        let short = extract(&headers(&[("b3", "64fe8b2a57d3eff7-e457b5a2e4d86bd1")])).unwrap();
        assert_eq!((short.trace_id, short.sampled), (0x64fe8b2a57d3eff7, None));
        let multi = extract(&headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]))
        .unwrap();
        assert_eq!((multi.span_id, multi.sampled, multi.format), (0xe457b5a2e4d86bd1, Some(true), Format::B3Multi));
    }

    #[test]
    fn rejects_malformed_context() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut map = HeaderMap::new();
            map.insert(TRACEPARENT, HeaderValue::from_static(bad));
            assert_eq!(extract(&map), None, "{bad}");
        }
        assert!(extract(&headers(&[("b3", "0")])).is_none());
        // A later version may append fields.
        let later = headers(&[("traceparent", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future")]);
        assert!(extract(&later).is_some());
    }

    #[test]
    fn writes_what_it_reads() {
        let value = traceparent(0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, true);
        assert_eq!(value, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(traceparent(1, 2, false), "00-00000000000000000000000000000001-0000000000000002-00");
    }

    #[test]
    fn an_unsampled_new_trace_gets_a_traceparent_unless_told_not_to() {
        let tracer = Tracer::new(0.0, Queue::new(1, 1, Default::default()).0);
        assert!(
            matches!(tracer.begin(&mut HeaderMap::new()), Decision::Unsampled(t) if t.as_bytes().ends_with(b"-00"))
        );
        let quiet = Tracer::new(0.0, Queue::new(1, 1, Default::default()).0).propagating_unsampled(false);
        assert!(matches!(quiet.begin(&mut HeaderMap::new()), Decision::PassThrough));
    }

    #[test]
    fn ratio_sampling_follows_the_trace_id() {
        let (queue, _receiver) = Queue::new(1, 1, Default::default());
        let tracer = Tracer::new(0.25, queue);
        let sampled = (0..20_000_u64).filter(|_| tracer.samples(fastrand::u128(..))).count();
        assert!((4_000..6_000).contains(&sampled), "{sampled}");
        assert!(Tracer::new(1.0, Queue::new(1, 1, Default::default()).0).samples(u128::MAX));
        assert!(!Tracer::new(0.0, Queue::new(1, 1, Default::default()).0).samples(0));
    }
}
