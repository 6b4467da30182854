//! The mesh's certificate authority: a root key and certificate, and the signing of workload
//! certificates (X.509-SVIDs) for proxies that prove who they are.
//!
//! An [`Authority`] is made once when `remora control` starts, from a root given as files or one it
//! generates into (and reloads from) a directory. A signing request enters [`Authority::sign`] as a
//! PEM CSR plus what the caller's token entitles it to ([`auth`]); it leaves as a short-lived leaf
//! certificate whose only name is the SPIFFE ID, as a URI SAN: no common name, no DNS name, nothing
//! a peer could mistake for an identity. Everything in the CSR but its public key and that one URI is
//! ignored. [`service`] serves it over gRPC; `remora_control_api::ca` is the proxies' side of that call.

pub mod auth;
pub mod kubernetes;
pub mod service;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use remora_control_api::identity::{IdentityPattern, SpiffeId};

/// A generated root lives this long.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long before they are signed, so a peer whose clock runs a little behind
/// accepts them at once.
const BACKDATE: Duration = Duration::from_secs(60);
pub use remora_control_api::ca::{DEFAULT_MAX_TTL, DEFAULT_TTL, MIN_TTL};

/// The files a root is kept in, inside the CA directory.
const ROOT_CERT_FILE: &str = "ca.crt";
const ROOT_KEY_FILE: &str = "ca.key";

/// Why the CA could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A root file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A root file holds no usable certificate or key.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The trust domain is not one.
    #[error("trust domain {0:?}: must be lower-case letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    /// Key generation or signing failed.
    #[error("generating the root: {0}")]
    Generate(rcgen::Error),
}

/// Why a signing request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The CSR is malformed, badly signed, or asks for something other than one SPIFFE ID.
    #[error("bad certificate request: {0}")]
    BadRequest(String),
    /// The caller's token does not entitle it to the identity it asked for.
    #[error("not entitled to {0}")]
    NotEntitled(String),
    /// Signing itself failed.
    #[error("signing failed: {0}")]
    Internal(rcgen::Error),
}

/// A signed workload certificate.
#[derive(Clone, Debug)]
pub struct Signed {
    /// The identity it carries.
    pub identity: SpiffeId,
    /// PEM, the leaf first.
    pub chain: Vec<String>,
    /// PEM roots.
    pub trust_bundle: Vec<String>,
    /// When it stops being valid.
    pub not_after: SystemTime,
}

/// The root key and certificate, and the policy signing follows.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    /// When the signing certificate is an intermediate: it and any others between it and the
    /// root (PEM, leaf side first), which every chain it issues carries. Empty when it signs with
    /// the root itself.
    intermediates: Vec<String>,
    /// Roots trusted besides this one (a root rotation's other root), PEM.
    extra_roots: Vec<String>,
    trust_domain: String,
    max_ttl: Duration,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("trust_domain", &self.trust_domain).field("max_ttl", &self.max_ttl).finish()
    }
}

