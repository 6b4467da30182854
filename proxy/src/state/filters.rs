//! A route's filters, compiled: header modifiers (a route's and a backend's, on the request and on
//! the response), redirects the proxy answers itself, and rewrites of the forwarded URL.
//!
//! Compiled from a `Route` (and its `WeightedCluster`s) when a snapshot is built; the data path
//! applies them to a request's head while routing it (`http::route`) and to the response head
//! before it leaves. Everything here is a pure function of the compiled filter and the head it is
//! given: no I/O, nothing that can fail on a request (header names and values were checked when
//! the snapshot was built).

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HOST, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{HeaderMap, StatusCode};
use remora_control_api::config::Invalid;
use remora_control_api::v1;
use remora_control_api::validate::PathReplacement;

/// Changes to a head's headers: set, then add, then remove.
#[derive(Debug, Default)]
pub struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderModifier {
    /// Compiles `modifier`; `None` when it changes nothing.
    pub fn compile(modifier: Option<&v1::HeaderModifier>) -> Result<Option<Arc<HeaderModifier>>, Invalid> {
        let Some(modifier) = modifier else { return Ok(None) };
        let pairs = |list: &[v1::Header], field: &str| {
            list.iter()
                .enumerate()
                .map(|(i, header)| {
                    let name = header_name(&header.name, &format!("{field}[{i}].name"))?;
                    let value = HeaderValue::from_str(&header.value)
                        .map_err(|_| Invalid::new(format!("{field}[{i}].value"), "is not a valid header value"))?;
                    Ok((name, value))
                })
                .collect::<Result<Vec<_>, Invalid>>()
        };
        let compiled = HeaderModifier {
            set: pairs(&modifier.set, "set")?,
            add: pairs(&modifier.add, "add")?,
            remove: modifier
                .remove
                .iter()
                .enumerate()
                .map(|(i, name)| header_name(name, &format!("remove[{i}]")))
                .collect::<Result<_, _>>()?,
        };
        let empty = compiled.set.is_empty() && compiled.add.is_empty() && compiled.remove.is_empty();
        Ok((!empty).then(|| Arc::new(compiled)))
    }

    /// Applies the changes to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

fn header_name(name: &str, field: &str) -> Result<HeaderName, Invalid> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| Invalid::new(field, format!("{name:?} is not a header name")))
}

/// How a path is replaced.
#[derive(Debug)]
enum PathChange {
    /// The whole path.
    Full(String),
    /// The part the route's prefix match matched (`matched`, a trailing `/` taken off unless it is
    /// all) replaced by `with`.
    Prefix { matched: String, with: String },
}

impl PathChange {
    /// The change `replacement` asks for, on a route whose path match matches the prefix
    /// `matched` (if it is a prefix match).
    fn compile(replacement: Option<PathReplacement<'_>>, matched: Option<&str>) -> Result<Option<PathChange>, Invalid> {
        match replacement {
            None => Ok(None),
            Some(PathReplacement::Full(full)) => Ok(Some(PathChange::Full(full.to_owned()))),
            Some(PathReplacement::Prefix(with)) => {
                let matched = matched.ok_or_else(|| {
                    Invalid::new(
                        "prefix",
                        "replaces the matched prefix: the route needs a prefix or segment_prefix path match",
                    )
                })?;
                Ok(Some(PathChange::Prefix { matched: trim_slash(matched).to_owned(), with: with.to_owned() }))
            }
        }
    }

    /// `path` changed. A prefix replacement keeps what followed the matched part, with one `/`
    /// between them (`/strip` replaced by `/` makes `/strip/a` `/a` and `/strip` `/`).
    fn apply(&self, path: &str) -> String {
        match self {
            PathChange::Full(full) => full.clone(),
            PathChange::Prefix { matched, with } => {
                let rest = if matched == "/" { path } else { path.strip_prefix(matched.as_str()).unwrap_or("") };
                let with = if rest.starts_with('/') { with.trim_end_matches('/') } else { with.as_str() };
                let changed = format!("{with}{rest}");
                if changed.is_empty() { "/".to_owned() } else { changed }
            }
        }
    }
}

