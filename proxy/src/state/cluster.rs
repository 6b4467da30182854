//! A cluster as the data path sees it: where its endpoints are, how to talk to them, its counters.
//!
//! Built from a Cluster resource and its Endpoints resource when a snapshot is built. The endpoint set
//! (with its round-robin position) is carried over from the previous snapshot when the endpoints did
//! not change, and the counters always are (they are looked up by name).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use remora_control_api::v1;

use crate::balance::EndpointSet;
use crate::telemetry::ClusterStats;

/// The protocol spoken to a cluster's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// Whatever the downstream request used.
    Auto,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

impl From<v1::cluster::Protocol> for UpstreamProtocol {
    fn from(protocol: v1::cluster::Protocol) -> Self {
        match protocol {
            v1::cluster::Protocol::Auto => UpstreamProtocol::Auto,
            v1::cluster::Protocol::Http1 => UpstreamProtocol::Http1,
            v1::cluster::Protocol::Http2 => UpstreamProtocol::Http2,
        }
    }
}

/// Where a cluster's endpoints come from.
#[derive(Debug)]
pub enum Targets {
    /// A fixed set, balanced.
    Endpoints(Arc<EndpointSet>),
    /// Each connection's original destination (a pass-through cluster).
    OriginalDestination,
}

/// A compiled cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The cluster's name.
    pub name: Arc<str>,
    /// Protocol to the endpoints.
    pub protocol: UpstreamProtocol,
    /// Limit on each TCP connect.
    pub connect_timeout: Duration,
    /// How long a pooled connection may sit idle.
    pub idle_timeout: Duration,
    /// The endpoints.
    pub targets: Targets,
    /// The cluster's counters.
    pub stats: Arc<ClusterStats>,
}

impl Cluster {
    /// The endpoint for the next request or connection: the balancer's pick, or for a pass-through
    /// cluster the connection's original destination. `None` when there is none to be had.
    pub fn pick(&self, original_destination: Option<SocketAddr>) -> Option<SocketAddr> {
        match &self.targets {
            Targets::Endpoints(set) => set.pick(),
            Targets::OriginalDestination => original_destination,
        }
    }
}
