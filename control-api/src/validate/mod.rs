//! Rules a set of resources must satisfy before a proxy builds a snapshot from it.
//!
//! [`validate`] takes the whole set (every kind at once) and returns every problem it finds, each
//! naming the resource and the field: a bad address, a regex that does not compile, a route to a
//! cluster that does not exist, two route tables claiming one destination. [`validate_bootstrap`] checks
//! the start-up settings. The small parsers here ([`parse_address`], [`Destination::parse`],
//! [`duration`]) are the ones the proxy uses too, so what validates is exactly what runs.
//!
//! # Layout
//! - here: the set as a whole — names unique, listeners and their addresses, references resolved.
//! - [`values`] — the small parsers shared with the proxy: addresses, durations, destinations,
//!   regexes, control-plane URLs; the retry conditions and limits.
//! - `routes` — route tables: matches, backends, policies (timeouts, retries, faults, mirrors),
//!   and no destination claimed twice.
//! - `clusters` — clusters (balancers, breakers, outlier detection, health checks, mesh TLS) and
//!   their endpoints.
//! - `authorization` — authorization policies, and no port guarded twice.
//! - [`bootstrap`] — the proxy's start-up settings.

mod authorization;
pub mod bootstrap;
mod clusters;
mod routes;
pub mod values;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;

use crate::config::FieldError;
use crate::resource::{Kind, Resource, describe};
use crate::v1;

pub use bootstrap::validate_bootstrap;
use values::is_token;
pub use values::{
    Destination, MAX_REPLAY_BUFFER, MAX_RETRIES, PathReplacement, RETRY_ON, check_control_plane, compile_regex,
    duration, is_dns_label, parse_address,
};

/// Every problem found in a resource set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// Whether a reference to a resource that is not in the set is an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum References {
    /// Every reference must resolve: the set is complete (a config file).
    Required,
    /// A reference may name a resource that has not arrived yet (a control-plane stream, where the
    /// proxy warms what refers to it until it does).
    Pending,
}

/// Checks a whole resource set: each resource's fields, unique names, and that every reference
/// (route table, cluster) resolves. Returns every problem found.
pub fn validate<R: AsRef<Resource>>(resources: &[R]) -> Result<(), ValidationErrors> {
    validate_with(resources, References::Required)
}

