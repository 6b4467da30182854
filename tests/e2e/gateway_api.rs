//! Gateway API routes for the mesh (GAMMA) from the control plane's directory: HTTPRoutes whose
//! parent is a Service, beside the Services' manifests. Calling sidecars follow a producer route
//! (matches, filters, redirects, weights, 404 for what no rule matches), a consumer route changes
//! only its own namespace's calls, an edited route is followed, and a route that cannot be applied
//! leaves the Service to its plain route while the rest of the mesh keeps serving; a GRPCRoute
//! routes by service and method; a rule's timeouts and retries are kept.

use std::collections::BTreeMap;
use std::time::Duration;

use remora_control_plane::testing::TestControlPlane;
use remora_proxy::testing::{Client, HttpServer, TestProxy, eventually};

use crate::filters::mirror_server;

/// The Services `echo` (both versions), `echo-v1` and `echo-v2` of namespace `mesh`, their pods
/// (no sidecars: plaintext) and slices, as `kubectl get -o yaml` shows them.
fn services(v1: &HttpServer, v2: &HttpServer) -> String {
    let service = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{namespace: mesh, name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
        )
    };
    let slice = |service: &str, pod: &str, server: &HttpServer| {
        let address = server.address();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: mesh, name: {service}-{pod}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [\"{}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, namespace: mesh, name: {pod}, uid: uid-{pod}}}}}]\n",
            address.port(),
            address.ip()
        )
    };
    let pod = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: mesh, name: {name}, uid: uid-{name}}}\nspec: {{containers: [{{name: app}}]}}\n"
        )
    };
    [
        service("echo", "10.96.0.30"),
        service("echo-v1", "10.96.0.31"),
        service("echo-v2", "10.96.0.32"),
        pod("v1"),
        pod("v2"),
        slice("echo", "v1", v1),
        slice("echo", "v2", v2),
        slice("echo-v1", "v1", v1),
        slice("echo-v2", "v2", v2),
    ]
    .join("---\n")
}

/// The producer route on `echo` port 80, its last rule splitting `weights` between the versions.
fn producer(weights: (u32, u32)) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{namespace: mesh, name: echo-routes}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, port: 80}}]
  rules:
    - matches: [{{headers: [{{name: version, value: two}}]}}]
      backendRefs: [{{name: echo-v2, port: 80}}]
    - matches: [{{path: {{type: PathPrefix, value: /v1}}}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {{set: [{{name: x-route, value: v1}}]}}
        - type: URLRewrite
          urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}
      backendRefs: [{{name: echo-v1, port: 80}}]
    - matches: [{{path: {{type: Exact, value: /old}}}}]
      filters: [{{type: RequestRedirect, requestRedirect: {{hostname: example.org, statusCode: 301}}}}]
    - matches: [{{path: {{type: PathPrefix, value: /split}}}}]
      backendRefs: [{{name: echo-v1, port: 80, weight: {}}}, {{name: echo-v2, port: 80, weight: {}}}]
"#,
        weights.0, weights.1
    )
}

/// A consumer route of namespace `client` on `echo-v1`: its callers get a response header.
const CONSUMER: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: client, name: mine}
spec:
  parentRefs: [{kind: Service, namespace: mesh, name: echo-v1}]
  rules:
    - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-consumer, value: "yes"}]}}]
      backendRefs: [{name: echo-v1, namespace: mesh, port: 80}]
"#;

/// A calling sidecar on `plane` as node `node` (`POD.NAMESPACE`): an outbound listener alone.
fn caller(plane: &TestControlPlane, node: &str) -> TestProxy {
    let yaml = format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n---\nresources:\n{}  - {{kind: Cluster, name: passthrough, original_destination: true}}\n",
        crate::listener("out", ", default_cluster: passthrough"),
    );
    TestProxy::start_controlled(&yaml, &plane.url(), node)
}

