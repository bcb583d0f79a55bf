//! The flow table: find or create the flow of a packet, count it, judge it.
//!
//! Counting rule: every frame is counted once, where it enters the switch (`from_port`
//! on a VM port or an uplink). The egress program (`to_port`) counts a direction only
//! when no ingress program has seen that direction of the flow (`ifindex[dir] == 0`),
//! e.g. traffic the host itself sends to a VM.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use backplane_common::{
    DatapathConfig, FlowEventKind, FlowKey, FlowValue, Verdict,
    flow::STATE_ENDED,
    policy::{ZonePairKey, ZonePairStats},
    reason::Counter,
    sample::SAMPLES_PER_FLOW,
};

use crate::{
    counters, events,
    frame::Frame,
    maps::{FLOWS, PORTS, SCRATCH, ZONE_PAIR_STATS},
    parse::{IPPROTO_TCP, Packet, TCP_FIN, TCP_RST},
    policy::{self, End},
    sample,
};

/// Where the packet is seen.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Entering the switch through a port (XDP).
    FromPort,
    /// Leaving the switch through a port (TC egress).
    ToPort,
}

/// `BPF_NOEXIST`: create only.
const BPF_NOEXIST: u64 = 1;

/// What to do with the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
}

/// Adds to a counter shared by all CPUs (BPF_ATOMIC add; the bpf target has no
/// compare-and-swap, so `core::sync::atomic` offers no `fetch_add` here).
///
/// # Safety
/// `counter` must point into a live map value.
#[inline(always)]
unsafe fn atomic_add(counter: *mut u64, n: u64) {
    // SAFETY: guaranteed by the caller; the result is unused, so this is BPF_XADD.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(counter, n) };
}

/// A pair indexed by direction: `this` at `dir`, `other` at the opposite one. Written
/// without a variable index into a stack array, which LLVM may turn into an `|` on
/// the frame pointer that the verifier rejects.
#[inline(always)]
fn by_dir<T: Copy>(dir: u8, this: T, other: T) -> [T; 2] {
    if dir & 1 == 0 { [this, other] } else { [other, this] }
}

#[inline(always)]
fn idx(dir: u8) -> usize {
    (dir & 1) as usize
}

/// Tracks one packet of a flow and returns whether it passes.
#[inline(always)]
pub fn track<F: Frame>(frame: &F, cfg: &DatapathConfig, packet: &Packet, len: u32, ifindex: u32, hook: Hook) -> Action {
    let (key, dir) = FlowKey::canonical(
        &packet.src,
        packet.sport,
        &packet.dst,
        packet.dport,
        packet.vlan,
        packet.proto,
        packet.family,
    );
    // SAFETY: reading the kernel's monotonic clock has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let flow = match FLOWS.get_ptr_mut(&key) {
        Some(flow) => flow,
        None => return create(frame, cfg, &key, dir, packet, len, ifindex, hook, now),
    };
    // SAFETY: pointer from a map lookup, valid for this program run; concurrent
    // updates of counters go through atomics, the rest are single-word stores.
    let flow = unsafe { &mut *flow };
    let d = idx(dir);
    let counted = match hook {
        Hook::FromPort => {
            if flow.ifindex[d] != ifindex {
                // First frame of this direction, or its sender now sends from another
                // port: a VM that moved, or one that spoofs another's MAC or address.
                if policy::is_spoofed(cfg, &packet.src_mac, ifindex) {
                    counters::inc(Counter::Spoofed);
                    return Action::Drop;
                }
                if policy::is_spoofed_addr(cfg, packet.family, &packet.src, ifindex, &packet.src_mac)
                    && crate::ports::is_vm_port(ifindex)
                {
                    counters::inc(Counter::SpoofedAddress);
                    return Action::Drop;
                }
                flow.ifindex[d] = ifindex;
            }
            true
        }
        Hook::ToPort => flow.ifindex[d] == 0,
    };
    if counted {
        // SAFETY: the counters are 8-byte aligned fields of a live map value.
        unsafe {
            atomic_add(&raw mut flow.packets[d], 1);
            atomic_add(&raw mut flow.bytes[d], u64::from(len));
        }
        if hook == Hook::ToPort {
            counters::inc(Counter::EgressOnly);
        }
        counters::inc(Counter::FlowPackets);
        // One byte compared on the fast path; the first payload packets go to the agent.
        if flow.samples < SAMPLES_PER_FLOW && sample::has_payload(len, packet.payload_offset) {
            let index = flow.samples;
            flow.samples = index + 1;
            sample::send(frame, &key, len, ifindex, sample::which(dir, index));
        }
    }
    flow.last_seen_ns = now;
    if packet.proto == IPPROTO_TCP {
        if flow.tcp_flags[d] & packet.tcp_flags != packet.tcp_flags {
            flow.tcp_flags[d] |= packet.tcp_flags;
        }
        if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 && flow.state & STATE_ENDED == 0 {
            flow.state |= STATE_ENDED;
            events::emit(FlowEventKind::End, &key, now, ifindex, dir, flow.verdict, packet.tcp_flags);
        }
    }
    if flow.generation != cfg.generation {
        rejudge(cfg, &key, flow, dir, packet, ifindex, hook);
    }
    if flow.verdict >= Verdict::Denied as u8 && counted {
        count_by_zone_pair(flow, len);
    }
    action(flow.verdict)
}

