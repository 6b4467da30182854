//! What the data path shares: the process-wide [`DataPath`] every worker and connection reads, and
//! the [`Open`] mark an admitted connection carries until it ends.
//!
//! `app` builds one `DataPath` at start-up and hands it to the workers, the reloader and the admin
//! server; `listener` gives each connection it admits an `Open`, which the HTTP server and any
//! tunnel made from the connection keep alive. Nothing here does work per request: the snapshot is
//! read through it (one atomic load), the rest are settings and sinks built once.

use std::sync::Arc;

use crate::drain::{ConnectionToken, Drain};
use crate::http::settings::{ClientSettings, ServerSettings};
use crate::io::Meter;
use crate::state::{ListenerConfig, LiveSnapshot};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::trace::Tracer;

/// Everything the data path shares across workers and connections.
#[derive(Debug)]
pub struct DataPath {
    /// The config serving now.
    pub snapshot: Arc<LiveSnapshot>,
    /// The drain signal and open-connection count.
    pub drain: Drain,
    /// hyper server settings.
    pub server: ServerSettings,
    /// Upstream connection settings.
    pub client: ClientSettings,
    /// Where spans go, when tracing is on.
    pub tracer: Option<Arc<Tracer>>,
    /// The access log, when it is on.
    pub access_log: Option<Arc<AccessLog>>,
    /// The workers' QUIC paths to peers, for `/clusters`.
    pub quic_paths: crate::quic::paths::PathReports,
}

impl DataPath {
    /// The access log `listener`'s traffic goes to: none when the proxy has none or the listener
    /// keeps out of it.
    pub fn access_log_for(&self, listener: &ListenerConfig) -> Option<&Arc<AccessLog>> {
        self.access_log.as_ref().filter(|_| listener.access_log)
    }
}

/// Marks an admitted connection open until dropped: then the active gauge goes down, the byte meter
/// is flushed into the listener's counters, and drain stops waiting for it.
#[derive(Debug)]
pub struct Open {
    listener: Arc<ListenerConfig>,
    meter: Arc<Meter>,
    _token: ConnectionToken,
}

impl Open {
    /// Counts a connection on `listener`, moving bytes through `meter`, as open (for drain: `token`).
    pub fn new(listener: Arc<ListenerConfig>, meter: Arc<Meter>, token: ConnectionToken) -> Open {
        Open { listener, meter, _token: token }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.meter.flush(&self.listener.stats);
        self.listener.stats.active.dec();
        self.listener.stats.closed.inc();
        crate::memory::released();
    }
}
