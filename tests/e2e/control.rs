//! The control plane with real proxies: `remora control` serving a directory (and an etcd registry)
//! over Delta ADS to in-process proxies, with traffic through them while things change.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use remora_control_api::{Kind, Resource};
use remora_control_plane::sources::registry::{self, Registered};
use remora_control_plane::testing::{GenericClient, TestControlPlane, TestEtcd};
use remora_proxy::testing::{HttpServer, TestProxy, eventually};
use tokio::net::TcpStream;

use crate::{cluster, listener, route_all};

/// Keep-alive clients sending GETs through the proxy until stopped, counting failures (a refused
/// or broken connection, or any status but 200) and noting when each upstream first answered.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
    last: Arc<Mutex<HashMap<String, Instant>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(address: SocketAddr, clients: usize) -> Traffic {
        let traffic = Traffic {
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::new(AtomicUsize::new(0)),
            failed: Arc::new(Mutex::new(Vec::new())),
            last: Arc::new(Mutex::new(HashMap::new())),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (stop, ok, failed, last) =
                (traffic.stop.clone(), traffic.ok.clone(), traffic.failed.clone(), traffic.last.clone());
            tasks.push(tokio::spawn(async move {
                let mut sender = None;
                while !stop.load(Ordering::Relaxed) {
                    if sender.is_none() {
                        match TcpStream::connect(address).await {
                            Ok(stream) => {
                                let (s, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
                                tokio::spawn(connection);
                                sender = Some(s);
                            }
                            Err(e) => {
                                failed.lock().unwrap().push(format!("connect: {e}"));
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        }
                    }
                    let s: &mut http1::SendRequest<Full<Bytes>> = sender.as_mut().unwrap();
                    let request = http::Request::get("/").header("host", "web").body(Full::new(Bytes::new())).unwrap();
                    match s.send_request(request).await {
                        Ok(response) if response.status() == 200 => {
                            let by = response.headers().get("x-served-by").unwrap().to_str().unwrap().to_owned();
                            let _ = response.into_body().collect().await;
                            ok.fetch_add(1, Ordering::Relaxed);
                            last.lock().unwrap().insert(by, Instant::now());
                        }
                        Ok(response) => {
                            let status = response.status();
                            let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            failed
                                .lock()
                                .unwrap()
                                .push(format!("status {status}: {}", String::from_utf8_lossy(&body).trim()));
                        }
                        Err(e) => {
                            failed.lock().unwrap().push(format!("request: {e}"));
                            sender = None;
                        }
                    }
                }
            }));
        }
        Traffic { tasks, ..traffic }
    }

    /// When `upstream` last answered.
    fn last_answer(&self, upstream: &str) -> Option<Instant> {
        self.last.lock().unwrap().get(upstream).copied()
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients and returns the failures (the first ten, and how many there were).
    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failed = self.failed.lock().unwrap();
        (failed.len(), failed.iter().take(10).cloned().collect())
    }
}

fn clusters(a: &HttpServer, b: &HttpServer) -> String {
    format!("resources:\n{}{}", cluster("a", "", &[a.address()]), cluster("b", "", &[b.address()]))
}

fn routes(target: &str) -> String {
    format!("resources:\n{}{}", listener("in", ", protocol: http1, route_tables: [web]"), route_all("web", target))
}

async fn controlled(plane: &TestControlPlane, node: &str) -> TestProxy {
    let proxy = TestProxy::start_controlled("", &plane.url(), node);
    proxy.wait_ready().await;
    proxy
}

/// Editing a route file during steady traffic: the new route serves within a second of the edit,
/// and not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_edit_serves_within_a_second_without_a_failed_request() {
    let (a, b) = (HttpServer::start("a").await, HttpServer::start("b").await);
    let plane = TestControlPlane::start(&[("clusters.yaml", &clusters(&a, &b)), ("routes.yaml", &routes("a"))]);
    let proxy = controlled(&plane, "edit").await;
    let traffic = Traffic::start(proxy.address("in"), 4);
    eventually("traffic flows through a", Duration::from_secs(5), || async { traffic.last_answer("a").is_some() })
        .await;

    let edited = Instant::now();
    plane.write("routes.yaml", &routes("b"));
    eventually("b serves", Duration::from_secs(5), || async { traffic.last_answer("b").is_some() }).await;
    let took = traffic.last_answer("b").unwrap().saturating_duration_since(edited);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ok = traffic.ok();
    let (failed, failures) = traffic.stop().await;
    assert_eq!(failed, 0, "failed requests, the first ones: {failures:?}");
    assert!(ok > 50, "too little traffic to mean anything ({ok})");
    assert!(took < Duration::from_secs(1), "the edit took {took:?} to serve");
    // The new route is what serves now, and the proxy says which source version it runs.
    let dump = proxy.config_dump().await;
    let version = dump["control_plane"]["types"]["RouteTable"]["system_version"].as_str().unwrap().to_owned();
    assert!(version.starts_with("content-"), "{dump}");
    assert!(plane.metric("remora_control_convergence_seconds_count") >= 1.0);
}