#[inline(always)]
fn action(verdict: u8) -> Action {
    if verdict == Verdict::Denied as u8 { Action::Drop } else { Action::Pass }
}

/// Counts a packet that was denied, or passed only because its policy audits, under
/// its zone pair (from the flow's initiator to its responder), verdict and reason.
#[inline(always)]
fn count_by_zone_pair(flow: &FlowValue, len: u32) {
    if flow.verdict != Verdict::Denied as u8 && flow.verdict != Verdict::Audit as u8 {
        return;
    }
    let zones = by_dir(flow.initiator, flow.zone[0], flow.zone[1]);
    let key = ZonePairKey {
        src_zone: zones[0],
        dst_zone: zones[1],
        verdict: flow.verdict,
        reason: flow.reason,
        _pad: [0; 2],
    };
    match ZONE_PAIR_STATS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot of a per-CPU map value, valid for this program run.
        Some(stats) => unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(len);
        },
        None => {
            let _ = ZONE_PAIR_STATS.insert(&key, &ZonePairStats { packets: 1, bytes: u64::from(len) }, 0);
        }
    }
}

/// Zone the rule set in force gives to the port (by its name), 0 if none. Looked up
/// only when a flow is judged, never on the fast path.
#[inline(always)]
fn port_zone(cfg: &DatapathConfig, ifindex: u32) -> u16 {
    match PORTS.get_ptr(ifindex) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        Some(port) => unsafe { (*port).zone[(cfg.active_slot & 1) as usize] },
        None => 0,
    }
}

/// The two ends of a packet as the judge sees them: the port's zone belongs to the
/// sender when the packet enters the switch, to the receiver when it leaves.
#[inline(always)]
fn ends<'a>(packet: &'a Packet, port_zone: u16, hook: Hook) -> (End<'a>, End<'a>) {
    let (src_pz, dst_pz) = match hook {
        Hook::FromPort => (port_zone, 0),
        Hook::ToPort => (0, port_zone),
    };
    (
        End { mac: &packet.src_mac, addr: &packet.src, port_zone: src_pz },
        End { mac: &packet.dst_mac, addr: &packet.dst, port_zone: dst_pz },
    )
}

