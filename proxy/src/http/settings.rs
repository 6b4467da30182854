//! The HTTP settings built once at start-up and shared by every connection: hyper's server with
//! every limit of `limits` applied ([`ServerSettings`]), and the upstream HTTP/2 client's with this
//! proxy's mesh identity ([`ClientSettings`]).
//!
//! They live apart from the server and the client so that the data path's shared context
//! (`context::DataPath`) can hold them without reaching into the code that uses them.

use std::sync::Arc;

use hyper::{client, server};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::tidy::UpstreamExecutor;
use crate::limits;
use crate::timer::CoarseTimer;
use crate::tls::MeshTls;

/// hyper server settings with every limit applied, built once.
#[derive(Debug)]
pub struct ServerSettings {
    pub(crate) http1: server::conn::http1::Builder,
    pub(crate) http2: server::conn::http2::Builder<TokioExecutor>,
    /// For HBONE listeners: tunnels' windows and frames (`limits::HBONE_*`).
    pub(crate) hbone: server::conn::http2::Builder<TokioExecutor>,
}

/// `builder` (an HTTP/2 server's or client's: their setters share names) with HBONE's windows and
/// frames (`limits::HBONE_*`): each stream is a whole TCP connection's bytes.
macro_rules! for_tunnels {
    ($builder:expr) => {{
        let mut builder = $builder;
        builder
            .initial_stream_window_size(limits::HBONE_STREAM_WINDOW)
            .initial_connection_window_size(limits::HBONE_CONNECTION_WINDOW)
            .max_frame_size(limits::HBONE_MAX_FRAME_SIZE)
            .max_send_buf_size(limits::HBONE_STREAM_WINDOW as usize);
        builder
    }};
}

/// [`for_tunnels!`] for the server side, which also says how many tunnels a connection may carry.
fn hbone_server(http2: &server::conn::http2::Builder<TokioExecutor>) -> server::conn::http2::Builder<TokioExecutor> {
    let mut hbone = for_tunnels!(http2.clone());
    hbone.max_concurrent_streams(limits::HBONE_MAX_TUNNELS);
    hbone
}

impl Default for ServerSettings {
    fn default() -> Self {
        let mut h1 = server::conn::http1::Builder::new();
        // The coarse timer: hyper arms the header-read timeout on every request (see `timer`). The
        // timeout itself is the listener's, set per connection in `serve`.
        h1.timer(CoarseTimer)
            .header_read_timeout(limits::DEFAULT_HEADER_TIMEOUT)
            .max_header_size(limits::MAX_HEADER_BYTES)
            .max_buf_size(limits::H1_MAX_BUF_SIZE)
            // A client that shuts down its sending side after the request still gets its response.
            .half_close(true)
            .keep_alive(true);
        let mut h2 = server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(limits::H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(limits::H2_MAX_HEADER_LIST_SIZE)
            .max_pending_accept_reset_streams(limits::H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(limits::H2_MAX_LOCAL_ERROR_RESET_STREAMS)
            .initial_stream_window_size(limits::H2_STREAM_WINDOW)
            .initial_connection_window_size(limits::H2_CONNECTION_WINDOW)
            .max_send_buf_size(limits::H2_MAX_SEND_BUF_SIZE);
        let hbone = hbone_server(&h2);
        ServerSettings { http1: h1, http2: h2, hbone }
    }
}

/// Connection settings for upstream HTTP/2 connections, built once, and this proxy's mTLS side.
#[derive(Debug)]
pub struct ClientSettings {
    pub(crate) http2: client::conn::http2::Builder<UpstreamExecutor>,
    /// For HBONE connections: tunnels' windows and frames (`limits::HBONE_*`).
    pub(crate) hbone: client::conn::http2::Builder<UpstreamExecutor>,
    /// This proxy's identity for mesh clusters, when it has one.
    pub mesh: Option<Arc<MeshTls>>,
}

impl ClientSettings {
    /// The settings, with `mesh` for clusters with `tls: mesh`.
    pub fn with_mesh(mesh: Option<Arc<MeshTls>>) -> Self {
        ClientSettings { mesh, ..ClientSettings::default() }
    }
}

impl Default for ClientSettings {
    fn default() -> Self {
        // Pooled connections give their buffers back while idle (`tidy`).
        let mut h2 = client::conn::http2::Builder::new(UpstreamExecutor::default());
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(limits::H2_STREAM_WINDOW)
            .initial_connection_window_size(limits::H2_CONNECTION_WINDOW)
            .max_send_buf_size(limits::H2_MAX_SEND_BUF_SIZE)
            .max_header_list_size(limits::H2_MAX_HEADER_LIST_SIZE)
            .max_pending_accept_reset_streams(limits::H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(limits::H2_MAX_LOCAL_ERROR_RESET_STREAMS);
        let hbone = for_tunnels!(h2.clone());
        ClientSettings { http2: h2, hbone, mesh: None }
    }
}
