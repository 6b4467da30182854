//! Applying a new config while traffic flows, all or nothing.
//!
//! [`Reloader::reload`] reads the config source and applies it in an order that can only fail before
//! anything changes: parse and validate, compile the next [`Snapshot`] (off the data path), bind the
//! sockets of new or moved listeners, and only then swap the snapshot in, stop the accept loops of
//! removed listeners, and start the new ones. A config that fails any step is rejected with a
//! message naming the resource and field; the old snapshot and listeners keep serving untouched.
//! Requests in flight finish on the snapshot they started with.
//!
//! Reloads come from the file watcher ([`watch_file`], over `remora_control_api::watch`), from SIGHUP
//! (`app`), from the control-plane stream ([`Reloader::apply_update`], see `xds`), and from tests.
//! With a control plane, the serving set is the file's (static) resources joined with the ones the
//! control plane sent (dynamic), warmed by `state::compose`; a change to either recomposes both.
//! Changes are serialised by one lock, which the data path never touches.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use remora_control_api::validate::{References, ValidationErrors};
use remora_control_api::watch::FileWatch;
use remora_control_api::xds::client::Update;
use remora_control_api::{Encoded, Kind, Resource, v1};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::admin::{AdminState, ReloadReport};
use crate::bootstrap::{self, ConfigSource, LoadError, Loaded};
use crate::context::DataPath;
use crate::listener::{self, BindError};
use crate::state::cluster::OwnLocality;
use crate::state::compose::{self, Dynamic, Warming};
use crate::state::{Snapshot, SnapshotMetrics};
use crate::telemetry::{Registry, ResultLabels};
use crate::worker::Workers;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

/// The reloads' metrics: how many were applied and rejected, and the version serving now.
#[derive(Clone, Debug, Default)]
pub struct ReloadMetrics {
    reloads: Family<ResultLabels, Counter>,
    version: Family<VersionLabels, Gauge>,
}

impl ReloadMetrics {
    /// Declares the families in `registry`.
    pub fn register(registry: &mut Registry) -> ReloadMetrics {
        let m = ReloadMetrics::default();
        registry.register("config_reloads", "Config reloads, by result (applied, rejected)", m.reloads.clone());
        registry.register("config_version", "1 for the version of the config serving now", m.version.clone());
        m
    }

    /// Counts a reload attempt.
    fn record(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Marks `version` as the config serving now (and no other).
    fn set_version(&self, version: &str) {
        self.version.clear();
        self.version.get_or_create(&VersionLabels { version: version.to_owned() }).set(1);
    }
}

/// What a reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The config changed and now serves, at this version.
    Applied(String),
    /// The config is the one already serving.
    Unchanged(String),
}

/// Why a config was rejected. The previous config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The source could not be read or parsed, or failed validation.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The resources could not be compiled into a snapshot.
    #[error("{origin}: {errors}")]
    Invalid {
        /// Where the config came from.
        origin: String,
        /// What is wrong.
        errors: ValidationErrors,
    },
    /// A new or moved listener could not bind its address.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A control-plane response is not a coherent update.
    #[error("control plane: {0}")]
    Update(String),
}

/// What serves now besides the snapshot itself: its static and dynamic parts.
#[derive(Debug, Default)]
struct Held {
    static_resources: Arc<[Encoded]>,
    static_version: String,
    dynamic: Dynamic,
    warming: Vec<Warming>,
}

/// One address of a listener, bound: kept across reloads for as long as the listener lists it.
#[derive(Debug)]
struct BoundAddress {
    /// The address actually bound (its port chosen when configured as 0).
    local: SocketAddr,
    /// Where the listener lists it: 0 for `address`, then `additional_addresses` in order.
    position: usize,
    /// Flipping it stops this address's accept loops.
    stop: watch::Sender<bool>,
}

/// A listener's name, one address as configured (port 0 stays 0 here, so it is not re-bound on
/// every reload), and whether it is UDP (a listener that turns HTTP/3 needs sockets of that kind).
type BoundKey = (Arc<str>, SocketAddr, bool);

