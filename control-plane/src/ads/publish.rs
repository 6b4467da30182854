//! Publication: the resource sets the sources make, encoded once and published as immutable
//! [`ServedSet`]s for the ADS streams to read.
//!
//! A source hands the [`Publisher`] either a whole set ([`Publisher::publish_views`]: the
//! resources every proxy sees and each scope's own) or the changes to the last one
//! ([`Publisher::publish_delta`]: resources put and removed, for a source that knows what it
//! changed, as the cluster follower does). Either way each resource is encoded once into a shared
//! [`ServedResource`] (an `Any` whose bytes are reference-counted, so a thousand proxies receiving
//! it share one encoding), a resource whose bytes did not change keeps its `Arc` and version, and
//! the new set goes out through a `watch` channel listing, per kind, the names it touched. A whole
//! set costs an encoding of every resource to find what changed; a delta costs only its own, so one
//! endpoint's change in a cluster of thousands of Services is published in the time of that
//! Service's few resources.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tracing::info;

use crate::metrics::ControlMetrics;
use remora_control_api::xds::discovery;
use remora_control_api::xds::version_of;
use remora_control_api::{Kind, Resource};

/// One resource as served: encoded once, shared by every stream.
#[derive(Debug)]
pub struct ServedResource {
    /// The resource's version (a hash of its bytes).
    pub version: String,
    /// The wire form, ready to clone into a response.
    pub wire: discovery::Resource,
}

/// Resources of one kind as served, by name.
type Served = BTreeMap<String, Arc<ServedResource>>;

/// The Services whose resources a scope's proxies are sent, where the scope narrows its view (the
/// automatic mesh's `remora.dev/egress`): of the resources named for a Service port
/// (`NAMESPACE/NAME:PORT`, as the mesh names each Service's cluster, endpoints and route table),
/// only those of these Services. Resources of any other name are in every view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    /// `NAMESPACE/NAME` of each Service sent (shared by the scopes that list the same).
    pub services: Arc<BTreeSet<String>>,
}

impl Egress {
    /// Whether a resource named `name` is in a view this narrows.
    pub fn allows(&self, name: &str) -> bool {
        service_of(name).is_none_or(|service| self.services.contains(service))
    }
}

/// The Service (`NAMESPACE/NAME`) a resource named for one of its ports (`NAMESPACE/NAME:PORT`)
/// belongs to; `None` for any other name.
pub fn service_of(name: &str) -> Option<&str> {
    let (service, port) = name.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let (namespace, service_name) = service.split_once('/')?;
    (!namespace.is_empty() && !service_name.is_empty() && !service_name.contains('/')).then_some(service)
}

/// One published resource set: the resources every proxy sees, and per scope (a namespace,
/// `NAMESPACE`, or a pod, `NAMESPACE/POD`) the ones only that scope's proxies see (beside the
/// shared ones, or in place of one of the same name), and the Services a scope narrows its view
/// to, if it does.
#[derive(Debug, Default)]
pub struct ServedSet {
    /// Bumped by every publication that changed something.
    pub generation: u64,
    /// The source's version (a git commit, or a hash of the directory's content).
    pub system_version: String,
    /// When it was published (convergence is measured from here).
    pub published_at: Option<Instant>,
    shared: Layer,
    /// Per scope, its own layer (a scope whose layer went empty in this publication keeps it,
    /// empty, for one generation, so that its proxies learn what it touched).
    scopes: BTreeMap<String, Layer>,
    /// Per scope that narrows its view, the Services it is sent (the most specific scope's
    /// applies).
    egress: BTreeMap<String, Arc<Egress>>,
    /// The scopes whose narrowing this publication changed (their proxies diff every resource).
    egress_changed: BTreeSet<String>,
}

/// Resources of every kind, and what the publication that made them touched.
#[derive(Debug, Default)]
struct Layer {
    kinds: [Served; Kind::COUNT],
    /// Per kind, the names added, changed or removed since the previous generation (sorted): a
    /// stream that holds that generation diffs only these instead of every resource.
    touched: [Vec<String>; Kind::COUNT],
}

impl ServedSet {
    /// The resources of `kind` every proxy sees, by name.
    pub fn of(&self, kind: Kind) -> &Served {
        &self.shared.kinds[kind.index()]
    }

