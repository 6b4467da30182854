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
pub(crate) async fn https(address: std::net::SocketAddr, root: &str, method: &str, body: &[u8]) -> (u16, String) {
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
