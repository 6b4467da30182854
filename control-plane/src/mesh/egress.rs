//! Narrowed views: the Services a namespace's or a pod's workloads call, as its
//! `remora.dev/egress` annotation lists them, so that their proxies are sent those Services'
//! resources and not every Service's of the cluster.
//!
//! The annotation (on a Namespace, or on a Pod, whose own wins) lists Services as
//! `NAMESPACE/NAME`, separated by commas or spaces: `*` for every Service of a namespace, `.` for
//! the workload's own namespace (`./*, auth/tokens, kube-system/*`). [`egress`] reads them from the
//! [`Objects`] and makes, per scope that narrows (`NAMESPACE` or `NAMESPACE/POD`, as the views'
//! scopes are named), the [`Egress`] the publisher applies: the Services listed that exist, and the
//! Services their route tables send to (a Gateway API route's backends, its mirrors), so that a
//! route never names a cluster its proxy was not sent. A Service left out is reached as if it were
//! not meshed (the outbound listener passes its connections through, in plaintext). An annotation
//! that does not parse narrows nothing, and [`egress`] says why.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use remora_control_api::v1;

use super::objects::Objects;
use super::translate::Mesh;
use crate::ads::{Egress, service_of};

/// The annotation, on a Namespace or a Pod (which wins), that lists the Services its workloads
/// call.
pub const EGRESS_ANNOTATION: &str = "remora.dev/egress";

/// One entry of the annotation: a namespace and a Service name (`None`: any).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern {
    namespace: Namespaces,
    name: Option<String>,
}

/// The namespace part of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Namespaces {
    /// `.`: the workload's own.
    Own,
    /// `*`: any.
    Any,
    /// This one.
    Named(String),
}

/// Why an annotation narrows nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{scope}: {EGRESS_ANNOTATION} entry {entry:?} is not NAMESPACE/NAME (`.` for the own namespace, `*` for any)")]
pub struct EgressError {
    /// The namespace (`NAMESPACE`) or pod (`NAMESPACE/POD`) annotated.
    pub scope: String,
    /// The entry that does not parse.
    pub entry: String,
}

/// Parses an annotation's value: its entries, or the first that does not parse.
fn parse(scope: &str, value: &str) -> Result<Vec<Pattern>, EgressError> {
    let error = |entry: &str| EgressError { scope: scope.to_owned(), entry: entry.to_owned() };
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (namespace, name) = entry.split_once('/').ok_or_else(|| error(entry))?;
            let label = |part: &str| {
                !part.is_empty()
                    && part.len() <= 63
                    && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            };
            let namespace = match namespace {
                "." => Namespaces::Own,
                "*" => Namespaces::Any,
                ns if label(ns) => Namespaces::Named(ns.to_owned()),
                _ => return Err(error(entry)),
            };
            let name = match name {
                "*" => None,
                n if label(n) => Some(n.to_owned()),
                _ => return Err(error(entry)),
            };
            Ok(Pattern { namespace, name })
        })
        .collect()
}

impl Pattern {
    fn matches(&self, own: &str, namespace: &str, name: &str) -> bool {
        let namespace_matches = match &self.namespace {
            Namespaces::Own => namespace == own,
            Namespaces::Any => true,
            Namespaces::Named(ns) => ns == namespace,
        };
        namespace_matches && self.name.as_deref().is_none_or(|n| n == name)
    }
}

/// Per scope whose namespace or pod is annotated [`EGRESS_ANNOTATION`], the Services its proxies
/// are sent: those listed, and those the listed Services' route tables (as `mesh` made them, the
/// scope's namespace's own among them) send to. Annotations that do not parse narrow nothing and
/// are returned as errors.
pub fn egress(objects: &Objects, mesh: &Mesh) -> (BTreeMap<String, Egress>, Vec<EgressError>) {
    let mut narrowed = BTreeMap::new();
    let mut errors = Vec::new();
    let mut annotated: Vec<(String, &str, &str)> = Vec::new();
    for (name, namespace) in &objects.namespaces {
        if let Some(value) = namespace.settings.get(EGRESS_ANNOTATION) {
            annotated.push((name.clone(), name.as_str(), value.as_str()));
        }
    }
    for pod in objects.pods.values() {
        if let Some(value) = pod.settings.get(EGRESS_ANNOTATION) {
            annotated.push((format!("{}/{}", pod.namespace, pod.name), pod.namespace.as_str(), value.as_str()));
        }
    }
    // Pods of one workload carry the same annotation: each distinct one is worked out once, and
    // its scopes share the result.
    let mut made: BTreeMap<(&str, &str), Arc<BTreeSet<String>>> = BTreeMap::new();
    for (scope, own, value) in annotated {
        if let Some(services) = made.get(&(own, value)) {
            narrowed.insert(scope, Egress { services: services.clone() });
            continue;
        }
        let patterns = match parse(&scope, value) {
            Ok(patterns) => patterns,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        let listed: Vec<&(String, String)> = objects
            .services
            .keys()
            .filter(|(namespace, name)| patterns.iter().any(|p| p.matches(own, namespace, name)))
            .collect();
        let mut services: BTreeSet<String> =
            listed.iter().map(|(namespace, name)| format!("{namespace}/{name}")).collect();
        // What the listed Services' tables send to, as this namespace's proxies see them.
        for key in listed {
            for table in mesh.route_tables_of(key, own) {
                services.extend(clusters_of(table).filter_map(service_of).map(str::to_owned));
            }
        }
        let services = Arc::new(services);
        made.insert((own, value), services.clone());
        narrowed.insert(scope, Egress { services });
    }
    (narrowed, errors)
}

/// The clusters a route table sends to: its routes' backends and mirrors, its TCP cluster.
fn clusters_of(table: &v1::RouteTable) -> impl Iterator<Item = &str> {
    let routes = table.routes.iter().flat_map(|route| {
        let backends = route.backends.iter().map(|backend| backend.cluster.as_str());
        backends.chain(route.mirror.iter().map(|mirror| mirror.cluster.as_str()))
    });
    routes.chain(std::iter::once(table.tcp_cluster.as_str())).filter(|cluster| !cluster.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn entries_parse_and_match() {
        let patterns = parse("shop", "./*, auth/tokens kube-system/*  */dns").unwrap();
        let matches = |ns: &str, name: &str| patterns.iter().any(|p| p.matches("shop", ns, name));
        assert!(matches("shop", "web") && matches("auth", "tokens") && matches("kube-system", "x"));
        assert!(matches("any", "dns"));
        assert!(!matches("auth", "users") && !matches("data", "db"));
        assert!(parse("shop", "").unwrap().is_empty(), "an empty list: only what the routes need");
        for bad in ["web", "Shop/web", "shop/", "/web", "shop/web/x", "shop/we_b"] {
            let error = parse("shop/web-1", bad).unwrap_err();
            assert_eq!(error.entry, bad);
            assert!(error.to_string().starts_with("shop/web-1: remora.dev/egress entry"), "{error}");
        }
    }
}
