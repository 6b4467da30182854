//! A small etcd v3 client: the calls the service registry needs, over etcd's own gRPC API.
//!
//! Built on the trimmed `etcd/rpc.proto` (etcd's package and field numbers), so it talks to any etcd
//! v3 server without a system `protoc` or a large client crate. Keys and values are bytes; a prefix is
//! read and watched as the range `[prefix, prefix + 1)`.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::etcdpb::etcdserverpb::kv_client::KvClient;
use crate::etcdpb::etcdserverpb::lease_client::LeaseClient;
use crate::etcdpb::etcdserverpb::watch_client::WatchClient;
use crate::etcdpb::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    WatchCreateRequest, WatchRequest, WatchResponse, watch_request,
};
pub use crate::etcdpb::mvccpb::{KeyValue, event::EventType};

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The address is not an http:// URL.
    #[error("etcd address {0:?} is not a valid http:// URL")]
    Address(String),
    /// Connecting failed.
    #[error("connect to etcd: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// etcd answered with an error, or the call broke.
    #[error("etcd: {}", .0.message())]
    Status(#[from] tonic::Status),
    /// A runtime or signal handler could not be set up.
    #[error("start: {0}")]
    Io(std::io::Error),
    /// A lease could not be granted or has expired.
    #[error("etcd lease: {0}")]
    Lease(String),
}

/// A connection to an etcd cluster member.
#[derive(Clone, Debug)]
pub struct Etcd {
    channel: Channel,
}

impl Etcd {
    /// Connects to `address` (`http://host:port`).
    pub async fn connect(address: &str) -> Result<Etcd, EtcdError> {
        let endpoint =
            remora_control_api::grpc::endpoint(address).ok_or_else(|| EtcdError::Address(address.to_owned()))?;
        Ok(Etcd { channel: endpoint.connect().await? })
    }

    /// Every key under `prefix`, and the store's revision they were read at.
    pub async fn range_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let request = RangeRequest {
            key: Bytes::copy_from_slice(prefix.as_bytes()),
            range_end: prefix_end(prefix),
            ..Default::default()
        };
        let response = KvClient::new(self.channel.clone()).range(request).await?.into_inner();
        let revision = response.header.map_or(0, |h| h.revision);
        Ok((response.kvs, revision))
    }

    /// Writes `key`, attached to `lease` (0: none).
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        let request =
            PutRequest { key: Bytes::copy_from_slice(key.as_bytes()), value: Bytes::copy_from_slice(value), lease };
        KvClient::new(self.channel.clone()).put(request).await?;
        Ok(())
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        let request = DeleteRangeRequest { key: Bytes::copy_from_slice(key.as_bytes()), range_end: Bytes::new() };
        KvClient::new(self.channel.clone()).delete_range(request).await?;
        Ok(())
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1); returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let response = LeaseClient::new(self.channel.clone()).lease_grant(LeaseGrantRequest { ttl, id: 0 }).await?;
        let response = response.into_inner();
        if !response.error.is_empty() {
            return Err(EtcdError::Lease(response.error));
        }
        Ok(response.id)
    }

    /// Revokes a lease, deleting every key attached to it.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        LeaseClient::new(self.channel.clone()).lease_revoke(LeaseRevokeRequest { id: lease }).await?;
        Ok(())
    }

    /// Keeps `lease` alive, refreshing it every `every`, until the lease is gone or etcd cannot be
    /// reached; returns why it stopped.
    pub async fn keep_alive(&self, lease: i64, every: Duration) -> EtcdError {
        let (tx, rx) = mpsc::channel(1);
        // etcd sends the response headers with its first answer, so the first refresh must be queued
        // before the call, or the call would wait for ever.
        let _ = tx.try_send(LeaseKeepAliveRequest { id: lease });
        let mut responses = match LeaseClient::new(self.channel.clone()).lease_keep_alive(ReceiverStream::new(rx)).await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return status.into(),
        };
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            match responses.message().await {
                Ok(Some(response)) if response.ttl > 0 => {}
                Ok(Some(_)) => return EtcdError::Lease(format!("lease {lease:x} has expired")),
                Ok(None) => return EtcdError::Lease("the keep-alive stream closed".into()),
                Err(status) => return status.into(),
            }
            tick.tick().await;
            if tx.send(LeaseKeepAliveRequest { id: lease }).await.is_err() {
                return EtcdError::Lease("the keep-alive stream closed".into());
            }
        }
    }

    /// Watches every key under `prefix` from `start_revision` on.
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<Watch, EtcdError> {
        let (tx, rx) = mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::copy_from_slice(prefix.as_bytes()),
                range_end: prefix_end(prefix),
                start_revision,
                progress_notify: true,
                prev_kv: false,
            })),
        };
        // The channel has room for the one request.
        let _ = tx.try_send(create);
        let responses = WatchClient::new(self.channel.clone()).watch(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Watch { _requests: tx, responses })
    }
}

/// An open watch.
#[derive(Debug)]
pub struct Watch {
    // Held so the request side of the stream stays open.
    _requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl Watch {
    /// The next batch of events (or notification); `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<WatchResponse>, EtcdError> {
        Ok(self.responses.message().await?)
    }
}

/// The end of the key range holding every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Bytes {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end.into();
        }
    }
    // Every byte was 0xff (or the prefix is empty): the range runs to the end of the key space.
    Bytes::from_static(&[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges_end_after_the_prefix() {
        assert_eq!(&prefix_end("/a/")[..], b"/a0");
        assert_eq!(&prefix_end("")[..], &[0]);
    }
}
