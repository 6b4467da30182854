//! The automatic mesh from the control plane's directory: Kubernetes manifests (Services, their
//! EndpointSlices, the Pods behind them) and no Remora resource for them. A calling sidecar on
//! the control plane reaches a Service by its DNS names over mutual TLS to the sidecars of its
//! pods, balanced per request; a Service whose pod has no sidecar is reached in plaintext; an
//! endpoint leaving its slice stops getting requests; an operator's cluster refines a Service. A
//! Service whose pods are in Istio's ambient mesh is reached over HBONE, HTTP inside, through a
//! ztunnel written apart from Remora (`hbone_server.py`), and in plaintext once its pod opts out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use remora_control_plane::testing::{TestCa, TestControlPlane};
use remora_proxy::testing::proxy::temp_dir;
use remora_proxy::testing::{Client, HttpServer, TestProxy, eventually};

use crate::hbone_out::{HboneServer, count};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn bootstrap(identity: &str) -> String {
    format!("bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  drain_time: 1s\n{identity}---\n")
}

/// The Services `api` (three pods with sidecars) and `plain` (one pod without), as `kubectl get -o
/// yaml` would show them.
fn services() -> String {
    r#"apiVersion: v1
kind: Service
metadata: {namespace: shop, name: api}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
---
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: plain}
spec:
  clusterIP: 10.96.0.21
  ports: [{name: http, port: 80, targetPort: 8080}]
"#
    .to_owned()
}

/// A Pod running as `account`, with Remora's sidecar or without.
fn pod(name: &str, account: &str, sidecar: bool) -> String {
    let proxy = if sidecar { ", {name: remora-proxy}" } else { "" };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: shop, name: {name}, uid: uid-{name}}}\nspec: {{serviceAccountName: {account}, containers: [{{name: app}}{proxy}]}}\n"
    )
}

/// An EndpointSlice of `service` with one ready endpoint: `pod` at `address`. (Every endpoint of a
/// slice shares its ports; on loopback the pods differ by port, so each has a slice.)
fn slice(service: &str, pod: &str, address: SocketAddr) -> String {
    format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{namespace: shop, name: {pod}, labels: {{kubernetes.io/service-name: {service}}}}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
  - addresses: ["{ip}"]
    conditions: {{ready: true}}
    targetRef: {{kind: Pod, namespace: shop, name: {pod}, uid: uid-{pod}}}
"#,
        port = address.port(),
        ip = address.ip(),
    )
}

/// Joins YAML documents.
fn documents(list: &[String]) -> String {
    list.join("---\n")
}

/// The receiving side: three `api` pods (each an app behind a sidecar with the `api` identity),
/// and a `plain` app without one.
struct Pods {
    apps: Vec<HttpServer>,
    sidecars: Vec<TestProxy>,
    plain: HttpServer,
    ca: TestCa,
    dir: std::path::PathBuf,
}

impl Drop for Pods {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pods {
    async fn start() -> Pods {
        let ca = TestCa::new("cluster.local");
        let dir = temp_dir("remora-automesh");
        let mut apps = Vec::new();
        let mut sidecars = Vec::new();
        for i in 0..3 {
            let app = HttpServer::start(&format!("api-{i}")).await;
            let identity = ca.issue(API).bootstrap_identity(&dir.join(format!("api-{i}")));
            sidecars.push(TestProxy::start(&format!(
                "{}resources:\n{}{}",
                bootstrap(&identity),
                crate::cluster("app", ", protocol: http1", &[app.address()]),
                crate::listener("in", ", direction: inbound, default_cluster: app"),
            )));
            apps.push(app);
        }
        let plain = HttpServer::start("plain").await;
        Pods { apps, sidecars, plain, ca, dir }
    }

    /// The manifests: the Services, the pods, and a slice for each pod in `serving`.
    fn manifests(&self, serving: &[usize]) -> String {
        let mut list =
            vec![services(), pod("plain-0", "default", false), slice("plain", "plain-0", self.plain.address())];
        for i in 0..3 {
            list.push(pod(&format!("api-{i}"), "api", true));
        }
        for i in serving {
            list.push(slice("api", &format!("api-{i}"), self.sidecars[*i].address("in")));
        }
        documents(&list)
    }

    /// The calling sidecar (identity `web`) on `plane`: an outbound listener and nothing else of its
    /// own.
    fn caller(&self, plane: &TestControlPlane) -> TestProxy {
        self.caller_as(plane, WEB, "web-0.shop")
    }

