//! Planning a routed request: what to do with it, decided before any await.
//!
//! [`plan`] takes what routing decided ([`Routed`]) and picks one of four ways on:
//!
//! - **tunnel**: a `CONNECT` opens a byte tunnel through the cluster (`tunnel`);
//! - **abort**: the route's faults fail the request, after an injected delay (a fault without a
//!   delay, and a spent rate limit, fail at once as errors);
//! - **direct**: the plain path, for routes whose policy asks for no more than admission: the
//!   request is prepared for the endpoint's version and balanced here, and `http::proxy` sends it
//!   as one attempt of `attempt`'s, awaited inline with nothing boxed;
//! - **policed**: a route that asks for more (a delay, a timeout, retries, hedging, a mirror, a
//!   fallback, an idle timeout) prepares the request once and hands it to `policed`, which runs the
//!   attempts. An upgrade to a mesh cluster never goes this way: it takes a connection of its own
//!   and cannot be retried.
//!
//! A new unsampled trace's `traceparent` is written by the plain HTTP/1.1 path itself, after the
//! head's fields; every other way inserts it into the head here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request};

use super::attempt::{self, Attempt};
use super::body::RequestBody;
use super::client::Version;
use super::error::ProxyError;
use super::headers;
use super::observe::Observe;
use super::policed::Policed;
use super::route::Routed;
use super::server::HttpConnection;
use crate::policy::Admission;
use crate::state::cluster::Cluster;
use crate::telemetry::trace::{self, Traceparent};

/// What to do with a request.
pub(crate) enum Plan {
    /// Open a `CONNECT` tunnel through this cluster.
    Tunnel(Arc<Cluster>),
    /// Fail with an injected status after an injected delay.
    Abort { status: u16, delay: Duration },
    /// Send the prepared request to this endpoint, once.
    Direct(Direct),
    /// Forward under the route's policy (`policed`).
    Policed(Policed),
    /// Answer with a redirect (the route's; `route` decided it, before any plan).
    Redirect { status: http::StatusCode, location: String },
}

/// A prepared request's one attempt on the plain path.
pub(crate) struct Direct {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) endpoint: SocketAddr,
    pub(crate) version: Version,
    pub(crate) upgrade: bool,
    pub(crate) downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    pub(crate) attempt: Attempt,
    /// A new unsampled trace's context, written after the head's fields (HTTP/1.1).
    pub(crate) traceparent: Option<Traceparent>,
}

/// Decides what to do with `request` as `routed`; balances and prepares it in place for the plain
/// path. See the module documentation.
pub(crate) fn plan(
    request: &mut Request<RequestBody>,
    routed: Routed,
    connection: &HttpConnection,
    observe: Option<&Arc<Observe>>,
    unsampled: Option<Traceparent>,
    arrived: Instant,
) -> Result<Plan, ProxyError> {
    let Routed { cluster, policy, admission, .. } = routed;
    let delay = match admission {
        Admission::Forward { delay } => delay,
        Admission::RateLimited(wait) => return Err(ProxyError::RateLimited(wait)),
        Admission::Abort { status, delay: None } => return Err(ProxyError::FaultInjected(status)),
        Admission::Abort { status, delay: Some(delay) } => return Ok(Plan::Abort { status, delay }),
    };
    let upgrade = headers::is_upgrade(request);
    if request.method() == Method::CONNECT {
        return Ok(Plan::Tunnel(cluster));
    }
    let downstream_version = request.version();
    let version = attempt::version_for(&cluster, downstream_version, upgrade);
    let mesh_upgrade = upgrade && cluster.mesh.is_some();
    let policed = policy.filter(|p| !mesh_upgrade && (delay.is_some() || p.forwards()));
    let traceparent = match unsampled {
        Some(value) if policed.is_some() || version == Version::Http2 || mesh_upgrade => {
            request.headers_mut().insert(trace::TRACEPARENT, value.to_header_value());
            None
        }
        other => other,
    };
    if let Some(policy) = policed {
        // Prepared once for all attempts. The endpoint only fills in a missing HTTP/2 authority;
        // before any is picked, the original destination (or the listener) stands in.
        let host_fallback = connection.origin.original_destination.unwrap_or(connection.listener.address);
        headers::prepare_request(request, version, host_fallback, upgrade);
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut *request));
        return Ok(Plan::Policed(Policed {
            cluster,
            policy,
            observe: observe.cloned(),
            delay,
            version,
            downstream_version,
            downstream_upgrade,
            arrived,
        }));
    }
    let observe = observe.map(|o| (&**o, connection));
    let (endpoint, attempt) = attempt::pick(&cluster, &connection.origin, request.headers(), &[], arrived, observe)?;
    headers::prepare_request(request, version, endpoint, upgrade);
    if let Some(trace) = attempt.trace_headers() {
        request.headers_mut().extend(trace);
    }
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut *request));
    Ok(Plan::Direct(Direct { cluster, endpoint, version, upgrade, downstream_upgrade, attempt, traceparent }))
}
