//! Gateway API routes for the mesh (GAMMA): `HTTPRoute`s and `GRPCRoute`s whose `parentRefs` name a
//! Service, read from their JSON ([`Route::read`]) and made into the routes of that Service's route
//! tables ([`attached`]).
//!
//! A route attaches to every TCP port of each Service it names, or to the one port its parentRef
//! gives. A route in the Service's own namespace is a producer route: every caller follows it. A
//! route in another namespace is a consumer route: only that namespace's callers follow it, and for
//! them it takes the place of the producer's. Where routes attach to a port, they are its routes:
//! a request none of their rules matches gets 404 (Gateway API's rule), not the Service.
//!
//! A GRPCRoute's method match becomes a path match: service and method, the exact path
//! `/SERVICE/METHOD`; a service alone, the whole-segment prefix `/SERVICE`; a method alone, or a
//! `RegularExpression` match, a regular expression over both segments. It takes the header filters
//! and RequestMirror (GRPCRoute has no redirect or rewrite).
//!
//! Each match of each rule becomes one Remora route, ordered by Gateway API's precedence across
//! every attached route: an exact path first, then a regular expression, then a path prefix, the
//! longer first; then a method, then more header matches, then more query matches; ties go to the
//! older route (`creationTimestamp`), then to `namespace/name` in order, then to rule and match
//! order. (Gateway API leaves where regular expressions rank to each implementation; Remora ranks
//! them as Envoy Gateway does.) A path prefix matches whole segments (`segment_prefix`).
//!
//! Filters map onto Remora's: RequestHeaderModifier and ResponseHeaderModifier (on a rule or a
//! backendRef), RequestRedirect, URLRewrite and RequestMirror (one per rule); an HTTPRoute rule's
//! `timeouts` and `retry` onto the route's timeout and retry policy. A backendRef names a
//! Service and port: its cluster is that port's (the automatic one, or the operator's cluster that
//! names it). A backendRef to a Service or port that does not exist, or to another namespace than
//! the route's that no ReferenceGrant there opens to the route (the parent Service itself needs
//! none), is left out; a rule left with no backend answers 500. A route that cannot be read (an unsupported filter, a bad value the CRD's validation would
//! refuse) is applied nowhere, and the reason is logged when it is read.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use serde_json::Value;

use remora_control_api::validate::{self, References};
use remora_control_api::{Resource, v1};

/// The API group of Gateway API.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// The kinds of route read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// `HTTPRoute`.
    Http,
    /// `GRPCRoute`.
    Grpc,
}

impl RouteKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

/// An HTTPRoute or a GRPCRoute, as the mesh needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// Which kind it is.
    pub kind: RouteKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its `creationTimestamp` (RFC 3339, which sorts as time; empty when not told).
    pub created: String,
    /// The Services it attaches to.
    pub parents: Vec<ParentRef>,
    /// Its rules, or why it cannot be applied.
    pub rules: Result<Vec<Rule>, String>,
}

/// A parentRef naming a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ParentRef {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The one port attached, if it says.
    pub port: Option<u16>,
}

/// One rule of a route, read.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// Its name, or its index.
    pub name: String,
    /// Its matches (a rule without any matches every request: a path prefix of `/`).
    pub matches: Vec<v1::RouteMatch>,
    /// Its filters, as a Remora route carries them (no backends yet).
    pub filters: v1::Route,
    /// The Service its RequestMirror copies to, and the share.
    pub mirror: Option<(BackendRef, Option<f64>)>,
    /// Its backendRefs.
    pub backends: Vec<BackendRef>,
}

/// A backendRef: a Service port, its weight and its own header filters.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendRef {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The Service's port.
    pub port: u16,
    /// Its share (default 1).
    pub weight: u32,
    /// Its RequestHeaderModifier and ResponseHeaderModifier.
    pub filters: v1::WeightedCluster,
}

impl Route {
    /// Reads a route of `kind`; `None` when it has no name (nothing to refer to it by).
    pub fn read(kind: RouteKind, object: &Value) -> Option<Route> {
        let metadata = &object["metadata"];
        let name = metadata["name"].as_str()?.to_owned();
        let namespace = metadata["namespace"].as_str().unwrap_or("default").to_owned();
        let created = metadata["creationTimestamp"].as_str().unwrap_or_default().to_owned();
        let spec = &object["spec"];
        let parents = list(&spec["parentRefs"])
            .filter(|parent| {
                parent["kind"].as_str() == Some("Service")
                    && matches!(parent["group"].as_str(), Some("" | "core") | None)
            })
            .filter_map(|parent| {
                Some(ParentRef {
                    namespace: parent["namespace"].as_str().unwrap_or(&namespace).to_owned(),
                    name: parent["name"].as_str()?.to_owned(),
                    port: parent["port"].as_u64().and_then(|p| u16::try_from(p).ok()),
                })
            })
            .collect();
        let rules = list(&spec["rules"])
            .enumerate()
            .map(|(i, rule)| read_rule(kind, i, rule, &namespace).and_then(|read| checked(i, read)))
            .collect();
        Some(Route { kind, namespace, name, created, parents, rules })
    }

    /// Whether the route attaches to `port` of Service `namespace/name`.
    pub fn attaches(&self, namespace: &str, name: &str, port: u16) -> bool {
        self.parents.iter().any(|p| p.namespace == namespace && p.name == name && p.port.is_none_or(|p| p == port))
    }

