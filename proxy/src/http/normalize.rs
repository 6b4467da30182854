//! The request's method and path as the application will read them, before routing decides on them.
//!
//! A route that restricts who may call `/admin` is only as strong as its match: if the proxy
//! matched `/public/../admin` as written while the application resolved it to `/admin`, the caller
//! would reach `/admin` through another route's terms. So [`path`] removes dot-segments (RFC 3986
//! §5.2.4: `.` is dropped, `..` drops the segment before it, never above the root), reading a
//! percent-encoded dot (`%2e`, `%2E`) as a dot, as many servers decode it, and the request is
//! forwarded with the path it was routed by, so the application sees exactly that. Repeated slashes
//! are kept (they are distinct paths to most servers); a backslash is an ordinary character. The
//! query is untouched. Methods need no rewriting: route matching compares them without letter case
//! (`state::routes`).
//!
//! A path with no `.` and no `%` (almost every path) is checked in one scan and left as it is.

use std::borrow::Cow;

use bytes::Bytes;
use http::Uri;
use http::uri::PathAndQuery;

/// Replaces `uri`'s path by its normalized form, when that differs; the query stays. Returns whether
/// it changed. A target that is not a path (`*`, an authority) is left alone.
pub fn request_path(uri: &mut Uri) -> bool {
    let Some(target) = uri.path_and_query() else { return false };
    let Cow::Owned(normalized) = path(target.path()) else { return false };
    let rebuilt = match target.query() {
        Some(query) => format!("{normalized}?{query}"),
        None => normalized,
    };
    let Ok(path_and_query) = PathAndQuery::from_maybe_shared(Bytes::from(rebuilt)) else { return false };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(path_and_query);
    match Uri::from_parts(parts) {
        Ok(normalized) => {
            *uri = normalized;
            true
        }
        Err(_) => false,
    }
}

/// `path` with its dot-segments removed; borrowed when there were none.
pub fn path(path: &str) -> Cow<'_, str> {
    if !path.starts_with('/') || !path.bytes().any(|b| b == b'.' || b == b'%') {
        return Cow::Borrowed(path);
    }
    if !path.split('/').any(|segment| dots(segment).is_some()) {
        return Cow::Borrowed(path);
    }
    // Every segment after the leading '/': "" for the root and after a trailing '/'.
    let mut kept: Vec<&str> = Vec::new();
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match dots(segment) {
            Some(1) => {
                if last {
                    kept.push("");
                }
            }
            Some(_) => {
                kept.pop();
                if last {
                    kept.push("");
                }
            }
            None => kept.push(segment),
        }
    }
    let mut normalized = String::with_capacity(path.len());
    for segment in &kept {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    Cow::Owned(normalized)
}

/// 1 for a `.` segment, 2 for `..`, each dot written as `.` or `%2e`/`%2E`; `None` for any other.
fn dots(segment: &str) -> Option<u8> {
    let mut rest = segment.as_bytes();
    let mut count = 0u8;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => tail,
            _ => return None,
        };
        count += 1;
        if count > 2 {
            return None;
        }
    }
    (count > 0).then_some(count)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn dot_segments_are_removed_as_rfc_3986_says() {
        for (given, expected) in [
            ("/", "/"),
            ("/a/b/c", "/a/b/c"),
            ("/index.html", "/index.html"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/public/../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a/%2e%2E/admin", "/admin"),
            ("/a/.%2e/admin", "/admin"),
            ("/a/%2e/b", "/a/b"),
            ("/a/.../b", "/a/.../b"),
            ("/a/..b/c", "/a/..b/c"),
            ("/a//../b", "/a/b"),
            ("/a//b", "/a//b"),
            ("/a/%2f../b", "/a/%2f../b"),
            ("/.well-known/x", "/.well-known/x"),
        ] {
            assert_eq!(path(given), expected, "{given}");
        }
        assert!(matches!(path("/a/b.c/d"), Cow::Borrowed(_)));
    }

    #[test]
    fn the_query_stays_and_odd_targets_are_left_alone() {
        let mut uri: Uri = "/shop/../admin/x?next=/../y".parse().unwrap();
        assert!(request_path(&mut uri));
        assert_eq!(uri, "/admin/x?next=/../y");
        let mut absolute: Uri = "http://shop:80/a/./b".parse().unwrap();
        assert!(request_path(&mut absolute));
        assert_eq!(absolute, "http://shop:80/a/b");
        let mut star: Uri = "*".parse().unwrap();
        assert!(!request_path(&mut star));
        let mut plain: Uri = "/a/b?c=.".parse().unwrap();
        assert!(!request_path(&mut plain));
    }

    proptest::proptest! {
        /// Normalizing twice is normalizing once, and what comes out has no dot-segment left.
        #[test]
        fn normalizing_is_idempotent(segments in proptest::collection::vec("(\\.|\\.\\.|%2e|a|b\\.c|)", 0..8)) {
            let given = format!("/{}", segments.join("/"));
            let once = path(&given).into_owned();
            proptest::prop_assert_eq!(path(&once).into_owned(), once.clone());
            proptest::prop_assert!(once.starts_with('/'));
            proptest::prop_assert!(once.split('/').all(|segment| dots(segment).is_none()), "{}", once);
        }
    }
}
