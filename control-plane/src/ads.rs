//! The control plane's half of Delta ADS: publish resource sets, stream their differences.
//!
//! Config sources hand complete resource sets to the [`Publisher`], which encodes each resource once
//! into a shared [`ServedResource`] (an `Any` whose bytes are reference-counted, so a thousand
//! proxies receiving it share one encoding) and publishes an immutable [`ServedSet`] through a
//! `watch` channel. A resource whose bytes did not change keeps its `Arc`, its version and so its
//! place in every proxy's view: nothing is re-sent for it.
//!
//! Each proxy sees a view of the set: the resources every proxy sees, and over them its namespace's
//! own, and over those its pod's (resources only that scope's proxies are sent, beside the shared
//! ones or in place of one of the same name: the automatic mesh's route tables with the
//! namespace's short names, a namespace's or a pod's strict inbound policy). A stream's namespace
//! is its token's, when the stream is authenticated and the token's identities lie in one
//! namespace, else its node ID's (`POD.NAMESPACE`, as the injector sets it), and its pod the node
//! ID's when that agrees on the namespace; a node ID without a namespace sees the shared resources
//! alone. Proxies of one scope share
//! the encoding of its resources as all proxies share the shared ones.
//!
//! [`AdsServer`] serves one task per stream; with [`AdsServer::authenticated_by`], only to a proxy
//! whose stream carries a bearer token the CA's authenticators accept, checked again whenever the
//! bootstrap tokens change and every [`TOKEN_RECHECK`] (a deleted service account or pod), the
//! stream closing (`UNAUTHENTICATED`) once the token is refused. The task keeps the stream's [`Session`]: per kind,
//! the subscription (wildcard or names), what the proxy holds (`known`: name → version, seeded from
//! `initial_resource_versions`), the responses awaiting an ACK, and the versions the proxy NACKed.
//! When a new set is published (or the subscription changes) the session computes, per kind, the
//! resources whose version differs from what the proxy holds and the names it holds that are gone,
//! and sends them in push order, removals last. A session that holds the generation just before
//! the new one looks only at the names that publication touched (each set lists them), so a
//! thousand streams answering a one-route edit do a thousand small diffs, not a thousand scans.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
use remora_control_api::xds::discovery::{self, DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use remora_control_api::xds::{WILDCARD, version_of};
use remora_control_api::{Kind, Resource};

/// Responses queued per stream before the stream's task waits for the proxy to read.
const STREAM_QUEUE: usize = 16;
/// Responses per kind a proxy may leave unanswered before the oldest is forgotten.
const MAX_PENDING: usize = 64;
/// Clusters and endpoint sets are sent in responses of about this many bytes at most (a single larger
/// resource goes alone). Each stream's encoder keeps a buffer as large as the largest message it sent,
/// so this bounds a connected proxy's cost to the control plane. Listeners and route tables are never
/// split: two of them can conflict (an address, a host), and a proxy must see such changes together.
const CHUNK_BYTES: usize = 32 * 1024;

/// One resource as served: encoded once, shared by every stream.
#[derive(Debug)]
pub struct ServedResource {
    /// The resource's version (a hash of its bytes).
    pub version: String,
    /// The wire form, ready to clone into a response.
    pub wire: discovery::Resource,
}

/// Resources of one kind as served, by name.
type Served = BTreeMap<String, Arc<ServedResource>>;

/// One published resource set: the resources every proxy sees, and per scope (a namespace,
/// `NAMESPACE`, or a pod, `NAMESPACE/POD`) the ones only that scope's proxies see (beside the
/// shared ones, or in place of one of the same name).
#[derive(Debug, Default)]
pub struct ServedSet {
    /// Bumped by every publication that changed something.
    pub generation: u64,
    /// The source's version (a git commit, or a hash of the directory's content).
    pub system_version: String,
    /// When it was published (convergence is measured from here).
    pub published_at: Option<Instant>,
    shared: Layer,
    /// Per scope, its own layer (a scope whose layer went empty in this publication keeps it,
    /// empty, for one generation, so that its proxies learn what it touched).
    scopes: BTreeMap<String, Layer>,
}

/// Resources of every kind, and what the publication that made them touched.
#[derive(Debug, Default)]
struct Layer {
    kinds: [Served; Kind::COUNT],
    /// Per kind, the names added, changed or removed since the previous generation (sorted): a
    /// stream that holds that generation diffs only these instead of every resource.
    touched: [Vec<String>; Kind::COUNT],
}

impl ServedSet {
    /// The resources of `kind` every proxy sees, by name.
    pub fn of(&self, kind: Kind) -> &Served {
        &self.shared.kinds[kind.index()]
    }

    /// The resources of `kind` a proxy of `scopes` (least specific first: its namespace, then its
    /// pod) sees; none, the shared ones alone.
    pub fn view(&self, kind: Kind, scopes: &[String]) -> View<'_> {
        let layer = |i: usize| scopes.get(i).and_then(|scope| self.scopes.get(scope)).map(|l| &l.kinds[kind.index()]);
        View { layers: [Some(&self.shared.kinds[kind.index()]), layer(0), layer(1)] }
    }

    /// The scopes with resources of their own, and how many each has.
    pub fn scopes(&self) -> impl Iterator<Item = (&str, usize)> {
        self.scopes.iter().map(|(scope, layer)| (scope.as_str(), layer.kinds.iter().map(BTreeMap::len).sum()))
    }

    /// The names of `kind` the last publication touched in the view of `scopes`.
    fn touched(&self, kind: Kind, scopes: &[String]) -> BTreeSet<&str> {
        let own = scopes.iter().filter_map(|scope| self.scopes.get(scope));
        let layers = std::iter::once(&self.shared).chain(own);
        layers.flat_map(|layer| layer.touched[kind.index()].iter().map(String::as_str)).collect()
    }
}

