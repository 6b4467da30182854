//! The sources composed: the directory's resources, the etcd registry's endpoints and the cluster's
//! objects (through the automatic mesh) merged into the set every proxy is served, published again
//! on every change of any source.
//!
//! [`Sources`] keeps each source's latest state. A change of the directory or the registry makes
//! the whole set again ([`merge`]) and hands it to the [`Publisher`], which finds what changed by
//! its bytes. A change of the cluster's objects, where they alone make the automatic mesh (the
//! common case: an API server, no registry), is carried as a change instead: the cluster follower
//! notes which Services it touched, the mesh makes only those again ([`mesh::Mesh::remake`]), and
//! the publisher is handed their resources put and removed ([`Delta`]), so one endpoint's change
//! costs its Service's few resources, not the thousands of the whole cluster.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{error, warn};

use crate::ads::{Delta, Publisher};
use crate::mesh;
use crate::metrics::ControlMetrics;
use crate::sources::registry::Registrations;
use crate::sources::{cluster, directory, endpoint_slices};
use remora_control_api::validate::{self, References};
use remora_control_api::{Kind, Resource, v1};

/// The sources' latest state, merged into the published set on every change.
#[derive(Debug)]
pub(crate) struct Sources {
    pub(crate) publisher: Publisher,
    mesh: mesh::Settings,
    /// Whether the cluster's Services are meshed automatically.
    automatic_mesh: bool,
    pub(crate) metrics: Arc<ControlMetrics>,
    state: Mutex<SourceState>,
}

#[derive(Debug, Default)]
struct SourceState {
    directory: Option<directory::Snapshot>,
    /// The Kubernetes objects of the directory, read.
    objects: mesh::Objects,
    directory_error: Option<String>,
    registry: Option<Registrations>,
    /// The cluster's objects, as the API server last told them.
    cluster: Option<cluster::SharedObjects>,
    /// The automatic mesh as last published, when the cluster's objects alone make it and there
    /// is no registry: their changes are then published as changes.
    mesh: Option<mesh::Mesh>,
    /// The `remora.dev/egress` annotations that did not parse, as last reported.
    egress_errors: Vec<mesh::EgressError>,
}

impl Sources {
    /// Nothing from any source yet; the automatic mesh made of the cluster's Services if
    /// `automatic_mesh`.
    pub(crate) fn new(settings: mesh::Settings, automatic_mesh: bool, metrics: Arc<ControlMetrics>) -> Sources {
        Sources {
            publisher: Publisher::new(metrics.clone()),
            mesh: settings,
            automatic_mesh,
            metrics,
            state: Mutex::new(SourceState::default()),
        }
    }

    /// Publishes what the sources hold (nothing, before any has answered).
    pub(crate) fn publish_now(&self) {
        let Ok(mut state) = self.state.lock() else { return };
        self.publish(&mut state);
    }

    pub(crate) fn directory_loaded(&self, result: Result<directory::Snapshot, directory::DirectoryError>) {
        let Ok(mut state) = self.state.lock() else { return };
        match result {
            Ok(snapshot) => {
                self.metrics.source_loaded("directory", true);
                if let Err(errors) = validate::validate_with(&snapshot.resources, References::Pending) {
                    warn!(%errors, "the directory has invalid resources; proxies will reject them");
                }
                state.directory_error = None;
                state.objects = mesh::Objects::read(&self.mesh.trust_domain, &snapshot.kubernetes);
                report_routes(&state.objects);
                state.directory = Some(snapshot);
            }
            Err(e) => {
                self.metrics.source_loaded("directory", false);
                error!(error = %e, "config directory rejected; the previous resources keep serving");
                state.directory_error = Some(e.to_string());
                return;
            }
        }
        self.publish(&mut state);
    }

    pub(crate) fn registry_changed(&self, registrations: &Registrations) {
        let Ok(mut state) = self.state.lock() else { return };
        self.metrics.set_registered(registrations.len());
        state.registry = Some(registrations.clone());
        self.publish(&mut state);
    }

    /// The cluster's objects changed, or could not be read (the last ones stay).
    pub(crate) fn cluster_changed(&self, update: cluster::Update) {
        let objects = match update {
            cluster::Update::Objects(objects) => objects,
            cluster::Update::Failed(_) => {
                self.metrics.source_loaded("kubernetes", false);
                return;
            }
        };
        self.metrics.source_loaded("kubernetes", true);
        let Ok(mut state) = self.state.lock() else { return };
        if state.cluster.is_some() && self.publish_changes(&mut state) {
            return;
        }
        state.cluster = Some(objects);
        self.publish(&mut state);
    }

