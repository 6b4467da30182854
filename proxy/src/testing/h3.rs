//! An HTTP/3 client for benches and tests: quinn and h3's client, one QUIC connection, trusting the
//! roots it is given. (The tests' independent HTTP/3 client is aioquic, in `tests/e2e`.)

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, StatusCode};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// One HTTP/3 connection.
pub struct H3Client {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    authority: String,
    _endpoint: quinn::Endpoint,
}

impl H3Client {
    /// Connects to `address`, verifying its certificate for `server_name` against the PEM `roots`.
    pub async fn connect(address: SocketAddr, roots: &[u8], server_name: &str) -> H3Client {
        let mut store = rustls::RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(roots) {
            store.add(root.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        let bind: SocketAddr = if address.is_ipv6() { "[::1]:0" } else { "127.0.0.1:0" }.parse().unwrap();
        let endpoint = quinn::Endpoint::client(bind).unwrap();
        let connection = endpoint.connect_with(config, address, server_name).unwrap().await.unwrap();
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(connection)).await.unwrap();
        tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
        H3Client { send, authority: format!("{server_name}:{}", address.port()), _endpoint: endpoint }
    }

    /// GETs `path`; the status and the whole body.
    pub async fn get(&mut self, path: &str) -> (StatusCode, Bytes) {
        let request = Request::get(format!("https://{}{path}", self.authority)).body(()).unwrap();
        let mut stream = self.send.send_request(request).await.unwrap();
        stream.finish().await.unwrap();
        let response = stream.recv_response().await.unwrap();
        let mut body = BytesMut::new();
        while let Some(mut chunk) = stream.recv_data().await.unwrap() {
            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        (response.status(), body.freeze())
    }
}

/// Whether a QUIC connection to `address` offering ALPN `h3` and presenting `identity` (a PEM chain
/// and key; none: no client certificate) is accepted: HTTP/3 starts on it and a `CONNECT` to an
/// address that is not the server's gets an answer (any status). A server that refuses the
/// certificate closes the connection instead. The server's certificate is not checked (a mesh
/// peer's names only a SPIFFE ID).
pub async fn mesh_handshake(address: SocketAddr, identity: Option<(&str, &str)>) -> bool {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(remora_control_api::testing::AnyServerCert(provider)));
    let mut tls = match identity {
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let Ok(connecting) = endpoint.connect_with(config, address, "127.0.0.1") else { return false };
    let exchange = async {
        let connection = connecting.await.ok()?;
        let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(connection.clone())).await.ok()?;
        tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
        let mut request = Request::new(());
        *request.method_mut() = http::Method::CONNECT;
        *request.uri_mut() = http::Uri::from_static("192.0.2.1:9");
        let mut stream = send.send_request(request).await.ok()?;
        let answered = stream.recv_response().await.ok().map(|_| ());
        connection.close(0u32.into(), b"");
        answered
    };
    matches!(tokio::time::timeout(std::time::Duration::from_secs(10), exchange).await, Ok(Some(())))
}
