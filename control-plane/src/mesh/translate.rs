//! Services into resources: a cluster, its endpoints and a route table per Service port, as the
//! module documentation of `mesh` describes; what the operator wrote replaces what would be made.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use remora_control_api::validate::Destination;
use remora_control_api::{Resource, v1};

use super::claims::{Claims, Key};
use super::gateway;
use super::objects::{Changes, Objects, Pod, Service, ServicePort};
use crate::inject::INBOUND_ANNOTATION;

/// What the translation needs besides the objects.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The trust domain of pods' identities (`spiffe://TRUST-DOMAIN/ns/NS/sa/SA`, what the CA
    /// issues for a service-account token).
    pub trust_domain: String,
    /// The cluster's DNS domain (`cluster.local`): Services' full names end in `.svc.DOMAIN`.
    pub cluster_domain: String,
    /// The port of meshed pods' HBONE listeners, over which opaque TCP to them rides (0: a TLS
    /// connection per TCP connection instead), and of Istio ambient pods' (their ztunnel's), over
    /// which HTTP rides too (0: ambient pods are called in plaintext).
    pub hbone_port: u16,
    /// The UDP port of meshed pods' HBONE-over-QUIC listeners, over which opaque TCP to them rides
    /// first (falling back to `hbone_port` where UDP does not get through); 0 (the default): no QUIC.
    pub quic_port: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            hbone_port: 15008,
            quic_port: 0,
        }
    }
}

/// The name of the inbound policy the mesh makes.
pub const INBOUND_POLICY: &str = "remora-inbound";
/// The listener it guards: the built-in defaults' inbound listener, which injected sidecars run.
pub const INBOUND_LISTENER: &str = "inbound";

/// What the automatic mesh makes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Made {
    /// What every proxy sees.
    pub shared: Vec<Resource>,
    /// What only each scope's proxies see (a namespace's, `NAMESPACE`; a pod's, `NAMESPACE/POD`):
    /// a namespace's Services' route tables again, with the short names (`NAME:PORT`) cluster DNS
    /// resolves within it, and the inbound policy of a namespace or pod that differs from its
    /// surroundings, each in place of the shared one.
    pub scoped: BTreeMap<String, Vec<Resource>>,
}

/// The resources the automatic mesh makes of `objects`, leaving out what `written` (the operator's
/// resources) replaces: see the module documentation. Deterministic: the same objects always make
/// the same resources, in the same order.
pub fn resources(objects: &Objects, written: &[Resource], settings: &Settings) -> Made {
    Mesh::make(objects, written, settings).made()
}

/// The automatic mesh as last made, kept per Service, so that a change to a few objects makes
/// again only the Services it touched ([`Mesh::remake`]) instead of every Service of the cluster.
#[derive(Debug, Default)]
pub struct Mesh {
    /// What each Service made, by `(namespace, name)`, before [`Claims::resolve`].
    services: BTreeMap<Key, Made>,
    /// The addresses their route tables claim.
    claims: Claims,
    /// The inbound policies.
    policies: Made,
}

/// What [`Mesh::remake`] made again: the resources of the Services it made again (and the
/// policies) before, and after. A resource of `before` missing from `after` is gone.
#[derive(Debug, Default)]
pub struct Remade {
    /// What they made before.
    pub before: Made,
    /// What they make now.
    pub after: Made,
}

impl Mesh {
    /// The mesh of `objects`: see [`resources`].
    pub fn make(objects: &Objects, written: &[Resource], settings: &Settings) -> Mesh {
        let written = Written::new(written);
        let services: BTreeMap<Key, Made> = objects
            .services
            .iter()
            .map(|(key, service)| (key.clone(), service_resources(objects, service, &written, settings)))
            .collect();
        let mut claims = Claims::default();
        for (key, made) in &services {
            claims.add(key, made);
        }
        Mesh { services, claims, policies: inbound_policies(objects, written.resources, settings) }
    }

