//! Rules a set of resources must satisfy before a proxy builds a snapshot from it.
//!
//! [`validate`] takes the whole set (every kind at once) and returns every problem it finds, each
//! naming the resource and the field: a bad address, a regex that does not compile, a route to a
//! cluster that does not exist, two route tables claiming one destination. [`validate_bootstrap`] checks
//! the start-up settings. The small parsers here ([`parse_address`], [`Destination::parse`],
//! [`duration`]) are the ones the proxy uses too, so what validates is exactly what runs.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::FieldError;
use crate::resource::{Kind, Resource, describe};
use crate::v1;

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

/// The conditions a retry policy's `retry_on` may name (Envoy's names).
pub const RETRY_ON: &[&str] = &[
    "connect-failure",
    "refused-stream",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-4xx",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Most retries a policy may ask for: beyond a handful, retries only deepen an outage.
pub const MAX_RETRIES: u32 = 10;

/// Largest replay buffer a retry policy may ask for.
pub const MAX_REPLAY_BUFFER: u32 = 1024 * 1024;

/// Parses an `ip:port` socket address (`[v6]:port` for IPv6).
pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| format!("must be ip:port, got {text:?}"))
}

/// Converts a protobuf duration, rejecting negative ones. `None` stays `None` (the field's default).
pub fn duration(value: Option<&pbjson_types::Duration>) -> Result<Option<Duration>, String> {
    match value {
        None => Ok(None),
        Some(d) => Duration::try_from(*d)
            .map(Some)
            .map_err(|_| format!("must be a non-negative duration, got {}s {}ns", d.seconds, d.nanos)),
    }
}

/// One entry of a route table's `destinations`, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// `*`: any destination.
    Any,
    /// `reviews`: this host name on any port (lowercase).
    Host(String),
    /// `reviews:9080`: this host name on this port (lowercase).
    HostPort(String, u16),
    /// `*.shop.svc`: any host ending in this suffix; holds `.shop.svc` (lowercase).
    Suffix(String),
    /// `10.96.0.12:9080`: this original destination of a transparent connection, or this authority.
    Address(SocketAddr),
}

impl Destination {
    /// Parses one `destinations` entry.
    pub fn parse(text: &str) -> Result<Destination, String> {
        if text == "*" {
            return Ok(Destination::Any);
        }
        if let Ok(address) = text.parse::<SocketAddr>() {
            return Ok(Destination::Address(address));
        }
        if let Some(suffix) = text.strip_prefix("*.") {
            check_host(suffix, text)?;
            return Ok(Destination::Suffix(format!(".{}", suffix.to_ascii_lowercase())));
        }
        if let Some((host, port)) = text.rsplit_once(':') {
            let port = port.parse::<u16>().map_err(|_| format!("{text:?} has a bad port"))?;
            check_host(host, text)?;
            return Ok(Destination::HostPort(host.to_ascii_lowercase(), port));
        }
        check_host(text, text)?;
        Ok(Destination::Host(text.to_ascii_lowercase()))
    }
}

fn check_host(host: &str, whole: &str) -> Result<(), String> {
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(format!("{whole:?} is not a destination (expected host, host:port, *.suffix, ip:port or *)"))
    }
}

/// Whether `name` is an HTTP token (RFC 9110 §5.6.2), as header names and methods must be.
fn is_token(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Compiles a route regex the way the proxy runs it: it must match the whole value.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("is not a valid regex: {e}"))
}

/// Checks a control-plane address: empty (none), or an `http://host:port` URL.
pub fn check_control_plane(address: &str) -> Result<(), String> {
    if address.is_empty() {
        return Ok(());
    }
    let Some(rest) = address.strip_prefix("http://").or_else(|| address.strip_prefix("https://")) else {
        return Err(format!("must be an http:// or https:// URL, got {address:?}"));
    };
    let authority = rest.trim_end_matches('/');
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() && !authority.contains('/') => Ok(()),
        _ => Err(format!("must be http://host:port or https://host:port, got {address:?}")),
    }
}

