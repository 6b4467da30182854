//! HBONE out, against a server written apart from Remora (`hbone_server.py`: Python's `ssl` and the
//! `h2` package, serving as ztunnel's inbound side does): opaque TCP from a Remora sidecar reaches
//! the server's target through CONNECT tunnels on pooled mutual-TLS connections, the server sees
//! the sidecar's SPIFFE identity and the headers it sends, a connection carries at most 100
//! tunnels at once (the server's own stream limit: the `h2` package's default) and the sidecar
//! opens another past that, tunnels closed make room again, and a refused CONNECT is counted so.
//! With `http_over_hbone`, HTTP rides tunnels too, in the cluster's own protocol: HTTP/1.1 and h2c
//! to the app behind the independent server, pooled per endpoint; and to a Remora sidecar's HBONE
//! listener, whose inbound pipeline serves it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use remora_control_plane::testing::TestCa;
use remora_proxy::testing::client::Client;
use remora_proxy::testing::proxy::temp_dir;
use remora_proxy::testing::{HttpServer, TcpEchoServer, TestProxy};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::hbone::{API, WEB, python_h2, sidecar_with};

/// The independent HBONE server, running as a child process (killed when dropped), and what it
/// has said so far.
pub(crate) struct HboneServer {
    child: Child,
    pub(crate) port: u16,
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
    pub(crate) fn start(identity: &std::path::Path, refuse: &[SocketAddr]) -> HboneServer {
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
    pub(crate) fn said_once(&mut self, what: &str, enough: impl Fn(&[Value]) -> bool) -> &[Value] {
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

    /// Everything the server has said, after a quarter second in which it said nothing more.
    pub(crate) fn settled(&mut self) -> &[Value] {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(250)) {
            self.said.push(line);
        }
        &self.said
    }
}

/// How many of the server's lines say `key`.
pub(crate) fn count(said: &[Value], key: &str) -> usize {
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

#[tokio::test]
async fn http_over_hbone_reaches_an_independent_server_s_app_and_a_remora_sidecar_s_inbound_pipeline() {
    if !python_h2() {
        return;
    }
    let ca = TestCa::new("cluster.local");
    let dir = temp_dir("remora-hbone-http");
    let app = HttpServer::start("api-app").await;
    ca.issue(API).write(&dir.join("api"));
    let mut server = HboneServer::start(&dir.join("api"), &[]);
    let web = ca.issue(WEB).bootstrap_identity(&dir.join("web"));
    let hbone = |protocol: &str| format!(", tls: mesh, hbone_port: {}, http_over_hbone: true{protocol}", server.port);
    let client = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n{web}---\nresources:\n{}{}{}{}",
        crate::cluster("api-h1", &hbone(", protocol: http1"), &[app.address()]),
        crate::cluster("api-h2", &hbone(", protocol: http2"), &[app.address()]),
        crate::listener("h1", ", protocol: http1, default_cluster: api-h1"),
        crate::listener("h2", ", protocol: http1, default_cluster: api-h2"),
    ));

    // HTTP/1.1, as the app speaks it, on one pooled connection inside one tunnel.
    let mut caller = Client::http1(client.address("h1")).await;
    for i in 0..10 {
        let reply = caller.get("api.shop", &format!("/h1/{i}")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.text(), "hello from api-app\n");
        assert_eq!(reply.header("x-seen-version"), "HTTP/1.1");
        assert_eq!(reply.header("x-seen-host"), "api.shop");
    }
    let said = server.said_once("a tunnel for HTTP/1.1", |said| count(said, "tunnel") == 1).to_vec();
    let tunnel = said.iter().find(|line| line.get("tunnel").is_some()).unwrap();
    assert_eq!(tunnel["authority"], app.address().to_string(), "{tunnel}");
    assert_eq!(tunnel["headers"].get("x-remora-tunnel-protocol"), None, "HTTP is not said to be TCP: {tunnel}");
    // Requests at once take a tunnel each; afterwards they are all pooled.
    let mut handles = Vec::new();
    for i in 0..4 {
        let address = client.address("h1");
        handles.push(tokio::spawn(async move {
            Client::http1(address).await.get("api.shop", &format!("/slow/{}", 300 + i)).await.status
        }));
    }
    for handle in handles {
        assert_eq!(handle.await.unwrap(), 200);
    }
    assert_eq!(count(server.settled(), "tunnel"), 4, "the pooled connection and three more");
    for i in 0..8 {
        assert_eq!(caller.get("api.shop", &format!("/again/{i}")).await.status, 200);
    }
    assert_eq!(count(server.settled(), "tunnel"), 4, "pooled connections reused");

    // h2c, as the other cluster says the app speaks, multiplexed inside one tunnel.
    let mut caller = Client::http1(client.address("h2")).await;
    for i in 0..10 {
        let reply = caller.get("api.shop", &format!("/h2/{i}")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("x-seen-version"), "HTTP/2.0");
    }
    let said = server.settled().to_vec();
    assert_eq!(count(&said, "tunnel"), 5, "one more tunnel, for h2c");
    assert_eq!(count(&said, "connection"), 1, "every tunnel on one HBONE connection: {said:#?}");
    assert_eq!(app.hits(), 32);

    // To a Remora sidecar's HBONE listener: its inbound pipeline serves the HTTP inside, and the
    // app is told who called.
    let side = sidecar_with("").await;
    let web = side.ca.issue(WEB).bootstrap_identity(&side.dir.join("web"));
    let hbone = format!(
        ", tls: mesh, hbone_port: {}, http_over_hbone: true, protocol: http1",
        side.proxy.address("hbone").port()
    );
    let client = TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n{web}---\nresources:\n{}{}",
        crate::cluster("api", &hbone, &[side.app.address()]),
        crate::listener("out", ", protocol: http1, default_cluster: api"),
    ));
    let mut caller = Client::http1(client.address("out")).await;
    for _ in 0..3 {
        let reply = caller.get("api.shop", "/").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("x-seen-client-identity"), WEB, "the inbound pipeline named the caller");
    }
    let opened = "remora_listener_tunnels_total{listener=\"hbone\",result=\"opened\"}";
    assert_eq!(side.proxy.metric(opened).await, 1.0, "three requests, one tunnel");
    let _ = std::fs::remove_dir_all(&dir);
}