    /// The route tables the Service `(namespace, name)` made: every caller's, and those only
    /// `caller_namespace`'s proxies see.
    pub fn route_tables_of<'a>(
        &'a self,
        service: &Key,
        caller_namespace: &str,
    ) -> impl Iterator<Item = &'a v1::RouteTable> + use<'a> {
        let made = self.services.get(service);
        let own = made.and_then(|made| made.scoped.get(caller_namespace));
        let resources = made.map(|made| made.shared.iter()).into_iter().flatten().chain(own.into_iter().flatten());
        resources.filter_map(|resource| match resource {
            Resource::RouteTable(table) => Some(table),
            _ => None,
        })
    }

    /// Every resource, in the order [`resources`] makes them.
    pub fn made(&self) -> Made {
        let mut made = Made::default();
        for (key, each) in &self.services {
            made.extend(self.claims.resolve(key, each));
        }
        made.extend(self.policies.clone());
        made
    }

    /// Makes again what `changes` touched, as [`Mesh::make`] would of `objects` and `written` (the
    /// same `written` as before: a change to the operator's resources calls for `make`).
    pub fn remake(
        &mut self,
        objects: &Objects,
        written: &[Resource],
        settings: &Settings,
        changes: &Changes,
    ) -> Remade {
        let written = Written::new(written);
        let mut keys = changes.services.clone();
        if !changes.pods.is_empty() {
            keys.extend(objects.slices.services_naming(&changes.pods));
        }
        // The Services made again, and every Service sharing an address with them before or after:
        // which of them owns a shared address may change, and with it their tables.
        let fresh: Vec<(Key, Option<Made>)> = keys
            .into_iter()
            .map(|key| {
                let made =
                    objects.services.get(&key).map(|service| service_resources(objects, service, &written, settings));
                (key, made)
            })
            .collect();
        let mut affected: BTreeSet<Key> = BTreeSet::new();
        for (key, made) in &fresh {
            affected.insert(key.clone());
            affected.extend(self.services.get(key).map(|old| self.claims.sharing(old)).unwrap_or_default());
            affected.extend(made.as_ref().map(|new| self.claims.sharing(new)).unwrap_or_default());
        }
        let mut remade = Remade::default();
        for key in &affected {
            if let Some(before) = self.services.get(key) {
                remade.before.extend(self.claims.resolve(key, before));
            }
        }
        for (key, made) in fresh {
            if let Some(old) = self.services.remove(&key) {
                self.claims.remove(&key, &old);
            }
            if let Some(new) = made {
                self.claims.add(&key, &new);
                self.services.insert(key, new);
            }
        }
        for key in &affected {
            if let Some(after) = self.services.get(key) {
                remade.after.extend(self.claims.resolve(key, after));
            }
        }
        if changes.policies {
            let policies = inbound_policies(objects, written.resources, settings);
            remade.before.extend(std::mem::replace(&mut self.policies, policies.clone()));
            remade.after.extend(policies);
        }
        remade
    }
}

impl Made {
    /// Adds `other`'s resources after these.
    pub(super) fn extend(&mut self, other: Made) {
        self.shared.extend(other.shared);
        for (scope, resources) in other.scoped {
            self.scoped.entry(scope).or_default().extend(resources);
        }
    }
}

/// The operator's resources, as the translation consults them.
struct Written<'a> {
    resources: &'a [Resource],
    /// The clusters' names.
    clusters: HashSet<&'a str>,
    /// The destinations of the outbound route tables.
    claimed: HashSet<Destination>,
}

impl<'a> Written<'a> {
    fn new(resources: &'a [Resource]) -> Written<'a> {
        let clusters = resources
            .iter()
            .filter_map(|r| match r {
                Resource::Cluster(c) => Some(c.name.as_str()),
                _ => None,
            })
            .collect();
        let claimed = resources
            .iter()
            .filter_map(|r| match r {
                Resource::RouteTable(t) if t.direction() != v1::route_table::Direction::Inbound => {
                    Some(&t.destinations)
                }
                _ => None,
            })
            .flatten()
            .filter_map(|d| Destination::parse(d).ok())
            .collect();
        Written { resources, clusters, claimed }
    }

    /// The cluster requests for `port` of `service` go to: the operator's that names the port, the
    /// operator's of the automatic cluster's name, or the automatic one.
    fn backend_for(&self, service: &Service, port: &ServicePort) -> String {
        self.cluster_for(service, port).map_or_else(|| cluster_name(service, port), str::to_owned)
    }

    /// The name of the operator's cluster for `port` of `service`, if one names it (by port name
    /// or number).
    fn cluster_for(&self, service: &Service, port: &ServicePort) -> Option<&'a str> {
        self.resources.iter().find_map(|r| match r {
            Resource::Cluster(c) => c
                .kubernetes_service
                .as_ref()
                .filter(|k| {
                    k.namespace == service.namespace
                        && k.name == service.name
                        && (k.port == port.name
                            || k.port == port.port.to_string()
                            || (k.port.is_empty() && service.ports.len() == 1))
                })
                .map(|_| c.name.as_str()),
            _ => None,
        })
    }
}

