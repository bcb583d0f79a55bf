//! The kernel's verdict equals the reference evaluator's: thousands of random rule sets
//! and packets, each rule set written into the kernel tables by the agent's own code
//! (alternating halves of the double-buffered tables) and each packet judged by the
//! data path through `BPF_PROG_TEST_RUN`, then by `backplane_rules::evaluate`.
//!
//! Two runs:
//! - legacy: VM ports nobody bound, under rules that learn nothing and say
//!   `unbound_ports: observe`, so that every end is placed by its frame fields (MAC,
//!   address, the port's name), as before ports were bound; also frames from an uplink
//!   and frames the host sends to a VM port;
//! - port-anchored: the sending VM port (`from_port`, which `BPF_PROG_TEST_RUN` runs on
//!   ifindex 1) and the receiving one (`to_port`, run on another device's ifindex, after
//!   `from_port` or as the host's own traffic) bound to endpoints or not, written as the
//!   agent writes them (`PORTS`, `ENDPOINTS`, `ADDR_OWNERS`), other endpoints bound to
//!   other ports, and frames that carry the binding's MAC and addresses or forge them.
//!   The evaluator is told each port's identity; what it expects (a verdict, or a drop
//!   and the counter that says why) the data path must do.
//!
//! Every disagreement is collected, then reported by kind with the rule set, the ports,
//! the frame and the evaluator's explanation. `BACKPLANE_DIFF_SEED` and
//! `BACKPLANE_DIFF_RULESETS` choose the run.
#![allow(
    clippy::cast_possible_truncation,
    clippy::many_single_char_names,
    reason = "a seeded generator draws small numbers into wire-width fields; short names mirror the rule file's grammar"
)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::Path,
};

