//! The compiler: zone ids, table entries of the examples, port prefixes, several
//! policies per pair, interface globs.

use std::path::Path;

use backplane_common::{
    Verdict,
    flow::{FAMILY_IPV4, FAMILY_IPV6},
    policy::{
        MODE_AUDIT, MODE_ENFORCE, POLICY_ID_DEFAULT_INTER_ZONE, POLICY_ID_INTRA_ZONE, POLICY_KEY_PROTO_BITS,
        PolicyValue,
    },
};
use backplane_rules::{
    CompiledRules, PAIR_MARKER_PROTO, PolicyEntry, RuleSet, ZoneIds, compile, load_rules, parse_rules,
};

fn example(name: &str) -> RuleSet {
    load_rules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)).unwrap_or_else(|e| panic!("{e:#?}"))
}

fn inline(text: &str) -> RuleSet {
    parse_rules([(Path::new("inline.yaml"), text)]).unwrap_or_else(|e| panic!("{e:#?}"))
}

/// (port, full-key prefix length, policy id, mode) of the entries of one protocol and pair.
fn entries(c: &CompiledRules, proto: u8, src: &str, dst: &str) -> Vec<(u16, u32, u32, u8)> {
    let (s, d) = (c.zone_ids.id(src).unwrap(), c.zone_ids.id(dst).unwrap());
    c.policies
        .iter()
        .filter(|e| e.proto == proto && e.src_zone == s && e.dst_zone == d)
        .map(|e| (e.port, e.prefix_len, e.value.policy_id, e.value.mode))
        .collect()
}

#[test]
fn three_zones_tables() {
    let c = compile(&example("three-zones"), &ZoneIds::new());
    let ids: Vec<(&str, u16)> = c.zone_ids.iter().collect();
    assert_eq!(ids, vec![("db", 2), ("mgmt", 3), ("web", 1), ("world", 0)]);

    let zones: Vec<(u16, u8)> = c.zones.iter().map(|z| (z.zone, z.value.intra_zone)).collect();
    assert_eq!(zones, vec![(1, Verdict::Allowed as u8), (2, Verdict::Denied as u8), (3, Verdict::Allowed as u8)]);
    assert_eq!(c.zones[1].key(1).zone, 2);

    assert_eq!(c.cidrs.len(), 6);
    let web4 = c.cidrs[0];
    assert_eq!((web4.family, web4.prefix_len, web4.zone), (FAMILY_IPV4, 24, 1));
    assert_eq!(web4.addr[..4], [10, 30, 0, 0]);
    assert!(web4.addr[4..].iter().all(|b| *b == 0));
    let (bits, key) = web4.key(1);
    assert_eq!((bits, key.slot, key.family), (32 + 24, 1, FAMILY_IPV4));
    let web6 = c.cidrs[1];
    assert_eq!((web6.family, web6.prefix_len, web6.zone), (FAMILY_IPV6, 64, 1));
    assert_eq!(web6.addr[..4], [0xfd, 0, 0, 0x30]);
    assert_eq!(web6.key(0).0, 32 + 64);

    assert!(c.endpoints.is_empty() && c.interfaces.is_empty());
    assert_eq!(c.default_inter_zone, Verdict::Denied as u8);

    // web-to-db: tcp 5432 exactly, all of icmp and icmpv6.
    assert_eq!(entries(&c, 6, "web", "db"), vec![(5432, 64, 0, MODE_ENFORCE)]);
    assert_eq!(entries(&c, 1, "web", "db"), vec![(0, 48, 0, MODE_ENFORCE)]);
    assert_eq!(entries(&c, 58, "web", "db"), vec![(0, 48, 0, MODE_ENFORCE)]);
    // mgmt-to-web: 22 and 9100-9110 as aligned prefixes.
    assert_eq!(
        entries(&c, 6, "mgmt", "web"),
        vec![
            (22, 64, 1, MODE_ENFORCE),
            (9100, 62, 1, MODE_ENFORCE),
            (9104, 62, 1, MODE_ENFORCE),
            (9108, 63, 1, MODE_ENFORCE),
            (9110, 64, 1, MODE_ENFORCE)
        ]
    );
    let e = c.policies.iter().find(|e| e.port == 9108).unwrap();
    let (bits, key) = e.key(1);
    assert_eq!(
        (bits, key.slot, key.proto, key.src_zone, key.dst_zone, key.port),
        (63, 1, 6, [0, 3], [0, 1], 9108u16.to_be_bytes())
    );
    assert_eq!(e.ports(), (9108, 9109));

    // One marker per covered pair; web-to-mgmt is audit with nothing allowed.
    let markers: Vec<(u16, u16, u32, u8)> =
        c.pair_markers.iter().map(|m| (m.src_zone, m.dst_zone, m.value.policy_id, m.value.mode)).collect();
    assert_eq!(
        markers,
        vec![
            (0, 1, 3, MODE_ENFORCE),
            (1, 2, 0, MODE_ENFORCE),
            (1, 3, 4, MODE_AUDIT),
            (3, 1, 1, MODE_ENFORCE),
            (3, 2, 2, MODE_ENFORCE)
        ]
    );
    assert!(
        c.pair_markers
            .iter()
            .all(|m| m.proto == PAIR_MARKER_PROTO && m.port == 0 && m.prefix_len == POLICY_KEY_PROTO_BITS)
    );
    assert!(entries(&c, 6, "web", "mgmt").is_empty());

    assert_eq!(c.policy_names, vec!["web-to-db", "mgmt-to-web", "mgmt-to-db", "world-to-web", "web-to-mgmt"]);
    assert_eq!(c.policy_name(3), Some("world-to-web"));
    assert_eq!(c.policy_name(POLICY_ID_DEFAULT_INTER_ZONE), Some("default_inter_zone"));
    assert_eq!(c.policy_name(POLICY_ID_INTRA_ZONE), Some("intra_zone"));
    assert_eq!(c.policy_name(99), None);
}

