//! Where the control plane's resources come from.
//!
//! Each source follows its input and hands what it holds to `plane`, which merges the sources into
//! the one set the proxies are served:
//!
//! - [`directory`] — a GitOps directory of YAML files (the version is the git commit), watched;
//! - [`registry`] — workloads registered in etcd with leases ([`etcd`] is its small etcd v3 client);
//! - [`cluster`] — the Kubernetes cluster's Services, EndpointSlices, Pods, Namespaces and Gateway
//!   API routes, watched through the API server ([`route_status`] writes the routes' status back);
//! - [`endpoint_slices`] — the EndpointSlices (and pods' service accounts) turned into the
//!   endpoints of the Services clusters name.

pub mod cluster;
pub mod directory;
pub mod endpoint_slices;
pub mod etcd;
pub mod registry;
pub mod route_status;
