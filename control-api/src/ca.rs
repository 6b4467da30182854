//! The proxies' side of the CA: a certificate request and one signing call.
//!
//! A proxy makes its key in memory and turns it into a CSR with [`certificate_request`] (one URI SAN,
//! its SPIFFE ID, and nothing else: the CA ignores the rest anyway). [`sign`] dials the CA (the control plane's gRPC port), presents the token as
//! `authorization: Bearer`, and returns the chain and trust bundle, or a [`ClientError`] that says
//! whether to retry: a CA that cannot be reached or is unavailable is worth retrying with backoff;
//! a refusal (bad token, not entitled, bad request) will not change until the config does.

use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tonic::metadata::MetadataValue;

use crate::capb::certificate_authority_client::CertificateAuthorityClient;
use crate::capb::{SignRequest, SignResponse};
use crate::identity::SpiffeId;

/// The shortest lifetime the CA signs: a renewal at half-life must have time to happen.
pub const MIN_TTL: Duration = Duration::from_secs(10);
/// The lifetime the CA signs when the request names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest lifetime the CA signs unless its operator sets another cap.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A CSR (PEM) for `identity` and the key `key`: one URI SAN and nothing else.
pub fn certificate_request(identity: &SpiffeId, key: &KeyPair) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.as_str().to_owned().try_into()?)];
    params.serialize_request(key)?.pem()
}

/// Why a signing call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA address is not a URL, or is https:// with no roots to check it.
    #[error("CA address: {0}")]
    Address(String),
    /// The CA could not be reached, or did not answer in time.
    #[error("CA unreachable: {0}")]
    Unreachable(String),
    /// The CA answered with a refusal or an error.
    #[error("CA refused: {code:?}: {message}")]
    Refused {
        /// The gRPC status code.
        code: tonic::Code,
        /// The CA's message.
        message: String,
    },
}

impl ClientError {
    /// Whether the same request might succeed later without any change here.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable(_) => true,
            ClientError::Address(_) => false,
            ClientError::Refused { code, .. } => {
                matches!(code, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Internal)
            }
        }
    }
}

/// Asks the CA at `address` (checked with `tls` when it is `https://`) to sign `csr_pem` for
/// `ttl`, authenticating with `token`, within `timeout`.
pub async fn sign(
    address: &str,
    tls: Option<&crate::grpc::ControlTls>,
    token: &str,
    csr_pem: String,
    ttl: Duration,
    timeout: Duration,
) -> Result<SignResponse, ClientError> {
    if !(address.starts_with("http://") || address.starts_with("https://")) {
        return Err(ClientError::Address(address.to_owned()));
    }
    let bearer: MetadataValue<_> = format!("Bearer {}", token.trim()).parse().map_err(|_| ClientError::Refused {
        code: tonic::Code::InvalidArgument,
        message: "the token is not printable ASCII".into(),
    })?;
    let call = async {
        let channel = crate::grpc::connect(address, tls).await.map_err(|e| match e {
            crate::grpc::DialError::Transport(e) => ClientError::Unreachable(format!("{e}: {e:?}")),
            other => ClientError::Address(other.to_string()),
        })?;
        let mut client = CertificateAuthorityClient::new(channel);
        let ttl = pbjson_types::Duration { seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX), nanos: 0 };
        let mut request = tonic::Request::new(SignRequest { csr: csr_pem, ttl: Some(ttl) });
        request.metadata_mut().insert("authorization", bearer);
        client.sign(request).await.map(tonic::Response::into_inner).map_err(|status| match status.code() {
            tonic::Code::Unavailable if status.message().contains("transport") => {
                ClientError::Unreachable(status.message().to_owned())
            }
            code => ClientError::Refused { code, message: status.message().to_owned() },
        })
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| ClientError::Unreachable("timed out".into()))?
}
