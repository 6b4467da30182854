//! The Gateway API mesh conformance suite (GAMMA), replayed: the upstream manifests and every case
//! of `../shared/conformance/gamma/` (see its README) against a real `remora control` and real
//! proxies, asserting what the upstream tests assert and the values they declare but leave
//! unchecked (redirect locations, rewritten paths).
//!
//! The emulated cluster: the base manifests' Namespaces and Services (each Service given a
//! ClusterIP), a Pod per Deployment (named `DEPLOYMENT-RSHASH-PODHASH`, its template's labels), and
//! per Service an EndpointSlice per Pod its selector picks. Each echo pod is an HTTP/1.1 and HTTP/2
//! server on loopback answering every port (the Service's port names all lead to it) as the
//! conformance echo server would: 200, with its hostname, the request's headers, host and path
//! (in `x-echo-*` response headers), and gRPC calls with status 0. The pods have no sidecars here:
//! the mesh calls them in plaintext, so what is replayed is the calling side, a proxy per client
//! pod (node `POD.NAMESPACE`, an outbound listener) reached by the mesh client's Host header. Each
//! test's manifests are written into the control plane's directory, on top of the base, and taken
//! out after it; each case is retried until it passes three times in a row (100 ms after a failure,
//! 30 s at most), and a weight batch up to its attempts, as upstream does.
//!
//! The cases that need the client's connection captured (a request to one Service's ClusterIP
//! naming another in its Host header, a request to a pod's address) are left to the second test,
//! which replays them as root in network namespaces with `remora init`'s capture rules. Each test
//! fails if any case it replays fails; the first prints a table of features.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::BodyExt;
use remora_control_plane::testing::TestControlPlane;
use remora_proxy::testing::servers::{Handler, full};
use remora_proxy::testing::{Client, HttpServer, TestProxy};
use serde_json::{Value, json};

/// Where the suite is, beside the checkout.
fn suite() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/gamma");
    dir.join("cases.yaml").is_file().then_some(dir)
}

/// The documents of a YAML file, as JSON.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .filter_map(|document| serde::Deserialize::deserialize(document).ok())
        .filter(|value: &Value| !value.is_null())
        .collect()
}

/// The echo server's answers as pod `hostname`: see the module documentation.
fn echo_handler(hostname: String) -> Handler {
    Arc::new(move |request| {
        let hostname = hostname.clone();
        Box::pin(async move {
            let uri = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
            let host = remora_proxy::http::headers::authority(&request).unwrap_or_default().to_owned();
            let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, value) in request.headers() {
                seen.entry(name.as_str().to_owned()).or_default().push(value.to_str().unwrap_or("?").to_owned());
            }
            let grpc =
                request.headers().get("content-type").is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
            let _ = request.into_body().collect().await;
            let mut response = if grpc {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let frames = futures_util::stream::iter([
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(http_body::Frame::data(Bytes::from_static(
                        b"\0\0\0\0\0",
                    ))),
                    Ok(http_body::Frame::trailers(trailers)),
                ]);
                let mut response = Response::new(BodyExt::boxed(http_body_util::StreamBody::new(frames)));
                response.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
                response
            } else {
                Response::new(full(format!("Hostname={hostname}\n")))
            };
            let headers = response.headers_mut();
            let value = |text: &str| HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("?"));
            headers.insert("x-echo-hostname", value(&hostname));
            headers.insert("x-echo-uri", value(&uri));
            headers.insert("x-echo-host", value(&host));
            headers.insert("x-echo-headers", value(&serde_json::to_string(&seen).unwrap_or_default()));
            response
        })
    })
}

/// A pod of the emulated cluster: a Deployment's one replica.
struct PodSpec {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
}

