//! Graceful shutdown: one signal to every connection, and a count of the connections still open.
//!
//! Every accepted connection holds a [`ConnectionToken`] from [`Drain::track`] for as long as it (or a
//! tunnel made from it) lives, and watches [`DrainWatch::signaled`]. When SIGTERM arrives, `app` calls
//! [`Drain::start`]: accept loops stop, HTTP/1 connections finish the request in flight and close with
//! `Connection: close`, HTTP/2 connections send GOAWAY and finish their open streams, TCP tunnels run
//! on. [`Drain::wait`] returns when the last token is dropped or the drain time is up, whichever is
//! first; `app` then exits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

#[derive(Debug, Default)]
struct Open {
    count: AtomicUsize,
    closed_last: Notify,
}

/// The drain signal and the open-connection count.
#[derive(Debug)]
pub struct Drain {
    signal: watch::Sender<bool>,
    open: Arc<Open>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain { signal: watch::Sender::new(false), open: Arc::default() }
    }
}

impl Drain {
    /// A receiver of the drain signal, for one connection or accept loop.
    pub fn watch(&self) -> DrainWatch {
        DrainWatch { signal: self.signal.subscribe() }
    }

    /// Registers an open connection until the token is dropped.
    pub fn track(&self) -> ConnectionToken {
        self.open.count.fetch_add(1, Ordering::AcqRel);
        ConnectionToken { open: self.open.clone() }
    }

    /// Tells every connection and accept loop to wind down. Idempotent.
    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    /// Whether [`Drain::start`] has been called.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Connections still open.
    pub fn open_connections(&self) -> usize {
        self.open.count.load(Ordering::Acquire)
    }

    /// Waits until every connection has closed (true) or `limit` has passed (false).
    pub async fn wait(&self, limit: Duration) -> bool {
        let all_closed = async {
            loop {
                let notified = self.open.closed_last.notified();
                if self.open_connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, all_closed).await.is_ok()
    }
}

/// Held by each open connection; dropping it counts the connection closed.
#[derive(Debug)]
pub struct ConnectionToken {
    open: Arc<Open>,
}

impl Drop for ConnectionToken {
    fn drop(&mut self) {
        if self.open.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.open.closed_last.notify_waiters();
        }
    }
}

/// One receiver of the drain signal.
#[derive(Clone, Debug)]
pub struct DrainWatch {
    signal: watch::Receiver<bool>,
}

impl DrainWatch {
    /// Resolves once draining has started (at once if it already has). If the sender is gone the
    /// process is shutting down, which counts as draining too.
    pub async fn signaled(&mut self) {
        let _ = self.signal.wait_for(|draining| *draining).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_the_last_connection_or_the_limit() {
        let drain = Drain::default();
        let mut watch = drain.watch();
        let token = drain.track();
        let second = drain.track();
        assert!(!drain.is_draining());
        drain.start();
        watch.signaled().await;
        assert!(!drain.wait(Duration::from_millis(20)).await, "two connections still open");
        drop(token);
        let closer = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(second);
        };
        let (closed, ()) = tokio::join!(drain.wait(Duration::from_secs(5)), closer);
        assert!(closed);
        assert_eq!(drain.open_connections(), 0);
    }
}
