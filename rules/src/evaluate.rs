//! The reference evaluator: the verdict for a new flow, decided from the rule set's
//! meaning alone (not from the compiled tables), so that comparing it with the data
//! path's `judge()` tests the compiler and the kernel together.
//!
//! Resolution, as the data path does it:
//! 1. The identity of each end. An end behind a VM port of this node (`src_port`,
//!    `dst_port`) is that port's endpoint ([`PortIdentity`]): the frame cannot choose
//!    it, only be checked against it (see [Port-anchored identity](#port-anchored-identity)).
//!    Any other end (behind an uplink, in the world, or a port not given) is placed by its
//!    frame fields: a `mac` member matching its MAC; else an inventory endpoint with that
//!    MAC; else the `cidr` member with the longest prefix holding its address; else an
//!    `interface` member matching the port it is behind (known only for the end whose
//!    port the packet is seen on); else `world`.
//! 2. An end quarantined (a VM port nobody bound, `unbound_ports: quarantine`) reaches
//!    only remediation zones and only they reach it: allowed with reason `remediation`,
//!    else denied with reason `unbound_port`.
//! 3. Both ends in one zone: that zone's `intra_zone` decides.
//! 4. Else the policies from the source zone to the destination zone, in order: the
//!    first with an allow entry matching the protocol and destination port allows.
//! 5. Else, if any policy covers the pair, the flow is denied, or passes with verdict
//!    `audit` when all of the pair's policies are in audit mode; the first policy of
//!    the pair is named.
//! 6. Else `default_inter_zone` decides.
//!
//! # Port-anchored identity
//!
//! A guest writes any frame it likes; what it cannot choose is the port its frames
//! enter through. So the sender of a frame from a VM port is whoever the port is bound
//! to, and the frame is dropped before any flow is judged ([`Decision::dropped`] names
//! the data path's counter) when:
//! - its source MAC is not the binding's (`spoofed`, when the MAC lives elsewhere: an
//!   endpoint bound to another port of this node, or the rules' `infrastructure:`; else
//!   `spoofed_mac`), or, from a port nobody bound, a group or zero MAC (`spoofed_mac`);
//! - its destination MAC is its source MAC (`to_own_mac`);
//! - its source address is another port's (an address an endpoint bound elsewhere owns,
//!   unless the frame is that endpoint's own MAC arriving from another node) or
//!   `infrastructure:`'s,
//!   or, for a bound endpoint, not one of its fixed addresses (inventory `ips`, runtime
//!   `allowed_addresses`) when it has some, else outside its zone's networks (an address
//!   of another zone's `cidr` members; any address in none, when its zone has none)
//!   (`spoofed_address`). The unspecified address and IPv6 link-local addresses nobody
//!   owns are anyone's;
//! - nobody bound the port, it cannot learn its endpoint from this frame, and the rules
//!   say `unbound_ports: deny` (`unbound_port`).
//!
//! A port nobody bound learns its endpoint from its first frame (trust on first use):
//! - a MAC of the rules (a `mac` member, an inventory endpoint) where that endpoint's
//!   zone says `binding: learn`;
//! - any other MAC, when `interface:` members give the port a zone (the port is that
//!   zone's; its MAC is locked on first use);
//! - else any other MAC whose first address is in the networks of a zone that says
//!   `binding: learn` (or in none, when `world` learns), which sets its zone.
//!
//! A port that cannot learn gets the rules' `unbound_ports`: `quarantine` (a quarantined
//! end in the port's `interface:` zone, else `world`), `observe` (its frame fields, as
//! before bindings; its source address is held only to other ports' addresses) or `deny`.
//!
//! The receiver of a frame delivered through a VM port is that port's endpoint. A port
//! nobody bound has not sent yet (else it would have learned, or been judged as above):
//! under `deny` the frame is dropped (`unbound_port`); else, while ports learn (some zone
//! or `world` says `binding: learn`), it is anyone's and the frame's fields place it;
//! where nothing learns, `quarantine` quarantines it and `observe` places it by the
//! frame's fields.

use std::{fmt, net::IpAddr};

use backplane_common::{
    Verdict,
    policy::{POLICY_ID_DEFAULT_INTER_ZONE, POLICY_ID_INTRA_ZONE, POLICY_ID_NONE},
    reason::{Counter, Reason},
};

