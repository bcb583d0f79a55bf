//! The reference evaluator with port-anchored identity: an end behind a VM port of this
//! node is the port's endpoint; the frame is checked against the binding (MAC, addresses)
//! and dropped when it does not keep to it; a port nobody bound learns from its first
//! frame or gets `unbound_ports`.

use std::{net::IpAddr, path::Path};

use backplane_common::{Verdict, policy::POLICY_ID_NONE, reason::Counter, reason::Reason};
use backplane_rules::{
    DecidedBy, Decision, MacAddr, OtherBinding, PacketView, PortBinding, PortIdentity, RuleSet, ZoneMatch, evaluate,
    explain, parse_rules,
};

const TCP: u8 = 6;

/// web learns, db is bound by the host only, ops is a remediation zone reached by port
/// name, and the inventory holds web-1 (fixed address) and db-1 (no addresses).
const RULES: &str = r#"
zones:
  web:
    members: [ { cidr: 10.30.0.0/24 }, { cidr: "fd00:30::/64" } ]
  db:
    members: [ { cidr: 10.40.0.0/24 }, { mac: "52:54:00:40:00:09" } ]
    binding: host
  ops:
    members: [ { interface: "tap-ops-*" } ]
    remediation: true
  lab:
    members: []
policies:
  - name: web-to-db
    from: web
    to: db
    allow: [ { proto: tcp, ports: [5432] } ]
  - name: lab-to-web
    from: lab
    to: web
    allow: [ { proto: tcp } ]
endpoints:
  web-1:
    mac: "52:54:00:30:00:01"
    ips: [10.30.0.5]
  db-1:
    mac: "52:54:00:40:00:01"
    zone: db
  lb-1:
    mac: "52:54:00:30:00:02"
    ips: [10.30.0.6]
    allowed_macs: ["00:00:5e:00:01:0a"]
    allowed_addresses: [10.30.0.100, 10.40.0.100]
UNBOUND
"#;

fn rules(unbound: &str) -> RuleSet {
    let text = RULES.replace("UNBOUND", unbound);
    parse_rules([(Path::new("r.yaml"), text.as_str())]).unwrap_or_else(|e| panic!("{e:#?}"))
}

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const WEB_1: &str = "52:54:00:30:00:01";
const DB_1: &str = "52:54:00:40:00:01";
const STRANGER: &str = "02:00:00:00:00:99";

fn port(name: &str, bound: Option<(&str, Option<&str>, &[&str])>) -> PortIdentity {
    PortIdentity {
        name: name.to_owned(),
        binding: bound.map(|(m, zone, addresses)| PortBinding {
            mac: mac(m),
            zone: zone.map(str::to_owned),
            addresses: addresses.iter().map(|a| ip(a)).collect(),
        }),
        others: Vec::new(),
    }
}

/// A TCP packet sent through `src` (a VM port here), its frame's fields as given.
fn from_port(src: PortIdentity, src_mac: &str, src_ip: &str, dst_ip: &str, dport: u16) -> PacketView {
    PacketView {
        src_mac: mac(src_mac),
        dst_mac: mac("02:00:00:00:00:fe"),
        src_ip: ip(src_ip),
        dst_ip: ip(dst_ip),
        proto: TCP,
        dport,
        src_interface: None,
        dst_interface: None,
        src_port: Some(src),
        dst_port: None,
    }
}

#[track_caller]
fn judged(d: &Decision, verdict: Verdict, reason: Reason, zones: (&str, &str)) {
    assert_eq!((d.verdict, d.reason, d.dropped), (verdict, reason, None), "{d:?}");
    assert_eq!((d.src_zone.as_str(), d.dst_zone.as_str()), zones, "{d:?}");
}

