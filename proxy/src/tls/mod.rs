//! Mutual TLS between sidecars: this proxy's credentials, the rustls configs made from them, and the
//! two handshakes (connect to a peer sidecar, accept one).
//!
//! Credentials enter through [`MeshTls::install`], from the CA (`issuer`) or from files (`files`);
//! each install builds fresh server and client configs and swaps them in whole, so new handshakes
//! use the new certificate while connections already open keep theirs: rotation drops nothing.
//! Until the first install the proxy has no identity and every mesh handshake fails with
//! [`TlsError::NoIdentity`].
//!
//! Outbound, [`MeshTls::connect`] wraps a new upstream TCP connection, offering one ALPN protocol
//! that says what rides inside ([`ALPN_HTTP`]: HTTP/2; [`ALPN_TCP`]: opaque bytes; [`ALPN_HTTP1`]:
//! one HTTP/1.1 request that switches protocols, such as a WebSocket), and checks the
//! peer's SPIFFE ID against what the endpoint is expected to be ([`Expected`]). Inbound,
//! [`MeshTls::accept`] terminates a ClientHello that offered one of those protocols (listeners find
//! out with [`offers_mesh_alpn`], peeking, so other TLS passes through untouched), demands a client
//! certificate, and returns the peer's ID for authorization. HBONE has a listener of its own:
//! [`MeshTls::accept_hbone`] does the same with ALPN `h2` ([`ALPN_HBONE`]), and [`Alpn::Hbone`]
//! opens the outbound side of it.
//!
//! Fixed choices: TLS 1.3 only (no TLS 1.2 code is even compiled in); rustls's `ring` provider (it
//! builds from source with a C compiler alone, where aws-lc-rs needs cmake and takes several times
//! as long on a small build machine; both do the P-256 and AES-GCM/ChaCha20 that sidecars use, and
//! handshakes per core are measured in docs/benchmarks.md); no 0-RTT (early data is replayable); a
//! handshake timeout; and no session resumption, deliberately: a resumed handshake skips the
//! certificate check, so with short-lived certificates a resumed session could carry a peer
//! certificate that has since expired. Every new mesh connection makes a full handshake, and there
//! are few of them: HTTP between two sidecars shares one multiplexed connection.

pub mod files;
pub mod issuer;
pub mod metrics;
pub mod quic;
pub mod verify;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use remora_control_api::identity::{IdentityPattern, SpiffeId};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

use crate::limits;
use metrics::MeshMetrics;
pub use verify::{IdentityError, peer_identity};

/// ALPN for HTTP between sidecars: HTTP/2, whatever version the app spoke.
pub const ALPN_HTTP: &[u8] = b"remora.h2";
/// ALPN for opaque TCP between sidecars.
pub const ALPN_TCP: &[u8] = b"remora.tcp";
/// ALPN of HBONE, the mesh tunnel Istio's ambient mode speaks: plain HTTP/2, on a port of its own.
pub const ALPN_HBONE: &[u8] = b"h2";
/// ALPN for an HTTP/1.1 request that switches protocols (a WebSocket): one request per connection,
/// which its tunnel then takes over.
pub const ALPN_HTTP1: &[u8] = b"remora.h1";

/// A TLS connection this proxy opened to a peer sidecar.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
/// A TLS connection a peer sidecar opened to this proxy.
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// What rides inside a mesh connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/2.
    Http,
    /// Opaque TCP.
    Tcp,
    /// HTTP/1.1, for a protocol upgrade.
    Http1,
    /// HBONE: HTTP/2 to a peer's HBONE listener, tunnels as CONNECT streams.
    Hbone,
}

impl Alpn {
    fn from_wire(protocol: Option<&[u8]>) -> Option<Alpn> {
        match protocol {
            Some(ALPN_HTTP) => Some(Alpn::Http),
            Some(ALPN_TCP) => Some(Alpn::Tcp),
            Some(ALPN_HTTP1) => Some(Alpn::Http1),
            Some(ALPN_HBONE) => Some(Alpn::Hbone),
            _ => None,
        }
    }
}

