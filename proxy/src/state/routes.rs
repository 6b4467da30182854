//! HTTP routing: which route table a request belongs to, and which route in it matches.
//!
//! Built from RouteTable resources when a snapshot is built. Per request the data path asks a
//! listener's [`RouteIndex`] for a table (by the connection's original destination when a table
//! claims that address, then by the request's authority, then the catch-all), then asks the [`RouteTable`] for the first matching [`Route`],
//! then asks the route for a cluster. Opaque TCP connections use [`RouteIndex::for_tcp`] (original
//! destination, then catch-all). All lookups are hash probes or short scans; nothing allocates unless
//! a Host header carries upper-case letters.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderName;
use http::{HeaderMap, Method, Uri};
use regex::Regex;
use remora_control_api::config::Invalid;
use remora_control_api::v1;
use remora_control_api::validate::Destination;

use super::Direction;
use super::filters::{BackendFilters, RouteFilters, trim_slash};
use super::route_metrics::{RouteMetrics, RouteStats};
use crate::balance::WeightedChoice;
use crate::policy::RoutePolicy;
use crate::state::cluster::Cluster;

/// How a path is matched.
#[derive(Debug)]
enum PathMatcher {
    Any,
    Exact(String),
    Prefix(String),
    /// Whole segments, the prefix without a trailing `/` (`/` itself matches everything).
    SegmentPrefix(String),
    Regex(Regex),
}

/// How a header or query value is matched.
#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present(bool),
}

impl ValueMatcher {
    fn matches(&self, value: Option<&[u8]>) -> bool {
        match (self, value) {
            (ValueMatcher::Present(wanted), value) => value.is_some() == *wanted,
            (_, None) => false,
            (ValueMatcher::Exact(expected), Some(value)) => value == expected.as_bytes(),
            (ValueMatcher::Prefix(prefix), Some(value)) => value.starts_with(prefix.as_bytes()),
            (ValueMatcher::Regex(re), Some(value)) => std::str::from_utf8(value).is_ok_and(|v| re.is_match(v)),
        }
    }
}

/// A compiled RouteMatch.
#[derive(Debug)]
struct RouteMatcher {
    path: PathMatcher,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
}

impl RouteMatcher {
    fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        // Methods compare without letter case: a client's `get` is routed (and authorized) as the
        // `GET` an application framework will take it for, never past a method-restricted route.
        if self.method.as_ref().is_some_and(|m| !m.as_str().eq_ignore_ascii_case(method.as_str())) {
            return false;
        }
        let path = uri.path();
        let path_ok = match &self.path {
            PathMatcher::Any => true,
            PathMatcher::Exact(exact) => path == exact,
            PathMatcher::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatcher::SegmentPrefix(prefix) => {
                prefix == "/"
                    || path.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatcher::Regex(re) => re.is_match(path),
        };
        if !path_ok {
            return false;
        }
        // With several values for one header, any value may satisfy the condition.
        let headers_ok = self.headers.iter().all(|(name, matcher)| {
            let mut values = headers.get_all(name).iter().peekable();
            if values.peek().is_none() {
                return matcher.matches(None);
            }
            values.any(|value| matcher.matches(Some(value.as_bytes())))
        });
        headers_ok && self.query.iter().all(|(name, matcher)| matcher.matches(query_value(uri.query(), name)))
    }
}

/// The raw (not percent-decoded) value of the first `name` parameter; `Some(b"")` for `?name` or
/// `?name=`.
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q [u8]> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value.as_bytes())
    })
}

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    /// The route's name (may be empty).
    pub name: Arc<str>,
    matcher: RouteMatcher,
    backends: WeightedChoice<Backend>,
    /// Timeout, faults, rate limit; `None` for a route that asks for none of them.
    pub policy: Option<Arc<RoutePolicy>>,
    /// Header changes, redirect, rewrite; `None` for a route that asks for none of them.
    pub filters: Option<Box<RouteFilters>>,
}

/// One of a route's clusters, with the route's counters for it.
#[derive(Debug)]
pub struct Backend {
    /// The cluster.
    pub cluster: Arc<Cluster>,
    /// Requests this route sent it, by direction (`route_requests` and friends).
    pub stats: RouteStats,
    /// Its own header changes, after the route's.
    pub filters: Option<Box<BackendFilters>>,
}

impl Route {
    /// The backend for one request, by the backends' weights.
    pub fn pick_backend(&self) -> Option<&Backend> {
        self.backends.pick()
    }

