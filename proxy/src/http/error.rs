//! Why a request could not be proxied, and the one place such a reason becomes an HTTP response.
//!
//! Every failure on the HTTP data path is a [`ProxyError`]. Each states its facts
//! ([`ProxyError::failure`]): what kind of failure it is and whether it blames the endpoint; the
//! route's retry policy (`policy::retry`) and outlier detection (`balance`) decide over those facts
//! alone. [`ProxyError::to_response`] is the only mapping from errors to status codes:
//! a short text body and an `x-remora-error` header naming the reason, so an operator can tell a 503
//! the proxy made from one the app sent. A route's fallback is the one exception to the short text
//! body: its static answer replaces the error's, under `x-remora-error: fallback`.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::connect::ConnectError;
use crate::failure::{Failure, FailureKind};
use crate::http::body::ProxyBody;
use crate::http::h1;
use crate::policy::Fallback;
use crate::policy::breaker::Breaker;

/// The header that names the reason of a response the proxy made itself.
pub const ERROR_HEADER: &str = "x-remora-error";

/// A request that could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route table or route matched the request.
    #[error("no route matches the request")]
    NoRoute,
    /// The listener was removed by a reload while this connection was open.
    #[error("the listener was removed")]
    ListenerRemoved,
    /// The cluster had no endpoint to send to.
    #[error("cluster {0:?} has no endpoint to send to")]
    NoEndpoint(std::sync::Arc<str>),
    /// The route leads to a pass-through cluster, but the connection was not redirected, so there is
    /// no original destination to pass it to.
    #[error(
        "cluster {0:?} sends traffic to its original destination, and this connection has none (it was not redirected to the proxy)"
    )]
    NoOriginalDestination(std::sync::Arc<str>),
    /// Connecting to the endpoint failed or timed out.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The HTTP/2 endpoint broke the connection or spoke invalid HTTP.
    #[error("upstream: {0}")]
    Upstream(hyper::Error),
    /// The HTTP/1.1 endpoint broke the connection or spoke invalid HTTP.
    #[error("upstream: {0}")]
    Http1(h1::Error),
    /// The request cannot be proxied as sent.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The response head did not arrive within the route's timeout.
    #[error("no response within the route's timeout of {0:?}")]
    RequestTimeout(std::time::Duration),
    /// The route's rate limit is used up; a token is due after this long.
    #[error("rate limited: try again in {0:?}")]
    RateLimited(std::time::Duration),
    /// The route's fault injection chose to fail this request with this status.
    #[error("fault injected by the route's policy")]
    FaultInjected(u16),
    /// A circuit breaker of the cluster is open.
    #[error("cluster {0:?} is at its {limit} limit", limit = .1.as_str())]
    Overflow(std::sync::Arc<str>, Breaker),
    /// The last attempt's response head did not arrive within the retry policy's per-try timeout.
    #[error("no response within the per-try timeout of {0:?}")]
    PerTryTimeout(std::time::Duration),
    /// The mTLS handshake with the endpoint's sidecar failed, or it is not who it should be.
    #[error("mesh: {0}")]
    Mesh(#[from] crate::tls::TlsError),
    /// The peer's HBONE listener answered a tunnel's `CONNECT` with this status instead of `200`.
    #[error("the peer's hbone listener refused the tunnel: {0}")]
    TunnelRefused(StatusCode),
    /// An authorization policy of the inbound listener does not let this peer make this request.
    #[error("{peer} is not allowed by authorization policy {policy:?}")]
    Unauthorized {
        /// The policy.
        policy: std::sync::Arc<str>,
        /// The peer's identity.
        peer: String,
    },
    /// The cluster could not take the request, and the route answers with its fallback instead.
    #[error("{cause}; the route's fallback answered")]
    Fallback {
        /// The route's static answer.
        response: std::sync::Arc<Fallback>,
        /// Why the cluster could not take the request.
        cause: Box<ProxyError>,
    },
}