/// Like [`validate`], with a choice of whether dangling references are errors.
pub fn validate_with<R: AsRef<Resource>>(resources: &[R], references: References) -> Result<(), ValidationErrors> {
    let resources: Vec<&Resource> = resources.iter().map(AsRef::as_ref).collect();
    let resources = resources.as_slice();
    let mut check = Checker { errors: Vec::new(), references };
    let mut names: HashSet<(Kind, &str)> = HashSet::new();
    for resource in resources {
        let name = resource.name();
        if name.is_empty() {
            let field = if resource.kind() == Kind::Endpoints { "cluster" } else { "name" };
            check.fail(format!("{} with no name", resource.kind().noun()), field, "is required");
        } else if name.chars().any(char::is_control) {
            let field = if resource.kind() == Kind::Endpoints { "cluster" } else { "name" };
            check.fail(describe(resource.kind(), name), field, "must not hold control characters");
        } else if !names.insert((resource.kind(), name)) {
            check.fail(describe(resource.kind(), name), "", "is defined more than once");
        }
    }
    let clusters: HashMap<&str, &v1::Cluster> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::Cluster(c) => Some((c.name.as_str(), c)),
            _ => None,
        })
        .collect();
    let tables: HashMap<&str, &v1::RouteTable> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::RouteTable(t) => Some((t.name.as_str(), t)),
            _ => None,
        })
        .collect();
    let listeners: HashMap<&str, &v1::Listener> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::Listener(l) => Some((l.name.as_str(), l)),
            _ => None,
        })
        .collect();

    // UDP (HTTP/3) and TCP ports are distinct: a gateway's HTTP/3 listener shares its number.
    let mut bound: HashMap<(bool, SocketAddr), &str> = HashMap::new();
    for resource in resources {
        let subject = describe(resource.kind(), resource.name());
        match resource {
            Resource::Listener(listener) => {
                check.listener(&subject, listener, &clusters, &tables);
                check.hbone(&subject, listener, &listeners);
                check.http3(&subject, listener, &listeners);
                let addresses = std::iter::once(("address".to_owned(), &listener.address)).chain(
                    listener
                        .additional_addresses
                        .iter()
                        .enumerate()
                        .map(|(i, a)| (format!("additional_addresses[{i}]"), a)),
                );
                let mut own = HashSet::new();
                for (field, text) in addresses {
                    let Ok(address) = parse_address(text) else { continue };
                    // Port 0 is a fresh port for each listener, but one listener cannot list it twice.
                    if !own.insert(address) {
                        check.fail(&subject, &field, format!("{address} is also an address of this listener"));
                    } else if address.port() != 0
                        && let Some(other) = bound.insert((is_udp(listener), address), &listener.name)
                    {
                        check.fail(&subject, &field, format!("{address} is also an address of listener {other:?}"));
                    }
                }
            }
            Resource::RouteTable(table) => check.route_table(&subject, table, &clusters),
            Resource::Cluster(cluster) => check.cluster(&subject, cluster),
            Resource::Endpoints(endpoints) => check.endpoints(&subject, endpoints, &clusters),
            Resource::AuthorizationPolicy(policy) => check.authorization(&subject, policy),
        }
    }
    check.destinations(resources);
    check.guarded_ports(resources);
    check.finish()
}

struct Checker {
    errors: Vec<FieldError>,
    references: References,
}