/// What one Service makes: per port, its cluster and endpoints (unless the operator wrote the
/// cluster) and its route table (unless the operator's tables claim one of its destinations).
fn service_resources(objects: &Objects, service: &Service, written: &Written<'_>, settings: &Settings) -> Made {
    let mut made = Made::default();
    for port in &service.ports {
        let name = cluster_name(service, port);
        let backend = written.backend_for(service, port);
        if backend == name && !written.clusters.contains(name.as_str()) {
            made.shared.extend(cluster(objects, service, port, &name, settings));
        }
        let mut table = route_table(objects, service, port, &name, &backend, settings);
        let taken =
            table.destinations.iter().filter_map(|d| Destination::parse(d).ok()).any(|d| claims(&written.claimed, &d));
        if taken || table.destinations.is_empty() {
            continue;
        }
        // Gateway API routes attached to the port are its routes: the producer's for every caller,
        // a consumer namespace's for its own callers.
        let resolve = |route: &gateway::Route, backend: &gateway::BackendRef| {
            if !objects.permits(route, backend) {
                return None;
            }
            let (service, port) = objects.service_port(&backend.namespace, &backend.name, backend.port)?;
            Some(written.backend_for(service, port))
        };
        let routes = objects.routes_of(&service.namespace, &service.name);
        let attached = gateway::attached(routes, (&service.namespace, &service.name, port.port), &backend, &resolve);
        if let Some(routes) = attached.producer {
            table.routes = routes;
        }
        for (consumer, routes) in attached.consumers {
            let own = v1::RouteTable { routes, ..table.clone() };
            made.scoped.entry(consumer).or_default().push(Resource::RouteTable(own));
        }
        let short = format!("{}:{}", service.name, port.port);
        if Destination::parse(&short).is_ok_and(|d| !claims(&written.claimed, &d)) {
            let mut own = table.clone();
            own.destinations.push(short);
            made.scoped.entry(service.namespace.clone()).or_default().push(Resource::RouteTable(own));
        }
        made.shared.push(Resource::RouteTable(table));
    }
    made
}

/// The inbound side's policy: permissive everywhere (mTLS and plaintext both accepted, counted
/// apart), strict in a namespace or pod annotated `remora.dev/inbound: strict` (a pod's annotation
/// wins over its namespace's; any value but `permissive` is strict, so a typo never opens a port).
/// Either way every identity of the trust domain may call; an `AuthorizationPolicy` the operator
/// writes for the whole inbound listener decides instead, everywhere.
fn inbound_policies(objects: &Objects, written: &[Resource], settings: &Settings) -> Made {
    let mut made = Made::default();
    let operators = written
        .iter()
        .any(|r| matches!(r, Resource::AuthorizationPolicy(p) if p.listener == INBOUND_LISTENER && p.port == 0));
    if operators || (objects.services.is_empty() && objects.pods.is_empty()) {
        return made;
    }
    let strict =
        |annotations: &BTreeMap<String, String>| annotations.get(INBOUND_ANNOTATION).map(|mode| mode != "permissive");
    let policy = |mode: v1::authorization_policy::Mode| {
        let mut policy = v1::AuthorizationPolicy {
            name: INBOUND_POLICY.to_owned(),
            listener: INBOUND_LISTENER.to_owned(),
            allow: vec![format!("spiffe://{}/*", settings.trust_domain)],
            ..Default::default()
        };
        policy.set_mode(mode);
        Resource::AuthorizationPolicy(policy)
    };
    let of = |strict: bool| {
        policy(if strict { v1::authorization_policy::Mode::Strict } else { v1::authorization_policy::Mode::Permissive })
    };
    made.shared.push(of(false));
    for (name, namespace) in &objects.namespaces {
        if strict(&namespace.settings) == Some(true) {
            made.scoped.entry(name.clone()).or_default().push(of(true));
        }
    }
    // Pods by name: two pod objects of one name (an old one and its replacement, by UID) make one
    // scope, strict if either is.
    let mut pods: BTreeMap<String, bool> = BTreeMap::new();
    for pod in objects.pods.values() {
        let around = objects.namespaces.get(&pod.namespace).and_then(|ns| strict(&ns.settings)).unwrap_or(false);
        if let Some(own) = strict(&pod.settings).filter(|own| *own != around) {
            pods.entry(format!("{}/{}", pod.namespace, pod.name)).and_modify(|s| *s |= own).or_insert(own);
        }
    }
    for (scope, own) in pods {
        made.scoped.entry(scope).or_default().push(of(own));
    }
    made
}

/// Whether the operator's `claimed` destinations take `destination`: the same one, or (for a host
/// and port) the host on any port.
fn claims(claimed: &HashSet<Destination>, destination: &Destination) -> bool {
    claimed.contains(destination)
        || matches!(destination, Destination::HostPort(host, _) if claimed.contains(&Destination::Host(host.clone())))
}

/// `NAMESPACE/NAME:PORT`: the cluster and route table of one Service port, by the port clients dial.
fn cluster_name(service: &Service, port: &ServicePort) -> String {
    format!("{}/{}:{}", service.namespace, service.name, port.port)
}

/// The service a cluster's endpoints come from, by the port's name (or its number, when unnamed
/// ports make the slices' port names empty).
fn kubernetes_service(service: &Service, port: &ServicePort) -> v1::KubernetesService {
    v1::KubernetesService { namespace: service.namespace.clone(), name: service.name.clone(), port: port.name.clone() }
}

