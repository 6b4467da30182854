//! What a proxy holds of one kind, as its stream's session records it: the resources it was sent
//! (or told of, when it reconnected), by name, with their versions.
//!
//! A session diffs every publication against this record, so it lives as long as the stream, for
//! every resource of the proxy's view: 6,000 of them per proxy for a cluster of 2,000 Services.
//! Kept as name and version strings, that was about 135 bytes per resource, 0.8 MB per connected
//! proxy. A resource sent is recorded as the publication's own [`ServedResource`] (shared by every
//! stream it went to; a republished resource whose bytes did not change keeps its `Arc`), in a list
//! sorted by name: 8 bytes per resource, where a hash set of 40-byte entries (a pointer, or a
//! claim's two strings), with its spare room, took about 84. A version a proxy claimed when it
//! reconnected (`initial_resource_versions`) is held as a resource made of the claim alone (a name
//! and a version, no body) until the first full diff: then the publication's own takes its place
//! where the versions agree ([`Known::adopt`]), and the others are sent or removed.

use std::sync::Arc;

use remora_control_api::xds::discovery;

use super::publish::ServedResource;

/// The resources of one kind a proxy holds (or will, once it applies what was sent), sorted by
/// name, one pointer each. A first view is sent in name order, so it is recorded by appending.
#[derive(Debug, Default)]
pub(super) struct Known {
    held: Vec<Arc<ServedResource>>,
    /// Whether some entries may still be claims (a resource with no body), not yet adopted.
    claims: bool,
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
        Known { claims: !held.is_empty(), held }
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.held.binary_search_by(|held| held.wire.name.as_str().cmp(name))
    }

    /// The version of `name` the proxy holds, if it holds one.
    pub(super) fn version(&self, name: &str) -> Option<&str> {
        self.find(name).ok().map(|i| self.held[i].version.as_str())
    }

    /// Whether the proxy holds a resource named `name`.
    pub(super) fn contains(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// Whether it holds nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The names it holds.
    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        self.held.iter().map(|held| held.wire.name.as_str())
    }

    /// Records `resource` as sent (in place of whatever of its name was held).
    pub(super) fn sent(&mut self, resource: &Arc<ServedResource>) {
        let name = resource.wire.name.as_str();
        // In name order (a first view), the place is the end.
        if self.held.last().is_none_or(|last| last.wire.name.as_str() < name) {
            self.held.push(resource.clone());
            return;
        }
        match self.find(name) {
            Ok(i) => self.held[i] = resource.clone(),
            Err(i) => self.held.insert(i, resource.clone()),
        }
    }

    /// Records that the proxy was told to drop `name`.
    pub(super) fn removed(&mut self, name: &str) {
        if let Ok(i) = self.find(name) {
            self.held.remove(i);
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
            if let Ok(i) = self.find(&resource.wire.name) {
                let held = &mut self.held[i];
                if held.wire.resource.is_none() && held.version == resource.version {
                    *held = resource.clone();
                }
            }
        }
        self.claims = false;
    }
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
