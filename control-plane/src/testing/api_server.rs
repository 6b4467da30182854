//! A stand-in for the parts of the Kubernetes API server the control plane uses (no kube-apiserver
//! can run here), speaking its protocol as the real one does, over HTTPS with a certificate from a
//! [`TestCa`]:
//!
//! - **list/watch** of Services, EndpointSlices, Pods and Namespaces, cluster-wide: every change
//!   takes the next resource version (one counter, as etcd's); a list answers in pages (`limit`,
//!   `continue`) with the version it reflects; a watch (`watch=true`) from a version streams every
//!   later event, one JSON object per line, then the live ones; `BOOKMARK` events when asked for
//!   (`allowWatchBookmarks`) and [`TestApiServer::bookmark`] is called; [`TestApiServer::compact`]
//!   forgets history, so a watch from an older version gets `410 Gone` (an `ERROR` event) and must
//!   list again; [`TestApiServer::end_watches`] ends every open watch, as the server does when a
//!   watch's time is up; [`TestApiServer::delete_unseen`] makes a deletion only a new list shows;
//! - **TokenReview**: a token the test named ([`TestApiServer::set_user`]) is that user's;
//! - **MutatingWebhookConfiguration** `GET` and JSON `PATCH` (`test` and `add`).
//!
//! Only the control plane's own token is let in (401 otherwise; [`TestApiServer::accept_only`]
//! revokes it); every request is recorded
//! ([`TestApiServer::seen`]); [`TestApiServer::fail_next`] makes the next requests to a path
//! answer 503, as an overloaded server does.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::TestCa;
use crate::kubernetes::KubernetesApi;

/// The control plane's own bearer token, the only one let in.
pub const CONTROL_PLANE_TOKEN: &str = "control-plane-sa-token";
const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const WEBHOOKS: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/";

type Body = BoxBody<Bytes, std::convert::Infallible>;

/// The stand-in API server. Dropping it stops it.
pub struct TestApiServer {
    address: SocketAddr,
    state: Arc<Mutex<State>>,
    root: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct State {
    /// The token it lets in.
    token: String,
    version: u64,
    collections: BTreeMap<&'static str, Collection>,
    seen: Vec<Value>,
    /// Tokens: whose each is, and the one audience it was issued for (`None`: any asked for).
    users: HashMap<String, (String, Option<String>)>,
    webhooks: BTreeMap<String, Value>,
    failing: Vec<(String, usize)>,
}

/// One kind's objects, its history since the last compaction and its open watches.
#[derive(Default)]
struct Collection {
    objects: BTreeMap<String, Value>,
    events: Vec<(u64, Value)>,
    /// Watches from a version before this one get 410 Gone.
    compacted: u64,
    watches: Vec<Watch>,
}

struct Watch {
    lines: mpsc::UnboundedSender<Bytes>,
    bookmarks: bool,
}

/// The kinds served: collection path, `apiVersion`, kind, list kind.
const KINDS: [(&str, &str, &str, &str); 7] = [
    ("/api/v1/services", "v1", "Service", "ServiceList"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice", "EndpointSliceList"),
    ("/api/v1/pods", "v1", "Pod", "PodList"),
    ("/api/v1/namespaces", "v1", "Namespace", "NamespaceList"),
    ("/apis/gateway.networking.k8s.io/v1/httproutes", "gateway.networking.k8s.io/v1", "HTTPRoute", "HTTPRouteList"),
    ("/apis/gateway.networking.k8s.io/v1/grpcroutes", "gateway.networking.k8s.io/v1", "GRPCRoute", "GRPCRouteList"),
    (
        "/apis/gateway.networking.k8s.io/v1beta1/referencegrants",
        "gateway.networking.k8s.io/v1beta1",
        "ReferenceGrant",
        "ReferenceGrantList",
    ),
];

/// The row of [`KINDS`] for an object's kind.
fn kind_of(api_version: &str, kind: &str) -> Option<(&'static str, &'static str, &'static str, &'static str)> {
    KINDS.into_iter().find(|(_, v, k, _)| *v == api_version && *k == kind)
}

/// The row of [`KINDS`] for a collection path.
fn kind_at(path: &str) -> Option<(&'static str, &'static str, &'static str, &'static str)> {
    KINDS.into_iter().find(|(p, ..)| *p == path)
}

/// `namespace/name` (or `name` for a cluster-scoped object).
fn key(object: &Value) -> String {
    let metadata = &object["metadata"];
    let name = metadata["name"].as_str().unwrap_or_default();
    match metadata["namespace"].as_str() {
        Some(namespace) => format!("{namespace}/{name}"),
        None => name.to_owned(),
    }
}

fn line(event: &Value) -> Bytes {
    Bytes::from(format!("{event}\n"))
}

fn whole(value: &Value) -> Body {
    http_body_util::Full::new(Bytes::from(value.to_string())).boxed()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message})
}