    /// Makes the whole set again and publishes it.
    fn publish(&self, state: &mut SourceState) {
        let started = Instant::now();
        let SourceState { directory, objects: directory_objects, registry, cluster, mesh: memo, egress_errors, .. } =
            state;
        let written = directory.as_ref().map_or(&[][..], |d| &d.resources);
        let mut cluster = cluster.as_ref().map(cluster::lock);
        // Made whole now: the changes noted so far are in it.
        if let Some(cluster) = cluster.as_deref_mut() {
            cluster.take_changes();
        }
        // The automatic mesh is made of the directory's objects, and of the cluster's when it
        // meshes the cluster; every slice fills the clusters that name a Service.
        let combined;
        let objects = match (cluster.as_deref(), self.automatic_mesh) {
            (Some(cluster), true) if directory_objects.services.is_empty() => cluster,
            (Some(cluster), true) => {
                let mut both = directory_objects.clone();
                both.extend(cluster);
                combined = both;
                &combined
            }
            _ => &*directory_objects,
        };
        let kept = mesh::Mesh::make(objects, written, &self.mesh);
        let made = kept.made();
        let egress = narrowed(objects, &kept, egress_errors);
        *memo = self.changes_carried(directory_objects, registry.as_ref(), cluster.is_some()).then_some(kept);
        // The mesh's objects hold the cluster's slices already when it meshes the cluster.
        let cluster_slices = cluster.as_deref().filter(|_| !self.automatic_mesh).map(|c| &c.slices);
        let slices: Vec<&endpoint_slices::Slices> =
            [Some(&objects.slices), cluster_slices].into_iter().flatten().filter(|slices| !slices.is_empty()).collect();
        let merged = merge(written, &made.shared, registry.as_ref(), &slices);
        let version = directory.as_ref().map_or("none", |d| d.version.as_str());
        self.publisher.publish_narrowed(&merged, &made.scoped, Some(egress), version);
        self.metrics.published("whole", started.elapsed());
    }

    /// Whether the cluster's changes can be published as changes: its objects alone make the
    /// automatic mesh, and no registration adds endpoints to the mesh's clusters.
    fn changes_carried(&self, directory: &mesh::Objects, registry: Option<&Registrations>, cluster: bool) -> bool {
        self.automatic_mesh && cluster && directory.services.is_empty() && registry.is_none_or(|r| r.is_empty())
    }

    /// Publishes what changed in the cluster's objects since the last publication, if that can be
    /// done as changes (see [`Sources::changes_carried`]); whether it was.
    fn publish_changes(&self, state: &mut SourceState) -> bool {
        let started = Instant::now();
        let SourceState { directory, objects: directory_objects, registry, cluster, mesh: memo, egress_errors, .. } =
            state;
        let (Some(memo), Some(cluster)) = (memo.as_mut(), cluster.as_ref()) else { return false };
        if !self.changes_carried(directory_objects, registry.as_ref(), true) {
            return false;
        }
        let mut objects = cluster::lock(cluster);
        let changes = objects.take_changes();
        if changes.all {
            // A list replaced a kind: made whole again (the caller does, with the changes taken).
            return false;
        }
        if changes.is_empty() {
            // Nothing the mesh is made of (a route's status, say): nothing to publish.
            return true;
        }
        let written = directory.as_ref().map_or(&[][..], |d| &d.resources);
        let remade = memo.remake(&objects, written, &self.mesh, &changes);
        let mut delta = Delta { egress: Some(narrowed(&objects, memo, egress_errors)), ..Delta::default() };
        let mut after = HashSet::new();
        for (scope, resource) in scoped(remade.after) {
            after.insert((scope.clone(), resource.kind(), resource.name().to_owned()));
            delta.put.push((scope, resource));
        }
        for (scope, resource) in scoped(remade.before) {
            let key = (scope, resource.kind(), resource.name().to_owned());
            if !after.contains(&key) {
                delta.removed.push(key);
            }
        }
        // The operator's clusters that name a Service take their endpoints from its slices.
        let filled = merge(written, &[], None, &[&objects.slices]);
        let named: HashSet<&str> = written
            .iter()
            .filter_map(|r| match r {
                Resource::Cluster(c) if c.kubernetes_service.is_some() => Some(c.name.as_str()),
                _ => None,
            })
            .collect();
        for resource in filled {
            if matches!(&resource, Resource::Endpoints(e) if named.contains(e.cluster.as_str())) {
                delta.put.push((None, resource));
            }
        }
        let version = directory.as_ref().map_or("none", |d| d.version.as_str());
        self.publisher.publish_delta(&delta, version);
        self.metrics.published("changes", started.elapsed());
        true
    }

