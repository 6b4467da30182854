//! Route filters through a running proxy, over HTTP/1.1 and HTTP/2 to a real upstream: request and
//! response header changes (the route's, then the backend's), URL rewrites (host and path), and
//! redirects the proxy answers itself.

use std::sync::Arc;

use http::{HeaderValue, Response};
use remora_proxy::testing::servers::{Handler, full};
use remora_proxy::testing::{Client, HttpServer, TestProxy};

use crate::{cluster, listener};

/// An upstream that answers as `name` with what it received: its path and query in `x-seen-uri`,
/// its Host (or `:authority`) in `x-seen-host`, and every header as a `name: value` line of the
/// body.
pub(crate) async fn mirror_server(name: &'static str) -> HttpServer {
    let handler: Handler = Arc::new(move |request| {
        Box::pin(async move {
            let uri = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
            let host = remora_proxy::http::headers::authority(&request).unwrap_or_default().to_owned();
            let lines: String = request
                .headers()
                .iter()
                .map(|(name, value)| format!("{name}: {}\n", value.to_str().unwrap_or("?")))
                .collect();
            let mut response = Response::new(full(lines));
            let headers = response.headers_mut();
            headers.insert("x-served-by", HeaderValue::from_static(name));
            headers.insert("x-seen-uri", HeaderValue::from_str(&uri).unwrap());
            headers.insert("x-seen-host", HeaderValue::from_str(&host).unwrap());
            response
        })
    });
    HttpServer::with_handler(handler).await
}

/// The values of header `name` in a mirrored request's body lines.
fn seen(body: &str, name: &str) -> Vec<String> {
    body.lines().filter_map(|line| line.strip_prefix(&format!("{name}: ")).map(str::to_owned)).collect()
}

fn filters_config(v1: &HttpServer, v2: &HttpServer) -> String {
    format!(
        r#"resources:
{}{}  - kind: RouteTable
    name: echo
    destinations: [echo]
    routes:
      - name: moved
        match: {{path: {{segment_prefix: /old}}}}
        redirect: {{prefix: /new, status: 308}}
      - name: away
        match: {{path: {{exact: /away}}}}
        redirect: {{scheme: https, host: example.org, port: 8443}}
      - name: api
        match: {{path: {{segment_prefix: /api/}}}}
        rewrite: {{host: api.internal, prefix: /v2}}
        request_headers: {{set: [{{name: x-set, value: route}}], add: [{{name: x-add, value: route}}], remove: [x-gone]}}
        response_headers: {{set: [{{name: x-route, value: api}}], remove: [x-served-by]}}
        backends:
          - {{cluster: v1, request_headers: {{add: [{{name: x-backend, value: v1}}]}}, response_headers: {{add: [{{name: x-via, value: v1}}]}}}}
      - name: full
        match: {{path: {{prefix: /full}}}}
        rewrite: {{full_path: /replaced}}
        backends: [{{cluster: v2}}]
{}{}"#,
        cluster("v1", "", &[v1.address()]),
        cluster("v2", "", &[v2.address()]),
        listener("h1", ", protocol: http1"),
        listener("h2", ", protocol: http2"),
    )
}

/// The proxy of [`filters_config`] and its two upstreams (kept to keep them serving).
async fn filtering_proxy() -> ([HttpServer; 2], TestProxy) {
    let (v1, v2) = (mirror_server("v1").await, mirror_server("v2").await);
    let proxy = TestProxy::start(&filters_config(&v1, &v2));
    ([v1, v2], proxy)
}

/// A client of listener `h1` (HTTP/1.1) or `h2` (HTTP/2) of `proxy`.
async fn client_of(proxy: &TestProxy, listener: &str) -> Client {
    let address = proxy.address(listener);
    if listener == "h2" { Client::http2(address).await } else { Client::http1(address).await }
}

/// On both versions: the upstream sees the route's header changes (set replaces, add appends,
/// remove takes out), then the backend's, and the rewritten host and path (query kept); the client
/// sees the route's and the backend's response changes. A full-path rewrite replaces the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_responses_carry_the_route_and_backend_changes() {
    let (_upstreams, proxy) = filtering_proxy().await;
    for listener in ["h1", "h2"] {
        let mut client = client_of(&proxy, listener).await;
        let request = client
            .request(http::Method::GET, "echo", "/api/users?id=7")
            .header("x-set", "caller")
            .header("x-add", "caller")
            .header("x-gone", "caller")
            .body(full(""))
            .unwrap();
        let reply = remora_proxy::testing::client::read(client.send(request).await.unwrap()).await;
        assert_eq!(reply.status, 200, "{listener}");
        let body = reply.text();
        assert_eq!(seen(&body, "x-set"), ["route"], "{listener}: {body}");
        assert_eq!(seen(&body, "x-add"), ["caller", "route"], "{listener}: {body}");
        assert!(seen(&body, "x-gone").is_empty(), "{listener}: {body}");
        assert_eq!(seen(&body, "x-backend"), ["v1"], "{listener}: {body}");
        assert_eq!(reply.header("x-seen-uri"), "/v2/users?id=7", "{listener}");
        assert_eq!(reply.header("x-seen-host"), "api.internal", "{listener}");
        assert_eq!(reply.header("x-route"), "api", "{listener}");
        assert_eq!(reply.header("x-via"), "v1", "{listener}");
        assert_eq!(reply.header("x-served-by"), "", "{listener}: the route removed it");
        let full_path = client.get("echo", "/full/one/two?q=1").await;
        assert_eq!(full_path.header("x-served-by"), "v2", "{listener}");
        assert_eq!(full_path.header("x-seen-uri"), "/replaced?q=1", "{listener}");
    }
}

/// A redirecting route answers itself, the upstream untouched: its status and Location (the
/// matched prefix replaced, the query kept; a scheme, host and port of its own), and a segment
/// prefix matches whole segments only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirecting_routes_answer_without_the_upstream() {
    let (_upstreams, proxy) = filtering_proxy().await;
    for listener in ["h1", "h2"] {
        let mut client = client_of(&proxy, listener).await;
        let moved = client.get("echo", "/old/page?x=1").await;
        assert_eq!(moved.status, 308, "{listener}");
        assert_eq!(moved.header("location"), "http://echo/new/page?x=1", "{listener}");
        assert_eq!(moved.header("x-served-by"), "", "{listener}");
        let away = client.get("echo:80", "/away").await;
        assert_eq!(away.status, 302, "{listener}");
        assert_eq!(away.header("location"), "https://example.org:8443/away", "{listener}");
        let older = client.get("echo", "/older").await;
        assert_eq!(older.status, 404, "{listener}: /older is not under /old");
    }
}
