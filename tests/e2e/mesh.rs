//! Identity and mutual TLS between two sidecars: client app → outbound sidecar → mTLS → inbound
//! sidecar → app, with certificates made in the test (files) or issued by the control plane's CA.
//! HTTP/1.1, HTTP/2 and TCP across; the wire is TLS (plaintext refused in strict mode); wrong and
//! expired identities refused; authorization by identity, glob and route; one h2 connection for
//! many HTTP/1.1 clients; rotation under traffic; the CA going away.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use remora_control_plane::testing::TestControlPlane;
use remora_control_plane::testing::{IssuedPem, TestCa};
use remora_proxy::testing::proxy::temp_dir;
use remora_proxy::testing::{Client, HttpServer, TcpEchoServer, TestProxy, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn bootstrap(identity: &str) -> String {
    format!("bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  drain_time: 1s\n{identity}---\n")
}

/// The receiving sidecar: `in` (HTTP and TCP to the app, auto) and `in-tcp` (to the echo server),
/// both inbound, with `policies` (YAML resource items) on top.
fn server_yaml(identity: &str, app: SocketAddr, echo: SocketAddr, policies: &str) -> String {
    format!(
        "{}resources:\n{}{}{}{}{policies}",
        bootstrap(identity),
        crate::cluster("app", ", protocol: http1", &[app]),
        crate::cluster("echo", "", &[echo]),
        crate::listener("in", ", direction: inbound, default_cluster: app"),
        crate::listener("in-tcp", ", direction: inbound, default_cluster: echo"),
    )
}

/// The calling sidecar: `out` (auto) to the mesh cluster `api` at `inbound`, `out-tcp` (tcp) to the
/// mesh cluster `api-tcp` at `inbound_tcp`. `peers` adds fields to the mesh clusters.
fn client_yaml(identity: &str, inbound: SocketAddr, inbound_tcp: SocketAddr, peers: &str) -> String {
    format!(
        "{}resources:\n{}{}{}{}",
        bootstrap(identity),
        crate::cluster("api", &format!(", tls: mesh{peers}"), &[inbound]),
        crate::cluster("api-tcp", &format!(", tls: mesh{peers}"), &[inbound_tcp]),
        crate::listener("out", ", default_cluster: api"),
        crate::listener("out-tcp", ", protocol: tcp, default_cluster: api-tcp"),
    )
}

struct Pair {
    app: HttpServer,
    _echo: TcpEchoServer,
    server: TestProxy,
    client: TestProxy,
    ca: TestCa,
    dir: PathBuf,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two sidecars with file identities `web` (client) and `api` (server) from one test CA.
async fn pair(policies: &str, peers: &str) -> Pair {
    let ca = TestCa::new("cluster.local");
    let dir = temp_dir("remora-mesh");
    let app = HttpServer::start("api-app").await;
    let echo = TcpEchoServer::start().await;
    let server_identity = ca.issue(API).bootstrap_identity(&dir.join("api"));
    let server = TestProxy::start(&server_yaml(&server_identity, app.address(), echo.address(), policies));
    let client_identity = ca.issue(WEB).bootstrap_identity(&dir.join("web"));
    let client =
        TestProxy::start(&client_yaml(&client_identity, server.address("in"), server.address("in-tcp"), peers));
    Pair { app, _echo: echo, server, client, ca, dir }
}

/// A receiving sidecar (identity `api`) in front of `app` and an echo server, with `policies`,
/// and calling sidecars made on demand with certificates from the same CA.
struct Guarded {
    ca: TestCa,
    dir: PathBuf,
    _echo: TcpEchoServer,
    server: TestProxy,
}

impl Guarded {
    async fn start(name: &str, app: SocketAddr, policies: &str) -> Guarded {
        let ca = TestCa::new("cluster.local");
        let dir = temp_dir(name);
        let echo = TcpEchoServer::start().await;
        let server_identity = ca.issue(API).bootstrap_identity(&dir.join("api"));
        let server = TestProxy::start(&server_yaml(&server_identity, app, echo.address(), policies));
        Guarded { ca, dir, _echo: echo, server }
    }

    /// A calling sidecar named `name` with identity `id`.
    fn sidecar(&self, name: &str, id: &str) -> TestProxy {
        let identity = self.ca.issue(id).bootstrap_identity(&self.dir.join(name));
        TestProxy::start(&client_yaml(&identity, self.server.address("in"), self.server.address("in-tcp"), ""))
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn echo_through(address: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(payload).await?;
    stream.shutdown().await?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
        .await
        .map_err(std::io::Error::other)??;
    Ok(got)
}

/// HTTP/1.1 and HTTP/2 clients, and a TCP stream, cross between the sidecars inside mTLS; the app
/// sees plain HTTP/1.1 (the cluster's protocol), the client's requests travel as HTTP/2.
#[tokio::test]
async fn http_and_tcp_cross_mutual_tls_and_the_app_sees_plaintext() {
    let pair = pair("", "").await;
    let out = pair.client.address("out");
    let reply = Client::http1(out).await.get("api.shop", "/hello").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-served-by"), "api-app");
    assert_eq!(reply.header("x-seen-version"), "HTTP/1.1");
    assert_eq!(reply.header("x-seen-client-identity"), WEB, "the app is told who called");
    let reply = Client::http2(out).await.get("api.shop", "/hello").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-seen-version"), "HTTP/1.1");
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    assert!(echo_through(pair.client.address("out-tcp"), &payload).await.unwrap() == payload);
    assert!(pair.server.metric(r#"remora_tls_handshakes_total{direction="inbound",result="ok"}"#).await >= 2.0);
    assert!(pair.client.metric(r#"remora_tls_handshakes_total{direction="outbound",result="ok"}"#).await >= 2.0);
    // And by the identity each side proved.
    let by_client = format!(r#"remora_tls_peer_handshakes_total{{direction="inbound",result="ok",peer="{WEB}"}}"#);
    assert!(pair.server.metric(&by_client).await >= 2.0);
    let to_server = format!(r#"remora_tls_peer_handshakes_total{{direction="outbound",result="ok",peer="{API}"}}"#);
    assert!(pair.client.metric(&to_server).await >= 2.0);
    // Two sidecars agree on the post-quantum key exchange.
    let pq = |direction: &str| {
        format!(r#"remora_tls_key_exchanges_total{{direction="{direction}",group="X25519MLKEM768"}}"#)
    };
    assert!(pair.server.metric(&pq("inbound")).await >= 2.0);
    assert!(pair.client.metric(&pq("outbound")).await >= 2.0);
    assert_eq!(pair.app.hits(), 2);
}

/// The inbound port speaks TLS only under a strict policy: a plaintext client is closed at once and
/// counted; after a switch to permissive it is served and counted as accepted.
#[tokio::test]
async fn strict_refuses_plaintext_and_permissive_accepts_it() {
    let strict =
        "  - {kind: AuthorizationPolicy, name: api, listener: in, allow: [\"spiffe://cluster.local/ns/shop/*\"]}\n";
    let pair = pair(strict, "").await;
    let inbound = pair.server.address("in");
    let mut plain = TcpStream::connect(inbound).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await.unwrap();
    assert!(read.is_err() || got.is_empty(), "plaintext was answered: {:?}", String::from_utf8_lossy(&got));
    let refused = r#"remora_authorization_plaintext_total{listener="in",policy="api",result="refused"}"#;
    assert_eq!(pair.server.metric(refused).await, 1.0);
    // Mesh traffic still passes.
    assert_eq!(Client::http1(pair.client.address("out")).await.get("api", "/").await.status, 200);

    let yaml = std::fs::read_to_string(pair.server.config_path()).unwrap();
    pair.server.rewrite(&yaml.replace("allow: [", "mode: permissive, allow: ["));
    pair.server.reload().unwrap();
    let mut plain = Client::http1(inbound).await;
    let spoofed = plain.request(http::Method::GET, "api", "/").header("x-remora-client-identity", WEB);
    let reply = remora_proxy::testing::client::read(
        plain.send(spoofed.body(remora_proxy::testing::servers::full("")).unwrap()).await.unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-seen-client-identity"), "", "a plaintext caller's claimed identity reached the app");
    let accepted = r#"remora_authorization_plaintext_total{listener="in",policy="api",result="accepted"}"#;
    assert_eq!(pair.server.metric(accepted).await, 1.0);
}

/// A peer that is not who the cluster expects is refused before any request is sent (503
/// upstream_tls), for HTTP and for TCP; so is an endpoint whose own identity does not match.
#[tokio::test]
async fn the_wrong_peer_identity_is_refused() {
    let pair = pair("", ", peer_identities: [\"spiffe://cluster.local/ns/billing/*\"]").await;
    let reply = Client::http1(pair.client.address("out")).await.get("api", "/").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.header("x-remora-error"), "upstream_tls");
    assert!(reply.text().contains("expected spiffe://cluster.local/ns/billing/*"), "{}", reply.text());
    let closed = echo_through(pair.client.address("out-tcp"), b"hello").await;
    assert!(closed.map_or(true, |got| got.is_empty()), "tcp crossed to the wrong peer");
    assert_eq!(pair.app.hits(), 0);
    let wrong = r#"remora_tls_handshakes_total{direction="outbound",result="identity"}"#;
    assert!(pair.client.metric(wrong).await >= 2.0);
    let who = format!(r#"remora_tls_peer_handshakes_total{{direction="outbound",result="identity",peer="{API}"}}"#);
    assert!(pair.client.metric(&who).await >= 2.0, "the refused peer named by the identity it proved");
}

/// The inbound listener wants a client certificate from the mesh's CA that has not expired: an
/// expired one, one from another CA, and none at all are all refused in the handshake.
#[tokio::test]
async fn expired_foreign_and_missing_client_certificates_are_refused() {
    let pair = pair("", "").await;
    let inbound = pair.server.address("in");
    let now = SystemTime::now();
    let expired = pair.ca.issue_between(WEB, now - Duration::from_secs(7200), now - Duration::from_secs(3600));
    let foreign = TestCa::new("cluster.local").issue(WEB);
    for (what, cert) in [("expired", &expired), ("foreign", &foreign)] {
        let result = pair_request(cert, inbound).await;
        assert!(result.is_err(), "an {what} certificate was accepted");
    }
    let good = pair.ca.issue(WEB);
    pair_request(&good, inbound).await.expect("a valid certificate was refused");
    let failed = pair.server.metric(r#"remora_tls_handshakes_total{direction="inbound",result="handshake"}"#).await;
    assert!(failed >= 2.0, "{failed}");
}

/// A handshake that stalls after its ClientHello is cut off at the handshake timeout (0.5 s here)
/// and counted; garbage that looks like a TLS record is refused; the sidecar serves on.
#[tokio::test]
async fn stalled_handshakes_and_garbage_on_the_mesh_port_are_cut_off() {
    let ca = TestCa::new("cluster.local");
    let dir = temp_dir("remora-stall");
    let app = HttpServer::start("api-app").await;
    let echo = TcpEchoServer::start().await;
    let identity = ca.issue(API).bootstrap_identity(&dir.join("api")) + "    handshake_timeout: 0.5s\n";
    let server = TestProxy::start(&server_yaml(&identity, app.address(), echo.address(), ""));
    let inbound = server.address("in");
    let web = ca.issue(WEB);

    let mut stalled = TcpStream::connect(inbound).await.unwrap();
    stalled.write_all(&web.client_hello(remora_proxy::tls::ALPN_HTTP)).await.unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut answer)).await;
    assert!(closed.is_ok(), "a stalled handshake was held for 10 s");
    assert!(answer.first() == Some(&0x16), "the server answered the ClientHello before giving up");
    // Counted once the handshake's future ends, which may be just after the socket closes.
    let counted = |result: &'static str| {
        let series = format!(r#"remora_tls_handshakes_total{{direction="inbound",result="{result}"}}"#);
        let server = &server;
        async move { server.metric(&series).await == 1.0 }
    };
    eventually("the timeout counted", Duration::from_secs(5), || counted("timeout")).await;

    // A mesh ClientHello, then a record of no type TLS knows.
    let mut garbage = TcpStream::connect(inbound).await.unwrap();
    let mut bytes = web.client_hello(remora_proxy::tls::ALPN_HTTP);
    bytes.extend([0x99, 0x03, 0x03, 0x02, 0x00]);
    bytes.extend((0..512u32).map(|i| (i * 7 + 3) as u8));
    garbage.write_all(&bytes).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), garbage.read_to_end(&mut Vec::new())).await;
    assert!(closed.is_ok(), "garbage held the connection for 10 s");
    eventually("the refusal counted", Duration::from_secs(5), || counted("handshake")).await;

    // A caller without the post-quantum key exchange (this client offers X25519 and P-256 only) is
    // served over X25519; one that offers X25519MLKEM768 gets it.
    assert_eq!(pair_request(&web, inbound).await, Ok(200));
    eventually("the classical exchange counted", Duration::from_secs(5), || async {
        server.metric(r#"remora_tls_key_exchanges_total{direction="inbound",group="X25519"}"#).await == 1.0
    })
    .await;
    drop(web.connect_post_quantum(inbound, remora_proxy::tls::ALPN_HTTP).await.unwrap());
    eventually("the post-quantum exchange counted", Duration::from_secs(5), || async {
        server.metric(r#"remora_tls_key_exchanges_total{direction="inbound",group="X25519MLKEM768"}"#).await == 1.0
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mesh TLS to `address` as `cert`, then one HTTP/2 request; Err if anything fails.
async fn pair_request(cert: &IssuedPem, address: SocketAddr) -> Result<u16, String> {
    let tls = cert.connect(address, remora_proxy::tls::ALPN_HTTP).await.map_err(|e| e.to_string())?;
    let io = hyper_util::rt::TokioIo::new(tls);
    let (mut sender, connection) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::get("http://api/").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

/// An allow list of globs lets the shop in and keeps others out with 403; a route's own list
/// replaces the policy's for requests that route there; TCP from a denied peer is closed.
#[tokio::test]
async fn authorization_allows_by_identity_glob_and_route() {
    let app = HttpServer::start("api-app").await;
    let policies = "  - {kind: RouteTable, name: api, routes: [{name: admin, match: {path: {prefix: /admin}}, backends: [{cluster: app}]}, {name: rest, backends: [{cluster: app}]}]}\n  - kind: AuthorizationPolicy\n    name: api\n    listener: in\n    allow: [\"spiffe://cluster.local/ns/shop/*\"]\n    routes: [{route_table: api, route: admin, allow: [\"spiffe://cluster.local/ns/ops/sa/admin\"]}]\n  - {kind: AuthorizationPolicy, name: echo, listener: in-tcp, allow: [\"spiffe://cluster.local/ns/shop/sa/web\"]}\n";
    let guarded = Guarded::start("remora-authz", app.address(), policies).await;
    let server = &guarded.server;
    let web = guarded.sidecar("web", WEB);
    let ops = guarded.sidecar("ops", "spiffe://cluster.local/ns/ops/sa/admin");
    let get = |proxy: &TestProxy, path: &'static str| {
        let out = proxy.address("out");
        async move { Client::http1(out).await.get("api", path).await }
    };
    assert_eq!(get(&web, "/orders").await.status, 200);
    let denied = get(&ops, "/orders").await;
    assert_eq!(denied.status, 403, "{}", denied.text());
    assert_eq!(denied.header("x-remora-error"), "unauthorized");
    assert!(denied.text().contains("spiffe://cluster.local/ns/ops/sa/admin"), "{}", denied.text());
    assert_eq!(get(&ops, "/admin/flush").await.status, 200);
    assert_eq!(get(&web, "/admin/flush").await.status, 403);
    assert_eq!(echo_through(web.address("out-tcp"), b"ping").await.unwrap(), b"ping");
    let closed = echo_through(ops.address("out-tcp"), b"ping").await;
    assert!(closed.map_or(true, |got| got.is_empty()), "a denied peer's tcp went through");
    assert_eq!(server.metric(r#"remora_authorization_denied_total{listener="in",policy="api"}"#).await, 2.0);
    assert_eq!(server.metric(r#"remora_authorization_denied_total{listener="in-tcp",policy="echo"}"#).await, 1.0);
}

/// Forty HTTP/1.1 client connections through the calling sidecar reach the receiving sidecar as
/// one multiplexed HTTP/2 connection.
#[tokio::test]
async fn http1_clients_share_one_h2_connection_between_the_sidecars() {
    let pair = pair("", "").await;
    let out = pair.client.address("out");
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(tokio::spawn(async move {
            let mut client = Client::http1(out).await;
            for _ in 0..5 {
                assert_eq!(client.get("api", "/slow/5").await.status, 200);
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(pair.app.hits(), 200);
    assert_eq!(
        pair.server.metric(r#"remora_listener_connections_total{listener="in",direction="inbound"}"#).await,
        1.0
    );
    assert_eq!(
        pair.client.metric(r#"remora_listener_connections_total{listener="out",direction="outbound"}"#).await,
        40.0
    );
}

const TOKENS: &str = "web-token-0123456789 spiffe://cluster.local/ns/shop/sa/web\napi-token-0123456789 spiffe://cluster.local/ns/shop/sa/api\n";

/// Two sidecars with identities from the control plane's CA (`ttl`), the given tokens.
fn ca_pair(
    plane: &TestControlPlane,
    dir: &std::path::Path,
    app: SocketAddr,
    echo: SocketAddr,
    ttl: &str,
) -> (TestProxy, TestProxy) {
    let identity = |name: &str, id: &str, token: &str| {
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, token).unwrap();
        format!(
            "  identity:\n    spiffe_id: {id}\n    token_file: {}\n    ca_address: {}\n    certificate_ttl: {ttl}\n",
            token_file.display(),
            plane.url()
        )
    };
    let server = TestProxy::start(&server_yaml(&identity("api", API, "api-token-0123456789"), app, echo, ""));
    let client = TestProxy::start(&client_yaml(
        &identity("web", WEB, "web-token-0123456789"),
        server.address("in"),
        server.address("in-tcp"),
        "",
    ));
    (server, client)
}

/// 30-second certificates from the CA, under two minutes of steady HTTP and TCP traffic (a new TCP
/// connection, so a new handshake, every round): every request succeeds, and each sidecar installs
/// at least three certificates after its first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_without_a_failure() {
    let plane = TestControlPlane::start_with_ca(&[], "cluster.local", TOKENS);
    let dir = temp_dir("remora-rotate");
    let app = HttpServer::start("api-app").await;
    let echo = TcpEchoServer::start().await;
    let (server, client) = ca_pair(&plane, &dir, app.address(), echo.address(), "30s");
    server.wait_ready().await;
    client.wait_ready().await;
    let out = client.address("out");
    let out_tcp = client.address("out-tcp");
    let mut http = Client::http1(out).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut rounds = 0;
    while tokio::time::Instant::now() < deadline {
        let reply = http.get("api", "/hello").await;
        assert_eq!(reply.status, 200, "round {rounds}: {}", reply.text());
        let got = echo_through(out_tcp, b"rotate").await.unwrap();
        assert_eq!(got, b"rotate", "round {rounds}");
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for proxy in [&server, &client] {
        let installed = proxy.metric("remora_identity_rotations_total").await;
        assert!(installed >= 4.0, "{installed} certificates installed in two minutes");
        assert_eq!(proxy.metric(r#"remora_identity_renewals_total{result="failed"}"#).await, 0.0);
    }
    assert!(plane.metric(r#"remora_control_certificate_requests_total{result="signed"}"#) >= 8.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CA goes away after the first certificates: the old ones keep serving (renewals fail and are
/// counted) until they expire; then mesh connections fail with a clear reason, and once the CA is
/// back a renewal brings them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ca_leaves_the_old_certificate_serving_until_it_expires() {
    let mut plane = TestControlPlane::start_with_ca(&[], "cluster.local", TOKENS);
    let dir = temp_dir("remora-ca-down");
    let app = HttpServer::start("api-app").await;
    let echo = TcpEchoServer::start().await;
    let (server, client) = ca_pair(&plane, &dir, app.address(), echo.address(), "12s");
    server.wait_ready().await;
    client.wait_ready().await;
    let out_tcp = client.address("out-tcp");
    assert_eq!(echo_through(out_tcp, b"a").await.unwrap(), b"a");
    plane.stop();
    // Renewal at 6 s fails; until expiry at 12 s, new handshakes still work.
    eventually("a renewal fails", Duration::from_secs(15), || async {
        client.metric(r#"remora_identity_renewals_total{result="failed"}"#).await >= 1.0
    })
    .await;
    let expiry = client.metric("remora_identity_certificate_expiry_seconds").await;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    if now + 1.0 < expiry {
        assert_eq!(echo_through(out_tcp, b"b").await.unwrap(), b"b", "the old certificate stopped serving early");
    }
    eventually("the certificate expires and handshakes fail", Duration::from_secs(20), || async {
        client.metric(r#"remora_tls_handshakes_total{direction="outbound",result="expired"}"#).await >= 1.0
            || echo_through(out_tcp, b"c").await.map_or(true, |got| got.is_empty())
    })
    .await;
    let reply = Client::http1(client.address("out")).await.get("api", "/fresh").await;
    // The pooled h2 connection may outlive the certificate; a new handshake does not.
    if reply.status != 200 {
        assert_eq!(reply.header("x-remora-error"), "upstream_tls", "{}", reply.text());
    }
    plane.restart();
    eventually("a renewal succeeds once the CA is back", Duration::from_secs(60), || async {
        echo_through(out_tcp, b"d").await.is_ok_and(|got| got == b"d")
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Certificate files are watched: new files (written whole, then renamed into place) take over for
/// new handshakes; a broken set is refused, counted, and the certificate in use keeps serving.
#[tokio::test]
async fn certificate_files_are_reloaded_when_they_change() {
    let pair = pair("", "").await;
    let out_tcp = pair.client.address("out-tcp");
    assert_eq!(pair.server.metric("remora_identity_rotations_total").await, 1.0);
    let api_dir = pair.dir.join("api");
    let renewed = pair.ca.issue(API);
    let staging = pair.dir.join("staging");
    let staged = renewed.write(&staging);
    for (from, name) in staged.iter().zip(["cert.pem", "key.pem", "ca.pem"]) {
        std::fs::rename(from, api_dir.join(name)).unwrap();
    }
    eventually("the new files are installed", Duration::from_secs(10), || async {
        pair.server.metric("remora_identity_rotations_total").await == 2.0
    })
    .await;
    assert_eq!(echo_through(out_tcp, b"new").await.unwrap(), b"new");
    std::fs::write(api_dir.join("key.pem"), "not a key").unwrap();
    eventually("the broken set is refused", Duration::from_secs(10), || async {
        pair.server.metric(r#"remora_identity_renewals_total{result="failed"}"#).await == 1.0
    })
    .await;
    assert_eq!(pair.server.metric("remora_identity_rotations_total").await, 2.0);
    assert_eq!(echo_through(out_tcp, b"still").await.unwrap(), b"still");
}

/// With `--tls-name`, the control plane's port speaks TLS only: a proxy that trusts the CA's root
/// gets its configuration and its certificate over it; one that trusts another root gets neither
/// and stays unready; plaintext is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_serves_tls_and_proxies_check_its_certificate() {
    let app = HttpServer::start("api-app").await;
    let files = [("mesh.yaml", format!("resources:\n{}", crate::cluster("app", "", &[app.address()])))];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, y)| (*n, y.as_str())).collect();
    let plane = TestControlPlane::start_with_ca_tls(&files, "cluster.local", TOKENS);
    let dir = temp_dir("remora-control-tls");
    let token_file = dir.join("web.token");
    std::fs::write(&token_file, "web-token-0123456789").unwrap();
    let bootstrap = |root: &std::path::Path| {
        format!(
            "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  initial_fetch_timeout: 30s\n  control_plane_ca_file: {}\n  identity: {{spiffe_id: \"{WEB}\", token_file: {}}}\n---\n{}",
            root.display(),
            token_file.display(),
            "kind: Listener\nname: out\naddress: \"127.0.0.1:0\"\ndefault_cluster: app\n"
        )
    };
    let proxy = TestProxy::start_controlled(&bootstrap(&plane.ca_root_file()), &plane.https_url(), "tls-proxy");
    proxy.wait_ready().await;
    assert_eq!(proxy.metric("remora_identity_rotations_total").await, 1.0);
    assert_eq!(Client::http1(proxy.address("out")).await.get("app", "/").await.status, 200);
    assert_eq!(plane.metric(r#"remora_control_certificate_requests_total{result="signed"}"#), 1.0);

    let other = TestCa::new("cluster.local").issue(WEB);
    let other_root = dir.join("other-ca.pem");
    std::fs::write(&other_root, &other.ca).unwrap();
    let distrusting = TestProxy::start_controlled(&bootstrap(&other_root), &plane.https_url(), "distrusting");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !distrusting.proxy().is_ready(),
        "a proxy that does not trust the control plane's certificate became ready"
    );
    assert_eq!(distrusting.metric("remora_identity_rotations_total").await, 0.0);
    assert!(distrusting.metric(r#"remora_identity_renewals_total{result="failed"}"#).await >= 1.0);

    let mut plain = TcpStream::connect(plane.address()).await.unwrap();
    plain.write_all(b"GET /metrics HTTP/1.1\r\nhost: control\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(12), plain.read_to_end(&mut got)).await;
    assert!(!String::from_utf8_lossy(&got).contains("remora_control"), "plaintext was answered");
    let _ = std::fs::remove_dir_all(&dir);
}

/// On a control plane that checks client certificates, a proxy's view is decided by the identity
/// its certificate proves, not by the node ID it claims: a proxy of `shop` that names itself
/// `web-0.bank` is sent shop's short names and never bank's; a stream proving nothing (no
/// certificate, no token) is sent the shared view alone, whatever its node ID.
#[tokio::test]
async fn a_proxy_that_lies_about_its_node_id_gets_the_view_it_proves() {
    let services = "apiVersion: v1\nkind: Service\nmetadata: {namespace: shop, name: api}\nspec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {namespace: bank, name: vault}\nspec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}\n";
    let plane = TestControlPlane::start_with_ca_tls(&[("services.yaml", services)], "cluster.local", TOKENS);
    let dir = temp_dir("remora-proven");
    let token_file = dir.join("web.token");
    std::fs::write(&token_file, "web-token-0123456789").unwrap();
    let root = plane.ca_root_file();
    let listener = "kind: Listener\nname: out\naddress: \"127.0.0.1:0\"\n";
    let bootstrap = |identity: &str| {
        format!(
            "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  initial_fetch_timeout: 30s\n  control_plane_ca_file: {}\n{identity}---\n{listener}",
            root.display()
        )
    };
    let destinations = |dump: &str, table: &str| -> Vec<String> {
        let dump: serde_json::Value = serde_json::from_str(dump).unwrap();
        let resources = dump["resources"].as_array().unwrap();
        let found = resources.iter().find(|r| r["kind"] == "RouteTable" && r["name"] == table);
        let list = found.map(|t| t["destinations"].as_array().cloned().unwrap_or_default()).unwrap_or_default();
        list.iter().filter_map(|d| d.as_str().map(str::to_owned)).collect()
    };

    let identity = format!("  identity: {{spiffe_id: \"{WEB}\", token_file: {}}}\n", token_file.display());
    let liar = TestProxy::start_controlled(&bootstrap(&identity), &plane.https_url(), "web-0.bank");
    liar.wait_ready().await;
    let (_, dump) = liar.admin_get("/config_dump").await;
    assert!(destinations(&dump, "shop/api:80").contains(&"api:80".to_owned()), "{dump}");
    let vault = destinations(&dump, "bank/vault:80");
    assert!(vault.contains(&"vault.bank:80".to_owned()), "the shared table: {vault:?}");
    assert!(!vault.contains(&"vault:80".to_owned()), "bank's view was sent to a proxy of shop");

    let anonymous = TestProxy::start_controlled(&bootstrap(""), &plane.https_url(), "web-0.bank");
    anonymous.wait_ready().await;
    let (_, dump) = anonymous.admin_get("/config_dump").await;
    assert!(!destinations(&dump, "bank/vault:80").contains(&"vault:80".to_owned()), "a claim was believed");
    assert!(!destinations(&dump, "shop/api:80").is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A WebSocket session crosses the sidecar pair: the upgrade cannot ride the shared HTTP/2
/// connection, so it travels as HTTP/1.1 inside mTLS of its own (`remora.h1`), authorized per
/// request like any other; the app sees a plain WebSocket handshake from the caller's identity.
#[tokio::test]
async fn a_websocket_session_crosses_mutual_tls_and_is_authorized() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let app = HttpServer::with_handler(crate::tunnels::websocket_echo()).await;
    let policies = "  - {kind: RouteTable, name: api, routes: [{name: ws, backends: [{cluster: app}]}]}\n  - {kind: AuthorizationPolicy, name: api, listener: in, mode: strict, allow: [\"spiffe://cluster.local/ns/shop/sa/web\"]}\n";
    let guarded = Guarded::start("remora-mesh-ws", app.address(), policies).await;
    let server = &guarded.server;
    let web = guarded.sidecar("web", WEB);
    let stream = TcpStream::connect(web.address("out")).await.unwrap();
    let (mut socket, response) = tokio_tungstenite::client_async("ws://api.shop/socket", stream).await.unwrap();
    assert_eq!(response.status(), 101);
    for i in 0..3 {
        socket.send(Message::text(format!("hello {i}"))).await.unwrap();
        assert_eq!(socket.next().await.unwrap().unwrap(), Message::text(format!("hello {i}")));
    }
    let large = Message::binary((0..200_000).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    socket.send(large.clone()).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), large);
    socket.close(None).await.unwrap();
    assert_eq!(app.hits(), 1);
    assert!(server.metric(r#"remora_tls_handshakes_total{direction="inbound",result="ok"}"#).await >= 1.0);
    assert_eq!(
        server.metric(r#"remora_upstream_responses_total{cluster="app",status_class="1xx"}"#).await,
        1.0,
        "the receiving sidecar relayed the switch itself"
    );

    // Another identity's upgrade is refused by the policy, as its plain requests would be.
    let other = guarded.sidecar("other", "spiffe://cluster.local/ns/shop/sa/other");
    let stream = TcpStream::connect(other.address("out")).await.unwrap();
    match tokio_tungstenite::client_async("ws://api.shop/socket", stream).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected a 403, got {other:?}"),
    }
    assert_eq!(app.hits(), 1);
}

/// A control plane whose CA knows [`TOKENS`] and demands one of every discovery stream
/// (`--xds-auth`), serving cluster `app` at `app`.
fn token_checked_plane(app: &HttpServer) -> TestControlPlane {
    let files = [("mesh.yaml", format!("resources:\n{}", crate::cluster("app", "", &[app.address()])))];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, y)| (*n, y.as_str())).collect();
    let mut plane = TestControlPlane::start_with_ca(&files, "cluster.local", TOKENS);
    plane.require_xds_tokens();
    plane
}

/// With `--xds-auth`, a proxy whose stream carries its CA token gets its configuration; one with no
/// token, or one the CA does not know, is refused (and counted) and never becomes ready (its
/// listener waits, unbound, for the cluster that never comes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_streams_need_a_token_the_ca_accepts() {
    let app = HttpServer::start("api-app").await;
    let plane = token_checked_plane(&app);
    let dir = temp_dir("remora-xds-auth");
    let listener = "kind: Listener\nname: out\naddress: \"127.0.0.1:0\"\ndefault_cluster: app\n";
    let bootstrap = |identity: &str| {
        format!(
            "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  initial_fetch_timeout: 30s\n{identity}---\n{listener}"
        )
    };
    let with_token = |name: &str, token: &str| {
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, token).unwrap();
        bootstrap(&format!("  identity: {{spiffe_id: \"{WEB}\", token_file: {}}}\n", token_file.display()))
    };
    let known = TestProxy::start_controlled(&with_token("web", "web-token-0123456789"), &plane.url(), "known");
    known.wait_ready().await;
    assert_eq!(Client::http1(known.address("out")).await.get("app", "/").await.status, 200);

    let anonymous = TestProxy::start_controlled(&bootstrap(""), &plane.url(), "anonymous");
    let stranger =
        TestProxy::start_controlled(&with_token("stranger", "not-a-token-0123456789"), &plane.url(), "stranger");
    eventually("both strangers refused", Duration::from_secs(10), || async {
        plane.metric("remora_control_streams_refused_total") >= 2.0
    })
    .await;
    assert!(!anonymous.proxy().is_ready() && !stranger.proxy().is_ready(), "a refused proxy became ready");
    assert_eq!(plane.metric("remora_control_connected_proxies"), 1.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The bootstrap tokens file is re-read when it changes: a broken edit is refused and the tokens in
/// force stay; taking a proxy's token out closes its open discovery stream (counted) and refuses
/// its reconnects, while it serves on from its last configuration; putting it back lets it in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_taken_out_of_the_tokens_file_closes_its_open_discovery_stream() {
    let app = HttpServer::start("api-app").await;
    let plane = token_checked_plane(&app);
    let tokens = plane.dir().join("ca").join("tokens");
    let dir = temp_dir("remora-xds-revoke");
    let token_file = dir.join("web.token");
    std::fs::write(&token_file, "web-token-0123456789").unwrap();
    let proxy = TestProxy::start_controlled(
        &format!(
            "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  initial_fetch_timeout: 30s\n  identity: {{spiffe_id: \"{WEB}\", token_file: {}}}\n---\nkind: Listener\nname: out\naddress: \"127.0.0.1:0\"\ndefault_cluster: app\n",
            token_file.display()
        ),
        &plane.url(),
        "web",
    );
    proxy.wait_ready().await;
    let connected = r#"remora_control_plane_connected "#;
    assert_eq!(proxy.metric(connected).await, 1.0);

    // A broken file changes nothing.
    std::fs::write(&tokens, format!("{TOKENS}short spiffe://cluster.local/ns/shop/sa/x\n")).unwrap();
    eventually("the broken file is refused", Duration::from_secs(5), || async {
        plane.metric(r#"remora_control_source_loads_total{source="tokens",result="error"}"#) >= 1.0
    })
    .await;
    assert_eq!(plane.metric("remora_control_connected_proxies"), 1.0);
    assert_eq!(plane.metric("remora_control_streams_revoked_total"), 0.0);

    // web's token goes: its stream closes, and its reconnects are refused.
    let without_web: String =
        TOKENS.lines().filter(|l| !l.starts_with("web-token")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&tokens, &without_web).unwrap();
    eventually("the stream is closed", Duration::from_secs(5), || async {
        plane.metric("remora_control_streams_revoked_total") == 1.0
            && plane.metric("remora_control_connected_proxies") == 0.0
    })
    .await;
    eventually("the reconnect is refused", Duration::from_secs(5), || async {
        plane.metric("remora_control_streams_refused_total") >= 1.0 && proxy.metric(connected).await == 0.0
    })
    .await;
    assert_eq!(
        Client::http1(proxy.address("out")).await.get("app", "/").await.status,
        200,
        "the proxy serves on from its last configuration"
    );

    // Back again: the next reconnect is let in.
    std::fs::write(&tokens, TOKENS).unwrap();
    eventually("the proxy is back", Duration::from_secs(20), || async {
        plane.metric("remora_control_connected_proxies") == 1.0 && proxy.metric(connected).await == 1.0
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Halfway through a root rotation: the receiving sidecar still has a certificate from the old
/// root (and trusts both, as the rotation's first step gave it), the calling one gets its
/// certificate from the control plane's new root, whose trust bundle also carries the old root
/// (`--ca-trust`). Both handshakes succeed; without the old root in the bundle, the caller refuses
/// the receiving sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_on_the_old_and_the_new_root_talk_during_a_root_rotation() {
    let mut plane = TestControlPlane::start_with_ca(&[], "cluster.local", TOKENS);
    let dir = temp_dir("remora-root-rotation");
    let old = TestCa::new("cluster.local");
    let old_root = dir.join("old-root.pem");
    std::fs::write(&old_root, old.issue(API).ca).unwrap();
    let app = HttpServer::start("api-app").await;
    let echo = TcpEchoServer::start().await;
    // The receiving sidecar: an old-root certificate, trusting the old root and the new one.
    let server_identity = old.issue(API).bootstrap_identity(&dir.join("api"));
    let bundle = format!("{}{}", std::fs::read_to_string(&old_root).unwrap(), plane.ca_root_pem());
    std::fs::write(dir.join("api").join("ca.pem"), bundle).unwrap();
    let server = TestProxy::start(&server_yaml(&server_identity, app.address(), echo.address(), ""));
    let caller = |plane: &TestControlPlane, name: &str| {
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, "web-token-0123456789").unwrap();
        let identity = format!(
            "  identity:\n    spiffe_id: {WEB}\n    token_file: {}\n    ca_address: {}\n",
            token_file.display(),
            plane.url()
        );
        TestProxy::start(&client_yaml(&identity, server.address("in"), server.address("in-tcp"), ""))
    };

    // Without the old root in the bundle, the new-root caller cannot trust the old-root sidecar.
    let strict = caller(&plane, "strict");
    strict.wait_ready().await;
    let refused = Client::http1(strict.address("out")).await.get("api", "/").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("x-remora-error"), "upstream_tls");

    plane.trust_extra_roots(&old_root);
    let rotating = caller(&plane, "rotating");
    rotating.wait_ready().await;
    let reply = Client::http1(rotating.address("out")).await.get("api", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-seen-client-identity"), WEB);
    assert_eq!(echo_through(rotating.address("out-tcp"), b"rotate").await.unwrap(), b"rotate");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CA that signs with an intermediate (its root kept elsewhere): the control plane's chain file
/// holds the intermediate then the root, each proxy's certificate comes with the intermediate, the
/// trust bundle is the root alone, and the sidecars verify each other through the intermediate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_with_certificates_from_an_intermediate_ca_talk() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use rustls::pki_types::pem::PemObject as _;

    let mut plane = TestControlPlane::start_with_ca(&[], "cluster.local", TOKENS);
    let ca = |name: &str| {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        params
    };
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root = ca("Offline root").self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(ca("Offline root"), root_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let intermediate = ca("Mesh intermediate").signed_by(&key, &root_issuer).unwrap();
    let ca_dir = plane.dir().join("ca");
    std::fs::write(ca_dir.join("ca.crt"), format!("{}{}", intermediate.pem(), root.pem())).unwrap();
    std::fs::write(ca_dir.join("ca.key"), key.serialize_pem()).unwrap();
    plane.restart();

    let dir = temp_dir("remora-intermediate");
    let app = HttpServer::start("api-app").await;
    let echo = TcpEchoServer::start().await;
    let (server, client) = ca_pair(&plane, &dir, app.address(), echo.address(), "3600s");
    server.wait_ready().await;
    client.wait_ready().await;
    let reply = Client::http1(client.address("out")).await.get("api", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-seen-client-identity"), WEB);
    assert_eq!(echo_through(client.address("out-tcp"), b"chain").await.unwrap(), b"chain");
    // What the CA hands out: the leaf and the intermediate; the root alone to trust.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let id = remora_control_api::identity::SpiffeId::parse(WEB).unwrap();
    let csr = remora_control_api::ca::certificate_request(&id, &key).unwrap();
    let (ttl, timeout) = (Duration::from_secs(3600), Duration::from_secs(10));
    let signed =
        remora_control_api::ca::sign(&plane.url(), None, "web-token-0123456789", csr, ttl, timeout).await.unwrap();
    let der = |pem: &str| rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    assert_eq!(signed.certificate_chain.len(), 2);
    assert_eq!(der(&signed.certificate_chain[1]), der(&intermediate.pem()));
    assert_eq!(signed.trust_bundle.len(), 1);
    assert_eq!(der(&signed.trust_bundle[0]), der(&root.pem()), "the intermediate is not a trust anchor");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `CONNECT` to a mesh cluster: the calling sidecar answers 200 and carries the tunnel as opaque
/// TCP inside mTLS to the endpoint's sidecar, which passes it to its app; the bytes the client
/// writes into the tunnel reach the app as they were (here, a plain HTTP/1.1 request).
#[tokio::test]
async fn a_connect_tunnel_crosses_mutual_tls() {
    let pair = pair("", "").await;
    let mut tunnel = TcpStream::connect(pair.client.address("out")).await.unwrap();
    tunnel.write_all(b"CONNECT api.shop:443 HTTP/1.1\r\nHost: api.shop:443\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tunnel.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    tunnel.write_all(b"GET /hello HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("x-served-by: api-app"), "{answer}");
    assert_eq!(pair.app.hits(), 1);
    assert!(pair.server.metric(r#"remora_tls_handshakes_total{direction="inbound",result="ok"}"#).await >= 1.0);
}
