//! Credentials from the control plane's CA: a key made here, a certificate signed there, renewed at
//! half its life.
//!
//! [`run`] makes a fresh ECDSA P-256 key in memory for every certificate (the key never leaves the
//! process), sends a CSR naming only this proxy's SPIFFE ID with the token from the token file, and
//! installs what comes back. It renews when half of the certificate's lifetime has passed; a renewal
//! that fails is retried with jittered exponential backoff (`RENEW_BACKOFF_FIRST` to
//! `RENEW_BACKOFF_MAX`), counted (`remora_identity_renewals_total{result="failed"}`), and the
//! certificate in use keeps serving meanwhile. When it expires with no renewal in hand, new mesh
//! handshakes fail with a clear error — the peer refuses it — and the renewals go on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::KeyPair;
use remora_control_api::ca;
use remora_control_api::identity::SpiffeId;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::{error, info, warn};

use super::{Credentials, MeshTls, TlsError};
use crate::limits;

/// Where certificates come from, and for whom.
#[derive(Clone, Debug)]
pub struct IssuerSettings {
    /// The identity asked for.
    pub identity: SpiffeId,
    /// The CA's URL.
    pub ca_address: String,
    /// The file holding the bearer token (read at every renewal).
    pub token_file: PathBuf,
    /// The lifetime asked for.
    pub ttl: Duration,
    /// The roots an `https://` CA's certificate must chain to.
    pub ca_tls: Option<remora_control_api::grpc::ControlTls>,
}

/// Why one issuance failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The token file could not be read.
    #[error("token file {}: {error}", path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The key or the CSR could not be made.
    #[error("certificate request: {0}")]
    Request(rcgen::Error),
    /// The CA call failed.
    #[error(transparent)]
    Ca(ca::ClientError),
    /// The CA's answer does not make valid credentials for this identity.
    #[error("the CA's certificate: {0}")]
    Answer(TlsError),
}

/// One issuance: key, CSR, signing call, checked credentials.
pub async fn issue(settings: &IssuerSettings) -> Result<Credentials, IssueError> {
    let token = std::fs::read_to_string(&settings.token_file)
        .map_err(|error| IssueError::Token { path: settings.token_file.clone(), error })?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(IssueError::Request)?;
    let csr = ca::certificate_request(&settings.identity, &key).map_err(IssueError::Request)?;
    let signed = ca::sign(
        &settings.ca_address,
        settings.ca_tls.as_ref(),
        token.trim(),
        csr,
        settings.ttl,
        limits::CA_CALL_TIMEOUT,
    )
    .await
    .map_err(IssueError::Ca)?;
    let chain = super::certificates(signed.certificate_chain.join("\n").as_bytes(), "certificate chain");
    let roots = super::certificates(signed.trust_bundle.join("\n").as_bytes(), "trust bundle");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let credentials = chain.and_then(|chain| Credentials::new(chain, key, roots?)).map_err(IssueError::Answer)?;
    if credentials.identity() != &settings.identity {
        return Err(IssueError::Answer(TlsError::Credentials(format!(
            "issued for {}, asked for {}",
            credentials.identity(),
            settings.identity
        ))));
    }
    Ok(credentials)
}

/// When to renew a certificate valid until `not_after`, issued (or first seen) at `issued`: half-way.
fn renew_at(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or_default();
    issued + life / 2
}

/// Keeps `mesh` supplied with certificates for `settings.identity` until dropped. `issued` is
/// called once, when the first certificate is in place (readiness waits for it).
pub async fn run(settings: IssuerSettings, mesh: Arc<MeshTls>, issued: impl FnOnce() + Send) {
    let mut first = Some(issued);
    let mut backoff = limits::RENEW_BACKOFF_FIRST;
    loop {
        let started = SystemTime::now();
        match issue(&settings).await {
            Ok(credentials) => {
                let not_after = credentials.not_after();
                if let Err(error) = mesh.install(credentials) {
                    // Checked in `issue`; a failure here is a bug in the configs, reported all the same.
                    error!(%error, "the issued certificate could not be installed");
                }
                mesh.stats().renewal("ok");
                backoff = limits::RENEW_BACKOFF_FIRST;
                let expires = not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
                info!(identity = %settings.identity, expires, "certificate issued");
                if let Some(issued) = first.take() {
                    issued();
                }
                let wait = renew_at(started, not_after).duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(wait).await;
            }
            Err(error) => {
                mesh.stats().renewal("failed");
                let remaining = mesh.not_after().map(|t| t.duration_since(SystemTime::now()));
                match remaining {
                    Some(Ok(left)) => {
                        warn!(%error, left_s = left.as_secs(), "certificate renewal failed; the current certificate keeps serving")
                    }
                    Some(Err(_)) => {
                        error!(%error, "certificate renewal failed and the certificate has expired: mesh connections will fail until a renewal succeeds")
                    }
                    None => warn!(%error, "no certificate yet: the CA could not issue one"),
                }
                if matches!(&error, IssueError::Ca(e) if !e.is_transient()) {
                    // A refusal will not change by itself soon; keep trying, at the slowest pace.
                    backoff = limits::RENEW_BACKOFF_MAX;
                }
                let jittered = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
                tokio::time::sleep(jittered).await;
                backoff = (backoff * 2).min(limits::RENEW_BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(renew_at(t0, t0 + Duration::from_secs(30)), t0 + Duration::from_secs(15));
        assert_eq!(renew_at(t0, t0), t0);
    }
}
