//! `backplane explain`: the verdict a rule set gives a flow, and why.
//!
//! The question ([`ExplainQuery`]) is the command line's arguments as given, so that the
//! CLI (offline, with `--rules`) and the agent (asked over the control socket, with the
//! rules in force) check it with the same code and name the argument that is wrong.

use std::net::IpAddr;

use backplane_rules::{MacAddr, PacketView, Proto, RuleSet, explain};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::flows::names::default_policy_name;

/// Explaining a flow: arguments that do not describe one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExplainError {
    #[error("{arg}: {value:?} is not an IPv4 or IPv6 address")]
    BadAddress { arg: &'static str, value: String },

    #[error("--from {from} and --to {to} are of different address families; give two IPv4 or two IPv6 addresses")]
    MixedFamilies { from: String, to: String },

    #[error("--proto: {0}")]
    BadProto(String),

    #[error("--proto {proto} is {family} but the addresses are {other}; use --proto {instead}")]
    WrongIcmp { proto: &'static str, family: &'static str, other: &'static str, instead: &'static str },

    #[error("--port: {proto} has no ports; leave --port out")]
    PortWithoutPorts { proto: String },

    #[error("--port is required with --proto {proto}: the destination port, 1-65535")]
    PortRequired { proto: String },

    #[error("--port: 0 is not a destination port; expected 1-65535")]
    PortZero,

    #[error("{arg}: {reason}")]
    BadMac { arg: &'static str, reason: String },

    #[error("--from-interface: an interface name cannot be empty")]
    EmptyInterface,

    #[error("the agent has no rules in force (it runs without --rules); explain offline with --rules PATH")]
    NoRules,
}

/// A flow to explain, as given on the command line (and sent to the agent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainQuery {
    /// The address that starts the flow.
    pub from: String,
    pub to: String,
    /// A protocol name (`tcp`, `udp`, `icmp`, `icmpv6`, `sctp`) or number 0-254.
    pub proto: String,
    /// The destination port, for TCP, UDP and SCTP.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub from_mac: Option<String>,
    #[serde(default)]
    pub to_mac: Option<String>,
    /// The switch port the source is behind (for `interface` members).
    #[serde(default)]
    pub from_interface: Option<String>,
}

/// The MAC of an end whose MAC is not given: all zeros, which no real endpoint has, so
/// the end is placed by its address (and interface) alone.
pub const UNKNOWN_MAC: MacAddr = MacAddr([0; 6]);

fn address(arg: &'static str, value: &str) -> Result<IpAddr, ExplainError> {
    value.trim().parse().map_err(|_| ExplainError::BadAddress { arg, value: value.to_owned() })
}

fn mac(arg: &'static str, value: Option<&str>) -> Result<MacAddr, ExplainError> {
    value.map_or(Ok(UNKNOWN_MAC), |v| v.trim().parse().map_err(|reason| ExplainError::BadMac { arg, reason }))
}

impl ExplainQuery {
    /// The first packet of the flow, or which argument is wrong.
    pub fn packet(&self) -> Result<PacketView, ExplainError> {
        let src_ip = address("--from", &self.from)?;
        let dst_ip = address("--to", &self.to)?;
        if src_ip.is_ipv4() != dst_ip.is_ipv4() {
            return Err(ExplainError::MixedFamilies { from: src_ip.to_string(), to: dst_ip.to_string() });
        }
        let proto: Proto = self.proto.trim().to_ascii_lowercase().parse().map_err(ExplainError::BadProto)?;
        let (v4, v6) = ("ICMPv4", "ICMPv6");
        if proto == Proto::ICMP && src_ip.is_ipv6() {
            return Err(ExplainError::WrongIcmp { proto: "icmp", family: v4, other: "IPv6", instead: "icmpv6" });
        }
        if proto == Proto::ICMPV6 && src_ip.is_ipv4() {
            return Err(ExplainError::WrongIcmp { proto: "icmpv6", family: v6, other: "IPv4", instead: "icmp" });
        }
        let dport = match (proto.has_ports(), self.port) {
            (true, None) => return Err(ExplainError::PortRequired { proto: proto.to_string() }),
            (true, Some(0)) => return Err(ExplainError::PortZero),
            (true, Some(port)) => port,
            (false, Some(_)) => return Err(ExplainError::PortWithoutPorts { proto: proto.to_string() }),
            (false, None) => 0,
        };
        let src_interface = match self.from_interface.as_deref().map(str::trim) {
            Some("") => return Err(ExplainError::EmptyInterface),
            other => other.map(str::to_owned),
        };
        Ok(PacketView {
            src_mac: mac("--from-mac", self.from_mac.as_deref())?,
            dst_mac: mac("--to-mac", self.to_mac.as_deref())?,
            src_ip,
            dst_ip,
            proto: proto.number(),
            dport,
            src_interface,
            dst_interface: None,
            src_port: None,
            dst_port: None,
        })
    }
}

/// The answer to an [`ExplainQuery`] (`backplane explain --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainReply {
    /// `allowed`, `denied` or `audit`.
    pub verdict: String,
    pub reason: String,
    /// The deciding policy's name, `intra_zone` / `default_inter_zone` for the defaults.
    pub policy: Option<String>,
    pub policy_id: u32,
    pub src_zone: String,
    pub dst_zone: String,
    /// The human explanation: each end's zone and why, the rule that decided.
    pub explanation: String,
}