/// A resource the proxy cannot run is NACKed with its field named, shown in `/config_dump` and the
/// metrics of both sides, while the old config keeps serving; fixing the file recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_resource_is_nacked_and_the_old_config_serves_until_it_is_fixed() {
    let (a, b) = (HttpServer::start("a").await, HttpServer::start("b").await);
    let plane = TestControlPlane::start(&[("clusters.yaml", &clusters(&a, &b)), ("routes.yaml", &routes("a"))]);
    let proxy = controlled(&plane, "nack").await;
    let traffic = Traffic::start(proxy.address("in"), 2);

    let broken = routes("b").replace("routes: [{backends", "routes: [{match: {path: {regex: \"(\"}}, backends");
    plane.write("routes.yaml", &broken);
    let nack_error = || async {
        let dump = proxy.config_dump().await;
        dump["control_plane"]["types"]["RouteTable"]["last_nack"]["error"].as_str().unwrap_or("").to_owned()
    };
    eventually("the proxy NACKs", Duration::from_secs(5), || async { !nack_error().await.is_empty() }).await;
    let error = nack_error().await;
    assert!(error.contains("route table \"web\": routes[0].match.path.regex: is not a valid regex"), "{error}");
    assert_eq!(proxy.metric("remora_xds_updates_total{type=\"RouteTable\",result=\"nack\"}").await, 1.0);
    eventually("the control plane counts the NACK", Duration::from_secs(2), || async {
        plane.metric("remora_control_nacks_total{type=\"RouteTable\"}") == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(traffic.last_answer("b").is_none(), "the rejected route must not serve");

    plane.write("routes.yaml", &routes("b"));
    eventually("the fixed route serves", Duration::from_secs(5), || async { traffic.last_answer("b").is_some() }).await;
    let (failed, failures) = traffic.stop().await;
    assert_eq!(failed, 0, "failed requests, the first ones: {failures:?}");
}

/// A directory change that does not even parse is refused by the control plane: nothing is pushed,
/// its `/config_dump` and metrics say why, the proxies keep serving, and the next good change flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_does_not_parse_is_held_back_by_the_control_plane() {
    let (a, b) = (HttpServer::start("a").await, HttpServer::start("b").await);
    let plane = TestControlPlane::start(&[("clusters.yaml", &clusters(&a, &b)), ("routes.yaml", &routes("a"))]);
    let proxy = controlled(&plane, "held").await;
    let traffic = Traffic::start(proxy.address("in"), 2);
    let pushes = || plane.metric("remora_control_pushes_total{type=\"RouteTable\"}");
    let before = pushes();
    plane.write("routes.yaml", "resources: [ {kind: RouteTable, name: web");
    eventually("the load fails", Duration::from_secs(5), || async {
        plane.metric("remora_control_source_loads_total{source=\"directory\",result=\"error\"}") == 1.0
    })
    .await;
    let mut client = remora_proxy::testing::Client::http1(plane.address()).await;
    let dump: serde_json::Value = serde_json::from_str(&client.get("x", "/config_dump").await.text()).unwrap();
    assert!(dump["directory_error"].as_str().unwrap().contains("routes.yaml"), "{dump}");
    assert_eq!(dump["resources"]["RouteTable"][0]["name"], "web");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pushes(), before, "nothing is pushed for a broken directory");
    plane.write("routes.yaml", &routes("b"));
    eventually("the next good change serves", Duration::from_secs(5), || async { traffic.last_answer("b").is_some() })
        .await;
    let (failed, failures) = traffic.stop().await;
    assert_eq!(failed, 0, "failed requests, the first ones: {failures:?}");
}

