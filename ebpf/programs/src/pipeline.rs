//! The pipeline every program runs a frame through: parse, count, track, judge. (The
//! agent's `datapath` is the loaded object as userspace drives it; this is what runs in
//! the kernel.)
//!
//! While a rule set is in force, a frame that enters the switch from a VM port is
//! judged or dropped, never waved through: its source MAC must be the port's binding
//! (`identity`), and a frame that cannot be parsed down to a flow (other than ARP/RARP
//! and neighbour discovery, checked against the binding too), a VLAN-tagged frame from a
//! port that may not send tagged frames, and a later fragment whose first fragment was
//! not seen are dropped and counted. A frame the switch delivers to a VM port is judged
//! again for that port's endpoint when the receiver it was judged for is another
//! ([`egress`]). Without a rule set everything is observed and passed.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use aya_ebpf::programs::TcContext;
use backplane_common::{
    DatapathConfig, PortInfo, PortRole, Verdict,
    config::{BINDING_NONE, CONFIG_ENFORCE, CONFIG_INDEX, PORT_INGRESS_TC, UNBOUND_DENY},
    event::Announcement,
    flow::{FAMILY_IPV4, FAMILY_IPV6, FragmentKey, FragmentPorts},
    reason::Counter,
};

use crate::{
    conntrack::{self, Action, Hook, Port, TAG_VALID, TAG_ZONE},
    counters, events,
    frame::{self, Frame},
    identity::{self, Sender},
    maps::{CONFIG, FLOWS, FRAGMENTS, SCRATCH},
    parse::{self, END_DST, END_SENDS, FRAG_FIRST, ICMPV6_REDIRECT, ICMPV6_ROUTER_ADVERT, IPPROTO_TCP, Packet, Parsed},
    policy,
    ports::port_may_send_tagged,
};

