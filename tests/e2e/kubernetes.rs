//! Kubernetes: `remora inject` over real-world manifests against golden files (and injecting its
//! own output again changes nothing), the output and `deploy/` checked against the Kubernetes
//! OpenAPI schemas offline (`kubernetes-validate`, from PyPI; skipped with a message without it),
//! and the admission webhook of `remora control --injector` in a real HTTPS AdmissionReview round
//! trip.
//!
//! The golden files are `tests/inject/NAME.golden.yaml` (native sidecar) and
//! `NAME.legacy.golden.yaml` (`--legacy-sidecar`); after a deliberate change to what is injected,
//! `REMORA_BLESS=1 cargo test --test e2e kubernetes` rewrites them, and the diff is the review.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use base64::Engine as _;
use remora_control_plane::inject::{InjectConfig, Injector};
use remora_control_plane::testing::certs::TestCa;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cli::Spawned;

const REMORA: &str = env!("CARGO_BIN_EXE_remora");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject")
}

/// How a fixture is injected: its golden file's suffix and the `remora inject` flags.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Native sidecar, no identity (`tests/inject/config.yaml`).
    Native,
    /// `--legacy-sidecar`.
    Legacy,
    /// Native, with workload identity from the CA (`tests/inject/identity-config.yaml`, whose CA
    /// root is `tests/inject/ca.crt`).
    Identity,
}

/// The fixtures, and the modes each is injected in.
const FIXTURES: [(&str, &[Mode]); 5] = [
    ("deployment", &[Mode::Native, Mode::Legacy, Mode::Identity]),
    ("statefulset", &[Mode::Native]),
    ("daemonset-host-network", &[Mode::Native]),
    ("jobs", &[Mode::Native, Mode::Legacy]),
    ("list", &[Mode::Native]),
];

/// Runs `remora inject` (in `tests/inject/`) with `mode`'s settings on `input` (stdin); stdout and
/// stderr.
fn inject(input: &str, mode: Mode) -> (String, String) {
    let args: &[&str] = match mode {
        Mode::Native => &["inject", "--config", "config.yaml"],
        Mode::Legacy => &["inject", "--config", "config.yaml", "--legacy-sidecar"],
        Mode::Identity => &["inject", "--config", "identity-config.yaml"],
    };
    let mut child = Command::new(REMORA)
        .args(args)
        .current_dir(fixtures())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "remora inject failed: {stderr}");
    (String::from_utf8(output.stdout).unwrap(), stderr)
}

fn golden_path(name: &str, mode: Mode) -> PathBuf {
    fixtures().join(match mode {
        Mode::Native => format!("{name}.golden.yaml"),
        Mode::Legacy => format!("{name}.legacy.golden.yaml"),
        Mode::Identity => format!("{name}.identity.golden.yaml"),
    })
}

/// Every golden output, with its mode.
fn goldens() -> Vec<(PathBuf, Mode)> {
    FIXTURES.iter().flat_map(|(name, modes)| modes.iter().map(|mode| (golden_path(name, *mode), *mode))).collect()
}

#[test]
fn injected_manifests_match_their_golden_files_and_injecting_again_changes_nothing() {
    let bless = std::env::var_os("REMORA_BLESS").is_some();
    for (path, mode) in goldens() {
        let name = path.file_name().unwrap().to_str().unwrap().split('.').next().unwrap().to_owned();
        let input = std::fs::read_to_string(fixtures().join(format!("{name}.yaml"))).unwrap();
        let (output, report) = inject(&input, mode);
        if bless {
            std::fs::write(&path, &output).unwrap();
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            output == golden,
            "{} differs from what `remora inject` prints now (REMORA_BLESS=1 accepts the new output):\n{output}\nreport:\n{report}",
            path.display()
        );
        let (again, report) = inject(&output, mode);
        assert_eq!(again, output, "injecting {} twice changed it", path.display());
        assert!(report.lines().all(|l| l.contains(" skipped: ")), "{report}");
    }
    // Documents needing no change are copied byte for byte, comments and all.
    let host = std::fs::read_to_string(fixtures().join("daemonset-host-network.yaml")).unwrap();
    let (output, report) = inject(&host, Mode::Native);
    assert_eq!(output, host);
    assert_eq!(report.trim(), "daemonset/node-exporter skipped: host network (capture rules would apply to the node)");
}

