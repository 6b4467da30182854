//! Composing what serves: the resources from the control plane held so far, joined with the static
//! ones of the proxy's own file, checked and warmed.
//!
//! Each control-plane response becomes a candidate: the resources held so far ([`Dynamic`]) with the
//! response's changes applied ([`Dynamic::with`]). [`compose`] joins the candidate with the static
//! resources and decides what serves:
//!
//! 1. every resource is checked on its own (and against the others for conflicts: two listeners on
//!    one address, two route tables claiming one host); any problem rejects the whole response, and
//!    the reason, naming the resource and field, goes back as the NACK;
//! 2. warming: a cluster serves once its endpoints have arrived (a pass-through cluster needs none);
//!    a route table once every cluster it names serves; a listener once its route tables and default
//!    cluster do. What is not ready yet waits, held but not serving ([`Warming`]), and is listed in
//!    `/config_dump`;
//! 3. a response that would take something serving out of service (a route table now naming a cluster
//!    that does not exist, say) is rejected too: an update never makes a serving proxy serve less by
//!    accident.
//!
//! Pure functions over resources: the reloader calls them with what serves now and compiles the
//! result into the next [`super::Snapshot`].

use remora_control_api::config::FieldError;
use remora_control_api::validate::{self, References, ValidationErrors};
use remora_control_api::xds::client::Update;
use remora_control_api::{Encoded, Kind, Resource, v1};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The resources received from the control plane, with their versions, held encoded. Each is held
/// once: a candidate made from it, and the snapshot compiled from that, share its bytes. The
/// resources of one response share one buffer, which lives as long as any of them does.
#[derive(Clone, Debug, Default)]
pub struct Dynamic {
    resources: BTreeMap<(Kind, String), (String, Encoded)>,
}

impl Dynamic {
    /// The versions held of `kind`'s resources.
    pub fn versions(&self, kind: Kind) -> HashMap<String, String> {
        self.resources
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, name), (version, _))| (name.clone(), version.clone()))
            .collect()
    }

    /// A copy with `update` applied; an update naming a resource twice (sent twice, or sent and
    /// removed) is refused.
    pub fn with(&self, update: &Update) -> Result<Dynamic, String> {
        let mut next = self.clone();
        let mut seen = HashSet::new();
        for (_, resource) in &update.resources {
            if resource.kind() != update.kind {
                return Err(format!("{} {:?} arrived in a {} response", resource.kind(), resource.name(), update.kind));
            }
            if !seen.insert(resource.name()) {
                return Err(format!("{} {:?} appears twice in one response", update.kind.noun(), resource.name()));
            }
        }
        let encoded = Encoded::all(update.resources.iter().map(|(_, resource)| resource));
        for ((version, _), encoded) in update.resources.iter().zip(encoded) {
            next.resources.insert((update.kind, encoded.name().to_owned()), (version.clone(), encoded));
        }
        for name in &update.removed {
            if seen.contains(name.as_str()) {
                return Err(format!("{} {name:?} is both sent and removed in one response", update.kind.noun()));
            }
            next.resources.remove(&(update.kind, name.clone()));
        }
        Ok(next)
    }

    /// Every resource held.
    pub fn resources(&self) -> impl Iterator<Item = (&String, &Encoded)> {
        self.resources.values().map(|(version, resource)| (version, resource))
    }

    /// A version for the whole set: a hash of every (kind, name, version).
    pub fn version(&self) -> String {
        let mut text = String::new();
        for ((kind, name), (version, _)) in &self.resources {
            text.push_str(kind.as_str());
            text.push('/');
            text.push_str(name);
            text.push('=');
            text.push_str(version);
            text.push('\n');
        }
        crate::bootstrap::version_of(&text)
    }
}

/// A resource held but not serving yet, and what it waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warming {
    /// Its kind.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// What it waits for.
    pub reason: String,
}

/// What serves, out of the static and dynamic resources.
#[derive(Debug)]
pub struct Composed {
    /// The resources that serve: a closed set (every reference resolves).
    pub serving: Vec<Encoded>,
    /// The same, decoded (for the compile that follows).
    pub decoded: Vec<Resource>,
    /// The ones that wait.
    pub warming: Vec<Warming>,
}

/// Joins the static and dynamic resources and decides what serves (see the module docs).
/// `serving_now` names what serves at present, so an update that would stop it is refused.
pub fn compose(
    static_resources: &[Encoded],
    dynamic: &Dynamic,
    serving_now: &HashSet<(Kind, String)>,
) -> Result<Composed, ValidationErrors> {
    let all: Vec<&Encoded> = static_resources.iter().chain(dynamic.resources().map(|(_, r)| r)).collect();
    let decoded = super::decode_all_of(all.iter().copied())?;
    validate::validate_with(&decoded, References::Pending)?;
    let (ready, warming) = warm(&decoded, serving_now);
    let (serving, decoded) = all
        .iter()
        .zip(decoded)
        .zip(ready)
        .filter(|(_, ready)| *ready)
        .map(|((encoded, resource), _)| ((*encoded).clone(), resource))
        .unzip();
    let mut errors = Vec::new();
    // An endpoint set whose cluster is gone serves nothing, so it may stop.
    for w in warming.iter().filter(|w| w.kind != Kind::Endpoints) {
        if serving_now.contains(&(w.kind, w.name.clone())) {
            errors.push(FieldError {
                subject: format!("{} {:?}", w.kind.noun(), w.name),
                field: String::new(),
                message: format!("the update would take it out of service: {}", w.reason),
            });
        }
    }
    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }
    Ok(Composed { serving, decoded, warming })
}

