//! The control plane against the Kubernetes API server (a stand-in that speaks list/watch as the
//! real one does: `remora_control_plane::testing::TestApiServer`; no kube-apiserver can run here):
//! the cluster followed through kube-runtime's watchers (lists, watches, bookmarks, watches ended
//! by the server, 410 Gone forcing a new list, failures retried, pods before and after their
//! slices); the automatic mesh from the API server giving a proxy the same view as the same
//! manifests in the directory; clusters filled from EndpointSlices with their pods' identities;
//! TokenReview for the CA; the webhook configuration's caBundle.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use remora_control_plane::kubernetes;
use remora_control_plane::sources::cluster::{self, Update};
use remora_control_plane::testing::{GenericClient, TestApiServer, TestCa, TestControlPlane};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};

use crate::cli::Spawned;
use crate::kubernetes::https;

const WEBHOOK_PATH: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/remora-injector";

/// A Service of namespace `shop` with a cluster IP and one port `http` (80 to 8080).
fn service(name: &str, cluster_ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": name},
           "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

/// A pod of namespace `shop` running as `account`, with Remora's sidecar.
fn meshed_pod(name: &str, account: &str) -> Value {
    let mut pod = pod(name, account);
    pod["spec"]["containers"].as_array_mut().unwrap().push(json!({"name": "remora-proxy", "image": "remora"}));
    pod
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

/// Starts `remora control --kubernetes-endpoints` against `api`, serving from a directory in
/// `directory` the cluster `web` (the Service shop/web's `http` port, with `cluster_fields` added),
/// a route table to it and the listener `listener`; waits until it has listed the cluster's
/// objects and serves. The process, its "Kubernetes objects listed" line, and the URL proxies dial.
fn endpoints_control_plane(
    api: &TestApiServer,
    directory: &Path,
    cluster_fields: &str,
    listener: &str,
) -> (Spawned, String, String) {
    let mesh = directory.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    std::fs::write(
        mesh.join("web.yaml"),
        format!(
            "resources:\n  - {{kind: Cluster, name: web{cluster_fields}, kubernetes_service: {{namespace: shop, name: web, port: http}}}}\n  - {{kind: RouteTable, name: web, routes: [{{name: all, backends: [{{cluster: web}}]}}]}}\n  - {{kind: Listener, name: {listener}, address: \"127.0.0.1:0\", route_tables: [web]}}\n"
        ),
    )
    .unwrap();
    let (kubernetes, _) = api.args(directory);
    let mut control = Spawned::new(&and(
        &kubernetes,
        &["control", "--listen", "127.0.0.1:0", "--config-dir", mesh.to_str().unwrap(), "--kubernetes-endpoints"],
    ));
    let listed = control.wait_for("Kubernetes objects listed");
    let line = control.wait_for("remora control serving Delta ADS");
    let address = format!("http://{}", line.rsplit("address=").next().unwrap().trim());
    (control, listed, address)
}

/// `remora control` against `api` with its CA in `directory/ca` (tokens checked with TokenReview,
/// the port over TLS for 127.0.0.1) and the injector (a certificate for localhost from the CA),
/// and `extra` arguments.
fn ca_control_plane(api: &TestApiServer, directory: &Path, extra: &[&str]) -> Spawned {
    let (kubernetes, _) = api.args(directory);
    let ca_dir = directory.join("ca");
    let mut args = vec!["control", "--listen", "127.0.0.1:0", "--ca-dir", ca_dir.to_str().unwrap(), "--ca-kubernetes"];
    args.extend([
        "--tls-name",
        "127.0.0.1",
        "--injector",
        "--injector-listen",
        "127.0.0.1:0",
        "--injector-name",
        "localhost",
    ]);
    args.extend(extra);
    Spawned::new(&and(&kubernetes, &args))
}

/// What `follow` hands on, as the test keeps it: the objects as they were at that moment (a copy,
/// as `follow` goes on changing its own), or the failure.
type Told = Result<remora_control_plane::mesh::Objects, String>;

/// The next set of objects `follow` hands on (failures counted in `failures`), within 15 s.
async fn next_objects(
    updates: &mut tokio::sync::mpsc::UnboundedReceiver<Told>,
    failures: &mut usize,
) -> remora_control_plane::mesh::Objects {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, updates.recv()).await.expect("no objects within 15 s") {
            Some(Ok(objects)) => return objects,
            Some(Err(error)) => {
                eprintln!("follow: {error}");
                *failures += 1;
            }
            None => panic!("follow stopped"),
        }
    }
}

/// The identity of the endpoints of Service `shop/web`'s `http` port, by address.
fn identities(objects: &remora_control_plane::mesh::Objects) -> BTreeMap<String, String> {
    let web =
        remora_control_api::v1::KubernetesService { namespace: "shop".into(), name: "web".into(), port: "http".into() };
    objects.slices.endpoints_for(&web).into_iter().map(|e| (e.address, e.identity)).collect()
}