    /// The resources of `kind` a proxy of `scopes` (least specific first: its namespace, then its
    /// pod) sees; none, the shared ones alone.
    pub fn view(&self, kind: Kind, scopes: &[String]) -> View<'_> {
        let layer = |i: usize| scopes.get(i).and_then(|scope| self.scopes.get(scope)).map(|l| &l.kinds[kind.index()]);
        let egress = scopes.iter().rev().find_map(|scope| self.egress.get(scope)).map(|egress| &**egress);
        View { layers: [Some(&self.shared.kinds[kind.index()]), layer(0), layer(1)], egress }
    }

    /// Whether this publication changed what the view of `scopes` narrows to.
    pub(super) fn egress_changed(&self, scopes: &[String]) -> bool {
        scopes.iter().any(|scope| self.egress_changed.contains(scope))
    }

    /// The scopes that narrow their view, and how many Services each is sent.
    pub fn narrowed(&self) -> impl Iterator<Item = (&str, usize)> {
        self.egress.iter().map(|(scope, egress)| (scope.as_str(), egress.services.len()))
    }

    /// The scopes with resources of their own, and how many each has.
    pub fn scopes(&self) -> impl Iterator<Item = (&str, usize)> {
        self.scopes.iter().map(|(scope, layer)| (scope.as_str(), layer.kinds.iter().map(BTreeMap::len).sum()))
    }

    /// The names of `kind` the last publication touched in the view of `scopes`.
    pub(super) fn touched(&self, kind: Kind, scopes: &[String]) -> BTreeSet<&str> {
        let own = scopes.iter().filter_map(|scope| self.scopes.get(scope));
        let layers = std::iter::once(&self.shared).chain(own);
        layers.flat_map(|layer| layer.touched[kind.index()].iter().map(String::as_str)).collect()
    }
}

/// What one proxy sees of a kind: the shared resources, its namespace's over them, its pod's over
/// those; of the resources named for a Service port, only its egress's, if it narrows.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// Least specific first.
    layers: [Option<&'a Served>; 3],
    egress: Option<&'a Egress>,
}

impl<'a> View<'a> {
    /// The resource named `name`: the most specific layer's.
    pub fn get(&self, name: &str) -> Option<&'a Arc<ServedResource>> {
        if self.egress.is_some_and(|egress| !egress.allows(name)) {
            return None;
        }
        self.layers.iter().rev().flatten().find_map(|layer| layer.get(name))
    }

    /// Every resource, by name, each from the most specific layer that has it.
    pub fn iter(&self) -> impl Iterator<Item = (&'a String, &'a Arc<ServedResource>)> + use<'a> {
        let (layers, egress) = (self.layers, self.egress);
        layers.into_iter().enumerate().flat_map(move |(i, layer)| {
            let above = layers.into_iter().skip(i + 1).flatten();
            layer.into_iter().flatten().filter(move |(name, _)| {
                above.clone().all(|l| !l.contains_key(*name)) && egress.is_none_or(|egress| egress.allows(name))
            })
        })
    }
}

/// What a publication changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Resources added or changed.
    pub changed: usize,
    /// Resources removed.
    pub removed: usize,
}

/// Changes to the last published set, each in its scope (`None`: what every proxy sees;
/// `Some(scope)`: a namespace's or a pod's own, as in [`Publisher::publish_views`]).
#[derive(Clone, Debug, Default)]
pub struct Delta {
    /// Resources added or replaced (one whose bytes did not change changes nothing).
    pub put: Vec<(Option<String>, Resource)>,
    /// Resources gone, by kind and name.
    pub removed: Vec<(Option<String>, Kind, String)>,
    /// The scopes that narrow their view now, and to what (`None`: as before).
    pub egress: Option<BTreeMap<String, Egress>>,
}

/// Takes resource sets from the sources and makes them the served set.
#[derive(Debug)]
pub struct Publisher {
    tx: watch::Sender<Arc<ServedSet>>,
    pub(super) metrics: Arc<ControlMetrics>,
}

impl Publisher {
    /// A publisher with nothing published yet.
    pub fn new(metrics: Arc<ControlMetrics>) -> Self {
        let (tx, _) = watch::channel(Arc::new(ServedSet::default()));
        Publisher { tx, metrics }
    }

