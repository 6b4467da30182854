//! L7: proxying HTTP/1.1 and HTTP/2, request by request.
//!
//! `listener` hands each HTTP connection to [`server::serve`], which runs hyper's server on it and
//! gives every request to `proxy`. A request then goes through these phases, in this order, each
//! in a file of its own:
//!
//! 1. **observe** (`observe::begin`): the trace context is read and sampling decided; when the
//!    request is sampled or the access log is on, an observer follows it;
//! 2. **route** (`route`): from the live snapshot, the route and cluster that take the request; the
//!    peer's authorization for it; the identity header the app is told; the route's admission
//!    (rate limit, faults). A pure function of the snapshot and the head;
//! 3. **plan** (`plan`): what to do with it — a `CONNECT` tunnel (`tunnel`), an injected abort,
//!    the plain path (one attempt, prepared and balanced there), or the policed path (`policed`:
//!    the route's timeout, retries and hedging by `retries`, mirroring by `mirror`, fallback);
//!    every attempt on an endpoint, whichever path, is `attempt`'s: pick within the breakers →
//!    send by version → settle;
//! 4. **respond**: the endpoint's response streams back, its body holding the attempt in flight
//!    until it ends; any failure becomes a response in one place, [`error::ProxyError::to_response`];
//! 5. **record**: the listener's and the route's counters by status now; the server span, the
//!    access-log line and the gRPC status when the response body ends (`observe::Finish`).
//!
//! Between requests an HTTP/1.1 connection parks (`park`): hyper is shut down and only the socket
//! waits for the next request, on a worker in the worker's lot (`lot`), with no task of its own.
//!
//! The rest serves those phases: [`body`] (the bodies that cross the proxy), [`client`] (the
//! upstream connection pools and clients), [`h1`] (the proxy's own HTTP/1.1 client codec),
//! [`headers`] (hop-by-hop hygiene, requests reshaped for their upstream version), `normalize`
//! (the path as the application will read it, before routing decides on it), [`settings`]
//! (the server's and the client's settings, built once), [`replay`]
//! (bodies read more than once).

pub mod body;
pub mod client;
pub mod error;
pub mod h1;
pub mod headers;
pub(crate) mod lot;
pub mod replay;
pub mod server;
pub mod settings;
pub mod tidy;
pub mod tunnel;

mod attempt;
mod mirror;
pub mod normalize;
pub(crate) mod observe;
mod park;
mod plan;
mod policed;
mod retries;
mod route;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use http_body::Body as _;
use tracing::debug;

use attempt::{Head as _, Outgoing};
use body::{ClientBody, ProxyBody, RequestBody, UpstreamBody};
use client::Version;
use error::ProxyError;
use observe::Finish;
use plan::{Direct, Plan};
use route::{ResponseHeaders, Routing};
use server::HttpConnection;

