//! What `/clusters` shows of the mesh's QUIC paths: each worker's connections to peers' hosts
//! (state, identity, RTT, loss, congestion window, open tunnels) and the hosts it falls back for.
//! `client::sweep` writes a worker's once a second; the admin server reads them all.

use std::net::SocketAddr;

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
/// second by each worker, and by the admin server when asked).
#[derive(Debug, Default)]
pub struct PathReports(std::sync::Mutex<foldhash::HashMap<String, Vec<PathReport>>>);

impl PathReports {
    /// Every worker's paths, within a second.
    pub fn all(&self) -> Vec<PathReport> {
        let reports = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut all: Vec<PathReport> = reports.values().flatten().cloned().collect();
        all.sort_by(|a, b| (a.peer, &a.worker).cmp(&(b.peer, &b.worker)));
        all
    }

    /// Replaces `worker`'s paths.
    pub(super) fn set(&self, worker: String, paths: Vec<PathReport>) {
        let mut reports = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if paths.is_empty() {
            reports.remove(&worker);
        } else {
            reports.insert(worker, paths);
        }
    }
}