use aya::{
    maps::{Array, HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use backplane::datapath::rule_tables::{RuleTables, activate, next_slot, owner_key};
use backplane_common::{
    DatapathConfig, FlowKey, FlowValue, PortInfo, PortRole, Verdict,
    config::{BINDING_HOST, BINDING_NONE, LearnedValue, PORT_ADDRS_FIXED, PORT_INGRESS_LIVE, PORT_INGRESS_XDP_SKB},
    maps::{CONFIG, FLOWS, LEARNED, PORTS, PROG_TO_PORT},
    policy::{EndpointValue, OWNER_ELSEWHERE, OWNER_INFRA, OwnerKey, OwnerValue},
    reason::{Counter, Reason},
};
use backplane_rules::{
    CompiledRules, Decision, MacAddr, MemberMatch, OtherBinding, PacketView, PortBinding, PortIdentity, RuleSet, WORLD,
    ZoneIds, compile, evaluate, explain, parse_rules,
};
use common::{datapath::TestDatapath, frames::*};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// `TC_ACT_UNSPEC`: the classifiers pass a frame by handing it to the next program.
const TC_PASS: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
/// `BPF_PROG_TEST_RUN` runs XDP programs as if on the loopback device: the sending port.
const PORT_A: u32 = 1;
/// A port of this node with no device: endpoints bound there are other ports' (their
/// MACs and addresses are not the sending port's).
const PORT_OTHER: u32 = 99;

/// The counters of a frame dropped before its flow is judged.
const DROP_COUNTERS: [Counter; 5] =
    [Counter::SpoofedMac, Counter::Spoofed, Counter::SpoofedAddress, Counter::UnboundPort, Counter::ToOwnMac];

/// The MAC of the rules' `infrastructure:` (when they have one).
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x55, 0x01];

/// splitmix64: deterministic, so a failure names a seed that reproduces it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

/// Addresses and MACs packets are drawn from; some are zone members, some are not.
struct Pool {
    v4_nets: Vec<[u8; 3]>,
    /// Some become `mac` members.
    macs: Vec<[u8; 6]>,
    /// The inventory's endpoints take theirs from here.
    inventory_macs: Vec<[u8; 6]>,
    ifnames: Vec<&'static str>,
}

fn pool() -> Pool {
    Pool {
        v4_nets: (0..8).map(|i| [10, 90, i]).collect(),
        macs: (0..10).map(|i| [0x52, 0x54, 0, 0, 0x90, i]).collect(),
        inventory_macs: (0..4).map(|i| [0x52, 0x54, 0, 0, 0x91, i]).collect(),
        ifnames: vec!["tap-web-1", "tap-db-1", "vnet7", "eth9"],
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Nobody binds, nothing learns, `unbound_ports: observe`.
    Legacy,
    /// Ports bound or not, zones that learn or not, any `unbound_ports`.
    Bound,
}

/// A random valid rule set as YAML text.
fn random_rules(rng: &mut Rng, pool: &Pool, mode: Mode) -> String {
    let bound = mode == Mode::Bound;
    let n_zones = 1 + rng.below(4) as usize;
    let names: Vec<String> = (0..n_zones).map(|i| format!("z{i}")).collect();
    let mut y = String::from("zones:\n");
    // Members are dealt out without reuse, so no address is in two zones.
    let mut nets: Vec<usize> = (0..pool.v4_nets.len()).collect();
    let mut macs: Vec<usize> = (0..pool.macs.len()).collect();
    let mut globs = vec!["tap-web-*", "tap-db-*", "vnet*"];
    let mut net_zone: BTreeMap<[u8; 3], String> = BTreeMap::new();
    for name in &names {
        let mut members = Vec::new();
        for _ in 0..rng.below(3) {
            if nets.is_empty() {
                break;
            }
            let n = nets.remove(rng.below(nets.len() as u64) as usize);
            let [a, b, c] = pool.v4_nets[n];
            members.push(format!("{{ cidr: {a}.{b}.{c}.0/24 }}"));
            members.push(format!("{{ cidr: \"fd00:{c}::/64\" }}"));
            net_zone.insert(pool.v4_nets[n], name.clone());
        }
        if rng.chance(40) && !macs.is_empty() {
            let m = macs.remove(rng.below(macs.len() as u64) as usize);
            members.push(format!("{{ mac: \"{}\" }}", mac_str(pool.macs[m])));
        }
        if rng.chance(30) && !globs.is_empty() {
            let g = globs.remove(rng.below(globs.len() as u64) as usize);
            members.push(format!("{{ interface: \"{g}\" }}"));
        }
        let _ = writeln!(y, "  {name}:\n    members: [{}]", members.join(", "));
        if rng.chance(30) {
            y.push_str("    intra_zone: deny\n");
        }
        if !bound || rng.chance(30) {
            y.push_str("    binding: host\n");
        }
        if bound && rng.chance(25) {
            y.push_str("    remediation: true\n");
        }
    }
    // `world` learns unless it says otherwise; the legacy run learns nothing.
    if !bound || rng.chance(40) {
        y.push_str("  world:\n    members: []\n");
        if rng.chance(40) {
            y.push_str("    intra_zone: deny\n");
        }
        if !bound || rng.chance(40) {
            y.push_str("    binding: host\n");
        }
        if bound && rng.chance(15) {
            y.push_str("    remediation: true\n");
        }
    }
    let mut all: Vec<String> = names.clone();
    all.push("world".into());
    y.push_str(&random_policies(rng, &all));
    if rng.chance(50) {
        let _ = writeln!(y, "default_inter_zone: {}", rng.pick(&["allow", "deny"]));
    }
    if !bound {
        y.push_str("unbound_ports: observe\n");
        return y;
    }
    if let Some(setting) = rng.pick(&[None, Some("quarantine"), Some("deny"), Some("observe")]) {
        let _ = writeln!(y, "unbound_ports: {setting}");
    }
    if rng.chance(30) {
        // A gateway behind the uplink: no VM port's MAC or addresses.
        let [a, b, c] = *rng.pick(&pool.v4_nets);
        let _ = writeln!(
            y,
            "infrastructure:\n  gw:\n    mac: \"{}\"\n    ips: [{a}.{b}.{c}.254, \"fd00:{c}::fe\"]",
            mac_str(GATEWAY_MAC)
        );
    }
    y.push_str(&random_inventory(rng, pool, &names, &net_zone));
    y
}

/// Policies between the zones `all` (`world` included), some of them for one pair.
fn random_policies(rng: &mut Rng, all: &[String]) -> String {
    let mut y = String::from("policies:\n");
    let mut pairs = Vec::new();
    for i in 0..rng.below(6) {
        let from = rng.pick(all).clone();
        let to = rng.pick(all).clone();
        if from == to || pairs.contains(&(from.clone(), to.clone())) && rng.chance(50) {
            continue;
        }
        pairs.push((from.clone(), to.clone()));
        let mut allow = Vec::new();
        for _ in 0..rng.below(4) {
            match rng.below(6) {
                0 => allow.push("{ proto: icmp }".to_owned()),
                1 => allow.push("{ proto: icmpv6 }".to_owned()),
                2 => allow.push(format!("{{ proto: udp, ports: [{}] }}", 1 + rng.below(200))),
                3 => allow.push("{ proto: 47 }".to_owned()),
                4 => allow.push("{ proto: tcp }".to_owned()),
                _ => {
                    let a = 1 + rng.below(200);
                    let b = a + rng.below(60);
                    allow.push(format!(
                        "{{ proto: {}, ports: [{}, \"{a}-{b}\"] }}",
                        rng.pick(&["tcp", "udp", "sctp"]),
                        1 + rng.below(200)
                    ));
                }
            }
        }
        let mode = if rng.chance(25) { "audit" } else { "enforce" };
        let _ = writeln!(
            y,
            "  - name: p{i}\n    from: {from}\n    to: {to}\n    mode: {mode}\n    allow: [{}]",
            allow.join(", ")
        );
    }
    if y.ends_with("policies:\n") {
        y.push_str("  []\n");
        y = y.replace("policies:\n  []\n", "policies: []\n");
    }
    y
}

/// The inventory: endpoints with or without addresses, placed by `zone:` or by them.
fn random_inventory(rng: &mut Rng, pool: &Pool, names: &[String], net_zone: &BTreeMap<[u8; 3], String>) -> String {
    let mut y = String::new();
    let n = rng.below(4) as usize;
    if n > 0 {
        y.push_str("endpoints:\n");
    }
    for (i, mac) in pool.inventory_macs.iter().take(n).enumerate() {
        let host = 200 + i as u8;
        let mut ips = Vec::new();
        let mut placed = false;
        if rng.chance(60) {
            let net = if rng.chance(80) { *rng.pick(&pool.v4_nets) } else { [192, 0, 2] };
            placed = net_zone.contains_key(&net);
            if rng.chance(70) {
                ips.push(format!("{}.{}.{}.{host}", net[0], net[1], net[2]));
            }
            if ips.is_empty() || rng.chance(40) {
                ips.push(format!("\"fd00:{}::{host:x}\"", net[2]));
            }
        }
        let _ = writeln!(y, "  e{i}:\n    mac: \"{}\"", mac_str(*mac));
        if !ips.is_empty() {
            let _ = writeln!(y, "    ips: [{}]", ips.join(", "));
        }
        if !placed || rng.chance(50) {
            let _ = writeln!(y, "    zone: {}", rng.pick(names));
        }
    }
    y
}

/// What one probe is: where the frame enters (or leaves) and through which programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// From VM port A into the switch (`from_port`).
    Ingress,
    /// From the host to VM port B (`to_port` alone).
    HostToPort,
    /// From VM port A to VM port B (`from_port` on A, then `to_port` on B).
    PortToPort,
    /// From an uplink into the switch (`from_port` on a port with the uplink role).
    Uplink,
}

/// One probe: the ports, the other bindings, the frame and what the evaluator is told.
struct Probe {
    kind: Kind,
    /// The port the frame enters through (a VM port, or the uplink's name).
    a: Option<PortIdentity>,
    uplink: Option<String>,
    /// The VM port the frame is delivered through.
    b: Option<PortIdentity>,
    /// Endpoints bound to `PORT_OTHER`, and on other nodes.
    here: Vec<OtherBinding>,
    elsewhere: Vec<OtherBinding>,
    frame: Vec<u8>,
    /// What the first program judges: the frame entering (or, for `HostToPort`, leaving).
    view: PacketView,
    /// For `PortToPort`: the frame leaving through B.
    egress_view: Option<PacketView>,
}

/// The MACs the rules name (`mac` members, the inventory).
fn rule_macs(rules: &RuleSet) -> Vec<MacAddr> {
    let members = rules.zones.iter().flat_map(|z| &z.members).filter_map(|m| match m.matcher {
        MemberMatch::Mac(mac) => Some(mac),
        _ => None,
    });
    members.chain(rules.endpoints.iter().map(|e| e.mac)).collect()
}

/// An address in one of `zone`'s networks of the family.
fn host_in(rng: &mut Rng, rules: &RuleSet, zone: &str, v6: bool) -> Option<IpAddr> {
    let cidrs: Vec<IpAddr> = rules
        .zone(zone)?
        .members
        .iter()
        .filter_map(|m| match m.matcher {
            MemberMatch::Cidr(c) if c.addr().is_ipv6() == v6 => Some(c.addr()),
            _ => None,
        })
        .collect();
    if cidrs.is_empty() {
        return None;
    }
    Some(match *rng.pick(&cidrs) {
        IpAddr::V4(a) => {
            let mut o = a.octets();
            o[3] = 1 + rng.below(250) as u8;
            IpAddr::from(o)
        }
        IpAddr::V6(a) => {
            let mut s = a.segments();
            s[7] = 1 + rng.below(250) as u16;
            IpAddr::from(s)
        }
    })
}

/// Any address: mostly in the pool's networks (members or not), some outside.
fn random_host(rng: &mut Rng, pool: &Pool, v6: bool) -> IpAddr {
    let [a, b, c] = if rng.chance(85) { *rng.pick(&pool.v4_nets) } else { [192, 0, 2] };
    if v6 {
        IpAddr::from([0xfd00, u16::from(c), 0, 0, 0, 0, 0, 1 + rng.below(250) as u16])
    } else {
        IpAddr::from([a, b, c, 1 + rng.below(250) as u8])
    }
}

fn random_mac(rng: &mut Rng, pool: &Pool, rules: &RuleSet) -> MacAddr {
    let known = rule_macs(rules);
    match rng.below(10) {
        0..=2 if !known.is_empty() => *rng.pick(&known),
        0..=4 => MacAddr(*rng.pick(&pool.macs)),
        _ => MacAddr([0x02, 0, 0, 0, 0x77, rng.below(200) as u8]),
    }
}

/// The fixed addresses of a binding, as the agent gives its port (`PORT_ADDRS_FIXED`,
/// `ADDR_OWNERS`): the runtime endpoint's, and the inventory's `ips`.
fn fixed_addresses(rules: &RuleSet, mac: MacAddr, runtime: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = runtime.to_vec();
    for ip in rules.endpoint_by_mac(mac).map(|e| e.ips.as_slice()).unwrap_or_default() {
        if !out.contains(ip) {
            out.push(*ip);
        }
    }
    out
}

/// A VM port named from the pool, bound to an endpoint (of the rules or not) or not.
fn random_port(rng: &mut Rng, pool: &Pool, rules: &RuleSet, mode: Mode, taken: &[MacAddr]) -> PortIdentity {
    let name = rng.pick(&pool.ifnames).to_string();
    if mode == Mode::Legacy || rng.chance(30) {
        return PortIdentity { name, binding: None, others: Vec::new() };
    }
    let known = rule_macs(rules);
    let mac = loop {
        let mac = match rng.below(10) {
            0..=4 if !known.is_empty() => *rng.pick(&known),
            _ => MacAddr([0x02, 0, 0, 0, 0x88, rng.below(200) as u8]),
        };
        if !taken.contains(&mac) {
            break mac;
        }
    };
    let ours = known.contains(&mac);
    let zone = if !ours && rng.chance(60) {
        let mut zones: Vec<String> = rules.zones.iter().map(|z| z.name.clone()).collect();
        if !zones.iter().any(|z| z == WORLD) {
            zones.push(WORLD.to_owned());
        }
        Some(rng.pick(&zones).clone())
    } else {
        None
    };
    PortIdentity { name, binding: Some(PortBinding { mac, zone, addresses: Vec::new() }), others: Vec::new() }
}

/// Gives a runtime endpoint bound to `port` one or two addresses nobody else claims.
fn add_runtime_addresses(rng: &mut Rng, pool: &Pool, rules: &RuleSet, port: &mut PortIdentity, claimed: &[IpAddr]) {
    let Some(b) = port.binding.as_mut() else { return };
    if rules.endpoint_by_mac(b.mac).is_some() || !rng.chance(35) {
        return;
    }
    for _ in 0..=rng.below(2) {
        let v6 = rng.chance(30);
        let ip = match &b.zone {
            Some(z) if rng.chance(70) => host_in(rng, rules, z, v6),
            _ => None,
        }
        .unwrap_or_else(|| random_host(rng, pool, v6));
        if !claimed.contains(&ip) && !b.addresses.contains(&ip) && !rules.endpoints.iter().any(|e| e.ips.contains(&ip))
        {
            b.addresses.push(ip);
        }
    }
}

/// The frame's source address: the binding's own, its zone's, another's, special ones.
fn source_address(
    rng: &mut Rng,
    pool: &Pool,
    rules: &RuleSet,
    port: &PortIdentity,
    owned_by_others: &[IpAddr],
    v6: bool,
) -> IpAddr {
    let fixed: Vec<IpAddr> = port
        .binding
        .as_ref()
        .map(|b| fixed_addresses(rules, b.mac, &b.addresses))
        .unwrap_or_default()
        .into_iter()
        .filter(|ip| ip.is_ipv6() == v6)
        .collect();
    let others: Vec<IpAddr> = owned_by_others.iter().filter(|ip| ip.is_ipv6() == v6).copied().collect();
    let zones: Vec<&str> = rules.zones.iter().map(|z| z.name.as_str()).collect();
    let r = rng.below(100);
    let pick = match r {
        0..=29 if !fixed.is_empty() => Some(*rng.pick(&fixed)),
        0..=54 if !zones.is_empty() => {
            let zone = port
                .binding
                .as_ref()
                .and_then(|b| b.zone.clone())
                .filter(|_| rng.chance(60))
                .unwrap_or_else(|| rng.pick(&zones).to_string());
            host_in(rng, rules, &zone, v6)
        }
        55..=62 if !others.is_empty() => Some(*rng.pick(&others)),
        63..=66 => Some(if v6 { IpAddr::from([0u16; 8]) } else { IpAddr::from([0u8; 4]) }),
        67..=70 if v6 => Some(IpAddr::from([0xfe80, 0, 0, 0, 0, 0, 0, 1 + rng.below(250) as u16])),
        _ => None,
    };
    pick.unwrap_or_else(|| random_host(rng, pool, v6))
}

#[expect(clippy::too_many_lines, reason = "one probe's ports, bindings and frame, drawn in order")]
fn random_probe(rng: &mut Rng, pool: &Pool, rules: &RuleSet, mode: Mode, two_ports: bool, serial: u16) -> Probe {
    let r = rng.below(100);
    let kind = match mode {
        Mode::Legacy if r < 55 => Kind::Ingress,
        Mode::Legacy if r < 85 => Kind::HostToPort,
        Mode::Bound if r < 45 => Kind::Ingress,
        Mode::Bound if r < 65 => Kind::HostToPort,
        Mode::Bound if r < 90 => {
            if two_ports {
                Kind::PortToPort
            } else {
                Kind::Ingress
            }
        }
        _ => Kind::Uplink,
    };
    let sends = matches!(kind, Kind::Ingress | Kind::PortToPort);
    let receives = matches!(kind, Kind::HostToPort | Kind::PortToPort);
    let mut a = sends.then(|| random_port(rng, pool, rules, mode, &[]));
    let taken: Vec<MacAddr> = a.iter().filter_map(|p| p.binding.as_ref().map(|b| b.mac)).collect();
    let mut b = receives.then(|| random_port(rng, pool, rules, mode, &taken));
    let uplink = (kind == Kind::Uplink).then(|| rng.pick(&pool.ifnames).to_string());

    // Other endpoints: bound to another port here (a MAC of the rules, so that its entry
    // says where it is bound), and one on another node.
    let mut taken: Vec<MacAddr> = taken;
    taken.extend(b.iter().filter_map(|p| p.binding.as_ref().map(|b| b.mac)));
    let mut here = Vec::new();
    let mut elsewhere = Vec::new();
    let mut claimed: Vec<IpAddr> = Vec::new();
    for p in a.iter().chain(b.iter()) {
        if let Some(bb) = &p.binding {
            claimed.extend(fixed_addresses(rules, bb.mac, &[]));
        }
    }
    if mode == Mode::Bound && kind != Kind::Uplink {
        let free: Vec<MacAddr> = rule_macs(rules).into_iter().filter(|m| !taken.contains(m)).collect();
        if !free.is_empty() && rng.chance(35) {
            let mac = *rng.pick(&free);
            let mut addresses = fixed_addresses(rules, mac, &[]);
            let v6 = rng.chance(30);
            let extra = random_host(rng, pool, v6);
            if rng.chance(50) && !claimed.contains(&extra) && !rules.endpoints.iter().any(|e| e.ips.contains(&extra)) {
                addresses.push(extra);
            }
            claimed.extend(&addresses);
            taken.push(mac);
            here.push(OtherBinding { mac, addresses, here: true });
        }
        if rng.chance(25) {
            let mac = MacAddr([0x02, 0, 0, 0, 0x66, rng.below(200) as u8]);
            let v6 = rng.chance(30);
            let ip = random_host(rng, pool, v6);
            if !claimed.contains(&ip) && !rules.endpoints.iter().any(|e| e.ips.contains(&ip)) {
                claimed.push(ip);
                elsewhere.push(OtherBinding { mac, addresses: vec![ip], here: false });
            }
        }
    }
    for port in [&mut a, &mut b].into_iter().flatten() {
        add_runtime_addresses(rng, pool, rules, port, &claimed);
        if let Some(bb) = &port.binding {
            claimed.extend(&bb.addresses);
        }
    }
    // What the sending port must not claim: the other ports' endpoints.
    if let Some(a) = a.as_mut() {
        a.others.extend(b.iter().filter_map(|p| p.binding.as_ref()).map(|bb| OtherBinding {
            mac: bb.mac,
            addresses: fixed_addresses(rules, bb.mac, &bb.addresses),
            here: true,
        }));
        a.others.extend(here.iter().cloned());
        a.others.extend(elsewhere.iter().cloned());
    }

    let v6 = rng.chance(30);
    let infra_ips = rules.infrastructure.iter().flat_map(|i| i.ips.iter().copied());
    let owned_by_others: Vec<IpAddr> = a
        .as_ref()
        .map(|a| a.others.iter().flat_map(|o| o.addresses.clone()).chain(infra_ips).collect())
        .unwrap_or_default();
    let src_mac = match a.as_ref() {
        Some(a) => {
            let infra_macs = rules.infrastructure.iter().filter_map(|i| i.mac);
            let other_macs: Vec<MacAddr> = a.others.iter().map(|o| o.mac).chain(infra_macs).collect();
            match (&a.binding, rng.below(100)) {
                (Some(bb), 0..=74) => bb.mac,
                (_, 75..=84) if !other_macs.is_empty() => *rng.pick(&other_macs),
                (None, 85..=87) if mode == Mode::Bound => {
                    if rng.chance(50) {
                        MacAddr([0; 6])
                    } else {
                        MacAddr([0x01, 0, 0x5e, 0, 0, 1])
                    }
                }
                _ => random_mac(rng, pool, rules),
            }
        }
        None => random_mac(rng, pool, rules),
    };
    let src_ip = match a.as_ref() {
        Some(a) if mode == Mode::Bound => source_address(rng, pool, rules, a, &owned_by_others, v6),
        _ => random_host(rng, pool, v6),
    };
    let (dst_mac, dst_ip) = if let Some(bb) = b.as_ref().and_then(|b| b.binding.as_ref()) {
        let mac = if rng.chance(80) { bb.mac } else { random_mac(rng, pool, rules) };
        let fixed: Vec<IpAddr> =
            fixed_addresses(rules, bb.mac, &bb.addresses).into_iter().filter(|ip| ip.is_ipv6() == v6).collect();
        let ip = if !fixed.is_empty() && rng.chance(50) { *rng.pick(&fixed) } else { random_host(rng, pool, v6) };
        (mac, ip)
    } else {
        let mac = if rng.chance(3) { src_mac } else { random_mac(rng, pool, rules) };
        (mac, random_host(rng, pool, v6))
    };
    let proto = *rng.pick(&[6u8, 17, 132, 47, if v6 { 58 } else { 1 }]);
    let dport = match proto {
        6 | 17 | 132 => 1 + rng.below(260) as u16,
        1 | 58 => serial,
        _ => 0,
    };
    let l4 = match proto {
        6 => tcp(serial, dport, TCP_SYN, &[]),
        17 => udp(serial, dport, b"x"),
        132 => {
            let mut h = udp(serial, dport, &[0u8; 8]);
            h.truncate(12);
            h
        }
        1 => icmp_echo(8, serial, 1),
        58 => icmp_echo(128, serial, 1),
        _ => vec![0u8; 8],
    };
    let l3 = match (src_ip, dst_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s.octets(), d.octets(), proto, &l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s.octets(), d.octets(), proto, &l4),
        _ => unreachable!("same family"),
    };
    let frame = eth(dst_mac.0, src_mac.0, &[], if v6 { 0x86dd } else { 0x0800 }, &l3);
    let view = PacketView {
        src_mac,
        dst_mac,
        src_ip,
        dst_ip,
        proto,
        dport,
        src_interface: uplink.clone(),
        dst_interface: None,
        src_port: a.clone(),
        dst_port: (kind == Kind::HostToPort).then(|| b.clone()).flatten(),
    };
    let egress_view = (kind == Kind::PortToPort).then(|| PacketView { dst_port: b.clone(), ..view.clone() });
    // Where it enters, a frame to B's endpoint is for B: its MAC is B's (the agent gives a
    // bound MAC an endpoint entry, which says so).
    let view = match b.as_ref().and_then(|b| b.binding.as_ref()) {
        Some(bb) if kind == Kind::PortToPort && bb.mac == dst_mac => PacketView { dst_port: b.clone(), ..view },
        _ => view,
    };
    Probe { kind, a, uplink, b, here, elsewhere, frame, view, egress_view }
}

