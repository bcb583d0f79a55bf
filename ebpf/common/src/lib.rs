//! The kernel/user boundary of backplane.
//!
//! Every type here is `#[repr(C)]`, made of integers only, with explicit padding so
//! that no struct has implicit holes; their sizes are asserted at compile time. Map and
//! program names are constants so that the eBPF crate and the agent cannot disagree.
#![no_std]
#![allow(
    clippy::pub_underscore_fields,
    reason = "the explicit padding of the #[repr(C)] boundary types is public, so that both sides can build them"
)]
#![allow(
    clippy::inline_always,
    reason = "helpers shared with the data path are inlined there: a BPF call costs a frame of the 512-byte stack"
)]

pub mod config;
pub mod event;
pub mod flow;
pub mod maps;
pub mod policy;
pub mod reason;
pub mod sample;

pub use config::{DatapathConfig, PortInfo, PortRole};
pub use event::{FlowEvent, FlowEventKind};
pub use flow::{FlowKey, FlowValue};
pub use reason::{Counter, Verdict};

/// Implements `aya::Pod` for boundary types when built for userspace.
#[cfg(feature = "user")]
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: the type is repr(C), made only of integers and byte arrays,
            // and has no implicit padding (asserted in its module).
            unsafe impl aya::Pod for $t {}
        )*
    };
}

#[cfg(feature = "user")]
user_pod!(
    FlowKey,
    FlowValue,
    FlowEvent,
    flow::FragmentKey,
    flow::FragmentPorts,
    DatapathConfig,
    PortInfo,
    config::LearnedValue,
    config::MacKey,
    config::AllowedKey,
    config::LearnedAddr,
    policy::PolicyKey,
    policy::PolicyValue,
    policy::EndpointKey,
    policy::EndpointValue,
    policy::ZoneKey,
    policy::ZoneValue,
    policy::AddrKey,
    policy::OwnerKey,
    policy::OwnerValue,
    policy::ZonePairKey,
    policy::ZonePairStats,
    policy::VpatchKey,
    policy::VpatchValue,
    event::AnnounceKey,
    sample::PayloadSample,
    sample::SampleBudget,
);