/// A port's cluster and its endpoints.
fn cluster(objects: &Objects, service: &Service, port: &ServicePort, name: &str, settings: &Settings) -> [Resource; 2] {
    let endpoints = objects.slices.endpoints_with_pods(&kubernetes_service(service, port));
    // Mutual TLS when every pod behind the port has the sidecar (a pod without one could not answer
    // it); a Service part-way through its first rollout with sidecars stays plaintext until it is
    // done. Pods of Istio's ambient mesh answer HBONE (their ztunnel does), and so do Remora's
    // sidecars: a port whose pods are all one or the other, some ambient, is reached with HTTP
    // over HBONE too.
    let pods: Vec<Option<&Pod>> = endpoints.iter().map(|(_, pod)| pod.and_then(|pod| objects.pod(pod))).collect();
    let meshed = !pods.is_empty() && pods.iter().all(|pod| pod.is_some_and(|pod| pod.meshed));
    let ambient = settings.hbone_port != 0
        && !pods.is_empty()
        && pods.iter().all(|pod| pod.is_some_and(|pod| pod.meshed || objects.is_ambient(pod)))
        && pods.iter().flatten().any(|pod| objects.is_ambient(pod));
    let mut cluster = v1::Cluster {
        name: name.to_owned(),
        kubernetes_service: Some(Box::new(kubernetes_service(service, port))),
        ..Default::default()
    };
    cluster.set_balancer(v1::cluster::Balancer::Ewma);
    cluster.set_protocol(match port.app_protocol.as_str() {
        "kubernetes.io/h2c" | "grpc" | "http2" => v1::cluster::Protocol::Http2,
        "http" | "kubernetes.io/ws" => v1::cluster::Protocol::Http1,
        _ => v1::cluster::Protocol::Auto,
    });
    if meshed {
        cluster.set_tls(v1::cluster::Tls::Mesh);
        cluster.hbone_port = u32::from(settings.hbone_port);
        cluster.quic_port = u32::from(settings.quic_port);
    } else if ambient {
        // No QUIC: ztunnel speaks none.
        cluster.set_tls(v1::cluster::Tls::Mesh);
        cluster.hbone_port = u32::from(settings.hbone_port);
        cluster.http_over_hbone = true;
    }
    let endpoints = v1::Endpoints {
        cluster: name.to_owned(),
        endpoints: endpoints.into_iter().map(|(endpoint, _)| endpoint).collect(),
    };
    [Resource::Cluster(cluster), Resource::Endpoints(endpoints)]
}