use crate::{
    ruleset::{Access, Binding, Member, MemberMatch, Mode, RuleSet, UnboundPorts, WORLD, Zone},
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
    /// the switch from it (the data path's ingress hook). Not read with `src_port`.
    pub src_interface: Option<String>,
    /// Name of the switch port the destination is behind, when the packet is seen
    /// leaving the switch through it (the egress hook). Not read with `dst_port`.
    pub dst_interface: Option<String>,
    /// The VM port of this node the frame enters the switch through: the sender is the
    /// port's endpoint and the frame is checked against its binding. `None`: the source
    /// is placed by its frame fields (an uplink, the host, a port not given).
    pub src_port: Option<PortIdentity>,
    /// The VM port of this node the frame is delivered through: the receiver is the
    /// port's endpoint, whatever the frame's destination fields say. `None`: the
    /// destination is placed by its frame fields.
    pub dst_port: Option<PortIdentity>,
}

/// A VM port of this node and who is bound to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortIdentity {
    /// The port's name (matched against `interface:` members).
    pub name: String,
    /// The endpoint bound to the port (by the host, or learned on first use and
    /// confirmed); `None`: nobody (the port may learn its endpoint from this frame, else
    /// `unbound_ports` applies).
    pub binding: Option<PortBinding>,
    /// Endpoints bound to other ports, here or on other nodes: their MACs and addresses
    /// are not this port's to send from.
    pub others: Vec<OtherBinding>,
}

/// Whom a VM port is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortBinding {
    /// The endpoint's MAC: every frame from the port must carry it. A MAC of the rules
    /// (a `mac` member, an inventory endpoint) brings that endpoint's zone.
    pub mac: MacAddr,
    /// For a MAC the rules do not name: the zone it was bound into (the zone its first
    /// address chose when the port learned it; a runtime endpoint's zone). `None`: the
    /// port's `interface:` zone, else `world`.
    pub zone: Option<String>,
    /// The endpoint's fixed addresses (a runtime endpoint's `allowed_addresses`; an
    /// inventory endpoint's `ips` are fixed whether listed here or not). Without any, it
    /// may send from its zone's networks.
    pub addresses: Vec<IpAddr>,
}

/// An endpoint bound to another port than the one a frame is seen on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherBinding {
    pub mac: MacAddr,
    /// The addresses it owns.
    pub addresses: Vec<IpAddr>,
    /// Bound to a port of this node (`true`), or on another node (whose MAC may still
    /// arrive here: a migrating VM keeps its addresses).
    pub here: bool,
}

/// The verdict for a flow and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// The deciding policy's index in the rule set, or `POLICY_ID_INTRA_ZONE` /
    /// `POLICY_ID_DEFAULT_INTER_ZONE` (`POLICY_ID_NONE` when no policy or zone setting
    /// decided: a quarantine, a dropped frame).
    pub policy_id: u32,
    pub policy_name: Option<String>,
    pub src_zone: String,
    pub dst_zone: String,
    /// The frame is dropped before any flow is judged (the verdict is then `denied`):
    /// the data path's counter that says why (`spoofed_mac`, `spoofed`,
    /// `spoofed_address`, `to_own_mac`, `unbound_port`). Only with a port identity.
    pub dropped: Option<Counter>,
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
    /// The endpoint bound to the VM port the end is behind (`first_use`: locked by this
    /// frame, the port being bound to nobody), with the zone `by` gives it.
    Port {
        port: String,
        mac: MacAddr,
        first_use: bool,
        by: PortZone,
    },
    /// A VM port bound to nobody that cannot learn from this frame: quarantined in the
    /// port's `interface:` zone (`unbound_ports: quarantine`, `frame` is `None`), or placed
    /// by `frame`, its frame fields (`observe`).
    Unbound {
        port: String,
        frame: Option<Box<ZoneMatch>>,
    },
}

/// Where a port's endpoint gets its zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortZone {
    /// A `mac` member with the endpoint's MAC.
    Mac { at: SourcePos },
    /// The inventory endpoint with the endpoint's MAC.
    Endpoint { name: String, at: SourcePos },
    /// The zone the binding names (learned before, or a runtime endpoint's).
    Binding,
    /// The zone of the frame's source address (learned on first use): the longest `cidr`
    /// member holding it, `None` for `world`.
    FirstAddress { addr: IpAddr, cidr: Option<(Cidr, SourcePos)> },
    /// The port's `interface:` member.
    Interface { glob: String, at: SourcePos },
    /// Nothing gives it one.
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
    /// An end is a quarantined port (`src`, `dst`): it reaches only remediation zones and
    /// only they reach it; `allowed` when that holds.
    Quarantine { src: bool, dst: bool, allowed: bool },
    /// The frame is dropped before any flow is judged.
    Dropped { counter: Counter, why: String },
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