/// What the data path did with a probe (or the evaluator says it must).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// A flow entry with this verdict.
    Flow { verdict: Verdict, reason: Reason, policy_id: u32, src_zone: String, dst_zone: String },
    /// Dropped, with this counter, and no flow.
    Dropped(&'static str),
    /// Passed (`to_port` after `from_port`, which judges without a flow entry of its own).
    Passed,
    /// Anything else (a flow and a drop that disagree, two flows, no counter).
    Other(String),
}

impl Outcome {
    fn expected(d: &Decision) -> Self {
        match d.dropped {
            Some(counter) => Self::Dropped(counter.as_str()),
            None => Self::Flow {
                verdict: d.verdict,
                reason: d.reason,
                policy_id: d.policy_id,
                src_zone: d.src_zone.clone(),
                dst_zone: d.dst_zone.clone(),
            },
        }
    }

    /// What it was, coarsely, for grouping disagreements.
    fn label(&self) -> String {
        match self {
            Self::Flow { verdict, reason, .. } => format!("{}/{}", verdict.as_str(), reason.as_str()),
            Self::Dropped(c) => format!("dropped:{c}"),
            Self::Passed => "passed".into(),
            Self::Other(s) => s.clone(),
        }
    }
}

/// The maps a probe writes besides the rule tables.
struct Maps {
    config: Array<MapData, DatapathConfig>,
    ports: HashMap<MapData, u32, PortInfo>,
    learned: HashMap<MapData, u32, LearnedValue>,
    /// Which port each locked MAC is behind (`MacKey` → ifindex), in objects that have it.
    port_macs: Option<HashMap<MapData, [u8; 8], u32>>,
    /// The addresses ports took on first use (`OwnerKey` → `LearnedAddr`) and how many
    /// each holds, in objects that have them: emptied before each probe, which the
    /// evaluator judges as the first frame from its address.
    learned_addrs: Option<HashMap<MapData, [u8; 20], [u8; 24]>>,
    learned_addr_count: Option<HashMap<MapData, u32, u32>>,
}

