//! Route matching over arbitrary request heads: the table for the authority, the first matching
//! route (path, method, headers, query; exact, prefix, segment prefix and regex), on the path as the
//! application will read it.
//!
//! Input: pieces (see `remora_fuzz::pieces`): the authority, the method, the target, then header
//! names and values in turn. Holds whatever the head:
//! - normalizing the path is idempotent and leaves no dot-segment;
//! - the route taken does not depend on the method's letter case;
//! - a request routed to the restricted `admin` route has a path under `/admin` once normalized.

#![no_main]

use std::sync::LazyLock;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use remora_proxy::http::normalize;
use remora_proxy::state::cluster::OwnLocality;
use remora_proxy::state::{Snapshot, SnapshotMetrics};

const CONFIG: &str = r#"
resources:
  - {kind: Cluster, name: api, original_destination: true}
  - {kind: Cluster, name: web, original_destination: true}
  - kind: RouteTable
    name: shop
    destinations: [shop, "*.shop.svc", "10.96.0.10:80"]
    routes:
      - {name: admin, match: {path: {segment_prefix: /admin}}, backends: [{cluster: api}]}
      - {name: items, match: {path: {regex: "/items/[0-9]+"}, method: GET}, backends: [{cluster: api}]}
      - {name: exact, match: {path: {exact: /health}}, backends: [{cluster: api}]}
      - name: header
        match: {path: {prefix: /api}, headers: [{name: x-user, exact: alice}, {name: x-debug, present: false}, {name: x-v, regex: "v[2-9]"}]}
        backends: [{cluster: api}]
      - {name: query, match: {query: [{name: beta, exact: "1"}, {name: off, present: false}]}, backends: [{cluster: api}]}
      - {name: rest, backends: [{cluster: web}]}
  - {kind: Listener, name: out, address: "127.0.0.1:15001"}
"#;

static SNAPSHOT: LazyLock<Snapshot> = LazyLock::new(|| {
    let file = remora_control_api::config::parse(CONFIG, "route fuzz").expect("the fuzz config parses");
    Snapshot::build("fuzz".into(), remora_control_api::Encoded::all(&file.resources), None, &OwnLocality::default(), &SnapshotMetrics::default())
        .expect("the fuzz config builds")
});

fuzz_target!(|input: &[u8]| {
    let mut pieces = remora_fuzz::pieces(input);
    let (Some(authority), Some(method), Some(target)) = (pieces.next(), pieces.next(), pieces.next()) else { return };
    let (Ok(authority), Ok(method), Ok(mut uri)) =
        (std::str::from_utf8(authority), Method::from_bytes(method), Uri::try_from(target))
    else {
        return;
    };
    let mut headers = HeaderMap::new();
    while let (Some(name), Some(value)) = (pieces.next(), pieces.next()) {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }

    let once = normalize::path(uri.path()).into_owned();
    assert_eq!(normalize::path(&once), once.as_str(), "normalizing twice changed the path");
    if uri.path().starts_with('/') {
        assert!(!once.split('/').any(|s| s == "." || s == ".."), "{once} kept a dot-segment");
    }
    normalize::request_path(&mut uri);

    let listener = SNAPSHOT.listener("out").expect("the listener");
    let Some(table) = listener.routes.for_http(Some(authority), None) else { return };
    let route = table.route(&method, &uri, &headers).map(|r| r.name.clone());
    let upper = Method::from_bytes(method.as_str().to_ascii_uppercase().as_bytes()).expect("an upper-cased method");
    let lower = Method::from_bytes(method.as_str().to_ascii_lowercase().as_bytes()).expect("a lower-cased method");
    assert_eq!(table.route(&upper, &uri, &headers).map(|r| r.name.clone()), route, "letter case changed the route");
    assert_eq!(table.route(&lower, &uri, &headers).map(|r| r.name.clone()), route, "letter case changed the route");
    if route.as_deref() == Some("admin") {
        let path = uri.path();
        assert!(path == "/admin" || path.starts_with("/admin/"), "{path} routed as /admin");
    }
});
