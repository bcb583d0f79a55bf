//! Flow start and end events to the agent. Only these cross the ring buffer; a full
//! ring loses the event, never silently: `Counter::EventsLost` counts it.

use backplane_common::{FlowEvent, FlowEventKind, FlowKey, reason::Counter};

use crate::{counters, maps::FLOW_EVENTS};

#[inline(always)]
pub fn emit(kind: FlowEventKind, key: &FlowKey, ts_ns: u64, ifindex: u32, direction: u8, verdict: u8, tcp_flags: u8) {
    match FLOW_EVENTS.reserve::<FlowEvent>(0) {
        Some(mut entry) => {
            entry.write(FlowEvent { key: *key, ts_ns, ifindex, kind: kind as u8, direction, verdict, tcp_flags });
            entry.submit(0);
        }
        None => counters::inc(Counter::EventsLost),
    }
}
