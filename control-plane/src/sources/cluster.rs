//! The cluster as a source: its Services, EndpointSlices, Pods and Namespaces, followed through
//! the API server with kube-runtime's watchers (`remora control --kubernetes-endpoints` or
//! `--kubernetes-mesh`).
//!
//! [`follow`] runs one watcher per kind, cluster-wide. Each lists its kind (in pages of 500), then
//! watches from the list's resource version with bookmarks; when the API server ends a watch it
//! watches again from the last version it saw, and when that version has expired (410 Gone) it
//! lists again; failures back off (kube-runtime's default: 800 ms doubling, with jitter, up to
//! 30 s) while the objects last seen keep serving. Every object arrives as JSON and goes to the same
//! readers as the directory's manifests ([`Objects::apply`]), which keep only what the mesh reads
//! (a pod is its name, service account and whether it has the sidecar: 20,000 pods are a few MB,
//! not their specs), so the API server and a git commit of the same YAML make the same proxy
//! configuration. A list replaces what the kind held before.
//!
//! The objects are kept in one place, shared with their readers ([`SharedObjects`]): each event
//! changes them in place, under the lock. After each burst of events (whatever the watches have
//! ready, taken at once), and once every kind has been listed, [`follow`] says so if anything the
//! mesh reads changed; a watcher's failure is handed on as such, to be counted, while the last set
//! keeps serving.
//!
//! Watch events of different kinds come in on different streams, so a slice may name a pod before
//! that pod's own event arrives: its endpoint then carries no identity until it does (see
//! `endpoint_slices`), and the automatic mesh judges whether a Service's pods have the sidecar by
//! the pods it knows.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::stream::{self, BoxStream};
use futures_util::{FutureExt, StreamExt};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, TypeMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::mesh::{GROUP, ObjectKind, Objects};

/// The cluster's objects as [`follow`] keeps them: it changes them in place (no copy of 20,000
/// pods per endpoint change), its readers lock to read.
pub type SharedObjects = Arc<Mutex<Objects>>;

/// The objects, to read or change them. A holder that panicked left them whole (each change is
/// one map operation), so a poisoned lock is taken as it is.
pub fn lock(objects: &SharedObjects) -> MutexGuard<'_, Objects> {
    objects.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What [`follow`] hands on.
#[derive(Debug)]
pub enum Update {
    /// The objects changed (or every kind was listed for the first time).
    Objects(SharedObjects),
    /// A watcher failed (it retries after a backoff); the last objects keep serving.
    Failed(String),
}

/// One event of one kind's watcher, its object as JSON.
type Item = (ObjectKind, Result<Event<Value>, watcher::Error>);

/// Follows the cluster's Services, EndpointSlices, Pods and Namespaces through `client`, pods'
/// identities in `trust_domain`, handing every change to `on_update`. Runs until dropped.
pub async fn follow(client: Client, trust_domain: String, mut on_update: impl FnMut(Update)) {
    let mut events = stream::select_all([
        watch(&client, ObjectKind::Service, ("", "v1", "Service", "services")),
        watch(&client, ObjectKind::EndpointSlice, ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices")),
        watch(&client, ObjectKind::Pod, ("", "v1", "Pod", "pods")),
        watch(&client, ObjectKind::Namespace, ("", "v1", "Namespace", "namespaces")),
        watch(&client, ObjectKind::HttpRoute, (GROUP, "v1", "HTTPRoute", "httproutes")),
        watch(&client, ObjectKind::GrpcRoute, (GROUP, "v1", "GRPCRoute", "grpcroutes")),
        watch(&client, ObjectKind::ReferenceGrant, (GROUP, "v1beta1", "ReferenceGrant", "referencegrants")),
    ]);
    let mut following = Following::new(&trust_domain);
    while let Some(first) = events.next().await {
        following.take(first, &mut on_update);
        // The rest of the burst, without waiting: one hand-on for a list or a rollout's events.
        while let Some(Some(next)) = events.next().now_or_never() {
            following.take(next, &mut on_update);
        }
        if let Some(objects) = following.changed() {
            on_update(Update::Objects(objects));
        }
    }
}

/// The watcher of one kind (group, version, kind and plural), cluster-wide, backing off after
/// failures, its objects as JSON. Objects are read untyped (`DynamicObject`): the readers take only
/// a few fields of each, so there is no need to decode (and compile decoders for) whole specs.
fn watch(
    client: &Client,
    kind: ObjectKind,
    (group, version, name, plural): (&str, &str, &str, &str),
) -> BoxStream<'static, Item> {
    let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, name), plural);
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    // A list's items carry no apiVersion and kind: the readers recognise an object by them.
    let types = TypeMeta { api_version: resource.api_version.clone(), kind: resource.kind.clone() };
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |event| (kind, event.map(|event| json_event(event, &types))))
        .boxed()
}

/// An event with its object as JSON, `apiVersion` and `kind` set. The object's fields other than
/// its metadata are JSON already: they are moved, not copied.
fn json_event(event: Event<DynamicObject>, types: &TypeMeta) -> Event<Value> {
    let json = |object: DynamicObject| {
        let mut fields = match object.data {
            Value::Object(fields) => fields,
            _ => serde_json::Map::new(),
        };
        fields.insert("apiVersion".into(), Value::String(types.api_version.clone()));
        fields.insert("kind".into(), Value::String(types.kind.clone()));
        fields.insert("metadata".into(), serde_json::to_value(object.metadata).unwrap_or(Value::Null));
        Value::Object(fields)
    };
    match event {
        Event::Apply(object) => Event::Apply(json(object)),
        Event::Delete(object) => Event::Delete(json(object)),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(json(object)),
        Event::InitDone => Event::InitDone,
    }
}