/// Checks the bootstrap settings.
pub fn validate_bootstrap(bootstrap: &v1::Bootstrap) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    let mut fail = |field: &str, message: String| errors.push(FieldError::new("bootstrap", field, message));
    if !bootstrap.admin_address.is_empty()
        && let Err(e) = parse_address(&bootstrap.admin_address)
    {
        fail("admin_address", e);
    }
    if bootstrap.workers > 1024 {
        fail("workers", format!("must be at most 1024, got {}", bootstrap.workers));
    }
    if let Err(e) = duration(bootstrap.drain_time.as_ref()) {
        fail("drain_time", e);
    }
    if let Err(e) = duration(bootstrap.initial_fetch_timeout.as_ref()) {
        fail("initial_fetch_timeout", e);
    }
    if let Err(e) = check_control_plane(&bootstrap.control_plane) {
        fail("control_plane", e);
    }
    let https = |url: &str| url.starts_with("https://");
    let ca_address = bootstrap.identity.as_ref().map_or("", |i| i.ca_address.as_str());
    let no_roots = bootstrap.control_plane_ca_file.is_empty() && bootstrap.control_plane_ca.trim().is_empty();
    if (https(&bootstrap.control_plane) || https(ca_address)) && no_roots {
        fail("control_plane_ca_file", "is required to check an https:// control plane's certificate".into());
    }
    if let Some(tracing) = &bootstrap.tracing {
        let endpoint = &tracing.endpoint;
        if !(endpoint.is_empty() || endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            fail("tracing.endpoint", format!("must be an http:// or https:// URL, got {endpoint:?}"));
        }
        if !matches!(tracing.protocol.as_str(), "" | "grpc" | "http/protobuf") {
            fail("tracing.protocol", format!("must be grpc or http/protobuf, got {:?}", tracing.protocol));
        }
        if let Some(ratio) = tracing.sampling_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            fail("tracing.sampling_ratio", format!("must be from 0 to 1, got {ratio}"));
        }
        if let Err(e) = duration(tracing.export_interval.as_ref()) {
            fail("tracing.export_interval", e);
        }
        if let Err(e) = duration(tracing.export_timeout.as_ref()) {
            fail("tracing.export_timeout", e);
        }
    }
    if let Some(log) = &bootstrap.access_log {
        if log.path.is_empty() {
            fail("access_log.path", "is required: stdout, or a file path".into());
        }
        if let Some(ratio) = log.success_sampling_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            fail("access_log.success_sampling_ratio", format!("must be from 0 to 1, got {ratio}"));
        }
    }
    if let Some(identity) = &bootstrap.identity {
        identity_settings(identity, &mut fail);
    }
    if errors.is_empty() { Ok(()) } else { Err(ValidationErrors(errors)) }
}