/// `cluster::follow` against the stand-in: nothing until every kind is listed; then each watch
/// event; a pod after its slice gives the endpoint its identity late, one before at once; after a
/// bookmark and a watch the server ended, watching resumes from the bookmark's version; after the
/// history is compacted (410 Gone), a new list replaces what was held, a deletion missed meanwhile
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_is_listed_then_watched_through_bookmarks_ended_watches_and_410_gone() {
    let api = TestApiServer::start(&TestCa::new("cluster.local")).await;
    let directory = remora_proxy::testing::proxy::temp_dir("remora-follow");
    api.put(namespace("shop"));
    api.put(service("web", "10.96.0.10"));
    api.put(service("old", "10.96.0.11"));
    api.put(meshed_pod("web-a", "web"));
    api.put(endpoint_slice_of("web-a", 8080, json!({"ready": true}), pod_ref("web-a")));
    let (config, _) = api.api(&directory);
    let client = kubernetes::client(&config).unwrap();
    let (sender, mut updates) = tokio::sync::mpsc::unbounded_channel();
    let following = tokio::spawn(cluster::follow(client, "cluster.local".into(), move |update| {
        let _ = sender.send(match update {
            Update::Objects(objects) => Ok(cluster::lock(&objects).clone()),
            Update::Failed(error) => Err(error),
        });
    }));
    let mut failures = 0;
    let first = next_objects(&mut updates, &mut failures).await;
    assert_eq!((first.services.len(), first.pods.len(), first.slices.len(), first.namespaces.len()), (2, 1, 1, 1));
    assert_eq!(identities(&first)["127.0.0.1:8080"], "spiffe://cluster.local/ns/shop/sa/web");

    // A slice naming a pod not seen yet: its endpoint has no identity until the pod arrives.
    let mut late = endpoint_slice_of("web-b", 8080, json!({"ready": true}), pod_ref("web-b"));
    late["endpoints"][0]["addresses"] = json!(["127.0.0.2"]);
    api.put(late);
    let objects = next_objects(&mut updates, &mut failures).await;
    assert_eq!(identities(&objects)["127.0.0.2:8080"], "");
    api.put(meshed_pod("web-b", "web"));
    let objects = next_objects(&mut updates, &mut failures).await;
    assert_eq!(identities(&objects)["127.0.0.2:8080"], "spiffe://cluster.local/ns/shop/sa/web");

    // A bookmark, then the server ends every watch: watching resumes from the bookmark's version
    // (newer than the last Service event, as other kinds changed since).
    let bookmark = api.version();
    api.bookmark();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let bookmarked = api.seen().len();
    api.end_watches();
    api.put(service("api", "10.96.0.12"));
    let objects = next_objects(&mut updates, &mut failures).await;
    assert!(objects.services.contains_key(&("shop".to_owned(), "api".to_owned())));
    let rewatches: Vec<Value> = api.seen().split_off(bookmarked);
    let services = rewatches.iter().find(|r| r["path"] == "/api/v1/services").expect("services watched again");
    let query = services["query"].as_str().unwrap();
    assert!(query.contains("watch=true") && query.contains("allowWatchBookmarks=true"), "{query}");
    assert!(query.ends_with(&format!("resourceVersion={bookmark}")), "resumed from the bookmark: {query}");

    // History compacted while the watches are down: each watch gets 410 Gone and lists again; the
    // Service deleted meanwhile is gone from the new list.
    api.delete_unseen("v1", "Service", "shop/old");
    let objects = loop {
        let objects = next_objects(&mut updates, &mut failures).await;
        if !objects.services.contains_key(&("shop".to_owned(), "old".to_owned())) {
            break objects;
        }
    };
    assert_eq!(objects.services.len(), 2);
    let lists = api
        .seen()
        .iter()
        .filter(|r| r["path"] == "/api/v1/services" && !r["query"].as_str().unwrap().contains("watch=true"))
        .count();
    assert!(lists >= 2, "listed again after 410 Gone");
    assert!(failures >= 1, "the 410 is reported, to be counted");
    following.abort();
    let _ = std::fs::remove_dir_all(directory);
}

/// The same manifests, from the directory or from the API server (`--kubernetes-mesh`), give a
/// proxy of namespace `shop` the same resources, byte for byte (the same versions), short names
/// and a producer HTTPRoute included; a proxy of another namespace gets neither namespace's own
/// resources, and a consumer route's namespace its own table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_and_the_directory_make_the_same_views() {
    let route = |namespace: &str, name: &str, header: &str| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"namespace": namespace, "name": name},
               "spec": {"parentRefs": [{"kind": "Service", "namespace": "shop", "name": "web"}],
                        "rules": [{"matches": [{"headers": [{"name": header, "value": "1"}]}],
                                   "backendRefs": [{"name": "web", "namespace": "shop", "port": 80}]}]}})
    };
    let objects = [
        namespace("shop"),
        service("web", "10.96.0.10"),
        meshed_pod("web-a", "web"),
        endpoint_slice_of("web-a", 8080, json!({"ready": true}), pod_ref("web-a")),
        pod("db-0", "db"),
        route("shop", "producer", "x-producer"),
        route("ops", "consumer", "x-consumer"),
    ];
    let manifests: Vec<String> = objects.iter().map(|o| serde_yaml_ng::to_string(o).unwrap()).collect();
    let from_directory = TestControlPlane::start(&[("cluster.yaml", &manifests.join("---\n"))]);
    let api = TestApiServer::start(&TestCa::new("cluster.local")).await;
    for object in &objects {
        api.put(object.clone());
    }
    let directory = remora_proxy::testing::proxy::temp_dir("remora-views");
    let (config, _) = api.api(&directory);
    let from_api = TestControlPlane::start_with_kubernetes(&[], config, true);
    let view = |url: String, node: &'static str| async move {
        use remora_control_api::Kind;
        let kinds = [Kind::Cluster, Kind::Endpoints, Kind::RouteTable].map(Kind::type_url);
        let subscriptions: Vec<(&str, HashMap<String, String>)> = kinds.iter().map(|t| (*t, HashMap::new())).collect();
        let mut client = GenericClient::connect(&url, node, &subscriptions).await;
        let mut held = BTreeMap::new();
        while let Some(response) = client.next_within(Duration::from_millis(500)).await {
            for resource in &response.resources {
                held.insert(format!("{} {}", response.type_url, resource.name), resource.version.clone());
            }
            client.ack(&response).await;
        }
        held
    };
    let shop = view(from_directory.url(), "web-0.shop").await;
    assert!(shop.keys().any(|k| k.ends_with("RouteTable shop/web:80")), "{shop:?}");
    assert_eq!(view(from_api.url(), "web-0.shop").await, shop);
    let elsewhere = view(from_api.url(), "tool-0.ops").await;
    assert_eq!(view(from_directory.url(), "tool-0.ops").await, elsewhere);
    let table = |view: &BTreeMap<String, String>| {
        view.iter().find(|(k, _)| k.ends_with("RouteTable shop/web:80")).map(|(_, v)| v.clone())
    };
    assert_ne!(table(&elsewhere), table(&shop), "another namespace gets the shared table, without the short name");
    let quiet = view(from_api.url(), "quiet-0.other").await;
    assert_eq!(view(from_directory.url(), "quiet-0.other").await, quiet);
    assert_ne!(table(&elsewhere), table(&quiet), "a consumer route is its own namespace's");
    let _ = std::fs::remove_dir_all(directory);
}

