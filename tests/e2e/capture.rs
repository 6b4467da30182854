//! `remora init` end to end, as root, in network namespaces the test creates: a "pod" namespace with
//! an app, the proxy on its built-in defaults running as uid 1337, and the capture rules `remora init`
//! installs; a "remote" namespace across a veth pair. The app and the remote client connect as if
//! there were no mesh, and the test asserts what went through the proxy (its listener counters and
//! the peer address each server saw): outbound and inbound connections are captured, the proxy's own
//! upstream connections are not captured again (no loop), the excluded ports and the admin port
//! bypass it, a pod calling itself goes straight to itself, and `--cleanup` removes exactly what was
//! installed. The pod is dual-stack: its IPv6 TCP is captured too, with no flag asked for, by the
//! built-in defaults' IPv6 addresses of the same two listeners.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use crate::netns::{self, Netns, exchange};

const POD_IP: &str = "10.79.0.1";
const REMOTE_IP: &str = "10.79.0.2";
const POD_IP6: &str = "fd00:79::1";
const REMOTE_IP6: &str = "fd00:79::2";

/// Serves `socket` on a thread: each connection is read to its end and answered with the peer's IP
/// address and what it sent, so the test sees who connected.
fn serve_peer_reporter(socket: TcpListener) {
    std::thread::spawn(move || {
        for stream in socket.incoming() {
            let Ok(mut stream) = stream else { return };
            let peer = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            let mut sent = String::new();
            let _ = stream.read_to_string(&mut sent);
            let _ = stream.write_all(format!("{peer} {sent}").as_bytes());
        }
    });
}

