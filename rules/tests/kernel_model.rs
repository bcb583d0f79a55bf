//! Differential test of the compiler: a model of the data path's `judge()` that reads
//! only the compiled table entries (exact-match hashes and longest-prefix tries, as
//! the kernel does) must decide every packet as the reference evaluator decides it
//! from the rule set, for many random rule sets.

use std::{fmt::Write as _, net::IpAddr, path::Path};

use backplane_common::{
    Verdict,
    flow::{FAMILY_IPV4, FAMILY_IPV6},
    policy::{MODE_AUDIT, POLICY_ID_DEFAULT_INTER_ZONE, POLICY_ID_INTRA_ZONE, POLICY_KEY_BITS, ZONE_WORLD},
    reason::Reason,
};
use backplane_rules::{CompiledRules, MacAddr, PAIR_MARKER_PROTO, PacketView, ZoneIds, compile, evaluate, parse_rules};

/// What `judge()` returns.
#[derive(Debug, PartialEq, Eq)]
struct Judgement {
    verdict: Verdict,
    reason: Reason,
    policy_id: u32,
    src_zone: u16,
    dst_zone: u16,
}

/// Longest-prefix match of `bits` of `key` against entries (prefix length, key bytes).
fn lpm<'a, T>(entries: impl Iterator<Item = (u32, Vec<u8>, &'a T)>, key: &[u8], bits: u32) -> Option<&'a T> {
    let prefix_eq = |a: &[u8], n: u32| (0..n).all(|i| bit(a, i) == bit(key, i));
    entries.filter(|(len, k, _)| *len <= bits && prefix_eq(k, *len)).max_by_key(|(len, _, _)| *len).map(|(_, _, v)| v)
}

fn bit(bytes: &[u8], i: u32) -> bool {
    bytes[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
}

/// The data path's zone resolution over the tables: `ENDPOINTS`, `ZONE_CIDRS`, port zone.
fn resolve(c: &CompiledRules, mac: MacAddr, ip: IpAddr, port_zone: u16) -> u16 {
    if let Some(e) = c.endpoints.iter().find(|e| e.key(0).mac == mac.0) {
        return e.value.zone;
    }
    let (family, addr, bits) = match ip {
        IpAddr::V4(a) => {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&a.octets());
            (FAMILY_IPV4, addr, 32)
        }
        IpAddr::V6(a) => (FAMILY_IPV6, a.octets(), 128),
    };
    let key = [&[0, family, 0, 0][..], &addr].concat();
    let entries = c.cidrs.iter().map(|e| {
        let (len, k) = e.key(0);
        (len, [&[k.slot, k.family, 0, 0][..], &k.addr].concat(), &e.zone)
    });
    if let Some(zone) = lpm(entries, &key, 32 + bits) {
        return u16::try_from(*zone).unwrap();
    }
    if port_zone != 0 {
        return port_zone;
    }
    ZONE_WORLD
}

/// `judge()` with an enforcing configuration, over the compiled entries.
fn judge(c: &CompiledRules, p: &PacketView) -> Judgement {
    let port_zone = |ifname: &Option<String>| ifname.as_deref().and_then(|i| c.zone_for_interface(i)).unwrap_or(0);
    let src_zone = resolve(c, p.src_mac, p.src_ip, port_zone(&p.src_interface));
    let dst_zone = resolve(c, p.dst_mac, p.dst_ip, port_zone(&p.dst_interface));
    let mut j =
        Judgement { verdict: Verdict::Denied, reason: Reason::DefaultInterZone, policy_id: 0, src_zone, dst_zone };
    if src_zone == dst_zone {
        let intra = c.zones.iter().find(|z| z.zone == src_zone).map_or(Verdict::Allowed as u8, |z| z.value.intra_zone);
        j.verdict = if intra == Verdict::Denied as u8 { Verdict::Denied } else { Verdict::Allowed };
        j.reason = Reason::IntraZone;
        j.policy_id = POLICY_ID_INTRA_ZONE;
        return j;
    }
    // Allow entries and pair markers share one trie, as in the kernel.
    let trie = || {
        c.policies.iter().chain(&c.pair_markers).map(|e| {
            let (len, k) = e.key(0);
            (len, [&[k.slot, k.proto][..], &k.src_zone, &k.dst_zone, &k.port].concat(), &e.value)
        })
    };
    let key = |proto: u8, port: u16| {
        [&[0, proto][..], &src_zone.to_be_bytes(), &dst_zone.to_be_bytes(), &port.to_be_bytes()].concat()
    };
    if p.proto == PAIR_MARKER_PROTO {
        // The kernel skips the allow lookup for the marker's reserved protocol.
    } else if let Some(v) = lpm(trie(), &key(p.proto, p.dport), POLICY_KEY_BITS) {
        j.verdict = Verdict::Allowed;
        j.reason = Reason::PolicyAllow;
        j.policy_id = v.policy_id;
        return j;
    }
    if let Some(v) = lpm(trie(), &key(PAIR_MARKER_PROTO, 0), 48) {
        j.verdict = if v.mode == MODE_AUDIT { Verdict::Audit } else { Verdict::Denied };
        j.reason = Reason::PolicyNoMatch;
        j.policy_id = v.policy_id;
        return j;
    }
    j.verdict = if c.default_inter_zone == Verdict::Allowed as u8 { Verdict::Allowed } else { Verdict::Denied };
    j.policy_id = POLICY_ID_DEFAULT_INTER_ZONE;
    j
}