    /// A view of what is served now, following every publication.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ServedSet>> {
        self.tx.subscribe()
    }

    /// Makes `resources` the served set, for every proxy alike. See [`Publisher::publish_views`].
    pub fn publish(&self, resources: &[Resource], system_version: &str) -> Published {
        self.publish_views(resources, &BTreeMap::new(), system_version)
    }

    /// Makes `resources` the set every proxy sees and `scoped` what only each scope's proxies see
    /// (a namespace, `NAMESPACE`, or a pod, `NAMESPACE/POD`: beside the rest, or in place of a
    /// resource of the same name). Resources whose bytes did not change keep their shared
    /// encoding and version; if nothing changed at all, nothing is published.
    pub fn publish_views(
        &self,
        resources: &[Resource],
        scoped: &BTreeMap<String, Vec<Resource>>,
        system_version: &str,
    ) -> Published {
        self.publish_narrowed(resources, scoped, None, system_version)
    }

    /// [`Publisher::publish_views`], with the scopes that narrow their view and to what (`None`:
    /// as before).
    pub fn publish_narrowed(
        &self,
        resources: &[Resource],
        scoped: &BTreeMap<String, Vec<Resource>>,
        egress: Option<BTreeMap<String, Egress>>,
        system_version: &str,
    ) -> Published {
        let previous = self.tx.borrow().clone();
        let mut summary = Published::default();
        let shared = Layer::encode(resources, Some(&previous.shared), &mut summary);
        let mut scopes = BTreeMap::new();
        let names: BTreeSet<&String> = scoped.keys().chain(previous.scopes.keys()).collect();
        for scope in names {
            let own = scoped.get(scope).map_or(&[][..], Vec::as_slice);
            scopes.insert(scope.clone(), Layer::encode(own, previous.scopes.get(scope), &mut summary));
        }
        self.send(&previous, shared, scopes, egress, summary, system_version)
    }

    /// Applies `delta` to the set last published: only its resources are encoded. If it changes
    /// nothing, nothing is published.
    pub fn publish_delta(&self, delta: &Delta, system_version: &str) -> Published {
        if delta.put.is_empty() && delta.removed.is_empty() && delta.egress.is_none() {
            return Published::default();
        }
        let previous = self.tx.borrow().clone();
        let mut summary = Published::default();
        let mut shared = previous.shared.carried();
        let mut scopes: BTreeMap<String, Layer> =
            previous.scopes.iter().map(|(scope, layer)| (scope.clone(), layer.carried())).collect();
        for (scope, resource) in &delta.put {
            let layer = match scope {
                None => &mut shared,
                Some(scope) => scopes.entry(scope.clone()).or_default(),
            };
            layer.put(resource, &mut summary);
        }
        for (scope, kind, name) in &delta.removed {
            let layer = match scope {
                None => Some(&mut shared),
                Some(scope) => scopes.get_mut(scope),
            };
            if let Some(layer) = layer
                && layer.kinds[kind.index()].remove(name).is_some()
            {
                summary.removed += 1;
                layer.touched[kind.index()].push(name.clone());
            }
        }
        for layer in std::iter::once(&mut shared).chain(scopes.values_mut()) {
            for touched in &mut layer.touched {
                touched.sort_unstable();
                touched.dedup();
            }
        }
        self.send(&previous, shared, scopes, delta.egress.clone(), summary, system_version)
    }

    /// Publishes the new layers (and narrowing) as the next generation, if `summary` says they
    /// changed anything or the narrowing changed. A scope whose layer went empty keeps it, empty,
    /// for this one generation, so that its proxies learn what it touched.
    fn send(
        &self,
        previous: &ServedSet,
        shared: Layer,
        mut scopes: BTreeMap<String, Layer>,
        egress: Option<BTreeMap<String, Egress>>,
        summary: Published,
        system_version: &str,
    ) -> Published {
        scopes.retain(|_, layer| {
            layer.kinds.iter().any(|k| !k.is_empty()) || layer.touched.iter().any(|t| !t.is_empty())
        });
        for kind in Kind::ALL {
            self.metrics.set_resources(kind, shared.kinds[kind.index()].len());
        }
        let (egress, egress_changed) = match egress {
            None => (previous.egress.clone(), BTreeSet::new()),
            Some(egress) => narrowing(&previous.egress, egress),
        };
        if summary == Published::default() && egress_changed.is_empty() {
            return summary;
        }
        let set = ServedSet {
            generation: previous.generation + 1,
            system_version: system_version.to_owned(),
            published_at: Some(Instant::now()),
            shared,
            scopes,
            egress,
            egress_changed,
        };
        info!(
            generation = set.generation,
            version = %set.system_version,
            changed = summary.changed,
            removed = summary.removed,
            scopes = set.scopes.len(),
            "publishing"
        );
        self.tx.send_replace(Arc::new(set));
        summary
    }
}

/// The narrowing `egress` makes, keeping `before`'s `Arc` where a scope's did not change, and the
/// scopes whose did (or that stopped or started narrowing).
fn narrowing(
    before: &BTreeMap<String, Arc<Egress>>,
    egress: BTreeMap<String, Egress>,
) -> (BTreeMap<String, Arc<Egress>>, BTreeSet<String>) {
    let mut changed: BTreeSet<String> = before.keys().filter(|scope| !egress.contains_key(*scope)).cloned().collect();
    let now = egress
        .into_iter()
        .map(|(scope, egress)| match before.get(&scope).filter(|old| ***old == egress) {
            Some(old) => (scope, old.clone()),
            None => {
                changed.insert(scope.clone());
                (scope, Arc::new(egress))
            }
        })
        .collect();
    (now, changed)
}

