//! The downstream connection as the HTTP server reads it, and the per-connection byte meter.
//!
//! [`DownstreamStream`] wraps an accepted socket: it first replays any bytes protocol detection had to
//! take out of the socket, then reads and writes the socket itself, counting bytes into the
//! connection's [`Meter`]. The meter feeds two things: the listener's byte counters (flushed when
//! the connection closes and whenever the idle check runs) and the idle timeout, which [`idle_watch`]
//! applies by noticing that the counts stopped moving. One atomic add per read or write; no clock
//! reads on the data path.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::telemetry::ListenerStats;

/// Bytes moved on one connection, and how much of that the listener's counters have seen.
#[derive(Debug, Default)]
pub struct Meter {
    received: AtomicU64,
    sent: AtomicU64,
    flushed_received: AtomicU64,
    flushed_sent: AtomicU64,
}

impl Meter {
    /// Counts bytes read from the client.
    pub fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts bytes written to the client.
    pub fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Total bytes moved either way; idle detection only cares whether it changed.
    pub fn activity(&self) -> u64 {
        self.received.load(Ordering::Relaxed).wrapping_add(self.sent.load(Ordering::Relaxed))
    }

    /// Adds what was moved since the last flush to the listener's counters.
    pub fn flush(&self, stats: &ListenerStats) {
        let received = self.received.load(Ordering::Relaxed);
        let sent = self.sent.load(Ordering::Relaxed);
        let before_received = self.flushed_received.swap(received, Ordering::Relaxed);
        let before_sent = self.flushed_sent.swap(sent, Ordering::Relaxed);
        stats.bytes_received.inc_by(received.saturating_sub(before_received));
        stats.bytes_sent.inc_by(sent.saturating_sub(before_sent));
    }
}

/// Resolves once `meter` shows no traffic for `timeout` (within a quarter of it), flushing the
/// meter into `stats` at each check so long-lived connections show up in metrics as they go.
pub async fn idle_watch(meter: &Meter, stats: &ListenerStats, timeout: Duration) {
    let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(15));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    let mut last = meter.activity();
    let mut quiet = Duration::ZERO;
    loop {
        interval.tick().await;
        meter.flush(stats);
        let now = meter.activity();
        if now == last {
            quiet += tick;
            if quiet >= timeout {
                return;
            }
        } else {
            last = now;
            quiet = Duration::ZERO;
        }
    }
}

/// An accepted connection: detection's replay bytes first, then the socket, metered.
#[derive(Debug)]
pub struct DownstreamStream {
    socket: TcpStream,
    replay: Bytes,
    meter: Arc<Meter>,
}

impl DownstreamStream {
    /// Wraps `socket`, replaying `replay` (bytes detection already took from it, counted here)
    /// before its own bytes.
    pub fn new(socket: TcpStream, replay: Bytes, meter: Arc<Meter>) -> Self {
        meter.add_received(replay.len());
        DownstreamStream { socket, replay, meter }
    }
}

impl AsyncRead for DownstreamStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.socket).poll_read(cx, buf);
        this.meter.add_received(buf.filled().len() - before);
        result
    }
}

impl AsyncWrite for DownstreamStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.socket).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.meter.add_sent(n);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.socket).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            self.meter.add_sent(n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn replays_then_reads_and_meters_both_ways() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let meter = Arc::new(Meter::default());
        let mut stream = DownstreamStream::new(server, Bytes::from_static(b"he"), meter.clone());
        client.write_all(b"llo").await.unwrap();
        let mut got = [0_u8; 5];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        stream.write_all(b"back").await.unwrap();
        assert_eq!(meter.received.load(Ordering::Relaxed), 5);
        assert_eq!(meter.sent.load(Ordering::Relaxed), 4);
        let stats = crate::telemetry::Metrics::new().listener("l", "outbound");
        meter.flush(&stats);
        meter.flush(&stats);
        assert_eq!(stats.bytes_received.get(), 5);
        assert_eq!(stats.bytes_sent.get(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_watch_fires_only_after_a_quiet_timeout() {
        let meter = Meter::default();
        let stats = crate::telemetry::Metrics::new().listener("l", "outbound");
        let timeout = Duration::from_secs(8);
        let start = tokio::time::Instant::now();
        let busy = async {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                meter.add_received(1);
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = idle_watch(&meter, &stats, timeout) => {}
            () = busy => unreachable!(),
        }
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(18) && waited <= Duration::from_secs(21), "{waited:?}");
    }
}