impl Authority {
    /// Loads the root from `dir` (`ca.crt`, `ca.key`), or generates one there (the key readable by
    /// its owner only) if the directory holds neither.
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<Authority, CaError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        if cert_path.exists() || key_path.exists() {
            return Authority::from_files(&cert_path, &key_path, trust_domain);
        }
        let authority = Authority::generate(trust_domain)?;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |error| CaError::Io { path, error }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        write_private(&key_path, authority.issuer.key().serialize_pem().as_bytes()).map_err(io(&key_path))?;
        std::fs::write(&cert_path, &authority.root_pem).map_err(io(&cert_path))?;
        Ok(authority)
    }

    /// A CA from PEM files: its certificate and private key. The certificate file may hold a
    /// chain instead: the signing (intermediate) certificate first, then its issuers up to the
    /// self-signed root, which alone goes into trust bundles.
    pub fn from_files(cert_path: &Path, key_path: &Path, trust_domain: &str) -> Result<Authority, CaError> {
        let read =
            |path: &Path| std::fs::read_to_string(path).map_err(|error| CaError::Io { path: path.to_owned(), error });
        let invalid = |path: &Path, message: String| CaError::Invalid { path: path.to_owned(), message };
        let (cert_pem, key_pem) = (read(cert_path)?, read(key_path)?);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(key_path, format!("not a private key: {e}")))?;
        let mut chain = Vec::new();
        for item in x509_parser::pem::Pem::iter_from_buffer(cert_pem.as_bytes()) {
            let pem = item.map_err(|e| invalid(cert_path, format!("not PEM: {e}")))?;
            let cert = pem.parse_x509().map_err(|e| invalid(cert_path, format!("not an X.509 certificate: {e}")))?;
            if !cert.is_ca() {
                return Err(invalid(cert_path, format!("{} is not a CA certificate", cert.subject())));
            }
            let self_signed = cert.subject() == cert.issuer();
            chain.push((pem_certificate(&pem.contents), self_signed));
        }
        let Some(((signing, _), issuers)) = chain.split_first() else {
            return Err(invalid(cert_path, "holds no certificate".into()));
        };
        let issuer = Issuer::from_ca_cert_pem(signing, key)
            .map_err(|e| invalid(cert_path, format!("not a CA certificate: {e}")))?;
        let (root_pem, intermediates) = match issuers.split_last() {
            None => (signing.clone(), Vec::new()),
            Some(((root, true), between)) => {
                let mut intermediates = vec![signing.clone()];
                intermediates.extend(between.iter().map(|(pem, _)| pem.clone()));
                (root.clone(), intermediates)
            }
            Some(_) => return Err(invalid(cert_path, "a chain must end with its self-signed root".into())),
        };
        check_trust_domain(trust_domain)?;
        Ok(Authority {
            issuer,
            root_pem,
            intermediates,
            extra_roots: Vec::new(),
            trust_domain: trust_domain.to_owned(),
            max_ttl: DEFAULT_MAX_TTL,
        })
    }

    /// A new root, in memory only (tests; `load_or_generate` stores one).
    pub fn generate(trust_domain: &str) -> Result<Authority, CaError> {
        check_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Remora");
        name.push(DnType::CommonName, format!("Remora root CA for {trust_domain}"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let trust_domain_uri = format!("spiffe://{trust_domain}");
        let uri = trust_domain_uri.try_into().map_err(CaError::Generate)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let root = params.self_signed(&key).map_err(CaError::Generate)?;
        let root_pem = root.pem();
        Ok(Authority {
            issuer: Issuer::new(params, key),
            root_pem,
            intermediates: Vec::new(),
            extra_roots: Vec::new(),
            trust_domain: trust_domain.to_owned(),
            max_ttl: DEFAULT_MAX_TTL,
        })
    }

    /// Adds the CA certificates in the PEM file `path` to the trust bundle it hands out, beside its
    /// own root: for a root rotation, where workloads must trust the old root and the new one while
    /// certificates from both are in use.
    pub fn with_extra_roots(mut self, path: &Path) -> Result<Authority, CaError> {
        let invalid = |message: String| CaError::Invalid { path: path.to_owned(), message };
        let pem = std::fs::read(path).map_err(|error| CaError::Io { path: path.to_owned(), error })?;
        use rustls::pki_types::pem::PemObject as _;
        for der in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let der = der.map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
            if !cert.is_ca() {
                return Err(invalid(format!("{} is not a CA certificate", cert.subject())));
            }
            self.extra_roots.push(pem_certificate(&der));
        }
        if self.extra_roots.is_empty() {
            return Err(invalid("holds no certificate".into()));
        }
        Ok(self)
    }

    /// Caps the lifetime of the certificates it signs.
    pub fn with_max_ttl(mut self, max_ttl: Duration) -> Authority {
        self.max_ttl = max_ttl.max(MIN_TTL);
        self
    }

    /// The trust domain it signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// What every chain it issues carries after the leaf: its intermediates, PEM, concatenated
    /// (empty when it signs with its root).
    pub fn intermediates_pem(&self) -> String {
        self.intermediates.concat()
    }

    /// Signs the CSR `csr_pem` if its one SPIFFE ID is in this CA's trust domain and matches one of
    /// `entitled`, for `ttl` (capped; at least [`MIN_TTL`]) or [`DEFAULT_TTL`].
    pub fn sign(
        &self,
        csr_pem: &str,
        entitled: &[IdentityPattern],
        ttl: Option<Duration>,
    ) -> Result<Signed, SignError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| SignError::BadRequest(e.to_string()))?;
        let identity = requested_identity(&csr.params.subject_alt_names)?;
        if identity.trust_domain() != self.trust_domain {
            return Err(SignError::NotEntitled(format!("{identity} (this CA signs for {})", self.trust_domain)));
        }
        if !remora_control_api::identity::any_matches(entitled, identity.as_str()) {
            return Err(SignError::NotEntitled(identity.to_string()));
        }
        let ttl = ttl.unwrap_or(DEFAULT_TTL).clamp(MIN_TTL, self.max_ttl);
        let now = SystemTime::now();
        let (not_before, not_after) = (now - BACKDATE, now + ttl);
        let leaf = self.issue(&identity, &csr.public_key, not_before, not_after)?;
        let mut chain = vec![leaf];
        chain.extend(self.intermediates.iter().cloned());
        Ok(Signed { identity, chain, trust_bundle: self.trust_bundle(), not_after })
    }

    /// The roots a certificate of this CA chains to (PEM): its own, and those trusted beside it
    /// during a root rotation.
    pub fn trust_bundle(&self) -> Vec<String> {
        let mut bundle = vec![self.root_pem.clone()];
        bundle.extend(self.extra_roots.iter().cloned());
        bundle
    }

    /// A leaf certificate (PEM) for `identity` and `public_key`, valid from `not_before` to
    /// `not_after`, with no policy applied: `sign` after its checks, and tests that need expired or
    /// not-yet-valid certificates.
    pub fn issue(
        &self,
        identity: &SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, SignError> {
        let mut params = leaf_params(DistinguishedName::new(), not_before, not_after);
        let uri = identity.as_str().to_owned().try_into().map_err(SignError::Internal)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = params.signed_by(public_key, &self.issuer).map_err(SignError::Internal)?;
        Ok(leaf.pem())
    }
}

