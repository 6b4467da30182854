//! What a proxy holds of one kind, as its stream's session records it: the resources it was sent
//! (or told of, when it reconnected), by name, with their versions.
//!
//! A session diffs every publication against this record, so it lives as long as the stream, for
//! every resource of the proxy's view: 6,000 of them per proxy for a cluster of 2,000 Services.
//! Kept as name and version strings, that was about 135 bytes per resource, 0.8 MB per connected
//! proxy. A resource sent is recorded as the publication's own [`ServedResource`] (shared by every
//! stream it went to; a republished resource whose bytes did not change keeps its `Arc`), so the
//! record costs a pointer per resource. Versions a proxy claimed when it reconnected
//! (`initial_resource_versions`) are kept as strings until a resource of that name is sent.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::publish::ServedResource;

/// One resource the proxy holds.
#[derive(Debug)]
enum Held {
    /// Sent on this stream.
    Sent(Arc<ServedResource>),
    /// Claimed by the proxy when it subscribed: name and version.
    Claimed(Box<str>, Box<str>),
}

impl Held {
    fn name(&self) -> &str {
        match self {
            Held::Sent(resource) => &resource.wire.name,
            Held::Claimed(name, _) => name,
        }
    }

    fn version(&self) -> &str {
        match self {
            Held::Sent(resource) => &resource.version,
            Held::Claimed(_, version) => version,
        }
    }
}

// Entries are told apart by name, and looked up by a `&str`: hash and equality are the name's.
impl Hash for Held {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name().hash(state);
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Held {}

impl Borrow<str> for Held {
    fn borrow(&self) -> &str {
        self.name()
    }
}

/// The resources of one kind a proxy holds (or will, once it applies what was sent).
#[derive(Debug, Default)]
pub(super) struct Known(HashSet<Held>);

impl Known {
    /// What the proxy said it holds when it subscribed: name → version.
    pub(super) fn claimed(versions: impl IntoIterator<Item = (String, String)>) -> Known {
        Known(versions.into_iter().map(|(name, version)| Held::Claimed(name.into(), version.into())).collect())
    }

    /// The version of `name` the proxy holds, if it holds one.
    pub(super) fn version(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(Held::version)
    }

    /// Whether the proxy holds a resource named `name`.
    pub(super) fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    /// Whether it holds nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names it holds.
    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(Held::name)
    }

    /// Records `resource` as sent (in place of whatever of its name was held).
    pub(super) fn sent(&mut self, resource: &Arc<ServedResource>) {
        self.0.replace(Held::Sent(resource.clone()));
    }

    /// Records that the proxy was told to drop `name`.
    pub(super) fn removed(&mut self, name: &str) {
        self.0.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_control_api::xds::discovery;

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
}
