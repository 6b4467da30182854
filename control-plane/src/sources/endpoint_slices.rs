//! Kubernetes EndpointSlices as a source of endpoints (`remora control --kubernetes-endpoints`):
//! a cluster with `kubernetes_service: {namespace, name, port}` gets the Service's pods as its
//! endpoints, kept current as pods come, go, and turn ready or terminating.
//!
//! [`follow`] lists every EndpointSlice in the cluster through the API server, then watches them
//! from the list's resource version (with bookmarks, re-watching when the server ends a watch), and
//! calls back with the whole set after every change. A watch that fails, or whose version has
//! expired (410 Gone), starts again from a fresh list after a backoff; in between, the endpoints
//! last seen keep serving. One cluster-wide watch serves every cluster, whatever the directory
//! names, so editing the directory never waits for a new watch.
//!
//! [`Slices::endpoints_for`] turns the slices of one Service into `Endpoint`s: each address of a slice
//! endpoint, on the chosen port, its zone as its locality, and its health from its conditions: ready
//! is `healthy`, terminating is `draining` (no new requests while it finishes), neither (starting,
//! or failing its readiness probe) is `unhealthy`. FQDN slices are skipped.
//!
//! Each endpoint also carries its pod's identity, `spiffe://TRUST-DOMAIN/ns/NS/sa/SA`, the one the
//! CA issues that pod's sidecar from its service-account token, so a caller's `tls: mesh` checks
//! the very workload it reached, not just its trust domain. A slice endpoint names its pod
//! (`targetRef`); the pod's service account (which cannot change in a pod's life) comes from a
//! paged list of every pod after each slice list, then from a GET of each pod a watch event brings
//! in, checked against the UID the slice names. A pod that is gone leaves its endpoint without an
//! identity (the endpoint is on its way out too); one that could not be read (the API server
//! overloaded, or pods not readable at all) does so only until a retry reads it: the lookups, and
//! the pod list if that failed, are tried again after a backoff (1 s doubling to 30 s) while the
//! watch goes on, with no slice change needed. Until then the cluster's `peer_identities` (or the
//! trust domain) decide, as before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde_json::Value;
use tracing::{info, warn};

use crate::kubernetes::ApiClient;
use remora_control_api::v1;

/// Every EndpointSlice of the cluster, served and watched here.
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
/// The largest list read: a large cluster's slices are tens of MiB.
const MAX_LIST: usize = 256 * 1024 * 1024;
/// The longest single watch event read (one slice holds at most 1,000 endpoints).
const MAX_EVENT: usize = 16 * 1024 * 1024;
/// How long the API server is asked to keep one watch open.
const WATCH_SECONDS: u32 = 290;
/// The label that names a slice's Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";
/// Every Pod of the cluster, listed for their service accounts.
const PODS: &str = "/api/v1/pods";
/// Pods per page of that list.
const POD_PAGE: usize = 500;
/// Pods looked up at once when watch events bring in new ones.
const LOOKUPS_IN_FLIGHT: usize = 8;
/// The first wait before pods that could not be read are tried again; it doubles up to the next.
const LOOKUP_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between those retries.
const LOOKUP_RETRY_MAX: Duration = Duration::from_secs(30);

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

/// Every slice, by `namespace/name`, and the service accounts of the pods they name.
#[derive(Clone, Debug, Default)]
pub struct Slices {
    slices: BTreeMap<String, Slice>,
    /// Service account by pod UID, for the pods some slice names.
    accounts: HashMap<String, String>,
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

