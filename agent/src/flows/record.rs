//! One flow as the CLI, the control socket and the exporters see it ([`FlowRecord`]),
//! made from the kernel's key and value; and what `follow` clients and the exporters are
//! told as flows start, change and end ([`FollowMessage`]).

use std::net::{Ipv4Addr, Ipv6Addr};

use backplane_common::{
    FlowKey, FlowValue, Verdict,
    flow::{DIR_HI_TO_LO, FAMILY_IPV4, STATE_ENDED},
    reason::Reason,
};
use serde::{Deserialize, Serialize};

use crate::{
    clock::{Clock, rfc3339_ms},
    flows::names::NameTable,
};

/// One flow as the CLI and the control socket show it.
///
/// `src` is the side that sent the flow's first packet (the initiator); `fwd` counts
/// what it sent, `rev` what it received. `src_zone`, `dst_zone` and `policy` are those of
/// the rule set that judged the flow; all three are `None` when no rule set did
/// (verdict `observed`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub src_ip: String,
    pub dst_ip: String,
    pub proto: String,
    pub src_port: u16,
    pub dst_port: u16,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    pub interfaces: Vec<String>,
    pub vlan: u16,
    pub tcp_flags: String,
    pub state: String,
    pub verdict: String,
    pub reason: String,
    pub policy: Option<String>,
    pub src_zone: Option<String>,
    pub dst_zone: Option<String>,
    /// The first DNS query name seen in the flow's first payload packets (see
    /// [`super::payload`]); `null` when none.
    #[serde(default)]
    pub dns_query: Option<String>,
    /// The server name (SNI) of the flow's TLS `ClientHello`; `null` when none.
    #[serde(default)]
    pub tls_sni: Option<String>,
    /// The `Host` of the flow's first HTTP request; `null` when none.
    #[serde(default)]
    pub http_host: Option<String>,
}

/// Whether a record is still live in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    Active,
    Ended,
}

impl RecordState {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Ended => "ended",
        }
    }
}

/// Name of an IP protocol number in flow records.
#[must_use]
pub fn proto_name(proto: u8) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

/// TCP flags as `SYN|ACK|FIN` (empty when none).
#[must_use]
pub fn tcp_flags_text(flags: u8) -> String {
    const NAMES: [(u8, &str); 8] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
        (0x40, "ECE"),
        (0x80, "CWR"),
    ];
    NAMES.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| *n).collect::<Vec<_>>().join("|")
}

/// An address of a [`FlowKey`] as text: IPv4 from the first four bytes for family 4.
#[must_use]
pub fn addr_text(addr: &[u8; 16], family: u8) -> String {
    if family == FAMILY_IPV4 {
        Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).to_string()
    } else {
        Ipv6Addr::from(*addr).to_string()
    }
}

/// The initiator's direction, tolerating a corrupt byte (anything but 1 reads as 0).
pub(super) fn initiator(value: &FlowValue) -> usize {
    usize::from(value.initiator == DIR_HI_TO_LO)
}