    pub(crate) fn dump(&self) -> serde_json::Value {
        let served = self.publisher.subscribe().borrow().clone();
        let mut kinds = serde_json::Map::new();
        for kind in Kind::ALL {
            let list: Vec<serde_json::Value> = served
                .of(kind)
                .iter()
                .map(|(name, r)| serde_json::json!({"name": name, "version": r.version}))
                .collect();
            kinds.insert(kind.as_str().to_owned(), list.into());
        }
        let scopes: serde_json::Map<String, serde_json::Value> =
            served.scopes().map(|(scope, count)| (scope.to_owned(), count.into())).collect();
        let narrowed: serde_json::Map<String, serde_json::Value> =
            served.narrowed().map(|(scope, services)| (scope.to_owned(), services.into())).collect();
        let (error, routes) = match self.state.lock() {
            Ok(state) => {
                let mut routes = route_conditions(&state.objects);
                if let Some(cluster) = &state.cluster {
                    routes.extend(route_conditions(&cluster::lock(cluster)));
                }
                (state.directory_error.clone(), routes)
            }
            Err(_) => (None, Vec::new()),
        };
        serde_json::json!({
            "version": served.system_version,
            "generation": served.generation,
            "directory_error": error,
            "connected_proxies": self.metrics.connected_proxies(),
            "resources": kinds,
            "scoped_views": scopes,
            "narrowed_views": narrowed,
            "routes": routes,
        })
    }
}

/// The views the objects' `remora.dev/egress` annotations narrow, and to what (see
/// `mesh::egress`); an annotation that does not parse is logged the first time it is seen, and
/// narrows nothing.
fn narrowed(
    objects: &mesh::Objects,
    made: &mesh::Mesh,
    reported: &mut Vec<mesh::EgressError>,
) -> BTreeMap<String, crate::ads::Egress> {
    let (egress, errors) = mesh::egress(objects, made);
    for error in errors.iter().filter(|error| !reported.contains(error)) {
        warn!(%error, "an egress annotation that does not parse narrows nothing");
    }
    *reported = errors;
    egress
}

/// Logs each condition of the directory's Gateway API routes that does not hold (no API server
/// to write a status to: a broken route is never silent).
fn report_routes(objects: &mesh::Objects) {
    for route in objects.routes.values() {
        for (parent, conditions) in mesh::status::conditions(objects, route) {
            for condition in conditions.iter().filter(|c| !c.holds) {
                warn!(
                    kind = route.kind.as_str(),
                    route = %format!("{}/{}", route.namespace, route.name),
                    service = %format!("{}/{}", parent.namespace, parent.name),
                    condition = condition.kind,
                    reason = condition.reason,
                    detail = %condition.message,
                    "route condition does not hold"
                );
            }
        }
    }
}

/// The Gateway API routes among `objects`, each with its conditions per parent Service (as the
/// API server's status would carry them), for `/config_dump`.
fn route_conditions(objects: &mesh::Objects) -> Vec<serde_json::Value> {
    let condition = |c: &mesh::status::Condition| serde_json::json!({"status": if c.holds { "True" } else { "False" }, "reason": c.reason, "message": c.message});
    objects
        .routes
        .values()
        .map(|route| {
            let parents: Vec<serde_json::Value> = mesh::status::conditions(objects, route)
                .iter()
                .map(|(parent, [accepted, resolved])| {
                    let port = parent.port.map(|p| format!(":{p}")).unwrap_or_default();
                    serde_json::json!({"service": format!("{}/{}{port}", parent.namespace, parent.name),
                                       "accepted": condition(accepted), "resolved_refs": condition(resolved)})
                })
                .collect();
            serde_json::json!({"kind": route.kind.as_str(), "namespace": route.namespace, "name": route.name, "parents": parents})
        })
        .collect()
}

/// Every resource of `made`, with its scope (`None`: every proxy's).
fn scoped(made: mesh::Made) -> impl Iterator<Item = (Option<String>, Resource)> {
    let shared = made.shared.into_iter().map(|resource| (None, resource));
    let scoped = made
        .scoped
        .into_iter()
        .flat_map(|(scope, resources)| resources.into_iter().map(move |resource| (Some(scope.clone()), resource)));
    shared.chain(scoped)
}

