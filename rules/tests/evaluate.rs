//! The reference evaluator: one case for every reason, the order in which an end finds
//! its zone, several policies for one zone pair, and the explanation text.

use std::{net::IpAddr, path::Path};

use backplane_common::{
    Verdict,
    policy::{POLICY_ID_DEFAULT_INTER_ZONE, POLICY_ID_INTRA_ZONE},
    reason::Reason,
};
use backplane_rules::{Decision, MacAddr, PacketView, RuleSet, evaluate, explain, load_rules, parse_rules};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

fn example(name: &str) -> RuleSet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name);
    load_rules(&dir).unwrap_or_else(|e| panic!("{name}: {e:#?}"))
}

fn inline(text: &str) -> RuleSet {
    parse_rules([(Path::new("inline.yaml"), text)]).unwrap_or_else(|e| panic!("{e:#?}"))
}

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

/// A packet between hosts whose MACs no rule names.
fn packet(src: &str, dst: &str, proto: u8, dport: u16) -> PacketView {
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

#[track_caller]
fn check(d: &Decision, verdict: Verdict, reason: Reason, policy: Option<(u32, &str)>, zones: (&str, &str)) {
    assert_eq!((d.verdict, d.reason), (verdict, reason), "{d:?}");
    match policy {
        Some((id, name)) => assert_eq!((d.policy_id, d.policy_name.as_deref()), (id, Some(name)), "{d:?}"),
        None => assert!(d.policy_name.is_none(), "{d:?}"),
    }
    assert_eq!((d.src_zone.as_str(), d.dst_zone.as_str()), zones, "{d:?}");
}

#[test]
fn intra_zone_allow_deny_and_world() {
    let r = example("three-zones");
    let d = evaluate(&r, &packet("10.30.0.1", "10.30.0.2", TCP, 80));
    check(&d, Verdict::Allowed, Reason::IntraZone, None, ("web", "web"));
    assert_eq!(d.policy_id, POLICY_ID_INTRA_ZONE);
    let d = evaluate(&r, &packet("10.40.0.1", "10.40.0.2", TCP, 5432));
    check(&d, Verdict::Denied, Reason::IntraZone, None, ("db", "db"));
    // Two addresses outside every zone: world to world, allowed unless world's
    // intra_zone says otherwise.
    let d = evaluate(&r, &packet("192.0.2.1", "198.51.100.1", UDP, 53));
    check(&d, Verdict::Allowed, Reason::IntraZone, None, ("world", "world"));
    let r = inline("zones:\n  world:\n    intra_zone: deny\n");
    let d = evaluate(&r, &packet("192.0.2.1", "198.51.100.1", UDP, 53));
    check(&d, Verdict::Denied, Reason::IntraZone, None, ("world", "world"));
}

#[test]
fn policy_allow() {
    let r = example("three-zones");
    let d = evaluate(&r, &packet("10.30.0.1", "10.40.0.1", TCP, 5432));
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((0, "web-to-db")), ("web", "db"));
    let d = evaluate(&r, &packet("10.30.0.1", "10.40.0.1", ICMP, 777));
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((0, "web-to-db")), ("web", "db"));
    let d = evaluate(&r, &packet("fd00:30::1", "fd00:40::1", ICMPV6, 0));
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((0, "web-to-db")), ("web", "db"));
    for port in [9100, 9105, 9110] {
        let d = evaluate(&r, &packet("10.50.0.9", "10.30.0.1", TCP, port));
        check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((1, "mgmt-to-web")), ("mgmt", "web"));
    }
    let d = evaluate(&r, &packet("203.0.113.7", "fd00:30::1", TCP, 443));
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((3, "world-to-web")), ("world", "web"));
}

#[test]
fn policy_no_match_denied_or_audit() {
    let r = example("three-zones");
    let d = evaluate(&r, &packet("10.30.0.1", "10.40.0.1", TCP, 22));
    check(&d, Verdict::Denied, Reason::PolicyNoMatch, Some((0, "web-to-db")), ("web", "db"));
    let d = evaluate(&r, &packet("10.30.0.1", "10.40.0.1", UDP, 5432));
    check(&d, Verdict::Denied, Reason::PolicyNoMatch, Some((0, "web-to-db")), ("web", "db"));
    let d = evaluate(&r, &packet("10.50.0.9", "10.30.0.1", TCP, 9111));
    check(&d, Verdict::Denied, Reason::PolicyNoMatch, Some((1, "mgmt-to-web")), ("mgmt", "web"));
    // An empty allow list in audit mode: everything of the pair passes as audit.
    let d = evaluate(&r, &packet("10.30.0.1", "10.50.0.1", TCP, 22));
    check(&d, Verdict::Audit, Reason::PolicyNoMatch, Some((4, "web-to-mgmt")), ("web", "mgmt"));
}

