//! Route status, written back: each HTTPRoute's and GRPCRoute's `status.parents` entries of
//! Remora's mesh controller (`mesh::status`), kept current on the API server.
//!
//! [`keep`] wakes whenever the cluster's objects change (and every [`RECHECK`], to retry a write
//! that failed), works out each route's entries from the objects, and for a route whose entries
//! differ from what its object carries sends a JSON patch to its `status` subresource: a `test`
//! of the object's `resourceVersion`, then the whole `status` with the other controllers' entries
//! kept as they were. A route changed meanwhile fails the test and is written again once its new
//! version has been seen. The control plane's role needs `patch` on `httproutes/status` and
//! `grpcroutes/status`.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::cluster::{self, SharedObjects};
use crate::mesh::status::{CONTROLLER, parents};
use crate::mesh::{GROUP, RouteKey, RouteKind};

/// How often statuses are checked again without a change (a failed write is retried then).
pub const RECHECK: Duration = Duration::from_secs(30);

/// Keeps the routes' statuses on the API server current with the objects `objects` hands on.
/// Runs until `objects`' sender is dropped.
pub async fn keep(client: kube::Client, mut objects: watch::Receiver<Option<SharedObjects>>) {
    loop {
        let woke = tokio::time::timeout(RECHECK, objects.changed()).await;
        if matches!(woke, Ok(Err(_))) {
            return;
        }
        let Some(shared) = objects.borrow_and_update().clone() else { continue };
        for (key, patch) in due(&shared) {
            let (namespace, kind, name) = &key;
            let plural = if *kind == RouteKind::Grpc { "grpcroutes" } else { "httproutes" };
            let path = format!("/apis/{GROUP}/v1/namespaces/{namespace}/{plural}/{name}/status");
            let write = http::Request::patch(&path)
                .header(http::header::CONTENT_TYPE, "application/json-patch+json")
                .body(patch.to_string().into_bytes());
            let result = match write {
                Ok(write) => client.request::<Value>(write).await.map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            match result {
                Ok(_) => info!(kind = kind.as_str(), route = %format!("{namespace}/{name}"), "route status written"),
                // A route changed since it was read fails the version test: written again once seen.
                Err(error) if error.contains("409") || error.contains("422") => {
                    debug!(kind = kind.as_str(), route = %format!("{namespace}/{name}"), %error, "route changed meanwhile; its status waits for the new version");
                }
                Err(error) => {
                    warn!(kind = kind.as_str(), route = %format!("{namespace}/{name}"), %error, "could not write the route's status; retrying later");
                }
            }
        }
    }
}

/// The routes whose status must be written, each with its JSON patch.
fn due(shared: &SharedObjects) -> Vec<(RouteKey, Value)> {
    let objects = cluster::lock(shared);
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let mut due = Vec::new();
    for (key, route) in &objects.routes {
        let Some(told) = objects.route_objects.get(key) else { continue };
        if told.resource_version.is_empty() || route.parents.is_empty() {
            continue;
        }
        let ours: Vec<&Value> = told.parents.iter().filter(|p| p["controllerName"] == CONTROLLER).collect();
        let wanted = parents(&objects, route, told.generation, &told.parents, &now);
        if ours.len() == wanted.len() && ours.iter().zip(&wanted).all(|(a, b)| *a == b) {
            continue;
        }
        let mut all: Vec<Value> = told.parents.iter().filter(|p| p["controllerName"] != CONTROLLER).cloned().collect();
        all.extend(wanted);
        let patch = json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": told.resource_version},
            {"op": "add", "path": "/status", "value": {"parents": all}},
        ]);
        due.push((key.clone(), patch));
    }
    due
}
