//! Workload identities: SPIFFE IDs, and the patterns that allow-lists are written in.
//!
//! A [`SpiffeId`] is parsed once, where it enters (a flag, a CSR, a peer certificate's URI SAN), and
//! carried validated from then on. [`certificate_identity`] reads one out of a certificate, for
//! the proxies' mesh TLS and the control plane's port alike. An [`IdentityPattern`] is an exact ID or a glob (`*` matches any
//! run of characters, slashes included, so `spiffe://cluster.local/ns/shop/*` covers every service
//! account in `shop`); authorization policies, cluster `peer_identities` and the CA's token
//! entitlements are all lists of them.

use std::fmt;
use std::time::{Duration, SystemTime};

/// The longest SPIFFE ID accepted, as the SPIFFE standard caps URIs.
const MAX_LEN: usize = 2048;

/// A valid SPIFFE ID: `spiffe://TRUST-DOMAIN/PATH`, the trust domain in lower case letters, digits,
/// `.`, `-` and `_`, the path one or more non-empty segments of letters, digits, `.`, `-` and `_`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(String);

/// Why a string is not a SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a SPIFFE ID (spiffe://TRUST-DOMAIN/PATH): {1}")]
pub struct InvalidSpiffeId(pub String, pub &'static str);

impl SpiffeId {
    /// Parses and checks `text`.
    pub fn parse(text: &str) -> Result<SpiffeId, InvalidSpiffeId> {
        let fail = |why| InvalidSpiffeId(text.to_owned(), why);
        if text.len() > MAX_LEN {
            return Err(fail("longer than 2048 bytes"));
        }
        let rest = text.strip_prefix("spiffe://").ok_or_else(|| fail("must start with spiffe://"))?;
        let (domain, path) = rest.split_once('/').ok_or_else(|| fail("has no path"))?;
        if domain.is_empty() {
            return Err(fail("has no trust domain"));
        }
        if !domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')) {
            return Err(fail("the trust domain may hold only a-z, 0-9, '.', '-' and '_'"));
        }
        for segment in path.split('/') {
            if segment.is_empty() {
                return Err(fail("has an empty path segment"));
            }
            if segment == "." || segment == ".." {
                return Err(fail("has a '.' or '..' path segment"));
            }
            if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) {
                return Err(fail("the path may hold only letters, digits, '.', '-', '_' and '/'"));
            }
        }
        Ok(SpiffeId(text.to_owned()))
    }

    /// The ID as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain: the part between `spiffe://` and the path.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split_once('/').map_or(rest, |(domain, _)| domain)
    }

    /// The path after the trust domain, with its leading `/` (`/ns/shop/sa/web`); empty if none.
    pub fn path(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.find('/').map_or("", |slash| &rest[slash..])
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An exact SPIFFE ID or a glob over them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityPattern(String);

impl IdentityPattern {
    /// Checks `text`: a SPIFFE ID, or one with `*` in place of any of its characters after
    /// `spiffe://` (a lone `*` matches every identity).
    pub fn parse(text: &str) -> Result<IdentityPattern, InvalidSpiffeId> {
        if text == "*" {
            return Ok(IdentityPattern(text.to_owned()));
        }
        if !text.contains('*') {
            return SpiffeId::parse(text).map(|id| IdentityPattern(id.0));
        }
        // Each `*` stands for at least one character, so the pattern with `x` in each of their places
        // must be a valid ID: that keeps globs from hiding an invalid trust domain or path.
        SpiffeId::parse(&text.replace('*', "x"))
            .map(|_| IdentityPattern(text.to_owned()))
            .map_err(|InvalidSpiffeId(_, why)| InvalidSpiffeId(text.to_owned(), why))
    }

    /// Whether `id` matches.
    pub fn matches(&self, id: &str) -> bool {
        glob(self.0.as_bytes(), id.as_bytes())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses every pattern in `texts`, naming the first bad one by its index.
pub fn parse_patterns(texts: &[String]) -> Result<Vec<IdentityPattern>, (usize, InvalidSpiffeId)> {
    texts.iter().enumerate().map(|(i, text)| IdentityPattern::parse(text).map_err(|e| (i, e))).collect()
}

/// Whether any of `patterns` matches `id`.
pub fn any_matches(patterns: &[IdentityPattern], id: &str) -> bool {
    patterns.iter().any(|pattern| pattern.matches(id))
}

/// `*`-only glob matching, linear in the input: the classic two-pointer walk that backtracks only to
/// the last star.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Why a certificate does not name one workload identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertificateIdentityError {
    /// The certificate could not be parsed.
    #[error("the certificate cannot be parsed")]
    Malformed,
    /// It has no URI SAN, or more than one.
    #[error("the certificate must carry exactly one URI SAN, the SPIFFE ID; it has {0}")]
    UriCount(usize),
    /// Its URI SAN is not a SPIFFE ID.
    #[error("{0}")]
    NotSpiffe(String),
    /// Its validity had ended at the time asked about.
    #[error("the certificate expired")]
    Expired,
}

/// The SPIFFE ID in DER certificate `leaf`'s one URI SAN, and when the certificate expires. With
/// `valid_at`, a certificate past its `not_after` then is refused (before its SANs are read).
pub fn certificate_identity(
    leaf: &[u8],
    valid_at: Option<SystemTime>,
) -> Result<(SpiffeId, SystemTime), CertificateIdentityError> {
    use CertificateIdentityError as E;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|_| E::Malformed)?;
    let not_after_secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after_secs);
    if valid_at.is_some_and(|now| now > not_after) {
        return Err(E::Expired);
    }
    let names = match cert.subject_alternative_name() {
        Ok(Some(extension)) => &extension.value.general_names,
        Ok(None) => return Err(E::UriCount(0)),
        Err(_) => return Err(E::Malformed),
    };
    let mut uris = names.iter().filter_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => SpiffeId::parse(uri).map(|id| (id, not_after)).map_err(|e| E::NotSpiffe(e.to_string())),
        (None, _) => Err(E::UriCount(0)),
        (Some(_), Some(_)) => Err(E::UriCount(2 + uris.count())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn spiffe_ids_are_checked() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/web");
        for bad in [
            "http://cluster.local/ns/a",
            "spiffe://cluster.local",
            "spiffe:///ns/a",
            "spiffe://Cluster.local/ns/a",
            "spiffe://cluster.local/ns//a",
            "spiffe://cluster.local/ns/a/",
            "spiffe://cluster.local/ns/../a",
            "spiffe://cluster.local/ns/a?b",
            "spiffe://cluster.local/ns/a b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn globs_match_any_run_of_characters() {
        let shop = IdentityPattern::parse("spiffe://cluster.local/ns/shop/*").unwrap();
        assert!(shop.matches("spiffe://cluster.local/ns/shop/sa/web"));
        assert!(!shop.matches("spiffe://cluster.local/ns/shopping/sa/web"));
        assert!(!shop.matches("spiffe://cluster.local/ns/shop"));
        let web = IdentityPattern::parse("spiffe://cluster.local/ns/*/sa/web").unwrap();
        assert!(web.matches("spiffe://cluster.local/ns/a/sa/web"));
        assert!(web.matches("spiffe://cluster.local/ns/a/b/sa/web"));
        assert!(!web.matches("spiffe://cluster.local/ns/a/sa/web2"));
        let exact = IdentityPattern::parse("spiffe://td/ns/a/sa/b").unwrap();
        assert!(exact.matches("spiffe://td/ns/a/sa/b"));
        assert!(!exact.matches("spiffe://td/ns/a/sa/bb"));
        assert!(IdentityPattern::parse("*").unwrap().matches("spiffe://any/x"));
        assert!(IdentityPattern::parse("spiffe://*/ns/a").is_ok());
        assert!(IdentityPattern::parse("spiffe://cluster.local/ns/a b/*").is_err());
        assert!(IdentityPattern::parse("web").is_err());
    }
}
