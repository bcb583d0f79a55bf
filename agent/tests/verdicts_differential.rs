//! The kernel's verdict equals the reference evaluator's: thousands of random rule sets
//! and packets, each rule set written into the kernel tables by the agent's own code
//! (alternating halves of the double-buffered tables) and each packet judged by the
//! data path through `BPF_PROG_TEST_RUN`, then by `backplane_rules::evaluate`.
#![allow(
    clippy::cast_possible_truncation,
    clippy::many_single_char_names,
    reason = "a seeded generator draws small numbers into wire-width fields; short names mirror the rule file's grammar"
)]

mod common;

use std::{fmt::Write as _, net::IpAddr, path::Path};

use aya::maps::{Array, HashMap, MapData};
use backplane::datapath::rule_tables::{RuleTables, activate, next_slot, write_port_zones};
use backplane_common::{
    DatapathConfig, FlowKey, FlowValue, PortInfo, PortRole, Verdict,
    maps::{CONFIG, FLOWS, PORTS},
    reason::Reason,
};
use backplane_rules::{MacAddr, PacketView, ZoneIds, compile, evaluate, parse_rules};
use common::{datapath::TestDatapath, frames::*};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// `TC_ACT_UNSPEC`: the classifiers pass a frame by handing it to the next program.
const TC_PASS: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
/// `BPF_PROG_TEST_RUN` runs programs as if on the loopback device.
const LOOPBACK_IFINDEX: u32 = 1;

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
    macs: Vec<[u8; 6]>,
    ifnames: Vec<&'static str>,
}

