//! HBONE in, against a client written apart from Remora (`hbone_client.py`: Python's `ssl` and the
//! `h2` package, as ztunnel would connect): mutual TLS with certificates from the test's CA, one
//! connection carrying many CONNECT tunnels, HTTP inside a tunnel served by the inbound pipeline
//! (the app sees the caller's identity) and opaque TCP relayed; refusals with ztunnel's statuses
//! (no certificate, an untrusted one, a denied identity, a misdirected or malformed CONNECT); a
//! flood of opened-and-reset streams leaves the listener serving.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use remora_control_plane::testing::TestCa;
use remora_proxy::testing::proxy::temp_dir;
use remora_proxy::testing::{BannerServer, HttpServer, TcpEchoServer, TestProxy, eventually};
use serde_json::{Value, json};

pub(crate) const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub(crate) const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
pub(crate) const OPS: &str = "spiffe://cluster.local/ns/ops/sa/admin";

/// Whether the independent client can run here; says why not when it cannot.
pub(crate) fn python_h2() -> bool {
    let found = Command::new("python3").args(["-c", "import h2"]).output().is_ok_and(|out| out.status.success());
    if !found {
        eprintln!("skipped: needs python3 with the h2 package (pip install h2; .ci/run installs it)");
    }
    found
}

/// A sidecar (identity `api`) whose HBONE listener's tunnels are served by its inbound listener,
/// which passes them through to their target, with a policy on the inbound listener: the app's port
/// is open to `web`, the echo server's only to `ops`.
pub(crate) struct Sidecar {
    pub(crate) proxy: TestProxy,
    pub(crate) app: HttpServer,
    pub(crate) echo: TcpEchoServer,
    pub(crate) ca: TestCa,
    pub(crate) dir: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn sidecar() -> Sidecar {
    sidecar_with("").await
}

/// The same sidecar with `more` resources.
pub(crate) async fn sidecar_with(more: &str) -> Sidecar {
    let ca = TestCa::new("cluster.local");
    let dir = temp_dir("remora-hbone");
    let app = HttpServer::start("api-app").await;
    let echo = TcpEchoServer::start().await;
    let identity = ca.issue(API).bootstrap_identity(&dir.join("api"));
    let yaml = format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  drain_time: 1s\n{identity}---\nresources:\n\
         {}{}  - {{kind: Cluster, name: passthrough, original_destination: true}}\n\
         {}\
         {}{more}",
        crate::listener("hbone", ", direction: inbound, protocol: hbone, inbound_listener: inbound"),
        // A detection timeout no test waits out: a tunnel said to be opaque must not be read first.
        crate::listener("inbound", ", direction: inbound, default_cluster: passthrough, detect_timeout: 60s"),
        policy("app", app.address().port(), WEB),
        policy("echo", echo.address().port(), OPS),
    );
    let proxy = TestProxy::start(&yaml);
    Sidecar { proxy, app, echo, ca, dir }
}

fn policy(name: &str, port: u16, allow: &str) -> String {
    format!("  - {{kind: AuthorizationPolicy, name: {name}, listener: inbound, port: {port}, allow: [\"{allow}\"]}}\n")
}