/// What one proxy sees of a kind: the shared resources, its namespace's over them, its pod's over
/// those.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// Least specific first.
    layers: [Option<&'a Served>; 3],
}

impl<'a> View<'a> {
    /// The resource named `name`: the most specific layer's.
    pub fn get(&self, name: &str) -> Option<&'a Arc<ServedResource>> {
        self.layers.iter().rev().flatten().find_map(|layer| layer.get(name))
    }

    /// Every resource, by name, each from the most specific layer that has it.
    pub fn iter(&self) -> impl Iterator<Item = (&'a String, &'a Arc<ServedResource>)> + use<'a> {
        let layers = self.layers;
        layers.into_iter().enumerate().flat_map(move |(i, layer)| {
            let above = layers.into_iter().skip(i + 1).flatten();
            layer.into_iter().flatten().filter(move |(name, _)| above.clone().all(|l| !l.contains_key(*name)))
        })
    }
}

/// What a publication changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Resources added or changed.
    pub changed: usize,
    /// Resources removed.
    pub removed: usize,
}

/// Takes resource sets from the sources and makes them the served set.
#[derive(Debug)]
pub struct Publisher {
    tx: watch::Sender<Arc<ServedSet>>,
    metrics: Arc<ControlMetrics>,
}

impl Publisher {
    /// A publisher with nothing published yet.
    pub fn new(metrics: Arc<ControlMetrics>) -> Self {
        let (tx, _) = watch::channel(Arc::new(ServedSet::default()));
        Publisher { tx, metrics }
    }

    /// A view of what is served now, following every publication.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ServedSet>> {
        self.tx.subscribe()
    }

    /// Makes `resources` the served set, for every proxy alike. See [`Publisher::publish_views`].
    pub fn publish(&self, resources: &[Resource], system_version: &str) -> Published {
        self.publish_views(resources, &BTreeMap::new(), system_version)
    }

    /// Makes `resources` the set every proxy sees and `scoped` what only each scope's proxies see
    /// (a namespace, `NAMESPACE`, or a pod, `NAMESPACE/POD`: beside the rest, or in place of a
    /// resource of the same name). Resources whose
    /// bytes did not change keep their shared encoding and version; if nothing changed at all,
    /// nothing is published.
    pub fn publish_views(
        &self,
        resources: &[Resource],
        scoped: &BTreeMap<String, Vec<Resource>>,
        system_version: &str,
    ) -> Published {
        let previous = self.tx.borrow().clone();
        let mut summary = Published::default();
        let shared = Layer::encode(resources, Some(&previous.shared), &mut summary);
        let mut layers = BTreeMap::new();
        let names: BTreeSet<&String> = scoped.keys().chain(previous.scopes.keys()).collect();
        for scope in names {
            let own = scoped.get(scope).map_or(&[][..], Vec::as_slice);
            let layer = Layer::encode(own, previous.scopes.get(scope), &mut summary);
            if layer.kinds.iter().any(|k| !k.is_empty()) || layer.touched.iter().any(|t| !t.is_empty()) {
                layers.insert(scope.clone(), layer);
            }
        }
        for kind in Kind::ALL {
            self.metrics.set_resources(kind, shared.kinds[kind.index()].len());
        }
        if summary == Published::default() {
            return summary;
        }
        let set = ServedSet {
            generation: previous.generation + 1,
            system_version: system_version.to_owned(),
            published_at: Some(Instant::now()),
            shared,
            scopes: layers,
        };
        info!(
            generation = set.generation,
            version = %set.system_version,
            changed = summary.changed,
            removed = summary.removed,
            scopes = set.scopes.len(),
            "publishing"
        );
        self.tx.send_replace(Arc::new(set));
        summary
    }
}

