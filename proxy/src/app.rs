//! The composition root: builds every part of a proxy, starts it, and stops it.
//!
//! [`Proxy::start`] is the only place that starts tasks at start-up, in this order:
//!
//! 1. load and validate the config (a bad file fails here, naming the field);
//! 2. resolve the bootstrap (defaults applied) and build the shared data path;
//! 3. bind the admin socket, start the worker threads, and apply the first config, which binds
//!    every listener before any accept loop runs (a taken port fails here, naming the listener);
//! 4. start the admin thread (the admin server alone, so probes are answered whatever the config side
//!    is doing) and the control thread: the cluster monitor (health checks and outlier
//!    detection, `balance::monitor`), for a file source the file watcher, with a control plane
//!    the Delta-ADS stream (`xds`; with a CA identity, opened once the first certificate is in
//!    place, which it presents to the control plane as proof of who calls), and with an identity
//!    what keeps its certificate current (the certificate files' watcher, or the CA renewals of
//!    `tls::issuer`);
//! 5. report ready — at once without a control plane; with one, once every resource type has arrived
//!    and been applied, or the initial-fetch timeout has passed; with a CA identity, not before the
//!    first certificate is in place.
//!
//! [`run`] is what `remora proxy` runs: start, then wait for signals (SIGHUP reloads; SIGTERM or
//! SIGINT drains and exits). [`Proxy::drain`] stops accepting, lets connections finish up to the
//! drain time, and returns; dropping the [`Proxy`] ends every thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::bootstrap::{self, Bootstrap, ConfigSource, IdentitySource};
use crate::context::DataPath;
use crate::http::client::ClientSettings;
use crate::http::server::ServerSettings;
use crate::limits;
use crate::listener::{self, metrics::ListenerMetrics};
use crate::reload::{self, ReloadError, ReloadMetrics, ReloadOutcome, Reloader};
use crate::state::authz::AuthzMetrics;
use crate::state::cluster::ClusterMetrics;
use crate::state::route_metrics::RouteMetrics;
use crate::state::{LiveSnapshot, SnapshotMetrics};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::export::{self, ExportError, SpanCounters};
use crate::telemetry::{self, Registry, TelemetryMetrics};
use crate::tls::MeshTls;
use crate::tls::files::CertFiles;
use crate::tls::issuer::IssuerSettings;
use crate::tls::metrics::MeshMetrics;
use crate::worker::{self, Workers};
use crate::xds::{self, XdsHandler, XdsMetrics};
use remora_control_api::grpc::ControlTls;
use remora_control_api::validate::References;
use remora_control_api::watch::FileWatch;

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config could not be loaded, or could not be applied.
    #[error(transparent)]
    Config(#[from] ReloadError),
    /// The admin server could not bind its address.
    #[error("admin server: bind {address}: {error}")]
    AdminBind {
        /// The admin address.
        address: SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// A thread or runtime could not be created.
    #[error("start threads: {0}")]
    Threads(std::io::Error),
    /// Tracing was asked for and could not start.
    #[error(transparent)]
    Tracing(#[from] ExportError),
    /// The control plane's CA file is unusable.
    #[error("control_plane_ca_file: {0}")]
    ControlTls(String),
    /// The identity's certificate files are unusable.
    #[error("identity: {0}")]
    Identity(crate::tls::TlsError),
    /// The access log file could not be opened.
    #[error("access log: open {path}: {error}")]
    AccessLog {
        /// The file.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
}

/// What keeps the identity's certificate current, on the control thread.
enum IdentityTask {
    Files(CertFiles),
    Ca(IssuerSettings),
}

/// A running proxy.
pub struct Proxy {
    bootstrap: Bootstrap,
    admin_address: SocketAddr,
    admin: Arc<AdminState>,
    data: Arc<DataPath>,
    reloader: Arc<Reloader>,
    /// The admin and control threads.
    threads: Vec<Background>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("admin_address", &self.admin_address).finish_non_exhaustive()
    }
}

/// Start-up settings given on the command line, over the config file's bootstrap section.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// `--control URL`: the control plane to take resources from.
    pub control_plane: Option<String>,
    /// `--node-id ID`: this proxy's name to the control plane.
    pub node_id: Option<String>,
    /// `--identity SPIFFE-ID`: the identity to have the CA issue.
    pub identity: Option<String>,
    /// `--token-file FILE`: the token that authenticates to the CA.
    pub token_file: Option<String>,
    /// `--tls-cert`, `--tls-key`, `--tls-ca`: certificate files instead of the CA.
    pub tls_files: Option<[String; 3]>,
    /// `--control-ca FILE`: the roots an https:// control plane's certificate must chain to.
    pub control_plane_ca_file: Option<String>,
    /// `--admin ADDR`: the admin server's address (overrides the bootstrap's admin_address).
    pub admin_address: Option<String>,
    /// `REMORA_CONTROL_CA`: the control plane's roots as PEM text (the bootstrap's
    /// control_plane_ca), for an injected pod, which gets them inline with no file to mount.
    pub control_plane_ca_pem: Option<String>,
}

impl Proxy {
    /// Starts a proxy from `source`: every listener bound and serving, the admin server up. Returns
    /// once it is ready.
    pub fn start(source: ConfigSource) -> Result<Proxy, StartError> {
        Proxy::start_with(source, StartOptions::default())
    }

    /// Starts a proxy from `source` with command-line `options`. Without a control plane it returns
    /// ready; with one it returns once the static listeners are bound, and becomes ready when the
    /// control plane's configuration has arrived (see [`Proxy::is_ready`]).
    pub fn start_with(source: ConfigSource, options: StartOptions) -> Result<Proxy, StartError> {
        // 1. Load. A watched file is stamped first, so an edit made while we start is not missed.
        let watch = match &source {
            ConfigSource::File(path) => Some(
                FileWatch::files(vec![path.clone()], limits::CONFIG_POLL_INTERVAL).settle(limits::FILE_SETTLE_TIME),
            ),
            ConfigSource::Text { .. } => None,
        };
        let mut raw = bootstrap::load_with(&source, References::Pending).map_err(ReloadError::from)?.bootstrap;
        if let Some(control_plane) = options.control_plane {
            raw.control_plane = control_plane;
        }
        if let Some(node_id) = options.node_id {
            raw.node_id = node_id;
        }
        if let Some(file) = options.control_plane_ca_file {
            raw.control_plane_ca_file = file;
        }
        if let Some(address) = options.admin_address {
            raw.admin_address = address;
        }
        if let Some(pem) = options.control_plane_ca_pem {
            raw.control_plane_ca = pem;
        }
        if options.identity.is_some() || options.token_file.is_some() || options.tls_files.is_some() {
            let identity = raw.identity.get_or_insert_with(Default::default);
            if let Some(id) = options.identity {
                identity.spiffe_id = id;
            }
            if let Some(token_file) = options.token_file {
                identity.token_file = token_file;
            }
            if let Some([cert, key, ca]) = options.tls_files {
                (identity.cert_file, identity.key_file, identity.ca_file) = (cert, key, ca);
            }
        }
        // 2. Bootstrap and the shared data path.
        let settings =
            Bootstrap::resolve(&raw).map_err(|errors| ReloadError::Invalid { origin: source.origin(), errors })?;
        let has_control_plane = settings.control_plane.is_some();
        // Every subsystem's metrics, registered here and handed to their owners.
        let mut metrics = Metrics::register(settings.workers);
        let tracer = match &settings.tracing {
            Some(tracing) => {
                let [exported, dropped, failed] = metrics.telemetry.span_counters();
                Some(export::start(tracing, SpanCounters { exported, dropped, failed })?)
            }
            None => None,
        };
        let access_log = match &settings.access_log {
            Some(log) => Some(AccessLog::open(log, metrics.telemetry.access_log_counters()).map_err(|error| {
                StartError::AccessLog {
                    path: log.path.as_ref().map_or("stdout".into(), |p| p.display().to_string()),
                    error,
                }
            })?),
            None => None,
        };
        // The control plane's roots, for https:// (a bad file fails the start).
        let control_tls = match &settings.control_plane_ca_file {
            None => match &settings.control_plane_ca {
                Some(pem) => Some(
                    ControlTls::from_pem(pem.as_bytes())
                        .map_err(|e| StartError::ControlTls(format!("control_plane_ca: {e}")))?,
                ),
                None => None,
            },
            Some(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| StartError::ControlTls(format!("{}: {e}", path.display())))?;
                Some(
                    ControlTls::from_pem(&pem)
                        .map_err(|e| StartError::ControlTls(format!("{}: {e}", path.display())))?,
                )
            }
        };
        // Identity: files are read now (a bad set fails the start); the CA is asked once the control
        // thread runs, and readiness waits for its answer.
        let mut identity_task = None;
        let mesh = match &settings.identity {
            None => None,
            Some(identity) => {
                let mesh = Arc::new(MeshTls::new(identity.handshake_timeout, metrics.mesh.clone()));
                match &identity.source {
                    IdentitySource::Files { cert, key, ca } => {
                        let files = CertFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() };
                        let credentials = files.load().map_err(StartError::Identity)?;
                        info!(identity = %credentials.identity(), cert = %cert.display(), "certificate files loaded");
                        mesh.install(credentials).map_err(StartError::Identity)?;
                        identity_task = Some(IdentityTask::Files(files));
                    }
                    IdentitySource::Ca { identity, ca_address, token_file, ttl } => {
                        identity_task = Some(IdentityTask::Ca(IssuerSettings {
                            identity: identity.clone(),
                            ca_address: ca_address.clone(),
                            token_file: token_file.clone(),
                            ttl: *ttl,
                            ca_tls: control_tls.clone(),
                        }));
                    }
                }
                Some(mesh)
            }
        };
        // A proxy whose identity the control plane's CA issues proves it on the control plane's
        // port too: the view its stream gets is decided by that proof, not by the node ID it claims.
        let control_tls = match (control_tls, &mesh, settings.identity.as_ref().map(|i| &i.source)) {
            (Some(tls), Some(mesh), Some(IdentitySource::Ca { .. })) => {
                Some(tls.with_client_cert(mesh.control_plane_client_cert()))
            }
            (control_tls, ..) => control_tls,
        };
        let data = Arc::new(DataPath {
            snapshot: Arc::new(LiveSnapshot::default()),
            drain: Default::default(),
            server: ServerSettings::default(),
            client: ClientSettings::with_mesh(mesh.clone()),
            tracer,
            access_log,
            quic_paths: std::mem::take(&mut metrics.quic_paths),
        });
        let bootstrap_json = serde_json::to_value(&raw).unwrap_or_default();
        let admin = Arc::new(AdminState::new(
            data.clone(),
            metrics.registry.clone(),
            settings.node_id.clone(),
            source.origin(),
            bootstrap_json,
        ));
        // 3. Sockets and workers.
        let Some(listener::ListenSocket::Tcp(admin_socket)) = listener::bind("admin", settings.admin_address, 1, false)
            .map_err(|e| StartError::AdminBind { address: settings.admin_address, error: e.error })?
            .pop()
        else {
            return Err(StartError::Threads(std::io::Error::other("no admin socket")));
        };
        let admin_address = admin_socket
            .local_addr()
            .map_err(|error| StartError::AdminBind { address: settings.admin_address, error })?;
        let workers = Workers::start(settings.workers, &data).map_err(StartError::Threads)?;
        let reloader = Arc::new(Reloader::new(
            source.clone(),
            raw,
            data.clone(),
            (metrics.snapshot.clone(), metrics.reloads.clone()),
            admin.clone(),
            workers,
            has_control_plane,
        ));
        reloader.reload()?;
        if matches!(identity_task, Some(IdentityTask::Ca(_))) {
            admin.set_identity_pending();
        }
        // 4. The admin thread, then the control thread.
        let admin_state = admin.clone();
        let admin_thread = Background::start("remora-admin", move || {
            tokio::spawn(admin::serve(admin_socket, admin_state));
        })?;
        let watched = watch.map(|watch| (reloader.clone(), watch));
        let identity_admin = admin.clone();
        let monitored = data.snapshot.clone();
        let certificates = data.snapshot.clone();
        let xds = settings.control_plane.clone().map(|address| {
            let token_file = settings.identity.as_ref().and_then(|identity| match &identity.source {
                IdentitySource::Ca { token_file, .. } => Some(token_file.clone()),
                IdentitySource::Files { .. } => None,
            });
            let handler = XdsHandler::new(reloader.clone(), admin.clone(), metrics.xds.clone(), address)
                .with_tls(control_tls.clone())
                .with_token(token_file);
            (handler, settings.node_id.clone(), settings.initial_fetch_timeout)
        });
        // With an identity from the CA, the control-plane stream opens once the first certificate
        // is in place, so that it proves who this proxy is from its first request.
        let stream_waits = matches!(identity_task, Some(IdentityTask::Ca(_)));
        let (issued, first_certificate) = oneshot::channel::<()>();
        let control_thread = Background::start("remora-control", move || {
            tokio::spawn(crate::balance::monitor::run(monitored));
            tokio::spawn(reload::watch_certificates(certificates));
            tokio::spawn(crate::memory::give_back(limits::MEMORY_RETURN_INTERVAL));
            if let Some((reloader, watch)) = watched {
                tokio::spawn(reload::watch_file(reloader, watch));
            }
            if let Some((handler, node_id, timeout)) = xds {
                tokio::spawn(async move {
                    if stream_waits {
                        let _ = first_certificate.await;
                    }
                    xds::run(handler, node_id, timeout).await;
                });
            }
            match (identity_task, mesh) {
                (Some(IdentityTask::Files(files)), Some(mesh)) => {
                    tokio::spawn(crate::tls::files::watch(files, mesh, limits::CERT_FILES_POLL_INTERVAL));
                }
                (Some(IdentityTask::Ca(settings)), Some(mesh)) => {
                    let admin = identity_admin;
                    tokio::spawn(crate::tls::issuer::run(settings, mesh, move || {
                        admin.set_identity_ready();
                        let _ = issued.send(());
                    }));
                }
                _ => {}
            }
        })?;
        // 5. Ready (with a control plane, the stream's handler says when).
        if !has_control_plane {
            admin.set_ready();
        }
        Ok(Proxy {
            bootstrap: settings,
            admin_address,
            admin,
            data,
            reloader,
            threads: vec![admin_thread, control_thread],
        })
    }

    /// The start-up settings in force.
    pub fn bootstrap(&self) -> &Bootstrap {
        &self.bootstrap
    }

    /// Where the admin server listens.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    /// Where listener `name` is bound (useful when its configured port is 0).
    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        self.reloader.listener_address(name)
    }

    /// Every listener and its bound address, sorted by name.
    pub fn listener_addresses(&self) -> Vec<(String, SocketAddr)> {
        self.reloader.listener_addresses()
    }

    /// The snapshot serving now.
    pub fn snapshot(&self) -> Arc<crate::state::Snapshot> {
        self.data.snapshot.load_full()
    }

    /// Every metric, as `/metrics` renders them.
    pub fn metrics(&self) -> String {
        telemetry::encode(&self.admin.metrics)
    }

    /// Whether `/ready` reports ready.
    pub fn is_ready(&self) -> bool {
        self.admin.is_ready()
    }

    /// Re-reads the config source and applies it (what SIGHUP and a file change do).
    pub fn reload(&self) -> Result<ReloadOutcome, ReloadError> {
        self.reloader.reload()
    }

    /// Drains: `/ready` turns 503, accept loops stop, HTTP/1.1 connections close after their request
    /// in flight (`Connection: close`), HTTP/2 connections get GOAWAY; then waits until every
    /// connection has closed or the drain time has passed. Returns whether every connection closed.
    pub async fn drain(&self) -> bool {
        self.data.drain.start();
        let clean = self.data.drain.wait(self.bootstrap.drain_time).await;
        if !clean {
            warn!(open = self.data.drain.open_connections(), "drain time passed with connections still open");
        }
        clean
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for thread in self.threads.drain(..) {
            thread.stop();
        }
        // The workers go with the last reference to the reloader, which is ours now.
    }
}