/// splitmix64.
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

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[usize::try_from(self.below(items.len() as u64)).unwrap()]
    }
}

/// A random but valid rule set, and the addresses, MACs and port names worth probing.
struct Generated {
    yaml: String,
    ips: Vec<IpAddr>,
    macs: Vec<MacAddr>,
    ifnames: Vec<Option<String>>,
}

fn generate(rng: &mut Rng) -> Generated {
    let zones = 2 + rng.below(4);
    let mut yaml = String::from("zones:\n");
    let mut ips: Vec<IpAddr> = vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
    let mut macs = vec![MacAddr([2, 0, 0, 0, 0, 1])];
    let mut ifnames = vec![None, None, Some("eth9".to_owned())];
    let mut names = vec!["world".to_owned()];
    for z in 0..zones {
        let name = format!("z{z}");
        writeln!(yaml, "  {name}:\n    members:").unwrap();
        writeln!(yaml, "      - cidr: 10.{z}.0.0/16").unwrap();
        ips.push(format!("10.{z}.9.9").parse().unwrap());
        if rng.chance(50) {
            writeln!(yaml, "      - cidr: 10.{z}.1.0/24").unwrap();
            ips.push(format!("10.{z}.1.7").parse().unwrap());
        }
        if rng.chance(50) {
            writeln!(yaml, "      - cidr: \"fd00:{z}::/32\"").unwrap();
            ips.push(format!("fd00:{z}::7").parse().unwrap());
        }
        if rng.chance(60) {
            let mac = MacAddr([0x52, 0x54, 0, 0, u8::try_from(z).unwrap(), 1]);
            writeln!(yaml, "      - mac: \"{mac}\"").unwrap();
            macs.push(mac);
        }
        if rng.chance(60) {
            writeln!(yaml, "      - interface: \"tap-{name}-*\"").unwrap();
            ifnames.push(Some(format!("tap-{name}-3")));
        }
        if rng.chance(30) {
            writeln!(yaml, "    intra_zone: deny").unwrap();
        }
        names.push(name);
    }
    if rng.chance(30) {
        writeln!(yaml, "  world:\n    intra_zone: deny").unwrap();
    }
    yaml.push_str("policies:\n");
    let port_pool = ["22", "80", "\"1-100\"", "\"50-150\"", "\"64-127\"", "\"120-200\"", "150", "\"1-65535\""];
    for p in 0..rng.below(10) {
        let from = rng.pick(&names).clone();
        let to = loop {
            let to = rng.pick(&names);
            if *to != from {
                break to.clone();
            }
        };
        writeln!(yaml, "  - name: p{p}\n    from: {from}\n    to: {to}\n    allow:").unwrap();
        for _ in 0..rng.below(4) {
            let proto = *rng.pick(&["tcp", "udp", "icmp", "47"]);
            if matches!(proto, "tcp" | "udp") && rng.chance(75) {
                let ports: Vec<&str> = (0..=rng.below(3)).map(|_| *rng.pick(&port_pool)).collect();
                writeln!(yaml, "      - {{ proto: {proto}, ports: [{}] }}", ports.join(", ")).unwrap();
            } else {
                writeln!(yaml, "      - {{ proto: {proto} }}").unwrap();
            }
        }
        if yaml.ends_with("allow:\n") {
            yaml.truncate(yaml.len() - 1);
            yaml.push_str(" []\n");
        }
        if rng.chance(40) {
            yaml.push_str("    mode: audit\n");
        }
    }
    if rng.chance(40) {
        yaml.push_str("default_inter_zone: allow\n");
    }
    Generated { yaml, ips, macs, ifnames }
}

