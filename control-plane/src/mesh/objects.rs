//! The Kubernetes objects the automatic mesh is made of, read from their JSON: Services (their
//! cluster IPs and TCP ports), Pods (their service account, and whether they have Remora's
//! sidecar), and EndpointSlices (which pods serve a Service, kept by `sources::endpoint_slices`).
//!
//! Objects enter as the JSON of Kubernetes manifests (the GitOps directory's, or what the API
//! server answers); anything else among them (a Deployment, a ConfigMap) is left alone. Reading is
//! lenient where Kubernetes is (an absent `protocol` is TCP, an absent `clusterIP` a cluster IP
//! yet to be assigned) and skips what a mesh cannot serve (ExternalName Services, UDP and SCTP
//! ports).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

use crate::inject::PROXY_CONTAINER;
use crate::sources::endpoint_slices::{PodRef, Slices, is_name, tcp_ports};

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
}

/// Every Service, Pod and EndpointSlice of the mesh.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Services by `(namespace, name)`.
    pub services: BTreeMap<(String, String), Service>,
    /// Pods by UID.
    pub pods: BTreeMap<String, Pod>,
    /// The EndpointSlices, and the service accounts of the pods they name.
    pub slices: Slices,
}

impl Objects {
    /// The objects among `objects` (Kubernetes objects as JSON); pods' identities in
    /// `trust_domain`.
    pub fn read(trust_domain: &str, objects: &[Value]) -> Objects {
        let mut read = Objects { slices: Slices::from_objects(trust_domain, objects), ..Objects::default() };
        for object in objects {
            match (object["apiVersion"].as_str(), object["kind"].as_str()) {
                (Some("v1"), Some("Service")) => {
                    if let Some(service) = service(object) {
                        read.services.insert((service.namespace.clone(), service.name.clone()), service);
                    }
                }
                (Some("v1"), Some("Pod")) => {
                    if let Some((uid, pod)) = pod(object) {
                        read.pods.insert(uid, pod);
                    }
                }
                _ => {}
            }
        }
        read
    }

    /// The pod a slice endpoint names, if it is known.
    pub fn pod(&self, pod: &PodRef) -> Option<&Pod> {
        self.pods.get(&pod.uid).filter(|known| known.namespace == pod.namespace && known.name == pod.name)
    }
}

fn service(object: &Value) -> Option<Service> {
    let metadata = &object["metadata"];
    let namespace = metadata["namespace"].as_str().unwrap_or("default");
    let name = metadata["name"].as_str()?;
    let spec = &object["spec"];
    if !is_name(namespace) || !is_name(name) || spec["type"].as_str() == Some("ExternalName") {
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
    let ports = tcp_ports(&spec["ports"])
        .filter_map(|p| {
            Some(ServicePort {
                name: p["name"].as_str().unwrap_or_default().to_owned(),
                port: u16::try_from(p["port"].as_u64()?).ok().filter(|port| *port > 0)?,
                app_protocol: p["appProtocol"].as_str().unwrap_or_default().to_owned(),
            })
        })
        .collect();
    Some(Service { namespace: namespace.to_owned(), name: name.to_owned(), cluster_ips, headless, ports })
}

fn pod(object: &Value) -> Option<(String, Pod)> {
    let metadata = &object["metadata"];
    let uid = metadata["uid"].as_str()?;
    let namespace = metadata["namespace"].as_str().unwrap_or("default");
    let name = metadata["name"].as_str()?;
    let spec = &object["spec"];
    let account = spec["serviceAccountName"].as_str().filter(|a| !a.is_empty()).unwrap_or("default");
    let named = |list: &Value| list.as_array().is_some_and(|c| c.iter().any(|c| c["name"] == PROXY_CONTAINER));
    let meshed = named(&spec["containers"]) || named(&spec["initContainers"]);
    let pod = Pod { namespace: namespace.to_owned(), name: name.to_owned(), account: account.to_owned(), meshed };
    Some((uid.to_owned(), pod))
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
                       {"name": "grpc", "port": 9090, "protocol": "TCP", "appProtocol": "grpc"}]}}),
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