/// A thread running a current-thread runtime of its own until stopped.
struct Background {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Background {
    /// Starts thread `name`; `tasks` runs inside its runtime and spawns what the thread serves.
    fn start(name: &str, tasks: impl FnOnce() + Send + 'static) -> Result<Background, StartError> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(StartError::Threads)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                runtime.block_on(async move {
                    tasks();
                    let _ = stopped.await;
                });
            })
            .map_err(StartError::Threads)?;
        Ok(Background { stop, thread })
    }

    /// Stops the runtime (its tasks are dropped) and waits for the thread to end.
    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Every subsystem's metric families, registered in one registry: the composition root declares
/// them all here, once, and hands each to the part that counts.
struct Metrics {
    registry: Arc<Registry>,
    snapshot: SnapshotMetrics,
    reloads: ReloadMetrics,
    xds: XdsMetrics,
    mesh: MeshMetrics,
    telemetry: TelemetryMetrics,
    quic_paths: crate::quic::paths::PathReports,
}

impl Metrics {
    fn register(workers: usize) -> Metrics {
        let mut registry = telemetry::registry();
        let listeners = ListenerMetrics::register(&mut registry);
        let clusters = ClusterMetrics::register(&mut registry);
        let routes = RouteMetrics::register(&mut registry);
        let authz = AuthzMetrics::register(&mut registry);
        let reloads = ReloadMetrics::register(&mut registry);
        let xds = XdsMetrics::register(&mut registry);
        let mesh = MeshMetrics::register(&mut registry);
        let telemetry = TelemetryMetrics::register(&mut registry);
        let quic_paths = crate::quic::paths::PathReports::register(&mut registry);
        worker::register_metrics(&mut registry, workers);
        Metrics {
            registry: Arc::new(registry),
            snapshot: SnapshotMetrics { listeners, clusters, routes, authz },
            reloads,
            xds,
            mesh,
            telemetry,
            quic_paths,
        }
    }
}

/// Runs `remora proxy`: starts, serves until SIGTERM or SIGINT, drains, and returns. SIGHUP reloads
/// the config.
pub fn run(source: ConfigSource, options: StartOptions) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the signal runtime")?;
    runtime.block_on(async {
        let mut terminate = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
        let mut hangup = signal(SignalKind::hangup()).context("listen for SIGHUP")?;
        let proxy = Proxy::start_with(source, options).context("start the proxy")?;
        let listeners: Vec<String> =
            proxy.listener_addresses().iter().map(|(name, address)| format!("{name}={address}")).collect();
        info!(
            node = %proxy.bootstrap().node_id,
            admin = %proxy.admin_address(),
            workers = proxy.bootstrap().workers,
            listeners = %listeners.join(" "),
            control_plane = proxy.bootstrap().control_plane.as_deref().unwrap_or("none"),
            "remora proxy started"
        );
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = hangup.recv() => {
                    info!("SIGHUP: reloading the config");
                    // The outcome is logged by reload.
                    let _ = proxy.reload();
                }
            }
        }
        info!(drain_time = ?proxy.bootstrap().drain_time, "draining");
        let clean = proxy.drain().await;
        info!(clean, "drained; exiting");
        Ok(())
    })
}