/// A port's route table: its destinations, every request to `backend`.
fn route_table(
    objects: &Objects,
    service: &Service,
    port: &ServicePort,
    name: &str,
    backend: &str,
    settings: &Settings,
) -> v1::RouteTable {
    let mut destinations = BTreeSet::new();
    for ip in &service.cluster_ips {
        destinations.insert(std::net::SocketAddr::new(*ip, port.port).to_string());
    }
    if service.headless {
        // Clients dial the pods themselves: their addresses on the target port are the destinations.
        for (endpoint, _) in objects.slices.endpoints_with_pods(&kubernetes_service(service, port)) {
            destinations.insert(endpoint.address);
        }
    }
    let (namespace, service_name, domain) = (&service.namespace, &service.name, &settings.cluster_domain);
    // A Host without a port is on the original destination's port, else 80: `web.shop` alone is
    // `web.shop:80`, which the port-80 table claims.
    for host in [
        format!("{service_name}.{namespace}"),
        format!("{service_name}.{namespace}.svc"),
        format!("{service_name}.{namespace}.svc.{domain}"),
    ] {
        destinations.insert(format!("{host}:{}", port.port));
    }
    let route = v1::Route {
        backends: vec![v1::WeightedCluster { cluster: backend.to_owned(), ..Default::default() }],
        ..Default::default()
    };
    let mut table = v1::RouteTable {
        name: name.to_owned(),
        destinations: destinations.into_iter().collect(),
        routes: vec![route],
        tcp_cluster: backend.to_owned(),
        // A port that says it carries plain TCP is not read before it is forwarded: its server may
        // speak first.
        opaque: port.app_protocol == "tcp",
        ..Default::default()
    };
    // Callers' routing: on the inbound side of the Service's own pods, a request for its name is
    // for the app there.
    table.set_direction(v1::route_table::Direction::Outbound);
    table
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::{Value, json};

    use super::*;

    fn objects() -> Vec<Value> {
        vec![
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "web"},
                   "spec": {"clusterIP": "10.96.0.10", "ports": [
                       {"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"},
                       {"name": "grpc", "port": 9090, "appProtocol": "grpc"}]}}),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"namespace": "shop", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
                   "addressType": "IPv4",
                   "ports": [{"name": "http", "port": 8080}, {"name": "grpc", "port": 9090}],
                   "endpoints": [
                       {"addresses": ["10.1.0.5"], "conditions": {"ready": true}, "zone": "a",
                        "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-a", "uid": "u1"}},
                       {"addresses": ["10.1.0.6"], "conditions": {"ready": false, "terminating": true},
                        "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-b", "uid": "u2"}}]}),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "shop", "name": "web-a", "uid": "u1"},
                   "spec": {"serviceAccountName": "web", "containers": [{"name": "app"}, {"name": "remora-proxy"}]}}),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "shop", "name": "web-b", "uid": "u2"},
                   "spec": {"serviceAccountName": "web", "containers": [{"name": "app"}, {"name": "remora-proxy"}]}}),
        ]
    }

    fn made(objects: &[Value], written: &[Resource]) -> Vec<Resource> {
        resources(&Objects::read("cluster.local", objects), written, &Settings::default()).shared
    }

    fn find<'a>(resources: &'a [Resource], kind: remora_control_api::Kind, name: &str) -> Option<&'a Resource> {
        resources.iter().find(|r| r.kind() == kind && r.name() == name)
    }

    /// Remaking only what the noted changes touched gives what making everything whole gives:
    /// after a slice change, a pod losing its sidecar, a new Service and a Service gone, a
    /// namespace turned strict; and what was remade is the touched Services' resources alone.
    #[test]
    fn remaking_what_changed_equals_making_it_whole() {
        use remora_control_api::Kind;
        let settings = Settings::default();
        let manifests = objects();
        let mut objects = Objects::read("cluster.local", &manifests);
        let api = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "api"},
                         "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 8080}]}});
        objects.apply(&api);
        let mut mesh = Mesh::make(&objects, &[], &settings);
        objects.take_changes();
        let mut check = |objects: &mut Objects, touched: &[&str]| {
            let changes = objects.take_changes();
            assert!(!changes.all);
            let remade = mesh.remake(objects, &[], &settings, &changes);
            assert_eq!(mesh.made(), Mesh::make(objects, &[], &settings).made());
            let tables: BTreeSet<&str> = remade
                .before
                .shared
                .iter()
                .chain(&remade.after.shared)
                .filter(|r| r.kind() == Kind::RouteTable)
                .map(Resource::name)
                .collect();
            assert_eq!(tables.into_iter().collect::<Vec<_>>(), touched);
        };
        let mut slice = manifests[1].clone();
        slice["endpoints"][1]["conditions"] = json!({"ready": true});
        objects.apply(&slice);
        check(&mut objects, &["shop/web:80", "shop/web:9090"]);
        let mut pod = manifests[3].clone();
        pod["spec"]["containers"] = json!([{"name": "app"}]);
        objects.apply(&pod);
        check(&mut objects, &["shop/web:80", "shop/web:9090"]);
        objects.delete(&api);
        objects.apply(&json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "db"},
                              "spec": {"clusterIP": "10.96.0.12", "ports": [{"port": 5432, "appProtocol": "tcp"}]}}));
        check(&mut objects, &["shop/api:8080", "shop/db:5432"]);
        objects.apply(&json!({"apiVersion": "v1", "kind": "Namespace",
                              "metadata": {"name": "shop", "annotations": {"remora.dev/inbound": "strict"}}}));
        check(&mut objects, &[]);
        // The namespace joins Istio's ambient mesh: its pods are reached another way.
        objects.apply(&json!({"apiVersion": "v1", "kind": "Namespace",
                              "metadata": {"name": "shop", "annotations": {"remora.dev/inbound": "strict"},
                                           "labels": {"istio.io/dataplane-mode": "ambient"}}}));
        check(&mut objects, &["shop/web:80", "shop/web:9090"]);
        assert!(mesh.made().scoped["shop"].iter().any(|r| r.kind() == Kind::AuthorizationPolicy));
    }

    /// Pods of Istio's ambient mesh (by their namespace's label, or their own) are reached over
    /// HBONE, HTTP included, with their service accounts' identities, alone or beside pods with
    /// Remora's sidecar; a pod that opts out, or HBONE turned off, leaves the port in plaintext.
    #[test]
    fn ambient_pods_are_reached_over_hbone() {
        use remora_control_api::Kind;
        let mut objects = objects();
        for pod in [2, 3] {
            objects[pod]["spec"]["containers"] = json!([{"name": "app"}]);
        }
        let cluster = |objects: &[Value], settings: &Settings| {
            let made = resources(&Objects::read("cluster.local", objects), &[], settings).shared;
            let Some(Resource::Cluster(cluster)) = find(&made, Kind::Cluster, "shop/web:80") else { panic!() };
            let Some(Resource::Endpoints(endpoints)) = find(&made, Kind::Endpoints, "shop/web:80") else { panic!() };
            (cluster.clone(), endpoints.endpoints[0].identity.clone())
        };
        let plain = cluster(&objects, &Settings::default()).0;
        assert_eq!(plain.tls(), v1::cluster::Tls::None, "no sidecar, no ambient mesh");
        objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}));
        let (ambient, identity) = cluster(&objects, &Settings::default());
        assert_eq!(ambient.tls(), v1::cluster::Tls::Mesh);
        assert_eq!((ambient.hbone_port, ambient.http_over_hbone, ambient.quic_port), (15008, true, 0));
        assert_eq!(identity, "spiffe://cluster.local/ns/shop/sa/web");
        objects[3]["spec"]["containers"] = json!([{"name": "app"}, {"name": "remora-proxy"}]);
        assert!(cluster(&objects, &Settings::default()).0.http_over_hbone, "a Remora pod beside an ambient one");
        let quic = Settings { quic_port: 15008, ..Settings::default() };
        assert_eq!(cluster(&objects, &quic).0.quic_port, 0, "ztunnel speaks no QUIC");
        let no_hbone = Settings { hbone_port: 0, ..Settings::default() };
        assert_eq!(cluster(&objects, &no_hbone).0.tls(), v1::cluster::Tls::None);
        objects[2]["metadata"]["labels"] = json!({"istio.io/dataplane-mode": "none"});
        assert_eq!(cluster(&objects, &Settings::default()).0.tls(), v1::cluster::Tls::None, "a pod opted out");
        objects[2]["metadata"]["labels"] = json!({"istio.io/dataplane-mode": "ambient"});
        objects.pop();
        assert!(cluster(&objects, &Settings::default()).0.http_over_hbone, "a pod opted in");
    }

    /// Two Services claiming one address (one cluster IP given twice by hand here; two headless
    /// Services over the same pods alike) leave it to the first by namespace and name, and the
    /// set still validates; when the first goes, remaking it hands the address to the other.
    #[test]
    fn an_address_two_services_claim_goes_to_the_first() {
        use remora_control_api::Kind;
        let settings = Settings::default();
        let mut manifests = objects();
        let alias = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "alias"},
                           "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}});
        manifests.push(alias.clone());
        let mut objects = Objects::read("cluster.local", &manifests);
        let mut mesh = Mesh::make(&objects, &[], &settings);
        let made = mesh.made();
        remora_control_api::validate::validate(&made.shared).unwrap();
        let destinations = |made: &[Resource], name: &str| match find(made, Kind::RouteTable, name) {
            Some(Resource::RouteTable(table)) => table.destinations.clone(),
            other => panic!("{other:?}"),
        };
        assert!(destinations(&made.shared, "shop/alias:80").contains(&"10.96.0.10:80".to_owned()));
        let web = destinations(&made.shared, "shop/web:80");
        assert!(!web.contains(&"10.96.0.10:80".to_owned()) && web.contains(&"web.shop:80".to_owned()), "{web:?}");
        for view in made.scoped.values() {
            let mut all = made.shared.clone();
            all.retain(|r| !view.iter().any(|v| v.kind() == r.kind() && v.name() == r.name()));
            all.extend(view.iter().cloned());
            remora_control_api::validate::validate(&all).unwrap();
        }

        objects.take_changes();
        objects.delete(&alias);
        let changes = objects.take_changes();
        let remade = mesh.remake(&objects, &[], &settings, &changes);
        assert_eq!(mesh.made(), Mesh::make(&objects, &[], &settings).made());
        assert!(destinations(&remade.after.shared, "shop/web:80").contains(&"10.96.0.10:80".to_owned()));
        objects.apply(&alias);
        let changes = objects.take_changes();
        let remade = mesh.remake(&objects, &[], &settings, &changes);
        assert_eq!(mesh.made(), Mesh::make(&objects, &[], &settings).made());
        assert!(!destinations(&remade.after.shared, "shop/web:80").contains(&"10.96.0.10:80".to_owned()));
    }

    /// A port whose appProtocol is `tcp` is opaque: its table says so, so that listeners forward
    /// its connections without reading first; HTTP ports are not.
    #[test]
    fn a_tcp_port_is_opaque() {
        use remora_control_api::Kind;
        let mut objects = objects();
        objects[0]["spec"]["ports"][1]["appProtocol"] = json!("tcp");
        let made = made(&objects, &[]);
        let Some(Resource::RouteTable(tcp)) = find(&made, Kind::RouteTable, "shop/web:9090") else { panic!() };
        assert!(tcp.opaque && tcp.tcp_cluster == "shop/web:9090");
        let Some(Resource::RouteTable(http)) = find(&made, Kind::RouteTable, "shop/web:80") else { panic!() };
        assert!(!http.opaque);
        remora_control_api::validate::validate(&made).unwrap();
    }

    /// Each TCP port of a Service becomes a cluster (ewma, its appProtocol's version, mTLS when
    /// every pod has the sidecar), its endpoints (identities, health) and a route table claiming
    /// the cluster IP and the Service's names, for callers only; the whole set validates.
    #[test]
    fn every_service_port_is_meshed() {
        use remora_control_api::Kind;
        let made = made(&objects(), &[]);
        assert_eq!(made.len(), 7, "two ports, three resources each, and the inbound policy");
        let Some(Resource::Cluster(http)) = find(&made, Kind::Cluster, "shop/web:80") else { panic!("{made:?}") };
        assert_eq!(http.balancer(), v1::cluster::Balancer::Ewma);
        assert_eq!(http.protocol(), v1::cluster::Protocol::Http1);
        assert_eq!(http.tls(), v1::cluster::Tls::Mesh);
        let Some(Resource::Cluster(grpc)) = find(&made, Kind::Cluster, "shop/web:9090") else { panic!() };
        assert_eq!(grpc.protocol(), v1::cluster::Protocol::Http2);
        let Some(Resource::Endpoints(endpoints)) = find(&made, Kind::Endpoints, "shop/web:80") else { panic!() };
        let got: Vec<(&str, &str, v1::endpoint::Health)> =
            endpoints.endpoints.iter().map(|e| (e.address.as_str(), e.identity.as_str(), e.health())).collect();
        assert_eq!(
            got,
            [
                ("10.1.0.5:8080", "spiffe://cluster.local/ns/shop/sa/web", v1::endpoint::Health::Healthy),
                ("10.1.0.6:8080", "spiffe://cluster.local/ns/shop/sa/web", v1::endpoint::Health::Draining),
            ]
        );
        let Some(Resource::RouteTable(table)) = find(&made, Kind::RouteTable, "shop/web:80") else { panic!() };
        assert_eq!(
            table.destinations,
            ["10.96.0.10:80", "web.shop.svc.cluster.local:80", "web.shop.svc:80", "web.shop:80"]
        );
        assert_eq!(table.direction(), v1::route_table::Direction::Outbound);
        assert_eq!(table.tcp_cluster, "shop/web:80");
        let Some(Resource::RouteTable(grpc)) = find(&made, Kind::RouteTable, "shop/web:9090") else { panic!() };
        assert!(grpc.destinations.iter().all(|d| d.ends_with(":9090")), "{:?}", grpc.destinations);
        remora_control_api::validate::validate(&made).unwrap();
    }

    /// The Service's own namespace gets its tables again with the short name (`web:80`), which
    /// no other namespace sees and the operator's claim takes away.
    #[test]
    fn a_namespace_gets_its_services_short_names() {
        let objects = Objects::read("cluster.local", &objects());
        let made = resources(&objects, &[], &Settings::default());
        assert_eq!(made.scoped.keys().collect::<Vec<_>>(), ["shop"]);
        let own: Vec<(&str, &[String])> = made.scoped["shop"]
            .iter()
            .filter_map(|r| match r {
                Resource::RouteTable(t) => Some((t.name.as_str(), t.destinations.as_slice())),
                _ => None,
            })
            .collect();
        assert_eq!(own.len(), 2);
        assert_eq!(own[0].0, "shop/web:80");
        assert!(own[0].1.contains(&"web:80".to_owned()) && own[0].1.contains(&"web.shop:80".to_owned()));
        assert!(own[1].1.contains(&"web:9090".to_owned()));
        // The namespace's view validates: the shared set with its own tables in place.
        let mut view: Vec<Resource> = made
            .shared
            .iter()
            .filter(|r| !made.scoped["shop"].iter().any(|o| o.name() == r.name() && o.kind() == r.kind()))
            .cloned()
            .collect();
        view.extend(made.scoped["shop"].iter().cloned());
        remora_control_api::validate::validate(&view).unwrap();
        // An operator's table claiming the short name keeps it.
        let mine = v1::RouteTable { name: "mine".into(), destinations: vec!["web:80".into()], ..Default::default() };
        let made = resources(&objects, &[Resource::RouteTable(mine)], &Settings::default());
        assert!(made.scoped["shop"].iter().all(|r| r.name() != "shop/web:80"), "{:?}", made.scoped);
        assert!(
            made.shared.iter().any(|r| r.name() == "shop/web:80" && r.kind() == remora_control_api::Kind::RouteTable)
        );
    }

    /// Inbound is permissive everywhere, strict where a namespace or pod says so (a pod's word
    /// wins, a typo is strict), and left to the operator's own policy for the listener.
    #[test]
    fn inbound_policies_follow_annotations() {
        use v1::authorization_policy::Mode;
        let mut objects = objects();
        objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": "shop", "annotations": {"remora.dev/inbound": "strict"}}}));
        objects[3]["metadata"]["annotations"] = json!({"remora.dev/inbound": "permissive"});
        objects.push(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "ops", "name": "tool", "uid": "u9",
                            "annotations": {"remora.dev/inbound": "stirct"}}, "spec": {"containers": [{"name": "app"}]}}));
        let made = resources(&Objects::read("cluster.local", &objects), &[], &Settings::default());
        let mode = |resources: &[Resource]| {
            resources.iter().find_map(|r| match r {
                Resource::AuthorizationPolicy(p) if p.name == INBOUND_POLICY => Some(p.mode()),
                _ => None,
            })
        };
        assert_eq!(mode(&made.shared), Some(Mode::Permissive));
        let Some(Resource::AuthorizationPolicy(shared)) = made.shared.iter().find(|r| r.name() == INBOUND_POLICY)
        else {
            panic!()
        };
        assert_eq!(
            (shared.listener.as_str(), shared.allow.as_slice()),
            ("inbound", &["spiffe://cluster.local/*".to_owned()][..])
        );
        assert_eq!(mode(&made.scoped["shop"]), Some(Mode::Strict));
        assert_eq!(mode(&made.scoped["shop/web-b"]), Some(Mode::Permissive), "the pod's word wins");
        assert_eq!(mode(&made.scoped["ops/tool"]), Some(Mode::Strict), "a typo is strict");
        assert!(!made.scoped.contains_key("shop/web-a"), "as its namespace: nothing of its own");
        // Two pod objects of one name (an old one and its replacement): one policy in their scope.
        let mut objects = objects;
        objects.push(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "ops", "name": "tool", "uid": "u10",
                            "annotations": {"remora.dev/inbound": "strict"}}, "spec": {"containers": [{"name": "app"}]}}));
        let made = resources(&Objects::read("cluster.local", &objects), &[], &Settings::default());
        assert_eq!(made.scoped["ops/tool"].len(), 1, "{:?}", made.scoped["ops/tool"]);
        let mine = v1::AuthorizationPolicy { name: "mine".into(), listener: "inbound".into(), ..Default::default() };
        let made = resources(
            &Objects::read("cluster.local", &objects),
            &[Resource::AuthorizationPolicy(mine)],
            &Settings::default(),
        );
        assert_eq!(mode(&made.shared), None);
        assert!(made.scoped.values().all(|list| mode(list).is_none()));
    }

    /// A pod without the sidecar keeps its Service's port in plaintext; a headless Service claims
    /// its pods' addresses instead of a cluster IP.
    #[test]
    fn unmeshed_pods_and_headless_services() {
        use remora_control_api::Kind;
        let mut objects = objects();
        objects[3]["spec"]["containers"] = json!([{"name": "app"}]);
        objects[0]["spec"]["clusterIP"] = json!("None");
        let made = made(&objects, &[]);
        let Some(Resource::Cluster(http)) = find(&made, Kind::Cluster, "shop/web:80") else { panic!() };
        assert_eq!(http.tls(), v1::cluster::Tls::None, "one pod has no sidecar");
        let Some(Resource::RouteTable(table)) = find(&made, Kind::RouteTable, "shop/web:80") else { panic!() };
        assert!(table.destinations.contains(&"10.1.0.5:8080".to_owned()), "{:?}", table.destinations);
        assert!(!table.destinations.iter().any(|d| d.starts_with("10.96.")), "{:?}", table.destinations);
    }

    /// The operator's resources replace the automatic ones, whole: a cluster naming the Service
    /// port takes the automatic cluster's place (the table sends to it), and a route table claiming
    /// one of the port's destinations (or its host on any port) takes the table's.
    #[test]
    fn written_resources_replace_the_automatic_ones() {
        use remora_control_api::Kind;
        let mine = v1::Cluster {
            name: "web-tuned".into(),
            kubernetes_service: Some(Box::new(v1::KubernetesService {
                namespace: "shop".into(),
                name: "web".into(),
                port: "http".into(),
            })),
            ..Default::default()
        };
        let routes = v1::RouteTable {
            name: "grpc-routes".into(),
            destinations: vec!["web.shop:9090".into()],
            ..Default::default()
        };
        let made = made(&objects(), &[Resource::Cluster(mine), Resource::RouteTable(routes)]);
        assert!(find(&made, Kind::Cluster, "shop/web:80").is_none(), "{made:?}");
        let Some(Resource::RouteTable(table)) = find(&made, Kind::RouteTable, "shop/web:80") else { panic!() };
        assert_eq!(table.routes[0].backends[0].cluster, "web-tuned");
        assert_eq!(table.tcp_cluster, "web-tuned");
        assert!(find(&made, Kind::Cluster, "shop/web:9090").is_some(), "the other port is still automatic");
        assert!(find(&made, Kind::RouteTable, "shop/web:9090").is_none(), "the operator's table claims it");
        // A host without a port claims it on every port.
        let any_port =
            v1::RouteTable { name: "all".into(), destinations: vec!["web.shop.svc".into()], ..Default::default() };
        let taken = super::resources(
            &Objects::read("cluster.local", &objects()),
            &[Resource::RouteTable(any_port)],
            &Settings::default(),
        )
        .shared;
        assert!(
            find(&taken, Kind::RouteTable, "shop/web:80").is_none()
                && find(&taken, Kind::RouteTable, "shop/web:9090").is_none()
        );
    }
}