/// Runs `kubernetes-validate --strict` for Kubernetes `version` on `files`; None if it is not installed.
fn validate(version: &str, files: &[PathBuf]) -> Option<Result<String, String>> {
    let mut command = Command::new("python3");
    command.args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", version]).args(files);
    let output = command.output().ok()?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if text.contains("No module named kubernetes_validate") {
        return None;
    }
    Some(if output.status.success() && !text.contains("ERROR") { Ok(text) } else { Err(text) })
}

/// Writes `yaml`'s documents to a temporary file for validation, each `List` replaced by its items
/// (the schemas have no `List` kind).
fn without_lists(yaml: &str, directory: &Path, name: &str) -> PathBuf {
    let mut out = String::new();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(document).unwrap();
        let items = if value["kind"] == "List" { value["items"].as_array().unwrap().clone() } else { vec![value] };
        for item in items.iter().filter(|v| !v.is_null()) {
            out.push_str("---\n");
            out.push_str(&serde_yaml_ng::to_string(item).unwrap());
        }
    }
    let path = directory.join(name);
    std::fs::write(&path, out).unwrap();
    path
}

#[test]
fn injected_manifests_and_deploy_pass_the_kubernetes_schemas() {
    let directory = remora_proxy::testing::proxy::temp_dir("remora-schemas");
    let (mut native, mut legacy) = (Vec::new(), Vec::new());
    for (path, mode) in goldens() {
        let yaml = std::fs::read_to_string(&path).unwrap();
        let file = without_lists(&yaml, &directory, path.file_name().unwrap().to_str().unwrap());
        if mode == Mode::Legacy { legacy.push(file) } else { native.push(file) }
    }
    // deploy/: every manifest its kustomization lists, and (with kubectl) the kustomization built.
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let kustomization = std::fs::read_to_string(deploy.join("kustomization.yaml")).unwrap();
    let listed: Value = serde_yaml_ng::from_str(&kustomization).unwrap();
    let mut manifests: Vec<PathBuf> =
        listed["resources"].as_array().unwrap().iter().map(|r| deploy.join(r.as_str().unwrap())).collect();
    manifests.push(deploy.join("example/app.yaml"));
    match Command::new("kubectl").args(["kustomize", deploy.to_str().unwrap()]).output() {
        Ok(built) => {
            assert!(built.status.success(), "kubectl kustomize deploy: {}", String::from_utf8_lossy(&built.stderr));
            let path = directory.join("kustomized.yaml");
            std::fs::write(&path, &built.stdout).unwrap();
            manifests.push(path);
        }
        Err(error) => eprintln!("kubectl kustomize skipped: {error}"),
    }

    // The control plane's own inputs in deploy/ load: the mesh directory and the injector settings.
    let mesh = remora_control_plane::sources::directory::load(&deploy.join("mesh")).unwrap();
    remora_control_api::validate::validate(&mesh.resources).unwrap();
    // The injector's settings name the CA root the control plane mounts; point them at one here.
    let root = directory.join("ca.crt");
    std::fs::write(&root, TestCa::new("cluster.local").serving(&["localhost"]).ca).unwrap();
    let settings = std::fs::read_to_string(deploy.join("injector.yaml")).unwrap();
    assert!(settings.contains("/etc/remora/ca/ca.crt"), "{settings}");
    let settings = settings.replace("/etc/remora/ca/ca.crt", root.to_str().unwrap());
    let settings = InjectConfig::from_yaml(&settings).unwrap();
    assert!(settings.identity.unwrap().control_plane_ca.is_some());

    let Some(result) = validate("1.30.0", &native) else {
        eprintln!(
            "skipped the schema validation: kubernetes-validate is not installed (pip install kubernetes-validate)"
        );
        return;
    };
    result.unwrap_or_else(|e| panic!("native-sidecar output against Kubernetes 1.30: {e}"));
    // Legacy sidecars are for clusters before 1.29; native ones need a field 1.27 does not have.
    validate("1.27.0", &legacy)
        .unwrap()
        .unwrap_or_else(|e| panic!("legacy-sidecar output against Kubernetes 1.27: {e}"));
    let native_on_old = validate("1.27.0", &native[..1]).unwrap();
    assert!(native_on_old.is_err(), "the 1.27 schema should refuse a native sidecar's restartPolicy");
    validate("1.30.0", &manifests).unwrap().unwrap_or_else(|e| panic!("deploy/ against Kubernetes 1.30: {e}"));
    let _ = std::fs::remove_dir_all(directory);
}

