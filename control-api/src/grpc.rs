//! The one way this crate dials a gRPC server (the control plane, etcd): the same connect timeout and
//! HTTP/2 keep-alives, so a dead peer is noticed within seconds rather than when TCP gives up.

use std::time::Duration;

use tonic::transport::Endpoint;

/// A configured endpoint for `address` (`http://host:port`), or `None` if it is not a URL.
pub(crate) fn endpoint(address: &str) -> Option<Endpoint> {
    let endpoint = Endpoint::from_shared(address.to_owned()).ok()?;
    Some(
        endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true),
    )
}
