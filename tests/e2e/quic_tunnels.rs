//! HBONE over QUIC between two Remora sidecars on loopback: opaque TCP rides `CONNECT` tunnels on
//! one pooled QUIC connection (mutual TLS both ways, one handshake for every tunnel), half-closes
//! pass, a port the peer may not reach is refused; a peer of the wrong identity gets no tunnel and
//! no fallback; a QUIC port that never answers sends connections over HBONE after the cluster's
//! `connect_timeout`, the next ones at once, and QUIC is used again once it answers; certificate
//! files rotated mid-traffic fail no connection. (`capture_quic` drops UDP with iptables in a
//! network namespace.)

use std::net::SocketAddr;
use std::time::Duration;

use remora_proxy::testing::TestProxy;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::hbone::{OPS, Sidecar, WEB, sidecar_with};

/// The receiving sidecar of `hbone`'s tests, with an HBONE-over-QUIC listener beside its HBONE one.
async fn receiving_sidecar() -> Sidecar {
    sidecar_with(&crate::listener(
        "hbone-quic",
        ", direction: inbound, protocol: hbone_quic, inbound_listener: inbound",
    ))
    .await
}

/// A calling sidecar of identity `identity` whose TCP listener `out` sends to `target` through a
/// mesh cluster with `transport` (`quic_port: ..., hbone_port: ...`).
fn caller(side: &Sidecar, identity: &str, target: SocketAddr, transport: &str) -> TestProxy {
    let dir = side.dir.join(identity.rsplit('/').next().unwrap_or("caller"));
    let bootstrap = side.ca.issue(identity).bootstrap_identity(&dir);
    TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n{bootstrap}---\nresources:\n{}{}",
        crate::cluster("api", &format!(", tls: mesh, connect_timeout: 0.3s, {transport}"), &[target]),
        crate::listener("out", ", protocol: tcp, default_cluster: api"),
    ))
}

/// A cluster's transport fields for `side`: QUIC to its `hbone-quic` listener, falling back to its
/// HBONE listener, and `more`.
fn both_transports(side: &Sidecar, more: &str) -> String {
    let (quic, hbone) = (side.proxy.address("hbone-quic").port(), side.proxy.address("hbone").port());
    format!("quic_port: {quic}, hbone_port: {hbone}{more}")
}

/// One HTTP/1.1 request through `out`; the whole answer (empty when the connection was closed).
async fn request(out: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(out).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response).to_ascii_lowercase()
}

fn tunnels(listener: &str, result: &str) -> String {
    format!("remora_listener_tunnels_total{{listener=\"{listener}\",result=\"{result}\"}}")
}

fn upstream(result: &str) -> String {
    format!("remora_upstream_tunnels_total{{cluster=\"api\",result=\"{result}\"}}")
}

#[tokio::test]
async fn opaque_tcp_between_two_sidecars_rides_one_quic_connection() {
    let side = receiving_sidecar().await;
    let transport = both_transports(&side, "");
    let web = caller(&side, WEB, side.app.address(), &transport);
    let mut handles = Vec::new();
    for i in 0..20 {
        let out = web.address("out");
        handles.push(tokio::spawn(async move { request(out, &format!("/{i}")).await }));
    }
    for handle in handles {
        let response = handle.await.unwrap();
        assert!(response.contains("hello from api-app"), "{response}");
    }
    assert_eq!(side.app.hits(), 20);
    assert_eq!(side.proxy.metric(&tunnels("hbone-quic", "opened")).await, 20.0);
    assert_eq!(side.proxy.metric(&tunnels("hbone", "opened")).await, 0.0, "nothing fell back");
    let handshakes = "remora_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}";
    assert_eq!(side.proxy.metric(handshakes).await, 1.0, "twenty tunnels, one mutual TLS handshake");
    let connections = "remora_listener_connections_total{listener=\"hbone-quic\",direction=\"inbound\"}";
    assert_eq!(side.proxy.metric(connections).await, 1.0);
    assert_eq!(web.metric(&upstream("opened")).await, 20.0);
    assert_eq!(web.metric(&upstream("fallback")).await, 0.0);
    // The workers' sweeps, once a second, count the connection's packets and its path.
    remora_proxy::testing::eventually("the QUIC path counted", Duration::from_secs(3), || async {
        web.metric("remora_upstream_quic_paths{state=\"connected\"}").await == 1.0
            && web.metric("remora_upstream_quic_packets_total{result=\"sent\"}").await > 0.0
    })
    .await;

    // The echo server's port is open to `ops` only: `web` is refused there (401 on the CONNECT).
    let refused = caller(&side, WEB, side.echo.address(), &transport);
    assert_eq!(request(refused.address("out"), "/").await, "");
    assert_eq!(refused.metric(&upstream("refused")).await, 1.0);
    // `ops` reaches it, and a half-close crosses the tunnel both ways.
    let ops = caller(&side, OPS, side.echo.address(), &transport);
    let mut stream = tokio::net::TcpStream::connect(ops.address("out")).await.unwrap();
    stream.write_all(b"ping\n").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(echoed, "ping\n");
    assert_eq!(ops.metric(&upstream("opened")).await, 1.0);
}

