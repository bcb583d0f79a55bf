//! backplane's data path.
//!
//! One XDP program (`from_port`) sees what enters the switch through a port (what a VM
//! sends, or what arrives from another node on an uplink); one TC egress program
//! (`to_port`) sees what the switch delivers through it. Both parse the frame, find or
//! create its flow, judge it and count it. Userspace never touches packets here.
#![no_std]
#![no_main]

mod maps;

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn from_port(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn to_port(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