/// Which version answered `n` GETs of `path` on `host`, by count.
async fn served(proxy: &TestProxy, host: &str, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut client = Client::http1(proxy.address("out")).await;
    let mut served = BTreeMap::new();
    for _ in 0..n {
        let reply = client.get(host, path).await;
        *served.entry(format!("{} {}", reply.status.as_u16(), reply.header("x-served-by"))).or_insert(0) += 1;
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_follow_the_http_routes_of_the_services_they_call() {
    let (v1, v2) = (mirror_server("v1").await, mirror_server("v2").await);
    let plane = TestControlPlane::start(&[
        ("services.yaml", &services(&v1, &v2)),
        ("routes.yaml", &producer((1, 0))),
        ("consumer.yaml", CONSUMER),
    ]);
    let mesh = caller(&plane, "app-0.mesh");
    let client = caller(&plane, "app-0.client");
    mesh.wait_ready().await;
    client.wait_ready().await;

    // Matches: a header, a path prefix (rewritten, a header set), an exact path (redirected).
    let mut http = Client::http1(mesh.address("out")).await;
    let request = http
        .request(http::Method::GET, "echo.mesh", "/anything")
        .header("version", "two")
        .body(remora_proxy::testing::servers::full(""))
        .unwrap();
    let reply = remora_proxy::testing::client::read(http.send(request).await.unwrap()).await;
    assert_eq!((reply.status.as_u16(), reply.header("x-served-by")), (200, "v2"));
    let reply = http.get("echo.mesh", "/v1/users?id=1").await;
    assert_eq!((reply.status.as_u16(), reply.header("x-served-by")), (200, "v1"));
    assert_eq!(reply.header("x-seen-uri"), "/users?id=1");
    assert!(reply.text().contains("x-route: v1\n"), "{}", reply.text());
    let reply = http.get("echo", "/old").await;
    assert_eq!(reply.status, 301);
    assert_eq!(reply.header("location"), "http://example.org/old");
    // No rule matches: 404, not the Service.
    assert_eq!(http.get("echo.mesh.svc.cluster.local", "/nothing").await.status, 404);
    // A Service without routes keeps its plain route.
    assert_eq!(http.get("echo-v2.mesh", "/nothing").await.header("x-served-by"), "v2");

    // The consumer route: its namespace's callers only.
    let from_client = Client::http1(client.address("out")).await.get("echo-v1.mesh", "/").await;
    assert_eq!((from_client.status.as_u16(), from_client.header("x-consumer")), (200, "yes"));
    let from_mesh = http.get("echo-v1.mesh", "/").await;
    assert_eq!((from_mesh.status.as_u16(), from_mesh.header("x-consumer")), (200, ""));

    // An edit is followed: the split moves to v2.
    assert_eq!(served(&mesh, "echo.mesh", "/split", 4).await, BTreeMap::from([("200 v1".to_owned(), 4)]));
    plane.write("routes.yaml", &producer((0, 1)));
    eventually("the edited route is followed", Duration::from_secs(10), || async {
        served(&mesh, "echo.mesh", "/split", 1).await.contains_key("200 v2")
    })
    .await;
    assert_eq!(served(&mesh, "echo.mesh", "/split", 4).await, BTreeMap::from([("200 v2".to_owned(), 4)]));

    // A route that cannot be applied (a filter Remora does not know) is applied nowhere: the
    // Service goes back to its plain route, the consumer route keeps serving.
    let odd = producer((0, 1)).replace("type: RequestHeaderModifier", "type: ExtensionRef");
    plane.write("routes.yaml", &odd);
    eventually("the unreadable route is dropped", Duration::from_secs(10), || async {
        Client::http1(mesh.address("out")).await.get("echo.mesh", "/nothing").await.status == 200
    })
    .await;
    let from_client = Client::http1(client.address("out")).await.get("echo-v1.mesh", "/").await;
    assert_eq!(from_client.header("x-consumer"), "yes");
    // The control plane says why, with the consumer route's conditions beside it.
    let dump = Client::http1(plane.address()).await.get("x", "/config_dump").await.text();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let route = |name: &str| dump["routes"].as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap();
    let odd = &route("echo-routes")["parents"][0];
    assert_eq!(odd["service"], "mesh/echo:80");
    assert_eq!(odd["accepted"]["reason"], "UnsupportedValue", "{odd}");
    assert!(odd["accepted"]["message"].as_str().unwrap().contains("ExtensionRef"), "{odd}");
    let mine = &route("mine")["parents"][0];
    assert_eq!(
        (&mine["accepted"]["status"], &mine["resolved_refs"]["status"]),
        (&"True".into(), &"True".into()),
        "{mine}"
    );
}

/// A GRPCRoute on an h2c port: calls are routed by service and method (and headers), with the
/// rule's header changes, to the weighted backends; a method no rule matches gets 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_follow_the_grpc_routes_of_the_services_they_call() {
    let (v1, v2) = (mirror_server("v1").await, mirror_server("v2").await);
    let h2c = services(&v1, &v2)
        .replace(
            "ports: [{name: http, port: 80, targetPort: 8080}]",
            "ports: [{name: grpc, port: 7070, appProtocol: kubernetes.io/h2c}]",
        )
        .replace("[{name: http, port:", "[{name: grpc, port:");
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {namespace: mesh, name: echo-grpc}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
    - matches: [{method: {service: echo.Echo, method: Get}}]
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-header-add, value: add-appends-values}]}}]
      backendRefs: [{name: echo-v1, port: 7070}]
    - matches: [{method: {service: echo.Echo}, headers: [{name: x-canary, value: "on"}]}]
      backendRefs: [{name: echo-v1, port: 7070, weight: 0}, {name: echo-v2, port: 7070, weight: 1}]
