//! backplane's data path.
//!
//! One program sees what enters the switch through a port: what a VM sends, or what
//! arrives from another node on an uplink; it runs at TC ingress (`from_port_tc`, the
//! default) or XDP (`from_port`), as the agent is told per port role. One TC egress program
//! (`to_port`) sees what the switch delivers through that port. Both parse the frame,
//! find or create its flow in the kernel flow table, judge it and count it. Userspace
//! never touches individual packets; it hears only of flow starts and ends.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "atomic add on map values needs core::intrinsics::atomic_xadd")]

mod conntrack;
mod counters;
mod events;
mod frame;
mod identity;
mod maps;
mod parse;
mod pipeline;
mod policy;
mod ports;
mod sample;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use conntrack::{Action, Hook};

// Entry points are inlined into the function aya's macros wrap them in: a frame of their
// own would cost 32 bytes of the 512-byte stack on kernels before 6.9, which round every
// frame of a call chain up to 32.
#[xdp]
#[inline(always)]
pub fn from_port(ctx: XdpContext) -> u32 {
    match pipeline::handle(&ctx, ctx.ingress_ifindex() as u32, Hook::FromPort) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
    }
}

/// What the classifiers return for a frame they let through: `TC_ACT_UNSPEC`, which TCX
/// reads as "next": other programs on the same hook (another product's, an operator's)
/// still run, and the frame passes when none is left. `TC_ACT_OK` would end the chain.
const TC_PASS: i32 = TC_ACT_UNSPEC;

/// `from_port` at TC ingress (TCX): the same data path for ports where XDP costs more
/// than it saves. Generic XDP must give every frame a linear buffer with XDP headroom,
/// which copies GRO/TSO super-frames; TC sees the skb as it is.
#[classifier]
#[inline(always)]
pub fn from_port_tc(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is the skb the kernel handed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match pipeline::handle(&ctx, ifindex, Hook::FromPort) {
        Action::Pass => TC_PASS,
        Action::Drop => TC_ACT_SHOT,
    }
}

#[classifier]
#[inline(always)]
pub fn to_port(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is the skb the kernel handed to this program.
    let (ifindex, came_in) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    // A frame that entered the switch through an attached port was counted and judged
    // there, by `from_port`, for the receiver its addresses named: on the way out to a VM
    // port it is checked only against that port's endpoint. What remains is what the
    // host itself sends (received on no device) or routes in from ports that are not
    // attached.
    if came_in != 0
        && let Some(from) = ports::ingress_judged(came_in)
    {
        return match pipeline::egress(&ctx, ifindex, from) {
            Action::Pass => TC_PASS,
            Action::Drop => TC_ACT_SHOT,
        };
    }
    match pipeline::handle(&ctx, ifindex, Hook::ToPort) {
        Action::Pass => TC_PASS,
        Action::Drop => TC_ACT_SHOT,
    }
}

/// An XDP program that does nothing but pass: never attached by the agent; the
/// benchmarks time it beside `from_port` as the cost floor of running any program.
#[xdp]
pub fn baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Never attached either: one lookup in `FLOWS` of the key of an IPv4 frame (addresses
/// and ports read at fixed offsets, no parsing), timed by the benchmarks as the floor
/// under any fast path that keeps its flows in a kernel hash table.
#[xdp]
pub fn baseline_lookup(ctx: XdpContext) -> u32 {
    use frame::Frame as _;
    let Some(a) = ctx.load::<[u8; 12]>(26) else { return xdp_action::XDP_PASS };
    let mut key =
        backplane_common::FlowKey { proto: 6, family: backplane_common::flow::FAMILY_IPV4, ..Default::default() };
    key.addr_lo[..4].copy_from_slice(&a[0..4]);
    key.addr_hi[..4].copy_from_slice(&a[4..8]);
    key.port_lo = u16::from_be_bytes([a[8], a[9]]);
    key.port_hi = u16::from_be_bytes([a[10], a[11]]);
    if maps::FLOWS.get_ptr(&key).is_some() { xdp_action::XDP_PASS } else { xdp_action::XDP_DROP }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
