//! Coarse time for each worker: a clock read once per tick, and timers with tick resolution.
//!
//! Some deadlines on the data path are measured in seconds and touched on every request: the
//! header-read timeout hyper arms while a keep-alive connection waits for its next request, and the
//! idle deadline of a pooled upstream connection. Reading the clock and registering with tokio's
//! timer wheel (a lock, an allocation, a removal) for each of them was about 7% of the proxy's
//! user-space instructions per request. Here instead:
//!
//! - [`now`] returns the worker's clock as of its last [`tick`] (at most `limits::TIMER_TICK` old);
//! - [`CoarseTimer`] gives hyper sleeps that park their waker in a slot of a thread-local slab when
//!   first polled (no lock; cancelling frees the slot), and [`tick`] wakes the expired ones.
//!
//! Everything is per thread: a worker's connections are only ever polled by that worker, which is
//! also the thread that ticks. A deadline fires up to one tick late, which is nothing for timeouts of
//! tens of seconds. Only worker threads may use this module; elsewhere the clock never advances.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

struct Slot {
    deadline: Instant,
    waker: Option<Waker>,
    /// Bumped when the slot is freed, so a stale handle cannot touch its next occupant.
    generation: u64,
}

#[derive(Default)]
struct Slab {
    slots: Vec<Slot>,
    free: Vec<usize>,
}

thread_local! {
    static CLOCK: Cell<Instant> = Cell::new(Instant::now());
    static SLAB: RefCell<Slab> = RefCell::new(Slab::default());
}

/// The worker's clock as of its last tick.
pub fn now() -> Instant {
    CLOCK.try_with(Cell::get).unwrap_or_else(|_| Instant::now())
}

/// Advances the clock and wakes every sleep whose deadline has passed. Each worker calls it every
/// `limits::TIMER_TICK`.
pub fn tick() {
    let now = Instant::now();
    let _ = CLOCK.try_with(|clock| clock.set(now));
    let due: Vec<Waker> = SLAB
        .try_with(|slab| {
            let mut slab = slab.borrow_mut();
            slab.slots.iter_mut().filter(|s| s.deadline <= now).filter_map(|s| s.waker.take()).collect()
        })
        .unwrap_or_default();
    // Woken outside the borrow: a waker may run code that touches the slab.
    for waker in due {
        waker.wake();
    }
}

/// hyper's timer on a worker: see the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoarseTimer;

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep { deadline: now() + duration, slot: None })
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep { deadline, slot: None })
    }

    fn now(&self) -> Instant {
        now()
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        *sleep = self.sleep_until(new_deadline);
    }
}

/// A sleep until `deadline`, registered in the worker's slab once it has been polled.
#[derive(Debug)]
struct CoarseSleep {
    deadline: Instant,
    /// The slot index and the generation it was taken at.
    slot: Option<(usize, u64)>,
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if now() >= this.deadline {
            this.release();
            return Poll::Ready(());
        }
        let deadline = this.deadline;
        let registered = SLAB.try_with(|slab| {
            let mut slab = slab.borrow_mut();
            if let Some((index, generation)) = this.slot
                && let Some(slot) = slab.slots.get_mut(index)
                && slot.generation == generation
            {
                match &slot.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => slot.waker = Some(cx.waker().clone()),
                }
                return (index, generation);
            }
            let waker = Some(cx.waker().clone());
            match slab.free.pop() {
                Some(index) => {
                    let slot = &mut slab.slots[index];
                    slot.deadline = deadline;
                    slot.waker = waker;
                    (index, slot.generation)
                }
                None => {
                    slab.slots.push(Slot { deadline, waker, generation: 0 });
                    (slab.slots.len() - 1, 0)
                }
            }
        });
        match registered {
            Ok(slot) => {
                this.slot = Some(slot);
                Poll::Pending
            }
            // The thread is being torn down: there is no tick to wait for.
            Err(_) => Poll::Ready(()),
        }
    }
}

impl CoarseSleep {
    fn release(&mut self) {
        let Some((index, generation)) = self.slot.take() else { return };
        let _ = SLAB.try_with(|slab| {
            let mut slab = slab.borrow_mut();
            if let Some(slot) = slab.slots.get_mut(index)
                && slot.generation == generation
            {
                slot.waker = None;
                slot.generation += 1;
                slab.free.push(index);
            }
        });
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        self.release();
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use hyper::rt::Timer;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn sleeps_wake_on_the_first_tick_past_their_deadline_and_free_their_slot() {
        tick();
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut sleep = CoarseTimer.sleep(Duration::from_millis(30));
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        tick();
        assert_eq!(woken.0.load(Ordering::SeqCst), 0, "woken before its deadline");
        std::thread::sleep(Duration::from_millis(40));
        tick();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(sleep.as_mut().poll(&mut cx).is_ready());
        drop(sleep);
        SLAB.with(|slab| assert_eq!(slab.borrow().free.len(), slab.borrow().slots.len()));
    }

    #[test]
    fn a_dropped_sleep_is_never_woken_and_its_slot_is_reused() {
        tick();
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut first = CoarseTimer.sleep(Duration::from_millis(1));
        assert!(first.as_mut().poll(&mut cx).is_pending());
        drop(first);
        let mut second = CoarseTimer.sleep(Duration::from_secs(60));
        assert!(second.as_mut().poll(&mut cx).is_pending());
        std::thread::sleep(Duration::from_millis(5));
        tick();
        assert_eq!(woken.0.load(Ordering::SeqCst), 0, "a cancelled or distant sleep fired");
        SLAB.with(|slab| assert_eq!(slab.borrow().slots.len(), 1, "the freed slot was reused"));
    }
}