/// The resources a fresh proxy of `node` is sent by the control plane at `url` (clusters,
/// endpoints, route tables and authorization policies), by kind and name, with their versions.
async fn fresh_view(url: &str, node: &str) -> BTreeMap<String, String> {
    let mut held = BTreeMap::new();
    let mut client = view_client(url, node).await;
    catch_up(&mut client, &mut held).await;
    held
}

async fn view_client(url: &str, node: &str) -> GenericClient {
    use remora_control_api::Kind;
    let kinds = [Kind::Cluster, Kind::Endpoints, Kind::RouteTable, Kind::AuthorizationPolicy].map(Kind::type_url);
    let subscriptions: Vec<(&str, HashMap<String, String>)> = kinds.iter().map(|t| (*t, HashMap::new())).collect();
    GenericClient::connect(url, node, &subscriptions).await
}

/// Applies what `client` is sent to `held` (resources put, removals taken out) until it has been
/// quiet for half a second.
async fn catch_up(client: &mut GenericClient, held: &mut BTreeMap<String, String>) {
    while let Some(response) = client.next_within(Duration::from_millis(500)).await {
        for resource in &response.resources {
            held.insert(format!("{} {}", response.type_url, resource.name), resource.version.clone());
        }
        for name in &response.removed_resources {
            held.remove(&format!("{} {name}", response.type_url));
        }
        client.ack(&response).await;
    }
}

/// Objects put at the stand-in API server, kept (by kind, namespace and name) so that a control
/// plane can be made whole from the same manifests in a directory.
struct Applied<'a> {
    api: &'a TestApiServer,
    objects: BTreeMap<String, Value>,
}

impl<'a> Applied<'a> {
    fn new(api: &'a TestApiServer) -> Self {
        Applied { api, objects: BTreeMap::new() }
    }

    fn key(kind: &str, namespace: &str, name: &str) -> String {
        format!("{kind} {namespace} {name}")
    }

    /// Puts `object` at the API server, in place of the one of its kind and name.
    fn put(&mut self, object: Value) {
        self.api.put(object.clone());
        let metadata = &object["metadata"];
        let key = Applied::key(
            object["kind"].as_str().unwrap_or_default(),
            metadata["namespace"].as_str().unwrap_or_default(),
            metadata["name"].as_str().unwrap_or_default(),
        );
        self.objects.insert(key, object);
    }

    /// Deletes an object at the API server.
    fn delete(&mut self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        self.api.delete(api_version, kind, &format!("{namespace}/{name}"));
        self.objects.remove(&Applied::key(kind, namespace, name));
    }

    /// Every object kept, as one YAML file.
    fn manifests(&self) -> String {
        let documents: Vec<String> = self.objects.values().map(|o| serde_yaml_ng::to_string(o).unwrap()).collect();
        documents.join("---\n")
    }
}

/// Applies what `client` is sent to `held` until it holds `expected` (for up to 15 s).
async fn follow_until(
    client: &mut GenericClient,
    held: &mut BTreeMap<String, String>,
    expected: &BTreeMap<String, String>,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while held != expected && std::time::Instant::now() < deadline {
        catch_up(client, held).await;
    }
}

/// An EndpointSlice of Service `service` (namespace `shop`, port `http` 8080) whose one endpoint is
/// the pod `pod` at `address`, ready.
fn slice_of(service: &str, name: &str, address: &str, pod: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}, "targetRef": pod_ref(pod)}],
    })
}

/// The API server's changes reach the served set as changes (only the Services they touch made
/// again): after Services come and go, slices change, a pod without the sidecar joins a Service and
/// the namespace turns strict, both a proxy that followed every change and a fresh one hold exactly
/// what a control plane made whole from the final manifests serves, in the namespace and outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_carried_from_the_api_server_make_what_the_whole_objects_make() {
    let api = TestApiServer::start(&TestCa::new("cluster.local")).await;
    let mut applied = Applied::new(&api);
    let mut put = |object: Value| applied.put(object);
    put(namespace("shop"));
    put(service("web", "10.96.0.10"));
    put(meshed_pod("web-a", "web"));
    put(slice_of("web", "web-1", "10.1.0.1", "web-a"));
    put(service("old", "10.96.0.12"));
    let directory = remora_proxy::testing::proxy::temp_dir("remora-carried");
    let (config, _) = api.api(&directory);
    let from_api = TestControlPlane::start_with_kubernetes(&[], config, true);
    let mut follower = view_client(&from_api.url(), "web-0.shop").await;
    let mut followed = BTreeMap::new();
    catch_up(&mut follower, &mut followed).await;
    assert!(followed.keys().any(|k| k.ends_with("Cluster shop/old:80")), "{followed:?}");

    put(service("api", "10.96.0.11"));
    put(meshed_pod("api-0", "api"));
    put(slice_of("api", "api-1", "10.1.0.9", "api-0"));
    put(pod("web-b", "web"));
    let mut web = slice_of("web", "web-1", "10.1.0.1", "web-a");
    let second = json!({"addresses": ["10.1.0.2"], "conditions": {"ready": true}, "targetRef": pod_ref("web-b")});
    web["endpoints"].as_array_mut().unwrap().push(second);
    put(web);
    let mut strict = namespace("shop");
    strict["metadata"]["annotations"] = json!({"remora.dev/inbound": "strict"});
    put(strict);
    applied.delete("v1", "Service", "shop", "old");

    let whole = TestControlPlane::start(&[("cluster.yaml", &applied.manifests())]);
    let expected = fresh_view(&whole.url(), "web-0.shop").await;
    assert!(expected.keys().any(|k| k.ends_with("Cluster shop/api:80")), "{expected:?}");
    assert!(!expected.keys().any(|k| k.contains("shop/old")), "{expected:?}");
    follow_until(&mut follower, &mut followed, &expected).await;
    assert_eq!(followed, expected, "the proxy that followed every change");
    assert_eq!(fresh_view(&from_api.url(), "web-0.shop").await, expected, "a proxy connecting now");
    let outside = fresh_view(&whole.url(), "tool-0.ops").await;
    assert_eq!(fresh_view(&from_api.url(), "tool-0.ops").await, outside, "a proxy of another namespace");
    let carried = from_api.metric("remora_control_publish_seconds_count{made=\"changes\"}");
    assert!(carried >= 1.0, "the changes were published as changes, not made whole: {carried}");
    let _ = std::fs::remove_dir_all(directory);
}