impl Checker {
    fn fail(&mut self, subject: impl Into<String>, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(subject, field, message));
    }

    fn finish(self) -> Result<(), ValidationErrors> {
        if self.errors.is_empty() { Ok(()) } else { Err(ValidationErrors(self.errors)) }
    }

    fn cluster_ref(&mut self, subject: &str, field: &str, name: &str, clusters: &HashMap<&str, &v1::Cluster>) {
        if self.references == References::Required && !clusters.contains_key(name) {
            self.fail(subject, field, format!("names cluster {name:?}, which is not defined"));
        }
    }

    fn duration(&mut self, subject: &str, field: &str, value: Option<&pbjson_types::Duration>, positive: bool) {
        match duration(value) {
            Err(e) => self.fail(subject, field, e),
            Ok(Some(d)) if positive && d.is_zero() => self.fail(subject, field, "must be greater than zero"),
            Ok(_) => {}
        }
    }

    fn percent(&mut self, subject: &str, field: &str, value: f64) {
        if !(0.0..=100.0).contains(&value) {
            self.fail(subject, field, format!("must be 0 to 100, got {value}"));
        }
    }

    /// An HBONE listener's own rules (over TCP or QUIC): inbound, not transparent, and naming the
    /// inbound listener that serves its tunnels; `inbound_listener` on no other.
    fn hbone(&mut self, subject: &str, listener: &v1::Listener, listeners: &HashMap<&str, &v1::Listener>) {
        if !is_tunnels(listener) {
            if !listener.inbound_listener.is_empty() {
                self.fail(subject, "inbound_listener", "applies only to protocol: hbone");
            }
            return;
        }
        if listener.direction() != v1::listener::Direction::Inbound {
            self.fail(subject, "direction", "an hbone listener is inbound: it takes tunnels from peers");
        }
        if listener.transparent {
            self.fail(
                subject,
                "transparent",
                "does not apply to an hbone listener: each tunnel names its destination in its CONNECT",
            );
        }
        let name = listener.inbound_listener.as_str();
        if name.is_empty() {
            self.fail(
                subject,
                "inbound_listener",
                "is required: the inbound listener whose routes and policies serve the tunnels",
            );
            return;
        }
        match listeners.get(name) {
            Some(target)
                if target.direction() == v1::listener::Direction::Inbound && !is_tunnels(target) && !is_udp(target) => {
            }
            Some(_) => self.fail(
                subject,
                "inbound_listener",
                format!("names listener {name:?}, which is not an inbound TCP listener (auto, http1, http2 or tcp)"),
            ),
            None if self.references == References::Required => {
                self.fail(subject, "inbound_listener", format!("names listener {name:?}, which is not defined"))
            }
            None => {}
        }
    }

    /// An HTTP/3 listener's own rules: a certificate, no `transparent`; `tls` on no other yet, and
    /// `advertise_http3` naming an HTTP/3 listener from an HTTP one.
    fn http3(&mut self, subject: &str, listener: &v1::Listener, listeners: &HashMap<&str, &v1::Listener>) {
        let http3 = listener.protocol() == v1::listener::Protocol::Http3;
        match &listener.tls {
            None if http3 => self.fail(subject, "tls", "is required with protocol: http3 (its certificate)"),
            None => {}
            Some(_) if !http3 => self.fail(subject, "tls", "applies only to protocol: http3"),
            Some(tls) => {
                if tls.certificate_file.is_empty() {
                    self.fail(subject, "tls.certificate_file", "is required");
                }
                if tls.private_key_file.is_empty() {
                    self.fail(subject, "tls.private_key_file", "is required");
                }
            }
        }
        if http3 && listener.transparent {
            self.fail(subject, "transparent", "does not apply to an http3 listener");
        }
        let name = listener.advertise_http3.as_str();
        if name.is_empty() {
            return;
        }
        use v1::listener::Protocol;
        if !matches!(listener.protocol(), Protocol::Auto | Protocol::Http1 | Protocol::Http2) {
            self.fail(subject, "advertise_http3", "applies only to an HTTP listener (auto, http1 or http2)");
        }
        match listeners.get(name) {
            Some(target) if target.protocol() == v1::listener::Protocol::Http3 => {}
            Some(_) => self.fail(
                subject,
                "advertise_http3",
                format!("names listener {name:?}, which is not of protocol: http3"),
            ),
            None if self.references == References::Required => {
                self.fail(subject, "advertise_http3", format!("names listener {name:?}, which is not defined"))
            }
            None => {}
        }
    }

    fn listener(
        &mut self,
        subject: &str,
        listener: &v1::Listener,
        clusters: &HashMap<&str, &v1::Cluster>,
        tables: &HashMap<&str, &v1::RouteTable>,
    ) {
        if listener.address.is_empty() {
            self.fail(subject, "address", "is required");
        } else if let Err(e) = parse_address(&listener.address) {
            self.fail(subject, "address", e);
        }
        for (i, address) in listener.additional_addresses.iter().enumerate() {
            if let Err(e) = parse_address(address) {
                self.fail(subject, format!("additional_addresses[{i}]"), e);
            }
        }
        if v1::listener::Direction::try_from(listener.direction).is_err() {
            self.fail(subject, "direction", format!("unknown value {}", listener.direction));
        }
        if v1::listener::Protocol::try_from(listener.protocol).is_err() {
            self.fail(subject, "protocol", format!("unknown value {}", listener.protocol));
        }
        for (i, name) in listener.route_tables.iter().enumerate() {
            if self.references == References::Required && !tables.contains_key(name.as_str()) {
                self.fail(
                    subject,
                    format!("route_tables[{i}]"),
                    format!("names route table {name:?}, which is not defined"),
                );
            }
        }
        if !listener.default_cluster.is_empty() {
            self.cluster_ref(subject, "default_cluster", &listener.default_cluster, clusters);
        }
        self.duration(subject, "detect_timeout", listener.detect_timeout.as_ref(), true);
        self.duration(subject, "idle_timeout", listener.idle_timeout.as_ref(), true);
        self.duration(subject, "header_timeout", listener.header_timeout.as_ref(), true);
        if let Some(limit) = &listener.connection_rate_limit
            && limit.connections_per_second == 0
        {
            self.fail(subject, "connection_rate_limit.connections_per_second", "must be above zero");
        }
    }
}

