//! Byte tunnels made out of HTTP requests: protocol upgrades (WebSocket) and `CONNECT`.
//!
//! An upgrade is relayed: the request goes upstream with its `Upgrade` header on a connection of its
//! own (to a mesh cluster, HTTP/1.1 inside mTLS to the endpoint's sidecar, which relays it in turn),
//! and when the endpoint answers `101 Switching Protocols` the client's connection is taken over
//! from hyper and joined to the endpoint's by [`relay_upgrade`]. A `CONNECT host:port` request is
//! terminated here: [`connect`] opens a TCP connection to an endpoint of the routed cluster (for a
//! pass-through cluster, to the requested address itself; for a mesh cluster, opaque TCP inside
//! mTLS to the endpoint's sidecar, or an HBONE tunnel to its host), answers `200`, and joins the
//! client's stream to it, over HTTP/1.1 or as an HTTP/2 stream. Both kinds keep the originating
//! connection's [`HttpConnection`] alive, so they count as open connections for drain and
//! metrics, and both end on the listener's idle timeout.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::connect;
use crate::http::HttpConnection;
use crate::http::body::{ProxyBody, RequestBody};
use crate::http::client::{self, SwitchedStream};
use crate::http::error::ProxyError;
use crate::io::idle_watch;
use crate::state::cluster::{Cluster, Targets};
use crate::tls::{Alpn, TlsError};
use tokio_util::either::Either;

/// Joins the two sides of a switched protocol: the client's, once hyper hands it over, and the
/// endpoint's connection, after passing on the `early` bytes the endpoint sent right behind its
/// `101`.
pub fn relay_upgrade(downstream: OnUpgrade, upstream: SwitchedStream, early: Bytes, connection: Arc<HttpConnection>) {
    tokio::spawn(async move {
        let mut down = match downstream.await {
            Ok(down) => TokioIo::new(down),
            Err(error) => {
                debug!(%error, "upgrade did not complete");
                return;
            }
        };
        if !early.is_empty()
            && let Err(error) = down.write_all(&early).await
        {
            debug!(%error, "upgrade: client gone");
            return;
        }
        join(down, upstream, &connection).await;
    });
}

/// Terminates a `CONNECT` request: connects to the target and tunnels the client's bytes to it.
pub async fn connect(
    request: Request<RequestBody>,
    cluster: &Cluster,
    connection: &Arc<HttpConnection>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let target = match cluster.targets {
        Targets::OriginalDestination => Some(
            request
                .uri()
                .authority()
                .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
                .ok_or(ProxyError::BadRequest("CONNECT through a pass-through cluster needs an ip:port target"))?,
        ),
        Targets::Endpoints(_) => {
            cluster.pick(None, Some(request.headers()), Some(connection.origin.peer), &[]).map(|picked| picked.address)
        }
    };
    let target = target.ok_or_else(|| ProxyError::NoEndpoint(cluster.name.clone()))?;
    // To a mesh cluster the tunnel is opaque TCP inside mTLS to the endpoint's sidecar (or, with
    // `hbone_port`, an HBONE tunnel to its host), which passes it to its app as it would any TCP
    // from a peer.
    let upstream = match &cluster.mesh {
        Some(peers) if let Some(port) = peers.hbone_port => {
            let opening = Box::pin(client::open_tunnel(&connection.data.client, cluster, target, port));
            Either::Right(Either::Right(opening.await?))
        }
        None => Either::Left(connect::connect(target, cluster.connect_timeout, &cluster.stats).await?),
        Some(peers) => {
            let tcp = connect::connect(target, cluster.connect_timeout, &cluster.stats).await?;
            let mesh = connection.data.client.mesh.as_ref().ok_or(TlsError::NoIdentity)?;
            let (tls, _) = mesh.connect(tcp, target, Alpn::Tcp, peers.expected(target)).await?;
            Either::Right(Either::Left(Box::new(tls)))
        }
    };
    let downstream = hyper::upgrade::on(request);
    let connection = connection.clone();
    tokio::spawn(async move {
        match downstream.await {
            Ok(down) => join(TokioIo::new(down), upstream, &connection).await,
            Err(error) => debug!(%error, "CONNECT tunnel was not established"),
        }
    });
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}

/// Copies both ways until both sides close, or the listener's idle timeout passes.
async fn join<A, B>(mut a: A, mut b: B, connection: &HttpConnection)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let listener = &connection.listener;
    tokio::select! {
        result = crate::relay::copy_both(&mut a, &mut b, crate::limits::COPY_BUFFER) => {
            if let Err(error) = result {
                debug!(listener = %listener.name, %error, "tunnel ended with an error");
            }
        }
        () = idle_watch(&connection.meter, &listener.stats, listener.idle_timeout) => {
            debug!(listener = %listener.name, "tunnel idle timeout");
        }
    }
}
