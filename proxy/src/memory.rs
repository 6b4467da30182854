//! Freed memory given back to the system.
//!
//! The system allocator (glibc's) keeps what it freed in its heaps for reuse: after a burst of
//! connections, or a config that shrank, a proxy's RSS stayed at its peak although almost all of
//! it was free (a burst of 9,000 connections moving 1 MiB each left 284 MB where 11 MB were in use
//! before it). [`give_back`] runs on the control thread and, every
//! `limits::MEMORY_RETURN_INTERVAL`, asks the allocator to return the free pages of every heap to
//! the system (`malloc_trim`), which is cheap when there is nothing to return. It does so sooner
//! once a burst has ended: connections that let go of their buffers (closed, parked between
//! requests, HTTP/2 tidied) are counted ([`released`]), and when many did and then none for a
//! moment, the burst's buffers are given back at once. Other allocators
//! were measured and not chosen: mimalloc returned memory only while it was being called, and held
//! more per idle connection (docs/benchmarks.md, "Memory after bursts and config changes").
//! Pages come back only when nothing in them is in use, so work that allocates much and keeps
//! little (a config's parse) runs [`apart`], on a thread of its own, where its blocks do not sit
//! among the ones that stay, and `remora proxy` runs glibc's per-thread cache of freed blocks
//! small ([`with_tuned_allocator`]), since the blocks it keeps count as in use.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Connections that let go of their buffers, process-wide, since the proxy started.
static RELEASED: AtomicUsize = AtomicUsize::new(0);

/// How many connections letting go of their buffers make a burst worth giving back at once: each
/// held 10 kB and more of buffers while it was busy.
const BURST: usize = 256;

/// How often the give-back looks whether a burst has ended.
const BURST_CHECK: Duration = Duration::from_millis(250);

/// The least time between two give-backs a burst brings on: each locks the allocator's heaps in
/// turn while it walks their free blocks, longer the larger the heap.
const BURST_MIN_GAP: Duration = Duration::from_secs(1);

/// Counts a connection that let go of its buffers: closed, parked between requests, or tidied.
pub fn released() {
    RELEASED.fetch_add(1, Ordering::Relaxed);
}

