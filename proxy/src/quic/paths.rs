//! What `/clusters` shows of the mesh's QUIC paths: each worker's connections to peers' hosts
//! (state, identity, RTT, loss, congestion window, open tunnels) and the hosts it falls back for.
//! `client::sweep` writes a worker's once a second, counting the packets its connections sent and
//! lost since; the admin server reads them all.

use std::net::SocketAddr;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::telemetry::Registry;

/// One worker's QUIC path to a host, as `/clusters` shows it: refreshed by `client::sweep`.
#[derive(Clone, Debug)]
pub struct PathReport {
    /// The host's `hbone_quic` listener.
    pub peer: SocketAddr,
    /// The worker thread.
    pub worker: String,
    /// `connected`, or `fallback` (QUIC does not get through; TCP carries the tunnels).
    pub state: &'static str,
    /// The peer's identity, when connected.
    pub identity: Option<String>,
    /// Smoothed round-trip time.
    pub rtt: std::time::Duration,
    /// Packets sent, and those lost, on the connection.
    pub sent_packets: u64,
    /// See `sent_packets`.
    pub lost_packets: u64,
    /// The congestion window, in bytes.
    pub congestion_window: u64,
    /// Tunnels open on it now.
    pub tunnels: usize,
}

/// Every worker's QUIC paths, as of its last sweep: what `/clusters` reads (a lock taken once a
/// second by each worker, and by the admin server when asked); and the metrics the sweeps keep:
/// packets sent and lost on the mesh's QUIC connections, and paths by state.
#[derive(Debug, Default)]
pub struct PathReports {
    reports: std::sync::Mutex<foldhash::HashMap<String, Vec<PathReport>>>,
    packets: Family<ResultLabels, Counter>,
    paths: Family<StateLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

impl PathReports {
    /// Declares the metric families in `registry`.
    pub fn register(registry: &mut Registry) -> PathReports {
        let reports = PathReports::default();
        registry.register(
            "upstream_quic_packets",
            "Packets of this proxy's mesh QUIC connections (HBONE over QUIC, out), by result: sent, lost (declared lost and resent)",
            reports.packets.clone(),
        );
        registry.register(
            "upstream_quic_paths",
            "Peers' hosts this proxy's workers reach over QUIC, by state: connected, fallback (QUIC does not get through; TCP carries the tunnels)",
            reports.paths.clone(),
        );
        reports
    }

    /// Counts packets a worker's connections sent and lost since its last sweep.
    pub(super) fn count_packets(&self, sent: u64, lost: u64) {
        self.packets.get_or_create(&ResultLabels { result: "sent" }).inc_by(sent);
        self.packets.get_or_create(&ResultLabels { result: "lost" }).inc_by(lost);
    }

    /// Every worker's paths, within a second.
    pub fn all(&self) -> Vec<PathReport> {
        let reports = self.reports.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut all: Vec<PathReport> = reports.values().flatten().cloned().collect();
        all.sort_by(|a, b| (a.peer, &a.worker).cmp(&(b.peer, &b.worker)));
        all
    }

    /// Replaces `worker`'s paths.
    pub(super) fn set(&self, worker: String, paths: Vec<PathReport>) {
        let mut reports = self.reports.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if paths.is_empty() {
            reports.remove(&worker);
        } else {
            reports.insert(worker, paths);
        }
        for state in ["connected", "fallback"] {
            let count = reports.values().flatten().filter(|path| path.state == state).count();
            self.paths.get_or_create(&StateLabels { state }).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}