/// One end as the judge sees it.
struct End {
    found: EndMatch,
    /// A port bound to nobody under `unbound_ports: quarantine`.
    quarantined: bool,
}

impl End {
    fn new(found: EndMatch) -> Self {
        Self { found, quarantined: false }
    }
}

/// A frame dropped before any flow is judged, and the best that is known of the end
/// that sent (or would receive) it.
struct Dropped {
    counter: Counter,
    why: String,
    end: EndMatch,
}

/// [`evaluate`] with the member that placed each end and the rule that decided.
#[must_use]
pub fn explain(rules: &RuleSet, packet: &PacketView) -> Explanation {
    let src = match &packet.src_port {
        Some(port) => sender(rules, port, packet),
        None => Ok(End::new(zone_of(rules, packet.src_mac, packet.src_ip, packet.src_interface.as_deref()))),
    };
    let dst = match &packet.dst_port {
        Some(port) => receiver(rules, port, packet),
        None => Ok(End::new(zone_of(rules, packet.dst_mac, packet.dst_ip, packet.dst_interface.as_deref()))),
    };
    let (src, dst) = match (src, dst) {
        (Ok(src), Ok(dst)) => (src, dst),
        (Err(d), dst) => {
            let dst = dst.map_or_else(|d| d.end, |e| e.found);
            return dropped(d.counter, d.why, d.end, dst);
        }
        (Ok(src), Err(d)) => return dropped(d.counter, d.why, src.found, d.end),
    };
    let (verdict, reason, policy_id, decided_by) = judge(rules, &src, &dst, packet.proto, packet.dport);
    let policy_name = usize::try_from(policy_id).ok().and_then(|i| rules.policies.get(i)).map(|p| p.name.clone());
    Explanation {
        decision: Decision {
            verdict,
            reason,
            policy_id,
            policy_name,
            src_zone: src.found.zone.clone(),
            dst_zone: dst.found.zone.clone(),
            dropped: None,
        },
        src: src.found,
        dst: dst.found,
        decided_by,
    }
}

fn dropped(counter: Counter, why: String, src: EndMatch, dst: EndMatch) -> Explanation {
    let reason = if counter == Counter::UnboundPort { Reason::UnboundPort } else { Reason::Spoofed };
    Explanation {
        decision: Decision {
            verdict: Verdict::Denied,
            reason,
            policy_id: POLICY_ID_NONE,
            policy_name: None,
            src_zone: src.zone.clone(),
            dst_zone: dst.zone.clone(),
            dropped: Some(counter),
        },
        src,
        dst,
        decided_by: DecidedBy::Dropped { counter, why },
    }
}

/// The zone of one end of a flow placed by its frame fields.
#[must_use]
pub fn zone_of(rules: &RuleSet, mac: MacAddr, ip: IpAddr, interface: Option<&str>) -> EndMatch {
    if let Some((zone, member)) = mac_member(rules, mac) {
        return EndMatch { zone: zone.name.clone(), by: ZoneMatch::Mac { mac, at: member.location.clone() } };
    }
    // An inventory endpoint's MAC decides like a mac member: the data path finds its
    // ENDPOINTS entry first, with the zone the inventory (or its addresses) gives it.
    if let Some(endpoint) = rules.endpoint_by_mac(mac) {
        let by = ZoneMatch::Endpoint { name: endpoint.name.clone(), at: endpoint.location.clone() };
        let zone = rules
            .endpoint_zone(endpoint)
            .map(str::to_owned)
            .or_else(|| interface.and_then(|i| interface_zone(rules, i)).map(|(z, _, _)| z.name.clone()));
        return EndMatch { zone: zone.unwrap_or_else(|| WORLD.to_owned()), by };
    }
    if let Some((zone, member, cidr)) = cidr_zone(rules, ip) {
        return EndMatch { zone: zone.name.clone(), by: ZoneMatch::Cidr { cidr, at: member.location.clone() } };
    }
    let by_port = interface.and_then(|ifname| {
        interface_zone(rules, ifname).map(|(zone, member, glob)| EndMatch {
            zone: zone.name.clone(),
            by: ZoneMatch::Interface { ifname: ifname.to_owned(), glob: glob.to_owned(), at: member.location.clone() },
        })
    });
    by_port.unwrap_or_else(|| EndMatch { zone: WORLD.to_owned(), by: ZoneMatch::World })
}

