//! What a proxy holds of one kind, as its stream's session records it: the resources it was sent
//! (or told of, when it reconnected), by name, with their versions.
//!
//! A session diffs every publication against this record, so it lives as long as the stream, for
//! every resource of the proxy's view: 6,000 of them per proxy for a cluster of 2,000 Services.
//! Most proxies hold exactly their view of the last generation they were sent (they subscribe to
//! every resource of a kind and reject none), and then the record is that view itself
//! ([`Known::View`]: the publication's `Arc`, shared with every stream synced to it, a few pointers
//! per proxy). The record keeps a list of its own only where it differs from the view: a proxy
//! subscribed to some names, one that rejected a version (not sent again), one that reconnected
//! claiming versions (`initial_resource_versions`) until its first full diff. That list holds the
//! publication's own [`ServedResource`]s (shared by every stream they went to), sorted by name: 8
//! bytes per resource. A claimed version is held as a resource made of the claim alone (a name and
//! a version, no body) until the first full diff: then the publication's own takes its place
//! where the versions agree ([`Known::adopt`]), and the others are sent or removed.

use std::sync::Arc;

use remora_control_api::Kind;
use remora_control_api::xds::discovery;

use super::publish::{ServedResource, ServedSet, View};

/// The resources of one kind a proxy holds (or will, once it applies what was sent): a
/// publication's view, or a list of its own.
#[derive(Debug, Default)]
pub(super) struct Known {
    /// When set, the record is this view (and `held` is empty).
    view: Option<Synced>,
    /// Otherwise, the record: sorted by name, one pointer each. A first view is sent in name order,
    /// so it is recorded by appending.
    held: Vec<Arc<ServedResource>>,
    /// Whether some entries may still be claims (a resource with no body), not yet adopted.
    claims: bool,
}

/// What `set` serves the proxy of `scopes` of `kind`: every resource, each at its served version.
#[derive(Debug)]
struct Synced {
    set: Arc<ServedSet>,
    kind: Kind,
    scopes: Arc<[String]>,
    /// How many resources that is (counting a narrowed view walks the shared resources).
    len: usize,
}

impl Synced {
    fn view(&self) -> View<'_> {
        self.set.view(self.kind, &self.scopes)
    }
}

impl Known {
    /// What the proxy said it holds when it subscribed: name → version.
    pub(super) fn claimed(versions: impl IntoIterator<Item = (String, String)>) -> Known {
        let mut held: Vec<_> = versions
            .into_iter()
            .map(|(name, version)| {
                let wire = discovery::Resource { name, version: version.clone(), ..Default::default() };
                Arc::new(ServedResource { version, wire })
            })
            .collect();
        held.sort_unstable_by(|a, b| a.wire.name.cmp(&b.wire.name));
        held.dedup_by(|a, b| a.wire.name == b.wire.name);
        Known { view: None, claims: !held.is_empty(), held }
    }

    /// The record of a proxy that holds exactly what `set` serves it (of `scopes`) of `kind`:
    /// `len` resources.
    pub(super) fn view(set: &Arc<ServedSet>, kind: Kind, scopes: &Arc<[String]>, len: usize) -> Known {
        let view = Synced { set: set.clone(), kind, scopes: scopes.clone(), len };
        Known { view: Some(view), held: Vec::new(), claims: false }
    }

    /// Whether the record is the view of a publication (not a list of its own).
    pub(super) fn is_view(&self) -> bool {
        self.view.is_some()
    }

    /// The resource named `name` the proxy holds, if it holds one.
    fn get(&self, name: &str) -> Option<&ServedResource> {
        match &self.view {
            Some(synced) => synced.view().get(name).map(|r| &**r),
            None => find(&self.held, name).ok().map(|i| &*self.held[i]),
        }
    }

    /// The version of `name` the proxy holds, if it holds one.
    pub(super) fn version(&self, name: &str) -> Option<&str> {
        self.get(name).map(|held| held.version.as_str())
    }

    /// Whether the proxy holds a resource named `name`.
    pub(super) fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// How many resources it holds.
    pub(super) fn len(&self) -> usize {
        self.view.as_ref().map_or(self.held.len(), |synced| synced.len)
    }

