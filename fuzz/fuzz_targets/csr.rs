//! Certificate signing requests at the CA: arbitrary DER, as a proxy's CSR arrives (PEM).
//!
//! Holds whatever the bytes: the CA signs only an identity of its trust domain that the caller is
//! entitled to, and the certificate it issues carries exactly that identity as the proxies read it.

#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use remora_control_api::identity::IdentityPattern;
use remora_control_plane::ca::Authority;
use remora_proxy::tls::verify::peer_identity;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

static CA: LazyLock<Authority> = LazyLock::new(|| Authority::generate("cluster.local").expect("a CA"));
static ENTITLED: LazyLock<Vec<IdentityPattern>> =
    LazyLock::new(|| vec![IdentityPattern::parse("spiffe://cluster.local/ns/shop/*").expect("a pattern")]);

fuzz_target!(|der: &[u8]| {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let pem = format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n");
    let Ok(signed) = CA.sign(&pem, &ENTITLED, Some(Duration::from_secs(3600))) else { return };
    assert_eq!(signed.identity.trust_domain(), "cluster.local");
    assert!(signed.identity.as_str().starts_with("spiffe://cluster.local/ns/shop/"), "{}", signed.identity);
    let leaf = CertificateDer::from_pem_slice(signed.chain[0].as_bytes()).expect("the leaf is PEM");
    let (read, _) = peer_identity(&leaf, SystemTime::now()).expect("the proxies read the issued leaf");
    assert_eq!(read, signed.identity);
});
