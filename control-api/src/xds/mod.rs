//! Delta ADS: the wire protocol between `remora control` and its proxies.
//!
//! One gRPC stream per proxy, `envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`, carries every resource kind as a `google.protobuf.Any` whose type URL is
//! `type.googleapis.com/remora.v1.<Kind>`. The semantics are Envoy's incremental xDS:
//!
//! - the first request of a stream carries the node; each kind is subscribed by its own request,
//!   with the `*` wildcard (or no names) meaning "every resource of this kind";
//! - every response carries a nonce; the client answers each with an ACK (the nonce) or a NACK (the
//!   nonce and an `error_detail` saying why, naming the resource and the field);
//! - responses carry only what changed: added or changed resources with their versions, and the
//!   names of removed ones, in push order (clusters, endpoints, listeners, route tables), removals
//!   last and in reverse order, so nothing a proxy receives refers to what it has not got;
//! - a reconnecting client lists the versions it holds (`initial_resource_versions`) and receives only
//!   what differs; a version a client NACKed is not sent to it again until the source changes.
//!
//! The control plane's half (the publisher, and the server that streams the differences to each
//! proxy) is `remora_control_plane::ads`. [`client`] is the proxy's half: it keeps a stream open
//! (reconnecting with jittered backoff) and hands each response to a [`client::Handler`], whose
//! verdict becomes the ACK or NACK.

pub mod client;

pub use crate::pb::envoy::config::core::v3::Node;
pub use crate::pb::envoy::service::discovery::v3 as discovery;
pub use crate::pb::google::rpc::Status as RpcStatus;

/// The subscription name meaning "every resource of the type".
pub const WILDCARD: &str = "*";

/// The fully qualified name of the gRPC method.
pub const DELTA_ADS_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// A resource version: the FNV-1a 64-bit hash of its protobuf bytes, as 16 hex digits. Equal
/// resources have equal versions in every process, so a restarted control plane and a reconnecting
/// proxy agree on what is unchanged.
pub fn version_of(bytes: &[u8]) -> String {
    let hash = bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3));
    format!("{hash:016x}")
}
