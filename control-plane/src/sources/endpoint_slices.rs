//! Kubernetes EndpointSlices as a source of endpoints: a cluster with `kubernetes_service:
//! {namespace, name, port}` gets the Service's pods as its endpoints, kept current as pods come, go,
//! and turn ready or terminating.
//!
//! [`Slices`] holds every slice (from the API server, followed by `sources::cluster`, or from the
//! directory's manifests), applied and removed one object at a time, and the service accounts of
//! the pods. [`Slices::endpoints_for`] turns the slices of one Service into `Endpoint`s: each
//! address of a slice endpoint, on the chosen port, its zone as its locality, and its health from
//! its conditions: ready is `healthy`, terminating is `draining` (no new requests while it
//! finishes), neither (starting, or failing its readiness probe) is `unhealthy`. FQDN slices are
//! skipped.
//!
//! Each endpoint also carries its pod's identity, `spiffe://TRUST-DOMAIN/ns/NS/sa/SA`, the one the
//! CA issues that pod's sidecar from its service-account token, so a caller's `tls: mesh` checks
//! the very workload it reached, not just its trust domain. A slice endpoint names its pod
//! (`targetRef`); the pod's service account (which cannot change in a pod's life) is the one of the
//! pod with that UID. An endpoint whose pod is not known (a watch event for the pod not yet seen,
//! or pods not readable at all) has no identity until it is: the cluster's `peer_identities` (or
//! the trust domain) decide meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use remora_control_api::v1;

/// The label that names a slice's Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// One EndpointSlice, as far as endpoints need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// Its namespace.
    pub namespace: String,
    /// The Service it belongs to.
    pub service: String,
    /// Its ports: name (maybe empty) and the pods' port.
    pub ports: Vec<(String, u16)>,
    /// Its endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of a slice: a pod's addresses and conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its IP addresses.
    pub addresses: Vec<String>,
    /// Its zone, if known.
    pub zone: String,
    /// What its conditions say.
    pub health: v1::endpoint::Health,
    /// The pod behind it, if the slice names one.
    pub pod: Option<PodRef>,
}

/// The pod a slice endpoint names (its `targetRef`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID: a pod re-created under the same name (a StatefulSet's) is another pod.
    pub uid: String,
}

/// A pod's namespace and the SPIFFE ID of its service account (empty if that is no valid ID).
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodIdentity {
    namespace: String,
    identity: String,
}

/// Every slice, by `namespace/name`, and the service accounts of the pods they name.
#[derive(Clone, Debug, Default)]
pub struct Slices {
    slices: BTreeMap<String, Slice>,
    /// The keys of each Service's slices, by `(namespace, service)`: a Service's endpoints are
    /// found without looking at every other Service's slices.
    by_service: HashMap<(String, String), BTreeSet<String>>,
    /// By pod UID, the pod's namespace and identity (worked out once, when the pod is told).
    accounts: HashMap<String, PodIdentity>,
    /// The Services whose slices changed since [`Slices::take_touched`] last took them.
    touched: BTreeSet<(String, String)>,
    /// The trust domain of the pods' identities.
    trust_domain: String,
}

impl Slices {
    /// No slices yet; pods' identities in `trust_domain`.
    pub fn new(trust_domain: &str) -> Slices {
        Slices { trust_domain: trust_domain.to_owned(), ..Slices::default() }
    }

    /// How many slices there are.
    pub fn len(&self) -> usize {
        self.slices.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }

    /// Adds or replaces the slice `object` (as JSON); whether that changed anything. A slice of no
    /// Service, or of FQDNs, is not kept.
    pub fn apply(&mut self, object: &Value) -> bool {
        match parse_slice(object) {
            Some((key, slice)) => self.insert(key, slice),
            None => self.remove(object),
        }
    }

    /// Keeps `slice` under `key`; whether that changed anything.
    fn insert(&mut self, key: String, slice: Slice) -> bool {
        if self.slices.get(&key) == Some(&slice) {
            return false;
        }
        self.unindex(&key);
        let owner = (slice.namespace.clone(), slice.service.clone());
        self.by_service.entry(owner.clone()).or_default().insert(key.clone());
        self.touched.insert(owner);
        self.slices.insert(key, slice);
        true
    }

    /// Removes the slice `object` names; whether it was there.
    pub fn remove(&mut self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        match (metadata["namespace"].as_str(), metadata["name"].as_str()) {
            (Some(namespace), Some(name)) => {
                let key = format!("{namespace}/{name}");
                self.unindex(&key);
                self.slices.remove(&key).is_some()
            }
            _ => false,
        }
    }

