//! The Kubernetes objects the automatic mesh is made of, read from their JSON: Services (their
//! cluster IPs and TCP ports), Pods (their service account, and whether they have Remora's
//! sidecar or are in Istio's ambient mesh), Namespaces (their settings, and whether Istio's ambient
//! mesh takes their pods), and EndpointSlices (which pods serve a Service, kept by
//! `sources::endpoint_slices`).
//!
//! Objects enter as the JSON of Kubernetes manifests (the GitOps directory's, or what the API
//! server answers); anything else among them (a Deployment, a ConfigMap) is left alone. Reading is
//! lenient where Kubernetes is (an absent `protocol` is TCP, an absent `clusterIP` a cluster IP
//! yet to be assigned) and skips what a mesh cannot serve (ExternalName Services, UDP and SCTP
//! ports).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use remora_control_api::validate::is_dns_label;
use serde_json::Value;
use tracing::warn;

use super::gateway::{BackendRef, GROUP, ReferenceGrant, Route, RouteKind};
use crate::inject::PROXY_CONTAINER;
use crate::sources::endpoint_slices::{PodRef, Slices, is_name, pod_account, tcp_ports};

/// A Service, as the mesh needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its cluster IPs (none for a headless Service, or one not yet assigned).
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`: clients reach the pods by their own addresses.
    pub headless: bool,
    /// Its TCP ports.
    pub ports: Vec<ServicePort>,
}

/// One TCP port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Its name (empty for a Service's single unnamed port).
    pub name: String,
    /// The port clients dial.
    pub port: u16,
    /// What it speaks, if the Service says (`http`, `kubernetes.io/h2c`, `grpc`...).
    pub app_protocol: String,
}

/// A Pod, as the mesh needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its service account (`default` when unset).
    pub account: String,
    /// Whether it has Remora's sidecar (a container or native-sidecar init container named
    /// `remora-proxy`): its inbound side then speaks the mesh's mTLS.
    pub meshed: bool,
    /// Its annotations under `remora.dev/` (the mesh's settings for it).
    pub settings: BTreeMap<String, String>,
    /// What its `istio.io/dataplane-mode` label says: `ambient` (Istio's ztunnel serves it,
    /// speaking HBONE), `none` (opted out of its namespace's ambient mode); unset, as its
    /// namespace says.
    pub ambient: Option<bool>,
}

/// The label by which Istio's ambient mode takes a namespace's pods (`ambient`), or a pod opts in
/// or out (`ambient`, `none`).
const AMBIENT_LABEL: &str = "istio.io/dataplane-mode";

/// The kinds of Kubernetes object the mesh reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `v1` Pod.
    Pod,
    /// `v1` Namespace.
    Namespace,
    /// `gateway.networking.k8s.io/v1` HTTPRoute.
    HttpRoute,
    /// `gateway.networking.k8s.io/v1` GRPCRoute.
    GrpcRoute,
    /// `gateway.networking.k8s.io/v1beta1` ReferenceGrant.
    ReferenceGrant,
}

impl ObjectKind {
    /// The kinds the mesh needs listed before it is made: every kind but the Gateway API's,
    /// whose CRDs a cluster may not have.
    pub const REQUIRED: [ObjectKind; 4] =
        [ObjectKind::Service, ObjectKind::EndpointSlice, ObjectKind::Pod, ObjectKind::Namespace];

    /// The kind of a Kubernetes object (as JSON), if the mesh reads it.
    pub fn of(object: &Value) -> Option<ObjectKind> {
        match (object["apiVersion"].as_str()?, object["kind"].as_str()?) {
            ("v1", "Service") => Some(ObjectKind::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(ObjectKind::EndpointSlice),
            ("v1", "Pod") => Some(ObjectKind::Pod),
            ("v1", "Namespace") => Some(ObjectKind::Namespace),
            (version, "HTTPRoute") if version.strip_prefix(GROUP).is_some_and(|v| v == "/v1" || v == "/v1beta1") => {
                Some(ObjectKind::HttpRoute)
            }
            (version, "GRPCRoute") if version.strip_prefix(GROUP).is_some_and(|v| v == "/v1" || v == "/v1alpha2") => {
                Some(ObjectKind::GrpcRoute)
            }
            (version, "ReferenceGrant")
                if version.strip_prefix(GROUP).is_some_and(|v| v == "/v1" || v == "/v1beta1") =>
            {
                Some(ObjectKind::ReferenceGrant)
            }
            _ => None,
        }
    }
}

/// A Namespace, as the mesh needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Its annotations under `remora.dev/` (the mesh's settings for it).
    pub settings: BTreeMap<String, String>,
    /// Whether it is labelled `istio.io/dataplane-mode: ambient`: Istio's ztunnel serves its pods.
    pub ambient: bool,
}

/// Every Service, Pod, EndpointSlice and Namespace of the mesh, kept one object at a time.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Services by `(namespace, name)`.
    pub services: BTreeMap<(String, String), Service>,
    /// Pods by UID.
    pub pods: BTreeMap<String, Pod>,
    /// The EndpointSlices, and the service accounts of the pods.
    pub slices: Slices,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// HTTPRoutes and GRPCRoutes by `(namespace, kind, name)`.
    pub routes: BTreeMap<RouteKey, Route>,
    /// The keys of the routes attached to each Service, by `(namespace, name)`.
    attached: BTreeMap<(String, String), BTreeSet<RouteKey>>,
    /// Each route's object as last told: what its status is written against.
    pub route_objects: BTreeMap<RouteKey, RouteObject>,
    /// ReferenceGrants by `(namespace, name)`.
    pub grants: BTreeMap<(String, String), ReferenceGrant>,
    /// What changed since [`Objects::take_changes`] last took it.
    changes: Changes,
}

/// A route's namespace, kind and name.
pub type RouteKey = (String, RouteKind, String);

/// What a route's status is written against: its object's version and generation, and its
/// `status.parents` now (every controller's).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteObject {
    /// `metadata.resourceVersion` (empty for a manifest from the directory).
    pub resource_version: String,
    /// `metadata.generation` (0 when not told).
    pub generation: i64,
    /// `status.parents`.
    pub parents: Vec<Value>,
}

/// What changed in the objects: which Services' resources must be made again, and whether the
/// inbound policies must (namespaces' and pods' settings, Services and pods coming or going).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Everything: a list replaced a kind, or other objects were added.
    pub all: bool,
    /// The Services, by `(namespace, name)`, that changed or whose slices did.
    pub services: BTreeSet<(String, String)>,
    /// The pods, by UID, whose service account or sidecar changed: the Services whose slices
    /// name one changed too.
    pub pods: BTreeSet<String>,
    /// Whether the inbound policies must be made again.
    pub policies: bool,
}

impl Changes {
    /// Whether nothing the mesh is made of changed (a route's status, say, may have).
    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty() && self.pods.is_empty() && !self.policies
    }
}

impl Objects {
    /// No objects yet; pods' identities in `trust_domain`.
    pub fn new(trust_domain: &str) -> Objects {
        Objects { slices: Slices::new(trust_domain), ..Objects::default() }
    }

    /// The objects among `objects` (Kubernetes objects as JSON; other kinds ignored); pods'
    /// identities in `trust_domain`.
    pub fn read(trust_domain: &str, objects: &[Value]) -> Objects {
        let mut read = Objects::new(trust_domain);
        for object in objects {
            read.apply(object);
        }
        read
    }

    /// Adds or replaces `object` (as JSON); whether anything the mesh reads changed. Objects of
    /// other kinds, and ones the mesh cannot serve (an ExternalName Service), change nothing (an
    /// object that turned into one is removed).
    pub fn apply(&mut self, object: &Value) -> bool {
        match ObjectKind::of(object) {
            Some(ObjectKind::Service) => match service(object) {
                Some(service) => {
                    let key = (service.namespace.clone(), service.name.clone());
                    let changed = self.services.get(&key) != Some(&service);
                    if changed {
                        self.changes.policies |= self.services.insert(key.clone(), service).is_none();
                        self.backend_changed(&key);
                        self.changes.services.insert(key);
                    }
                    changed
                }
                None => self.delete(object),
            },
            Some(ObjectKind::EndpointSlice) => self.slices.apply(object),
            Some(ObjectKind::Pod) => match pod(object) {
                Some((uid, pod)) => {
                    let account = self.slices.set_account(&uid, &pod.namespace, &pod.account);
                    let old = self.pods.insert(uid.clone(), pod.clone());
                    let meshed = old.as_ref().is_none_or(|old| old.meshed != pod.meshed || old.ambient != pod.ambient);
                    self.changes.policies |= old.as_ref().is_none_or(|old| old.settings != pod.settings);
                    if account || meshed {
                        self.changes.pods.insert(uid);
                    }
                    old.is_none_or(|old| old != pod) || account
                }
                None => false,
            },
            Some(ObjectKind::Namespace) => match namespace(object) {
                Some((name, namespace)) => {
                    let old = self.namespaces.insert(name.clone(), namespace.clone());
                    if old.as_ref().map_or(namespace.ambient, |old| old.ambient != namespace.ambient) {
                        // Its pods are reached another way: their Services are made again.
                        let pods = self.pods.iter().filter(|(_, pod)| pod.namespace == name);
                        self.changes.pods.extend(pods.map(|(uid, _)| uid.clone()));
                    }
                    let changed = old.is_none_or(|old| old != namespace);
                    self.changes.policies |= changed;
                    changed
                }
                None => false,
            },
            Some(ObjectKind::ReferenceGrant) => match ReferenceGrant::read(object) {
                Some(grant) => {
                    let key = (grant.namespace.clone(), grant.name.clone());
                    let changed = self.grants.insert(key, grant.clone()).is_none_or(|old| old != grant);
                    // Rare, and any route may be touched: everything is made again.
                    self.changes.all |= changed;
                    changed
                }
                None => false,
            },
            Some(kind @ (ObjectKind::HttpRoute | ObjectKind::GrpcRoute)) => match Route::read(route_kind(kind), object)
            {
                Some(route) => {
                    let key = (route.namespace.clone(), route.kind, route.name.clone());
                    let metadata = &object["metadata"];
                    let told = RouteObject {
                        resource_version: metadata["resourceVersion"].as_str().unwrap_or_default().to_owned(),
                        generation: metadata["generation"].as_i64().unwrap_or(0),
                        parents: object["status"]["parents"].as_array().cloned().unwrap_or_default(),
                    };
                    // Its version or status changing is news to the status writer, not to the mesh.
                    let told_changed =
                        self.route_objects.insert(key.clone(), told.clone()).is_none_or(|old| old != told);
                    if self.routes.get(&key) == Some(&route) {
                        return told_changed;
                    }
                    if let Err(problem) = &route.rules {
                        warn!(kind = key.1.as_str(), route = %format!("{}/{}", key.0, key.2), %problem, "route not applied");
                    }
                    if let Some(old) = self.routes.remove(&key) {
                        self.route_changed(&old);
                        self.index(&old, false);
                    }
                    self.route_changed(&route);
                    self.index(&route, true);
                    self.routes.insert(key, route);
                    true
                }
                None => false,
            },
            None => false,
        }
    }

    /// Adds `route` to (or takes it from) the index of each Service it attaches to.
    fn index(&mut self, route: &Route, add: bool) {
        let key = (route.namespace.clone(), route.kind, route.name.clone());
        for parent in &route.parents {
            let service = (parent.namespace.clone(), parent.name.clone());
            if add {
                self.attached.entry(service).or_default().insert(key.clone());
            } else if let Some(routes) = self.attached.get_mut(&service) {
                routes.remove(&key);
                if routes.is_empty() {
                    self.attached.remove(&service);
                }
            }
        }
    }

    /// Service `namespace/name` and its TCP port `port`, if both exist.
    pub fn service_port(&self, namespace: &str, name: &str, port: u16) -> Option<(&Service, &ServicePort)> {
        let service = self.services.get(&(namespace.to_owned(), name.to_owned()))?;
        Some((service, service.ports.iter().find(|p| p.port == port)?))
    }

    /// Whether `route` may send to `backend`: a Service of its own namespace, the Service it
    /// attaches to, or one a ReferenceGrant of the Service's namespace admits it to.
    pub fn permits(&self, route: &Route, backend: &BackendRef) -> bool {
        backend.namespace == route.namespace
            || route.parents.iter().any(|p| p.namespace == backend.namespace && p.name == backend.name)
            || self
                .grants
                .values()
                .any(|grant| grant.namespace == backend.namespace && grant.admits(route, &backend.name))
    }

    /// The HTTPRoutes attached to Service `namespace/name` (to any of its ports).
    pub fn routes_of(&self, namespace: &str, name: &str) -> impl Iterator<Item = &Route> {
        let key = (namespace.to_owned(), name.to_owned());
        self.attached.get(&key).into_iter().flatten().filter_map(|route| self.routes.get(route))
    }

    /// Notes that the Services `route` attaches to must be made again.
    fn route_changed(&mut self, route: &Route) {
        for parent in &route.parents {
            self.changes.services.insert((parent.namespace.clone(), parent.name.clone()));
        }
    }

    /// Notes that the Services whose routes send to Service `key` must be made again (it came,
    /// went or changed its ports).
    fn backend_changed(&mut self, key: &(String, String)) {
        let parents: Vec<(String, String)> = self
            .routes
            .values()
            .filter(|route| route.backend_services().any(|(ns, name)| ns == key.0 && name == key.1))
            .flat_map(|route| route.parents.iter().map(|p| (p.namespace.clone(), p.name.clone())))
            .collect();
        self.changes.services.extend(parents);
    }

    /// Removes the object `object` names; whether it was there.
    pub fn delete(&mut self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        let name = metadata["name"].as_str().unwrap_or_default();
        let namespace = metadata["namespace"].as_str().unwrap_or("default");
        match ObjectKind::of(object) {
            Some(ObjectKind::Service) => {
                let key = (namespace.to_owned(), name.to_owned());
                let removed = self.services.remove(&key).is_some();
                if removed {
                    self.backend_changed(&key);
                    self.changes.services.insert(key);
                    self.changes.policies = true;
                }
                removed
            }
            Some(ObjectKind::EndpointSlice) => self.slices.remove(object),
            Some(ObjectKind::Pod) => {
                let uid = metadata["uid"].as_str().unwrap_or_default();
                let account = self.slices.forget_account(uid);
                let removed = self.pods.remove(uid).is_some() || account;
                if removed {
                    self.changes.pods.insert(uid.to_owned());
                    self.changes.policies = true;
                }
                removed
            }
            Some(ObjectKind::Namespace) => {
                let removed = self.namespaces.remove(name).is_some();
                self.changes.policies |= removed;
                removed
            }
            Some(ObjectKind::ReferenceGrant) => {
                let removed = self.grants.remove(&(namespace.to_owned(), name.to_owned())).is_some();
                self.changes.all |= removed;
                removed
            }
            Some(kind @ (ObjectKind::HttpRoute | ObjectKind::GrpcRoute)) => {
                match self.routes.remove(&(namespace.to_owned(), route_kind(kind), name.to_owned())) {
                    Some(route) => {
                        self.route_changed(&route);
                        self.index(&route, false);
                        true
                    }
                    None => false,
                }
            }
            None => false,
        }
    }

    /// How many objects of `kind` are held.
    pub fn count(&self, kind: ObjectKind) -> usize {
        match kind {
            ObjectKind::Service => self.services.len(),
            ObjectKind::EndpointSlice => self.slices.len(),
            ObjectKind::Pod => self.pods.len(),
            ObjectKind::Namespace => self.namespaces.len(),
            ObjectKind::ReferenceGrant => self.grants.len(),
            ObjectKind::HttpRoute | ObjectKind::GrpcRoute => {
                let kind = route_kind(kind);
                self.routes.keys().filter(|(_, k, _)| *k == kind).count()
            }
        }
    }

    /// Forgets every object of `kind` (a fresh list replaces them).
    pub fn clear(&mut self, kind: ObjectKind) {
        // Nothing held, nothing changes: each object listed after is noted as it is applied.
        self.changes.all |= self.count(kind) > 0;
        match kind {
            ObjectKind::Service => self.services.clear(),
            ObjectKind::EndpointSlice => self.slices.clear(),
            ObjectKind::Pod => {
                self.pods.clear();
                self.slices.clear_accounts();
            }
            ObjectKind::Namespace => self.namespaces.clear(),
            ObjectKind::ReferenceGrant => self.grants.clear(),
            ObjectKind::HttpRoute | ObjectKind::GrpcRoute => {
                let kind = route_kind(kind);
                let gone: Vec<Route> = self.routes.values().filter(|r| r.kind == kind).cloned().collect();
                for route in gone {
                    self.index(&route, false);
                    let key = (route.namespace.clone(), kind, route.name.clone());
                    self.routes.remove(&key);
                    self.route_objects.remove(&key);
                }
            }
        }
    }

    /// Adds `other`'s objects (those of `self` win where both have one).
    pub fn extend(&mut self, other: &Objects) {
        self.changes.all = true;
        for (key, service) in &other.services {
            self.services.entry(key.clone()).or_insert_with(|| service.clone());
        }
        for (uid, pod) in &other.pods {
            self.pods.entry(uid.clone()).or_insert_with(|| pod.clone());
        }
        for (name, namespace) in &other.namespaces {
            self.namespaces.entry(name.clone()).or_insert_with(|| namespace.clone());
        }
        for (key, grant) in &other.grants {
            self.grants.entry(key.clone()).or_insert_with(|| grant.clone());
        }
        for (key, route) in &other.routes {
            if !self.routes.contains_key(key) {
                self.index(route, true);
                self.routes.insert(key.clone(), route.clone());
                if let Some(told) = other.route_objects.get(key) {
                    self.route_objects.insert(key.clone(), told.clone());
                }
            }
        }
        self.slices.extend(&other.slices);
    }

    /// What changed since this was last called; from then on, nothing has.
    pub fn take_changes(&mut self) -> Changes {
        let mut changes = std::mem::take(&mut self.changes);
        changes.services.extend(self.slices.take_touched());
        changes
    }

    /// The pod a slice endpoint names, if it is known.
    pub fn pod(&self, pod: &PodRef) -> Option<&Pod> {
        self.pods.get(&pod.uid).filter(|known| known.namespace == pod.namespace && known.name == pod.name)
    }

    /// Whether Istio's ambient mesh serves `pod` (its ztunnel answering HBONE for it): the pod
    /// says so, or its namespace does and the pod does not opt out. A pod with Remora's sidecar
    /// is Remora's.
    pub fn is_ambient(&self, pod: &Pod) -> bool {
        !pod.meshed && pod.ambient.unwrap_or_else(|| self.namespaces.get(&pod.namespace).is_some_and(|ns| ns.ambient))
    }
}

/// What an object's `istio.io/dataplane-mode` label says: `Some(true)` for `ambient`,
/// `Some(false)` for `none`, else nothing.
fn ambient_label(object: &Value) -> Option<bool> {
    match object["metadata"]["labels"][AMBIENT_LABEL].as_str()? {
        "ambient" => Some(true),
        "none" => Some(false),
        _ => None,
    }
}

/// The route kind of a route object kind.
fn route_kind(kind: ObjectKind) -> RouteKind {
    if kind == ObjectKind::GrpcRoute { RouteKind::Grpc } else { RouteKind::Http }
}

fn namespace(object: &Value) -> Option<(String, Namespace)> {
    let name = object["metadata"]["name"].as_str().filter(|name| is_name(name))?;
    let ambient = ambient_label(object) == Some(true);
    Some((name.to_owned(), Namespace { settings: settings(object), ambient }))
}

/// An object's annotations under `remora.dev/`.
fn settings(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, _)| key.starts_with("remora.dev/"))
        .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
        .collect()
}

fn service(object: &Value) -> Option<Service> {
    let metadata = &object["metadata"];
    let namespace = metadata["namespace"].as_str().unwrap_or("default");
    let name = metadata["name"].as_str()?;
    let spec = &object["spec"];
    if !is_dns_label(namespace) || !is_dns_label(name) || spec["type"].as_str() == Some("ExternalName") {
        return None;
    }
    let headless = spec["clusterIP"].as_str() == Some("None");
    let mut cluster_ips: Vec<IpAddr> = spec["clusterIPs"]
        .as_array()
        .map(|ips| ips.iter().filter_map(Value::as_str).filter_map(|ip| ip.parse().ok()).collect())
        .unwrap_or_default();
    if let Some(ip) = spec["clusterIP"].as_str().and_then(|ip| ip.parse().ok())
        && !cluster_ips.contains(&ip)
    {
        cluster_ips.insert(0, ip);
    }
    // A Service, or a port, whose name the API server would refuse (not a DNS label) is left out, as
    // if never written: a manifest in the directory is not checked by the API server.
    let mut seen = BTreeSet::new();
    let ports = tcp_ports(&spec["ports"])
        .filter_map(|p| {
            let name = p["name"].as_str().unwrap_or_default();
            if !name.is_empty() && !is_dns_label(name) {
                return None;
            }
            Some(ServicePort {
                name: name.to_owned(),
                // A port number given twice (which the API server refuses) counts once, the first.
                port: u16::try_from(p["port"].as_u64()?).ok().filter(|port| *port > 0 && seen.insert(*port))?,
                app_protocol: p["appProtocol"].as_str().unwrap_or_default().to_owned(),
            })
        })
        .collect();
    Some(Service { namespace: namespace.to_owned(), name: name.to_owned(), cluster_ips, headless, ports })
}

fn pod(object: &Value) -> Option<(String, Pod)> {
    let metadata = &object["metadata"];
    let (uid, account) = pod_account(object)?;
    let namespace = metadata["namespace"].as_str().unwrap_or("default");
    let name = metadata["name"].as_str()?;
    let spec = &object["spec"];
    let named = |list: &Value| list.as_array().is_some_and(|c| c.iter().any(|c| c["name"] == PROXY_CONTAINER));
    let meshed = named(&spec["containers"]) || named(&spec["initContainers"]);
    let pod = Pod {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        account,
        meshed,
        settings: settings(object),
        ambient: ambient_label(object),
    };
    Some((uid, pod))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn services_keep_their_tcp_ports_and_cluster_ips() {
        let objects = [
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "web"},
                   "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"], "ports": [
                       {"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"},
                       {"name": "dns", "port": 53, "protocol": "UDP"},
                       {"name": "grpc", "port": 9090, "protocol": "TCP", "appProtocol": "grpc"},
                       {"name": "Not A Port Name", "port": 81},
                       {"name": "again", "port": 80}]}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "db"},
                   "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "ext"},
                   "spec": {"type": "ExternalName", "externalName": "example.com"}}),
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}),
        ];
        let read = Objects::read("cluster.local", &objects);
        assert_eq!(read.services.len(), 2, "{:?}", read.services.keys());
        let web = &read.services[&("shop".to_owned(), "web".to_owned())];
        assert_eq!(web.cluster_ips, ["10.96.0.10".parse::<IpAddr>().unwrap(), "fd00::10".parse().unwrap()]);
        let ports: Vec<(&str, u16, &str)> =
            web.ports.iter().map(|p| (p.name.as_str(), p.port, p.app_protocol.as_str())).collect();
        assert_eq!(ports, [("http", 80, "http"), ("grpc", 9090, "grpc")]);
        let db = &read.services[&("shop".to_owned(), "db".to_owned())];
        assert!(db.headless && db.cluster_ips.is_empty());
    }

    #[test]
    fn pods_are_meshed_by_their_sidecar() {
        let objects = [
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "shop", "name": "a", "uid": "u1"},
                   "spec": {"serviceAccountName": "web", "containers": [{"name": "app"}, {"name": "remora-proxy"}]}}),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "shop", "name": "b", "uid": "u2"},
                   "spec": {"initContainers": [{"name": "remora-proxy", "restartPolicy": "Always"}], "containers": [{"name": "app"}]}}),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "shop", "name": "c", "uid": "u3"},
                   "spec": {"containers": [{"name": "app"}]}}),
        ];
        let read = Objects::read("cluster.local", &objects);
        let meshed: Vec<(&str, &str, bool)> =
            read.pods.values().map(|p| (p.name.as_str(), p.account.as_str(), p.meshed)).collect();
        assert_eq!(meshed, [("a", "web", true), ("b", "default", true), ("c", "default", false)]);
    }
}
