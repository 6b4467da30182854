//! Traffic mirroring: a copy of a request sent to a shadow cluster, its answer thrown away.
//!
//! `forward` calls [`send`] for a request its route chose to copy. The copy is the request's head
//! with `-shadow` added to its host (as Envoy does, so the shadow's logs and routing can tell copies
//! from traffic), and a follower reader of the request's `ReplayBody`: the copy's body streams as
//! the original's attempts read the client's, never ahead of them, so the original is never held
//! back (a body longer than the replay buffer cuts the copy short). The copy runs in a task of its
//! own on the worker, bounded by the route's timeout (or `MIRROR_TIMEOUT`); each worker keeps at
//! most `MIRROR_MAX_IN_FLIGHT` copies in flight and drops the rest, so a shadow cluster that stops
//! answering costs bounded memory. The cluster's `mirror_requests` counters say what became of the
//! copies.

use std::cell::Cell;
use std::time::Duration;

use http::header::{HOST, HeaderValue};
use http::uri::Authority;
use tracing::debug;

use super::client::{self, Outcome};
use super::forward::{Reusable, Template};
use super::{HttpConnection, headers, upstream_version};
use crate::limits;
use crate::policy::Mirror;

thread_local! {
    /// Copies in flight on this worker.
    static IN_FLIGHT: Cell<usize> = const { Cell::new(0) };
}

/// Counts a copy in flight on this worker until dropped.
struct Counted;

impl Counted {
    fn take() -> Option<Counted> {
        IN_FLIGHT
            .try_with(|n| {
                if n.get() >= limits::MIRROR_MAX_IN_FLIGHT {
                    return None;
                }
                n.set(n.get() + 1);
                Some(Counted)
            })
            .ok()
            .flatten()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let _ = IN_FLIGHT.try_with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// Sends a copy of the request `template` (prepared for the original's cluster) with a follower of
/// `body`, to `mirror`'s cluster. Returns at once.
pub(crate) fn send(
    mirror: &Mirror,
    template: &Template,
    body: &Reusable,
    downstream_version: http::Version,
    timeout: Option<Duration>,
    connection: &std::sync::Arc<HttpConnection>,
) {
    let cluster = mirror.cluster.clone();
    let Some(counted) = Counted::take() else {
        cluster.stats.mirror_dropped.inc();
        return;
    };
    let Some(follower) = body.copy() else {
        cluster.stats.mirror_dropped.inc();
        return;
    };
    let mut request = template.request(follower);
    let Some(picked) =
        cluster.pick(connection.original_destination, Some(request.headers()), Some(connection.peer), &[])
    else {
        cluster.stats.mirror_failed.inc();
        return;
    };
    let endpoint = picked.address;
    let version = upstream_version(&cluster, downstream_version, false);
    headers::prepare_request(&mut request, version, endpoint, false);
    shadow_host(&mut request);
    let settings = connection.clone();
    let limit = timeout.unwrap_or(limits::MIRROR_TIMEOUT);
    tokio::spawn(async move {
        let _counted = counted;
        let exchange = async {
            match version {
                client::Version::Http1 => {
                    let (head, body) = request.into_parts();
                    client::send_http1(&cluster, endpoint, head, body, false).await
                }
                client::Version::Http2 => client::send_http2(&settings.data.client, &cluster, endpoint, request).await,
            }
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(Ok(Outcome::Response(response))) => {
                cluster.stats.mirror_sent.inc();
                cluster.stats.record_response(response.status().as_u16());
                // Read the answer to its end (and drop it frame by frame), so an HTTP/1.1 connection
                // goes back to the pool.
                let mut body = response.into_body();
                let drained = async { while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut body).await {} };
                let _ = tokio::time::timeout(limit, drained).await;
            }
            Ok(Ok(Outcome::Switched(..))) => {
                cluster.stats.mirror_sent.inc();
            }
            Ok(Err(error)) => {
                cluster.stats.mirror_failed.inc();
                debug!(cluster = %cluster.name, %error, "mirrored request failed");
            }
            Err(_) => {
                cluster.stats.mirror_failed.inc();
                debug!(cluster = %cluster.name, "mirrored request timed out");
            }
        }
    });
}

/// `shop.local:8080` → `shop.local-shadow:8080`, in the target's authority or the `Host` header.
fn shadow_host<B>(request: &mut http::Request<B>) {
    fn shadowed(authority: &str) -> String {
        match authority.rsplit_once(':') {
            Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                format!("{host}-shadow:{port}")
            }
            _ => format!("{authority}-shadow"),
        }
    }
    if let Some(authority) = request.uri().authority() {
        let Ok(new) = Authority::try_from(shadowed(authority.as_str())) else { return };
        let mut parts = std::mem::take(request.uri_mut()).into_parts();
        parts.authority = Some(new);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    } else if let Some(host) = request.headers().get(HOST).and_then(|h| h.to_str().ok())
        && let Ok(value) = HeaderValue::from_str(&shadowed(host))
    {
        request.headers_mut().insert(HOST, value);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_host_gets_a_shadow_suffix_before_its_port() {
        let mut with_port = http::Request::get("/").header(HOST, "shop.local:8080").body(()).unwrap();
        shadow_host(&mut with_port);
        assert_eq!(with_port.headers()[HOST], "shop.local-shadow:8080");
        let mut bare = http::Request::get("/").header(HOST, "shop").body(()).unwrap();
        shadow_host(&mut bare);
        assert_eq!(bare.headers()[HOST], "shop-shadow");
        let mut absolute = http::Request::get("http://shop:80/x").body(()).unwrap();
        shadow_host(&mut absolute);
        assert_eq!(absolute.uri(), "http://shop-shadow:80/x");
    }
}
