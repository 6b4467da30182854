//! Route status: for each HTTPRoute and GRPCRoute, per Service it names as a parent, the Gateway API
//! conditions Remora's mesh controller (`remora.dev/mesh`) reports, worked out from the objects.
//!
//! `Accepted` is `True` when the route was read and its parent is there; `False` with reason
//! `UnsupportedValue` for a route that cannot be applied (the message says why, naming the rule
//! and field), `NoMatchingParent` for a Service (or a Service port) that does not exist.
//! `ResolvedRefs` is `True` when every backendRef (and mirror) names a Service port that exists;
//! `False` with `RefNotPermitted` for one in another namespace than the route's that no
//! ReferenceGrant there admits (the parent itself needs none), else `BackendNotFound`. [`parents`] gives the entries of
//! one route's `status.parents` in Gateway API's form; the cluster source writes them to the API
//! server, and the control plane shows them in `/config_dump` either way.

use serde_json::{Value, json};

use super::gateway::{BackendRef, ParentRef, Route};
use super::objects::Objects;

/// The `controllerName` Remora's entries carry.
pub const CONTROLLER: &str = "remora.dev/mesh";

/// One condition: its type, whether it holds, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// `Accepted` or `ResolvedRefs`.
    pub kind: &'static str,
    /// Whether it holds.
    pub holds: bool,
    /// The reason, one of Gateway API's.
    pub reason: &'static str,
    /// What a person reads.
    pub message: String,
}

/// The conditions of `route` for each Service it names as a parent, in its parentRefs' order.
pub fn conditions(objects: &Objects, route: &Route) -> Vec<(ParentRef, [Condition; 2])> {
    route
        .parents
        .iter()
        .map(|parent| (parent.clone(), [accepted(objects, route, parent), resolved(objects, route)]))
        .collect()
}

fn accepted(objects: &Objects, route: &Route, parent: &ParentRef) -> Condition {
    let (holds, reason, message) =
        match (&route.rules, objects.services.get(&(parent.namespace.clone(), parent.name.clone()))) {
            (Err(problem), _) => (false, "UnsupportedValue", problem.clone()),
            (Ok(_), None) => (false, "NoMatchingParent", format!("no Service {}/{}", parent.namespace, parent.name)),
            (Ok(_), Some(service)) => match parent.port {
                Some(port) if !service.ports.iter().any(|p| p.port == port) => (
                    false,
                    "NoMatchingParent",
                    format!("Service {}/{} has no TCP port {port}", parent.namespace, parent.name),
                ),
                _ => (true, "Accepted", "the mesh routes the Service's callers by this route".to_owned()),
            },
        };
    Condition { kind: "Accepted", holds, reason, message }
}

fn resolved(objects: &Objects, route: &Route) -> Condition {
    let backends: Vec<&BackendRef> = match &route.rules {
        Ok(rules) => {
            rules.iter().flat_map(|rule| rule.backends.iter().chain(rule.mirror.as_ref().map(|(b, _)| b))).collect()
        }
        Err(_) => Vec::new(),
    };
    for backend in backends {
        let permitted = objects.permits(route, backend);
        let what = format!("{}/{}:{}", backend.namespace, backend.name, backend.port);
        if !permitted {
            let message =
                format!("backend {what} is in another namespace, and no ReferenceGrant there admits this route");
            return Condition { kind: "ResolvedRefs", holds: false, reason: "RefNotPermitted", message };
        }
        if objects.service_port(&backend.namespace, &backend.name, backend.port).is_none() {
            let message = format!("no Service port {what}: left out, the rule's other backends take its share");
            return Condition { kind: "ResolvedRefs", holds: false, reason: "BackendNotFound", message };
        }
    }
    Condition {
        kind: "ResolvedRefs",
        holds: true,
        reason: "ResolvedRefs",
        message: "every backend resolved".to_owned(),
    }
}