    /// The slices among `objects` (Kubernetes objects as JSON: manifests from the directory), and
    /// the service accounts of the pods among them; pods' identities in `trust_domain`.
    pub fn from_objects<'a>(trust_domain: &str, objects: impl IntoIterator<Item = &'a Value>) -> Slices {
        let mut slices = Slices::new(trust_domain);
        for object in objects {
            match (object["apiVersion"].as_str(), object["kind"].as_str()) {
                (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => {
                    if let Some((key, slice)) = parse_slice(object) {
                        slices.slices.insert(key, slice);
                    }
                }
                (Some("v1"), Some("Pod")) => {
                    if let Some((uid, account)) = pod_account(object) {
                        slices.accounts.insert(uid, account);
                    }
                }
                _ => {}
            }
        }
        slices.prune();
        slices
    }

    /// The endpoints these slices give the cluster that names `service`.
    pub fn endpoints_for(&self, service: &v1::KubernetesService) -> Vec<v1::Endpoint> {
        self.endpoints_with_pods(service).into_iter().map(|(endpoint, _)| endpoint).collect()
    }

    /// The same endpoints, each with the pod the slice names for it (when it names one).
    pub fn endpoints_with_pods(&self, service: &v1::KubernetesService) -> Vec<(v1::Endpoint, Option<&PodRef>)> {
        let mut endpoints = Vec::new();
        for slice in self.slices.values().filter(|s| s.namespace == service.namespace && s.service == service.name) {
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

    /// The SPIFFE ID of `pod`'s service account; empty while the account is not known.
    fn identity(&self, pod: &PodRef) -> String {
        let Some(account) = self.accounts.get(&pod.uid) else { return String::new() };
        let id = format!("spiffe://{}/ns/{}/sa/{account}", self.trust_domain, pod.namespace);
        remora_control_api::identity::SpiffeId::parse(&id).map(|_| id).unwrap_or_default()
    }

    /// The pods some slice names whose account is not known, each once.
    fn unknown_pods(&self) -> Vec<PodRef> {
        let mut seen = HashSet::new();
        pods(&self.slices)
            .filter(|pod| !self.accounts.contains_key(&pod.uid) && seen.insert(&pod.uid))
            .cloned()
            .collect()
    }

    /// Forgets the accounts of pods no slice names any more.
    fn prune(&mut self) {
        let named: HashSet<&str> = pods(&self.slices).map(|pod| pod.uid.as_str()).collect();
        self.accounts.retain(|uid, _| named.contains(uid.as_str()));
    }
}

/// The pods `slices` name.
fn pods(slices: &BTreeMap<String, Slice>) -> impl Iterator<Item = &PodRef> {
    slices.values().flat_map(|s| &s.endpoints).filter_map(|e| e.pod.as_ref())
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
fn pod_account(pod: &Value) -> Option<(String, String)> {
    let uid = pod["metadata"]["uid"].as_str()?;
    // The ServiceAccount admission plugin always sets it; "default" is what an unset one means.
    let account = pod["spec"]["serviceAccountName"].as_str().filter(|a| !a.is_empty()).unwrap_or("default");
    is_name(account).then(|| (uid.to_owned(), account.to_owned()))
}

/// Escapes `value` for a URL query.
fn query_escape(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            escaped.push(char::from(byte));
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    escaped
}

/// Every pod's service account, by UID, from a paged list.
async fn list_accounts(api: &ApiClient) -> Result<HashMap<String, String>, String> {
    let mut accounts = HashMap::new();
    let mut path = format!("{PODS}?limit={POD_PAGE}");
    loop {
        let (status, body) = api.get(&path, MAX_LIST).await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("listing pods: {status} {}", String::from_utf8_lossy(&body[..body.len().min(200)])));
        }
        let page: Value = serde_json::from_slice(&body).map_err(|e| format!("the pod list: {e}"))?;
        accounts.extend(page["items"].as_array().into_iter().flatten().filter_map(pod_account));
        match page["metadata"]["continue"].as_str() {
            Some(token) if !token.is_empty() => {
                path = format!("{PODS}?limit={POD_PAGE}&continue={}", query_escape(token))
            }
            _ => return Ok(accounts),
        }
    }
}

/// One pod's service account; `None` when it is gone, or another pod now has its name.
async fn lookup(api: &ApiClient, pod: &PodRef) -> Result<Option<String>, String> {
    let path = format!("/api/v1/namespaces/{}/pods/{}", pod.namespace, pod.name);
    let (status, body) = api.send(http::Method::GET, &path, None, Bytes::new()).await.map_err(|e| e.to_string())?;
    if status == http::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(format!("reading pod {}/{}: {status}", pod.namespace, pod.name));
    }
    let object: Value =
        serde_json::from_slice(&body).map_err(|e| format!("pod {}/{}: {e}", pod.namespace, pod.name))?;
    Ok(pod_account(&object).filter(|(uid, _)| *uid == pod.uid).map(|(_, account)| account))
}

/// Learns the accounts of the pods the slices name and no account is known for, and forgets those
/// of pods no slice names. Returns how many accounts it learnt, and how many pods could not be read
/// (to be tried again).
async fn learn_accounts(api: &ApiClient, slices: &mut Slices) -> (usize, usize) {
    let unknown = slices.unknown_pods();
    let mut found = futures_util::stream::iter(unknown)
        .map(|pod| async move { (lookup(api, &pod).await, pod) })
        .buffer_unordered(LOOKUPS_IN_FLIGHT);
    let (mut learnt, mut failed, mut first_error) = (0, 0, None);
    while let Some((result, pod)) = found.next().await {
        match result {
            Ok(Some(account)) => {
                slices.accounts.insert(pod.uid, account);
                learnt += 1;
            }
            // Gone: its endpoint is on its way out of the slice too.
            Ok(None) => {}
            Err(error) => {
                failed += 1;
                first_error.get_or_insert(error);
            }
        }
    }
    slices.prune();
    if let Some(error) = first_error {
        warn!(%error, pods = failed, "pods' service accounts could not be read; their endpoints have no identity until a retry");
    }
    (learnt, failed)
}

