//! Routing a request: which route and cluster take it, whether the caller may make it, what the app
//! is told of the caller, and whether the route's policy admits it now.
//!
//! [`route`] is a pure function of the snapshot serving now, the connection's [`Origin`] and the
//! request's head: no I/O and no await, so a config swap can never change a request half-way, and
//! the tests below drive it with snapshots built from YAML and bare request heads. In order:
//!
//! 1. **route**: the listener's route table for the request's authority (or the connection's
//!    original destination), the first route whose match holds on the path as the application will
//!    read it (dot-segments removed, the request forwarded so: `normalize`), and one of its
//!    backends by weight; the listener's default cluster when no table claims the destination;
//! 2. **authorize**: a request from an mTLS peer, on a port an authorization policy covers, must be
//!    allowed for the route it took (or by the policy as a whole); plaintext was judged when the
//!    connection was accepted;
//! 3. **identity header**: on an inbound listener, `x-remora-client-identity` says who called: the
//!    peer's proven identity, never a value the caller wrote itself;
//! 4. **filter**: a route that redirects answers here (a [`Routing::Redirect`]); otherwise the
//!    route's and then the backend's request header changes, and the route's rewrite of the URL,
//!    are made to the request in place, and their response header changes go with the result;
//! 5. **admit**: the route's policy decides on this request now (its rate limit, its faults).
//!
//! What leaves is a [`Routed`]: the cluster, the route's policy and counters, the response header
//! changes, and the admission, which `plan` turns into what to do. A request refused before a
//! route took it (no route, a removed listener, a denied peer) leaves as the error that answers it.

use std::sync::Arc;
use std::time::Instant;

use http::{Request, StatusCode};
use tracing::info;

use super::error::ProxyError;
use super::headers;
use super::normalize;
use super::server::Origin;
use crate::policy::{Admission, RoutePolicy};
use crate::state::cluster::Cluster;
use crate::state::filters::HeaderModifier;
use crate::state::route_metrics::RequestStats;
use crate::state::{Direction, ListenerConfig, Snapshot};

/// Where routing sends a request, and on what terms.
#[derive(Debug)]
pub(crate) struct Routed {
    /// The cluster that takes it.
    pub(crate) cluster: Arc<Cluster>,
    /// The route's policy, if it has one.
    pub(crate) policy: Option<Arc<RoutePolicy>>,
    /// The counters of the route (and cluster) that took it, for the listener's direction.
    pub(crate) stats: Option<Arc<RequestStats>>,
    /// What the route's policy decided for this request.
    pub(crate) admission: Admission,
    /// The route's, then the backend's, changes to the response's headers.
    pub(crate) response_headers: ResponseHeaders,
}

/// Changes to a response's headers, in order; most routes have none.
pub(crate) type ResponseHeaders = [Option<Arc<HeaderModifier>>; 2];

/// What routing decided.
#[derive(Debug)]
pub(crate) enum Routing {
    /// Forward the request as routed.
    Forward(Routed),
    /// Answer with a redirect to `location`.
    Redirect {
        /// 301, 302, 303, 307 or 308.
        status: StatusCode,
        /// The `Location`.
        location: String,
        /// The route's changes to the answer's headers.
        response_headers: ResponseHeaders,
    },
}

