//! The API between Remora's parts: the resource schema and its validation, identities, and the
//! clients a proxy (or a tool) runs against the control plane.
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
//! The control plane itself (the Delta-ADS server, its sources, the CA, the injector) is the
//! `remora-control-plane` crate, built on this one; a proxy depends on this crate alone.
//!
//! # Layout
//! - [`v1`]: the generated message types (prost structs with pbjson serde).
//! - [`resource`] — [`Resource`], the tagged union of the kinds, and [`Kind`].
//! - [`config`] — YAML documents to resources, with errors that point at the field.
//! - [`yaml`] — YAML text to values, refusing a text whose aliases would expand past its budget.
//! - [`validate`] — per-resource and cross-resource rules.
//! - [`identity`] — SPIFFE IDs and the patterns allow-lists are written in.
//! - [`xds`] — Delta ADS: the protocol's terms and the client a proxy runs.
//! - [`ca`] — the proxies' side of the CA: the certificate request and the signing call.
//! - [`grpc`] — dialling the control plane (plaintext or TLS with given roots).
//! - [`capture`] — a pod's capture settings, shared by the injector and `remora init`.
//! - [`limits`] — limits of the control plane's wire and of config files.
//! - [`watch`] — following files for changes: the one watcher the proxy and the control plane share.
//! - [`pb`], [`capb`] — the generated Delta-ADS and CA messages and client stubs.
//! - `testing` (feature `testing`) — a typed builder of config documents for tests and benches.

pub mod ca;
pub mod capture;
pub mod config;
pub mod grpc;
pub mod identity;
pub mod limits;
pub mod resource;
pub mod validate;
pub mod watch;
pub mod xds;
pub mod yaml;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use resource::{Encoded, Kind, Resource};

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