/// The kernel side of the ports and bindings of a probe, written as the agent writes it;
/// returns the `ENDPOINTS` entries it changed (to put back).
fn write_state(
    tables: &mut RuleTables,
    maps: &mut Maps,
    compiled: &CompiledRules,
    rules: &RuleSet,
    slot: u8,
    probe: &Probe,
    port_b: u32,
) -> Vec<MacAddr> {
    let s = usize::from(slot & 1);
    for ifindex in [PORT_A, port_b] {
        let _ = maps.ports.remove(&ifindex);
        let _ = maps.learned.remove(&ifindex);
    }
    if let Some(port_macs) = maps.port_macs.as_mut() {
        let keys: Vec<[u8; 8]> = port_macs.keys().map(Result::unwrap).collect();
        for key in &keys {
            port_macs.remove(key).unwrap();
        }
    }
    if let Some(held) = maps.learned_addrs.as_mut() {
        let keys: Vec<[u8; 20]> = held.keys().map(Result::unwrap).collect();
        for key in &keys {
            held.remove(key).unwrap();
        }
    }
    if let Some(counts) = maps.learned_addr_count.as_mut() {
        let keys: Vec<u32> = counts.keys().map(Result::unwrap).collect();
        for key in &keys {
            counts.remove(key).unwrap();
        }
    }
    let mut owners: std::collections::HashMap<OwnerKey, OwnerValue> = std::collections::HashMap::new();
    let mut touched = Vec::new();
    let mut own = |mac: MacAddr, ip: &IpAddr, ifindex: u32| {
        owners.insert(owner_key(*ip), OwnerValue { ifindex, endpoint_id: 0, mac: mac.0, _pad: [0; 2] });
    };
    let ports = [(PORT_A, probe.a.as_ref(), probe.kind == Kind::PortToPort), (port_b, probe.b.as_ref(), false)];
    for (ifindex, port, ingress_live) in ports {
        let Some(port) = port else { continue };
        let mut info = PortInfo { role: PortRole::Vm as u8, ..PortInfo::default() };
        if ingress_live {
            // `to_port` then knows the frame was judged where it entered, by XDP (no tag).
            info.flags |= PORT_INGRESS_LIVE;
            info.ingress = PORT_INGRESS_XDP_SKB;
        }
        if let Some(b) = &port.binding {
            let fixed = fixed_addresses(rules, b.mac, &b.addresses);
            let entry = compiled.endpoint(b.mac);
            let zone = entry
                .map(|e| e.value.zone)
                .or_else(|| b.zone.as_deref().map(|z| compiled.zone_ids.id(z).expect("a zone of the rules")))
                .or_else(|| compiled.zone_for_interface(&port.name))
                .unwrap_or(0);
            info.binding = BINDING_HOST;
            info.mac = b.mac.0;
            info.zone[s] = zone;
            info.standing[s] = entry.map_or(0, |e| e.value.flags);
            if !fixed.is_empty() {
                info.flags |= PORT_ADDRS_FIXED;
            }
            // The bound endpoint's entry says where it is bound (for a MAC outside the
            // rules, the agent makes one, in the binding's zone).
            let value = match entry {
                Some(e) => EndpointValue { ifindex, ..e.value },
                None => EndpointValue { zone, flags: 0, endpoint_id: 10_000 + ifindex, ifindex, _pad: [0; 4] },
            };
            tables.write_endpoint(slot, b.mac, value).unwrap();
            touched.push(b.mac);
            for ip in &fixed {
                own(b.mac, ip, ifindex);
            }
        } else {
            info.binding = BINDING_NONE;
            info.zone[s] = compiled.zone_for_interface(&port.name).unwrap_or(0);
        }
        maps.ports.insert(ifindex, info, 0).unwrap();
    }
    if let Some(name) = &probe.uplink {
        let mut info = PortInfo { role: PortRole::Uplink as u8, ..PortInfo::default() };
        info.zone[s] = compiled.zone_for_interface(name).unwrap_or(0);
        maps.ports.insert(PORT_A, info, 0).unwrap();
    }
    for o in &probe.here {
        let e = compiled.endpoint(o.mac).expect("endpoints bound elsewhere here are the rules'");
        let value = EndpointValue { ifindex: PORT_OTHER, ..e.value };
        tables.write_endpoint(slot, o.mac, value).unwrap();
        touched.push(o.mac);
        for ip in &o.addresses {
            own(o.mac, ip, PORT_OTHER);
        }
    }
    for o in &probe.elsewhere {
        for ip in &o.addresses {
            own(o.mac, ip, OWNER_ELSEWHERE);
        }
    }
    for infra in &rules.infrastructure {
        for ip in &infra.ips {
            own(infra.mac.unwrap_or(MacAddr([0; 6])), ip, OWNER_INFRA);
        }
    }
    tables.set_owners(&owners).unwrap();
    touched
}