/// Runs the independent client against `address` as the holder of `credentials` (cert, key and
/// trust bundle paths; no cert and key: none presented) with `tunnels`.
fn hbone_client(address: SocketAddr, credentials: (Option<&Path>, Option<&Path>, &Path), tunnels: Value) -> Value {
    let (cert, key, ca) = credentials;
    let spec = json!({"address": address.to_string(), "ca": ca, "cert": cert, "key": key, "tunnels": tunnels});
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/hbone_client.py");
    let out = Command::new("python3").arg(script).arg(spec.to_string()).output().unwrap();
    assert!(out.status.success(), "hbone client failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn http_tunnel(target: SocketAddr) -> Value {
    json!({"authority": target.to_string(), "send": "GET / HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n"})
}

/// Runs the client on a blocking thread, so the test's servers keep serving meanwhile.
async fn run_client(address: SocketAddr, identity: &Path, ca: &Path, tunnels: Value) -> Value {
    let (cert, key, ca) = (identity.join("cert.pem"), identity.join("key.pem"), ca.to_owned());
    tokio::task::spawn_blocking(move || hbone_client(address, (Some(&cert), Some(&key), &ca), tunnels)).await.unwrap()
}

#[tokio::test]
async fn tunnels_from_an_independent_client_share_one_connection_and_reach_the_app_through_the_inbound_pipeline() {
    if !python_h2() {
        return;
    }
    let side = sidecar().await;
    let web = side.dir.join("web");
    side.ca.issue(WEB).write(&web);
    let ca = web.join("ca.pem");
    let mut tunnels: Vec<Value> = (0..6).map(|_| http_tunnel(side.app.address())).collect();
    for i in 0..2 {
        tunnels.push(json!({"authority": side.echo.address().to_string(), "send": format!("ping {i}\n")}));
    }
    // The echo server's port is open to `ops` only: from `web`, the two opaque tunnels are denied.
    let result = run_client(side.proxy.address("hbone"), &web, &ca, Value::Array(tunnels)).await;
    assert_eq!(result["error"], Value::Null, "{result}");
    for tunnel in result["tunnels"].as_array().unwrap()[..6].iter() {
        assert_eq!(tunnel["status"], 200, "{result}");
        let data = tunnel["data"].as_str().unwrap().to_ascii_lowercase();
        assert!(data.starts_with("http/1.1 200"), "{data}");
        assert!(data.contains("hello from api-app"), "{data}");
        assert!(
            data.contains(&format!("x-seen-client-identity: {WEB}")),
            "the inbound pipeline named the caller: {data}"
        );
        assert_eq!(tunnel["end"], "end", "{result}");
    }
    for tunnel in result["tunnels"].as_array().unwrap()[6..].iter() {
        assert_eq!(tunnel["status"], 401, "{result}");
    }
    assert_eq!(side.app.hits(), 6);
    let handshakes = "remora_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}";
    assert_eq!(side.proxy.metric(handshakes).await, 1.0, "one mutual TLS handshake for every tunnel");
    assert_eq!(side.proxy.metric("remora_listener_tunnels_total{listener=\"hbone\",result=\"opened\"}").await, 6.0);
    assert_eq!(side.proxy.metric("remora_listener_tunnels_total{listener=\"hbone\",result=\"denied\"}").await, 2.0);

    // `ops` may reach the echo server: opaque TCP through the tunnel, half-close honoured.
    let ops = side.dir.join("ops");
    side.ca.issue(OPS).write(&ops);
    let tunnels = json!([{"authority": side.echo.address().to_string(), "send": "ping\n"}]);
    let result = run_client(side.proxy.address("hbone"), &ops, &ca, tunnels).await;
    let tunnel = &result["tunnels"][0];
    assert_eq!((&tunnel["status"], &tunnel["data"], &tunnel["end"]), (&json!(200), &json!("ping\n"), &json!("end")));
}

#[tokio::test]
async fn hbone_refuses_bad_peers_and_bad_connects_and_keeps_serving() {
    if !python_h2() {
        return;
    }
    let side = sidecar().await;
    let address = side.proxy.address("hbone");
    let web = side.dir.join("web");
    side.ca.issue(WEB).write(&web);
    let ca = web.join("ca.pem");
    let app = side.app.address();

    // No client certificate, and one from a CA the mesh does not trust: no tunnel opens.
    let tunnels = json!([http_tunnel(app)]);
    let (spec_ca, spec_tunnels) = (ca.clone(), tunnels.clone());
    let anonymous = tokio::task::spawn_blocking(move || hbone_client(address, (None, None, &spec_ca), spec_tunnels));
    let anonymous = anonymous.await.unwrap();
    assert_ne!(anonymous["error"], Value::Null, "{anonymous}");
    assert_eq!(anonymous["tunnels"][0]["status"], Value::Null, "{anonymous}");
    let stranger = side.dir.join("stranger");
    let other = TestCa::new("cluster.local");
    other.issue(WEB).write(&stranger);
    let forged = run_client(address, &stranger, &ca, tunnels).await;
    assert_ne!(forged["error"], Value::Null, "{forged}");
    assert_eq!(forged["tunnels"][0]["status"], Value::Null, "{forged}");

    // On one connection: a port the policy keeps from this peer, an address that is not this
    // host's, a name instead of an address, a request that is not a CONNECT, a stream reset as soon
    // as it opened; then a good tunnel still gets through.
    let tunnels = json!([
        {"authority": side.echo.address().to_string(), "send": "ping\n"},
        {"authority": format!("10.1.2.3:{}", app.port())},
        {"authority": format!("api.shop.svc:{}", app.port())},
        {"authority": app.to_string(), "method": "GET"},
        {"authority": app.to_string(), "reset": true},
        http_tunnel(app),
    ]);
    let result = run_client(address, &web, &ca, tunnels).await;
    assert_eq!(result["error"], Value::Null, "{result}");
    let statuses: Vec<Value> = result["tunnels"].as_array().unwrap().iter().map(|t| t["status"].clone()).collect();
    assert_eq!(statuses, [json!(401), json!(400), json!(400), json!(400), Value::Null, json!(200)], "{result}");
    assert!(result["tunnels"][5]["data"].as_str().unwrap().contains("hello from api-app"), "{result}");
    for (result, count) in [("denied", 1.0), ("misdirected", 1.0), ("bad_request", 2.0)] {
        let series = format!("remora_listener_tunnels_total{{listener=\"hbone\",result=\"{result}\"}}");
        assert_eq!(side.proxy.metric(&series).await, count, "{series}");
    }
    let ok = side.proxy.metric("remora_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}").await;
    assert_eq!(ok, 1.0, "only the good peer's handshake succeeded");

    // A flood of tunnels opened and reset at once, and of refused ones: whether the connection is
    // told to go away (hyper's guard against rapid resets) or not, the listener answers the next
    // good tunnel as before, and holds no tunnel open.
    let flood: Vec<Value> = (0..400)
        .map(|i| match i % 2 {
            0 => json!({"authority": app.to_string(), "reset": true}),
            _ => json!({"authority": "10.9.9.9:1"}),
        })
        .collect();
    run_client(address, &web, &ca, Value::Array(flood)).await;
    let result = run_client(address, &web, &ca, json!([http_tunnel(app)])).await;
    assert_eq!(result["tunnels"][0]["status"], 200, "{result}");
    let active = "remora_listener_tunnels_active{listener=\"hbone\",direction=\"inbound\"}";
    eventually("no tunnel left open", Duration::from_secs(5), || async { side.proxy.metric(active).await == 0.0 })
        .await;
}

/// Opaque TCP from one Remora sidecar to another over HBONE: every connection a tunnel on one
/// pooled connection (one handshake for all of them), relayed unread at the far end as the caller
/// says it is opaque, an HTTP CONNECT the caller answers riding a tunnel too, and a peer that is
/// not who the cluster expects gets no tunnel.
#[tokio::test]
async fn opaque_tcp_between_two_sidecars_rides_pooled_hbone_tunnels() {
    let side = sidecar().await;
    let hbone_port = side.proxy.address("hbone").port();
    let web = side.ca.issue(WEB).bootstrap_identity(&side.dir.join("web"));
    let banner = BannerServer::start(b"220 banner\r\n").await;
    let caller = |peers: &str| {
        let hbone = format!(", tls: mesh, hbone_port: {hbone_port}{peers}");
        format!(
            "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n{web}---\nresources:\n{}{}{}{}{}",
            crate::cluster("api", &hbone, &[side.app.address()]),
            crate::cluster("banner", &hbone, &[banner.address()]),
            crate::listener("out", ", protocol: tcp, default_cluster: api"),
            crate::listener("out-banner", ", protocol: tcp, default_cluster: banner"),
            crate::listener("web", ", protocol: http1, default_cluster: api"),
        )
    };
    let client = TestProxy::start(&caller(""));
    let mut handles = Vec::new();
    for i in 0..20 {
        let out = client.address("out");
        handles.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(out).await.unwrap();
            let request = format!("GET /{i} HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n");
            tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes()).await.unwrap();
            let mut response = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response).await.unwrap();
            response
        }));
    }
    for handle in handles {
        let response = handle.await.unwrap().to_ascii_lowercase();
        assert!(response.contains("hello from api-app"), "{response}");
        // Opaque TCP on the calling side, said so on the CONNECT: relayed unread on this one too.
        assert!(!response.contains("x-seen-client-identity"), "{response}");
    }
    let ok = "remora_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}";
    assert_eq!(side.proxy.metric(ok).await, 1.0, "twenty tunnels, one handshake");
    assert_eq!(side.proxy.metric("remora_listener_tunnels_total{listener=\"hbone\",result=\"opened\"}").await, 20.0);
    assert_eq!(side.app.hits(), 20);
    // A server that speaks first is heard at once: the far end does not wait to classify.
    let mut stream = tokio::net::TcpStream::connect(client.address("out-banner")).await.unwrap();
    let mut heard = [0_u8; 12];
    let read = tokio::io::AsyncReadExt::read_exact(&mut stream, &mut heard);
    tokio::time::timeout(Duration::from_secs(5), read).await.expect("the banner, unasked").unwrap();
    assert_eq!(&heard, b"220 banner\r\n");
    drop(stream);

    // An HTTP CONNECT the caller's sidecar answers itself rides a tunnel too.
    let mut stream = tokio::net::TcpStream::connect(client.address("web")).await.unwrap();
    let connect = "CONNECT api:80 HTTP/1.1\r\nhost: api:80\r\n\r\nGET /via-connect HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut stream, connect.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("hello from api-app"), "{response}");
    assert_eq!(side.proxy.metric("remora_listener_tunnels_total{listener=\"hbone\",result=\"opened\"}").await, 22.0);
    let (_, clusters) = client.admin_get("/clusters").await;
    let clusters: Value = serde_json::from_str(&clusters).unwrap();
    assert_eq!(clusters["clusters"][0]["transport"], "hbone", "/clusters says how the cluster is reached: {clusters}");

    // A cluster that expects another identity: the pooled connection is not used, no new one is
    // accepted, and the connection is closed without a byte.
    let wary = TestProxy::start(&caller(&format!(", peer_identities: [\"{OPS}\"]")));
    let mut stream = tokio::net::TcpStream::connect(wary.address("out")).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET / HTTP/1.1\r\nhost: api\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response).await;
    assert!(response.is_empty(), "{}", String::from_utf8_lossy(&response));
    assert_eq!(side.app.hits(), 21);
    let refused = "remora_tls_handshakes_total{direction=\"outbound\",result=\"identity\"}";
    assert_eq!(wary.metric(refused).await, 1.0);
    let tunnels = |result: &str| format!("remora_upstream_tunnels_total{{cluster=\"api\",result=\"{result}\"}}");
    assert_eq!(wary.metric(&tunnels("failed")).await, 1.0);
    assert_eq!(client.metric(&tunnels("opened")).await, 21.0, "twenty connections and a CONNECT");
    assert_eq!(client.metric(&tunnels("failed")).await, 0.0);
}