/// Who a peer sidecar must prove to be.
#[derive(Clone, Copy, Debug)]
pub enum Expected<'a> {
    /// Exactly this ID (the endpoint's own `identity`).
    Exact(&'a SpiffeId),
    /// One matching these patterns (the cluster's `peer_identities`).
    Any(&'a [IdentityPattern]),
    /// Any ID in this proxy's own trust domain.
    TrustDomain,
}

impl Expected<'_> {
    /// Whether `peer` is acceptable, for a proxy whose own trust domain is `own_domain`.
    pub fn accepts(&self, peer: &SpiffeId, own_domain: &str) -> bool {
        match self {
            Expected::Exact(id) => *id == peer,
            Expected::Any(patterns) => remora_control_api::identity::any_matches(patterns, peer.as_str()),
            Expected::TrustDomain => peer.trust_domain() == own_domain,
        }
    }

    fn describe(&self, own_domain: &str) -> String {
        match self {
            Expected::Exact(id) => id.to_string(),
            Expected::Any(patterns) => patterns.iter().map(IdentityPattern::as_str).collect::<Vec<_>>().join(" or "),
            Expected::TrustDomain => format!("an identity in trust domain {own_domain}"),
        }
    }
}

/// Why a mesh handshake, or a set of credentials, failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// This proxy has no certificate (yet).
    #[error("this proxy has no identity: no certificate has been issued or loaded")]
    NoIdentity,
    /// The credentials do not fit together or cannot be parsed.
    #[error("credentials: {0}")]
    Credentials(String),
    /// The handshake failed (a certificate the other side rejected, or one it sent that we did).
    #[error("tls handshake: {0}")]
    Handshake(std::io::Error),
    /// The handshake took longer than the handshake timeout.
    #[error("tls handshake timed out")]
    Timeout,
    /// The peer's certificate names no usable identity.
    #[error("peer certificate: {0}")]
    Peer(#[from] IdentityError),
    /// The peer is not who the endpoint should be.
    #[error("peer is {presented}, expected {expected}")]
    WrongPeer {
        /// What was expected.
        expected: String,
        /// What the peer proved.
        presented: SpiffeId,
    },
    /// This proxy's own certificate has expired and no newer one has been installed.
    #[error(
        "this proxy's certificate has expired and no newer one has been installed (CA unreachable, or stale files)"
    )]
    Expired,
    /// The peer chose no mesh protocol.
    #[error("peer agreed no mesh protocol (ALPN)")]
    Alpn,
}

impl TlsError {
    /// The metric label of the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            TlsError::NoIdentity => "no_identity",
            TlsError::Credentials(_) => "credentials",
            TlsError::Handshake(_) => "handshake",
            TlsError::Timeout => "timeout",
            TlsError::Peer(_) => "certificate",
            TlsError::WrongPeer { .. } => "identity",
            TlsError::Alpn => "protocol",
            TlsError::Expired => "expired",
        }
    }

    /// Whether the failure is this proxy's own (no certificate, an unusable or expired one) rather
    /// than the peer's or the network's.
    pub fn is_local(&self) -> bool {
        matches!(self, TlsError::NoIdentity | TlsError::Credentials(_) | TlsError::Expired)
    }
}

/// A certificate chain, its key and the roots peers chain to, checked to fit together.
pub struct Credentials {
    identity: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("identity", &self.identity).field("not_after", &self.not_after).finish()
    }
}

impl Credentials {
    /// Parses PEM: `chain` (leaf first), its private `key`, and the trust bundle `roots`. The leaf
    /// must carry one SPIFFE ID and not have expired.
    pub fn from_pem(chain: &[u8], key: &[u8], roots: &[u8]) -> Result<Credentials, TlsError> {
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Credentials(format!("private key: {e}")))?;
        Credentials::new(certificates(chain, "certificate chain")?, key, certificates(roots, "trust bundle")?)
    }

    /// Checks DER parts.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Credentials, TlsError> {
        let leaf = chain.first().ok_or_else(|| TlsError::Credentials("the certificate chain is empty".into()))?;
        if roots.is_empty() {
            return Err(TlsError::Credentials("the trust bundle holds no certificate".into()));
        }
        let (identity, not_after) =
            peer_identity(leaf, SystemTime::now()).map_err(|e| TlsError::Credentials(format!("certificate: {e}")))?;
        Ok(Credentials { identity, chain, key, roots, not_after })
    }

    /// The identity the leaf names.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// When the leaf expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// The certificates in PEM text `pem`; `what` names it in the error.