/// A namespace annotated `remora.dev/egress` with the Services its workloads call has its proxies
/// sent only those Services' clusters, endpoints and route tables, and those their routes send to
/// (an HTTPRoute on `web` splitting to `api`); a pod's own annotation wins over its namespace's;
/// a proxy of another namespace is sent everything. When the annotation changes at the API
/// server, a connected proxy is sent what the new list adds and told to drop what it leaves out,
/// and holds exactly what a control plane made whole from the final manifests serves, as does a
/// proxy connecting then. Asserted on what the Delta-ADS streams carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_narrowed_to_the_services_it_calls_is_sent_only_those() {
    let api = TestApiServer::start(&TestCa::new("cluster.local")).await;
    let mut applied = Applied::new(&api);
    let mut put = |object: Value| applied.put(object);
    let narrowed = |name: &str, egress: &str| {
        let mut namespace = namespace(name);
        namespace["metadata"]["annotations"] = json!({"remora.dev/egress": egress});
        namespace
    };
    put(namespace("shop"));
    put(narrowed("ops", "shop/web"));
    for (name, ip, address) in
        [("web", "10.96.0.10", "10.1.0.1"), ("api", "10.96.0.11", "10.1.0.2"), ("db", "10.96.0.12", "10.1.0.3")]
    {
        put(service(name, ip));
        put(meshed_pod(&format!("{name}-0"), name));
        put(slice_of(name, &format!("{name}-1"), address, &format!("{name}-0")));
    }
    put(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"namespace": "shop", "name": "canary"},
               "spec": {"parentRefs": [{"kind": "Service", "name": "web", "port": 80}],
                        "rules": [{"backendRefs": [{"name": "web", "port": 80, "weight": 90},
                                                   {"name": "api", "port": 80, "weight": 10}]}]}}));
    let mut tool = pod("tool-1", "tool");
    tool["metadata"]["namespace"] = json!("ops");
    tool["metadata"]["annotations"] = json!({"remora.dev/egress": "shop/db"});
    put(tool);
    let directory = remora_proxy::testing::proxy::temp_dir("remora-egress");
    let (config, _) = api.api(&directory);
    let from_api = TestControlPlane::start_with_kubernetes(&[], config, true);
    let services = |view: &BTreeMap<String, String>, kind: &str| {
        let prefix = format!("type.googleapis.com/remora.v1.{kind} shop/");
        view.keys().filter_map(|k| k.strip_prefix(&prefix)).map(str::to_owned).collect::<Vec<_>>()
    };
    let mut follower = view_client(&from_api.url(), "tool-0.ops").await;
    let mut followed = BTreeMap::new();
    catch_up(&mut follower, &mut followed).await;
    for kind in ["Cluster", "Endpoints", "RouteTable"] {
        assert_eq!(services(&followed, kind), ["api:80", "web:80"], "{kind}: web, and api its route sends to");
    }
    assert!(followed.keys().any(|k| k.ends_with("AuthorizationPolicy remora-inbound")), "{followed:?}");
    let shop = fresh_view(&from_api.url(), "web-0.shop").await;
    assert_eq!(services(&shop, "Cluster"), ["api:80", "db:80", "web:80"], "shop is not narrowed");
    let pod = fresh_view(&from_api.url(), "tool-1.ops").await;
    assert_eq!(services(&pod, "Cluster"), ["db:80"], "the pod's own annotation wins");
    let mut admin = remora_proxy::testing::Client::http1(from_api.address()).await;
    let dump: Value = serde_json::from_str(&admin.get("x", "/config_dump").await.text()).unwrap();
    assert_eq!(dump["narrowed_views"], json!({"ops": 2, "ops/tool-1": 1}), "{dump}");

    // The namespace now calls db and api: web (and its route) leave, db comes.
    put(narrowed("ops", "shop/db, ./*, shop/api"));
    let whole = TestControlPlane::start(&[("cluster.yaml", &applied.manifests())]);
    let expected = fresh_view(&whole.url(), "tool-0.ops").await;
    assert_eq!(services(&expected, "Cluster"), ["api:80", "db:80"], "{expected:?}");
    follow_until(&mut follower, &mut followed, &expected).await;
    assert_eq!(followed, expected, "the proxy that followed the change");
    assert_eq!(fresh_view(&from_api.url(), "tool-0.ops").await, expected, "a proxy connecting now");
    assert_eq!(fresh_view(&whole.url(), "web-0.shop").await, shop, "shop is as before");
    let _ = std::fs::remove_dir_all(directory);
}

