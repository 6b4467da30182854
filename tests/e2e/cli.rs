//! The `remora` binary itself: start-up errors, `validate`, SIGTERM drain, memory while streaming
//! large bodies, the demo, and the log filter changed at runtime.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use http::Method;
use remora_proxy::testing::proxy::temp_dir;
use remora_proxy::testing::servers::{full, generated, read_generated};
use remora_proxy::testing::{Client, HttpServer};
use rustix::process::{Pid, Signal, kill_process};

use crate::cluster;

const REMORA: &str = env!("CARGO_BIN_EXE_remora");

/// A `remora` child process whose stderr (its log) is read line by line on a thread.
pub(crate) struct Spawned {
    child: Child,
    log: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Spawned {
    pub(crate) fn new(args: &[&str]) -> Spawned {
        Spawned::with_env(args, &[])
    }

    /// Like [`Spawned::new`], with these environment variables set.
    pub(crate) fn with_env(args: &[&str], env: &[(&str, &str)]) -> Spawned {
        let mut child = Command::new(REMORA)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (sender, log) = mpsc::channel();
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = sender.send(line);
                }
            });
        }
        Spawned { child, log, seen: Vec::new() }
    }

    /// Waits for an output line containing `needle` and returns it.
    pub(crate) fn wait_for(&mut self, needle: &str) -> String {
        self.wait_for_count(needle, 1);
        self.seen.iter().find(|l| l.contains(needle)).cloned().unwrap_or_default()
    }

    /// Waits for the `count`th output line containing `needle`.
    fn wait_for_count(&mut self, needle: &str, count: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.seen.iter().filter(|l| l.contains(needle)).count() < count {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no {count} lines containing {needle:?}; output so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The address logged for listener `name`.
    fn listener(&mut self, name: &str) -> SocketAddr {
        let line = self.wait_for(&format!("listening listener={name} address="));
        line.rsplit("address=").next().unwrap().trim().parse().unwrap()
    }

    fn signal(&self, signal: Signal) {
        kill_process(Pid::from_child(&self.child), signal).unwrap();
    }

    /// Waits for the process to exit; returns its exit code.
    fn exit_code(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.log.recv_timeout(Duration::from_millis(100)) {
                    self.seen.push(line);
                }
                return status.code().unwrap_or(-1);
            }
            assert!(std::time::Instant::now() < deadline, "the process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Descriptors the process holds open.
    fn open_descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).unwrap().count()
    }

    /// Resident memory now, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// The value of metric `series` (its name and labels, as exposed) on the admin port logged at
    /// start-up; 0 if absent.
    fn metric(&mut self, series: &str) -> f64 {
        let line = self.wait_for("remora proxy started");
        let admin = line.split_whitespace().find_map(|field| field.strip_prefix("admin=")).unwrap();
        crate::netns::value(&crate::netns::metrics(admin.parse().unwrap()), &format!("{series} "))
    }

    /// Peak resident memory so far, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(yaml: &str) -> std::path::PathBuf {
    let path = temp_dir("remora-cli").join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn proxy_config(upstream: SocketAddr) -> String {
    format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 2\n  drain_time: 5s\nresources:\n{}  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: web}}]}}]}}\n  - {{kind: Listener, name: web, address: \"127.0.0.1:0\", protocol: http1}}\n",
        cluster("web", "", &[upstream])
    )
}

