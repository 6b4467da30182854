//! The automatic mesh end to end, as root, in network namespaces the test creates: pods with
//! `remora init`'s capture rules and sidecars on their built-in defaults (as uid 1337, as the
//! injector runs them), a control plane meshing the Kubernetes manifests of its directory, and
//! apps that call a Service's ClusterIP as if there were no mesh.
//!
//! - `web` (a pod with a sidecar, service account `web`) calls the Service `api`'s ClusterIP. Its
//!   sidecar finds the ClusterIP in its view (the pod's own namespace has no kube-proxy rules: the
//!   original destination is the ClusterIP) and balances each request over the Service's three
//!   endpoints, over mutual TLS to their pod's sidecar, which proves `api`'s identity and tells the
//!   app who called; the metrics on both sides name both identities, the caller's requests by
//!   destination Service and the callee's by calling workload.
//! - Opaque TCP to the `api` pods (the Service `api-tcp`, `appProtocol: tcp`) rides an HBONE
//!   tunnel to the pod's HBONE listener, which capture leaves alone.
//! - `plain` (a pod without a sidecar) behind the Service `plain` is called in plaintext; behind
//!   the Service `banner`, whose port says `appProtocol: tcp`, a server that speaks first is heard
//!   at once (the port is forwarded without waiting to detect a protocol).
//! - A request to one Service's ClusterIP that names another in its Host header follows the
//!   Service of the ClusterIP (Gateway API's ClusterIP matching).
//! - An endpoint that leaves the Service's slice gets no more requests.
//! - The namespace annotated `remora.dev/inbound: strict` makes the `api` sidecar refuse plaintext,
//!   which it served (and counted) while permissive; the mesh's calls still pass.
//!
//! The `api` pods are one namespace with three addresses and one sidecar (replicas of one
//! Deployment share a service account, so one sidecar's identity stands for all three).

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use remora_proxy::testing::{Client, HttpServer};

use crate::netns::{self, Netns};

const WEB_IP: &str = "10.84.0.1";
const API_IPS: [&str; 3] = ["10.84.0.11", "10.84.0.12", "10.84.0.13"];
const API_NODE_IP: &str = "10.84.0.2";
const PLAIN_IP: &str = "10.85.0.2";
const PLAIN_PEER_IP: &str = "10.85.0.1";
const API_CLUSTER_IP: &str = "10.96.0.20";
const PLAIN_CLUSTER_IP: &str = "10.96.0.21";
/// A Service whose port says `appProtocol: tcp`, in front of a server that speaks first.
const BANNER_CLUSTER_IP: &str = "10.96.0.22";
/// The `api` pods again, behind a port that says `appProtocol: tcp`: opaque TCP between meshed pods.
const API_TCP_CLUSTER_IP: &str = "10.96.0.23";
/// The control plane's port, in the `web` namespace (excluded from its inbound capture).
const CONTROL_PORT: u16 = 15010;
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn address(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The manifests: the namespace (`inbound` mode), the two Services, the pods, and the `api` slice
/// with the endpoints in `serving`.
fn manifests(inbound: &str, serving: &[usize]) -> String {
    let mut documents = vec![
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, annotations: {{remora.dev/inbound: {inbound}}}}}\n"
        ),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{namespace: shop, name: api}}\nspec:\n  clusterIP: {API_CLUSTER_IP}\n  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]\n"
        ),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{namespace: shop, name: plain}}\nspec:\n  clusterIP: {PLAIN_CLUSTER_IP}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
        ),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{namespace: shop, name: banner}}\nspec:\n  clusterIP: {BANNER_CLUSTER_IP}\n  ports: [{{name: smtp, port: 25, targetPort: 2525, appProtocol: tcp}}]\n"
        ),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: shop, name: banner-1, labels: {{kubernetes.io/service-name: banner}}}}\naddressType: IPv4\nports: [{{name: smtp, port: 2525}}]\nendpoints:\n  - {{addresses: [\"{PLAIN_IP}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, namespace: shop, name: plain-0, uid: uid-plain-0}}}}\n"
        ),
        pod("web-0", "web", true),
        pod("plain-0", "default", false),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: shop, name: plain-1, labels: {{kubernetes.io/service-name: plain}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n  - {{addresses: [\"{PLAIN_IP}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, namespace: shop, name: plain-0, uid: uid-plain-0}}}}\n"
        ),
    ];
    let mut endpoints = String::new();
    for (i, ip) in API_IPS.iter().enumerate() {
        documents.push(pod(&format!("api-{i}"), "api", true));
        if serving.contains(&i) {
            endpoints.push_str(&format!(
                "  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, namespace: shop, name: api-{i}, uid: uid-api-{i}}}}}\n"
            ));
        }
    }
    documents.push(format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: shop, name: api-1, labels: {{kubernetes.io/service-name: api}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}"
    ));
    documents.push(format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: shop, name: api-tcp}}\nspec:\n  clusterIP: {API_TCP_CLUSTER_IP}\n  ports: [{{name: raw, port: 81, targetPort: 8080, appProtocol: tcp}}]\n"
    ));
    documents.push(format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: shop, name: api-tcp-1, labels: {{kubernetes.io/service-name: api-tcp}}}}\naddressType: IPv4\nports: [{{name: raw, port: 8080}}]\nendpoints:\n{endpoints}"
    ));
    documents.join("---\n")
}

