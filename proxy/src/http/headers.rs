//! Header hygiene: what a proxy must remove, keep or rewrite as a message crosses it.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection, not the message, and must not be
//! forwarded: `Connection` and every header it names, `Keep-Alive`, `Proxy-Connection`,
//! `Transfer-Encoding` (hyper frames the body itself), `Upgrade` (except while relaying an upgrade),
//! and `TE` except its one end-to-end value, `trailers`, which gRPC needs. HTTP/2 forbids them
//! outright (RFC 9113 §8.2.2), so stripping is also what lets an HTTP/1.1 response go out on HTTP/2.
//!
//! [`prepare_request`] also reshapes the request for the upstream's version: HTTP/1.1 wants an
//! origin-form target and a `Host` header, HTTP/2 an absolute target whose authority becomes
//! `:authority`. All edits are in place on the request's own header map: no copies.

use std::net::SocketAddr;

use http::header::{CONNECTION, HOST, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Uri, Version};

use crate::http::client;

/// On an HBONE `CONNECT` a Remora sidecar sends: `tcp` when what rides is opaque TCP (the
/// receiving HBONE listener then relays it unread instead of classifying its first bytes).
pub static TUNNEL_PROTOCOL: HeaderName = HeaderName::from_static("x-remora-tunnel-protocol");

/// The header an inbound sidecar gives the app: the caller's SPIFFE ID, proven by mTLS. Removed from
/// every other inbound request, so an app can trust it (Linkerd's `l5d-client-id`).
pub static CLIENT_IDENTITY: HeaderName = HeaderName::from_static("x-remora-client-identity");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The `CONNECT endpoint` that opens a tunnel to `endpoint` (HBONE, over TCP or QUIC). For `opaque`
/// TCP, `x-remora-tunnel-protocol: tcp` says what rides, so the receiving sidecar need not look;
/// HTTP goes without it, and a Remora sidecar receiving it serves it through its inbound pipeline.
pub fn tunnel_connect(endpoint: SocketAddr, opaque: bool) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = http::Method::CONNECT;
    // `ip:port` is always an authority-form target.
    if let Ok(target) = Uri::from_maybe_shared(bytes::Bytes::from(endpoint.to_string())) {
        *request.uri_mut() = target;
    }
    if opaque {
        request.headers_mut().insert(TUNNEL_PROTOCOL.clone(), HeaderValue::from_static("tcp"));
    }
    request
}

/// The authority a request is addressed to: the target's (HTTP/2 `:authority`, or an absolute-form
/// HTTP/1 target), else the `Host` header.
pub fn authority<B>(request: &Request<B>) -> Option<&str> {
    request
        .uri()
        .authority()
        .map(Authority::as_str)
        .or_else(|| request.headers().get(HOST).and_then(|h| h.to_str().ok()))
}