    /// Drops `key` from its Service's index, if it is held.
    fn unindex(&mut self, key: &str) {
        let Some(old) = self.slices.get(key) else { return };
        let owner = (old.namespace.clone(), old.service.clone());
        if let Some(keys) = self.by_service.get_mut(&owner) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_service.remove(&owner);
            }
        }
        self.touched.insert(owner);
    }

    /// The Services, by `(namespace, name)`, whose slices were added, changed or removed since
    /// this was last called (a [`Slices::clear`] forgets them: everything changed then).
    pub fn take_touched(&mut self) -> BTreeSet<(String, String)> {
        std::mem::take(&mut self.touched)
    }

    /// The Services, by `(namespace, name)`, whose slices name one of the pods `uids`.
    pub fn services_naming(&self, uids: &BTreeSet<String>) -> BTreeSet<(String, String)> {
        let mut found = BTreeSet::new();
        for slice in self.slices.values() {
            let names = |e: &SliceEndpoint| e.pod.as_ref().is_some_and(|pod| uids.contains(&pod.uid));
            if slice.endpoints.iter().any(names) {
                found.insert((slice.namespace.clone(), slice.service.clone()));
            }
        }
        found
    }

    /// Forgets every slice (a fresh list replaces them).
    pub fn clear(&mut self) {
        self.slices.clear();
        self.by_service.clear();
        self.touched.clear();
    }

    /// Records the service account of the pod `uid` in `namespace`; whether that changed anything.
    pub fn set_account(&mut self, uid: &str, namespace: &str, account: &str) -> bool {
        let id = format!("spiffe://{}/ns/{namespace}/sa/{account}", self.trust_domain);
        let identity = remora_control_api::identity::SpiffeId::parse(&id).map(|_| id).unwrap_or_default();
        let told = PodIdentity { namespace: namespace.to_owned(), identity };
        self.accounts.insert(uid.to_owned(), told.clone()).is_none_or(|old| old != told)
    }

    /// Forgets the pod `uid`'s account; whether it was known.
    pub fn forget_account(&mut self, uid: &str) -> bool {
        self.accounts.remove(uid).is_some()
    }

    /// Forgets every pod's account (a fresh list of pods replaces them).
    pub fn clear_accounts(&mut self) {
        self.accounts.clear();
    }

    /// Adds `other`'s slices and accounts (those of `self` win).
    pub fn extend(&mut self, other: &Slices) {
        for (key, slice) in &other.slices {
            if !self.slices.contains_key(key) {
                self.insert(key.clone(), slice.clone());
            }
        }
        for (uid, told) in &other.accounts {
            self.accounts.entry(uid.clone()).or_insert_with(|| told.clone());
        }
    }

    /// The endpoints these slices give the cluster that names `service`.
    pub fn endpoints_for(&self, service: &v1::KubernetesService) -> Vec<v1::Endpoint> {
        self.endpoints_with_pods(service).into_iter().map(|(endpoint, _)| endpoint).collect()
    }

    /// The same endpoints, each with the pod the slice names for it (when it names one).
    pub fn endpoints_with_pods(&self, service: &v1::KubernetesService) -> Vec<(v1::Endpoint, Option<&PodRef>)> {
        let mut endpoints = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let owner = (service.namespace.clone(), service.name.clone());
        let keys = self.by_service.get(&owner).into_iter().flatten();
        for slice in keys.filter_map(|key| self.slices.get(key)) {
            let port = match service.port.parse::<u16>() {
                _ if service.port.is_empty() => match slice.ports.as_slice() {
                    [(_, port)] => Some(*port),
                    _ => None,
                },
                Ok(number) => slice.ports.iter().any(|(_, p)| *p == number).then_some(number),
                Err(_) => slice.ports.iter().find(|(name, _)| *name == service.port).map(|(_, p)| *p),
            };
            let Some(port) = port else { continue };
            for endpoint in &slice.endpoints {
                let identity = endpoint.pod.as_ref().map(|pod| self.identity(pod)).unwrap_or_default();
                for address in &endpoint.addresses {
                    let address = match address.parse::<std::net::IpAddr>() {
                        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
                        Ok(ip) => format!("{ip}:{port}"),
                        Err(_) => continue,
                    };
                    // One address listed twice (by two slices while the controller moves it, or
                    // twice in one) is one endpoint: the first listing counts.
                    if !seen.insert(address.clone()) {
                        continue;
                    }
                    let found = v1::Endpoint {
                        address,
                        locality: (!endpoint.zone.is_empty())
                            .then(|| v1::Locality { region: String::new(), zone: endpoint.zone.clone() }),
                        health: endpoint.health as i32,
                        identity: identity.clone(),
                        ..Default::default()
                    };
                    endpoints.push((found, endpoint.pod.as_ref()));
                }
            }
        }
        endpoints
    }

    /// The SPIFFE ID of `pod`'s service account; empty while the account is not known (or the
    /// pod with that UID is in another namespace than the slice says).
    fn identity(&self, pod: &PodRef) -> String {
        match self.accounts.get(&pod.uid) {
            Some(told) if told.namespace == pod.namespace => told.identity.clone(),
            _ => String::new(),
        }
    }
}