fn members(rules: &RuleSet) -> impl Iterator<Item = (&Zone, &Member)> {
    rules.zones.iter().flat_map(|z| z.members.iter().map(move |m| (z, m)))
}

/// The `mac` member naming `mac`.
fn mac_member(rules: &RuleSet, mac: MacAddr) -> Option<(&Zone, &Member)> {
    members(rules).find(|(_, m)| matches!(&m.matcher, MemberMatch::Mac(x) if *x == mac))
}

/// The `cidr` member with the longest prefix holding `ip`; on a tie (the same network
/// twice) the first.
fn cidr_zone(rules: &RuleSet, ip: IpAddr) -> Option<(&Zone, &Member, Cidr)> {
    members(rules)
        .filter_map(|(z, m)| match &m.matcher {
            MemberMatch::Cidr(c) if c.contains(ip) => Some((z, m, *c)),
            _ => None,
        })
        .fold(None, |best: Option<(&Zone, &Member, Cidr)>, cur| match best {
            Some(b) if b.2.prefix_len() >= cur.2.prefix_len() => Some(b),
            _ => Some(cur),
        })
}

/// The first `interface` member (in rule-set order) whose glob matches the port name.
fn interface_zone<'a>(rules: &'a RuleSet, ifname: &str) -> Option<(&'a Zone, &'a Member, &'a str)> {
    members(rules).find_map(|(z, m)| match &m.matcher {
        MemberMatch::Interface(g) if g.matches(ifname) => Some((z, m, g.pattern())),
        _ => None,
    })
}

/// The `infrastructure:` entry with this MAC: it lives behind the uplink, never behind a
/// VM port.
fn infrastructure_mac(rules: &RuleSet, mac: MacAddr) -> Option<&crate::ruleset::Infrastructure> {
    rules.infrastructure.iter().find(|i| i.mac == Some(mac))
}

/// Whether an unbound VM port may learn an endpoint of this zone (`binding: learn`, the
/// default, also `world`'s).
fn learns(rules: &RuleSet, zone: &str) -> bool {
    rules.zone(zone).is_none_or(|z| z.binding == Binding::Learn)
}

fn has_cidrs(rules: &RuleSet, zone: &str) -> bool {
    rules.zone(zone).is_some_and(|z| z.members.iter().any(|m| matches!(m.matcher, MemberMatch::Cidr(_))))
}

fn is_remediation(rules: &RuleSet, zone: &str) -> bool {
    rules.zone(zone).is_some_and(|z| z.endpoints.remediation)
}

fn is_unspecified(ip: IpAddr) -> bool {
    ip.is_unspecified()
}

fn is_link_local_v6(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
}

/// An endpoint the rules know by its MAC, behind port `port`: its zone, how, and its
/// fixed addresses.
fn known<'a>(rules: &'a RuleSet, mac: MacAddr, port: &str) -> Option<(String, PortZone, &'a [IpAddr])> {
    let inventory = rules.endpoint_by_mac(mac);
    let ips = inventory.map_or(&[][..], |e| e.ips.as_slice());
    if let Some((zone, member)) = mac_member(rules, mac) {
        return Some((zone.name.clone(), PortZone::Mac { at: member.location.clone() }, ips));
    }
    let endpoint = inventory?;
    let zone = rules
        .endpoint_zone(endpoint)
        .map(str::to_owned)
        .or_else(|| interface_zone(rules, port).map(|(z, _, _)| z.name.clone()))
        .unwrap_or_else(|| WORLD.to_owned());
    Some((zone, PortZone::Endpoint { name: endpoint.name.clone(), at: endpoint.location.clone() }, ips))
}

/// The zone the port's `interface:` member gives it.
fn port_zone(rules: &RuleSet, port: &str) -> Option<(String, PortZone)> {
    interface_zone(rules, port).map(|(zone, member, glob)| {
        (zone.name.clone(), PortZone::Interface { glob: glob.to_owned(), at: member.location.clone() })
    })
}