/// Whether an HTTP/1.1 request asks to switch protocols (`Connection: upgrade` plus `Upgrade`), as
/// WebSocket does.
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(UPGRADE)
        && connection_has(request.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The hop-by-hop headers a message carries, found in one scan of its header names.
#[derive(Clone, Copy, Debug, Default)]
struct HopByHop {
    connection: bool,
    keep_alive: bool,
    proxy_connection: bool,
    transfer_encoding: bool,
    upgrade: bool,
    te: bool,
}

impl HopByHop {
    fn scan(headers: &HeaderMap) -> HopByHop {
        let mut found = HopByHop::default();
        // Standard names compare by tag, so this costs a few comparisons per header; most messages
        // carry none of these, or only `Connection: keep-alive`.
        for name in headers.keys() {
            if *name == CONNECTION {
                found.connection = true;
            } else if *name == TRANSFER_ENCODING {
                found.transfer_encoding = true;
            } else if *name == UPGRADE {
                found.upgrade = true;
            } else if *name == TE {
                found.te = true;
            } else if *name == KEEP_ALIVE {
                found.keep_alive = true;
            } else if *name == PROXY_CONNECTION {
                found.proxy_connection = true;
            }
        }
        found
    }
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Upgrade` survives and `Connection` is reduced to
/// `upgrade`, which is what relaying a protocol switch needs.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let found = HopByHop::scan(headers);
    if found.connection {
        // Headers named by `Connection` are hop-by-hop too. Common tokens need no work; others are
        // collected first because the map cannot change while its values are borrowed.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter(|t| !t.eq_ignore_ascii_case("upgrade"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(CONNECTION);
    }
    if found.keep_alive {
        headers.remove(&KEEP_ALIVE);
    }
    if found.proxy_connection {
        headers.remove(&PROXY_CONNECTION);
    }
    if found.transfer_encoding {
        headers.remove(TRANSFER_ENCODING);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else if found.upgrade {
        headers.remove(UPGRADE);
    }
    if found.te
        && let Some(te) = headers.get(TE)
    {
        let trailers = te.to_str().is_ok_and(|v| {
            v.split(',').any(|t| t.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers")))
        });
        if trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(TE);
        }
    }
}

/// Makes `request` ready to send to `endpoint` over `version`: hop-by-hop headers stripped (except
/// the upgrade pair when `upgrade`), and the target and `Host` in the form that version needs.
pub fn prepare_request<B>(request: &mut Request<B>, version: client::Version, endpoint: SocketAddr, upgrade: bool) {
    strip_hop_by_hop(request.headers_mut(), upgrade);
    match version {
        client::Version::Http1 => {
            *request.version_mut() = Version::HTTP_11;
            if let Some(authority) = request.uri().authority().cloned() {
                if !request.headers().contains_key(HOST)
                    && let Ok(host) = HeaderValue::from_str(authority.as_str())
                {
                    request.headers_mut().insert(HOST, host);
                }
                let origin = request.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
                *request.uri_mut() = Uri::from(origin);
            }
        }
        client::Version::Http2 => {
            *request.version_mut() = Version::HTTP_2;
            if request.uri().authority().is_none() {
                let authority = request
                    .headers()
                    .get(HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                    .or_else(|| Authority::try_from(endpoint.to_string().as_str()).ok());
                let mut parts = std::mem::take(request.uri_mut()).into_parts();
                parts.scheme = Some(Scheme::HTTP);
                parts.authority = authority;
                if parts.path_and_query.is_none() {
                    parts.path_and_query = Some(PathAndQuery::from_static("/"));
                }
                if let Ok(uri) = Uri::from_parts(parts) {
                    *request.uri_mut() = uri;
                }
            }
            request.headers_mut().remove(HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn request(version: Version, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().version(version).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut r = request(
            Version::HTTP_11,
            "/",
            &[
                ("connection", "keep-alive, X-Secret, close"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "websocket"),
                ("te", "gzip"),
                ("x-kept", "yes"),
            ],
        );
        strip_hop_by_hop(r.headers_mut(), false);
        let names: Vec<&str> = r.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn te_trailers_survives_for_grpc() {
        let mut r = request(Version::HTTP_2, "http://a/", &[("te", "trailers")]);
        strip_hop_by_hop(r.headers_mut(), false);
        assert_eq!(r.headers()[TE], "trailers");
        let mut r = request(Version::HTTP_11, "/", &[("te", "deflate;q=0.5, trailers")]);
        strip_hop_by_hop(r.headers_mut(), false);
        assert_eq!(r.headers()[TE], "trailers");
    }

    #[test]
    fn upgrades_are_recognised_and_kept_when_relayed() {
        let mut r =
            request(Version::HTTP_11, "/ws", &[("connection", "Upgrade, x-a"), ("upgrade", "websocket"), ("x-a", "1")]);
        assert!(is_upgrade(&r));
        strip_hop_by_hop(r.headers_mut(), true);
        assert_eq!(r.headers()[CONNECTION], "upgrade");
        assert_eq!(r.headers()[UPGRADE], "websocket");
        assert!(!r.headers().contains_key("x-a"));
        assert!(!is_upgrade(&request(Version::HTTP_11, "/", &[("upgrade", "websocket")])));
    }

    #[test]
    fn http2_requests_become_origin_form_http1_with_host() {
        let endpoint: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut r = request(Version::HTTP_2, "http://shop.local:8080/a?b=1", &[]);
        prepare_request(&mut r, client::Version::Http1, endpoint, false);
        assert_eq!(r.uri(), "/a?b=1");
        assert_eq!(r.headers()[HOST], "shop.local:8080");
        assert_eq!(r.version(), Version::HTTP_11);
    }

    #[test]
    fn http1_requests_become_absolute_http2_without_host() {
        let endpoint: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut r = request(Version::HTTP_11, "/a?b=1", &[("host", "shop.local")]);
        prepare_request(&mut r, client::Version::Http2, endpoint, false);
        assert_eq!(r.uri(), "http://shop.local/a?b=1");
        assert!(!r.headers().contains_key(HOST));
        let mut bare = request(Version::HTTP_10, "/", &[]);
        prepare_request(&mut bare, client::Version::Http2, endpoint, false);
        assert_eq!(bare.uri(), "http://127.0.0.1:9/");
        assert_eq!(authority(&request(Version::HTTP_11, "/", &[("host", "h:1")])), Some("h:1"));
    }
}