/// POSTs (or sends `method`) `body` to the webhook at `address` over HTTPS, trusting `root`; the
/// status code and body.
async fn https(address: std::net::SocketAddr, root: &str, method: &str, body: &[u8]) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    let head = format!(
        "{method} /inject HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1).unwrap_or_default().parse().unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Applies the JSON patch operations the webhook writes (`add`, `remove`, `replace` of object fields).
fn apply_patch(document: &mut Value, operations: &[Value]) {
    for op in operations {
        let path = op["path"].as_str().unwrap();
        let (parent, key) = path.rsplit_once('/').unwrap();
        let key = key.replace("~1", "/").replace("~0", "~");
        let target = document.pointer_mut(parent).unwrap().as_object_mut().unwrap();
        match op["op"].as_str().unwrap() {
            "remove" => {
                target.shift_remove(&key).unwrap();
            }
            "add" | "replace" => {
                target.insert(key, op["value"].clone());
            }
            other => panic!("unexpected op {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_answers_an_admission_review_over_https_with_the_injection_as_a_patch() {
    let ca = TestCa::new("cluster.local");
    let serving = ca.serving(&["localhost"]);
    let directory = remora_proxy::testing::proxy::temp_dir("remora-webhook");
    let [cert, key, _] = serving.write(&directory);
    let mut control = Spawned::new(&[
        "control",
        "--listen",
        "127.0.0.1:0",
        "--injector",
        "--injector-listen",
        "127.0.0.1:0",
        "--injector-cert",
        cert.to_str().unwrap(),
        "--injector-key",
        key.to_str().unwrap(),
    ]);
    let line = control.wait_for("remora control serving the sidecar injector");
    let address: std::net::SocketAddr = line.rsplit("address=").next().unwrap().trim().parse().unwrap();
    let line = control.wait_for("remora control serving Delta ADS");
    let control_address = line.rsplit("address=").next().unwrap().trim().to_owned();

    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-5c9f7-", "namespace": "shop", "labels": {"app": "web"},
                     "annotations": {"remora.dev/exclude-outbound-ports": "5432"}},
        "spec": {"serviceAccountName": "web",
                 "containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 8080}],
                                 "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}}]}
    });
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "e911857d-c318-11e8-bbad-025000000001", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "shop",
                    "operation": "CREATE", "object": pod}
    });
    let (status, body) = https(address, &serving.ca, "POST", &serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], "e911857d-c318-11e8-bbad-025000000001");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD.decode(response["patch"].as_str().unwrap()).unwrap();
    let patch: Vec<Value> = serde_json::from_slice(&patch).unwrap();
    // The patched pod is the pod `remora inject` would print.
    let mut patched = pod.clone();
    apply_patch(&mut patched, &patch);
    let mut expected = pod.clone();
    Injector::new(InjectConfig::default(), false).inject_object(&mut expected, &mut Vec::new()).unwrap();
    assert_eq!(patched, expected);
    assert_eq!(patched["spec"]["initContainers"][1]["name"], "remora-proxy");
    let init_args: Vec<&str> =
        patched["spec"]["initContainers"][0]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(init_args, ["init", "--proxy-uid", "1337", "--exclude-outbound-ports", "5432"]);
    control.wait_for("admission review report=shop/pod/web-5c9f7-* injected");

    // The same pod again (already injected) passes unchanged; junk is a 400; GET is refused.
    let mut again = review.clone();
    again["request"]["object"] = patched;
    let (status, body) = https(address, &serving.ca, "POST", &serde_json::to_vec(&again).unwrap()).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    let (status, body) = https(address, &serving.ca, "POST", b"{\"kind\": \"AdmissionReview\"}").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = https(address, &serving.ca, "GET", b"").await;
    assert_eq!(status, 405);

    let metrics = reqwest_metrics(&control_address).await;
    for (result, count) in [("injected", 1), ("skipped", 1), ("invalid", 1)] {
        let series = format!("remora_control_injector_reviews_total{{result=\"{result}\"}} {count}");
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
}