pub(crate) fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Credentials(format!("{what}: {e}")))
}

/// The configs made from one set of credentials.
#[derive(Debug)]
struct Configs {
    identity: SpiffeId,
    not_after: SystemTime,
    server: Arc<ServerConfig>,
    /// For an HBONE listener: the same certificate and client verification, ALPN `h2`.
    hbone_server: Arc<ServerConfig>,
    client_http: Arc<ClientConfig>,
    client_tcp: Arc<ClientConfig>,
    client_http1: Arc<ClientConfig>,
    client_hbone: Arc<ClientConfig>,
    /// For mesh tunnels over QUIC: the server's and the client's, ALPN `h3`.
    quic: quic::QuicConfigs,
}

/// This proxy's side of mTLS, shared by every worker.
#[derive(Debug)]
pub struct MeshTls {
    current: ArcSwapOption<Configs>,
    provider: Arc<CryptoProvider>,
    handshake_timeout: Duration,
    stats: MeshMetrics,
}

impl MeshTls {
    /// No credentials yet; handshakes limited to `handshake_timeout`, counted in `stats`.
    pub fn new(handshake_timeout: Duration, stats: MeshMetrics) -> MeshTls {
        MeshTls { current: ArcSwapOption::empty(), provider: Arc::new(mesh_provider()), handshake_timeout, stats }
    }

    /// What presents this proxy's certificate to the control plane: the current one, while it has
    /// not expired (an expired one would be refused in the handshake, and the stream could not
    /// even fall back to its token).
    pub fn control_plane_client_cert(self: &Arc<Self>) -> Arc<dyn ResolvesClientCert> {
        Arc::new(ControlPlaneCert(self.clone()))
    }

    /// Makes `credentials` the ones new handshakes use.
    pub fn install(&self, credentials: Credentials) -> Result<(), TlsError> {
        let configs = self.configs(credentials).map_err(|e| TlsError::Credentials(e.to_string()))?;
        let expiry = configs.not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        self.current.store(Some(Arc::new(configs)));
        self.stats.rotated(expiry);
        Ok(())
    }

    fn configs(&self, credentials: Credentials) -> Result<Configs, rustls::Error> {
        let Credentials { identity, chain, key, roots, not_after } = credentials;
        let mut store = RootCertStore::empty();
        for root in &roots {
            store.add(root.clone())?;
        }
        let client_verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        server.max_early_data_size = 0;
        let mut hbone_server = server.clone();
        let mut quic_server = server.clone();
        quic_server.alpn_protocols = vec![quic::ALPN_H3.to_vec()];
        server.alpn_protocols = vec![ALPN_HTTP.to_vec(), ALPN_TCP.to_vec(), ALPN_HTTP1.to_vec()];
        hbone_server.alpn_protocols = vec![ALPN_HBONE.to_vec()];
        let server_verifier = Arc::new(verify::SpiffeServerVerifier::new(&roots, &self.provider)?);
        let client = |alpn: &[u8]| -> Result<Arc<ClientConfig>, rustls::Error> {
            let mut config = ClientConfig::builder_with_provider(self.provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(server_verifier.clone())
                .with_client_auth_cert(chain.clone(), key.clone_key())?;
            config.alpn_protocols = vec![alpn.to_vec()];
            config.resumption = Resumption::disabled();
            config.enable_early_data = false;
            Ok(Arc::new(config))
        };
        Ok(Configs {
            identity,
            not_after,
            server: Arc::new(server),
            hbone_server: Arc::new(hbone_server),
            client_http: client(ALPN_HTTP)?,
            client_tcp: client(ALPN_TCP)?,
            client_http1: client(ALPN_HTTP1)?,
            client_hbone: client(ALPN_HBONE)?,
            quic: quic::QuicConfigs::new(quic_server, client(quic::ALPN_H3)?)?,
        })
    }

    /// The configs to handshake with: none before the first certificate, none after it expired.
    fn current(&self) -> Result<Arc<Configs>, TlsError> {
        let configs = self.current.load_full().ok_or(TlsError::NoIdentity)?;
        if configs.not_after < SystemTime::now() {
            return Err(TlsError::Expired);
        }
        Ok(configs)
    }

    /// Whether `peer` is what `expected` asks for, judged against this proxy's own trust domain
    /// (no copy of anything: called per request on pooled mesh connections).
    pub fn accepts(&self, expected: Expected<'_>, peer: &SpiffeId) -> bool {
        let current = self.current.load();
        let own_domain = current.as_ref().map_or("", |c| c.identity.trust_domain());
        expected.accepts(peer, own_domain)
    }

    /// This proxy's identity, once it has one.
    pub fn identity(&self) -> Option<SpiffeId> {
        self.current.load().as_ref().map(|c| c.identity.clone())
    }

    /// When the certificate in use expires.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.current.load().as_ref().map(|c| c.not_after)
    }

