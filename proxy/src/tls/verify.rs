//! Checking a peer sidecar's certificate: the chain to the trust bundle, and the SPIFFE ID it names.
//!
//! Web PKI checks a server's certificate against the host name dialled; a mesh has no such name (the
//! endpoint is an IP address, and the identity is a URI SAN), so [`SpiffeServerVerifier`] checks the
//! chain and leaves the identity to the caller, who knows which identities the endpoint may present
//! (`tls::Expected`) once the handshake is done. Client certificates go through rustls's own
//! `WebPkiClientVerifier`, which checks chains without names. [`peer_identity`] reads the SPIFFE ID
//! out of a verified leaf, either way.

use std::sync::Arc;
use std::time::SystemTime;

use remora_control_api::identity::{CertificateIdentityError, SpiffeId, certificate_identity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

/// Verifies server chains against the mesh's roots; the name dialled plays no part.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    roots: Vec<TrustAnchor<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier trusting `roots`, with `provider`'s signature algorithms.
    pub(crate) fn new(roots: &[CertificateDer<'static>], provider: &Arc<CryptoProvider>) -> Result<Self, Error> {
        let roots = roots
            .iter()
            .map(|root| webpki::anchor_from_trusted_cert(root).map(|anchor| anchor.to_owned()).map_err(pki_error))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SpiffeServerVerifier { roots, algorithms: provider.signature_verification_algorithms })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The configs allow TLS 1.3 only; a TLS 1.2 signature is never asked for.
        Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// webpki's verdicts in rustls's terms (rustls's own mapping is private).
fn pki_error(error: webpki::Error) -> Error {
    use webpki::Error as E;
    match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding.into(),
        E::CertNotValidYet { .. } => CertificateError::NotValidYet.into(),
        E::CertExpired { .. } | E::InvalidCertValidity => CertificateError::Expired.into(),
        E::UnknownIssuer => CertificateError::UnknownIssuer.into(),
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature.into(),
        E::CertRevoked => CertificateError::Revoked.into(),
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))).into(),
    }
}

/// Why a verified certificate does not say who its holder is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The peer sent no certificate.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// Its certificate does not name one workload identity (or had expired: checked again after a
    /// resumed handshake, which skips the chain check).
    #[error(transparent)]
    Certificate(#[from] CertificateIdentityError),
}

/// The SPIFFE ID in `leaf`'s one URI SAN, and when the leaf expires. Refuses a leaf past its
/// `not_after` at `now`.
pub fn peer_identity(leaf: &CertificateDer<'_>, now: SystemTime) -> Result<(SpiffeId, SystemTime), IdentityError> {
    Ok(certificate_identity(leaf, Some(now))?)
}