/// `prefix` without a trailing `/`, unless it is `/` alone.
pub(crate) fn trim_slash(prefix: &str) -> &str {
    match prefix.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    }
}

/// `uri` with its path changed by `change`, its query kept.
fn with_path(uri: &Uri, change: &PathChange) -> Option<PathAndQuery> {
    let path = change.apply(uri.path());
    let changed = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    PathAndQuery::try_from(changed).ok()
}

/// A redirect the proxy answers.
#[derive(Debug)]
pub struct Redirect {
    scheme: Option<&'static str>,
    host: Option<String>,
    port: Option<u16>,
    path: Option<PathChange>,
    /// The status of the answer.
    pub status: StatusCode,
}

impl Redirect {
    /// The `Location` for a request for `uri` with `authority` (its Host), sent to
    /// `original_destination`: see `v1::Redirect`.
    pub fn location(&self, uri: &Uri, authority: Option<&str>, original_destination: Option<SocketAddr>) -> String {
        let scheme = self.scheme.unwrap_or(match uri.scheme_str() {
            Some("https") => "https",
            _ => "http",
        });
        let (request_host, request_port) = authority.map_or(("", None), split_host_port);
        let host = self.host.as_deref().unwrap_or(request_host);
        let port = match (self.port, self.scheme) {
            (Some(port), _) => Some(port),
            (None, Some(_)) => None,
            (None, None) => request_port.or(original_destination.map(|d| d.port())),
        };
        let well_known = if scheme == "https" { 443 } else { 80 };
        let port = port.filter(|p| *p != well_known).map(|p| format!(":{p}")).unwrap_or_default();
        let path = match &self.path {
            Some(change) => with_path(uri, change).map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            None => uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        };
        format!("{scheme}://{host}{port}{path}")
    }
}

/// The host and port of an authority (`host`, `host:port`, `[v6]:port`).
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    let port_at = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => Some(i),
        _ => None,
    };
    match port_at {
        Some(i) => (&authority[..i], authority[i + 1..].parse().ok()),
        None => (authority, None),
    }
}

/// How a forwarded request's URL is rewritten.
#[derive(Debug)]
pub struct Rewrite {
    host: Option<HeaderValue>,
    path: Option<PathChange>,
}