/// Runs `to_port` on a frame leaving through device `ifindex` that entered through
/// `came_in` (0: the host's own).
fn to_port_on(dp: &mut TestDatapath, frame: &[u8], ifindex: u32, came_in: u32) -> i32 {
    let tc: &mut SchedClassifier = dp.ebpf.program_mut(PROG_TO_PORT).unwrap().try_into().unwrap();
    // `struct __sk_buff`: ingress_ifindex at 36, ifindex at 40; the rest zero.
    let mut skb = [0u8; 192];
    skb[36..40].copy_from_slice(&came_in.to_ne_bytes());
    skb[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&skb),
        ..TestRunOptions::default()
    };
    let action = tc.test_run(opts).expect("BPF_PROG_TEST_RUN to_port").return_value.cast_signed();
    assert!(action == TC_PASS || action == TC_ACT_SHOT, "TC action {action}");
    action
}

/// Another device than loopback, for `to_port` to run on (`BPF_PROG_TEST_RUN` gives a TC
/// program the device of `ifindex` in its context).
fn other_device() -> Option<u32> {
    ["ifb0", "ifb1", "eth0", "dummy0"]
        .iter()
        .find_map(|name| std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).ok()?.trim().parse().ok())
        .filter(|&i| i != PORT_A)
}

fn drop_counters(dp: &TestDatapath) -> [u64; 7] {
    let mut out = [0; 7];
    for (i, c) in DROP_COUNTERS.iter().chain(&[Counter::EgressDenied, Counter::Dropped]).enumerate() {
        out[i] = dp.counter(*c);
    }
    out
}

