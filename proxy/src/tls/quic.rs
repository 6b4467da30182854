//! The mesh's mutual TLS over QUIC: the same certificates, verification and rotation as over TCP,
//! for mesh tunnels on HTTP/3 (`quic`).
//!
//! Each set of credentials [`MeshTls::install`] takes makes, beside its TCP configs, a QUIC server
//! config (a client certificate from the mesh's CA required) and a QUIC client config (the
//! SPIFFE verifier), both TLS 1.3 with ALPN `h3`, no resumption and no 0-RTT (a replayed
//! `CONNECT` would open a connection twice). A handshake done, [`MeshTls::quic_peer`] reads the
//! peer's SPIFFE ID from its certificate, checks it against what was expected, and counts the
//! handshake as the TCP ones are counted.

use std::sync::Arc;
use std::time::SystemTime;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use remora_control_api::identity::SpiffeId;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ServerConfig};

use super::verify::{IdentityError, peer_identity};
use super::{Expected, MeshTls, TlsError};

/// ALPN of HTTP/3 (RFC 9114), which mesh tunnels over QUIC speak as HTTP/3 listeners do.
pub const ALPN_H3: &[u8] = b"h3";

/// The QUIC forms of one set of credentials' mesh configs.
pub(super) struct QuicConfigs {
    server: Arc<QuicServerConfig>,
    client: Arc<QuicClientConfig>,
}

impl std::fmt::Debug for QuicConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuicConfigs")
    }
}

impl QuicConfigs {
    /// From the rustls configs (ALPN `h3` set).
    pub(super) fn new(server: ServerConfig, client: Arc<ClientConfig>) -> Result<QuicConfigs, rustls::Error> {
        let fail = |e: &dyn std::fmt::Display| rustls::Error::General(e.to_string());
        Ok(QuicConfigs {
            server: Arc::new(QuicServerConfig::try_from(server).map_err(|e| fail(&e))?),
            client: Arc::new(QuicClientConfig::try_from(client).map_err(|e| fail(&e))?),
        })
    }
}

impl MeshTls {
    /// The QUIC server config for a peer's connection, with the certificate in use now.
    pub fn quic_server(&self, transport: Arc<quinn::TransportConfig>) -> Result<quinn::ServerConfig, TlsError> {
        let configs = self.current()?;
        let mut config = quinn::ServerConfig::with_crypto(configs.quic.server.clone());
        config.transport_config(transport).migration(false);
        Ok(config)
    }

    /// The QUIC client config for a connection to a peer, with the certificate in use now.
    pub fn quic_client(&self, transport: Arc<quinn::TransportConfig>) -> Result<quinn::ClientConfig, TlsError> {
        let configs = self.current()?;
        let mut config = quinn::ClientConfig::new(configs.quic.client.clone());
        config.transport_config(transport);
        Ok(config)
    }

    /// The identity the peer of a QUIC connection proved, checked against `expected` when this side
    /// opened it (`direction` "outbound"); the handshake counted.
    pub fn quic_peer(
        &self,
        connection: &quinn::Connection,
        direction: &'static str,
        expected: Option<Expected<'_>>,
    ) -> Result<SpiffeId, TlsError> {
        let result = self.check_quic_peer(connection, expected);
        // quinn does not say which key exchange was agreed.
        self.count_handshake(direction, result.as_ref().map(|peer| (peer, None)));
        result
    }

    fn check_quic_peer(
        &self,
        connection: &quinn::Connection,
        expected: Option<Expected<'_>>,
    ) -> Result<SpiffeId, TlsError> {
        let configs = self.current()?;
        let chain = connection
            .peer_identity()
            .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or(TlsError::Peer(IdentityError::NoCertificate))?;
        let leaf = chain.first().ok_or(TlsError::Peer(IdentityError::NoCertificate))?;
        let (peer, _) = peer_identity(leaf, SystemTime::now())?;
        match expected {
            Some(expected) => Self::expect(&configs, expected, peer),
            None => Ok(peer),
        }
    }
}