/// Routes, authorizes and admits `request`, arrived at `arrived` on a connection from `origin`,
/// against `snapshot`; sets the identity header the app is given. See the module documentation.
pub(crate) fn route<B>(
    snapshot: &Snapshot,
    origin: &Origin,
    request: &mut Request<B>,
    arrived: Instant,
) -> Result<Routing, ProxyError> {
    let listener = snapshot.listener(&origin.listener).ok_or(ProxyError::ListenerRemoved)?;
    let mut response_headers: ResponseHeaders = [None, None];
    let (cluster, policy, stats) =
        match listener.routes.for_http(headers::authority(request), origin.original_destination) {
            Some(table) => {
                normalize::request_path(request.uri_mut());
                let route =
                    table.route(request.method(), request.uri(), request.headers()).ok_or(ProxyError::NoRoute)?;
                authorize(listener, origin, Some((&table.name, &route.name)))?;
                if let Some(filters) = &route.filters {
                    response_headers[0] = filters.response_headers.clone();
                    if let Some(redirect) = &filters.redirect {
                        let location =
                            redirect.location(request.uri(), headers::authority(request), origin.original_destination);
                        return Ok(Routing::Redirect { status: redirect.status, location, response_headers });
                    }
                    if let Some(modifier) = &filters.request_headers {
                        modifier.apply(request.headers_mut());
                    }
                    if let Some(rewrite) = &filters.rewrite {
                        rewrite.apply(request);
                    }
                }
                let backend = route.pick_backend().ok_or(ProxyError::NoRoute)?;
                if let Some(filters) = &backend.filters {
                    if let Some(modifier) = &filters.request_headers {
                        modifier.apply(request.headers_mut());
                    }
                    response_headers[1] = filters.response_headers.clone();
                }
                let stats = backend.stats.for_direction(listener.direction.label(), &backend.cluster).clone();
                (backend.cluster.clone(), route.policy.clone(), Some(stats))
            }
            None => {
                authorize(listener, origin, None)?;
                let cluster = listener.default_cluster.clone().ok_or(ProxyError::NoRoute)?;
                (cluster, None, listener.default_stats.clone())
            }
        };
    if listener.direction == Direction::Inbound {
        let headers = request.headers_mut();
        headers.remove(&headers::CLIENT_IDENTITY);
        if let Some(identity) = origin.peer_header() {
            headers.insert(headers::CLIENT_IDENTITY.clone(), identity.clone());
        }
    }
    let admission = match &policy {
        Some(policy) => policy.admit(arrived),
        None => Admission::Forward { delay: None },
    };
    Ok(Routing::Forward(Routed { cluster, policy, stats, admission, response_headers }))
}