    /// The Services its backendRefs (and mirrors) name.
    pub fn backend_services(&self) -> impl Iterator<Item = (&str, &str)> {
        let rules = self.rules.as_deref().unwrap_or_default();
        rules.iter().flat_map(|rule| {
            let mirror = rule.mirror.as_ref().map(|(b, _)| b);
            rule.backends.iter().chain(mirror).map(|b| (b.namespace.as_str(), b.name.as_str()))
        })
    }
}

/// A ReferenceGrant: which routes of other namespaces may send to Services of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceGrant {
    /// Its namespace (the Services').
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `(group, kind, namespace)` of the referrers it admits.
    pub from: Vec<(String, String, String)>,
    /// `(group, kind, name)` of what may be referred to (no name: every one of the kind).
    pub to: Vec<(String, String, Option<String>)>,
}

impl ReferenceGrant {
    /// Reads a ReferenceGrant object; `None` when it has no name.
    pub fn read(object: &Value) -> Option<ReferenceGrant> {
        let metadata = &object["metadata"];
        let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
        Some(ReferenceGrant {
            namespace: metadata["namespace"].as_str().unwrap_or("default").to_owned(),
            name: metadata["name"].as_str()?.to_owned(),
            from: list(&object["spec"]["from"])
                .map(|f| (text(&f["group"]), text(&f["kind"]), text(&f["namespace"])))
                .collect(),
            to: list(&object["spec"]["to"])
                .map(|t| (text(&t["group"]), text(&t["kind"]), t["name"].as_str().map(str::to_owned)))
                .collect(),
        })
    }

    /// Whether it lets `route` send to Service `name` of its namespace.
    pub fn admits(&self, route: &Route, name: &str) -> bool {
        let from = self.from.iter().any(|(group, kind, namespace)| {
            group == GROUP && kind == route.kind.as_str() && *namespace == route.namespace
        });
        let to = self.to.iter().any(|(group, kind, named)| {
            matches!(group.as_str(), "" | "core") && kind == "Service" && named.as_deref().is_none_or(|n| n == name)
        });
        from && to
    }
}

