//! Time for each worker: a coarse clock read once per tick, timers with tick resolution, and
//! precise deadlines that cost no lock or allocation.
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
//! also the thread that ticks. A coarse deadline fires up to one tick late, which is nothing for
//! timeouts of tens of seconds. Only worker threads may use the coarse half; elsewhere the clock
//! never advances.
//!
//! Route timeouts, per-try timeouts and stream idle timeouts must fire on time (they may be a few
//! milliseconds) but almost never fire at all: the response comes first. A [`Deadline`] parks its
//! waker in a slot of a second thread-local slab, and one tokio sleep per worker, run by
//! [`run_alarms`], is set for the earliest deadline it knows of. Arming and cancelling a deadline
//! touch only the slab (and the alarm only when the new deadline is the earliest); the alarm scans
//! the slab when it goes off, wakes what is due, and sets itself for the next. A cancelled
//! deadline leaves the alarm set, so it may go off for nothing: at most once per earliest deadline,
//! a scan of the requests in flight. On a thread that runs no alarm (tests, the control plane) a
//! `Deadline` is a plain tokio sleep.

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

/// A table of more slots than this, all free, is given back (a few are kept: a lone request's
/// timers would otherwise allocate it again each time).
const BURST_SLOTS: usize = 64;

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
                if slab.free.len() == slab.slots.len() && slab.slots.len() > BURST_SLOTS {
                    // Nothing holds a slot: the table a burst grew is given back.
                    *slab = Slab::default();
                }
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

struct Alarm {
    deadline: tokio::time::Instant,
    /// Taken when the alarm wakes it; `None` in a free slot too.
    waker: Option<Waker>,
    fired: bool,
    generation: u64,
}

#[derive(Default)]
struct Alarms {
    slots: Vec<Alarm>,
    free: Vec<usize>,
    /// Whether [`run_alarms`] serves this thread.
    running: bool,
    /// When the alarm is set to go off.
    armed: Option<tokio::time::Instant>,
    /// The alarm task, woken to set itself earlier.
    task: Option<Waker>,
}

thread_local! {
    static ALARMS: RefCell<Alarms> = RefCell::new(Alarms::default());
}

/// A precise deadline: a future that is ready at `at`. See the module documentation.
#[derive(Debug)]
pub struct Deadline {
    at: tokio::time::Instant,
    state: DeadlineState,
}

#[derive(Debug)]
enum DeadlineState {
    /// Not polled yet: registered at the first poll.
    Idle,
    /// In this thread's slab: (index, generation).
    Slot(usize, u64),
    /// Gone off.
    Done,
    /// On a thread without an alarm.
    Tokio(Pin<Box<tokio::time::Sleep>>),
}

impl Deadline {
    /// A deadline at `at`.
    pub fn at(at: tokio::time::Instant) -> Deadline {
        Deadline { at, state: DeadlineState::Idle }
    }

    /// When it is due.
    pub fn deadline(&self) -> tokio::time::Instant {
        self.at
    }

    /// Moves the deadline to `at`, earlier or later, and makes it pending again.
    pub fn reset(&mut self, at: tokio::time::Instant) {
        self.at = at;
        match &mut self.state {
            DeadlineState::Tokio(sleep) => sleep.as_mut().reset(at),
            DeadlineState::Slot(..) | DeadlineState::Done => {
                self.release();
                self.state = DeadlineState::Idle;
            }
            DeadlineState::Idle => {}
        }
    }

