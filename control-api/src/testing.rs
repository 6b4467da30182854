//! Fixtures for tests and benches (feature `testing`): a typed builder of config documents.
//!
//! Tests describe the resources they need in Rust ([`Config`] and the builders [`Cluster`],
//! [`RouteTable`], [`Route`], [`Listener`]), with the common shapes a call each (a cluster with its
//! endpoints, a catch-all route, a listener on `127.0.0.1:0`) and any other field of the generated
//! message in reach (`set`). [`Config::yaml`] renders the document a proxy's `--config` file or the
//! control plane's directory holds, through the schema's own serde (the proto3 JSON mapping), so
//! what a test writes is exactly what a user would — and a misspelt field is a compile error, not a
//! rejected document.
//!
//! ```text
//! let config = Config::new()
//!     .with(Cluster::new("web").endpoints(&[upstream]))
//!     .with(RouteTable::new("web").route(Route::to("web").retry(|r| r.attempts = Some(3))))
//!     .with(Listener::new("in").http1());
//! let proxy = TestProxy::start(&config.yaml());
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;

use serde_yaml_ng::{Mapping, Value};

use crate::{Resource, v1};

/// A duration of `seconds` (fractions allowed), as the schema spells durations.
pub fn secs(seconds: f64) -> pbjson_types::Duration {
    let whole = seconds.trunc();
    pbjson_types::Duration { seconds: whole as i64, nanos: ((seconds - whole) * 1e9).round() as i32 }
}

/// What adds resources to a [`Config`]: a resource, a builder, or a list of either.
pub trait Resources {
    /// The resources.
    fn into_resources(self) -> Vec<Resource>;
}

impl Resources for Resource {
    fn into_resources(self) -> Vec<Resource> {
        vec![self]
    }
}

impl<R: Resources> Resources for Vec<R> {
    fn into_resources(self) -> Vec<Resource> {
        self.into_iter().flat_map(Resources::into_resources).collect()
    }
}

/// A config document: an optional bootstrap section and resources.
#[derive(Clone, Debug, Default)]
pub struct Config {
    bootstrap: Option<v1::Bootstrap>,
    resources: Vec<Resource>,
}

impl Config {
    pub fn new() -> Config {
        Config::default()
    }

    /// Adds resources.
    pub fn with(mut self, resources: impl Resources) -> Config {
        self.resources.extend(resources.into_resources());
        self
    }

    /// Sets the bootstrap section (starting from an empty one).
    pub fn bootstrap(mut self, edit: impl FnOnce(&mut v1::Bootstrap)) -> Config {
        edit(self.bootstrap.get_or_insert_with(Default::default));
        self
    }

    /// The resources so far.
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// The document in YAML: `bootstrap:` (if set) and `resources:`.
    pub fn yaml(&self) -> String {
        let mut document = Mapping::new();
        if let Some(bootstrap) = &self.bootstrap {
            document.insert("bootstrap".into(), serde_yaml_ng::to_value(bootstrap).expect("bootstrap as YAML"));
        }
        let resources: Vec<Value> = self.resources.iter().map(resource_yaml).collect();
        document.insert("resources".into(), Value::Sequence(resources));
        serde_yaml_ng::to_string(&document).expect("config as YAML")
    }
}

/// One resource as a `kind:`-tagged mapping.
fn resource_yaml(resource: &Resource) -> Value {
    let body = match resource {
        Resource::Listener(r) => serde_yaml_ng::to_value(r),
        Resource::RouteTable(r) => serde_yaml_ng::to_value(r),
        Resource::Cluster(r) => serde_yaml_ng::to_value(r),
        Resource::Endpoints(r) => serde_yaml_ng::to_value(r),
        Resource::AuthorizationPolicy(r) => serde_yaml_ng::to_value(r),
    }
    .expect("resource as YAML");
    let mut mapping = Mapping::new();
    mapping.insert("kind".into(), resource.kind().as_str().into());
    if let Value::Mapping(fields) = body {
        mapping.extend(fields);
    }
    Value::Mapping(mapping)
}

/// A cluster and, once given, its endpoints.
#[derive(Clone, Debug)]
pub struct Cluster {
    cluster: v1::Cluster,
    endpoints: Option<v1::Endpoints>,
}

impl Cluster {
    /// Cluster `name`, defaults everywhere, no endpoints yet.
    pub fn new(name: &str) -> Cluster {
        Cluster { cluster: v1::Cluster { name: name.into(), ..Default::default() }, endpoints: None }
    }

    /// A pass-through cluster: each connection goes where it was going.
    pub fn original_destination(name: &str) -> Cluster {
        Cluster::new(name).set(|c| c.original_destination = true)
    }

    /// Its endpoints, one per address.
    pub fn endpoints(self, addresses: &[SocketAddr]) -> Cluster {
        let endpoints =
            addresses.iter().map(|a| v1::Endpoint { address: a.to_string(), ..Default::default() }).collect();
        self.endpoints_with(|e| e.endpoints = endpoints)
    }

