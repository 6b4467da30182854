//! The small parsers shared by validation and the proxy, so that what validates is exactly what runs:
//! socket addresses, durations, route-table destinations, route regexes, control-plane URLs, how a
//! redirect or rewrite replaces a path; and the retry conditions and limits a route may ask for.

use std::net::SocketAddr;
use std::time::Duration;

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

/// How a redirect or a rewrite replaces a request's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathReplacement<'a> {
    /// The whole path, by this.
    Full(&'a str),
    /// The part the route's prefix match matched, by this.
    Prefix(&'a str),
}

impl PathReplacement<'_> {
    /// The name of the field that says it (`full_path`, `prefix`).
    pub fn field(&self) -> &'static str {
        match self {
            PathReplacement::Full(_) => "full_path",
            PathReplacement::Prefix(_) => "prefix",
        }
    }
}

impl crate::v1::Redirect {
    /// How it replaces the path, if it does.
    pub fn path_replacement(&self) -> Option<PathReplacement<'_>> {
        use crate::v1::redirect::Path;
        self.path.as_ref().map(|path| match path {
            Path::FullPath(p) => PathReplacement::Full(p),
            Path::Prefix(p) => PathReplacement::Prefix(p),
        })
    }
}

impl crate::v1::Rewrite {
    /// How it replaces the path, if it does.
    pub fn path_replacement(&self) -> Option<PathReplacement<'_>> {
        use crate::v1::rewrite::Path;
        self.path.as_ref().map(|path| match path {
            Path::FullPath(p) => PathReplacement::Full(p),
            Path::Prefix(p) => PathReplacement::Prefix(p),
        })
    }
}

impl crate::v1::RouteMatch {
    /// The prefix its path match matches (`prefix` or `segment_prefix`), if it is one: what a
    /// [`PathReplacement::Prefix`] replaces.
    pub fn matched_prefix(&self) -> Option<&str> {
        use crate::v1::path_match::Kind;
        match self.path.as_ref()?.kind.as_ref()? {
            Kind::Prefix(prefix) | Kind::SegmentPrefix(prefix) => Some(prefix),
            _ => None,
        }
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
pub(super) fn is_token(name: &str) -> bool {
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

/// A Kubernetes object name of the DNS-label kind (namespaces, Services, port names): 1 to 63
/// lowercase letters, digits and `-`, starting and ending with a letter or digit.
pub fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

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
}
