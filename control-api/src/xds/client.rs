//! The proxy's half of Delta ADS: keep a stream to the control plane open, apply what arrives, answer.
//!
//! [`run`] connects, subscribes to every kind the [`Handler`] asks for (wildcard, with the versions it
//! holds as `initial_resource_versions`), and then for each response decodes the resources and calls
//! [`Handler::apply`]. `Ok` becomes an ACK; `Err(reason)` a NACK whose `error_detail` carries the
//! reason, and the handler is expected to have changed nothing. When the stream breaks, the handler
//! keeps what it has and [`run`] reconnects after a jittered exponential backoff (10 ms doubling to
//! 15 s; reset once a stream has delivered a response).

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use super::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use super::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use super::{Node, RpcStatus};
use crate::{Kind, Resource};

/// The first reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// gRPC status code INVALID_ARGUMENT, sent in a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// One response, decoded.
#[derive(Debug)]
pub struct Update {
    /// The kind of every resource in it.
    pub kind: Kind,
    /// The control plane's source version (a git commit, for a GitOps directory).
    pub system_version: String,
    /// Added or changed resources: (version, resource).
    pub resources: Vec<(String, Resource)>,
    /// Names of resources to drop.
    pub removed: Vec<String>,
}

/// What the stream's owner does with updates.
pub trait Handler: Send + 'static {
    /// The versions held now of `kind`'s resources (sent on reconnect so only differences come).
    fn versions(&self, kind: Kind) -> HashMap<String, String>;
    /// Applies an update whole, or rejects it (changing nothing) with a reason naming the resource
    /// and field.
    fn apply(&mut self, update: Update) -> Result<(), String>;
    /// The stream's state changed: `true` once a stream is open, `false` when it breaks.
    fn connected(&mut self, connected: bool);
    /// A response was answered: `nack` holds the reason when it was rejected.
    fn answered(&mut self, _kind: Kind, _system_version: &str, _nack: Option<&str>) {}
}

/// Where to connect and who we are.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The control plane's URL, e.g. `http://127.0.0.1:15010`.
    pub address: String,
    /// This proxy's node id.
    pub node_id: String,
    /// The kinds to subscribe to, in push order.
    pub kinds: Vec<Kind>,
    /// The roots an `https://` control plane's certificate must chain to.
    pub tls: Option<crate::grpc::ControlTls>,
    /// The file of the bearer token the stream carries (the one the proxy asks the CA with), read
    /// at every connect since projected tokens rotate; none sends no credential.
    pub token_file: Option<std::path::PathBuf>,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The address is not a URL tonic can connect to, or is https:// with no roots to check it.
    #[error("control plane address: {0}")]
    Address(String),
    /// Connecting failed.
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The server answered with a gRPC error, or the stream broke.
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    /// The server closed the stream.
    #[error("the control plane closed the stream")]
    Closed,
}

