//! The reference evaluator: the verdict for a new flow, decided from the rule set's
//! meaning alone (not from the compiled tables), so that comparing it with the data
//! path's `judge()` tests the compiler and the kernel together.
//!
//! Resolution, as the data path does it:
//! 1. The zone of each end: a `mac` member matching its MAC; else the `cidr` member
//!    with the longest prefix holding its address; else an `interface` member matching
//!    the port it is behind (known only for the end whose port the packet is seen
//!    on); else `world`.
//! 2. Both ends in one zone: that zone's `intra_zone` decides.
//! 3. Else the policies from the source zone to the destination zone, in order: the
//!    first with an allow entry matching the protocol and destination port allows.
//! 4. Else, if any policy covers the pair, the flow is denied, or passes with verdict
//!    `audit` when all of the pair's policies are in audit mode; the first policy of
//!    the pair is named.
//! 5. Else `default_inter_zone` decides.

use std::{fmt, net::IpAddr};

use backplane_common::{
    Verdict,
    policy::{POLICY_ID_DEFAULT_INTER_ZONE, POLICY_ID_INTRA_ZONE},
    reason::Reason,
};

use crate::{
    ruleset::{Access, Member, MemberMatch, Mode, RuleSet, WORLD, Zone},
    types::{Cidr, MacAddr, SourcePos},
};

/// What the evaluator needs to know of a flow's first packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketView {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Destination port (TCP, UDP); the echo identifier for ICMP echo; else 0.
    pub dport: u16,
    /// Name of the switch port the source is behind, when the packet is seen entering
    /// the switch from it (the data path's ingress hook).
    pub src_interface: Option<String>,
    /// Name of the switch port the destination is behind, when the packet is seen
    /// leaving the switch through it (the egress hook).
    pub dst_interface: Option<String>,
}

/// The verdict for a flow and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// The deciding policy's index in the rule set, or `POLICY_ID_INTRA_ZONE` /
    /// `POLICY_ID_DEFAULT_INTER_ZONE`.
    pub policy_id: u32,
    pub policy_name: Option<String>,
    pub src_zone: String,
    pub dst_zone: String,
}

/// How one end of a flow got its zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ZoneMatch {
    Mac {
        mac: MacAddr,
        at: SourcePos,
    },
    Cidr {
        cidr: Cidr,
        at: SourcePos,
    },
    Interface {
        ifname: String,
        glob: String,
        at: SourcePos,
    },
    /// An inventory endpoint with this MAC (`endpoints:`): its zone, or the port's when
    /// the inventory and the members give it none.
    Endpoint {
        name: String,
        at: SourcePos,
    },
    /// No member matched.
    World,
}

/// One end of a flow: its zone and the member that put it there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndMatch {
    pub zone: String,
    pub by: ZoneMatch,
}

/// What decided the verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    /// The zone's `intra_zone` setting (`at` is where the zone is defined, if it is).
    IntraZone { zone: String, setting: Access, at: Option<SourcePos> },
    /// An allow entry of a policy.
    PolicyAllow { policy: String, entry_at: SourcePos },
    /// The policies covering the zone pair, none of which allows the flow.
    PolicyNoMatch { policies: Vec<String>, all_audit: bool, at: SourcePos },
    /// No policy covers the zone pair.
    DefaultInterZone { setting: Access, at: Option<SourcePos> },
}

/// A decision with the evidence behind it, for `backplane explain`-style output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub decision: Decision,
    pub src: EndMatch,
    pub dst: EndMatch,
    pub decided_by: DecidedBy,
}

/// The verdict the data path gives a new flow whose first packet is `packet`.
#[must_use]
pub fn evaluate(rules: &RuleSet, packet: &PacketView) -> Decision {
    explain(rules, packet).decision
}

