//! Micro-benchmarks of the per-request pieces that do not touch a socket: choosing a route table
//! and a route, classifying a connection's first bytes, stripping hop-by-hop headers, and picking an
//! endpoint. `cargo bench --bench hot_path`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, Uri};
use remora_proxy::balance::metrics::HealthStats;
use remora_proxy::balance::{Endpoint, EndpointSet, HashOn, Proximity, SetConfig, Strategy};
use remora_proxy::detect::{self, H2_PREFACE};
use remora_proxy::http::headers::strip_hop_by_hop;
use remora_proxy::state::Snapshot;
use remora_proxy::state::SnapshotMetrics;
use remora_proxy::state::cluster::OwnLocality;

/// A mesh-sized config: 50 services, each a route table with host and VIP destinations and a few
/// routes.
fn snapshot() -> Snapshot {
    let mut yaml = String::from("resources:\n  - {kind: Listener, name: out, address: \"127.0.0.1:15001\"}\n");
    for i in 0..50 {
        yaml.push_str(&format!(
            "  - {{kind: Cluster, name: svc{i}}}\n  - {{kind: Endpoints, cluster: svc{i}, endpoints: [{{address: \"10.1.0.{i}:8080\"}}]}}\n  - kind: RouteTable\n    name: svc{i}\n    destinations: [\"svc{i}\", \"svc{i}.shop.svc.cluster.local\", \"10.96.0.{i}:80\"]\n    routes:\n      - {{match: {{path: {{prefix: /admin}}, headers: [{{name: x-role, exact: admin}}]}}, backends: [{{cluster: svc{i}}}]}}\n      - {{match: {{path: {{regex: \"/items/[0-9]+\"}}}}, backends: [{{cluster: svc{i}}}]}}\n      - {{match: {{path: {{prefix: /}}}}, backends: [{{cluster: svc{i}}}]}}\n",
        ));
    }
    let file = remora_control_api::config::parse(&yaml, "bench").expect("bench config parses");
    Snapshot::build(
        "bench".into(),
        remora_control_api::Encoded::all(&file.resources),
        None,
        &OwnLocality::default(),
        &SnapshotMetrics::default(),
    )
    .expect("bench config is valid")
}

fn routing(c: &mut Criterion) {
    let snapshot = snapshot();
    let listener = snapshot.listener("out").expect("listener");
    let uri: Uri = "/items/42?x=1".parse().expect("uri");
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("svc37.shop.svc.cluster.local"));
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    c.bench_function("route: table by host, then first matching route (50 tables)", |b| {
        b.iter(|| {
            let table = listener.routes.for_http(black_box(Some("svc37.shop.svc.cluster.local")), None).expect("table");
            black_box(table.route(&Method::GET, &uri, &headers).and_then(|r| r.pick_cluster()).is_some())
        })
    });
    let original: std::net::SocketAddr = "10.96.0.12:80".parse().expect("address");
    c.bench_function("route: table by original destination (50 tables)", |b| {
        b.iter(|| black_box(listener.routes.for_http(Some("unknown.example"), Some(black_box(original))).is_some()))
    });
}

fn detection(c: &mut Criterion) {
    let http1 = b"GET /api/items HTTP/1.1\r\nHost: shop\r\n\r\n";
    let tls = [0x16_u8, 0x03, 0x01, 0x02, 0x00, 0x01];
    c.bench_function("detect: HTTP/1 request line", |b| b.iter(|| detect::classify(black_box(http1))));
    c.bench_function("detect: HTTP/2 preface", |b| b.iter(|| detect::classify(black_box(H2_PREFACE))));
    c.bench_function("detect: TLS ClientHello", |b| b.iter(|| detect::classify(black_box(&tls))));
}

fn header_hygiene(c: &mut Criterion) {
    let mut typical = HeaderMap::new();
    for (name, value) in [
        ("host", "shop"),
        ("user-agent", "curl/8.5"),
        ("accept", "*/*"),
        ("content-type", "application/json"),
        ("x-request-id", "7f3a"),
    ] {
        typical.insert(name, HeaderValue::from_static(value));
    }
    let mut with_connection = typical.clone();
    with_connection.insert("connection", HeaderValue::from_static("keep-alive"));
    c.bench_function("headers: strip hop-by-hop, none present", |b| {
        b.iter_batched_ref(|| typical.clone(), |h| strip_hop_by_hop(h, false), criterion::BatchSize::SmallInput)
    });
    c.bench_function("headers: strip hop-by-hop, Connection: keep-alive", |b| {
        b.iter_batched_ref(|| with_connection.clone(), |h| strip_hop_by_hop(h, false), criterion::BatchSize::SmallInput)
    });
}

fn balancing(c: &mut Criterion) {
    let endpoints = || -> Vec<Endpoint> {
        (0..8_u16)
            .map(|i| Endpoint {
                address: std::net::SocketAddr::from(([10, 0, 0, 1], 8000 + i)),
                weight: 1 + u32::from(i % 3),
                proximity: Proximity::Elsewhere,
                declared: Default::default(),
            })
            .collect()
    };
    let set = |config: SetConfig| EndpointSet::new(config, endpoints(), &|_| None, HealthStats::detached("bench"));
    for (name, strategy) in [
        ("balance: smooth weighted round robin pick (8 endpoints)", Strategy::RoundRobin),
        ("balance: weighted random pick (8 endpoints)", Strategy::Random),
        ("balance: least request, two choices (8 endpoints)", Strategy::LeastRequest),
        ("balance: peak EWMA, two choices (8 endpoints)", Strategy::Ewma),
    ] {
        let set = set(SetConfig::with_strategy(strategy));
        c.bench_function(name, |b| b.iter(|| black_box(set.pick(None).map(|m| m.address()))));
    }
    let ring = set(SetConfig { hash_on: Some(HashOn::SourceIp), ..SetConfig::with_strategy(Strategy::RingHash) });
    let mut key = 0_u64;
    c.bench_function("balance: ring hash lookup (8 endpoints, 1,920 points)", |b| {
        b.iter(|| {
            key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
            black_box(ring.pick(Some(key)).map(|m| m.address()))
        })
    });
}

criterion_group!(benches, routing, detection, header_hygiene, balancing);
criterion_main!(benches);