/// A Pod running as `account`, with Remora's sidecar or without.
fn pod(name: &str, account: &str, sidecar: bool) -> String {
    let proxy = if sidecar { ", {name: remora-proxy}" } else { "" };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: shop, name: {name}, uid: uid-{name}}}\nspec: {{serviceAccountName: {account}, containers: [{{name: app}}{proxy}]}}\n"
    )
}

/// Writes `text` to the control plane's directory as git would: a new file renamed into place.
fn write_manifests(directory: &Path, text: &str) {
    let staging = directory.join(".shop.yaml.new");
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, directory.join("shop.yaml")).unwrap();
}

/// The sidecar's arguments: its config (`None`: the built-in defaults), the control plane, a node
/// ID, the identity's files.
fn sidecar_args(config: Option<&Path>, node: &str, files: &[std::path::PathBuf; 3]) -> Vec<String> {
    let control = format!("http://{WEB_IP}:{CONTROL_PORT}");
    let mut args: Vec<String> = ["proxy", "--control", &control, "--node-id", node].map(str::to_owned).into();
    if let Some(config) = config {
        args.extend(["--config".to_owned(), config.to_str().unwrap().to_owned()]);
    }
    for (flag, file) in ["--tls-cert", "--tls-key", "--tls-ca"].iter().zip(files) {
        args.push((*flag).to_owned());
        args.push(file.to_str().unwrap().to_owned());
    }
    args
}

/// A plaintext GET to `target` from the `web` namespace as uid 1337, which the capture rules let
/// pass untouched (as an unmeshed pod's call would arrive): the status code, or `None` when the
/// connection was closed without one.
fn plaintext_get_bypassing_the_sidecar(ns: &Netns, target: SocketAddr) -> Option<u16> {
    let script = format!(
        "import socket\ns = socket.create_connection(('{}', {}), timeout=5)\ns.sendall(b'GET / HTTP/1.1\\r\\nHost: api\\r\\nConnection: close\\r\\n\\r\\n')\ndata = b''\ntry:\n    while True:\n        chunk = s.recv(4096)\n        if not chunk: break\n        data += chunk\nexcept OSError:\n    pass\nprint(data.split(b' ')[1].decode() if data.startswith(b'HTTP/') else 'none')\n",
        target.ip(),
        target.port()
    );
    let net = format!("--net=/run/netns/{}", ns.name);
    let output = Command::new("nsenter")
        .args([net.as_str(), "-S", netns::PROXY_UID, "-G", netns::PROXY_UID, "python3", "-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// `requests` GETs to `target` on one keep-alive connection from the `web` app (captured by its
/// sidecar), counted by the app that served each; `Host` is the address, as an app calling
/// `http://CLUSTER-IP/` writes it. Every one must succeed.
fn spread(ns: &Netns, target: SocketAddr, requests: usize) -> (std::collections::BTreeMap<String, usize>, String) {
    ns.enter(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let mut client = Client::http1(target).await;
            let mut served = std::collections::BTreeMap::new();
            let mut identity = String::new();
            for _ in 0..requests {
                let reply = client.get(&target.ip().to_string(), "/").await;
                assert_eq!(reply.status, 200, "{target}: {}", reply.text());
                *served.entry(reply.header("x-served-by").to_owned()).or_insert(0) += 1;
                identity = reply.header("x-seen-client-identity").to_owned();
            }
            (served, identity)
        })
    })
}