#[tokio::test]
async fn a_peer_of_the_wrong_identity_gets_no_tunnel_and_no_fallback() {
    let side = receiving_sidecar().await;
    let transport = both_transports(&side, &format!(", peer_identities: [\"{OPS}\"]"));
    let wary = caller(&side, WEB, side.app.address(), &transport);
    assert_eq!(request(wary.address("out"), "/").await, "", "closed without a byte");
    assert_eq!(side.app.hits(), 0);
    assert_eq!(wary.metric("remora_tls_handshakes_total{direction=\"outbound\",result=\"identity\"}").await, 1.0);
    assert_eq!(wary.metric(&upstream("failed")).await, 1.0);
    assert_eq!(wary.metric(&upstream("fallback")).await, 0.0, "the wrong peer is no reason to try TCP");
}

#[tokio::test]
async fn a_silent_quic_port_falls_back_to_hbone_until_quic_answers_again() {
    let side = receiving_sidecar().await;
    // A UDP port that takes datagrams and never answers: what a path that drops UDP looks like.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic_port = silent.local_addr().unwrap().port();
    let transport = format!("quic_port: {quic_port}, hbone_port: {}", side.proxy.address("hbone").port());
    let web = caller(&side, WEB, side.app.address(), &transport);
    for i in 0..5 {
        let response = request(web.address("out"), &format!("/{i}")).await;
        assert!(response.contains("hello from api-app"), "over HBONE: {response}");
    }
    assert_eq!(side.proxy.metric(&tunnels("hbone", "opened")).await, 5.0);
    assert_eq!(web.metric(&upstream("fallback")).await, 5.0, "the first after its timeout, the rest at once");
    assert_eq!(web.metric(&upstream("opened")).await, 5.0);

    // QUIC answers on that port now (the receiving sidecar's listener moves there): a probe finds
    // it, and connections ride QUIC again.
    drop(silent);
    let moved = side.proxy.config_path().to_owned();
    let yaml = std::fs::read_to_string(&moved).unwrap().replace(
        "name: hbone-quic, address: \"127.0.0.1:0\"",
        &format!("name: hbone-quic, address: \"127.0.0.1:{quic_port}\""),
    );
    side.proxy.rewrite(&yaml);
    side.proxy.reload().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while side.proxy.metric(&tunnels("hbone-quic", "opened")).await == 0.0 {
        assert!(std::time::Instant::now() < deadline, "QUIC was not used again");
        let response = request(web.address("out"), "/again").await;
        assert!(response.contains("hello from api-app"), "{response}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, clusters) = web.admin_get("/clusters").await;
    let clusters: Value = serde_json::from_str(&clusters).unwrap();
    assert_eq!(clusters["clusters"][0]["transport"], "quic", "{clusters}");
}

#[tokio::test]
async fn certificates_rotated_mid_traffic_fail_no_connection() {
    let side = receiving_sidecar().await;
    let transport = both_transports(&side, "");
    let web = caller(&side, WEB, side.app.address(), &transport);
    let out = web.address("out");
    let traffic = tokio::spawn(async move {
        let mut failures = Vec::new();
        for i in 0..60 {
            let response = request(out, &format!("/{i}")).await;
            if !response.contains("hello from api-app") {
                failures.push(response);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        failures
    });
    // Both sides' certificates are re-issued while the requests flow.
    tokio::time::sleep(Duration::from_millis(300)).await;
    side.ca.issue(crate::hbone::API).write(&side.dir.join("api"));
    side.ca.issue(WEB).write(&side.dir.join("web"));
    let failures = traffic.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let renewed = "remora_identity_renewals_total{result=\"ok\"}";
    assert!(side.proxy.metric(renewed).await >= 1.0, "the receiving side took its new certificate");
    assert!(web.metric(renewed).await >= 1.0, "and so did the caller");
}

/// In a network namespace of its own (root): iptables drops the UDP to the receiving sidecar's QUIC
/// port while connections flow, and they move to HBONE; when the rule goes, they move back.
#[test]
fn udp_dropped_by_iptables_moves_tunnels_to_hbone_and_back() {
    if !crate::netns::can_run("udp_dropped_by_iptables_moves_tunnels_to_hbone_and_back") {
        return;
    }
    let ns = crate::netns::Netns::create("quic");
    let inside = ns.borrow();
    ns.enter(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async move {
            let side = receiving_sidecar().await;
            let quic_port = side.proxy.address("hbone-quic").port();
            let transport = format!("quic_port: {quic_port}, hbone_port: {}", side.proxy.address("hbone").port());
            let web = caller(&side, WEB, side.app.address(), &transport);
            let out = web.address("out");
            assert!(request(out, "/quic").await.contains("hello from api-app"));
            assert_eq!(side.proxy.metric(&tunnels("hbone-quic", "opened")).await, 1.0);

            let rule = ["INPUT", "-p", "udp", "--dport", &quic_port.to_string(), "-j", "DROP"];
            inside.run("iptables", &[&["-A"][..], &rule[..]].concat());
            for i in 0..5 {
                let response = request(out, &format!("/dropped/{i}")).await;
                assert!(response.contains("hello from api-app"), "over HBONE while UDP is dropped: {response}");
            }
            assert_eq!(side.proxy.metric(&tunnels("hbone", "opened")).await, 5.0);
            assert_eq!(web.metric(&upstream("fallback")).await, 5.0);
            // The workers report their paths every second.
            let path_state = || async {
                let (_, clusters) = web.admin_get("/clusters").await;
                let clusters: Value = serde_json::from_str(&clusters).unwrap();
                clusters["quic_paths"][0]["state"].as_str().unwrap_or("").to_owned()
            };
            remora_proxy::testing::eventually("the path reported as fallen back", Duration::from_secs(3), || async {
                path_state().await == "fallback"
            })
            .await;

            inside.run("iptables", &[&["-D"][..], &rule[..]].concat());
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while side.proxy.metric(&tunnels("hbone-quic", "opened")).await < 2.0 {
                assert!(std::time::Instant::now() < deadline, "QUIC was not used again once UDP passed");
                assert!(request(out, "/again").await.contains("hello from api-app"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            remora_proxy::testing::eventually("the path reported as connected", Duration::from_secs(3), || async {
                path_state().await == "connected"
            })
            .await;
        });
    });
}

/// Handshakes without a mesh certificate, or with one from another CA, are refused (counted), and a
/// flood of them and of junk datagrams leaves the listener serving a real peer.
#[tokio::test]
async fn strangers_and_junk_are_refused_and_the_listener_keeps_serving() {
    use remora_proxy::testing::h3::mesh_handshake;
    let side = receiving_sidecar().await;
    let quic = side.proxy.address("hbone-quic");
    let member = side.ca.issue(WEB);
    assert!(mesh_handshake(quic, Some((&member.cert, &member.key))).await, "a mesh peer is accepted");
    let outsider = remora_control_plane::testing::TestCa::new("cluster.local").issue(WEB);
    assert!(!mesh_handshake(quic, Some((&outsider.cert, &outsider.key))).await, "another CA's certificate");
    let mut handshakes = Vec::new();
    for _ in 0..30 {
        handshakes.push(tokio::spawn(async move { mesh_handshake(quic, None).await }));
    }
    for handshake in handshakes {
        assert!(!handshake.await.unwrap(), "no client certificate");
    }
    // Counted when the server's side of each handshake ends, which the client may hear of first.
    let refused = "remora_tls_handshakes_total{direction=\"inbound\",result=\"handshake\"}";
    remora_proxy::testing::eventually("31 refused handshakes counted", Duration::from_secs(5), || async {
        side.proxy.metric(refused).await >= 31.0
    })
    .await;
    crate::junk_datagrams(quic, 2000, 11).await;
    let transport = format!("quic_port: {}", quic.port());
    let web = caller(&side, WEB, side.app.address(), &transport);
    assert!(request(web.address("out"), "/after").await.contains("hello from api-app"));
    assert_eq!(side.proxy.metric(&tunnels("hbone-quic", "opened")).await, 1.0);
}
