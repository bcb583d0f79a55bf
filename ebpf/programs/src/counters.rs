//! The per-CPU `COUNTERS` array.

use backplane_common::reason::Counter;

use crate::maps::COUNTERS;

/// Adds `n` to a counter of this CPU.
#[inline(always)]
pub fn add(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of this CPU; no other program run touches it concurrently.
        unsafe { *slot += n };
    }
}

#[inline(always)]
pub fn inc(counter: Counter) {
    add(counter, 1);
}
