//! `remora control`: the control plane, composed.
//!
//! Resources come in from the sources — a GitOps [`directory`] of YAML files, the etcd
//! [`registry`] of workload endpoints, the cluster's objects ([`cluster`]) — and are merged into one
//! set by `compose` (a cluster defined anywhere always has an `Endpoints` resource, empty if nothing
//! fills it, so proxies know it is complete). The set goes to the ADS
//! [`Publisher`](crate::ads::Publisher), and the [`AdsServer`](crate::ads::AdsServer) streams the
//! differences to every proxy.
//!
//! One port (default 127.0.0.1:15010) serves gRPC (Delta ADS) and plain HTTP for operators:
//! `/metrics`, `/ready`, `/live`, and `/config_dump` (the served set: versions, and the last source
//! error if the directory is broken now).
//!
//! Directory changes are debounced (`directory::SETTLE_TIME`); registry changes are published at once.
//! A directory change that fails to load (a file that does not parse) is logged and counted, and the
//! previous set keeps serving. Resources that load but break a rule (a bad regex, say) are logged
//! here and still published: the proxies are the judges of what they can run, and each NACKs it,
//! naming the field, which shows in their `/config_dump` and in this server's `nacks` metric.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Response, StatusCode};
use http_body_util::Full;
use remora_control_api::watch::FileWatch;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::ads::AdsServer;
use crate::ca::Authority;
use crate::ca::auth::{Authenticators, LocalTokens};
use crate::ca::kubernetes::TokenReview;
use crate::ca::service::CaService;
use crate::compose::Sources;
use crate::inject::{Injector, ca_bundle, webhook};
use crate::kubernetes;
pub use crate::kubernetes::KubernetesApi;
use crate::mesh;
use crate::metrics::ControlMetrics;
use crate::sources::{cluster, directory, registry, route_status};
use crate::tls;

/// The lifetime of the control plane's own serving certificates, unless told otherwise.
pub const DEFAULT_SERVING_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long start-up waits for the first read of the registry before serving without it.
const REGISTRY_START_WAIT: Duration = Duration::from_secs(5);

/// What `remora control` runs with.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// The gRPC (and operator HTTP) address.
    pub listen: SocketAddr,
    /// The GitOps directory, if any.
    pub config_dir: Option<PathBuf>,
    /// The etcd URL of the service registry, if any.
    pub etcd: Option<String>,
    /// The registry's key prefix.
    pub etcd_prefix: String,
    /// The certificate authority, if this control plane signs workload certificates.
    pub ca: Option<CaConfig>,
    /// The sidecar injector's admission webhook, if this control plane serves it.
    pub injector: Option<InjectorConfig>,
    /// How to reach the Kubernetes API server (for TokenReviews, the webhook's caBundle and the
    /// cluster's objects), if anything needs it.
    pub kubernetes: Option<KubernetesApi>,
    /// Follow the cluster's Services, EndpointSlices, Pods and Namespaces (needs `kubernetes`).
    pub kubernetes_objects: Option<KubernetesObjects>,
    /// How the automatic mesh names what it makes of the Kubernetes objects in the directory.
    pub mesh: mesh::Settings,
    /// The lifetime of the serving certificates the CA issues the control plane (its port's, the
    /// injector's); each is renewed at half of it.
    pub serving_cert_ttl: Duration,
}

/// What the cluster's objects are for (their endpoints' identities are in `mesh.trust_domain`).
#[derive(Clone, Debug)]
pub struct KubernetesObjects {
    /// Mesh every Service automatically (else its EndpointSlices only fill the clusters that name
    /// a `kubernetes_service`).
    pub automatic_mesh: bool,
}

/// The admission webhook's settings: its own HTTPS port, certificate, and what it injects.
#[derive(Clone, Debug)]
pub struct InjectorConfig {
    /// Where it listens (the webhook Service's target port).
    pub listen: SocketAddr,
    /// Its serving certificate (the webhook configuration's `caBundle` must hold its root).
    pub tls: InjectorTls,
    /// What it injects.
    pub injector: Injector,
    /// The `MutatingWebhookConfiguration` whose webhooks' `caBundle` the control plane keeps equal
    /// to the CA root (`inject::ca_bundle`; needs the CA-issued certificate and `kubernetes`).
    pub webhook: Option<String>,
}