/// The counter a drop was counted under, from two snapshots.
fn counted(before: &[u64; 7], after: &[u64; 7]) -> Option<&'static str> {
    let names = DROP_COUNTERS.iter().chain(&[Counter::EgressDenied]).map(|c| c.as_str());
    names.zip(before.iter().zip(after)).find(|(_, (b, a))| a > b).map(|(n, _)| n)
}

/// Removes the flow entries a probe left.
fn take_flows(dp: &mut TestDatapath) {
    let mut flows: HashMap<&mut MapData, FlowKey, FlowValue> =
        HashMap::try_from(dp.ebpf.map_mut(FLOWS).unwrap()).unwrap();
    let keys: Vec<FlowKey> = flows.keys().map(Result::unwrap).collect();
    for key in &keys {
        flows.remove(key).unwrap();
    }
}

/// What `from_port` (or `to_port` for the host's frames) did: the flow it left, or the
/// drop and its counter.
fn judged(
    compiled: &CompiledRules,
    flows: &[(FlowKey, FlowValue)],
    dropped: bool,
    before: &[u64; 7],
    after: &[u64; 7],
) -> Outcome {
    match flows {
        [] if dropped => {
            counted(before, after).map_or_else(|| Outcome::Other("dropped, no counter".into()), Outcome::Dropped)
        }
        [] => Outcome::Other("passed without a flow".into()),
        [(_, value)] => {
            let zone = |id: u16| compiled.zone_ids.name(id).unwrap_or("?").to_owned();
            let verdict = Verdict::from_u8(value.verdict).unwrap();
            if dropped != (verdict == Verdict::Denied) {
                let what = if dropped { "dropped" } else { "passed" };
                return Outcome::Other(format!("{}/{} but {what}", verdict.as_str(), value.reason));
            }
            Outcome::Flow {
                verdict,
                reason: Reason::from_u8(value.reason).unwrap(),
                policy_id: value.policy_id,
                src_zone: zone(value.zone[usize::from(value.initiator)]),
                dst_zone: zone(value.zone[usize::from(value.initiator ^ 1)]),
            }
        }
        more => Outcome::Other(format!("{} flows", more.len())),
    }
}

