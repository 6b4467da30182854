//! Remora's resource schema and its validation.
//!
//! The schema is written once, in `proto/remora/v1/*.proto`, and used in three forms: protobuf on the
//! control-plane wire, YAML files (the proto3 JSON mapping, written as YAML) for the proxy's `--config`
//! and the control plane's GitOps directory, and JSON in the proxy's `/config_dump`.
//!
//! Text enters through [`config::parse`], which turns YAML documents into a [`config::ConfigFile`]:
//! an optional [`v1::Bootstrap`] and a list of [`Resource`]s, each checked on its own. The whole set is
//! then checked together by [`validate::validate`] (names unique, references resolve), which is what a
//! proxy runs before it builds a snapshot from the set. Errors name the resource and the field.
//!
//! # Layout
//! - [`v1`]: the generated message types (prost structs with pbjson serde).
//! - [`resource`] — [`Resource`], the tagged union of the kinds, and [`Kind`].
//! - [`config`] — YAML documents to resources, with errors that point at the field.
//! - [`validate`] — per-resource and cross-resource rules.
//! - [`xds`] — Delta ADS: the server that streams resources and the client a proxy runs.
//! - [`control`] — `remora control`: the GitOps directory, the etcd registry, the server, composed.
//! - [`identity`] — SPIFFE IDs and the patterns allow-lists are written in.
//! - [`ca`] — the certificate authority: its root, the signing service, and the proxies' client.
//! - [`inject`] — the sidecar injector (`remora inject`, the admission webhook).
//! - [`kubernetes`] — the control plane's client of the Kubernetes API server.

pub mod ca;
pub mod config;
pub mod control;
pub mod grpc;
pub mod identity;
pub mod inject;
pub mod kubernetes;
pub(crate) mod limits;
pub mod resource;
pub mod validate;
pub mod xds;

#[cfg(feature = "testing")]
pub mod testing;

pub use resource::{Kind, Resource};

/// The generated `remora.v1` message types.
#[allow(clippy::all, unreachable_pub, rust_2018_idioms)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/remora.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/remora.v1.serde.rs"));
}

/// Generated Delta-ADS types and tonic stubs (Envoy's packages, trimmed).
#[allow(clippy::all, unreachable_pub, rust_2018_idioms, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/xds.rs"));
}

/// Generated CA signing service types and tonic stubs (`remora.ca.v1`).
#[allow(clippy::all, unreachable_pub, rust_2018_idioms, missing_docs)]
pub mod capb {
    include!(concat!(env!("OUT_DIR"), "/ca.rs"));
    pub use remora::ca::v1::*;
}

/// Generated etcd v3 client stubs (etcd's packages, trimmed).
#[allow(clippy::all, unreachable_pub, rust_2018_idioms, missing_docs, non_snake_case)]
pub mod etcdpb {
    include!(concat!(env!("OUT_DIR"), "/etcd.rs"));
}
