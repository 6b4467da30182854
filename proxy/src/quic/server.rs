//! HTTP/3 downstream: QUIC connections on a listener's UDP socket, each request through the same
//! pipeline as HTTP/1.1 and HTTP/2 (`http::proxy`).
//!
//! A worker runs [`accept_loop`] on its socket. Each connection is admitted as a TCP connection is
//! (the listener's rate limit, `max_connections`, a strict authorization policy refusing what is
//! not mesh mTLS) before its handshake, then served by h3: every request stream becomes a
//! `Request<RequestBody>` whose body reads the stream (`http::body::RequestStreamBody`), goes through
//! `http::proxy`, and its response is written back frame by frame, trailers included. The
//! connection ends when the client closes it, QUIC's idle timeout passes, or after a drain's
//! GOAWAY once its requests are done. The bytes it moved (UDP payloads both ways) are counted into
//! the listener's when it ends.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use h3::error::Code;
use h3::server::{RequestResolver, RequestStream};
use http::{Method, Response, StatusCode};
use http_body::Body;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::context::{DataPath, Open};
use crate::drain::Drain;
use crate::http::body::{BodyError, ProxyBody, RequestBody, RequestStreamBody};
use crate::http::headers;
use crate::http::server::HttpConnection;
use crate::io::Meter;
use crate::listener::Accepted;
use crate::state::{ListenerConfig, ListenerProtocol};

use super::tunnels;
use crate::{limits, listener};

type H3Connection = h3_quinn::Connection;
pub(super) type Resolver = RequestResolver<H3Connection, Bytes>;
type Responder = RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;

/// Serves HTTP/3 on `socket` for listener `name` until `stop` turns true or draining starts;
/// connections already open go on to their end. Must run inside a worker's runtime.
pub async fn accept_loop(
    socket: std::net::UdpSocket,
    name: Arc<str>,
    data: Arc<DataPath>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(listener) = data.snapshot.load().listener(&name).cloned() else {
        return;
    };
    let config = match listener.protocol {
        ListenerProtocol::HboneQuic => tunnels::endpoint_config(&data, &name, &mut stop).await,
        _ => listener.quic.clone(),
    };
    let Some(config) = config else {
        return;
    };
    let runtime = Arc::new(quinn::TokioRuntime);
    let endpoint = match quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, runtime) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            warn!(listener = %name, %error, "cannot serve listener");
            return;
        }
    };
    let local = endpoint.local_addr().unwrap_or(listener.address);
    let mut drain = data.drain.watch();
    let mut draining = false;
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = stop.wait_for(|stop| *stop) => break,
            () = drain.signaled(), if !draining => {
                draining = true;
                continue;
            }
        };
        let Some(incoming) = incoming else { break };
        if draining {
            // Told at once, so a client goes elsewhere instead of waiting out its handshake.
            incoming.refuse();
            continue;
        }
        tokio::spawn(serve_incoming(incoming, local, name.clone(), data.clone()));
    }
    // A listener that went away: new connections get no answer, and the socket closes once the
    // open ones end.
    endpoint.set_server_config(None);
}

/// Serves one connection, by the listener's config as of now.
async fn serve_incoming(incoming: quinn::Incoming, local: SocketAddr, name: Arc<str>, data: Arc<DataPath>) {
    let Some(listener) = data.snapshot.load().listener(&name).cloned() else {
        incoming.refuse();
        return;
    };
    match listener.protocol {
        ListenerProtocol::HboneQuic => tunnels::serve_connection(incoming, local.ip(), listener, data).await,
        _ => serve_connection(incoming, local.port(), listener, data).await,
    }
}

/// Admits one HTTP/3 connection, completes its handshake, and serves its requests.
async fn serve_connection(
    incoming: quinn::Incoming,
    local_port: u16,
    listener: Arc<ListenerConfig>,
    data: Arc<DataPath>,
) {
    let name = listener.name.clone();
    let Some(config) = listener.quic.clone() else {
        incoming.refuse();
        return;
    };
    let peer = incoming.remote_address();
    // HTTP/3 carries no mesh identity: to an authorization policy on the socket's port it is
    // plaintext.
    let policy = listener.authz.as_ref().and_then(|authz| authz.for_port(local_port));
    let strict = || {
        let refused = policy.is_some_and(|policy| listener::refuses_plaintext(policy));
        if refused {
            debug!(listener = %name, port = local_port, "http/3 connection refused: the policy is strict");
        }
        refused
    };
    let Handshake::Done { quic, meter, open } = handshake(incoming, &listener, &data, config, strict).await else {
        return;
    };
    let destination_port = if listener.authz.is_some() { local_port } else { 0 };
    let accepted =
        Accepted { listener: listener.clone(), peer, original_destination: None, destination_port, meter, open };
    let connection = accepted.into_http(&data, None);
    match start_h3(&quic).await {
        Ok(h3) => {
            let serve = |resolver| serve_request(resolver, connection.clone());
            let idle = std::future::pending();
            accept_streams(h3, &data.drain, idle, &listener.name, serve).await;
        }
        Err(error) => debug!(listener = %name, %error, "http/3 connection failed to start"),
    }
    count_bytes(&quic, &connection.meter);
}