    /// Edits its endpoints resource (made empty if there was none).
    pub fn endpoints_with(mut self, edit: impl FnOnce(&mut v1::Endpoints)) -> Cluster {
        let name = self.cluster.name.clone();
        edit(self.endpoints.get_or_insert_with(|| v1::Endpoints { cluster: name, ..Default::default() }));
        self
    }

    /// The protocol spoken to the endpoints.
    pub fn protocol(self, protocol: v1::cluster::Protocol) -> Cluster {
        self.set(|c| c.set_protocol(protocol))
    }

    /// The balancer.
    pub fn balancer(self, balancer: v1::cluster::Balancer) -> Cluster {
        self.set(|c| c.set_balancer(balancer))
    }

    /// Mutual TLS to the endpoints' sidecars.
    pub fn mesh(self) -> Cluster {
        self.set(|c| c.set_tls(v1::cluster::Tls::Mesh))
    }

    /// Edits any other field.
    pub fn set(mut self, edit: impl FnOnce(&mut v1::Cluster)) -> Cluster {
        edit(&mut self.cluster);
        self
    }
}

impl Resources for Cluster {
    fn into_resources(self) -> Vec<Resource> {
        let mut resources = vec![Resource::Cluster(self.cluster)];
        resources.extend(self.endpoints.map(Resource::Endpoints));
        resources
    }
}

/// A route table.
#[derive(Clone, Debug)]
pub struct RouteTable(v1::RouteTable);

impl RouteTable {
    /// Table `name`, claiming no destination of its own (a listener's tables serve any).
    pub fn new(name: &str) -> RouteTable {
        RouteTable(v1::RouteTable { name: name.into(), ..Default::default() })
    }

    /// Table `name` sending every request to `cluster`.
    pub fn to(name: &str, cluster: &str) -> RouteTable {
        RouteTable::new(name).route(Route::to(cluster))
    }

    /// The destinations it answers for (`host`, `host:port`, `*.suffix`, `ip:port`, `*`).
    pub fn destinations(mut self, destinations: &[&str]) -> RouteTable {
        self.0.destinations = destinations.iter().map(|d| (*d).to_owned()).collect();
        self
    }

    /// Adds a route, after those already there.
    pub fn route(mut self, route: Route) -> RouteTable {
        self.0.routes.push(route.0);
        self
    }

    /// Edits any other field.
    pub fn set(mut self, edit: impl FnOnce(&mut v1::RouteTable)) -> RouteTable {
        edit(&mut self.0);
        self
    }
}

impl Resources for RouteTable {
    fn into_resources(self) -> Vec<Resource> {
        vec![Resource::RouteTable(self.0)]
    }
}

/// One route of a table.
#[derive(Clone, Debug, Default)]
pub struct Route(pub v1::Route);

impl Route {
    /// Every request to `cluster`.
    pub fn to(cluster: &str) -> Route {
        Route::weighted(&[(cluster, 1)])
    }

    /// Every request to one of `backends` by weight.
    pub fn weighted(backends: &[(&str, u32)]) -> Route {
        let backends = backends
            .iter()
            .map(|(cluster, weight)| v1::WeightedCluster {
                cluster: (*cluster).into(),
                weight: Some(*weight),
                ..Default::default()
            })
            .collect();
        Route(v1::Route { backends, ..Default::default() })
    }

    /// The route's name.
    pub fn named(mut self, name: &str) -> Route {
        self.0.name = name.into();
        self
    }

    /// Matches paths starting with `prefix`.
    pub fn path_prefix(self, prefix: &str) -> Route {
        let kind = v1::path_match::Kind::Prefix(prefix.into());
        self.matching(|m| m.path = Some(v1::PathMatch { kind: Some(kind) }))
    }

    /// Matches exactly path `path`.
    pub fn path_exact(self, path: &str) -> Route {
        let kind = v1::path_match::Kind::Exact(path.into());
        self.matching(|m| m.path = Some(v1::PathMatch { kind: Some(kind) }))
    }

    /// Matches paths that match regex `pattern` whole.
    pub fn path_regex(self, pattern: &str) -> Route {
        let kind = v1::path_match::Kind::Regex(pattern.into());
        self.matching(|m| m.path = Some(v1::PathMatch { kind: Some(kind) }))
    }

    /// Matches method `method` only.
    pub fn method(self, method: &str) -> Route {
        self.matching(|m| m.method = method.into())
    }

    /// Matches requests whose header `name` is exactly `value`.
    pub fn header(self, name: &str, value: &str) -> Route {
        let header = v1::HeaderMatch { name: name.into(), kind: Some(v1::header_match::Kind::Exact(value.into())) };
        self.matching(|m| m.headers.push(header))
    }

    /// Matches requests whose query has parameter `name`.
    pub fn query_present(self, name: &str) -> Route {
        let param = v1::QueryMatch { name: name.into(), kind: Some(v1::query_match::Kind::Present(true)) };
        self.matching(|m| m.query.push(param))
    }

