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
//!
//! Shadow traffic gets every protection of its own cluster — an attempt of `attempt`'s, within the
//! shadow cluster's `max_requests` breaker, counted in its counters and judged by its outlier
//! detection — and none of the original's: it is never retried and never touches the original's
//! cluster.

use std::cell::Cell;
use std::time::Duration;

use http::header::{HOST, HeaderValue};
use http::uri::Authority;
use tracing::debug;

use super::error::ProxyError;

use super::attempt::{self, Template};
use super::client::Outcome;
use super::headers;
use super::replay::Reusable;
use super::server::HttpConnection;
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
        cluster.stats.policy.mirror_dropped.inc();
        return;
    };
    let Some(follower) = body.copy() else {
        cluster.stats.policy.mirror_dropped.inc();
        return;
    };
    let mut request = template.request(follower);
    let origin = &connection.origin;
    let (endpoint, mut attempt) =
        match attempt::pick(&cluster, origin, request.headers(), &[], std::time::Instant::now(), None) {
            Ok(picked) => picked,
            Err(error) => {
                cluster.stats.policy.mirror_failed.inc();
                debug!(cluster = %cluster.name, %error, "mirrored request not sent");
                return;
            }
        };
    let version = attempt::version_for(&cluster, downstream_version, false);
    headers::prepare_request(&mut request, version, endpoint, false);
    shadow_host(&mut request);
    let connection = connection.clone();
    let limit = timeout.unwrap_or(limits::MIRROR_TIMEOUT);
    tokio::spawn(async move {
        let _counted = counted;
        let (head, body) = request.into_parts();
        let sending = attempt::send(&cluster, &connection.data.client, endpoint, version, head, body, false);
        let result =
            tokio::time::timeout(limit, sending).await.unwrap_or_else(|_| Err(ProxyError::RequestTimeout(limit)));
        attempt.record(&cluster, &result);
        match result {
            Ok(Outcome::Response(response)) => {
                cluster.stats.policy.mirror_sent.inc();
                // Read the answer to its end (and drop it frame by frame), so an HTTP/1.1 connection
                // goes back to the pool; the attempt stays in flight until then.
                let mut body = response.into_body();
                let drained = async { while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut body).await {} };
                let _ = tokio::time::timeout(limit, drained).await;
            }
            Ok(Outcome::Switched(..)) => {
                cluster.stats.policy.mirror_sent.inc();
            }
            Err(error) => {
                cluster.stats.policy.mirror_failed.inc();
                debug!(cluster = %cluster.name, %error, "mirrored request failed");
            }
        }
        drop(attempt);
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
