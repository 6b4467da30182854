//! Opening TCP connections to endpoints, for every path that needs one: the opaque TCP relay
//! (`tcp`), the HTTP client's pooled connections and HBONE's (`http::client`), and `CONNECT`
//! tunnels (`http::tunnel`).
//!
//! [`connect`] takes an address, the cluster's connect timeout and its counters, and gives back a
//! connected socket with Nagle off, or a [`ConnectError`] that says whether it timed out or failed.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::failure::{Failure, FailureKind};
use crate::state::cluster::ClusterStats;

/// Why an upstream connect failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connect did not finish within the cluster's connect timeout.
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    /// The connect failed (refused, unreachable, reset).
    #[error("connect to {address}: {error}")]
    Failed {
        /// The endpoint.
        address: SocketAddr,
        /// The OS error.
        error: io::Error,
    },
}

impl ConnectError {
    /// A connect failure, the endpoint's: the request (or connection) was never sent.
    pub fn failure(&self) -> Failure {
        Failure::of_endpoint(FailureKind::Connect)
    }
}

/// Opens a TCP connection to `address` within `timeout`, with Nagle off, counting it (or its failure)
/// in `stats`.
pub async fn connect(address: SocketAddr, timeout: Duration, stats: &ClusterStats) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Err(_) => {
            stats.connect_timeouts.inc();
            Err(ConnectError::Timeout(address))
        }
        Ok(Err(error)) => {
            stats.connect_failures.inc();
            Err(ConnectError::Failed { address, error })
        }
        Ok(Ok(stream)) => {
            stats.connections.inc();
            // Requests and responses are written whole; waiting to coalesce only adds latency.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}
