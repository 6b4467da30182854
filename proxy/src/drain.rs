//! Graceful shutdown: one signal to every connection, and a count of the connections still open.
//!
//! Every accepted connection holds a [`ConnectionToken`] from [`Drain::track`] for as long as it (or a
//! tunnel made from it) lives, and watches [`DrainWatch::signaled`]. When SIGTERM arrives, `app` calls
//! [`Drain::start`]: accept loops stop, HTTP/1 connections finish the request in flight and close with
//! `Connection: close`, HTTP/2 connections send GOAWAY and finish their open streams, TCP tunnels run
//! on. [`Drain::wait`] returns when the last token is dropped or the drain time is up, whichever is
//! first; `app` then exits.
//!
//! A connection that lives long (an HTTP/2 one) waits for the signal with a [`DrainSignal`]: on a
//! worker, a slot in the worker's list of waiting connections (a few bytes in the connection's
//! task, where a receiver's own wait took 200), which one task per worker, [`serve_waiters`],
//! wakes when draining starts.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
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

    /// Whether draining has started.
    fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// The drain signal as a small future of its own: see [`DrainSignal`].
    pub fn into_signal(self) -> DrainSignal {
        DrainSignal { state: SignalState::Unregistered(self) }
    }
}

/// The connections of one worker waiting for its drain signal.
#[derive(Default)]
struct Waiters {
    /// The signal this worker serves (`serve_waiters`); none on other threads.
    watch: Option<watch::Receiver<bool>>,
    drained: bool,
    slots: Vec<Option<Waker>>,
    free: Vec<u32>,
}

thread_local! {
    static WAITERS: RefCell<Waiters> = RefCell::new(Waiters::default());
}