/// The directory's resources (`written`) and the automatic mesh's (`made`) with each cluster's
/// registered endpoints and, for written clusters naming a `kubernetes_service`, its
/// EndpointSlices' endpoints (the API server's, the directory's) added (the automatic mesh's
/// clusters come with theirs): every cluster (but a pass-through one) gets an `Endpoints`
/// resource, and registered clusters the directory does not define get one too.
pub(crate) fn merge(
    written: &[Resource],
    made: &[Resource],
    registry: Option<&Registrations>,
    slices: &[&endpoint_slices::Slices],
) -> Vec<Resource> {
    let mut registered: BTreeMap<&str, Vec<v1::Endpoint>> = BTreeMap::new();
    for entry in registry.into_iter().flat_map(|r| r.values()) {
        registered.entry(entry.cluster.as_str()).or_default().push(v1::Endpoint {
            address: entry.address.clone(),
            weight: entry.weight,
            locality: (entry.region.is_some() || entry.zone.is_some()).then(|| v1::Locality {
                region: entry.region.clone().unwrap_or_default(),
                zone: entry.zone.clone().unwrap_or_default(),
            }),
            identity: entry.identity.clone().unwrap_or_default(),
            // `parse` admitted only names of the enum.
            health: entry.health.as_deref().and_then(v1::endpoint::Health::from_str_name).map_or(0, |h| h as i32),
        });
    }
    for slices in slices {
        for resource in written {
            if let Resource::Cluster(cluster) = resource
                && let Some(service) = &cluster.kubernetes_service
            {
                let found = slices.endpoints_for(service);
                registered.entry(cluster.name.as_str()).or_default().extend(found);
            }
        }
    }
    // One address once: the same slice may come from the API server and the directory.
    for endpoints in registered.values_mut() {
        let mut seen = HashSet::new();
        endpoints.retain(|e| seen.insert(e.address.clone()));
    }
    let resources = || written.iter().chain(made);
    let mut merged = Vec::with_capacity(written.len() + made.len() + registered.len());
    let mut covered: HashSet<&str> = HashSet::new();
    for resource in resources() {
        match resource {
            Resource::Endpoints(written) => {
                let listed: HashSet<&str> = written.endpoints.iter().map(|e| e.address.as_str()).collect();
                let mut endpoints = written.clone();
                if let Some(extra) = registered.get(endpoints.cluster.as_str()) {
                    endpoints.endpoints.extend(extra.iter().filter(|e| !listed.contains(e.address.as_str())).cloned());
                }
                covered.insert(resource.name());
                merged.push(Resource::Endpoints(endpoints));
            }
            Resource::Cluster(cluster) if cluster.original_destination => {
                covered.insert(&cluster.name);
                merged.push(resource.clone());
            }
            other => merged.push(other.clone()),
        }
    }
    for resource in resources() {
        if let Resource::Cluster(cluster) = resource
            && covered.insert(&cluster.name)
        {
            let endpoints = registered.get(cluster.name.as_str()).cloned().unwrap_or_default();
            merged.push(Resource::Endpoints(v1::Endpoints { cluster: cluster.name.clone(), endpoints }));
        }
    }
    for (cluster, endpoints) in registered {
        if covered.insert(cluster) {
            merged.push(Resource::Endpoints(v1::Endpoints { cluster: cluster.to_owned(), endpoints }));
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::sources::registry;

    #[test]
    fn registered_endpoints_join_their_clusters_and_every_cluster_gets_a_set() {
        let file = remora_control_api::config::parse(
            "resources:\n  - {kind: Cluster, name: listed}\n  - {kind: Endpoints, cluster: listed, endpoints: [{address: \"10.0.0.1:80\"}]}\n  - {kind: Cluster, name: empty}\n  - {kind: Cluster, name: pass, original_destination: true}\n",
            "t",
        )
        .unwrap();
        let mut registry = Registrations::new();
        for (key, cluster, address) in
            [("a", "listed", "10.0.0.1:80"), ("b", "listed", "10.0.0.2:80"), ("c", "elsewhere", "10.0.0.3:80")]
        {
            registry.insert(
                key.as_bytes().to_vec(),
                registry::Registered {
                    weight: Some(2),
                    zone: Some("z1".into()),
                    identity: Some(format!("spiffe://td/ns/{key}/sa/x")),
                    ..registry::Registered::new(cluster, address)
                },
            );
        }
        let merged = merge(&file.resources, &[], Some(&registry), &[]);
        let endpoints: BTreeMap<&str, Vec<&str>> = merged
            .iter()
            .filter_map(|r| match r {
                Resource::Endpoints(e) => {
                    Some((e.cluster.as_str(), e.endpoints.iter().map(|x| x.address.as_str()).collect()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            endpoints,
            BTreeMap::from([
                ("elsewhere", vec!["10.0.0.3:80"]),
                ("empty", vec![]),
                ("listed", vec!["10.0.0.1:80", "10.0.0.2:80"]),
            ])
        );
        validate::validate_with(&merged, References::Pending).unwrap();
        let registered_b = merged
            .iter()
            .find_map(|r| match r {
                Resource::Endpoints(e) if e.cluster == "listed" => {
                    e.endpoints.iter().find(|x| x.address == "10.0.0.2:80")
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(registered_b.identity, "spiffe://td/ns/b/sa/x", "a registration's identity reaches its endpoint");
    }
}