impl TestApiServer {
    /// Serves on `127.0.0.1:0` with a certificate from `ca` for `127.0.0.1`.
    pub async fn start(ca: &TestCa) -> TestApiServer {
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(&["127.0.0.1"]));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State { token: CONTROL_PLANE_TOKEN.to_owned(), ..State::default() }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, state) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TestApiServer { address, state, root: ca.serving(&["127.0.0.1"]).ca, task }
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Writes its root and the control plane's token into `directory`; how the control plane
    /// reaches it, and the token's file.
    pub fn api(&self, directory: &Path) -> (KubernetesApi, PathBuf) {
        let (ca_file, token_file) = (directory.join("kubernetes-ca.crt"), directory.join("control-plane.token"));
        std::fs::create_dir_all(directory).unwrap();
        std::fs::write(&ca_file, &self.root).unwrap();
        std::fs::write(&token_file, CONTROL_PLANE_TOKEN).unwrap();
        let api = KubernetesApi::Explicit {
            url: format!("https://{}", self.address),
            ca_file,
            token_file: token_file.clone(),
        };
        (api, token_file)
    }

    /// The same as `remora control` arguments (`--kubernetes-api`, `--kubernetes-ca`,
    /// `--kubernetes-token`), and the token's file.
    pub fn args(&self, directory: &Path) -> (Vec<String>, PathBuf) {
        let (api, token_file) = self.api(directory);
        let KubernetesApi::Explicit { url, ca_file, .. } = api else { unreachable!() };
        let args = vec![
            "--kubernetes-api".to_owned(),
            url,
            "--kubernetes-ca".to_owned(),
            ca_file.display().to_string(),
            "--kubernetes-token".to_owned(),
            token_file.display().to_string(),
        ];
        (args, token_file)
    }

    /// Creates or replaces `object` (a Service, EndpointSlice, Pod or Namespace, with its
    /// `apiVersion` and `kind`), as a new version, and tells the watches.
    pub fn put(&self, mut object: Value) {
        let (path, ..) = kind_of(object["apiVersion"].as_str().unwrap(), object["kind"].as_str().unwrap())
            .unwrap_or_else(|| panic!("the stand-in does not serve {object}"));
        let mut state = self.state.lock().unwrap();
        state.version += 1;
        let version = state.version;
        object["metadata"]["resourceVersion"] = version.to_string().into();
        let collection = state.collections.entry(path).or_default();
        let kind = if collection.objects.insert(key(&object), object.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        collection.publish(version, json!({"type": kind, "object": object}));
    }

    /// The object of `api_version` and `kind` named `key` (`namespace/name`) as stored now.
    pub fn get(&self, api_version: &str, kind: &str, key: &str) -> Option<Value> {
        let (path, ..) = kind_of(api_version, kind)?;
        self.state.lock().unwrap().collections.get(path)?.objects.get(key).cloned()
    }

    /// Deletes the object of `api_version` and `kind` named `key` (`namespace/name`).
    pub fn delete(&self, api_version: &str, kind: &str, key: &str) {
        self.state.lock().unwrap().delete(api_version, kind, key);
    }

    /// Forgets every event so far: a watch from an earlier version is answered 410 Gone.
    pub fn compact(&self) {
        self.state.lock().unwrap().compact();
    }

    /// Ends every open watch (clients watch again from the last version they saw).
    pub fn end_watches(&self) {
        self.state.lock().unwrap().end_watches();
    }

    /// Ends every watch, deletes the object and forgets the history, all at once: a client learns
    /// of the deletion only by listing again, since its watch from before is answered 410 Gone.
    pub fn delete_unseen(&self, api_version: &str, kind: &str, key: &str) {
        let mut state = self.state.lock().unwrap();
        state.end_watches();
        state.delete(api_version, kind, key);
        state.compact();
    }

    /// The current resource version (the last change's).
    pub fn version(&self) -> u64 {
        self.state.lock().unwrap().version
    }

    /// Sends a `BOOKMARK` with the current version to every watch that asked for them.
    pub fn bookmark(&self) {
        let mut state = self.state.lock().unwrap();
        let version = state.version.to_string();
        for (path, collection) in &mut state.collections {
            let Some((_, api_version, kind, _)) = kind_at(path) else { continue };
            let event = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                "metadata": {"resourceVersion": version}}});
            collection.watches.retain(|w| !w.bookmarks || w.lines.send(line(&event)).is_ok());
        }
    }

    /// From now on only `token` is let in: the control plane's own credential is refused, as when
    /// its service account's token was revoked.
    pub fn accept_only(&self, token: &str) {
        self.state.lock().unwrap().token = token.to_owned();
    }

    /// A TokenReview of `token` says it is `username`'s, for whichever audience it asks about.
    pub fn set_user(&self, token: &str, username: &str) {
        self.state.lock().unwrap().users.insert(token.to_owned(), (username.to_owned(), None));
    }

    /// A TokenReview of `token` says it is no one's from now on, as when it was revoked.
    pub fn revoke(&self, token: &str) {
        self.state.lock().unwrap().users.remove(token);
    }

    /// A TokenReview of `token` says it is `username`'s if it asks about `audience` (the one the
    /// token was issued for), and refuses it otherwise, as the API server does.
    pub fn set_user_for(&self, token: &str, username: &str, audience: &str) {
        let user = (username.to_owned(), Some(audience.to_owned()));
        self.state.lock().unwrap().users.insert(token.to_owned(), user);
    }

    /// Stores the MutatingWebhookConfiguration `configuration` (by its name).
    pub fn put_webhook(&self, configuration: Value) {
        let name = configuration["metadata"]["name"].as_str().unwrap().to_owned();
        self.state.lock().unwrap().webhooks.insert(name, configuration);
    }

    /// The MutatingWebhookConfiguration `name`.
    pub fn webhook(&self, name: &str) -> Value {
        self.state.lock().unwrap().webhooks.get(name).cloned().unwrap_or(Value::Null)
    }

    /// The next `n` requests to paths starting with `prefix` are answered 503.
    pub fn fail_next(&self, prefix: &str, n: usize) {
        self.state.lock().unwrap().failing.push((prefix.to_owned(), n));
    }

    /// Every request so far: `method`, `path`, `query`, `authorized`, `content_type`, `body`.
    pub fn seen(&self) -> Vec<Value> {
        self.state.lock().unwrap().seen.clone()
    }
}