/// More TCP connections open at once than an HTTP/2 connection's usual stream limit: every one
/// gets its tunnel at once, none waits for another to close, on pooled HBONE connections of 100
/// tunnels each.
#[tokio::test]
async fn more_tunnels_open_at_once_than_http2s_stream_limit() {
    let side = sidecar().await;
    let hbone_port = side.proxy.address("hbone").port();
    // The echo server's port admits `ops` only.
    let ops = side.ca.issue(OPS).bootstrap_identity(&side.dir.join("ops"));
    let client = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n{ops}---\nresources:\n{}{}",
        crate::cluster("echo", &format!(", tls: mesh, hbone_port: {hbone_port}"), &[side.echo.address()]),
        crate::listener("out", ", protocol: tcp, default_cluster: echo"),
    ));
    let mut open = Vec::new();
    for i in 0..600_u32 {
        let mut stream = tokio::net::TcpStream::connect(client.address("out")).await.unwrap();
        let sent = i.to_be_bytes();
        tokio::io::AsyncWriteExt::write_all(&mut stream, &sent).await.unwrap();
        let mut back = [0_u8; 4];
        let echoed = tokio::io::AsyncReadExt::read_exact(&mut stream, &mut back);
        let echoed = tokio::time::timeout(Duration::from_secs(5), echoed).await;
        echoed.unwrap_or_else(|_| panic!("tunnel {i} was not opened within 5 s")).unwrap();
        assert_eq!(back, sent);
        open.push(stream);
    }
    let ok = "remora_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}";
    assert_eq!(side.proxy.metric(ok).await, 6.0, "600 tunnels, six connections");
    let active = "remora_listener_tunnels_active{listener=\"hbone\",direction=\"inbound\"}";
    assert_eq!(side.proxy.metric(active).await, 600.0);
}