/// Splits `all` (already validated, references possibly dangling) into what can serve and what
/// waits: whether each can serve, in order, and why those that wait do.
fn warm(all: &[Resource], serving_now: &HashSet<(Kind, String)>) -> (Vec<bool>, Vec<Warming>) {
    let mut clusters: HashMap<&str, &v1::Cluster> = HashMap::new();
    let mut tables: HashMap<&str, &v1::RouteTable> = HashMap::new();
    let mut endpoints: HashSet<&str> = HashSet::new();
    for resource in all {
        match resource {
            Resource::Cluster(c) => {
                clusters.insert(&c.name, c);
            }
            Resource::RouteTable(t) => {
                tables.insert(&t.name, t);
            }
            Resource::Endpoints(e) => {
                endpoints.insert(&e.cluster);
            }
            Resource::Listener(_) | Resource::AuthorizationPolicy(_) => {}
        }
    }
    // A cluster that has served keeps serving when its endpoints are removed (it then has none).
    let cluster_ready = |name: &str| -> Result<(), String> {
        match clusters.get(name) {
            None => Err(format!("names cluster {name:?}, which is not defined")),
            Some(c)
                if c.original_destination
                    || endpoints.contains(name)
                    || serving_now.contains(&(Kind::Cluster, name.to_owned())) =>
            {
                Ok(())
            }
            Some(_) => Err(format!("cluster {name:?} has no endpoints yet")),
        }
    };
    let table_ready = |t: &v1::RouteTable| -> Result<(), String> {
        for backend in t.routes.iter().flat_map(|r| &r.backends) {
            cluster_ready(&backend.cluster)?;
        }
        if !t.tcp_cluster.is_empty() {
            cluster_ready(&t.tcp_cluster)?;
        }
        Ok(())
    };
    let mut serving = Vec::with_capacity(all.len());
    let mut warming = Vec::new();
    for resource in all {
        let ready = match resource {
            Resource::Cluster(c) => cluster_ready(&c.name),
            Resource::Endpoints(e) => match clusters.get(e.cluster.as_str()) {
                Some(_) => Ok(()),
                None => Err(format!("names cluster {:?}, which is not defined", e.cluster)),
            },
            Resource::RouteTable(t) => table_ready(t),
            // A policy needs nothing else to be in force: one naming a listener that has not arrived
            // is simply waiting for it.
            Resource::AuthorizationPolicy(_) => Ok(()),
            Resource::Listener(l) => (|| {
                for name in &l.route_tables {
                    let table = tables
                        .get(name.as_str())
                        .ok_or_else(|| format!("names route table {name:?}, which is not defined"))?;
                    table_ready(table).map_err(|e| format!("route table {name:?} {e}"))?;
                }
                if !l.default_cluster.is_empty() {
                    cluster_ready(&l.default_cluster)?;
                }
                Ok(())
            })(),
        };
        serving.push(ready.is_ok());
        if let Err(reason) = ready {
            warming.push(Warming { kind: resource.kind(), name: resource.name().to_owned(), reason });
        }
    }
    (serving, warming)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn parse(yaml: &str) -> Vec<Resource> {
        remora_control_api::config::parse(yaml, "t").unwrap().resources
    }

    fn update(kind: Kind, yaml: &str, removed: &[&str]) -> Update {
        Update {
            kind,
            system_version: "v".into(),
            resources: parse(yaml).into_iter().map(|r| ("1".to_owned(), r)).collect(),
            removed: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn names(resources: &[Encoded]) -> Vec<String> {
        resources.iter().map(|r| format!("{}/{}", r.kind(), r.name())).collect()
    }

    #[test]
    fn listeners_warm_until_their_tables_clusters_and_endpoints_arrive() {
        let none = HashSet::new();
        let mut dynamic = Dynamic::default();
        dynamic = dynamic
            .with(&update(
                Kind::Listener,
                "kind: Listener\nname: l\naddress: \"127.0.0.1:0\"\nroute_tables: [t]\n",
                &[],
            ))
            .unwrap();
        let composed = compose(&[], &dynamic, &none).unwrap();
        assert!(composed.serving.is_empty());
        assert!(composed.warming[0].reason.contains("route table \"t\""), "{:?}", composed.warming);

        dynamic = dynamic.with(&update(Kind::Cluster, "kind: Cluster\nname: c\n", &[])).unwrap();
        dynamic = dynamic
            .with(&update(Kind::RouteTable, "kind: RouteTable\nname: t\nroutes: [{backends: [{cluster: c}]}]\n", &[]))
            .unwrap();
        let composed = compose(&[], &dynamic, &none).unwrap();
        assert!(composed.serving.is_empty(), "{:?}", names(&composed.serving));
        assert!(composed.warming.iter().any(|w| w.reason.contains("no endpoints yet")));

        dynamic = dynamic.with(&update(Kind::Endpoints, "kind: Endpoints\ncluster: c\nendpoints: []\n", &[])).unwrap();
        let composed = compose(&[], &dynamic, &none).unwrap();
        assert_eq!(names(&composed.serving), ["Cluster/c", "Endpoints/c", "Listener/l", "RouteTable/t"]);
        assert!(composed.warming.is_empty());
    }

    #[test]
    fn an_update_that_would_stop_something_serving_is_refused() {
        let mut dynamic = Dynamic::default();
        for (kind, yaml) in [
            (Kind::Cluster, "kind: Cluster\nname: c\n"),
            (Kind::Endpoints, "kind: Endpoints\ncluster: c\n"),
            (Kind::RouteTable, "kind: RouteTable\nname: t\nroutes: [{backends: [{cluster: c}]}]\n"),
        ] {
            dynamic = dynamic.with(&update(kind, yaml, &[])).unwrap();
        }
        let serving: HashSet<(Kind, String)> = compose(&[], &dynamic, &HashSet::new())
            .unwrap()
            .serving
            .iter()
            .map(|r| (r.kind(), r.name().to_owned()))
            .collect();
        let broken = dynamic
            .with(&update(Kind::RouteTable, "kind: RouteTable\nname: t\nroutes: [{backends: [{cluster: d}]}]\n", &[]))
            .unwrap();
        let error = compose(&[], &broken, &serving).unwrap_err().to_string();
        assert!(error.contains("route table \"t\"") && error.contains("cluster \"d\""), "{error}");
        // Removing the endpoints of a serving cluster leaves it serving, with none.
        let emptied = dynamic.with(&update(Kind::Endpoints, "", &["c"])).unwrap();
        assert_eq!(compose(&[], &emptied, &serving).unwrap().serving.len(), 2);
        // Removing the table and then the cluster is fine.
        let gone = dynamic.with(&update(Kind::RouteTable, "", &["t"])).unwrap();
        let gone = gone.with(&update(Kind::Cluster, "", &["c"])).unwrap();
        let composed = compose(&[], &gone, &serving).unwrap();
        assert!(composed.serving.is_empty());
        assert_eq!(composed.warming.len(), 1, "the orphaned endpoints wait for their cluster");
    }

    #[test]
    fn what_serves_shares_the_resources_held_rather_than_copying_them() {
        let dynamic = Dynamic::default()
            .with(&update(Kind::Cluster, "kind: Cluster\nname: c\noriginal_destination: true\n", &[]))
            .unwrap();
        let static_resources = Encoded::all(&parse("kind: Cluster\nname: s\noriginal_destination: true\n"));
        let composed = compose(&static_resources, &dynamic, &HashSet::new()).unwrap();
        let held: Vec<&Encoded> = static_resources.iter().chain(dynamic.resources().map(|(_, r)| r)).collect();
        assert_eq!(composed.serving.len(), 2);
        for (serving, held) in composed.serving.iter().zip(held) {
            assert_eq!(serving.as_bytes().as_ptr(), held.as_bytes().as_ptr(), "{} was copied", serving.name());
        }
    }

    #[test]
    fn an_update_naming_a_resource_twice_is_refused() {
        let twice = update(Kind::Cluster, "kind: Cluster\nname: c\n---\nkind: Cluster\nname: c\n", &[]);
        let error = Dynamic::default().with(&twice).unwrap_err();
        assert!(error.contains("appears twice"), "{error}");
        let both = update(Kind::Cluster, "kind: Cluster\nname: c\n", &["c"]);
        let error = Dynamic::default().with(&both).unwrap_err();
        assert!(error.contains("both sent and removed"), "{error}");
    }

    #[test]
    fn bad_values_are_refused_with_their_field() {
        let dynamic = Dynamic::default()
            .with(&update(Kind::Cluster, "kind: Cluster\nname: c\nconnect_timeout: 0s\n", &[]))
            .unwrap();
        let error = compose(&[], &dynamic, &HashSet::new()).unwrap_err().to_string();
        assert!(error.contains("cluster \"c\": connect_timeout"), "{error}");
        let twice = update(Kind::Cluster, "resources: [{kind: Cluster, name: c}, {kind: Cluster, name: c}]\n", &[]);
        assert!(Dynamic::default().with(&twice).unwrap_err().contains("twice"));
    }
}