/// The pods of the base's Deployments (`DEPLOYMENT-RSHASH-PODHASH`, the template's labels).
fn pod_specs(base: &[Value]) -> Vec<PodSpec> {
    base.iter()
        .enumerate()
        .filter(|(_, object)| object["kind"] == "Deployment")
        .map(|(i, object)| PodSpec {
            namespace: object["metadata"]["namespace"].as_str().unwrap_or("default").to_owned(),
            name: format!("{}-5d4f8b6c{i}-x2x7k", object["metadata"]["name"].as_str().unwrap_or_default()),
            labels: serde_json::from_value(object["spec"]["template"]["metadata"]["labels"].clone())
                .unwrap_or_default(),
        })
        .collect()
}

/// The emulated cluster's manifests made of the base's (Services with ClusterIPs, Pods for the
/// Deployments, an EndpointSlice per Service and Pod it selects, every port name of the Service
/// leading to the pod's echo server at its address), and the ClusterIP of each Service by
/// `namespace/name`.
fn manifests(base: &[Value], pods: &[(PodSpec, SocketAddr)]) -> (String, HashMap<String, String>) {
    let mut manifests = Vec::new();
    let mut cluster_ips = HashMap::new();
    for (i, object) in base.iter().enumerate() {
        match object["kind"].as_str() {
            Some("Deployment") => {}
            Some("Service") => {
                let mut service = object.clone();
                let ip = format!("10.96.1.{}", i + 1);
                let namespace = object["metadata"]["namespace"].as_str().unwrap_or("default");
                cluster_ips.insert(
                    format!("{namespace}/{}", object["metadata"]["name"].as_str().unwrap_or_default()),
                    ip.clone(),
                );
                service["spec"]["clusterIP"] = ip.into();
                manifests.push(service);
            }
            _ => manifests.push(object.clone()),
        }
    }
    for (pod, _) in pods {
        manifests.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": pod.namespace, "name": pod.name, "uid": format!("uid-{}-{}", pod.namespace, pod.name), "labels": pod.labels},
            "spec": {"containers": [{"name": "echo"}]}}));
    }
    for service in base.iter().filter(|o| o["kind"] == "Service") {
        let namespace = service["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = service["metadata"]["name"].as_str().unwrap_or_default();
        let selector: BTreeMap<String, String> =
            serde_json::from_value(service["spec"]["selector"].clone()).unwrap_or_default();
        let selected = pods
            .iter()
            .filter(|(p, _)| p.namespace == namespace && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)));
        for (pod, address) in selected {
            let ports: Vec<Value> = service["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|port| json!({"name": port["name"], "port": address.port(), "protocol": "TCP"}))
                .collect();
            manifests.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": namespace, "name": format!("{name}-{}", pod.name), "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": ports,
                "endpoints": [{"addresses": [address.ip().to_string()], "conditions": {"ready": true},
                               "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod.name, "uid": format!("uid-{namespace}-{}", pod.name)}}]}));
        }
    }
    let text: Vec<String> = manifests.iter().map(|m| serde_yaml_ng::to_string(m).unwrap_or_default()).collect();
    (text.join("---\n"), cluster_ips)
}

/// What the client got, and what the echo pod saw.
#[derive(Debug, Default)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    hostname: String,
    seen: BTreeMap<String, Vec<String>>,
    seen_uri: String,
}

/// Sends `request` (a case's) through `proxy`'s outbound listener.
async fn send(proxy: &TestProxy, request: &Value) -> Answer {
    send_to(proxy.address("out"), request, &HashMap::new()).await
}