/// One request through every phase; always yields a response.
///
/// Observe, route and plan run synchronously; on the plain path the only await is the attempt's
/// exchange with the endpoint, the upstream client's own future awaited here rather than through
/// layers of `async fn`, because every layer would carry its own copy of the request in this future
/// (which hyper moves, and for HTTP/2 spawns, per request). The rarer ways on are boxed, each in a
/// statement of its own.
pub(crate) async fn proxy(
    mut request: Request<RequestBody>,
    connection: Arc<HttpConnection>,
) -> Result<Response<ProxyBody>, Infallible> {
    let arrived = Instant::now();
    if connection.quiet.enabled() {
        connection.quiet.exchange_begins(!request.body().is_end_stream());
    }
    // 1. Observe.
    let (observe, unsampled) = observe::begin(&mut request, &connection);
    let grpc = observe::is_grpc(request.headers());
    // 2. Route, and 3. plan.
    let mut stats = None;
    let mut edits: ResponseHeaders = Default::default();
    let routed = route::route(&connection.data.snapshot.load(), &connection.origin, &mut request, arrived);
    let planned = routed.and_then(|routing| match routing {
        Routing::Redirect { status, location, response_headers } => {
            edits = response_headers;
            Ok(Plan::Redirect { status, location })
        }
        Routing::Forward(mut routed) => {
            stats = routed.stats.take();
            edits = std::mem::take(&mut routed.response_headers);
            plan::plan(&mut request, routed, &connection, observe.as_ref(), unsampled, arrived)
        }
    });
    let result = match planned {
        Err(error) => Err(error),
        Ok(Plan::Redirect { status, location }) => Ok(redirect(status, &location)),
        Ok(Plan::Tunnel(cluster)) => {
            let tunnel = Box::pin(tunnel::connect(request, &cluster, &connection));
            tunnel.await
        }
        Ok(Plan::Abort { status, delay }) => {
            tokio::time::sleep(delay).await;
            Err(ProxyError::FaultInjected(status))
        }
        Ok(Plan::Policed(policed)) => {
            let policed = Box::pin(policed::forward(request, policed, &connection));
            policed.await
        }
        Ok(Plan::Direct(Direct { cluster, endpoint, version, upgrade, downstream_upgrade, attempt, traceparent })) => {
            let (parts, body) = request.into_parts();
            let body = UpstreamBody::Direct(ClientBody::new(body, observe.as_ref(), &connection));
            let head = Outgoing { parts, traceparent };
            let client = &connection.data.client;
            // Send by version: `attempt::send`'s dispatch, spelled out so that the HTTP/1.1 exchange
            // is built where it is awaited (through `attempt::Sending` it would be copied once more).
            let result = match version {
                Version::Http1 if cluster.mesh.is_some() => {
                    let sending =
                        Box::pin(attempt::send_mesh_http1(&cluster, client, endpoint, head.into_request(body)));
                    sending.await
                }
                Version::Http1 => attempt::send_http1(&cluster, endpoint, head, body, upgrade).await,
                Version::Http2 => {
                    let sending = Box::pin(attempt::send_http2(&cluster, client, endpoint, head.into_request(body)));
                    sending.await
                }
            };
            attempt.respond(&cluster, result, downstream_upgrade, &connection)
        }
    };
    // 4. Respond.
    let mut response = result.unwrap_or_else(|error| {
        debug!(listener = %connection.listener.name, %error, "request failed");
        error.to_response()
    });
    if connection.quiet.enabled() {
        response.body_mut().ends_exchange(park::ExchangeEnd::of(&connection));
    }
    for modifier in edits.iter().flatten() {
        modifier.apply(response.headers_mut());
    }
    if let Some(alt_svc) = connection.listener.alt_svc.get() {
        response.headers_mut().insert(http::header::ALT_SVC, alt_svc.clone());
    }
    // 5. Record: the listener's and the route's part now, the rest when the body ends.
    let status = response.status().as_u16();
    connection.listener.stats.record_response(status);
    if stats.is_some() || connection.caller.is_some() {
        let elapsed = arrived.elapsed();
        if let Some(stats) = &stats {
            stats.record(status, elapsed);
        }
        if let Some(caller) = &connection.caller {
            caller.record(status, elapsed);
        }
    }
    if observe.is_none() && !grpc {
        return Ok(response);
    }
    let finish = Finish::new(observe, &connection, stats.as_ref(), grpc, status, response.headers(), arrived);
    Ok(response.map(|body| body.finish(finish)))
}

/// A reply of `status` alone, with no body.
pub(crate) fn empty_reply(status: http::StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = status;
    response
}

/// The answer to a request a route redirects: `status`, `Location: location`, no body.
fn redirect(status: http::StatusCode, location: &str) -> Response<ProxyBody> {
    let mut response = empty_reply(status);
    // The location is made of validated parts and the request's own path: always a valid value.
    if let Ok(location) = http::HeaderValue::from_str(location) {
        response.headers_mut().insert(http::header::LOCATION, location);
    }
    response
}