#[test]
fn default_inter_zone_deny_and_allow() {
    let r = example("three-zones");
    let d = evaluate(&r, &packet("10.40.0.1", "10.30.0.1", TCP, 80));
    check(&d, Verdict::Denied, Reason::DefaultInterZone, None, ("db", "web"));
    assert_eq!(d.policy_id, POLICY_ID_DEFAULT_INTER_ZONE);
    let d = evaluate(&r, &packet("10.30.0.1", "8.8.8.8", UDP, 53));
    check(&d, Verdict::Denied, Reason::DefaultInterZone, None, ("web", "world"));
    let r = inline("zones:\n  a:\n    members: [ { cidr: 10.1.0.0/16 } ]\ndefault_inter_zone: allow\n");
    let d = evaluate(&r, &packet("10.1.0.1", "10.2.0.1", TCP, 80));
    check(&d, Verdict::Allowed, Reason::DefaultInterZone, None, ("a", "world"));
}

#[test]
fn mac_beats_cidr_beats_interface() {
    let r = example("hypervisor");
    // The MAC is tenant-a's even though the address is in tenant-b's network.
    let mut p = packet("192.168.20.5", "172.16.0.53", UDP, 53);
    p.src_mac = mac("52:54:00:a0:00:01");
    p.src_interface = Some("vnet3".into());
    let d = evaluate(&r, &p);
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((0, "tenant-a-infra")), ("tenant-a", "infra"));
    // Unknown MAC: the address decides, not the port.
    p.src_mac = mac("52:54:00:ff:00:01");
    let d = evaluate(&r, &p);
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((1, "tenant-b-infra")), ("tenant-b", "infra"));
    // Unknown MAC and address: the port decides.
    p.src_ip = "10.9.9.9".parse().unwrap();
    let d = evaluate(&r, &p);
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((3, "unassigned-dns")), ("unassigned", "infra"));
    p.proto = TCP;
    let d = evaluate(&r, &p);
    check(&d, Verdict::Denied, Reason::PolicyNoMatch, Some((3, "unassigned-dns")), ("unassigned", "infra"));
    // The port is known only where the packet is seen on it; without it, world.
    p.src_interface = None;
    let d = evaluate(&r, &p);
    check(&d, Verdict::Denied, Reason::DefaultInterZone, None, ("world", "infra"));
    // A port whose name no glob matches.
    p.src_interface = Some("eth0".into());
    assert_eq!(evaluate(&r, &p).src_zone, "world");
}

#[test]
fn interface_zone_of_the_receiving_end() {
    let r = example("hypervisor");
    let mut p = packet("10.9.9.1", "10.9.9.2", TCP, 22);
    p.dst_interface = Some("vnet2".into());
    let d = evaluate(&r, &p);
    check(&d, Verdict::Denied, Reason::DefaultInterZone, None, ("world", "unassigned"));
    p.src_interface = Some("vnet1".into());
    let d = evaluate(&r, &p);
    check(&d, Verdict::Denied, Reason::IntraZone, None, ("unassigned", "unassigned"));
}