impl Collection {
    fn publish(&mut self, version: u64, event: Value) {
        let bytes = line(&event);
        self.events.push((version, event));
        self.watches.retain(|w| w.lines.send(bytes.clone()).is_ok());
    }
}

/// The query's `name`, unescaped enough for the values kube sends.
fn param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

async fn answer(state: &Mutex<State>, request: http::Request<hyper::body::Incoming>) -> http::Response<Body> {
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let bearer = header("authorization");
    let content_type = header("content-type");
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let query = request.uri().query().unwrap_or_default().to_owned();
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut state = state.lock().unwrap();
    let authorized = bearer == Some(format!("Bearer {}", state.token));
    state.seen.push(json!({"method": method.as_str(), "path": path, "query": query, "authorized": authorized,
        "content_type": content_type, "body": body}));
    let failing = state.failing.iter_mut().find(|(prefix, left)| *left > 0 && path.starts_with(prefix.as_str()));
    let (code, answer) = if !authorized {
        (401, whole(&status(401, "Unauthorized", "Unauthorized")))
    } else if let Some((_, left)) = failing {
        *left -= 1;
        (503, whole(&status(503, "ServiceUnavailable", "the server is overloaded")))
    } else if method == http::Method::PATCH
        && let Some((collection, key)) = status_path(&path)
    {
        state.patch_status(collection, &key, &body)
    } else if let Some((collection, ..)) = kind_at(&path) {
        if param(&query, "watch") == Some("true") {
            (200, state.watch(collection, &query))
        } else {
            (200, whole(&state.list(collection, &query)))
        }
    } else if method == http::Method::POST && path == REVIEWS {
        (201, whole(&state.review(&body)))
    } else if let Some(name) = path.strip_prefix(WEBHOOKS) {
        state.webhook_request(&method, name, &body)
    } else {
        (404, whole(&status(404, "NotFound", "not found")))
    };
    let mut response = http::Response::new(answer);
    *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

impl State {
    fn delete(&mut self, api_version: &str, kind: &str, key: &str) {
        let (path, ..) = kind_of(api_version, kind).unwrap();
        self.version += 1;
        let version = self.version;
        let collection = self.collections.entry(path).or_default();
        let mut object = collection.objects.remove(key).unwrap_or_else(|| panic!("no {kind} {key}"));
        object["metadata"]["resourceVersion"] = version.to_string().into();
        collection.publish(version, json!({"type": "DELETED", "object": object}));
    }

    fn compact(&mut self) {
        let version = self.version;
        for collection in self.collections.values_mut() {
            collection.events.clear();
            collection.compacted = version;
        }
    }

    fn end_watches(&mut self) {
        for collection in self.collections.values_mut() {
            collection.watches.clear();
        }
    }

    fn list(&mut self, path: &'static str, query: &str) -> Value {
        let version = self.version.to_string();
        let collection = self.collections.entry(path).or_default();
        let limit = param(query, "limit").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
        let from = param(query, "continue").and_then(|c| c.strip_prefix("page-")?.parse().ok()).unwrap_or(0);
        let items: Vec<&Value> = collection.objects.values().skip(from).take(limit).collect();
        let mut metadata = json!({"resourceVersion": version});
        if from + items.len() < collection.objects.len() {
            metadata["continue"] = format!("page-{}", from + items.len()).into();
        }
        let (_, api_version, _, list_kind) = kind_at(path).unwrap_or(KINDS[0]);
        json!({"apiVersion": api_version, "kind": list_kind, "metadata": metadata, "items": items})
    }

    fn watch(&mut self, path: &'static str, query: &str) -> Body {
        let from: u64 = param(query, "resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let bookmarks = param(query, "allowWatchBookmarks") == Some("true");
        let collection = self.collections.entry(path).or_default();
        let (lines, receiver) = mpsc::unbounded_channel();
        if from < collection.compacted {
            let gone = status(410, "Expired", &format!("too old resource version: {from} ({})", collection.compacted));
            let _ = lines.send(line(&json!({"type": "ERROR", "object": gone})));
            drop(lines);
        } else {
            for (_, event) in collection.events.iter().filter(|(version, _)| *version > from) {
                let _ = lines.send(line(event));
            }
            collection.watches.push(Watch { lines, bookmarks });
        }
        let frames = futures_util::stream::unfold(receiver, |mut receiver| async move {
            let line = receiver.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(line)), receiver))
        });
        http_body_util::StreamBody::new(frames).boxed()
    }

    fn review(&self, body: &Value) -> Value {
        let user = body["spec"]["token"].as_str().and_then(|token| self.users.get(token));
        let asked = &body["spec"]["audiences"];
        let status = match user {
            Some((_, Some(audience))) if !asked.as_array().is_some_and(|a| a.iter().any(|a| a == audience)) => {
                json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
            }
            Some((user, _)) => json!({"authenticated": true, "audiences": asked,
                                      "user": {"username": user, "groups": ["system:serviceaccounts"]}}),
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})
    }

    fn webhook_request(&mut self, method: &http::Method, name: &str, body: &Value) -> (u16, Body) {
        let Some(current) = self.webhooks.get(name).cloned() else {
            return (404, whole(&status(404, "NotFound", "no such configuration")));
        };
        match method.as_str() {
            "GET" => (200, whole(&current)),
            "PATCH" => match json_patch(current, body) {
                Some(patched) => {
                    self.webhooks.insert(name.to_owned(), patched.clone());
                    (200, whole(&patched))
                }
                None => (422, whole(&status(422, "Invalid", "the patch does not apply"))),
            },
            _ => (405, whole(&status(405, "MethodNotAllowed", "method not allowed"))),
        }
    }
}