/// The control plane down for ten seconds under traffic: nothing fails, the proxy reports the
/// stream down, and once the control plane is back it reconnects and converges on what changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_outage_drops_nothing_and_the_proxy_reconverges() {
    let (a, b) = (HttpServer::start("a").await, HttpServer::start("b").await);
    let mut plane = TestControlPlane::start(&[("clusters.yaml", &clusters(&a, &b)), ("routes.yaml", &routes("a"))]);
    let proxy = controlled(&plane, "outage").await;
    assert_eq!(proxy.metric("remora_control_plane_connected").await, 1.0);
    let traffic = Traffic::start(proxy.address("in"), 2);

    plane.stop();
    eventually("the proxy sees the stream down", Duration::from_secs(5), || async {
        proxy.metric("remora_control_plane_connected").await == 0.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = traffic.ok();
    plane.write("routes.yaml", &routes("b"));
    plane.restart();
    // The proxy's next attempt comes within its backoff bound (15 s).
    eventually("the proxy reconnects and converges", Duration::from_secs(20), || async {
        traffic.last_answer("b").is_some()
    })
    .await;
    assert_eq!(proxy.metric("remora_control_plane_connected").await, 1.0);
    let (failed, failures) = traffic.stop().await;
    assert_eq!(failed, 0, "failed requests, the first ones: {failures:?}");
    assert!(during > 100, "too little traffic during the outage ({during})");
}

/// 500 endpoints added to a cluster and then removed, each in one change: the proxy goes from one
/// endpoint to 501 and back with no state in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_endpoints_arrive_and_leave_atomically() {
    let a = HttpServer::start("a").await;
    let one = format!("resources:\n{}", cluster("big", "", &[a.address()]));
    let many: Vec<SocketAddr> = std::iter::once(a.address())
        .chain((0..500).map(|i| SocketAddr::from(([127, 0, 1, (i / 250) as u8 + 1], 20000 + i as u16))))
        .collect();
    let plane = TestControlPlane::start(&[("big.yaml", &one), ("routes.yaml", &routes("big"))]);
    let proxy = controlled(&plane, "atomic").await;

    let counts = Arc::new(Mutex::new(Vec::new()));
    let watching = Arc::new(AtomicBool::new(true));
    let admin = proxy.admin();
    let watcher = {
        let (counts, watching) = (counts.clone(), watching.clone());
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                let mut client = remora_proxy::testing::Client::http1(admin).await;
                let dump: serde_json::Value =
                    serde_json::from_str(&client.get("admin", "/config_dump").await.text()).unwrap();
                let serving = dump["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["kind"] == "Endpoints" && r["cluster"] == "big")
                    .map(|r| r["endpoints"].as_array().map_or(0, Vec::len));
                counts.lock().unwrap().push(serving.unwrap_or(0));
            }
        })
    };
    let acks = || async { proxy.metric("remora_xds_updates_total{type=\"Endpoints\",result=\"ack\"}").await };
    let before = acks().await;
    plane.write("big.yaml", &format!("resources:\n{}", cluster("big", "", &many)));
    eventually("501 endpoints serve", Duration::from_secs(5), || async { counts.lock().unwrap().last() == Some(&501) })
        .await;
    assert_eq!(acks().await, before + 1.0, "one update carried all 500");
    plane.write("big.yaml", &one);
    eventually("one endpoint serves", Duration::from_secs(5), || async { counts.lock().unwrap().last() == Some(&1) })
        .await;
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();
    let seen: HashSet<usize> = counts.lock().unwrap().iter().copied().collect();
    assert_eq!(seen, HashSet::from([1, 501]), "a partial endpoint set was visible");
}

