//! The one way this crate dials a gRPC server (the control plane, etcd): the same connect timeout and
//! HTTP/2 keep-alives, so a dead peer is noticed within seconds rather than when TCP gives up; and,
//! for an `https://` control plane, TLS that checks the control plane's serving certificate against
//! the roots in a [`ControlTls`] (the mesh CA's root, typically), by the host name in the URL.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint};

/// A configured endpoint for `address` (`http://host:port`), or `None` if it is not a URL.
pub fn endpoint(address: &str) -> Option<Endpoint> {
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

/// How a server's certificate is checked: against these roots, for the host the URL names (a DNS
/// name or an IP address in its SANs), TLS 1.3 only. The control plane's, and an OTLP collector's.
#[derive(Clone)]
pub struct ControlTls(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for ControlTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlTls")
    }
}

impl ControlTls {
    /// Trusts the PEM certificates in `roots`.
    pub fn from_pem(roots: &[u8]) -> Result<ControlTls, String> {
        let mut store = rustls::RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(roots) {
            let root = root.map_err(|e| format!("not a PEM certificate: {e}"))?;
            store.add(root).map_err(|e| format!("not a usable root: {e}"))?;
        }
        if store.is_empty() {
            return Err("holds no certificate".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ControlTls(Arc::new(config)))
    }

    /// The same trust, presenting the client certificate `resolver` gives (none when it gives
    /// none): a proxy proving its identity to the control plane.
    pub fn with_client_cert(&self, resolver: Arc<dyn rustls::client::ResolvesClientCert>) -> ControlTls {
        let mut config = (*self.0).clone();
        config.client_auth_cert_resolver = resolver;
        ControlTls(Arc::new(config))
    }

    /// The same trust for an HTTP/1.1 client (offering `http/1.1` instead of `h2`).
    pub fn http1_config(&self) -> Arc<rustls::ClientConfig> {
        let mut config = (*self.0).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The address is not an `http://` or `https://` URL.
    #[error("{0:?} is not an http:// or https:// URL")]
    Address(String),
    /// An `https://` address, and no roots to check it with.
    #[error("{0:?} is https://, and no CA file was given to check its certificate (control_plane_ca_file)")]
    NoRoots(String),
    /// The connection failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Opens a channel to `address`: plaintext HTTP/2 for `http://`, TLS checked with `tls` for
/// `https://`.
pub(crate) async fn connect(address: &str, tls: Option<&ControlTls>) -> Result<Channel, DialError> {
    let endpoint = endpoint(address).ok_or_else(|| DialError::Address(address.to_owned()))?;
    if address.starts_with("https://") {
        let tls = tls.ok_or_else(|| DialError::NoRoots(address.to_owned()))?;
        return Ok(endpoint.connect_with_connector(TlsConnector(tls.0.clone())).await?);
    }
    if !address.starts_with("http://") {
        return Err(DialError::Address(address.to_owned()));
    }
    Ok(endpoint.connect().await?)
}

/// A channel to the `https://` URL `address`, TLS checked with `tls`, that connects on first use
/// (and again after a failure), with `timeout` on each request: for clients that must start whether
/// or not the server is up (the OTLP exporter).
pub fn lazy_tls_channel(address: &str, tls: &ControlTls, timeout: std::time::Duration) -> Result<Channel, DialError> {
    if !address.starts_with("https://") {
        return Err(DialError::Address(address.to_owned()));
    }
    let endpoint = endpoint(address).ok_or_else(|| DialError::Address(address.to_owned()))?.timeout(timeout);
    Ok(endpoint.connect_with_connector_lazy(TlsConnector(tls.0.clone())))
}

/// TCP, then TLS to the URI's host, for tonic's channel.
#[derive(Clone)]
struct TlsConnector(Arc<rustls::ClientConfig>);

type Connecting = Pin<
    Box<
        dyn Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, std::io::Error>>
            + Send,
    >,
>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.0.clone();
        Box::pin(async move {
            let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
            let host = uri.host().ok_or_else(|| invalid("the URL has no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone()).map_err(|_| invalid("the URL's host is not a name"))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