/// Sends `request` to `address`, its URL's `{{pod_ip:NS/DEPLOYMENT}}` replaced from `pod_ips`.
async fn send_to(address: SocketAddr, request: &Value, pod_ips: &HashMap<String, String>) -> Answer {
    let mut url = request["url"].as_str().unwrap_or_default().to_owned();
    for (pod, ip) in pod_ips {
        url = url.replace(&format!("{{{{pod_ip:{pod}}}}}"), ip);
    }
    let authority = url.split("://").nth(1).unwrap_or_default().split('/').next().unwrap_or_default().to_owned();
    let grpc = request["protocol"] == "grpc";
    let mut client = if grpc { Client::http2(address).await } else { Client::http1(address).await };
    let (method, path) = if grpc {
        (http::Method::POST, "/proto.EchoTestService/Echo".to_owned())
    } else {
        let method = request["method"].as_str().unwrap_or("GET").parse().unwrap_or(http::Method::GET);
        (method, request["path"].as_str().unwrap_or("/").to_owned())
    };
    let mut host = authority;
    let mut extra = Vec::new();
    for (name, value) in request["headers"].as_object().into_iter().flatten() {
        let value = value.as_str().unwrap_or_default().to_owned();
        if name.eq_ignore_ascii_case("host") {
            host = value;
        } else {
            extra.push((name.clone(), value));
        }
    }
    let mut builder = client.request(method, &host, &path);
    for (name, value) in &extra {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let body = if grpc {
        builder = builder.header("content-type", "application/grpc").header("te", "trailers");
        full(&b"\0\0\0\0\0"[..])
    } else {
        full("")
    };
    let Ok(request) = builder.body(body) else { return Answer::default() };
    let Ok(sent) = client.send(request).await else { return Answer::default() };
    let reply = remora_proxy::testing::client::read(sent).await;
    Answer {
        status: reply.status.as_u16(),
        hostname: reply.header("x-echo-hostname").to_owned(),
        seen: serde_json::from_str(reply.header("x-echo-headers")).unwrap_or_default(),
        seen_uri: reply.header("x-echo-uri").to_owned(),
        headers: reply.headers,
    }
}

/// Whether `answer` meets `case`'s expectations (upstream's, and its declared-unchecked redirect
/// and rewritten path); `Err` says what did not hold.
fn check(test: &str, case: &Value, index: usize, answer: &Answer) -> Result<(), String> {
    let expect = &case["expect"];
    let request = &case["request"];
    if let Some(status) = expect["status"].as_u64()
        && u64::from(answer.status) != status
    {
        return Err(format!("status {} (wanted {status})", answer.status));
    }
    if let Some(backend) = expect["backend"].as_str()
        && !answer.hostname.starts_with(backend)
    {
        return Err(format!("answered by {:?} (wanted {backend})", answer.hostname));
    }
    for (name, wanted) in expect["request_headers"].as_object().into_iter().flatten() {
        let got = answer.seen.get(&name.to_ascii_lowercase()).map(|values| values.join(","));
        if got.as_deref() != wanted.as_str() {
            return Err(format!("request header {name}: {got:?} (wanted {wanted})"));
        }
    }
    for name in expect["absent_request_headers"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        if answer.seen.contains_key(&name.to_ascii_lowercase()) {
            return Err(format!("request header {name} should be absent"));
        }
    }
    for (name, wanted) in expect["response_headers"].as_object().into_iter().flatten() {
        let got = answer.headers.get_all(name.as_str()).iter().next_back().and_then(|v| v.to_str().ok());
        if got != wanted.as_str() {
            return Err(format!("response header {name}: {got:?} (wanted {wanted})"));
        }
    }
    for name in expect["absent_response_headers"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        if answer.headers.contains_key(name) {
            return Err(format!("response header {name} should be absent"));
        }
    }
    // Stricter than upstream: what the tests declare but do not compare.
    let unchecked = &case["declared_unchecked"];
    let named_rule_exception = test == "MeshHTTPRouteNamedRule" && index == 1;
    if let Some(path) = unchecked["request_path"].as_str()
        && !named_rule_exception
        && answer.seen_uri.split('?').next() != Some(path)
    {
        return Err(format!("the backend saw path {:?} (declared {path})", answer.seen_uri));
    }
    if let Some(redirect) = unchecked["redirect"].as_object() {
        let location = answer.headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let (scheme, rest) = location.split_once("://").unwrap_or(("", ""));
        let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().ok()),
            None => (authority, None),
        };
        let wanted_scheme = redirect.get("scheme").and_then(Value::as_str).unwrap_or("http");
        let wanted_path = redirect.get("path").and_then(Value::as_str).or(request["path"].as_str()).unwrap_or("/");
        // The declared port is a number or a string of one.
        let declared = redirect.get("port").and_then(|p| p.as_u64().or_else(|| p.as_str()?.parse().ok()));
        let port_ok = match declared {
            Some(wanted) => port.map(u64::from) == Some(wanted),
            None => port.is_none() || port == Some(if wanted_scheme == "https" { 443 } else { 80 }),
        };
        let host_ok = redirect.get("host").and_then(Value::as_str).is_none_or(|wanted| host == wanted);
        if scheme != wanted_scheme || !host_ok || !port_ok || path != wanted_path {
            return Err(format!("Location {location:?} (declared {redirect:?})"));
        }
    }
    Ok(())
}