    /// The counters.
    pub fn stats(&self) -> &MeshMetrics {
        &self.stats
    }

    /// Opens TLS on `stream` (connected to `endpoint`) for `alpn`, and checks the peer is `expected`.
    /// Returns the stream and the peer's identity.
    pub async fn connect(
        &self,
        stream: TcpStream,
        endpoint: SocketAddr,
        alpn: Alpn,
        expected: Expected<'_>,
    ) -> Result<(ClientStream, SpiffeId), TlsError> {
        let result = self.try_connect(stream, endpoint, alpn, expected).await;
        self.count_handshake(
            "outbound",
            result.as_ref().map(|(tls, peer)| (peer, Some(key_exchange(tls.get_ref().1)))),
        );
        result
    }

    /// Counts a handshake's outcome: by result, by the key exchange agreed (when it is known), and
    /// by peer (those that proved the wrong identity included).
    fn count_handshake(&self, direction: &'static str, outcome: Result<(&SpiffeId, Option<&'static str>), &TlsError>) {
        self.stats.handshake(direction, outcome.map_or_else(TlsError::kind, |_| "ok"));
        match outcome {
            Ok((peer, group)) => {
                if let Some(group) = group {
                    self.stats.key_exchange(direction, group);
                }
                self.stats.peer_handshake(direction, "ok", peer.as_str());
            }
            Err(TlsError::WrongPeer { presented, .. }) => {
                self.stats.peer_handshake(direction, "identity", presented.as_str());
            }
            Err(_) => {}
        }
    }

    /// `peer`, if it is who `expected` asks for, judged against `configs`' own trust domain.
    fn expect(configs: &Configs, expected: Expected<'_>, peer: SpiffeId) -> Result<SpiffeId, TlsError> {
        let own_domain = configs.identity.trust_domain();
        if !expected.accepts(&peer, own_domain) {
            return Err(TlsError::WrongPeer { expected: expected.describe(own_domain), presented: peer });
        }
        Ok(peer)
    }

    async fn try_connect(
        &self,
        stream: TcpStream,
        endpoint: SocketAddr,
        alpn: Alpn,
        expected: Expected<'_>,
    ) -> Result<(ClientStream, SpiffeId), TlsError> {
        let configs = self.current()?;
        let config = match alpn {
            Alpn::Http => configs.client_http.clone(),
            Alpn::Tcp => configs.client_tcp.clone(),
            Alpn::Http1 => configs.client_http1.clone(),
            Alpn::Hbone => configs.client_hbone.clone(),
        };
        // An IP address as the server name: no SNI is sent, and the verifier ignores the name.
        let name = ServerName::IpAddress(endpoint.ip().into());
        let tls = self.within_timeout(tokio_rustls::TlsConnector::from(config).connect(name, stream)).await?;
        let (peer, agreed) = peer_and_alpn(tls.get_ref().1)?;
        let peer = Self::expect(&configs, expected, peer)?;
        if agreed != Some(alpn) {
            return Err(TlsError::Alpn);
        }
        Ok((tls, peer))
    }

    /// Terminates a mesh TLS connection on `stream`: the handshake (a client certificate is
    /// required), the peer's identity, and what rides inside.
    pub async fn accept(&self, stream: TcpStream) -> Result<(ServerStream, SpiffeId, Alpn), TlsError> {
        let result = self.try_accept(stream, |configs| &configs.server).await.and_then(|(tls, peer)| {
            let alpn = Alpn::from_wire(tls.get_ref().1.alpn_protocol()).ok_or(TlsError::Alpn)?;
            Ok((tls, peer, alpn))
        });
        self.count_accept(result.as_ref().map(|(tls, peer, _)| (tls, peer)));
        result
    }

    /// Terminates the mutual TLS of an HBONE connection on `stream`: the handshake (a client
    /// certificate is required; ALPN `h2`, or none) and the peer's identity. HTTP/2 rides inside.
    pub async fn accept_hbone(&self, stream: TcpStream) -> Result<(ServerStream, SpiffeId), TlsError> {
        let result = self.try_accept(stream, |configs| &configs.hbone_server).await;
        self.count_accept(result.as_ref().map(|(tls, peer)| (tls, peer)));
        result
    }

    /// Counts an inbound handshake's outcome.
    fn count_accept(&self, result: Result<(&ServerStream, &SpiffeId), &TlsError>) {
        self.count_handshake("inbound", result.map(|(tls, peer)| (peer, Some(key_exchange(tls.get_ref().1)))));
    }

    async fn try_accept(
        &self,
        stream: TcpStream,
        config: impl FnOnce(&Configs) -> &Arc<ServerConfig>,
    ) -> Result<(ServerStream, SpiffeId), TlsError> {
        let configs = self.current()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config(&configs).clone());
        let tls = self.within_timeout(acceptor.accept(stream)).await?;
        let (peer, _) = peer_and_alpn(tls.get_ref().1)?;
        Ok((tls, peer))
    }

    /// A handshake, limited to the handshake timeout.
    async fn within_timeout<T>(&self, handshake: impl Future<Output = std::io::Result<T>>) -> Result<T, TlsError> {
        tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| TlsError::Timeout)?
            .map_err(TlsError::Handshake)
    }
}

