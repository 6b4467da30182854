//! QUIC: HTTP/3 listeners, and HBONE's tunnels over QUIC between sidecars.
//!
//! A listener of `protocol: http3` or `hbone_quic` binds UDP sockets (one per worker, sharing the
//! port with `SO_REUSEPORT`, as TCP listeners do); [`server`] runs quinn on each and serves HTTP/3
//! requests through the `http` pipeline, or hands an `hbone_quic` listener's connections to
//! [`tunnels`], which terminates the mesh's mutual TLS and serves each `CONNECT` as HBONE does.
//! Outbound, [`client`] opens tunnels on pooled QUIC connections to peers' hosts and falls back to
//! TCP where QUIC does not get through; [`stream`] makes a tunnel's HTTP/3 stream a byte stream.
//! The mesh's QUIC connections share one transport config ([`mesh_transport`]). Its certificate comes from the listener's `tls` files: compiling the listener
//! loads them into a [`ServedCertificate`] (a set that does not load rejects the config, naming the
//! field), which the next snapshot keeps while the paths stay the same, and
//! `reload::watch_certificates` re-reads whenever one of the files changes (counted in
//! `listener_certificate_reloads`). The compiled listener carries its QUIC server
//! config ([`server_config`]): TLS 1.3 only, ALPN `h3`, no 0-RTT (a replayed request is not ours to
//! allow), no connection migration (each worker's socket knows only its own connections), and the
//! listener's idle timeout as QUIC's.

pub mod client;
pub mod paths;
pub mod server;
pub mod stream;
pub mod tunnels;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::limits;
use crate::listener::metrics::CertificateReloads;
use crate::tls::files::read_pem;
use crate::tls::{TlsError, certificates};

/// ALPN of HTTP/3 (RFC 9114).
const ALPN_H3: &[u8] = b"h3";

/// A listener's certificate and key, from its `tls` files, swapped whole when they change.
pub struct ServedCertificate {
    certificate_file: PathBuf,
    private_key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    reloads: CertificateReloads,
}

impl std::fmt::Debug for ServedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedCertificate")
            .field("certificate_file", &self.certificate_file)
            .field("private_key_file", &self.private_key_file)
            .finish()
    }
}

impl ServedCertificate {
    /// Reads the two files; fails naming the one that does not load, or a key that is not the
    /// certificate's.
    /// Reloads (by `reload::watch_certificates`) are counted in `reloads`.
    pub fn load(
        certificate_file: &Path,
        private_key_file: &Path,
        reloads: CertificateReloads,
    ) -> Result<ServedCertificate, TlsError> {
        let key = read(certificate_file, private_key_file)?;
        Ok(ServedCertificate {
            certificate_file: certificate_file.to_owned(),
            private_key_file: private_key_file.to_owned(),
            current: ArcSwap::from_pointee(key),
            reloads,
        })
    }

    /// Whether this is the certificate of those files.
    pub fn is_from(&self, certificate_file: &Path, private_key_file: &Path) -> bool {
        self.certificate_file == certificate_file && self.private_key_file == private_key_file
    }

    /// The files, certificate first.
    pub fn files(&self) -> [&Path; 2] {
        [&self.certificate_file, &self.private_key_file]
    }

    /// Reads the files again and serves what they hold now; on failure the one in use stays.
    /// Counted either way.
    pub fn reload(&self) -> Result<(), TlsError> {
        match read(&self.certificate_file, &self.private_key_file) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                self.reloads.ok.inc();
                Ok(())
            }
            Err(error) => {
                self.reloads.failed.inc();
                Err(error)
            }
        }
    }
}

impl ResolvesServerCert for ServedCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read(certificate_file: &Path, private_key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let fail = |path: &Path, what: String| TlsError::Credentials(format!("{}: {what}", path.display()));
    let chain_pem = read_pem(certificate_file).map_err(TlsError::Credentials)?;
    let key_pem = read_pem(private_key_file).map_err(TlsError::Credentials)?;
    let chain = certificates(&chain_pem, "certificate chain").map_err(|e| fail(certificate_file, e.to_string()))?;
    if chain.is_empty() {
        return Err(fail(certificate_file, "holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| fail(private_key_file, e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| fail(private_key_file, format!("does not fit the certificate: {e}")))?;
    Ok(key)
}

/// The transport of mesh QUIC connections, both ways: HBONE's windows and tunnel count, a
/// keep-alive so a connection whose tunnels are quiet stays up (and a dead path shows within the
/// idle timeout), no migration.
pub(crate) fn mesh_transport() -> Arc<quinn::TransportConfig> {
    static TRANSPORT: std::sync::OnceLock<Arc<quinn::TransportConfig>> = std::sync::OnceLock::new();
    TRANSPORT
        .get_or_init(|| {
            let mut transport = quinn::TransportConfig::default();
            transport
                .max_concurrent_bidi_streams(limits::HBONE_MAX_TUNNELS.into())
                .max_concurrent_uni_streams(limits::H3_MAX_UNI_STREAMS.into())
                .stream_receive_window(limits::HBONE_STREAM_WINDOW.into())
                .receive_window(limits::HBONE_CONNECTION_WINDOW.into())
                .keep_alive_interval(Some(limits::MESH_QUIC_KEEP_ALIVE))
                // Each tunnel's writes leave in the order they were made, not interleaved packet
                // by packet with every other tunnel's: a write arrives whole more often, and the
                // far side passes it on in one piece (an app with Nagle's algorithm on waits out
                // a delayed ACK for a second piece: 40 ms).
                .send_fairness(false)
                .max_idle_timeout(quinn::IdleTimeout::try_from(limits::MESH_QUIC_IDLE_TIMEOUT).ok());
            Arc::new(transport)
        })
        .clone()
}

/// The QUIC server config of an HTTP/3 listener presenting `certificate`, closing connections
/// idle for `idle_timeout`.
pub fn server_config(
    certificate: Arc<ServedCertificate>,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(limits::H3_MAX_CONCURRENT_STREAMS.into())
        .max_concurrent_uni_streams(limits::H3_MAX_UNI_STREAMS.into())
        .stream_receive_window(limits::H2_STREAM_WINDOW.into())
        .receive_window(limits::H2_CONNECTION_WINDOW.into())
        // Beyond QUIC's largest idle timeout (2^62 ms, far beyond any config) means none.
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    config.transport_config(Arc::new(transport)).migration(false);
    Ok(config)
}
