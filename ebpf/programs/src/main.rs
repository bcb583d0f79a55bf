//! backplane's data path.
//!
//! One XDP program (`from_port`) sees what enters the switch through a port: what a VM
//! sends, or what arrives from another node on an uplink. One TC egress program
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

#[classifier]
pub fn to_port(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is the skb the kernel handed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
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