/// The crypto of the mesh's mutual TLS: rustls's aws-lc-rs provider, for its post-quantum key
/// exchange. X25519MLKEM768 (X25519 with ML-KEM-768, as Linkerd and Chrome use it) comes first, so
/// two Remora sidecars agree on it; a peer without it (an older sidecar, a classical client) still
/// gets X25519 or P-256. The certificates stay ECDSA P-256.
fn mesh_provider() -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::kx_group;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![kx_group::X25519MLKEM768, kx_group::X25519, kx_group::SECP256R1];
    provider
}

/// The key exchange a finished handshake agreed on, as the metrics name it.
fn key_exchange(session: &rustls::CommonState) -> &'static str {
    match session.negotiated_key_exchange_group().map(|group| group.name()) {
        Some(rustls::NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(rustls::NamedGroup::X25519) => "X25519",
        Some(rustls::NamedGroup::secp256r1) => "secp256r1",
        Some(_) => "other",
        None => "none",
    }
}

/// This proxy's current certificate, for the control plane's port.
#[derive(Debug)]
struct ControlPlaneCert(Arc<MeshTls>);

impl ResolvesClientCert for ControlPlaneCert {
    fn resolve(&self, hints: &[&[u8]], schemes: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let configs = self.0.current.load_full()?;
        (configs.not_after > SystemTime::now()).then_some(())?;
        configs.client_http.client_auth_cert_resolver.resolve(hints, schemes)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// After a handshake, either way: the peer's identity (from its leaf certificate, which must not have
/// expired) and the mesh protocol agreed, if any.
fn peer_and_alpn(session: &rustls::CommonState) -> Result<(SpiffeId, Option<Alpn>), TlsError> {
    let leaf = session.peer_certificates().and_then(|c| c.first()).ok_or(IdentityError::NoCertificate)?;
    let (peer, _) = peer_identity(leaf, SystemTime::now())?;
    Ok((peer, Alpn::from_wire(session.alpn_protocol())))
}

/// Whether the TLS ClientHello waiting on `stream` offers a mesh ALPN protocol. Peeks (the bytes stay
/// in the kernel for whoever serves the connection) until the first record is whole, for at most
/// `timeout`; a hello that is malformed, too long, or slow is not a mesh hello.
pub async fn offers_mesh_alpn(stream: &TcpStream, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buffer = vec![0_u8; limits::CLIENT_HELLO_PEEK];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buffer)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return false,
        };
        match client_hello_alpn(&buffer[..n]) {
            Hello::Incomplete if n < buffer.len() => {
                // The rest of the record is on its way; peek again once more has arrived.
                if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(1))).await.is_err() {
                    return false;
                }
            }
            Hello::Incomplete | Hello::Malformed => return false,
            Hello::Alpn(offers) => return offers,
        }
    }
}

