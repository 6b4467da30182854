//! What a failed upstream attempt says about itself: the facts that retry policy and outlier
//! detection decide over.
//!
//! Every error that ends an attempt on an endpoint (a connect that failed, a stream the endpoint
//! refused, a connection that broke, a timeout, a request that never left) is summed up as a
//! [`Failure`]: what kind of failure it was, and whether it says anything about the endpoint. The
//! data path's error types produce it (`http::error::ProxyError::failure`,
//! `connect::ConnectError::failure`); `policy::retry` decides from it whether another attempt may help,
//! and `balance` whether to hold it against the endpoint. Neither knows an HTTP, TCP, TLS or codec
//! type, and a new error type only has to say which facts it carries.

/// The kind of an attempt's failure, in the terms retry conditions use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// No connection: refused, unreachable, timed out, or the mTLS handshake with the endpoint's
    /// sidecar failed. The request was never sent.
    Connect,
    /// The endpoint refused the stream before processing it (HTTP/2 `REFUSED_STREAM`).
    RefusedStream,
    /// The connection or stream broke after the request may have been sent.
    Reset,
    /// The endpoint answered with something that is not a valid response.
    Protocol,
    /// No response head within the attempt's per-try timeout.
    PerTryTimeout,
    /// No response head within the route's timeout: the request's time is up.
    RequestTimeout,
    /// The client's side failed (its request body broke off), or it asked for what cannot be sent.
    Client,
    /// The request was never sent, for reasons that are not the endpoint's: no route or endpoint,
    /// a circuit breaker or rate limit, an injected fault, authorization, this proxy's own
    /// credentials.
    NotSent,
}

/// What one failure says: its kind, and whether it blames the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What failed.
    pub kind: FailureKind,
    /// Whether it counts against the endpoint (outlier detection, the ewma balancer's estimate).
    pub blames_endpoint: bool,
}

impl Failure {
    /// A failure of `kind` that the endpoint is to blame for.
    pub const fn of_endpoint(kind: FailureKind) -> Failure {
        Failure { kind, blames_endpoint: true }
    }

    /// A failure of `kind` that says nothing about the endpoint.
    pub const fn not_the_endpoints(kind: FailureKind) -> Failure {
        Failure { kind, blames_endpoint: false }
    }
}