/// Where the injector's serving certificate comes from.
#[derive(Clone, Debug)]
pub enum InjectorTls {
    /// PEM files: a chain and its key (a `kubernetes.io/tls` Secret).
    Files {
        /// The chain.
        cert: PathBuf,
        /// The key.
        key: PathBuf,
    },
    /// A certificate the control plane's own CA issues at start for these DNS names (the webhook
    /// Service's, `remora-injector.remora-system.svc`), so `caBundle` is the mesh CA's root.
    Ca {
        /// The names.
        names: Vec<String>,
    },
}

/// The CA's settings: where its root is, for which trust domain it signs, and who may ask.
#[derive(Clone, Debug)]
pub struct CaConfig {
    /// Where the root comes from.
    pub root: CaRoot,
    /// The trust domain of every ID it signs.
    pub trust_domain: String,
    /// The bootstrap tokens file (`ca::auth::LocalTokens`), if any.
    pub tokens: Option<PathBuf>,
    /// Accept Kubernetes service-account tokens issued for this audience, checked by TokenReview
    /// (needs `ControlConfig::kubernetes`).
    pub token_audience: Option<String>,
    /// The longest lifetime it signs.
    pub max_ttl: Duration,
    /// Serve the control plane's port over TLS, with a certificate from this CA for these names
    /// (DNS names or IP addresses). Empty: plaintext.
    pub tls_names: Vec<String>,
    /// Serve discovery streams only to proxies whose stream carries a token these authenticators
    /// accept (the token they ask the CA with).
    pub authenticate_xds: bool,
    /// A PEM file of roots the trust bundle carries besides the CA's own (a root rotation's
    /// other root).
    pub extra_roots: Option<PathBuf>,
}

/// Where the CA's root key and certificate are.
#[derive(Clone, Debug)]
pub enum CaRoot {
    /// A directory holding `ca.crt` and `ca.key`, generated there on first start.
    Directory(PathBuf),
    /// Given files: the certificate and its key.
    Files {
        /// PEM CA certificate.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 15010)),
            config_dir: None,
            etcd: None,
            etcd_prefix: registry::DEFAULT_PREFIX.to_owned(),
            ca: None,
            injector: None,
            kubernetes: None,
            kubernetes_objects: None,
            mesh: mesh::Settings::default(),
            serving_cert_ttl: DEFAULT_SERVING_CERT_TTL,
        }
    }
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The directory could not be loaded at start-up.
    #[error("config directory: {0}")]
    Directory(#[from] directory::DirectoryError),
    /// The CA's root or tokens could not be loaded.
    #[error("certificate authority: {0}")]
    Ca(String),
    /// The runtime or signal handlers could not be set up.
    #[error("start: {0}")]
    Runtime(std::io::Error),
    /// The injector's certificate could not be loaded.
    #[error("injector: {0}")]
    Injector(String),
    /// The Kubernetes client could not be set up, or is missing where something needs it.
    #[error("kubernetes: {0}")]
    Kubernetes(String),
    /// The listen address could not be bound.
    #[error("bind {address}: {error}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
}

/// A callback for a source's every answer, and what resolves at its first: start-up waits (up to
/// [`REGISTRY_START_WAIT`]) for a source to answer once before serving.
fn first_answer() -> (impl FnMut() + Send + 'static, oneshot::Receiver<()>) {
    let (tx, rx) = oneshot::channel();
    let mut tx = Some(tx);
    let answered = move || {
        if let Some(tx) = tx.take() {
            let _ = tx.send(());
        }
    };
    (answered, rx)
}

/// How often the bootstrap tokens file's metadata is read, besides the kernel's notifications.
const TOKENS_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Re-reads the bootstrap tokens file whenever it changes. A good file replaces the tokens: one
/// taken out is refused from then on, by the CA and (with `--xds-auth`) by discovery, whose open
/// streams holding it close. A bad file is logged and counted, and the tokens in force stay.
async fn watch_tokens(path: PathBuf, authenticators: Arc<Authenticators>, metrics: Arc<ControlMetrics>) {
    let mut watch = FileWatch::files(vec![path.clone()], TOKENS_POLL_INTERVAL).settle(directory::SETTLE_TIME);
    loop {
        watch.changed().await;
        match LocalTokens::load(&path) {
            Ok(tokens) => {
                info!(file = %path.display(), tokens = tokens.len(), "bootstrap tokens reloaded");
                metrics.source_loaded("tokens", true);
                authenticators.replace_local(tokens);
            }
            Err(error) => {
                error!(%error, "bootstrap tokens file rejected; the tokens in force stay");
                metrics.source_loaded("tokens", false);
            }
        }
    }
}