/// Reads one slice object; `None` for one that belongs to no Service or holds FQDNs.
fn parse_slice(object: &Value) -> Option<(String, Slice)> {
    let metadata = &object["metadata"];
    let namespace = metadata["namespace"].as_str()?;
    let name = metadata["name"].as_str()?;
    let service = metadata["labels"][SERVICE_LABEL].as_str()?;
    if object["addressType"].as_str() == Some("FQDN") {
        return None;
    }
    let ports = tcp_ports(&object["ports"])
        .filter_map(|p| {
            let port = u16::try_from(p["port"].as_u64()?).ok()?;
            Some((p["name"].as_str().unwrap_or_default().to_owned(), port))
        })
        .collect();
    let endpoints = object["endpoints"]
        .as_array()
        .map(|endpoints| endpoints.iter().map(parse_endpoint).collect())
        .unwrap_or_default();
    let slice = Slice { namespace: namespace.to_owned(), service: service.to_owned(), ports, endpoints };
    Some((format!("{namespace}/{name}"), slice))
}

fn parse_endpoint(endpoint: &Value) -> SliceEndpoint {
    let conditions = &endpoint["conditions"];
    // An absent `ready` means ready; an absent `terminating` means not.
    let ready = conditions["ready"].as_bool().unwrap_or(true);
    let terminating = conditions["terminating"].as_bool().unwrap_or(false);
    let health = match (ready, terminating) {
        (_, true) => v1::endpoint::Health::Draining,
        (true, false) => v1::endpoint::Health::Healthy,
        (false, false) => v1::endpoint::Health::Unhealthy,
    };
    let addresses = endpoint["addresses"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    let target = &endpoint["targetRef"];
    let pod = match (
        target["kind"].as_str(),
        target["namespace"].as_str(),
        target["name"].as_str(),
        target["uid"].as_str(),
    ) {
        (Some("Pod"), Some(namespace), Some(name), Some(uid)) if is_name(namespace) && is_name(name) => {
            Some(PodRef { namespace: namespace.to_owned(), name: name.to_owned(), uid: uid.to_owned() })
        }
        _ => None,
    };
    SliceEndpoint { addresses, zone: endpoint["zone"].as_str().unwrap_or_default().to_owned(), health, pod }
}

/// The TCP entries of a `ports` list (a Service's or a slice's; an absent `protocol` is TCP).
pub(crate) fn tcp_ports(ports: &Value) -> impl Iterator<Item = &Value> {
    ports.as_array().into_iter().flatten().filter(|p| p["protocol"].as_str().is_none_or(|protocol| protocol == "TCP"))
}

/// Whether `name` is a Kubernetes object name (a DNS subdomain), safe in a URL path and an ID.
pub(crate) fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// A pod object's UID and service account.
pub(crate) fn pod_account(pod: &Value) -> Option<(String, String)> {
    let uid = pod["metadata"]["uid"].as_str()?;
    // The ServiceAccount admission plugin always sets it; "default" is what an unset one means.
    let account = pod["spec"]["serviceAccountName"].as_str().filter(|a| !a.is_empty()).unwrap_or("default");
    is_name(account).then(|| (uid.to_owned(), account.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn slice(name: &str, endpoints: Value) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": "7",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "admin", "port": 9901}],
            "endpoints": endpoints,
        })
    }

    #[test]
    fn conditions_become_health_and_ports_are_chosen_by_name_or_number() {
        let object = slice(
            "web-1",
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "zone": "eu-1a"},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "terminating": true, "serving": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                {"addresses": ["fd00::4"]},
            ]),
        );
        let (key, parsed) = parse_slice(&object).unwrap();
        assert_eq!(key, "shop/web-1");
        let mut slices = Slices::new("cluster.local");
        slices.insert(key, parsed);
        let service =
            |port: &str| v1::KubernetesService { namespace: "shop".into(), name: "web".into(), port: port.into() };
        let endpoints = slices.endpoints_for(&service("http"));
        let seen: Vec<(&str, i32)> = endpoints.iter().map(|e| (e.address.as_str(), e.health)).collect();
        assert_eq!(
            seen,
            [
                ("10.0.0.1:8080", v1::endpoint::Health::Healthy as i32),
                ("10.0.0.2:8080", v1::endpoint::Health::Draining as i32),
                ("10.0.0.3:8080", v1::endpoint::Health::Unhealthy as i32),
                ("[fd00::4]:8080", v1::endpoint::Health::Healthy as i32),
            ]
        );
        assert_eq!(endpoints[0].locality.as_ref().unwrap().zone, "eu-1a");
        assert_eq!(slices.endpoints_for(&service("9901"))[0].address, "10.0.0.1:9901");
        assert!(slices.endpoints_for(&service("")).is_empty(), "two ports: the cluster must say which");
        assert!(slices.endpoints_for(&service("grpc")).is_empty());
        let other = v1::KubernetesService { namespace: "ops".into(), ..service("http") };
        assert!(slices.endpoints_for(&other).is_empty());
    }

    /// Slices come and go one object at a time, saying whether anything changed.
    #[test]
    fn slices_are_applied_and_removed_one_by_one() {
        let mut slices = Slices::new("cluster.local");
        let one = slice("web-1", json!([{"addresses": ["10.0.0.1"]}]));
        assert!(slices.apply(&one));
        assert!(!slices.apply(&one), "the same slice again");
        assert!(slices.apply(&slice("web-1", json!([{"addresses": ["10.0.0.2"]}]))));
        assert_eq!(slices.len(), 1);
        let web = v1::KubernetesService { namespace: "shop".into(), name: "web".into(), port: "http".into() };
        let api = v1::KubernetesService { name: "api".into(), ..web.clone() };
        assert_eq!(slices.endpoints_for(&web).len(), 1);
        // A slice relabelled to another Service leaves the first one's endpoints.
        let mut moved = slice("web-1", json!([{"addresses": ["10.0.0.2"]}]));
        moved["metadata"]["labels"]["kubernetes.io/service-name"] = json!("api");
        assert!(slices.apply(&moved));
        assert!(slices.endpoints_for(&web).is_empty());
        assert_eq!(slices.endpoints_for(&api).len(), 1);
        assert!(slices.remove(&one));
        assert!(!slices.remove(&one));
        assert!(slices.endpoints_for(&api).is_empty());
        let unowned = json!({"metadata": {"name": "x", "namespace": "shop"}, "endpoints": []});
        assert_eq!(parse_slice(&unowned), None, "a slice of no Service");
        assert!(!slices.apply(&unowned));
    }

    #[test]
    fn endpoints_carry_their_pods_service_account_identity() {
        let pod = |name: &str, uid: &str| json!({"kind": "Pod", "namespace": "shop", "name": name, "uid": uid});
        let object = slice(
            "web-1",
            json!([
                {"addresses": ["10.0.0.1"], "targetRef": pod("web-a", "uid-a")},
                {"addresses": ["10.0.0.2"], "targetRef": pod("web-b", "uid-b")},
                {"addresses": ["10.0.0.3"]},
                {"addresses": ["10.0.0.4"], "targetRef": {"kind": "Node", "name": "n1", "uid": "uid-n"}},
                {"addresses": ["10.0.0.5"], "targetRef": pod("../etc", "uid-x")},
            ]),
        );
        let (key, parsed) = parse_slice(&object).unwrap();
        let mut slices = Slices::new("cluster.local");
        slices.insert(key, parsed);
        let listed = json!({"metadata": {"uid": "uid-a"}, "spec": {"serviceAccountName": "web"}});
        let unnamed = json!({"metadata": {"uid": "uid-b"}, "spec": {}});
        for pod in [&listed, &unnamed] {
            let (uid, account) = pod_account(pod).unwrap();
            assert!(slices.set_account(&uid, "shop", &account));
        }
        let service = v1::KubernetesService { namespace: "shop".into(), name: "web".into(), port: "http".into() };
        let identities: Vec<String> = slices.endpoints_for(&service).into_iter().map(|e| e.identity).collect();
        assert_eq!(
            identities,
            ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/default", "", "", ""]
        );
        assert!(slices.forget_account("uid-a"));
        assert_eq!(slices.endpoints_for(&service)[0].identity, "", "a pod gone: its endpoint is unproven");
    }
}