/// A client built from Envoy's discovery.proto alone opens the stream and receives every resource;
/// reconnecting with the versions it holds, it receives only what changed; a version it NACKs is not
/// sent to it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_xds_client_subscribes_resumes_and_nacks() {
    let (a, b) = (HttpServer::start("a").await, HttpServer::start("b").await);
    let plane = TestControlPlane::start(&[("clusters.yaml", &clusters(&a, &b)), ("routes.yaml", &routes("a"))]);
    let types: Vec<&str> = Kind::ALL.iter().map(|k| k.type_url()).collect();
    let subscriptions: Vec<(&str, HashMap<String, String>)> = types.iter().map(|t| (*t, HashMap::new())).collect();
    let mut client = GenericClient::connect(&plane.url(), "generic", &subscriptions).await;
    let mut held: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut order = Vec::new();
    for _ in 0..Kind::COUNT {
        let response = client.next().await;
        assert!(!response.nonce.is_empty());
        order.push(response.type_url.clone());
        for resource in &response.resources {
            let any = resource.resource.as_ref().unwrap();
            assert_eq!(any.type_url, response.type_url);
            assert!(!any.value.is_empty() && !resource.version.is_empty());
            held.entry(response.type_url.clone()).or_default().insert(resource.name.clone(), resource.version.clone());
        }
        client.ack(&response).await;
    }
    assert_eq!(order, types, "push order: clusters, endpoints, authorization policies, listeners, route tables");
    assert_eq!(held[Kind::Cluster.type_url()].len(), 2);
    assert_eq!(held[Kind::RouteTable.type_url()].keys().collect::<Vec<_>>(), ["web"]);
    drop(client);

    // Reconnect holding those versions after one route table changed: only it comes.
    let loads = || plane.metric("remora_control_source_loads_total{source=\"directory\",result=\"ok\"}");
    let before = loads();
    plane.write("routes.yaml", &routes("b"));
    eventually("the edit is published", Duration::from_secs(5), || async { loads() > before }).await;
    let subscriptions: Vec<(&str, HashMap<String, String>)> =
        types.iter().map(|t| (*t, held.get(*t).cloned().unwrap_or_default())).collect();
    let mut client = GenericClient::connect(&plane.url(), "generic", &subscriptions).await;
    let mut received = Vec::new();
    for _ in 0..Kind::COUNT {
        let response = client.next().await;
        received.extend(response.resources.iter().map(|r| r.name.clone()));
        assert!(response.removed_resources.is_empty());
        if response.type_url == Kind::Listener.type_url() {
            client.nack(&response, "listener rejected by test").await;
        } else {
            client.ack(&response).await;
        }
    }
    assert_eq!(received, ["web"], "only the changed route table is re-sent");

    // NACK a changed listener; a later, unrelated change does not bring it back.
    plane.write("routes.yaml", &routes("b").replace("protocol: http1", "protocol: auto"));
    let response = client.next().await;
    assert_eq!(response.type_url, Kind::Listener.type_url());
    client.nack(&response, "no").await;
    plane.write("clusters.yaml", &clusters(&b, &a));
    let mut kinds = Vec::new();
    while let Some(response) = client.next_within(Duration::from_millis(1500)).await {
        kinds.push(response.type_url.clone());
        client.ack(&response).await;
    }
    assert_eq!(kinds, [Kind::Endpoints.type_url()], "the NACKed listener was sent again");
    assert!(plane.metric("remora_control_nacks_total{type=\"Listener\"}") >= 2.0);
}