enum Hello {
    Incomplete,
    Malformed,
    /// Whether a mesh protocol is offered.
    Alpn(bool),
}

/// Finds the ALPN extension of the ClientHello in the first TLS record of `bytes`.
fn client_hello_alpn(bytes: &[u8]) -> Hello {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
            self.0 = rest;
            Some(head)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| usize::from(b[0]))
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
        fn vec8(&mut self) -> Option<&'a [u8]> {
            let n = self.u8()?;
            self.take(n)
        }
        fn vec16(&mut self) -> Option<&'a [u8]> {
            let n = self.u16()?;
            self.take(n)
        }
    }
    if bytes.len() < 5 {
        return Hello::Incomplete;
    }
    let record_len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    let Some(record) = bytes.get(5..5 + record_len) else { return Hello::Incomplete };
    let parse = || -> Option<bool> {
        let mut r = Reader(record);
        if r.u8()? != 1 {
            return None; // not a ClientHello
        }
        let _length = r.take(3)?;
        let _version = r.take(2)?;
        let _random = r.take(32)?;
        let _session = r.vec8()?;
        let _suites = r.vec16()?;
        let _compression = r.vec8()?;
        let mut extensions = Reader(r.vec16()?);
        while !extensions.0.is_empty() {
            let kind = extensions.u16()?;
            let body = extensions.vec16()?;
            if kind == 16 {
                let mut list = Reader(Reader(body).vec16()?);
                while !list.0.is_empty() {
                    if matches!(list.vec8()?, ALPN_HTTP | ALPN_TCP | ALPN_HTTP1) {
                        return Some(true);
                    }
                }
                return Some(false);
            }
        }
        Some(false)
    };
    // A hello split over several records is legal but never sent by rustls for a hello this small;
    // treating one as "not mesh" only means it is passed through.
    parse().map_or(Hello::Malformed, Hello::Alpn)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A real ClientHello, as rustls writes it, with or without our ALPN.
    fn hello(alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = ServerName::try_from("peer.local").unwrap();
        let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        connection.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn finds_the_mesh_alpn_in_a_client_hello() {
        assert!(matches!(client_hello_alpn(&hello(&[ALPN_HTTP])), Hello::Alpn(true)));
        assert!(matches!(client_hello_alpn(&hello(&[b"h2", ALPN_TCP])), Hello::Alpn(true)));
        assert!(matches!(client_hello_alpn(&hello(&[b"h2", b"http/1.1"])), Hello::Alpn(false)));
        assert!(matches!(client_hello_alpn(&hello(&[])), Hello::Alpn(false)));
        let whole = hello(&[ALPN_HTTP]);
        assert!(matches!(client_hello_alpn(&whole[..whole.len() - 1]), Hello::Incomplete));
        assert!(matches!(client_hello_alpn(&[0x16, 3, 1, 0, 3, 2, 0, 0]), Hello::Malformed));
    }
}