    /// The cluster for one request, by the backends' weights.
    pub fn pick_cluster(&self) -> Option<&Arc<Cluster>> {
        self.pick_backend().map(|b| &b.cluster)
    }
}

/// One compiled route table.
#[derive(Debug)]
pub struct RouteTable {
    /// The table's name.
    pub name: Arc<str>,
    routes: Vec<Route>,
    /// Where opaque TCP to this table's destinations goes.
    pub tcp_cluster: Option<Arc<Cluster>>,
    /// The direction of the listeners that serve it; `None`, both.
    pub direction: Option<Direction>,
    /// Whether connections to its destinations are opaque TCP, undetected.
    pub opaque: bool,
}

impl RouteTable {
    /// The first route that matches the request, if any.
    pub fn route(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<&Route> {
        self.routes.iter().find(|route| route.matcher.matches(method, uri, headers))
    }
}

impl RouteTable {
    /// Compiles a table. `cluster` resolves a cluster name; `metrics` gives each route backend its
    /// counters, labelled `TABLE/ROUTE` (an unnamed route by its position: `TABLE/#0`).
    pub fn compile(
        table: &v1::RouteTable,
        cluster: &dyn Fn(&str) -> Option<Arc<Cluster>>,
        metrics: &RouteMetrics,
    ) -> Result<RouteTable, Invalid> {
        let fail = |field: String, message: String| Invalid::new(field, message);
        let find = |field: String, name: &str| {
            cluster(name).ok_or_else(|| fail(field, format!("names cluster {name:?}, which is not defined")))
        };
        let mut routes = Vec::with_capacity(table.routes.len());
        // Unnamed routes share one empty name (an `Arc<str>` of nothing is still an allocation).
        let unnamed: Arc<str> = Arc::from("");
        for (i, route) in table.routes.iter().enumerate() {
            let matcher = compile_match(route.r#match.as_ref())
                .map_err(|invalid| invalid.within(&format!("routes[{i}].match")))?;
            let label: Arc<str> = match route.name.as_str() {
                "" => format!("{}/#{i}", table.name).into(),
                name => format!("{}/{name}", table.name).into(),
            };
            let mut backends = Vec::with_capacity(route.backends.len());
            for (j, backend) in route.backends.iter().enumerate() {
                let cluster = find(format!("routes[{i}].backends[{j}].cluster"), &backend.cluster)?;
                let stats = metrics.route(label.clone());
                let filters = BackendFilters::compile(backend)
                    .map_err(|invalid| invalid.within(&format!("routes[{i}].backends[{j}]")))?;
                backends.push((Backend { cluster, stats, filters }, backend.weight.unwrap_or(1)));
            }
            let filters = RouteFilters::compile(route).map_err(|invalid| invalid.within(&format!("routes[{i}]")))?;
            let policy = RoutePolicy::compile(route, cluster)
                .map_err(|invalid| invalid.within(&format!("routes[{i}]")))?
                .map(Arc::new);
            routes.push(Route {
                name: if route.name.is_empty() { unnamed.clone() } else { route.name.as_str().into() },
                matcher,
                backends: WeightedChoice::new(backends),
                policy,
                filters,
            });
        }
        let tcp_cluster = match table.tcp_cluster.as_str() {
            "" => None,
            name => Some(find("tcp_cluster".into(), name)?),
        };
        let direction = match table.direction() {
            v1::route_table::Direction::Any => None,
            v1::route_table::Direction::Outbound => Some(Direction::Outbound),
            v1::route_table::Direction::Inbound => Some(Direction::Inbound),
        };
        let opaque = table.opaque && tcp_cluster.is_some();
        Ok(RouteTable { name: table.name.as_str().into(), routes, tcp_cluster, direction, opaque })
    }
}

fn compile_match(matcher: Option<&v1::RouteMatch>) -> Result<RouteMatcher, Invalid> {
    let Some(matcher) = matcher else {
        return Ok(RouteMatcher { path: PathMatcher::Any, method: None, headers: Vec::new(), query: Vec::new() });
    };
    let regex = |field: String, pattern: &str| {
        remora_control_api::validate::compile_regex(pattern).map_err(|message| Invalid::new(field, message))
    };
    use v1::path_match::Kind as P;
    let path = match matcher.path.as_ref().and_then(|p| p.kind.as_ref()) {
        None => PathMatcher::Any,
        Some(P::Exact(exact)) => PathMatcher::Exact(exact.clone()),
        Some(P::Prefix(prefix)) => PathMatcher::Prefix(prefix.clone()),
        Some(P::SegmentPrefix(prefix)) => PathMatcher::SegmentPrefix(trim_slash(prefix).to_owned()),
        Some(P::Regex(pattern)) => PathMatcher::Regex(regex("path.regex".into(), pattern)?),
    };
    let method = match matcher.method.as_str() {
        "" => None,
        name => Some(
            Method::from_bytes(name.as_bytes())
                .map_err(|_| Invalid::new("method", format!("{name:?} is not an HTTP method")))?,
        ),
    };
    let mut headers = Vec::with_capacity(matcher.headers.len());
    for (j, header) in matcher.headers.iter().enumerate() {
        let name = HeaderName::from_bytes(header.name.to_ascii_lowercase().as_bytes()).map_err(|_| {
            Invalid::new(format!("headers[{j}].name"), format!("{:?} is not a header name", header.name))
        })?;
        use v1::header_match::Kind as H;
        let value = match &header.kind {
            None => ValueMatcher::Present(true),
            Some(H::Exact(v)) => ValueMatcher::Exact(v.clone()),
            Some(H::Prefix(v)) => ValueMatcher::Prefix(v.clone()),
            Some(H::Regex(pattern)) => ValueMatcher::Regex(regex(format!("headers[{j}].regex"), pattern)?),
            Some(H::Present(present)) => ValueMatcher::Present(*present),
        };
        headers.push((name, value));
    }
    let mut query = Vec::with_capacity(matcher.query.len());
    for (j, param) in matcher.query.iter().enumerate() {
        use v1::query_match::Kind as Q;
        let value = match &param.kind {
            None => ValueMatcher::Present(true),
            Some(Q::Exact(v)) => ValueMatcher::Exact(v.clone()),
            Some(Q::Regex(pattern)) => ValueMatcher::Regex(regex(format!("query[{j}].regex"), pattern)?),
            Some(Q::Present(present)) => ValueMatcher::Present(*present),
        };
        query.push((param.name.clone(), value));
    }
    Ok(RouteMatcher { path, method, headers, query })
}

/// The ports a host name is claimed on, each by one table.
#[derive(Debug, Default)]
struct HostEntry {
    any_port: Option<usize>,
    ports: Vec<(u16, usize)>,
}

/// Which of a listener's route tables serves a destination.
#[derive(Debug, Default)]
pub struct RouteIndex {
    tables: Vec<Arc<RouteTable>>,
    /// Lower-case host (IPv6 literals in brackets) to the tables that claim it.
    hosts: foldhash::HashMap<Box<str>, HostEntry>,
    /// `.suffix` of `*.suffix` destinations, longest first.
    suffixes: Vec<(Box<str>, usize)>,
    /// Socket-address destinations, matched against original destinations.
    addresses: foldhash::HashMap<SocketAddr, usize>,
    catch_all: Option<usize>,
}

impl RouteIndex {
    /// Indexes `tables` (with their parsed `destinations`, in the same order). Conflicts were
    /// rejected by validation; if any slipped through, the first table wins.
    pub fn new(tables: Vec<(Arc<RouteTable>, Vec<Destination>)>) -> RouteIndex {
        let mut index = RouteIndex::default();
        for (i, (table, destinations)) in tables.into_iter().enumerate() {
            if destinations.is_empty() {
                index.catch_all.get_or_insert(i);
            }
            for destination in destinations {
                match destination {
                    Destination::Any => {
                        index.catch_all.get_or_insert(i);
                    }
                    Destination::Host(host) => {
                        index.hosts.entry(host.into()).or_default().any_port.get_or_insert(i);
                    }
                    Destination::HostPort(host, port) => {
                        index.hosts.entry(host.into()).or_default().ports.push((port, i));
                    }
                    Destination::Suffix(suffix) => index.suffixes.push((suffix.into(), i)),
                    Destination::Address(address) => {
                        index.addresses.entry(address).or_insert(i);
                        let host = match address {
                            SocketAddr::V4(v4) => v4.ip().to_string(),
                            SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
                        };
                        index.hosts.entry(host.into()).or_default().ports.push((address.port(), i));
                    }
                }
            }
            index.tables.push(table);
        }
        index.suffixes.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        index
    }