/// Whether the pods can be read, and when to read those that could not be again.
struct PodReads {
    /// The pod list succeeded: lookups of single pods are worth trying.
    listed: bool,
    /// When to try again, while something could not be read.
    retry_at: Option<tokio::time::Instant>,
    /// The wait after the next failure.
    backoff: Duration,
}

impl PodReads {
    /// Nothing read yet: the first [`PodReads::learn`] lists the pods.
    fn new() -> Self {
        PodReads { listed: false, retry_at: None, backoff: LOOKUP_RETRY_FIRST }
    }

    /// Learns what it can of the pods `slices` name (listing them first if the last list failed
    /// and its retry is due: a slice event does not list every pod again on an API server that just
    /// failed to), and schedules a retry if something could not be read. Returns whether an
    /// account was learnt.
    async fn learn(&mut self, api: &ApiClient, slices: &mut Slices) -> bool {
        let due = self.retry_at.is_none_or(|at| at <= tokio::time::Instant::now());
        let mut relisted = false;
        if !self.listed && due {
            match list_accounts(api).await {
                Ok(accounts) => {
                    slices.accounts = accounts;
                    (self.listed, relisted) = (true, true);
                }
                Err(error) => {
                    warn!(%error, "pods cannot be read: Kubernetes endpoints carry no identity until a retry")
                }
            }
        }
        let (learnt, failed) = if self.listed { learn_accounts(api, slices).await } else { (0, 1) };
        if failed == 0 {
            self.retry_at = None;
            self.backoff = LOOKUP_RETRY_FIRST;
        } else if due {
            self.retry_at = Some(tokio::time::Instant::now() + self.backoff.mul_f64(0.5 + fastrand::f64() / 2.0));
            self.backoff = (self.backoff * 2).min(LOOKUP_RETRY_MAX);
        }
        relisted || learnt > 0
    }

    /// Waits for the retry, for ever when none is due.
    async fn due(&self) {
        match self.retry_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

/// Follows the cluster's EndpointSlices for ever, calling `on_change` with every slice after each
/// change (and once after each list); pods' identities are in `trust_domain`.
pub async fn follow(api: ApiClient, trust_domain: String, mut on_change: impl FnMut(&Slices, bool)) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut listed = false;
        let error = match follow_once(&api, &trust_domain, &mut on_change, &mut listed).await {
            Ok(()) => "the watch's version expired".to_owned(),
            Err(error) => error,
        };
        if listed {
            backoff = Duration::from_millis(500);
        } else {
            on_change(&Slices::new(&trust_domain), false);
        }
        warn!(%error, retry_in = ?backoff, "EndpointSlice watch down; keeping the endpoints known");
        tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// One list, then watches until one fails or its version expires (`Ok`).
async fn follow_once(
    api: &ApiClient,
    trust_domain: &str,
    on_change: &mut impl FnMut(&Slices, bool),
    listed: &mut bool,
) -> Result<(), String> {
    let (status, body) = api.get(SLICES, MAX_LIST).await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!(
            "listing EndpointSlices: {status} {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    let list: Value = serde_json::from_slice(&body).map_err(|e| format!("the EndpointSlice list: {e}"))?;
    let mut version = list["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_owned();
    let mut slices = Slices::new(trust_domain);
    slices.slices = list["items"].as_array().into_iter().flatten().filter_map(parse_slice).collect();
    let mut reads = PodReads::new();
    reads.learn(api, &mut slices).await;
    info!(slices = slices.len(), pods = slices.accounts.len(), version = %version, "EndpointSlices listed");
    *listed = true;
    on_change(&slices, true);
    loop {
        let path = format!(
            "{SLICES}?watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={version}"
        );
        let response = api.stream(&path).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("watching EndpointSlices: {}", response.status()));
        }
        let mut body = response.into_body();
        let mut buffer: Vec<u8> = Vec::new();
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                () = reads.due() => {
                    if reads.learn(api, &mut slices).await {
                        on_change(&slices, true);
                    }
                    continue;
                }
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| format!("the watch: {e}"))?;
            let Some(data) = frame.data_ref() else { continue };
            buffer.extend_from_slice(data);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event: Value = serde_json::from_slice(&line).map_err(|e| format!("a watch event: {e}"))?;
                match apply(&mut slices.slices, &event, &mut version)? {
                    Applied::Changed => {
                        reads.learn(api, &mut slices).await;
                        on_change(&slices, true);
                    }
                    Applied::Unchanged => {}
                    Applied::Expired => return Ok(()),
                }
            }
            if buffer.len() > MAX_EVENT {
                return Err(format!("a watch event over {MAX_EVENT} bytes"));
            }
        }
        // The server ended the watch (its timeout): watch again from where it left off.
    }
}

