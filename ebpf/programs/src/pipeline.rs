//! The pipeline every program runs a frame through: parse, count, track, judge. (The
//! agent's `datapath` is the loaded object as userspace drives it; this is what runs in
//! the kernel.)
//!
//! While a rule set is in force, a frame that enters the switch from a VM port is
//! judged or dropped, never waved through: a frame that cannot be parsed down to a
//! flow (other than ARP/RARP), a VLAN-tagged frame from a port that may not send
//! tagged frames, and a later fragment whose first fragment was not seen are dropped
//! and counted. Without a rule set everything is observed and passed.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use backplane_common::{
    DatapathConfig,
    config::{CONFIG_ENFORCE, CONFIG_INDEX},
    event::Announcement,
    flow::{FAMILY_IPV4, FAMILY_IPV6, FragmentKey, FragmentPorts},
    reason::Counter,
};

use crate::{
    conntrack::{self, Action, Hook},
    counters, events,
    frame::Frame,
    maps::{CONFIG, FRAGMENTS, SCRATCH},
    parse::{self, FRAG_FIRST, ICMPV6_REDIRECT, ICMPV6_ROUTER_ADVERT, IPPROTO_TCP, Packet, Parsed},
    policy,
    ports::{is_vm_port, port_may_send_tagged},
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
    let cfg = match CONFIG.get(CONFIG_INDEX) {
        Some(cfg) => *cfg,
        None => DatapathConfig::default(),
    };
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
    let action = match parse::parse(frame, packet) {
        Parsed::Flow => {
            if enforcing && packet.vlan_tags != 0 && !port_may_send_tagged(ifindex) {
                counters::inc(Counter::TaggedFromVmPort);
                Action::Drop
            } else {
                if packet.frag == FRAG_FIRST {
                    remember_fragment_ports(packet);
                }
                conntrack::track(frame, &cfg, packet, len, ifindex, hook)
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
                conntrack::track(frame, &cfg, packet, len, ifindex, hook)
            } else {
                counters::inc(Counter::FragmentWithoutFirst);
                if enforcing && is_vm_port(ifindex) { Action::Drop } else { Action::Pass }
            }
        }
        Parsed::Announce(announce) => {
            if hook == Hook::FromPort {
                counters::inc(if announce.rarp { Counter::Rarp } else { Counter::Arp });
            }
            let ip = announce.sender_ip;
            let addr = [ip[0], ip[1], ip[2], ip[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            if enforcing
                && (policy::is_spoofed(&cfg, &packet.src_mac, ifindex)
                    || policy::is_spoofed(&cfg, &announce.sender_mac, ifindex))
            {
                counters::inc(Counter::Spoofed);
                Action::Drop
            } else if enforcing
                && policy::is_spoofed_addr(&cfg, FAMILY_IPV4, &addr, ifindex, &announce.sender_mac)
                && is_vm_port(ifindex)
            {
                // The sender's own MAC, another endpoint's address: ARP cache poisoning.
                counters::inc(Counter::SpoofedAddress);
                Action::Drop
            } else {
                if hook == Hook::FromPort && (announce.rarp || announce.gratuitous) {
                    let kind = if announce.rarp { Announcement::Rarp } else { Announcement::GratuitousArp };
                    events::announce(kind, &announce.sender_mac, &addr, FAMILY_IPV4, announce.vlan, ifindex, now());
                }
                Action::Pass
            }
        }
        Parsed::Neighbor { icmp_type, announce } => {
            if enforcing && matches!(icmp_type, ICMPV6_ROUTER_ADVERT | ICMPV6_REDIRECT) && is_vm_port(ifindex) {
                counters::inc(Counter::RouterAdvertFromVm);
                Action::Drop
            } else if enforcing && policy::is_spoofed(&cfg, &packet.src_mac, ifindex) {
                counters::inc(Counter::Spoofed);
                Action::Drop
            } else if enforcing
                && policy::is_spoofed_addr(&cfg, FAMILY_IPV6, &packet.src, ifindex, &packet.src_mac)
                && is_vm_port(ifindex)
            {
                counters::inc(Counter::SpoofedAddress);
                Action::Drop
            } else {
                if hook == Hook::FromPort && announce {
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
            if enforcing && is_vm_port(ifindex) {
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
