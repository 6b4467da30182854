//! A set member's endpoint state in one word: none, one to be made by the first request, or one.
//!
//! A set whose balancer reads its endpoints' load and latency (least_request, ewma) needs an
//! endpoint's state only once a request has gone to it, and a config of thousands of clusters,
//! most of them idle, would otherwise hold a 64-byte state for every endpoint from the start.
//! [`StateSlot`] holds no state ([`StateSlot::none`]: the set reads none), the promise of one
//! ([`StateSlot::on_demand`]: made by the first request to ask, [`StateSlot::shared`]), or a
//! state ([`StateSlot::holding`]: made with the set, for health checks and outlier detection, or
//! carried from the set before). The data path reads it with one atomic load; it is the size of the
//! `Option<Arc<_>>` it replaces, where a `OnceLock<Arc<_>>` would double every member's share.

use std::fmt;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, Ordering};

use super::endpoint::{EndpointState, Health};

/// An endpoint's run-time state, held by its set member (see the module).
pub struct StateSlot(AtomicPtr<EndpointState>);

/// What a slot holds until its state is made: an address no allocation has (the first page is
/// never mapped), compared with, never read through.
fn promised() -> *mut EndpointState {
    ptr::dangling_mut()
}

impl StateSlot {
    /// No state, and none made: the set reads none.
    pub fn none() -> StateSlot {
        StateSlot(AtomicPtr::new(ptr::null_mut()))
    }

    /// A state made by the first request that asks for one.
    pub fn on_demand() -> StateSlot {
        StateSlot(AtomicPtr::new(promised()))
    }

    /// `state`, shared with whoever else holds it.
    pub fn holding(state: Arc<EndpointState>) -> StateSlot {
        StateSlot(AtomicPtr::new(Arc::into_raw(state).cast_mut()))
    }

    /// The state, once made.
    fn held(&self) -> Option<*const EndpointState> {
        let state = self.0.load(Ordering::Acquire);
        (!state.is_null() && state != promised()).then_some(state.cast_const())
    }

    /// The state, if it has been made (or was carried).
    #[allow(unsafe_code)]
    pub fn get(&self) -> Option<&EndpointState> {
        // SAFETY: a held pointer came from `Arc::into_raw`, and the slot keeps that count until it
        // is dropped, so the state outlives this borrow of the slot.
        self.held().map(|state| unsafe { &*state })
    }

    /// A share of the state, if it has been made (or was carried): what the next set carries.
    #[allow(unsafe_code)]
    pub fn existing(&self) -> Option<Arc<EndpointState>> {
        self.held().map(|state| {
            // SAFETY: as in `get`: the pointer came from `Arc::into_raw` and its count is alive
            // while the slot is borrowed; the new count is the returned `Arc`'s own.
            unsafe {
                Arc::increment_strong_count(state);
                Arc::from_raw(state)
            }
        })
    }

    /// A share of the state for a request, made now if it was promised.
    #[allow(unsafe_code)]
    pub fn shared(&self) -> Option<Arc<EndpointState>> {
        if self.0.load(Ordering::Acquire) == promised() {
            let made = Arc::into_raw(Arc::new(EndpointState::new(Health::Unchecked))).cast_mut();
            if self.0.compare_exchange(promised(), made, Ordering::AcqRel, Ordering::Acquire).is_err() {
                // Another worker's request made it first: this one goes.
                // SAFETY: `made` came from `Arc::into_raw` above and was never shared.
                drop(unsafe { Arc::from_raw(made) });
            }
        }
        self.existing()
    }

    /// Whether the slot holds no state and makes none.
    pub fn is_none(&self) -> bool {
        self.0.load(Ordering::Acquire).is_null()
    }
}

impl Drop for StateSlot {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        if let Some(state) = self.held() {
            // SAFETY: the slot's own count, taken by `holding` or `shared`, given back once.
            drop(unsafe { Arc::from_raw(state) });
        }
    }
}

impl fmt::Debug for StateSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.get() {
            Some(state) => state.fmt(f),
            None if self.is_none() => f.write_str("none"),
            None => f.write_str("on demand"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_promised_state_is_made_once_by_the_first_request_and_shared_after() {
        let slot = StateSlot::on_demand();
        assert!(slot.get().is_none() && slot.existing().is_none() && !slot.is_none());
        let first = slot.shared().unwrap();
        let second = slot.shared().unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert!(std::ptr::eq(slot.get().unwrap(), &*first));
        assert_eq!(Arc::strong_count(&first), 3, "the slot's count and the two shares");
        drop(slot);
        assert_eq!(Arc::strong_count(&first), 2, "the slot gives its count back");
    }

    #[test]
    fn a_held_state_is_shared_and_none_is_never_made() {
        let state = Arc::new(EndpointState::new(Health::Healthy));
        let slot = StateSlot::holding(state.clone());
        assert!(Arc::ptr_eq(&slot.shared().unwrap(), &state));
        assert!(Arc::ptr_eq(&slot.existing().unwrap(), &state));
        drop(slot);
        assert_eq!(Arc::strong_count(&state), 1);
        let none = StateSlot::none();
        assert!(none.shared().is_none() && none.get().is_none() && none.is_none());
        assert_eq!(std::mem::size_of::<StateSlot>(), std::mem::size_of::<Option<Arc<EndpointState>>>());
    }

    #[test]
    fn workers_racing_to_make_a_state_share_one() {
        let slot = StateSlot::on_demand();
        let made: Vec<Arc<EndpointState>> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..4).map(|_| scope.spawn(|| slot.shared().unwrap())).collect();
            racers.into_iter().map(|racer| racer.join().unwrap()).collect()
        });
        assert!(made.iter().all(|state| Arc::ptr_eq(state, &made[0])));
        assert_eq!(Arc::strong_count(&made[0]), 5);
    }
}
