//! What `backplane status` reports ([`Status`]): the JSON the agent sends and the CLI
//! (`status`, `top`) reads. Its verdicts and reasons are the data path's names as
//! strings (`unknown(N)` for a number the agent does not know), so that a client reads
//! what any agent sends; the agent's own decisions use the enums.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{PortStatus, ProgramIds},
    endpoints::model::EndpointsStatus,
    flows::FlowStats,
    ports::guard::PortGuardStatus,
    rules::RulesStatus,
};

/// The flow table's place in `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTableStatus {
    /// Entries in the kernel map at the last read.
    pub entries: u64,
    /// `--flow-table-size`.
    pub capacity: u32,
    #[serde(flatten)]
    pub stats: FlowStats,
}

/// What `status` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub pin_dir: String,
    pub socket: String,
    /// Where `from_port` runs on new VM ports and new uplinks (`tc`, `xdp-skb`,
    /// `xdp-native`); each port in `ports` says what it has.
    pub ingress: String,
    pub uplink_ingress: String,
    /// How TC programs attach to new ports: `tcx` or `legacy`; each port in `ports`
    /// says what it has.
    #[serde(default)]
    pub tc_attach: String,
    pub idle_timeout_secs: u64,
    pub detach_on_exit: bool,
    pub program_ids: ProgramIds,
    /// Rule generation and flags in force (`CONFIG[0]`).
    pub config_generation: u32,
    pub config_flags: u8,
    pub ports: Vec<PortStatus>,
    /// Ports that match but are not attached, and the nftables table that blocks them
    /// while rules are in force.
    #[serde(default)]
    pub port_guard: PortGuardStatus,
    pub flows: FlowTableStatus,
    /// Start/end events the data path could not put in the ring buffer.
    pub events_lost: u64,
    /// Every data path counter by name, summed over CPUs.
    pub counters: BTreeMap<String, u64>,
    /// The parse-failure counters (a subset of `counters`): why frames were not parsed.
    pub parse_failures: BTreeMap<String, u64>,
    /// The rule set in force and its reloads.
    #[serde(default)]
    pub rules: RulesStatus,
    /// Packets denied or passed in audit mode, by zone pair, verdict and reason.
    #[serde(default)]
    pub zone_pairs: Vec<ZonePairStatus>,
    /// Packets and bytes of all flows since start, by zone pair and verdict (from the
    /// flows' counters; what `backplane top` shows).
    #[serde(default)]
    pub zone_traffic: Vec<ZoneTrafficStatus>,
    /// The node's labels, endpoints, moves, alerts and etcd connectivity.
    #[serde(default)]
    pub endpoints: EndpointsStatus,
}

/// Traffic of one (initiator's zone, responder's zone, verdict) since the agent started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneTrafficStatus {
    pub src_zone: String,
    pub dst_zone: String,
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Denied or audited packets of one (source zone, destination zone, verdict, reason),
/// summed over CPUs. The source is the zone of the end that started the flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZonePairStatus {
    pub src_zone: String,
    pub dst_zone: String,
    pub verdict: String,
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}
