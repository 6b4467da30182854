//! SPIFFE IDs and the patterns allow-lists are written in, from arbitrary text.
//!
//! Holds whatever the text: an ID that parses is its own text, parses again as itself, names a
//! trust domain, and is matched by the pattern of its own text; a pattern without `*` matches
//! exactly its own text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_control_api::identity::{IdentityPattern, SpiffeId};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    if let Ok(id) = SpiffeId::parse(text) {
        assert_eq!(id.as_str(), text);
        assert_eq!(id.to_string(), text);
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
        assert!(!id.trust_domain().is_empty());
        assert!(id.as_str().starts_with("spiffe://"));
        let own = IdentityPattern::parse(text).expect("an ID is a pattern of itself");
        assert!(own.matches(id.as_str()));
    }
    if let Ok(pattern) = IdentityPattern::parse(text)
        && !text.contains('*')
    {
        assert!(pattern.matches(text), "{text} does not match itself");
        let other = format!("{text}x");
        assert!(!pattern.matches(&other), "{text} matches {other}");
    }
});
