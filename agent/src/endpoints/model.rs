//! What the endpoint state is made of and what travels: an endpoint added at run time,
//! where an endpoint is (a [`Location`]: node, port, labels, standing, as etcd and the
//! state file hold it), its established flows as they go from node to node (a
//! [`HandoverSet`]), and the rows `endpoint list` and `status` show. The JSON of each is a
//! contract between nodes (etcd), with the state file and with the CLI.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::endpoints::standing::Standing;

/// An endpoint added at run time (`backplane endpoint add`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeEndpoint {
    pub name: String,
    pub mac: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// `YYYY-MM-DD`.
    #[serde(default)]
    pub patched_at: Option<String>,
}

/// Where an endpoint is (or was last seen).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub node: String,
    pub port: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub since_unix_ms: i64,
    /// The endpoint's name there.
    #[serde(default)]
    pub name: String,
    /// Its standing there (`active`, `quarantined`, `isolated`; empty until known: a
    /// string rather than a [`Standing`], so that the JSON nodes exchange stays as it is).
    #[serde(default)]
    pub state: String,
    /// When the node named here saw the endpoint's port go away (its VM left: migrated,
    /// shut down, unbound by the host). Until then another node takes a claim of the
    /// endpoint that only the guest makes (first use, an announcement) as a claim, not as
    /// a move: see `endpoints::arrival`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_gone_unix_ms: Option<i64>,
}

impl Location {
    /// Whether another node may take the endpoint on the guest's word: its node says its
    /// port is gone.
    #[must_use]
    pub fn released(&self) -> bool {
        self.port_gone_unix_ms.is_some()
    }
}

/// One flow of an endpoint as it travels between nodes: node-independent (zones by
/// name, times as Unix ms, no ports).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverFlow {
    pub family: u8,
    pub proto: u8,
    pub vlan: u16,
    pub addr_lo: IpAddr,
    pub addr_hi: IpAddr,
    pub port_lo: u16,
    pub port_hi: u16,
    /// Which side of the key is the endpoint (0: lo, 1: hi).
    pub side: u8,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub tcp_flags: [u8; 2],
    pub initiator: u8,
    pub verdict: u8,
    pub policy_id: u32,
    pub zones: [String; 2],
    pub first_seen_unix_ms: i64,
}

/// The flows of one endpoint, as the node hosting it publishes them every second.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverSet {
    pub name: String,
    pub mac: String,
    pub node: String,
    pub port: String,
    pub updated_unix_ms: i64,
    pub flows: Vec<HandoverFlow>,
}

/// One row of `backplane endpoint list`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub name: String,
    pub mac: String,
    /// `inventory`, `runtime` or `unknown` (a MAC outside the inventory).
    pub source: String,
    pub zone: Option<String>,
    pub ips: Vec<String>,
    pub tags: Vec<String>,
    pub patched_at: Option<String>,
    /// `active`, `quarantined` or `isolated`.
    pub state: Standing,
    pub reasons: Vec<String>,
    pub node: Option<String>,
    pub port: Option<String>,
    /// Whether it is bound to a port of this node.
    pub here: bool,
    pub endpoint_id: u32,
}

/// The `endpoints` object of `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointsStatus {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub state_dir: String,
    pub audit_log: String,
    pub audit_records: u64,
    pub flow_handover: bool,
    pub total: u64,
    pub here: u64,
    pub active: u64,
    pub quarantined: u64,
    pub isolated: u64,
    /// Arrivals from another node or port seen by this node.
    pub moves: u64,
    /// The most recent alerts (placement, co-mingling, quarantine), newest last.
    pub alerts: Vec<String>,
    pub etcd: EtcdStatus,
}

/// etcd connectivity, as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdStatus {
    /// Whether the agent was started with `--etcd`.
    pub configured: bool,
    pub urls: Vec<String>,
    pub connected: bool,
    pub lease_id: i64,
    /// When the state last changed (RFC 3339).
    pub since: Option<String>,
    pub last_error: Option<String>,
    /// Times the agent found etcd again after losing it.
    pub reconnects: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handover_json_is_node_independent() {
        let f = HandoverFlow {
            family: 4,
            proto: 6,
            vlan: 0,
            addr_lo: "10.0.0.1".parse().unwrap(),
            addr_hi: "10.0.0.2".parse().unwrap(),
            port_lo: 5432,
            port_hi: 40000,
            side: 0,
            packets: [3, 4],
            bytes: [300, 400],
            tcp_flags: [0x12, 0x10],
            initiator: 1,
            verdict: 1,
            policy_id: 0,
            zones: ["db".into(), "web".into()],
            first_seen_unix_ms: 1_700_000_000_000,
        };
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains("\"zones\":[\"db\",\"web\"]"), "{json}");
        assert_eq!(serde_json::from_str::<HandoverFlow>(&json).unwrap(), f);
    }
}