fn pool() -> Pool {
    Pool {
        v4_nets: (0..8).map(|i| [10, 90, i]).collect(),
        macs: (0..10).map(|i| [0x52, 0x54, 0, 0, 0x90, i]).collect(),
        ifnames: vec!["tap-web-1", "tap-db-1", "vnet7", "eth9"],
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A random valid rule set as YAML text.
fn random_rules(rng: &mut Rng, pool: &Pool) -> String {
    let n_zones = 1 + rng.below(4) as usize;
    let names: Vec<String> = (0..n_zones).map(|i| format!("z{i}")).collect();
    let mut y = String::from("zones:\n");
    // Members are dealt out without reuse, so no address is in two zones.
    let mut nets: Vec<usize> = (0..pool.v4_nets.len()).collect();
    let mut macs: Vec<usize> = (0..pool.macs.len()).collect();
    let mut globs = vec!["tap-web-*", "tap-db-*", "vnet*"];
    for name in &names {
        let _ = writeln!(y, "  {name}:\n    members:");
        let mut members = 0;
        for _ in 0..rng.below(3) {
            if nets.is_empty() {
                break;
            }
            let n = nets.remove(rng.below(nets.len() as u64) as usize);
            let [a, b, c] = pool.v4_nets[n];
            let _ = writeln!(y, "      - cidr: {a}.{b}.{c}.0/24");
            let _ = writeln!(y, "      - cidr: fd00:{c}::/64");
            members += 1;
        }
        if rng.chance(40) && !macs.is_empty() {
            let m = macs.remove(rng.below(macs.len() as u64) as usize);
            let _ = writeln!(y, "      - mac: \"{}\"", mac_str(pool.macs[m]));
            members += 1;
        }
        if rng.chance(30) && !globs.is_empty() {
            let g = globs.remove(rng.below(globs.len() as u64) as usize);
            let _ = writeln!(y, "      - interface: \"{g}\"");
            members += 1;
        }
        if members == 0 {
            y.push_str("      []\n");
            y = y.replace(&format!("  {name}:\n    members:\n      []\n"), &format!("  {name}:\n    members: []\n"));
        }
        if rng.chance(30) {
            let _ = writeln!(y, "    intra_zone: deny");
        }
    }
    if rng.chance(30) {
        let _ = writeln!(y, "  world:\n    members: []\n    intra_zone: deny");
    }
    let mut all: Vec<String> = names.clone();
    all.push("world".into());
    y.push_str("policies:\n");
    let mut pairs = Vec::new();
    for i in 0..rng.below(6) {
        let from = rng.pick(&all).clone();
        let to = rng.pick(&all).clone();
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
    if rng.chance(50) {
        let _ = writeln!(y, "default_inter_zone: {}", rng.pick(&["allow", "deny"]));
    }
    y
}

struct Probe {
    view: PacketView,
    frame: Vec<u8>,
    egress: bool,
}

fn random_packet(rng: &mut Rng, pool: &Pool, serial: u16) -> Probe {
    let v6 = rng.chance(30);
    let host = |rng: &mut Rng| {
        let [a, b, c] = if rng.chance(85) { *rng.pick(&pool.v4_nets) } else { [192, 0, 2] };
        (
            IpAddr::from([a, b, c, 1 + rng.below(250) as u8]),
            IpAddr::from([0xfd00, u16::from(c), 0, 0, 0, 0, 0, 1 + rng.below(250) as u16]),
        )
    };
    let (s4, s6) = host(rng);
    let (d4, d6) = host(rng);
    let (src_ip, dst_ip) = if v6 { (s6, d6) } else { (s4, d4) };
    let mac = |rng: &mut Rng| {
        if rng.chance(60) { *rng.pick(&pool.macs) } else { [0x02, 0, 0, 0, 0x77, rng.below(200) as u8] }
    };
    let (src_mac, dst_mac) = (mac(rng), mac(rng));
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
    let frame = eth(dst_mac, src_mac, &[], if v6 { 0x86dd } else { 0x0800 }, &l3);
    let egress = rng.chance(25);
    let ifname = rng.pick(&pool.ifnames).to_string();
    let view = PacketView {
        src_mac: MacAddr(src_mac),
        dst_mac: MacAddr(dst_mac),
        src_ip,
        dst_ip,
        proto,
        dport,
        src_interface: (!egress).then(|| ifname.clone()),
        dst_interface: egress.then_some(ifname),
    };
    Probe { view, frame, egress }
}

#[test]
fn kernel_verdicts_equal_the_reference_evaluator() {
    let seed: u64 = std::env::var("BACKPLANE_DIFF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x00ba_c4b1_a9e0);
    let rule_sets: usize = std::env::var("BACKPLANE_DIFF_RULESETS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let per_set = 20;
    let mut rng = Rng(seed);
    let pool = pool();
    let mut dp = TestDatapath::load(4096);
    let mut tables = RuleTables::from_ebpf(&mut dp.ebpf).expect("rule tables");
    let mut config: Array<MapData, DatapathConfig> = Array::try_from(dp.ebpf.take_map(CONFIG).unwrap()).unwrap();
    let mut ports: HashMap<MapData, u32, PortInfo> = HashMap::try_from(dp.ebpf.take_map(PORTS).unwrap()).unwrap();
    ports.insert(LOOPBACK_IFINDEX, PortInfo { role: PortRole::Vm as u8, ..PortInfo::default() }, 0).unwrap();
    let mut zone_ids = ZoneIds::new();
    let mut outcomes = std::collections::BTreeSet::new();
    let mut judged = 0;
    for set in 0..rule_sets {
        let text = random_rules(&mut rng, &pool);
        let rules = parse_rules([(Path::new("random.yaml"), text.as_str())])
            .unwrap_or_else(|errs| panic!("rule set {set} (seed {seed:#x}) invalid: {errs:?}\n{text}"));
        let compiled = compile(&rules, &zone_ids);
        let slot = next_slot(&config.get(&0, 0).unwrap());
        tables.write_slot(slot, &compiled).expect("write slot");
        activate(&mut config, slot, &compiled).expect("activate");
        zone_ids = compiled.zone_ids.clone();
        for i in 0..per_set {
            let probe = random_packet(&mut rng, &pool, 1 + (set * per_set + i) as u16);
            let ifname = probe.view.src_interface.as_deref().or(probe.view.dst_interface.as_deref()).unwrap();
            write_port_zones(&mut ports, slot, &compiled, [(LOOPBACK_IFINDEX, ifname)], &Default::default()).unwrap();
            let expected = evaluate(&rules, &probe.view);
            let dropped = if probe.egress {
                let action = dp.to_port(&probe.frame);
                assert!(action == TC_PASS || action == TC_ACT_SHOT, "TC action {action}");
                action == TC_ACT_SHOT
            } else {
                let action = dp.from_port(&probe.frame);
                assert!(action == XDP_PASS || action == XDP_DROP, "XDP action {action}");
                action == XDP_DROP
            };
            let mut flows: HashMap<&mut MapData, FlowKey, FlowValue> =
                HashMap::try_from(dp.ebpf.map_mut(FLOWS).unwrap()).unwrap();
            let entries: Vec<(FlowKey, FlowValue)> = flows.iter().map(Result::unwrap).collect();
            assert_eq!(entries.len(), 1, "one flow per probe");
            let (key, value) = entries[0];
            flows.remove(&key).unwrap();
            let zone = |id: u16| compiled.zone_ids.name(id).unwrap_or("?").to_owned();
            let src_zone = zone(value.zone[usize::from(value.initiator)]);
            let dst_zone = zone(value.zone[usize::from(value.initiator ^ 1)]);
            let got = (
                Verdict::from_u8(value.verdict).unwrap(),
                Reason::from_u8(value.reason).unwrap(),
                value.policy_id,
                src_zone,
                dst_zone,
            );
            let want = (
                expected.verdict,
                expected.reason,
                expected.policy_id,
                expected.src_zone.clone(),
                expected.dst_zone.clone(),
            );
            assert_eq!(
                got, want,
                "rule set {set}, packet {i} (seed {seed:#x}): kernel vs evaluator\npacket: {:?}\nrules:\n{text}",
                probe.view
            );
            assert_eq!(dropped, expected.verdict == Verdict::Denied, "drop iff denied");
            outcomes.insert((expected.verdict as u8, expected.reason as u8));
            judged += 1;
        }
    }
    eprintln!("{judged} packets judged alike under {rule_sets} rule sets; outcomes seen: {outcomes:?}");
    // The generator must reach every verdict and the main reasons, or the test proves little.
    for needed in [
        (Verdict::Allowed, Reason::PolicyAllow),
        (Verdict::Denied, Reason::PolicyNoMatch),
        (Verdict::Audit, Reason::PolicyNoMatch),
        (Verdict::Denied, Reason::DefaultInterZone),
        (Verdict::Allowed, Reason::DefaultInterZone),
        (Verdict::Allowed, Reason::IntraZone),
        (Verdict::Denied, Reason::IntraZone),
    ] {
        assert!(outcomes.contains(&(needed.0 as u8, needed.1 as u8)), "no packet ended {needed:?}");
    }
}
