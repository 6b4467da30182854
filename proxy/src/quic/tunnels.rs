//! HBONE over QUIC, in: mesh tunnels carried on HTTP/3 in mutual TLS, on an `hbone_quic`
//! listener's UDP socket.
//!
//! The same tunnels as an `hbone` listener's (`listener::hbone`), on another carrier: a connection
//! is admitted by the listener's gates, its handshake needs a client certificate from the mesh's
//! CA ([`MeshTls::quic_server`], the certificate in use now, so rotation applies to the next
//! handshake), and the peer's SPIFFE ID is read from it. Each request stream must then be a
//! `CONNECT ip:port`, judged by the same [`Carrier`] as HBONE's (an address of this host, the
//! authorization policy of the inbound listener's port, drain, `max_connections`), answered `200`
//! or refused with HBONE's statuses; an accepted tunnel's stream ([`InboundTunnel`]) is served as
//! a connection of the `inbound_listener`. Draining sends GOAWAY; a connection that has carried
//! no tunnel for the listener's idle timeout is closed.

use std::net::IpAddr;
use std::sync::Arc;

use http::{Response, StatusCode};
use tokio::sync::watch;
use tracing::debug;

use super::server::{Handshake, Resolver, accept_streams, count_bytes, handshake, start_h3};
use super::stream::{InboundTunnel, TunnelStream};
use crate::context::DataPath;
use crate::limits;
use crate::listener::hbone::Carrier;
use crate::state::ListenerConfig;

/// The QUIC server config to create an `hbone_quic` listener's endpoint with: the mesh's, once
/// this proxy has a certificate (waited for here). `None` when it never will (no identity is
/// configured) or `stop` turns first.
pub(super) async fn endpoint_config(
    data: &DataPath,
    name: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<quinn::ServerConfig> {
    let Some(mesh) = &data.client.mesh else {
        // As the built-in defaults have it on a proxy without an identity: nothing to serve.
        debug!(listener = %name, "an hbone_quic listener needs this proxy's identity; none is configured");
        return None;
    };
    loop {
        if let Ok(config) = mesh.quic_server(super::mesh_transport()) {
            return Some(config);
        }
        tokio::select! {
            () = tokio::time::sleep(limits::IDENTITY_WAIT_POLL) => {}
            _ = stop.wait_for(|stop| *stop) => return None,
        }
    }
}

/// Serves one connection to an `hbone_quic` listener bound to `local`.
pub(super) async fn serve_connection(
    incoming: quinn::Incoming,
    local: IpAddr,
    listener: Arc<ListenerConfig>,
    data: Arc<DataPath>,
) {
    let Some(mesh) = data.client.mesh.clone() else {
        incoming.refuse();
        return;
    };
    let config = match mesh.quic_server(super::mesh_transport()) {
        Ok(config) => config,
        Err(error) => {
            debug!(listener = %listener.name, %error, "hbone_quic: no certificate to answer with");
            incoming.refuse();
            return;
        }
    };
    let peer = incoming.remote_address();
    // The address the packets reached (a wildcard socket learns it from each packet).
    let local = incoming.local_ip().unwrap_or(local);
    let (quic, meter, open) = match handshake(incoming, &listener, &data, config, || false).await {
        Handshake::Done { quic, meter, open } => (quic, meter, open),
        Handshake::Refused => return,
        Handshake::Failed(kind) => {
            mesh.stats().handshake("inbound", kind);
            return;
        }
    };
    let identity = match mesh.quic_peer(&quic, "inbound", None) {
        Ok(identity) => identity,
        Err(error) => {
            debug!(listener = %listener.name, %peer, %error, "hbone_quic: peer not accepted");
            quic.close(0u32.into(), b"");
            return;
        }
    };
    let carrier = Carrier::new(&data, listener.name.clone(), peer, local, identity, open);
    match start_h3(&quic).await {
        Ok(h3) => {
            // Closed once it has carried no tunnel for the listener's idle timeout.
            let idle = carrier.idle(listener.idle_timeout);
            let serve = |resolver| serve_stream(resolver, carrier.clone());
            accept_streams(h3, &data.drain, idle, &listener.name, serve).await;
        }
        Err(error) => debug!(listener = %listener.name, %error, "hbone_quic: http/3 failed to start"),
    }
    quic.close(0u32.into(), b"");
    count_bytes(&quic, &meter);
}

/// One stream: judged, then refused or answered `200` and served as a tunnel.
async fn serve_stream(resolver: Resolver, carrier: Arc<Carrier>) {
    let Ok((request, mut stream)) = resolver.resolve_request().await else {
        return;
    };
    let answer = |status: StatusCode| {
        let mut response = Response::new(());
        *response.status_mut() = status;
        response
    };
    let tunnel = match carrier.accept(request.method(), request.uri(), request.headers()) {
        Ok(tunnel) => tunnel,
        Err(status) => {
            if stream.send_response(answer(status)).await.is_ok() {
                let _ = stream.finish().await;
            }
            return;
        }
    };
    if stream.send_response(answer(StatusCode::OK)).await.is_err() {
        return;
    }
    let (send, recv) = stream.split();
    let io: InboundTunnel = TunnelStream::new(send, recv);
    // Boxed: a tunnel's task holds whichever path serves it.
    Box::pin(carrier.serve_tunnel(io, tunnel)).await;
}
