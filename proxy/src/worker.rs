//! Worker threads: one single-threaded tokio runtime each, thread-per-core.
//!
//! Each worker owns its listening sockets (one per listener, sharing the port with the other
//! workers' through `SO_REUSEPORT`), every connection those sockets accept, its own upstream
//! connection pool, and its lot of parked idle HTTP/1.1 connections (`http::lot`). A request is
//! served start to finish on the thread that accepted it: no work stealing, no cross-thread
//! wake-ups, no locks on the pool. `app` sends a worker commands ([`Workers::serve`]) to start
//! accepting on a new socket; a listener's accept loops stop when its stop signal flips or
//! draining starts. Dropping [`Workers`] ends the threads, and any connection
//! still open on them.

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::context::DataPath;
use crate::http::{self, client};
use crate::listener::{ListenSocket, accept_loop};
use crate::telemetry::Registry;
use crate::{drain, limits, quic, timer};

enum Command {
    Serve { name: Arc<str>, socket: ListenSocket, stop: watch::Receiver<bool> },
}

struct Worker {
    /// `None` once shutting down.
    commands: Option<mpsc::UnboundedSender<Command>>,
    thread: Option<JoinHandle<()>>,
}

/// Declares the `workers` gauge in `registry`, set to `count`, and the lots' parked connections.
pub fn register_metrics(registry: &mut Registry, count: usize) {
    let workers = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    workers.set(i64::try_from(count).unwrap_or(i64::MAX));
    registry.register("workers", "Worker threads", workers);
    registry.register(
        "http_parked_connections",
        "Idle HTTP/1.1 connections waiting in the workers' lots for their next request",
        http::lot::PARKED.clone(),
    );
}

/// The worker threads.
pub struct Workers {
    workers: Vec<Worker>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("count", &self.workers.len()).finish()
    }
}

impl Workers {
    /// Starts `count` worker threads. Fails if a runtime or thread cannot be created.
    pub fn start(count: usize, data: &Arc<DataPath>) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(count);
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (commands, mut receiver) = mpsc::unbounded_channel::<Command>();
            let data = data.clone();
            let thread = std::thread::Builder::new().name(format!("remora-worker-{index}")).spawn(move || {
                runtime.block_on(async move {
                    tokio::spawn(timer::run_alarms());
                    tokio::spawn(http::lot::run(data.drain.watch()));
                    tokio::spawn(drain::serve_waiters(data.drain.watch()));
                    let swept = data.clone();
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(limits::TIMER_TICK);
                        loop {
                            tick.tick().await;
                            timer::tick();
                            client::sweep();
                            quic::client::sweep(&swept.quic_paths);
                        }
                    });
                    while let Some(command) = receiver.recv().await {
                        match command {
                            Command::Serve { name, socket: ListenSocket::Tcp(socket), stop } => {
                                tokio::spawn(accept_loop(socket, name, data.clone(), stop));
                            }
                            Command::Serve { name, socket: ListenSocket::Udp(socket), stop } => {
                                tokio::spawn(quic::server::accept_loop(socket, name, data.clone(), stop));
                            }
                        }
                    }
                });
            })?;
            workers.push(Worker { commands: Some(commands), thread: Some(thread) });
        }
        Ok(Workers { workers })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether there are no workers (never, once started).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Starts accepting for listener `name`, one socket per worker (as many sockets as workers).
    pub fn serve(&self, name: &Arc<str>, sockets: Vec<ListenSocket>, stop: &watch::Receiver<bool>) {
        for (worker, socket) in self.workers.iter().zip(sockets) {
            let command = Command::Serve { name: name.clone(), socket, stop: stop.clone() };
            let sent = worker.commands.as_ref().is_some_and(|commands| commands.send(command).is_ok());
            if !sent {
                warn!(listener = %name, "a worker has stopped; its share of the listener is not served");
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            // Closing the command channel ends the worker's main task and with it the runtime.
            worker.commands = None;
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}