/// Applies configs to the running proxy.
#[derive(Debug)]
pub struct Reloader {
    source: ConfigSource,
    startup_bootstrap: v1::Bootstrap,
    data: Arc<DataPath>,
    /// The families each compiled snapshot draws its counters from.
    metrics: SnapshotMetrics,
    reloads: ReloadMetrics,
    admin: Arc<AdminState>,
    workers: Workers,
    /// Whether a control plane supplies resources (references may then wait for them).
    control: bool,
    held: Mutex<Held>,
    bound: Mutex<HashMap<BoundKey, BoundAddress>>,
    /// Where this proxy runs (from the bootstrap), for zone-aware clusters.
    locality: OwnLocality,
}

impl Reloader {
    /// A reloader for `source`, serving through `workers`, compiling snapshots with `metrics`'
    /// families and counting its reloads in `reloads`. `startup_bootstrap` is the bootstrap the
    /// process started with; later changes to it are reported, not applied.
    pub fn new(
        source: ConfigSource,
        startup_bootstrap: v1::Bootstrap,
        data: Arc<DataPath>,
        (metrics, reloads): (SnapshotMetrics, ReloadMetrics),
        admin: Arc<AdminState>,
        workers: Workers,
        control: bool,
    ) -> Self {
        let locality = startup_bootstrap
            .locality
            .as_ref()
            .map_or_else(OwnLocality::default, |l| OwnLocality { region: l.region.clone(), zone: l.zone.clone() });
        Reloader {
            source,
            startup_bootstrap,
            data,
            metrics,
            reloads,
            admin,
            workers,
            control,
            held: Mutex::new(Held::default()),
            bound: Mutex::new(HashMap::new()),
            locality,
        }
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        // As for `bound`: a panic mid-update leaves the previous, consistent state in place.
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The versions of the control plane's resources of `kind` held now.
    pub fn dynamic_versions(&self, kind: Kind) -> HashMap<String, String> {
        self.held().dynamic.versions(kind)
    }

    /// Every control-plane resource with its version and whether it serves, for `/config_dump`.
    pub fn dynamic_report(&self) -> serde_json::Value {
        let held = self.held();
        let list: Vec<serde_json::Value> = held
            .dynamic
            .resources()
            .map(|(version, resource)| {
                let waiting = held.warming.iter().find(|w| w.kind == resource.kind() && w.name == resource.name());
                serde_json::json!({
                    "kind": resource.kind().as_str(),
                    "name": resource.name(),
                    "version": version,
                    "status": if waiting.is_some() { "warming" } else { "serving" },
                    "waiting_for": waiting.map(|w| w.reason.clone()),
                })
            })
            .collect();
        list.into()
    }

    /// Applies one control-plane response on top of what is held; on error nothing changes.
    pub fn apply_update(&self, update: &Update) -> Result<ReloadOutcome, ReloadError> {
        let mut held = self.held();
        let dynamic = held.dynamic.with(update).map_err(ReloadError::Update)?;
        let (version, composed) = self.compose(&held.static_resources, &held.static_version, &dynamic)?;
        let outcome = self.apply(version, composed.serving.into(), composed.decoded)?;
        held.dynamic = dynamic;
        held.warming = composed.warming;
        debug!(
            r#type = %update.kind,
            changed = update.resources.len(),
            removed = update.removed.len(),
            warming = held.warming.len(),
            "control plane update applied"
        );
        Ok(outcome)
    }

    fn compose(
        &self,
        static_resources: &[Encoded],
        static_version: &str,
        dynamic: &Dynamic,
    ) -> Result<(String, compose::Composed), ReloadError> {
        let current = self.data.snapshot.load_full();
        let serving_now: HashSet<(Kind, String)> =
            current.resources.iter().map(|r| (r.kind(), r.name().to_owned())).collect();
        let composed = compose::compose(static_resources, dynamic, &serving_now)
            .map_err(|errors| ReloadError::Invalid { origin: "control plane".into(), errors })?;
        let version = bootstrap::version_of(&format!("{static_version}+{}", dynamic.version()));
        Ok((version, composed))
    }

    /// The address listener `name` is bound to (its `address`, not the additional ones), if it is.
    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        self.bound().iter().find(|((n, _, _), b)| **n == *name && b.position == 0).map(|(_, b)| b.local)
    }

