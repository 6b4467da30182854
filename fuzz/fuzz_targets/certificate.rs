//! A peer's certificate, as the mesh's TLS reads the identity out of it: arbitrary DER.
//!
//! Holds whatever the bytes: a certificate that yields an identity yields a valid SPIFFE ID (it
//! parses again as itself) and an expiry after the time it was read at.

#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use remora_control_api::identity::SpiffeId;
use remora_proxy::tls::verify::peer_identity;
use rustls_pki_types::CertificateDer;

fuzz_target!(|bytes: &[u8]| {
    // A fixed moment (2026-01-01), so the verdict on an input never depends on when it runs.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
    if let Ok((id, not_after)) = peer_identity(&CertificateDer::from(bytes), now) {
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
        assert!(not_after >= now);
    }
});