impl Layer {
    /// Encodes `resources`, keeping `previous`'s encoding of each that did not change, and notes
    /// what changed or went.
    fn encode(resources: &[Resource], previous: Option<&Layer>, summary: &mut Published) -> Layer {
        let none: [Served; Kind::COUNT] = Default::default();
        let before = previous.map_or(&none, |previous| &previous.kinds);
        let mut layer = Layer::default();
        for resource in resources {
            let kind = resource.kind();
            let old = before[kind.index()].get(resource.name());
            let served = layer.encoded(resource, old, summary);
            layer.kinds[kind.index()].insert(resource.name().to_owned(), served);
        }
        for kind in Kind::ALL {
            let (now, touched) = (&layer.kinds[kind.index()], &mut layer.touched[kind.index()]);
            let count = touched.len();
            touched.extend(before[kind.index()].keys().filter(|name| !now.contains_key(*name)).cloned());
            summary.removed += touched.len() - count;
            touched.sort_unstable();
            touched.dedup();
        }
        layer
    }

    /// This layer's resources, as the start of the next generation's (which has touched nothing
    /// yet).
    fn carried(&self) -> Layer {
        Layer { kinds: self.kinds.clone(), touched: Default::default() }
    }

    /// Puts `resource` in the layer, over any of the same kind and name.
    fn put(&mut self, resource: &Resource, summary: &mut Published) {
        let kind = resource.kind();
        let old = self.kinds[kind.index()].get(resource.name()).cloned();
        let served = self.encoded(resource, old.as_ref(), summary);
        self.kinds[kind.index()].insert(resource.name().to_owned(), served);
    }

