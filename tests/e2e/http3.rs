//! HTTP/3 listeners, against a client written apart from Remora (`h3_client.py`: aioquic's QUIC
//! and HTTP/3): requests through the same route tables as the TCP listeners to a real upstream, a
//! streamed request body with trailers echoed back with the response's trailers, many requests on
//! one connection, `CONNECT` refused, `Alt-Svc` on a TCP listener naming the bound UDP port; the
//! certificate re-read when its files change; a certificate that does not load rejected, naming the
//! listener, while the old config serves; junk datagrams leave the listener serving.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use remora_control_plane::testing::TestCa;
use remora_proxy::testing::client::Client;
use remora_proxy::testing::proxy::temp_dir;
use remora_proxy::testing::{HttpServer, TestProxy, eventually};
use serde_json::{Value, json};

/// Whether the independent client can run here; says why not when it cannot.
fn python_aioquic() -> bool {
    let found = Command::new("python3").args(["-c", "import aioquic"]).output().is_ok_and(|out| out.status.success());
    if !found {
        eprintln!("skipped: needs python3 with the aioquic package (pip install aioquic; .ci/run installs it)");
    }
    found
}

/// Runs the independent client (on a blocking thread, so the test's servers keep serving).
async fn h3_client(address: SocketAddr, ca: &Path, requests: Value) -> Value {
    let spec = json!({"address": address.to_string(), "ca": ca, "server_name": "localhost", "requests": requests});
    tokio::task::spawn_blocking(move || {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/h3_client.py");
        let out = Command::new("python3").arg(script).arg(spec.to_string()).output().unwrap();
        assert!(out.status.success(), "h3 client failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    })
    .await
    .unwrap()
}

/// A proxy with an HTTP/3 listener `quic` (certificate for `localhost` from `ca`) and an HTTP/1.1
/// listener `web` that advertises it, both routing everything to `app`.
struct Gateway {
    proxy: TestProxy,
    app: HttpServer,
    ca: TestCa,
    dir: PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Gateway {
    async fn start() -> Gateway {
        Gateway::start_with("").await
    }

    /// With `more` resources.
    async fn start_with(more: &str) -> Gateway {
        let ca = TestCa::new("cluster.local");
        let dir = temp_dir("remora-http3");
        ca.serving(&["localhost"]).write(&dir);
        let app = HttpServer::start("app").await;
        let proxy = TestProxy::start(&(Gateway::yaml(&dir, app.address(), "cert.pem") + more));
        Gateway { proxy, app, ca, dir }
    }

    fn yaml(dir: &Path, app: SocketAddr, certificate: &str) -> String {
        format!(
            "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 2\n  drain_time: 1s\n---\nresources:\n{}{}{}{}",
            crate::cluster("app", "", &[app]),
            crate::route_all("all", "app"),
            crate::listener(
                "quic",
                &format!(
                    ", protocol: http3, tls: {{certificate_file: \"{}\", private_key_file: \"{}\"}}",
                    dir.join(certificate).display(),
                    dir.join("key.pem").display()
                )
            ),
            crate::listener("web", ", protocol: http1, advertise_http3: quic"),
        )
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

#[tokio::test]
async fn an_independent_http3_client_is_served_through_the_route_tables_with_streamed_bodies_and_trailers() {
    if !python_aioquic() {
        return;
    }
    let gateway = Gateway::start().await;
    let quic = gateway.proxy.address("quic");
    let mut requests = vec![
        json!({"path": "/"}),
        json!({"method": "POST", "path": "/echo", "headers": [["content-type", "text/plain"]],
               "chunks": ["streamed ", "in ", "three parts"], "trailers": [["x-checksum", "c0ffee"]]}),
        json!({"method": "CONNECT"}),
        json!({"path": "/status/503"}),
    ];
    requests.extend((0..16).map(|i| json!({"path": format!("/many/{i}")})));
    let result = h3_client(quic, &gateway.ca_file(), Value::Array(requests)).await;
    assert_eq!(result["error"], Value::Null, "{result}");
    let responses = result["responses"].as_array().unwrap();

    let get = &responses[0];
    assert_eq!(get["status"], 200, "{get}");
    assert_eq!(get["body"], "hello from app\n");
    // `protocol: auto` upstream: HTTP/3 is multiplexed, so HTTP/2 upstream.
    assert_eq!(get["headers"]["x-seen-version"], "HTTP/2.0", "{get}");
    assert_eq!(get["headers"]["x-seen-host"], format!("localhost:{}", quic.port()), "{get}");

    let echo = &responses[1];
    assert_eq!(echo["status"], 200, "{echo}");
    assert_eq!(echo["body"], "streamed in three parts", "{echo}");
    assert_eq!(echo["trailers"]["x-checksum"], "c0ffee", "the request's trailers came back as the response's: {echo}");

    assert_eq!(responses[2]["status"], 501, "CONNECT is not served over HTTP/3: {}", responses[2]);
    assert_eq!(responses[3]["status"], 503);
    for response in &responses[4..] {
        assert_eq!(response["status"], 200, "{response}");
    }
    assert_eq!(gateway.app.hits(), 19, "every request but CONNECT reached the app");

    let requests = "remora_requests_total{listener=\"quic\",direction=\"outbound\",status_class=\"2xx\"}";
    eventually("the listener's responses counted", Duration::from_secs(5), || async {
        gateway.proxy.metric(requests).await == 18.0
    })
    .await;
    let connections = "remora_listener_connections_total{listener=\"quic\",direction=\"outbound\"}";
    assert_eq!(gateway.proxy.metric(connections).await, 1.0, "every request rode one QUIC connection");
    let received = "remora_listener_received_bytes_total{listener=\"quic\",direction=\"outbound\"}";
    eventually("the connection's bytes counted", Duration::from_secs(5), || async {
        gateway.proxy.metric(received).await > 0.0
    })
    .await;
}

#[tokio::test]
async fn a_tcp_listener_advertises_the_bound_http3_port() {
    let gateway = Gateway::start().await;
    let quic = gateway.proxy.address("quic");
    let mut client = Client::http1(gateway.proxy.address("web")).await;
    let reply = client.get("app", "/").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("alt-svc"), format!("h3=\":{}\"; ma=86400", quic.port()));
}

#[tokio::test]
async fn the_certificate_follows_its_files_and_a_bad_one_is_rejected_while_the_old_config_serves() {
    if !python_aioquic() {
        return;
    }
    let gateway = Gateway::start().await;
    let quic = gateway.proxy.address("quic");
    let first = h3_client(quic, &gateway.ca_file(), json!([{"path": "/"}])).await;
    assert_eq!(first["responses"][0]["status"], 200, "{first}");

    // New files in place: new connections get the new certificate.
    gateway.ca.serving(&["localhost"]).write(&gateway.dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        let second = h3_client(quic, &gateway.ca_file(), json!([{"path": "/"}])).await;
        if second["certificate_serial"] != first["certificate_serial"] {
            break second;
        }
        assert!(Instant::now() < deadline, "the new certificate was not served: {second}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(second["responses"][0]["status"], 200, "{second}");
    let reloads = "remora_listener_certificate_reloads_total{listener=\"quic\",result=\"ok\"}";
    assert!(gateway.proxy.metric(reloads).await >= 1.0);

    // A config naming a file that is not there is rejected whole, naming the listener and field.
    gateway.proxy.rewrite(&Gateway::yaml(&gateway.dir, gateway.app.address(), "missing.pem"));
    let error = gateway.proxy.reload().unwrap_err().to_string();
    assert!(error.contains("listener \"quic\": tls:") && error.contains("missing.pem"), "{error}");
    // One that never ends is not read at all, and a file larger than any certificate not whole.
    gateway.proxy.rewrite(&Gateway::yaml(&gateway.dir, gateway.app.address(), "/dev/zero"));
    let error = gateway.proxy.reload().unwrap_err().to_string();
    assert!(error.contains("/dev/zero: not a regular file"), "{error}");
    let large = gateway.dir.join("large.pem");
    std::fs::write(&large, vec![b'-'; 5 * 1024 * 1024]).unwrap();
    gateway.proxy.rewrite(&Gateway::yaml(&gateway.dir, gateway.app.address(), "large.pem"));
    let error = gateway.proxy.reload().unwrap_err().to_string();
    assert!(error.contains("large.pem: larger than"), "{error}");
    let third = h3_client(quic, &gateway.ca_file(), json!([{"path": "/"}])).await;
    assert_eq!(third["responses"][0]["status"], 200, "the old config keeps serving: {third}");
}

#[tokio::test]
async fn a_strict_authorization_policy_refuses_http3_connections_as_plaintext() {
    if !python_aioquic() {
        return;
    }
    let policy =
        "  - {kind: AuthorizationPolicy, name: strict, listener: quic, allow: [\"spiffe://cluster.local/*\"]}\n";
    let gateway = Gateway::start_with(policy).await;
    let result = h3_client(gateway.proxy.address("quic"), &gateway.ca_file(), json!([{"path": "/"}])).await;
    assert!(result["error"].is_string(), "refused before any request: {result}");
    assert_eq!(gateway.app.hits(), 0);
    let refused = "remora_authorization_plaintext_total{listener=\"quic\",policy=\"strict\",result=\"refused\"}";
    assert!(gateway.proxy.metric(refused).await >= 1.0);
}

#[tokio::test]
async fn junk_datagrams_leave_the_listener_serving() {
    if !python_aioquic() {
        return;
    }
    let gateway = Gateway::start().await;
    let quic = gateway.proxy.address("quic");
    crate::junk_datagrams(quic, 2000, 7).await;
    let result = h3_client(quic, &gateway.ca_file(), json!([{"path": "/"}])).await;
    assert_eq!(result["responses"][0]["status"], 200, "{result}");
}

#[tokio::test]
async fn a_drain_lets_the_request_in_flight_finish_and_takes_no_new_connection() {
    if !python_aioquic() {
        return;
    }
    let gateway = Gateway::start().await;
    let quic = gateway.proxy.address("quic");
    let ca = gateway.ca_file();
    let slow = tokio::spawn(async move { h3_client(quic, &ca, json!([{"path": "/slow/800"}])).await });
    eventually("the slow request at the app", Duration::from_secs(10), || async { gateway.app.hits() == 1 }).await;
    let drained = gateway.proxy.proxy().drain().await;
    let result = slow.await.unwrap();
    assert_eq!(result["responses"][0]["status"], 200, "the request in flight finished: {result}");
    assert_eq!(result["responses"][0]["body"], "slow done\n");
    assert!(drained, "every connection closed within the drain time");
    let after = h3_client(quic, &gateway.ca_file(), json!([{"path": "/"}])).await;
    assert!(after["error"].is_string(), "no new connection while draining: {after}");
}
