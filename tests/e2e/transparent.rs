//! Transparent listeners behind real iptables REDIRECT rules, in a network namespace the test
//! creates (root only; skipped with a message otherwise).
//!
//! The namespace is set up as a pod would be: the `remora` binary runs as uid 1337, and the NAT
//! rules redirect the pod's outbound TCP to the proxy except traffic from uid 1337, so the proxy's
//! own upstream connections are not captured again. The test's client connects to "remote"
//! addresses as if there were no proxy, over IPv4 and IPv6, and the test asserts what the proxy
//! did: routing by original destination to a route table's cluster, and passing through to the
//! original destination.

use std::net::SocketAddr;

use remora_proxy::testing::{HttpServer, TcpEchoServer};

use crate::cluster;
use crate::netns::{self, Netns, PROXY_UID, exchange};

/// HTTP to a virtual IP is routed by its original destination to a route table's cluster; TCP to
/// other addresses, IPv4 and IPv6, passes through to the original destination; the proxy's own
/// connections are not captured again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_connections_are_routed_by_their_original_destination() {
    if !netns::can_run("the transparent-mode test") {
        return;
    }
    let ns = Netns::create("e2e");
    // The "remote" addresses live on the namespace's loopback device.
    ns.run("ip", &["addr", "add", "10.77.0.10/32", "dev", "lo"]);
    ns.run("ip", &["addr", "add", "10.77.0.20/32", "dev", "lo"]);
    ns.run("ip", &["-6", "addr", "add", "fd00::20/128", "dev", "lo", "nodad"]);

    // The "remote" services, listening inside the namespace.
    let web_socket = ns.enter(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let web = HttpServer::start_on("web", web_socket);
    let mut echoes = Vec::new();
    for address in ["10.77.0.20:7000", "[fd00::20]:7000"] {
        let address: SocketAddr = address.parse().unwrap();
        let socket = ns.enter(move || std::net::TcpListener::bind(address).unwrap());
        socket.set_nonblocking(true).unwrap();
        echoes.push(TcpEchoServer::serve(tokio::net::TcpListener::from_std(socket).unwrap()));
    }

    // Capture rules, as `remora init` will install them: everything but the proxy's own traffic.
    for (iptables, remote) in [("iptables", "10.77.0.0/24"), ("ip6tables", "fd00::/64")] {
        ns.run(
            iptables,
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "owner", "--uid-owner", PROXY_UID, "-j", "RETURN"],
        );
        ns.run(
            iptables,
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", remote, "-j", "REDIRECT", "--to-ports", "15001"],
        );
    }

    // Fixed ports are safe here: the namespace is this test's alone.
    let directory = netns::temp_dir("remora-netns");
    let config = directory.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            r#"bootstrap:
  admin_address: 127.0.0.1:15000
  workers: 1
resources:
  - {{kind: Listener, name: outbound, address: "127.0.0.1:15001", transparent: true, default_cluster: passthrough}}
  - {{kind: Listener, name: outbound6, address: "[::1]:15001", transparent: true, default_cluster: passthrough}}
  - {{kind: Cluster, name: passthrough, original_destination: true}}
{}  - {{kind: RouteTable, name: vip, destinations: ["10.77.0.10:80"], routes: [{{backends: [{{cluster: web}}]}}]}}
"#,
            cluster("web", "", &[web.address()])
        ),
    )
    .unwrap();
    let log_path = directory.join("proxy.log");
    let proxy = ns.spawn_proxy(&directory, &["proxy", "--config", config.to_str().unwrap()], &log_path);

    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let results = tokio::task::spawn_blocking({
        let ns = ns.borrow();
        move || {
            ns.enter(move || {
                netns::wait_ready(admin, &log_path);
                let http = exchange(
                    "10.77.0.10:80".parse().unwrap(),
                    b"GET /vip HTTP/1.1\r\nHost: anything.example\r\nConnection: close\r\n\r\n",
                );
                let v4 = exchange("10.77.0.20:7000".parse().unwrap(), b"hello over ipv4");
                let v6 = exchange("[fd00::20]:7000".parse().unwrap(), b"hello over ipv6");
                (http, v4, v6, netns::metrics(admin))
            })
        }
    })
    .await;
    drop(proxy);
    let (http, v4, v6, metrics) = results.unwrap();

    assert!(http.starts_with("HTTP/1.1 200"), "{http}");
    assert!(http.contains("x-served-by: web"), "routed by original destination to the vip table: {http}");
    assert!(http.contains("x-seen-host: anything.example"), "{http}");
    assert_eq!(v4, "hello over ipv4");
    assert_eq!(v6, "hello over ipv6");
    for series in [
        r#"remora_listener_connections_total{listener="outbound",direction="outbound"} "#,
        r#"remora_listener_connections_total{listener="outbound6",direction="outbound"} "#,
        r#"remora_upstream_tcp_sent_bytes_total{cluster="passthrough"} "#,
    ] {
        let value = netns::value(&metrics, series);
        assert!(value >= 1.0, "{series} is {value}: the connection did not go through the proxy");
    }
    let _ = std::fs::remove_dir_all(directory);
}