/// Builds the exported record of a flow from its key and kernel value; zone and policy
/// ids are named by `names`.
pub fn record_from_kernel(
    key: &FlowKey,
    value: &FlowValue,
    state: RecordState,
    clock: &Clock,
    ifname: &dyn Fn(u32) -> String,
    names: &NameTable,
) -> FlowRecord {
    let fwd = initiator(value);
    let rev = fwd ^ 1;
    #[expect(clippy::cast_possible_truncation, reason = "fwd is 0 or 1")]
    let (src, sport) = key.sender(fwd as u8);
    #[expect(clippy::cast_possible_truncation, reason = "fwd is 0 or 1")]
    let (dst, dport) = key.receiver(fwd as u8);
    let mut interfaces: Vec<String> = Vec::with_capacity(2);
    for idx in [value.ifindex[fwd], value.ifindex[rev]] {
        if idx != 0 {
            let name = ifname(idx);
            if !interfaces.contains(&name) {
                interfaces.push(name);
            }
        }
    }
    let first_ms = clock.unix_ms(value.first_seen_ns);
    let last_ms = clock.unix_ms(value.last_seen_ns);
    let state = if value.state & STATE_ENDED != 0 { RecordState::Ended } else { state };
    // Zones are stored per side of the key; the record's src is the initiator.
    let judged_by_rules = value.reason != Reason::NoRules as u8;
    let (src_zone, dst_zone, policy) = if judged_by_rules {
        (
            Some(names.zone(value.zone[fwd])),
            Some(names.zone(value.zone[rev])),
            names.policy(value.generation, value.policy_id),
        )
    } else {
        (None, None, None)
    };
    FlowRecord {
        src_ip: addr_text(src, key.family),
        dst_ip: addr_text(dst, key.family),
        proto: proto_name(key.proto),
        src_port: sport,
        dst_port: dport,
        fwd_packets: value.packets[fwd],
        fwd_bytes: value.bytes[fwd],
        rev_packets: value.packets[rev],
        rev_bytes: value.bytes[rev],
        first_seen: rfc3339_ms(first_ms),
        last_seen: rfc3339_ms(last_ms),
        first_seen_unix_ms: first_ms,
        last_seen_unix_ms: last_ms,
        interfaces,
        vlan: key.vlan,
        tcp_flags: tcp_flags_text(value.tcp_flags[0] | value.tcp_flags[1]),
        state: state.as_str().into(),
        verdict: Verdict::from_u8(value.verdict)
            .map_or_else(|| format!("unknown({})", value.verdict), |v| v.as_str().into()),
        reason: Reason::from_u8(value.reason)
            .map_or_else(|| format!("unknown({})", value.reason), |r| r.as_str().into()),
        policy,
        src_zone,
        dst_zone,
        dns_query: None,
        tls_sni: None,
        http_host: None,
    }
}

/// What a `follow` client is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FollowEvent {
    /// A start event: a new flow.
    Start,
    /// An end event: FIN or RST seen.
    End,
    /// The counters of a flow changed (periodic refresh).
    Update,
    /// The flow was idle and was removed from the kernel table.
    Expired,
    /// The flow's kernel entry disappeared (LRU eviction or outside deletion).
    Evicted,
    /// The client was too slow and missed `missed` messages.
    Lagged,
}

impl FollowEvent {
    /// The name of a flow's event, as the flow log and `flows --follow` print it; `None`
    /// for `Update` and `Lagged`, which are not events of one flow's life.
    #[must_use]
    pub fn flow_event_name(self) -> Option<&'static str> {
        match self {
            Self::Start => Some("start"),
            Self::End => Some("end"),
            Self::Expired => Some("expired"),
            Self::Evicted => Some("evicted"),
            Self::Update | Self::Lagged => None,
        }
    }
}

/// One line of a `follow` stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowMessage {
    pub event: FollowEvent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<u64>,
}

impl FollowMessage {
    pub(super) fn flow(event: FollowEvent, flow: FlowRecord) -> Self {
        Self { event, flow: Some(flow), missed: None }
    }
}