impl ProxyError {
    /// What kind of failure this is, and whether it blames the endpoint.
    pub fn failure(&self) -> Failure {
        use FailureKind::*;
        match self {
            ProxyError::Connect(error) => error.failure(),
            // The handshake is part of connecting: the request was never sent. This proxy's own
            // missing or expired certificate is not the endpoint's fault.
            ProxyError::Mesh(error) if error.is_local() => Failure::not_the_endpoints(Connect),
            ProxyError::Mesh(_) => Failure::of_endpoint(Connect),
            // A tunnel refused for want of capacity is the endpoint's; one refused as not allowed
            // or misdirected is ours.
            ProxyError::TunnelRefused(status) if status.is_server_error() => Failure::of_endpoint(Connect),
            ProxyError::TunnelRefused(_) => Failure::not_the_endpoints(Connect),
            ProxyError::Upstream(error) if is_refused_stream(error) => Failure::of_endpoint(RefusedStream),
            ProxyError::Upstream(_) | ProxyError::Http1(h1::Error::Io(_) | h1::Error::Closed) => {
                Failure::of_endpoint(Reset)
            }
            ProxyError::Http1(h1::Error::Protocol(_)) => Failure::of_endpoint(Protocol),
            // Only an upgrade's endpoint may switch; an endpoint that switches unasked is broken,
            // but the request it answered was ours to send on a connection of its own.
            ProxyError::Http1(h1::Error::UnexpectedSwitch) => Failure::not_the_endpoints(Protocol),
            ProxyError::PerTryTimeout(_) => Failure::of_endpoint(PerTryTimeout),
            ProxyError::RequestTimeout(_) => Failure::of_endpoint(RequestTimeout),
            ProxyError::Http1(h1::Error::RequestBody(_)) | ProxyError::BadRequest(_) => {
                Failure::not_the_endpoints(Client)
            }
            ProxyError::NoRoute
            | ProxyError::ListenerRemoved
            | ProxyError::NoEndpoint(_)
            | ProxyError::NoOriginalDestination(_)
            | ProxyError::RateLimited(_)
            | ProxyError::FaultInjected(_)
            | ProxyError::Overflow(..)
            | ProxyError::Unauthorized { .. } => Failure::not_the_endpoints(NotSent),
            ProxyError::Fallback { cause, .. } => cause.failure(),
        }
    }

    /// Whether the route's fallback answers in place of this error: the cluster had no healthy
    /// endpoint, or a breaker was open.
    pub fn takes_fallback(&self) -> bool {
        matches!(self, ProxyError::NoEndpoint(_) | ProxyError::Overflow(..))
    }