/// The endpoint bound to `port` with MAC `mac` and, for a MAC the rules do not name, the
/// binding's `zone`; and its fixed addresses.
fn bound(rules: &RuleSet, port: &PortIdentity, b: &PortBinding) -> (EndMatch, Vec<IpAddr>) {
    let mut fixed = b.addresses.clone();
    let (zone, by) = match known(rules, b.mac, &port.name) {
        Some((zone, by, ips)) => {
            fixed.extend(ips.iter().filter(|ip| !b.addresses.contains(ip)));
            (zone, by)
        }
        None => match &b.zone {
            Some(zone) => (zone.clone(), PortZone::Binding),
            None => port_zone(rules, &port.name).unwrap_or_else(|| (WORLD.to_owned(), PortZone::World)),
        },
    };
    let by = ZoneMatch::Port { port: port.name.clone(), mac: b.mac, first_use: false, by };
    (EndMatch { zone, by }, fixed)
}

/// What an unbound port makes of its first frame (trust on first use).
enum FirstUse {
    /// It learns its endpoint, with these fixed addresses.
    Learns(EndMatch, Vec<IpAddr>),
    /// It locks the frame's MAC, but not an identity: the address is in no zone that
    /// learns.
    LocksMac,
    /// It learns nothing from this frame.
    Nothing,
    /// It locks the MAC of an endpoint bound on another node: a claim the agent holds,
    /// judged quarantined (dropped under `unbound_ports: deny`) until that node lets go.
    Held,
}

/// Whether some zone (or `world`) learns: an unbound port then locks a MAC outside the
/// rules on first use, and a port that has not sent yet may still be anyone's.
fn ports_learn(rules: &RuleSet) -> bool {
    learns(rules, WORLD) || rules.zones.iter().any(|z| z.binding == Binding::Learn)
}

fn first_use(rules: &RuleSet, port: &PortIdentity, p: &PacketView) -> FirstUse {
    let found = |zone, by| EndMatch {
        zone,
        by: ZoneMatch::Port { port: port.name.clone(), mac: p.src_mac, first_use: true, by },
    };
    if let Some((zone, by, ips)) = known(rules, p.src_mac, &port.name) {
        // An endpoint of the rules: only where its zone learns (else the host binds it);
        // one bound on another node is a claim, held until that node lets go.
        if !learns(rules, &zone) {
            return FirstUse::Nothing;
        }
        if port.others.iter().any(|o| !o.here && o.mac == p.src_mac) {
            return FirstUse::Held;
        }
        return FirstUse::Learns(found(zone, by), ips.to_vec());
    }
    if let Some((zone, by)) = port_zone(rules, &port.name) {
        return FirstUse::Learns(found(zone, by), Vec::new());
    }
    if !ports_learn(rules) {
        return FirstUse::Nothing;
    }
    let ip = p.src_ip;
    let learned = match cidr_zone(rules, ip) {
        _ if is_unspecified(ip) => None,
        Some((zone, member, cidr)) => learns(rules, &zone.name).then(|| {
            let by = PortZone::FirstAddress { addr: ip, cidr: Some((cidr, member.location.clone())) };
            found(zone.name.clone(), by)
        }),
        None if learns(rules, WORLD) && !is_link_local_v6(ip) => {
            Some(found(WORLD.to_owned(), PortZone::FirstAddress { addr: ip, cidr: None }))
        }
        None => None,
    };
    learned.map_or(FirstUse::LocksMac, |end| FirstUse::Learns(end, Vec::new()))
}

/// A port nobody bound (and that cannot learn), under `unbound_ports`; `mac` and `ip` are
/// the frame's fields for this end.
fn unbound(rules: &RuleSet, port: &PortIdentity, mac: MacAddr, ip: IpAddr) -> Result<End, Box<Dropped>> {
    match rules.unbound_ports {
        UnboundPorts::Quarantine => Ok(End { found: quarantined(rules, port), quarantined: true }),
        UnboundPorts::Observe => Ok(End::new(by_frame(rules, port, mac, ip))),
        UnboundPorts::Deny => Err(Box::new(Dropped {
            counter: Counter::UnboundPort,
            why: format!("port {} is bound to nobody (unbound_ports: deny)", port.name),
            end: quarantined(rules, port),
        })),
    }
}