#[test]
fn audit_policy_allows_what_it_lists() {
    let r = example("hypervisor");
    let mut p = packet("192.168.10.4", "192.168.20.4", TCP, 8444);
    let d = evaluate(&r, &p);
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((2, "tenant-a-to-b-api")), ("tenant-a", "tenant-b"));
    p.dport = 22;
    let d = evaluate(&r, &p);
    check(&d, Verdict::Audit, Reason::PolicyNoMatch, Some((2, "tenant-a-to-b-api")), ("tenant-a", "tenant-b"));
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
    allow: [ { proto: tcp, ports: [\"5000-6000\"] } ]
    mode: audit
  - name: p1
    from: a
    to: b
    allow: [ { proto: tcp, ports: [5432, 7000] }, { proto: udp, ports: [53] } ]
    mode: MODE1
  - name: p2
    from: a
    to: b
    allow: []
    mode: audit
";

#[test]
fn several_policies_for_one_pair() {
    let r = inline(&MULTI.replace("MODE1", "enforce"));
    // Both p0 and p1 allow 5432: the first policy is named.
    let d = evaluate(&r, &packet("10.1.0.1", "10.2.0.1", TCP, 5432));
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((0, "p0")), ("a", "b"));
    let d = evaluate(&r, &packet("10.1.0.1", "10.2.0.1", TCP, 7000));
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((1, "p1")), ("a", "b"));
    let d = evaluate(&r, &packet("10.1.0.1", "10.2.0.1", UDP, 53));
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((1, "p1")), ("a", "b"));
    // Not allowed: not all of the pair's policies audit, so denied, naming the first.
    let d = evaluate(&r, &packet("10.1.0.1", "10.2.0.1", UDP, 54));
    check(&d, Verdict::Denied, Reason::PolicyNoMatch, Some((0, "p0")), ("a", "b"));
    // All audit: audit.
    let r = inline(&MULTI.replace("MODE1", "audit"));
    let d = evaluate(&r, &packet("10.1.0.1", "10.2.0.1", UDP, 54));
    check(&d, Verdict::Audit, Reason::PolicyNoMatch, Some((0, "p0")), ("a", "b"));
    // The other direction is not covered.
    let d = evaluate(&r, &packet("10.2.0.1", "10.1.0.1", TCP, 5432));
    check(&d, Verdict::Denied, Reason::DefaultInterZone, None, ("b", "a"));
}

#[test]
fn unknown_protocols_and_reserved_255_are_never_allowed() {
    let r = inline(
        "zones:\n  a:\n    members: [ { cidr: 10.1.0.0/24 } ]\npolicies:\n  - { name: p, from: a, to: world, allow: [ { proto: 47 } ] }\n",
    );
    let d = evaluate(&r, &packet("10.1.0.1", "10.2.0.1", 47, 0));
    check(&d, Verdict::Allowed, Reason::PolicyAllow, Some((0, "p")), ("a", "world"));
    for proto in [50, 255] {
        let d = evaluate(&r, &packet("10.1.0.1", "10.2.0.1", proto, 0));
        check(&d, Verdict::Denied, Reason::PolicyNoMatch, Some((0, "p")), ("a", "world"));
    }
}

#[test]
fn explanation_names_members_and_rules() {
    let r = inline(
        "zones:\n  a:\n    members:\n      - cidr: 10.0.0.0/8\n      - cidr: 10.1.0.0/16\n  b:\n    members:\n      - mac: \"52:54:00:00:00:0b\"\npolicies:\n  - name: a-to-b\n    from: a\n    to: b\n    allow:\n      - { proto: tcp, ports: [443] }\n",
    );
    let mut p = packet("10.1.2.3", "192.0.2.1", TCP, 443);
    p.dst_mac = mac("52:54:00:00:00:0b");
    let text = explain(&r, &p).to_string();
    assert_eq!(
        text,
        "source:      zone a by cidr 10.1.0.0/16 (inline.yaml:5:15)\n\
         destination: zone b by mac 52:54:00:00:00:0b (inline.yaml:8:14)\n\
         decided by:  policy \"a-to-b\", allow entry at inline.yaml:14:9\n\
         verdict:     allowed (reason policy_allow, policy 0 \"a-to-b\")"
    );
    p.dport = 80;
    let text = explain(&r, &p).to_string();
    assert!(
        text.contains(
            "decided by:  no allow entry of policy \"a-to-b\" matches (enforced; first at inline.yaml:10:11)"
        ),
        "{text}"
    );
    assert!(text.ends_with("verdict:     denied (reason policy_no_match, policy 0 \"a-to-b\")"), "{text}");
    let text = explain(&r, &packet("192.0.2.1", "10.1.2.3", TCP, 80)).to_string();
    assert_eq!(
        text,
        "source:      zone world: no member matches\n\
         destination: zone a by cidr 10.1.0.0/16 (inline.yaml:5:15)\n\
         decided by:  no policy from world to a: default_inter_zone deny (the default)\n\
         verdict:     denied (reason default_inter_zone)"
    );
    let text = explain(&r, &packet("10.9.0.1", "10.1.2.3", TCP, 80)).to_string();
    assert!(text.starts_with("source:      zone a by cidr 10.0.0.0/8 (inline.yaml:4:15)\n"), "{text}");
    assert!(text.contains("decided by:  intra_zone allow of zone a (inline.yaml:2:3)"), "{text}");
}