    /// The response the client gets.
    pub fn to_response(&self) -> Response<ProxyBody> {
        if let ProxyError::Fallback { response: fallback, .. } = self {
            let mut response = Response::new(ProxyBody::local(fallback.body.clone()));
            *response.status_mut() = fallback.status;
            *response.headers_mut() = fallback.headers.clone();
            response.headers_mut().insert(ERROR_HEADER, HeaderValue::from_static("fallback"));
            return response;
        }
        let (status, reason) = self.status_and_reason();
        let mut response = Response::new(ProxyBody::local(Bytes::from(format!("{self}\n"))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(reason));
        if matches!(self, ProxyError::ListenerRemoved | ProxyError::BadRequest(_)) {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if let ProxyError::RateLimited(wait) = self {
            // Whole seconds, rounded up: a client that waits this long finds a token.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }

    /// The status the client gets, and the reason its `x-remora-error` header names.
    pub fn status_and_reason(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            ProxyError::ListenerRemoved => (StatusCode::SERVICE_UNAVAILABLE, "listener_removed"),
            ProxyError::NoEndpoint(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_upstream"),
            ProxyError::NoOriginalDestination(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_original_destination"),
            ProxyError::Connect(ConnectError::Timeout(_)) => (StatusCode::SERVICE_UNAVAILABLE, "connect_timeout"),
            ProxyError::Connect(ConnectError::Failed { .. }) => (StatusCode::SERVICE_UNAVAILABLE, "connect_failed"),
            ProxyError::Upstream(_) | ProxyError::Http1(h1::Error::Io(_) | h1::Error::Closed) => {
                (StatusCode::BAD_GATEWAY, "upstream_reset")
            }
            ProxyError::Http1(h1::Error::Protocol(_) | h1::Error::UnexpectedSwitch) => {
                (StatusCode::BAD_GATEWAY, "upstream_protocol_error")
            }
            ProxyError::Http1(h1::Error::RequestBody(_)) => (StatusCode::BAD_REQUEST, "downstream_body_error"),
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ProxyError::Mesh(_) => (StatusCode::SERVICE_UNAVAILABLE, "upstream_tls"),
            ProxyError::TunnelRefused(_) => (StatusCode::SERVICE_UNAVAILABLE, "upstream_tunnel_refused"),
            ProxyError::Unauthorized { .. } => (StatusCode::FORBIDDEN, "unauthorized"),
            ProxyError::RequestTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "request_timeout"),
            ProxyError::PerTryTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "per_try_timeout"),
            ProxyError::Overflow(..) => (StatusCode::SERVICE_UNAVAILABLE, "upstream_overflow"),
            // Answered above.
            ProxyError::Fallback { .. } => (StatusCode::SERVICE_UNAVAILABLE, "fallback"),
            ProxyError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ProxyError::FaultInjected(status) => {
                (StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), "fault_injected")
            }
        }
    }
}

/// Whether an HTTP/2 upstream error is the endpoint refusing the stream before processing it.
fn is_refused_stream(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(h2) = current.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = current.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_one_status_and_a_named_reason() {
        let refused = ProxyError::Connect(ConnectError::Failed {
            address: ([127, 0, 0, 1], 1).into(),
            error: std::io::ErrorKind::ConnectionRefused.into(),
        });
        let cases = [
            (ProxyError::NoRoute, 404, "no_route"),
            (ProxyError::NoEndpoint("c".into()), 503, "no_healthy_upstream"),
            (ProxyError::Connect(ConnectError::Timeout(([127, 0, 0, 1], 1).into())), 503, "connect_timeout"),
            (refused, 503, "connect_failed"),
            (ProxyError::BadRequest("x"), 400, "bad_request"),
            (ProxyError::Mesh(crate::tls::TlsError::NoIdentity), 503, "upstream_tls"),
            (ProxyError::TunnelRefused(StatusCode::UNAUTHORIZED), 503, "upstream_tunnel_refused"),
            (ProxyError::Unauthorized { policy: "p".into(), peer: "spiffe://td/x".into() }, 403, "unauthorized"),
            (ProxyError::RequestTimeout(std::time::Duration::from_secs(1)), 504, "request_timeout"),
            (ProxyError::RateLimited(std::time::Duration::from_millis(1500)), 429, "rate_limited"),
            (ProxyError::FaultInjected(418), 418, "fault_injected"),
            (ProxyError::Overflow("c".into(), Breaker::Requests), 503, "upstream_overflow"),
            (ProxyError::PerTryTimeout(std::time::Duration::from_secs(1)), 504, "per_try_timeout"),
        ];
        for (error, status, reason) in cases {
            let response = error.to_response();
            assert_eq!(response.status().as_u16(), status, "{error}");
            assert_eq!(response.headers()[ERROR_HEADER], reason);
        }
        let limited = ProxyError::RateLimited(std::time::Duration::from_millis(1500)).to_response();
        assert_eq!(limited.headers()[RETRY_AFTER], "2");
    }

    #[test]
    fn each_error_states_its_kind_and_whom_it_blames() {
        use FailureKind::*;
        let refused = ProxyError::Connect(ConnectError::Failed {
            address: ([127, 0, 0, 1], 1).into(),
            error: std::io::ErrorKind::ConnectionRefused.into(),
        });
        let cases = [
            (refused, Connect, true),
            (ProxyError::Connect(ConnectError::Timeout(([127, 0, 0, 1], 1).into())), Connect, true),
            (ProxyError::Mesh(crate::tls::TlsError::Timeout), Connect, true),
            (ProxyError::Mesh(crate::tls::TlsError::NoIdentity), Connect, false),
            (ProxyError::Mesh(crate::tls::TlsError::Expired), Connect, false),
            (ProxyError::Http1(h1::Error::Closed), Reset, true),
            (ProxyError::Http1(h1::Error::Protocol("x")), Protocol, true),
            (ProxyError::Http1(h1::Error::RequestBody("gone".into())), Client, false),
            (ProxyError::PerTryTimeout(std::time::Duration::from_secs(1)), PerTryTimeout, true),
            (ProxyError::RequestTimeout(std::time::Duration::from_secs(1)), RequestTimeout, true),
            (ProxyError::NoEndpoint("c".into()), NotSent, false),
            (ProxyError::Overflow("c".into(), Breaker::Requests), NotSent, false),
            (ProxyError::NoRoute, NotSent, false),
        ];
        for (error, kind, blames) in cases {
            assert_eq!(error.failure(), Failure { kind, blames_endpoint: blames }, "{error}");
        }
    }

    #[test]
    fn a_fallback_answers_with_its_own_status_headers_and_body() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-degraded", HeaderValue::from_static("yes"));
        let fallback =
            std::sync::Arc::new(Fallback { status: StatusCode::OK, headers, body: Bytes::from_static(b"[]") });
        let error = ProxyError::Fallback { response: fallback, cause: Box::new(ProxyError::NoEndpoint("c".into())) };
        let response = error.to_response();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-degraded"], "yes");
        assert_eq!(response.headers()[ERROR_HEADER], "fallback");
        assert!(error.to_string().starts_with("cluster \"c\" has no endpoint"), "{error}");
    }
}
