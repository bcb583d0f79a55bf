//! What the `PORTS` map says about the port a frame came in on or goes out of: its role
//! (VM port or uplink), whether its ingress program runs, whether it may send tagged
//! frames. One lookup each, inlined into the programs.

use backplane_common::{
    PortInfo, PortRole,
    config::{PORT_ALLOW_TAGGED, PORT_INGRESS_LIVE},
};

use crate::maps::PORTS;

/// The entry of `ifindex` when it is an attached port whose ingress program runs (VM
/// port or uplink): what enters through it has been counted and judged.
#[inline(always)]
pub fn ingress_judged(ifindex: u32) -> Option<&'static PortInfo> {
    // SAFETY: a pointer returned by a map lookup is valid for this program run.
    let port = unsafe { &*PORTS.get_ptr(ifindex)? };
    (port.flags & PORT_INGRESS_LIVE != 0).then_some(port)
}

/// Uplinks carry tagged traffic; a VM port only when the operator allowed it.
#[inline(always)]
pub fn port_may_send_tagged(ifindex: u32) -> bool {
    match PORTS.get_ptr(ifindex) {
        // SAFETY: a pointer returned by a map lookup is valid for this program run.
        Some(port) => unsafe { (*port).role != PortRole::Vm as u8 || (*port).flags & PORT_ALLOW_TAGGED != 0 },
        None => true,
    }
}