#[cfg(test)]
mod tests {
    use backplane_common::flow::{DIR_LO_TO_HI, FAMILY_IPV6};

    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut x = [0u8; 16];
        x[..4].copy_from_slice(&a);
        x
    }

    const BOOT: i128 = 1_704_067_200_000_000_000; // 2024-01-01T00:00:00Z

    fn names(idx: u32) -> String {
        format!("port{idx}")
    }

    #[test]
    fn fwd_and_rev_follow_the_initiator() {
        // 10.0.0.2:5555 -> 10.0.0.1:80: the client has the higher address, so the
        // canonical key puts it on the hi side and its packets go hi->lo.
        let client = v4([10, 0, 0, 2]);
        let server = v4([10, 0, 0, 1]);
        let (key, dir) = FlowKey::canonical(&client, 5555, &server, 80, 0, 6, FAMILY_IPV4);
        assert_eq!(dir, DIR_HI_TO_LO);
        let value = FlowValue {
            packets: [7, 3], // [lo->hi (server->client), hi->lo (client->server)]
            bytes: [7000, 300],
            first_seen_ns: 1_000_000_000,
            last_seen_ns: 2_500_000_000,
            ifindex: [11, 12],
            tcp_flags: [0x12, 0x11],
            initiator: dir,
            verdict: Verdict::Observed as u8,
            reason: Reason::NoRules as u8,
            ..FlowValue::default()
        };
        let r = record_from_kernel(
            &key,
            &value,
            RecordState::Active,
            &Clock::with_offset_ns(BOOT),
            &names,
            &NameTable::default(),
        );
        assert_eq!(r.src_ip, "10.0.0.2");
        assert_eq!(r.src_port, 5555);
        assert_eq!(r.dst_ip, "10.0.0.1");
        assert_eq!(r.dst_port, 80);
        assert_eq!((r.fwd_packets, r.fwd_bytes), (3, 300));
        assert_eq!((r.rev_packets, r.rev_bytes), (7, 7000));
        assert_eq!(r.interfaces, vec!["port12".to_string(), "port11".to_string()]);
        assert_eq!(r.proto, "tcp");
        assert_eq!(r.tcp_flags, "SYN|ACK|FIN");
        assert_eq!(r.first_seen, "2024-01-01T00:00:01.000Z");
        assert_eq!(r.last_seen, "2024-01-01T00:00:02.500Z");
        assert_eq!(r.last_seen_unix_ms, 1_704_067_202_500);
        assert_eq!(r.state, "active");
        assert_eq!(r.verdict, "observed");
        assert_eq!(r.reason, "no_rules");

        // The same flow started by the lo side swaps everything.
        let value = FlowValue { initiator: DIR_LO_TO_HI, ..value };
        let r = record_from_kernel(
            &key,
            &value,
            RecordState::Active,
            &Clock::with_offset_ns(BOOT),
            &names,
            &NameTable::default(),
        );
        assert_eq!((r.src_ip.as_str(), r.src_port), ("10.0.0.1", 80));
        assert_eq!((r.fwd_packets, r.rev_packets), (7, 3));
        assert_eq!(r.interfaces, vec!["port11".to_string(), "port12".to_string()]);
    }

    #[test]
    fn record_json_contract() {
        let (key, dir) = FlowKey::canonical(&v4([192, 168, 1, 1]), 7, &v4([192, 168, 1, 2]), 7, 10, 1, FAMILY_IPV4);
        let value = FlowValue {
            packets: [1, 1],
            bytes: [98, 98],
            ifindex: [5, 0],
            initiator: dir,
            state: STATE_ENDED,
            ..FlowValue::default()
        };
        let r = record_from_kernel(
            &key,
            &value,
            RecordState::Active,
            &Clock::with_offset_ns(0),
            &names,
            &NameTable::default(),
        );
        let json = serde_json::to_value(&r).unwrap();
        for field in [
            "src_ip",
            "dst_ip",
            "proto",
            "src_port",
            "dst_port",
            "fwd_packets",
            "fwd_bytes",
            "rev_packets",
            "rev_bytes",
            "first_seen",
            "last_seen",
            "first_seen_unix_ms",
            "last_seen_unix_ms",
            "interfaces",
            "vlan",
            "tcp_flags",
            "state",
            "verdict",
            "reason",
            "policy",
            "src_zone",
            "dst_zone",
        ] {
            assert!(json.get(field).is_some(), "missing {field} in {json}");
        }
        assert_eq!(json["proto"], "icmp");
        assert_eq!(json["vlan"], 10);
        assert_eq!(json["state"], "ended");
        assert_eq!(json["policy"], serde_json::Value::Null);
        assert_eq!(json["interfaces"], serde_json::json!(["port5"]));
        let back: FlowRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn zones_and_policy_are_named_from_the_initiator() {
        use backplane_common::policy::{POLICY_ID_DEFAULT_INTER_ZONE, POLICY_ID_NONE};
        let text = "zones:\n  web: { members: [ { cidr: 10.30.0.0/24 } ] }\n  db: { members: [ { cidr: 10.40.0.0/24 } ] }\n\
                    policies:\n  - { name: web-to-db, from: web, to: db, allow: [ { proto: tcp, ports: [5432] } ] }\n";
        let rules = backplane_rules::parse_rules([(std::path::Path::new("r.yaml"), text)]).unwrap();
        let compiled = backplane_rules::compile(&rules, &backplane_rules::ZoneIds::new());
        let (web, db) = (compiled.zone_ids.id("web").unwrap(), compiled.zone_ids.id("db").unwrap());
        let mut names = NameTable::default();
        names.publish(3, &compiled);
        // db (10.40.0.9, the hi side) starts a flow to web (10.30.0.5): zone[] is per side.
        let (key, dir) = FlowKey::canonical(&v4([10, 40, 0, 9]), 40000, &v4([10, 30, 0, 5]), 8080, 0, 6, FAMILY_IPV4);
        assert_eq!(dir, DIR_HI_TO_LO);
        let value = FlowValue {
            initiator: dir,
            zone: [web, db], // [lo = web, hi = db]
            verdict: Verdict::Denied as u8,
            reason: Reason::DefaultInterZone as u8,
            policy_id: POLICY_ID_DEFAULT_INTER_ZONE,
            generation: 3,
            ..FlowValue::default()
        };
        let clock = Clock::with_offset_ns(0);
        let r = record_from_kernel(&key, &value, RecordState::Active, &clock, &names_of, &names);
        assert_eq!(
            (r.src_ip.as_str(), r.src_zone.as_deref(), r.dst_zone.as_deref()),
            ("10.40.0.9", Some("db"), Some("web"))
        );
        assert_eq!((r.verdict.as_str(), r.reason.as_str()), ("denied", "default_inter_zone"));
        assert_eq!(r.policy.as_deref(), Some("default_inter_zone"));

        // web starts it: the same key, the other initiator; policy 0 of generation 3.
        let value = FlowValue {
            initiator: DIR_LO_TO_HI,
            verdict: Verdict::Allowed as u8,
            reason: Reason::PolicyAllow as u8,
            policy_id: 0,
            ..value
        };
        let r = record_from_kernel(&key, &value, RecordState::Active, &clock, &names_of, &names);
        assert_eq!(
            (r.src_zone.as_deref(), r.dst_zone.as_deref(), r.policy.as_deref()),
            (Some("web"), Some("db"), Some("web-to-db"))
        );
        // A zone id no rule set named.
        let value = FlowValue { zone: [77, db], ..value };
        let r = record_from_kernel(&key, &value, RecordState::Active, &clock, &names_of, &names);
        assert_eq!(r.src_zone.as_deref(), Some("zone-77"));
        // Without rules: observed, nothing to name.
        let value = FlowValue { policy_id: POLICY_ID_NONE, ..FlowValue::default() };
        let r = record_from_kernel(&key, &value, RecordState::Active, &clock, &names_of, &names);
        assert_eq!((r.verdict.as_str(), r.src_zone, r.dst_zone, r.policy), ("observed", None, None, None));
    }

    fn names_of(idx: u32) -> String {
        format!("port{idx}")
    }

    #[test]
    fn ipv6_and_unknown_values() {
        let a: [u8; 16] = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        let b: [u8; 16] = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        let (key, dir) = FlowKey::canonical(&a, 1, &b, 2, 0, 132, FAMILY_IPV6);
        let value = FlowValue { initiator: dir, verdict: 200, reason: 99, ..FlowValue::default() };
        let r = record_from_kernel(
            &key,
            &value,
            RecordState::Active,
            &Clock::with_offset_ns(0),
            &names,
            &NameTable::default(),
        );
        assert_eq!((r.src_ip.as_str(), r.dst_ip.as_str()), ("fd00::1", "fd00::2"));
        assert_eq!(r.proto, "132");
        assert_eq!(r.verdict, "unknown(200)");
        assert_eq!(r.reason, "unknown(99)");
        assert!(r.interfaces.is_empty());
        assert_eq!(proto_name(58), "icmpv6");
        assert_eq!(proto_name(17), "udp");
        assert_eq!(tcp_flags_text(0), "");
    }
}
