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
//! [`endpoints_for`] turns the slices of one Service into `Endpoint`s: each address of a slice
//! endpoint, on the chosen port, its zone as its locality, and its health from its conditions: ready
//! is `healthy`, terminating is `draining` (no new requests while it finishes), neither (starting,
//! or failing its readiness probe) is `unhealthy`. FQDN slices are skipped.

use std::collections::BTreeMap;
use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::Value;
use tracing::{info, warn};

use crate::kubernetes::ApiClient;
use crate::v1;

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
}

/// Every slice, by `namespace/name`.
pub type Slices = BTreeMap<String, Slice>;

/// Reads one slice object; `None` for one that belongs to no Service or holds FQDNs.
fn parse_slice(object: &Value) -> Option<(String, Slice)> {
    let metadata = &object["metadata"];
    let namespace = metadata["namespace"].as_str()?;
    let name = metadata["name"].as_str()?;
    let service = metadata["labels"][SERVICE_LABEL].as_str()?;
    if object["addressType"].as_str() == Some("FQDN") {
        return None;
    }
    let ports = object["ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .filter(|p| p["protocol"].as_str().is_none_or(|protocol| protocol == "TCP"))
                .filter_map(|p| {
                    let port = u16::try_from(p["port"].as_u64()?).ok()?;
                    Some((p["name"].as_str().unwrap_or_default().to_owned(), port))
                })
                .collect()
        })
        .unwrap_or_default();
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
    SliceEndpoint { addresses, zone: endpoint["zone"].as_str().unwrap_or_default().to_owned(), health }
}

/// The endpoints `slices` give the cluster that names `service`.
pub fn endpoints_for(slices: &Slices, service: &v1::KubernetesService) -> Vec<v1::Endpoint> {
    let mut endpoints = Vec::new();
    for slice in slices.values().filter(|s| s.namespace == service.namespace && s.service == service.name) {
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
            for address in &endpoint.addresses {
                let address = match address.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
                    Ok(ip) => format!("{ip}:{port}"),
                    Err(_) => continue,
                };
                endpoints.push(v1::Endpoint {
                    address,
                    locality: (!endpoint.zone.is_empty())
                        .then(|| v1::Locality { region: String::new(), zone: endpoint.zone.clone() }),
                    health: endpoint.health as i32,
                    ..Default::default()
                });
            }
        }
    }
    endpoints
}

/// Follows the cluster's EndpointSlices for ever, calling `on_change` with every slice after each
/// change (and once after each list).
pub async fn follow(api: ApiClient, mut on_change: impl FnMut(&Slices, bool)) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut listed = false;
        let error = match follow_once(&api, &mut on_change, &mut listed).await {
            Ok(()) => "the watch's version expired".to_owned(),
            Err(error) => error,
        };
        if listed {
            backoff = Duration::from_millis(500);
        } else {
            on_change(&Slices::new(), false);
        }
        warn!(%error, retry_in = ?backoff, "EndpointSlice watch down; keeping the endpoints known");
        tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// One list, then watches until one fails or its version expires (`Ok`).
async fn follow_once(
    api: &ApiClient,
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
    let mut slices: Slices = list["items"].as_array().into_iter().flatten().filter_map(parse_slice).collect();
    info!(slices = slices.len(), version = %version, "EndpointSlices listed");
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
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the watch: {e}"))?;
            let Some(data) = frame.data_ref() else { continue };
            buffer.extend_from_slice(data);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event: Value = serde_json::from_slice(&line).map_err(|e| format!("a watch event: {e}"))?;
                match apply(&mut slices, &event, &mut version)? {
                    Applied::Changed => on_change(&slices, true),
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

fn apply(slices: &mut Slices, event: &Value, version: &mut String) -> Result<Applied, String> {
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
        let slices: Slices = [(key, parsed)].into();
        let service =
            |port: &str| v1::KubernetesService { namespace: "shop".into(), name: "web".into(), port: port.into() };
        let endpoints = endpoints_for(&slices, &service("http"));
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
        assert_eq!(endpoints_for(&slices, &service("9901"))[0].address, "10.0.0.1:9901");
        assert!(endpoints_for(&slices, &service("")).is_empty(), "two ports: the cluster must say which");
        assert!(endpoints_for(&slices, &service("grpc")).is_empty());
        let other = v1::KubernetesService { namespace: "ops".into(), ..service("http") };
        assert!(endpoints_for(&slices, &other).is_empty());
    }

    #[test]
    fn watch_events_add_change_delete_and_expire() {
        let mut slices = Slices::new();
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
}