/// Which app answered a GET to `target` from inside `ns` that names `host` in its Host header.
fn served_by(ns: &Netns, target: SocketAddr, host: &'static str) -> String {
    ns.enter(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let reply = Client::http1(target).await.get(host, "/").await;
            assert_eq!(reply.status, 200, "{target} as {host}: {}", reply.text());
            reply.header("x-served-by").to_owned()
        })
    })
}

/// Waits up to 20 s for `condition`, checked every 100 ms.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// The test's own steps block (threads in namespaces, subprocesses); the apps are served by the
// runtime's other workers meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_calls_a_cluster_ip_and_the_mesh_does_the_rest() {
    if !netns::can_run("the automatic mesh capture test") {
        return;
    }
    let web = Netns::create("am-web");
    let api = Netns::create("am-api");
    let plain = Netns::create("am-plain");
    let [web_end, api_end] = netns::link((&web, "rmw", WEB_IP), (&api, "rma", API_NODE_IP));
    netns::link((&web, "rmx", PLAIN_PEER_IP), (&plain, "rmy", PLAIN_IP));
    for ip in API_IPS {
        api.run("ip", &["addr", "add", &format!("{ip}/24"), "dev", &api_end]);
    }
    // The Services' addresses route out of the pod (no kube-proxy in the pod's own namespace): the
    // capture rules see them as the original destination.
    web.run("ip", &["route", "add", "10.96.0.0/16", "dev", &web_end]);

    // The apps: one per `api` address, named after it, and the plain pod's.
    let _api_apps: Vec<HttpServer> = (0..3)
        .map(|i| {
            let socket = api.enter(move || TcpListener::bind(address(API_IPS[i], 8080)).unwrap());
            HttpServer::start_on(&format!("api-{i}"), socket)
        })
        .collect();
    let plain_socket = plain.enter(|| TcpListener::bind(address(PLAIN_IP, 8080)).unwrap());
    let plain_app = HttpServer::start_on("plain", plain_socket);
    let banner_socket = plain.enter(|| TcpListener::bind(address(PLAIN_IP, 2525)).unwrap());
    std::thread::spawn(move || {
        for stream in banner_socket.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = std::io::Write::write_all(&mut stream, b"220 banner ready\r\n");
        }
    });

    let remora = env!("CARGO_BIN_EXE_remora");
    web.run(remora, &["init", "--exclude-inbound-ports", &CONTROL_PORT.to_string()]);
    api.run(remora, &["init"]);

    let directory = netns::temp_dir("remora-automatic-capture");
    let mesh = directory.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    std::fs::set_permissions(&mesh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    write_manifests(&mesh, &manifests("permissive", &[0, 1, 2]));
    let listen = address(WEB_IP, CONTROL_PORT).to_string();
    let control_log = directory.join("control.log");
    let control = web.spawn_proxy(
        &directory,
        &["control", "--config-dir", mesh.to_str().unwrap(), "--listen", &listen],
        &control_log,
    );

    let ca = remora_control_plane::testing::certs::TestCa::new("cluster.local");
    let web_files = ca.issue(WEB).write(&directory.join("web"));
    let api_files = ca.issue(API).write(&directory.join("api"));
    for dir in ["web", "api"] {
        std::fs::set_permissions(directory.join(dir), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let (web_log, api_log) = (directory.join("web.log"), directory.join("api.log"));
    // The caller's sidecar is the built-in defaults with a detection timeout no test waits out,
    // so that a server-speaks-first Service is answered only if its port is forwarded unread.
    let web_config = directory.join("web.yaml");
    let defaults: Vec<&str> = remora_proxy::bootstrap::DEFAULT_CONFIG
        .lines()
        .filter(|line| !line.trim_start().starts_with("additional_addresses:"))
        .collect();
    let defaults =
        defaults.join("\n").replace("    name: outbound\n", "    name: outbound\n    detect_timeout: 600s\n");
    assert!(defaults.contains("detect_timeout: 600s"), "{defaults}");
    std::fs::write(&web_config, defaults).unwrap();
    let args = sidecar_args(Some(&web_config), "web-0.shop", &web_files);
    let web_sidecar = web.spawn_proxy(&directory, &args.iter().map(String::as_str).collect::<Vec<_>>(), &web_log);
    let args = sidecar_args(None, "api-0.shop", &api_files);
    let api_sidecar = api.spawn_proxy(&directory, &args.iter().map(String::as_str).collect::<Vec<_>>(), &api_log);
    let logs = || {
        let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
        format!(
            "control plane:\n{}\nweb sidecar:\n{}\napi sidecar:\n{}",
            read(&control_log),
            read(&web_log),
            read(&api_log)
        )
    };
    let admin = address("127.0.0.1", 15000);
    for (ns, log) in [(&web, web_log.clone()), (&api, api_log.clone())] {
        ns.enter(move || netns::wait_ready(admin, &log));
    }

    // The ClusterIP, as if there were no mesh: each request balanced over the three pods, over
    // mutual TLS both sides prove, the app told who called.
    let (served, identity) = spread(&web, address(API_CLUSTER_IP, 80), 60);
    assert!(served.len() >= 2, "per-request balancing over the endpoints: {served:?}\n{}", logs());
    assert_eq!(served.values().sum::<usize>(), 60);
    assert_eq!(identity, WEB, "the api app is told who called");
    let web_metrics = web.enter(move || netns::metrics(admin));
    let api_metrics = api.enter(move || netns::metrics(admin));
    let to_api = format!(r#"remora_tls_peer_handshakes_total{{direction="outbound",result="ok",peer="{API}"}} "#);
    let from_web = format!(r#"remora_tls_peer_handshakes_total{{direction="inbound",result="ok",peer="{WEB}"}} "#);
    assert!(netns::value(&web_metrics, &to_api) >= 1.0, "{to_api}\n{web_metrics}");
    assert!(netns::value(&api_metrics, &from_web) >= 1.0, "{from_web}\n{api_metrics}");
    let http_to_api = r#"remora_upstream_responses_total{cluster="shop/api:80",status_class="2xx"} "#;
    assert_eq!(netns::value(&web_metrics, http_to_api), 60.0, "{web_metrics}");
    // Golden metrics: the caller's per destination Service, the callee's per calling workload.
    let to_service = r#"remora_route_requests_total{direction="outbound",route="shop/api:80/#0",cluster="shop/api:80",dst_namespace="shop",dst_service="api",code="200"} "#;
    assert_eq!(netns::value(&web_metrics, to_service), 60.0, "{web_metrics}");
    let from_workload = r#"remora_inbound_caller_requests_total{listener="inbound",client_namespace="shop",client_account="web",status_class="2xx"} "#;
    assert_eq!(netns::value(&api_metrics, from_workload), 60.0, "{api_metrics}");
    let web_connections =
        r#"remora_inbound_caller_connections_total{listener="inbound",client_namespace="shop",client_account="web"} "#;
    assert!(netns::value(&api_metrics, web_connections) >= 1.0, "{api_metrics}");

    // The pod without a sidecar: plaintext, its app told of no caller.
    let (served, identity) = spread(&web, address(PLAIN_CLUSTER_IP, 80), 2);
    assert_eq!(served.get("plain"), Some(&2), "{served:?}");
    assert_eq!(identity, "", "plaintext: no sidecar to say who called");
    assert_eq!(plain_app.hits(), 2);

    // ClusterIP matching: the connection's destination names the Service, whatever its Host says.
    assert!(served_by(&web, address(API_CLUSTER_IP, 80), "plain.shop").starts_with("api-"), "{}", logs());
    assert_eq!(served_by(&web, address(PLAIN_CLUSTER_IP, 80), "api.shop"), "plain", "{}", logs());
    assert_eq!(plain_app.hits(), 3);

    // A port with `appProtocol: tcp` is forwarded without reading first: a server that speaks
    // first is heard (the caller's listener would otherwise wait 600 s to detect a protocol).
    let banner = web.enter(|| {
        let mut stream = std::net::TcpStream::connect(address(BANNER_CLUSTER_IP, 25)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0_u8; 18];
        std::io::Read::read_exact(&mut stream, &mut greeting).map(|()| String::from_utf8_lossy(&greeting).into_owned())
    });
    assert_eq!(banner.ok().as_deref(), Some("220 banner ready\r\n"), "{}", logs());

    // Opaque TCP between meshed pods rides HBONE: the caller's sidecar tunnels it to the pod's
    // HBONE listener (port 15008, which capture leaves alone), whose inbound listener relays it.
    // (The request is not followed by a half-close: the app's HTTP server drops a response whose
    // client has half-closed, and the tunnel may deliver the end with the request.)
    let raw = web.enter(|| {
        let mut stream = std::net::TcpStream::connect(address(API_TCP_CLUSTER_IP, 81)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        std::io::Write::write_all(&mut stream, b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stream, &mut response);
        String::from_utf8_lossy(&response).into_owned()
    });
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}\n{}", logs());
    let api_metrics = api.enter(move || netns::metrics(admin));
    let tunnels = r#"remora_listener_tunnels_total{listener="hbone",result="opened"} "#;
    assert_eq!(netns::value(&api_metrics, tunnels), 1.0, "{api_metrics}");

    // Plaintext straight to a pod: permissive serves it, counted apart.
    let plaintext = r#"remora_authorization_plaintext_total{listener="inbound",policy="remora-inbound",result="#;
    assert_eq!(plaintext_get_bypassing_the_sidecar(&web, address(API_IPS[0], 8080)), Some(200), "{}", logs());
    let api_metrics = api.enter(move || netns::metrics(admin));
    assert_eq!(netns::value(&api_metrics, &format!("{plaintext}\"accepted\"}} ")), 1.0, "{api_metrics}");
    let unauthenticated = r#"remora_inbound_caller_requests_total{listener="inbound",client_namespace="",client_account="",status_class="2xx"} "#;
    assert_eq!(netns::value(&api_metrics, unauthenticated), 1.0, "plaintext callers count apart: {api_metrics}");

    // An endpoint leaves the slice: once the caller's view drops it, it gets no more requests.
    write_manifests(&mesh, &manifests("permissive", &[0, 1]));
    let leaving = format!("{}:8080", API_IPS[2]);
    eventually("the caller drops the endpoint that left", || {
        let dump = web.enter(move || {
            netns::exchange(admin, b"GET /config_dump HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        });
        !dump.contains(&leaving)
    });
    let (served, _) = spread(&web, address(API_CLUSTER_IP, 80), 30);
    assert!(!served.contains_key("api-2"), "{served:?}");
    assert_eq!(served.values().sum::<usize>(), 30);

    // The namespace turns strict: plaintext is refused, the mesh's calls still pass.
    write_manifests(&mesh, &manifests("strict", &[0, 1]));
    eventually("the api pod refuses plaintext", || {
        plaintext_get_bypassing_the_sidecar(&web, address(API_IPS[0], 8080)).is_none()
    });
    let api_metrics = api.enter(move || netns::metrics(admin));
    assert!(netns::value(&api_metrics, &format!("{plaintext}\"refused\"}} ")) >= 1.0, "{api_metrics}");
    let (served, identity) = spread(&web, address(API_CLUSTER_IP, 80), 4);
    assert_eq!(served.values().sum::<usize>(), 4);
    assert_eq!(identity, WEB);

    drop((web_sidecar, api_sidecar, control));
    let _ = std::fs::remove_dir_all(directory);
}