/// A stock Envoy xDS client — the `envoy-types` crate, generated from Envoy's complete API, nothing
/// of Remora's — opens the stream, receives every type in push order with Remora's resources as `Any`,
/// and its ACKs and NACKs are understood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_own_xds_types_interoperate() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::google::rpc::Status;

    let (a, b) = (HttpServer::start("a").await, HttpServer::start("b").await);
    let plane = TestControlPlane::start(&[("clusters.yaml", &clusters(&a, &b)), ("routes.yaml", &routes("a"))]);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for (i, kind) in Kind::ALL.iter().enumerate() {
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| Node { id: "envoy".into(), cluster: "edge".into(), ..Default::default() }),
            type_url: kind.type_url().into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut client = AggregatedDiscoveryServiceClient::connect(plane.url()).await.unwrap();
    let mut stream = client.delta_aggregated_resources(tokio_stream_from(rx)).await.unwrap().into_inner();
    let mut seen = Vec::new();
    for _ in 0..Kind::COUNT {
        let response = stream.message().await.unwrap().unwrap();
        for resource in &response.resources {
            let any = resource.resource.as_ref().unwrap();
            // Remora's own decoder reads what the Envoy types carried.
            let decoded = Resource::from_any(&pbjson_types::Any {
                type_url: any.type_url.clone(),
                value: any.value.clone().into(),
            })
            .unwrap();
            assert_eq!(decoded.name(), resource.name);
            seen.push(format!("{}/{}", decoded.kind(), resource.name));
        }
        let listeners = response.type_url == Kind::Listener.type_url();
        let error_detail = listeners.then(|| Status { code: 3, message: "no listeners here".into(), details: vec![] });
        tx.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_eq!(seen, ["Cluster/a", "Cluster/b", "Endpoints/a", "Endpoints/b", "Listener/in", "RouteTable/web"]);
    eventually("the control plane counts the ACKs and the NACK", Duration::from_secs(5), || async {
        plane.metric("remora_control_acks_total{type=\"RouteTable\"}") == 1.0
            && plane.metric("remora_control_nacks_total{type=\"Listener\"}") == 1.0
    })
    .await;
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The stream needs the node on its first request.
#[tokio::test]
async fn a_stream_without_a_node_is_refused() {
    let plane = TestControlPlane::start(&[]);
    let mut client = remora_control_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::connect(plane.url()).await.unwrap();
    let request = remora_control_api::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
        type_url: Kind::Cluster.type_url().into(),
        ..Default::default()
    };
    let mut stream =
        client.delta_aggregated_resources(futures_util::stream::iter([request])).await.unwrap().into_inner();
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), tonic_code_invalid_argument());
    assert!(status.message().contains("node"), "{status:?}");
}

fn tonic_code_invalid_argument() -> tonic::Code {
    tonic::Code::InvalidArgument
}

/// With no control plane to be had, the proxy is not ready until the initial-fetch timeout, then
/// serves its file's resources; the connection gauge says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_control_plane_up_to_the_initial_fetch_timeout() {
    let a = HttpServer::start("a").await;
    let yaml = format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  initial_fetch_timeout: 1.5s\n---\nresources:\n{}{}{}",
        cluster("a", "", &[a.address()]),
        listener("static", ", protocol: http1"),
        route_all("all", "a"),
    );
    let dead = crate::dead_address();
    let started = Instant::now();
    let proxy = TestProxy::start_controlled(&yaml, &format!("http://{dead}"), "lonely");
    assert!(!proxy.proxy().is_ready());
    assert_eq!(proxy.admin_get("/ready").await.0, 503);
    proxy.wait_ready().await;
    assert!(started.elapsed() >= Duration::from_millis(1400), "ready too early: {:?}", started.elapsed());
    assert_eq!(proxy.metric("remora_control_plane_connected").await, 0.0);
    let mut client = remora_proxy::testing::Client::http1(proxy.address("static")).await;
    assert_eq!(client.get("x", "/").await.header("x-served-by"), "a");
}

/// Static resources from the proxy's own file serve beside the control plane's, and may refer to
/// them: here a static listener routes to a cluster that only the control plane defines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_resources_can_use_the_control_planes() {
    let (a, b) = (HttpServer::start("a").await, HttpServer::start("b").await);
    let plane = TestControlPlane::start(&[("clusters.yaml", &clusters(&a, &b))]);
    let yaml = format!(
        "resources:\n{}{}",
        listener("local", ", protocol: http1, route_tables: [mine]"),
        route_all("mine", "b")
    );
    let proxy = TestProxy::start_controlled(&yaml, &plane.url(), "mixed");
    proxy.wait_ready().await;
    let mut client = remora_proxy::testing::Client::http1(proxy.address("local")).await;
    assert_eq!(client.get("x", "/").await.header("x-served-by"), "b");
    // A control-plane resource may not take a static one's name.
    plane.write("clash.yaml", &format!("resources:\n{}", route_all("mine", "a")));
    eventually("the clash is NACKed", Duration::from_secs(5), || async {
        let dump = proxy.config_dump().await;
        dump["control_plane"]["types"]["RouteTable"]["last_nack"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("route table \"mine\"") && e.contains("more than once"))
    })
    .await;
    assert_eq!(client.get("x", "/").await.header("x-served-by"), "b");
}