/// Whether a batch's answers spread as `distribution` says.
fn distributed(answers: &[Answer], distribution: &Value) -> Result<(), String> {
    let total = distribution["total"].as_u64().unwrap_or(0) as usize;
    let parsed: Vec<&Answer> = answers.iter().filter(|a| !a.hostname.is_empty() || a.status != 0).collect();
    if parsed.len() != total {
        return Err(format!("{} answers parsed (wanted {total})", parsed.len()));
    }
    let weights: HashMap<String, f64> = serde_json::from_value(distribution["weights"].clone()).unwrap_or_default();
    let tolerance = distribution["tolerance"].as_f64().unwrap_or(0.05);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for answer in parsed {
        let parts: Vec<&str> = answer.hostname.split('-').collect();
        let backend = parts[..parts.len().saturating_sub(2)].join("-");
        if !weights.contains_key(&backend) {
            return Err(format!("answered by {:?}, not one of {weights:?}", answer.hostname));
        }
        *counts.entry(backend).or_default() += 1;
    }
    for (backend, weight) in &weights {
        let share = counts.get(backend).copied().unwrap_or(0) as f64 / total as f64;
        if (*weight > 0.0 && share == 0.0) || (share - weight).abs() > tolerance {
            return Err(format!(
                "{backend}: share {share:.3} (weight {weight}, tolerance {tolerance}); counts {counts:?}"
            ));
        }
    }
    Ok(())
}

/// Why a case is not replayed here, if it is not.
fn not_replayed(case: &Value) -> Option<&'static str> {
    let request = &case["request"];
    let address = request["address"].as_str().unwrap_or_default();
    let host = request["host"].as_str().unwrap_or_default();
    let named = request["headers"]["Host"].as_str().or(request["headers"]["host"].as_str());
    if address.starts_with("pod-ip:") {
        return Some("a request to a pod IP needs the client's connection captured");
    }
    let service =
        address.strip_prefix("service-ip:").and_then(|s| s.split('/').nth(1)).and_then(|s| s.split(':').next());
    if named.is_some_and(|named| Some(named.split(':').next().unwrap_or(named)) != service)
        || service.is_some_and(|s| !host.starts_with(s))
    {
        return Some("a ClusterIP carrying another Service's name needs the client's connection captured");
    }
    None
}

/// The manifests of `test` (its own, applied over the base), as one YAML text.
fn test_manifests(dir: &std::path::Path, test: &Value) -> String {
    let files = test["manifests"].as_array().into_iter().flatten().filter_map(Value::as_str);
    let texts: Vec<String> =
        files.filter_map(|file| std::fs::read_to_string(dir.join("manifests").join(file)).ok()).collect();
    texts.join("\n---\n")
}

