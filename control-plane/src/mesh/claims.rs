//! Which Service's route table takes an address two Services claim.
//!
//! A route table claims each address it serves (a cluster IP and port, or a headless Service's pod
//! address and port), and a proxy refuses a set in which two tables claim one address: it could
//! not tell which routes a connection to it follows. Two Services can claim one address: two
//! headless Services over the same pods and port (common: a StatefulSet's governing Service beside
//! a second one), or two Services given the same cluster IP by hand in the directory's manifests.
//! So the mesh settles each address on one owner, the first Service by namespace and name, and the
//! others' tables leave it out (they keep their DNS names, which are theirs alone). One Service's
//! clash never stops the rest of the mesh from being served.
//!
//! [`Claims`] indexes the addresses each Service's made resources claim. `translate` adds and removes
//! a Service's claims as it makes the Service again, asks which Services share an address a change
//! touched (their tables may change too), and [`Claims::resolve`]s each Service's resources before
//! they leave.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use remora_control_api::Resource;
use tracing::info;

use super::translate::Made;

/// A Service, by `(namespace, name)`.
pub(super) type Key = (String, String);

/// The addresses every Service's route tables claim, and by whom.
#[derive(Debug, Default)]
pub(super) struct Claims {
    by_address: BTreeMap<SocketAddr, BTreeSet<Key>>,
}

impl Claims {
    /// Notes the addresses `made` (the Service `key`'s resources) claims.
    pub(super) fn add(&mut self, key: &Key, made: &Made) {
        for address in addresses(made) {
            let claimants = self.by_address.entry(address).or_default();
            claimants.insert(key.clone());
            if claimants.len() == 2 {
                let owner = claimants.first().map(|(namespace, name)| format!("{namespace}/{name}"));
                info!(%address, owner, "two Services claim one address; the first by namespace and name takes it");
            }
        }
    }

    /// Forgets the addresses `made` (the Service `key`'s resources, as added) claimed.
    pub(super) fn remove(&mut self, key: &Key, made: &Made) {
        for address in addresses(made) {
            if let Some(claimants) = self.by_address.get_mut(&address) {
                claimants.remove(key);
                if claimants.is_empty() {
                    self.by_address.remove(&address);
                }
            }
        }
    }

    /// Every Service that claims one of the addresses `made` claims.
    pub(super) fn sharing(&self, made: &Made) -> BTreeSet<Key> {
        addresses(made).iter().filter_map(|address| self.by_address.get(address)).flatten().cloned().collect()
    }

    /// The Service `key`'s resources `made`, each route table without the addresses another Service
    /// owns.
    pub(super) fn resolve(&self, key: &Key, made: &Made) -> Made {
        let lost = |destination: &str| {
            destination
                .parse::<SocketAddr>()
                .ok()
                .and_then(|address| self.by_address.get(&address))
                .and_then(BTreeSet::first)
                .is_some_and(|owner| owner != key)
        };
        let contested = |resources: &[Resource]| {
            resources.iter().any(|r| matches!(r, Resource::RouteTable(t) if t.destinations.iter().any(|d| lost(d))))
        };
        if !contested(&made.shared) && !made.scoped.values().any(|resources| contested(resources)) {
            return made.clone();
        }
        let strip = |resource: &Resource| match resource {
            Resource::RouteTable(table) => {
                let mut table = table.clone();
                table.destinations.retain(|d| !lost(d));
                Resource::RouteTable(table)
            }
            other => other.clone(),
        };
        Made {
            shared: made.shared.iter().map(strip).collect(),
            scoped: made
                .scoped
                .iter()
                .map(|(scope, resources)| (scope.clone(), resources.iter().map(strip).collect()))
                .collect(),
        }
    }
}

/// The addresses (`IP:PORT` destinations) the route tables of `made` claim.
fn addresses(made: &Made) -> BTreeSet<SocketAddr> {
    made.shared
        .iter()
        .chain(made.scoped.values().flatten())
        .filter_map(|r| match r {
            Resource::RouteTable(table) => Some(&table.destinations),
            _ => None,
        })
        .flatten()
        .filter_map(|d| d.parse().ok())
        .collect()
}
