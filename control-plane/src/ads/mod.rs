//! The control plane's half of Delta ADS: publish resource sets, stream their differences.
//!
//! Config sources hand resource sets, or their changes, to the [`Publisher`] (`publish`), which
//! encodes each resource once into a shared [`ServedResource`] (an `Any` whose bytes are
//! reference-counted, so a thousand proxies receiving it share one encoding) and publishes an
//! immutable [`ServedSet`] through a `watch` channel. A resource whose bytes did not change keeps
//! its `Arc`, its version and so its place in every proxy's view: nothing is re-sent for it.
//!
//! Each proxy sees a view of the set: the resources every proxy sees, and over them its namespace's
//! own, and over those its pod's (resources only that scope's proxies are sent, beside the shared
//! ones or in place of one of the same name: the automatic mesh's route tables with the
//! namespace's short names, a namespace's or a pod's strict inbound policy). A stream's namespace
//! is its token's, when the stream is authenticated and the token's identities lie in one
//! namespace, else its node ID's (`POD.NAMESPACE`, as the injector sets it), and its pod the node
//! ID's when that agrees on the namespace; a node ID without a namespace sees the shared resources
//! alone. Proxies of one scope share
//! the encoding of its resources as all proxies share the shared ones. A scope may narrow its
//! view ([`Egress`], the automatic mesh's `remora.dev/egress`): of the resources named for a
//! Service port (`NAMESPACE/NAME:PORT`) its proxies see only its Services'; a publication that
//! changes a scope's narrowing has its streams diff every name.
//!
//! [`AdsServer`] serves one task per stream; with [`AdsServer::authenticated_by`], only to a proxy
//! whose stream carries a bearer token the CA's authenticators accept, checked again whenever the
//! bootstrap tokens change and every [`TOKEN_RECHECK`] (a deleted service account or pod), the
//! stream closing (`UNAUTHENTICATED`) once the token is refused. The task keeps the stream's [`Session`]: per kind,
//! the subscription (wildcard or names), what the proxy holds (`known`: the resources sent, seeded
//! from `initial_resource_versions`), the responses awaiting an ACK, and the versions the proxy NACKed.
//! When a new set is published (or the subscription changes) the session computes, per kind, the
//! resources whose version differs from what the proxy holds and the names it holds that are gone,
//! and sends them in push order, removals last. A session that holds the generation just before
//! the new one looks only at the names that publication touched (each set lists them), so a
//! thousand streams answering a one-route edit do a thousand small diffs, not a thousand scans.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::ca::auth::{AuthError, Authenticator, Authenticators, Entitlement, bearer_token};
use crate::metrics::ControlMetrics;
use crate::servers::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::tls::Peer;
use remora_control_api::Kind;
use remora_control_api::identity::SpiffeId;
use remora_control_api::xds::WILDCARD;
use remora_control_api::xds::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

mod known;
mod publish;

use known::Known;

pub use publish::{Delta, Egress, Published, Publisher, ServedResource, ServedSet, View, service_of};

/// Responses queued per stream before the stream's task waits for the proxy to read (each is made
/// only when there is room: a proxy reading its first view slowly holds a few of its responses in
/// memory, not all of them).
const STREAM_QUEUE: usize = 4;
/// Responses per kind a proxy may leave unanswered before the oldest is forgotten.
const MAX_PENDING: usize = 64;
/// Clusters and endpoint sets are sent in responses of about this many bytes at most (a single larger
/// resource goes alone). Each stream's encoder keeps the allocation of the largest message it sent
/// for as long as the stream lives (tonic encodes into one growing buffer and hands out slices of
/// it), so this bounds a connected proxy's cost to the control plane. Listeners and route tables
/// are split only in a proxy's first view of their kind: two of them can conflict (an address, a
/// host), and a proxy must see a change that moves one from one to the other whole, but any part
/// of one consistent set is consistent.
const CHUNK_BYTES: usize = 32 * 1024;

/// The gRPC service: one [`Session`] task per stream.
#[derive(Debug, Clone)]
pub struct AdsServer {
    served: watch::Receiver<Arc<ServedSet>>,
    shared: Arc<Shared>,
    /// When set, a stream must carry a bearer token these accept (the one the proxy's CA requests
    /// carry); otherwise anyone who reaches the port may subscribe.
    authenticators: Option<Arc<Authenticators>>,
    /// Whether streams can prove their namespace (the port checks client certificates): then a
    /// stream that proves none is not believed about it either, and sees the shared view alone.
    proofs: bool,
}

/// Per kind (by push-order index), name → the version a proxy NACKed.
type Nacked = [HashMap<String, String>; Kind::COUNT];

#[derive(Debug)]
struct Shared {
    metrics: Arc<ControlMetrics>,
    /// Versions each node NACKed, kept across its reconnects.
    nacked: Mutex<HashMap<String, Nacked>>,
}

impl AdsServer {
    /// A server streaming what `publisher` publishes.
    pub fn new(publisher: &Publisher) -> Self {
        AdsServer {
            served: publisher.subscribe(),
            shared: Arc::new(Shared { metrics: publisher.metrics.clone(), nacked: Mutex::new(HashMap::new()) }),
            authenticators: None,
            proofs: false,
        }
    }

    /// Believes no node ID about its namespace: the port checks client certificates, so a stream
    /// proves its namespace (or its token pins it) or sees the shared view alone.
    pub fn proofs_required(mut self) -> Self {
        self.proofs = true;
        self
    }