#[track_caller]
fn dropped(d: &Decision, counter: Counter) {
    assert_eq!(d.dropped, Some(counter), "{d:?}");
    assert_eq!((d.verdict, d.policy_id, d.policy_name.as_deref()), (Verdict::Denied, POLICY_ID_NONE, None), "{d:?}");
    let reason = if counter == Counter::UnboundPort { Reason::UnboundPort } else { Reason::Spoofed };
    assert_eq!(d.reason, reason, "{d:?}");
}

#[test]
fn a_bound_port_sends_as_its_endpoint_whatever_the_address_says() {
    let r = rules("");
    let web1 = port("vnet1", Some((WEB_1, None, &[])));
    let d = evaluate(&r, &from_port(web1.clone(), WEB_1, "10.30.0.5", "10.40.0.7", 5432));
    judged(&d, Verdict::Allowed, Reason::PolicyAllow, ("web", "db"));
    assert_eq!(d.policy_name.as_deref(), Some("web-to-db"));
    // The same frame without the port: placed by its MAC, the same answer.
    let mut p = from_port(web1, WEB_1, "10.30.0.5", "10.40.0.7", 5432);
    p.src_port = None;
    judged(&evaluate(&r, &p), Verdict::Allowed, Reason::PolicyAllow, ("web", "db"));
    // db-1 bound by the host: its zone is the inventory's.
    let db1 = port("vnet2", Some((DB_1, None, &[])));
    let d = evaluate(&r, &from_port(db1, DB_1, "10.40.0.9", "10.40.0.7", 5432));
    judged(&d, Verdict::Allowed, Reason::IntraZone, ("db", "db"));
    // A MAC outside the rules bound into lab (a runtime endpoint, a learned zone): lab's,
    // though lab has no networks; any address outside the zones' is its.
    let runtime = port("vnet3", Some((STRANGER, Some("lab"), &[])));
    let d = evaluate(&r, &from_port(runtime.clone(), STRANGER, "192.0.2.7", "10.30.0.5", 22));
    judged(&d, Verdict::Allowed, Reason::PolicyAllow, ("lab", "web"));
    // The binding names no zone: the port's interface zone.
    let ops = port("tap-ops-1", Some((STRANGER, None, &[])));
    let d = evaluate(&r, &from_port(ops, STRANGER, "192.0.2.7", "10.30.0.5", 22));
    judged(&d, Verdict::Denied, Reason::DefaultInterZone, ("ops", "web"));
    // Neither: world.
    let plain = port("vnet4", Some((STRANGER, None, &[])));
    let d = evaluate(&r, &from_port(plain, STRANGER, "192.0.2.7", "10.30.0.5", 22));
    judged(&d, Verdict::Denied, Reason::DefaultInterZone, ("world", "web"));
}

