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
mod datapath;
mod events;
mod frame;
mod maps;
mod parse;
mod policy;
mod sample;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use conntrack::{Action, Hook};

#[xdp]
pub fn from_port(ctx: XdpContext) -> u32 {
    match datapath::handle(&ctx, ctx.ingress_ifindex() as u32, Hook::FromPort) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
    }
}

/// `from_port` at TC ingress (TCX): the same data path for ports where XDP costs more
/// than it saves. Generic XDP must give every frame a linear buffer with XDP headroom,
/// which copies GRO/TSO super-frames; TC sees the skb as it is.
#[classifier]
pub fn from_port_tc(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is the skb the kernel handed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match datapath::handle(&ctx, ifindex, Hook::FromPort) {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
    }
}

#[classifier]
pub fn to_port(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is the skb the kernel handed to this program.
    let (ifindex, came_in) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    // A frame that entered the switch through an attached port was counted and judged
    // there, by `from_port`: nothing is left to do for it on the way out. What remains
    // is what the host itself sends (received on no device) or routes in from ports
    // that are not attached.
    if came_in != 0 && datapath::is_attached(came_in) {
        return TC_ACT_OK;
    }
    match datapath::handle(&ctx, ifindex, Hook::ToPort) {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
    }
}

/// An XDP program that does nothing but pass: never attached by the agent; the
/// benchmarks time it beside `from_port` as the cost floor of running any program.
#[xdp]
pub fn baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