impl Authority {
    /// A serving certificate (PEM) and its new key (PEM) for the control plane itself, for `names`
    /// (DNS names or IP addresses), valid for `lifetime`: server auth only, and no URI SAN, so it
    /// can never pass for a workload identity.
    pub fn serving_certificate(&self, names: &[String], lifetime: Duration) -> Result<(String, String), SignError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(SignError::Internal)?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "remora control");
        let now = SystemTime::now();
        let mut params = leaf_params(name, now - BACKDATE, now + lifetime);
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .map_err(SignError::Internal)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).map_err(SignError::Internal)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A DER certificate as PEM, 64 characters a line.
fn pem_certificate(der: &[u8]) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The one URI SAN of a CSR, as a SPIFFE ID; any other name, or none, or two, is refused.
fn requested_identity(names: &[SanType]) -> Result<SpiffeId, SignError> {
    let bad = |message: &str| SignError::BadRequest(message.to_owned());
    match names {
        [SanType::URI(uri)] => SpiffeId::parse(uri.as_str()).map_err(|e| SignError::BadRequest(e.to_string())),
        [] => Err(bad("no subject alternative name; want exactly one URI SAN, the SPIFFE ID")),
        [_] => Err(bad("the subject alternative name must be a URI (the SPIFFE ID)")),
        _ => Err(bad("more than one subject alternative name; want exactly one URI SAN, the SPIFFE ID")),
    }
}

fn check_trust_domain(trust_domain: &str) -> Result<(), CaError> {
    SpiffeId::parse(&format!("spiffe://{trust_domain}/x"))
        .map(drop)
        .map_err(|_| CaError::TrustDomain(trust_domain.to_owned()))
}

/// What every certificate the CA signs for someone else shares: `name` as subject, not a CA, an
/// authority key identifier, the validity given, and a random serial.
fn leaf_params(name: DistinguishedName, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    params
}