/// [`evaluate`] with the member that placed each end and the rule that decided.
#[must_use]
pub fn explain(rules: &RuleSet, packet: &PacketView) -> Explanation {
    let src = zone_of(rules, packet.src_mac, packet.src_ip, packet.src_interface.as_deref());
    let dst = zone_of(rules, packet.dst_mac, packet.dst_ip, packet.dst_interface.as_deref());
    let (verdict, reason, policy_id, decided_by) = decide(rules, &src.zone, &dst.zone, packet.proto, packet.dport);
    let policy_name = usize::try_from(policy_id).ok().and_then(|i| rules.policies.get(i)).map(|p| p.name.clone());
    Explanation {
        decision: Decision {
            verdict,
            reason,
            policy_id,
            policy_name,
            src_zone: src.zone.clone(),
            dst_zone: dst.zone.clone(),
        },
        src,
        dst,
        decided_by,
    }
}

/// The zone of one end of a flow.
#[must_use]
pub fn zone_of(rules: &RuleSet, mac: MacAddr, ip: IpAddr, interface: Option<&str>) -> EndMatch {
    // Written without let chains: the workspace's rust-version is 1.87.
    let members = || rules.zones.iter().flat_map(|z| z.members.iter().map(move |m| (z, m)));
    let by_mac = members().find(|(_, m)| matches!(&m.matcher, MemberMatch::Mac(x) if *x == mac));
    if let Some((zone, member)) = by_mac {
        return EndMatch { zone: zone.name.clone(), by: ZoneMatch::Mac { mac, at: member.location.clone() } };
    }
    // An inventory endpoint's MAC decides like a mac member: the data path finds its
    // ENDPOINTS entry first, with the zone the inventory (or its addresses) gives it.
    if let Some(endpoint) = rules.endpoint_by_mac(mac) {
        let by = ZoneMatch::Endpoint { name: endpoint.name.clone(), at: endpoint.location.clone() };
        let zone = rules.endpoint_zone(endpoint).map(str::to_owned).or_else(|| {
            let ifname = interface?;
            members().find_map(|(z, m)| {
                matches!(&m.matcher, MemberMatch::Interface(g) if g.matches(ifname)).then(|| z.name.clone())
            })
        });
        return EndMatch { zone: zone.unwrap_or_else(|| WORLD.to_owned()), by };
    }
    // Longest prefix; on a tie (the same network twice in one zone) the first.
    let by_cidr = members()
        .filter_map(|(z, m)| match &m.matcher {
            MemberMatch::Cidr(c) if c.contains(ip) => Some((z, m, *c)),
            _ => None,
        })
        .fold(None, |best: Option<(&Zone, &Member, Cidr)>, cur| match best {
            Some(b) if b.2.prefix_len() >= cur.2.prefix_len() => Some(b),
            _ => Some(cur),
        });
    if let Some((zone, member, cidr)) = by_cidr {
        return EndMatch { zone: zone.name.clone(), by: ZoneMatch::Cidr { cidr, at: member.location.clone() } };
    }
    let by_port = interface.and_then(|ifname| {
        members().find_map(|(z, m)| match &m.matcher {
            MemberMatch::Interface(g) if g.matches(ifname) => Some(EndMatch {
                zone: z.name.clone(),
                by: ZoneMatch::Interface {
                    ifname: ifname.to_owned(),
                    glob: g.pattern().to_owned(),
                    at: m.location.clone(),
                },
            }),
            _ => None,
        })
    });
    by_port.unwrap_or_else(|| EndMatch { zone: WORLD.to_owned(), by: ZoneMatch::World })
}