/// Remora's entries of `route`'s `status.parents`, at `generation`: each condition with
/// `lastTransitionTime` from `current` (the entries there now) where it has not changed, else
/// `now`.
pub fn parents(objects: &Objects, route: &Route, generation: i64, current: &[Value], now: &str) -> Vec<Value> {
    conditions(objects, route)
        .into_iter()
        .map(|(parent, conditions)| {
            let mut reference =
                json!({"group": "", "kind": "Service", "namespace": parent.namespace, "name": parent.name});
            if let Some(port) = parent.port {
                reference["port"] = port.into();
            }
            let before =
                current.iter().find(|entry| entry["controllerName"] == CONTROLLER && entry["parentRef"] == reference);
            let conditions: Vec<Value> = conditions
                .iter()
                .map(|condition| {
                    let status = if condition.holds { "True" } else { "False" };
                    let unchanged = before
                        .and_then(|b| b["conditions"].as_array())
                        .into_iter()
                        .flatten()
                        .find(|c| c["type"] == condition.kind && c["status"] == status);
                    let since = unchanged.and_then(|c| c["lastTransitionTime"].as_str()).unwrap_or(now);
                    json!({"type": condition.kind, "status": status, "reason": condition.reason,
                           "message": condition.message, "observedGeneration": generation,
                           "lastTransitionTime": since})
                })
                .collect();
            json!({"parentRef": reference, "controllerName": CONTROLLER, "conditions": conditions})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::mesh::RouteKind;

    fn objects() -> Objects {
        Objects::read(
            "cluster.local",
            &[json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "mesh", "name": "echo"},
                     "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})],
        )
    }

    fn route(parents: Value, backends: Value) -> Route {
        let object = json!({"metadata": {"namespace": "mesh", "name": "r"},
                            "spec": {"parentRefs": parents, "rules": [{"backendRefs": backends}]}});
        Route::read(RouteKind::Http, &object).unwrap()
    }

    fn reasons(route: &Route) -> Vec<(&'static str, &'static str)> {
        conditions(&objects(), route).iter().flat_map(|(_, c)| c.iter().map(|c| (c.kind, c.reason))).collect()
    }

    /// Accepted for a parent that is there, NoMatchingParent for a missing Service or port;
    /// ResolvedRefs unless a backend is missing (BackendNotFound) or elsewhere (RefNotPermitted);
    /// UnsupportedValue for a route that cannot be applied.
    #[test]
    fn conditions_say_what_is_wrong() {
        let parent = json!([{"kind": "Service", "name": "echo"}]);
        let fine = route(parent.clone(), json!([{"name": "echo", "port": 80}]));
        assert_eq!(reasons(&fine), [("Accepted", "Accepted"), ("ResolvedRefs", "ResolvedRefs")]);
        let missing = route(
            json!([{"kind": "Service", "name": "nowhere"}, {"kind": "Service", "name": "echo", "port": 81}]),
            json!([{"name": "gone", "port": 80}]),
        );
        assert_eq!(
            reasons(&missing),
            [
                ("Accepted", "NoMatchingParent"),
                ("ResolvedRefs", "BackendNotFound"),
                ("Accepted", "NoMatchingParent"),
                ("ResolvedRefs", "BackendNotFound")
            ]
        );
        let elsewhere = route(parent.clone(), json!([{"name": "echo", "namespace": "other", "port": 80}]));
        assert_eq!(reasons(&elsewhere)[1], ("ResolvedRefs", "RefNotPermitted"));
        let odd = Route::read(
            RouteKind::Http,
            &json!({"metadata": {"namespace": "mesh", "name": "r"},
                    "spec": {"parentRefs": parent, "rules": [{"filters": [{"type": "CORS"}]}]}}),
        )
        .unwrap();
        assert_eq!(reasons(&odd)[0], ("Accepted", "UnsupportedValue"));
    }

    /// An entry keeps a condition's transition time while its status stays, and takes `now` when
    /// it changes.
    #[test]
    fn transition_times_move_only_with_the_status() {
        let fine = route(json!([{"kind": "Service", "name": "echo"}]), json!([{"name": "echo", "port": 80}]));
        let first = parents(&objects(), &fine, 1, &[], "2026-01-01T00:00:00Z");
        assert_eq!(first[0]["controllerName"], CONTROLLER);
        assert_eq!(first[0]["conditions"][0]["lastTransitionTime"], "2026-01-01T00:00:00Z");
        let again = parents(&objects(), &fine, 2, &first, "2026-01-02T00:00:00Z");
        assert_eq!(again[0]["conditions"][0]["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(again[0]["conditions"][0]["observedGeneration"], 2);
        let broken = route(json!([{"kind": "Service", "name": "echo"}]), json!([{"name": "gone", "port": 80}]));
        let changed = parents(&objects(), &broken, 3, &again, "2026-01-03T00:00:00Z");
        assert_eq!(changed[0]["conditions"][1]["status"], "False");
        assert_eq!(changed[0]["conditions"][1]["lastTransitionTime"], "2026-01-03T00:00:00Z");
    }
}