fn address(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

#[test]
fn init_captures_a_pods_traffic_through_the_proxy_and_cleanup_removes_it() {
    if !netns::can_run("the capture test") {
        return;
    }
    let pod = Netns::create("pod");
    let remote = Netns::create("remote");
    // A veth pair between them, as a pod's eth0 and the node's side.
    let [pod_end, remote_end] = netns::link((&pod, "rmp", POD_IP), (&remote, "rmr", REMOTE_IP));
    for (ns, device, ip) in [(&pod, &pod_end, POD_IP6), (&remote, &remote_end, REMOTE_IP6)] {
        ns.run("ip", &["-6", "addr", "add", &format!("{ip}/64"), "dev", device, "nodad"]);
    }

    // The remote services (7001 is excluded from outbound capture) and the app (8081 excluded inbound).
    for port in [7000, 7001] {
        serve_peer_reporter(remote.enter(move || TcpListener::bind(address(REMOTE_IP, port)).unwrap()));
    }
    serve_peer_reporter(remote.enter(|| TcpListener::bind(address(REMOTE_IP6, 7000)).unwrap()));
    for port in [8080, 8081] {
        serve_peer_reporter(pod.enter(move || TcpListener::bind(address("0.0.0.0", port)).unwrap()));
    }
    // The app's IPv6 port.
    serve_peer_reporter(pod.enter(|| TcpListener::bind(address("::", 8090)).unwrap()));

    // A rule of someone else's, which installing and cleaning up must leave alone.
    pod.run("iptables", &["-t", "nat", "-A", "OUTPUT", "-d", "192.0.2.0/24", "-j", "RETURN"]);
    let remora = env!("CARGO_BIN_EXE_remora");
    let init = ["init", "--exclude-outbound-ports", "7001", "--exclude-inbound-ports", "8081"];
    pod.run(remora, &init);
    // Again: the rules are replaced, not added twice.
    pod.run(remora, &init);
    let installed = pod.run("iptables-save", &["-t", "nat"]);
    assert_eq!(installed.matches("-A OUTPUT -p tcp -j REMORA_OUTPUT").count(), 1, "{installed}");
    assert_eq!(installed.matches("-A PREROUTING -p tcp -j REMORA_INBOUND").count(), 1, "{installed}");
    let installed6 = pod.run("ip6tables-save", &["-t", "nat"]);
    assert_eq!(installed6.matches("-A OUTPUT -p tcp -j REMORA_OUTPUT").count(), 1, "a dual-stack pod: {installed6}");

    // The proxy on its built-in defaults, as uid 1337, its admin server on the pod's address.
    let directory = netns::temp_dir("remora-capture");
    let log = directory.join("proxy.log");
    let proxy = pod.spawn_proxy(&directory, &["proxy", "--admin", "0.0.0.0:15000"], &log);

    let from_pod = pod.enter({
        let log = log.clone();
        move || {
            netns::wait_ready(address("127.0.0.1", 15000), &log);
            let captured = exchange(address(REMOTE_IP, 7000), b"outbound");
            let excluded = exchange(address(REMOTE_IP, 7001), b"excluded");
            let to_itself = exchange(address(POD_IP, 8080), b"to itself");
            let captured6 = exchange(address(REMOTE_IP6, 7000), b"outbound6");
            (captured, excluded, to_itself, captured6)
        }
    });
    let from_remote = remote.enter(move || {
        let captured = exchange(address(POD_IP, 8080), b"inbound");
        let excluded = exchange(address(POD_IP, 8081), b"direct");
        let captured6 = exchange(address(POD_IP6, 8090), b"inbound6");
        let logging = exchange(
            address(POD_IP, 15000),
            b"POST /logging?level=debug HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(logging.starts_with("HTTP/1.1 403"), "only the pod itself may change the log filter: {logging}");
        (captured, excluded, netns::metrics(address(POD_IP, 15000)), captured6)
    });
    drop(proxy);
    let proxy_log = std::fs::read_to_string(&log).unwrap_or_default();

    // Outbound: the remote service saw the pod's address either way; the proxy's counters tell.
    assert_eq!(from_pod.0, format!("{POD_IP} outbound"), "{proxy_log}");
    assert_eq!(from_pod.1, format!("{POD_IP} excluded"));
    assert_eq!(from_pod.2, format!("{POD_IP} to itself"));
    assert_eq!(from_pod.3, format!("{POD_IP6} outbound6"), "{proxy_log}");
    // Inbound: through the proxy the app sees the proxy's connection, from the pod's own address;
    // on the excluded port it sees the remote client.
    assert_eq!(from_remote.0, format!("{POD_IP} inbound"), "{proxy_log}");
    assert_eq!(from_remote.1, format!("{REMOTE_IP} direct"));
    assert_eq!(from_remote.3, format!("{POD_IP6} inbound6"), "{proxy_log}");
    let metrics = &from_remote.2;
    // Exactly one connection each way and family: the excluded ports, the call to itself and the
    // admin scrape bypassed the proxy, and the proxy's own upstream connections were not captured
    // again. Each family's connections count under the same listener.
    for (series, expected) in [
        (r#"remora_listener_connections_total{listener="outbound",direction="outbound"} "#, 2.0),
        (r#"remora_listener_connections_total{listener="inbound",direction="inbound"} "#, 2.0),
        (
            r#"remora_upstream_tcp_sent_bytes_total{cluster="passthrough"} "#,
            ("outbound".len() + "inbound".len() + "outbound6".len() + "inbound6".len()) as f64,
        ),
    ] {
        assert_eq!(netns::value(metrics, series), expected, "{series}\n{metrics}");
    }

    pod.run(remora, &["init", "--cleanup"]);
    let left = pod.run("iptables-save", &["-t", "nat"]);
    assert!(!left.contains("REMORA"), "{left}");
    let left6 = pod.run("ip6tables-save", &["-t", "nat"]);
    assert!(!left6.contains("REMORA"), "{left6}");
    assert!(left.contains("-A OUTPUT -d 192.0.2.0/24 -j RETURN"), "{left}");
    // Cleaning up twice is fine.
    pod.run(remora, &["init", "--cleanup"]);
    let _ = std::fs::remove_dir_all(directory);
}

/// Two "pods", each with `remora init`'s rules and a proxy as uid 1337: the client app calls the
/// server's address as if there were no mesh; its sidecar, whose cluster for that address is
/// `tls: mesh` to the original destination, carries the call over mutual TLS; the server's
/// capture rules hand the TLS to its sidecar's inbound listener, which terminates it and passes the
/// request to its app with the caller's identity. This is the Kubernetes path end to end: no
/// endpoint list, the Service address dialled, identities from the pods' certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_captured_pods_talk_over_mutual_tls_without_knowing() {
    if !netns::can_run("the two-pod mTLS capture test") {
        return;
    }
    const CLIENT_IP: &str = "10.81.0.1";
    const SERVER_IP: &str = "10.81.0.2";
    const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/orders";
    let client = Netns::create("mtls-client");
    let server = Netns::create("mtls-server");
    netns::link((&client, "rmc", CLIENT_IP), (&server, "rms", SERVER_IP));
    for ns in [&client, &server] {
        ns.run(env!("CARGO_BIN_EXE_remora"), &["init"]);
    }
    let app_socket = server.enter(|| TcpListener::bind(address("0.0.0.0", 8080)).unwrap());
    let _app = remora_proxy::testing::HttpServer::start_on("orders", app_socket);

    let ca = remora_control_plane::testing::certs::TestCa::new("cluster.local");
    let directory = netns::temp_dir("remora-mtls-capture");
    let files = |id: &str, name: &str| -> Vec<String> {
        let paths = ca.issue(id).write(&directory.join(name));
        paths.iter().map(|p| p.to_str().unwrap().to_owned()).collect()
    };
    let (client_files, server_files) = (files(CLIENT_ID, "client"), files(SERVER_ID, "server"));
    for dir in ["client", "server"] {
        std::fs::set_permissions(directory.join(dir), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    // The client's resources, as a control plane would serve them: the built-in listeners, and a
    // mesh cluster for the server's address.
    let config = directory.join("client.yaml");
    std::fs::write(
        &config,
        format!(
            r#"bootstrap:
  admin_address: 127.0.0.1:15000
  workers: 1
resources:
  - {{kind: Listener, name: outbound, address: "127.0.0.1:15001", direction: outbound, transparent: true, default_cluster: passthrough}}
  - {{kind: Listener, name: inbound, address: "0.0.0.0:15006", direction: inbound, transparent: true, default_cluster: passthrough}}
  - {{kind: Cluster, name: passthrough, original_destination: true}}
  - {{kind: Cluster, name: orders, original_destination: true, tls: mesh, peer_identities: ["{SERVER_ID}"]}}
  - {{kind: RouteTable, name: orders, destinations: ["{SERVER_IP}:8080"], routes: [{{backends: [{{cluster: orders}}]}}]}}
"#
        ),
    )
    .unwrap();
    let tls_args = |f: &[String]| {
        ["--tls-cert".to_owned(), f[0].clone(), "--tls-key".into(), f[1].clone(), "--tls-ca".into(), f[2].clone()]
    };
    let (client_log, server_log) = (directory.join("client.log"), directory.join("server.log"));
    let mut args: Vec<String> = vec!["proxy".into(), "--config".into(), config.to_str().unwrap().into()];
    args.extend(tls_args(&client_files));
    let client_proxy =
        client.spawn_proxy(&directory, &args.iter().map(String::as_str).collect::<Vec<_>>(), &client_log);
    // The server's proxy runs on the built-in defaults, as an injected one does.
    let mut args: Vec<String> = vec!["proxy".into(), "--admin".into(), "0.0.0.0:15000".into()];
    args.extend(tls_args(&server_files));
    let server_proxy =
        server.spawn_proxy(&directory, &args.iter().map(String::as_str).collect::<Vec<_>>(), &server_log);

    let (server_ready_log, client_ready_log) = (server_log.clone(), client_log.clone());
    server.enter(move || netns::wait_ready(address("127.0.0.1", 15000), &server_ready_log));
    let (reply, client_metrics) = client.enter(move || {
        netns::wait_ready(address("127.0.0.1", 15000), &client_ready_log);
        let reply =
            exchange(address(SERVER_IP, 8080), b"GET /orders HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n");
        (reply, netns::metrics(address("127.0.0.1", 15000)))
    });
    let server_metrics = client.enter(move || netns::metrics(address(SERVER_IP, 15000)));
    drop((client_proxy, server_proxy));
    let logs = format!(
        "client proxy:\n{}\nserver proxy:\n{}",
        std::fs::read_to_string(&client_log).unwrap_or_default(),
        std::fs::read_to_string(&server_log).unwrap_or_default()
    );

    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}\n{logs}");
    assert!(reply.contains("x-served-by: orders"), "{reply}");
    assert!(
        reply.contains(&format!("x-seen-client-identity: {CLIENT_ID}")),
        "the server app is told who called: {reply}"
    );
    for (metrics, series) in [
        (&client_metrics, r#"remora_tls_handshakes_total{direction="outbound",result="ok"} "#),
        (&server_metrics, r#"remora_tls_handshakes_total{direction="inbound",result="ok"} "#),
    ] {
        assert_eq!(netns::value(metrics, series), 1.0, "{series}\n{metrics}");
    }
    let _ = std::fs::remove_dir_all(directory);
}