    /// The table for an HTTP request: by the original destination when a table claims that address;
    /// else by its authority (host, with the authority's port, else the original destination's
    /// port, else 80); else the catch-all.
    pub fn for_http(
        &self,
        authority: Option<&str>,
        original_destination: Option<SocketAddr>,
    ) -> Option<&Arc<RouteTable>> {
        // A connection to a Service's ClusterIP follows that Service's table whatever its Host
        // says (Gateway API's ClusterIP matching).
        if let Some(i) = original_destination.and_then(|d| self.addresses.get(&d)) {
            return self.tables.get(*i);
        }
        if let Some(authority) = authority.filter(|_| !self.hosts.is_empty() || !self.suffixes.is_empty()) {
            let (host, port) = split_authority(authority);
            let port = port.or(original_destination.map(|d| d.port())).unwrap_or(80);
            let lowered;
            let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                lowered = host.to_ascii_lowercase();
                lowered.as_str()
            } else {
                host
            };
            if let Some(entry) = self.hosts.get(host) {
                let by_port = entry.ports.iter().find(|(p, _)| *p == port).map(|(_, i)| *i);
                if let Some(i) = by_port.or(entry.any_port) {
                    return self.tables.get(i);
                }
            }
            if let Some((_, i)) = self.suffixes.iter().find(|(suffix, _)| host.ends_with(&**suffix)) {
                return self.tables.get(*i);
            }
        }
        self.catch_all.and_then(|i| self.tables.get(i))
    }