/// Runs `work` on a thread of its own and returns what it made. For work that allocates much and
/// keeps little (a config's parse, the decoding of resources to compose an update): glibc gives each
/// thread its own arena, so those short-lived blocks are not interleaved with the long-lived ones
/// the calling thread makes meanwhile, whose pages they would otherwise keep part-used once freed
/// (blocks are freed into the arena they came from, whichever thread frees them).
pub fn apart<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| match scope.spawn(work).join() {
        Ok(made) => made,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// Returns free memory to the system every `every`, and once a burst of connections has ended,
/// until dropped.
pub async fn give_back(every: Duration) {
    fix_trim_threshold();
    let mut check = tokio::time::interval(BURST_CHECK.min(every));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    let mut due = Due::new(tokio::time::Instant::now(), every);
    loop {
        check.tick().await;
        let now = tokio::time::Instant::now();
        if due.at(now, RELEASED.load(Ordering::Relaxed)) {
            trim();
            due.trimmed(now);
        }
    }
}

/// When the next give-back is due: `every` after the last, or as soon as a burst has ended (at
/// least [`BURST`] connections released since the last one, and none since the last look), at
/// least [`BURST_MIN_GAP`] after the last.
struct Due {
    every: Duration,
    last: tokio::time::Instant,
    /// The count of released connections at the last give-back, and at the last look.
    at_last: usize,
    seen: usize,
}

impl Due {
    fn new(now: tokio::time::Instant, every: Duration) -> Due {
        let released = RELEASED.load(Ordering::Relaxed);
        Due { every, last: now, at_last: released, seen: released }
    }

    /// Whether to give back now, with `released` counted so far.
    fn at(&mut self, now: tokio::time::Instant, released: usize) -> bool {
        let since = now.duration_since(self.last);
        let burst_ended = released.wrapping_sub(self.at_last) >= BURST && released == self.seen;
        self.seen = released;
        (burst_ended && since >= BURST_MIN_GAP) || since >= self.every
    }

    fn trimmed(&mut self, now: tokio::time::Instant) {
        self.last = now;
        self.at_last = self.seen;
    }
}

/// The free space at the top of a heap that is given back as soon as a large block is freed: at
/// most this much of a worker's heap stays resident, free, after a burst (at 1 MiB, one burst in
/// twenty of 10,000 connections settled 1 MB above the others; at 256 KiB, none of twenty).
const TRIM_THRESHOLD: usize = 256 << 10;

/// Fixes glibc's trim threshold (and with it, its mmap threshold at 128 KiB). `malloc_trim` does
/// not give back the free top of a thread's own arena, only `free` does, once that top exceeds
/// the trim threshold, which glibc otherwise raises to twice the largest block it has freed (up to
/// 64 MiB): a config compiled on a blocking thread left its arena's top, 7.5 MB of a 2,000-cluster
/// config, resident after the config shrank, though none of it was in use.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn fix_trim_threshold() {
    // SAFETY: `mallopt` sets an allocator parameter; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_trim_threshold() {}

/// The tunable of glibc's allocator a proxy runs with: how many freed blocks of each small size a
/// thread keeps for reuse (its `tcache`; glibc's default is 7).
const THREAD_CACHE_TUNABLE: &str = "glibc.malloc.tcache_count";
const THREAD_CACHE_BLOCKS: u32 = 4;

/// Runs this program again, in place, with glibc's thread cache set to [`THREAD_CACHE_BLOCKS`]
/// blocks of each size in `GLIBC_TUNABLES`, unless the environment already sets that tunable.
/// Returns (and the program runs as it was) when there is nothing to do, with the error when the
/// program could not be run again.
///
/// A thread's cache holds up to 7 freed blocks of each of 64 sizes, which the allocator counts as
/// in use: after a burst of connections they are the last blocks the burst freed, scattered over
/// the heap it grew, each keeping its page resident where `malloc_trim` would return it (after
/// three bursts of 10,000 connections, 1.1–1.4 MB above the 12.5 MB the proxy held before, with
/// 176 kB in use in the worker's heap; 0.3–0.7 MB with 2 or 4 blocks, none with 0). Four blocks
/// keep nearly all of the cache's speed (none: +2.5% instructions per request), and a large
/// config's compiled form lies as compactly as with 7 (with 2 or 3, 3% more per cluster). The
/// tunable is read only when a program starts, hence the second start; an operator's own
/// `GLIBC_TUNABLES` is kept, and one that sets the cache's size wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn with_tuned_allocator() -> Option<std::io::Error> {
    use std::os::unix::process::CommandExt;
    let tunables = match std::env::var("GLIBC_TUNABLES") {
        Ok(set) if set.contains(THREAD_CACHE_TUNABLE) => return None,
        Ok(set) if !set.is_empty() => format!("{set}:{THREAD_CACHE_TUNABLE}={THREAD_CACHE_BLOCKS}"),
        Ok(_) | Err(std::env::VarError::NotPresent) => format!("{THREAD_CACHE_TUNABLE}={THREAD_CACHE_BLOCKS}"),
        Err(std::env::VarError::NotUnicode(_)) => return None,
    };
    let mut args = std::env::args_os();
    let program = args.next()?;
    // `exec` returns only when it failed.
    Some(std::process::Command::new("/proc/self/exe").arg0(program).args(args).env("GLIBC_TUNABLES", tunables).exec())
}

/// Nothing to do: the allocator tunable applies to glibc only.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn with_tuned_allocator() -> Option<std::io::Error> {
    None
}

/// Asks the allocator to give its free pages back; `true` if it returned any.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() -> bool {
    // SAFETY: `malloc_trim` takes no pointers; it locks each of glibc's heaps in turn and releases
    // the pages of its free chunks. A pad of 0 keeps nothing in reserve at the top of the heap.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Asks the allocator to give its free pages back: a no-op where the allocator does it itself.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_give_back_is_due_periodically_and_once_a_burst_has_ended() {
        let start = tokio::time::Instant::now();
        let every = Duration::from_secs(5);
        let mut due = Due { every, last: start, at_last: 0, seen: 0 };
        let later = |ms| start + Duration::from_millis(ms);
        // A few released connections wait for the period.
        assert!(!due.at(later(250), 10));
        assert!(!due.at(later(500), 10));
        // A burst under way waits; once no more are released, it is given back.
        assert!(!due.at(later(750), 10 + BURST));
        assert!(!due.at(later(1000), 20 + BURST));
        assert!(due.at(later(1250), 20 + BURST));
        due.trimmed(later(1250));
        // Another burst right after waits for the least gap between give-backs.
        assert!(!due.at(later(1500), 20 + 2 * BURST));
        assert!(!due.at(later(2000), 20 + 2 * BURST));
        assert!(due.at(later(2250), 20 + 2 * BURST));
        due.trimmed(later(2250));
        // Nothing new: the period counts from the last give-back.
        assert!(!due.at(later(7000), 20 + 2 * BURST));
        assert!(due.at(later(7250), 20 + 2 * BURST));
    }

    #[test]
    fn freed_memory_is_returned() {
        // 64 MiB in small blocks (below glibc's mmap threshold, so they live in the heap), freed.
        let blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 16 * 1024]).collect();
        drop(blocks);
        assert!(trim(), "nothing was returned after 64 MiB were freed");
    }
}
