//! `on_rules_failure`: the setting, its errors, and the rule set put in force from the
//! last good copy when the rules fail to load at start.

use std::{net::IpAddr, path::Path};

use backplane_common::{Verdict, reason::Reason};
use backplane_rules::{
    FAILURE_POLICY_PREFIX, MacAddr, OnRulesFailure, PacketView, RuleSet, ZoneIds, compile, evaluate, parse_rules,
};

const RULES: &str = r"
zones:
  web:
    members: [ { cidr: 10.30.0.0/24 } ]
    on_rules_failure: closed
  db:
    members: [ { cidr: 10.40.0.0/24 } ]
    intra_zone: deny
    on_rules_failure: open
  mgmt:
    members: [ { cidr: 10.50.0.0/24 } ]
    on_rules_failure: open
  cache:
    members: [ { cidr: 10.60.0.0/24 } ]
policies:
  - { name: web-to-db, from: web, to: db, allow: [ { proto: tcp, ports: [5432] } ] }
";

fn rules(text: &str) -> RuleSet {
    parse_rules([(Path::new("inline.yaml"), text)]).unwrap_or_else(|e| panic!("{e:#?}"))
}

fn packet(src: &str, dst: &str, proto: u8, dport: u16) -> PacketView {
    let mac = |s: &str| s.parse::<MacAddr>().unwrap();
    PacketView {
        src_mac: mac("02:00:00:00:00:01"),
        dst_mac: mac("02:00:00:00:00:02"),
        src_ip: src.parse::<IpAddr>().unwrap(),
        dst_ip: dst.parse::<IpAddr>().unwrap(),
        proto,
        dport,
        src_interface: None,
        dst_interface: None,
        src_port: None,
        dst_port: None,
    }
}

#[test]
fn the_setting_is_read_and_defaults_to_closed() {
    let r = rules(RULES);
    assert_eq!(r.on_rules_failure("web"), OnRulesFailure::Closed);
    assert_eq!(r.on_rules_failure("db"), OnRulesFailure::Open);
    assert_eq!(r.on_rules_failure("cache"), OnRulesFailure::Closed, "closed unless said otherwise");
    assert_eq!(r.on_rules_failure("world"), OnRulesFailure::Closed);
    let open_world = rules("zones:\n  world:\n    on_rules_failure: open\n");
    assert_eq!(open_world.on_rules_failure("world"), OnRulesFailure::Open);
}

#[test]
fn a_bad_value_is_an_error_at_its_place() {
    let errors = parse_rules([(Path::new("z.yaml"), "zones:\n  web:\n    on_rules_failure: ajar\n")]).unwrap_err();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(text, ["z.yaml:3:23: expected closed or open for on_rules_failure, found \"ajar\""], "{text:?}");
}

#[test]
fn closed_zones_are_denied_everything_and_open_zones_pass_among_themselves() {
    let failure = rules(RULES).failure_rules();
    let verdict = |src: &str, dst: &str, proto: u8, dport: u16| {
        let d = evaluate(&failure, &packet(src, dst, proto, dport));
        (d.verdict, d.reason)
    };
    let denied_by_policy = (Verdict::Denied, Reason::PolicyNoMatch);
    // web is closed: even what its policy allowed is denied now, both ways and within.
    assert_eq!(verdict("10.30.0.1", "10.40.0.1", 6, 5432), denied_by_policy);
    assert_eq!(verdict("10.40.0.1", "10.30.0.1", 6, 80), denied_by_policy);
    assert_eq!(verdict("10.30.0.1", "10.30.0.2", 1, 7), (Verdict::Denied, Reason::IntraZone));
    // db and mgmt are open: anything passes between them, and within db (its intra_zone
    // deny is a policy, not in force while failing).
    assert_eq!(verdict("10.50.0.1", "10.40.0.1", 6, 9999), (Verdict::Allowed, Reason::DefaultInterZone));
    assert_eq!(verdict("10.40.0.1", "10.50.0.1", 17, 53), (Verdict::Allowed, Reason::DefaultInterZone));
    assert_eq!(verdict("10.40.0.1", "10.40.0.2", 6, 22), (Verdict::Allowed, Reason::IntraZone));
    // An open zone and a closed one: closed wins. world is closed by default.
    assert_eq!(verdict("10.50.0.1", "10.60.0.1", 6, 22), denied_by_policy);
    assert_eq!(verdict("192.0.2.1", "10.40.0.1", 6, 5432), denied_by_policy);
    assert_eq!(verdict("10.40.0.1", "192.0.2.1", 6, 443), denied_by_policy);
    let d = evaluate(&failure, &packet("10.30.0.1", "10.40.0.1", 6, 5432));
    assert_eq!(d.policy_name.as_deref(), Some("on_rules_failure:web->db"));
    assert!(failure.policies.iter().all(|p| p.name.starts_with(FAILURE_POLICY_PREFIX) && p.allow.is_empty()));
    // It compiles into tables like any rule set.
    let compiled = compile(&failure, &ZoneIds::new());
    assert!(!compiled.policies.is_empty() || !compiled.pair_markers.is_empty());
}

#[test]
fn an_open_world_passes_with_open_zones() {
    let r = rules(
        "zones:\n  world:\n    on_rules_failure: open\n  db:\n    members: [ { cidr: 10.40.0.0/24 } ]\n    on_rules_failure: open\n",
    );
    let failure = r.failure_rules();
    let d = evaluate(&failure, &packet("192.0.2.1", "10.40.0.1", 6, 5432));
    assert_eq!(d.verdict, Verdict::Allowed);
    assert!(failure.policies.is_empty());
}