/// What one watch event did.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    Changed,
    Unchanged,
    /// The version watched from is gone: list again.
    Expired,
}

fn apply(slices: &mut BTreeMap<String, Slice>, event: &Value, version: &mut String) -> Result<Applied, String> {
    let object = &event["object"];
    let kind = event["type"].as_str().unwrap_or_default();
    if kind == "ERROR" {
        if object["code"].as_u64() == Some(410) {
            return Ok(Applied::Expired);
        }
        return Err(format!("the watch failed: {}", object["message"].as_str().unwrap_or("no message")));
    }
    if let Some(seen) = object["metadata"]["resourceVersion"].as_str() {
        seen.clone_into(version);
    }
    let key = || {
        let metadata = &object["metadata"];
        Some(format!("{}/{}", metadata["namespace"].as_str()?, metadata["name"].as_str()?))
    };
    let changed = match kind {
        "ADDED" | "MODIFIED" => match parse_slice(object) {
            Some((key, slice)) => slices.insert(key, slice.clone()).is_none_or(|old| old != slice),
            // A slice that no longer belongs to a Service leaves like a deleted one.
            None => key().is_some_and(|key| slices.remove(&key).is_some()),
        },
        "DELETED" => key().is_some_and(|key| slices.remove(&key).is_some()),
        _ => false,
    };
    Ok(if changed { Applied::Changed } else { Applied::Unchanged })
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
        slices.slices.insert(key, parsed);
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

    #[test]
    fn watch_events_add_change_delete_and_expire() {
        let mut slices = BTreeMap::new();
        let mut version = String::new();
        let added = json!({"type": "ADDED", "object": slice("web-1", json!([{"addresses": ["10.0.0.1"]}]))});
        assert_eq!(apply(&mut slices, &added, &mut version).unwrap(), Applied::Changed);
        assert_eq!(version, "7");
        assert_eq!(apply(&mut slices, &added, &mut version).unwrap(), Applied::Unchanged, "the same slice again");
        let bookmark = json!({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}});
        assert_eq!(apply(&mut slices, &bookmark, &mut version).unwrap(), Applied::Unchanged);
        assert_eq!(version, "9");
        let deleted = json!({"type": "DELETED", "object": slice("web-1", json!([]))});
        assert_eq!(apply(&mut slices, &deleted, &mut version).unwrap(), Applied::Changed);
        assert!(slices.is_empty());
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}});
        assert_eq!(apply(&mut slices, &gone, &mut version).unwrap(), Applied::Expired);
        let failed = json!({"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "boom"}});
        assert!(apply(&mut slices, &failed, &mut version).unwrap_err().contains("boom"));
        let unowned = json!({"metadata": {"name": "x", "namespace": "shop"}, "endpoints": []});
        assert_eq!(parse_slice(&unowned), None, "a slice of no Service");
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
        slices.slices.insert(key, parsed);
        let names: Vec<String> = slices.unknown_pods().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["web-a", "web-b"], "only pods, only names fit for a URL");

        let listed = json!({"metadata": {"uid": "uid-a"}, "spec": {"serviceAccountName": "web"}});
        let unnamed = json!({"metadata": {"uid": "uid-b"}, "spec": {}});
        let stranger = json!({"metadata": {"uid": "uid-z"}, "spec": {"serviceAccountName": "db"}});
        slices.accounts.extend([&listed, &unnamed, &stranger].into_iter().filter_map(pod_account));
        slices.prune();
        assert!(!slices.accounts.contains_key("uid-z"), "a pod no slice names is forgotten");
        let service = v1::KubernetesService { namespace: "shop".into(), name: "web".into(), port: "http".into() };
        let identities: Vec<String> = slices.endpoints_for(&service).into_iter().map(|e| e.identity).collect();
        assert_eq!(
            identities,
            ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/default", "", "", ""]
        );
        assert!(slices.unknown_pods().is_empty());
        assert_eq!(query_escape("a+b/c=="), "a%2Bb%2Fc%3D%3D");
    }
}
