//! `remora init` end to end, as root, in network namespaces the test creates: a "pod" namespace with
//! an app, the proxy on its built-in defaults running as uid 1337, and the capture rules `remora init`
//! installs; a "remote" namespace across a veth pair. The app and the remote client connect as if
//! there were no mesh, and the test asserts what went through the proxy (its listener counters and
//! the peer address each server saw): outbound and inbound connections are captured, the proxy's own
//! upstream connections are not captured again (no loop), the excluded ports and the admin port
//! bypass it, a pod calling itself goes straight to itself, and `--cleanup` removes exactly what was
//! installed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use crate::netns::{self, Netns, exchange};

const POD_IP: &str = "10.79.0.1";
const REMOTE_IP: &str = "10.79.0.2";

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
    let suffix = std::process::id() % 100_000;
    let (pod_side, remote_side) = (format!("rmp{suffix}"), format!("rmr{suffix}"));
    netns::run("ip", &["link", "add", &pod_side, "type", "veth", "peer", "name", &remote_side]);
    netns::run("ip", &["link", "set", &pod_side, "netns", &pod.name]);
    netns::run("ip", &["link", "set", &remote_side, "netns", &remote.name]);
    for (ns, device, ip) in [(&pod, &pod_side, POD_IP), (&remote, &remote_side, REMOTE_IP)] {
        ns.run("ip", &["addr", "add", &format!("{ip}/24"), "dev", device]);
        ns.run("ip", &["link", "set", device, "up"]);
    }

    // The remote services (7001 is excluded from outbound capture) and the app (8081 excluded inbound).
    for port in [7000, 7001] {
        serve_peer_reporter(remote.enter(move || TcpListener::bind(address(REMOTE_IP, port)).unwrap()));
    }
    for port in [8080, 8081] {
        serve_peer_reporter(pod.enter(move || TcpListener::bind(address("0.0.0.0", port)).unwrap()));
    }

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

    // The proxy on its built-in defaults, as uid 1337, its admin server on the pod's address.
    let directory = netns::temp_dir("remora-capture");
    let log = directory.join("proxy.log");
    let mut proxy = pod.spawn_proxy(&directory, &["proxy", "--admin", "0.0.0.0:15000"], &log);

    let from_pod = pod.enter({
        let log = log.clone();
        move || {
            netns::wait_ready(address("127.0.0.1", 15000), &log);
            let captured = exchange(address(REMOTE_IP, 7000), b"outbound");
            let excluded = exchange(address(REMOTE_IP, 7001), b"excluded");
            let to_itself = exchange(address(POD_IP, 8080), b"to itself");
            (captured, excluded, to_itself)
        }
    });
    let from_remote = remote.enter(move || {
        let captured = exchange(address(POD_IP, 8080), b"inbound");
        let excluded = exchange(address(POD_IP, 8081), b"direct");
        let logging = exchange(
            address(POD_IP, 15000),
            b"POST /logging?level=debug HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(logging.starts_with("HTTP/1.1 403"), "only the pod itself may change the log filter: {logging}");
        (captured, excluded, netns::metrics(address(POD_IP, 15000)))
    });
    let _ = proxy.kill();
    let _ = proxy.wait();
    let proxy_log = std::fs::read_to_string(&log).unwrap_or_default();

    // Outbound: the remote service saw the pod's address either way; the proxy's counters tell.
    assert_eq!(from_pod.0, format!("{POD_IP} outbound"), "{proxy_log}");
    assert_eq!(from_pod.1, format!("{POD_IP} excluded"));
    assert_eq!(from_pod.2, format!("{POD_IP} to itself"));
    // Inbound: through the proxy the app sees the proxy's connection, from the pod's own address;
    // on the excluded port it sees the remote client.
    assert_eq!(from_remote.0, format!("{POD_IP} inbound"), "{proxy_log}");
    assert_eq!(from_remote.1, format!("{REMOTE_IP} direct"));
    let metrics = &from_remote.2;
    // Exactly one connection each way: the excluded ports, the call to itself and the admin scrape
    // bypassed the proxy, and the proxy's own upstream connections were not captured again.
    for (series, expected) in [
        (r#"remora_listener_connections_total{listener="outbound",direction="outbound"} "#, 1.0),
        (r#"remora_listener_connections_total{listener="inbound",direction="inbound"} "#, 1.0),
        (
            r#"remora_upstream_tcp_sent_bytes_total{cluster="passthrough"} "#,
            ("outbound".len() + "inbound".len()) as f64,
        ),
    ] {
        assert_eq!(netns::value(metrics, series), expected, "{series}\n{metrics}");
    }

    pod.run(remora, &["init", "--cleanup"]);
    let left = pod.run("iptables-save", &["-t", "nat"]);
    assert!(!left.contains("REMORA"), "{left}");
    assert!(left.contains("-A OUTPUT -d 192.0.2.0/24 -j RETURN"), "{left}");
    // Cleaning up twice is fine.
    pod.run(remora, &["init", "--cleanup"]);
    let _ = std::fs::remove_dir_all(directory);
}