/// How a connection's admission and handshake went.
pub(super) enum Handshake {
    /// Admitted and handshaken: the connection, its byte meter, and what counts it open.
    Done { quic: quinn::Connection, meter: Arc<Meter>, open: Open },
    /// A gate of the listener's said no: refused before any handshake work (counted there).
    Refused,
    /// The handshake failed (`handshake`) or took longer than the handshake timeout (`timeout`).
    Failed(&'static str),
}

/// Admits `incoming` by the listener's gates and then `refuse` (a policy's, say), and completes its
/// handshake with `config` within the handshake timeout.
pub(super) async fn handshake(
    incoming: quinn::Incoming,
    listener: &Arc<ListenerConfig>,
    data: &DataPath,
    config: quinn::ServerConfig,
    refuse: impl FnOnce() -> bool,
) -> Handshake {
    if !listener::admit(listener) {
        incoming.refuse();
        return Handshake::Refused;
    }
    let meter = Arc::new(Meter::default());
    let open = Open::new(listener.clone(), meter.clone(), data.drain.track());
    if refuse() {
        incoming.refuse();
        return Handshake::Refused;
    }
    let peer = incoming.remote_address();
    let connecting = match incoming.accept_with(Arc::new(config)) {
        Ok(connecting) => connecting,
        Err(error) => {
            debug!(listener = %listener.name, %peer, %error, "quic: connection failed before its handshake");
            return Handshake::Failed("handshake");
        }
    };
    match tokio::time::timeout(limits::DEFAULT_HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(quic)) => Handshake::Done { quic, meter, open },
        Ok(Err(error)) => {
            debug!(listener = %listener.name, %peer, %error, "quic: handshake failed");
            Handshake::Failed("handshake")
        }
        Err(_) => {
            debug!(listener = %listener.name, %peer, "quic: handshake timed out");
            Handshake::Failed("timeout")
        }
    }
}

/// HTTP/3 on a handshaken connection: the server side's settings sent, its control streams open.
pub(super) async fn start_h3(
    quic: &quinn::Connection,
) -> Result<h3::server::Connection<H3Connection, Bytes>, h3::error::ConnectionError> {
    h3::server::builder()
        .max_field_section_size(limits::MAX_HEADER_BYTES as u64)
        .build::<_, Bytes>(h3_quinn::Connection::new(quic.clone()))
        .await
}

/// Counts the bytes a connection moved (UDP payloads both ways) into its listener's meter.
pub(super) fn count_bytes(quic: &quinn::Connection, meter: &Meter) {
    let stats = quic.stats();
    meter.add_received(usize::try_from(stats.udp_rx.bytes).unwrap_or(usize::MAX));
    meter.add_sent(usize::try_from(stats.udp_tx.bytes).unwrap_or(usize::MAX));
}

/// Accepts request streams on `h3` until the peer closes the connection, `idle` resolves, or
/// (after a drain's GOAWAY) the streams in flight are done; `serve` makes each a task of its own.
/// HTTP/3 listeners and HBONE-over-QUIC ones alike.
pub(super) async fn accept_streams<F, T>(
    mut h3: h3::server::Connection<H3Connection, Bytes>,
    drain: &Drain,
    idle: impl std::future::Future<Output = ()>,
    listener: &str,
    mut serve: F,
) where
    F: FnMut(Resolver) -> T,
    T: std::future::Future<Output = ()> + Send + 'static,
{
    let mut drain = drain.watch();
    let mut draining = false;
    tokio::pin!(idle);
    loop {
        let accepted = tokio::select! {
            accepted = h3.accept() => accepted,
            () = drain.signaled(), if !draining => {
                draining = true;
                // GOAWAY: no new streams; those already accepted complete.
                if let Err(error) = h3.shutdown(0).await {
                    debug!(listener, %error, "quic: shutdown failed");
                    return;
                }
                continue;
            }
            () = &mut idle => {
                debug!(listener, "quic: idle connection closed");
                return;
            }
        };
        match accepted {
            Ok(Some(resolver)) => {
                tokio::spawn(serve(resolver));
            }
            Ok(None) => return,
            Err(error) => {
                if !error.is_h3_no_error() {
                    debug!(listener, %error, "quic: connection ended with an error");
                }
                return;
            }
        }
    }
}

/// One request stream: its head read, the request proxied, the response written back.
async fn serve_request(resolver: Resolver, connection: Arc<HttpConnection>) {
    let (request, stream) = match resolver.resolve_request().await {
        Ok(resolved) => resolved,
        Err(error) => {
            debug!(listener = %connection.listener.name, %error, "http/3 request head rejected");
            return;
        }
    };
    let (mut send, recv) = stream.split();
    let response = if request.method() == Method::CONNECT {
        // Neither classic nor extended CONNECT is served over HTTP/3.
        crate::http::empty_reply(StatusCode::NOT_IMPLEMENTED)
    } else {
        let body = RequestStreamBody::new(recv, &request);
        let request = request.map(|()| RequestBody::Http3(Box::new(body)));
        match crate::http::proxy(request, connection.clone()).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    };
    if let Err(error) = respond(&mut send, response).await {
        debug!(listener = %connection.listener.name, %error, "http/3 response not delivered");
    }
}

/// Why a response did not reach the client whole.
#[derive(Debug, thiserror::Error)]
enum RespondError {
    #[error("{0}")]
    Stream(#[from] h3::error::StreamError),
    #[error("response body: {0}")]
    Body(BodyError),
}

/// Writes `response` to the request stream: head, data, trailers, end. A body that fails resets
/// the stream, so the client sees a broken response, never a short one.
async fn respond(send: &mut Responder, response: Response<ProxyBody>) -> Result<(), RespondError> {
    let (mut parts, mut body) = response.into_parts();
    // HTTP/3, as HTTP/2, has no connection-specific header fields (RFC 9114 §4.2).
    headers::strip_hop_by_hop(&mut parts.headers, false);
    send.send_response(Response::from_parts(parts, ())).await?;
    loop {
        let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => send.send_data(data).await?,
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        send.send_trailers(trailers).await?;
                        break;
                    }
                }
            },
            Some(Err(error)) => {
                send.stop_stream(Code::H3_INTERNAL_ERROR);
                return Err(RespondError::Body(error));
            }
        }
    }
    send.finish().await?;
    Ok(())
}
