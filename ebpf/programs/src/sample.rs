//! Payload samples: the first bytes of a flow's first payload-carrying packets, copied
//! into the `PAYLOAD_SAMPLES` ring buffer for the agent to name (DNS, TLS, HTTP).
//!
//! Bounded three ways: at most [`SAMPLES_PER_FLOW`] per flow (a byte in the flow's
//! value), at most [`SAMPLE_BUDGET_PER_SEC`] per CPU and second (skips are counted), and
//! the ring buffer's own size (losses are counted).

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
    let Some(budget) = SAMPLE_BUDGET.get_ptr_mut(0) else { return false };
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

/// Sends the first bytes of `frame` as sample `index` of the flow `key`.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "the fields of the sample")]
pub fn send<F: Frame>(frame: &F, key: &FlowKey, len: u32, ifindex: u32, direction: u8, index: u8, now: u64) {
    if !take_budget(now) {
        counters::inc(Counter::PayloadSamplesSkipped);
        return;
    }
    let Some(mut entry) = PAYLOAD_SAMPLES.reserve::<PayloadSample>(0) else {
        counters::inc(Counter::PayloadSamplesLost);
        return;
    };
    let captured = if len > SAMPLE_BYTES as u32 { SAMPLE_BYTES as u32 } else { len };
    let sample = entry.as_mut_ptr();
    // SAFETY: `sample` points into the reserved ring buffer record, which is
    // `size_of::<PayloadSample>()` bytes; `data` holds SAMPLE_BYTES >= captured bytes.
    let copied = captured > 0 && unsafe { frame.copy_prefix(core::ptr::addr_of_mut!((*sample).data).cast(), captured) };
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
