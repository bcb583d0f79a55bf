//! Flow start and end events to the agent. Only these cross the ring buffer; a full
//! ring loses the event, never silently: `Counter::EventsLost` counts it.

use backplane_common::{
    FlowEvent, FlowEventKind, FlowKey,
    event::{AnnounceKey, Announcement},
    reason::Counter,
};

use crate::{
    counters,
    maps::{ANNOUNCES, FLOW_EVENTS},
};

/// Announcements of one MAC on one port closer together than this make one event
/// (QEMU sends several RARP frames after a migration).
const ANNOUNCE_INTERVAL_NS: u64 = 1_000_000_000;

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

/// Tells the agent that `mac` announced itself on port `ifindex` (with `addr`, when the
/// frame carries one). At most one event per MAC and port per second: a guest that
/// floods announcements costs the ring buffer nothing more.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "the fields of the event")]
pub fn announce(kind: Announcement, mac: &[u8; 6], addr: &[u8; 16], family: u8, vlan: u16, ifindex: u32, now: u64) {
    let key = AnnounceKey { mac: *mac, _pad: [0; 2], ifindex };
    if let Some(last) = ANNOUNCES.get_ptr_mut(&key) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        let last = unsafe { &mut *last };
        if now.wrapping_sub(*last) < ANNOUNCE_INTERVAL_NS {
            return;
        }
        *last = now;
    } else {
        let _ = ANNOUNCES.insert(&key, &now, 0);
    }
    let mut flow_key = FlowKey { addr_hi: *addr, vlan, proto: kind as u8, family, ..FlowKey::default() };
    flow_key.addr_lo[..6].copy_from_slice(mac);
    counters::inc(Counter::Announcements);
    emit(FlowEventKind::Announce, &flow_key, now, ifindex, 0, 0, 0);
}