/// `target` with the JSON patch `ops` applied (`test` and `add` of an object member, as the control
/// plane sends them); `None` when a test fails or an operation does not apply.
fn json_patch(mut target: Value, ops: &Value) -> Option<Value> {
    for op in ops.as_array().into_iter().flatten() {
        let path = op["path"].as_str().unwrap_or_default();
        match op["op"].as_str() {
            Some("test") if target.pointer(path) == Some(&op["value"]) => {}
            Some("add") => {
                let (parent, key) = path.rsplit_once('/')?;
                let parent = if parent.is_empty() { Some(&mut target) } else { target.pointer_mut(parent) };
                parent.and_then(Value::as_object_mut)?.insert(key.to_owned(), op["value"].clone());
            }
            _ => return None,
        }
    }
    Some(target)
}

/// The collection and `namespace/name` key of a namespaced object's `status` path
/// (`/apis/GROUP/VERSION/namespaces/NS/PLURAL/NAME/status`), for the kinds served.
fn status_path(path: &str) -> Option<(&'static str, String)> {
    let rest = path.strip_suffix("/status")?;
    let (prefix, name) = rest.rsplit_once('/')?;
    let (prefix, plural) = prefix.rsplit_once('/')?;
    let (api, namespace) = prefix.rsplit_once("/namespaces/")?;
    let (collection, ..) = kind_at(&format!("{api}/{plural}"))?;
    Some((collection, format!("{namespace}/{name}")))
}

impl State {
    /// Applies a JSON patch to the status of the object `key` of `collection`: a new version,
    /// told to the watches; 404 for no such object, 409 for a failed test (a stale version).
    fn patch_status(&mut self, collection: &'static str, key: &str, ops: &Value) -> (u16, Body) {
        self.version += 1;
        let version = self.version;
        let objects = &mut self.collections.entry(collection).or_default().objects;
        let Some(current) = objects.get(key).cloned() else {
            return (404, whole(&status(404, "NotFound", "not found")));
        };
        let Some(mut patched) = json_patch(current.clone(), ops) else {
            return (409, whole(&status(409, "Conflict", "the object has been modified")));
        };
        // Only the status changes through this path.
        patched["spec"] = current["spec"].clone();
        patched["metadata"] = current["metadata"].clone();
        patched["metadata"]["resourceVersion"] = version.to_string().into();
        let collection = self.collections.entry(collection).or_default();
        collection.objects.insert(key.to_owned(), patched.clone());
        collection.publish(version, json!({"type": "MODIFIED", "object": patched}));
        (200, whole(&patched))
    }
}
