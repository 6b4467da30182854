//! Kubernetes service-account tokens as the CA's credentials, checked by the API server's
//! TokenReview (`remora control --ca-kubernetes`).
//!
//! A pod's proxy presents a projected service-account token whose audience is the CA's (`remora`
//! by default). [`TokenReview`] sends it to `POST /apis/authentication.k8s.io/v1/tokenreviews`,
//! authenticating as the control plane's own service account, and the API server answers whether
//! the token is valid, for that audience, and whose it is. An account
//! `system:serviceaccount:NAMESPACE:NAME` is entitled to exactly
//! `spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/NAME`; any other user, an unauthenticated token, or a
//! token for another audience is refused. The API server unreachable or answering an error is
//! [`AuthError::Unavailable`], so the proxy retries and keeps its current certificate.
//!
//! In a pod the settings come from the environment Kubernetes gives every container
//! ([`TokenReview::in_cluster`]); outside one, from an explicit API server URL, CA file and token
//! file ([`TokenReview::new`]). The control plane's own token is re-read for every review, since
//! projected tokens rotate; the request carries no body the proxy controls beyond its token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use super::auth::{AuthError, Authenticator, Entitlement};
use crate::identity::IdentityPattern;

/// Where a pod's service-account credentials are mounted.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The audience the CA asks tokens to be for, unless told otherwise.
pub const DEFAULT_AUDIENCE: &str = "remora";
/// How long one review may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest TokenReview answer read.
const MAX_ANSWER: usize = 256 * 1024;
const REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// Why the TokenReview client could not be set up.
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

/// Asks the API server who a token belongs to.
#[derive(Clone)]
pub struct TokenReview {
    address: String,
    host: String,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    credential: PathBuf,
    audience: String,
    trust_domain: String,
}

impl std::fmt::Debug for TokenReview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReview").field("api_server", &self.address).field("audience", &self.audience).finish()
    }
}

impl TokenReview {
    /// The client a pod has: the API server from `KUBERNETES_SERVICE_HOST`/`_PORT`, its CA and the
    /// control plane's token from the mounted service account.
    pub fn in_cluster(trust_domain: &str, audience: &str) -> Result<TokenReview, KubernetesError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubernetesError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let directory = Path::new(SERVICE_ACCOUNT_DIR);
        TokenReview::new(
            &format!("https://{host}:{port}"),
            &directory.join("ca.crt"),
            &directory.join("token"),
            trust_domain,
            audience,
        )
    }

    /// A client of the API server at `url` (`https://host[:port]`), trusting the roots in `ca_file`
    /// and authenticating with the token in `token_file`.
    pub fn new(
        url: &str,
        ca_file: &Path,
        token_file: &Path,
        trust_domain: &str,
        audience: &str,
    ) -> Result<TokenReview, KubernetesError> {
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
        let tls = crate::grpc::ControlTls::from_pem(&pem).map_err(ca_error)?;
        Ok(TokenReview {
            address,
            host,
            server_name,
            tls: tokio_rustls::TlsConnector::from(tls.http1_config()),
            credential: token_file.to_owned(),
            audience: audience.to_owned(),
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// Sends one review of `token`; the API server's answer.
    async fn review(&self, token: &str) -> Result<Value, AuthError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| AuthError::Unavailable(format!("{what}: {e}"));
        let own = std::fs::read_to_string(&self.credential)
            .map_err(|e| unavailable(&format!("the control plane's token {}", self.credential.display()), &e))?;
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        });
        let request = http::Request::post(REVIEW_PATH)
            .header(http::header::HOST, &self.host)
            .header(http::header::AUTHORIZATION, format!("Bearer {}", own.trim()))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| unavailable("the review request", &e))?;
        let tcp = TcpStream::connect(&self.address).await.map_err(|e| unavailable(&self.address, &e))?;
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| unavailable(&self.address, &e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| unavailable(&self.address, &e))?;
        tokio::spawn(connection);
        let response = sender.send_request(request).await.map_err(|e| unavailable(&self.address, &e))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| unavailable("the review answer", &e))?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            return Err(AuthError::Unavailable(format!("the API server answered {status}: {text}")));
        }
        serde_json::from_slice(&bytes).map_err(|e| unavailable("the review answer", &e))
    }

    /// What the API server's answer entitles the token's holder to.
    fn entitlement(&self, answer: &Value) -> Result<Entitlement, AuthError> {
        let status = &answer["status"];
        if status["authenticated"] != Value::Bool(true) {
            return Err(AuthError::Unknown);
        }
        // An API server that knows audiences says which the token is for; it must be ours.
        if let Some(audiences) = status["audiences"].as_array()
            && !audiences.iter().any(|a| a.as_str() == Some(&self.audience))
        {
            return Err(AuthError::Unknown);
        }
        let username = status["user"]["username"].as_str().unwrap_or_default();
        let account = username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'));
        let Some((namespace, name)) = account.filter(|(ns, sa)| valid_name(ns) && valid_name(sa)) else {
            return Err(AuthError::Unknown);
        };
        let id = format!("spiffe://{}/ns/{namespace}/sa/{name}", self.trust_domain);
        let pattern = IdentityPattern::parse(&id).map_err(|e| AuthError::Unavailable(e.to_string()))?;
        Ok(Entitlement { identities: vec![pattern] })
    }
}

