//! Payload samples: the first bytes of a flow's first payload-carrying packets, copied
//! into the `PAYLOAD_SAMPLES` ring buffer for the agent to name (DNS, TLS, HTTP).
//!
//! Bounded three ways: at most [`SAMPLES_PER_FLOW`] per flow (a byte in the flow's
//! value), at most [`SAMPLE_BUDGET_PER_SEC`] per CPU and second (skips are counted), and
//! the ring buffer's own size (losses are counted).

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use backplane_common::{
    FlowKey,
    reason::Counter,
    sample::{PayloadSample, SAMPLE_BUDGET_PER_SEC, SAMPLE_BYTES, SAMPLE_MIN_FRAME},
};

use crate::{
    counters,
    frame::Frame,
    maps::{PAYLOAD_SAMPLES, SAMPLE_BUDGET},
};

const SECOND_NS: u64 = 1_000_000_000;

/// Whether a packet of `len` bytes whose transport payload starts at `payload_offset`
/// carries payload worth a sample.
#[inline(always)]
pub fn has_payload(len: u32, payload_offset: u16) -> bool {
    len > SAMPLE_MIN_FRAME && len > u32::from(payload_offset)
}

/// Takes one sample from this CPU's budget for the current second.
#[inline(always)]
fn take_budget(now: u64) -> bool {
    let Some(budget) = SAMPLE_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for this program run.
    let budget = unsafe { &mut *budget };
    if now.wrapping_sub(budget.window_start_ns) >= SECOND_NS {
        budget.window_start_ns = now;
        budget.used = 0;
    }
    if budget.used >= SAMPLE_BUDGET_PER_SEC {
        return false;
    }
    budget.used += 1;
    true
}

/// The `which` argument of [`send`].
#[inline(always)]
pub fn which(direction: u8, index: u8) -> u32 {
    u32::from(direction) | (u32::from(index) << 8)
}

/// Sends the first bytes of `frame` as sample `index` of the flow `key`.
///
/// A function of its own (a BPF-to-BPF call), not inlined: the per-packet path of an
/// established flow stays as small as it was, and pays only the test that calls it.
#[inline(never)]
/// BPF calls take at most five arguments: `which` is the packet's direction in its low
/// byte and the sample's index in the next one ([`which`]).
pub fn send<F: Frame>(frame: &F, key: &FlowKey, len: u32, ifindex: u32, which: u32) {
    let (direction, index) = ((which & 0xff) as u8, ((which >> 8) & 0xff) as u8);
    // SAFETY: reading the kernel's coarse monotonic clock has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if !take_budget(now) {
        counters::inc(Counter::PayloadSamplesSkipped);
        return;
    }
    let Some(mut entry) = PAYLOAD_SAMPLES.reserve::<PayloadSample>(0) else {
        counters::inc(Counter::PayloadSamplesLost);
        return;
    };
    let captured = if len > SAMPLE_BYTES as u32 { SAMPLE_BYTES as u32 } else { len };
    // The verifier wants the copy's length proven to be 1..=SAMPLE_BYTES. LLVM knows
    // `len` is above SAMPLE_MIN_FRAME here and folds range tests into forms the verifier
    // cannot follow; a volatile read hides the value from LLVM, and a mask plus one is a
    // form the verifier bounds (a 0 would become SAMPLE_BYTES: the copy then fails on
    // the frame's bounds and the sample is discarded).
    // SAFETY: reading a local variable.
    let captured = unsafe { core::ptr::read_volatile(&raw const captured) };
    let captured = (captured.wrapping_sub(1) & (SAMPLE_BYTES as u32 - 1)) + 1;
    let sample = entry.as_mut_ptr();
    // SAFETY: `sample` points into the reserved ring buffer record, which is
    // `size_of::<PayloadSample>()` bytes; `data` holds SAMPLE_BYTES >= captured bytes.
    let copied = unsafe { frame.copy_prefix(core::ptr::addr_of_mut!((*sample).data).cast(), captured) };
    if !copied {
        entry.discard(0);
        counters::inc(Counter::PayloadSamplesSkipped);
        return;
    }
    // SAFETY: as above; every header field is written before the record is submitted.
    unsafe {
        core::ptr::addr_of_mut!((*sample).key).write(*key);
        core::ptr::addr_of_mut!((*sample).ts_ns).write(now);
        core::ptr::addr_of_mut!((*sample).ifindex).write(ifindex);
        core::ptr::addr_of_mut!((*sample).frame_len).write(len);
        core::ptr::addr_of_mut!((*sample).captured).write(captured as u16);
        core::ptr::addr_of_mut!((*sample).direction).write(direction);
        core::ptr::addr_of_mut!((*sample).index).write(index);
        core::ptr::addr_of_mut!((*sample)._pad).write([0; 4]);
    }
    entry.submit(0);
    counters::inc(Counter::PayloadSamples);
}
