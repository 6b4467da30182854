//! The automatic mesh: every Kubernetes Service meshed with no configuration written.
//!
//! The control plane reads the cluster's Services, their EndpointSlices, the Pods behind them and
//! the Namespaces ([`Objects`], from the API server through `sources::cluster`, or from Kubernetes
//! manifests in the GitOps directory: the same readers either way) and makes, for every TCP
//! port of every Service, what a hand-written configuration would hold ([`resources`]):
//!
//! - a `Cluster` named `NAMESPACE/NAME:PORT`: per-request balancing by peak EWMA (Linkerd's
//!   default), the protocol its `appProtocol` names (`kubernetes.io/h2c`, `grpc` and `http2` are
//!   HTTP/2; `http` and `kubernetes.io/ws` HTTP/1.1; anything else, detected), and mutual TLS to
//!   the endpoints' sidecars when every pod behind the port has one;
//! - its `Endpoints`: the ready pods' addresses on the target port (terminating ones draining,
//!   unready ones out), each with its pod's SPIFFE identity
//!   (`spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT`), which mTLS demands of the sidecar
//!   at that address;
//! - a `RouteTable` that claims the Service's destinations — each cluster IP with the port (the
//!   original destination of a captured connection), and the DNS names cluster DNS resolves across
//!   namespaces (`NAME.NAMESPACE`, `NAME.NAMESPACE.svc`, `NAME.NAMESPACE.svc.CLUSTER-DOMAIN`, each
//!   with the port; a Host without one is on port 80) — and sends HTTP request by request, and
//!   opaque TCP connection by connection, to the cluster (a port whose `appProtocol` is `tcp`
//!   is `opaque`: forwarded unread, its server free to speak first). A headless Service claims its pods'
//!   addresses. An address two Services claim (two headless Services over the same pods) goes to
//!   the first by namespace and name; the other's table keeps its names (`claims`). The table serves outbound listeners only (`direction: outbound`): on the inbound
//!   side of the Service's own pods, a call by its name is for the app there. The proxies of the
//!   Service's own namespace are sent the table with the short name too (`NAME:PORT`, which
//!   cluster DNS resolves only there): a per-namespace view, see `ads`.
//! - an `AuthorizationPolicy` for the sidecars' inbound listener: permissive (mTLS and plaintext
//!   both accepted, counted apart), and strict in the view of a namespace or pod annotated
//!   `remora.dev/inbound: strict`.
//!
//! A namespace or pod annotated `remora.dev/egress` with the Services its workloads call has its
//! proxies sent only those Services' resources (and those their routes send to): see `egress`.
//!
//! Gateway API `HTTPRoute`s whose parent is a Service (GAMMA) make that Service port's routes
//! instead of its one plain route: the producer's for every caller, a consumer namespace's for its
//! own callers (see `gateway`).
//!
//! Remora's own resources refine the automatic ones, and the rule is simple: a `Cluster` whose
//! `kubernetes_service` names a Service port replaces that port's automatic cluster (its balancer,
//! breakers, outlier detection, timeouts are the operator's; its endpoints still come from the
//! Service), and a `RouteTable` that claims one of a port's destinations replaces that port's
//! automatic table (the operator's routes are the Service's routes; a host without a port claims
//! it on every port). What a user writes always wins
//! over what the mesh would make, whole, so that which setting applies never needs a merge rule.

mod claims;
mod egress;
mod gateway;
mod objects;
pub mod status;
mod translate;

pub use egress::{EGRESS_ANNOTATION, EgressError, egress};
pub use gateway::{BackendRef, GROUP, ParentRef, ReferenceGrant, Route, RouteKind};
pub use objects::{Changes, Namespace, ObjectKind, Objects, Pod, RouteKey, Service, ServicePort};
pub use translate::{INBOUND_LISTENER, INBOUND_POLICY, Made, Mesh, Remade, Settings, resources};