async fn report_end(server: impl std::future::Future<Output = Result<(), tonic::transport::Error>>) {
    if let Err(error) = server.await {
        error!(%error, "control plane server stopped");
    }
}

/// A running control plane. Dropping it stops the server and the sources.
#[derive(Debug)]
pub struct ControlPlane {
    address: SocketAddr,
    injector_address: Option<SocketAddr>,
    metrics: Arc<ControlMetrics>,
    sources: Arc<Sources>,
    stop: Option<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ControlPlane {
    /// Loads the sources and starts serving on the current tokio runtime. Fails if the directory
    /// does not load or the address cannot be bound.
    pub async fn start(config: ControlConfig) -> Result<ControlPlane, ControlError> {
        let metrics = Arc::new(ControlMetrics::new());
        let automatic_mesh = config.kubernetes_objects.as_ref().is_some_and(|k| k.automatic_mesh);
        let sources = Arc::new(Sources::new(config.mesh.clone(), automatic_mesh, metrics.clone()));
        let ads = AdsServer::new(&sources.publisher);
        let mut tasks = Vec::new();

        if let Some(root) = &config.config_dir {
            let first = directory::load(root)?;
            info!(directory = %root.display(), files = first.files, resources = first.resources.len(), version = %first.version, "config directory loaded");
            sources.directory_loaded(Ok(first));
            let watcher = sources.clone();
            tasks.push(tokio::spawn(directory::watch(root.clone(), move |result| watcher.directory_loaded(result))));
        } else {
            sources.publish_now();
        }

        if let Some(etcd) = &config.etcd {
            let (mut answered, first) = first_answer();
            let follower = sources.clone();
            tasks.push(tokio::spawn(registry::follow(
                etcd.clone(),
                config.etcd_prefix.clone(),
                move |registrations| {
                    follower.registry_changed(registrations);
                    answered();
                },
            )));
            if tokio::time::timeout(REGISTRY_START_WAIT, first).await.is_err() {
                warn!(%etcd, "the registry has not answered yet; serving without its endpoints until it does");
            }
        }

        // Tokens and the configuration they unlock cross the port: beyond this host, only over TLS.
        if let Some(ca) = &config.ca
            && ca.tls_names.is_empty()
            && !config.listen.ip().is_loopback()
        {
            return Err(ControlError::Ca(format!(
                "the CA would take tokens in the clear on {}: serve TLS with --tls-name, or listen on a loopback address",
                config.listen
            )));
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|error| ControlError::Bind { address: config.listen, error })?;
        let address = listener.local_addr().map_err(|error| ControlError::Bind { address: config.listen, error })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let mut ca_service = None;
        let mut xds_authenticators = None;
        let mut serving_tls = None;
        let mut injector_tls = None;
        let kubernetes = match &config.kubernetes {
            Some(api) => Some(kubernetes::client(api).map_err(|e| ControlError::Kubernetes(e.to_string()))?),
            None => None,
        };
        if config.kubernetes_objects.is_some() {
            let Some(client) = &kubernetes else {
                return Err(ControlError::Kubernetes(
                    "following the cluster's objects needs the Kubernetes API server".into(),
                ));
            };
            let (mut answered, first) = first_answer();
            let follower = sources.clone();
            // The automatic mesh applies the Gateway API routes, so it reports their status.
            let (routes, routes_seen) = tokio::sync::watch::channel(None);
            if automatic_mesh {
                tasks.push(tokio::spawn(route_status::keep(client.clone(), routes_seen)));
            }
            tasks.push(tokio::spawn(cluster::follow(
                client.clone(),
                config.mesh.trust_domain.clone(),
                move |update| {
                    if let cluster::Update::Objects(objects) = &update {
                        routes.send_replace(Some(objects.clone()));
                    }
                    follower.cluster_changed(update);
                    answered();
                },
            )));
            if tokio::time::timeout(REGISTRY_START_WAIT, first).await.is_err() {
                warn!("the API server has not listed the cluster's objects yet; serving without them until it does");
            }
        }
        let mut ca_root = None;
        if let Some(ca) = &config.ca {
            let authority = match &ca.root {
                CaRoot::Directory(dir) => Authority::load_or_generate(dir, &ca.trust_domain),
                CaRoot::Files { cert, key } => Authority::from_files(cert, key, &ca.trust_domain),
            }
            .map_err(|e| ControlError::Ca(e.to_string()))?
            .with_max_ttl(ca.max_ttl);
            let authority = match &ca.extra_roots {
                Some(path) => authority.with_extra_roots(path).map_err(|e| ControlError::Ca(e.to_string()))?,
                None => authority,
            };
            let authority = Arc::new(authority);
            let local = match &ca.tokens {
                Some(path) => LocalTokens::load(path).map_err(|e| ControlError::Ca(e.to_string()))?,
                None => LocalTokens::default(),
            };
            let reviews = match (&ca.token_audience, &kubernetes) {
                (None, _) => None,
                (Some(audience), Some(api)) => Some(TokenReview::new(api.clone(), &ca.trust_domain, audience)),
                (Some(_), None) => {
                    return Err(ControlError::Ca("kubernetes tokens need the API server (kubernetes)".into()));
                }
            };
            let mut serving = |names: &[String]| {
                let (config, renew) = tls::serving_config(&authority, names, config.serving_cert_ttl, metrics.clone())?;
                tasks.push(tokio::spawn(renew));
                Ok::<_, String>(config)
            };
            if !ca.tls_names.is_empty() {
                serving_tls = Some(serving(&ca.tls_names).map_err(ControlError::Ca)?);
            }
            if let Some(InjectorConfig { tls: InjectorTls::Ca { names }, .. }) = &config.injector {
                injector_tls = Some(serving(names).map_err(ControlError::Injector)?);
            }
            info!(trust_domain = %ca.trust_domain, tokens = local.len(), kubernetes = ?reviews, tls = !ca.tls_names.is_empty(), "certificate authority serving");
            let authenticators = Arc::new(Authenticators::new(local, reviews));
            if let Some(path) = &ca.tokens {
                tasks.push(tokio::spawn(watch_tokens(path.clone(), authenticators.clone(), metrics.clone())));
            }
            ca_root = Some(authority.root_pem().to_owned());
            if ca.authenticate_xds {
                xds_authenticators = Some(authenticators.clone());
            }
            ca_service = Some(CaService::new(authority, authenticators, metrics.clone()).into_service());
        }
        let ads = match xds_authenticators {
            Some(authenticators) => ads.authenticated_by(authenticators),
            None => ads,
        };
        let ads = if serving_tls.is_some() { ads.proofs_required() } else { ads };
        let mut routes = tonic::service::Routes::new(ads.into_service());
        if let Some(ca_service) = ca_service {
            routes = routes.add_service(ca_service);
        }
        let router = routes.into_axum_router().fallback({
            let sources = sources.clone();
            move |request: http::Request<axum::body::Body>| {
                let sources = sources.clone();
                async move { operator_http(request.uri().path(), &sources) }
            }
        });
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_routes(tonic::service::Routes::from(router));
        let stopped = async {
            let _ = stopped.await;
        };
        tasks.push(match serving_tls {
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                tokio::spawn(report_end(server.serve_with_incoming_shutdown(incoming, stopped)))
            }
            Some(config) => {
                let incoming = tls::incoming(listener, config);
                tokio::spawn(report_end(server.serve_with_incoming_shutdown(incoming, stopped)))
            }
        });
        info!(%address, "remora control serving Delta ADS");
        let mut injector_address = None;
        if let Some(injector) = config.injector {
            let tls = match (&injector.tls, injector_tls) {
                (InjectorTls::Files { cert, key }, _) => tls::file_config(cert, key).map_err(ControlError::Injector)?,
                (InjectorTls::Ca { .. }, Some(tls)) => tls,
                (InjectorTls::Ca { .. }, None) => {
                    return Err(ControlError::Injector(
                        "a certificate from the CA needs the CA (--ca-dir or --ca-cert)".into(),
                    ));
                }
            };
            if let Some(name) = &injector.webhook {
                let (Some(api), Some(root)) = (&kubernetes, &ca_root) else {
                    return Err(ControlError::Injector(
                        "keeping the webhook's caBundle needs the CA and the Kubernetes API server".into(),
                    ));
                };
                let keep = ca_bundle::keep(
                    api.clone(),
                    name.clone(),
                    root.clone(),
                    metrics.clone(),
                    ca_bundle::CHECK_INTERVAL,
                );
                tasks.push(tokio::spawn(keep));
            }
            let (bound, task) = serve_injector(injector, tls, metrics.clone()).await?;
            injector_address = Some(bound);
            tasks.push(task);
        }
        Ok(ControlPlane { address, injector_address, metrics, sources, stop: Some(stop), tasks })
    }

