//! Fixtures for tests and benches (feature `testing`): a control plane on its own thread, a bare
//! Delta-ADS client, and an etcd to register in.
//!
//! - [`TestControlPlane`] serves a temporary directory on `127.0.0.1:0`; files can be written and
//!   removed while it runs, and it can be stopped and restarted on the same address.
//! - [`GenericClient`] speaks Delta ADS with nothing but the types generated from Envoy's
//!   `discovery.proto`: what any xDS client sees.
//! - [`TestCa`] makes certificates in the test with the control plane's own CA: workload
//!   certificates (written to files for the proxies' static-files identity), serving certificates,
//!   and a raw mTLS client for poking at an inbound listener directly.
//! - [`TestApiServer`] stands in for the Kubernetes API server: list/watch as the real one
//!   speaks it, TokenReview, the webhook configuration.
//! - [`TestEtcd`] is the etcd named by `REMORA_TEST_ETCD` (CI starts one), or a fresh `etcd` process
//!   on free ports if the binary is installed; tests skip, saying why, when there is neither.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod api_server;
pub mod certs;

pub use api_server::TestApiServer;
pub use certs::{IssuedPem, TestCa};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::plane::{ControlConfig, ControlPlane};
use remora_control_api::pb::envoy::config::core::v3::Node;
use remora_control_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use remora_control_api::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use remora_control_api::pb::google::rpc::Status;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty directory under the system's temporary directory.
pub fn fresh_dir(prefix: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running control plane serving a temporary directory.
pub struct TestControlPlane {
    dir: PathBuf,
    config: ControlConfig,
    address: SocketAddr,
    running: Option<Running>,
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
    metrics: std::sync::Arc<crate::metrics::ControlMetrics>,
}

impl TestControlPlane {
    /// Writes `files` (name, YAML) into a fresh directory and serves it.
    pub fn start(files: &[(&str, &str)]) -> TestControlPlane {
        TestControlPlane::start_with(files, None, crate::sources::registry::DEFAULT_PREFIX)
    }

    /// Like [`TestControlPlane::start`], following the registry in `etcd` under `prefix` too.
    pub fn start_with(files: &[(&str, &str)], etcd: Option<&str>, prefix: &str) -> TestControlPlane {
        let dir = fresh_dir("remora-control");
        for (name, yaml) in files {
            std::fs::write(dir.join(name), yaml).unwrap();
        }
        let config = ControlConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            config_dir: Some(dir.clone()),
            etcd: etcd.map(str::to_owned),
            etcd_prefix: prefix.to_owned(),
            ..ControlConfig::default()
        };
        let mut plane = TestControlPlane { dir, config, address: "127.0.0.1:0".parse().unwrap(), running: None };
        plane.run();
        plane.config.listen = plane.address;
        plane
    }

    /// Like [`TestControlPlane::start`], making the automatic mesh with `settings`.
    pub fn start_with_mesh(files: &[(&str, &str)], settings: crate::mesh::Settings) -> TestControlPlane {
        let mut plane = TestControlPlane::start(files);
        plane.stop();
        plane.config.mesh = settings;
        plane.run();
        plane
    }

    /// Like [`TestControlPlane::start`], following the cluster's objects through `kubernetes` too,
    /// meshing its Services when `automatic_mesh`.
    pub fn start_with_kubernetes(
        files: &[(&str, &str)],
        kubernetes: crate::kubernetes::KubernetesApi,
        automatic_mesh: bool,
    ) -> TestControlPlane {
        let mut plane = TestControlPlane::start(files);
        plane.stop();
        plane.config.kubernetes = Some(kubernetes);
        plane.config.kubernetes_objects = Some(crate::plane::KubernetesObjects { automatic_mesh });
        plane.run();
        plane
    }

    /// Like [`TestControlPlane::start`], running the CA too: its root generated in the directory's
    /// `ca/`, signing for `trust_domain` what the `tokens` file's lines grant.
    pub fn start_with_ca(files: &[(&str, &str)], trust_domain: &str, tokens: &str) -> TestControlPlane {
        let mut plane = TestControlPlane::start(files);
        plane.stop();
        let ca_dir = plane.dir.join("ca");
        std::fs::create_dir_all(&ca_dir).unwrap();
        let tokens_file = ca_dir.join("tokens");
        std::fs::write(&tokens_file, tokens).unwrap();
        plane.config.ca = Some(crate::plane::CaConfig {
            root: crate::plane::CaRoot::Directory(ca_dir),
            trust_domain: trust_domain.to_owned(),
            tokens: Some(tokens_file),
            token_audience: None,
            authenticate_xds: false,
            extra_roots: None,
            max_ttl: crate::ca::DEFAULT_MAX_TTL,
            tls_names: Vec::new(),
        });
        plane.run();
        plane
    }

    /// Like [`TestControlPlane::start_with_ca`], serving its port over TLS with a certificate from
    /// its CA for `127.0.0.1` (proxies then use [`TestControlPlane::https_url`] and
    /// [`TestControlPlane::ca_root_file`]).
    pub fn start_with_ca_tls(files: &[(&str, &str)], trust_domain: &str, tokens: &str) -> TestControlPlane {
        let mut plane = TestControlPlane::start_with_ca(files, trust_domain, tokens);
        plane.stop();
        if let Some(ca) = &mut plane.config.ca {
            ca.tls_names = vec!["127.0.0.1".into(), "localhost".into()];
        }
        plane.run();
        plane
    }

    /// Restarts it (on the same address) handing out `roots` (a PEM file) in every trust bundle
    /// beside its own root, as in a root rotation.
    pub fn trust_extra_roots(&mut self, roots: &Path) {
        self.stop();
        if let Some(ca) = &mut self.config.ca {
            ca.extra_roots = Some(roots.to_owned());
        }
        self.run();
    }

    /// Restarts it (on the same address) serving discovery streams only to proxies whose stream
    /// carries a token its CA accepts.
    pub fn require_xds_tokens(&mut self) {
        self.stop();
        if let Some(ca) = &mut self.config.ca {
            ca.authenticate_xds = true;
        }
        self.run();
    }

    /// The https:// URL proxies connect to when it serves TLS.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.address)
    }

    /// The CA's root certificate file.
    pub fn ca_root_file(&self) -> PathBuf {
        self.dir.join("ca").join("ca.crt")
    }

    /// The CA's root certificate (PEM), once `start_with_ca` has generated it.
    pub fn ca_root_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca").join("ca.crt")).unwrap_or_default()
    }

    fn run(&mut self) {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = self.config.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                let plane = ControlPlane::start(config).await.unwrap();
                ready_tx.send((plane.address(), plane.metrics().clone())).unwrap();
                let _ = stopped.await;
                drop(plane);
            });
        });
        let (address, metrics) = ready_rx.recv().expect("the control plane did not start");
        self.address = address;
        self.running = Some(Running { stop, thread, metrics });
    }

    /// The URL proxies connect to.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The address it serves on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The directory it serves.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Replaces (or creates) a file atomically, as a git checkout or deploy tool does.
    pub fn write(&self, name: &str, yaml: &str) {
        let staging = self.dir.join(format!(".{name}.new"));
        std::fs::write(&staging, yaml).unwrap();
        std::fs::rename(&staging, self.dir.join(name)).unwrap();
    }

    /// Deletes a file.
    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).unwrap();
    }

    /// Stops serving: streams break, the port closes.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(());
            running.thread.join().unwrap();
        }
    }

    /// Starts again on the same address, from the directory as it is now.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// The value of the metric line starting with `series`, or 0.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.running.as_ref().map(|r| r.metrics.encode()).unwrap_or_default();
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for TestControlPlane {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Delta-ADS client built from Envoy's discovery types alone.
pub struct GenericClient {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

impl GenericClient {
    /// Opens a stream as `node` and subscribes (wildcard) to each type URL, with the versions held.
    pub async fn connect(url: &str, node: &str, subscriptions: &[(&str, HashMap<String, String>)]) -> GenericClient {
        let (tx, rx) = mpsc::channel(64);
        for (i, (type_url, initial)) in subscriptions.iter().enumerate() {
            tx.send(DeltaDiscoveryRequest {
                node: (i == 0).then(|| Node { id: node.to_owned(), ..Default::default() }),
                type_url: (*type_url).to_owned(),
                resource_names_subscribe: vec!["*".into()],
                initial_resource_versions: initial.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let mut client = AggregatedDiscoveryServiceClient::connect(url.to_owned()).await.unwrap();
        let responses = client.delta_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
        GenericClient { requests: tx, responses }
    }

    /// The next response; panics after 10 s.
    pub async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.responses.message())
            .await
            .expect("no response within 10 s")
            .unwrap()
            .expect("the stream ended")
    }

    /// The next response, if one arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<DeltaDiscoveryResponse> {
        tokio::time::timeout(wait, self.responses.message()).await.ok().map(|r| r.unwrap().expect("the stream ended"))
    }

    /// ACKs `response`.
    pub async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.answer(response, None).await;
    }

    /// NACKs `response` with `message`.
    pub async fn nack(&self, response: &DeltaDiscoveryResponse, message: &str) {
        self.answer(response, Some(message)).await;
    }

    async fn answer(&self, response: &DeltaDiscoveryResponse, error: Option<&str>) {
        self.requests
            .send(DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                error_detail: error.map(|m| Status { code: 3, message: m.to_owned(), details: Vec::new() }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// An etcd to test against.
pub struct TestEtcd {
    url: String,
    child: Option<std::process::Child>,
    dir: Option<PathBuf>,
}

impl TestEtcd {
    /// `REMORA_TEST_ETCD` if set, else a fresh `etcd` process; `None` (with the reason printed) if
    /// neither is available.
    pub async fn start() -> Option<TestEtcd> {
        if let Ok(url) = std::env::var("REMORA_TEST_ETCD") {
            return Some(TestEtcd { url, child: None, dir: None });
        }
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (client, peer) = (free(), free());
        let dir = fresh_dir("remora-etcd");
        let child = std::process::Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &format!("test=http://{peer}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                eprintln!("skipping: no etcd (REMORA_TEST_ETCD unset and `etcd` not runnable: {e})");
                let _ = std::fs::remove_dir_all(&dir);
                return None;
            }
        };
        let etcd = TestEtcd { url: format!("http://{client}"), child: Some(child), dir: Some(dir) };
        for _ in 0..200 {
            if let Ok(client) = crate::sources::etcd::Etcd::connect(&etcd.url).await
                && client.range_prefix("/").await.is_ok()
            {
                return Some(etcd);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd did not start at {}", etcd.url);
    }

    /// Its client URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A key prefix no other test uses.
    pub fn prefix(&self) -> String {
        format!("/remora-test/{}-{}/", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst))
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
