//! `remora control`: the control plane that configures Remora's proxies, and the services it runs
//! beside them.
//!
//! Resources enter from the [`sources`] (a GitOps directory, the etcd registry, Kubernetes
//! EndpointSlices), with what the automatic [`mesh`] makes of the Kubernetes objects among them,
//! are merged into one set by [`plane`], and leave to every connected proxy as
//! Delta-ADS differences ([`ads`]). On the same port, the [`ca`] signs short-lived SPIFFE
//! certificates for proxies that prove who they are; on its own port, the [`inject`]or's admission
//! webhook gives new pods their sidecar. The resource schema, its validation and the clients
//! proxies run are the API crate's (`remora-control-api`), which this one builds on; the proxy
//! never links this crate.
//!
//! # Layout
//! - [`plane`] — the composition root: [`ControlPlane::start`], the sources merged, the operator
//!   HTTP endpoints (`/metrics`, `/ready`, `/live`, `/config_dump`).
//! - `compose` — the sources' latest states merged into the published set, a cluster's changes
//!   carried as changes.
//! - [`ads`] — the Delta-ADS server: the publisher of resource sets and one stream per proxy.
//! - [`sources`] — the directory, the etcd registry, the cluster's objects.
//! - [`ca`] — the certificate authority, its signing service and the token authenticators.
//! - [`inject`] — the sidecar injector (`remora inject`, the admission webhook, its caBundle).
//! - [`kubernetes`] — the client of the Kubernetes API server.
//! - [`mesh`] — the automatic mesh: Services, their EndpointSlices and Pods made into clusters,
//!   endpoints and callers' route tables.
//! - [`tls`] — the control plane's own serving certificates, renewed from its CA.
//! - [`metrics`] — the control plane's metrics.
//! - [`signals`] — SIGTERM and SIGINT, which stop a running command.
//! - `testing` (feature `testing`) — fixtures for tests and benches.

pub mod ads;
pub mod ca;
mod compose;
pub mod inject;
pub mod kubernetes;
pub mod mesh;
pub mod metrics;
pub mod plane;
pub mod signals;
pub mod sources;
pub mod tls;

#[cfg(feature = "testing")]
pub mod testing;

pub use plane::{ControlConfig, ControlError, ControlPlane};

/// The server halves of the Delta-ADS and CA services (generated; their messages are the API
/// crate's).
#[allow(clippy::all, unreachable_pub, rust_2018_idioms, missing_docs)]
pub mod servers {
    include!(concat!(env!("OUT_DIR"), "/servers.rs"));
}

/// Generated etcd v3 client stubs (etcd's packages, trimmed).
#[allow(clippy::all, unreachable_pub, rust_2018_idioms, missing_docs, non_snake_case)]
pub mod etcdpb {
    include!(concat!(env!("OUT_DIR"), "/etcd.rs"));
}
