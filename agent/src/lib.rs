//! backplane's agent as a library: the `backplane` binary is a thin CLI over it.
//!
//! One folder per subsystem, listed from the top down; a module uses only those below
//! it (and the support files), never one above:
//!
//! - [`cli`]: the command line: commands and their arguments, dispatch, what the clients
//!   print, `top`
//! - [`run`]: `backplane run`, the composition root: it checks what it is told, loads the
//!   data path, makes every part and wires them together, and shuts them down
//! - [`control`]: the control socket: requests and replies, the agent's server, the
//!   CLI's client
//! - [`agent`], [`options`], [`status`]: the running agent as its servers see it, what
//!   `run` is told, what `status` reports
//! - [`ports`]: which interfaces are ports, following them through netlink; the port
//!   guard (an nftables table) that blocks the ones that cannot be attached
//! - [`cluster`]: nodes sharing endpoints, locations and flows through etcd; it
//!   implements the endpoints' [`endpoints::Peers`]
//! - [`rules`]: the rules in force: load, put in force, follow their files, the last good
//!   copy, explain
//! - [`endpoints`]: the endpoint inventory, standing (quarantine, isolation), arrivals and
//!   flow hand-over, the audit log
//! - [`export`]: Prometheus metrics (from a scrape snapshot), the flow log and IPFIX
//!   (from the flow messages); never the agent itself
//! - [`flows`]: the userspace flow table, the ring buffer readers, the names in payload
//!   samples and of zone and policy ids, the exported flow records
//! - [`datapath`]: the loaded eBPF object: attaching it to ports, its pins and layouts,
//!   its rule tables (of which it is the only writer), the kernel's features, legacy TC
//! - [`clock`], [`ifnames`], [`paths`], [`privileges`], [`error`] (one `report()` that
//!   joins an error's causes): support, used by all and using none

pub mod agent;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod control;
pub mod datapath;
pub mod endpoints;
pub mod error;
pub mod export;
pub mod files;
pub mod flows;
pub mod ifnames;
pub mod notify;
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