/// Wakes this worker's [`DrainSignal`]s when `watch` signals. Call it on the worker thread, and spawn
/// the future it returns there: signals made on the thread from then on wait in its list.
pub fn serve_waiters(watch: DrainWatch) -> impl Future<Output = ()> {
    let _ = WAITERS.try_with(|waiters| waiters.borrow_mut().watch = Some(watch.signal.clone()));
    async move {
        let mut watch = watch;
        watch.signaled().await;
        let wakers: Vec<Waker> = WAITERS
            .try_with(|waiters| {
                let mut waiters = waiters.borrow_mut();
                waiters.drained = true;
                waiters.slots.iter_mut().filter_map(Option::take).collect()
            })
            .unwrap_or_default();
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// Resolves once draining has started: [`DrainWatch::signaled`], sized for a connection's task.
/// On a worker that serves its drain (`serve_waiters`) it waits as a slot in the worker's list;
/// elsewhere (a test's runtime) it waits on its watch, boxed. A signal in a worker's list must be
/// polled and dropped on that worker, as every task of a worker is (its runtime has one thread).
pub struct DrainSignal {
    state: SignalState,
}

enum SignalState {
    Unregistered(DrainWatch),
    /// In this thread's list, at this index.
    Waiting(u32),
    Elsewhere(Pin<Box<dyn Future<Output = ()> + Send>>),
    Done,
}

impl Future for DrainSignal {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match &mut this.state {
            SignalState::Done => Poll::Ready(()),
            SignalState::Elsewhere(signaled) => signaled.as_mut().poll(cx),
            SignalState::Waiting(index) => {
                let index = *index;
                let drained = WAITERS.with_borrow_mut(|waiters| {
                    if waiters.drained {
                        return true;
                    }
                    if let Some(slot) = waiters.slots.get_mut(index as usize)
                        && !slot.as_ref().is_some_and(|waker| waker.will_wake(cx.waker()))
                    {
                        *slot = Some(cx.waker().clone());
                    }
                    false
                });
                if !drained {
                    return Poll::Pending;
                }
                this.release();
                Poll::Ready(())
            }
            SignalState::Unregistered(watch) => {
                if watch.is_draining() {
                    this.state = SignalState::Done;
                    return Poll::Ready(());
                }
                if let Some(index) = register(watch, cx.waker()) {
                    this.state = SignalState::Waiting(index);
                    return Poll::Pending;
                }
                let mut watch = DrainWatch { signal: watch.signal.clone() };
                let mut signaled: Pin<Box<dyn Future<Output = ()> + Send>> =
                    Box::pin(async move { watch.signaled().await });
                let polled = signaled.as_mut().poll(cx);
                this.state = SignalState::Elsewhere(signaled);
                polled
            }
        }
    }
}

/// A slot in this thread's list for `waker`, if this thread serves `watch`'s signal and it has not
/// gone off yet.
fn register(watch: &DrainWatch, waker: &Waker) -> Option<u32> {
    WAITERS
        .try_with(|waiters| {
            let mut waiters = waiters.borrow_mut();
            let served = waiters.watch.as_ref().is_some_and(|own| own.same_channel(&watch.signal));
            if !served || waiters.drained {
                return None;
            }
            if let Some(index) = waiters.free.pop() {
                waiters.slots[index as usize] = Some(waker.clone());
                return Some(index);
            }
            let index = u32::try_from(waiters.slots.len()).ok()?;
            waiters.slots.push(Some(waker.clone()));
            Some(index)
        })
        .ok()
        .flatten()
}

impl DrainSignal {
    /// Gives back its slot in this thread's list, if it has one.
    fn release(&mut self) {
        let SignalState::Waiting(index) = self.state else { return };
        let _ = WAITERS.try_with(|waiters| {
            let mut waiters = waiters.borrow_mut();
            if let Some(slot) = waiters.slots.get_mut(index as usize) {
                *slot = None;
                waiters.free.push(index);
            }
        });
        self.state = SignalState::Done;
    }
}

impl Drop for DrainSignal {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

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

    /// On a thread that serves its drain's waiters, signals wait as slots in its list (a freed
    /// slot is taken again), all resolve when draining starts, and one made after resolves at once.
    #[tokio::test]
    async fn signals_wait_in_the_workers_list_and_all_resolve() {
        let drain = Drain::default();
        tokio::spawn(serve_waiters(drain.watch()));
        let mut signals: Vec<_> = (0..3).map(|_| Box::pin(drain.watch().into_signal())).collect();
        for signal in &mut signals {
            assert!(futures_util::poll!(signal.as_mut()).is_pending());
            assert!(matches!(signal.state, SignalState::Waiting(_)), "not in the worker's list");
        }
        let SignalState::Waiting(freed) = signals[1].state else { unreachable!() };
        drop(signals.remove(1));
        let mut again = Box::pin(drain.watch().into_signal());
        assert!(futures_util::poll!(again.as_mut()).is_pending());
        assert!(matches!(again.state, SignalState::Waiting(index) if index == freed), "the freed slot was not reused");
        signals.push(again);
        assert!(
            std::mem::size_of::<DrainSignal>() <= 24,
            "a drain signal grew: it lives in every HTTP/2 connection's task"
        );
        drain.start();
        for signal in signals {
            tokio::time::timeout(Duration::from_secs(5), signal).await.expect("a signal did not resolve");
        }
        tokio::time::timeout(Duration::from_secs(5), drain.watch().into_signal()).await.unwrap();
    }

    /// Where nothing serves the drain's waiters (another drain's worker, a test's runtime), a
    /// signal waits on its own watch.
    #[tokio::test]
    async fn a_signal_off_its_worker_waits_on_its_watch() {
        let drain = Drain::default();
        let other = Drain::default();
        tokio::spawn(serve_waiters(other.watch()));
        let mut signal = Box::pin(drain.watch().into_signal());
        assert!(futures_util::poll!(signal.as_mut()).is_pending());
        assert!(matches!(signal.state, SignalState::Elsewhere(_)));
        drain.start();
        tokio::time::timeout(Duration::from_secs(5), signal).await.expect("the signal did not resolve");
    }
}
