//! Records sent from the data path to the agent through the `FLOW_EVENTS` ring buffer.
//! Only flow starts and ends cross; never one record per packet.

use crate::flow::FlowKey;

/// What happened to a flow.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEventKind {
    /// The first packet of a flow created its entry.
    Start = 1,
    /// A TCP FIN or RST was seen (the first of them).
    End = 2,
    /// An endpoint announced itself on a port: a RARP frame (QEMU after a live
    /// migration), a gratuitous ARP, or an unsolicited IPv6 neighbour advertisement.
    /// The key carries the MAC in `addr_lo[..6]`, the announced address (if any) in
    /// `addr_hi`, the [`Announcement`] kind in `proto`, and the VLAN.
    Announce = 3,
}

/// What kind of frame an [`FlowEventKind::Announce`] event comes from (its key's `proto`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Announcement {
    Rarp = 1,
    GratuitousArp = 2,
    NeighborAdvert = 3,
    /// Not a frame kind: an unbound VM port in a `binding: learn` zone was locked to this
    /// MAC by its first frame (`LEARNED`); the agent confirms the binding.
    Learned = 4,
}

/// `ANNOUNCES` key: a MAC on a port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AnnounceKey {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    pub ifindex: u32,
}

const _: () = assert!(core::mem::size_of::<AnnounceKey>() == 12);

impl FlowEventKind {
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Start),
            2 => Some(Self::End),
            3 => Some(Self::Announce),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub key: FlowKey,
    /// `bpf_ktime_get_coarse_ns()` (`CLOCK_MONOTONIC_COARSE`) when the event happened.
    pub ts_ns: u64,
    /// Port the packet was seen on.
    pub ifindex: u32,
    /// A [`FlowEventKind`].
    pub kind: u8,
    /// Direction of the packet that caused the event.
    pub direction: u8,
    /// A [`crate::Verdict`].
    pub verdict: u8,
    /// TCP flags of that packet.
    pub tcp_flags: u8,
}

const _: () = assert!(core::mem::size_of::<FlowEvent>() == 56);
const _: () = assert!(core::mem::align_of::<FlowEvent>() == 8);