/// The control plane's `/metrics`, over plain HTTP/1.1.
async fn reqwest_metrics(address: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    text
}

/// `args` followed by `extra`, for a command line.
fn and<'a>(extra: &'a [String], args: &[&'a str]) -> Vec<&'a str> {
    args.iter().copied().chain(extra.iter().map(String::as_str)).collect()
}

/// The token the control plane authenticates to the stand-in API server with.
const CONTROL_PLANE_TOKEN: &str = "control-plane-sa-token";
const WEBHOOK_PATH: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/remora-injector";

/// A stand-in for the parts of the Kubernetes API server the control plane uses (no kube-apiserver
/// can run here): HTTPS with a certificate from `ca`, answering as the real one does. 401 unless the
/// caller is the control plane; TokenReview with a review per token it knows; GET and PATCH (JSON
/// patch: `test` and `add`) of the `remora-injector` MutatingWebhookConfiguration, which starts as
/// `webhook`; EndpointSlices: the list, and watches from a resource version, streaming one
/// event per line; and the pods of namespace `shop`: a paged list (one pod a page) and a GET each
/// (the next `pod_failures` of those answered 503, as an overloaded API server does).
struct ApiServer {
    address: std::net::SocketAddr,
    /// Every request: method, path, whether authorized, content type and body (JSON).
    seen: Arc<std::sync::Mutex<Vec<Value>>>,
    webhook: Arc<std::sync::Mutex<Value>>,
    slices: Arc<std::sync::Mutex<Slices>>,
    /// The pods, by name.
    pods: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Value>>>,
    /// How many of the next GETs of one pod fail.
    pod_failures: Arc<std::sync::atomic::AtomicUsize>,
    /// The root its certificate chains to.
    root: String,
}

/// The stand-in's EndpointSlices: the objects, every event with its resource version, and the
/// open watches.
#[derive(Default)]
struct Slices {
    version: u64,
    objects: std::collections::BTreeMap<String, Value>,
    events: Vec<(u64, Value)>,
    watchers: Vec<tokio::sync::mpsc::UnboundedSender<bytes::Bytes>>,
}

impl Slices {
    /// Stores `object` (a new version of it) and tells the watches.
    fn put(&mut self, mut object: Value) {
        self.version += 1;
        object["metadata"]["resourceVersion"] = self.version.to_string().into();
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let kind = if self.objects.contains_key(&name) { "MODIFIED" } else { "ADDED" };
        self.objects.insert(name, object.clone());
        self.publish(json!({"type": kind, "object": object}));
    }

    fn delete(&mut self, name: &str) {
        self.version += 1;
        let mut object = self.objects.remove(name).unwrap();
        object["metadata"]["resourceVersion"] = self.version.to_string().into();
        self.publish(json!({"type": "DELETED", "object": object}));
    }

    fn publish(&mut self, event: Value) {
        let line = bytes::Bytes::from(format!("{event}\n"));
        self.events.push((self.version, event));
        self.watchers.retain(|watcher| watcher.send(line.clone()).is_ok());
    }
}

type AnyBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

fn whole(value: &Value) -> AnyBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes::Bytes::from(value.to_string())).boxed()
}