#[test]
fn a_frame_with_another_mac_is_dropped() {
    let r = rules("");
    let mut web1 = port("vnet1", Some((WEB_1, None, &[])));
    let d = evaluate(&r, &from_port(web1.clone(), STRANGER, "10.30.0.5", "10.40.0.7", 5432));
    dropped(&d, Counter::SpoofedMac);
    // The MAC of an endpoint bound to another port here: `spoofed`.
    web1.others.push(OtherBinding { mac: mac(DB_1), addresses: Vec::new(), here: true });
    let d = evaluate(&r, &from_port(web1.clone(), DB_1, "10.40.0.9", "10.40.0.7", 5432));
    dropped(&d, Counter::Spoofed);
    let e = explain(&r, &from_port(web1, DB_1, "10.40.0.9", "10.40.0.7", 5432));
    assert!(matches!(e.decided_by, DecidedBy::Dropped { counter: Counter::Spoofed, .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("source MAC 52:54:00:40:00:01 is an endpoint bound to another port: port vnet1 is bound to 52:54:00:30:00:01"),
        "{text}"
    );
    assert!(text.ends_with("verdict:     denied (reason spoofed, dropped: spoofed)"), "{text}");
    // To its own MAC.
    let mut p = from_port(port("vnet1", Some((WEB_1, None, &[]))), WEB_1, "10.30.0.5", "10.40.0.7", 5432);
    p.dst_mac = mac(WEB_1);
    dropped(&evaluate(&r, &p), Counter::ToOwnMac);
}

#[test]
fn the_source_address_must_be_the_endpoints() {
    let r = rules("");
    // web-1's addresses are fixed (its inventory ips): another address of web is not its.
    let web1 = port("vnet1", Some((WEB_1, None, &[])));
    let d = evaluate(&r, &from_port(web1.clone(), WEB_1, "10.30.0.6", "10.40.0.7", 5432));
    dropped(&d, Counter::SpoofedAddress);
    let text = explain(&r, &from_port(web1.clone(), WEB_1, "10.30.0.6", "10.40.0.7", 5432)).to_string();
    assert!(text.contains("source address 10.30.0.6 is not one of the endpoint's addresses (10.30.0.5)"), "{text}");
    // The unspecified address and IPv6 link-local addresses are anyone's.
    for src in ["0.0.0.0", "::", "fe80::1"] {
        let dst = if src.contains(':') { "fd00:30::9" } else { "10.40.0.7" };
        let d = evaluate(&r, &from_port(web1.clone(), WEB_1, src, dst, 5432));
        assert_eq!(d.dropped, None, "{src}: {d:?}");
    }
    // Fixed runtime addresses count as well, even outside the zone's networks.
    let runtime = port("vnet3", Some((STRANGER, Some("web"), &["192.0.2.9"])));
    let d = evaluate(&r, &from_port(runtime.clone(), STRANGER, "192.0.2.9", "10.40.0.7", 5432));
    judged(&d, Verdict::Allowed, Reason::PolicyAllow, ("web", "db"));
    dropped(&evaluate(&r, &from_port(runtime, STRANGER, "10.30.0.9", "10.40.0.7", 5432)), Counter::SpoofedAddress);
    // Without fixed addresses: its zone's networks, not another zone's, not outside them.
    let loose = port("vnet3", Some((STRANGER, Some("web"), &[])));
    let d = evaluate(&r, &from_port(loose.clone(), STRANGER, "fd00:30::77", "fd00:30::9", 80));
    judged(&d, Verdict::Allowed, Reason::IntraZone, ("web", "web"));
    for src in ["10.40.0.1", "192.0.2.1"] {
        dropped(&evaluate(&r, &from_port(loose.clone(), STRANGER, src, "10.40.0.7", 5432)), Counter::SpoofedAddress);
    }
    // A zone without networks: any address in no zone's, none in another zone's.
    let lab = port("vnet3", Some((STRANGER, Some("lab"), &[])));
    dropped(&evaluate(&r, &from_port(lab.clone(), STRANGER, "10.30.0.9", "10.30.0.5", 22)), Counter::SpoofedAddress);
    assert_eq!(evaluate(&r, &from_port(lab, STRANGER, "198.51.100.1", "10.30.0.5", 22)).dropped, None);
}

#[test]
fn addresses_of_other_ports_are_theirs() {
    let r = rules("");
    let mut loose = port("vnet3", Some((STRANGER, Some("web"), &[])));
    loose.others.push(OtherBinding { mac: mac(WEB_1), addresses: vec![ip("10.30.0.5")], here: true });
    dropped(
        &evaluate(&r, &from_port(loose.clone(), STRANGER, "10.30.0.5", "10.40.0.7", 5432)),
        Counter::SpoofedAddress,
    );
    // An endpoint bound on another node: its address is its MAC's alone, wherever it sends.
    let elsewhere = mac("02:00:00:00:00:77");
    loose.others = vec![OtherBinding { mac: elsewhere, addresses: vec![ip("10.30.0.77")], here: false }];
    dropped(&evaluate(&r, &from_port(loose, STRANGER, "10.30.0.77", "10.40.0.7", 5432)), Counter::SpoofedAddress);
    let mut fresh = port("vnet5", None);
    fresh.others = vec![OtherBinding { mac: elsewhere, addresses: vec![ip("10.30.0.77")], here: false }];
    let d = evaluate(&r, &from_port(fresh, "02:00:00:00:00:77", "10.30.0.77", "10.40.0.7", 5432));
    judged(&d, Verdict::Allowed, Reason::PolicyAllow, ("web", "db"));
}

#[test]
fn an_unbound_port_learns_from_its_first_frame() {
    let r = rules("");
    let fresh = port("vnet5", None);
    // A MAC outside the rules, first address in web (which learns): web's.
    let e = explain(&r, &from_port(fresh.clone(), STRANGER, "10.30.0.50", "10.40.0.7", 5432));
    judged(&e.decision, Verdict::Allowed, Reason::PolicyAllow, ("web", "db"));
    assert!(matches!(e.src.by, ZoneMatch::Port { first_use: true, .. }), "{e:?}");
    assert!(
        e.to_string().starts_with(
            "source:      zone web: port vnet5, bound to nobody, learns 02:00:00:00:00:99 from this frame, whose first address 10.30.0.50 is in cidr 10.30.0.0/24"
        ),
        "{e}"
    );
    // web-1 (inventory, in web, which learns): its zone and its fixed addresses.
    let d = evaluate(&r, &from_port(fresh.clone(), WEB_1, "10.30.0.5", "10.40.0.7", 5432));
    judged(&d, Verdict::Allowed, Reason::PolicyAllow, ("web", "db"));
    dropped(&evaluate(&r, &from_port(fresh.clone(), WEB_1, "10.30.0.6", "10.40.0.7", 5432)), Counter::SpoofedAddress);
    // No zone's networks: world learns by default.
    let d = evaluate(&r, &from_port(fresh.clone(), STRANGER, "192.0.2.1", "10.30.0.5", 22));
    judged(&d, Verdict::Denied, Reason::DefaultInterZone, ("world", "web"));
    // A port named into ops: ops's, whatever its first address (which must be ops's to
    // send from: ops has no networks, so none of another zone).
    let ops = port("tap-ops-3", None);
    let d = evaluate(&r, &from_port(ops.clone(), STRANGER, "192.0.2.1", "10.30.0.5", 22));
    judged(&d, Verdict::Denied, Reason::DefaultInterZone, ("ops", "web"));
    dropped(&evaluate(&r, &from_port(ops, STRANGER, "10.30.0.50", "10.30.0.5", 22)), Counter::SpoofedAddress);
    // A group or zero source MAC is no endpoint's.
    for m in ["01:00:5e:00:00:01", "00:00:00:00:00:00"] {
        dropped(&evaluate(&r, &from_port(fresh.clone(), m, "10.30.0.50", "10.40.0.7", 5432)), Counter::SpoofedMac);
    }
}

#[test]
fn a_port_that_cannot_learn_gets_unbound_ports() {
    // db says binding: host: neither db-1 nor an address of db makes a port db's.
    let cases = [
        (DB_1, "10.40.0.9"),
        ("52:54:00:40:00:09", "10.40.0.9"), // a mac member of db
        (STRANGER, "10.40.0.9"),            // locks its MAC, but db does not learn
        (STRANGER, "0.0.0.0"),              // no address to learn a zone from
    ];
    for (m, src) in cases {
        let why = format!("{m} from {src}");
        let fresh = port("vnet5", None);
        // quarantine (the default): reaches only remediation zones.
        let r = rules("");
        let e = explain(&r, &from_port(fresh.clone(), m, src, "10.30.0.5", 80));
        judged(&e.decision, Verdict::Denied, Reason::UnboundPort, ("world", "web"));
        assert!(
            matches!(e.decided_by, DecidedBy::Quarantine { src: true, dst: false, allowed: false }),
            "{why}: {e:?}"
        );
        assert!(
            e.to_string().contains(
                "decided by:  the source is quarantined, reaching only remediation zones, and zone web is not one"
            ),
            "{why}: {e}"
        );
        // deny: dropped.
        let r = rules("unbound_ports: deny");
        dropped(&evaluate(&r, &from_port(fresh.clone(), m, src, "10.30.0.5", 80)), Counter::UnboundPort);
        // observe: the frame's fields, as before bindings; its address held to other ports'
        // only.
        let r = rules("unbound_ports: observe");
        let d = evaluate(&r, &from_port(fresh, m, src, "10.30.0.5", 80));
        let zone = if src == "0.0.0.0" { "world" } else { "db" };
        assert_eq!((d.dropped, d.src_zone.as_str()), (None, zone), "{why}: {d:?}");
    }
    // A quarantined port in a remediation zone's reach: ops (by port name) is one.
    let r = rules("");
    let mut p = from_port(port("vnet5", None), DB_1, "10.40.0.9", "10.30.0.5", 80);
    p.dst_port = Some(port("tap-ops-1", Some((STRANGER, None, &[]))));
    let d = evaluate(&r, &p);
    judged(&d, Verdict::Allowed, Reason::Remediation, ("world", "ops"));
    assert_eq!(d.policy_id, POLICY_ID_NONE);
}

#[test]
fn the_receiver_is_the_ports_endpoint() {
    let r = rules("");
    // The host sends to db-1's port; the destination address says web, the port says db.
    let mut p = from_port(port("unused", None), "02:00:00:00:00:01", "10.30.0.5", "10.30.0.6", 5432);
    p.src_port = None;
    p.dst_port = Some(port("vnet2", Some((DB_1, None, &[]))));
    let e = explain(&r, &p);
    judged(&e.decision, Verdict::Allowed, Reason::PolicyAllow, ("web", "db"));
    assert!(
        e.to_string().contains(
            "destination: zone db: port vnet2 is bound to 52:54:00:40:00:01, endpoint \"db-1\" of the inventory"
        ),
        "{e}"
    );
    // A port nobody bound that has not sent: anyone's while ports learn (its frame says),
    // unless unbound ports are denied.
    p.dst_port = Some(port("vnet6", None));
    judged(&evaluate(&r, &p), Verdict::Allowed, Reason::IntraZone, ("web", "web"));
    dropped(&evaluate(&rules("unbound_ports: deny"), &p), Counter::UnboundPort);
    // Where nothing learns, unbound_ports applies to it.
    let host_only = |unbound: &str| {
        let mut text = RULES.replace("UNBOUND", unbound);
        for zone in ["web", "ops", "lab"] {
            text = text.replace(&format!("\n  {zone}:\n"), &format!("\n  {zone}:\n    binding: host\n"));
        }
        text = text.replace("policies:", "  world:\n    binding: host\npolicies:");
        parse_rules([(Path::new("r.yaml"), text.as_str())]).unwrap_or_else(|e| panic!("{e:#?}"))
    };
    let d = evaluate(&host_only(""), &p);
    judged(&d, Verdict::Denied, Reason::UnboundPort, ("web", "world"));
    dropped(&evaluate(&host_only("unbound_ports: deny"), &p), Counter::UnboundPort);
    let d = evaluate(&host_only("unbound_ports: observe"), &p);
    judged(&d, Verdict::Allowed, Reason::IntraZone, ("web", "web"));
}

#[test]
fn infrastructure_is_no_ports() {
    let r = rules("infrastructure:\n  gw: { mac: \"02:00:00:00:55:01\", ips: [10.30.0.1] }");
    let gw = "02:00:00:00:55:01";
    // Its MAC lives behind the uplink: forged by a bound port, or sent by one nobody bound
    // (which never locks itself to it).
    let web1 = port("vnet1", Some((WEB_1, None, &[])));
    dropped(&evaluate(&r, &from_port(web1, gw, "10.30.0.5", "10.40.0.7", 5432)), Counter::Spoofed);
    let text = explain(&r, &from_port(port("vnet5", None), gw, "10.30.0.50", "10.40.0.7", 5432)).to_string();
    assert!(text.contains("source MAC 02:00:00:00:55:01 is infrastructure \"gw\"'s (r.yaml:"), "{text}");
    dropped(&evaluate(&r, &from_port(port("vnet5", None), gw, "10.30.0.50", "10.40.0.7", 5432)), Counter::Spoofed);
    // Its addresses are no port's, though in web's network.
    let loose = port("vnet3", Some((STRANGER, Some("web"), &[])));
    dropped(&evaluate(&r, &from_port(loose, STRANGER, "10.30.0.1", "10.40.0.7", 5432)), Counter::SpoofedAddress);
    dropped(
        &evaluate(&r, &from_port(port("vnet5", None), STRANGER, "10.30.0.1", "10.40.0.7", 5432)),
        Counter::SpoofedAddress,
    );
}

/// `allowed_macs` and `allowed_addresses` (VRRP, a shared VIP): the bound endpoint may
/// send from them, still as itself and inside its zone's networks; nobody else may.
#[test]
fn a_bound_endpoint_sends_from_what_the_rules_allow_it_and_no_more() {
    let r = rules("");
    let lb1 = port("vnet5", Some((LB_1, None, &[])));
    let d = evaluate(&r, &from_port(lb1.clone(), VMAC, "10.30.0.100", "10.40.0.7", 5432));
    judged(&d, Verdict::Allowed, Reason::PolicyAllow, ("web", "db"));
    let d = evaluate(&r, &from_port(lb1.clone(), LB_1, "10.30.0.100", "10.40.0.7", 5432));
    judged(&d, Verdict::Allowed, Reason::PolicyAllow, ("web", "db"));
    // Allowed, but in db's networks: it would be judged as db wherever it is seen.
    dropped(&evaluate(&r, &from_port(lb1.clone(), LB_1, "10.40.0.100", "10.40.0.7", 5432)), Counter::SpoofedAddress);
    // Not allowed: another address of its zone, another MAC.
    dropped(&evaluate(&r, &from_port(lb1.clone(), LB_1, "10.30.0.101", "10.40.0.7", 5432)), Counter::SpoofedAddress);
    dropped(&evaluate(&r, &from_port(lb1, "00:00:5e:00:01:0b", "10.30.0.6", "10.40.0.7", 5432)), Counter::SpoofedMac);
    // web-1 (fixed address) may use neither.
    let web1 = port("vnet1", Some((WEB_1, None, &[])));
    dropped(&evaluate(&r, &from_port(web1.clone(), VMAC, "10.30.0.5", "10.40.0.7", 5432)), Counter::SpoofedMac);
    dropped(&evaluate(&r, &from_port(web1, WEB_1, "10.30.0.100", "10.40.0.7", 5432)), Counter::SpoofedAddress);
}

const LB_1: &str = "52:54:00:30:00:02";
const VMAC: &str = "00:00:5e:00:01:0a";

/// A port that locks the MAC of an inventory endpoint bound on another node is a held
/// claim: quarantined (dropped under `unbound_ports: deny`), not that endpoint.
#[test]
fn a_claim_of_an_endpoint_bound_on_another_node_is_held() {
    let claim = || {
        let mut fresh = port("vnet6", None);
        fresh.others = vec![OtherBinding { mac: mac(WEB_1), addresses: vec![ip("10.30.0.5")], here: false }];
        from_port(fresh, WEB_1, "10.30.0.5", "10.40.0.7", 5432)
    };
    let d = evaluate(&rules(""), &claim());
    judged(&d, Verdict::Denied, Reason::UnboundPort, ("world", "db"));
    dropped(&evaluate(&rules("unbound_ports: deny"), &claim()), Counter::UnboundPort);
    // Positive control: bound nowhere else, the first use makes it web-1.
    let d = evaluate(&rules(""), &from_port(port("vnet6", None), WEB_1, "10.30.0.5", "10.40.0.7", 5432));
    judged(&d, Verdict::Allowed, Reason::PolicyAllow, ("web", "db"));
}
