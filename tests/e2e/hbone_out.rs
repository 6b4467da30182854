//! HBONE out, against a server written apart from Remora (`hbone_server.py`: Python's `ssl` and the
//! `h2` package, serving as ztunnel's inbound side does): opaque TCP from a Remora sidecar reaches
//! the server's target through CONNECT tunnels on pooled mutual-TLS connections, the server sees
//! the sidecar's SPIFFE identity and the headers it sends, a connection carries at most 100
//! tunnels at once (the server's own stream limit: the `h2` package's default) and the sidecar
//! opens another past that, tunnels closed make room again, and a refused CONNECT is counted so.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use remora_control_plane::testing::TestCa;
use remora_proxy::testing::proxy::temp_dir;
use remora_proxy::testing::{HttpServer, TcpEchoServer, TestProxy};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::hbone::{API, WEB, python_h2};

/// The independent HBONE server, running as a child process (killed when dropped), and what it
/// has said so far.
struct HboneServer {
    child: Child,
    port: u16,
    lines: mpsc::Receiver<Value>,
    said: Vec<Value>,
}

impl Drop for HboneServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HboneServer {
    /// Starts the server with the certificate in `identity` (cert.pem, key.pem, ca.pem), refusing
    /// tunnels to `refuse`.
    fn start(identity: &std::path::Path, refuse: &[SocketAddr]) -> HboneServer {
        let spec = json!({
            "cert": identity.join("cert.pem"),
            "key": identity.join("key.pem"),
            "ca": identity.join("ca.pem"),
            "refuse": refuse.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "timeout": 120,
        });
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/hbone_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(spec.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let stdout = child.stdout.take().expect("piped");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(serde_json::from_str(&line).unwrap_or(Value::String(line))).is_err() {
                    return;
                }
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(10)).expect("the server says where it listens");
        let port = first["listening"].as_u64().unwrap_or_else(|| panic!("{first}")) as u16;
        HboneServer { child, port, lines, said: Vec::new() }
    }

    /// What the server has said, once `enough` holds of it (waiting up to ten seconds).
    fn said_once(&mut self, what: &str, enough: impl Fn(&[Value]) -> bool) -> &[Value] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !enough(&self.said) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.said.push(line),
                Err(_) => panic!("the server did not say {what}: {:#?}", self.said),
            }
        }
        &self.said
    }
}

fn count(said: &[Value], key: &str) -> usize {
    said.iter().filter(|line| line.get(key).is_some()).count()
}

/// A TCP connection through `listener` that has sent a number and heard it echoed back.
async fn echoed(listener: SocketAddr, i: u32) -> TcpStream {
    let mut stream = TcpStream::connect(listener).await.unwrap();
    stream.write_all(&i.to_be_bytes()).await.unwrap();
    let mut back = [0_u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await;
    read.unwrap_or_else(|_| panic!("tunnel {i} did not echo within 5 s")).unwrap();
    assert_eq!(back, i.to_be_bytes());
    stream
}

#[tokio::test]
async fn opaque_tcp_reaches_an_independent_hbone_server_a_hundred_tunnels_per_connection() {
    if !python_h2() {
        return;
    }
    let ca = TestCa::new("cluster.local");
    let dir = temp_dir("remora-hbone-out");
    let echo = TcpEchoServer::start().await;
    let app = HttpServer::start("api-app").await;
    ca.issue(API).write(&dir.join("api"));
    let mut server = HboneServer::start(&dir.join("api"), &[app.address()]);
    let web = ca.issue(WEB).bootstrap_identity(&dir.join("web"));
    let hbone = format!(", tls: mesh, hbone_port: {}, peer_identities: [\"{API}\"]", server.port);
    let client = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n{web}---\nresources:\n{}{}{}{}",
        crate::cluster("echo", &hbone, &[echo.address()]),
        crate::cluster("api", &hbone, &[app.address()]),
        crate::listener("out", ", protocol: tcp, default_cluster: echo"),
        crate::listener("out-api", ", protocol: tcp, default_cluster: api"),
    ));

    // 250 connections held open at once: 100 tunnels on each of two connections, 50 on a third.
    let mut open = Vec::new();
    for i in 0..250 {
        open.push(echoed(client.address("out"), i).await);
    }
    let said = server.said_once("250 tunnels", |said| count(said, "tunnel") == 250).to_vec();
    let connections: Vec<&Value> = said.iter().filter(|line| line.get("connection").is_some()).collect();
    assert_eq!(connections.len(), 3, "{said:#?}");
    for connection in &connections {
        assert_eq!(connection["peer"], WEB, "the server saw the sidecar's identity: {connection}");
        let number = &connection["connection"];
        let carried = said.iter().filter(|line| &line["tunnel"] == number).count();
        assert!(carried <= 100, "connection {number} carried {carried} tunnels at once");
    }
    let tunnel = said.iter().find(|line| line.get("tunnel").is_some()).unwrap();
    assert_eq!(tunnel["authority"], echo.address().to_string(), "{tunnel}");
    assert_eq!(tunnel["status"], 200, "{tunnel}");
    assert_eq!(tunnel["headers"]["x-remora-tunnel-protocol"], "tcp", "{tunnel}");
    let tunnels = |cluster: &str, result: &str| {
        format!("remora_upstream_tunnels_total{{cluster=\"{cluster}\",result=\"{result}\"}}")
    };
    assert_eq!(client.metric(&tunnels("echo", "opened")).await, 250.0);

    // Closed, they make room: the next tunnels ride the pooled connections, no fourth is opened.
    drop(open);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = Vec::new();
    for i in 0..120 {
        again.push(echoed(client.address("out"), 1000 + i).await);
    }
    let said = server.said_once("370 tunnels", |said| count(said, "tunnel") == 370).to_vec();
    assert_eq!(count(&said, "connection"), 3, "{said:#?}");
    drop(again);

    // A tunnel the server refuses: the connection is closed without a byte, counted as refused.
    let mut stream = TcpStream::connect(client.address("out-api")).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n").await.unwrap();
    let mut heard = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut heard)).await;
    assert!(heard.is_empty(), "{}", String::from_utf8_lossy(&heard));
    let said = server.said_once("a refusal", |said| said.iter().any(|line| line["status"] == 401)).to_vec();
    let refused = said.iter().find(|line| line["status"] == 401).unwrap();
    assert_eq!(refused["authority"], app.address().to_string(), "{refused}");
    assert_eq!(client.metric(&tunnels("api", "refused")).await, 1.0);
    assert_eq!(app.hits(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