fn decide(rules: &RuleSet, src: &str, dst: &str, proto: u8, dport: u16) -> (Verdict, Reason, u32, DecidedBy) {
    if src == dst {
        let setting = rules.intra_zone(src);
        let verdict = if setting == Access::Deny { Verdict::Denied } else { Verdict::Allowed };
        let at = rules.zone(src).map(|z| z.location.clone());
        return (
            verdict,
            Reason::IntraZone,
            POLICY_ID_INTRA_ZONE,
            DecidedBy::IntraZone { zone: src.to_owned(), setting, at },
        );
    }
    let pair: Vec<(u32, &crate::ruleset::Policy)> = rules
        .policies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.from == src && p.to == dst)
        .map(|(i, p)| (u32::try_from(i).expect("fewer than 2^32 policies"), p))
        .collect();
    for (id, policy) in &pair {
        if let Some(entry) = policy.allow.iter().find(|e| e.matches(proto, dport)) {
            let by = DecidedBy::PolicyAllow { policy: policy.name.clone(), entry_at: entry.location.clone() };
            return (Verdict::Allowed, Reason::PolicyAllow, *id, by);
        }
    }
    if let Some((first_id, first)) = pair.first() {
        let all_audit = pair.iter().all(|(_, p)| p.mode == Mode::Audit);
        let verdict = if all_audit { Verdict::Audit } else { Verdict::Denied };
        let by = DecidedBy::PolicyNoMatch {
            policies: pair.iter().map(|(_, p)| p.name.clone()).collect(),
            all_audit,
            at: first.location.clone(),
        };
        return (verdict, Reason::PolicyNoMatch, *first_id, by);
    }
    let setting = rules.default_inter_zone;
    let verdict = if setting == Access::Allow { Verdict::Allowed } else { Verdict::Denied };
    let by = DecidedBy::DefaultInterZone { setting, at: rules.default_inter_zone_at.clone() };
    (verdict, Reason::DefaultInterZone, POLICY_ID_DEFAULT_INTER_ZONE, by)
}

impl fmt::Display for EndMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.by {
            ZoneMatch::Mac { mac, at } => write!(f, "zone {} by mac {mac} ({at})", self.zone),
            ZoneMatch::Cidr { cidr, at } => write!(f, "zone {} by cidr {cidr} ({at})", self.zone),
            ZoneMatch::Interface { ifname, glob, at } => {
                write!(f, "zone {} by interface {ifname} matching \"{glob}\" ({at})", self.zone)
            }
            ZoneMatch::Endpoint { name, at } => {
                write!(f, "zone {} by endpoint \"{name}\" of the inventory ({at})", self.zone)
            }
            ZoneMatch::World => write!(f, "zone world: no member matches"),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decision;
        writeln!(f, "source:      {}", self.src)?;
        writeln!(f, "destination: {}", self.dst)?;
        match &self.decided_by {
            DecidedBy::IntraZone { zone, setting, at } => {
                write!(f, "decided by:  intra_zone {} of zone {zone}", setting.as_str())?;
                match at {
                    Some(at) => writeln!(f, " ({at})")?,
                    None => writeln!(f, " (the default)")?,
                }
            }
            DecidedBy::PolicyAllow { policy, entry_at } => {
                writeln!(f, "decided by:  policy \"{policy}\", allow entry at {entry_at}")?;
            }
            DecidedBy::PolicyNoMatch { policies, all_audit, at } => {
                let names: Vec<String> = policies.iter().map(|p| format!("\"{p}\"")).collect();
                let mode = if *all_audit { "all in audit mode" } else { "enforced" };
                writeln!(
                    f,
                    "decided by:  no allow entry of policy {} matches ({mode}; first at {at})",
                    names.join(", ")
                )?;
            }
            DecidedBy::DefaultInterZone { setting, at } => {
                write!(
                    f,
                    "decided by:  no policy from {} to {}: default_inter_zone {}",
                    d.src_zone,
                    d.dst_zone,
                    setting.as_str()
                )?;
                match at {
                    Some(at) => writeln!(f, " ({at})")?,
                    None => writeln!(f, " (the default)")?,
                }
            }
        }
        write!(f, "verdict:     {} (reason {}", d.verdict.as_str(), d.reason.as_str())?;
        if let Some(name) = &d.policy_name {
            write!(f, ", policy {} \"{name}\"", d.policy_id)?;
        }
        write!(f, ")")
    }
}