impl ApiServer {
    async fn start(ca: &TestCa, webhook: Value) -> ApiServer {
        let config = ca.server_config(&["127.0.0.1"]);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let webhook = Arc::new(std::sync::Mutex::new(webhook));
        let slices = Arc::new(std::sync::Mutex::new(Slices::default()));
        let pods = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        let pod_failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (log, state, all_slices, all_pods) = (seen.clone(), webhook.clone(), slices.clone(), pods.clone());
        let all_failures = pod_failures.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, log, state) = (acceptor.clone(), log.clone(), state.clone());
                let (slices, pods, failures) = (all_slices.clone(), all_pods.clone(), all_failures.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let (log, state, slices, pods) = (log.clone(), state.clone(), slices.clone(), pods.clone());
                        let failures = failures.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let header = |name: &str| {
                                request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
                            };
                            let authorized = header("authorization") == Some(format!("Bearer {CONTROL_PLANE_TOKEN}"));
                            let content_type = header("content-type");
                            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
                            let query = request.uri().query().unwrap_or_default().to_owned();
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            log.lock().unwrap().push(json!({"method": method.as_str(), "path": path, "query": query,
                                "authorized": authorized, "content_type": content_type, "body": body}));
                            let (status, answer) = if !authorized {
                                (401, whole(&json!({"kind": "Status", "reason": "Unauthorized", "code": 401})))
                            } else if path == "/apis/discovery.k8s.io/v1/endpointslices" {
                                (200, ApiServer::endpoint_slices(&query, &slices))
                            } else if path.starts_with("/api/v1/namespaces/")
                                && failures.fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1)).is_ok()
                            {
                                (503, whole(&json!({"kind": "Status", "reason": "ServiceUnavailable", "code": 503})))
                            } else if path.starts_with("/api/v1/") {
                                let (status, answer) = ApiServer::pods(&path, &query, &pods.lock().unwrap());
                                (status, whole(&answer))
                            } else {
                                let (status, answer) = ApiServer::answer(&method, &path, &body, &state);
                                (status, whole(&answer))
                            };
                            let mut response = http::Response::new(answer);
                            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        ApiServer { address, seen, webhook, slices, pods, pod_failures, root: ca.serving(&["127.0.0.1"]).ca }
    }

    /// Writes what a control plane needs to reach this server into `directory` (its root, the
    /// control plane's own token); the `--kubernetes-*` arguments naming them, and the token's file.
    fn control_plane_args(&self, directory: &Path) -> (Vec<String>, PathBuf) {
        let (ca_file, token_file) = (directory.join("kubernetes-ca.crt"), directory.join("control-plane.token"));
        std::fs::write(&ca_file, &self.root).unwrap();
        std::fs::write(&token_file, format!("{CONTROL_PLANE_TOKEN}\n")).unwrap();
        let path = |p: &Path| p.to_str().unwrap().to_owned();
        let args = ["--kubernetes-api".to_owned(), format!("https://{}", self.address)]
            .into_iter()
            .chain(["--kubernetes-ca".to_owned(), path(&ca_file), "--kubernetes-token".to_owned(), path(&token_file)])
            .collect();
        (args, token_file)
    }

    /// Starts `remora control --kubernetes-endpoints` against this server, serving from a directory
    /// in `directory` the cluster `web` (the Service shop/web's `http` port, with `cluster_fields`
    /// added), a route table to it and the listener `listener`; waits until it has listed the
    /// slices and serves. The process, its "EndpointSlices listed" line, and the URL proxies dial.
    fn endpoints_control_plane(
        &self,
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
        let (kubernetes, _) = self.control_plane_args(directory);
        let mut control = Spawned::new(&and(
            &kubernetes,
            &["control", "--listen", "127.0.0.1:0", "--config-dir", mesh.to_str().unwrap(), "--kubernetes-endpoints"],
        ));
        let listed = control.wait_for("EndpointSlices listed");
        let line = control.wait_for("remora control serving Delta ADS");
        let address = format!("http://{}", line.rsplit("address=").next().unwrap().trim());
        (control, listed, address)
    }

    /// The EndpointSlice list, or (with `watch=1`) a watch from the query's resource version.
    fn endpoint_slices(query: &str, slices: &std::sync::Mutex<Slices>) -> AnyBody {
        use http_body_util::BodyExt;
        let mut slices = slices.lock().unwrap();
        if !query.split('&').any(|pair| pair == "watch=1") {
            let items: Vec<Value> = slices.objects.values().cloned().collect();
            let version = slices.version.to_string();
            return whole(
                &json!({"kind": "EndpointSliceList", "metadata": {"resourceVersion": version}, "items": items}),
            );
        }
        let from: u64 = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        for (_, event) in slices.events.iter().filter(|(version, _)| *version > from) {
            let _ = sender.send(bytes::Bytes::from(format!("{event}\n")));
        }
        slices.watchers.push(sender);
        let frames = futures_util::stream::unfold(receiver, |mut receiver| async move {
            let line = receiver.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(line)), receiver))
        });
        http_body_util::StreamBody::new(frames).boxed()
    }

    /// The pod list, one pod a page, the next page's token (`page/N=`) needing escaping in a query;
    /// or one pod.
    fn pods(path: &str, query: &str, pods: &std::collections::BTreeMap<String, Value>) -> (u16, Value) {
        if path == "/api/v1/pods" {
            let page: usize = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("continue=page%2F"))
                .and_then(|rest| rest.strip_suffix("%3D")?.parse().ok())
                .unwrap_or(0);
            let mut metadata = json!({"resourceVersion": "1"});
            if page + 1 < pods.len() {
                metadata["continue"] = format!("page/{}=", page + 1).into();
            }
            let items: Vec<&Value> = pods.values().skip(page).take(1).collect();
            return (200, json!({"kind": "PodList", "metadata": metadata, "items": items}));
        }
        match path.strip_prefix("/api/v1/namespaces/shop/pods/").and_then(|name| pods.get(name)) {
            Some(pod) => (200, pod.clone()),
            None => (404, json!({"kind": "Status", "reason": "NotFound", "code": 404})),
        }
    }

    fn answer(method: &http::Method, path: &str, body: &Value, webhook: &std::sync::Mutex<Value>) -> (u16, Value) {
        match (method.as_str(), path) {
            ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
                let user = match body["spec"]["token"].as_str() {
                    Some(token) if token.starts_with("projected-token-of-shop-web") => {
                        Some("system:serviceaccount:shop:web")
                    }
                    _ => None,
                };
                let status = match user {
                    Some(user) => json!({"authenticated": true, "audiences": body["spec"]["audiences"],
                                         "user": {"username": user, "groups": ["system:serviceaccounts"]}}),
                    None => json!({"authenticated": false, "error": "invalid bearer token"}),
                };
                (201, json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}))
            }
            ("GET", WEBHOOK_PATH) => (200, webhook.lock().unwrap().clone()),
            ("PATCH", WEBHOOK_PATH) => {
                let mut patched = webhook.lock().unwrap().clone();
                for op in body.as_array().unwrap() {
                    let path = op["path"].as_str().unwrap();
                    match op["op"].as_str().unwrap() {
                        "test" if patched.pointer(path) == Some(&op["value"]) => {}
                        "test" => return (422, json!({"kind": "Status", "reason": "Invalid", "code": 422})),
                        "add" => {
                            let (parent, key) = path.rsplit_once('/').unwrap();
                            let parent = patched.pointer_mut(parent).unwrap().as_object_mut().unwrap();
                            parent.insert(key.to_owned(), op["value"].clone());
                        }
                        other => panic!("unexpected op {other}"),
                    }
                }
                *webhook.lock().unwrap() = patched.clone();
                (200, patched)
            }
            _ => (404, json!({"kind": "Status", "reason": "NotFound", "code": 404})),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_issues_a_service_account_its_own_identity_after_a_token_review() {
    use remora_control_api::ca::certificate_request;
    use remora_control_api::ca::{ClientError, sign};
    use remora_control_api::identity::SpiffeId;

    let cluster_ca = TestCa::new("cluster.local");
    let api = ApiServer::start(&cluster_ca, Value::Null).await;
    let directory = remora_proxy::testing::proxy::temp_dir("remora-tokenreview");
    let (kubernetes, own_token) = api.control_plane_args(&directory);
    let mut control = Spawned::new(&and(
        &kubernetes,
        &[
            "control",
            "--listen",
            "127.0.0.1:0",
            "--ca-dir",
            directory.join("ca").to_str().unwrap(),
            "--ca-kubernetes",
            "--tls-name",
            "127.0.0.1",
            "--injector",
            "--injector-listen",
            "127.0.0.1:0",
            "--injector-name",
            "localhost",
        ],
    ));
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
    // Each review went to TokenReview as the control plane, for the CA's audience; the second
    // request with the accepted token was answered from memory.
    let seen = api.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for review in &seen {
        assert_eq!(review["path"], "/apis/authentication.k8s.io/v1/tokenreviews");
        assert_eq!(review["authorized"], true);
        assert_eq!(review["body"]["kind"], "TokenReview");
        assert_eq!(review["body"]["spec"]["audiences"], json!(["remora"]));
    }

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
    // proxy retries later. One it accepted moments ago is still honoured.
    std::fs::write(&own_token, "a-revoked-control-plane-token\n").unwrap();
    assert_eq!(
        refused(ask("spiffe://cluster.local/ns/shop/sa/web", "projected-token-of-shop-web-renewed").await),
        tonic::Code::Unavailable
    );
    assert!(ask("spiffe://cluster.local/ns/shop/sa/web", "projected-token-of-shop-web").await.is_ok());
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
    let api = ApiServer::start(&cluster_ca, deployed).await;
    let directory = remora_proxy::testing::proxy::temp_dir("remora-ca-bundle");
    let (kubernetes, _) = api.control_plane_args(&directory);
    let mut control = Spawned::new(&and(
        &kubernetes,
        &[
            "control",
            "--listen",
            "127.0.0.1:0",
            "--ca-dir",
            directory.join("ca").to_str().unwrap(),
            "--ca-kubernetes",
            "--tls-name",
            "127.0.0.1",
            "--serving-cert-ttl",
            "4",
            "--injector",
            "--injector-listen",
            "127.0.0.1:0",
            "--injector-name",
            "localhost",
            "--injector-webhook",
            "remora-injector",
        ],
    ));
    let line = control.wait_for("remora control serving Delta ADS");
    let port: std::net::SocketAddr = line.rsplit("address=").next().unwrap().trim().parse().unwrap();
    let line = control.wait_for("remora control serving the sidecar injector");
    let injector: std::net::SocketAddr = line.rsplit("address=").next().unwrap().trim().parse().unwrap();
    let mesh_root = std::fs::read_to_string(directory.join("ca/ca.crt")).unwrap();

    // The caBundle: patched in, guarded by the webhook's name, as the control plane.
    control.wait_for("webhook caBundle set to the CA root");
    let webhook = api.webhook.lock().unwrap().clone();
    let bundle = base64::engine::general_purpose::STANDARD.encode(&mesh_root);
    assert_eq!(webhook["webhooks"][0]["clientConfig"]["caBundle"], bundle.as_str());
    assert_eq!(webhook["webhooks"][0]["clientConfig"]["service"]["name"], "remora-injector", "the rest is kept");
    let seen = api.seen.lock().unwrap().clone();
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
    let api = ApiServer::start(&cluster_ca, Value::Null).await;
    let ready = || json!({"ready": true, "serving": true, "terminating": false});
    {
        let mut slices = api.slices.lock().unwrap();
        slices.put(endpoint_slice("web-a", a.address().port(), ready()));
        slices.put(endpoint_slice("web-b", b.address().port(), ready()));
    }
    let directory = remora_proxy::testing::proxy::temp_dir("remora-endpoint-slices");
    let (_control, _, address) = api.endpoints_control_plane(&directory, "", "in");
    let proxy = TestProxy::start_controlled("", &address, "slices");
    proxy.wait_ready().await;
    let listener = proxy.address("in");
    let seen = served_by(listener, 40).await;
    assert_eq!((seen.get("a"), seen.get("b")), (Some(&20), Some(&20)), "{seen:?}");

    // b's pod is terminating: it drains, a takes every new request.
    api.slices.lock().unwrap().put(endpoint_slice(
        "web-b",
        b.address().port(),
        json!({"ready": false, "serving": true, "terminating": true}),
    ));
    eventually("b drains", Duration::from_secs(5), || async { served_by(listener, 10).await.keys().eq(["a"]) }).await;
    let (_, clusters) = proxy.admin_get("/clusters").await;
    assert!(clusters.contains("\"draining\""), "{clusters}");

    // b's slice goes and c's comes: the watch carries both.
    {
        let mut slices = api.slices.lock().unwrap();
        slices.delete("web-b");
        slices.put(endpoint_slice("web-c", c.address().port(), ready()));
    }
    eventually("c joins", Duration::from_secs(5), || async { served_by(listener, 10).await.keys().eq(["a", "c"]) })
        .await;
    let seen = api.seen.lock().unwrap().clone();
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
/// of it passes): the pods are listed (page by page) after the slices, and a pod a watch event
/// brings in is read on its own, and read again, with no further slice change, when the API
/// server failed to answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_endpoints_are_checked_against_their_pods_service_accounts() {
    use remora_proxy::testing::{HttpServer, TestProxy, eventually};

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    let mesh_ca = TestCa::new("cluster.local");
    let directory = remora_proxy::testing::proxy::temp_dir("remora-pod-identities");
    let (a, b, c) = (HttpServer::start("a").await, HttpServer::start("b").await, HttpServer::start("c").await);
    let sidecar_a = inbound_sidecar(&mesh_ca, WEB, a.address(), &directory.join("a"));
    // b's pod runs as `web`, but what answers at its address holds another identity.
    let impostor =
        inbound_sidecar(&mesh_ca, "spiffe://cluster.local/ns/shop/sa/impostor", b.address(), &directory.join("b"));
    let sidecar_c = inbound_sidecar(&mesh_ca, WEB, c.address(), &directory.join("c"));
    for sidecar in [&sidecar_a, &impostor, &sidecar_c] {
        sidecar.wait_ready().await;
    }

    let api = ApiServer::start(&TestCa::new("cluster.local"), Value::Null).await;
    let ready = || json!({"ready": true});
    {
        let mut pods = api.pods.lock().unwrap();
        pods.insert("web-a".into(), pod("web-a", "web"));
        pods.insert("web-b".into(), pod("web-b", "web"));
        pods.insert("db-0".into(), pod("db-0", "db"));
        let mut slices = api.slices.lock().unwrap();
        slices.put(endpoint_slice_of("web-a", sidecar_a.address("in").port(), ready(), pod_ref("web-a")));
        slices.put(endpoint_slice_of("web-b", impostor.address("in").port(), ready(), pod_ref("web-b")));
    }
    let (_control, listed, address) = api.endpoints_control_plane(&directory, ", tls: mesh", "out");
    assert!(listed.contains("pods=2"), "the pods the slices name, from a list of every pod: {listed}");
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

    // A new pod arrives with its slice: the control plane reads that pod (the first two reads
    // failing) and c takes traffic.
    api.pods.lock().unwrap().insert("web-c".into(), pod("web-c", "web"));
    api.pod_failures.store(2, SeqCst);
    api.slices.lock().unwrap().delete("web-b");
    api.slices.lock().unwrap().put(endpoint_slice_of(
        "web-c",
        sidecar_c.address("in").port(),
        ready(),
        pod_ref("web-c"),
    ));
    eventually("c joins", Duration::from_secs(5), || async { served_by(out, 10).await.keys().eq(["a", "c"]) }).await;
    eventually("both endpoints carry their pod's identity", Duration::from_secs(15), || async {
        client.config_dump().await.to_string().matches(WEB).count() >= 2
    })
    .await;
    assert_eq!(api.pod_failures.load(SeqCst), 0, "both failed reads were made");
    let requests = api.seen.lock().unwrap().clone();
    let paths: Vec<String> =
        requests.iter().map(|r| format!("{} {}", r["path"].as_str().unwrap(), r["query"].as_str().unwrap())).collect();
    assert!(paths.iter().any(|p| p.starts_with("/api/v1/pods ") && p.contains("continue=page%2F2%3D")), "{paths:?}");
    let reads = paths.iter().filter(|p| p.starts_with("/api/v1/namespaces/shop/pods/web-c")).count();
    assert_eq!(reads, 3, "web-c read until it answered: {paths:?}");
    let _ = std::fs::remove_dir_all(directory);
}