/// The per-request half of an inbound listener's authorization: a request from an mTLS peer on a
/// port a policy covers must be allowed by the policy, for the route it took (`route`: table and
/// route names), or the policy as a whole.
fn authorize(listener: &ListenerConfig, origin: &Origin, route: Option<(&str, &str)>) -> Result<(), ProxyError> {
    let (Some(peer), Some(authz)) = (origin.peer_identity(), &listener.authz) else {
        return Ok(());
    };
    let Some(policy) = authz.for_port(origin.destination_port) else { return Ok(()) };
    let allowed = match route {
        Some((table, route)) => policy.allows_route(table, route, peer.as_str()),
        None => policy.allows(peer.as_str()),
    };
    if allowed {
        return Ok(());
    }
    policy.counters.denied.inc();
    let (table, route) = route.unwrap_or_default();
    info!(listener = %listener.name, policy = %policy.name, peer = %peer, route_table = table, route, "request denied by authorization policy");
    Err(ProxyError::Unauthorized { policy: policy.name.clone(), peer: peer.to_string() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::SocketAddr;
    use std::time::Duration;

    use remora_control_api::identity::SpiffeId;

    use super::*;
    use crate::state::SnapshotMetrics;
    use crate::state::cluster::OwnLocality;

    fn snapshot(yaml: &str) -> Snapshot {
        let file = remora_control_api::config::parse(yaml, "t").unwrap();
        Snapshot::build(
            "v".into(),
            remora_control_api::Encoded::all(&file.resources),
            None,
            &OwnLocality::default(),
            &SnapshotMetrics::default(),
        )
        .unwrap()
    }

    fn origin(listener: &str, identity: Option<&str>, port: u16) -> Origin {
        let peer: SocketAddr = "10.0.0.9:40000".parse().unwrap();
        let identity = identity.map(|id| SpiffeId::parse(id).unwrap());
        Origin::new(listener.into(), peer, None, port, identity)
    }

    fn get(host: &str, path: &str) -> Request<()> {
        Request::get(path).header("host", host).body(()).unwrap()
    }

    /// Routes a request that is forwarded (not redirected).
    fn route<B>(
        snapshot: &Snapshot,
        origin: &Origin,
        request: &mut Request<B>,
        arrived: Instant,
    ) -> Result<Routed, ProxyError> {
        match super::route(snapshot, origin, request, arrived)? {
            Routing::Forward(routed) => Ok(routed),
            Routing::Redirect { location, .. } => panic!("redirected to {location}"),
        }
    }

    const FILTERS: &str = r#"
resources:
  - {kind: Cluster, name: v1, original_destination: true}
  - {kind: Cluster, name: v2, original_destination: true}
  - kind: RouteTable
    name: echo
    destinations: ["echo:80", "10.96.0.10:80"]
    routes:
      - name: moved
        match: {path: {segment_prefix: /old/}}
        redirect: {prefix: /new, status: 301}
        response_headers: {set: [{name: x-moved, value: "yes"}]}
      - name: secure
        match: {path: {exact: /login}}
        redirect: {scheme: https, host: example.org}
      - name: rewritten
        match: {path: {segment_prefix: /api}}
        rewrite: {host: api.internal, prefix: /}
        request_headers: {set: [{name: x-set, value: route}], add: [{name: x-add, value: route}], remove: [x-gone]}
        response_headers: {add: [{name: x-route, value: "1"}]}
        backends:
          - {cluster: v1, request_headers: {set: [{name: x-backend, value: v1}]}, response_headers: {set: [{name: x-from, value: v1}]}}
      - {name: rest, backends: [{cluster: v2}]}
  - {kind: Listener, name: out, address: "127.0.0.1:15001"}
"#;

    /// A redirecting route answers with its Location (the prefix it matched replaced, the query
    /// kept; a new scheme's well-known port left out) and its response header changes; a segment
    /// prefix matches whole segments only.
    #[test]
    fn redirecting_routes_answer_with_their_location() {
        let snapshot = snapshot(FILTERS);
        let out = origin("out", None, 0);
        let now = Instant::now();
        match super::route(&snapshot, &out, &mut get("echo", "/old/page?x=1"), now).unwrap() {
            Routing::Redirect { status, location, response_headers } => {
                assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
                assert_eq!(location, "http://echo/new/page?x=1");
                let mut headers = http::HeaderMap::new();
                response_headers.iter().flatten().for_each(|m| m.apply(&mut headers));
                assert_eq!(headers["x-moved"], "yes");
            }
            other => panic!("{other:?}"),
        }
        match super::route(&snapshot, &out, &mut get("echo:80", "/login"), now).unwrap() {
            Routing::Redirect { status, location, .. } => {
                assert_eq!(status, StatusCode::FOUND);
                assert_eq!(location, "https://example.org/login");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(&*route(&snapshot, &out, &mut get("echo", "/older"), now).unwrap().cluster.name, "v2");
    }

    /// A forwarded request carries the route's header changes, then its backend's, and the
    /// route's rewrite; the response's changes (the route's, then the backend's) go with it.
    #[test]
    fn forwarded_requests_carry_the_route_and_backend_changes() {
        let snapshot = snapshot(FILTERS);
        let now = Instant::now();
        let mut request = get("echo", "/api/users?id=7");
        request.headers_mut().insert("x-set", "caller".parse().unwrap());
        request.headers_mut().insert("x-add", "caller".parse().unwrap());
        request.headers_mut().insert("x-gone", "caller".parse().unwrap());
        let routed = route(&snapshot, &origin("out", None, 0), &mut request, now).unwrap();
        assert_eq!(&*routed.cluster.name, "v1");
        assert_eq!(request.uri(), "/users?id=7");
        let headers = request.headers();
        assert_eq!(headers["host"], "api.internal");
        assert_eq!(headers["x-set"], "route");
        assert_eq!(headers.get_all("x-add").iter().collect::<Vec<_>>(), ["caller", "route"]);
        assert!(headers.get("x-gone").is_none());
        assert_eq!(headers["x-backend"], "v1");
        let mut response = http::HeaderMap::new();
        routed.response_headers.iter().flatten().for_each(|m| m.apply(&mut response));
        assert_eq!(response["x-route"], "1");
        assert_eq!(response["x-from"], "v1");
    }

    const MESH: &str = r#"
resources:
  - {kind: Cluster, name: api, original_destination: true}
  - {kind: Cluster, name: web, original_destination: true}
  - {kind: Cluster, name: fallback, original_destination: true}
  - kind: RouteTable
    name: shop
    destinations: [shop]
    routes:
      - {name: admin, match: {path: {prefix: /admin}}, backends: [{cluster: api}]}
      - {name: limited, match: {path: {prefix: /limited}}, backends: [{cluster: api}], rate_limit: {requests_per_second: 1, burst: 1}}
      - {name: aborted, match: {path: {prefix: /aborted}}, backends: [{cluster: api}], fault: {abort: {percent: 100, status: 418}}}
      - {name: rest, backends: [{cluster: web}]}
  - {kind: Listener, name: in, address: "127.0.0.1:15006", direction: inbound, default_cluster: fallback}
  - {kind: Listener, name: out, address: "127.0.0.1:15001", default_cluster: fallback}
  - kind: AuthorizationPolicy
    name: shop-only
    listener: in
    allow: ["spiffe://td/ns/shop/*"]
    routes: [{route_table: shop, route: admin, allow: ["spiffe://td/ns/ops/sa/admin"]}]
"#;

    /// The first matching route takes a request, by host and path; an unclaimed host goes to the
    /// listener's default cluster; the route's counters come with it.
    #[test]
    fn requests_take_the_first_matching_route_or_the_default_cluster() {
        let snapshot = snapshot(MESH);
        let out = origin("out", None, 0);
        let now = Instant::now();
        let routed = route(&snapshot, &out, &mut get("shop", "/admin/users"), now).unwrap();
        assert_eq!(&*routed.cluster.name, "api");
        assert_eq!(&**routed.stats.unwrap().route(), "shop/admin");
        let routed = route(&snapshot, &out, &mut get("shop:80", "/cart"), now).unwrap();
        assert_eq!(&*routed.cluster.name, "web");
        let routed = route(&snapshot, &out, &mut get("elsewhere", "/cart"), now).unwrap();
        assert_eq!(&*routed.cluster.name, "fallback");
        assert_eq!(&**routed.stats.unwrap().route(), "");
        assert!(matches!(
            route(&snapshot, &origin("gone", None, 0), &mut get("shop", "/"), now),
            Err(ProxyError::ListenerRemoved)
        ));
    }

    /// An mTLS peer needs the policy's leave for the route it took; a route's own list replaces the
    /// policy's.
    #[test]
    fn peers_are_authorized_by_route() {
        let snapshot = snapshot(MESH);
        let now = Instant::now();
        let web = origin("in", Some("spiffe://td/ns/shop/sa/web"), 8080);
        assert!(route(&snapshot, &web, &mut get("shop", "/cart"), now).is_ok());
        let denied = route(&snapshot, &web, &mut get("shop", "/admin"), now).unwrap_err();
        assert!(matches!(denied, ProxyError::Unauthorized { .. }), "{denied}");
        let admin = origin("in", Some("spiffe://td/ns/ops/sa/admin"), 8080);
        assert!(route(&snapshot, &admin, &mut get("shop", "/admin"), now).is_ok());
        assert!(route(&snapshot, &admin, &mut get("shop", "/cart"), now).is_err(), "outside the namespace");
        assert!(route(&snapshot, &admin, &mut get("elsewhere", "/"), now).is_err(), "the default cluster too");
        // Plaintext was judged at accept: a request without a peer identity is not judged again.
        assert!(route(&snapshot, &origin("in", None, 8080), &mut get("shop", "/admin"), now).is_ok());
    }

    /// A restricted route cannot be passed by through dot-segments or letter case: the path is
    /// matched (and forwarded) as the application will read it, the method without letter case.
    #[test]
    fn a_restricted_route_is_not_passed_by_through_dot_segments_or_letter_case() {
        let snapshot = snapshot(MESH);
        let now = Instant::now();
        let web = origin("in", Some("spiffe://td/ns/shop/sa/web"), 8080);
        for path in ["/cart/../admin", "/cart/%2e%2e/admin/x", "/./admin"] {
            let mut request = get("shop", path);
            let denied = route(&snapshot, &web, &mut request, now).unwrap_err();
            assert!(matches!(denied, ProxyError::Unauthorized { .. }), "{path}: {denied}");
        }
        let admin = origin("in", Some("spiffe://td/ns/ops/sa/admin"), 8080);
        let mut request = get("shop", "/cart/../admin/users?x=/../y");
        let routed = route(&snapshot, &admin, &mut request, now).unwrap();
        assert_eq!(&**routed.stats.unwrap().route(), "shop/admin");
        assert_eq!(request.uri(), "/admin/users?x=/../y", "forwarded as routed");
    }

    /// The app behind an inbound listener learns who called from the proven identity alone: a
    /// header the caller wrote is replaced, or removed when the caller proved nothing.
    #[test]
    fn the_identity_header_carries_the_proven_peer_and_nothing_else() {
        let snapshot = snapshot(MESH);
        let now = Instant::now();
        let mut spoofed = get("shop", "/cart");
        spoofed.headers_mut().insert("x-remora-client-identity", "spiffe://td/ns/ops/sa/admin".parse().unwrap());
        route(&snapshot, &origin("in", Some("spiffe://td/ns/shop/sa/web"), 8080), &mut spoofed, now).unwrap();
        assert_eq!(spoofed.headers()["x-remora-client-identity"], "spiffe://td/ns/shop/sa/web");
        let mut plaintext = get("shop", "/cart");
        plaintext.headers_mut().insert("x-remora-client-identity", "spiffe://td/ns/ops/sa/admin".parse().unwrap());
        route(&snapshot, &origin("in", None, 8080), &mut plaintext, now).unwrap();
        assert!(plaintext.headers().get("x-remora-client-identity").is_none());
        // Outbound, the header is the app's own business.
        let mut outbound = get("shop", "/cart");
        outbound.headers_mut().insert("x-remora-client-identity", "mine".parse().unwrap());
        route(&snapshot, &origin("out", None, 0), &mut outbound, now).unwrap();
        assert_eq!(outbound.headers()["x-remora-client-identity"], "mine");
    }

    /// The route's policy admits each request: a rate limit's second request in the same instant
    /// waits, an abort at 100% always aborts, a route without a policy always forwards.
    #[test]
    fn the_routes_policy_admits_each_request() {
        let snapshot = snapshot(MESH);
        let out = origin("out", None, 0);
        let now = Instant::now();
        let first = route(&snapshot, &out, &mut get("shop", "/limited"), now).unwrap();
        assert_eq!(first.admission, Admission::Forward { delay: None });
        let second = route(&snapshot, &out, &mut get("shop", "/limited"), now).unwrap();
        assert!(matches!(second.admission, Admission::RateLimited(wait) if wait <= Duration::from_secs(1)));
        assert!(second.stats.is_some(), "a refused request still counts on its route");
        let aborted = route(&snapshot, &out, &mut get("shop", "/aborted"), now).unwrap();
        assert_eq!(aborted.admission, Admission::Abort { status: 418, delay: None });
        let plain = route(&snapshot, &out, &mut get("shop", "/cart"), now).unwrap();
        assert!(plain.policy.is_none());
        assert_eq!(plain.admission, Admission::Forward { delay: None });
    }

    /// A table for one direction is served by that direction's listeners only: the Service's own
    /// pods, receiving a call by its name, hand it to their app instead of sending it out again.
    #[test]
    fn a_table_serves_its_direction_only() {
        let snapshot = snapshot(
            r#"
resources:
  - {kind: Cluster, name: app, original_destination: true}
  - {kind: Cluster, name: remote, original_destination: true}
  - {kind: Cluster, name: local, original_destination: true}
  - {kind: RouteTable, name: callers, direction: outbound, destinations: ["shop:80"], routes: [{backends: [{cluster: remote}]}]}
  - {kind: RouteTable, name: guarded, direction: inbound, routes: [{backends: [{cluster: local}]}]}
  - {kind: Listener, name: in, address: "127.0.0.1:15006", direction: inbound, default_cluster: app}
  - {kind: Listener, name: out, address: "127.0.0.1:15001", default_cluster: app}
"#,
        );
        let now = Instant::now();
        let routed = route(&snapshot, &origin("out", None, 0), &mut get("shop", "/"), now).unwrap();
        assert_eq!(&*routed.cluster.name, "remote");
        let routed = route(&snapshot, &origin("out", None, 0), &mut get("elsewhere", "/"), now).unwrap();
        assert_eq!(&*routed.cluster.name, "app", "the inbound catch-all is not the outbound listener's");
        let routed = route(&snapshot, &origin("in", None, 8080), &mut get("shop", "/"), now).unwrap();
        assert_eq!(&*routed.cluster.name, "local");
    }
}