/// Explains the first packet of a flow under a rule set.
#[must_use]
pub fn explain_packet(rules: &RuleSet, packet: &PacketView) -> ExplainReply {
    let e = explain(rules, packet);
    let d = &e.decision;
    ExplainReply {
        verdict: d.verdict.as_str().to_owned(),
        reason: d.reason.as_str().to_owned(),
        policy: d.policy_name.clone().or_else(|| default_policy_name(d.policy_id).map(str::to_owned)),
        policy_id: d.policy_id,
        src_zone: d.src_zone.clone(),
        dst_zone: d.dst_zone.clone(),
        explanation: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use backplane_rules::load_rules;

    use super::*;

    fn query(from: &str, to: &str, proto: &str, port: Option<u16>) -> ExplainQuery {
        ExplainQuery { from: from.into(), to: to.into(), proto: proto.into(), port, ..ExplainQuery::default() }
    }

    #[test]
    fn a_valid_query_is_the_first_packet() {
        let p = query("10.30.0.5", " 10.40.0.9", "tcp", Some(5432)).packet().unwrap();
        assert_eq!((p.src_ip.to_string(), p.dst_ip.to_string()), ("10.30.0.5".into(), "10.40.0.9".into()));
        assert_eq!((p.proto, p.dport), (6, 5432));
        assert_eq!((p.src_mac, p.dst_mac, p.src_interface), (UNKNOWN_MAC, UNKNOWN_MAC, None));
        let p = query("fd00:30::1", "fd00:40::1", "ICMPv6", None).packet().unwrap();
        assert_eq!((p.proto, p.dport), (58, 0));
        let p = query("10.0.0.1", "10.0.0.2", "47", None).packet().unwrap();
        assert_eq!(p.proto, 47);
        let p = ExplainQuery {
            from_mac: Some("52-54-00-00-00-01".into()),
            to_mac: Some("52:54:00:00:00:02".into()),
            from_interface: Some("tap-web-1".into()),
            ..query("10.0.0.1", "10.0.0.2", "132", Some(9))
        }
        .packet()
        .unwrap();
        assert_eq!(p.src_mac.to_string(), "52:54:00:00:00:01");
        assert_eq!(p.dst_mac.to_string(), "52:54:00:00:00:02");
        assert_eq!(p.src_interface.as_deref(), Some("tap-web-1"));
        assert_eq!((p.proto, p.dport), (132, 9));
    }

    #[test]
    fn errors_name_the_argument() {
        let err = |q: ExplainQuery| q.packet().unwrap_err().to_string();
        let e = err(query("10.0.0", "10.0.0.2", "tcp", Some(1)));
        assert!(e.starts_with("--from: \"10.0.0\""), "{e}");
        assert!(err(query("10.0.0.1", "x", "tcp", Some(1))).starts_with("--to: \"x\""));
        let e = err(query("10.0.0.1", "fd00::1", "tcp", Some(1)));
        assert!(e.contains("--from 10.0.0.1") && e.contains("--to fd00::1") && e.contains("families"), "{e}");
        let e = err(query("10.0.0.1", "10.0.0.2", "tpc", Some(1)));
        assert!(e.starts_with("--proto: unknown protocol \"tpc\""), "{e}");
        assert!(err(query("10.0.0.1", "10.0.0.2", "255", None)).contains("reserved"));
        let e = err(query("10.0.0.1", "10.0.0.2", "icmp", Some(80)));
        assert_eq!(e, "--port: icmp has no ports; leave --port out");
        assert!(err(query("10.0.0.1", "10.0.0.2", "47", Some(80))).starts_with("--port: 47 has no ports"));
        let e = err(query("10.0.0.1", "10.0.0.2", "udp", None));
        assert!(e.starts_with("--port is required with --proto udp"), "{e}");
        assert!(err(query("10.0.0.1", "10.0.0.2", "tcp", Some(0))).starts_with("--port: 0"));
        let e = err(query("fd00::1", "fd00::2", "icmp", None));
        assert!(e.contains("use --proto icmpv6"), "{e}");
        assert!(err(query("10.0.0.1", "10.0.0.2", "icmpv6", None)).contains("use --proto icmp"));
        let e = err(ExplainQuery { to_mac: Some("52:54:00".into()), ..query("10.0.0.1", "10.0.0.2", "tcp", Some(1)) });
        assert!(e.starts_with("--to-mac: \"52:54:00\" is not a MAC address"), "{e}");
        let e = err(ExplainQuery { from_interface: Some(" ".into()), ..query("10.0.0.1", "10.0.0.2", "icmp", None) });
        assert!(e.starts_with("--from-interface"), "{e}");
    }

    #[test]
    fn replies_name_policies_and_defaults() {
        let rules = load_rules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/examples/three-zones")).unwrap();
        let r = explain_packet(&rules, &query("10.30.0.5", "10.40.0.9", "tcp", Some(5432)).packet().unwrap());
        assert_eq!((r.verdict.as_str(), r.reason.as_str()), ("allowed", "policy_allow"));
        assert_eq!((r.policy.as_deref(), r.policy_id), (Some("web-to-db"), 0));
        assert_eq!((r.src_zone.as_str(), r.dst_zone.as_str()), ("web", "db"));
        assert!(r.explanation.contains("verdict:     allowed"), "{}", r.explanation);
        let r = explain_packet(&rules, &query("10.40.0.9", "10.30.0.5", "tcp", Some(80)).packet().unwrap());
        assert_eq!((r.verdict.as_str(), r.reason.as_str()), ("denied", "default_inter_zone"));
        assert_eq!(r.policy.as_deref(), Some("default_inter_zone"));
        let r = explain_packet(&rules, &query("10.40.0.9", "10.40.0.5", "udp", Some(53)).packet().unwrap());
        assert_eq!((r.verdict.as_str(), r.policy.as_deref()), ("denied", Some("intra_zone")));
        let json = serde_json::to_value(&r).unwrap();
        for field in ["verdict", "reason", "policy", "policy_id", "src_zone", "dst_zone", "explanation"] {
            assert!(json.get(field).is_some(), "{field} in {json}");
        }
    }
}