/// Two workloads, `a` and `b`, registered in etcd for cluster `shop` by keepers with lease `ttl`
/// (`a`'s stopping on `stop_a`, after `drain`), a control plane following the registry, and a
/// proxy it configures, under traffic both workloads serve.
struct Registered2 {
    _servers: (HttpServer, HttpServer),
    plane: TestControlPlane,
    proxy: TestProxy,
    traffic: Traffic,
    keeper_a: tokio::task::JoinHandle<Result<(), remora_control_plane::sources::etcd::EtcdError>>,
    _keeper_b: tokio::task::JoinHandle<Result<(), remora_control_plane::sources::etcd::EtcdError>>,
}

impl Registered2 {
    async fn start(
        etcd: &TestEtcd,
        node: &str,
        ttl: Duration,
        drain: Duration,
        stop_a: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Registered2 {
        let prefix = etcd.prefix();
        let (a, b) = (HttpServer::start("a").await, HttpServer::start("b").await);
        let mesh = format!(
            "resources:\n  - {{kind: Cluster, name: shop}}\n{}",
            routes("shop").trim_start_matches("resources:\n")
        );
        let plane = TestControlPlane::start_with(&[("mesh.yaml", &mesh)], Some(etcd.url()), &prefix);
        let keeper = |server: &HttpServer, stop| {
            let (url, prefix) = (etcd.url().to_owned(), prefix.clone());
            let endpoint = Registered::new("shop", &server.address().to_string());
            tokio::spawn(async move { registry::register(&url, &prefix, &endpoint, ttl, drain, stop).await })
        };
        let keeper_a = keeper(&a, Box::pin(stop_a) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>);
        let keeper_b = keeper(&b, Box::pin(std::future::pending()));
        eventually("both endpoints are registered", Duration::from_secs(10), || async {
            plane.metric("remora_control_registry_endpoints") == 2.0
        })
        .await;
        let proxy = controlled(&plane, node).await;
        let traffic = Traffic::start(proxy.address("in"), 2);
        eventually("both registered endpoints serve", Duration::from_secs(10), || async {
            traffic.last_answer("a").is_some() && traffic.last_answer("b").is_some()
        })
        .await;
        Registered2 { _servers: (a, b), plane, proxy, traffic, keeper_a, _keeper_b: keeper_b }
    }
}

/// Two workloads register in etcd; one crashes (its lease keeper stops without deregistering):
/// within the lease's TTL its endpoint is gone and all traffic goes to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_workloads_endpoint_leaves_within_its_lease_ttl() {
    let Some(etcd) = TestEtcd::start().await else { return };
    let ttl = Duration::from_secs(3);
    // Every field bound, so the servers and the proxy live to the end.
    let Registered2 { _servers, plane, proxy: _proxy, traffic, keeper_a, _keeper_b } =
        Registered2::start(&etcd, "registry", ttl, Duration::ZERO, std::future::pending()).await;

    keeper_a.abort();
    let crashed = Instant::now();
    eventually("a leaves", ttl + Duration::from_secs(3), || async {
        traffic.last_answer("a").is_some_and(|last| last.elapsed() > Duration::from_millis(500))
    })
    .await;
    let gone_after = traffic.last_answer("a").unwrap().saturating_duration_since(crashed);
    assert!(gone_after <= ttl + Duration::from_secs(1), "a served {gone_after:?} after its keeper died");
    // The live workload's keeper holds its registration well past the TTL.
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    assert_eq!(plane.metric("remora_control_registry_endpoints"), 1.0);
    assert!(traffic.last_answer("b").unwrap().elapsed() < Duration::from_millis(500));
    let (failed, failures) = traffic.stop().await;
    assert_eq!(failed, 0, "failed requests, the first ones: {failures:?}");
}