/// The items of a JSON list (none when it is not one).
fn list(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

fn read_rule(kind: RouteKind, index: usize, rule: &Value, namespace: &str) -> Result<Rule, String> {
    let name = rule["name"].as_str().map_or_else(|| index.to_string(), str::to_owned);
    let at = format!("rules[{index}]");
    let read_match = |spec: &Value| match kind {
        RouteKind::Http => read_match(spec),
        RouteKind::Grpc => read_grpc_match(spec),
    };
    let mut matches = list(&rule["matches"])
        .enumerate()
        .map(|(j, m)| read_match(m).map_err(|e| format!("{at}.matches[{j}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if matches.is_empty() {
        matches.push(read_match(&Value::Null)?);
    }
    let mut filters = v1::Route::default();
    let mut mirror = None;
    for (j, filter) in list(&rule["filters"]).enumerate() {
        let at = format!("{at}.filters[{j}]");
        match filter["type"].as_str().unwrap_or_default() {
            "RequestHeaderModifier" => {
                filters.request_headers = Some(Box::new(header_modifier(&filter["requestHeaderModifier"])));
            }
            "ResponseHeaderModifier" => {
                filters.response_headers = Some(Box::new(header_modifier(&filter["responseHeaderModifier"])));
            }
            "RequestRedirect" | "URLRewrite" if kind == RouteKind::Grpc => {
                return Err(format!("{at}: a GRPCRoute has no {} filter", filter["type"].as_str().unwrap_or_default()));
            }
            "RequestRedirect" => {
                filters.redirect =
                    Some(Box::new(redirect(&filter["requestRedirect"]).map_err(|e| format!("{at}: {e}"))?))
            }
            "URLRewrite" => {
                filters.rewrite = Some(Box::new(rewrite(&filter["urlRewrite"]).map_err(|e| format!("{at}: {e}"))?))
            }
            "RequestMirror" if mirror.is_some() => {
                return Err(format!("{at}: one RequestMirror per rule is supported"));
            }
            "RequestMirror" => {
                let spec = &filter["requestMirror"];
                let backend =
                    backend_ref(&spec["backendRef"], namespace).map_err(|e| format!("{at}.backendRef: {e}"))?;
                let percent = match (spec["percent"].as_f64(), &spec["fraction"]) {
                    (Some(percent), _) => Some(percent),
                    (None, Value::Object(fraction)) => {
                        let numerator = fraction.get("numerator").and_then(Value::as_f64).unwrap_or(0.0);
                        let denominator = fraction.get("denominator").and_then(Value::as_f64).unwrap_or(100.0);
                        (denominator > 0.0).then(|| 100.0 * numerator / denominator)
                    }
                    _ => None,
                };
                mirror = Some((backend, percent));
            }
            other => return Err(format!("{at}: filter type {other:?} is not supported")),
        }
    }
    use remora_control_api::validate::PathReplacement;
    let replaces_prefix = [
        filters.redirect.as_deref().and_then(v1::Redirect::path_replacement),
        filters.rewrite.as_deref().and_then(v1::Rewrite::path_replacement),
    ]
    .into_iter()
    .any(|path| matches!(path, Some(PathReplacement::Prefix(_))));
    if replaces_prefix && !matches.iter().all(|m| m.matched_prefix().is_some()) {
        return Err(format!("{at}: ReplacePrefixMatch needs every match to be a PathPrefix"));
    }
    if filters.redirect.is_some() && filters.rewrite.is_some() {
        return Err(format!("{at}: RequestRedirect and URLRewrite cannot be used together"));
    }
    if kind == RouteKind::Http {
        timeouts_and_retry(rule, &mut filters).map_err(|e| format!("{at}.{e}"))?;
    }
    let backends = list(&rule["backendRefs"])
        .enumerate()
        .map(|(j, backend)| {
            let at = format!("{at}.backendRefs[{j}]");
            let mut read = backend_ref(backend, namespace).map_err(|e| format!("{at}: {e}"))?;
            for (k, filter) in list(&backend["filters"]).enumerate() {
                match filter["type"].as_str().unwrap_or_default() {
                    "RequestHeaderModifier" => {
                        read.filters.request_headers =
                            Some(Box::new(header_modifier(&filter["requestHeaderModifier"])));
                    }
                    "ResponseHeaderModifier" => {
                        read.filters.response_headers =
                            Some(Box::new(header_modifier(&filter["responseHeaderModifier"])));
                    }
                    other => {
                        return Err(format!(
                            "{at}.filters[{k}]: filter type {other:?} is not supported on a backendRef"
                        ));
                    }
                }
            }
            Ok(read)
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Rule { name, matches, filters, mirror, backends })
}

/// `rule` (the `index`th), if the routes it makes pass the proxies' own validation (what a CRD's
/// rules would refuse, and more): a route a proxy would refuse is not published at all.
fn checked(index: usize, rule: Rule) -> Result<Rule, String> {
    let routes = rule
        .matches
        .iter()
        .map(|matcher| v1::Route {
            r#match: Some(matcher.clone()),
            backends: vec![v1::WeightedCluster { cluster: "backend".into(), ..Default::default() }],
            ..rule.filters.clone()
        })
        .collect();
    let table = v1::RouteTable { name: "route".into(), routes, ..Default::default() };
    match validate::validate_with(&[Resource::RouteTable(table)], References::Pending) {
        Ok(()) => Ok(rule),
        Err(errors) => {
            let problems: Vec<String> = errors
                .0
                .iter()
                .map(|e| {
                    // `routes[J].FIELD`: the J-th match of this rule.
                    let field = e.field.split_once('.').map_or(e.field.as_str(), |(_, field)| field);
                    format!("rules[{index}].{field}: {}", e.message)
                })
                .collect();
            Err(problems.join("; "))
        }
    }
}

/// A GRPCRoute match: its method match as a path match (see the module documentation), its
/// headers.
fn read_grpc_match(spec: &Value) -> Result<v1::RouteMatch, String> {
    use v1::path_match::Kind as P;
    let method = &spec["method"];
    let (service, name) =
        (method["service"].as_str().unwrap_or_default(), method["method"].as_str().unwrap_or_default());
    let path = match method["type"].as_str().unwrap_or("Exact") {
        "Exact" => match (service, name) {
            ("", "") => P::SegmentPrefix("/".to_owned()),
            (service, "") => P::SegmentPrefix(format!("/{service}")),
            ("", name) => P::Regex(format!("/[^/]+/{}", regex::escape(name))),
            (service, name) => P::Exact(format!("/{service}/{name}")),
        },
        "RegularExpression" => {
            let part = |p: &str| if p.is_empty() { "[^/]+".to_owned() } else { format!("(?:{p})") };
            P::Regex(format!("/{}/{}", part(service), part(name)))
        }
        other => return Err(format!("method match type {other:?} is not supported")),
    };
    use v1::header_match::Kind as H;
    let headers = value_matches(&spec["headers"], "header", H::Exact, H::Regex)?
        .into_iter()
        .map(|(name, kind)| v1::HeaderMatch { name, kind: Some(kind) })
        .collect();
    Ok(v1::RouteMatch { path: Some(v1::PathMatch { kind: Some(path) }), headers, ..Default::default() })
}

fn read_match(spec: &Value) -> Result<v1::RouteMatch, String> {
    use v1::path_match::Kind as P;
    let path = &spec["path"];
    let value = path["value"].as_str().unwrap_or("/").to_owned();
    let kind = match path["type"].as_str().unwrap_or("PathPrefix") {
        "Exact" => P::Exact(value.clone()),
        "PathPrefix" => P::SegmentPrefix(value.clone()),
        "RegularExpression" => P::Regex(value.clone()),
        other => return Err(format!("path type {other:?} is not supported")),
    };
    if !matches!(kind, P::Regex(_)) && !value.starts_with('/') {
        return Err(format!("path {value:?} must start with '/'"));
    }
    let method = spec["method"].as_str().unwrap_or_default().to_owned();
    use v1::{header_match::Kind as H, query_match::Kind as Q};
    let headers = value_matches(&spec["headers"], "header", H::Exact, H::Regex)?
        .into_iter()
        .map(|(name, kind)| v1::HeaderMatch { name, kind: Some(kind) })
        .collect();
    let query = value_matches(&spec["queryParams"], "query", Q::Exact, Q::Regex)?
        .into_iter()
        .map(|(name, kind)| v1::QueryMatch { name, kind: Some(kind) })
        .collect();
    Ok(v1::RouteMatch { path: Some(v1::PathMatch { kind: Some(kind) }), method, headers, query })
}

/// A rule's `timeouts` (GEP-1742) and `retry` (GEP-1731) as the route's `timeout` and retry
/// policy: `request` bounds the whole request, `backendRequest` each attempt; `retry` retries
/// `attempts` times (connect failures, refused streams, and the `codes` given), waiting a random
/// time up to `backoff` doubling. A zero duration is no limit.
fn timeouts_and_retry(rule: &Value, route: &mut v1::Route) -> Result<(), String> {
    let timeouts = &rule["timeouts"];
    let duration = |field: &str, value: &Value| -> Result<Option<pbjson_types::Duration>, String> {
        let Some(text) = value.as_str() else { return Ok(None) };
        let parsed =
            gateway_duration(text).ok_or_else(|| format!("{field}: {text:?} is not a Gateway API duration"))?;
        Ok((!parsed.is_zero()).then(|| pbjson_types::Duration {
            seconds: i64::try_from(parsed.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(parsed.subsec_nanos()).unwrap_or(0),
        }))
    };
    route.timeout = duration("timeouts.request", &timeouts["request"])?;
    let per_try = duration("timeouts.backendRequest", &timeouts["backendRequest"])?;
    let retry = &rule["retry"];
    if retry.is_null() && per_try.is_none() {
        return Ok(());
    }
    let codes: Vec<u32> =
        list(&retry["codes"]).filter_map(Value::as_u64).filter_map(|c| u32::try_from(c).ok()).collect();
    let attempts = match retry["attempts"].as_u64() {
        Some(attempts) => u32::try_from(attempts).unwrap_or(u32::MAX),
        // A per-attempt limit alone: one attempt, limited.
        None if retry.is_null() => 0,
        None => 2,
    };
    let mut retry_on: Vec<String> = vec!["connect-failure".into(), "refused-stream".into()];
    if !codes.is_empty() {
        retry_on.push("retriable-status-codes".into());
    }
    route.retry = Some(Box::new(v1::RetryPolicy {
        attempts: Some(attempts),
        retry_on,
        retriable_status_codes: codes,
        per_try_timeout: per_try,
        backoff_base: duration("retry.backoff", &retry["backoff"])?,
        ..Default::default()
    }));
    Ok(())
}

/// A Gateway API duration (GEP-2257): one or more of a number and a unit, `h`, `m`, `s` or `ms`
/// (`1h30m`, `500ms`, `0s`).
fn gateway_duration(text: &str) -> Option<std::time::Duration> {
    let mut total = std::time::Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let number: u64 = rest.get(..digits)?.parse().ok()?;
        rest = &rest[digits..];
        let (unit, after) = if let Some(after) = rest.strip_prefix("ms") {
            (std::time::Duration::from_millis(1), after)
        } else if let Some(after) = rest.strip_prefix('h') {
            (std::time::Duration::from_secs(3600), after)
        } else if let Some(after) = rest.strip_prefix('m') {
            (std::time::Duration::from_secs(60), after)
        } else if let Some(after) = rest.strip_prefix('s') {
            (std::time::Duration::from_secs(1), after)
        } else {
            return None;
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(number).ok()?)?)?;
        rest = after;
    }
    Some(total)
}

/// Header or query parameter matches (`what`): each name, with its value made `exact` or `regex`
/// by its type.
fn value_matches<K>(
    spec: &Value,
    what: &str,
    exact: fn(String) -> K,
    regex: fn(String) -> K,
) -> Result<Vec<(String, K)>, String> {
    list(spec)
        .map(|item| {
            let value = item["value"].as_str().unwrap_or_default().to_owned();
            let kind = match item["type"].as_str().unwrap_or("Exact") {
                "Exact" => exact(value),
                "RegularExpression" => regex(value),
                other => return Err(format!("{what} match type {other:?} is not supported")),
            };
            Ok((item["name"].as_str().unwrap_or_default().to_owned(), kind))
        })
        .collect()
}

/// An HTTPPathModifier: the whole path (`full`) or the matched prefix (`prefix`) replaced.
fn path_modifier<P>(spec: &Value, full: fn(String) -> P, prefix: fn(String) -> P) -> Result<Option<P>, String> {
    let value = |field: &str| spec[field].as_str().unwrap_or("/").to_owned();
    match spec["type"].as_str() {
        None => Ok(None),
        Some("ReplaceFullPath") => Ok(Some(full(value("replaceFullPath")))),
        Some("ReplacePrefixMatch") => Ok(Some(prefix(value("replacePrefixMatch")))),
        Some(other) => Err(format!("path type {other:?} is not supported")),
    }
}

/// A header modifier as read; its names and values are checked with the rest of the rule.
fn header_modifier(spec: &Value) -> v1::HeaderModifier {
    let headers = |list_of: &Value| {
        list(list_of)
            .map(|h| v1::Header {
                name: h["name"].as_str().unwrap_or_default().to_owned(),
                value: h["value"].as_str().unwrap_or_default().to_owned(),
            })
            .collect::<Vec<_>>()
    };
    v1::HeaderModifier {
        set: headers(&spec["set"]),
        add: headers(&spec["add"]),
        remove: list(&spec["remove"]).filter_map(Value::as_str).map(str::to_owned).collect(),
    }
}

fn redirect(spec: &Value) -> Result<v1::Redirect, String> {
    use v1::redirect::Path;
    let path = path_modifier(&spec["path"], Path::FullPath, Path::Prefix)?;
    Ok(v1::Redirect {
        scheme: spec["scheme"].as_str().unwrap_or_default().to_owned(),
        host: spec["hostname"].as_str().unwrap_or_default().to_owned(),
        port: spec["port"].as_u64().map(|p| u32::try_from(p).unwrap_or(u32::MAX)),
        path,
        status: spec["statusCode"].as_u64().map_or(302, |s| u32::try_from(s).unwrap_or(0)),
    })
}

fn rewrite(spec: &Value) -> Result<v1::Rewrite, String> {
    use v1::rewrite::Path;
    let path = path_modifier(&spec["path"], Path::FullPath, Path::Prefix)?;
    Ok(v1::Rewrite { host: spec["hostname"].as_str().unwrap_or_default().to_owned(), path })
}

fn backend_ref(spec: &Value, namespace: &str) -> Result<BackendRef, String> {
    if !matches!(spec["kind"].as_str(), None | Some("Service"))
        || !matches!(spec["group"].as_str(), None | Some("" | "core"))
    {
        return Err("only Services can be backends".to_owned());
    }
    let name = spec["name"].as_str().ok_or("needs a name")?.to_owned();
    let port = spec["port"].as_u64().and_then(|p| u16::try_from(p).ok()).ok_or("a Service backend needs a port")?;
    let weight =
        spec["weight"].as_u64().map_or(Ok(1), u32::try_from).map_err(|_| "weight is out of range".to_owned())?;
    Ok(BackendRef {
        namespace: spec["namespace"].as_str().unwrap_or(namespace).to_owned(),
        name,
        port,
        weight,
        filters: v1::WeightedCluster::default(),
    })
}

/// The routes the HTTPRoutes attached to one Service port make: the producer's, if any, and each
/// consumer namespace's own.
#[derive(Debug, Default)]
pub(super) struct Attached {
    /// The routes of producer routes (every caller's), if any attach.
    pub producer: Option<Vec<v1::Route>>,
    /// Per consumer namespace, the routes of its routes.
    pub consumers: BTreeMap<String, Vec<v1::Route>>,
}

/// The routes `routes` (those attached to `port` of Service `namespace/name`) make: see the module
/// documentation. `cluster` names the cluster a route's backendRef sends to, `None` when there is
/// no such Service port or the route may not send there; `own` is the attached port's own cluster
/// (where a rule with no backend left is answered 500).
pub(super) fn attached<'a>(
    routes: impl Iterator<Item = &'a Route>,
    (namespace, name, port): (&str, &str, u16),
    own: &str,
    cluster: &dyn Fn(&Route, &BackendRef) -> Option<String>,
) -> Attached {
    let mut producer = Vec::new();
    let mut consumers: BTreeMap<&str, Vec<(Precedence<'a>, v1::Route)>> = BTreeMap::new();
    for route in routes.filter(|r| r.attaches(namespace, name, port)) {
        let Ok(rules) = &route.rules else { continue };
        let made = made_routes(route, rules, own, cluster);
        if route.namespace == namespace {
            producer.extend(made);
        } else {
            consumers.entry(&route.namespace).or_default().extend(made);
        }
    }
    let ordered = |mut made: Vec<(Precedence<'a>, v1::Route)>| {
        made.sort_by(|a, b| a.0.cmp(&b.0));
        made.into_iter().map(|(_, route)| route).collect::<Vec<_>>()
    };
    Attached {
        producer: (!producer.is_empty()).then(|| ordered(producer)),
        consumers: consumers.into_iter().map(|(ns, made)| (ns.to_owned(), ordered(made))).collect(),
    }
}

/// Where a match ranks (lower first): see the module documentation.
type Precedence<'a> =
    (u8, Reverse<usize>, Reverse<bool>, Reverse<usize>, Reverse<usize>, &'a str, &'a str, &'a str, usize, usize);

/// The Remora routes of one HTTPRoute's rules, each with its precedence.
fn made_routes<'a>(
    route: &'a Route,
    rules: &'a [Rule],
    own: &str,
    cluster: &dyn Fn(&Route, &BackendRef) -> Option<String>,
) -> Vec<(Precedence<'a>, v1::Route)> {
    let mut made = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let resolve = |b: &BackendRef| cluster(route, b);
        let mut backends: Vec<v1::WeightedCluster> = rule
            .backends
            .iter()
            .filter_map(|b| {
                Some(v1::WeightedCluster { cluster: resolve(b)?, weight: Some(b.weight), ..b.filters.clone() })
            })
            .collect();
        let mut base = rule.filters.clone();
        base.name = format!("{}/{}#{}", route.namespace, route.name, rule.name);
        base.mirror = rule
            .mirror
            .as_ref()
            .and_then(|(b, percent)| Some(Box::new(v1::Mirror { cluster: resolve(b)?, percent: *percent })));
        if base.redirect.is_none() && !backends.iter().any(|b| b.weight != Some(0)) {
            // No backend to send to: Gateway API's answer is 500.
            backends = vec![v1::WeightedCluster { cluster: own.to_owned(), ..Default::default() }];
            base.fault = Some(Box::new(v1::Fault {
                abort: Some(v1::FaultAbort { percent: 100.0, status: 500 }),
                ..Default::default()
            }));
        }
        base.backends = backends;
        for (j, matcher) in rule.matches.iter().enumerate() {
            use v1::path_match::Kind as P;
            let (rank, length) = match matcher.path.as_ref().and_then(|p| p.kind.as_ref()) {
                Some(P::Exact(p)) => (0, p.len()),
                Some(P::Regex(p)) => (1, p.len()),
                Some(P::SegmentPrefix(p) | P::Prefix(p)) => (2, p.len()),
                None => (2, 1),
            };
            let precedence = (
                rank,
                Reverse(length),
                Reverse(!matcher.method.is_empty()),
                Reverse(matcher.headers.len()),
                Reverse(matcher.query.len()),
                // An unknown creation time sorts last (as the newest).
                if route.created.is_empty() { "~" } else { route.created.as_str() },
                route.namespace.as_str(),
                route.name.as_str(),
                i,
                j,
            );
            let mut one = base.clone();
            one.r#match = Some(matcher.clone());
            made.push((precedence, one));
        }
    }
    made
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::mesh::{Objects, Settings, resources};
    use remora_control_api::Kind;

    fn service(name: &str, ip: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "mesh", "name": name},
               "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}, {"name": "alt", "port": 8080}]}})
    }

    fn route(namespace: &str, name: &str, created: &str, spec: Value) -> Value {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"namespace": namespace, "name": name, "creationTimestamp": created}, "spec": spec})
    }

    fn objects(routes: &[Value]) -> Objects {
        let mut all =
            vec![service("echo", "10.96.0.10"), service("echo-v1", "10.96.0.11"), service("echo-v2", "10.96.0.12")];
        all.extend(routes.iter().cloned());
        Objects::read("cluster.local", &all)
    }

    fn table<'a>(resources: &'a [Resource], name: &str) -> &'a v1::RouteTable {
        resources
            .iter()
            .find_map(|r| match r {
                Resource::RouteTable(t) if t.name == name => Some(t),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no table {name}"))
    }

    fn names(table: &v1::RouteTable) -> Vec<(&str, String)> {
        table
            .routes
            .iter()
            .map(|r| {
                let path = r.r#match.as_ref().and_then(|m| m.path.as_ref()).and_then(|p| p.kind.as_ref());
                (r.name.as_str(), format!("{path:?}"))
            })
            .collect()
    }

    /// A producer route's rules become the attached port's routes, each match one route, in
    /// Gateway API's precedence across routes (exact, then longer prefixes, then more headers;
    /// the older route first), with its filters, weighted backends (their clusters by Service and
    /// port) and their own filters; the port it does not attach to keeps its plain route.
    #[test]
    fn producer_routes_become_the_ports_routes_in_precedence_order() {
        let newer = route(
            "mesh",
            "newer",
            "2026-01-02T00:00:00Z",
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
                "rules": [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}, {"headers": [{"name": "version", "value": "two"}]}],
                     "backendRefs": [{"name": "echo-v2", "port": 8080}]},
                    {"matches": [{"path": {"type": "Exact", "value": "/exact"}}],
                     "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "b"}]}}],
                     "backendRefs": [{"name": "echo-v1", "port": 80, "weight": 3,
                                      "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-b", "value": "1"}]}}]},
                                     {"name": "echo-v2", "port": 80, "weight": 1}]}]
            }),
        );
        let older = route(
            "mesh",
            "older",
            "2026-01-01T00:00:00Z",
            json!({
                "parentRefs": [{"kind": "Service", "name": "echo"}],
                "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                           "filters": [{"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/two"}, "statusCode": 301}}]}]
            }),
        );
        let made = resources(&objects(&[newer, older]), &[], &Settings::default()).shared;
        let echo = table(&made, "mesh/echo:80");
        assert_eq!(
            names(echo),
            [
                ("mesh/newer#1", r#"Some(Exact("/exact"))"#.to_owned()),
                ("mesh/older#0", r#"Some(SegmentPrefix("/v2"))"#.to_owned()),
                ("mesh/newer#0", r#"Some(SegmentPrefix("/v2"))"#.to_owned()),
                ("mesh/newer#0", r#"Some(SegmentPrefix("/"))"#.to_owned()),
            ]
        );
        let exact = &echo.routes[0];
        assert_eq!(exact.request_headers.as_ref().unwrap().set[0].name, "x-a");
        let backends: Vec<(&str, Option<u32>, bool)> =
            exact.backends.iter().map(|b| (b.cluster.as_str(), b.weight, b.response_headers.is_some())).collect();
        assert_eq!(backends, [("mesh/echo-v1:80", Some(3), true), ("mesh/echo-v2:80", Some(1), false)]);
        let redirect = &echo.routes[1];
        assert!(redirect.backends.is_empty() && redirect.redirect.as_ref().unwrap().status == 301);
        assert_eq!(echo.routes[3].r#match.as_ref().unwrap().headers[0].name, "version");
        // The older route attaches to every port, the newer to 80 alone.
        assert_eq!(
            names(table(&made, "mesh/echo:8080")),
            [("mesh/older#0", r#"Some(SegmentPrefix("/v2"))"#.to_owned())]
        );
        // Untouched Services keep their plain route.
        assert_eq!(table(&made, "mesh/echo-v1:80").routes[0].backends[0].cluster, "mesh/echo-v1:80");
        remora_control_api::validate::validate(&made).unwrap();
    }

    /// A consumer route (in another namespace) is its namespace's own view of the Service's table;
    /// the shared table stays. A backend that does not exist leaves its rule answering 500; a
    /// route with an unsupported filter is applied nowhere.
    #[test]
    fn consumer_routes_missing_backends_and_unreadable_routes() {
        let consumer = route(
            "client",
            "mine",
            "",
            json!({
                "parentRefs": [{"kind": "Service", "namespace": "mesh", "name": "echo-v1"}],
                "rules": [{"filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-header-set", "value": "set"}]}}],
                           "backendRefs": [{"name": "echo-v1", "namespace": "mesh", "port": 80}]}]
            }),
        );
        let missing = route(
            "mesh",
            "missing",
            "",
            json!({
                "parentRefs": [{"kind": "Service", "name": "echo-v2", "port": 80}],
                "rules": [{"backendRefs": [{"name": "nowhere", "port": 80}, {"name": "echo", "port": 9999}]}]
            }),
        );
        let unsupported = route(
            "mesh",
            "odd",
            "",
            json!({
                "parentRefs": [{"kind": "Service", "name": "echo"}],
                "rules": [{"filters": [{"type": "ExtensionRef", "extensionRef": {"name": "x"}}], "backendRefs": [{"name": "echo", "port": 80}]}]
            }),
        );
        let objects = objects(&[consumer, missing, unsupported]);
        assert!(
            objects.routes[&("mesh".into(), RouteKind::Http, "odd".into())]
                .rules
                .as_ref()
                .unwrap_err()
                .contains("ExtensionRef")
        );
        let made = resources(&objects, &[], &Settings::default());
        let shared = table(&made.shared, "mesh/echo-v1:80");
        assert!(shared.routes[0].response_headers.is_none(), "callers elsewhere are not changed");
        let client = table(&made.scoped["client"], "mesh/echo-v1:80");
        assert_eq!(client.routes[0].response_headers.as_ref().unwrap().set[0].value, "set");
        assert_eq!(client.routes[0].backends[0].cluster, "mesh/echo-v1:80");
        assert!(made.scoped["client"].iter().all(|r| r.kind() == Kind::RouteTable));
        let broken = &table(&made.shared, "mesh/echo-v2:80").routes[0];
        assert_eq!(broken.fault.as_ref().unwrap().abort.as_ref().unwrap().status, 500);
        assert_eq!(names(table(&made.shared, "mesh/echo:80")).len(), 1, "the unreadable route changed nothing");
        remora_control_api::validate::validate(&made.shared).unwrap();
    }

    /// What the CRD's validation (or the proxies') would refuse is refused when the route is read,
    /// naming the rule and field.
    #[test]
    fn bad_values_are_refused_when_read() {
        let bad = route(
            "mesh",
            "bad",
            "",
            json!({
                "parentRefs": [{"kind": "Service", "name": "echo"}],
                "rules": [
                    {"backendRefs": [{"name": "echo", "port": 80}]},
                    {"matches": [{"path": {"type": "RegularExpression", "value": "(unclosed"}}], "backendRefs": [{"name": "echo", "port": 80}]},
                ]
            }),
        );
        let read = Route::read(RouteKind::Http, &bad).unwrap();
        let problem = read.rules.unwrap_err();
        assert!(problem.starts_with("rules[1].match.path.regex:"), "{problem}");
        let exact_with_prefix = route(
            "mesh",
            "bad",
            "",
            json!({
                "parentRefs": [{"kind": "Service", "name": "echo"}],
                "rules": [{"matches": [{"path": {"type": "Exact", "value": "/a"}}],
                           "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}}}],
                           "backendRefs": [{"name": "echo", "port": 80}]}]
            }),
        );
        assert!(
            Route::read(RouteKind::Http, &exact_with_prefix).unwrap().rules.unwrap_err().contains("ReplacePrefixMatch")
        );
    }

    /// Routes coming, changing and going, and a backend Service appearing after the route that
    /// names it, remake what making everything whole makes.
    #[test]
    fn route_changes_remake_what_the_whole_objects_make() {
        use crate::mesh::Mesh;
        let settings = Settings::default();
        let mut objects = objects(&[]);
        let mut mesh = Mesh::make(&objects, &[], &settings);
        objects.take_changes();
        let mut check = |objects: &mut Objects| {
            let changes = objects.take_changes();
            assert!(!changes.all);
            mesh.remake(objects, &[], &settings, &changes);
            assert_eq!(mesh.made(), Mesh::make(objects, &[], &settings).made());
        };
        let to_later = |weight: u32| {
            route(
                "mesh",
                "r",
                "",
                json!({
                    "parentRefs": [{"kind": "Service", "name": "echo"}],
                    "rules": [{"backendRefs": [{"name": "later", "port": 80, "weight": weight}, {"name": "echo-v1", "port": 80}]}]
                }),
            )
        };
        objects.apply(&to_later(1));
        check(&mut objects);
        objects.apply(&to_later(5));
        check(&mut objects);
        let mut later = service("later", "10.96.0.13");
        objects.apply(&later);
        check(&mut objects);
        later["spec"]["ports"] = json!([{"port": 81}]);
        objects.apply(&later);
        check(&mut objects);
        objects.delete(&to_later(5));
        check(&mut objects);
        assert!(objects.routes.is_empty());
    }

    /// A GRPCRoute's method matches become path matches (service and method exact, a service's
    /// every method, a method of any service, regular expressions) beside its header matches; a
    /// backend that does not exist with weight 0 is left out; an HTTPRoute of the same name is
    /// another route.
    #[test]
    fn grpc_routes_match_services_and_methods() {
        let grpc = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"namespace": "mesh", "name": "r"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "echo", "port": 8080}],
                     "rules": [
                        {"matches": [{"method": {"service": "echo.Echo", "method": "Get"}},
                                     {"method": {"service": "echo.Echo"}, "headers": [{"name": "x-test-case", "value": "set"}]},
                                     {"method": {"method": "Put"}},
                                     {"method": {"type": "RegularExpression", "service": "echo\\..*", "method": "L.*"}}],
                         "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-header-set", "value": "v"}]}}],
                         "backendRefs": [{"name": "echo-v1", "port": 8080, "weight": 70}, {"name": "echo-v2", "port": 8080, "weight": 30},
                                         {"name": "echo-v3", "port": 8080, "weight": 0}]}]}});
        let http = route(
            "mesh",
            "r",
            "",
            json!({"parentRefs": [{"kind": "Service", "name": "echo", "port": 80}],
                                                  "rules": [{"backendRefs": [{"name": "echo-v1", "port": 80}]}]}),
        );
        let objects = objects(&[grpc, http]);
        assert_eq!(objects.routes.len(), 2);
        let made = resources(&objects, &[], &Settings::default()).shared;
        let echo = table(&made, "mesh/echo:8080");
        assert_eq!(
            names(echo).into_iter().map(|(_, path)| path).collect::<Vec<_>>(),
            [
                r#"Some(Exact("/echo.Echo/Get"))"#,
                r#"Some(Regex("/(?:echo\\..*)/(?:L.*)"))"#,
                r#"Some(Regex("/[^/]+/Put"))"#,
                r#"Some(SegmentPrefix("/echo.Echo"))"#,
            ]
        );
        let backends: Vec<(&str, Option<u32>)> =
            echo.routes[0].backends.iter().map(|b| (b.cluster.as_str(), b.weight)).collect();
        assert_eq!(backends, [("mesh/echo-v1:8080", Some(70)), ("mesh/echo-v2:8080", Some(30))]);
        assert_eq!(echo.routes[3].r#match.as_ref().unwrap().headers[0].name, "x-test-case");
        assert_eq!(table(&made, "mesh/echo:80").routes[0].backends[0].cluster, "mesh/echo-v1:80");
        remora_control_api::validate::validate(&made).unwrap();
        let redirecting = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"namespace": "mesh", "name": "bad"},
            "spec": {"rules": [{"filters": [{"type": "RequestRedirect", "requestRedirect": {"hostname": "x"}}]}]}});
        assert!(Route::read(RouteKind::Grpc, &redirecting).unwrap().rules.unwrap_err().contains("no RequestRedirect"));
    }

    /// A rule's `timeouts` and `retry` become the route's timeout and retry policy; a zero duration
    /// is no limit; a bad duration or too many attempts refuse the route.
    #[test]
    fn timeouts_and_retries_map_onto_the_route() {
        let with = |rule: Value| {
            let object = json!({"metadata": {"namespace": "mesh", "name": "r"},
                                "spec": {"parentRefs": [{"kind": "Service", "name": "echo"}],
                                         "rules": [rule]}});
            Route::read(RouteKind::Http, &object).unwrap().rules.map(|mut rules| rules.remove(0).filters)
        };
        let backend = json!([{"name": "echo", "port": 80}]);
        let both = with(json!({"timeouts": {"request": "10s", "backendRequest": "1m500ms"},
                               "retry": {"codes": [503, 504], "attempts": 3, "backoff": "100ms"}, "backendRefs": backend}))
        .unwrap();
        assert_eq!(both.timeout.unwrap().seconds, 10);
        let retry = both.retry.unwrap();
        assert_eq!(retry.attempts, Some(3));
        assert_eq!(retry.retriable_status_codes, [503, 504]);
        assert_eq!(retry.retry_on, ["connect-failure", "refused-stream", "retriable-status-codes"]);
        let per_try = retry.per_try_timeout.unwrap();
        assert_eq!((per_try.seconds, per_try.nanos), (60, 500_000_000));
        assert_eq!(retry.backoff_base.unwrap().nanos, 100_000_000);
        let alone =
            with(json!({"timeouts": {"request": "0s", "backendRequest": "2s"}, "backendRefs": backend})).unwrap();
        assert!(alone.timeout.is_none(), "0s is no limit");
        assert_eq!(alone.retry.unwrap().attempts, Some(0), "a per-attempt limit alone: one attempt");
        assert!(
            with(json!({"timeouts": {"request": "10x"}, "backendRefs": backend}))
                .unwrap_err()
                .contains("timeouts.request")
        );
        assert!(
            with(json!({"retry": {"attempts": 50}, "backendRefs": backend})).unwrap_err().contains("retry.attempts")
        );
        assert!(with(json!({"backendRefs": backend})).unwrap().retry.is_none());
    }

    /// A backendRef to another namespace's Service is left out (its rule answers 500, its status
    /// RefNotPermitted) until a ReferenceGrant there admits the route's kind and namespace.
    #[test]
    fn reference_grants_open_services_to_other_namespaces() {
        let consumer = route(
            "client",
            "mine",
            "",
            json!({
                "parentRefs": [{"kind": "Service", "namespace": "mesh", "name": "echo"}],
                "rules": [{"backendRefs": [{"name": "echo-v2", "namespace": "mesh", "port": 80}]}]
            }),
        );
        let grant = |kind: &str| {
            json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
                   "metadata": {"namespace": "mesh", "name": "from-client"},
                   "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": kind, "namespace": "client"}],
                            "to": [{"group": "", "kind": "Service", "name": "echo-v2"}]}})
        };
        let backend_of = |objects: &Objects| {
            let made = resources(objects, &[], &Settings::default());
            let route = &table(&made.scoped["client"], "mesh/echo:80").routes[0];
            (route.backends[0].cluster.clone(), route.fault.is_some())
        };
        let resolved = |objects: &Objects| {
            let route = objects.routes.values().next().unwrap();
            crate::mesh::status::conditions(objects, route)[0].1[1].reason
        };
        let mut objects = objects(&[consumer]);
        assert_eq!(backend_of(&objects), ("mesh/echo:80".to_owned(), true), "left out: the rule answers 500");
        assert_eq!(resolved(&objects), "RefNotPermitted");
        objects.apply(&grant("GRPCRoute"));
        assert_eq!(resolved(&objects), "RefNotPermitted", "a grant for another kind");
        objects.apply(&grant("HTTPRoute"));
        assert!(objects.take_changes().all, "a grant makes everything again");
        assert_eq!(backend_of(&objects), ("mesh/echo-v2:80".to_owned(), false));
        assert_eq!(resolved(&objects), "ResolvedRefs");
    }
}