/// An unbound port quarantined in its `interface:` zone, else `world`.
fn quarantined(rules: &RuleSet, port: &PortIdentity) -> EndMatch {
    let zone = interface_zone(rules, &port.name).map_or_else(|| WORLD.to_owned(), |(z, _, _)| z.name.clone());
    EndMatch { zone, by: ZoneMatch::Unbound { port: port.name.clone(), frame: None } }
}

/// An unbound port placed by the frame's fields for its end.
fn by_frame(rules: &RuleSet, port: &PortIdentity, mac: MacAddr, ip: IpAddr) -> EndMatch {
    let frame = zone_of(rules, mac, ip, Some(&port.name));
    EndMatch { zone: frame.zone, by: ZoneMatch::Unbound { port: port.name.clone(), frame: Some(Box::new(frame.by)) } }
}

/// The sender of a frame entering the switch through VM port `port`, or why the frame
/// is dropped.
fn sender(rules: &RuleSet, port: &PortIdentity, p: &PacketView) -> Result<End, Box<Dropped>> {
    let mac = p.src_mac;
    // A MAC that lives elsewhere: an endpoint bound to another port here, or
    // infrastructure behind the uplink.
    let elsewhere = port
        .others
        .iter()
        .find(|o| o.here && o.mac == mac)
        .map(|_| "an endpoint bound to another port".to_owned())
        .or_else(|| {
            infrastructure_mac(rules, mac).map(|i| format!("infrastructure \"{}\"'s ({})", i.name, i.location))
        });
    let own_mac = |end: &EndMatch| {
        (p.dst_mac == mac).then(|| {
            Box::new(Dropped {
                counter: Counter::ToOwnMac,
                why: format!("destination MAC {mac} is the frame's source MAC"),
                end: end.clone(),
            })
        })
    };
    // What the rules allow the bound endpoint besides its own MAC and addresses (applied
    // once the host or the agent bound the port).
    let inventory = port.binding.as_ref().and_then(|b| rules.endpoints.iter().find(|e| e.mac == b.mac));
    let allowed_addresses = inventory.map_or(&[][..], |e| &e.allowed_addresses[..]);
    let (end, fixed, is_bound) = if let Some(b) = &port.binding {
        let (found, fixed) = bound(rules, port, b);
        if mac != b.mac && !inventory.is_some_and(|e| e.allowed_macs.contains(&mac)) {
            let (counter, whose) = match elsewhere {
                Some(whose) => (Counter::Spoofed, whose),
                None => (Counter::SpoofedMac, "not the port's".to_owned()),
            };
            let why = format!("source MAC {mac} is {whose}: port {} is bound to {}", port.name, b.mac);
            return Err(Box::new(Dropped { counter, why, end: found }));
        }
        (End::new(found), fixed, true)
    } else {
        let spoofed = |counter, why| Err(Box::new(Dropped { counter, why, end: quarantined(rules, port) }));
        if mac.0[0] & 1 != 0 || mac.0 == [0; 6] {
            return spoofed(Counter::SpoofedMac, format!("source MAC {mac} is a group or zero MAC, no endpoint's"));
        }
        if let Some(whose) = elsewhere {
            return spoofed(Counter::Spoofed, format!("source MAC {mac} is {whose}"));
        }
        match first_use(rules, port, p) {
            FirstUse::Learns(found, fixed) => (End::new(found), fixed, true),
            FirstUse::LocksMac => {
                // Its MAC is the port's from now on; who sends is not known yet (but
                // an address that is someone else's is not its, whoever it is).
                let end = quarantined(rules, port);
                if let Some(d) = own_mac(&end) {
                    return Err(d);
                }
                if let Some(Err(why)) = owned(rules, port, p) {
                    return Err(Box::new(Dropped { counter: Counter::SpoofedAddress, why, end }));
                }
                (unbound(rules, port, mac, p.src_ip)?, Vec::new(), false)
            }
            FirstUse::Nothing => (unbound(rules, port, mac, p.src_ip)?, Vec::new(), false),
            FirstUse::Held => {
                let end = quarantined(rules, port);
                if rules.unbound_ports == UnboundPorts::Deny {
                    let why = format!("source MAC {mac} is bound on another node: a claim held (unbound_ports: deny)");
                    return Err(Box::new(Dropped { counter: Counter::UnboundPort, why, end }));
                }
                (End { found: end, quarantined: true }, Vec::new(), false)
            }
        }
    };
    if let Some(d) = own_mac(&end.found) {
        return Err(d);
    }
    match address_problem(rules, port, &end.found.zone, (&fixed, allowed_addresses), is_bound, p) {
        Some(why) => Err(Box::new(Dropped { counter: Counter::SpoofedAddress, why, end: end.found })),
        None => Ok(end),
    }
}

