//! The routes' metrics: HTTP responses by direction, route, cluster and status code (and gRPC
//! status), and the time from a request's arrival to its response head. Each series also names
//! the destination Service (`dst_namespace`, `dst_service`) when the cluster's endpoints are a
//! Kubernetes Service's (the automatic mesh's clusters, or one with `kubernetes_service`), empty
//! otherwise: golden metrics per destination Service, summed over its ports and routes.
//!
//! [`RouteMetrics::register`] declares the families (the composition root calls it once); each
//! route backend (a route and one of its clusters) gets a [`RouteStats`] when the snapshot is
//! built, and its per-direction [`RequestStats`] (with its labels) when a listener of that
//! direction first sends it a request: a backend no request takes holds its route's label and
//! nothing else. The HTTP path records every response there, with no label lookup for the common
//! status codes after the first.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::state::cluster::Cluster;
use crate::telemetry::{GrpcCounters, Histogram, Registry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    direction: &'static str,
    route: String,
    cluster: String,
    dst_namespace: String,
    dst_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    #[prometheus(flatten)]
    route: RouteLabels,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    #[prometheus(flatten)]
    route: RouteLabels,
    grpc_status: u32,
}

/// The route metric families, shared by every [`RouteStats`] (one pointer each).
#[derive(Clone, Debug, Default)]
pub struct RouteMetrics(Arc<Families>);

#[derive(Debug, Default)]
struct Families {
    requests: Family<CodeLabels, Counter>,
    grpc: Family<GrpcLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
}

impl RouteMetrics {
    /// Declares the families in `registry`.
    pub fn register(registry: &mut Registry) -> RouteMetrics {
        let metrics = RouteMetrics::default();
        let m = &metrics.0;
        registry.register(
            "route_requests",
            "HTTP responses sent downstream for requests a route (or a listener's default cluster, route \"\") took, by direction, route, cluster and status code",
            m.requests.clone(),
        );
        registry.register(
            "route_grpc_responses",
            "gRPC calls answered, by direction, route, cluster and grpc-status (from the trailers, or the headers of a trailers-only answer)",
            m.grpc.clone(),
        );
        registry.register(
            "route_request_duration_seconds",
            "Time from a request's arrival to its response head, by direction, route and cluster",
            m.duration.clone(),
        );
        metrics
    }

    /// The counters of one route backend of `route` (its label: `TABLE/ROUTE`, or empty for a
    /// listener's default cluster); the backend's cluster names the rest when they are first used.
    pub fn route(&self, route: Arc<str>) -> RouteStats {
        RouteStats { families: self.clone(), route, inbound: OnceLock::new(), outbound: OnceLock::new() }
    }
}

/// The status codes whose counters a route keeps at hand, once first seen; others take a lookup.
const COMMON_CODES: [u16; 17] = [200, 201, 202, 204, 301, 302, 304, 400, 401, 403, 404, 408, 429, 500, 502, 503, 504];

/// What one route backend counts for one direction: responses by status code and gRPC status, and
/// the time to the response head.
#[derive(Debug)]
pub struct RequestStats {
    labels: RouteLabels,
    /// The route label again, shared with spans (and the route's other backends) without a copy.
    route: Arc<str>,
    families: RouteMetrics,
    codes: [OnceLock<Counter>; COMMON_CODES.len()],
    grpc: GrpcCounters,
    duration: Histogram,
}

impl RequestStats {
    fn new(families: &RouteMetrics, route: Arc<str>, labels: RouteLabels) -> RequestStats {
        RequestStats {
            duration: families.0.duration.get_or_create_owned(&labels),
            route,
            families: families.clone(),
            labels,
            codes: Default::default(),
            grpc: Default::default(),
        }
    }

    /// The route label: `TABLE/ROUTE`, or empty for a listener's default cluster.
    pub fn route(&self) -> &Arc<str> {
        &self.route
    }

    /// Counts one response with `status`, `elapsed` after the request arrived.
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.duration.observe(elapsed);
        let code_labels = || CodeLabels { route: self.labels.clone(), code: status };
        match COMMON_CODES.iter().position(|c| *c == status) {
            Some(i) => self.codes[i].get_or_init(|| self.families.0.requests.get_or_create_owned(&code_labels())).inc(),
            None => self.families.0.requests.get_or_create(&code_labels()).inc(),
        };
    }

    /// Counts one gRPC call that ended with `code` (codes above 16 count as 2, UNKNOWN).
    pub fn record_grpc(&self, code: u32) {
        self.grpc.inc(code, |grpc_status| {
            self.families.0.grpc.get_or_create_owned(&GrpcLabels { route: self.labels.clone(), grpc_status })
        });
    }
}

/// The counters of one route backend (a route and one of its clusters), per direction, made when
/// a listener of that direction first sends it a request (a route table may serve both).
#[derive(Debug)]
pub struct RouteStats {
    families: RouteMetrics,
    /// The route label.
    route: Arc<str>,
    inbound: OnceLock<Arc<RequestStats>>,
    outbound: OnceLock<Arc<RequestStats>>,
}

impl RouteStats {
    /// The counters for requests from a listener of `direction` (`inbound` or `outbound`) to
    /// `cluster` (the backend's: its name and Service label the series).
    pub fn for_direction(&self, direction: &'static str, cluster: &Cluster) -> &Arc<RequestStats> {
        let slot = if direction == "inbound" { &self.inbound } else { &self.outbound };
        slot.get_or_init(|| {
            let (dst_namespace, dst_service) = cluster.service.as_deref().cloned().unwrap_or_default();
            let labels = RouteLabels {
                direction,
                route: self.route.to_string(),
                cluster: cluster.name.to_string(),
                dst_namespace,
                dst_service,
            };
            Arc::new(RequestStats::new(&self.families, self.route.clone(), labels))
        })
    }
}