    /// Edits the route's match (made empty, matching everything, if it had none).
    pub fn matching(mut self, edit: impl FnOnce(&mut v1::RouteMatch)) -> Route {
        edit(self.0.r#match.get_or_insert_with(Default::default));
        self
    }

    /// The timeout for the response head.
    pub fn timeout(mut self, seconds: f64) -> Route {
        self.0.timeout = Some(secs(seconds));
        self
    }

    /// Edits the retry policy (made with every default if there was none).
    pub fn retry(mut self, edit: impl FnOnce(&mut v1::RetryPolicy)) -> Route {
        edit(self.0.retry.get_or_insert_with(Default::default));
        self
    }

    /// Edits any other field.
    pub fn set(mut self, edit: impl FnOnce(&mut v1::Route)) -> Route {
        edit(&mut self.0);
        self
    }
}

/// A listener, on `127.0.0.1:0` unless told otherwise.
#[derive(Clone, Debug)]
pub struct Listener(v1::Listener);

impl Listener {
    /// Listener `name` on a free port of 127.0.0.1, protocol detected, outbound.
    pub fn new(name: &str) -> Listener {
        Listener(v1::Listener { name: name.into(), address: "127.0.0.1:0".into(), ..Default::default() })
    }

    /// HTTP/1.1 only.
    pub fn http1(self) -> Listener {
        self.set(|l| l.set_protocol(v1::listener::Protocol::Http1))
    }

    /// HTTP/2 with prior knowledge only.
    pub fn http2(self) -> Listener {
        self.set(|l| l.set_protocol(v1::listener::Protocol::Http2))
    }

    /// Opaque TCP.
    pub fn tcp(self) -> Listener {
        self.set(|l| l.set_protocol(v1::listener::Protocol::Tcp))
    }

    /// HBONE: mesh tunnels (inbound, mTLS, HTTP/2 CONNECT), served by inbound listener `inbound`.
    pub fn hbone(self, inbound: &str) -> Listener {
        self.set(|l| {
            l.set_protocol(v1::listener::Protocol::Hbone);
            l.set_direction(v1::listener::Direction::Inbound);
            l.inbound_listener = inbound.into();
        })
    }

    /// HTTP/3 over QUIC (UDP), presenting the PEM certificate chain and key in those files.
    pub fn http3(self, certificate_file: &std::path::Path, private_key_file: &std::path::Path) -> Listener {
        self.set(|l| {
            l.set_protocol(v1::listener::Protocol::Http3);
            l.tls = Some(v1::ListenerTls {
                certificate_file: certificate_file.display().to_string(),
                private_key_file: private_key_file.display().to_string(),
            });
        })
    }

    /// Advertises HTTP/3 listener `name` (`Alt-Svc`) on every response.
    pub fn advertise_http3(self, name: &str) -> Listener {
        self.set(|l| l.advertise_http3 = name.into())
    }

    /// Inbound: from the mesh to the local app.
    pub fn inbound(self) -> Listener {
        self.set(|l| l.set_direction(v1::listener::Direction::Inbound))
    }

    /// Where traffic no route table claims goes.
    pub fn default_cluster(self, cluster: &str) -> Listener {
        self.set(|l| l.default_cluster = cluster.into())
    }

    /// Edits any other field.
    pub fn set(mut self, edit: impl FnOnce(&mut v1::Listener)) -> Listener {
        edit(&mut self.0);
        self
    }
}

impl Resources for Listener {
    fn into_resources(self) -> Vec<Resource> {
        vec![Resource::Listener(self.0)]
    }
}

/// A YAML alias bomb: one anchored list of `count` items referenced `count` times, `count`² nodes
/// once built from about 5·`count` bytes of text (10,000: 10^8 nodes from 140 kB).
pub fn alias_bomb(count: usize) -> String {
    let mut text = String::from("a: &a [");
    text.push_str(&vec!["1"; count].join(","));
    text.push_str("]\nb: [");
    text.push_str(&vec!["*a"; count].join(","));
    text.push_str("]\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the builder writes, the parser reads back as the same resources, and it validates.
    #[test]
    fn documents_round_trip_through_the_parser() {
        let upstream: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let config = Config::new()
            .bootstrap(|b| b.workers = 1)
            .with(Cluster::new("web").endpoints(&[upstream]).protocol(v1::cluster::Protocol::Http2))
            .with(
                RouteTable::new("web").destinations(&["shop"]).route(
                    Route::weighted(&[("web", 3)])
                        .named("api")
                        .path_prefix("/api")
                        .timeout(0.25)
                        .retry(|r| r.attempts = Some(3)),
                ),
            )
            .with(Listener::new("in").http1().default_cluster("web"));
        let yaml = config.yaml();
        let parsed = crate::config::parse(&yaml, "built").unwrap();
        assert_eq!(parsed.resources, config.resources(), "{yaml}");
        assert_eq!(parsed.bootstrap.unwrap().workers, 1);
        crate::validate::validate(&parsed.resources).unwrap();
        assert!(yaml.contains("timeout: 0.250s"), "{yaml}");
        assert!(yaml.contains("protocol: http2"), "{yaml}");
    }
}

/// A TLS client's verifier that accepts any server certificate (its signatures are still checked):
/// for tests about what a server accepts, and for mesh peers whose certificates name only a
/// SPIFFE ID.
#[derive(Debug)]
pub struct AnyServerCert(pub std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
