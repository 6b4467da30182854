//! Identity and mTLS metrics: handshakes with peer sidecars (by result, by the key exchange agreed,
//! and by the verified peer's identity), this proxy's certificate (expiry, rotations, renewals).
//!
//! [`MeshMetrics::register`] declares the families (the composition root calls it once); `MeshTls`
//! records each handshake, and whatever keeps the certificate current (the CA issuer, the files'
//! watcher) records rotations and renewals.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::telemetry::{Registry, ResultLabels};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    direction: &'static str,
    result: &'static str,
}

/// A handshake whose peer certificate the trust bundle verified: `peer` is an identity the mesh's
/// CA issued, so the label's values are bounded by the mesh's workloads, not by traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerHandshakeLabels {
    direction: &'static str,
    result: &'static str,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyExchangeLabels {
    direction: &'static str,
    group: &'static str,
}

/// The identity and mTLS metrics.
#[derive(Clone, Debug, Default)]
pub struct MeshMetrics {
    handshakes: Family<HandshakeLabels, Counter>,
    key_exchanges: Family<KeyExchangeLabels, Counter>,
    peer_handshakes: Family<PeerHandshakeLabels, Counter>,
    certificate_expiry: Gauge,
    rotations: Counter,
    renewals: Family<ResultLabels, Counter>,
}

impl MeshMetrics {
    /// Declares the families in `registry`.
    pub fn register(registry: &mut Registry) -> MeshMetrics {
        let m = MeshMetrics::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes with peer sidecars, by direction and result (ok, or what failed: timeout, certificate, identity, protocol)",
            m.handshakes.clone(),
        );
        registry.register(
            "tls_key_exchanges",
            "Completed TLS handshakes with peer sidecars, by direction and the key exchange agreed (X25519MLKEM768, post-quantum; X25519 or secp256r1 with a peer that lacks it)",
            m.key_exchanges.clone(),
        );
        registry.register(
            "tls_peer_handshakes",
            "TLS handshakes with peer sidecars whose certificate the trust bundle verified, by direction, result (ok; identity: not the peer expected) and the peer's SPIFFE ID",
            m.peer_handshakes.clone(),
        );
        registry.register(
            "identity_certificate_expiry_seconds",
            "When this proxy's certificate expires, in seconds since the Unix epoch",
            m.certificate_expiry.clone(),
        );
        registry.register("identity_rotations", "Certificates installed (the first one included)", m.rotations.clone());
        registry.register(
            "identity_renewals",
            "Certificate renewals from the CA or the files, by result (ok, failed)",
            m.renewals.clone(),
        );
        m
    }

    /// Counts a TLS handshake with a peer sidecar: `direction` inbound (we accepted) or outbound,
    /// `result` ok or the failure's kind.
    pub fn handshake(&self, direction: &'static str, result: &'static str) {
        self.handshakes.get_or_create(&HandshakeLabels { direction, result }).inc();
    }

    /// Counts a completed handshake's key exchange `group`.
    pub fn key_exchange(&self, direction: &'static str, group: &'static str) {
        self.key_exchanges.get_or_create(&KeyExchangeLabels { direction, group }).inc();
    }

    /// Counts a handshake whose peer proved `peer` (its certificate verified against the trust
    /// bundle): `result` ok, or identity when that peer was not the one expected.
    pub fn peer_handshake(&self, direction: &'static str, result: &'static str, peer: &str) {
        let labels = PeerHandshakeLabels { direction, result, peer: peer.to_owned() };
        self.peer_handshakes.get_or_create(&labels).inc();
    }

    /// A new certificate took over, valid until `not_after` (seconds since the epoch).
    pub fn rotated(&self, not_after: u64) {
        self.rotations.inc();
        self.certificate_expiry.set(i64::try_from(not_after).unwrap_or(i64::MAX));
    }

    /// A renewal attempt's result: ok, or failed.
    pub fn renewal(&self, result: &'static str) {
        self.renewals.get_or_create(&ResultLabels { result }).inc();
    }

    /// Certificates installed so far.
    pub fn rotations(&self) -> u64 {
        self.rotations.get()
    }
}