    /// Every bound listener with each of its addresses, sorted by name and then as listed.
    pub fn listener_addresses(&self) -> Vec<(String, SocketAddr)> {
        let mut all: Vec<(String, usize, SocketAddr)> =
            self.bound().iter().map(|((name, _, _), b)| (name.to_string(), b.position, b.local)).collect();
        all.sort();
        all.into_iter().map(|(name, _, local)| (name, local)).collect()
    }

    fn bound(&self) -> MutexGuard<'_, HashMap<BoundKey, BoundAddress>> {
        // A panic while holding the lock cannot leave the map half-edited in a way that matters
        // more than stopping reloads would.
        self.bound.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the source and applies it; logs and records the outcome (metrics, `/config_dump`).
    pub fn reload(&self) -> Result<ReloadOutcome, ReloadError> {
        let references = if self.control { References::Pending } else { References::Required };
        // Parsed apart: the parse's short-lived blocks stay out of the arena the config is compiled in.
        let result = crate::memory::apart(|| bootstrap::load_with(&self.source, references))
            .map_err(ReloadError::from)
            .and_then(|loaded| self.apply_file(loaded));
        match &result {
            Ok(ReloadOutcome::Applied(version)) => {
                info!(%version, source = %self.source.origin(), "config applied");
                // What the parse and the config before freed goes back now, not at the next
                // periodic give-back.
                crate::memory::trim();
                self.reloads.record(true);
                self.admin.record_reload(ReloadReport {
                    applied: true,
                    version: version.clone(),
                    error: None,
                    at: SystemTime::now(),
                });
            }
            Ok(ReloadOutcome::Unchanged(_)) => {}
            Err(e) => {
                error!(error = %e, "config rejected; the previous config keeps serving");
                self.reloads.record(false);
                let version = self.data.snapshot.load().version.clone();
                self.admin.record_reload(ReloadReport {
                    applied: false,
                    version,
                    error: Some(e.to_string()),
                    at: SystemTime::now(),
                });
            }
        }
        result
    }

    fn apply_file(&self, loaded: Loaded) -> Result<ReloadOutcome, ReloadError> {
        let mut held = self.held();
        if !self.data.snapshot.load().version.is_empty() && loaded.bootstrap != self.startup_bootstrap {
            warn!("the bootstrap section changed; bootstrap settings take effect at the next restart");
        }
        // Held here and in the snapshot, encoded in one buffer, each resource once.
        let resources: Arc<[Encoded]> = Encoded::all(&loaded.resources).into();
        if !self.control {
            let outcome = self.apply(loaded.version.clone(), resources.clone(), loaded.resources)?;
            held.static_resources = resources;
            held.static_version = loaded.version;
            return Ok(outcome);
        }
        drop(loaded.resources);
        let (version, composed) = self.compose(&resources, &loaded.version, &held.dynamic)?;
        let outcome = self.apply(version, composed.serving.into(), composed.decoded)?;
        held.static_resources = resources;
        held.static_version = loaded.version;
        held.warming = composed.warming;
        Ok(outcome)
    }

