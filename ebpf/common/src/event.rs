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
}

impl FlowEventKind {
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Start),
            2 => Some(Self::End),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub key: FlowKey,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) when the event happened.
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