    /// Requires every stream to authenticate with a bearer token `authenticators` accept.
    pub fn authenticated_by(mut self, authenticators: Arc<Authenticators>) -> Self {
        self.authenticators = Some(authenticators);
        self
    }

    /// The tonic service to add to a server.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(remora_control_api::limits::MAX_XDS_MESSAGE)
            .max_encoding_message_size(remora_control_api::limits::MAX_XDS_MESSAGE)
    }
}

type ResponseStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

/// How often an open stream's token is checked again, besides whenever the bootstrap tokens change:
/// often enough that a revoked service account loses its stream within minutes, rarely enough that
/// a thousand proxies cost the API server a few TokenReviews a second.
pub const TOKEN_RECHECK: Duration = Duration::from_secs(300);

/// An authenticated stream's token and when to check it again.
struct TokenCheck {
    token: String,
    authenticators: Arc<Authenticators>,
    revisions: watch::Receiver<u64>,
    every: tokio::time::Interval,
}

impl TokenCheck {
    fn new(token: String, authenticators: Arc<Authenticators>) -> TokenCheck {
        let revisions = authenticators.revisions();
        // Spread over the period, so streams opened together are not all checked together.
        let first = TOKEN_RECHECK.mul_f64(0.5 + fastrand::f64() / 2.0);
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + first, TOKEN_RECHECK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        TokenCheck { token, authenticators, revisions, every }
    }

    /// Waits until `check`'s token is due a check; for ever when there is none.
    async fn next(check: &mut Option<TokenCheck>) {
        match check {
            Some(check) => check.due().await,
            None => std::future::pending().await,
        }
    }

    /// Waits until the token is due a check.
    async fn due(&mut self) {
        tokio::select! {
            _ = self.every.tick() => {}
            changed = self.revisions.changed() => if changed.is_err() {
                // The authenticators are gone: only the period is left.
                self.every.tick().await;
            }
        }
    }