    /// Where the injector's webhook serves, if it does.
    pub fn injector_address(&self) -> Option<SocketAddr> {
        self.injector_address
    }

    /// Where it serves.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its metrics.
    pub fn metrics(&self) -> &Arc<ControlMetrics> {
        &self.metrics
    }

    /// The served set, as `/config_dump` shows it.
    pub fn dump(&self) -> serde_json::Value {
        self.sources.dump()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Serves the admission webhook on its own TLS port: `POST /inject` reviews, `/ready` and `/live`
/// for the Deployment's probes.
async fn serve_injector(
    config: InjectorConfig,
    tls: Arc<rustls::ServerConfig>,
    metrics: Arc<ControlMetrics>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ControlError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|error| ControlError::Bind { address: config.listen, error })?;
    let address = listener.local_addr().map_err(|error| ControlError::Bind { address: config.listen, error })?;
    let injector = Arc::new(config.injector);
    let router = axum::Router::new().fallback(move |request: http::Request<axum::body::Body>| {
        let (injector, metrics) = (injector.clone(), metrics.clone());
        async move { injector_http(request, &injector, &metrics).await }
    });
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .tcp_nodelay(true)
        .add_routes(tonic::service::Routes::from(router));
    let incoming = tls::incoming(listener, tls);
    info!(%address, "remora control serving the sidecar injector");
    Ok((address, tokio::spawn(report_end(server.serve_with_incoming(incoming)))))
}

/// The largest AdmissionReview body read: a pod spec is a few KiB; Kubernetes caps objects at 1.5 MiB.
const MAX_REVIEW_BYTES: usize = 3 << 20;

async fn injector_http(
    request: http::Request<axum::body::Body>,
    injector: &Injector,
    metrics: &ControlMetrics,
) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    match (request.method(), request.uri().path()) {
        (_, "/ready" | "/live") => return plain(StatusCode::OK, "ok\n".into()),
        (&http::Method::POST, webhook::PATH) => {}
        (_, webhook::PATH) => return plain(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n".into()),
        _ => return plain(StatusCode::NOT_FOUND, format!("not found: the webhook is POST {}\n", webhook::PATH)),
    }
    let body = match axum::body::to_bytes(request.into_body(), MAX_REVIEW_BYTES).await {
        Ok(body) => body,
        Err(error) => {
            metrics.injector_review("invalid");
            return plain(StatusCode::PAYLOAD_TOO_LARGE, format!("cannot read the review: {error}\n"));
        }
    };
    match webhook::review(injector, &body) {
        Ok((review, verdict, report)) => {
            metrics.injector_review(verdict.as_str());
            if let Some(report) = report {
                info!(%report, "admission review");
            }
            let mut response = plain(StatusCode::OK, serde_json::to_string(&review).unwrap_or_default());
            response.headers_mut().insert(CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            response
        }
        Err(error) => {
            metrics.injector_review("invalid");
            warn!(%error, "admission review refused");
            plain(StatusCode::BAD_REQUEST, format!("{error}\n"))
        }
    }
}

fn operator_http(path: &str, sources: &Sources) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/live" | "/ready" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/metrics" => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", sources.metrics.encode())
        }
        "/config_dump" => {
            let mut text = serde_json::to_string_pretty(&sources.dump()).unwrap_or_default();
            text.push('\n');
            (StatusCode::OK, "application/json", text)
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /config_dump, /ready\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

/// Runs `remora control` until SIGTERM or SIGINT.
pub fn run(config: ControlConfig) -> Result<(), ControlError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("remora-control")
        .build()
        .map_err(ControlError::Runtime)?;
    runtime.block_on(async {
        let stop = crate::signals::stop().map_err(ControlError::Runtime)?;
        let plane = ControlPlane::start(config).await?;
        stop.await;
        info!("stopping");
        drop(plane);
        Ok(())
    })
}