/// A workload shutting down with a drain time: on its stop signal its registration turns
/// `draining`, proxies stop sending it new requests while it is still up, and only after the drain
/// time does it leave the registry. No request fails on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_workload_gets_no_new_requests_before_it_deregisters() {
    let Some(etcd) = TestEtcd::start().await else { return };
    let (ttl, drain) = (Duration::from_secs(10), Duration::from_secs(3));
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let stop = async move { drop(stopped_a.await) };
    let Registered2 { _servers, plane, proxy, traffic, keeper_a, _keeper_b } =
        Registered2::start(&etcd, "draining", ttl, drain, stop).await;

    stop_a.send(()).unwrap();
    let stopped = Instant::now();
    eventually("a is drained", Duration::from_secs(3), || async {
        traffic.last_answer("a").is_some_and(|last| last.elapsed() > Duration::from_millis(500))
    })
    .await;
    let (_, clusters) = proxy.admin_get("/clusters").await;
    assert!(clusters.contains("\"draining\""), "{clusters}");
    // Still registered (draining) until the drain time is over, then gone.
    assert_eq!(plane.metric("remora_control_registry_endpoints"), 2.0, "deregistered before its drain time");
    keeper_a.await.unwrap().unwrap();
    assert!(stopped.elapsed() >= drain, "the keeper returned after {:?}", stopped.elapsed());
    eventually("a deregistered", Duration::from_secs(5), || async {
        plane.metric("remora_control_registry_endpoints") == 1.0
    })
    .await;
    let (failed, failures) = traffic.stop().await;
    assert_eq!(failed, 0, "failed requests, the first ones: {failures:?}");
}

/// The registry's etcd watch breaks (a relay in between dies) while endpoints come and go: once it
/// is back, the registry resumes from the revision it had and misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_watch_resumes_after_it_drops() {
    let Some(etcd) = TestEtcd::start().await else { return };
    let prefix = etcd.prefix();
    let direct = remora_control_plane::sources::etcd::Etcd::connect(etcd.url()).await.unwrap();
    let target: SocketAddr = etcd.url().trim_start_matches("http://").parse().unwrap();
    let mut relay = Relay::start("127.0.0.1:0".parse().unwrap(), target).await;
    let relay_address = relay.address;

    let (tx, rx) = tokio::sync::watch::channel(Vec::<String>::new());
    let follower = tokio::spawn(registry::follow(format!("http://{relay_address}"), prefix.clone(), move |set| {
        tx.send_replace(set.values().map(|r| r.address.clone()).collect());
    }));
    let key = |address: &str| registry::key(&prefix, "shop", address);
    direct.put(&key("10.0.0.1:80"), b"", 0).await.unwrap();
    let wait_for = |want: Vec<&'static str>| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|set| *set == want)).await.unwrap().unwrap();
        }
    };
    wait_for(vec!["10.0.0.1:80"]).await;

    relay.stop();
    direct.delete(&key("10.0.0.1:80")).await.unwrap();
    direct.put(&key("10.0.0.2:80"), b"{\"weight\": 2}", 0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*rx.borrow(), ["10.0.0.1:80"], "nothing can arrive while the relay is down");
    let _relay = Relay::start(relay_address, target).await;
    wait_for(vec!["10.0.0.2:80"]).await;
    follower.abort();
}

/// A TCP relay that can be cut, to break a stream between two real peers.
struct Relay {
    address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(listen: SocketAddr, target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        let address = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let tracked = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let (mut inbound, _) = listener.accept().await.unwrap();
                tracked.lock().unwrap().push(tokio::spawn(async move {
                    let mut outbound = TcpStream::connect(target).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }));
            }
        });
        Relay { address, task, connections }
    }

    fn stop(&mut self) {
        self.task.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn resources_round_trip_through_any() {
    let file = remora_control_api::config::parse(&routes("a"), "t").unwrap();
    for resource in file.resources {
        assert_eq!(Resource::from_any(&resource.to_any()).unwrap(), resource);
    }
}
