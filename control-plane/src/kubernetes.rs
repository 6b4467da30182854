//! The control plane's client of the Kubernetes API server: kube-rs's [`kube::Client`], which the
//! CA's TokenReviews (`ca::kubernetes`), the injector's `caBundle` upkeep (`inject::ca_bundle`) and
//! the cluster source (`sources::cluster`, kube-runtime's watchers) send their requests through.
//!
//! [`client`] sets it up from a [`KubernetesApi`]: in a pod, from the environment every pod gets
//! (`KUBERNETES_SERVICE_HOST`/`_PORT`, the mounted service account's CA and token); outside one,
//! from an explicit `https://` URL, a PEM file of roots and a token file. Either way the token file
//! is re-read as it rotates (projected tokens do, hourly) and the roots file too, so neither a
//! token rotation nor a cluster CA rotation needs a restart. Connections are pooled and kept alive:
//! the watches last minutes and the reviews come in bursts.

use std::path::PathBuf;

/// Why the client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// Not in a pod: the API server's address or the service account is not there.
    #[error("not running in a Kubernetes pod: {0}")]
    NotInCluster(String),
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
    /// The token file could not be read, or does not hold a token alone.
    #[error("{}: {message}", path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The client could not be built from a valid configuration.
    #[error("the Kubernetes client: {0}")]
    Client(String),
}

/// How the control plane reaches the Kubernetes API server.
#[derive(Clone, Debug)]
pub enum KubernetesApi {
    /// From inside a pod: the environment and the mounted service account.
    InCluster,
    /// An explicit API server (outside a cluster, or a proxy in front of it).
    Explicit {
        /// `https://host[:port]`.
        url: String,
        /// PEM roots its certificate chains to.
        ca_file: PathBuf,
        /// The control plane's own bearer token.
        token_file: PathBuf,
    },
}

/// A client of the API server `api` names, authenticating as the control plane. Must be called
/// on a tokio runtime (the client's connection pool runs on it).
pub fn client(api: &KubernetesApi) -> Result<kube::Client, KubernetesError> {
    let config = match api {
        KubernetesApi::InCluster => {
            kube::Config::incluster().map_err(|e| KubernetesError::NotInCluster(e.to_string()))?
        }
        KubernetesApi::Explicit { url, ca_file, token_file } => explicit(url, ca_file, token_file)?,
    };
    from_config(config)
}

/// A client of the API server `config` describes.
pub(crate) fn from_config(config: kube::Config) -> Result<kube::Client, KubernetesError> {
    // kube's TLS takes rustls's process-wide provider, which rustls cannot choose itself when both
    // of its providers are built in (the mesh's mTLS needs aws-lc-rs): ring, as everything but the
    // mesh uses. A provider already installed stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    kube::Client::try_from(config).map_err(|e| KubernetesError::Client(e.to_string()))
}

/// The configuration of an explicit API server, checked: the URL is `https://host[:port]`, and the
/// roots file holds a certificate.
fn explicit(
    url: &str,
    ca_file: &std::path::Path,
    token_file: &std::path::Path,
) -> Result<kube::Config, KubernetesError> {
    let bad = || KubernetesError::Url(url.to_owned());
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https")
        || uri.authority().is_none()
        || !matches!(uri.path(), "" | "/")
        || uri.query().is_some()
    {
        return Err(bad());
    }
    let ca_error = |message: String| KubernetesError::Ca { path: ca_file.to_owned(), message };
    let pem = std::fs::read(ca_file).map_err(|e| ca_error(e.to_string()))?;
    let roots: Vec<Vec<u8>> = rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .map(|cert: Result<rustls::pki_types::CertificateDer<'static>, _>| cert.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| ca_error(format!("not PEM certificates: {e}")))?;
    if roots.is_empty() {
        return Err(ca_error("holds no certificate".into()));
    }
    // The token is sent as the file holds it (re-read as it rotates): a trailing newline would
    // make every request's header invalid, so it is refused here, by name.
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| KubernetesError::Token { path: token_file.to_owned(), message: e.to_string() })?;
    if token.is_empty() || token.trim() != token {
        let message = "must hold the token alone, with no whitespace or newline around it (printf '%s' TOKEN > FILE)";
        return Err(KubernetesError::Token { path: token_file.to_owned(), message: message.into() });
    }
    let mut config = kube::Config::new(uri);
    config.root_cert = Some(roots);
    config.root_cert_file = Some(ca_file.to_owned());
    config.auth_info.token_file = Some(token_file.display().to_string());
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn urls_and_files_are_checked() {
        let dir = std::env::temp_dir();
        for bad in ["http://10.0.0.1", "https://", "https://host/path", "10.0.0.1:443", "https://h?x=1"] {
            assert!(matches!(explicit(bad, &dir.join("x"), &dir.join("y")), Err(KubernetesError::Url(_))), "{bad}");
        }
        let error = explicit("https://10.0.0.1", &dir.join("remora-no-such-ca"), &dir).unwrap_err();
        assert!(error.to_string().contains("remora-no-such-ca"), "{error}");
        let ca = crate::ca::Authority::generate("cluster.local").unwrap();
        let ca_file = dir.join(format!("remora-api-client-{}.crt", std::process::id()));
        std::fs::write(&ca_file, "no certificate here").unwrap();
        let error = explicit("https://10.0.0.1", &ca_file, &dir).unwrap_err();
        assert!(error.to_string().contains("holds no certificate"), "{error}");
        std::fs::write(&ca_file, ca.root_pem()).unwrap();
        let token = dir.join(format!("remora-api-token-{}", std::process::id()));
        std::fs::write(&token, "abc\n").unwrap();
        let error = explicit("https://10.96.0.1", &ca_file, &token).unwrap_err();
        assert!(error.to_string().contains("no whitespace or newline"), "{error}");
        std::fs::write(&token, "abc").unwrap();
        let config = explicit("https://10.96.0.1", &ca_file, &token).unwrap();
        assert_eq!(config.cluster_url.to_string(), "https://10.96.0.1/");
        assert_eq!(config.root_cert.map(|roots| roots.len()), Some(1));
        let _ = std::fs::remove_file(ca_file);
        let _ = std::fs::remove_file(token);
    }
}