/// Keeps a stream open for ever, reconnecting with backoff. Returns only if the address is invalid.
pub async fn run<H: Handler>(config: ClientConfig, handler: &mut H) -> StreamError {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut delivered = false;
        let error = stream_once(&config, handler, &mut delivered).await;
        handler.connected(false);
        if let StreamError::Address(_) = error {
            return error;
        }
        if delivered {
            backoff = BACKOFF_MIN;
        }
        // Full jitter: anywhere up to the current bound, so a fleet restarting together spreads out.
        let delay = backoff.mul_f64(fastrand::f64()).max(BACKOFF_MIN);
        warn!(%error, retry_in = ?delay, "control plane stream down; serving the last good config");
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Connects to `address` as a gRPC channel with keep-alives that notice a dead peer (TLS checked
/// with `tls` for an `https://` address).
pub async fn connect(
    address: &str,
    tls: Option<&crate::grpc::ControlTls>,
) -> Result<tonic::transport::Channel, StreamError> {
    crate::grpc::connect(address, tls).await.map_err(|error| match error {
        crate::grpc::DialError::Transport(error) => StreamError::Connect(error),
        other => StreamError::Address(other.to_string()),
    })
}

async fn stream_once<H: Handler>(config: &ClientConfig, handler: &mut H, delivered: &mut bool) -> StreamError {
    let channel = match connect(&config.address, config.tls.as_ref()).await {
        Ok(channel) => channel,
        Err(error) => return error,
    };
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    for (i, kind) in config.kinds.iter().enumerate() {
        let node = (i == 0).then(|| Node {
            id: config.node_id.clone(),
            user_agent_name: "remora".into(),
            user_agent_version_type: Some(
                super::super::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                    env!("CARGO_PKG_VERSION").into(),
                ),
            ),
            ..Default::default()
        });
        let request = DeltaDiscoveryRequest {
            node,
            type_url: kind.type_url().into(),
            resource_names_subscribe: vec![super::WILDCARD.into()],
            initial_resource_versions: handler.versions(*kind),
            ..Default::default()
        };
        // The channel has room for every kind's first request.
        let _ = tx.try_send(request);
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(crate::limits::MAX_XDS_MESSAGE)
        .max_encoding_message_size(crate::limits::MAX_XDS_MESSAGE);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(path) = &config.token_file {
        // A token that cannot be read is not sent: a control plane that needs one says so.
        match std::fs::read_to_string(path).map(|token| format!("Bearer {}", token.trim()).parse()) {
            Ok(Ok(bearer)) => {
                request.metadata_mut().insert("authorization", bearer);
            }
            Ok(Err(_)) => warn!(path = %path.display(), "the token file does not hold a valid token"),
            Err(error) => warn!(path = %path.display(), %error, "cannot read the token file"),
        }
    }
    let mut responses = match client.delta_aggregated_resources(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return status.into(),
    };
    info!(address = %config.address, node = %config.node_id, "control plane stream open");
    handler.connected(true);
    loop {
        let response = match responses.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return StreamError::Closed,
            Err(status) => return status.into(),
        };
        *delivered = true;
        let answer = answer(response, handler);
        if tx.send(answer).await.is_err() {
            return StreamError::Closed;
        }
    }
}

/// Decodes and applies one response; returns its ACK or NACK.
fn answer<H: Handler>(response: DeltaDiscoveryResponse, handler: &mut H) -> DeltaDiscoveryRequest {
    let DeltaDiscoveryResponse { system_version_info, resources, type_url, removed_resources, nonce } = response;
    let outcome = decode(&type_url, resources).and_then(|(kind, resources)| {
        handler.apply(Update {
            kind,
            system_version: system_version_info.clone(),
            resources,
            removed: removed_resources,
        })
    });
    if let Some(kind) = Kind::from_type_url(&type_url) {
        handler.answered(kind, &system_version_info, outcome.as_ref().err().map(String::as_str));
    }
    DeltaDiscoveryRequest {
        type_url,
        response_nonce: nonce,
        error_detail: outcome.err().map(|message| RpcStatus { code: INVALID_ARGUMENT, message, details: Vec::new() }),
        ..Default::default()
    }
}

fn decode(
    type_url: &str,
    resources: Vec<super::discovery::Resource>,
) -> Result<(Kind, Vec<(String, Resource)>), String> {
    let kind =
        Kind::from_type_url(type_url).ok_or_else(|| format!("type {type_url:?} is not one this proxy serves"))?;
    let mut decoded = Vec::with_capacity(resources.len());
    for wire in resources {
        let any = wire.resource.ok_or_else(|| format!("{} {:?}: the resource is missing", kind.noun(), wire.name))?;
        if any.type_url != type_url {
            return Err(format!(
                "{} {:?}: carries a {} in a {} response",
                kind.noun(),
                wire.name,
                any.type_url,
                type_url
            ));
        }
        let resource = Resource::from_any(&any).map_err(|e| format!("{} {:?}: {e}", kind.noun(), wire.name))?;
        if resource.name() != wire.name {
            return Err(format!("{} {:?}: the resource inside is named {:?}", kind.noun(), wire.name, resource.name()));
        }
        decoded.push((wire.version, resource));
    }
    Ok((kind, decoded))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::xds::discovery;

    #[derive(Default)]
    struct Recorder {
        applied: Vec<(Kind, Vec<String>, Vec<String>)>,
        answers: Vec<(Kind, Option<String>)>,
    }

    impl Handler for Recorder {
        fn versions(&self, _kind: Kind) -> HashMap<String, String> {
            HashMap::new()
        }
        fn apply(&mut self, update: Update) -> Result<(), String> {
            let names = update.resources.iter().map(|(_, r)| r.name().to_owned()).collect();
            self.applied.push((update.kind, names, update.removed));
            Ok(())
        }
        fn connected(&mut self, _connected: bool) {}
        fn answered(&mut self, kind: Kind, _system_version: &str, nack: Option<&str>) {
            self.answers.push((kind, nack.map(str::to_owned)));
        }
    }

    fn response(name: &str, any: pbjson_types::Any) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: "v".into(),
            resources: vec![discovery::Resource {
                name: name.into(),
                version: "1".into(),
                resource: Some(any),
                ..Default::default()
            }],
            type_url: Kind::Cluster.type_url().into(),
            removed_resources: vec!["old".into()],
            nonce: "7".into(),
        }
    }

    #[test]
    fn good_responses_are_applied_and_acked() {
        let cluster = Resource::Cluster(crate::v1::Cluster { name: "c".into(), ..Default::default() });
        let mut recorder = Recorder::default();
        let ack = answer(response("c", cluster.to_any()), &mut recorder);
        assert_eq!(ack.response_nonce, "7");
        assert!(ack.error_detail.is_none());
        assert_eq!(recorder.applied, [(Kind::Cluster, vec!["c".to_owned()], vec!["old".to_owned()])]);
    }

    #[test]
    fn undecodable_or_mislabelled_resources_are_nacked_naming_them() {
        let mut recorder = Recorder::default();
        let garbage = pbjson_types::Any { type_url: Kind::Cluster.type_url().into(), value: vec![0xff, 0xff].into() };
        let nack = answer(response("c", garbage), &mut recorder);
        let message = nack.error_detail.unwrap().message;
        assert!(message.starts_with("cluster \"c\": not a valid Cluster message"), "{message}");

        let listener = Resource::Listener(crate::v1::Listener { name: "c".into(), ..Default::default() });
        let nack = answer(response("c", listener.to_any()), &mut recorder);
        assert!(nack.error_detail.unwrap().message.contains("carries a type.googleapis.com/remora.v1.Listener"));

        let other = Resource::Cluster(crate::v1::Cluster { name: "d".into(), ..Default::default() });
        let nack = answer(response("c", other.to_any()), &mut recorder);
        assert!(nack.error_detail.unwrap().message.contains("named \"d\""));
        assert!(recorder.applied.is_empty());
        assert_eq!(recorder.answers.len(), 3);
        assert!(recorder.answers.iter().all(|(kind, nack)| *kind == Kind::Cluster && nack.is_some()));
    }
}
