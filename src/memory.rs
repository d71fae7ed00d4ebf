//! Memory given back after a herd. A rollout's herd (10,000 concurrent reads of one tag) raises
//! resident memory by tens of MiB for the answers being written; once they are written glibc's
//! malloc keeps the freed pages (measured with benches/herd.py: +30.8 MiB still resident a
//! second after the connections closed; +1.7 MiB with this). When requests arriving per second
//! fall to a tenth of a herd's, this asks malloc to return its free pages to the kernel
//! (`malloc_trim`, which also releases free pages inside the heap), once a second for ten
//! seconds: the answers leave the
//! connections' send buffers only as fast as the callers read them, after the requests
//! themselves have ended. (Requests in flight are no signal: a herd's reads of a cached tag
//! end at once, while what they answered waits in the send buffers of slow readers.)
//!
//! Only after a herd, never per request: a trim walks the heap under malloc's lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Requests arriving within one second that make a herd worth giving memory back after, once
/// arrivals fall to a tenth of them: a rollout's herd is thousands at once. A steady load of
/// any size never trims: its arrivals do not fall.
pub const HERD: u64 = 1_000;
/// How often the in-flight count is compared with its peak: memory comes back within a second
/// of a herd's end.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Checks after a herd's end that give memory back: slow readers take seconds to drain what a
/// herd's answers left in the connections' send buffers.
const TRIMS_AFTER_HERD: u32 = 10;

/// Requests started since the process started.
static STARTED: AtomicU64 = AtomicU64::new(0);

/// Counts a request (one relaxed atomic add, on the request path).
pub fn request_started() {
    STARTED.fetch_add(1, Ordering::Relaxed);
}

/// Gives memory back after each herd, for as long as the process serves.
pub async fn give_back_after_herds() {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut trims_left, mut seen, mut last_second) = (0, STARTED.load(Ordering::Relaxed), 0);
    loop {
        tick.tick().await;
        let started = STARTED.load(Ordering::Relaxed);
        let this_second = started - seen;
        seen = started;
        if last_second >= HERD && this_second.saturating_mul(10) <= last_second {
            trims_left = TRIMS_AFTER_HERD;
            tracing::debug!(
                herd = last_second,
                now = this_second,
                "a herd passed: giving free memory back"
            );
        }
        last_second = this_second;
        if trims_left > 0 {
            trims_left -= 1;
            trim();
        }
    }
}

/// Returns malloc's free pages to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes no pointers and only works on malloc's own free lists, under
    // its own locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return memory on their own terms.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