/// With `--kubernetes-mesh`, each route's status carries Remora's conditions per parent Service,
/// written to the API server's status subresource beside another controller's entry (kept),
/// written again when the route or what it names changes, and left alone while nothing does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_status_is_written_to_the_api_server() {
    let api = TestApiServer::start(&TestCa::new("cluster.local")).await;
    let other = json!({"parentRef": {"name": "gw"}, "controllerName": "example.com/gateway", "conditions": []});
    let route = |backend: &str, generation: i64| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"namespace": "shop", "name": "canary", "generation": generation},
               "spec": {"parentRefs": [{"kind": "Service", "name": "web", "port": 80}],
                        "rules": [{"backendRefs": [{"name": backend, "port": 80}]}]},
               "status": {"parents": [other.clone()]}})
    };
    api.put(namespace("shop"));
    api.put(service("web", "10.96.0.10"));
    api.put(route("web-v2", 1));
    let directory = remora_proxy::testing::proxy::temp_dir("remora-route-status");
    let (config, _) = api.api(&directory);
    let _plane = TestControlPlane::start_with_kubernetes(&[], config, true);
    let ours = |generation: i64| {
        let api = &api;
        move || {
            let stored = api.get("gateway.networking.k8s.io/v1", "HTTPRoute", "shop/canary")?;
            let parents = stored["status"]["parents"].as_array()?.clone();
            let entry = parents.iter().find(|p| p["controllerName"] == "remora.dev/mesh")?.clone();
            (entry["conditions"][0]["observedGeneration"] == generation).then_some((parents, entry))
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (parents, entry) = loop {
        if let Some(found) = ours(1)() {
            break found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no status written: {:?}",
            api.get("gateway.networking.k8s.io/v1", "HTTPRoute", "shop/canary")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(parents.contains(&other), "another controller's entry is kept: {parents:?}");
    assert_eq!(
        entry["parentRef"],
        json!({"group": "", "kind": "Service", "namespace": "shop", "name": "web", "port": 80})
    );
    let conditions: Vec<(&str, &str, &str)> = entry["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap(), c["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(conditions, [("Accepted", "True", "Accepted"), ("ResolvedRefs", "False", "BackendNotFound")]);
    // The missing backend appears: written again.
    api.put(service("web-v2", "10.96.0.11"));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let resolved = ours(1)().is_some_and(|(_, entry)| entry["conditions"][1]["status"] == "True");
        if resolved {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "status not rewritten");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new generation of the route: its conditions say they observed it.
    let mut edited = route("web", 2);
    edited["status"] = api.get("gateway.networking.k8s.io/v1", "HTTPRoute", "shop/canary").unwrap()["status"].clone();
    api.put(edited);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while ours(2)().is_none() {
        assert!(std::time::Instant::now() < deadline, "the new generation is not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let writes = || {
        let seen = api.seen();
        seen.iter()
            .filter(|r| r["method"] == "PATCH" && r["path"].as_str().is_some_and(|p| p.ends_with("/status")))
            .count()
    };
    let settled = writes();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(writes(), settled, "nothing written while nothing changes");
    let _ = std::fs::remove_dir_all(directory);
}

/// `args` followed by `extra`, for a command line.
fn and<'a>(extra: &'a [String], args: &[&'a str]) -> Vec<&'a str> {
    args.iter().copied().chain(extra.iter().map(String::as_str)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_issues_a_service_account_its_own_identity_after_a_token_review() {
    use remora_control_api::ca::certificate_request;
    use remora_control_api::ca::{ClientError, sign};
    use remora_control_api::identity::SpiffeId;

    let cluster_ca = TestCa::new("cluster.local");
    let api = TestApiServer::start(&cluster_ca).await;
    api.set_user("projected-token-of-shop-web", "system:serviceaccount:shop:web");
    let directory = remora_proxy::testing::proxy::temp_dir("remora-tokenreview");
    let mut control = ca_control_plane(&api, &directory, &["--xds-auth"]);
    let line = control.wait_for("remora control serving Delta ADS");
    let address = format!("https://{}", line.rsplit("address=").next().unwrap().trim());
    let mesh_root = std::fs::read_to_string(directory.join("ca/ca.crt")).unwrap();
    // The injector serves with a certificate from the same CA, so its caBundle is the mesh root.
    let line = control.wait_for("remora control serving the sidecar injector");
    let injector: std::net::SocketAddr = line.rsplit("address=").next().unwrap().trim().parse().unwrap();
    assert_eq!(https(injector, &mesh_root, "GET", b"").await.0, 405);
    let control_tls = remora_control_api::grpc::ControlTls::from_pem(mesh_root.as_bytes()).unwrap();

    let ask = |id: &str, token: &str| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = certificate_request(&SpiffeId::parse(id).unwrap(), &key).unwrap();
        let (address, token, tls) = (address.clone(), token.to_owned(), control_tls.clone());
        async move {
            let (ttl, timeout) = (std::time::Duration::from_secs(3600), std::time::Duration::from_secs(10));
            sign(&address, Some(&tls), &token, csr, ttl, timeout).await
        }
    };
    // The account's own identity is signed.
    let signed = ask("spiffe://cluster.local/ns/shop/sa/web", "projected-token-of-shop-web").await.unwrap();
    assert!(signed.certificate_chain[0].contains("BEGIN CERTIFICATE"), "{signed:?}");
    // Another account's is not, and an invalid token is not authenticated.
    let refused = |result: Result<_, ClientError>| match result {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        refused(ask("spiffe://cluster.local/ns/shop/sa/admin", "projected-token-of-shop-web").await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        refused(ask("spiffe://cluster.local/ns/shop/sa/web", "a-stolen-or-expired-token").await),
        tonic::Code::Unauthenticated
    );
    // Each certificate request was reviewed by TokenReview, as the control plane, for the CA's
    // audience (the second request with the accepted token too).
    let seen = api.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for review in &seen {
        assert_eq!(review["path"], "/apis/authentication.k8s.io/v1/tokenreviews");
        assert_eq!(review["authorized"], true);
        assert_eq!(review["body"]["kind"], "TokenReview");
        assert_eq!(review["body"]["spec"]["audiences"], json!(["remora"]));
    }

    // A token revoked moments after it was accepted gets no certificate.
    api.set_user("projected-token-revoked-soon", "system:serviceaccount:shop:web");
    assert!(ask("spiffe://cluster.local/ns/shop/sa/web", "projected-token-revoked-soon").await.is_ok());
    api.revoke("projected-token-revoked-soon");
    assert_eq!(
        refused(ask("spiffe://cluster.local/ns/shop/sa/web", "projected-token-revoked-soon").await),
        tonic::Code::Unauthenticated
    );

    // Nor does it open a discovery stream, however recently one was let in with it.
    let open_stream = |token: &str| {
        use remora_control_api::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
        use remora_control_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
        let (address, tls, bearer) = (address.clone(), control_tls.clone(), format!("Bearer {token}"));
        async move {
            let channel = remora_control_api::xds::client::connect(&address, Some(&tls)).await.unwrap();
            let mut request = tonic::Request::new(tokio_stream::pending::<DeltaDiscoveryRequest>());
            request.metadata_mut().insert("authorization", bearer.parse().unwrap());
            AggregatedDiscoveryServiceClient::new(channel).delta_aggregated_resources(request).await.map(drop)
        }
    };
    api.set_user("projected-token-of-a-stream", "system:serviceaccount:shop:web");
    assert!(open_stream("projected-token-of-a-stream").await.is_ok());
    api.revoke("projected-token-of-a-stream");
    assert_eq!(open_stream("projected-token-of-a-stream").await.unwrap_err().code(), tonic::Code::Unauthenticated);

    // A proxy as the injector sets it up: the projected token in a file, the control plane's root
    // inline in REMORA_CONTROL_CA; it is ready once its certificate is in hand.
    let token_file = directory.join("token");
    std::fs::write(&token_file, "projected-token-of-shop-web").unwrap();
    let config = directory.join("proxy.yaml");
    std::fs::write(&config, "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\nresources: []\n").unwrap();
    let mut proxy = Spawned::with_env(
        &[
            "proxy",
            "--config",
            config.to_str().unwrap(),
            "--control",
            &address,
            "--identity",
            "spiffe://cluster.local/ns/shop/sa/web",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[("REMORA_CONTROL_CA", &mesh_root)],
    );
    let issued = proxy.wait_for("certificate issued");
    assert!(issued.contains("spiffe://cluster.local/ns/shop/sa/web"), "{issued}");
    proxy.wait_for("first configuration from the control plane applied; ready");

    // The API server refusing the control plane is "unavailable" for a token not reviewed yet: the
    // proxy retries later. One it accepted moments ago stands in while the API server cannot say.
    api.set_user("projected-token-of-shop-web-renewed", "system:serviceaccount:shop:web");
    api.accept_only("a-token-the-control-plane-does-not-hold");
    assert_eq!(
        refused(ask("spiffe://cluster.local/ns/shop/sa/web", "projected-token-of-shop-web-renewed").await),
        tonic::Code::Unavailable
    );
    assert!(ask("spiffe://cluster.local/ns/shop/sa/web", "projected-token-of-shop-web").await.is_ok());
    let _ = std::fs::remove_dir_all(directory);
}

/// The CA against requests written to abuse it: CSRs naming more or other than one SPIFFE ID, one
/// asking to be a CA for ten years, one from another trust domain, one of 1 MiB, garbage, and a
/// token issued for another audience (a token stolen from a pod is for the API server, not for
/// `remora`). Each is refused with the code that says why, or (the CA for ten years) signed only
/// as policy allows; the CA serves the next caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_refuses_forged_requests_and_tokens_for_other_audiences() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    use remora_control_api::ca::{ClientError, sign};
    use rustls::pki_types::pem::PemObject;

    let cluster_ca = TestCa::new("cluster.local");
    let api = TestApiServer::start(&cluster_ca).await;
    api.set_user_for("token-for-remora", "system:serviceaccount:shop:web", "remora");
    api.set_user_for("token-for-the-api-server", "system:serviceaccount:shop:web", "https://kubernetes.default.svc");
    let directory = remora_proxy::testing::proxy::temp_dir("remora-ca-abuse");
    let mut control = ca_control_plane(&api, &directory, &[]);
    let line = control.wait_for("remora control serving Delta ADS");
    let address = format!("https://{}", line.rsplit("address=").next().unwrap().trim());
    let mesh_root = std::fs::read_to_string(directory.join("ca/ca.crt")).unwrap();
    let tls = remora_control_api::grpc::ControlTls::from_pem(mesh_root.as_bytes()).unwrap();
    let ask = |csr: String, token: &'static str, ttl: Duration| {
        let (address, tls) = (address.clone(), tls.clone());
        async move { sign(&address, Some(&tls), token, csr, ttl, Duration::from_secs(10)).await }
    };
    let code = |result: Result<_, ClientError>| match result {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let csr = |names: Vec<SanType>, edit: fn(&mut CertificateParams)| {
        let mut params = CertificateParams::default();
        params.subject_alt_names = names;
        edit(&mut params);
        params
            .serialize_request(&KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
            .unwrap()
            .pem()
            .unwrap()
    };
    let uri = |id: &str| SanType::URI(id.to_owned().try_into().unwrap());
    let own = "spiffe://cluster.local/ns/shop/sa/web";
    let hour = Duration::from_secs(3600);

    let cases = [
        (
            "its ID and a DNS name",
            csr(vec![uri(own), SanType::DnsName("kubernetes.default.svc".try_into().unwrap())], |_| {}),
            tonic::Code::InvalidArgument,
        ),
        (
            "a DNS name only",
            csr(vec![SanType::DnsName("web.shop.svc".try_into().unwrap())], |_| {}),
            tonic::Code::InvalidArgument,
        ),
        (
            "two SPIFFE IDs",
            csr(vec![uri(own), uri("spiffe://cluster.local/ns/shop/sa/admin")], |_| {}),
            tonic::Code::InvalidArgument,
        ),
        ("no name", csr(Vec::new(), |_| {}), tonic::Code::InvalidArgument),
        (
            "another trust domain",
            csr(vec![uri("spiffe://evil.example/ns/shop/sa/web")], |_| {}),
            tonic::Code::PermissionDenied,
        ),
        (
            "garbage",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_owned(),
            tonic::Code::InvalidArgument,
        ),
        (
            "1 MiB",
            format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
                "A".repeat(1 << 20)
            ),
            tonic::Code::OutOfRange,
        ),
    ];
    for (case, request, expected) in cases {
        assert_eq!(code(ask(request, "token-for-remora", hour).await), expected, "{case}");
    }
    // A token the API server issued for itself is not one the CA takes, whoever's it is.
    assert_eq!(
        code(ask(csr(vec![uri(own)], |_| {}), "token-for-the-api-server", hour).await),
        tonic::Code::Unauthenticated
    );

    // Asking to be a CA, for ten years: signed as a leaf for its one ID, for at most the CA's
    // maximum lifetime.
    let as_ca = csr(vec![uri(own)], |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
    let signed = ask(as_ca, "token-for-remora", Duration::from_secs(10 * 365 * 86_400)).await.unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(signed.certificate_chain[0].as_bytes()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(!leaf.is_ca(), "a CSR made itself a CA");
    let names = leaf.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
    assert_eq!(format!("{names:?}"), format!("{:?}", [x509_parser::extensions::GeneralName::URI(own)]));
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    // The maximum, and the minute the CA backdates a certificate by.
    let most = remora_control_api::ca::DEFAULT_MAX_TTL.as_secs() + 60;
    assert!(lifetime <= most as i64, "signed for {lifetime} s");
    let _ = std::fs::remove_dir_all(directory);
}

/// A TLS connection to `address` trusting `root` (ALPN http/1.1, for host `name`), its HTTP/1.1
/// sender, and the leaf certificate the server presented.
async fn tls_session(
    address: std::net::SocketAddr,
    root: &str,
    name: &str,
) -> (hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>, Vec<u8>) {
    let tls = remora_control_api::grpc::ControlTls::from_pem(root.as_bytes()).unwrap();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls.http1_config())
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .unwrap();
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    (sender, leaf)
}

/// `GET path` on an open session; the status and body.
async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let request = http::Request::get(path).header("host", "localhost").body(http_body_util::Empty::new()).unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// With `--injector-webhook`, the control plane sets the caBundle of the webhook configuration
/// (the one `deploy/` applies) to the CA root through the API server; and with short-lived serving
/// certificates, it renews its port's and the injector's certificates at half-life while open
/// connections carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_patches_the_webhook_ca_bundle_and_renews_its_serving_certificates() {
    let cluster_ca = TestCa::new("cluster.local");
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/webhook.yaml")).unwrap();
    let deployed: Value = serde_yaml_ng::from_str(&manifest).unwrap();
    assert!(deployed["webhooks"][0]["clientConfig"].get("caBundle").is_none(), "deploy/ leaves caBundle out");
    let api = TestApiServer::start(&cluster_ca).await;
    api.put_webhook(deployed);
    let directory = remora_proxy::testing::proxy::temp_dir("remora-ca-bundle");
    let mut control =
        ca_control_plane(&api, &directory, &["--serving-cert-ttl", "4", "--injector-webhook", "remora-injector"]);
    let line = control.wait_for("remora control serving Delta ADS");
    let port: std::net::SocketAddr = line.rsplit("address=").next().unwrap().trim().parse().unwrap();
    let line = control.wait_for("remora control serving the sidecar injector");
    let injector: std::net::SocketAddr = line.rsplit("address=").next().unwrap().trim().parse().unwrap();
    let mesh_root = std::fs::read_to_string(directory.join("ca/ca.crt")).unwrap();

    // The caBundle: patched in, guarded by the webhook's name, as the control plane.
    control.wait_for("webhook caBundle set to the CA root");
    let webhook = api.webhook("remora-injector");
    let bundle = base64::engine::general_purpose::STANDARD.encode(&mesh_root);
    assert_eq!(webhook["webhooks"][0]["clientConfig"]["caBundle"], bundle.as_str());
    assert_eq!(webhook["webhooks"][0]["clientConfig"]["service"]["name"], "remora-injector", "the rest is kept");
    let seen = api.seen();
    let patch = seen.iter().find(|r| r["method"] == "PATCH").expect("a PATCH");
    assert_eq!(patch["path"], WEBHOOK_PATH);
    assert_eq!(patch["authorized"], true);
    assert_eq!(patch["content_type"], "application/json-patch+json");
    assert_eq!(patch["body"][0], json!({"op": "test", "path": "/webhooks/0/name", "value": "inject.remora.dev"}));

    // Renewal: a connection opened now keeps working after both certificates are renewed (at 2 s),
    // and a new one is served the new certificate, from the same root.
    let (mut before, first) = tls_session(injector, &mesh_root, "localhost").await;
    assert_eq!(get(&mut before, "/live").await.0, 200);
    let (_, first_port) = tls_session(port, &mesh_root, "127.0.0.1").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let renewed = loop {
        let (_, leaf) = tls_session(injector, &mesh_root, "localhost").await;
        if leaf != first {
            break leaf;
        }
        assert!(std::time::Instant::now() < deadline, "the injector's certificate was not renewed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(renewed, first);
    assert_eq!(get(&mut before, "/live").await.0, 200, "an open connection outlives the renewal");
    let (mut operator, now_port) = tls_session(port, &mesh_root, "127.0.0.1").await;
    assert_ne!(now_port, first_port, "the port's certificate is renewed too");
    let (status, metrics) = get(&mut operator, "/metrics").await;
    assert_eq!(status, 200);
    let renewals = metrics
        .lines()
        .find(|l| l.starts_with("remora_control_serving_certificate_renewals_total{result=\"renewed\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no renewal count in\n{metrics}"));
    assert!(renewals >= 2.0, "{renewals}");
    assert!(metrics.contains("remora_control_injector_ca_bundle_checks_total{result=\"patched\"} 1"), "{metrics}");
    let _ = std::fs::remove_dir_all(directory);
}

/// An EndpointSlice of Service `shop/web` with one endpoint at 127.0.0.1 on `port` (named http).
fn endpoint_slice(name: &str, port: u16, conditions: Value) -> Value {
    endpoint_slice_of(name, port, conditions, Value::Null)
}

/// An EndpointSlice of `web` whose one endpoint is the pod `target` (a `targetRef`).
fn endpoint_slice_of(name: &str, port: u16, conditions: Value, target: Value) -> Value {
    let mut endpoint = json!({"addresses": ["127.0.0.1"], "conditions": conditions, "zone": "zone-a"});
    if !target.is_null() {
        endpoint["targetRef"] = target;
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [endpoint],
    })
}

/// A pod of namespace `shop` running as service account `account`.
fn pod(name: &str, account: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
           "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "app"}]}})
}

/// The `targetRef` of a slice endpoint for the pod `name`.
fn pod_ref(name: &str) -> Value {
    json!({"kind": "Pod", "namespace": "shop", "name": name, "uid": format!("uid-{name}")})
}

/// Which servers answered `n` requests through `address`.
async fn served_by(address: std::net::SocketAddr, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut client = remora_proxy::testing::Client::http1(address).await;
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let reply = client.get("web.shop", "/").await;
        *seen
            .entry(if reply.status == 200 { reply.header("x-served-by").to_owned() } else { reply.status.to_string() })
            .or_insert(0) += 1;
    }
    seen
}

/// With `--kubernetes-endpoints`, a cluster naming a Service gets its pods from the API server's
/// EndpointSlices: the list at start, then every watch event: a pod turning terminating drains (no
/// new requests), a slice deleted takes its pods away, a new one adds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_follow_a_services_endpoint_slices() {
    use remora_proxy::testing::{HttpServer, TestProxy, eventually};

    let (a, b, c) = (HttpServer::start("a").await, HttpServer::start("b").await, HttpServer::start("c").await);
    let cluster_ca = TestCa::new("cluster.local");
    let api = TestApiServer::start(&cluster_ca).await;
    let ready = || json!({"ready": true, "serving": true, "terminating": false});
    api.put(endpoint_slice("web-a", a.address().port(), ready()));
    api.put(endpoint_slice("web-b", b.address().port(), ready()));
    let directory = remora_proxy::testing::proxy::temp_dir("remora-endpoint-slices");
    let (_control, _, address) = endpoints_control_plane(&api, &directory, "", "in");
    let proxy = TestProxy::start_controlled("", &address, "slices");
    proxy.wait_ready().await;
    let listener = proxy.address("in");
    let seen = served_by(listener, 40).await;
    assert_eq!((seen.get("a"), seen.get("b")), (Some(&20), Some(&20)), "{seen:?}");

    // b's pod is terminating: it drains, a takes every new request.
    api.put(endpoint_slice("web-b", b.address().port(), json!({"ready": false, "serving": true, "terminating": true})));
    eventually("b drains", Duration::from_secs(5), || async { served_by(listener, 10).await.keys().eq(["a"]) }).await;
    let (_, clusters) = proxy.admin_get("/clusters").await;
    assert!(clusters.contains("\"draining\""), "{clusters}");

    // b's slice goes and c's comes: the watch carries both.
    api.delete("discovery.k8s.io/v1", "EndpointSlice", "shop/web-b");
    api.put(endpoint_slice("web-c", c.address().port(), ready()));
    eventually("c joins", Duration::from_secs(5), || async { served_by(listener, 10).await.keys().eq(["a", "c"]) })
        .await;
    let seen = api.seen();
    assert!(seen.iter().any(|r| r["path"] == "/apis/discovery.k8s.io/v1/endpointslices" && r["authorized"] == true));
    let _ = std::fs::remove_dir_all(directory);
}

/// A receiving sidecar holding `identity` (from `ca`) in front of the server `app`.
fn inbound_sidecar(
    ca: &TestCa,
    identity: &str,
    app: std::net::SocketAddr,
    dir: &Path,
) -> remora_proxy::testing::TestProxy {
    let identity = ca.issue(identity).bootstrap_identity(dir);
    remora_proxy::testing::TestProxy::start(&format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  drain_time: 1s\n{identity}---\nresources:\n{}{}",
        crate::cluster("app", ", protocol: http1", &[app]),
        crate::listener("in", ", direction: inbound, default_cluster: app"),
    ))
}

/// Endpoints from EndpointSlices carry their pods' service-account identities, so `tls: mesh`
/// refuses a sidecar that holds another identity of the trust domain (without them, any identity
/// of it passes): the pods come from a list of every pod (its first attempts answered 503, retried
/// after a backoff), and a pod a watch brings in gives its endpoint an identity, whether it comes
/// before its slice or after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_endpoints_are_checked_against_their_pods_service_accounts() {
    use remora_proxy::testing::{HttpServer, TestProxy, eventually};

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    let mesh_ca = TestCa::new("cluster.local");
    let directory = remora_proxy::testing::proxy::temp_dir("remora-pod-identities");
    let servers = [HttpServer::start("a").await, HttpServer::start("b").await, HttpServer::start("c").await];
    let [a, b, c] = &servers;
    let sidecar_a = inbound_sidecar(&mesh_ca, WEB, a.address(), &directory.join("a"));
    // b's pod runs as `web`, but what answers at its address holds another identity.
    let impostor =
        inbound_sidecar(&mesh_ca, "spiffe://cluster.local/ns/shop/sa/impostor", b.address(), &directory.join("b"));
    let sidecar_c = inbound_sidecar(&mesh_ca, WEB, c.address(), &directory.join("c"));
    for sidecar in [&sidecar_a, &impostor, &sidecar_c] {
        sidecar.wait_ready().await;
    }

    let api = TestApiServer::start(&TestCa::new("cluster.local")).await;
    let ready = || json!({"ready": true});
    for (name, account) in [("web-a", "web"), ("web-b", "web"), ("db-0", "db")] {
        api.put(pod(name, account));
    }
    api.put(endpoint_slice_of("web-a", sidecar_a.address("in").port(), ready(), pod_ref("web-a")));
    api.put(endpoint_slice_of("web-b", impostor.address("in").port(), ready(), pod_ref("web-b")));
    api.fail_next("/api/v1/pods", 2);
    let (_control, listed, address) = endpoints_control_plane(&api, &directory, ", tls: mesh", "out");
    assert!(listed.contains("pods=3"), "every pod, from a list: {listed}");
    let pod_lists = api
        .seen()
        .iter()
        .filter(|r| r["path"] == "/api/v1/pods" && !r["query"].as_str().unwrap().contains("watch"))
        .count();
    assert_eq!(pod_lists, 3, "listed again after each 503");
    let identity =
        mesh_ca.issue("spiffe://cluster.local/ns/shop/sa/client").bootstrap_identity(&directory.join("client"));
    let client = TestProxy::start_controlled(
        &format!(
            "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  drain_time: 1s\n  initial_fetch_timeout: 20s\n{identity}---\n"
        ),
        &address,
        "client",
    );
    client.wait_ready().await;
    let out = client.address("out");
    let seen = served_by(out, 20).await;
    assert!(seen.contains_key("a"), "{seen:?}");
    assert_eq!(seen.get("b"), None, "the impostor was let through: {seen:?}");

    // A new pod's slice arrives before the pod itself: c joins once its pod (and so its identity)
    // is known.
    api.delete("discovery.k8s.io/v1", "EndpointSlice", "shop/web-b");
    api.put(endpoint_slice_of("web-c", sidecar_c.address("in").port(), ready(), pod_ref("web-c")));
    api.put(pod("web-c", "web"));
    eventually("c joins", Duration::from_secs(5), || async { served_by(out, 10).await.keys().eq(["a", "c"]) }).await;
    eventually("both endpoints carry their pod's identity", Duration::from_secs(15), || async {
        client.config_dump().await.to_string().matches(WEB).count() >= 2
    })
    .await;
    let _ = std::fs::remove_dir_all(directory);
}