    /// Whether it holds nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names it holds.
    pub(super) fn names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.view {
            Some(synced) => Box::new(synced.view().iter().map(|(name, _)| name.as_str())),
            None => Box::new(self.held.iter().map(|held| held.wire.name.as_str())),
        }
    }

    /// The record as a list of its own (a view's resources, sorted by name), to be changed.
    fn list(&mut self) -> &mut Vec<Arc<ServedResource>> {
        if let Some(synced) = self.view.take() {
            self.held = synced.view().iter().map(|(_, resource)| resource.clone()).collect();
            self.held.sort_unstable_by(|a, b| a.wire.name.cmp(&b.wire.name));
        }
        &mut self.held
    }

    /// Records `resource` as sent (in place of whatever of its name was held).
    pub(super) fn sent(&mut self, resource: &Arc<ServedResource>) {
        let held = self.list();
        let name = resource.wire.name.as_str();
        // In name order (a first view), the place is the end.
        if held.last().is_none_or(|last| last.wire.name.as_str() < name) {
            held.push(resource.clone());
            return;
        }
        match find(held, name) {
            Ok(i) => held[i] = resource.clone(),
            Err(i) => held.insert(i, resource.clone()),
        }
    }

    /// Records that the proxy was told to drop `name`.
    pub(super) fn removed(&mut self, name: &str) {
        let held = self.list();
        if let Ok(i) = find(held, name) {
            held.remove(i);
        }
    }

    /// Holds the publication's own resource in place of each claim of the same version, over
    /// `served`, the whole of what the proxy's view serves: a claim costs a resource of its own,
    /// the publication's a pointer. Claims left after it are sent or removed by the diff.
    pub(super) fn adopt<'a>(&mut self, served: impl Iterator<Item = &'a Arc<ServedResource>>) {
        if !self.claims {
            return;
        }
        for resource in served {
            if let Ok(i) = find(&self.held, &resource.wire.name) {
                let held = &mut self.held[i];
                if held.wire.resource.is_none() && held.version == resource.version {
                    *held = resource.clone();
                }
            }
        }
        self.claims = false;
    }
}

fn find(held: &[Arc<ServedResource>], name: &str) -> Result<usize, usize> {
    held.binary_search_by(|held| held.wire.name.as_str().cmp(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(name: &str, version: &str) -> Arc<ServedResource> {
        Arc::new(ServedResource {
            version: version.into(),
            wire: discovery::Resource { name: name.into(), version: version.into(), ..Default::default() },
        })
    }

    /// Claimed versions answer until a resource of the name is sent; a sent one is the
    /// publication's own (one pointer, shared); a removal forgets the name.
    #[test]
    fn records_claims_then_what_was_sent_by_name() {
        let mut known = Known::claimed([("a".to_owned(), "1".to_owned()), ("b".to_owned(), "1".to_owned())]);
        assert_eq!(known.version("a"), Some("1"));
        let a = served("a", "2");
        known.sent(&a);
        assert_eq!(known.version("a"), Some("2"));
        assert_eq!(Arc::strong_count(&a), 2, "the record shares the publication's resource");
        known.removed("b");
        assert!(!known.contains("b") && known.contains("a"));
        assert_eq!(known.names().collect::<Vec<_>>(), ["a"]);
        known.removed("a");
        assert!(known.is_empty());
        assert_eq!(Arc::strong_count(&a), 1);
    }

    /// A claim whose version the publication serves becomes the publication's resource; one of
    /// another version stays a claim (the diff sends the new version).
    #[test]
    fn claims_of_the_served_version_are_adopted() {
        let mut known = Known::claimed([("a".to_owned(), "1".to_owned()), ("b".to_owned(), "1".to_owned())]);
        let (a, b) = (served("a", "1"), served("b", "2"));
        known.adopt([&a, &b].into_iter());
        assert_eq!(Arc::strong_count(&a), 2, "the claim of a's served version is now the publication's");
        assert_eq!(Arc::strong_count(&b), 1, "b's claim is of another version");
        assert_eq!((known.version("a"), known.version("b")), (Some("1"), Some("1")));
    }

    /// Sent out of name order, replaced and removed, the record stays sorted and finds each name.
    #[test]
    fn out_of_order_sends_keep_the_record_sorted() {
        let mut known = Known::default();
        for (name, version) in [("c", "1"), ("a", "1"), ("b", "1"), ("a", "2"), ("d", "1")] {
            known.sent(&served(name, version));
        }
        assert_eq!(known.names().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        assert_eq!(known.version("a"), Some("2"));
        known.removed("b");
        known.removed("x");
        assert_eq!(known.names().collect::<Vec<_>>(), ["a", "c", "d"]);
        assert!(known.contains("d") && !known.contains("b"));
    }
}