/// Whether the listener binds UDP (HTTP/3, HBONE over QUIC) rather than TCP.
fn is_udp(listener: &v1::Listener) -> bool {
    matches!(listener.protocol(), v1::listener::Protocol::Http3 | v1::listener::Protocol::HboneQuic)
}

/// Whether the listener takes mesh tunnels (HBONE over TCP or QUIC).
fn is_tunnels(listener: &v1::Listener) -> bool {
    matches!(listener.protocol(), v1::listener::Protocol::Hbone | v1::listener::Protocol::HboneQuic)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(super) fn problems(yaml: &str) -> String {
    let file = crate::config::parse(yaml, "t").unwrap();
    validate(&file.resources).expect_err("set should be invalid").to_string()
}

#[cfg(test)]
pub(super) const BASE: &str = r#"
- kind: Cluster
  name: shop
- kind: Endpoints
  cluster: shop
  endpoints: [{address: "127.0.0.1:9000"}]
"#;

#[cfg(test)]
pub(super) fn with_base(extra: &str) -> String {
    format!("resources:{BASE}{extra}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::config::parse;

    #[test]
    fn a_coherent_set_passes() {
        let yaml = with_base(
            r#"
- kind: RouteTable
  name: shop
  destinations: ["shop", "shop.svc:80", "*.shop.svc", "10.0.0.1:80"]
  routes:
    - match: {path: {regex: "/items/[0-9]+"}, method: GET, headers: [{name: x-user, exact: a}], query: [{name: q, present: true}]}
      backends: [{cluster: shop, weight: 2}]
- kind: Listener
  name: web
  address: 127.0.0.1:8080
  route_tables: [shop]
  default_cluster: shop
"#,
        );
        let file = parse(&yaml, "t").unwrap();
        validate(&file.resources).unwrap();
    }

    #[test]
    fn pending_references_are_not_errors_but_bad_values_still_are() {
        let yaml = "resources:\n  - {kind: Listener, name: l, address: \"127.0.0.1:1\", route_tables: [t], default_cluster: c}\n  - {kind: Endpoints, cluster: c, endpoints: [{address: \"127.0.0.1:2\"}]}\n";
        let file = parse(yaml, "t").unwrap();
        assert!(validate(&file.resources).is_err());
        validate_with(&file.resources, References::Pending).unwrap();
        let bad = parse(&yaml.replace("127.0.0.1:2", "nowhere"), "t").unwrap();
        let error = validate_with(&bad.resources, References::Pending).unwrap_err().to_string();
        assert!(error.contains("endpoints[0].address"), "{error}");
    }

    #[test]
    fn dangling_references_are_named() {
        let text = problems(&with_base(
            "- {kind: Listener, name: web, address: 127.0.0.1:1, route_tables: [nope], default_cluster: gone}\n",
        ));
        assert!(text.contains("listener \"web\": route_tables[0]: names route table \"nope\""), "{text}");
        assert!(text.contains("listener \"web\": default_cluster: names cluster \"gone\""), "{text}");
        let text = validate(&[Resource::Cluster(v1::Cluster { name: "w\u{7f}b".into(), ..Default::default() })])
            .unwrap_err()
            .to_string();
        assert!(text.contains(r#"cluster "w\u{7f}b": name: must not hold control characters"#), "{text}");
    }

    #[test]
    fn bad_values_name_their_fields() {
        let text = problems(&with_base(
            r#"
- kind: RouteTable
  name: r
  destinations: ["bad host!"]
  opaque: true
  routes:
    - match: {path: {regex: "(unclosed"}}
      backends: [{cluster: shop, weight: 0}]
    - match: {path: {prefix: "no-slash"}}
      backends: []
- kind: Listener
  name: l
  address: localhost:80
  detect_timeout: 0s
- {kind: Listener, name: tunnels, address: "0.0.0.0:15008", protocol: hbone, transparent: true, inbound_listener: l}
- {kind: Listener, name: bare, address: "0.0.0.0:15009", protocol: hbone, direction: inbound}
- {kind: Listener, name: side, address: "0.0.0.0:15010", inbound_listener: l}
- {kind: Listener, name: quic, address: "0.0.0.0:443", protocol: http3, transparent: true}
- {kind: Listener, name: quic2, address: "0.0.0.0:444", protocol: http3, tls: {certificate_file: c.pem}}
- {kind: Listener, name: web, address: "0.0.0.0:443", tls: {certificate_file: c.pem, private_key_file: k.pem}, advertise_http3: l}
- {kind: Listener, name: opaque, address: "0.0.0.0:445", protocol: tcp, advertise_http3: quic}
- {kind: Listener, name: udp-tunnels, address: "0.0.0.0:15008", protocol: hbone_quic, direction: inbound, inbound_listener: tunnels}
"#,
        ));
        for needle in [
            "route table \"r\": destinations[0]:",
            "route table \"r\": routes[0].match.path.regex: is not a valid regex",
            "routes[0].backends: needs at least one backend with a weight above zero",
            "routes[1].match.path: must start with '/'",
            "routes[1].backends: needs at least one cluster",
            "route table \"r\": opaque: needs tcp_cluster",
            "listener \"l\": address: must be ip:port",
            "listener \"l\": detect_timeout: must be greater than zero",
            "listener \"tunnels\": direction: an hbone listener is inbound",
            "listener \"tunnels\": transparent: does not apply to an hbone listener",
            "listener \"tunnels\": inbound_listener: names listener \"l\", which is not an inbound TCP listener",
            "listener \"bare\": inbound_listener: is required",
            "listener \"side\": inbound_listener: applies only to protocol: hbone",
            "listener \"quic\": tls: is required with protocol: http3",
            "listener \"quic\": transparent: does not apply to an http3 listener",
            "listener \"quic2\": tls.private_key_file: is required",
            "listener \"web\": tls: applies only to protocol: http3",
            "listener \"web\": advertise_http3: names listener \"l\", which is not of protocol: http3",
            "listener \"opaque\": advertise_http3: applies only to an HTTP listener",
            "listener \"udp-tunnels\": inbound_listener: names listener \"tunnels\", which is not an inbound TCP listener",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
    }

    /// Route filters: header modifiers with bad names or values, redirects with a bad scheme, host,
    /// port or status, a prefix replacement on a route with no prefix match, a path that is not
    /// one; a redirecting route needs no backends.
    #[test]
    fn bad_filters_name_their_fields() {
        let text = problems(&with_base(
            r#"
- kind: RouteTable
  name: f
  routes:
    - match: {path: {exact: /x}}
      redirect: {scheme: ftp, host: "bad host", port: 70000, prefix: /y, status: 200}
    - request_headers: {set: [{name: "bad name", value: v}], add: [{name: host, value: h}], remove: ["x y"]}
      response_headers: {add: [{name: x-ok, value: "line\nbreak"}]}
      rewrite: {full_path: "no-slash"}
      backends: [{cluster: shop, request_headers: {remove: [":path"]}}]
    - match: {path: {segment_prefix: /ok}}
      redirect: {prefix: /fine, status: 301}
"#,
        ));
        for needle in [
            "routes[0].redirect.scheme: must be http or https",
            "routes[0].redirect.host: \"bad host\" is not a host name",
            "routes[0].redirect.port: must be 1 to 65535",
            "routes[0].redirect.prefix: replaces the matched prefix",
            "routes[0].redirect.status: must be 301, 302, 303, 307 or 308",
            "routes[1].request_headers.set[0].name: \"bad name\" is not a header name",
            "routes[1].request_headers.add[0].name: the host is changed by a rewrite",
            "routes[1].request_headers.remove[0]: \"x y\" is not a header name",
            "routes[1].response_headers.add[0].value: is not a valid header value",
            "routes[1].rewrite.full_path: must start with '/'",
            "routes[1].backends[0].request_headers.remove[0]:",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
        assert!(!text.contains("routes[0].backends"), "a redirect needs no backends: {text}");
        assert!(!text.contains("routes[2]"), "{text}");
    }

    #[test]
    fn duplicates_and_conflicts_are_rejected() {
        let text = problems(&with_base(
            r#"
- {kind: Cluster, name: shop}
- {kind: RouteTable, name: a, destinations: [shop]}
- {kind: RouteTable, name: b, destinations: [SHOP]}
- {kind: RouteTable, name: c}
- {kind: RouteTable, name: d, destinations: ["*"]}
- {kind: Listener, name: l1, address: "127.0.0.1:80"}
- {kind: Listener, name: l2, address: "127.0.0.1:80", route_tables: [a]}
- {kind: Listener, name: l3, address: "127.0.0.1:81", additional_addresses: ["[::1]:81", "127.0.0.1:81", "[::1]:80", "nowhere"]}
- {kind: Listener, name: l4, address: "127.0.0.1:0", additional_addresses: ["127.0.0.1:0"], route_tables: [a]}
- {kind: Listener, name: l5, address: "127.0.0.1:0", route_tables: [a]}
"#,
        ));
        assert!(text.contains("cluster \"shop\": is defined more than once"), "{text}");
        assert!(text.contains("also claimed by route table \"a\""), "{text}");
        assert!(
            text.contains("listener \"l1\": route_tables: serves more than one catch-all route table (c, d)"),
            "{text}"
        );
        assert!(!text.contains("listener \"l2\": route_tables"), "{text}");
        assert!(
            text.contains("listener \"l2\": address: 127.0.0.1:80 is also an address of listener \"l1\""),
            "{text}"
        );
        assert!(
            text.contains("listener \"l3\": additional_addresses[1]: 127.0.0.1:81 is also an address of this listener"),
            "{text}"
        );
        assert!(text.contains("listener \"l3\": additional_addresses[3]:"), "{text}");
        assert!(
            text.contains("listener \"l4\": additional_addresses[0]: 127.0.0.1:0 is also an address of this listener"),
            "{text}"
        );
        assert!(!text.contains("listener \"l5\": a"), "port 0 is a fresh port for each listener: {text}");
        assert!(
            !text.contains("\"l3\": additional_addresses[0]") && !text.contains("\"l3\": additional_addresses[2]"),
            "{text}"
        );
    }

    /// Tables served on opposite sides may claim the same destination, and each side may have its
    /// own catch-all; a table for both sides meets either.
    #[test]
    fn tables_of_opposite_directions_do_not_conflict() {
        let file = crate::config::parse(
            &with_base(
                r#"
- {kind: RouteTable, name: out, direction: outbound, destinations: [shop]}
- {kind: RouteTable, name: in, direction: inbound, destinations: [shop]}
- {kind: RouteTable, name: out-all, direction: outbound}
- {kind: RouteTable, name: in-all, direction: inbound}
- {kind: Listener, name: o, address: "127.0.0.1:80"}
- {kind: Listener, name: i, address: "127.0.0.1:81", direction: inbound}
"#,
            ),
            "t",
        )
        .unwrap();
        validate(&file.resources).unwrap();
        let text = problems(&with_base(
            r#"
- {kind: RouteTable, name: both, destinations: [shop]}
- {kind: RouteTable, name: in, direction: inbound, destinations: [shop]}
"#,
        ));
        assert!(text.contains("also claimed by route table \"both\""), "{text}");
    }
}