    /// The table for a connection by its original destination, else the catch-all.
    pub fn for_tcp(&self, original_destination: Option<SocketAddr>) -> Option<&Arc<RouteTable>> {
        original_destination
            .and_then(|d| self.addresses.get(&d))
            .or(self.catch_all.as_ref())
            .and_then(|i| self.tables.get(*i))
    }
}

/// Splits `host[:port]` (IPv6 literals keep their brackets). A port that does not parse is ignored.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    let bracket_end = authority.rfind(']');
    match authority.rfind(':') {
        Some(colon) if bracket_end.is_none_or(|end| colon > end) => {
            (&authority[..colon], authority[colon + 1..].parse().ok())
        }
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::state::cluster::ClusterMetrics;
    use crate::state::cluster::OwnLocality;
    use crate::state::route_metrics::RouteMetrics;

    fn cluster(name: &str) -> Arc<Cluster> {
        let resource = v1::Cluster { name: name.into(), ..Default::default() };
        Arc::new(Cluster::compile(&resource, None, None, &OwnLocality::default(), &ClusterMetrics::default()).unwrap())
    }

    fn table(yaml: &str) -> RouteTable {
        let file = remora_control_api::config::parse(yaml, "t").unwrap();
        let remora_control_api::Resource::RouteTable(table) = &file.resources[0] else { panic!() };
        RouteTable::compile(table, &|name| Some(cluster(name)), &RouteMetrics::default()).unwrap()
    }

    fn route_for<'t>(table: &'t RouteTable, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<&'t str> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        table.route(&method, &uri.parse().unwrap(), &map).map(|r| &*r.name)
    }

    #[test]
    fn routes_match_in_order_on_every_condition() {
        let t = table(
            r#"
kind: RouteTable
name: shop
routes:
  - name: exact
    match: {path: {exact: /health}}
    backends: [{cluster: a}]
  - name: regex
    match: {path: {regex: "/items/[0-9]+"}, method: GET}
    backends: [{cluster: a}]
  - name: header
    match: {path: {prefix: /api}, headers: [{name: X-User, exact: alice}, {name: x-debug, present: false}]}
    backends: [{cluster: a}]
  - name: header-regex
    match: {headers: [{name: x-version, regex: "v[2-9]"}]}
    backends: [{cluster: a}]
  - name: query
    match: {query: [{name: beta, exact: "1"}, {name: off, present: false}]}
    backends: [{cluster: a}]
  - name: rest
    match: {path: {prefix: /}}
    backends: [{cluster: b}]
"#,
        );
        assert_eq!(route_for(&t, "GET", "/health", &[]), Some("exact"));
        assert_eq!(route_for(&t, "GET", "/health/x", &[]), Some("rest"));
        assert_eq!(route_for(&t, "GET", "/items/42", &[]), Some("regex"));
        assert_eq!(route_for(&t, "GET", "/items/42x", &[]), Some("rest"), "regex must match the whole path");
        assert_eq!(route_for(&t, "POST", "/items/42", &[]), Some("rest"));
        assert_eq!(route_for(&t, "get", "/items/42", &[]), Some("regex"), "methods match without letter case");
        assert_eq!(route_for(&t, "gEt", "/items/42", &[]), Some("regex"));
        assert_eq!(route_for(&t, "GET", "/api/x", &[("x-user", "alice")]), Some("header"));
        assert_eq!(route_for(&t, "GET", "/api/x", &[("x-user", "alice"), ("x-debug", "1")]), Some("rest"));
        assert_eq!(route_for(&t, "GET", "/api/x", &[("x-user", "bob"), ("x-user", "alice")]), Some("header"));
        assert_eq!(route_for(&t, "GET", "/z", &[("x-version", "v3")]), Some("header-regex"));
        assert_eq!(route_for(&t, "GET", "/z", &[("x-version", "v33")]), Some("rest"));
        assert_eq!(route_for(&t, "GET", "/z?a=2&beta=1", &[]), Some("query"));
        assert_eq!(route_for(&t, "GET", "/z?beta=1&off", &[]), Some("rest"));
        assert_eq!(route_for(&t, "GET", "/z?beta=10", &[]), Some("rest"));
    }