/// Disagreements, by kind: how many and the first one in full.
#[derive(Default)]
struct Report {
    kinds: BTreeMap<String, (usize, String)>,
}

impl Report {
    fn add(&mut self, kind: String, detail: impl FnOnce() -> String) {
        self.kinds.entry(kind).and_modify(|(n, _)| *n += 1).or_insert_with(|| (1, detail()));
    }

    /// Fails with every kind of disagreement, if there is one.
    fn check(&self) {
        if self.kinds.is_empty() {
            return;
        }
        let mut text = String::new();
        let total: usize = self.kinds.values().map(|(n, _)| n).sum();
        let _ = writeln!(text, "{total} packets judged otherwise by the kernel than by the evaluator:");
        for (kind, (n, first)) in &self.kinds {
            let _ = writeln!(text, "\n=== {n} x {kind}; the first:\n{first}");
        }
        panic!("{text}");
    }
}

fn describe(probe: &Probe, view: &PacketView, rules: &RuleSet, maps: &Maps, port_b: u32) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "frame: {} -> {}, {} -> {}, proto {} dport {}",
        view.src_mac, view.dst_mac, view.src_ip, view.dst_ip, view.proto, view.dport
    );
    match (&probe.a, &probe.uplink) {
        (Some(a), _) => {
            let _ = writeln!(s, "sending port: {a:?}");
        }
        (None, Some(uplink)) => {
            let _ = writeln!(s, "sending port: uplink {uplink}");
        }
        (None, None) => s.push_str("sent by the host\n"),
    }
    let _ = writeln!(s, "receiving port: {:?}", view.dst_port);
    let _ = writeln!(s, "PORTS[{PORT_A}]: {:?}", maps.ports.get(&PORT_A, 0).ok());
    let _ = writeln!(s, "PORTS[{port_b}]: {:?}", maps.ports.get(&port_b, 0).ok());
    let _ = writeln!(s, "bound elsewhere here: {:?}; on other nodes: {:?}", probe.here, probe.elsewhere);
    let _ = writeln!(s, "evaluator:\n{}", explain(rules, view));
    s
}

/// The data path under test and the maps the test writes.
struct Kernel {
    dp: TestDatapath,
    tables: RuleTables,
    maps: Maps,
    /// The device `to_port` runs on (the receiving port).
    port_b: u32,
}

impl Kernel {
    fn load(port_b: u32) -> Self {
        let mut dp = TestDatapath::load(4096);
        let tables = RuleTables::from_ebpf(&mut dp.ebpf).expect("rule tables");
        let maps = Maps {
            config: Array::try_from(dp.ebpf.take_map(CONFIG).unwrap()).unwrap(),
            ports: HashMap::try_from(dp.ebpf.take_map(PORTS).unwrap()).unwrap(),
            learned: HashMap::try_from(dp.ebpf.take_map(LEARNED).unwrap()).unwrap(),
            port_macs: dp.ebpf.take_map("PORT_MACS").map(|m| HashMap::try_from(m).unwrap()),
            learned_addrs: dp.ebpf.take_map("LEARNED_ADDRS").map(|m| HashMap::try_from(m).unwrap()),
            learned_addr_count: dp.ebpf.take_map("LEARNED_ADDR_COUNT").map(|m| HashMap::try_from(m).unwrap()),
        };
        Self { dp, tables, maps, port_b }
    }

    /// Writes a rule set into the half not in force and puts it in force; its half.
    fn put_in_force(&mut self, compiled: &CompiledRules) -> u8 {
        let slot = next_slot(&self.maps.config.get(&0, 0).unwrap());
        self.tables.write_slot(slot, compiled).expect("write slot");
        activate(&mut self.maps.config, slot, compiled).expect("activate");
        slot
    }

    /// Runs the probe's first program (`from_port`, or `to_port` for the host's frames):
    /// the flow it left, or the drop and its counter.
    fn first(&mut self, compiled: &CompiledRules, probe: &Probe) -> Outcome {
        let before = drop_counters(&self.dp);
        let dropped = if probe.kind == Kind::HostToPort {
            to_port_on(&mut self.dp, &probe.frame, self.port_b, 0) == TC_ACT_SHOT
        } else {
            let action = self.dp.from_port(&probe.frame);
            assert!(action == XDP_PASS || action == XDP_DROP, "XDP action {action}");
            action == XDP_DROP
        };
        let after = drop_counters(&self.dp);
        judged(compiled, &self.dp.flows(), dropped, &before, &after)
    }

