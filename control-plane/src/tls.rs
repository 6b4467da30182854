//! TLS on the control plane's port: a serving certificate from the mesh CA, renewed while the
//! control plane runs, and the incoming connections tonic serves once their handshake is done.
//!
//! With `remora control --tls-name ...` (and for the injector's port, `--injector-name ...`),
//! [`serving_config`] has the CA issue the control plane a certificate for those names (DNS names
//! or IP addresses), short-lived (`--serving-cert-ttl`, a week by default), and builds a TLS 1.3
//! server config that presents whichever certificate is current; the task it returns issues a new
//! one at each half-life, so a control plane that runs for months never serves an expired
//! certificate, and connections already open are not touched. [`incoming`] accepts TCP
//! connections, runs each handshake in its own task (a slow client never holds up the next accept),
//! and yields the finished ones. Proxies check the certificate against the CA's root
//! (`control_plane_ca_file`), so bearer tokens and configuration never cross the network in the
//! clear.
//!
//! The control plane's port asks for a client certificate too, and takes a connection without
//! one: a proxy whose identity the CA issued presents it, and a certificate that chains to the CA's
//! roots is the proof of who calls ([`Peer`]): the discovery service decides a stream's view by it,
//! never by the node ID the proxy claims. A certificate that does not chain is refused in the
//! handshake.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use remora_control_api::identity::{SpiffeId, certificate_identity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

use crate::ca::Authority;
use crate::metrics::ControlMetrics;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const READY_QUEUE: usize = 128;

/// A TLS 1.3 server config presenting a certificate `authority` issues now for `names`, valid for
/// `lifetime`, and the task that renews it at each half-life (counted in `metrics`).
pub(crate) fn serving_config(
    authority: &Arc<Authority>,
    names: &[String],
    lifetime: Duration,
    metrics: Arc<ControlMetrics>,
) -> Result<(Arc<rustls::ServerConfig>, impl Future<Output = ()> + Send + 'static), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let current = Arc::new(Renewed(ArcSwap::from_pointee(issue(authority, names, lifetime, &provider)?)));
    let mut roots = rustls::RootCertStore::empty();
    for pem in authority.trust_bundle() {
        for root in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(root.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
    }
    let clients = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())?;
    let config = server_config(current.clone(), provider.clone(), Some(clients))?;
    let (authority, names) = (authority.clone(), names.to_vec());
    let renew = async move {
        let mut wait = lifetime / 2;
        loop {
            tokio::time::sleep(wait).await;
            match issue(&authority, &names, lifetime, &provider) {
                Ok(key) => {
                    current.0.store(Arc::new(key));
                    metrics.serving_certificate_renewed(true);
                    info!(?names, ?lifetime, "serving certificate renewed");
                    wait = lifetime / 2;
                }
                Err(error) => {
                    metrics.serving_certificate_renewed(false);
                    warn!(?names, %error, "serving certificate renewal failed; retrying");
                    wait = (lifetime / 20).max(Duration::from_secs(1));
                }
            }
        }
    };
    Ok((config, renew))
}

/// TLS 1.3 only, h2 and http/1.1 offered; certificates from `resolver`; client certificates
/// checked by `clients`, or none asked for.
fn server_config(
    resolver: Arc<Renewed>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    clients: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let builder = match clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A PEM certificate chain (leaf first) and its PEM key, ready to serve.
fn certified_key(
    chain_pem: &str,
    key_pem: &str,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    if chain.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| e.to_string())
}

/// A new serving certificate and key for `names`, with the intermediates and the root after it in
/// the chain.
fn issue(
    authority: &Authority,
    names: &[String],
    lifetime: Duration,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, String> {
    let (cert_pem, key_pem) = authority.serving_certificate(names, lifetime).map_err(|e| e.to_string())?;
    let chain = format!("{cert_pem}{}{}", authority.intermediates_pem(), authority.root_pem());
    certified_key(&chain, &key_pem, provider)
}

/// The serving certificate every new handshake gets: the latest issued (or the one given, for
/// certificates from files).
#[derive(Debug)]
struct Renewed(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Renewed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// A TLS 1.3 server config serving the certificate chain and key of two PEM files (the injector's,
/// from a `kubernetes.io/tls` Secret).
pub(crate) fn file_config(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let read = |path: &std::path::Path| std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
    pem_config(&read(cert)?, &read(key)?)
}

/// A TLS 1.3 server config serving a PEM certificate chain and key (offering h2 and http/1.1).
pub fn pem_config(chain_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = certified_key(chain_pem, key_pem, &provider)?;
    server_config(Arc::new(Renewed(ArcSwap::from_pointee(key))), provider, None)
}

/// A control-plane connection after its TLS handshake.
pub struct TlsConnection(tokio_rustls::server::TlsStream<TcpStream>);

/// Who is on the other end of a control-plane connection: its address, and the identity its client
/// certificate proved (one that chains to the CA's roots, checked in the handshake), if it
/// presented one. tonic puts it in every request's extensions; [`Peer::of`] reads it back.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The remote address.
    pub address: Option<std::net::SocketAddr>,
    /// The SPIFFE ID of the client certificate's one URI SAN.
    pub identity: Option<SpiffeId>,
}

impl Peer {
    /// The peer of `request`: from a TLS connection's proof, else the plain TCP connection's address.
    pub fn of<T>(request: &tonic::Request<T>) -> Peer {
        match request.extensions().get::<Peer>() {
            Some(peer) => peer.clone(),
            None => Peer { address: request.remote_addr(), identity: None },
        }
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        let (tcp, session) = self.0.get_ref();
        // The handshake checked the chain and its validity; only the identity is read here.
        let leaf = session.peer_certificates().and_then(|chain| chain.first());
        let identity = leaf.and_then(|leaf| certificate_identity(leaf, None).ok()).map(|(id, _)| id);
        Peer { address: tcp.connect_info().remote_addr(), identity }
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The connections accepted on `listener` whose TLS handshake with `config` succeeded, as a stream
/// for tonic. The accept loop ends with the stream.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConnection>> {
    let (ready, taken) = mpsc::channel(READY_QUEUE);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        debug!(%error, "control plane accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                () = ready.closed() => return,
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, ready) = (acceptor.clone(), ready.clone());
            tokio::spawn(async move {
                let peer = stream.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = ready.send(Ok(TlsConnection(tls))).await;
                    }
                    Ok(Err(error)) => debug!(?peer, %error, "control plane tls handshake failed"),
                    Err(_) => debug!(?peer, "control plane tls handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(taken)
}