    #[test]
    fn a_table_with_no_matching_route_says_so() {
        let t = table("kind: RouteTable\nname: t\nroutes: [{match: {path: {prefix: /a}}, backends: [{cluster: a}]}]\n");
        assert_eq!(route_for(&t, "GET", "/b", &[]), None);
    }

    fn index(entries: &[(&str, &[&str])]) -> RouteIndex {
        RouteIndex::new(
            entries
                .iter()
                .map(|(name, destinations)| {
                    let table = Arc::new(RouteTable {
                        name: (*name).into(),
                        routes: Vec::new(),
                        tcp_cluster: None,
                        direction: None,
                        opaque: false,
                    });
                    (table, destinations.iter().map(|d| Destination::parse(d).unwrap()).collect())
                })
                .collect(),
        )
    }

    #[test]
    fn tables_are_chosen_by_claimed_original_destination_then_authority_then_catch_all() {
        let idx = index(&[
            ("reviews", &["reviews", "reviews.shop:9080"]),
            ("ratings", &["ratings:9080", "10.0.0.7:9080"]),
            ("wild", &["*.example.com", "*.a.example.com"]),
            ("deeper", &["*.b.a.example.com"]),
            ("v6", &["[fd00::1]:80"]),
            ("default", &[]),
        ]);
        let name = |authority: Option<&str>, dst: Option<&str>| {
            idx.for_http(authority, dst.map(|d| d.parse().unwrap())).map(|t| t.name.to_string())
        };
        assert_eq!(name(Some("reviews"), None).as_deref(), Some("reviews"));
        assert_eq!(name(Some("Reviews:1234"), None).as_deref(), Some("reviews"));
        assert_eq!(name(Some("reviews.shop:9080"), None).as_deref(), Some("reviews"));
        assert_eq!(name(Some("reviews.shop:9081"), None).as_deref(), Some("default"));
        assert_eq!(
            name(Some("ratings"), Some("10.9.9.9:9080")).as_deref(),
            Some("ratings"),
            "port from original destination"
        );
        assert_eq!(name(Some("ratings"), None).as_deref(), Some("default"), "port 80 assumed");
        assert_eq!(name(Some("10.0.0.7:9080"), None).as_deref(), Some("ratings"));
        assert_eq!(name(Some("unknown"), Some("10.0.0.7:9080")).as_deref(), Some("ratings"));
        assert_eq!(
            name(Some("reviews"), Some("10.0.0.7:9080")).as_deref(),
            Some("ratings"),
            "a claimed original destination wins over the Host"
        );
        assert_eq!(name(Some("x.example.com"), None).as_deref(), Some("wild"));
        assert_eq!(name(Some("x.b.a.example.com"), None).as_deref(), Some("deeper"), "longest suffix wins");
        assert_eq!(name(Some("example.com"), None).as_deref(), Some("default"));
        assert_eq!(name(Some("[fd00::1]:80"), None).as_deref(), Some("v6"));
        assert_eq!(name(None, None).as_deref(), Some("default"));
        assert_eq!(idx.for_tcp(Some("10.0.0.7:9080".parse().unwrap())).map(|t| &*t.name), Some("ratings"));
        assert_eq!(idx.for_tcp(None).map(|t| &*t.name), Some("default"));
    }

    #[test]
    fn without_a_catch_all_unknown_destinations_find_nothing() {
        let idx = index(&[("reviews", &["reviews"])]);
        assert!(idx.for_http(Some("other"), None).is_none());
        assert!(idx.for_tcp(None).is_none());
    }

    #[test]
    fn authorities_split_like_uris() {
        assert_eq!(split_authority("a:80"), ("a", Some(80)));
        assert_eq!(split_authority("a"), ("a", None));
        assert_eq!(split_authority("[::1]:8080"), ("[::1]", Some(8080)));
        assert_eq!(split_authority("[::1]"), ("[::1]", None));
        assert_eq!(split_authority("a:x"), ("a", None));
    }
}