/// Whether someone owns the frame's source address (infrastructure, an endpoint bound
/// to another port or on another node): `Err` says whose it is when the frame is not
/// the owner's (no port but the owner's sends from it, bound or not); `Ok` when it is
/// (the owner's MAC arriving from another node). `None`: nobody owns it.
fn owned(rules: &RuleSet, port: &PortIdentity, p: &PacketView) -> Option<Result<(), String>> {
    let ip = p.src_ip;
    if let Some(infra) = rules.infrastructure.iter().find(|i| i.ips.contains(&ip)) {
        return Some(Err(format!("source address {ip} is infrastructure \"{}\"'s ({})", infra.name, infra.location)));
    }
    // A virtual IP the rules allow some endpoints: theirs alone (when bound).
    if let Some(e) = rules.endpoints.iter().find(|e| e.allowed_addresses.contains(&ip)) {
        let allowed_here = port
            .binding
            .as_ref()
            .is_some_and(|b| rules.endpoints.iter().any(|o| o.mac == b.mac && o.allowed_addresses.contains(&ip)));
        return (!allowed_here).then(|| {
            Err(format!("source address {ip} is a virtual IP the rules allow endpoint \"{}\" (and its peers)", e.name))
        });
    }
    let owner = port.others.iter().find(|o| o.addresses.contains(&ip))?;
    Some(if owner.here {
        Err(format!("source address {ip} belongs to {}, bound to another port", owner.mac))
    } else if owner.mac != p.src_mac {
        Err(format!("source address {ip} belongs to {}, bound on another node", owner.mac))
    } else {
        Ok(())
    })
}

/// Why the frame's source address is not the sender's to send from, if it is not.
fn address_problem(
    rules: &RuleSet,
    port: &PortIdentity,
    zone: &str,
    (fixed, allowed): (&[IpAddr], &[IpAddr]),
    is_bound: bool,
    p: &PacketView,
) -> Option<String> {
    let ip = p.src_ip;
    if let Some(owner) = owned(rules, port, p) {
        return owner.err();
    }
    if fixed.contains(&ip) || !is_bound || is_unspecified(ip) || is_link_local_v6(ip) {
        return None;
    }
    // An allowed address is not one of its fixed ones, but is held to its zone's networks.
    if !fixed.is_empty() && !allowed.contains(&ip) {
        let list: Vec<String> = fixed.iter().map(ToString::to_string).collect();
        return Some(format!("source address {ip} is not one of the endpoint's addresses ({})", list.join(", ")));
    }
    match cidr_zone(rules, ip) {
        Some((z, _, _)) if z.name == zone => None,
        Some((z, _, cidr)) => Some(format!("source address {ip} is in {cidr} of zone {}, not of zone {zone}", z.name)),
        None if has_cidrs(rules, zone) => Some(format!("source address {ip} is outside the networks of zone {zone}")),
        None => None,
    }
}

/// The receiver of a frame delivered through VM port `port`.
/// A port nobody bound that has not sent yet is anyone's while ports learn (it cannot
/// have learned before it speaks): placed by the frame's fields, unless the rules say
/// `unbound_ports: deny`; where nothing learns, `unbound_ports` applies.
fn receiver(rules: &RuleSet, port: &PortIdentity, p: &PacketView) -> Result<End, Box<Dropped>> {
    match &port.binding {
        Some(b) => Ok(End::new(bound(rules, port, b).0)),
        None if ports_learn(rules) && rules.unbound_ports != UnboundPorts::Deny => {
            Ok(End::new(by_frame(rules, port, p.dst_mac, p.dst_ip)))
        }
        None => unbound(rules, port, p.dst_mac, p.dst_ip),
    }
}