"#;
    let plane = TestControlPlane::start(&[("services.yaml", &h2c), ("routes.yaml", route)]);
    let mesh = caller(&plane, "app-0.mesh");
    mesh.wait_ready().await;
    let mut client = Client::http2(mesh.address("out")).await;
    let get = grpc_call(&mut client, "/echo.Echo/Get", false).await;
    assert_eq!((get.status.as_u16(), get.header("x-served-by")), (200, "v1"));
    assert!(get.text().contains("x-header-add: some-value\nx-header-add: add-appends-values\n"), "{}", get.text());
    let canary = grpc_call(&mut client, "/echo.Echo/List", true).await;
    assert_eq!((canary.status.as_u16(), canary.header("x-served-by")), (200, "v2"));
    assert_eq!(grpc_call(&mut client, "/echo.Echo/List", false).await.status, 404, "no rule matches");
    assert_eq!(grpc_call(&mut client, "/other.Service/Get", true).await.status, 404, "another service");
}

/// A unary gRPC call (an empty message) of `method` on `echo.mesh:7070`, with `x-header-add` set,
/// and `x-canary: on` if `canary`.
async fn grpc_call(client: &mut Client, method: &str, canary: bool) -> remora_proxy::testing::Reply {
    let mut request = client
        .request(http::Method::POST, "echo.mesh:7070", method)
        .header("content-type", "application/grpc")
        .header("x-header-add", "some-value");
    if canary {
        request = request.header("x-canary", "on");
    }
    let request = request.body(remora_proxy::testing::servers::full(&b"\0\0\0\0\0"[..])).unwrap();
    remora_proxy::testing::client::read(client.send(request).await.unwrap()).await
}

/// An HTTPRoute rule's `timeouts.request` bounds the call (504 from the caller's sidecar when the
/// backend is slower) and its `retry` retries the codes it names, `attempts` times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeouts_and_retries_are_kept() {
    let (v1, v2) = (HttpServer::start("v1").await, HttpServer::start("v2").await);
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: mesh, name: careful}
spec:
  parentRefs: [{kind: Service, name: echo-v1, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /slow}}]
      timeouts: {request: 300ms}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /status}}]
      retry: {codes: [503], attempts: 2, backoff: 10ms}
      backendRefs: [{name: echo-v1, port: 80}]
"#;
    let plane = TestControlPlane::start(&[("services.yaml", &services(&v1, &v2)), ("routes.yaml", route)]);
    let mesh = caller(&plane, "app-0.mesh");
    mesh.wait_ready().await;
    let mut client = Client::http1(mesh.address("out")).await;
    eventually("the route is followed", Duration::from_secs(10), || async {
        Client::http1(mesh.address("out")).await.get("echo-v1.mesh", "/nothing").await.status == 404
    })
    .await;
    let started = std::time::Instant::now();
    let slow = client.get("echo-v1.mesh", "/slow/3000").await;
    assert_eq!(slow.status, 504, "{}", slow.text());
    assert!(started.elapsed() < Duration::from_secs(2), "the request timeout cut the wait");
    let before = v1.hits();
    assert_eq!(client.get("echo-v1.mesh", "/status/503").await.status, 503);
    assert_eq!(v1.hits() - before, 3, "the first attempt and two retries");
    let before = v1.hits();
    assert_eq!(client.get("echo-v1.mesh", "/status/500").await.status, 500);
    assert_eq!(v1.hits() - before, 1, "a code the rule does not name is not retried");
}
