//! A control plane written to hurt the proxy: a Delta ADS server (Envoy's discovery service,
//! implemented here) that answers the proxy's stream with whatever the test hands it: resources
//! whose bytes are not protobuf, the wrong type inside the right envelope, types the proxy does not
//! serve, a name outside that differs from the name inside, one name twice in a response, a name
//! both added and removed, invalid fields, and a message larger than the proxy reads.
//!
//! Each is NACKed (or, for the message too large, the stream dropped and opened again), never a
//! crash, and the configuration that was serving keeps serving: a client sends requests through
//! the proxy between every step and each is answered by the endpoint the last good update chose.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remora_control_api::testing::{Cluster, Config};
use remora_control_api::xds::discovery::{self, DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use remora_control_api::{Kind, Resource};
use remora_control_plane::servers::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use remora_proxy::testing::{Client, HttpServer, TestProxy};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{listener, route_all};

type Responses = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// The server: every stream's responses come from the test, and every request the proxy sends is
/// handed to the test with the number of the stream it came on.
#[derive(Clone)]
struct Hostile {
    streams: Arc<Mutex<Vec<Responses>>>,
    requests: mpsc::UnboundedSender<(usize, DeltaDiscoveryRequest)>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Hostile {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (sender, receiver) = mpsc::channel(16);
        let number = {
            let mut streams = self.streams.lock().unwrap();
            streams.push(sender);
            streams.len() - 1
        };
        let (mut incoming, requests) = (request.into_inner(), self.requests.clone());
        tokio::spawn(async move {
            while let Ok(Some(request)) = incoming.message().await {
                let _ = requests.send((number, request));
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// The test's end of the server.
struct Plane {
    url: String,
    streams: Arc<Mutex<Vec<Responses>>>,
    requests: mpsc::UnboundedReceiver<(usize, DeltaDiscoveryRequest)>,
    /// A request taken from the queue while waiting for another, to be read first.
    held: Option<(usize, DeltaDiscoveryRequest)>,
    nonce: u64,
}

/// What the proxy said to one response.
#[derive(Debug)]
enum Answer {
    Ack,
    Nack(String),
}

impl Plane {
    async fn start() -> Plane {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", socket.local_addr().unwrap());
        let streams = Arc::new(Mutex::new(Vec::new()));
        let (sender, requests) = mpsc::unbounded_channel();
        let service = Hostile { streams: streams.clone(), requests: sender };
        let incoming = futures_util::stream::unfold(socket, |socket| async move {
            let accepted = socket.accept().await.map(|(stream, _)| stream);
            Some((accepted, socket))
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(service).max_encoding_message_size(64 << 20))
                .serve_with_incoming(incoming),
        );
        Plane { url, streams, requests, held: None, nonce: 0 }
    }

    /// Waits for a stream to open with every kind subscribed, returning its number.
    async fn stream_opened(&mut self) -> usize {
        let mut subscribed = 0;
        loop {
            let (stream, request) = self.next_request().await;
            if request.response_nonce.is_empty() {
                subscribed += 1;
            }
            if subscribed == Kind::COUNT {
                return stream;
            }
        }
    }

    async fn next_request(&mut self) -> (usize, DeltaDiscoveryRequest) {
        if let Some(held) = self.held.take() {
            return held;
        }
        tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .expect("the proxy said nothing for 10 s")
            .expect("the server stopped")
    }

    /// Sends `response` (its nonce filled in) on the latest stream and waits for the proxy's answer
    /// to it; `None` if the stream ended instead.
    async fn send(&mut self, mut response: DeltaDiscoveryResponse) -> Option<Answer> {
        self.nonce += 1;
        response.nonce = self.nonce.to_string();
        let (stream, sender) = {
            let streams = self.streams.lock().unwrap();
            (streams.len() - 1, streams.last().unwrap().clone())
        };
        sender.send(Ok(response)).await.ok()?;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(15), self.requests.recv()).await;
            let Ok(Some((on, request))) = next else { return None };
            if on != stream {
                // A new stream: the proxy dropped the old one without answering.
                self.held = Some((on, request));
                return None;
            }
            if request.response_nonce == self.nonce.to_string() {
                return Some(match request.error_detail {
                    Some(status) => Answer::Nack(status.message),
                    None => Answer::Ack,
                });
            }
        }
    }
}

/// A response of `kind` carrying `resources` as (name, Any).
fn response(kind: Kind, resources: Vec<(&str, pbjson_types::Any)>, removed: &[&str]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: "hostile".into(),
        type_url: kind.type_url().into(),
        resources: resources
            .into_iter()
            .map(|(name, any)| discovery::Resource {
                name: name.into(),
                // A resource's version names its content.
                version: format!(
                    "{:x}",
                    std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(&any.value)
                ),
                resource: Some(any),
                ..Default::default()
            })
            .collect(),
        removed_resources: removed.iter().map(|name| (*name).into()).collect(),
        nonce: String::new(),
    }
}

/// The `Cluster` and `Endpoints` resources of a cluster `app` whose endpoint is `server`.
fn app(server: &HttpServer) -> (Resource, Resource) {
    let config = Config::new().with(Cluster::new("app").endpoints(&[server.address()]));
    let resources = config.resources();
    (resources[0].clone(), resources[1].clone())
}

fn named(resource: &Resource) -> (&str, pbjson_types::Any) {
    (resource.name(), resource.to_any())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_control_plane_is_nacked_and_the_last_good_config_serves() {
    let (a, b) = (HttpServer::start("a").await, HttpServer::start("b").await);
    let mut plane = Plane::start().await;
    let yaml =
        format!("resources:\n{}{}", listener("in", ", protocol: http1, route_tables: [web]"), route_all("web", "app"));
    let proxy = TestProxy::start_controlled(&yaml, &plane.url, "victim");
    plane.stream_opened().await;

    // The good update: every kind answered, `app` at endpoint a.
    let (cluster, endpoints) = app(&a);
    for kind in Kind::ALL {
        let resources = match kind {
            Kind::Cluster => vec![named(&cluster)],
            Kind::Endpoints => vec![named(&endpoints)],
            _ => Vec::new(),
        };
        assert!(matches!(plane.send(response(kind, resources, &[])).await, Some(Answer::Ack)), "{kind:?}");
    }
    let mut client = Client::http1(proxy.address("in")).await;
    assert_eq!(client.get("x", "/").await.header("x-served-by"), "a");

    let garbage = pbjson_types::Any { type_url: Kind::Cluster.type_url().into(), value: vec![0xff; 64].into() };
    let (mut invalid, endpoints_b) = app(&b);
    if let Resource::Cluster(c) = &mut invalid {
        c.connect_timeout = Some(pbjson_types::Duration { seconds: -5, nanos: 0 });
    }
    let cases: Vec<(&str, DeltaDiscoveryResponse, &str)> = vec![
        ("bytes that are not protobuf", response(Kind::Cluster, vec![("app", garbage)], &[]), "cluster \"app\""),
        (
            "an endpoint set in a cluster response",
            response(Kind::Cluster, vec![("app", endpoints_b.to_any())], &[]),
            "in a",
        ),
        (
            "a type the proxy does not serve",
            DeltaDiscoveryResponse {
                type_url: "type.googleapis.com/evil.Thing".into(),
                ..response(Kind::Cluster, vec![], &[])
            },
            "not one this proxy serves",
        ),
        (
            "a name outside that differs from the name inside",
            response(Kind::Endpoints, vec![("other", endpoints_b.to_any())], &[]),
            "named",
        ),
        (
            "one name twice",
            response(Kind::Endpoints, vec![named(&endpoints_b), named(&endpoints)], &[]),
            "appears twice",
        ),
        (
            "added and removed at once",
            response(Kind::Endpoints, vec![named(&endpoints_b)], &["app"]),
            "both sent and removed",
        ),
        ("an invalid field", response(Kind::Cluster, vec![named(&invalid)], &[]), "connect_timeout"),
    ];
    for (case, bad, expected) in cases {
        match plane.send(bad).await {
            Some(Answer::Nack(reason)) => assert!(reason.contains(expected), "{case}: NACKed for {reason:?}"),
            other => panic!("{case}: {other:?}"),
        }
        assert_eq!(client.get("x", "/").await.header("x-served-by"), "a", "{case}: the old config serves");
    }

    // A message past the proxy's limit: it is not read, the stream is dropped and opened again,
    // and the proxy serves on meanwhile.
    let huge = (0..80).map(|i| {
        let mut copy = endpoints_b.clone();
        if let Resource::Endpoints(e) = &mut copy {
            e.cluster = format!("big-{i}");
            e.endpoints = (0..20_000).map(|_| e.endpoints[0].clone()).collect();
        }
        copy
    });
    let huge: Vec<Resource> = huge.collect();
    let too_big = response(Kind::Endpoints, huge.iter().map(named).collect(), &[]);
    assert!(prost::Message::encoded_len(&too_big) > remora_control_api::limits::MAX_XDS_MESSAGE);
    assert!(plane.send(too_big).await.is_none(), "a message past the limit was read");
    plane.stream_opened().await;
    assert_eq!(client.get("x", "/").await.header("x-served-by"), "a", "the old config serves on");

    // The next good update is taken.
    assert!(matches!(plane.send(response(Kind::Endpoints, vec![named(&endpoints_b)], &[])).await, Some(Answer::Ack)));
    assert_eq!(client.get("x", "/").await.header("x-served-by"), "b");
    assert!(proxy.metric("remora_xds_updates_total{type=\"Endpoints\",result=\"nack\"}").await >= 3.0);
}
