//! Route tables: destinations, matches (regexes, methods, header and query names), backends, and
//! each route's policy (timeouts, retries, faults, mirrors, rate limits, fallbacks) and filters
//! (header modifiers, redirects, rewrites); and across the set, no destination claimed by two
//! tables.

use std::collections::HashMap;
use std::time::Duration;

use super::{
    Checker, Destination, MAX_REPLAY_BUFFER, MAX_RETRIES, PathReplacement, RETRY_ON, compile_regex, duration, is_token,
};

/// Whether `host` can be a URL's host: a DNS name (letters, digits, `-`, `.`) or an IP address.
fn is_host(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_ok()
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            }))
}
use crate::resource::{Kind, Resource, describe};
use crate::v1;

impl Checker {
    pub(super) fn route_table(
        &mut self,
        subject: &str,
        table: &v1::RouteTable,
        clusters: &HashMap<&str, &v1::Cluster>,
    ) {
        for (i, destination) in table.destinations.iter().enumerate() {
            if let Err(e) = Destination::parse(destination) {
                self.fail(subject, format!("destinations[{i}]"), e);
            }
        }
        if !table.tcp_cluster.is_empty() {
            self.cluster_ref(subject, "tcp_cluster", &table.tcp_cluster, clusters);
        }
        if table.opaque && table.tcp_cluster.is_empty() {
            self.fail(subject, "opaque", "needs tcp_cluster: the connections it makes opaque must go somewhere");
        }
        for (i, route) in table.routes.iter().enumerate() {
            let at = |field: &str| format!("routes[{i}].{field}");
            if let Some(matcher) = &route.r#match {
                if let Some(path) = matcher.path.as_ref().and_then(|p| p.kind.as_ref()) {
                    use v1::path_match::Kind as P;
                    match path {
                        P::Exact(p) | P::Prefix(p) | P::SegmentPrefix(p) if !p.starts_with('/') => {
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
            if let Some(modifier) = &route.request_headers {
                self.header_modifier(subject, &at("request_headers"), modifier);
            }
            if let Some(modifier) = &route.response_headers {
                self.header_modifier(subject, &at("response_headers"), modifier);
            }
            let prefix_matched = route.r#match.as_ref().and_then(v1::RouteMatch::matched_prefix).is_some();
            if let Some(redirect) = &route.redirect {
                self.redirect(subject, &at("redirect"), redirect, prefix_matched);
            }
            if let Some(rewrite) = &route.rewrite {
                if !rewrite.host.is_empty() && !is_host(&rewrite.host) {
                    self.fail(subject, at("rewrite.host"), format!("{:?} is not a host name", rewrite.host));
                }
                if let Some(path) = rewrite.path_replacement() {
                    self.replacement_path(subject, &at(&format!("rewrite.{}", path.field())), path, prefix_matched);
                }
            }
            if route.redirect.is_some() {
                // A redirect answers every request itself: backends, if any, are never used.
            } else if route.backends.is_empty() {
                self.fail(subject, at("backends"), "needs at least one cluster");
            } else if route.backends.iter().all(|b| b.weight == Some(0)) {
                self.fail(subject, at("backends"), "needs at least one backend with a weight above zero");
            }
            for (j, backend) in route.backends.iter().enumerate() {
                self.cluster_ref(subject, &at(&format!("backends[{j}].cluster")), &backend.cluster, clusters);
                if let Some(modifier) = &backend.request_headers {
                    self.header_modifier(subject, &at(&format!("backends[{j}].request_headers")), modifier);
                }
                if let Some(modifier) = &backend.response_headers {
                    self.header_modifier(subject, &at(&format!("backends[{j}].response_headers")), modifier);
                }
            }
        }
    }

    /// Header names that are tokens (and not pseudo-headers or `host`, which a rewrite changes), and
    /// values a header may carry.
    fn header_modifier(&mut self, subject: &str, at: &str, modifier: &v1::HeaderModifier) {
        for (list, headers) in [("set", &modifier.set), ("add", &modifier.add)] {
            for (i, header) in headers.iter().enumerate() {
                let at = format!("{at}.{list}[{i}]");
                if self.modified_header(subject, &format!("{at}.name"), &header.name)
                    && http::HeaderValue::from_str(&header.value).is_err()
                {
                    self.fail(subject, format!("{at}.value"), "is not a valid header value");
                }
            }
        }
        for (i, name) in modifier.remove.iter().enumerate() {
            self.modified_header(subject, &format!("{at}.remove[{i}]"), name);
        }
    }

    /// Whether a header modifier may change header `name`: a token, and not `host`.
    fn modified_header(&mut self, subject: &str, field: &str, name: &str) -> bool {
        if !is_token(name) {
            self.fail(subject, field, format!("{name:?} is not a header name"));
            false
        } else if name.eq_ignore_ascii_case("host") {
            self.fail(subject, field, "the host is changed by a rewrite, not a header modifier");
            false
        } else {
            true
        }
    }

    /// A redirect's scheme, host, port, path and status; a prefix replacement needs a prefix match.
    fn redirect(&mut self, subject: &str, at: &str, redirect: &v1::Redirect, prefix_matched: bool) {
        if !matches!(redirect.scheme.as_str(), "" | "http" | "https") {
            self.fail(subject, format!("{at}.scheme"), format!("must be http or https, got {:?}", redirect.scheme));
        }
        if !redirect.host.is_empty() && !is_host(&redirect.host) {
            self.fail(subject, format!("{at}.host"), format!("{:?} is not a host name", redirect.host));
        }
        if let Some(port) = redirect.port
            && !(1..=65535).contains(&port)
        {
            self.fail(subject, format!("{at}.port"), format!("must be 1 to 65535, got {port}"));
        }
        if let Some(path) = redirect.path_replacement() {
            self.replacement_path(subject, &format!("{at}.{}", path.field()), path, prefix_matched);
        }
        if !matches!(redirect.status, 0 | 301 | 302 | 303 | 307 | 308) {
            self.fail(
                subject,
                format!("{at}.status"),
                format!("must be 301, 302, 303, 307 or 308, got {}", redirect.status),
            );
        }
    }

    /// A path that replaces another: absolute, and a prefix replacement needs a prefix match
    /// (`prefix_matched`) to have a matched part to replace.
    fn replacement_path(&mut self, subject: &str, at: &str, path: PathReplacement<'_>, prefix_matched: bool) {
        let (PathReplacement::Full(text) | PathReplacement::Prefix(text)) = path;
        if !text.starts_with('/') {
            self.fail(subject, at.to_owned(), format!("must start with '/', got {text:?}"));
        } else if http::uri::PathAndQuery::try_from(text).map_or(true, |p| p.query().is_some()) {
            self.fail(subject, at.to_owned(), format!("{text:?} is not a path"));
        } else if matches!(path, PathReplacement::Prefix(_)) && !prefix_matched {
            self.fail(
                subject,
                at.to_owned(),
                "replaces the matched prefix: the route needs a prefix or segment_prefix path match",
            );
        }
    }

    pub(super) fn retry(&mut self, subject: &str, at: &str, retry: &v1::RetryPolicy) {
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

    /// No destination may be claimed by two route tables that serve the same direction, and no
    /// listener may serve two catch-alls.
    pub(super) fn destinations(&mut self, resources: &[&Resource]) {
        let mut owners: HashMap<(Destination, Side), &str> = HashMap::new();
        let mut catch_alls: Vec<(&str, &[Side])> = Vec::new();
        for resource in resources {
            let Resource::RouteTable(table) = resource else { continue };
            let sides = sides(table.direction());
            let parsed: Vec<Destination> =
                table.destinations.iter().filter_map(|d| Destination::parse(d).ok()).collect();
            if parsed.is_empty() || parsed.contains(&Destination::Any) {
                catch_alls.push((&table.name, sides));
            }
            for destination in parsed {
                if destination == Destination::Any {
                    continue;
                }
                for side in sides {
                    if let Some(other) = owners.insert((destination.clone(), *side), &table.name)
                        && other != table.name
                    {
                        self.fail(
                            describe(Kind::RouteTable, &table.name),
                            "destinations",
                            format!("{destination:?} is also claimed by route table {other:?}"),
                        );
                        break;
                    }
                }
            }
        }
        for resource in resources {
            let Resource::Listener(listener) = resource else { continue };
            let side = match listener.direction() {
                v1::listener::Direction::Outbound => Side::Outbound,
                v1::listener::Direction::Inbound => Side::Inbound,
            };
            let served: Vec<&str> = catch_alls
                .iter()
                .filter(|(_, sides)| sides.contains(&side))
                .map(|(name, _)| *name)
                .filter(|t| listener.route_tables.is_empty() || listener.route_tables.iter().any(|r| r == t))
                .collect();
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

/// A direction of listeners, for telling which tables meet on one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Side {
    Outbound,
    Inbound,
}

/// The directions of the listeners a table with `direction` is served on.
fn sides(direction: v1::route_table::Direction) -> &'static [Side] {
    match direction {
        v1::route_table::Direction::Any => &[Side::Outbound, Side::Inbound],
        v1::route_table::Direction::Outbound => &[Side::Outbound],
        v1::route_table::Direction::Inbound => &[Side::Inbound],
    }
}
