//! Freed memory given back to the system.
//!
//! The system allocator (glibc's) keeps what it freed in its heaps for reuse: after a burst of
//! connections, or a config that shrank, a proxy's RSS stayed at its peak although almost all of
//! it was free (a burst of 9,000 connections moving 1 MiB each left 284 MB where 11 MB were in use
//! before it). [`give_back`] runs on the control thread and, every
//! `limits::MEMORY_RETURN_INTERVAL`, asks the allocator to return the free pages of every heap to
//! the system (`malloc_trim`), which is cheap when there is nothing to return. Other allocators
//! were measured and not chosen: mimalloc returned memory only while it was being called, and held
//! more per idle connection (docs/benchmarks.md, "Memory after bursts and config changes").
//! Pages come back only when nothing in them is in use, so work that allocates much and keeps
//! little (a config's parse) runs [`apart`], on a thread of its own, where its blocks do not sit
//! among the ones that stay.

use std::time::Duration;

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

/// Returns free memory to the system every `every`, until dropped.
pub async fn give_back(every: Duration) {
    fix_trim_threshold();
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        trim();
    }
}

/// The free space at the top of a heap that is given back as soon as a large block is freed.
const TRIM_THRESHOLD: usize = 1 << 20;

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
    fn freed_memory_is_returned() {
        // 64 MiB in small blocks (below glibc's mmap threshold, so they live in the heap), freed.
        let blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 16 * 1024]).collect();
        drop(blocks);
        assert!(trim(), "nothing was returned after 64 MiB were freed");
    }
}