/// A Kubernetes namespace or service-account name (a DNS label or subdomain): nothing a SPIFFE
/// path or glob could read differently.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl Authenticator for TokenReview {
    async fn authenticate(&self, token: &str) -> Result<Entitlement, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let answer = tokio::time::timeout(REVIEW_TIMEOUT, self.review(token)).await.map_err(|_| {
            AuthError::Unavailable(format!("the API server at {} did not answer in time", self.address))
        })??;
        self.entitlement(&answer)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn review() -> TokenReview {
        // Tests run in parallel: each call gets a directory of its own.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ca = crate::ca::Authority::generate("cluster.local").unwrap();
        let dir = std::env::temp_dir().join(format!("remora-tokenreview-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.root_pem()).unwrap();
        TokenReview::new("https://10.96.0.1:443", &dir.join("ca.crt"), &dir.join("token"), "cluster.local", "remora")
            .unwrap()
    }

    #[test]
    fn a_service_account_is_entitled_to_its_own_spiffe_id_only() {
        let review = review();
        let answer = json!({"status": {"authenticated": true, "audiences": ["remora"],
                                       "user": {"username": "system:serviceaccount:shop:web"}}});
        let entitlement = review.entitlement(&answer).unwrap();
        assert_eq!(
            entitlement.identities,
            vec![IdentityPattern::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap()]
        );
        for refused in [
            json!({"status": {"authenticated": false}}),
            json!({"status": {"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
                              "user": {"username": "system:serviceaccount:shop:web"}}}),
            json!({"status": {"authenticated": true, "user": {"username": "alice@example.com"}}}),
            json!({"status": {"authenticated": true, "user": {"username": "system:serviceaccount:shop:*"}}}),
            json!({"status": {"authenticated": true, "user": {"username": "system:serviceaccount:shop"}}}),
        ] {
            assert!(matches!(review.entitlement(&refused), Err(AuthError::Unknown)), "{refused}");
        }
    }

    #[test]
    fn urls_and_files_are_checked() {
        let dir = std::env::temp_dir();
        for bad in ["http://10.0.0.1", "https://", "https://host/path", "10.0.0.1:443"] {
            assert!(matches!(
                TokenReview::new(bad, &dir.join("x"), &dir.join("y"), "td", "a"),
                Err(KubernetesError::Url(_))
            ));
        }
        let error = TokenReview::new("https://10.0.0.1", &dir.join("remora-no-such-ca"), &dir, "td", "a").unwrap_err();
        assert!(error.to_string().contains("remora-no-such-ca"), "{error}");
        let ok = review();
        assert_eq!((ok.address.as_str(), ok.host.as_str()), ("10.96.0.1:443", "10.96.0.1:443"));
    }
}