#[test]
fn zone_ids_are_stable_across_reloads() {
    let first = compile(&example("three-zones"), &ZoneIds::new());
    // A new zone written first, mgmt removed: known zones keep their ids, the new one
    // does not take mgmt's.
    let next = inline(
        "zones:\n  cache:\n    members: [ { cidr: 10.60.0.0/24 } ]\n  db:\n    members: [ { cidr: 10.40.0.0/24 } ]\n  web:\n    members: [ { cidr: 10.30.0.0/24 } ]\n",
    );
    let second = compile(&next, &first.zone_ids);
    assert_eq!(second.zone_ids.id("web"), Some(1));
    assert_eq!(second.zone_ids.id("db"), Some(2));
    assert_eq!(second.zone_ids.id("mgmt"), Some(3));
    assert_eq!(second.zone_ids.id("cache"), Some(4));
    assert_eq!(second.zone_ids.name(4), Some("cache"));
    let zones: Vec<u16> = second.zones.iter().map(|z| z.zone).collect();
    assert_eq!(zones, vec![4, 2, 1]);
    // Compiling again against the same ids changes nothing.
    let again = compile(&next, &second.zone_ids);
    assert_eq!(again.zone_ids, second.zone_ids);
}

#[test]
fn zone_ids_round_trip_through_serde() {
    let c = compile(&example("hypervisor"), &ZoneIds::new());
    let json = serde_json::to_string(&c.zone_ids).unwrap();
    assert_eq!(json, r#"{"infra":3,"tenant-a":1,"tenant-b":2,"unassigned":4,"world":0}"#);
    let back: ZoneIds = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c.zone_ids);
    assert!(serde_json::from_str::<ZoneIds>(r#"{"a":1,"b":1}"#).is_err());
    assert!(serde_json::from_str::<ZoneIds>(r#"{"a":0}"#).is_err());
    assert!(serde_json::from_str::<ZoneIds>(r#"{"world":3}"#).is_err());
}

#[test]
fn hypervisor_endpoints_and_interfaces() {
    let c = compile(&example("hypervisor"), &ZoneIds::new());
    let eps: Vec<(String, u16, u32)> =
        c.endpoints.iter().map(|e| (e.mac.to_string(), e.value.zone, e.value.endpoint_id)).collect();
    assert_eq!(
        eps,
        vec![
            ("52:54:00:a0:00:01".into(), 1, 1),
            ("52:54:00:a0:00:02".into(), 1, 2),
            ("52:54:00:b0:00:01".into(), 2, 3)
        ]
    );
    assert_eq!(c.endpoints[2].key(1).mac, [0x52, 0x54, 0, 0xb0, 0, 1]);
    assert!(c.endpoints.iter().all(|e| e.value.flags == 0));
    assert_eq!(c.zone_for_interface("vnet0"), Some(4));
    assert_eq!(c.zone_for_interface("vnet17"), Some(4));
    assert_eq!(c.zone_for_interface("eth0"), None);
    assert_eq!(c.zone_for_interface("xvnet0"), None);
    // 8443-8445: 8443, then 8444-8445.
    assert_eq!(entries(&c, 6, "tenant-a", "tenant-b"), vec![(8443, 64, 2, MODE_AUDIT), (8444, 63, 2, MODE_AUDIT)]);
}

#[test]
fn first_matching_interface_glob_wins() {
    let c = compile(
        &inline(
            "zones:\n  a:\n    members: [ { interface: \"tap-*\" } ]\n  b:\n    members: [ { interface: \"tap-web-*\" }, { interface: \"veth{1,2}\" } ]\n",
        ),
        &ZoneIds::new(),
    );
    assert_eq!(c.zone_for_interface("tap-web-1"), Some(1));
    assert_eq!(c.zone_for_interface("veth2"), Some(2));
    assert_eq!(c.zone_for_interface("veth3"), None);
}

const MULTI: &str = "\
zones:
  a:
    members: [ { cidr: 10.1.0.0/24 } ]
  b:
    members: [ { cidr: 10.2.0.0/24 } ]
policies:
  - name: p0
    from: a
    to: b
    allow: [ { proto: tcp, ports: [\"5000-6000\", 5999] } ]
    mode: audit
  - name: p1
    from: a
    to: b
    allow: [ { proto: tcp, ports: [5432, 7000] }, { proto: udp, ports: [53] }, { proto: tcp } ]
  - name: p2
    from: a
    to: b
    allow: [ { proto: tcp, ports: [\"1-65535\"] } ]
    mode: audit
";

/// The policy id an LPM lookup of the full key finds, as the kernel's trie would.
fn lookup(c: &CompiledRules, proto: u8, src: u16, dst: u16, port: u16) -> Option<&PolicyEntry> {
    c.policies
        .iter()
        .chain(&c.pair_markers)
        .filter(|e| e.proto == proto && e.src_zone == src && e.dst_zone == dst)
        .filter(|e| {
            let (first, last) = e.ports();
            (first..=last).contains(&port)
        })
        .max_by_key(|e| e.prefix_len)
}

#[test]
fn several_policies_for_one_pair_first_wins() {
    let c = compile(&inline(MULTI), &ZoneIds::new());
    for port in 0..=u16::MAX {
        let want = match port {
            5000..=6000 => Some(0),
            _ => Some(1), // p1's whole-tcp entry covers the rest; p2 adds nothing.
        };
        assert_eq!(lookup(&c, 6, 1, 2, port).map(|e| e.value.policy_id), want, "tcp {port}");
        let want = (port == 53).then_some(1);
        assert_eq!(lookup(&c, 17, 1, 2, port).map(|e| e.value.policy_id), want, "udp {port}");
    }
    assert!(c.policies.iter().all(|e| e.value.policy_id != 2), "p2 is shadowed entirely");
    // Entries of one pair and protocol never overlap, so the trie's choice is the
    // first policy's whatever the prefix lengths.
    let tcp: Vec<(u16, u16)> = c.policies.iter().filter(|e| e.proto == 6).map(PolicyEntry::ports).collect();
    let mut sorted = tcp.clone();
    sorted.sort_unstable();
    for w in sorted.windows(2) {
        assert!(w[0].1 < w[1].0, "overlap {w:?}");
    }
    // Not all of the pair's policies audit: the marker enforces, naming p0.
    assert_eq!(c.pair_markers.len(), 1);
    assert_eq!(c.pair_markers[0].value, PolicyValue { policy_id: 0, mode: MODE_ENFORCE, _pad: [0; 3] });
    // Each entry keeps its own policy's mode.
    assert!(c.policies.iter().all(|e| e.value.mode == if e.value.policy_id == 0 { MODE_AUDIT } else { MODE_ENFORCE }));
}

#[test]
fn all_audit_pair_marker_is_audit() {
    let text = MULTI.replace(
        "    allow: [ { proto: tcp, ports: [5432, 7000] }",
        "    mode: audit\n    allow: [ { proto: tcp, ports: [5432, 7000] }",
    );
    let c = compile(&inline(&text), &ZoneIds::new());
    assert_eq!(c.pair_markers[0].value.mode, MODE_AUDIT);
}

#[test]
fn world_intra_zone_and_default_allow() {
    let c = compile(&inline("zones:\n  world:\n    intra_zone: deny\ndefault_inter_zone: allow\n"), &ZoneIds::new());
    assert_eq!(c.zones.len(), 1);
    assert_eq!((c.zones[0].zone, c.zones[0].value.intra_zone), (0, Verdict::Denied as u8));
    assert_eq!(c.default_inter_zone, Verdict::Allowed as u8);
}
