//! The flow table: find or create the flow of a packet, count it, judge it.
//!
//! Counting rule: every frame is counted once, where it enters the switch (`from_port`
//! on a VM port or an uplink). The egress program (`to_port`) counts a direction only
//! when no ingress program has seen that direction of the flow (`ifindex[dir] == 0`),
//! e.g. traffic the host itself sends to a VM.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use backplane_common::{
    DatapathConfig, FlowEventKind, FlowKey, FlowValue, PortInfo, Verdict,
    config::CONFIG_ENFORCE,
    flow::STATE_ENDED,
    policy::{ZonePairKey, ZonePairStats},
    reason::{Counter, Reason},
    sample::SAMPLES_PER_FLOW,
};

use crate::{
    counters, events,
    frame::Frame,
    identity,
    maps::{FLOWS, SCRATCH, ZONE_PAIR_STATS},
    parse::{END_DST, END_SENDS, END_SPOKE, IPPROTO_TCP, Packet, TCP_FIN, TCP_RST},
    policy::{self, Ident, Judgement},
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

/// The port a frame is seen on: its ifindex and `PORTS` entry (`None`: not attached).
#[derive(Clone, Copy)]
pub struct Port {
    pub ifindex: u32,
    pub info: Option<&'static PortInfo>,
}

impl Port {
    #[inline(always)]
    pub fn is_vm(&self) -> bool {
        identity::is_vm(self.info)
    }
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
pub fn track<F: Frame>(frame: &F, cfg: &DatapathConfig, packet: &Packet, len: u32, port: &Port, hook: Hook) -> Action {
    let ifindex = port.ifindex;
    let (key, dir) = packet.flow_key();
    // SAFETY: reading the kernel's monotonic clock has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let flow = match FLOWS.get_ptr_mut(&key) {
        Some(flow) => flow,
        None => return create(frame, cfg, &key, dir, packet, len, port, hook, now),
    };
    // SAFETY: pointer from a map lookup, valid for this program run; concurrent
    // updates of counters go through atomics, the rest are single-word stores.
    let flow = unsafe { &mut *flow };
    let d = idx(dir);
    let counted = match hook {
        Hook::FromPort => {
            if flow.ifindex[d] != ifindex {
                // First frame of this direction, or its sender now sends from another
                // port: a VM that moved, or one that spoofs another's address, or one
                // that injects into a flow it may not have.
                let this = match sender(cfg, packet, port) {
                    Ok(ident) => ident,
                    Err(counter) => {
                        counters::inc(counter);
                        return Action::Drop;
                    }
                };
                // The flow's verdict must hold for this sender as itself.
                let other = stored_end(cfg, flow.ifindex[d ^ 1], packet, END_DST);
                let (initiator, responder) = if dir == flow.initiator { (this, other) } else { (other, this) };
                let (_, dport) = key.receiver(flow.initiator);
                let j = policy::judge(cfg, policy::service(key.proto, dport), initiator, responder);
                if j.verdict == Verdict::Denied && flow.verdict != Verdict::Denied as u8 {
                    counters::inc(Counter::ForeignSender);
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
        rejudge(cfg, &key, flow, dir, packet, port, hook);
    }
    frame.set_receiver_tag(receiver_tag(flow, dir));
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

/// What `to_port` may trust about the receiver a frame was judged for: the receiver's
/// zone, when the verdict rested on zones alone (no standing, patch or binding of either
/// end decided it). 0: nothing; the copy is judged again where it leaves.
pub const TAG_VALID: u16 = 0x8000;
pub const TAG_ZONE: u16 = 0x3fff;

#[inline(always)]
fn receiver_tag(flow: &FlowValue, dir: u8) -> u16 {
    // A flow handed over by another node (`migrated`) keeps the verdict it had there,
    // for the zones it had there: its receiver is checked by zone like the rest.
    let r = flow.reason;
    let by_zones_alone = r == Reason::PolicyAllow as u8
        || r == Reason::IntraZone as u8
        || r == Reason::DefaultInterZone as u8
        || r == Reason::PolicyNoMatch as u8
        || r == Reason::Migrated as u8;
    let zone = flow.zone[idx(dir ^ 1)];
    if by_zones_alone && zone <= TAG_ZONE { TAG_VALID | zone } else { 0 }
}

/// The sender of a frame entering the switch, with its source address checked: a VM
/// port's binding (the address must be the endpoint's), else what the frame says (an
/// uplink carries other nodes' endpoints and the world; a MAC bound to a port here is
/// spoofed there). `Err`: the counter of a frame to drop.
#[inline(always)]
fn sender(cfg: &DatapathConfig, packet: &Packet, port: &Port) -> Result<Ident, Counter> {
    let slot = cfg.active_slot & 1;
    match port.info {
        Some(info) if port.is_vm() && cfg.flags & CONFIG_ENFORCE != 0 => {
            let ident = identity::port_ident(cfg, info, packet, port.ifindex, END_SENDS);
            if !identity::source_ok(cfg, info, ident, packet, port.ifindex) {
                return Err(Counter::SpoofedAddress);
            }
            if ident.unbound()
                && ident.flags & backplane_common::policy::ENDPOINT_QUARANTINED != 0
                && cfg.unbound_ports == backplane_common::config::UNBOUND_DENY
            {
                // Locked on first use, but no identity learned: `deny` drops it.
                return Err(Counter::UnboundPort);
            }
            Ok(ident)
        }
        _ => {
            if policy::is_spoofed(cfg, &packet.src_mac, port.ifindex) {
                return Err(Counter::Spoofed);
            }
            let zone = port.info.map_or(0, |p| p.zone_in(slot));
            Ok(policy::resolve_addr(slot, packet, 0, zone))
        }
    }
}

/// The receiver of a frame: the endpoint of the VM port it leaves through (at egress),
/// else what its destination MAC and address say.
#[inline(always)]
fn receiver(cfg: &DatapathConfig, packet: &Packet, port: &Port, hook: Hook) -> Ident {
    let slot = cfg.active_slot & 1;
    match port.info {
        Some(info) if hook == Hook::ToPort && port.is_vm() && cfg.flags & CONFIG_ENFORCE != 0 => {
            identity::port_ident(cfg, info, packet, port.ifindex, END_DST)
        }
        // A VM port of this node locked to the destination MAC on first use (the agent
        // may not have confirmed it yet); else the frame's fields.
        _ => match identity::local_receiver(packet) {
            0 => policy::resolve_addr(slot, packet, END_DST, 0),
            ifindex => match identity::port(ifindex) {
                Some(info) => identity::port_ident(cfg, info, packet, ifindex, END_DST),
                None => policy::resolve_addr(slot, packet, END_DST, 0),
            },
        },
    }
}

/// The identity of one end of a stored flow: the port it was seen sending from, when
/// that is a VM port here (who opened a flow does not change with who sends next), else
/// the frame's fields for that end (`END_DST` or its source).
#[inline(always)]
fn stored_end(cfg: &DatapathConfig, flow_ifindex: u32, packet: &Packet, end: u8) -> Ident {
    if flow_ifindex != 0
        && let Some(info) = identity::port(flow_ifindex)
        && info.role == backplane_common::PortRole::Vm as u8
        && cfg.flags & CONFIG_ENFORCE != 0
    {
        return identity::port_ident(cfg, info, packet, flow_ifindex, end | END_SPOKE);
    }
    policy::resolve_addr(cfg.active_slot & 1, packet, end, 0)
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
    port: &Port,
    hook: Hook,
    now: u64,
) -> Action {
    let ifindex = port.ifindex;
    let src = if hook == Hook::FromPort {
        match sender(cfg, packet, port) {
            Ok(ident) => ident,
            Err(counter) => {
                // No entry for a spoofed frame: it must not decide the fate of the real
                // endpoint's flow.
                counters::inc(counter);
                return Action::Drop;
            }
        }
    } else {
        // What the host itself sends to a port.
        policy::resolve_addr(cfg.active_slot & 1, packet, 0, 0)
    };
    let dst = receiver(cfg, packet, port, hook);
    if hook == Hook::ToPort
        && port.is_vm()
        && dst.unbound()
        && cfg.unbound_ports == backplane_common::config::UNBOUND_DENY
        && cfg.flags & CONFIG_ENFORCE != 0
    {
        // What the host sends to a port nobody bound, under `unbound_ports: deny`.
        counters::inc(Counter::UnboundPort);
        return Action::Drop;
    }
    let j = policy::judge(cfg, policy::service(packet.proto, packet.dport), src, dst);
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
    frame.set_receiver_tag(receiver_tag(value, dir));
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
/// point of view of the side that started it, each end by its stored identity (the port
/// it sent from), not by who sends next.
#[inline(always)]
fn rejudge(
    cfg: &DatapathConfig,
    key: &FlowKey,
    flow: &mut FlowValue,
    dir: u8,
    packet: &Packet,
    port: &Port,
    hook: Hook,
) {
    let j = judge_stored(cfg, key, flow, dir, packet, port, hook);
    record_judgement_always(flow, &j);
    flow.generation = cfg.generation;
}

/// Writes a judgement (from the flow's initiator's side) into the flow.
#[inline(always)]
fn record_judgement_always(flow: &mut FlowValue, j: &Judgement) {
    flow.zone = by_dir(flow.initiator, j.src_zone, j.dst_zone);
    flow.verdict = j.verdict as u8;
    flow.reason = j.reason as u8;
    flow.policy_id = j.policy_id;
}

/// Writes the judgement of a copy delivered to a VM port into its flow, when it judged
/// other ends or gave another verdict than the flow's: the same ends and verdict keep what
/// the flow records (a flow handed over from another node stays `migrated`).
#[inline(always)]
pub fn record_judgement(flow: &mut FlowValue, j: &Judgement) {
    let zone = by_dir(flow.initiator, j.src_zone, j.dst_zone);
    if flow.zone != zone || flow.verdict != j.verdict as u8 {
        record_judgement_always(flow, j);
    }
}

/// The verdict the rules in force give a stored flow, from its initiator's side: each
/// end by the VM port it was seen sending from; an end not seen yet by the frame in hand
/// (at egress: the receiving port's endpoint).
#[inline(always)]
pub fn judge_stored(
    cfg: &DatapathConfig,
    key: &FlowKey,
    flow: &FlowValue,
    dir: u8,
    packet: &Packet,
    port: &Port,
    hook: Hook,
) -> Judgement {
    let d = idx(dir);
    // The sender of the frame in hand, on its own port: a port locked on first use whose
    // zone is still unknown learns it from this frame's address (as a new flow would).
    let sends = if hook == Hook::FromPort && flow.ifindex[d] == port.ifindex { END_SENDS } else { 0 };
    let this = stored_end(cfg, flow.ifindex[d], packet, sends);
    let other = if hook == Hook::ToPort {
        receiver(cfg, packet, port, hook)
    } else {
        stored_end(cfg, flow.ifindex[d ^ 1], packet, END_DST)
    };
    let (initiator, responder) = if dir == flow.initiator { (this, other) } else { (other, this) };
    let (_, dport) = key.receiver(flow.initiator);
    policy::judge(cfg, policy::service(key.proto, dport), initiator, responder)
}
