//! Upstream HTTP/2 connections that give their buffers back while they sit idle in the pool.
//!
//! A pooled HTTP/2 connection to an upstream (mesh HTTP between sidecars, an HBONE carrier, an h2c
//! cluster) is driven by a task hyper spawns itself, through the executor it is given, and h2
//! keeps the connection's write, read and header buffers (about 28 KiB) for its whole life: an idle
//! pooled mesh connection held 40 kB. Downstream connections are tidied by the task that serves
//! them (`server::Driven`); upstream, the executor is the one place that sees the connection's
//! task, so [`UpstreamExecutor`] spawns it inside [`Tidied`], which makes one tidying poll
//! (`h2::tidy`, Remora's patch of h2) once the task has been woken by nothing but its own timer for
//! `limits::H2_TIDY_AFTER`. Every other future hyper hands the executor (one per request, one per
//! streaming request body) is spawned as it is.
//!
//! The first future a connection's executor is given is the connection's task: hyper clones the
//! builder's executor for each handshake and spawns the connection through that clone before any
//! request, so each clone of an [`UpstreamExecutor`] starts afresh.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use crate::limits;
use crate::timer::Deadline;

/// The executor of upstream HTTP/2 connections: spawns each connection's task tidied.
#[derive(Debug, Default)]
pub struct UpstreamExecutor {
    connection_spawned: AtomicBool,
}

impl Clone for UpstreamExecutor {
    /// A fresh executor: hyper clones one per connection (see the module docs).
    fn clone(&self) -> Self {
        UpstreamExecutor::default()
    }
}

impl<F> hyper::rt::Executor<F> for UpstreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        if self.connection_spawned.swap(true, Ordering::Relaxed) {
            tokio::spawn(future);
        } else {
            tokio::spawn(Tidied::new(future));
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's task that, once quiet for `limits::H2_TIDY_AFTER` (polled only by its own
    /// timer), polls the connection once inside `h2::tidy`, then waits unarmed for the next
    /// wake-up, which re-arms the timer. A busy connection pays a count per wake-up and a timer
    /// reset every `H2_TIDY_AFTER`.
    pub struct Tidied<F> {
        #[pin]
        inner: F,
        tick: Deadline,
        // Wake-ups since the timer was set.
        polls: u32,
        tidied: bool,
    }
}

impl<F> Tidied<F> {
    /// `inner`, to be tidied once it has been quiet.
    pub fn new(inner: F) -> Self {
        Tidied { inner, tick: Deadline::at(next_tick()), polls: 0, tidied: false }
    }
}

fn next_tick() -> tokio::time::Instant {
    tokio::time::Instant::now() + limits::H2_TIDY_AFTER
}

impl<F: Future<Output = ()>> Future for Tidied<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.inner.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if *this.tidied {
            // Woken by the connection after its tidying: watch for the next quiet spell.
            *this.tidied = false;
            *this.polls = 0;
            this.tick.reset(next_tick());
            let _ = Pin::new(&mut *this.tick).poll(cx);
            return Poll::Pending;
        }
        *this.polls += 1;
        if Pin::new(&mut *this.tick).poll(cx).is_ready() {
            if *this.polls == 1 {
                // Nothing but the timer woke it since the timer was set: quiet.
                let inner = this.inner.as_mut();
                if h2::tidy(|| inner.poll(cx)).is_ready() {
                    return Poll::Ready(());
                }
                *this.tidied = true;
                crate::memory::released();
            } else {
                *this.polls = 0;
                this.tick.reset(next_tick());
                let _ = Pin::new(&mut *this.tick).poll(cx);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use hyper::rt::Executor as _;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// Only the first future each clone is given is the connection's task; the clone hyper makes
    /// for the next connection starts afresh.
    #[tokio::test]
    async fn each_connection_has_its_first_future_tidied_and_no_other() {
        let builder = UpstreamExecutor::default();
        let connection = builder.clone();
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let done = done.clone();
            connection.execute(async move {
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(connection.connection_spawned.load(Ordering::Relaxed));
        assert!(!builder.connection_spawned.load(Ordering::Relaxed));
        assert!(!connection.clone().connection_spawned.load(Ordering::Relaxed));
        for _ in 0..100 {
            if done.load(Ordering::Relaxed) == 3 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(done.load(Ordering::Relaxed), 3, "every future ran");
    }
}
