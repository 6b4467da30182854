//! Transparent listeners behind real iptables REDIRECT rules, in a network namespace the test
//! creates (root only; skipped with a message otherwise).
//!
//! The namespace is set up as a pod would be: the `remora` binary runs as uid 1337, and the NAT
//! rules redirect the pod's outbound TCP to the proxy except traffic from uid 1337, so the proxy's
//! own upstream connections are not captured again. The test's client connects to "remote"
//! addresses as if there were no proxy, over IPv4 and IPv6, and the test asserts what the proxy
//! did: routing by original destination to a route table's cluster, and passing through to the
//! original destination.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use remora_proxy::testing::{HttpServer, TcpEchoServer};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use crate::cluster;

const PROXY_UID: &str = "1337";

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Netns {
        let name = format!("remora-e2e-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    /// Runs a command inside the namespace; panics if it fails.
    fn run(&self, program: &str, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates live there.
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let namespace = std::fs::File::open(&path).unwrap();
            move_into_link_name_space(namespace.as_fd(), Some(LinkNameSpaceType::Network)).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Sends `request` to `address` and reads until the server closes.
fn exchange(address: SocketAddr, request: &[u8]) -> String {
    try_exchange(address, request).unwrap_or_else(|e| panic!("{address}: {e}"))
}

fn try_exchange(address: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request)?;
    stream.shutdown(Shutdown::Write)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// HTTP to a virtual IP is routed by its original destination to a route table's cluster; TCP to
/// other addresses, IPv4 and IPv6, passes through to the original destination; the proxy's own
/// connections are not captured again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_connections_are_routed_by_their_original_destination() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: transparent-mode tests need root (network namespaces, iptables); CI runs them as root");
        return;
    }
    let ns = Netns::create();
    ns.run("ip", &["link", "set", "lo", "up"]);
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
    let directory = remora_proxy::testing::proxy::temp_dir("remora-netns");
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
    // uid 1337 must be able to run the binary and read the config: the build directory may be
    // private (a `mktemp -d` checkout is mode 700), so the binary is copied next to the config.
    let binary = directory.join("remora");
    std::fs::copy(env!("CARGO_BIN_EXE_remora"), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&directory, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log_path = directory.join("proxy.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut proxy = Command::new("nsenter")
        .args([&format!("--net=/run/netns/{}", ns.name), "-S", PROXY_UID, "-G", PROXY_UID])
        .arg(&binary)
        .args(["proxy", "--config", config.to_str().unwrap()])
        .stderr(log)
        .spawn()
        .unwrap();

    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let results = tokio::task::spawn_blocking({
        let ns_path = ns.name.clone();
        move || {
            let ns = Netns { name: ns_path };
            let results = ns.enter(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                let ready = || {
                    try_exchange(admin, b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                        .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
                };
                while !ready() {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the proxy never became ready; its log:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                let http = exchange(
                    "10.77.0.10:80".parse().unwrap(),
                    b"GET /vip HTTP/1.1\r\nHost: anything.example\r\nConnection: close\r\n\r\n",
                );
                let v4 = exchange("10.77.0.20:7000".parse().unwrap(), b"hello over ipv4");
                let v6 = exchange("[fd00::20]:7000".parse().unwrap(), b"hello over ipv6");
                let metrics = exchange(admin, b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
                (http, v4, v6, metrics)
            });
            // Keep the namespace: the outer guard deletes it.
            std::mem::forget(ns);
            results
        }
    })
    .await;
    let _ = proxy.kill();
    let _ = proxy.wait();
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
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .unwrap_or_else(|| panic!("no {series} in {metrics}"))
            .trim()
            .parse()
            .unwrap();
        assert!(value >= 1.0, "{series} is {value}: the connection did not go through the proxy");
    }
    let _ = std::fs::remove_dir_all(directory);
}