#[inline(always)]
fn now() -> u64 {
    // SAFETY: reading the kernel's coarse monotonic clock has no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn handle<F: Frame>(frame: &F, ifindex: u32, hook: Hook) -> Action {
    let len = frame.frame_len();
    if hook == Hook::FromPort {
        counters::inc(Counter::Packets);
        counters::add(Counter::Bytes, u64::from(len));
    }
    let cfg = config();
    // Only frames entering the switch from a port are held to the rules here; what the
    // switch delivers was judged where it entered (or comes from the host itself).
    let enforcing = cfg.flags & CONFIG_ENFORCE != 0 && hook == Hook::FromPort;
    // The parsed packet lives in this CPU's scratch entry rather than on the stack: the
    // BPF stack is 512 bytes for the whole call chain, of which kernels before 6.9 give
    // every frame in 32-byte steps. A per-CPU array lookup cannot fail for index 0.
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return if enforcing { Action::Drop } else { Action::Pass };
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for this program run; a program
    // run is not preempted by another on the same CPU (BPF programs run with migration
    // and, at TC and XDP, bottom halves disabled).
    let packet = unsafe { &mut (*scratch).packet };
    *packet = Packet::new();
    let info = if cfg.flags & CONFIG_ENFORCE != 0 {
        // SAFETY: the `port` field of this CPU's scratch entry (see above).
        identity::cached_port(unsafe { core::ptr::addr_of_mut!((*scratch).port) }, ifindex, cfg.ports_epoch)
    } else {
        None
    };
    let port = Port { ifindex, info };
    let vm = port.is_vm();
    if hook == Hook::FromPort {
        // Whatever a guest (or an earlier program) left in the skb says nothing.
        frame.set_receiver_tag(0);
    }
    // Every frame from a VM port carries the binding's MAC (or locks a learning port),
    // checked on the Ethernet header before anything else is read.
    let mut sender = Sender::Unbound;
    if enforcing
        && vm
        && let Some(info) = port.info
    {
        // The two MACs as (4 + 2)-byte words: two compares each, not six.
        let Some(words) = frame.load::<[u16; 6]>(0) else { return drop(Counter::UnjudgedDropped) };
        let (dst_hi, dst_lo) = (u32::from(words[0]) | (u32::from(words[1]) << 16), words[2]);
        let (src_hi, src_lo) = (u32::from(words[3]) | (u32::from(words[4]) << 16), words[5]);
        // A bound port: one compare against its entry, on every frame.
        let bound = info.binding != BINDING_NONE;
        if bound && mac_words(&info.mac) == (src_hi, src_lo) {
            sender = Sender::Bound;
        } else {
            let src_mac = mac_bytes(src_hi, src_lo);
            match identity::check_mac(&cfg, ifindex, info, &src_mac) {
                Ok(s) => sender = s,
                Err(counter) => return drop(counter),
            }
            if let Sender::Learned = sender {
                events::announce(Announcement::Learned, &src_mac, &packet.src, FAMILY_IPV4, 0, ifindex, now());
            }
        }
        if dst_hi == src_hi && dst_lo == src_lo {
            return drop(Counter::ToOwnMac);
        }
    }
    let action = match parse::parse(frame, packet) {
        Parsed::Flow => {
            if enforcing && packet.vlan_tags != 0 && !port_may_send_tagged(ifindex) {
                counters::inc(Counter::TaggedFromVmPort);
                Action::Drop
            } else {
                if packet.frag == FRAG_FIRST {
                    remember_fragment_ports(packet);
                }
                if enforcing
                    && !matches!(sender, Sender::Unbound)
                    && port.info.is_some_and(|i| i.binding == BINDING_NONE)
                {
                    // Locked, not confirmed yet: its zone may come with this address.
                    identity::learn_from(&cfg, ifindex, packet);
                }
                conntrack::track(frame, &cfg, packet, len, &port, hook)
            }
        }
        Parsed::Fragment => {
            if hook == Hook::FromPort {
                counters::inc(if packet.family == FAMILY_IPV4 {
                    Counter::ParseIpv4Fragment
                } else {
                    Counter::ParseBadIpv6Ext
                });
            }
            if enforcing && packet.vlan_tags != 0 && !port_may_send_tagged(ifindex) {
                counters::inc(Counter::TaggedFromVmPort);
                Action::Drop
            } else if enforcing && packet.proto == IPPROTO_TCP && packet.frag_offset == 1 {
                // A TCP fragment at offset 8 can only overlap the first fragment's TCP
                // header (RFC 1858): it would rewrite ports or flags after the first
                // fragment was judged.
                counters::inc(Counter::OverlappingFragment);
                Action::Drop
            } else if fill_fragment_ports(packet) {
                conntrack::track(frame, &cfg, packet, len, &port, hook)
            } else {
                counters::inc(Counter::FragmentWithoutFirst);
                if enforcing && vm { Action::Drop } else { Action::Pass }
            }
        }
        Parsed::Announce(announce) => {
            if hook == Hook::FromPort {
                counters::inc(if announce.rarp { Counter::Rarp } else { Counter::Arp });
            }
            let ip = announce.sender_ip;
            let addr = [ip[0], ip[1], ip[2], ip[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            if enforcing && vm && announce.sender_mac != packet.src_mac {
                // ARP inspection: the sender hardware address is the frame's source,
                // which is the binding's (`spoofed` when it is another port's endpoint).
                counters::inc(if policy::is_spoofed(&cfg, &announce.sender_mac, ifindex) {
                    Counter::Spoofed
                } else {
                    Counter::SpoofedMac
                });
                Action::Drop
            } else if enforcing && !vm && policy::is_spoofed(&cfg, &announce.sender_mac, ifindex) {
                counters::inc(Counter::Spoofed);
                Action::Drop
            } else if enforcing && vm && !claim_arp(&cfg, &port, packet, &addr) {
                // The sender's own MAC, another endpoint's address: ARP cache poisoning.
                counters::inc(Counter::SpoofedAddress);
                Action::Drop
            } else {
                if hook == Hook::FromPort && (announce.rarp || announce.gratuitous) && announces(&sender, vm) {
                    let kind = if announce.rarp { Announcement::Rarp } else { Announcement::GratuitousArp };
                    events::announce(kind, &announce.sender_mac, &addr, FAMILY_IPV4, announce.vlan, ifindex, now());
                }
                Action::Pass
            }
        }
        Parsed::Neighbor { icmp_type, announce } => {
            if enforcing && matches!(icmp_type, ICMPV6_ROUTER_ADVERT | ICMPV6_REDIRECT) && vm {
                counters::inc(Counter::RouterAdvertFromVm);
                Action::Drop
            } else if enforcing && !vm && policy::is_spoofed(&cfg, &packet.src_mac, ifindex) {
                counters::inc(Counter::Spoofed);
                Action::Drop
            } else if enforcing && vm && !claim_ok(&cfg, &port, packet) {
                counters::inc(Counter::SpoofedAddress);
                Action::Drop
            } else {
                if hook == Hook::FromPort && announce && announces(&sender, vm) {
                    events::announce(
                        Announcement::NeighborAdvert,
                        &packet.src_mac,
                        &packet.src,
                        FAMILY_IPV6,
                        packet.vlan,
                        ifindex,
                        now(),
                    );
                }
                Action::Pass
            }
        }
        Parsed::Skip(reason) => {
            if hook == Hook::FromPort {
                counters::inc(reason);
            }
            if enforcing && vm {
                counters::inc(Counter::UnjudgedDropped);
                Action::Drop
            } else {
                Action::Pass
            }
        }
    };
    if action == Action::Drop {
        counters::inc(Counter::Dropped);
    }
    action
}

/// A MAC as the (first four bytes, last two bytes) words `frame.load::<[u16; 6]>` gives.
#[inline(always)]
fn mac_words(mac: &[u8; 6]) -> (u32, u16) {
    (
        u32::from(u16::from_ne_bytes([mac[0], mac[1]])) | (u32::from(u16::from_ne_bytes([mac[2], mac[3]])) << 16),
        u16::from_ne_bytes([mac[4], mac[5]]),
    )
}

/// The bytes of a MAC given as [`mac_words`].
#[inline(always)]
fn mac_bytes(hi: u32, lo: u16) -> [u8; 6] {
    let (a, b) = ((hi as u16).to_ne_bytes(), ((hi >> 16) as u16).to_ne_bytes());
    let c = lo.to_ne_bytes();
    [a[0], a[1], b[0], b[1], c[0], c[1]]
}

#[inline(always)]
fn config() -> DatapathConfig {
    match CONFIG.get(CONFIG_INDEX) {
        Some(cfg) => *cfg,
        None => DatapathConfig::default(),
    }
}

#[inline(always)]
fn drop(counter: Counter) -> Action {
    counters::inc(counter);
    counters::inc(Counter::Dropped);
    Action::Drop
}

/// Whether a VM port may claim the address in `packet.src` (with `packet.family`) in ARP
/// or neighbour discovery: an address of its endpoint (as for the source of a flow), or
/// the unspecified address of a probe.
#[inline(always)]
fn claim_ok(cfg: &DatapathConfig, port: &Port, packet: &Packet) -> bool {
    let Some(info) = port.info else { return true };
    let ident = identity::port_ident(cfg, info, packet, port.ifindex, END_SENDS);
    identity::source_ok(cfg, info, ident, packet, port.ifindex)
}

/// [`claim_ok`] for the sender address of an ARP frame (put where a flow's source is).
#[inline(always)]
fn claim_arp(cfg: &DatapathConfig, port: &Port, packet: &mut Packet, addr: &[u8; 16]) -> bool {
    packet.family = FAMILY_IPV4;
    packet.src = *addr;
    claim_ok(cfg, port, packet)
}

/// Whether an announcement goes to the agent: from an uplink (it says nothing there),
/// or from a VM port whose frames carry its binding's (or learned) MAC. An announcement
/// is a hint that the endpoint behind the port showed up, never a claim on another.
#[inline(always)]
fn announces(sender: &Sender, vm: bool) -> bool {
    !vm || !matches!(sender, Sender::Unbound)
}

/// A frame the switch delivers through VM port `ifindex` after the ingress program of
/// port `from` judged it: passed when the receiver it was judged for has this port's
/// zone and nothing but zones decided (the tag the TC ingress program left); else the
/// copy is judged again with this port's endpoint as its receiver (broadcast, multicast
/// and flooded copies, a misaddressed frame riding a flow judged for someone else, a
/// port without a binding). Uplinks and ports without rules pass.
#[inline(always)]
pub fn egress(ctx: &TcContext, ifindex: u32, from: &PortInfo) -> Action {
    let cfg = config();
    if cfg.flags & CONFIG_ENFORCE == 0 {
        return Action::Pass;
    }
    let Some(to) = identity::port(ifindex) else { return Action::Pass };
    if to.role != PortRole::Vm as u8 {
        return Action::Pass;
    }
    let slot = cfg.active_slot & 1;
    if from.ingress == PORT_INGRESS_TC {
        let tag = frame::receiver_tag(ctx);
        if tag & TAG_VALID != 0
            && to.binding != BINDING_NONE
            && tag & TAG_ZONE == to.zone_in(slot)
            && to.standing_in(slot) == 0
        {
            return Action::Pass;
        }
    }
    counters::inc(Counter::EgressJudged);
    let port = Port { ifindex, info: Some(to) };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return Action::Drop };
    // SAFETY: as in `handle`: this CPU's slot, valid for this program run.
    let packet = unsafe { &mut (*scratch).packet };
    *packet = Packet::new();
    let ready = match parse::parse(ctx, packet) {
        Parsed::Flow => true,
        Parsed::Fragment => fill_fragment_ports(packet),
        // ARP and neighbour discovery were checked where they entered; what could not be
        // parsed from an uplink is judged there (issue: nothing unjudged).
        _ => false,
    };
    if !ready {
        return Action::Pass;
    }
    let receiver = identity::port_ident(&cfg, to, packet, ifindex, END_DST);
    if receiver.unbound() && cfg.unbound_ports == UNBOUND_DENY {
        return drop(Counter::UnboundPort);
    }
    let (key, dir) = packet.flow_key();
    let verdict = match FLOWS.get_ptr_mut(&key) {
        Some(flow) => {
            // SAFETY: a pointer returned by a map lookup is valid for this program run.
            let flow = unsafe { &mut *flow };
            let j = conntrack::judge_stored(&cfg, &key, flow, dir, packet, &port, Hook::ToPort);
            if packet.dst_mac[0] & 1 == 0 {
                // A unicast frame has one receiver: this port's endpoint is the flow's
                // (its record says so from now on, and its next frames take the
                // shortcut). A broadcast or multicast copy is judged for this port only.
                conntrack::record_judgement(flow, &j);
            }
            j.verdict
        }
        None => {
            let src = policy::resolve_addr(slot, packet, 0, 0);
            policy::judge(&cfg, policy::service(packet.proto, packet.dport), src, receiver).verdict
        }
    };
    if verdict == Verdict::Denied {
        return drop(Counter::EgressDenied);
    }
    Action::Pass
}

#[inline(always)]
fn fragment_key(packet: &Packet) -> FragmentKey {
    FragmentKey {
        src: packet.src,
        dst: packet.dst,
        id: packet.frag_id,
        proto: packet.proto,
        family: packet.family,
        _pad: [0; 2],
    }
}

/// Remembers the ports of a fragmented datagram from its first fragment, so that its
/// later fragments belong to the same flow and are judged with it.
#[inline(always)]
fn remember_fragment_ports(packet: &Packet) {
    let ports = FragmentPorts { sport: packet.sport, dport: packet.dport, _pad: [0; 4] };
    if FRAGMENTS.insert(&fragment_key(packet), &ports, 0).is_ok() {
        counters::inc(Counter::FragmentsTracked);
    }
}

/// Gives a later fragment the ports of its datagram's first fragment, if it was seen.
#[inline(always)]
fn fill_fragment_ports(packet: &mut Packet) -> bool {
    match FRAGMENTS.get_ptr(&fragment_key(packet)) {
        Some(ports) => {
            // SAFETY: a pointer returned by a map lookup is valid for this program run.
            let ports = unsafe { *ports };
            packet.sport = ports.sport;
            packet.dport = ports.dport;
            true
        }
        None => false,
    }
}
