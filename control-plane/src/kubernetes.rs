//! The control plane's client of the Kubernetes API server: what the CA's TokenReviews
//! (`ca::kubernetes`), the injector's `caBundle` upkeep (`inject::ca_bundle`) and the EndpointSlice
//! source (`control::endpoint_slices`) send their requests through.
//!
//! [`ApiClient::in_cluster`] takes the API server's address from the environment every pod gets
//! (`KUBERNETES_SERVICE_HOST`/`_PORT`) and the cluster CA and the control plane's own token from the
//! mounted service account; [`ApiClient::new`] takes them explicitly (outside a cluster, or for a
//! stand-in server in tests). [`ApiClient::send`] opens a connection (TLS 1.3, the server checked
//! against the cluster CA), sends one request as the control plane (its bearer token, re-read every
//! time, since projected tokens rotate), and returns the status and the answer (capped at 1 MiB);
//! [`ApiClient::get`] reads a larger list, and [`ApiClient::stream`] hands back a watch's answer as
//! it streams. Requests are rare (a review per certificate request, a check a minute, a watch that
//! lasts minutes), so nothing is pooled.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Where a pod's service-account credentials are mounted.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The largest answer read.
const MAX_ANSWER: usize = 1024 * 1024;

/// Why the client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// Not in a pod: the API server's address is not in the environment.
    #[error("not running in a Kubernetes pod: KUBERNETES_SERVICE_HOST is not set")]
    NotInCluster,
    /// The API server URL is not `https://host[:port]`.
    #[error("the API server URL {0:?} must be https://HOST[:PORT]")]
    Url(String),
    /// The cluster CA file could not be read or holds no certificate.
    #[error("{}: {message}", path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Why a request got no answer (an answer with an error status is an answer).
#[derive(Debug, thiserror::Error)]
#[error("the API server at {address}: {message}")]
pub struct ApiError {
    /// The API server.
    pub address: String,
    /// What went wrong.
    pub message: String,
}

/// A client of one API server, authenticating as the control plane.
#[derive(Clone)]
pub struct ApiClient {
    address: String,
    host: String,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    credential: PathBuf,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient").field("api_server", &self.address).finish()
    }
}

impl ApiClient {
    /// The client a pod has: the API server from the environment, its CA and the control plane's
    /// token from the mounted service account.
    pub fn in_cluster() -> Result<ApiClient, KubernetesError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubernetesError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let directory = Path::new(SERVICE_ACCOUNT_DIR);
        ApiClient::new(&format!("https://{host}:{port}"), &directory.join("ca.crt"), &directory.join("token"))
    }

    /// A client of the API server at `url` (`https://host[:port]`), trusting the roots in `ca_file`
    /// and authenticating with the token in `token_file`.
    pub fn new(url: &str, ca_file: &Path, token_file: &Path) -> Result<ApiClient, KubernetesError> {
        let bad = || KubernetesError::Url(url.to_owned());
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("https") || !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?;
        let host = authority.as_str().to_owned();
        let address = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(443));
        let bare = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        let server_name = ServerName::try_from(bare).map_err(|_| bad())?;
        let ca_error = |message: String| KubernetesError::Ca { path: ca_file.to_owned(), message };
        let pem = std::fs::read(ca_file).map_err(|e| ca_error(e.to_string()))?;
        let tls = remora_control_api::grpc::ControlTls::from_pem(&pem).map_err(ca_error)?;
        Ok(ApiClient {
            address,
            host,
            server_name,
            tls: tokio_rustls::TlsConnector::from(tls.http1_config()),
            credential: token_file.to_owned(),
        })
    }

    /// The API server's `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sends `method path` with a JSON `body` of `content_type` (none for a bodiless request);
    /// the answer's status and body (up to 1 MiB).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let response = self.exchange(method, path, content_type, body).await?;
        self.collect(response, MAX_ANSWER).await
    }

    /// `GET path`, the answer read whole up to `limit` bytes: for a list.
    pub async fn get(&self, path: &str, limit: usize) -> Result<(StatusCode, Bytes), ApiError> {
        let response = self.exchange(Method::GET, path, None, Bytes::new()).await?;
        self.collect(response, limit).await
    }

    /// `GET path` and the answer as it streams: for a watch, whose events arrive one JSON object
    /// per line for as long as the API server keeps the request open.
    pub async fn stream(&self, path: &str) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
        self.exchange(Method::GET, path, None, Bytes::new()).await
    }

    fn fail(&self, what: &str, e: &dyn std::fmt::Display) -> ApiError {
        ApiError { address: self.address.clone(), message: format!("{what}: {e}") }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
        let own = std::fs::read_to_string(&self.credential)
            .map_err(|e| self.fail(&format!("the control plane's token {}", self.credential.display()), &e))?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host)
            .header(http::header::AUTHORIZATION, format!("Bearer {}", own.trim()))
            .header(http::header::ACCEPT, "application/json");
        if let Some(content_type) = content_type {
            request = request.header(http::header::CONTENT_TYPE, content_type);
        }
        let request = request.body(Full::new(body)).map_err(|e| self.fail("the request", &e))?;
        let tcp = TcpStream::connect(&self.address).await.map_err(|e| self.fail("connect", &e))?;
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| self.fail("TLS", &e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| self.fail("HTTP handshake", &e))?;
        tokio::spawn(connection);
        sender.send_request(request).await.map_err(|e| self.fail("request", &e))
    }

    async fn collect(
        &self,
        response: http::Response<hyper::body::Incoming>,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let status = response.status();
        let bytes = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| self.fail("the answer", &e))?
            .to_bytes();
        Ok((status, bytes))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn urls_and_files_are_checked() {
        let dir = std::env::temp_dir();
        for bad in ["http://10.0.0.1", "https://", "https://host/path", "10.0.0.1:443"] {
            assert!(matches!(ApiClient::new(bad, &dir.join("x"), &dir.join("y")), Err(KubernetesError::Url(_))));
        }
        let error = ApiClient::new("https://10.0.0.1", &dir.join("remora-no-such-ca"), &dir).unwrap_err();
        assert!(error.to_string().contains("remora-no-such-ca"), "{error}");
        let ca = crate::ca::Authority::generate("cluster.local").unwrap();
        let ca_file = dir.join(format!("remora-api-client-{}.crt", std::process::id()));
        std::fs::write(&ca_file, ca.root_pem()).unwrap();
        let ok = ApiClient::new("https://10.96.0.1", &ca_file, &dir.join("token")).unwrap();
        assert_eq!((ok.address.as_str(), ok.host.as_str()), ("10.96.0.1:443", "10.96.0.1"));
        let _ = std::fs::remove_file(ca_file);
    }
}