fn judge(rules: &RuleSet, src: &End, dst: &End, proto: u8, dport: u16) -> (Verdict, Reason, u32, DecidedBy) {
    if src.quarantined || dst.quarantined {
        let src_ok = !src.quarantined || is_remediation(rules, &dst.found.zone);
        let dst_ok = !dst.quarantined || is_remediation(rules, &src.found.zone);
        let allowed = src_ok && dst_ok;
        let by = DecidedBy::Quarantine { src: src.quarantined, dst: dst.quarantined, allowed };
        return if allowed {
            (Verdict::Allowed, Reason::Remediation, POLICY_ID_NONE, by)
        } else {
            (Verdict::Denied, Reason::UnboundPort, POLICY_ID_NONE, by)
        };
    }
    decide(rules, &src.found.zone, &dst.found.zone, proto, dport)
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

/// Writes how `by` placed an end in `zone`, after "zone <zone> " where the match says it.
fn write_match(f: &mut fmt::Formatter<'_>, zone: &str, by: &ZoneMatch) -> fmt::Result {
    match by {
        ZoneMatch::Mac { mac, at } => write!(f, "zone {zone} by mac {mac} ({at})"),
        ZoneMatch::Cidr { cidr, at } => write!(f, "zone {zone} by cidr {cidr} ({at})"),
        ZoneMatch::Interface { ifname, glob, at } => {
            write!(f, "zone {zone} by interface {ifname} matching \"{glob}\" ({at})")
        }
        ZoneMatch::Endpoint { name, at } => write!(f, "zone {zone} by endpoint \"{name}\" of the inventory ({at})"),
        ZoneMatch::World => write!(f, "zone world: no member matches"),
        ZoneMatch::Port { port, mac, first_use, by } => {
            if *first_use {
                write!(f, "zone {zone}: port {port}, bound to nobody, learns {mac} from this frame, ")?;
            } else {
                write!(f, "zone {zone}: port {port} is bound to {mac}, ")?;
            }
            match by {
                PortZone::Mac { at } => write!(f, "a mac member ({at})"),
                PortZone::Endpoint { name, at } => write!(f, "endpoint \"{name}\" of the inventory ({at})"),
                PortZone::Binding => write!(f, "in the zone of its binding"),
                PortZone::FirstAddress { addr, cidr: Some((cidr, at)) } => {
                    write!(f, "whose first address {addr} is in cidr {cidr} ({at})")
                }
                PortZone::FirstAddress { addr, cidr: None } => {
                    write!(f, "whose first address {addr} is in no zone's networks")
                }
                PortZone::Interface { glob, at } => write!(f, "in the zone of interface \"{glob}\" ({at})"),
                PortZone::World => write!(f, "in no zone"),
            }
        }
        ZoneMatch::Unbound { port, frame: None } => {
            write!(f, "zone {zone}: port {port} is bound to nobody")
        }
        ZoneMatch::Unbound { port, frame: Some(frame) } => {
            write!(f, "port {port} is bound to nobody, so its frame says: ")?;
            write_match(f, zone, frame)
        }
    }
}

impl fmt::Display for EndMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_match(f, &self.zone, &self.by)
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
            DecidedBy::Quarantine { src, dst, allowed } => {
                let (who, others, is) = match (src, dst, allowed) {
                    (true, true, true) => ("both ends are", format!("zones {} and {}", d.src_zone, d.dst_zone), "are"),
                    (true, true, false) => {
                        ("both ends are", format!("zones {} and {}", d.src_zone, d.dst_zone), "are not both")
                    }
                    (true, false, a) => {
                        ("the source is", format!("zone {}", d.dst_zone), if *a { "is" } else { "is not" })
                    }
                    (_, _, a) => {
                        ("the destination is", format!("zone {}", d.src_zone), if *a { "is" } else { "is not" })
                    }
                };
                writeln!(f, "decided by:  {who} quarantined, reaching only remediation zones, and {others} {is} one")?;
            }
            DecidedBy::Dropped { counter, why } => {
                writeln!(
                    f,
                    "decided by:  the frame is dropped before any flow is judged ({}): {why}",
                    counter.as_str()
                )?;
            }
        }
        write!(f, "verdict:     {} (reason {}", d.verdict.as_str(), d.reason.as_str())?;
        if let Some(counter) = d.dropped {
            write!(f, ", dropped: {}", counter.as_str())?;
        }
        if let Some(name) = &d.policy_name {
            write!(f, ", policy {} \"{name}\"", d.policy_id)?;
        }
        write!(f, ")")
    }
}
