//! Payload samples: the first bytes of the first payload-carrying packets of each flow,
//! handed to the agent through their own ring buffer (`PAYLOAD_SAMPLES`) so that it can
//! name what the flow is about (DNS query name, TLS server name, HTTP host). The fast
//! path of an established flow pays one byte comparison for this.

use crate::flow::FlowKey;

/// Bytes of a frame copied into a sample, from its Ethernet header on: the headers and
/// at least the first 370 bytes of payload (headers are at most about 140 bytes).
pub const SAMPLE_BYTES: usize = 512;

/// Payload-carrying packets sampled per flow (both directions together).
pub const SAMPLES_PER_FLOW: u8 = 3;

/// Samples one CPU may send per second; beyond it, samples are skipped (and counted):
/// under a flood of new flows the ring buffer and the agent see a bounded rate.
pub const SAMPLE_BUDGET_PER_SEC: u32 = 2000;

/// Frames of at most this length may be Ethernet padding past the IP datagram; they are
/// not sampled (a real NIC pads a bare TCP ACK of 54 bytes to 60).
pub const SAMPLE_MIN_FRAME: u32 = 60;

/// One sample in the `PAYLOAD_SAMPLES` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadSample {
    /// The flow the packet belongs to.
    pub key: FlowKey,
    /// `bpf_ktime_get_coarse_ns()` when the packet was seen.
    pub ts_ns: u64,
    /// Port the packet was seen on.
    pub ifindex: u32,
    /// Length of the whole frame.
    pub frame_len: u32,
    /// Bytes of `data` that hold the frame's first bytes (at most [`SAMPLE_BYTES`]).
    pub captured: u16,
    /// Direction of the packet relative to `key` (`DIR_LO_TO_HI` / `DIR_HI_TO_LO`).
    pub direction: u8,
    /// Which sample of its flow this is (0-based).
    pub index: u8,
    pub _pad: [u8; 4],
    pub data: [u8; SAMPLE_BYTES],
}

/// Per-CPU `SAMPLE_BUDGET` entry: samples sent in the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleBudget {
    pub window_start_ns: u64,
    pub used: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<PayloadSample>() == 64 + SAMPLE_BYTES);
const _: () = assert!(core::mem::align_of::<PayloadSample>() == 8);
const _: () = assert!(core::mem::size_of::<SampleBudget>() == 16);
const _: () = assert!(SAMPLE_BYTES.is_power_of_two(), "the data path masks copy lengths with SAMPLE_BYTES - 1");