#[test]
fn compiled_tables_decide_as_the_evaluator() {
    let mut rng = Rng(0xb4c6_91a2);
    let mut ids = ZoneIds::new();
    let mut seen = std::collections::HashSet::new();
    for round in 0..300 {
        let g = generate(&mut rng);
        let rules =
            parse_rules([(Path::new("gen.yaml"), g.yaml.as_str())]).unwrap_or_else(|e| panic!("{e:#?}\n{}", g.yaml));
        // Compile against the ids of the previous round, as an agent reloading does.
        let compiled = compile(&rules, &ids);
        ids = compiled.zone_ids.clone();
        for _ in 0..300 {
            let src_ip = *rng.pick(&g.ips);
            // Same family at both ends.
            let dst_ip = loop {
                let ip = *rng.pick(&g.ips);
                if ip.is_ipv4() == src_ip.is_ipv4() {
                    break ip;
                }
            };
            let (src_interface, dst_interface) = if rng.chance(50) {
                (rng.pick(&g.ifnames).clone(), None)
            } else {
                (None, rng.pick(&g.ifnames).clone())
            };
            let p = PacketView {
                src_mac: *rng.pick(&g.macs),
                dst_mac: *rng.pick(&g.macs),
                src_ip,
                dst_ip,
                proto: *rng.pick(&[6, 17, 1, 47, 50]),
                dport: u16::try_from(rng.below(210)).unwrap(),
                src_interface,
                dst_interface,
                src_port: None,
                dst_port: None,
            };
            let want = evaluate(&rules, &p);
            let got = judge(&compiled, &p);
            let zone = |id| compiled.zone_ids.name(id).unwrap().to_owned();
            assert_eq!(
                (got.verdict, got.reason, got.policy_id, zone(got.src_zone), zone(got.dst_zone)),
                (want.verdict, want.reason, want.policy_id, want.src_zone.clone(), want.dst_zone.clone()),
                "round {round}: {p:?}\n{}",
                g.yaml
            );
            seen.insert((want.verdict as u8, want.reason as u8));
        }
    }
    // Every outcome of judge() was exercised.
    for (v, r) in [
        (Verdict::Allowed, Reason::IntraZone),
        (Verdict::Denied, Reason::IntraZone),
        (Verdict::Allowed, Reason::PolicyAllow),
        (Verdict::Denied, Reason::PolicyNoMatch),
        (Verdict::Audit, Reason::PolicyNoMatch),
        (Verdict::Allowed, Reason::DefaultInterZone),
        (Verdict::Denied, Reason::DefaultInterZone),
    ] {
        assert!(seen.contains(&(v as u8, r as u8)), "never saw {v:?}/{r:?}");
    }
}

/// A packet of IP protocol 255 between two zones a policy covers: the rules cannot
/// allow protocol 255, so the evaluator denies it; the data path's full-key lookup
/// finds the pair marker (protocol 255, prefix 48) and allows it. Kept as a known
/// divergence until `judge()` skips the full-key lookup for protocol 255.
#[test]
fn reserved_protocol_255() {
    let rules = parse_rules([(
        Path::new("r.yaml"),
        "zones:\n  a:\n    members: [ { cidr: 10.1.0.0/16 } ]\npolicies:\n  - { name: p, from: a, to: world, allow: [] }\n",
    )])
    .unwrap();
    let c = compile(&rules, &ZoneIds::new());
    let p = PacketView {
        src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
        src_ip: "10.1.0.1".parse().unwrap(),
        dst_ip: "192.0.2.1".parse().unwrap(),
        proto: 255,
        dport: 0,
        src_interface: None,
        dst_interface: None,
        src_port: None,
        dst_port: None,
    };
    assert_eq!(evaluate(&rules, &p).verdict, Verdict::Denied);
    assert_eq!(judge(&c, &p).verdict, Verdict::Denied, "the marker's reserved protocol must not be allowed");
}