impl Layer {
    /// Encodes `resources`, keeping `previous`'s encoding of each that did not change, and notes
    /// what changed or went.
    fn encode(resources: &[Resource], previous: Option<&Layer>, summary: &mut Published) -> Layer {
        let mut layer = Layer::default();
        let before = |kind: Kind| previous.map(|p| &p.kinds[kind.index()]);
        for resource in resources {
            let kind = resource.kind();
            let any = resource.to_any();
            let version = version_of(&any.value);
            let name = resource.name();
            let served = match before(kind).and_then(|b| b.get(name)) {
                Some(old) if old.version == version => old.clone(),
                _ => {
                    summary.changed += 1;
                    layer.touched[kind.index()].push(name.to_owned());
                    Arc::new(ServedResource {
                        version: version.clone(),
                        wire: discovery::Resource {
                            name: name.to_owned(),
                            aliases: Vec::new(),
                            version,
                            resource: Some(any),
                            ttl: None,
                        },
                    })
                }
            };
            layer.kinds[kind.index()].insert(name.to_owned(), served);
        }
        for kind in Kind::ALL {
            let (now, touched) = (&layer.kinds[kind.index()], &mut layer.touched[kind.index()]);
            let count = touched.len();
            touched.extend(
                before(kind).into_iter().flat_map(|b| b.keys()).filter(|name| !now.contains_key(*name)).cloned(),
            );
            summary.removed += touched.len() - count;
            touched.sort_unstable();
            touched.dedup();
        }
        layer
    }
}

/// The gRPC service: one [`Session`] task per stream.
#[derive(Debug, Clone)]
pub struct AdsServer {
    served: watch::Receiver<Arc<ServedSet>>,
    shared: Arc<Shared>,
    /// When set, a stream must carry a bearer token these accept (the one the proxy's CA requests
    /// carry); otherwise anyone who reaches the port may subscribe.
    authenticators: Option<Arc<Authenticators>>,
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
        }
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
        let peer = request.remote_addr();
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
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let served = self.served.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            shared.metrics.stream_opened();
            let mut session = Session { token_namespace, ..Session::default() };
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
        for response in session.pushes(&current, shared) {
            if tx.send(Ok(response)).await.is_err() {
                return "the proxy went away".into();
            }
        }
    }
}