    fn release(&mut self) {
        let DeadlineState::Slot(index, generation) = self.state else { return };
        self.state = DeadlineState::Done;
        let _ = ALARMS.try_with(|alarms| {
            let mut alarms = alarms.borrow_mut();
            if let Some(slot) = alarms.slots.get_mut(index)
                && slot.generation == generation
            {
                slot.waker = None;
                slot.fired = false;
                slot.generation += 1;
                alarms.free.push(index);
                if alarms.free.len() == alarms.slots.len() && alarms.slots.len() > BURST_SLOTS {
                    // Nothing holds a slot: the table a burst grew is given back.
                    alarms.slots = Vec::new();
                    alarms.free = Vec::new();
                }
            }
        });
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let at = this.at;
        let state = match &mut this.state {
            DeadlineState::Done => return Poll::Ready(()),
            DeadlineState::Tokio(sleep) => return sleep.as_mut().poll(cx),
            DeadlineState::Slot(index, generation) => Some((*index, *generation)),
            DeadlineState::Idle => None,
        };
        let polled = ALARMS.try_with(|alarms| {
            let mut alarms = alarms.borrow_mut();
            if !alarms.running {
                return Poll::Ready(false);
            }
            if let Some((index, generation)) = state {
                let Some(slot) = alarms.slots.get_mut(index).filter(|s| s.generation == generation) else {
                    return Poll::Ready(false);
                };
                if slot.fired {
                    return Poll::Ready(true);
                }
                match &slot.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => slot.waker = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            let waker = Some(cx.waker().clone());
            let slot = match alarms.free.pop() {
                Some(index) => {
                    let slot = &mut alarms.slots[index];
                    (slot.deadline, slot.waker, slot.fired) = (at, waker, false);
                    (index, slot.generation)
                }
                None => {
                    alarms.slots.push(Alarm { deadline: at, waker, fired: false, generation: 0 });
                    (alarms.slots.len() - 1, 0)
                }
            };
            this.state = DeadlineState::Slot(slot.0, slot.1);
            if alarms.armed.is_none_or(|armed| at < armed) {
                alarms.armed = Some(at);
                if let Some(task) = alarms.task.take() {
                    task.wake();
                }
            }
            Poll::Pending
        });
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            // Gone off: free the slot.
            Ok(Poll::Ready(true)) => {
                this.release();
                Poll::Ready(())
            }
            // No alarm on this thread (or the slot was lost): a tokio sleep serves instead.
            Ok(Poll::Ready(false)) | Err(_) => {
                this.release();
                let mut sleep = Box::pin(tokio::time::sleep_until(at));
                let polled = sleep.as_mut().poll(cx);
                this.state = DeadlineState::Tokio(sleep);
                polled
            }
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.release();
    }
}

/// Serves this thread's [`Deadline`]s until dropped: each worker spawns it once.
pub async fn run_alarms() {
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            // Deadlines still waiting fall back to tokio sleeps when next polled.
            let wakers: Vec<Waker> = ALARMS
                .try_with(|alarms| {
                    let mut alarms = alarms.borrow_mut();
                    alarms.running = false;
                    alarms.armed = None;
                    alarms.task = None;
                    alarms.slots.iter_mut().filter_map(|s| s.waker.take()).collect()
                })
                .unwrap_or_default();
            for waker in wakers {
                waker.wake();
            }
        }
    }
    let _ = ALARMS.try_with(|alarms| alarms.borrow_mut().running = true);
    let _stop = Stop;
    let mut sleep = std::pin::pin!(tokio::time::sleep(Duration::from_secs(3600)));
    let mut set: Option<tokio::time::Instant> = None;
    std::future::poll_fn(|cx| {
        loop {
            if set.is_some() && sleep.as_mut().poll(cx).is_ready() {
                set = None;
                let now = tokio::time::Instant::now();
                let due: Vec<Waker> = ALARMS
                    .try_with(|alarms| {
                        let mut alarms = alarms.borrow_mut();
                        let mut next: Option<tokio::time::Instant> = None;
                        let mut due = Vec::new();
                        for slot in alarms.slots.iter_mut().filter(|s| s.waker.is_some() && !s.fired) {
                            if slot.deadline <= now {
                                slot.fired = true;
                                due.extend(slot.waker.take());
                            } else if next.is_none_or(|n| slot.deadline < n) {
                                next = Some(slot.deadline);
                            }
                        }
                        alarms.armed = next;
                        due
                    })
                    .unwrap_or_default();
                for waker in due {
                    waker.wake();
                }
            }
            let armed = ALARMS
                .try_with(|alarms| {
                    let mut alarms = alarms.borrow_mut();
                    alarms.task = Some(cx.waker().clone());
                    alarms.armed
                })
                .ok()
                .flatten();
            match armed {
                Some(at) if set != Some(at) => {
                    sleep.as_mut().reset(at);
                    set = Some(at);
                }
                Some(_) => {}
                None => return Poll::<()>::Pending,
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

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
    fn the_table_a_burst_of_sleeps_grew_is_given_back_when_the_last_is_released() {
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        let mut sleeps: Vec<_> = (0..1000).map(|_| CoarseTimer.sleep(Duration::from_secs(60))).collect();
        for sleep in &mut sleeps {
            assert!(sleep.as_mut().poll(&mut cx).is_pending());
        }
        assert!(SLAB.with(|slab| slab.borrow().slots.len()) >= 1000);
        let last = sleeps.pop();
        drop(sleeps);
        assert!(SLAB.with(|slab| slab.borrow().slots.capacity()) >= 1000, "given back while a slot is held");
        drop(last);
        SLAB.with(|slab| assert_eq!((slab.borrow().slots.capacity(), slab.borrow().free.capacity()), (0, 0)));
    }

    fn alarm_slots() -> (usize, usize) {
        ALARMS.with(|alarms| (alarms.borrow().slots.len(), alarms.borrow().free.len()))
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_fire_on_time_in_order_and_give_their_slots_back() {
        tokio::spawn(run_alarms());
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        let elapsed = move |at: Duration| async move {
            Deadline::at(start + at).await;
            start.elapsed()
        };
        // The later one registers first: the earlier one must set the alarm earlier.
        let late = tokio::spawn(elapsed(Duration::from_millis(50)));
        tokio::task::yield_now().await;
        let early = tokio::spawn(elapsed(Duration::from_millis(10)));
        // One is cancelled after it registered: it is never woken, and the rest still fire.
        let mut cancelled = Deadline::at(start + Duration::from_millis(5));
        std::future::poll_fn(|cx| {
            assert!(Pin::new(&mut cancelled).poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        let (slots, free) = alarm_slots();
        assert_eq!(slots - free, 2, "the late and the cancelled deadline are in the slab, not tokio sleeps");
        drop(cancelled);
        assert_eq!(early.await.unwrap(), Duration::from_millis(10));
        assert_eq!(late.await.unwrap(), Duration::from_millis(50));
        let (slots, free) = alarm_slots();
        assert_eq!(free, slots, "{free} of {slots} slots free (none held: the table is given back)");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_deadline_fires_at_its_new_time() {
        tokio::spawn(run_alarms());
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        let mut deadline = Deadline::at(start + Duration::from_millis(10));
        std::future::poll_fn(|cx| {
            assert!(Pin::new(&mut deadline).poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        deadline.reset(start + Duration::from_millis(30));
        assert_eq!(deadline.deadline(), start + Duration::from_millis(30));
        deadline.await;
        assert_eq!(start.elapsed(), Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_alarm_a_deadline_is_a_tokio_sleep() {
        let start = tokio::time::Instant::now();
        Deadline::at(start + Duration::from_millis(20)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert_eq!(alarm_slots(), (0, 0));
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