impl Rewrite {
    /// Rewrites the request's host and path.
    pub fn apply<B>(&self, request: &mut http::Request<B>) {
        if let Some(host) = &self.host {
            request.headers_mut().insert(HOST, host.clone());
            if let Some(authority) = request.uri().authority() {
                let port = authority.port_u16();
                let host = host.to_str().unwrap_or_default();
                let authority = match port {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_owned(),
                };
                let mut parts = request.uri().clone().into_parts();
                parts.authority = authority.parse().ok();
                if let Ok(uri) = Uri::from_parts(parts) {
                    *request.uri_mut() = uri;
                }
            }
        }
        if let Some(change) = &self.path
            && let Some(path) = with_path(request.uri(), change)
        {
            let mut parts = request.uri().clone().into_parts();
            parts.path_and_query = Some(path);
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
}

/// What a route does to requests besides choosing a backend.
#[derive(Debug, Default)]
pub struct RouteFilters {
    /// Changes to the request's headers.
    pub request_headers: Option<Arc<HeaderModifier>>,
    /// Changes to the response's headers.
    pub response_headers: Option<Arc<HeaderModifier>>,
    /// The redirect that answers every request, if the route redirects.
    pub redirect: Option<Redirect>,
    /// The rewrite of forwarded requests.
    pub rewrite: Option<Rewrite>,
}

impl RouteFilters {
    /// Compiles `route`'s filters; `None` when it has none.
    pub fn compile(route: &v1::Route) -> Result<Option<Box<RouteFilters>>, Invalid> {
        let matched = route.r#match.as_ref().and_then(v1::RouteMatch::matched_prefix);
        let redirect = match &route.redirect {
            None => None,
            Some(redirect) => {
                let status = match redirect.status {
                    0 => StatusCode::FOUND,
                    code @ (301 | 302 | 303 | 307 | 308) => StatusCode::from_u16(code as u16)
                        .map_err(|_| Invalid::new("redirect.status", format!("{code} is not a redirect")))?,
                    code => return Err(Invalid::new("redirect.status", format!("{code} is not a redirect"))),
                };
                Some(Redirect {
                    scheme: match redirect.scheme.as_str() {
                        "" => None,
                        "http" => Some("http"),
                        "https" => Some("https"),
                        other => {
                            return Err(Invalid::new("redirect.scheme", format!("{other:?} is not http or https")));
                        }
                    },
                    host: (!redirect.host.is_empty()).then(|| redirect.host.clone()),
                    port: redirect
                        .port
                        .map(|p| {
                            u16::try_from(p).map_err(|_| Invalid::new("redirect.port", format!("{p} is not a port")))
                        })
                        .transpose()?,
                    path: PathChange::compile(redirect.path_replacement(), matched)
                        .map_err(|e| e.within("redirect"))?,
                    status,
                })
            }
        };
        let rewrite = match &route.rewrite {
            None => None,
            Some(rewrite) => {
                let host = match rewrite.host.as_str() {
                    "" => None,
                    host => Some(
                        HeaderValue::from_str(host)
                            .map_err(|_| Invalid::new("rewrite.host", format!("{host:?} is not a host")))?,
                    ),
                };
                Some(Rewrite {
                    host,
                    path: PathChange::compile(rewrite.path_replacement(), matched).map_err(|e| e.within("rewrite"))?,
                })
            }
        };
        let filters = RouteFilters {
            request_headers: HeaderModifier::compile(route.request_headers.as_deref())
                .map_err(|e| e.within("request_headers"))?,
            response_headers: HeaderModifier::compile(route.response_headers.as_deref())
                .map_err(|e| e.within("response_headers"))?,
            redirect,
            rewrite,
        };
        let none = filters.request_headers.is_none()
            && filters.response_headers.is_none()
            && filters.redirect.is_none()
            && filters.rewrite.is_none();
        Ok((!none).then(|| Box::new(filters)))
    }
}

/// A backend's own header changes, after the route's.
#[derive(Debug, Default)]
pub struct BackendFilters {
    /// Changes to the headers of requests sent to it.
    pub request_headers: Option<Arc<HeaderModifier>>,
    /// Changes to the headers of its responses.
    pub response_headers: Option<Arc<HeaderModifier>>,
}

impl BackendFilters {
    /// Compiles `backend`'s filters; `None` when it has none.
    pub fn compile(backend: &v1::WeightedCluster) -> Result<Option<Box<BackendFilters>>, Invalid> {
        let filters = BackendFilters {
            request_headers: HeaderModifier::compile(backend.request_headers.as_deref())
                .map_err(|e| e.within("request_headers"))?,
            response_headers: HeaderModifier::compile(backend.response_headers.as_deref())
                .map_err(|e| e.within("response_headers"))?,
        };
        let none = filters.request_headers.is_none() && filters.response_headers.is_none();
        Ok((!none).then(|| Box::new(filters)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn prefix(matched: &str, with: &str) -> PathChange {
        PathChange::Prefix { matched: trim_slash(matched).to_owned(), with: with.to_owned() }
    }

    /// A prefix replacement keeps the rest of the path with one `/` between, as Gateway API's
    /// conformance cases expect.
    #[test]
    fn prefix_replacements_keep_the_rest_of_the_path() {
        assert_eq!(prefix("/prefix/one", "/one").apply("/prefix/one/two"), "/one/two");
        assert_eq!(prefix("/strip-prefix", "/").apply("/strip-prefix/three"), "/three");
        assert_eq!(prefix("/strip-prefix", "/").apply("/strip-prefix"), "/");
        assert_eq!(
            prefix("/original-prefix", "/replacement-prefix").apply("/original-prefix/lemon"),
            "/replacement-prefix/lemon"
        );
        assert_eq!(prefix("/path-and-host", "/replacement-prefix").apply("/path-and-host"), "/replacement-prefix");
        assert_eq!(prefix("/a/", "/b").apply("/a/c"), "/b/c");
        assert_eq!(prefix("/", "/api").apply("/x/y"), "/api/x/y");
        assert_eq!(PathChange::Full("/one".into()).apply("/full/one/two"), "/one");
    }

    fn redirect(scheme: Option<&'static str>, host: Option<&str>, port: Option<u16>) -> Redirect {
        Redirect { scheme, host: host.map(str::to_owned), port, path: None, status: StatusCode::FOUND }
    }

    /// The Location keeps what the redirect does not replace; a port is left out where it is the
    /// scheme's well-known one, and a new scheme brings its own port.
    #[test]
    fn locations_replace_only_what_the_redirect_names() {
        let uri: Uri = "/a?b=1".parse().unwrap();
        let to = Some("10.96.0.1:80".parse().unwrap());
        assert_eq!(redirect(None, None, None).location(&uri, Some("echo"), to), "http://echo/a?b=1");
        assert_eq!(redirect(None, None, None).location(&uri, Some("echo:8080"), to), "http://echo:8080/a?b=1");
        assert_eq!(redirect(Some("https"), None, None).location(&uri, Some("echo:8080"), to), "https://echo/a?b=1");
        assert_eq!(
            redirect(None, Some("example.org"), Some(8443)).location(&uri, Some("echo"), to),
            "http://example.org:8443/a?b=1"
        );
        assert_eq!(
            redirect(Some("https"), None, Some(443)).location(&uri, Some("[::1]:80"), to),
            "https://[::1]/a?b=1"
        );
        let moved = Redirect { path: Some(prefix("/a", "/z")), ..redirect(None, None, None) };
        assert_eq!(moved.location(&uri, Some("echo"), None), "http://echo/z?b=1");
    }

    /// A modifier sets (replacing every value), adds (beside the values there) and removes.
    #[test]
    fn header_modifiers_set_add_and_remove() {
        let modifier = v1::HeaderModifier {
            set: vec![v1::Header { name: "X-Set".into(), value: "new".into() }],
            add: vec![v1::Header { name: "x-add".into(), value: "two".into() }],
            remove: vec!["X-Gone".into()],
        };
        let modifier = HeaderModifier::compile(Some(&modifier)).unwrap().unwrap();
        let mut headers = HeaderMap::new();
        headers.append("x-set", HeaderValue::from_static("a"));
        headers.append("x-set", HeaderValue::from_static("b"));
        headers.insert("x-add", HeaderValue::from_static("one"));
        headers.insert("x-gone", HeaderValue::from_static("bye"));
        modifier.apply(&mut headers);
        assert_eq!(headers.get_all("x-set").iter().collect::<Vec<_>>(), ["new"]);
        assert_eq!(headers.get_all("x-add").iter().collect::<Vec<_>>(), ["one", "two"]);
        assert!(!headers.contains_key("x-gone"));
        assert!(HeaderModifier::compile(Some(&v1::HeaderModifier::default())).unwrap().is_none());
    }

    /// A rewrite changes the Host (and an absolute URI's authority, keeping its port) and the path,
    /// keeping the query.
    #[test]
    fn rewrites_change_host_and_path() {
        let rewrite = Rewrite { host: Some(HeaderValue::from_static("other")), path: Some(prefix("/a", "/b")) };
        let mut request = http::Request::get("http://echo:8080/a/c?q=1").header("host", "echo:8080").body(()).unwrap();
        rewrite.apply(&mut request);
        assert_eq!(request.uri().to_string(), "http://other:8080/b/c?q=1");
        assert_eq!(request.headers()["host"], "other");
    }
}