    /// Whether the token is still accepted: `Err` with the reason once it is refused; a backend that
    /// cannot decide keeps the stream (it was accepted, and the next check asks again).
    async fn still_accepted(&self) -> Result<(), String> {
        match self.authenticators.authenticate(&self.token).await {
            Ok(_) => Ok(()),
            Err(AuthError::Unavailable(error)) => {
                warn!(%error, "cannot check an open discovery stream's token; it stays open");
                Ok(())
            }
            Err(error) => Err(error.to_string()),
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let Peer { address: peer, identity } = Peer::of(&request);
        let proven_namespace = identity.as_ref().and_then(namespace_of);
        let mut check = None;
        let mut token_namespace = None;
        if let Some(authenticators) = &self.authenticators {
            let token = bearer_token(request.metadata());
            match authenticators.authenticate(&token).await {
                Ok(entitlement) => token_namespace = entitled_namespace(&entitlement),
                Err(error) => {
                    let refused = match error {
                        AuthError::Missing | AuthError::Unknown => Status::unauthenticated(error.to_string()),
                        AuthError::Unavailable(_) => Status::unavailable(error.to_string()),
                    };
                    self.shared.metrics.stream_refused();
                    warn!(?peer, %error, "discovery stream refused");
                    return Err(refused);
                }
            }
            check = Some(TokenCheck::new(token, authenticators.clone()));
        }
        if let (Some(proven), Some(token)) = (&proven_namespace, &token_namespace)
            && proven != token
        {
            self.shared.metrics.stream_refused();
            warn!(?peer, ?identity, token = %token, "discovery stream refused: its certificate and its token disagree");
            return Err(Status::permission_denied(format!(
                "the stream's certificate is of namespace {proven:?} and its token of {token:?}"
            )));
        }
        // What the stream proves pins its namespace: the certificate, else the token; where proofs
        // can be had, a stream with neither is believed of no namespace (the empty one: no scope).
        let pinned_namespace = proven_namespace.or(token_namespace).or_else(|| self.proofs.then(String::new));
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let served = self.served.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            shared.metrics.stream_opened();
            let mut session = Session { pinned_namespace, ..Session::default() };
            let end = serve_stream(&mut session, requests, &tx, served, &shared, check).await;
            shared.metrics.stream_closed();
            session.close(&shared);
            debug!(node = %session.node, ?peer, reason = %end, "discovery stream closed");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn serve_stream(
    session: &mut Session,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    mut served: watch::Receiver<Arc<ServedSet>>,
    shared: &Shared,
    mut check: Option<TokenCheck>,
) -> String {
    loop {
        tokio::select! {
            () = TokenCheck::next(&mut check) => {
                if let Some(check) = &check
                    && let Err(error) = check.still_accepted().await
                {
                    shared.metrics.stream_revoked();
                    warn!(node = %session.node, %error, "an open stream's token is no longer accepted; closing it");
                    let status = Status::unauthenticated(format!("the stream's token is no longer accepted: {error}"));
                    let _ = tx.send(Err(status)).await;
                    return "its token is no longer accepted".into();
                }
            }
            request = requests.message() => match request {
                Ok(Some(request)) => {
                    if let Err(status) = session.on_request(request, shared) {
                        let message = status.message().to_owned();
                        let _ = tx.send(Err(status)).await;
                        return message;
                    }
                }
                Ok(None) => return "the proxy closed it".into(),
                Err(status) => return status.message().to_owned(),
            },
            changed = served.changed(), if !session.node.is_empty() => {
                if changed.is_err() {
                    return "the server stopped".into();
                }
            }
        }
        let current = served.borrow_and_update().clone();
        // Each response is made as the stream takes it: a first view is thousands of resources, and
        // a thousand proxies connecting at once would otherwise each hold all of it as messages.
        for planned in session.plan(&current) {
            let response = session.response(planned, &current, shared);
            if tx.send(Ok(response)).await.is_err() {
                return "the proxy went away".into();
            }
        }
    }
}

/// The scopes whose own resources a proxy sees, least specific first: its namespace (the one the
/// stream's proof pins, its client certificate's or its token's, if it does; else the node ID's),
/// then its pod (`NAMESPACE/POD`, when the node ID, of the injector's form `POD.NAMESPACE`, names
/// that namespace). A namespace is a DNS label, so the node ID's is the part after its last dot.
fn scopes_of(node: &str, pinned_namespace: Option<&str>) -> Vec<String> {
    let named = node.rsplit_once('.').filter(|(pod, namespace)| {
        !pod.is_empty()
            && !namespace.is_empty()
            && namespace.len() <= 63
            && namespace.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    let Some(namespace) = pinned_namespace.or(named.map(|(_, namespace)| namespace)) else { return Vec::new() };
    if namespace.is_empty() {
        return Vec::new();
    }
    let mut scopes = vec![namespace.to_owned()];
    if let Some((pod, _)) = named.filter(|(_, ns)| *ns == namespace) {
        scopes.push(format!("{namespace}/{pod}"));
    }
    scopes
}

/// The namespace of a workload identity (`spiffe://TD/ns/NAMESPACE/...`).
fn namespace_of(identity: &SpiffeId) -> Option<String> {
    let namespace = identity.path().strip_prefix("/ns/")?.split('/').next()?;
    (!namespace.is_empty()).then(|| namespace.to_owned())
}

/// The one namespace a token's identities lie in (`spiffe://TD/ns/NAMESPACE/...`, the namespace
/// written out in each), if they agree.
fn entitled_namespace(entitlement: &Entitlement) -> Option<String> {
    let mut namespaces = entitlement.identities.iter().map(|pattern| {
        let path = pattern.as_str().strip_prefix("spiffe://")?.split_once('/')?.1;
        let namespace = path.strip_prefix("ns/")?.split('/').next()?;
        (!namespace.contains('*') && !namespace.is_empty()).then(|| namespace.to_owned())
    });
    let first = namespaces.next()??;
    namespaces.all(|other| other.as_deref() == Some(first.as_str())).then_some(first)
}

/// A response awaiting its ACK or NACK.
#[derive(Debug)]
struct Pending {
    published_at: Option<Instant>,
    sent: Vec<Arc<ServedResource>>,
}

#[derive(Debug, Default)]
struct Subscription {
    active: bool,
    wildcard: bool,
    names: HashSet<String>,
    /// What the proxy holds (or will, once it applies what was sent).
    known: Known,
    /// The first response to a subscription is sent even when empty, so the proxy can ACK it.
    owes_response: bool,
    pending: BTreeMap<u64, Pending>,
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// A response to send: the resources of `kind` it carries and the names it removes.
#[derive(Debug)]
struct Planned {
    kind: Kind,
    sent: Vec<Arc<ServedResource>>,
    removed: Vec<String>,
}

/// One stream's state.
#[derive(Debug, Default)]
struct Session {
    node: String,
    /// The scopes whose own resources it sees (see [`scopes_of`]).
    scopes: Arc<[String]>,
    /// The namespace the stream's proof pins (its client certificate's, else its token's), if it
    /// does.
    pinned_namespace: Option<String>,
    /// When the node identified itself: changes published before that are initial state, not
    /// convergence.
    connected_at: Option<Instant>,
    nonce: u64,
    kinds: [Subscription; Kind::COUNT],
    nacked: Nacked,
    /// The generation last diffed against; a new one, or a subscription change, means diff again.
    synced: Option<u64>,
}

impl Session {
    fn on_request(&mut self, request: DeltaDiscoveryRequest, shared: &Shared) -> Result<(), Status> {
        if self.node.is_empty() {
            let node = request.node.as_ref().map(|n| n.id.as_str()).unwrap_or_default();
            if node.is_empty() {
                return Err(Status::invalid_argument("the first request of a stream must carry node.id"));
            }
            self.node = node.to_owned();
            self.scopes = scopes_of(node, self.pinned_namespace.as_deref()).into();
            self.connected_at = Some(Instant::now());
            if let Ok(mut nacked) = shared.nacked.lock() {
                self.nacked = nacked.remove(node).unwrap_or_default();
            }
            info!(node = %self.node, scopes = ?self.scopes, "proxy connected");
        }
        let Some(kind) = Kind::from_type_url(&request.type_url) else {
            warn!(node = %self.node, type_url = %request.type_url, "subscription to an unknown type ignored");
            return Ok(());
        };
        let sub = &mut self.kinds[kind.index()];
        if !request.response_nonce.is_empty() {
            let pending = request.response_nonce.parse::<u64>().ok().and_then(|nonce| sub.pending.remove(&nonce));
            match (pending, &request.error_detail) {
                // A stale or unknown nonce: an answer to a response this session no longer tracks.
                (None, _) => {}
                (Some(pending), Some(error)) => {
                    shared.metrics.nacked(kind);
                    warn!(node = %self.node, r#type = %kind, error = %error.message, "proxy rejected an update");
                    for resource in pending.sent {
                        self.nacked[kind.index()].insert(resource.wire.name.clone(), resource.version.clone());
                    }
                }
                (Some(pending), None) => {
                    shared.metrics.acked(kind, pending.published_at.map(|at| at.elapsed()));
                    for resource in &pending.sent {
                        self.nacked[kind.index()].remove(&resource.wire.name);
                    }
                }
            }
        }
        if !sub.active {
            sub.active = true;
            sub.owes_response = true;
            sub.wildcard = request.resource_names_subscribe.is_empty();
            sub.known = Known::claimed(request.initial_resource_versions);
            self.synced = None;
        }
        for name in request.resource_names_subscribe {
            if name == WILDCARD {
                sub.wildcard = true;
            } else {
                sub.names.insert(name);
            }
            self.synced = None;
        }
        for name in request.resource_names_unsubscribe {
            if name == WILDCARD {
                sub.wildcard = false;
            } else {
                sub.names.remove(&name);
            }
            self.synced = None;
        }
        Ok(())
    }

    /// The responses that bring the proxy up to `current`, in push order, removals last, made at
    /// once (the stream makes each as it sends it: [`Session::plan`], [`Session::response`]).
    #[cfg(test)]
    fn pushes(&mut self, current: &Arc<ServedSet>, shared: &Shared) -> Vec<DeltaDiscoveryResponse> {
        let planned = self.plan(current);
        planned.into_iter().map(|planned| self.response(planned, current, shared)).collect()
    }

    /// What brings the proxy up to `current`: the responses to send, in push order, removals
    /// last, each its kind, the resources it carries and the names it removes. The record of what
    /// the proxy holds is updated as if they were sent.
    fn plan(&mut self, current: &Arc<ServedSet>) -> Vec<Planned> {
        if self.synced == Some(current.generation) {
            return Vec::new();
        }
        // Holding the generation just before this one, the proxy needs only what it touched.
        // (Unless the publication changed what its view narrows to: then every name may differ.)
        let incremental =
            self.synced.is_some_and(|held| held + 1 == current.generation) && !current.egress_changed(&self.scopes);
        self.synced = Some(current.generation);
        let mut responses = Vec::new();
        let mut removals = Vec::new();
        for kind in Kind::ALL {
            let sub = &mut self.kinds[kind.index()];
            if !sub.active {
                continue;
            }
            let served = current.view(kind, &self.scopes);
            let nacked = &self.nacked[kind.index()];
            if !incremental {
                sub.known.adopt(served.iter().map(|(_, resource)| resource));
            }
            // Whether a version due was held back, the proxy having rejected it: then what it
            // holds is not its view.
            let held_back = Cell::new(false);
            let due = |name: &str, resource: &ServedResource| {
                if !sub.wants(name) || sub.known.version(name) == Some(resource.version.as_str()) {
                    return false;
                }
                let rejected = nacked.get(name) == Some(&resource.version);
                held_back.set(held_back.get() || rejected);
                !rejected
            };
            let (resources, removed): (Vec<_>, Vec<String>) = if incremental {
                let touched = current.touched(kind, &self.scopes);
                let resources =
                    touched.iter().filter_map(|name| served.get(name).filter(|r| due(name, r))).cloned().collect();
                let removed = touched
                    .iter()
                    .filter(|n| served.get(n).is_none() && sub.known.contains(n))
                    .map(|n| (*n).to_owned())
                    .collect();
                (resources, removed)
            } else {
                let resources = served.iter().filter(|(name, r)| due(name, r)).map(|(_, r)| r.clone()).collect();
                let removed = sub
                    .known
                    .names()
                    .filter(|name| served.get(name).is_none() || !sub.wants(name))
                    .map(str::to_owned)
                    .collect();
                (resources, removed)
            };
            let first = sub.known.is_empty();
            // Once this is applied, the proxy holds exactly its view when it wants every resource,
            // none was held back and, where only the touched names were diffed, it held its view
            // before: then the view is the record (shared, not a list of its own).
            if sub.wildcard && !held_back.get() && (!incremental || sub.known.is_view()) {
                let held = if incremental {
                    let added = resources.iter().filter(|r| !sub.known.contains(&r.wire.name)).count();
                    (sub.known.len() + added).saturating_sub(removed.len())
                } else {
                    served.iter().count()
                };
                sub.known = Known::view(current, kind, &self.scopes, held);
            } else {
                for resource in &resources {
                    sub.known.sent(resource);
                }
                for name in &removed {
                    sub.known.removed(name);
                }
            }
            if resources.is_empty() {
                if removed.is_empty() && sub.owes_response {
                    responses.push((kind, resources, Vec::new()));
                }
            } else if matches!(kind, Kind::Cluster | Kind::Endpoints) || first {
                let mut chunk = Vec::new();
                let mut size = 0;
                for resource in resources {
                    let len = resource.wire.encoded_len();
                    if !chunk.is_empty() && size + len > CHUNK_BYTES {
                        responses.push((kind, std::mem::take(&mut chunk), Vec::new()));
                        size = 0;
                    }
                    size += len;
                    chunk.push(resource);
                }
                responses.push((kind, chunk, Vec::new()));
            } else {
                responses.push((kind, resources, Vec::new()));
            }
            if !removed.is_empty() {
                removals.push((kind, Vec::new(), removed));
            }
            sub.owes_response = false;
        }
        removals.reverse();
        responses.extend(removals);
        responses.into_iter().map(|(kind, sent, removed)| Planned { kind, sent, removed }).collect()
    }

    /// The response `planned` (by [`Session::plan`] for `current`) describes, awaiting its ACK.
    fn response(&mut self, planned: Planned, current: &ServedSet, shared: &Shared) -> DeltaDiscoveryResponse {
        let Planned { kind, sent, removed } = planned;
        self.nonce += 1;
        let sub = &mut self.kinds[kind.index()];
        let resources = sent.iter().map(|resource| resource.wire.clone()).collect();
        let published_at = current.published_at.filter(|at| self.connected_at.is_some_and(|c| *at > c));
        sub.pending.insert(self.nonce, Pending { published_at, sent });
        while sub.pending.len() > MAX_PENDING {
            sub.pending.pop_first();
        }
        let response = DeltaDiscoveryResponse {
            system_version_info: current.system_version.clone(),
            resources,
            type_url: kind.type_url().to_owned(),
            removed_resources: removed,
            nonce: self.nonce.to_string(),
        };
        shared.metrics.pushed(kind, response.resources.len(), response.encoded_len());
        response
    }

    fn close(&mut self, shared: &Shared) {
        if self.node.is_empty() || self.nacked.iter().all(HashMap::is_empty) {
            return;
        }
        if let Ok(mut nacked) = shared.nacked.lock() {
            nacked.insert(std::mem::take(&mut self.node), std::mem::take(&mut self.nacked));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use remora_control_api::Resource;
    use remora_control_api::config::parse;

    fn resources(yaml: &str) -> Vec<Resource> {
        parse(yaml, "t").unwrap().resources
    }

    const SET: &str = "resources:\n  - {kind: Cluster, name: a}\n  - {kind: Cluster, name: b}\n  - {kind: Endpoints, cluster: a, endpoints: [{address: \"127.0.0.1:1\"}]}\n";

    fn subscribe(session: &mut Session, shared: &Shared, kind: Kind, initial: HashMap<String, String>) {
        session
            .on_request(
                DeltaDiscoveryRequest {
                    node: Some(remora_control_api::xds::Node { id: "n".into(), ..Default::default() }),
                    type_url: kind.type_url().into(),
                    initial_resource_versions: initial,
                    ..Default::default()
                },
                shared,
            )
            .unwrap();
    }

    fn answer(session: &mut Session, shared: &Shared, response: &DeltaDiscoveryResponse, error: Option<&str>) {
        session
            .on_request(
                DeltaDiscoveryRequest {
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    error_detail: error.map(|e| remora_control_api::xds::RpcStatus {
                        code: 3,
                        message: e.into(),
                        details: vec![],
                    }),
                    ..Default::default()
                },
                shared,
            )
            .unwrap();
    }

    fn setup() -> (Publisher, Shared) {
        let metrics = Arc::new(ControlMetrics::new());
        let publisher = Publisher::new(metrics.clone());
        (publisher, Shared { metrics, nacked: Mutex::new(HashMap::new()) })
    }

    #[test]
    fn sends_everything_then_only_changes_in_push_order_with_removals_last() {
        let (publisher, shared) = setup();
        publisher.publish(&resources(SET), "v1");
        let mut session = Session::default();
        for kind in [Kind::RouteTable, Kind::Cluster, Kind::Endpoints] {
            subscribe(&mut session, &shared, kind, HashMap::new());
        }
        let first = session.pushes(&publisher.subscribe().borrow(), &shared);
        let kinds: Vec<&str> = first.iter().map(|r| r.type_url.rsplit('.').next().unwrap()).collect();
        // Route tables have none yet, but the subscription still gets its (empty) first answer.
        assert_eq!(kinds, ["Cluster", "Endpoints", "RouteTable"]);
        assert_eq!(first[0].resources.len(), 2);
        assert_eq!(first[0].system_version_info, "v1");
        assert!(session.pushes(&publisher.subscribe().borrow(), &shared).is_empty());

        let changed =
            SET.replace("{kind: Cluster, name: b}", "{kind: Cluster, name: c}").replace("127.0.0.1:1", "127.0.0.1:2");
        assert_eq!(publisher.publish(&resources(&changed), "v2"), Published { changed: 2, removed: 1 });
        let second = session.pushes(&publisher.subscribe().borrow(), &shared);
        let summary: Vec<(String, Vec<String>, Vec<String>)> = second
            .iter()
            .map(|r| {
                (
                    r.type_url.rsplit('.').next().unwrap().to_owned(),
                    r.resources.iter().map(|x| x.name.clone()).collect(),
                    r.removed_resources.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("Cluster".to_owned(), vec!["c".to_owned()], vec![]),
                ("Endpoints".to_owned(), vec!["a".to_owned()], vec![]),
                ("Cluster".to_owned(), vec![], vec!["b".to_owned()]),
            ]
        );
        assert!(session.pushes(&publisher.subscribe().borrow(), &shared).is_empty(), "nothing is sent twice");
        // Publishing the same set again changes nothing.
        assert_eq!(publisher.publish(&resources(&changed), "v3"), Published::default());
        // A stream that missed a generation diffs everything, and gets the same answer.
        publisher.publish(&resources(SET), "v4");
        publisher.publish(&resources(&changed), "v5");
        let after_skip = session.pushes(&publisher.subscribe().borrow(), &shared);
        assert!(after_skip.is_empty(), "the set is what the proxy already holds: {after_skip:?}");
    }

    /// The route tables a session was sent, by name, with their destinations.
    fn tables_sent(pushes: &[DeltaDiscoveryResponse]) -> BTreeMap<String, Vec<String>> {
        let mut sent = BTreeMap::new();
        for resource in pushes.iter().flat_map(|p| &p.resources) {
            let any = resource.resource.as_ref().unwrap();
            let table = <remora_control_api::v1::RouteTable as prost::Message>::decode(&any.value[..]).unwrap();
            sent.insert(table.name, table.destinations);
        }
        sent
    }

    fn session_of(shared: &Shared, node: &str, pinned_namespace: Option<&str>) -> Session {
        let mut session = Session { pinned_namespace: pinned_namespace.map(str::to_owned), ..Session::default() };
        session
            .on_request(
                DeltaDiscoveryRequest {
                    node: Some(remora_control_api::xds::Node { id: node.into(), ..Default::default() }),
                    type_url: Kind::RouteTable.type_url().into(),
                    ..Default::default()
                },
                shared,
            )
            .unwrap();
        session
    }

    /// A namespace's own resources reach its proxies only (by the node ID's namespace, or the
    /// stream token's, which wins), in place of the shared resource of the same name; a change to
    /// them reaches only those proxies, and when they go, their proxies get the shared one back.
    #[test]
    fn each_namespace_sees_its_own_resources_and_no_other() {
        let (publisher, shared) = setup();
        let base = resources(
            "resources:\n  - {kind: RouteTable, name: api, destinations: [\"api.shop:80\"]}\n  - {kind: RouteTable, name: db, destinations: [\"db.data:80\"]}\n",
        );
        let own = |destinations: &str| {
            BTreeMap::from([(
                "shop".to_owned(),
                resources(&format!(
                    "resources:\n  - {{kind: RouteTable, name: api, destinations: [{destinations}]}}\n  - {{kind: RouteTable, name: shop-only}}\n"
                )),
            )])
        };
        publisher.publish_views(&base, &own("\"api.shop:80\", \"api:80\""), "v1");
        let served = publisher.subscribe().borrow().clone();
        let mut shop = session_of(&shared, "web-0.shop", None);
        let mut data = session_of(&shared, "db-0.data", None);
        let mut pinned = session_of(&shared, "liar.shop", Some("data"));
        let mut anonymous = session_of(&shared, "host-7", None);
        let sent = tables_sent(&shop.pushes(&served, &shared));
        assert_eq!(sent.keys().collect::<Vec<_>>(), ["api", "db", "shop-only"]);
        assert_eq!(sent["api"], ["api.shop:80", "api:80"]);
        for other in [&mut data, &mut pinned, &mut anonymous] {
            let sent = tables_sent(&other.pushes(&served, &shared));
            assert_eq!(sent.keys().collect::<Vec<_>>(), ["api", "db"], "{}", other.node);
            assert_eq!(sent["api"], ["api.shop:80"]);
        }
        // Only the namespace's proxies hear of a change to its own resources.
        publisher.publish_views(&base, &own("\"api.shop:80\", \"api:80\", \"api:8080\""), "v2");
        let served = publisher.subscribe().borrow().clone();
        assert_eq!(tables_sent(&shop.pushes(&served, &shared))["api"].len(), 3);
        assert!(data.pushes(&served, &shared).is_empty());
        // The namespace's resources gone: its proxies get the shared table back, the rest removed.
        publisher.publish_views(&base, &BTreeMap::new(), "v3");
        let served = publisher.subscribe().borrow().clone();
        let pushes = shop.pushes(&served, &shared);
        assert_eq!(tables_sent(&pushes)["api"], ["api.shop:80"]);
        assert_eq!(pushes.last().unwrap().removed_resources, ["shop-only"]);
        assert!(data.pushes(&served, &shared).is_empty());
    }

    /// A pod's own resources reach that pod's proxy only, over its namespace's and the shared ones.
    #[test]
    fn a_pods_own_resources_override_its_namespaces() {
        let (publisher, shared) = setup();
        let table = |destination: &str| {
            resources(&format!("resources:\n  - {{kind: RouteTable, name: t, destinations: [\"{destination}\"]}}\n"))
        };
        let scoped = BTreeMap::from([("shop".to_owned(), table("ns:80")), ("shop/web-0".to_owned(), table("pod:80"))]);
        publisher.publish_views(&table("shared:80"), &scoped, "v1");
        let served = publisher.subscribe().borrow().clone();
        let seen = |node: &str| tables_sent(&session_of(&shared, node, None).pushes(&served, &shared))["t"].clone();
        assert_eq!(seen("web-0.shop"), ["pod:80"]);
        assert_eq!(seen("web-1.shop"), ["ns:80"]);
        assert_eq!(seen("db-0.data"), ["shared:80"]);
    }

    #[test]
    fn node_ids_and_tokens_name_scopes() {
        assert_eq!(scopes_of("web-7d9f.shop", None), ["shop", "shop/web-7d9f"]);
        assert_eq!(scopes_of("web.v2.shop", None), ["shop", "shop/web.v2"]);
        assert!(scopes_of("web-1", None).is_empty());
        assert!(scopes_of("web.Shop", None).is_empty());
        assert_eq!(scopes_of("web-1", Some("shop")), ["shop"]);
        assert_eq!(scopes_of("web-1.data", Some("shop")), ["shop"], "the node ID's pod is not believed");
        assert!(scopes_of("web-1.data", Some("")).is_empty(), "nothing proven, nothing believed");
        let entitled = |ids: &[&str]| {
            let identities =
                ids.iter().map(|id| remora_control_api::identity::IdentityPattern::parse(id).unwrap()).collect();
            entitled_namespace(&Entitlement { identities })
        };
        assert_eq!(entitled(&["spiffe://td/ns/shop/sa/web"]).as_deref(), Some("shop"));
        assert_eq!(entitled(&["spiffe://td/ns/shop/sa/web", "spiffe://td/ns/shop/sa/*"]).as_deref(), Some("shop"));
        assert_eq!(entitled(&["spiffe://td/ns/shop/sa/web", "spiffe://td/ns/data/sa/db"]), None);
        assert_eq!(entitled(&["spiffe://td/ns/*/sa/web"]), None);
        assert_eq!(entitled(&["spiffe://td/gateway"]), None);
        let proven = |id: &str| namespace_of(&SpiffeId::parse(id).unwrap());
        assert_eq!(proven("spiffe://td/ns/shop/sa/web").as_deref(), Some("shop"));
        assert_eq!(proven("spiffe://td/gateway"), None);
    }

    #[test]
    fn a_reconnect_with_known_versions_receives_only_the_difference() {
        let (publisher, shared) = setup();
        publisher.publish(&resources(SET), "v1");
        let served = publisher.subscribe().borrow().clone();
        let a = served.of(Kind::Cluster).get("a").unwrap().version.clone();
        let mut session = Session::default();
        let initial = HashMap::from([("a".to_owned(), a), ("gone".to_owned(), "x".to_owned())]);
        subscribe(&mut session, &shared, Kind::Cluster, initial);
        let pushes = session.pushes(&served, &shared);
        assert_eq!(pushes.len(), 2);
        assert_eq!(pushes[0].resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["b"]);
        assert_eq!(pushes[1].removed_resources, ["gone"]);
    }

    #[test]
    fn a_nacked_version_is_not_sent_again_even_after_a_reconnect() {
        let (publisher, shared) = setup();
        publisher.publish(&resources(SET), "v1");
        let mut session = Session::default();
        subscribe(&mut session, &shared, Kind::Cluster, HashMap::new());
        let first = session.pushes(&publisher.subscribe().borrow(), &shared);
        answer(&mut session, &shared, &first[0], Some("bad"));
        session.close(&shared);

        let mut again = Session::default();
        subscribe(&mut again, &shared, Kind::Cluster, HashMap::new());
        let pushes = again.pushes(&publisher.subscribe().borrow(), &shared);
        assert_eq!(pushes.len(), 1);
        assert!(pushes[0].resources.is_empty(), "{pushes:?}");
        assert!(!again.kinds[Kind::Cluster.index()].known.is_view(), "it holds less than its view");
        // A change to the source sends the new version.
        publisher.publish(&resources(&SET.replace("name: b}", "name: b, connect_timeout: 1s}")), "v2");
        let pushes = again.pushes(&publisher.subscribe().borrow(), &shared);
        assert_eq!(pushes[0].resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["b"]);
    }

    /// A proxy that holds its whole view keeps no record of its own: the publication's view is
    /// its record, through incremental diffs too, and the record becomes a list of its own (the
    /// same resources) only when it stops holding its view, here by narrowing its subscription.
    #[test]
    fn a_proxy_holding_its_view_is_recorded_as_the_view() {
        let (publisher, shared) = setup();
        publisher.publish(&resources(SET), "v1");
        let mut session = Session::default();
        subscribe(&mut session, &shared, Kind::Cluster, HashMap::new());
        session.pushes(&publisher.subscribe().borrow(), &shared);
        let known = |session: &Session| {
            let known = &session.kinds[Kind::Cluster.index()].known;
            let names: Vec<String> = known.names().map(str::to_owned).collect();
            assert_eq!(known.len(), names.len(), "the count kept beside the view");
            (known.is_view(), names)
        };
        assert_eq!(known(&session), (true, vec!["a".to_owned(), "b".to_owned()]));

        publisher.publish(&resources(&SET.replace("name: b}", "name: c}")), "v2");
        let pushes = session.pushes(&publisher.subscribe().borrow(), &shared);
        assert_eq!(pushes.len(), 2, "c sent, b removed: {pushes:?}");
        assert_eq!(known(&session), (true, vec!["a".to_owned(), "c".to_owned()]));
        let c = publisher.subscribe().borrow().of(Kind::Cluster).get("c").unwrap().clone();
        assert_eq!(session.kinds[Kind::Cluster.index()].known.version("c"), Some(c.version.as_str()));

        // Narrowed to `a`: c is removed, and the record is a list of its own.
        session
            .on_request(
                DeltaDiscoveryRequest {
                    type_url: Kind::Cluster.type_url().into(),
                    resource_names_subscribe: vec!["a".into()],
                    resource_names_unsubscribe: vec![WILDCARD.into()],
                    ..Default::default()
                },
                &shared,
            )
            .unwrap();
        let pushes = session.pushes(&publisher.subscribe().borrow(), &shared);
        assert_eq!(pushes.iter().flat_map(|p| p.removed_resources.clone()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(known(&session), (false, vec!["a".to_owned()]));
    }

    /// A stream whose view is narrowed is sent only its Services' resources; when the narrowing
    /// changes, the stream diffs every name (not only those the publication touched): what the
    /// wider view adds is sent, and what the narrower one leaves out is removed.
    #[test]
    fn a_change_of_narrowing_sends_and_removes_what_it_changes() {
        let (publisher, shared) = setup();
        let set = resources(
            "resources:\n  - {kind: Cluster, name: \"shop/web:80\"}\n  - {kind: Cluster, name: \"shop/db:5432\"}\n",
        );
        let only = |service: &str| {
            let services = Arc::new([service.to_owned()].into_iter().collect());
            BTreeMap::from([("shop".to_owned(), Egress { services })])
        };
        publisher.publish_narrowed(&set, &BTreeMap::new(), Some(only("shop/web")), "v1");
        let mut session = session_of(&shared, "web-0.shop", None);
        subscribe(&mut session, &shared, Kind::Cluster, HashMap::new());
        let names = |pushes: &[DeltaDiscoveryResponse]| {
            let sent: Vec<String> = pushes.iter().flat_map(|p| p.resources.iter().map(|r| r.name.clone())).collect();
            let removed: Vec<String> = pushes.iter().flat_map(|p| p.removed_resources.clone()).collect();
            (sent, removed)
        };
        let first = session.pushes(&publisher.subscribe().borrow(), &shared);
        assert_eq!(names(&first), (vec!["shop/web:80".to_owned()], vec![]));
        publisher.publish_delta(&Delta { egress: Some(only("shop/db")), ..Delta::default() }, "v1");
        let changed = session.pushes(&publisher.subscribe().borrow(), &shared);
        assert_eq!(names(&changed), (vec!["shop/db:5432".to_owned()], vec!["shop/web:80".to_owned()]));
        assert!(session.kinds[Kind::Cluster.index()].known.is_view());
    }

    /// Endpoint sets go in responses of bounded size; route tables too in a proxy's first view of
    /// them (any part of one consistent set is consistent), but a change to tables it holds goes
    /// whole, so that a destination moving from one table to another is never seen in both.
    #[test]
    fn many_endpoint_sets_are_sent_in_bounded_responses_and_route_tables_whole_once_held() {
        let (publisher, shared) = setup();
        let tables = |shift: usize| {
            let mut yaml = String::from("resources:\n");
            for c in 0..60 {
                yaml.push_str(&format!("  - {{kind: Endpoints, cluster: c{c}, endpoints: ["));
                for e in 0..40 {
                    yaml.push_str(&format!("{{address: \"10.0.{c}.{e}:8080\"}}, "));
                }
                yaml.push_str("]}\n");
                let hosts: Vec<String> = (0..40).map(|h| format!("host-{}-{h}.example", (c + shift) % 60)).collect();
                yaml.push_str(&format!(
                    "  - {{kind: RouteTable, name: t{c}, destinations: [{}], routes: [{{backends: [{{cluster: c{c}}}]}}]}}\n",
                    hosts.join(", ")
                ));
            }
            resources(&yaml)
        };
        let mut session = Session::default();
        subscribe(&mut session, &shared, Kind::Endpoints, HashMap::new());
        subscribe(&mut session, &shared, Kind::RouteTable, HashMap::new());
        // Subscribed before anything was published: its first view comes as a change, in parts too.
        let empty = session.pushes(&publisher.subscribe().borrow(), &shared);
        assert!(empty.iter().all(|r| r.resources.is_empty()), "{empty:?}");
        publisher.publish(&tables(0), "v1");
        let pushes = session.pushes(&publisher.subscribe().borrow(), &shared);
        for kind in [Kind::Endpoints, Kind::RouteTable] {
            let sent: Vec<&DeltaDiscoveryResponse> = pushes.iter().filter(|r| r.type_url == kind.type_url()).collect();
            assert!(sent.len() > 1, "{} {kind:?} responses", sent.len());
            assert!(sent.iter().all(|r| r.encoded_len() <= CHUNK_BYTES + 2048));
            assert_eq!(sent.iter().map(|r| r.resources.len()).sum::<usize>(), 60);
        }
        for response in &pushes {
            answer(&mut session, &shared, response, None);
        }
        // Every table's destinations move to another table: one response, whole.
        publisher.publish(&tables(1), "v2");
        let pushes = session.pushes(&publisher.subscribe().borrow(), &shared);
        let sent: Vec<&DeltaDiscoveryResponse> =
            pushes.iter().filter(|r| r.type_url == Kind::RouteTable.type_url()).collect();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].resources.len(), 60);
        assert!(sent[0].encoded_len() > CHUNK_BYTES);
    }

    #[test]
    fn the_first_request_must_name_the_node() {
        let (_, shared) = setup();
        let mut session = Session::default();
        let error = session
            .on_request(
                DeltaDiscoveryRequest { type_url: Kind::Cluster.type_url().into(), ..Default::default() },
                &shared,
            )
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
    }
}
