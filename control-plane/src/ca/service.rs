//! The CA's gRPC service, `remora.ca.v1.CertificateAuthority/Sign`, on the control plane's port.
//!
//! A request arrives with a CSR and a bearer token (`authorization` metadata); the token goes to the
//! [`Authenticator`], the CSR and what the token entitles to the [`Authority`], and the answer is the
//! signed chain and the trust bundle, or a status that says which of those refused: unauthenticated
//! (no or unknown token), permission denied (not entitled to the ID), invalid argument (a bad CSR),
//! unavailable (the authenticator could not decide). Every outcome is counted and logged with the
//! identity asked for.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::auth::{AuthError, Authenticator, bearer_token};
use super::{Authority, SignError};
use crate::metrics::ControlMetrics;
use crate::servers::remora::ca::v1::certificate_authority_server::{CertificateAuthority, CertificateAuthorityServer};
use remora_control_api::capb::{SignRequest, SignResponse};

/// Largest signing request accepted: a CSR is well under 1 KiB.
const MAX_REQUEST: usize = 64 * 1024;

/// The signing service over one authority and authenticator.
#[derive(Debug)]
pub struct CaService<A> {
    authority: Arc<Authority>,
    authenticator: Arc<A>,
    metrics: Arc<ControlMetrics>,
}

impl<A: Authenticator> CaService<A> {
    /// A service signing with `authority` for callers `authenticator` accepts.
    pub fn new(authority: Arc<Authority>, authenticator: Arc<A>, metrics: Arc<ControlMetrics>) -> Self {
        CaService { authority, authenticator, metrics }
    }

    /// The tonic service to add to a router.
    pub fn into_service(self) -> CertificateAuthorityServer<CaService<A>> {
        CertificateAuthorityServer::new(self).max_decoding_message_size(MAX_REQUEST)
    }
}

#[tonic::async_trait]
impl<A: Authenticator> CertificateAuthority for CaService<A> {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let token = bearer_token(request.metadata());
        let peer = crate::tls::Peer::of(&request).address.map_or_else(|| "-".to_owned(), |a| a.to_string());
        let entitlement = match self.authenticator.authenticate(&token).await {
            Ok(entitlement) => entitlement,
            Err(error @ (AuthError::Missing | AuthError::Unknown)) => {
                self.metrics.certificate_request("unauthenticated");
                warn!(%peer, %error, "certificate request refused");
                return Err(Status::unauthenticated(error.to_string()));
            }
            Err(error @ AuthError::Unavailable(_)) => {
                self.metrics.certificate_request("error");
                warn!(%peer, %error, "certificate request could not be authenticated");
                return Err(Status::unavailable(error.to_string()));
            }
        };
        let request = request.into_inner();
        let ttl = match request.ttl {
            None => None,
            Some(ttl) => match u64::try_from(ttl.seconds) {
                Ok(seconds) if (0..1_000_000_000).contains(&ttl.nanos) => {
                    Some(Duration::from_secs(seconds) + Duration::from_nanos(ttl.nanos.unsigned_abs().into()))
                }
                _ => {
                    self.metrics.certificate_request("invalid");
                    return Err(Status::invalid_argument("ttl must be a positive duration"));
                }
            },
        };
        match self.authority.sign(&request.csr, &entitlement.identities, ttl) {
            Ok(signed) => {
                self.metrics.certificate_request("signed");
                let expires = signed.not_after.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
                info!(%peer, identity = %signed.identity, expires, "certificate signed");
                Ok(Response::new(SignResponse { certificate_chain: signed.chain, trust_bundle: signed.trust_bundle }))
            }
            Err(error) => {
                let (result, status) = match &error {
                    SignError::BadRequest(_) => ("invalid", Status::invalid_argument(error.to_string())),
                    SignError::NotEntitled(_) => ("denied", Status::permission_denied(error.to_string())),
                    SignError::Internal(_) => ("error", Status::internal(error.to_string())),
                };
                self.metrics.certificate_request(result);
                warn!(%peer, %error, "certificate request refused");
                Err(status)
            }
        }
    }
}
