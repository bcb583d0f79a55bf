//! A lab of network namespaces standing in for VMs on a hypervisor node, for backplane's
//! integration tests and demo. Everything it makes is guarded: dropping a guard removes
//! what it made and ignores errors; making something that fails panics with context
//! (these are test fixtures). It needs root.
//!
//! ```text
//!   host namespace                                             one namespace per VM
//!  ┌──────────────────────────────────────────────────────┐
//!  │ bridge bpbr<s> ─┬─ bpv<s>0 (veth) ═══════════════════│═ eth0   bp-<s>-a
//!  │                 ├─ bpv<s>1 (veth) ═══════════════════│═ eth0   bp-<s>-b
//!  │                 ├─ bpt<s>2 (tap) ═ fd ⇄ forwarder ⇄ fd│═ eth0   bp-<s>-c (tap too)
//!  │                 └─ bpu<s>3 (veth, uplink) ═══════════│═ eth0   bp-<s>-remote
//!  └──────────────────────────────────────────────────────┘
//! ```
//!
//! `<s>` is the lab's suffix: 5 base-36 digits of the pid and 2 of a counter, so labs of
//! parallel processes never collide, names fit in 15 bytes, and [`cleanup_stale`] knows
//! which leftovers belong to dead processes.
//!
//! ```no_run
//! use backplane_lab::{Capture, ChildGuard, Lab};
//!
//! let lab = Lab::new("bp");
//! let a = lab.add_veth_vm("a", "10.77.0.1/24", Some("fd00:77::1/64"), None);
//! let b = lab.add_tap_vm("b", "10.77.0.2/24", Some("fd00:77::2/64"), None);
//! // The agent on this lab's ports, ready (declared after the VMs: it drops first).
//! let mut agent: ChildGuard = lab.start_agent("target/debug/backplane", &[]);
//! let capture = Capture::start_filtered(b.host_port(), "icmp");
//! assert!(a.ping(b.ip(), 3));
//! assert_eq!(capture.stop().iter().filter(|p| p.is_icmp_echo()).count(), 6);
//! agent.stop();
//! ```

mod capture;
mod lab;
mod names;
mod netns;
mod node;
mod process;
mod stale;
mod tap;
mod vm;

pub use capture::{Capture, Packet, PcapError, SNAPLEN, read_pcap};
pub use lab::{AGENT_READY_TIMEOUT, Lab, PIN_DIR_BASE, WORK_DIR_BASE, wait_for_socket};
pub use names::MAX_IFNAME_LEN;
pub use netns::{enter_netns, in_netns};
pub use node::{MGMT_IP, NODE_BRIDGE, Node, NodeLab, UPLINK_PORT};
pub use process::{ChildGuard, host_exec, host_run};
pub use stale::{Leftover, LeftoverKind, NFT_TABLE_MARK, cleanup_stale, leftovers};
pub use vm::{PortKind, Vm};

/// The prefix of every lab name in this project; `cargo xtask test` looks for leftovers
/// named with it.
pub const PREFIX: &str = "bp";
