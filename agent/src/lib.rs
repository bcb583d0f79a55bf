//! backplane's agent as a library: the `backplane` binary is a thin CLI over it.
//!
//! - [`datapath`]: the loaded eBPF object: attaching it to ports, its pins and rule tables,
//!   the kernel's features, legacy TC filters
//! - [`ports`]: which interfaces are ports; follow them through netlink; the port guard
//!   (an nftables table) that blocks ports that cannot be attached
//! - [`flows`]: the userspace flow table, the ring buffer readers, the names in payload
//!   samples and of zone and policy ids, the exported flow records
//! - [`control`]: the control socket's protocol, server and client
//! - [`run`]: `backplane run` from start to orderly exit, the composition root
//! - [`agent`], [`options`], [`status`]: the running agent as its servers see it, what it
//!   is told, what `status` reports
//! - [`cli`]: the command line: arguments, dispatch, what the clients print, `top`
//! - [`rules`]: the rules in force: load, put in force, follow their files, the last
//!   good copy, explain
//! - [`export`]: Prometheus metrics on `/metrics`, the flow log (JSON lines) and IPFIX
//! - [`endpoints`]: the endpoint inventory, standing (quarantine, isolation), moves and flow hand-over
//! - [`cluster`]: nodes sharing endpoints, locations and flows through etcd
//! - [`privileges`]: the capabilities `backplane run` keeps
//! - [`clock`], [`ifnames`], [`paths`], [`error`]: support

pub mod agent;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod control;
pub mod datapath;
pub mod endpoints;
pub mod error;
pub mod export;
pub mod flows;
pub mod ifnames;
pub mod options;
pub mod paths;
pub mod ports;
pub mod privileges;
pub mod rules;
pub mod run;
pub mod status;

pub use datapath::DATAPATH_OBJECT;

// Paths the benches (`benches/src/bin/agent_rates.rs`) name from before the agent had
// folders; they go once the benches import the new ones.
#[doc(hidden)]
pub use datapath::rule_tables;
#[doc(hidden)]
pub use flows::{events, names as rule_names};