/// Runs `attempt` until it passes three times in a row (100 ms after a failure), 30 s at most, as
/// upstream retries a case; the last outcome.
async fn three_in_a_row<F, Fut>(mut attempt: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut streak = 0;
    loop {
        let result = attempt().await;
        streak = if result.is_ok() { streak + 1 } else { 0 };
        if streak == 3 || Instant::now() > deadline {
            return result;
        }
        if result.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One test's outcome.
struct Tested {
    name: String,
    features: Vec<String>,
    passed: usize,
    replayed: usize,
    /// The cases not replayed, each with why.
    skipped: Vec<String>,
}

/// The name of the pod of Deployment `deployment` in `namespace`.
fn pod_name<'a>(pods: &'a [(PodSpec, SocketAddr)], namespace: &str, deployment: &'a str) -> &'a str {
    pods.iter()
        .find(|(p, _)| p.namespace == namespace && p.name.starts_with(deployment))
        .map_or(deployment, |(p, _)| p.name.as_str())
}

/// The proxy of client pod `pod` (a Deployment's name) of `namespace` on `plane`: node
/// `POD.NAMESPACE`, an outbound listener.
async fn client_pod(plane: &TestControlPlane, pods: &[(PodSpec, SocketAddr)], namespace: &str, pod: &str) -> TestProxy {
    let name = pod_name(pods, namespace, pod);
    let yaml = format!(
        "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n---\nresources:\n{}  - {{kind: Cluster, name: passthrough, original_destination: true}}\n",
        crate::listener("out", ", default_cluster: passthrough"),
    );
    let proxy = TestProxy::start_controlled(&yaml, &plane.url(), &format!("{name}.{namespace}"));
    proxy.wait_ready().await;
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gamma_mesh_conformance_cases_pass() {
    let Some(dir) = suite() else {
        println!("skipped: the GAMMA conformance suite is not at ../shared/conformance/gamma beside the checkout");
        return;
    };
    let base = documents(&std::fs::read_to_string(dir.join("manifests/base.yaml")).unwrap());
    let tests = documents(&std::fs::read_to_string(dir.join("cases.yaml")).unwrap());
    let tests: Vec<Value> = tests.into_iter().flat_map(|t| t.as_array().cloned().unwrap_or_else(|| vec![t])).collect();
    let mut servers = Vec::new();
    let mut pods = Vec::new();
    for pod in pod_specs(&base) {
        let server = HttpServer::with_handler(echo_handler(pod.name.clone())).await;
        pods.push((pod, server.address()));
        servers.push(server);
    }
    let (manifests, _) = manifests(&base, &pods);
    let plane = TestControlPlane::start(&[("base.yaml", &manifests)]);
    let mut clients: HashMap<(String, String), TestProxy> = HashMap::new();
    let mut results: Vec<Tested> = Vec::new();
    let mut failures = Vec::new();
    for test in &tests {
        let name = test["name"].as_str().unwrap_or_default().to_owned();
        let features: Vec<String> = serde_json::from_value(test["features"].clone()).unwrap_or_default();
        let own = test_manifests(&dir, test);
        plane.write("test.yaml", &own);
        let (mut passed, mut replayed, mut skipped) = (0, 0, Vec::new());
        for (index, case) in test["cases"].as_array().into_iter().flatten().enumerate() {
            if let Some(reason) = not_replayed(case) {
                skipped.push(format!("{name} / {}: {reason}", case["name"].as_str().unwrap_or_default()));
                continue;
            }
            replayed += 1;
            let from = &case["from"];
            let (namespace, pod) = (
                from["namespace"].as_str().unwrap_or("gateway-conformance-mesh").to_owned(),
                from["pod"].as_str().unwrap_or("echo-v1").to_owned(),
            );
            let key = (namespace.clone(), pod.clone());
            if let std::collections::hash_map::Entry::Vacant(entry) = clients.entry(key.clone()) {
                entry.insert(client_pod(&plane, &pods, &namespace, &pod).await);
            }
            let proxy = &clients[&key];
            let outcome = match case["expect"]["distribution"].as_object() {
                Some(_) => {
                    let count = case["request"]["count"].as_u64().unwrap_or(1) as usize;
                    let attempts = case["expect"]["distribution"]["attempts"].as_u64().unwrap_or(1);
                    let mut last = Err(String::new());
                    for _ in 0..attempts {
                        let mut answers = Vec::with_capacity(count);
                        for _ in 0..count {
                            answers.push(send(proxy, &case["request"]).await);
                        }
                        last = distributed(&answers, &case["expect"]["distribution"]);
                        if last.is_ok() {
                            break;
                        }
                    }
                    last
                }
                None => {
                    // Three passes in a row, 100 ms after a failure, 30 s at most.
                    three_in_a_row(|| async { check(&name, case, index, &send(proxy, &case["request"]).await) }).await
                }
            };
            match outcome {
                Ok(()) => passed += 1,
                Err(why) => failures.push(format!("{name} / {}: {why}", case["name"].as_str().unwrap_or_default())),
            }
        }
        plane.remove("test.yaml");
        results.push(Tested { name, features, passed, replayed, skipped });
    }
    println!("\n| test | features | cases passed |");
    println!("| --- | --- | --- |");
    for tested in &results {
        let note = match tested.skipped.len() {
            0 => String::new(),
            n => format!(" ({n} not replayed)"),
        };
        println!("| {} | {} | {}/{}{note} |", tested.name, tested.features.join(", "), tested.passed, tested.replayed);
    }
    let mut by_feature: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for tested in &results {
        for feature in &tested.features {
            let entry = by_feature.entry(feature.as_str()).or_default();
            entry.0 += tested.passed;
            entry.1 += tested.replayed;
        }
    }
    println!("\n| feature | cases passed |\n| --- | --- |");
    for (feature, (passed, replayed)) in &by_feature {
        println!("| {feature} | {passed}/{replayed} |");
    }
    let skipped: BTreeSet<&String> = results.iter().flat_map(|r| &r.skipped).collect();
    for reason in &skipped {
        println!("not replayed: {reason}");
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

/// The cases the loopback replay cannot make, replayed as root in network namespaces the test
/// creates: the client pod's namespace with `remora init`'s capture rules, its sidecar on the
/// built-in defaults (as uid 1337) and the control plane (its port excluded from capture), and the
/// echo pods in another namespace, each on an address of its own (port 8080). The client calls a
/// Service's ClusterIP naming another Service in its Host header, and a pod's address, as the
/// conformance client would: the sidecar takes both from the capture rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gamma_cases_that_need_a_captured_connection_pass() {
    use crate::netns::{self, Netns};
    let Some(dir) = suite() else {
        println!("skipped: the GAMMA conformance suite is not at ../shared/conformance/gamma beside the checkout");
        return;
    };
    if !netns::can_run("the GAMMA cases that need a captured connection") {
        return;
    }
    const CLIENT_IP: &str = "10.86.0.1";
    const CONTROL: &str = "10.86.0.1:15010";
    let base = documents(&std::fs::read_to_string(dir.join("manifests/base.yaml")).unwrap());
    let tests = documents(&std::fs::read_to_string(dir.join("cases.yaml")).unwrap());
    let tests: Vec<Value> = tests.into_iter().flat_map(|t| t.as_array().cloned().unwrap_or_else(|| vec![t])).collect();
    let client_ns = Netns::create("gc-client");
    let pods_ns = Netns::create("gc-pods");
    let [client_end, pods_end] = netns::link((&client_ns, "rgc", CLIENT_IP), (&pods_ns, "rgp", "10.86.0.2"));
    // The Services' addresses route out of the pod (no kube-proxy in its own namespace).
    client_ns.run("ip", &["route", "add", "10.96.0.0/16", "dev", &client_end]);
    let mut servers = Vec::new();
    let mut pods = Vec::new();
    for (i, pod) in pod_specs(&base).into_iter().enumerate() {
        let ip = format!("10.86.0.{}", 11 + i);
        pods_ns.run("ip", &["addr", "add", &format!("{ip}/24"), "dev", &pods_end]);
        let address: SocketAddr = format!("{ip}:8080").parse().unwrap();
        let socket = pods_ns.enter(move || std::net::TcpListener::bind(address).unwrap());
        servers.push(HttpServer::with_handler_on(socket, echo_handler(pod.name.clone())));
        pods.push((pod, address));
    }
    let (manifests, cluster_ips) = manifests(&base, &pods);
    // `{{pod_ip:NS/DEPLOYMENT}}`: the Deployment's pod's address.
    let pod_ips: HashMap<String, String> = pods
        .iter()
        .map(|(pod, address)| {
            let parts: Vec<&str> = pod.name.split('-').collect();
            let deployment = parts[..parts.len() - 2].join("-");
            (format!("{}/{deployment}", pod.namespace), address.ip().to_string())
        })
        .collect();

    let remora = env!("CARGO_BIN_EXE_remora");
    client_ns.run(remora, &["init", "--exclude-inbound-ports", "15010"]);
    let directory = netns::temp_dir("remora-gamma-capture");
    let mesh = directory.join("mesh");
    std::fs::create_dir_all(&mesh).unwrap();
    std::fs::set_permissions(&mesh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(mesh.join("base.yaml"), &manifests).unwrap();
    let control_log = directory.join("control.log");
    let _control = client_ns.spawn_proxy(
        &directory,
        &["control", "--config-dir", mesh.to_str().unwrap(), "--listen", CONTROL],
        &control_log,
    );
    let node = format!("{}.gateway-conformance-mesh", pod_name(&pods, "gateway-conformance-mesh", "echo-v1"));
    let sidecar_log = directory.join("sidecar.log");
    let _sidecar = client_ns.spawn_proxy(
        &directory,
        &["proxy", "--control", &format!("http://{CONTROL}"), "--node-id", &node],
        &sidecar_log,
    );
    let logs = || {
        let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
        format!("control plane:\n{}\nsidecar:\n{}", read(&control_log), read(&sidecar_log))
    };
    // The sidecar's outbound listener takes connections before any is captured to it.
    let listening = client_ns.enter(|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect("127.0.0.1:15001").is_err() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    });
    assert!(listening, "the sidecar did not start:\n{}", logs());

    let mut failures = Vec::new();
    let mut replayed = 0;
    for test in &tests {
        let name = test["name"].as_str().unwrap_or_default();
        let cases: Vec<(usize, &Value)> = test["cases"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, c)| not_replayed(c).is_some())
            .collect();
        if cases.is_empty() {
            continue;
        }
        let own = test_manifests(&dir, test);
        let staging = mesh.join(".test.yaml.new");
        std::fs::write(&staging, &own).unwrap();
        std::fs::rename(&staging, mesh.join("test.yaml")).unwrap();
        for (index, case) in cases {
            replayed += 1;
            let request = case["request"].clone();
            let address = request["address"].as_str().unwrap_or_default();
            let (kind, rest) = address.split_once(':').unwrap_or_default();
            let (target, port) = rest.rsplit_once(':').unwrap_or_default();
            let ip = if kind == "pod-ip" { &pod_ips[target] } else { &cluster_ips[target] };
            let target: SocketAddr = format!("{ip}:{port}").parse().unwrap();
            let outcome = three_in_a_row(|| {
                let (request, pod_ips) = (request.clone(), pod_ips.clone());
                let answer = client_ns.enter(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    runtime.block_on(async move {
                        let sending = tokio::time::timeout(Duration::from_secs(5), send_to(target, &request, &pod_ips));
                        sending.await.unwrap_or_default()
                    })
                });
                std::future::ready(check(name, case, index, &answer))
            })
            .await;
            if let Err(why) = outcome {
                failures.push(format!("{name} / {}: {why}", case["name"].as_str().unwrap_or_default()));
            }
        }
        std::fs::remove_file(mesh.join("test.yaml")).unwrap();
    }
    println!("cases replayed through the capture rules: {replayed}, failed: {}", failures.len());
    assert_eq!(replayed, 3, "the cases the loopback replay leaves out");
    assert!(failures.is_empty(), "{} cases failed:\n{}\n{}", failures.len(), failures.join("\n"), logs());
    let _ = std::fs::remove_dir_all(directory);
}