    /// `resource` as served: `old` again if its bytes are the same, else encoded anew (and noted
    /// as touched).
    fn encoded(
        &mut self,
        resource: &Resource,
        old: Option<&Arc<ServedResource>>,
        summary: &mut Published,
    ) -> Arc<ServedResource> {
        let any = resource.to_any();
        let version = version_of(&any.value);
        if let Some(old) = old.filter(|old| old.version == version) {
            return old.clone();
        }
        let name = resource.name();
        summary.changed += 1;
        self.touched[resource.kind().index()].push(name.to_owned());
        Arc::new(ServedResource {
            version: version.clone(),
            wire: discovery::Resource {
                name: name.to_owned(),
                aliases: Vec::new(),
                version,
                resource: Some(any),
                ttl: None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn resources(yaml: &str) -> Vec<Resource> {
        remora_control_api::config::parse(yaml, "t").unwrap().resources
    }

    /// Every resource of `set` a proxy of `scopes` sees, by kind and name, with its version.
    fn seen(set: &ServedSet, scopes: &[String]) -> Vec<(Kind, String, String)> {
        Kind::ALL
            .into_iter()
            .flat_map(|kind| set.view(kind, scopes).iter().map(move |(n, r)| (kind, n.clone(), r.version.clone())))
            .collect()
    }

    /// A scope that narrows sees, of the resources named for a Service port, only its Services'
    /// (the others' names, and resources named otherwise, as before); a pod's narrowing wins over
    /// its namespace's; a change of narrowing alone is a publication that names the scopes it
    /// changed, and the same narrowing again publishes nothing.
    #[test]
    fn a_narrowed_scope_sees_only_its_services() {
        let publisher = Publisher::new(Arc::new(ControlMetrics::new()));
        let set = resources(
            "resources:\n  - {kind: Cluster, name: \"shop/web:80\"}\n  - {kind: Cluster, name: \"shop/db:5432\"}\n  - {kind: Cluster, name: \"data/db:5432\"}\n  - {kind: Cluster, name: plain}\n",
        );
        let egress =
            |services: &[&str]| Egress { services: Arc::new(services.iter().map(|s| (*s).to_owned()).collect()) };
        let narrowing = BTreeMap::from([
            ("shop".to_owned(), egress(&["shop/web"])),
            ("shop/tool".to_owned(), egress(&["data/db"])),
        ]);
        publisher.publish_narrowed(&set, &BTreeMap::new(), Some(narrowing.clone()), "v1");
        let served = publisher.subscribe().borrow().clone();
        let names = |scopes: &[&str]| {
            let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
            served.view(Kind::Cluster, &scopes).iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()
        };
        assert_eq!(names(&[]), ["data/db:5432", "plain", "shop/db:5432", "shop/web:80"]);
        assert_eq!(names(&["shop"]), ["plain", "shop/web:80"]);
        assert_eq!(names(&["shop", "shop/tool"]), ["data/db:5432", "plain"], "the pod's own wins");
        assert!(served.view(Kind::Cluster, &["shop".to_owned()]).get("shop/db:5432").is_none());
        assert!(served.egress_changed(&["shop".to_owned()]) && !served.egress_changed(&["data".to_owned()]));
        assert_eq!(service_of("shop/web:80"), Some("shop/web"));
        for other in ["plain", "shop/web", "a/b/c:80", "/web:80", "shop/:80", "shop/web:http"] {
            assert_eq!(service_of(other), None, "{other}");
        }

        let generation = served.generation;
        publisher.publish_narrowed(&set, &BTreeMap::new(), Some(narrowing), "v1");
        assert_eq!(publisher.subscribe().borrow().generation, generation, "the same narrowing: nothing published");
        let delta = Delta { egress: Some(BTreeMap::new()), ..Delta::default() };
        publisher.publish_delta(&delta, "v1");
        let widened = publisher.subscribe().borrow().clone();
        assert_eq!(widened.generation, generation + 1, "a change of narrowing alone is published");
        assert!(widened.egress_changed(&["shop".to_owned()]));
        assert_eq!(widened.view(Kind::Cluster, &["shop".to_owned()]).iter().count(), 4);
    }

    /// A delta leaves the set a whole publication of the result would: the same resources, the
    /// same versions (the unchanged keep their encoding), in every scope; it touches only what it
    /// changed, an emptied scope stays one generation to say so, and a delta changing nothing
    /// publishes nothing.
    #[test]
    fn a_delta_publishes_what_the_whole_set_would() {
        let publisher = Publisher::new(Arc::new(ControlMetrics::new()));
        let before = resources(
            "resources:\n  - {kind: Cluster, name: a}\n  - {kind: Cluster, name: b}\n  - {kind: Endpoints, cluster: a, endpoints: [{address: \"10.0.0.1:80\"}]}\n",
        );
        let own = resources("resources:\n  - {kind: Cluster, name: a, balancer: ewma}\n");
        publisher.publish_views(&before, &BTreeMap::from([("shop".to_owned(), own.clone())]), "v1");
        let first = publisher.subscribe().borrow().clone();
        let after = resources(
            "resources:\n  - {kind: Cluster, name: a}\n  - {kind: Cluster, name: c}\n  - {kind: Endpoints, cluster: a, endpoints: [{address: \"10.0.0.2:80\"}]}\n",
        );
        let delta = Delta {
            put: vec![(None, after[0].clone()), (None, after[1].clone()), (None, after[2].clone())],
            removed: vec![(None, Kind::Cluster, "b".into()), (Some("shop".into()), Kind::Cluster, "a".into())],
            egress: None,
        };
        assert_eq!(publisher.publish_delta(&delta, "v2"), Published { changed: 2, removed: 2 });
        let carried = publisher.subscribe().borrow().clone();
        let whole = Publisher::new(Arc::new(ControlMetrics::new()));
        whole.publish(&after, "v2");
        let made_whole = whole.subscribe().borrow().clone();
        let shop = ["shop".to_owned()];
        assert_eq!(seen(&carried, &shop), seen(&made_whole, &shop));
        assert_eq!(seen(&carried, &[]), seen(&made_whole, &[]));
        assert_eq!(carried.generation, first.generation + 1);
        assert!(Arc::ptr_eq(first.of(Kind::Cluster).get("a").unwrap(), carried.of(Kind::Cluster).get("a").unwrap()));
        assert_eq!(carried.touched(Kind::Cluster, &[]), BTreeSet::from(["b", "c"]));
        assert_eq!(carried.touched(Kind::Cluster, &shop), BTreeSet::from(["a", "b", "c"]));
        assert_eq!(carried.touched(Kind::Endpoints, &[]), BTreeSet::from(["a"]));
        assert_eq!(carried.scopes().collect::<Vec<_>>(), [("shop", 0)], "emptied, kept to say what it touched");
        let again = Delta {
            put: vec![(None, after[1].clone())],
            removed: vec![(None, Kind::Cluster, "b".into())],
            egress: None,
        };
        assert_eq!(publisher.publish_delta(&again, "v3"), Published::default());
        assert_eq!(publisher.subscribe().borrow().generation, carried.generation, "nothing changed, nothing published");
    }
}