    /// Compiles `resources` (with `decoded`, the same set decoded) and serves them.
    fn apply(
        &self,
        version: String,
        resources: Arc<[Encoded]>,
        decoded: Vec<Resource>,
    ) -> Result<ReloadOutcome, ReloadError> {
        let mut bound = self.bound();
        let current = self.data.snapshot.load_full();
        if !current.version.is_empty() && current.version == version {
            return Ok(ReloadOutcome::Unchanged(version));
        }
        let origin = if self.control { "control plane".to_owned() } else { self.source.origin() };
        let snapshot =
            Snapshot::build_decoded(version.clone(), resources, decoded, Some(&current), &self.locality, &self.metrics)
                .map_err(|errors| ReloadError::Invalid { origin, errors })?;

        // Bind first: if an address is taken, nothing has changed yet. An address a listener keeps
        // keeps its sockets; only new ones are bound, and only dropped ones close.
        let mut wanted: HashMap<BoundKey, usize> = HashMap::new();
        let mut fresh = Vec::new();
        for config in snapshot.listeners() {
            for (position, address) in config.addresses().into_iter().enumerate() {
                let key = (config.name.clone(), address, config.is_udp());
                if !bound.contains_key(&key) {
                    let sockets = listener::bind(&config.name, address, self.workers.len(), config.is_udp())?;
                    let local = sockets.first().and_then(|s| s.local_addr().ok()).unwrap_or(address);
                    fresh.push((key.clone(), position, local, sockets));
                }
                wanted.insert(key, position);
            }
        }
        // `Alt-Svc` names the port the advertised HTTP/3 listener is bound to, now known.
        for config in snapshot.listeners() {
            let Some(target) = config.advertise_http3.as_ref().and_then(|name| snapshot.listener(name)) else {
                continue;
            };
            let key = (target.name.clone(), target.address, true);
            let port = bound
                .get(&key)
                .map(|b| b.local)
                .or_else(|| fresh.iter().find(|(k, ..)| *k == key).map(|(_, _, local, _)| *local))
                .map_or(target.address.port(), |local| local.port());
            let value = format!("h3=\":{port}\"; ma={}", crate::limits::ALT_SVC_MAX_AGE);
            if let Ok(value) = http::HeaderValue::from_str(&value) {
                let _ = config.alt_svc.set(value);
            }
        }

        // A cluster that left takes its metric series with it (work still in flight on it counts on,
        // unseen); one that stays keeps its counters.
        let left: Vec<Arc<str>> =
            current.clusters().filter(|c| snapshot.cluster(&c.name).is_none()).map(|c| c.name.clone()).collect();
        self.data.snapshot.store(snapshot);
        for name in &left {
            self.metrics.clusters.forget(name);
        }
        bound.retain(|key, b| match wanted.get(key) {
            Some(position) => {
                b.position = *position;
                true
            }
            None => {
                b.stop.send_replace(true);
                false
            }
        });
        for (key, position, local, sockets) in fresh {
            let (stop, stopped) = watch::channel(false);
            self.workers.serve(&key.0, sockets, &stopped);
            info!(listener = %key.0, address = %local, "listening");
            bound.insert(key, BoundAddress { local, position, stop });
        }
        self.reloads.set_version(&version);
        Ok(ReloadOutcome::Applied(version))
    }
}

/// Reloads whenever the config file `watch` follows changes. The watch must have been made before
/// the config now serving was read: a change made in between is then still seen. Each reload runs
/// on the runtime's blocking pool: a large one takes seconds, and the health checks and the
/// control-plane stream that share this runtime go on meanwhile.
pub async fn watch_file(reloader: Arc<Reloader>, mut watch: FileWatch) {
    loop {
        watch.changed().await;
        let reloader = reloader.clone();
        // The outcome is logged and recorded by reload itself.
        let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
    }
}

/// Follows the certificate files of every HTTP/3 listener serving now, reloading a listener's
/// certificate when one of its files changes. Runs until dropped.
pub async fn watch_certificates(live: Arc<crate::state::LiveSnapshot>) {
    let mut swaps = live.subscribe();
    loop {
        let snapshot = live.load_full();
        let served: Vec<Arc<crate::quic::ServedCertificate>> =
            snapshot.listeners().filter_map(|l| l.tls.clone()).collect();
        let paths: Vec<std::path::PathBuf> =
            served.iter().flat_map(|c| c.files()).map(std::path::Path::to_owned).collect();
        drop(snapshot);
        if paths.is_empty() {
            if swaps.changed().await.is_err() {
                return;
            }
            continue;
        }
        let mut watch =
            FileWatch::files(paths, crate::limits::CERT_FILES_POLL_INTERVAL).settle(crate::limits::FILE_SETTLE_TIME);
        loop {
            tokio::select! {
                () = watch.changed() => {}
                changed = swaps.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
            }
            for certificate in &served {
                let file = certificate.files()[0].display();
                match certificate.reload() {
                    Ok(()) => info!(cert = %file, "listener certificate reloaded"),
                    Err(error) => {
                        warn!(%error, cert = %file, "listener certificate rejected; the one in use keeps serving")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{encode, registry};

    #[test]
    fn only_the_current_version_is_marked() {
        let mut registry = registry();
        let metrics = ReloadMetrics::register(&mut registry);
        metrics.set_version("aaa");
        metrics.set_version("bbb");
        let text = encode(&registry);
        assert!(text.contains(r#"remora_config_version{version="bbb"} 1"#), "{text}");
        assert!(!text.contains("aaa"), "{text}");
    }
}
