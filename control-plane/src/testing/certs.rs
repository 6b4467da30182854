//! Certificates made in the test: a CA, workload certificates written to files for the proxies'
//! static-files identity, and a raw rustls client for poking at an inbound listener directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::KeyPair;
use remora_control_api::identity::SpiffeId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use crate::ca::Authority;

/// A CA for one trust domain.
pub struct TestCa {
    authority: Authority,
}

/// One workload's certificate, key and trust bundle, in PEM.
pub struct IssuedPem {
    /// The leaf.
    pub cert: String,
    /// Its key.
    pub key: String,
    /// The CA's root.
    pub ca: String,
}

impl TestCa {
    /// A fresh CA for `trust_domain`.
    pub fn new(trust_domain: &str) -> TestCa {
        TestCa { authority: Authority::generate(trust_domain).unwrap() }
    }

    /// A certificate for `id`, valid from `not_before` to `not_after`.
    pub fn issue_between(&self, id: &str, not_before: SystemTime, not_after: SystemTime) -> IssuedPem {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = self.authority.issue(&SpiffeId::parse(id).unwrap(), &key, not_before, not_after).unwrap();
        IssuedPem { cert, key: key.serialize_pem(), ca: self.authority.root_pem().to_owned() }
    }

    /// A server certificate for `names` (DNS names or IP addresses), as the control plane's.
    pub fn serving(&self, names: &[&str]) -> IssuedPem {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let (cert, key) =
            self.authority.serving_certificate(&names, std::time::Duration::from_secs(365 * 24 * 3600)).unwrap();
        IssuedPem { cert, key, ca: self.authority.root_pem().to_owned() }
    }

    /// A TLS 1.3 server config (h2 and http/1.1) serving a certificate for `names`, with the root
    /// in its chain: for the HTTPS servers tests stand up (collectors, the Kubernetes API).
    pub fn server_config(&self, names: &[&str]) -> std::sync::Arc<rustls::ServerConfig> {
        let serving = self.serving(names);
        crate::tls::pem_config(&format!("{}{}", serving.cert, serving.ca), &serving.key).unwrap()
    }

    /// A certificate for `id`, valid for the next hour.
    pub fn issue(&self, id: &str) -> IssuedPem {
        let now = SystemTime::now();
        self.issue_between(id, now - Duration::from_secs(60), now + Duration::from_secs(3600))
    }
}

impl IssuedPem {
    /// Writes `cert.pem`, `key.pem` and `ca.pem` into `dir`; returns their paths in that order.
    pub fn write(&self, dir: &Path) -> [PathBuf; 3] {
        std::fs::create_dir_all(dir).unwrap();
        let paths = ["cert.pem", "key.pem", "ca.pem"].map(|name| dir.join(name));
        for (path, text) in paths.iter().zip([&self.cert, &self.key, &self.ca]) {
            std::fs::write(path, text).unwrap();
        }
        paths
    }

    /// The bootstrap lines that make a proxy use these files (under `bootstrap:`).
    pub fn bootstrap_identity(&self, dir: &Path) -> String {
        let [cert, key, ca] = self.write(dir);
        format!(
            "  identity:\n    cert_file: {}\n    key_file: {}\n    ca_file: {}\n",
            cert.display(),
            key.display(),
            ca.display()
        )
    }

    /// Opens mesh TLS to `address` as this workload, offering `alpn`, as a peer sidecar would.
    pub async fn connect(
        &self,
        address: std::net::SocketAddr,
        alpn: &[u8],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.connect_with(address, alpn, rustls::crypto::ring::default_provider()).await
    }

    /// [`IssuedPem::connect`] with the key exchange a post-quantum sidecar offers first
    /// (X25519MLKEM768, from rustls's aws-lc-rs provider).
    pub async fn connect_post_quantum(
        &self,
        address: std::net::SocketAddr,
        alpn: &[u8],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        use rustls::crypto::aws_lc_rs::kx_group;
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = vec![kx_group::X25519MLKEM768, kx_group::X25519];
        self.connect_with(address, alpn, provider).await
    }

    async fn connect_with(
        &self,
        address: std::net::SocketAddr,
        alpn: &[u8],
        provider: rustls::crypto::CryptoProvider,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let stream = TcpStream::connect(address).await?;
        let name = ServerName::IpAddress(address.ip().into());
        let config = self.client_config(alpn, provider);
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await
    }

    /// The ClientHello this workload's sidecar would open mesh TLS with, offering `alpn`: for tests
    /// that send it and then stall.
    pub fn client_hello(&self, alpn: &[u8]) -> Vec<u8> {
        let name = ServerName::try_from("api").unwrap();
        let config = self.client_config(alpn, rustls::crypto::ring::default_provider());
        let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        while connection.wants_write() {
            connection.write_tls(&mut hello).unwrap();
        }
        hello
    }

    fn client_config(&self, alpn: &[u8], provider: rustls::crypto::CryptoProvider) -> rustls::ClientConfig {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert.as_bytes()).collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(self.ca.as_bytes()) {
            roots.add(root.unwrap()).unwrap();
        }
        let provider = Arc::new(provider);
        let verifier = Arc::new(remora_control_api::testing::AnyServerCert(provider.clone()));
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![alpn.to_vec()];
        config
    }
}