/// The objects as the watchers have told them so far.
#[derive(Debug)]
struct Following {
    objects: SharedObjects,
    /// Per kind, the objects of a list under way: they replace the kind's when it is done.
    listing: HashMap<ObjectKind, Vec<Value>>,
    /// The kinds listed at least once.
    listed: HashSet<ObjectKind>,
    /// Whether something changed since the last hand-on.
    dirty: bool,
    /// Whether following an optional kind has failed yet (said once).
    optional_failed: bool,
}

impl Following {
    fn new(trust_domain: &str) -> Following {
        let objects = Arc::new(Mutex::new(Objects::new(trust_domain)));
        Following { objects, listing: HashMap::new(), listed: HashSet::new(), dirty: false, optional_failed: false }
    }

    fn take(&mut self, (kind, event): Item, on_update: &mut impl FnMut(Update)) {
        match event {
            Ok(Event::Init) => {
                self.listing.insert(kind, Vec::new());
            }
            Ok(Event::InitApply(object)) => self.listing.entry(kind).or_default().push(object),
            Ok(Event::InitDone) => {
                let listed = self.listing.remove(&kind).unwrap_or_default();
                let mut objects = lock(&self.objects);
                // An empty list where nothing was held changes nothing (a cluster without
                // HTTPRoutes), unless it completes the first listing of the kinds the mesh needs.
                let changed = objects.count(kind) > 0 || !listed.is_empty();
                let completes = ObjectKind::REQUIRED.contains(&kind) && !self.listed.contains(&kind);
                objects.clear(kind);
                for object in &listed {
                    objects.apply(object);
                }
                self.listed.insert(kind);
                if completes && ObjectKind::REQUIRED.iter().all(|k| self.listed.contains(k)) {
                    info!(
                        services = objects.services.len(),
                        endpoint_slices = objects.slices.len(),
                        pods = objects.pods.len(),
                        namespaces = objects.namespaces.len(),
                        "Kubernetes objects listed"
                    );
                }
                self.dirty |= changed || completes;
            }
            Ok(Event::Apply(object)) => {
                let changed = lock(&self.objects).apply(&object);
                self.dirty |= changed;
            }
            Ok(Event::Delete(object)) => {
                let changed = lock(&self.objects).delete(&object);
                self.dirty |= changed;
            }
            Err(error) if !ObjectKind::REQUIRED.contains(&kind) => {
                // Gateway API's CRDs may not be installed: said once, then retried quietly.
                if std::mem::replace(&mut self.optional_failed, true) {
                    debug!(kind = ?kind, %error, "listing an optional kind failed again; retrying");
                } else {
                    info!(kind = ?kind, %error, "cannot follow this kind (are the Gateway API CRDs installed?); retrying, the mesh is made without it meanwhile");
                }
            }
            Err(error) => {
                warn!(kind = ?kind, %error, "watching the API server failed; retrying, the objects last seen keep serving");
                on_update(Update::Failed(format!("{kind:?}: {error}")));
            }
        }
    }

    /// The objects, if they changed and every kind has been listed.
    fn changed(&mut self) -> Option<SharedObjects> {
        if !self.dirty || !ObjectKind::REQUIRED.iter().all(|k| self.listed.contains(k)) {
            return None;
        }
        self.dirty = false;
        Some(self.objects.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn service(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": name},
               "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}})
    }

    /// Nothing is handed on until every kind is listed; a list replaces its kind whole; events
    /// change one object; an event that changes nothing the mesh reads hands nothing on.
    #[test]
    fn lists_replace_events_change_and_only_complete_sets_go_out() {
        let mut following = Following::new("cluster.local");
        let mut failures = Vec::new();
        let mut take = |following: &mut Following, kind, event| {
            following.take((kind, Ok(event)), &mut |update| {
                if let Update::Failed(error) = update {
                    failures.push(error);
                }
            })
        };
        for kind in [ObjectKind::Service, ObjectKind::EndpointSlice, ObjectKind::Pod] {
            take(&mut following, kind, Event::Init);
            if kind == ObjectKind::Service {
                take(&mut following, kind, Event::InitApply(service("web")));
            }
            take(&mut following, kind, Event::InitDone);
        }
        assert!(following.changed().is_none(), "namespaces not listed yet");
        take(&mut following, ObjectKind::Namespace, Event::Init);
        take(&mut following, ObjectKind::Namespace, Event::InitDone);
        let first = following.changed().unwrap();
        assert_eq!(first.lock().unwrap().services.len(), 1);
        assert!(following.changed().is_none(), "nothing new");
        take(&mut following, ObjectKind::Service, Event::Apply(service("web")));
        assert!(following.changed().is_none(), "the same object again");
        take(&mut following, ObjectKind::Service, Event::Apply(service("api")));
        assert_eq!(following.changed().unwrap().lock().unwrap().services.len(), 2);
        take(&mut following, ObjectKind::Service, Event::Delete(service("web")));
        assert_eq!(following.changed().unwrap().lock().unwrap().services.len(), 1);
        // A relist (after 410 Gone) replaces the kind: what it no longer holds is gone.
        take(&mut following, ObjectKind::Service, Event::Init);
        take(&mut following, ObjectKind::Service, Event::InitApply(service("db")));
        assert!(following.changed().is_none(), "a list under way is not handed on");
        assert_eq!(lock(&following.objects).services.len(), 1, "nor applied");
        take(&mut following, ObjectKind::Service, Event::InitDone);
        let relisted = following.changed().unwrap();
        assert_eq!(relisted.lock().unwrap().services.keys().map(|(_, name)| name.as_str()).collect::<Vec<_>>(), ["db"]);
        assert!(failures.is_empty());
    }
}