#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "the per-packet path passes what it parsed")]
fn create<F: Frame>(
    frame: &F,
    cfg: &DatapathConfig,
    key: &FlowKey,
    dir: u8,
    packet: &Packet,
    len: u32,
    ifindex: u32,
    hook: Hook,
    now: u64,
) -> Action {
    if hook == Hook::FromPort && policy::is_spoofed(cfg, &packet.src_mac, ifindex) {
        // No entry for a spoofed frame: it must not decide the fate of the real
        // endpoint's flow.
        counters::inc(Counter::Spoofed);
        return Action::Drop;
    }
    if hook == Hook::FromPort
        && policy::is_spoofed_addr(cfg, packet.family, &packet.src, ifindex, &packet.src_mac)
        && crate::ports::is_vm_port(ifindex)
    {
        counters::inc(Counter::SpoofedAddress);
        return Action::Drop;
    }
    let (src, dst) = ends(packet, port_zone(cfg, ifindex), hook);
    let j = policy::judge(cfg, packet.family, packet.proto, packet.dport, &src, &dst);
    let d = idx(dir);
    // The new flow's value is built in this CPU's scratch entry (its `value`, beside the
    // `packet` this run parsed): 80 bytes the stack cannot spare on kernels before 6.9.
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        counters::inc(Counter::FlowInsertFailed);
        return action(j.verdict as u8);
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for this program run; only its
    // `value` field is written here, and `packet` (the other field) is only read.
    let value = unsafe { &mut *core::ptr::addr_of_mut!((*scratch).value) };
    *value = FlowValue {
        packets: by_dir(dir, 1, 0),
        bytes: by_dir(dir, u64::from(len), 0),
        first_seen_ns: now,
        last_seen_ns: now,
        ifindex: by_dir(dir, if hook == Hook::FromPort { ifindex } else { 0 }, 0),
        policy_id: j.policy_id,
        generation: cfg.generation,
        zone: by_dir(dir, j.src_zone, j.dst_zone),
        tcp_flags: by_dir(dir, packet.tcp_flags, 0),
        initiator: dir,
        verdict: j.verdict as u8,
        reason: j.reason as u8,
        ..FlowValue::default()
    };
    if hook == Hook::ToPort {
        counters::inc(Counter::EgressOnly);
    }
    if packet.proto == IPPROTO_TCP && packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        value.state |= STATE_ENDED;
    }
    // A flow's first packet may carry payload (a DNS query): it is sample 0.
    let sampled = sample::has_payload(len, packet.payload_offset);
    if sampled {
        value.samples = 1;
    }
    if FLOWS.insert(key, &*value, BPF_NOEXIST).is_err() {
        // Another CPU created it first (then count on its entry), or the update failed.
        if let Some(flow) = FLOWS.get_ptr_mut(key) {
            // SAFETY: pointer from a map lookup, valid for this program run.
            let flow = unsafe { &mut *flow };
            // SAFETY: 8-byte aligned fields of a live map value.
            unsafe {
                atomic_add(&raw mut flow.packets[d], 1);
                atomic_add(&raw mut flow.bytes[d], u64::from(len));
            }
            counters::inc(Counter::FlowPackets);
            count_by_zone_pair(flow, len);
            return action(flow.verdict);
        }
        counters::inc(Counter::FlowInsertFailed);
        count_by_zone_pair(&*value, len);
        return action(value.verdict);
    }
    counters::inc(Counter::FlowsCreated);
    counters::inc(Counter::FlowPackets);
    count_by_zone_pair(&*value, len);
    events::emit(FlowEventKind::Start, key, now, ifindex, dir, value.verdict, packet.tcp_flags);
    if sampled {
        sample::send(frame, key, len, ifindex, sample::which(dir, 0));
    }
    if value.state & STATE_ENDED != 0 {
        events::emit(FlowEventKind::End, key, now, ifindex, dir, value.verdict, packet.tcp_flags);
    }
    action(value.verdict)
}

/// Judges an existing flow again under the rule generation now in force, from the
/// point of view of the side that started it.
#[inline(always)]
fn rejudge(
    cfg: &DatapathConfig,
    key: &FlowKey,
    flow: &mut FlowValue,
    dir: u8,
    packet: &Packet,
    ifindex: u32,
    hook: Hook,
) {
    let (src, dst) = ends(packet, port_zone(cfg, ifindex), hook);
    let (initiator, responder) = if dir == flow.initiator { (src, dst) } else { (dst, src) };
    let (_, dport) = key.receiver(flow.initiator);
    let j = policy::judge(cfg, key.family, key.proto, dport, &initiator, &responder);
    flow.zone = by_dir(flow.initiator, j.src_zone, j.dst_zone);
    flow.verdict = j.verdict as u8;
    flow.reason = j.reason as u8;
    flow.policy_id = j.policy_id;
    flow.generation = cfg.generation;
}