/// The bootstrap's `identity`: exactly one source (the CA or files), each complete.
fn identity_settings(identity: &v1::Identity, fail: &mut impl FnMut(&str, String)) {
    let files = [&identity.cert_file, &identity.key_file, &identity.ca_file];
    let any_file = files.iter().any(|f| !f.is_empty());
    if !identity.spiffe_id.is_empty() {
        if let Err(e) = crate::identity::SpiffeId::parse(&identity.spiffe_id) {
            fail("identity.spiffe_id", e.to_string());
        }
        if any_file {
            fail(
                "identity.cert_file",
                "give either spiffe_id (a certificate from the CA) or the files, not both".into(),
            );
        }
        if identity.token_file.is_empty() {
            fail("identity.token_file", "is required with spiffe_id: the CA signs only for a token it knows".into());
        }
    } else if any_file {
        for (field, value) in
            [("cert_file", &identity.cert_file), ("key_file", &identity.key_file), ("ca_file", &identity.ca_file)]
        {
            if value.is_empty() {
                fail(&format!("identity.{field}"), "is required with the other certificate files".into());
            }
        }
    } else {
        fail("identity", "needs spiffe_id (a certificate from the CA) or cert_file, key_file and ca_file".into());
    }
    if let Err(e) = check_control_plane(&identity.ca_address) {
        fail("identity.ca_address", e);
    }
    match duration(identity.certificate_ttl.as_ref()) {
        Err(e) => fail("identity.certificate_ttl", e),
        Ok(Some(ttl)) if !(crate::ca::MIN_TTL..=crate::ca::DEFAULT_MAX_TTL).contains(&ttl) => {
            fail("identity.certificate_ttl", format!("must be from 10s to 30 days, got {}s", ttl.as_secs()));
        }
        Ok(_) => {}
    }
    match duration(identity.handshake_timeout.as_ref()) {
        Err(e) => fail("identity.handshake_timeout", e),
        Ok(Some(timeout)) if timeout.is_zero() => {
            fail("identity.handshake_timeout", "must be greater than zero".into())
        }
        Ok(_) => {}
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
pub fn validate(resources: &[Resource]) -> Result<(), ValidationErrors> {
    validate_with(resources, References::Required)
}

/// Like [`validate`], with a choice of whether dangling references are errors.
pub fn validate_with(resources: &[Resource], references: References) -> Result<(), ValidationErrors> {
    let mut check = Checker { errors: Vec::new(), references };
    let mut names: HashSet<(Kind, &str)> = HashSet::new();
    for resource in resources {
        let name = resource.name();
        if name.is_empty() {
            let field = if resource.kind() == Kind::Endpoints { "cluster" } else { "name" };
            check.fail(format!("{} with no name", resource.kind().noun()), field, "is required");
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

    let mut bound: HashMap<SocketAddr, &str> = HashMap::new();
    for resource in resources {
        let subject = describe(resource.kind(), resource.name());
        match resource {
            Resource::Listener(listener) => {
                check.listener(&subject, listener, &clusters, &tables);
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
                        && let Some(other) = bound.insert(address, &listener.name)
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

    fn route_table(&mut self, subject: &str, table: &v1::RouteTable, clusters: &HashMap<&str, &v1::Cluster>) {
        for (i, destination) in table.destinations.iter().enumerate() {
            if let Err(e) = Destination::parse(destination) {
                self.fail(subject, format!("destinations[{i}]"), e);
            }
        }
        if !table.tcp_cluster.is_empty() {
            self.cluster_ref(subject, "tcp_cluster", &table.tcp_cluster, clusters);
        }
        for (i, route) in table.routes.iter().enumerate() {
            let at = |field: &str| format!("routes[{i}].{field}");
            if let Some(matcher) = &route.r#match {
                if let Some(path) = matcher.path.as_ref().and_then(|p| p.kind.as_ref()) {
                    use v1::path_match::Kind as P;
                    match path {
                        P::Exact(p) | P::Prefix(p) if !p.starts_with('/') => {
                            self.fail(subject, at("match.path"), format!("must start with '/', got {p:?}"));
                        }
                        P::Regex(re) => {
                            if let Err(e) = compile_regex(re) {
                                self.fail(subject, at("match.path.regex"), e);
                            }
                        }
                        _ => {}
                    }
                }
                if !matcher.method.is_empty() && !is_token(&matcher.method) {
                    self.fail(subject, at("match.method"), format!("{:?} is not an HTTP method", matcher.method));
                }
                for (j, header) in matcher.headers.iter().enumerate() {
                    if !is_token(&header.name) {
                        self.fail(
                            subject,
                            at(&format!("match.headers[{j}].name")),
                            format!("{:?} is not a header name", header.name),
                        );
                    }
                    if let Some(v1::header_match::Kind::Regex(re)) = &header.kind
                        && let Err(e) = compile_regex(re)
                    {
                        self.fail(subject, at(&format!("match.headers[{j}].regex")), e);
                    }
                }
                for (j, query) in matcher.query.iter().enumerate() {
                    if query.name.is_empty() {
                        self.fail(subject, at(&format!("match.query[{j}].name")), "is required");
                    }
                    if let Some(v1::query_match::Kind::Regex(re)) = &query.kind
                        && let Err(e) = compile_regex(re)
                    {
                        self.fail(subject, at(&format!("match.query[{j}].regex")), e);
                    }
                }
            }
            self.duration(subject, &at("timeout"), route.timeout.as_ref(), true);
            self.duration(subject, &at("idle_timeout"), route.idle_timeout.as_ref(), true);
            if let Some(fault) = &route.fault {
                if let Some(delay) = &fault.delay {
                    self.percent(subject, &at("fault.delay.percent"), delay.percent);
                    if delay.duration.is_none() {
                        self.fail(subject, at("fault.delay.duration"), "is required");
                    }
                    self.duration(subject, &at("fault.delay.duration"), delay.duration.as_ref(), true);
                }
                if let Some(abort) = &fault.abort {
                    self.percent(subject, &at("fault.abort.percent"), abort.percent);
                    if !(200..=599).contains(&abort.status) {
                        self.fail(
                            subject,
                            at("fault.abort.status"),
                            format!("must be 200 to 599, got {}", abort.status),
                        );
                    }
                }
            }
            if let Some(limit) = &route.rate_limit
                && limit.requests_per_second == 0
            {
                self.fail(subject, at("rate_limit.requests_per_second"), "must be above zero");
            }
            if let Some(retry) = &route.retry {
                self.retry(subject, &at("retry"), retry);
            }
            if let Some(mirror) = &route.mirror {
                if mirror.cluster.is_empty() {
                    self.fail(subject, at("mirror.cluster"), "is required");
                } else {
                    self.cluster_ref(subject, &at("mirror.cluster"), &mirror.cluster, clusters);
                }
                if let Some(percent) = mirror.percent {
                    self.percent(subject, &at("mirror.percent"), percent);
                }
            }
            if let Some(fallback) = &route.fallback {
                if fallback.status != 0 && !(200..=599).contains(&fallback.status) {
                    self.fail(subject, at("fallback.status"), format!("must be 200 to 599, got {}", fallback.status));
                }
                let mut names: Vec<&String> = fallback.headers.keys().collect();
                names.sort();
                for name in names {
                    if !is_token(name) {
                        self.fail(subject, at("fallback.headers"), format!("{name:?} is not a header name"));
                    } else if http::HeaderValue::from_str(&fallback.headers[name]).is_err() {
                        self.fail(subject, at(&format!("fallback.headers.{name}")), "is not a valid header value");
                    }
                }
            }
            if route.backends.is_empty() {
                self.fail(subject, at("backends"), "needs at least one cluster");
            } else if route.backends.iter().all(|b| b.weight == Some(0)) {
                self.fail(subject, at("backends"), "needs at least one backend with a weight above zero");
            }
            for (j, backend) in route.backends.iter().enumerate() {
                self.cluster_ref(subject, &at(&format!("backends[{j}].cluster")), &backend.cluster, clusters);
            }
        }
    }

    fn retry(&mut self, subject: &str, at: &str, retry: &v1::RetryPolicy) {
        let field = |name: &str| format!("{at}.{name}");
        if let Some(attempts) = retry.attempts
            && attempts > MAX_RETRIES
        {
            self.fail(subject, field("attempts"), format!("must be at most {MAX_RETRIES}, got {attempts}"));
        }
        for (i, condition) in retry.retry_on.iter().enumerate() {
            if !RETRY_ON.contains(&condition.as_str()) {
                self.fail(
                    subject,
                    field(&format!("retry_on[{i}]")),
                    format!("unknown condition {condition:?}, expected one of {}", RETRY_ON.join(", ")),
                );
            }
        }
        for (i, code) in retry.retriable_status_codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                self.fail(
                    subject,
                    field(&format!("retriable_status_codes[{i}]")),
                    format!("must be 100 to 599, got {code}"),
                );
            }
        }
        self.duration(subject, &field("per_try_timeout"), retry.per_try_timeout.as_ref(), true);
        self.duration(subject, &field("backoff_base"), retry.backoff_base.as_ref(), true);
        self.duration(subject, &field("backoff_max"), retry.backoff_max.as_ref(), true);
        if let (Ok(Some(base)), Ok(Some(max))) =
            (duration(retry.backoff_base.as_ref()), duration(retry.backoff_max.as_ref()))
            && max < base
        {
            self.fail(subject, field("backoff_max"), "must not be less than backoff_base");
        }
        if let Some(budget) = &retry.budget {
            if let Some(percent) = budget.percent {
                self.percent(subject, &field("budget.percent"), percent);
            }
            self.duration(subject, &field("budget.ttl"), budget.ttl.as_ref(), true);
            if let Ok(Some(ttl)) = duration(budget.ttl.as_ref())
                && ttl > Duration::from_secs(60)
            {
                self.fail(subject, field("budget.ttl"), "must be at most 60s");
            }
        }
        if let Some(bytes) = retry.replay_buffer_bytes
            && bytes > MAX_REPLAY_BUFFER
        {
            self.fail(
                subject,
                field("replay_buffer_bytes"),
                format!("must be at most {MAX_REPLAY_BUFFER}, got {bytes}"),
            );
        }
        if let Some(hedge) = &retry.hedge {
            if hedge.delay.is_none() {
                self.fail(subject, field("hedge.delay"), "is required");
            }
            self.duration(subject, &field("hedge.delay"), hedge.delay.as_ref(), true);
        }
    }

    fn cluster(&mut self, subject: &str, cluster: &v1::Cluster) {
        let balancer = v1::cluster::Balancer::try_from(cluster.balancer);
        if balancer.is_err() {
            self.fail(subject, "balancer", format!("unknown value {}", cluster.balancer));
        }
        if v1::cluster::Protocol::try_from(cluster.protocol).is_err() {
            self.fail(subject, "protocol", format!("unknown value {}", cluster.protocol));
        }
        self.duration(subject, "connect_timeout", cluster.connect_timeout.as_ref(), true);
        self.duration(subject, "idle_timeout", cluster.idle_timeout.as_ref(), true);
        let ring_hash = balancer == Ok(v1::cluster::Balancer::RingHash);
        match (&cluster.hash_policy, ring_hash) {
            (None, true) => self.fail(subject, "hash_policy", "is required with balancer ring_hash"),
            (Some(_), false) => self.fail(subject, "hash_policy", "applies only to balancer ring_hash"),
            (Some(policy), true) => {
                use v1::hash_policy::Key;
                match &policy.key {
                    None => self.fail(subject, "hash_policy", "needs one of header, cookie, source_ip"),
                    Some(Key::Header(name)) if !is_token(name) => {
                        self.fail(subject, "hash_policy.header", format!("{name:?} is not a header name"));
                    }
                    Some(Key::Cookie(name)) if !is_token(name) => {
                        self.fail(subject, "hash_policy.cookie", format!("{name:?} is not a cookie name"));
                    }
                    Some(Key::SourceIp(false)) => {
                        self.fail(subject, "hash_policy.source_ip", "must be true when given");
                    }
                    Some(_) => {}
                }
            }
            (None, false) => {}
        }
        if let Some(outlier) = &cluster.outlier_detection {
            self.duration(subject, "outlier_detection.interval", outlier.interval.as_ref(), true);
            self.duration(subject, "outlier_detection.base_ejection_time", outlier.base_ejection_time.as_ref(), true);
            self.duration(subject, "outlier_detection.max_ejection_time", outlier.max_ejection_time.as_ref(), true);
            if let Some(percent) = outlier.max_ejection_percent {
                self.percent(subject, "outlier_detection.max_ejection_percent", f64::from(percent));
            }
            if let Some(rate) = &outlier.success_rate
                && let Some(margin) = rate.margin_percent
            {
                self.percent(subject, "outlier_detection.success_rate.margin_percent", margin);
            }
            if let Some(latency) = &outlier.latency {
                if let Some(multiple) = latency.multiple
                    && !(multiple >= 1.5 && multiple.is_finite())
                {
                    self.fail(
                        subject,
                        "outlier_detection.latency.multiple",
                        format!("must be at least 1.5, got {multiple}"),
                    );
                }
                self.duration(subject, "outlier_detection.latency.min_latency", latency.min_latency.as_ref(), false);
            }
        }
        if let Some(check) = &cluster.health_check {
            self.duration(subject, "health_check.interval", check.interval.as_ref(), true);
            self.duration(subject, "health_check.timeout", check.timeout.as_ref(), true);
            for (field, value) in [
                ("health_check.healthy_threshold", check.healthy_threshold),
                ("health_check.unhealthy_threshold", check.unhealthy_threshold),
            ] {
                if value == Some(0) {
                    self.fail(subject, field, "must be above zero");
                }
            }
            if let Some(http) = &check.http {
                if !http.path.starts_with('/') {
                    self.fail(subject, "health_check.http.path", format!("must start with '/', got {:?}", http.path));
                } else if http::uri::PathAndQuery::try_from(http.path.as_str()).is_err() {
                    self.fail(subject, "health_check.http.path", format!("{:?} is not a valid path", http.path));
                }
                for (i, status) in http.expected_statuses.iter().enumerate() {
                    if !(100..=599).contains(status) {
                        self.fail(
                            subject,
                            format!("health_check.http.expected_statuses[{i}]"),
                            format!("must be 100 to 599, got {status}"),
                        );
                    }
                }
                if !http.host.is_empty() && http::uri::Authority::try_from(http.host.as_str()).is_err() {
                    self.fail(subject, "health_check.http.host", format!("{:?} is not a host", http.host));
                }
            }
        }
        if let Some(locality) = &cluster.locality_preference
            && let Some(percent) = locality.min_healthy_percent
            && !(1..=100).contains(&percent)
        {
            self.fail(subject, "locality_preference.min_healthy_percent", format!("must be 1 to 100, got {percent}"));
        }
        if let Some(threshold) = cluster.panic_threshold
            && threshold > 100
        {
            self.fail(subject, "panic_threshold", format!("must be 0 to 100, got {threshold}"));
        }
        match v1::cluster::Tls::try_from(cluster.tls) {
            Err(_) => self.fail(subject, "tls", format!("unknown value {}", cluster.tls)),
            Ok(v1::cluster::Tls::None) if !cluster.peer_identities.is_empty() => {
                self.fail(subject, "peer_identities", "applies only to tls: mesh");
            }
            Ok(_) => self.patterns(subject, "peer_identities", &cluster.peer_identities),
        }
        if let Some(service) = &cluster.kubernetes_service {
            if cluster.original_destination {
                self.fail(subject, "kubernetes_service", "an original_destination cluster takes no endpoints");
            }
            for (field, value) in [("namespace", &service.namespace), ("name", &service.name)] {
                if !is_dns_label(value) {
                    let message = format!("must be a Kubernetes name (a DNS label), got {value:?}");
                    self.fail(subject, format!("kubernetes_service.{field}"), message);
                }
            }
            if !service.port.is_empty() && service.port.parse::<u16>().is_err() && !is_dns_label(&service.port) {
                let message = format!("must be a port name or number, got {:?}", service.port);
                self.fail(subject, "kubernetes_service.port", message);
            }
        }
        if cluster.original_destination
            && (cluster.health_check.is_some() || cluster.outlier_detection.is_some() || ring_hash)
        {
            self.fail(
                subject,
                "original_destination",
                "a pass-through cluster has no endpoint set to balance, check or eject; remove balancer ring_hash, health_check and outlier_detection",
            );
        }
    }

    fn endpoints(&mut self, subject: &str, endpoints: &v1::Endpoints, clusters: &HashMap<&str, &v1::Cluster>) {
        match clusters.get(endpoints.cluster.as_str()) {
            None if !endpoints.cluster.is_empty() && self.references == References::Required => {
                self.fail(subject, "cluster", format!("names cluster {:?}, which is not defined", endpoints.cluster));
            }
            Some(cluster) if cluster.original_destination => {
                self.fail(subject, "cluster", "is an original_destination cluster, which takes no endpoints");
            }
            _ => {}
        }
        let mut seen = HashSet::new();
        for (i, endpoint) in endpoints.endpoints.iter().enumerate() {
            match parse_address(&endpoint.address) {
                Err(e) => self.fail(subject, format!("endpoints[{i}].address"), e),
                Ok(address) if !seen.insert(address) => {
                    self.fail(subject, format!("endpoints[{i}].address"), format!("{address} is listed twice"));
                }
                Ok(_) => {}
            }
            if !endpoint.identity.is_empty()
                && let Err(e) = crate::identity::SpiffeId::parse(&endpoint.identity)
            {
                self.fail(subject, format!("endpoints[{i}].identity"), e.to_string());
            }
        }
    }

    fn patterns(&mut self, subject: &str, field: &str, patterns: &[String]) {
        if let Err((i, e)) = crate::identity::parse_patterns(patterns) {
            self.fail(subject, format!("{field}[{i}]"), e.to_string());
        }
    }

    fn authorization(&mut self, subject: &str, policy: &v1::AuthorizationPolicy) {
        if policy.listener.is_empty() {
            self.fail(subject, "listener", "is required");
        }
        if policy.port > u32::from(u16::MAX) {
            self.fail(subject, "port", format!("must be 0 to 65535, got {}", policy.port));
        }
        if v1::authorization_policy::Mode::try_from(policy.mode).is_err() {
            self.fail(subject, "mode", format!("unknown value {}", policy.mode));
        }
        self.patterns(subject, "allow", &policy.allow);
        let mut seen = HashSet::new();
        for (i, route) in policy.routes.iter().enumerate() {
            if route.route_table.is_empty() {
                self.fail(subject, format!("routes[{i}].route_table"), "is required");
            }
            if route.route.is_empty() {
                self.fail(subject, format!("routes[{i}].route"), "is required");
            }
            if !seen.insert((&route.route_table, &route.route)) {
                self.fail(subject, format!("routes[{i}]"), "names the same route as an earlier entry");
            }
            self.patterns(subject, &format!("routes[{i}].allow"), &route.allow);
        }
    }

    /// No two authorization policies may cover the same listener and port.
    fn guarded_ports(&mut self, resources: &[Resource]) {
        let mut owners: HashMap<(&str, u32), &str> = HashMap::new();
        for resource in resources {
            let Resource::AuthorizationPolicy(policy) = resource else { continue };
            if let Some(other) = owners.insert((&policy.listener, policy.port), &policy.name) {
                let port = if policy.port == 0 { "every port".to_owned() } else { format!("port {}", policy.port) };
                self.fail(
                    describe(Kind::AuthorizationPolicy, &policy.name),
                    "port",
                    format!("{port} of listener {:?} is already covered by policy {other:?}", policy.listener),
                );
            }
        }
    }

    /// No destination may be claimed by two route tables, and no listener may serve two catch-alls.
    fn destinations(&mut self, resources: &[Resource]) {
        let mut owners: HashMap<Destination, &str> = HashMap::new();
        let mut catch_alls: Vec<&str> = Vec::new();
        for resource in resources {
            let Resource::RouteTable(table) = resource else { continue };
            let parsed: Vec<Destination> =
                table.destinations.iter().filter_map(|d| Destination::parse(d).ok()).collect();
            if parsed.is_empty() || parsed.contains(&Destination::Any) {
                catch_alls.push(&table.name);
            }
            for destination in parsed {
                if destination == Destination::Any {
                    continue;
                }
                if let Some(other) = owners.insert(destination.clone(), &table.name)
                    && other != table.name
                {
                    self.fail(
                        describe(Kind::RouteTable, &table.name),
                        "destinations",
                        format!("{destination:?} is also claimed by route table {other:?}"),
                    );
                }
            }
        }
        for resource in resources {
            let Resource::Listener(listener) = resource else { continue };
            let served: Vec<&str> = if listener.route_tables.is_empty() {
                catch_alls.clone()
            } else {
                catch_alls.iter().copied().filter(|t| listener.route_tables.iter().any(|r| r == t)).collect()
            };
            if served.len() > 1 {
                self.fail(
                    describe(Kind::Listener, &listener.name),
                    "route_tables",
                    format!(
                        "serves more than one catch-all route table ({}); give all but one of them destinations",
                        served.join(", ")
                    ),
                );
            }
        }
    }
}

/// A Kubernetes object name of the DNS-label kind (namespaces, Services, port names): 1 to 63
/// lowercase letters, digits and `-`, starting and ending with a letter or digit.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::config::parse;

    fn problems(yaml: &str) -> String {
        let file = parse(yaml, "t").unwrap();
        validate(&file.resources).expect_err("set should be invalid").to_string()
    }

    const BASE: &str = r#"
- kind: Cluster
  name: shop
- kind: Endpoints
  cluster: shop
  endpoints: [{address: "127.0.0.1:9000"}]
"#;

    fn with_base(extra: &str) -> String {
        format!("resources:{BASE}{extra}")
    }

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
    }

    #[test]
    fn bad_values_name_their_fields() {
        let text = problems(&with_base(
            r#"
- kind: RouteTable
  name: r
  destinations: ["bad host!"]
  routes:
    - match: {path: {regex: "(unclosed"}}
      backends: [{cluster: shop, weight: 0}]
    - match: {path: {prefix: "no-slash"}}
      backends: []
- kind: Listener
  name: l
  address: localhost:80
  detect_timeout: 0s
"#,
        ));
        for needle in [
            "route table \"r\": destinations[0]:",
            "route table \"r\": routes[0].match.path.regex: is not a valid regex",
            "routes[0].backends: needs at least one backend with a weight above zero",
            "routes[1].match.path: must start with '/'",
            "routes[1].backends: needs at least one cluster",
            "listener \"l\": address: must be ip:port",
            "listener \"l\": detect_timeout: must be greater than zero",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
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

    #[test]
    fn endpoints_must_fit_their_cluster() {
        let text = problems(
            r#"
resources:
- {kind: Cluster, name: pass, original_destination: true}
- {kind: Endpoints, cluster: pass, endpoints: [{address: "127.0.0.1:1"}]}
- {kind: Endpoints, cluster: ghost}
- kind: Cluster
  name: c
- kind: Endpoints
  cluster: c
  endpoints: [{address: "127.0.0.1:1"}, {address: "127.0.0.1:1"}, {address: "nowhere"}]
"#,
        );
        assert!(text.contains("endpoints \"pass\": cluster: is an original_destination cluster"), "{text}");
        assert!(text.contains("endpoints \"ghost\": cluster: names cluster \"ghost\""), "{text}");
        assert!(text.contains("endpoints \"c\": endpoints[1].address: 127.0.0.1:1 is listed twice"), "{text}");
        assert!(text.contains("endpoints \"c\": endpoints[2].address: must be ip:port"), "{text}");
    }

    #[test]
    fn mesh_settings_and_authorization_policies_are_checked() {
        let text = problems(
            r#"
resources:
- {kind: Cluster, name: plain, peer_identities: ["spiffe://td/a"]}
- {kind: Cluster, name: mesh, tls: mesh, peer_identities: ["spiffe://td/ok/*", "web"]}
- {kind: Endpoints, cluster: mesh, endpoints: [{address: "127.0.0.1:1", identity: "spiffe://TD/x"}]}
- {kind: AuthorizationPolicy, name: a, listener: in, allow: ["spiffe://td/ns/*"]}
- {kind: AuthorizationPolicy, name: b, listener: in, mode: permissive}
- {kind: AuthorizationPolicy, name: c, port: 70000, allow: ["nope"], routes: [{route_table: t, route: r}, {route_table: t, route: r}, {route: x}]}
"#,
        );
        for expected in [
            r#"cluster "plain": peer_identities: applies only to tls: mesh"#,
            r#"cluster "mesh": peer_identities[1]: "web" is not a SPIFFE ID"#,
            r#"endpoints "mesh": endpoints[0].identity: "spiffe://TD/x""#,
            r#"authorization policy "b": port: every port of listener "in" is already covered by policy "a""#,
            r#"authorization policy "c": listener: is required"#,
            r#"authorization policy "c": port: must be 0 to 65535"#,
            r#"authorization policy "c": allow[0]: "nope" is not a SPIFFE ID"#,
            r#"authorization policy "c": routes[1]: names the same route"#,
            r#"authorization policy "c": routes[2].route_table: is required"#,
        ] {
            assert!(text.contains(expected), "{expected} not in {text}");
        }
    }

    #[test]
    fn destinations_normalise() {
        assert_eq!(Destination::parse("Shop.Svc").unwrap(), Destination::Host("shop.svc".into()));
        assert_eq!(Destination::parse("shop:80").unwrap(), Destination::HostPort("shop".into(), 80));
        assert_eq!(Destination::parse("*.Svc").unwrap(), Destination::Suffix(".svc".into()));
        assert_eq!(Destination::parse("[::1]:80").unwrap(), Destination::Address("[::1]:80".parse().unwrap()));
        assert_eq!(Destination::parse("*").unwrap(), Destination::Any);
        assert!(Destination::parse("shop:http").is_err());
        assert!(Destination::parse("").is_err());
    }

    #[test]
    fn bootstrap_is_checked() {
        let log = v1::AccessLog { path: "stdout".into(), success_sampling_ratio: Some(1.5), ..Default::default() };
        let bad =
            v1::Bootstrap { admin_address: "nope".into(), workers: 5000, access_log: Some(log), ..Default::default() };
        let text = validate_bootstrap(&bad).unwrap_err().to_string();
        assert!(text.contains("bootstrap: admin_address: must be ip:port"), "{text}");
        assert!(text.contains("bootstrap: workers: must be at most 1024"), "{text}");
        assert!(text.contains("bootstrap: access_log.success_sampling_ratio: must be from 0 to 1, got 1.5"), "{text}");
    }
}