    /// A calling sidecar with `identity`, as node `node` (`POD.NAMESPACE`).
    fn caller_as(&self, plane: &TestControlPlane, identity: &str, node: &str) -> TestProxy {
        caller(&self.ca, &self.dir, plane, identity, node)
    }

    /// How many of `requests` each `api` app served.
    fn hits(&self) -> Vec<usize> {
        self.apps.iter().map(HttpServer::hits).collect()
    }
}

/// Whether `dump` (a proxy's `/config_dump`) holds the resource of `kind` named `name`.
fn serves(dump: &serde_json::Value, kind: &str, name: &str) -> bool {
    dump["resources"].as_array().is_some_and(|all| all.iter().any(|r| r["kind"] == kind && r["name"] == name))
}

/// A calling sidecar on `plane` with `identity` from `ca` (its files in `dir`), as node `node`
/// (`POD.NAMESPACE`): an outbound listener and nothing else of its own.
fn caller(ca: &TestCa, dir: &std::path::Path, plane: &TestControlPlane, identity: &str, node: &str) -> TestProxy {
    let identity = ca.issue(identity).bootstrap_identity(&dir.join(node));
    let yaml = format!(
        "{}resources:\n{}  - {{kind: Cluster, name: passthrough, original_destination: true}}\n",
        bootstrap(&identity),
        crate::listener("out", ", default_cluster: passthrough"),
    );
    TestProxy::start_controlled(&yaml, &plane.url(), node)
}

/// `requests` GETs for `host` through `proxy`'s outbound listener, counted by the app that served
/// each; every one must succeed.
async fn spread(proxy: &TestProxy, host: &str, requests: usize) -> BTreeMap<String, usize> {
    let mut client = Client::http1(proxy.address("out")).await;
    let mut served = BTreeMap::new();
    for _ in 0..requests {
        let reply = client.get(host, "/").await;
        assert_eq!(reply.status, 200, "{host}: {}", reply.text());
        *served.entry(reply.header("x-served-by").to_owned()).or_insert(0) += 1;
    }
    served
}

/// With nothing but the manifests: every name of the Service (the short one too, from a caller in
/// its namespace) reaches its pods over mutual TLS (each side proving its service account, the app
/// told who called), requests spread over the pods, and a pod without a sidecar is called in
/// plaintext. A caller in another namespace is not given the short name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_meshed_from_their_manifests_alone() {
    let pods = Pods::start().await;
    let plane = TestControlPlane::start(&[("shop.yaml", &pods.manifests(&[0, 1, 2]))]);
    let caller = pods.caller(&plane);
    caller.wait_ready().await;
    for host in
        ["api", "api:80", "api.shop", "api.shop.svc", "api.shop.svc.cluster.local", "API.shop.svc.cluster.local:80"]
    {
        let reply = Client::http1(caller.address("out")).await.get(host, "/hello").await;
        assert_eq!(reply.status, 200, "{host}: {}", reply.text());
        assert_eq!(reply.header("x-seen-client-identity"), WEB, "{host}: the app is told who called");
    }
    // Peak EWMA sends each request to the quicker of two pods drawn at random: on one client
    // connection, requests reach more than one pod (a connection balancer would send all to one).
    // How many pods share sequential requests on loopback is the draws' business.
    let served = spread(&caller, "api.shop", 60).await;
    assert!(served.len() >= 2, "per-request balancing: {served:?}");
    let to_api = format!(r#"remora_tls_peer_handshakes_total{{direction="outbound",result="ok",peer="{API}"}}"#);
    assert!(caller.metric(&to_api).await >= served.len() as f64, "an mTLS connection to each pod that served");
    let from_web = format!(r#"remora_tls_peer_handshakes_total{{direction="inbound",result="ok",peer="{WEB}"}}"#);
    for (sidecar, app) in pods.sidecars.iter().zip(&pods.apps) {
        if app.hits() > 0 {
            assert!(sidecar.metric(&from_web).await >= 1.0, "the pod's sidecar proved who called");
        }
    }
    let reply = Client::http1(caller.address("out")).await.get("plain.shop", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-served-by"), "plain");
    assert_eq!(reply.header("x-seen-client-identity"), "", "plaintext: no sidecar to say who called");
    assert_eq!(pods.plain.hits(), 1);
    let dump = caller.config_dump().await;
    assert!(serves(&dump, "Cluster", "shop/api:80") && serves(&dump, "Cluster", "shop/plain:80"), "{dump}");
    assert_eq!(destinations(&dump, "shop/api:80").last().map(String::as_str), Some("api:80"));

    let outsider = pods.caller_as(&plane, "spiffe://cluster.local/ns/ops/sa/tool", "tool-0.ops");
    outsider.wait_ready().await;
    let reply = Client::http1(outsider.address("out")).await.get("api.shop", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let dump = outsider.config_dump().await;
    assert!(!destinations(&dump, "shop/api:80").contains(&"api:80".to_owned()), "{dump}");
    let reply = Client::http1(outsider.address("out")).await.get("api", "/").await;
    assert_ne!(reply.status, 200, "the short name is the caller's namespace's only");
    let mut client = Client::http1(plane.address()).await;
    let dump: serde_json::Value = serde_json::from_str(&client.get("x", "/config_dump").await.text()).unwrap();
    assert_eq!(dump["scoped_views"], serde_json::json!({"shop": 2}), "{dump}");
}

/// The destinations of the route table `name` in a proxy's `/config_dump`.
fn destinations(dump: &serde_json::Value, name: &str) -> Vec<String> {
    let tables = dump["resources"].as_array().into_iter().flatten();
    let table = tables.into_iter().find(|r| r["kind"] == "RouteTable" && r["name"] == name);
    let list = table.and_then(|t| t["destinations"].as_array()).into_iter().flatten();
    list.filter_map(|d| d.as_str().map(str::to_owned)).collect()
}

/// A Cluster the operator writes for the Service takes the automatic one's place and keeps its
/// endpoints and their identities (round robin here: requests go to the three pods in turn); an
/// endpoint that leaves its Service's slices stops getting requests once the directory says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_cluster_refines_the_service_and_endpoints_follow_the_slices() {
    let pods = Pods::start().await;
    let plane = TestControlPlane::start(&[("shop.yaml", &pods.manifests(&[0, 1, 2]))]);
    let caller = pods.caller(&plane);
    caller.wait_ready().await;
    assert_eq!(spread(&caller, "api.shop", 3).await.values().sum::<usize>(), 3);

    let written = "resources:\n  - kind: Cluster\n    name: api-tuned\n    kubernetes_service: {namespace: shop, name: api, port: http}\n    balancer: round_robin\n    tls: mesh\n";
    plane.write("tuned.yaml", written);
    eventually("the caller serves the operator's cluster", Duration::from_secs(10), || async {
        let dump = caller.config_dump().await;
        serves(&dump, "Cluster", "api-tuned") && !serves(&dump, "Cluster", "shop/api:80")
    })
    .await;
    let served = spread(&caller, "api.shop.svc.cluster.local", 30).await;
    assert_eq!(served.values().copied().collect::<Vec<_>>(), [10, 10, 10], "round robin: {served:?}");
    let identified = format!(r#"remora_tls_peer_handshakes_total{{direction="outbound",result="ok",peer="{API}"}}"#);
    let handshakes = caller.metric(&identified).await;

    plane.write("shop.yaml", &pods.manifests(&[0, 1]));
    let leaving = pods.sidecars[2].address("in").to_string();
    eventually("the caller drops the endpoint that left", Duration::from_secs(10), || async {
        !caller.config_dump().await.to_string().contains(&leaving)
    })
    .await;
    let before = pods.hits()[2];
    let served = spread(&caller, "api.shop", 20).await;
    assert_eq!(pods.hits()[2], before, "{served:?}");
    assert_eq!(served.values().copied().collect::<Vec<_>>(), [10, 10], "{served:?}");
    assert!(caller.metric(&identified).await >= handshakes, "still over mTLS to the pods' identity");
}

/// Sends a plaintext GET straight to `address`; the status line's code, or `None` when the
/// connection was closed without an answer.
async fn plaintext_get(address: SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n").await.ok()?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).split_whitespace().nth(1)?.parse().ok()
}

/// The inbound side is permissive by default (plaintext served and counted), strict in a namespace
/// annotated `remora.dev/inbound: strict` (plaintext refused and counted, mTLS from a caller's
/// sidecar still served), with no AuthorizationPolicy written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_made_strict_refuses_plaintext_and_keeps_mutual_tls() {
    let ca = TestCa::new("cluster.local");
    let dir = temp_dir("remora-strict");
    let app = HttpServer::start("api-0").await;
    let namespace = |mode: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, annotations: {{remora.dev/inbound: {mode}}}}}\n"
        )
    };
    let base = |mode: &str| documents(&[namespace(mode), services(), pod("api-0", "api", true)]);
    let plane = TestControlPlane::start(&[("shop.yaml", &base("permissive"))]);
    // The receiving sidecar as the injector runs it: its inbound listener is `inbound`.
    let identity = ca.issue(API).bootstrap_identity(&dir.join("api-0"));
    let server = TestProxy::start_controlled(
        &format!(
            "{}resources:\n{}{}",
            bootstrap(&identity),
            crate::cluster("app", ", protocol: http1", &[app.address()]),
            crate::listener("inbound", ", direction: inbound, default_cluster: app"),
        ),
        &plane.url(),
        "api-0.shop",
    );
    server.wait_ready().await;
    let inbound = server.address("inbound");
    let with_slice = |mode: &str| documents(&[base(mode), slice("api", "api-0", inbound)]);
    plane.write("shop.yaml", &with_slice("permissive"));
    let caller = caller(&ca, &dir, &plane, WEB, "web-0.shop");
    caller.wait_ready().await;
    let counted = |result: &str| {
        format!(
            r#"remora_authorization_plaintext_total{{listener="inbound",policy="remora-inbound",result="{result}"}}"#
        )
    };

    assert_eq!(plaintext_get(inbound).await, Some(200), "permissive: plaintext is served");
    assert_eq!(server.metric(&counted("accepted")).await, 1.0, "and counted apart");

    plane.write("shop.yaml", &with_slice("strict"));
    eventually("the namespace turns strict", Duration::from_secs(10), || async {
        plaintext_get(inbound).await.is_none()
    })
    .await;
    assert!(server.metric(&counted("refused")).await >= 1.0);
    let reply = Client::http1(caller.address("out")).await.get("api.shop", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-seen-client-identity"), WEB, "mTLS from the caller's sidecar");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A namespace labelled `istio.io/dataplane-mode: ambient` and a pod without Remora's sidecar: the
/// caller reaches the Service over HBONE, HTTP inside a tunnel to the pod's address, through the
/// ztunnel at the mesh's HBONE port (here an independent server, `hbone_server.py`, on a port of
/// the test's choosing), which sees the caller's identity; the pod opting out of the ambient mesh
/// is called in plaintext again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_in_istios_ambient_mesh_is_reached_over_hbone() {
    if !crate::hbone::python_h2() {
        return;
    }
    let ca = TestCa::new("cluster.local");
    let dir = temp_dir("remora-ambient");
    let app = HttpServer::start("ambient-app").await;
    ca.issue(API).write(&dir.join("ztunnel"));
    let mut ztunnel = HboneServer::start(&dir.join("ztunnel"), &[]);
    let namespace =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";
    let manifests =
        |pod: String| documents(&[namespace.to_owned(), services(), pod, slice("api", "api-0", app.address())]);
    let settings = remora_control_plane::mesh::Settings { hbone_port: ztunnel.port, ..Default::default() };
    let plane = TestControlPlane::start_with_mesh(&[("shop.yaml", &manifests(pod("api-0", "api", false)))], settings);
    let caller = caller(&ca, &dir, &plane, WEB, "web-0.shop");
    caller.wait_ready().await;
    let mut client = Client::http1(caller.address("out")).await;
    for _ in 0..3 {
        let reply = client.get("api.shop", "/").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-served-by"), "ambient-app");
    }
    let said = ztunnel.said_once("a tunnel", |said| count(said, "tunnel") == 1).to_vec();
    let connection = said.iter().find(|line| line.get("connection").is_some()).unwrap();
    assert_eq!(connection["peer"], WEB, "the ztunnel saw who called: {connection}");
    let tunnel = said.iter().find(|line| line.get("tunnel").is_some()).unwrap();
    assert_eq!(tunnel["authority"], app.address().to_string(), "{tunnel}");
    let dump = caller.config_dump().await;
    let cluster =
        dump["resources"].as_array().unwrap().iter().find(|r| r["kind"] == "Cluster" && r["name"] == "shop/api:80");
    assert_eq!(cluster.map(|c| c["http_over_hbone"].clone()), Some(serde_json::json!(true)), "{dump}");

    // The pod opts out: plaintext to it, no more tunnels.
    let opted_out = pod("api-0", "api", false)
        .replace("uid: uid-api-0}", "uid: uid-api-0, labels: {istio.io/dataplane-mode: none}}");
    plane.write("shop.yaml", &manifests(opted_out));
    eventually("the cluster turns plaintext", Duration::from_secs(10), || async {
        !caller.config_dump().await.to_string().contains("http_over_hbone")
    })
    .await;
    let reply = Client::http1(caller.address("out")).await.get("api.shop", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(count(ztunnel.settled(), "tunnel"), 1, "no tunnel for plaintext");
    assert_eq!(app.hits(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}