    /// Runs `to_port` on B for a frame `from_port` let in through A (and left a flow for).
    fn egress(&mut self, probe: &Probe) -> Outcome {
        let before = drop_counters(&self.dp);
        let shot = to_port_on(&mut self.dp, &probe.frame, self.port_b, PORT_A) == TC_ACT_SHOT;
        let after = drop_counters(&self.dp);
        if shot {
            counted(&before, &after).map_or_else(|| Outcome::Other("dropped, no counter".into()), Outcome::Dropped)
        } else {
            Outcome::Passed
        }
    }

    /// Removes the probe's flows and puts back the endpoint entries it changed.
    fn clean(&mut self, compiled: &CompiledRules, slot: u8, touched: Vec<MacAddr>) {
        take_flows(&mut self.dp);
        for mac in touched {
            match compiled.endpoint(mac) {
                Some(e) => self.tables.write_endpoint(slot, mac, e.value).unwrap(),
                None => self.tables.remove_endpoint(slot, mac).unwrap(),
            }
        }
    }
}

/// What `to_port` must do with a frame leaving through B, by the evaluator.
fn egress_expected(d: &Decision) -> Outcome {
    match d.dropped {
        Some(c) => Outcome::Dropped(c.as_str()),
        None if d.verdict == Verdict::Denied => Outcome::Dropped(Counter::EgressDenied.as_str()),
        None => Outcome::Passed,
    }
}

fn run(mode: Mode) {
    let seed: u64 = std::env::var("BACKPLANE_DIFF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x00ba_c4b1_a9e0);
    let rule_sets: usize = std::env::var("BACKPLANE_DIFF_RULESETS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let per_set = 20;
    let mut rng = Rng(if mode == Mode::Legacy { seed } else { seed ^ 0x1d_e117 });
    let pool = pool();
    let other = other_device();
    let mut k = Kernel::load(other.unwrap_or(PORT_A));
    let mut zone_ids = ZoneIds::new();
    let mut outcomes = BTreeSet::new();
    let mut report = Report::default();
    let mut judged_n = 0;
    for set in 0..rule_sets {
        let text = random_rules(&mut rng, &pool, mode);
        let rules = parse_rules([(Path::new("random.yaml"), text.as_str())])
            .unwrap_or_else(|errs| panic!("rule set {set} (seed {seed:#x}) invalid: {errs:?}\n{text}"));
        let compiled = compile(&rules, &zone_ids);
        let slot = k.put_in_force(&compiled);
        zone_ids = compiled.zone_ids.clone();
        for i in 0..per_set {
            let probe = random_probe(&mut rng, &pool, &rules, mode, other.is_some(), 1 + (set * per_set + i) as u16);
            let touched = write_state(&mut k.tables, &mut k.maps, &compiled, &rules, slot, &probe, k.port_b);
            let mut steps =
                vec![(&probe.view, "", Outcome::expected(&evaluate(&rules, &probe.view)), k.first(&compiled, &probe))];
            // The same frame leaving through B, once A let it in: judged for B's endpoint
            // (`to_port` finds the flow `from_port` left).
            if let (Some(view), (_, _, want, got @ Outcome::Flow { verdict, .. })) = (&probe.egress_view, &steps[0]) {
                if got == want && *verdict != Verdict::Denied {
                    steps.push((view, " egress", egress_expected(&evaluate(&rules, view)), k.egress(&probe)));
                }
            }
            for (view, step, want, got) in &steps {
                if got == want {
                    outcomes.insert(format!("{} {}", step.trim(), want.label()).trim().to_owned());
                    judged_n += 1;
                    continue;
                }
                let kind =
                    format!("{mode:?} {:?}{step}: evaluator {} / kernel {}", probe.kind, want.label(), got.label());
                report.add(kind, || {
                    format!(
                        "rule set {set}, packet {i} (seed {seed:#x}), {:?}{step}\nkernel:    {got:?}\nevaluator: {want:?}\n{}rules:\n{text}",
                        probe.kind,
                        describe(&probe, view, &rules, &k.maps, k.port_b)
                    )
                });
            }
            k.clean(&compiled, slot, touched);
        }
    }
    eprintln!("{mode:?}: {judged_n} packets judged alike under {rule_sets} rule sets; outcomes seen: {outcomes:?}");
    report.check();
    // The generator must reach every verdict and the main reasons, or the test proves little.
    let mut needed = vec![
        "allowed/policy_allow",
        "denied/policy_no_match",
        "audit/policy_no_match",
        "denied/default_inter_zone",
        "allowed/default_inter_zone",
        "allowed/intra_zone",
        "denied/intra_zone",
    ];
    if mode == Mode::Bound {
        needed.extend([
            "allowed/remediation",
            "denied/unbound_port",
            "dropped:spoofed_mac",
            "dropped:spoofed",
            "dropped:spoofed_address",
            "dropped:unbound_port",
            "dropped:to_own_mac",
        ]);
        if other.is_some() {
            needed.extend(["egress passed", "egress dropped:egress_denied"]);
        }
    }
    for label in needed {
        assert!(outcomes.contains(label), "{mode:?}: no packet ended {label}");
    }
}

/// Ports nobody bound, rules that learn nothing, `unbound_ports: observe`: frame fields
/// decide, as before bindings.
#[test]
fn kernel_verdicts_equal_the_reference_evaluator() {
    run(Mode::Legacy);
}

/// Ports bound to endpoints (or learning them, or not), frames that keep to the binding
/// or forge it.
#[test]
fn port_anchored_verdicts_equal_the_reference_evaluator() {
    run(Mode::Bound);
}
