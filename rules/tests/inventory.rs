//! The endpoint inventory, zone endpoint settings and virtual patches: what they
//! compile to, and every problem reported at its file, line and column.

use std::{collections::BTreeMap, path::Path};

use backplane_common::policy::{
    ENDPOINT_ADDRS_FIXED, ENDPOINT_PATCHED, VPATCH_KEY_BITS, VPATCH_KEY_PROTO_BITS, ZONE_REMEDIATION,
};
use backplane_rules::{
    MacAddr, OnViolation, PacketView, RuleSet, UnknownMacs, ZoneIds, compile, evaluate, load_rules, parse_rules,
};

fn inline(text: &str) -> RuleSet {
    parse_rules([(Path::new("r.yaml"), text)]).unwrap_or_else(|e| panic!("{e:#?}"))
}

fn errors(text: &str) -> Vec<String> {
    match parse_rules([(Path::new("r.yaml"), text)]) {
        Ok(_) => panic!("rule set unexpectedly valid"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

const ZONES: &str =
    "zones:\n  web:\n    members: [ { cidr: 10.30.0.0/24 } ]\n  db:\n    members: [ { cidr: 10.40.0.0/24 } ]\n";

#[test]
fn the_inventory_example_compiles() {
    let rules = load_rules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inventory"))
        .unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(rules.endpoints.len(), 2);
    let db = rules.endpoint("db-1").unwrap();
    assert_eq!(db.mac.to_string(), "52:54:00:40:00:01");
    assert_eq!(db.patched_at.unwrap().to_string(), "2099-01-01");
    let web = rules.endpoint("web-1").unwrap();
    assert_eq!(rules.endpoint_zone(web), Some("web"), "by its address");
    let zone = rules.zone("db").unwrap();
    assert_eq!(zone.endpoints.max_patch_age.unwrap().days, 30);
    assert_eq!(zone.endpoints.on_violation, OnViolation::Isolate);
    assert_eq!(zone.endpoints.must_not_share_node_with, vec!["dmz".to_owned()]);
    let eu: BTreeMap<String, String> = [("jurisdiction".to_owned(), "eu".to_owned())].into_iter().collect();
    assert!(zone.endpoints.placement_violations(&eu).is_empty());
    assert_eq!(rules.unknown_macs("db"), UnknownMacs::Quarantine, "a zone with inventory endpoints");
    assert_eq!(rules.unknown_macs("dmz"), UnknownMacs::Allow);

    let c = compile(&rules, &ZoneIds::new());
    let remediation = c.zone_ids.id("remediation").unwrap();
    // Only the remediation zone says so (the other flags: `binding`, `cidr` members).
    let flags: Vec<(u16, u8)> =
        c.zones.iter().map(|z| (z.zone, z.value.flags & ZONE_REMEDIATION)).filter(|(_, f)| *f != 0).collect();
    assert_eq!(flags, vec![(remediation, ZONE_REMEDIATION)]);
    // Endpoints: web-1 (patched by its tag), db-1; ids from 1.
    let web_entry = c.endpoint(MacAddr([0x52, 0x54, 0, 0x30, 0, 1])).unwrap();
    assert_eq!(web_entry.value.zone, c.zone_ids.id("web").unwrap());
    // Patched by its tag; its inventory `ips` are the only ones it may send from.
    assert_eq!(web_entry.value.flags, ENDPOINT_PATCHED | ENDPOINT_ADDRS_FIXED);
    let db_entry = c.endpoint(MacAddr([0x52, 0x54, 0, 0x40, 0, 1])).unwrap();
    assert_eq!((db_entry.value.zone, db_entry.value.flags), (c.zone_ids.id("db").unwrap(), ENDPOINT_ADDRS_FIXED));
    assert_ne!(web_entry.value.endpoint_id, db_entry.value.endpoint_id);
    // 445 and 137-139 (137/16, 138/15) for web-1 only.
    let mut v: Vec<(u32, u8, u16, u32, u32)> =
        c.vpatches.iter().map(|e| (e.endpoint_id, e.proto, e.port, e.prefix_len, e.patch_id)).collect();
    v.sort_unstable();
    let id = web_entry.value.endpoint_id;
    assert_eq!(
        v,
        vec![(id, 6, 137, VPATCH_KEY_BITS, 0), (id, 6, 138, VPATCH_KEY_BITS - 1, 0), (id, 6, 445, VPATCH_KEY_BITS, 0)]
    );
    let (bits, key) = c.vpatches[0].key(1);
    assert_eq!((bits, key.slot, key.endpoint_id), (c.vpatches[0].prefix_len, 1, id.to_be_bytes()));
    assert_eq!(c.patch_name(0), Some("cve-smb-ghost"));
    // The same patches for a runtime endpoint carrying the tag.
    let runtime = c.vpatch_entries(900, &["smb".to_owned()]);
    assert_eq!(runtime.len(), 3);
    assert!(runtime.iter().all(|e| e.endpoint_id == 900));
    assert!(c.vpatch_entries(900, &["other".to_owned()]).is_empty());
}

#[test]
fn a_whole_protocol_patch_and_the_evaluator_places_endpoints_by_mac() {
    let rules = inline(&format!(
        "{ZONES}endpoints:\n  db-9:\n    mac: \"52:54:00:00:00:09\"\n    zone: db\n    tags: [legacy]\n\
         virtual_patches:\n  - {{ name: no-udp, tag: legacy, deny: [ {{ proto: udp }} ] }}\n"
    ));
    let c = compile(&rules, &ZoneIds::new());
    assert_eq!(c.vpatches.len(), 1);
    assert_eq!((c.vpatches[0].proto, c.vpatches[0].prefix_len), (17, VPATCH_KEY_PROTO_BITS));
    // Its MAC places it in db whatever its address.
    let packet = PacketView {
        src_mac: "52:54:00:00:00:09".parse().unwrap(),
        dst_mac: "52:54:00:00:00:01".parse().unwrap(),
        src_ip: "10.30.0.7".parse().unwrap(),
        dst_ip: "10.30.0.8".parse().unwrap(),
        proto: 6,
        dport: 80,
        src_interface: None,
        dst_interface: None,
        src_port: None,
        dst_port: None,
    };
    let d = evaluate(&rules, &packet);
    assert_eq!((d.src_zone.as_str(), d.dst_zone.as_str()), ("db", "web"));
}

#[test]
fn an_endpoint_takes_the_zone_of_its_mac_member() {
    let rules = inline(
        "zones:\n  web:\n    members: [ { mac: \"52:54:00:00:00:01\" } ]\nendpoints:\n  w:\n    mac: \"52:54:00:00:00:01\"\n    tags: [t]\n\
         virtual_patches:\n  - { name: p, tag: t, deny: [ { proto: icmp } ] }\n",
    );
    assert_eq!(rules.endpoint_zone(&rules.endpoints[0]), Some("web"));
    let c = compile(&rules, &ZoneIds::new());
    assert_eq!(c.endpoints.len(), 1, "one entry for the member and the endpoint");
    assert_eq!(c.endpoints[0].value.flags, ENDPOINT_PATCHED);
}

#[test]
fn inventory_errors_have_places() {
    let text = "\
zones:
  web:
    members: [ { mac: \"52:54:00:00:00:01\" } ]
    max_patch_age: 30
    remediation: yes
    on_violation: shout
    placement: { jurisdiction: [] }
    must_not_share_node_with: [nowhere, web]
    unknown_macs: maybe
endpoints:
  a:
    mac: \"52:54:00:00:00:01\"
    zone: db
    patched_at: 2024-02-30
    ips: [10.1.2.3.4]
  b:
    mac: \"52:54:00:00:00:01\"
  c:
    ips: [10.0.0.1]
  a:
    mac: \"52:54:00:00:00:02\"
virtual_patches:
  - { name: p, tag: t, deny: [ { proto: icmp, ports: [1] } ] }
  - { name: p, tag: \"bad tag\", deny: [] }
";
    let e = errors(text);
    let expect = [
        ("r.yaml:4:20:", "is not a duration"),
        ("r.yaml:5:18:", "expected true or false for remediation"),
        ("r.yaml:6:19:", "expected alert or isolate"),
        ("r.yaml:7:32:", "allows no value"),
        ("r.yaml:8:32:", "unknown zone \"nowhere\" in must_not_share_node_with"),
        ("r.yaml:8:41:", "cannot keep away from itself"),
        ("r.yaml:9:19:", "expected quarantine or allow"),
        ("r.yaml:13:11:", "unknown zone \"db\" for endpoint \"a\""),
        ("r.yaml:14:17:", "is not a day of the calendar"),
        ("r.yaml:15:11:", "is not an IP address"),
        ("r.yaml:16:3:", "MAC 52:54:00:00:00:01 of endpoint \"b\" is already endpoint \"a\"'s (r.yaml:11:3)"),
        ("r.yaml:19:5:", "missing field \"mac\" in endpoint \"c\""),
        ("r.yaml:20:3:", "endpoint \"a\" is defined twice"),
        ("r.yaml:23:47:", "icmp has no ports; remove ports (an entry without ports denies all icmp)"),
        ("r.yaml:24:13:", "virtual patch \"p\" is defined twice"),
        ("r.yaml:24:21:", "\"bad tag\" is not a valid tag"),
        ("r.yaml:24:38:", "denies something"),
    ];
    for (at, needle) in expect {
        assert!(e.iter().any(|l| l.starts_with(at) && l.contains(needle)), "no error {at} {needle:?} in {e:#?}");
    }
    assert_eq!(e.len(), expect.len(), "{e:#?}");
}

#[test]
fn an_endpoint_zone_must_agree_with_a_mac_member() {
    let e = errors(&format!(
        "{ZONES}  mgmt:\n    members: [ {{ mac: \"52:54:00:00:00:01\" }} ]\nendpoints:\n  x:\n    mac: \"52:54:00:00:00:01\"\n    zone: web\n"
    ));
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(e[0].starts_with("r.yaml:11:11:") && e[0].contains("is a member of zone \"mgmt\""), "{e:#?}");
}

#[test]
fn an_address_belongs_to_one_endpoint() {
    let e = errors(&format!(
        "{ZONES}endpoints:\n  x:\n    mac: \"52:54:00:00:00:01\"\n    ips: [10.30.0.5, \"fd00::5\"]\n  \
         y:\n    mac: \"52:54:00:00:00:02\"\n    ips: [10.30.0.6, \"fd00::5\"]\n"
    ));
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].starts_with("r.yaml:12:22:")
            && e[0].contains("address fd00::5 of endpoint \"y\" is already endpoint \"x\"'s (r.yaml:7:3)"),
        "{e:#?}"
    );
}

#[test]
fn allowed_macs_and_addresses_load_and_are_nobody_elses() {
    let r = inline(&format!(
        "{ZONES}endpoints:\n  lb-1:\n    mac: \"52:54:00:30:00:01\"\n    ips: [10.30.0.5]\n    \
         allowed_macs: [\"00:00:5e:00:01:0a\"]\n    allowed_addresses: [10.30.0.100, \"fd00:30::100\"]\n"
    ));
    let e = &r.endpoints[0];
    assert_eq!(e.allowed_macs, vec!["00:00:5e:00:01:0a".parse::<MacAddr>().unwrap()]);
    assert_eq!(
        e.allowed_addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.30.0.100", "fd00:30::100"]
    );
    let e = errors(&format!(
        "{ZONES}infrastructure:\n  gw: {{ mac: \"02:00:00:00:55:01\", ips: [10.30.0.1] }}\nendpoints:\n  \
         x:\n    mac: \"52:54:00:00:00:01\"\n    ips: [10.30.0.5]\n  \
         y:\n    mac: \"52:54:00:00:00:02\"\n    \
         allowed_macs: [\"52:54:00:00:00:01\", \"02:00:00:00:55:01\", \"01:00:5e:00:00:01\", \"02:00:00:00:00:07\", \"02:00:00:00:00:07\"]\n    \
         allowed_addresses: [10.30.0.5, 10.30.0.1, 10.30.0.9, 10.30.0.9, nonsense]\n"
    ));
    let has = |needle: &str| e.iter().any(|m| m.contains(needle));
    assert!(has("01:00:5e:00:00:01 is not a unicast MAC"), "{e:#?}");
    assert!(has("MAC 02:00:00:00:00:07 is listed twice for endpoint \"y\""), "{e:#?}");
    assert!(has("address 10.30.0.9 is listed twice for endpoint \"y\""), "{e:#?}");
    assert!(has("\"nonsense\" is not an IP address"), "{e:#?}");
    assert!(has("allowed_macs of endpoint \"y\": 52:54:00:00:00:01 is endpoint \"x\"'s"), "{e:#?}");
    assert!(has("allowed_macs of endpoint \"y\": 02:00:00:00:55:01 is infrastructure \"gw\"'s"), "{e:#?}");
    assert!(has("allowed_addresses of endpoint \"y\": 10.30.0.5 is endpoint \"x\"'s"), "{e:#?}");
    assert!(has("allowed_addresses of endpoint \"y\": 10.30.0.1 is infrastructure \"gw\"'s"), "{e:#?}");
    assert_eq!(e.len(), 8, "{e:#?}");
    assert!(e.iter().all(|m| m.starts_with("r.yaml:")), "every error has its place: {e:#?}");
}