/// 16 bytes from the system's secure random source (serials must not be guessable), the top bit
/// clear so the DER integer stays positive at full length.
fn random_serial() -> SerialNumber {
    let mut bytes = [0_u8; 16];
    let secure = rustls::crypto::ring::default_provider().secure_random;
    if secure.fill(&mut bytes).is_err() {
        // The OS random source failing is not recoverable in any useful way; fall back to the
        // process's own generator rather than refuse to sign.
        bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(contents)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use remora_control_api::ca::certificate_request;

    use super::*;

    fn id(text: &str) -> SpiffeId {
        SpiffeId::parse(text).unwrap()
    }

    fn patterns(texts: &[&str]) -> Vec<IdentityPattern> {
        texts.iter().map(|t| IdentityPattern::parse(t).unwrap()).collect()
    }

    #[test]
    fn signs_only_what_the_caller_is_entitled_to() {
        let ca = Authority::generate("cluster.local").unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let csr = certificate_request(&web, &key).unwrap();
        let signed = ca.sign(&csr, &patterns(&["spiffe://cluster.local/ns/shop/*"]), None).unwrap();
        assert_eq!(signed.identity, web);
        assert_eq!(signed.trust_bundle, [ca.root_pem().to_owned()]);
        let error = ca.sign(&csr, &patterns(&["spiffe://cluster.local/ns/other/*"]), None).unwrap_err();
        assert!(matches!(error, SignError::NotEntitled(_)), "{error}");
        let foreign = certificate_request(&id("spiffe://elsewhere/ns/shop/sa/web"), &key).unwrap();
        assert!(matches!(ca.sign(&foreign, &patterns(&["*"]), None), Err(SignError::NotEntitled(_))));
        assert!(matches!(ca.sign("junk", &patterns(&["*"]), None), Err(SignError::BadRequest(_))));
    }

    /// A root (kept offline) and an intermediate it signed, for the mesh: PEM chain file
    /// (intermediate first) and the intermediate's key file, in `dir`.
    fn intermediate_files(dir: &Path) -> (PathBuf, PathBuf, String) {
        let root = Authority::generate("cluster.local").unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "Remora mesh intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let intermediate = params.signed_by(&key, &root.issuer).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let (chain, key_file) = (dir.join("chain.pem"), dir.join("intermediate.key"));
        std::fs::write(&chain, format!("{}{}", intermediate.pem(), root.root_pem())).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (chain, key_file, root.root_pem().to_owned())
    }

    #[test]
    fn an_intermediate_signs_and_its_chain_ends_at_the_root() {
        let dir = std::env::temp_dir().join(format!("remora-intermediate-{}", std::process::id()));
        let (chain, key_file, root) = intermediate_files(&dir);
        let ca = Authority::from_files(&chain, &key_file, "cluster.local").unwrap();
        let der = |pem: &str| x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents;
        assert_eq!(der(ca.root_pem()), der(&root), "the root is the chain's last certificate");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = certificate_request(&id("spiffe://cluster.local/ns/shop/sa/web"), &key).unwrap();
        let signed = ca.sign(&csr, &patterns(&["*"]), None).unwrap();
        assert_eq!(signed.chain.len(), 2, "the leaf and the intermediate");
        assert_eq!(signed.trust_bundle.len(), 1, "the root only");
        // The leaf verifies against the root through the intermediate, as a peer sidecar checks it.
        let leaf = rustls::pki_types::CertificateDer::from(der(&signed.chain[0]));
        let intermediate = rustls::pki_types::CertificateDer::from(der(&signed.chain[1]));
        let anchor =
            webpki::anchor_from_trusted_cert(&rustls::pki_types::CertificateDer::from(der(&root))).unwrap().to_owned();
        let now = rustls::pki_types::UnixTime::now();
        let cert = webpki::EndEntityCert::try_from(&leaf).unwrap();
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        cert.verify_for_usage(
            algorithms.all,
            &[anchor],
            &[intermediate],
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();
        // A chain that stops short of a self-signed root is refused.
        let short = dir.join("short.pem");
        std::fs::write(&short, format!("{}{}", signed.chain[1], signed.chain[1])).unwrap();
        let error = Authority::from_files(&short, &key_file, "cluster.local").unwrap_err();
        assert!(error.to_string().contains("must end with its self-signed root"), "{error}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn extra_roots_join_the_trust_bundle_and_only_ca_certificates_may() {
        let dir = std::env::temp_dir().join(format!("remora-extra-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = Authority::generate("cluster.local").unwrap();
        let roots = dir.join("old-root.pem");
        std::fs::write(&roots, old.root_pem()).unwrap();
        let ca = Authority::generate("cluster.local").unwrap().with_extra_roots(&roots).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = certificate_request(&id("spiffe://cluster.local/ns/shop/sa/web"), &key).unwrap();
        let signed = ca.sign(&csr, &patterns(&["*"]), None).unwrap();
        assert_eq!(signed.trust_bundle.len(), 2);
        assert_eq!(signed.trust_bundle[0], ca.root_pem());
        let der = |pem: &str| x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents;
        assert_eq!(der(&signed.trust_bundle[1]), der(old.root_pem()), "the old root, re-encoded");
        // A leaf is not a root.
        let leaf = dir.join("leaf.pem");
        std::fs::write(&leaf, &signed.chain[0]).unwrap();
        let error = Authority::generate("cluster.local").unwrap().with_extra_roots(&leaf).unwrap_err();
        assert!(error.to_string().contains("is not a CA certificate"), "{error}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(Authority::generate("cluster.local").unwrap().with_extra_roots(&empty).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_leaf_carries_the_spiffe_id_and_nothing_else() {
        let ca = Authority::generate("td").unwrap().with_max_ttl(Duration::from_secs(3600));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = certificate_request(&id("spiffe://td/ns/a/sa/b"), &key).unwrap();
        let signed = ca.sign(&csr, &patterns(&["*"]), Some(Duration::from_secs(7 * 24 * 3600))).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(signed.chain[0].as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert!(cert.subject().iter().next().is_none(), "no subject: {}", cert.subject());
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = sans.value.general_names.iter().map(|n| format!("{n}")).collect();
        assert_eq!(names, ["URI(spiffe://td/ns/a/sa/b)"]);
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + 60, "capped at the CA's max, backdated a minute");
    }

    #[test]
    fn a_generated_root_is_stored_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = Authority::load_or_generate(dir.path(), "td").unwrap();
        let again = Authority::load_or_generate(dir.path(), "td").unwrap();
        assert_eq!(first.root_pem(), again.root_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join("ca.key"), "nonsense").unwrap();
        let error = Authority::load_or_generate(dir.path(), "td").unwrap_err().to_string();
        assert!(error.contains("ca.key: not a private key"), "{error}");
    }
}