/// The scopes whose own resources a proxy sees, least specific first: its namespace (the token's
/// if it pins one, else the node ID's), then its pod (`NAMESPACE/POD`, when the node ID, of the
/// injector's form `POD.NAMESPACE`, names that namespace). A namespace is a DNS label, so the node
/// ID's is the part after its last dot.
fn scopes_of(node: &str, token_namespace: Option<&str>) -> Vec<String> {
    let named = node.rsplit_once('.').filter(|(pod, namespace)| {
        !pod.is_empty()
            && !namespace.is_empty()
            && namespace.len() <= 63
            && namespace.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    let Some(namespace) = token_namespace.or(named.map(|(_, namespace)| namespace)) else { return Vec::new() };
    let mut scopes = vec![namespace.to_owned()];
    if let Some((pod, _)) = named.filter(|(_, ns)| *ns == namespace) {
        scopes.push(format!("{namespace}/{pod}"));
    }
    scopes
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
    sent: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct Subscription {
    active: bool,
    wildcard: bool,
    names: HashSet<String>,
    /// What the proxy holds (or will, once it applies what was sent): name → version.
    known: HashMap<String, String>,
    /// The first response to a subscription is sent even when empty, so the proxy can ACK it.
    owes_response: bool,
    pending: BTreeMap<u64, Pending>,
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// One stream's state.
#[derive(Debug, Default)]
struct Session {
    node: String,
    /// The scopes whose own resources it sees (see [`scopes_of`]).
    scopes: Vec<String>,
    /// The namespace the stream's token pins, if it does.
    token_namespace: Option<String>,
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
            self.scopes = scopes_of(node, self.token_namespace.as_deref());
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
                    for (name, version) in pending.sent {
                        self.nacked[kind.index()].insert(name, version);
                    }
                }
                (Some(pending), None) => {
                    shared.metrics.acked(kind, pending.published_at.map(|at| at.elapsed()));
                    for (name, _) in &pending.sent {
                        self.nacked[kind.index()].remove(name);
                    }
                }
            }
        }
        if !sub.active {
            sub.active = true;
            sub.owes_response = true;
            sub.wildcard = request.resource_names_subscribe.is_empty();
            sub.known = request.initial_resource_versions;
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

    /// The responses that bring the proxy up to `current`, in push order, removals last.
    fn pushes(&mut self, current: &ServedSet, shared: &Shared) -> Vec<DeltaDiscoveryResponse> {
        if self.synced == Some(current.generation) {
            return Vec::new();
        }
        // Holding the generation just before this one, the proxy needs only what it touched.
        let incremental = self.synced.is_some_and(|held| held + 1 == current.generation);
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
            let due = |name: &str, resource: &ServedResource| {
                sub.wants(name)
                    && sub.known.get(name) != Some(&resource.version)
                    && nacked.get(name) != Some(&resource.version)
            };
            let (resources, removed): (Vec<_>, Vec<String>) = if incremental {
                let touched = current.touched(kind, &self.scopes);
                let resources = touched
                    .iter()
                    .filter_map(|name| served.get(name).filter(|r| due(name, r)))
                    .map(|resource| resource.wire.clone())
                    .collect();
                let removed = touched
                    .iter()
                    .filter(|n| served.get(n).is_none() && sub.known.contains_key(**n))
                    .map(|n| (*n).to_owned())
                    .collect();
                (resources, removed)
            } else {
                let resources =
                    served.iter().filter(|(name, r)| due(name, r)).map(|(_, resource)| resource.wire.clone()).collect();
                let removed =
                    sub.known.keys().filter(|name| served.get(name).is_none() || !sub.wants(name)).cloned().collect();
                (resources, removed)
            };
            if resources.is_empty() {
                if removed.is_empty() && sub.owes_response {
                    responses.push((kind, resources, Vec::new()));
                }
            } else if matches!(kind, Kind::Cluster | Kind::Endpoints) {
                let mut chunk = Vec::new();
                let mut size = 0;
                for resource in resources {
                    let len = resource.encoded_len();
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
        responses
            .into_iter()
            .map(|(kind, resources, removed)| self.response(kind, resources, removed, current, shared))
            .collect()
    }

    fn response(
        &mut self,
        kind: Kind,
        resources: Vec<discovery::Resource>,
        removed: Vec<String>,
        current: &ServedSet,
        shared: &Shared,
    ) -> DeltaDiscoveryResponse {
        self.nonce += 1;
        let sub = &mut self.kinds[kind.index()];
        let mut sent = Vec::with_capacity(resources.len());
        for resource in &resources {
            sub.known.insert(resource.name.clone(), resource.version.clone());
            sent.push((resource.name.clone(), resource.version.clone()));
        }
        for name in &removed {
            sub.known.remove(name);
        }
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

    fn session_of(shared: &Shared, node: &str, token_namespace: Option<&str>) -> Session {
        let mut session = Session { token_namespace: token_namespace.map(str::to_owned), ..Session::default() };
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
        // A change to the source sends the new version.
        publisher.publish(&resources(&SET.replace("name: b}", "name: b, connect_timeout: 1s}")), "v2");
        let pushes = again.pushes(&publisher.subscribe().borrow(), &shared);
        assert_eq!(pushes[0].resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn many_endpoint_sets_are_sent_in_bounded_responses_and_route_tables_whole() {
        let (publisher, shared) = setup();
        let mut yaml = String::from("resources:\n");
        for c in 0..60 {
            yaml.push_str(&format!("  - {{kind: Endpoints, cluster: c{c}, endpoints: ["));
            for e in 0..40 {
                yaml.push_str(&format!("{{address: \"10.0.{c}.{e}:8080\"}}, "));
            }
            yaml.push_str("]}\n");
            yaml.push_str(&format!("  - {{kind: RouteTable, name: t{c}, destinations: [host{c}], routes: [{{backends: [{{cluster: c{c}}}]}}]}}\n"));
        }
        publisher.publish(&resources(&yaml), "v1");
        let mut session = Session::default();
        subscribe(&mut session, &shared, Kind::Endpoints, HashMap::new());
        subscribe(&mut session, &shared, Kind::RouteTable, HashMap::new());
        let pushes = session.pushes(&publisher.subscribe().borrow(), &shared);
        let endpoints: Vec<&DeltaDiscoveryResponse> =
            pushes.iter().filter(|r| r.type_url == Kind::Endpoints.type_url()).collect();
        assert!(endpoints.len() > 1, "{} endpoint responses", endpoints.len());
        assert!(endpoints.iter().all(|r| r.encoded_len() <= CHUNK_BYTES + 2048));
        assert_eq!(endpoints.iter().map(|r| r.resources.len()).sum::<usize>(), 60);
        let tables: Vec<&DeltaDiscoveryResponse> =
            pushes.iter().filter(|r| r.type_url == Kind::RouteTable.type_url()).collect();
        assert_eq!(tables.len(), 1);
        assert_eq!(tables[0].resources.len(), 60);
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