/// A config with a bad value stops start-up: exit code 1, and the message names resource and field.
#[test]
fn a_bad_config_stops_start_up_naming_the_field() {
    let path = write_config("resources:\n  - {kind: Listener, name: web, address: \"127.0.0.1:0\", protocol: htp1}\n");
    let output = Command::new(REMORA).args(["proxy", "--config", path.to_str().unwrap()]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(r#"listener "web": protocol: unknown variant `htp1`"#), "{stderr}");
    assert_eq!(stderr.matches("unknown variant").count(), 1, "the cause is printed once: {stderr}");
}

/// A control plane with a CA listens beyond the host only over TLS: tokens are never taken in the
/// clear.
#[test]
fn a_control_plane_with_a_ca_refuses_plaintext_beyond_loopback() {
    let dir = temp_dir("remora-plaintext-ca");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "0123456789abcdef0123 spiffe://cluster.local/ns/shop/*\n").unwrap();
    let (ca_dir, tokens) = (dir.join("ca"), tokens.to_str().unwrap());
    let ca_dir = ca_dir.to_str().unwrap();
    let output = Command::new(REMORA)
        .args(["control", "--listen", "0.0.0.0:0", "--ca-dir", ca_dir, "--ca-tokens", tokens])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in the clear on 0.0.0.0:0: serve TLS with --tls-name"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `remora validate` says valid or lists every problem.
#[test]
fn validate_reports_valid_files_and_every_problem() {
    let good = write_config(&proxy_config("127.0.0.1:9".parse().unwrap()));
    let output = Command::new(REMORA).args(["validate", good.to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("valid (4 resources"));

    let bad = write_config(
        "resources:\n  - {kind: Listener, name: a, address: nowhere, default_cluster: x}\n  - {kind: Cluster, name: c, connect_timeout: 0s}\n",
    );
    let output = Command::new(REMORA).args(["validate", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for problem in [
        r#"listener "a": address: must be ip:port"#,
        r#"listener "a": default_cluster: names cluster "x""#,
        r#"cluster "c": connect_timeout: must be greater than zero"#,
    ] {
        assert!(stderr.contains(problem), "missing {problem:?} in {stderr}");
    }
}

/// `remora validate` refuses a YAML alias bomb (10^8 nodes from 140 kB) with a message, in bounded
/// memory, instead of aborting out of memory.
#[test]
fn validate_refuses_an_alias_bomb() {
    let bomb = write_config(&remora_control_api::testing::alias_bomb(10_000));
    let output = Command::new(REMORA).args(["validate", bomb.to_str().unwrap()]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("expands past its limit"), "{stderr}");
}

/// Every YAML example in the README and the manual (`docs/`) is a config `remora validate` accepts,
/// or (one with Kubernetes manifests) a control-plane directory file the automatic mesh makes valid
/// resources of (Gateway API routes alone: routes it reads and accepts).
#[test]
fn the_readme_examples_are_valid_configs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    pages.extend(std::fs::read_dir(root.join("docs")).unwrap().flatten().map(|e| e.path()));
    let mut checked = 0;
    for page in pages.iter().filter(|p| p.extension().is_some_and(|e| e == "md")) {
        let text = std::fs::read_to_string(page).unwrap();
        for example in text.split("```yaml\n").skip(1).map(|rest| rest.split("```").next().unwrap()) {
            checked += 1;
            if example.contains("apiVersion:") {
                let file = remora_control_api::config::parse_mixed(example, "example").unwrap();
                let objects = remora_control_plane::mesh::Objects::read("cluster.local", &file.kubernetes);
                for route in objects.routes.values() {
                    assert!(route.rules.is_ok(), "{}: {:?} in\n{example}", page.display(), route.rules);
                }
                if objects.services.is_empty() && !objects.routes.is_empty() {
                    // Routes alone: read and accepted; what they make needs their Services.
                    continue;
                }
                let settings = remora_control_plane::mesh::Settings::default();
                let mut made =
                    remora_control_plane::mesh::resources(&objects, &file.config.resources, &settings).shared;
                assert!(!made.is_empty(), "{}: the mesh makes nothing of\n{example}", page.display());
                made.extend(file.config.resources);
                remora_control_api::validate::validate(&made).unwrap();
                continue;
            }
            let path = write_config(example);
            let output = Command::new(REMORA).args(["validate", path.to_str().unwrap()]).output().unwrap();
            assert!(
                output.status.success(),
                "{}: {}\n{example}",
                page.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    assert!(checked >= 3, "the README and the manual have {checked} YAML examples");
}

/// SIGTERM: the request in flight completes (with `Connection: close`), then the process exits 0.
#[tokio::test]
async fn sigterm_drains_the_request_in_flight_then_exits_zero() {
    let upstream = HttpServer::start("slow").await;
    let config = write_config(&proxy_config(upstream.address()));
    let mut proxy = Spawned::new(&["proxy", "--config", config.to_str().unwrap()]);
    let address = proxy.listener("web");
    proxy.wait_for("remora proxy started");
    let mut client = Client::http1(address).await;
    let request = tokio::spawn(async move { client.get("x", "/slow/700").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal(Signal::TERM);
    let reply = request.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("connection"), "close");
    assert_eq!(proxy.exit_code(), 0);
    proxy.wait_for("drained; exiting");
}

/// 64 MiB up and 64 MiB back through the proxy at once, checked byte by byte, while the proxy's
/// peak memory stays far below the body size: bodies stream, they are never held.
#[tokio::test]
async fn large_bodies_stream_with_bounded_memory() {
    let upstream = HttpServer::start("echo").await;
    let config = write_config(&proxy_config(upstream.address()));
    let mut proxy = Spawned::new(&["proxy", "--config", config.to_str().unwrap()]);
    let address = proxy.listener("web");
    let mut client = Client::http1(address).await;
    assert_eq!(client.get("x", "/").await.status, 200);
    let baseline_mib = proxy.peak_rss_kib() / 1024;
    const SIZE: u64 = 64 * 1024 * 1024;
    let request = client.request(Method::POST, "x", "/echo").body(generated(SIZE, 256 * 1024)).unwrap();
    let response = client.send(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(read_generated(response.into_body()).await, SIZE);
    let peak_mib = proxy.peak_rss_kib() / 1024;
    eprintln!("proxy peak RSS: {baseline_mib} MiB warmed up, {peak_mib} MiB after streaming");
    // Buffers are bounded per connection (limits::H1_MAX_BUF_SIZE, the upstream's socket buffers);
    // holding the body would add 64 MiB or more.
    assert!(
        peak_mib - baseline_mib < 16,
        "the proxy grew from {baseline_mib} to {peak_mib} MiB while streaming 64 MiB each way"
    );
}

/// Lifts this process's soft limit on open files (a proxy spawned after inherits it), for tests
/// that hold a thousand connections or more on each side.
fn allow_many_sockets() {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let wanted = limit.maximum.map_or(8192, |max| max.min(8192));
    if limit.current.is_some_and(|current| current < wanted) {
        let raised = rustix::process::Rlimit { current: Some(wanted), maximum: limit.maximum };
        rustix::process::setrlimit(rustix::process::Resource::Nofile, raised).unwrap();
    }
}

/// Idle HTTP/1.1 keep-alive connections park in their worker's lot (`http::park`, `http::lot`):
/// three thousand of them, each left idle after one request, cost the proxy about a kilobyte each
/// (hyper's server held 19 kB each before they parked, 3.4 kB when they parked in their tasks);
/// each is served again when its next request comes, and a drain closes them all.
#[tokio::test]
async fn idle_keep_alive_connections_cost_little_and_are_served_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    allow_many_sockets();
    let upstream = HttpServer::start("a").await;
    let config = write_config(&proxy_config(upstream.address()));
    let mut proxy = Spawned::new(&["proxy", "--config", config.to_str().unwrap()]);
    let address = proxy.listener("web");

    async fn exchange(stream: &mut tokio::net::TcpStream) -> String {
        stream.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let mut buffer = [0_u8; 4096];
        loop {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(n > 0, "the proxy closed the connection: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .map_or(0, |v| v.parse::<usize>().unwrap());
                if body.len() >= length {
                    return head.lines().next().unwrap().to_owned();
                }
            }
        }
    }
    let mut warm = Vec::new();
    for _ in 0..16 {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        assert_eq!(exchange(&mut stream).await, "HTTP/1.1 200 OK");
        warm.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proxy.rss_kib();
    const N: u64 = 3000;
    let mut idle = Vec::new();
    for _ in 0..N {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        assert_eq!(exchange(&mut stream).await, "HTTP/1.1 200 OK");
        idle.push(stream);
    }
    // Parked within limits::H1_PARK_AFTER (20 ms) of going quiet; measured once the burst's freed
    // memory has been given back (limits::MEMORY_RETURN_INTERVAL, 5 s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(proxy.metric("remora_http_parked_connections"), (N + 16) as f64);
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let per_connection = (proxy.rss_kib().saturating_sub(before)) * 1024 / N;
    eprintln!("{per_connection} bytes of proxy RSS per idle keep-alive connection");
    // 0.73-0.78 kB for this debug build (3.8 kB at N=1000 when they parked in their tasks); the
    // bound is twice the goal of 1 kB.
    assert!(per_connection < 2 * 1024, "{per_connection} bytes per idle connection");
    for stream in idle.iter_mut().step_by(50) {
        assert_eq!(exchange(stream).await, "HTTP/1.1 200 OK", "a parked connection was not served again");
    }
    // A drain closes the parked connections at once, and the proxy exits cleanly.
    proxy.signal(Signal::TERM);
    for stream in idle.iter_mut().step_by(10) {
        let mut byte = [0_u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "a parked connection was not closed by the drain: {read:?}");
    }
    assert_eq!(proxy.exit_code(), 0);
}

/// Idle HTTP/2 connections hold no buffers (`http::server::Driven` tidies them, vendor/h2's patch):
/// a thousand prior-knowledge connections, each left idle after one request, cost the proxy about
/// 4 kB each (h2 kept 28 KiB of read, write and Huffman buffers per connection before), and each
/// is served again, its HPACK decoding table intact: the second request names its authority by the
/// dynamic-table entry the first one added. The proxy's encoding table was forgotten while idle:
/// the second response opens with table size updates to zero and back to 4,096 (RFC 7541, 4.2),
/// then `:status` 200.
#[tokio::test]
async fn idle_http2_connections_give_their_buffers_back_and_are_served_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    allow_many_sockets();
    let upstream = HttpServer::start("a").await;
    let config = write_config(&proxy_config(upstream.address()).replace("protocol: http1", "protocol: http2"));
    let mut proxy = Spawned::new(&["proxy", "--config", config.to_str().unwrap()]);
    let address = proxy.listener("web");

    /// A HEADERS frame (END_STREAM, END_HEADERS) for stream `id` carrying `block`.
    fn headers(id: u32, block: &[u8]) -> Vec<u8> {
        let mut frame = (block.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[0x1, 0x5]);
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(block);
        frame
    }
    /// Reads frames until stream `id` ends; returns its first HEADERS block (`:status` 200 is
    /// static index 8, sent as 0x88).
    async fn response(stream: &mut tokio::net::TcpStream, id: u32) -> Vec<u8> {
        let mut status = Vec::new();
        loop {
            let mut head = [0_u8; 9];
            stream.read_exact(&mut head).await.expect("the proxy closed the connection");
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0_u8; length];
            stream.read_exact(&mut payload).await.unwrap();
            let on = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if head[3] == 0x4 && head[4] & 0x1 == 0 {
                stream.write_all(&[0, 0, 0, 0x4, 0x1, 0, 0, 0, 0]).await.unwrap(); // SETTINGS ACK
            }
            if on == id && head[3] == 0x1 && status.is_empty() {
                status = payload;
            }
            if on == id && matches!(head[3], 0x0 | 0x1) && head[4] & 0x1 != 0 {
                return status;
            }
        }
    }
    // GET / over http, its authority `a` added to the dynamic table (literal with incremental
    // indexing, indexed name 1); the second request refers to that entry (index 62, 0xbe).
    let first = headers(1, &[0x82, 0x86, 0x84, 0x41, 0x01, b'a']);
    let second = headers(3, &[0x82, 0x86, 0x84, 0xbe]);
    async fn open(address: SocketAddr, first: &[u8]) -> tokio::net::TcpStream {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // empty SETTINGS
        hello.extend_from_slice(first);
        stream.write_all(&hello).await.unwrap();
        assert_eq!(response(&mut stream, 1).await.first(), Some(&0x88), "the first request was not answered 200");
        stream
    }
    let mut warm = Vec::new();
    for _ in 0..16 {
        warm.push(open(address, &first).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proxy.rss_kib();
    const N: u64 = 1000;
    let mut idle = Vec::new();
    for _ in 0..N {
        idle.push(open(address, &first).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_connection = (proxy.rss_kib().saturating_sub(before)) * 1024 / N;
    eprintln!("{per_connection} bytes of proxy RSS per idle HTTP/2 connection");
    // Twice the goal of 4 kB: 4.2-4.3 kB for this debug build on the change that gave an HTTP/2
    // connection a task of its own (6.1-6.2 kB on the change that tidied h2, 24 kB for a release
    // build before it).
    assert!(per_connection < 8 * 1024, "{per_connection} bytes per idle HTTP/2 connection");
    for stream in idle.iter_mut().step_by(50) {
        stream.write_all(&second).await.unwrap();
        let block = response(stream, 3).await;
        // Size update 0 (0x20), size update 4,096 (0x3f, then 4,065 in two bytes), :status 200.
        assert_eq!(
            block.get(..5),
            Some(&[0x20, 0x3f, 0xe1, 0x1f, 0x88][..]),
            "an idle connection was not served again as it should: {block:x?}"
        );
    }
    drop(warm);
}

/// The HPACK table a tidied HTTP/2 connection forgets is forgotten by the client too: a client
/// written apart from Remora (Python's `h2`, whose `hpack` decoder checks every table size update
/// and index) makes requests with pauses long enough for the connection to be tidied between them,
/// and every response decodes to the same headers.
#[tokio::test]
async fn responses_after_a_tidied_http2_connection_forgot_its_table_decode_as_before() {
    if !crate::hbone::python_h2() {
        return;
    }
    const CLIENT: &str = r#"
import json, socket, sys, time
import h2.config, h2.connection, h2.events
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
c.initiate_connection(); s.sendall(c.data_to_send())
answers = []
for round in range(4):
    stream = c.get_next_available_stream_id()
    c.send_headers(stream, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "tidy")], end_stream=True)
    s.sendall(c.data_to_send())
    headers, done = None, False
    while not done:
        data = s.recv(65536)
        if not data:
            raise SystemExit("the proxy closed the connection")
        for event in c.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                headers = [[n, v] for n, v in event.headers if n != "date"]
            if isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                done = True
        s.sendall(c.data_to_send())
    answers.append(headers)
    time.sleep(0.2)
print(json.dumps(answers))
"#;
    let upstream = HttpServer::start("a").await;
    let config = write_config(&proxy_config(upstream.address()).replace("protocol: http1", "protocol: http2"));
    let mut proxy = Spawned::new(&["proxy", "--config", config.to_str().unwrap()]);
    let address = proxy.listener("web").to_string();
    let out = tokio::task::spawn_blocking(move || Command::new("python3").args(["-c", CLIENT, &address]).output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "the client failed: {}", String::from_utf8_lossy(&out.stderr));
    let answers: Vec<Vec<(String, String)>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answers.len(), 4);
    assert!(answers[0].contains(&(":status".into(), "200".into())), "{answers:?}");
    assert!(answers[0].len() > 1, "{answers:?}");
    for later in &answers[1..] {
        assert_eq!(later, &answers[0], "a response after the connection was tidied decoded differently");
    }
}

/// Idle spliced TCP connections hold no pipes (`tcp::one_way` borrows one from its worker's spares
/// while bytes move): a thousand connections through an opaque TCP listener, each echoing a few
/// bytes and then left idle, hold two descriptors each in the proxy, their sockets (six with a
/// pipe each way, which capped idle connections at a third of the descriptor limit), and each
/// still echoes when bytes come again.
#[tokio::test]
async fn idle_spliced_connections_hold_only_their_sockets_and_splice_again() {
    use remora_proxy::testing::TcpEchoServer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    allow_many_sockets();
    let echo = TcpEchoServer::start().await;
    let config = write_config(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\nresources:\n{}  - {{kind: Listener, name: web, address: \"127.0.0.1:0\", protocol: tcp, default_cluster: echo}}\n",
        cluster("echo", "", &[echo.address()])
    ));
    let mut proxy = Spawned::new(&["proxy", "--config", config.to_str().unwrap()]);
    let address = proxy.listener("web");
    async fn echo_once(stream: &mut tokio::net::TcpStream) {
        stream.write_all(b"ping").await.unwrap();
        let mut pong = [0_u8; 4];
        stream.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"ping");
    }
    let before = proxy.open_descriptors();
    let rss_before = proxy.rss_kib();
    const N: usize = 1000;
    let mut idle = Vec::new();
    for _ in 0..N {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        echo_once(&mut stream).await;
        idle.push(stream);
    }
    let held = proxy.open_descriptors().saturating_sub(before);
    eprintln!("{held} descriptors for {N} idle spliced connections");
    // Two sockets each, and the worker's spare pipes (at most 64, two descriptors each).
    assert!(held <= 2 * N + 2 * 64 + 16, "{held} descriptors for {N} idle spliced connections");
    // Memory: the relay's task (sized by `listener::tests`), two registrations, the record; past
    // the give-back that follows a burst (`memory::give_back`).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_connection = proxy.rss_kib().saturating_sub(rss_before) * 1024 / N as u64;
    eprintln!("{per_connection} bytes per idle spliced connection");
    assert!(per_connection < 8 * 1024, "{per_connection} bytes per idle spliced connection");
    for stream in idle.iter_mut().step_by(50) {
        echo_once(stream).await;
    }
}

/// Idle relays hold no copy buffers (`relay::copy_both`): a thousand `CONNECT` tunnels through a
/// pass-through cluster, each echoing a few bytes and then left idle, cost the proxy a few kB each
/// (tokio's copy held two 8 KiB buffers per tunnel for its life), and each still relays when bytes
/// come again.
#[tokio::test]
async fn idle_tunnels_hold_no_copy_buffers_and_relay_again() {
    use remora_proxy::testing::TcpEchoServer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    allow_many_sockets();
    let echo = TcpEchoServer::start().await;
    let config = write_config(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\nresources:\n  - {kind: Cluster, name: pass, original_destination: true}\n  - {kind: Listener, name: web, address: \"127.0.0.1:0\", protocol: http1, default_cluster: pass}\n",
    );
    let mut proxy = Spawned::new(&["proxy", "--config", config.to_str().unwrap()]);
    let address = proxy.listener("web");
    let target = echo.address();

    async fn open(address: SocketAddr, target: SocketAddr) -> tokio::net::TcpStream {
        let mut stream = crate::tunnels::connect_through(address, &target.to_string()).await;
        echo_once(&mut stream).await;
        stream
    }
    async fn echo_once(stream: &mut tokio::net::TcpStream) {
        stream.write_all(b"ping").await.unwrap();
        let mut pong = [0_u8; 4];
        stream.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"ping");
    }
    let mut warm = Vec::new();
    for _ in 0..16 {
        warm.push(open(address, target).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proxy.rss_kib();
    const N: u64 = 1000;
    let mut idle = Vec::new();
    for _ in 0..N {
        idle.push(open(address, target).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_tunnel = (proxy.rss_kib().saturating_sub(before)) * 1024 / N;
    eprintln!("{per_tunnel} bytes of proxy RSS per idle tunnel");
    // 2.2 kB for this debug build on the change that parked relays; 18.9 kB with tokio's copy,
    // which held its buffers. The bound leaves room for a busy machine.
    assert!(per_tunnel < 8 * 1024, "{per_tunnel} bytes per idle tunnel");
    for stream in idle.iter_mut().step_by(50) {
        echo_once(stream).await;
    }
    drop(warm);
}

/// Idle HTTP between sidecars costs little on either side: the client sidecar's cluster lists the
/// server sidecar's inbound listener at 500 loopback addresses, so 500 requests open 500 mesh
/// connections (mutual TLS, HTTP/2), which then sit idle, tidied on both sides (`http::tidy` on
/// the client's pool, `server::Driven` on the server), and serve again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mesh_connections_cost_little_on_both_sidecars_and_serve_again() {
    const N: usize = 500;
    allow_many_sockets();
    let app = HttpServer::start("app").await;
    let dir = temp_dir("remora-idle-mesh");
    let ca = remora_control_plane::testing::TestCa::new("cluster.local");
    let api = ca.issue("spiffe://cluster.local/ns/t/sa/api").bootstrap_identity(&dir.join("api"));
    let web = ca.issue("spiffe://cluster.local/ns/t/sa/web").bootstrap_identity(&dir.join("web"));
    let spawn = |name: &str, yaml: String| {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        Spawned::new(&["proxy", "--config", path.to_str().unwrap()])
    };
    let mut server = spawn(
        "server",
        format!(
            "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n{api}---\nresources:\n{}  - {{kind: Listener, name: in, address: \"0.0.0.0:0\", direction: inbound, default_cluster: app}}\n",
            cluster("app", ", protocol: http1", &[app.address()])
        ),
    );
    let port = server.listener("in").port();
    let endpoints: Vec<SocketAddr> =
        (0..N).map(|i| SocketAddr::from(([127, 0, (i / 250) as u8, (i % 250 + 1) as u8], port))).collect();
    let mut client = spawn(
        "client",
        format!(
            "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n{web}---\nresources:\n{}  - {{kind: Listener, name: out, address: \"127.0.0.1:0\", protocol: http1, default_cluster: mesh}}\n",
            cluster("mesh", ", tls: mesh, protocol: http1", &endpoints)
        ),
    );
    let out = client.listener("out");
    let mut app_client = Client::http1(out).await;
    assert_eq!(app_client.get("app", "/").await.status, 200);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let before = [client.rss_kib(), server.rss_kib()];
    for _ in 1..N {
        let reply = app_client.get("app", "/").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // Past the periodic give-back.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = [client.rss_kib(), server.rss_kib()];
    let handshakes = server.metric("remora_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}");
    let per = |i: usize| after[i].saturating_sub(before[i]) * 1024 / N as u64;
    eprintln!(
        "{handshakes} mesh connections; {} and {} bytes of RSS each on the client and server sidecars",
        per(0),
        per(1)
    );
    assert!(
        handshakes >= N as f64,
        "only {handshakes} mesh connections opened: round robin should open one per endpoint"
    );
    // 14.8 and 12.5 kB measured on this debug build; 23.4 kB on the client with hyper's request
    // queue holding its 10 KiB block (`vendor/hyper`), 40.5 kB before its pool was tidied (release
    // build, `benches/transports.rs`).
    assert!(per(0) < 20 * 1024, "{} bytes per idle pooled mesh connection", per(0));
    assert!(per(1) < 20 * 1024, "{} bytes per idle inbound mesh connection", per(1));
    // Served again over the tidied connections (no new handshakes needed).
    for _ in 0..50 {
        let reply = app_client.get("app", "/").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

/// Memory comes back after a burst: a thousand connections at once, each moving a 256 KiB response,
/// grow the proxy by tens of MiB; once they have closed (and the pool has let go of its upstream
/// connections beyond its 32 most recent, after 5 s idle) the proxy's RSS returns near where it was. The system
/// allocator alone kept the peak (`memory::give_back`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_comes_back_after_a_burst() {
    allow_many_sockets();
    let upstream = HttpServer::start("a").await;
    let config = write_config(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\nresources:\n{}  - {{kind: RouteTable, name: web, routes: [{{backends: [{{cluster: web}}]}}]}}\n  - {{kind: Listener, name: web, address: \"127.0.0.1:0\", protocol: http1}}\n",
        cluster("web", ", connect_timeout: 10s", &[upstream.address()])
    ));
    let mut proxy = Spawned::new(&["proxy", "--config", config.to_str().unwrap()]);
    let address = proxy.listener("web");
    let mut client = Client::http1(address).await;
    assert_eq!(client.get("a", "/bytes/1024").await.status, 200);
    drop(client);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = proxy.rss_kib();

    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        burst.spawn(async move {
            let mut client = Client::http1(address).await;
            let reply = client.get("a", "/bytes/262144").await;
            assert_eq!(
                (reply.status.as_u16(), reply.body.len()),
                (200, 262_144),
                "{}",
                String::from_utf8_lossy(&reply.body[..reply.body.len().min(64)])
            );
        });
    }
    let mut peak = 0;
    while !burst.is_empty() {
        peak = peak.max(proxy.rss_kib());
        if let Ok(Some(done)) = tokio::time::timeout(Duration::from_millis(50), burst.join_next()).await {
            done.unwrap();
        }
    }
    peak = peak.max(proxy.rss_kib());
    let open = |proxy: &mut Spawned| proxy.metric("remora_upstream_connections_active{cluster=\"web\"}");
    let pooled = open(&mut proxy);
    // Within 10% of before (and 2 MiB for what the burst grew for good: the worker's timer and
    // task tables), well within 30 s, with the cluster's default idle timeout (60 s): the pool
    // keeps its 32 most recently used connections and closes the burst's surplus after 5 s idle
    // (`limits::POOL_SURPLUS_IDLE_TIMEOUT`; 512 stayed for the idle timeout before), and the
    // allocator gives back once the burst has ended and every 5 s.
    let bound = before + before / 10 + 2048;
    let started = std::time::Instant::now();
    let mut now = proxy.rss_kib();
    while now > bound && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        now = proxy.rss_kib();
    }
    eprintln!(
        "proxy RSS: {before} KiB before the burst, {peak} KiB at its peak, {now} KiB after {:?}",
        started.elapsed()
    );
    assert!(peak > before + 8 * 1024, "the burst did not grow the proxy ({before} to {peak} KiB): it tests nothing");
    assert!(now <= bound, "RSS stayed at {now} KiB after the burst, from {before} KiB before");
    // The pool keeps the 32 most recently used upstream connections for the idle timeout, and
    // closes the rest once they have been idle for 5 s.
    let mut kept = open(&mut proxy);
    while kept > 32.0 && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        kept = open(&mut proxy);
    }
    eprintln!("upstream connections: {pooled} pooled after the burst, {kept} after {:?}", started.elapsed());
    assert!(pooled > 32.0, "the burst pooled {pooled} upstream connections: it tests nothing");
    assert!((1.0..=32.0).contains(&kept), "{kept} upstream connections kept after the burst");
    let mut client = Client::http1(address).await;
    assert_eq!(client.get("a", "/bytes/1024").await.status, 200);
}

/// A proxy runs with glibc's thread cache at four blocks of each size (`memory::with_tuned_allocator`):
/// the same process started again in place with the same arguments, an operator's other tunables
/// kept, and a cache size the operator set left as it is.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[tokio::test]
async fn the_proxy_runs_with_its_allocator_tuned_keeping_the_operators_tunables() {
    let upstream = HttpServer::start("a").await;
    let config = write_config(&proxy_config(upstream.address()));
    for (operator, expected) in [
        ("", "glibc.malloc.tcache_count=4"),
        ("glibc.malloc.arena_max=4", "glibc.malloc.arena_max=4:glibc.malloc.tcache_count=4"),
        ("glibc.malloc.tcache_count=7", "glibc.malloc.tcache_count=7"),
    ] {
        let mut proxy =
            Spawned::with_env(&["proxy", "--config", config.to_str().unwrap()], &[("GLIBC_TUNABLES", operator)]);
        let address = proxy.listener("web");
        // glibc, parsing the tunables at start, ends each one in place (its `:` becomes a NUL), so
        // the entries after the variable that name a tunable are the rest of its value.
        let environ = std::fs::read(format!("/proc/{}/environ", proxy.child.id())).unwrap();
        let entries: Vec<&[u8]> = environ.split(|&byte| byte == 0).collect();
        let at = entries.iter().position(|entry| entry.starts_with(b"GLIBC_TUNABLES=")).unwrap();
        let mut tunables = vec![&entries[at][b"GLIBC_TUNABLES=".len()..]];
        tunables.extend(entries[at + 1..].iter().take_while(|entry| entry.starts_with(b"glibc.")));
        assert_eq!(tunables.join(&b':'), expected.as_bytes(), "GLIBC_TUNABLES set to {operator:?} by the operator");
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", proxy.child.id())).unwrap();
        assert!(cmdline.ends_with(format!("proxy\0--config\0{}\0", config.display()).as_bytes()));
        let mut client = Client::http1(address).await;
        assert_eq!(client.get("a", "/bytes/16").await.status, 200);
    }
}

/// Config costs little and comes back: a proxy whose file goes from one cluster to 2,000 clusters of
/// five endpoints, each with a route, grows by a few kilobytes per cluster once the config has
/// settled, and returns near where it started when the file is small again. (A release build held
/// 8.3 kB per cluster when the resources were kept decoded and parsed among the compiled config,
/// 3.0 kB after, 2.35 kB since backends, histograms and outlier counters take their room at first
/// use, 1.96 kB since a set that reads no endpoint state keeps none, 1.94 kB with glibc's thread
/// cache at 4 blocks: `benches/config-memory.sh`.)
#[test]
fn a_large_config_costs_a_few_kilobytes_per_cluster_and_comes_back() {
    const CLUSTERS: usize = 2000;
    let text = |clusters: usize| {
        let mut text = String::from(
            "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\nresources:\n  - {kind: Listener, name: in, address: \"127.0.0.1:0\", protocol: http1, route_tables: [t]}\n  - kind: RouteTable\n    name: t\n    routes:\n",
        );
        for c in 0..clusters {
            text.push_str(&format!("      - {{match: {{path: {{prefix: /c{c}/}}}}, backends: [{{cluster: c{c}}}]}}\n"));
        }
        for c in 0..clusters {
            let endpoints: Vec<String> =
                (1..=5).map(|e| format!("{{address: \"10.{}.{}.{e}:8080\"}}", c >> 8, c & 255)).collect();
            text.push_str(&format!(
                "  - {{kind: Cluster, name: c{c}, protocol: http1}}\n  - {{kind: Endpoints, cluster: c{c}, endpoints: [{}]}}\n",
                endpoints.join(", ")
            ));
        }
        text
    };
    let config = write_config(&text(1));
    let replace = |yaml: &str| {
        let next = config.with_extension("next");
        std::fs::write(&next, yaml).unwrap();
        std::fs::rename(&next, &config).unwrap();
    };
    let mut proxy = Spawned::new(&["proxy", "--config", config.to_str().unwrap()]);
    proxy.wait_for_count("config applied", 1);
    // Settled: past the periodic give-back (every 5 s).
    let settle = Duration::from_secs(6);
    std::thread::sleep(settle);
    let small = proxy.rss_kib();
    replace(&text(CLUSTERS));
    proxy.wait_for_count("config applied", 2);
    std::thread::sleep(settle);
    let large = proxy.rss_kib();
    replace(&text(1));
    proxy.wait_for_count("config applied", 3);
    std::thread::sleep(settle);
    let back = proxy.rss_kib();
    let per_cluster = large.saturating_sub(small) * 1024 / CLUSTERS as u64;
    eprintln!(
        "proxy RSS: {small} KiB, {large} KiB with {CLUSTERS} clusters ({per_cluster} bytes each), {back} KiB after"
    );
    assert!(large > small + 1024, "the large config did not grow the proxy ({small} to {large} KiB): it tests nothing");
    // Twice the goal of 2 kB; 5.3 kB before the parse ran apart from the compile.
    assert!(per_cluster < 4 * 1024, "{per_cluster} bytes per cluster");
    assert!(back <= small + small / 10, "RSS stayed at {back} KiB after the config shrank, from {small} KiB");
}

/// `remora demo` starts the samples and a proxy, reports the burst, the failure, the live change and
/// the mTLS act, and stops cleanly on Ctrl-C.
#[test]
fn demo_reports_a_burst_and_stops_on_ctrl_c() {
    let mut demo = Spawned::new(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--control",
        "127.0.0.1:0",
        "--requests",
        "30",
    ]);
    demo.wait_for("Ctrl-C drains");
    demo.wait_for("status     200 x 30");
    demo.wait_for("served by  sample-a 10   sample-b 10   sample-c 10");
    // sample-c failing: the client still sees only 200s, from the other two; the proxy retried
    // every failure and ejected sample-c after its third.
    // (A few requests already on their way to sample-c when it was ejected fail too: 3 or a bit more.)
    let behind = demo.wait_for("  behind it  ");
    let number = |after: &str| -> u64 {
        let rest = &behind[behind.find(after).unwrap() + after.len()..];
        rest.trim_start_matches(|c: char| !c.is_ascii_digit())
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (failed, retries) = (number("answered 503"), number("sample ("));
    assert!((3..=8).contains(&failed) && retries == failed, "{behind}");
    assert!(behind.contains("ejected 1 time(s)"), "{behind}");
    let lines = demo.seen.join("\n");
    let failure_act = &lines[lines.find("A failure").unwrap()..lines.find("  behind it").unwrap()];
    assert!(failure_act.contains("status     200 x 30"), "{failure_act}");
    let served = failure_act.lines().find(|l| l.contains("served by")).unwrap();
    assert!(!served.contains("sample-c"), "{served}");
    // The live route edit applied, and nothing failed while it did.
    let applied = demo.wait_for("  applied    ");
    let ms: f64 = applied.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(ms < 1000.0, "{applied}");
    demo.wait_for("status     200 x 20");
    demo.wait_for("served by  sample-b 20");
    assert!(!demo.seen.iter().any(|l| l.contains("failures")), "{}", demo.seen.join("\n"));
    // Across mTLS to the second sidecar, which tells its app who called.
    demo.wait_for("caller     the orders app was told spiffe://cluster.local/ns/demo/sa/client on 20 request(s)");
    let identities = demo.wait_for("  identities ");
    assert!(identities.contains("1 handshake(s) out, 1 in"), "{identities}");
    let curl = demo.wait_for("curl -i http://");
    assert!(curl.contains("127.0.0.1:"), "{curl}");
    let metrics = demo.wait_for("  metrics    http://");
    assert!(metrics.contains("/metrics"), "{metrics}");
    demo.wait_for("  traces     ");
    demo.signal(Signal::INT);
    assert_eq!(demo.exit_code(), 0);
    demo.wait_for("drained; bye");
}

/// `remora control` serving a directory and `remora proxy --control` taking its config from it, both
/// as real processes; both exit 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_and_proxy_processes_work_together() {
    let upstream = HttpServer::start("upstream").await;
    let dir = temp_dir("remora-cli-control");
    let yaml = proxy_config(upstream.address());
    std::fs::write(dir.join("mesh.yaml"), format!("resources:\n{}", yaml.split_once("resources:\n").unwrap().1))
        .unwrap();
    let mut control = Spawned::new(&["control", "--config-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    let line = control.wait_for("remora control serving Delta ADS");
    let address = line.rsplit("address=").next().unwrap().trim().to_owned();
    let admin = write_config("bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n");
    let url = format!("http://{address}");
    let mut proxy =
        Spawned::new(&["proxy", "--config", admin.to_str().unwrap(), "--control", &url, "--node-id", "cli-node"]);
    let web = proxy.listener("web");
    proxy.wait_for("first configuration from the control plane applied; ready");
    let reply = Client::http1(web).await.get("x", "/").await;
    assert_eq!(reply.header("x-served-by"), "upstream");
    control.wait_for("proxy connected node=cli-node");
    proxy.signal(Signal::TERM);
    assert_eq!(proxy.exit_code(), 0);
    control.signal(Signal::TERM);
    assert_eq!(control.exit_code(), 0);
}

/// `remora register` holds a registration in etcd while it runs and removes it on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_joins_while_running_and_leaves_on_sigterm() {
    let Some(etcd) = remora_control_plane::testing::TestEtcd::start().await else { return };
    let prefix = etcd.prefix();
    let mut register = Spawned::new(&[
        "register",
        "--etcd",
        etcd.url(),
        "--cluster",
        "shop",
        "--address",
        "127.0.0.1:9",
        "--weight",
        "3",
        "--ttl",
        "5",
        "--etcd-prefix",
        &prefix,
    ]);
    register.wait_for("registered");
    let direct = remora_control_plane::sources::etcd::Etcd::connect(etcd.url()).await.unwrap();
    let (kvs, _) = direct.range_prefix(&prefix).await.unwrap();
    assert_eq!(kvs.len(), 1);
    assert_eq!(&kvs[0].key[..], format!("{}shop/127.0.0.1:9", prefix).as_bytes());
    assert_eq!(&kvs[0].value[..], br#"{"weight":3}"#);
    register.signal(Signal::TERM);
    assert_eq!(register.exit_code(), 0);
    register.wait_for("deregistered");
    assert!(direct.range_prefix(&prefix).await.unwrap().0.is_empty());
}

/// A control-plane directory that does not load stops `remora control` at start-up, naming the file.
#[test]
fn control_refuses_a_broken_directory_at_start_up() {
    let dir = temp_dir("remora-cli-broken");
    std::fs::write(dir.join("ok.yaml"), "kind: Cluster\nname: a\n").unwrap();
    std::fs::write(dir.join("bad.yaml"), "kind: Cluster\nname: b\nbalancer: fastest\n").unwrap();
    let output = Command::new(REMORA)
        .args(["control", "--config-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.yaml") && stderr.contains("balancer"), "{stderr}");
}

/// The log filter changes at runtime through `/logging`: read, set (a debug line then appears),
/// and a bad filter is refused with 400 and the old one kept.
#[tokio::test]
async fn the_log_filter_changes_at_runtime_through_the_admin_api() {
    let config = write_config(&proxy_config(crate::dead_address()));
    let mut proxy = Spawned::new(&["proxy", "--config", config.to_str().unwrap()]);
    let address = proxy.listener("web");
    let started = proxy.wait_for("remora proxy started");
    let admin: SocketAddr = started.split("admin=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let mut client = Client::http1(admin).await;
    let reply = client.get("admin", "/logging").await;
    assert_eq!((reply.status.as_u16(), reply.text().trim()), (200, "info"));

    let set = |client: &Client, query: &'static str| {
        client.request(Method::POST, "admin", query).body(full(Vec::new())).unwrap()
    };
    let request = set(&client, "/logging?filter=remora_proxy%3A%3Ahttp=debug,info");
    let reply = remora_proxy::testing::client::read(client.send(request).await.unwrap()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(client.get("admin", "/logging").await.text().trim(), "remora_proxy::http=debug,info");
    // A request that fails now logs at debug.
    let mut app = Client::http1(address).await;
    assert_eq!(app.get("x", "/").await.status, 503);
    proxy.wait_for("request failed");

    let reply =
        remora_proxy::testing::client::read(client.send(set(&client, "/logging?filter=[nope")).await.unwrap()).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.text().contains("invalid log filter"), "{}", reply.text());
    assert_eq!(client.get("admin", "/logging").await.text().trim(), "remora_proxy::http=debug,info");
    let reply =
        remora_proxy::testing::client::read(client.send(set(&client, "/logging?level=warn")).await.unwrap()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(client.get("admin", "/logging").await.text().trim(), "warn");
}

/// In directory mode there is no API server to write a route's status to: `remora control` logs
/// each condition that does not hold, naming the route, its parent Service and the reason.
#[test]
fn broken_routes_in_the_directory_are_logged() {
    let dir = temp_dir("remora-cli-routes");
    std::fs::write(
        dir.join("routes.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {namespace: shop, name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {namespace: shop, name: canary}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules: [{backendRefs: [{name: web-v2, port: 80}]}]\n",
    )
    .unwrap();
    let mut control = Spawned::new(&["control", "--config-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    let line = control.wait_for("route condition does not hold");
    for part in [
        "route=shop/canary",
        "service=shop/web",
        "condition=\"ResolvedRefs\"",
        "reason=\"BackendNotFound\"",
        "detail=no Service port shop/web-v2:80",
    ] {
        assert!(line.contains(part), "{part} missing in {line}");
    }
    control.signal(Signal::TERM);
    assert_eq!(control.exit_code(), 0);
}

/// A proxy that holds its view costs the control plane little for as long as its stream stays
/// open: its record of what the proxy holds is the publication's own view (not a list of its own,
/// 8 bytes a resource), and the stream keeps no encoding buffer the size of the largest response
/// it sent (tonic's, vendor/tonic) nor a decoding buffer. 40 proxies, each sent 3,000 clusters and
/// 3,000 endpoint sets one after another, add under 64 kB of the control plane's resident memory
/// each; the record and the encoding buffer alone were 48 kB and 32 to 64 kB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_holding_its_view_costs_the_control_plane_little_memory() {
    use std::collections::HashMap;

    use remora_control_api::Kind;
    use remora_control_plane::testing::GenericClient;

    const CLUSTERS: usize = 3_000;
    const PROXIES: usize = 40;
    let dir = temp_dir("remora-cli-control-memory");
    let mut yaml = String::from("resources:\n");
    for c in 0..CLUSTERS {
        yaml.push_str(&format!(
            "  - {{kind: Cluster, name: c{c}}}\n  - {{kind: Endpoints, cluster: c{c}, endpoints: [{{address: \"10.{}.{}.1:8080\"}}, {{address: \"10.{}.{}.2:8080\"}}]}}\n",
            c / 250, c % 250, c / 250, c % 250
        ));
    }
    std::fs::write(dir.join("endpoints.yaml"), yaml).unwrap();
    let mut control = Spawned::new(&["control", "--config-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    let line = control.wait_for("serving Delta ADS");
    let url = format!("http://{}", line.rsplit("address=").next().unwrap().trim());
    let kinds = [Kind::Cluster, Kind::Endpoints];
    // Connects, and ACKs until both kinds are held whole.
    let connect = |node: String| {
        let url = url.clone();
        async move {
            let subscriptions: Vec<_> = kinds.iter().map(|k| (k.type_url(), HashMap::new())).collect();
            let mut client = GenericClient::connect(&url, &node, &subscriptions).await;
            let mut held = [0; 2];
            while held.iter().any(|&n| n < CLUSTERS) {
                let response = client.next().await;
                let kind = kinds.iter().position(|k| k.type_url() == response.type_url).unwrap();
                held[kind] += response.resources.len();
                client.ack(&response).await;
            }
            client
        }
    };
    // The first stream's one-time costs (the encoder's tables, the runtime's) are not counted.
    let mut clients = vec![connect("warm-up".into()).await];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = control.rss_kib();
    for i in 0..PROXIES {
        clients.push(connect(format!("proxy-{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_proxy = (control.rss_kib().saturating_sub(before) * 1024) / PROXIES as u64;
    println!("{PROXIES} proxies holding {CLUSTERS} clusters and endpoint sets: {per_proxy} bytes of RSS each");
    assert!(per_proxy < 64 * 1024, "{per_proxy} bytes per connected proxy");
    drop(clients);
    control.signal(Signal::TERM);
    assert_eq!(control.exit_code(), 0);
}
