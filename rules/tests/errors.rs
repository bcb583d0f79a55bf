//! Every kind of rule-file problem, reported at its exact file, line and column.

use std::{fmt::Write as _, path::Path};

use backplane_rules::{RuleSet, parse_rules};

/// The errors of a rule set of (file name, text) as `file:line:column: message` lines.
fn errors(files: &[(&str, &str)]) -> Vec<String> {
    match parse_rules(files.iter().map(|(p, t)| (Path::new(*p), *t))) {
        Ok(_) => panic!("rule set unexpectedly valid"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn one_error(text: &str) -> String {
    let e = errors(&[("r.yaml", text)]);
    assert_eq!(e.len(), 1, "expected one error, got {e:#?}");
    e.into_iter().next().unwrap()
}

fn valid(files: &[(&str, &str)]) -> RuleSet {
    match parse_rules(files.iter().map(|(p, t)| (Path::new(*p), *t))) {
        Ok(rules) => rules,
        Err(errors) => panic!("unexpected errors: {errors:#?}"),
    }
}

/// Asserts the error starts with `r.yaml:line:column:` and contains `needle`.
#[track_caller]
fn assert_error(error: &str, at: &str, needle: &str) {
    assert!(error.starts_with(&format!("r.yaml:{at}: ")), "wrong place: {error} (want {at})");
    assert!(error.contains(needle), "{error} should say {needle:?}");
}

const ZONES: &str =
    "zones:\n  web:\n    members: [ { cidr: 10.30.0.0/24 } ]\n  db:\n    members: [ { cidr: 10.40.0.0/24 } ]\n";

#[test]
fn yaml_syntax_error() {
    let e = one_error("zones:\n  web: { members: [ }\n");
    assert_error(&e, "2:21", "YAML syntax error: while parsing a node, did not find expected node content");
}

#[test]
fn one_document_per_file() {
    let e = one_error("zones: {}\n---\npolicies: []\n");
    assert_error(&e, "3:1", "one YAML document");
}

#[test]
fn unknown_top_level_field() {
    let e = one_error("zones: {}\npolicys: []\n");
    assert_error(
        &e,
        "2:1",
        "unknown field \"policys\" in a rule file; expected one of: zones, policies, default_inter_zone",
    );
}

#[test]
fn unknown_field_in_zone_member_policy_and_entry() {
    let text = "\
zones:
  web:
    member: []
  db:
    members:
      - { cidr: 10.40.0.0/24, vlan: 5 }
policies:
  - name: p
    from: web
    to: db
    alow: []
    allow:
      - { proto: tcp, port: 80 }
";
    let e = errors(&[("r.yaml", text)]);
    assert_eq!(e.len(), 4, "{e:#?}");
    assert_error(&e[0], "3:5", "unknown field \"member\" in zone \"web\"; expected one of: members, intra_zone");
    assert_error(&e[1], "6:31", "unknown field \"vlan\" in a zone member");
    assert_error(&e[2], "11:5", "unknown field \"alow\" in a policy");
    assert_error(&e[3], "13:23", "unknown field \"port\" in an allow entry; expected one of: proto, ports");
}

#[test]
fn wrong_types() {
    let text = "\
zones:
  web:
    members: { cidr: 10.30.0.0/24 }
    intra_zone: [deny]
  db: [ 10.40.0.0/24 ]
policies: { name: p }
default_inter_zone: 1
";
    let e = errors(&[("r.yaml", text)]);
    assert_eq!(e.len(), 5, "{e:#?}");
    assert_error(&e[0], "3:14", "expected members (a list), found a mapping");
    assert_error(&e[1], "4:17", "expected intra_zone: allow or deny, found a list");
    assert_error(&e[2], "5:7", "expected zone \"db\" (a mapping with members, intra_zone), found a list");
    assert_error(&e[3], "6:11", "expected policies (a list), found a mapping");
    assert_error(&e[4], "7:21", "expected allow or deny for default_inter_zone, found \"1\"");
}

#[test]
fn ports_must_be_a_list_of_ports() {
    let text = format!(
        "{ZONES}policies:\n  - name: p\n    from: web\n    to: db\n    allow:\n      - {{ proto: tcp, ports: 80 }}\n"
    );
    assert_error(&one_error(&text), "11:30", "expected ports (a list), found a scalar");
}

#[test]
fn unknown_zone_in_from_and_to() {
    let text = format!("{ZONES}policies:\n  - name: p\n    from: wbe\n    to: dbb\n    allow: []\n");
    let e = errors(&[("r.yaml", &text)]);
    assert_eq!(e.len(), 2, "{e:#?}");
    assert_error(&e[0], "8:11", "unknown zone \"wbe\" in from; known zones: world, web, db");
    assert_error(&e[1], "9:9", "unknown zone \"dbb\" in to");
}

#[test]
fn policy_within_one_zone() {
    let text = format!("{ZONES}policies:\n  - name: p\n    from: web\n    to: web\n    allow: []\n");
    assert_error(&one_error(&text), "9:9", "never consulted");
}

#[test]
fn missing_policy_fields() {
    let text = format!("{ZONES}policies:\n  - name: p\n    to: db\n");
    let e = errors(&[("r.yaml", &text)]);
    assert_eq!(e.len(), 2, "{e:#?}");
    assert_error(&e[0], "7:5", "missing field \"from\" in a policy");
    assert_error(&e[1], "7:5", "missing field \"allow\" in a policy (write `allow: []`");
}

#[test]
fn bad_mac() {
    let e = one_error("zones:\n  web:\n    members:\n      - mac: \"52:54:00:10:00\"\n");
    assert_error(&e, "4:14", "\"52:54:00:10:00\" is not a MAC address");
}

#[test]
fn bad_cidr() {
    let e = one_error("zones:\n  web:\n    members:\n      - cidr: 10.30.0/24\n");
    assert_error(&e, "4:15", "\"10.30.0/24\" is not a CIDR");
    let e = one_error("zones:\n  web:\n    members:\n      - cidr: fd00::/129\n");
    assert_error(&e, "4:15", "not a prefix length of an IPv6 address (0-128)");
}

#[test]
fn cidr_with_host_bits() {
    let e = one_error("zones:\n  web:\n    members:\n      - cidr: 10.30.0.1/24\n");
    assert_error(&e, "4:15", "10.30.0.1/24 has host bits set; did you mean 10.30.0.0/24?");
}

#[test]
fn member_with_two_kinds() {
    let e = one_error("zones:\n  web:\n    members:\n      - { mac: \"52:54:00:10:00:01\", cidr: 10.30.0.0/24 }\n");
    assert_error(&e, "4:9", "exactly one of mac, cidr or interface");
}

#[test]
fn bad_interface_glob() {
    let e = one_error("zones:\n  web:\n    members:\n      - interface: \"tap-[web\"\n");
    assert_error(&e, "4:20", "bad interface glob \"tap-[web\"");
}

#[test]
fn invalid_zone_name() {
    let e = one_error("zones:\n  \"web zone\": {}\n");
    assert_error(&e, "2:3", "\"web zone\" is not a valid zone name");
}

#[test]
fn world_has_no_members() {
    let e = one_error("zones:\n  world:\n    members: [ { cidr: 0.0.0.0/0 } ]\n");
    assert_error(&e, "3:5", "the built-in zone world has no members");
    // Its intra_zone may be set.
    let rules = valid(&[("r.yaml", "zones:\n  world:\n    intra_zone: deny\n")]);
    assert_eq!(rules.intra_zone("world"), backplane_rules::Access::Deny);
}

#[test]
fn cidr_overlap_across_zones() {
    let text = "\
zones:
  web:
    members:
      - cidr: 10.30.0.0/16
      - cidr: 10.30.1.0/24
  db:
    members:
      - cidr: 10.30.5.0/24
      - cidr: 10.40.0.0/24
  mgmt:
    members:
      - cidr: 10.40.0.0/24
";
    let e = errors(&[("r.yaml", text)]);
    assert_eq!(e.len(), 2, "{e:#?}");
    assert_error(
        &e[0],
        "8:15",
        "cidr 10.30.5.0/24 in zone \"db\" overlaps cidr 10.30.0.0/16 of zone \"web\" (r.yaml:4:15); an address can be in one zone only",
    );
    assert_error(&e[1], "12:15", "cidr 10.40.0.0/24 in zone \"mgmt\" is already cidr 10.40.0.0/24 of zone \"db\"");
}

/// A network held by several of other zones is reported once, with the outermost.
#[test]
fn cidr_overlap_is_reported_once_per_member() {
    let text = "\
zones:
  web: { members: [ { cidr: 10.30.0.0/16 } ] }
  mgmt: { members: [ { cidr: 10.30.0.0/20 } ] }
  db: { members: [ { cidr: 10.30.5.0/24 } ] }
";
    let e = errors(&[("r.yaml", text)]);
    assert_eq!(e.len(), 2, "{e:#?}");
    assert_error(&e[0], "3:30", "cidr 10.30.0.0/20 in zone \"mgmt\" overlaps cidr 10.30.0.0/16 of zone \"web\"");
    assert_error(&e[1], "4:28", "cidr 10.30.5.0/24 in zone \"db\" overlaps cidr 10.30.0.0/16 of zone \"web\"");
}

/// One network in 2,000 zones made an error per pair: 2 million, 535 MB, from 80 kB of
/// YAML. One per member now, and as many copies in one zone cost no error and no time.
#[test]
fn one_network_in_many_zones_makes_one_error_per_zone() {
    let mut text = String::from("zones:\n");
    for i in 0..2000 {
        writeln!(text, "  z{i}: {{ members: [ {{ cidr: 10.0.0.0/8 }} ] }}").unwrap();
    }
    writeln!(text, "  many: {{ members: [ {} ] }}", vec!["{ cidr: 11.0.0.0/8 }"; 100_000].join(", ")).unwrap();
    let start = std::time::Instant::now();
    let e = errors(&[("r.yaml", &text)]);
    assert!(start.elapsed() < std::time::Duration::from_secs(20), "{:?}", start.elapsed());
    assert_eq!(e.len(), 1999, "{:#?}", &e[..3]);
    assert_error(&e[1998], "2001:31", "cidr 10.0.0.0/8 in zone \"z1999\" is already cidr 10.0.0.0/8 of zone \"z0\"");
}

#[test]
fn nested_cidrs_in_one_zone_are_fine() {
    valid(&[(
        "r.yaml",
        "zones:\n  web:\n    members: [ { cidr: 10.30.0.0/16 }, { cidr: 10.30.1.0/24 }, { cidr: 10.30.1.0/24 } ]\n",
    )]);
}

#[test]
fn ipv6_overlap_across_zones() {
    let e = one_error(
        "zones:\n  web:\n    members: [ { cidr: \"fd00::/16\" } ]\n  db:\n    members: [ { cidr: \"fd00:40::/32\" } ]\n",
    );
    assert_error(&e, "5:24", "cidr fd00:40::/32 in zone \"db\" overlaps cidr fd00::/16 of zone \"web\"");
}

#[test]
fn same_mac_in_two_zones() {
    let text = "\
zones:
  web:
    members: [ { mac: \"52:54:00:10:00:01\" } ]
  db:
    members: [ { mac: \"52-54-00-10-00-01\" } ]
";
    assert_error(
        &one_error(text),
        "5:23",
        "mac 52:54:00:10:00:01 in zone \"db\" is already mac 52:54:00:10:00:01 of zone \"web\" (r.yaml:3:23)",
    );
}

#[test]
fn same_interface_glob_in_two_zones() {
    let text =
        "zones:\n  web:\n    members: [ { interface: \"tap-*\" } ]\n  db:\n    members: [ { interface: \"tap-*\" } ]\n";
    assert_error(
        &one_error(text),
        "5:29",
        "interface \"tap-*\" in zone \"db\" is already interface \"tap-*\" of zone \"web\"",
    );
}

#[test]
fn overlap_across_files_is_reported_in_the_later_file() {
    let e = errors(&[
        ("a.yaml", "zones:\n  web:\n    members: [ { cidr: 10.30.0.0/24 } ]\n"),
        ("b.yaml", "zones:\n  db:\n    members:\n      - cidr: 10.30.0.128/25\n"),
    ]);
    assert_eq!(
        e,
        vec![
            "b.yaml:4:15: cidr 10.30.0.128/25 in zone \"db\" overlaps cidr 10.30.0.0/24 of zone \"web\" (a.yaml:3:24); an address can be in one zone only"
        ]
    );
}

fn policy_with(entry: &str) -> String {
    format!("{ZONES}policies:\n  - name: p\n    from: web\n    to: db\n    allow:\n      - {entry}\n")
}

#[test]
fn backwards_port_range() {
    let e = one_error(&policy_with("{ proto: tcp, ports: [5432, \"6010-6000\"] }"));
    assert_error(&e, "11:37", "port range 6010-6000 is backwards; write 6000-6010");
}

#[test]
fn port_zero_and_port_too_large() {
    let e = errors(&[("r.yaml", &policy_with("{ proto: udp, ports: [0, 70000, \"1-65536\", http] }"))]);
    assert_eq!(e.len(), 4, "{e:#?}");
    assert_error(&e[0], "11:31", "port 0 is not a valid destination port; expected 1-65535");
    assert_error(&e[1], "11:34", "port 70000 is out of range; expected 1-65535");
    assert_error(&e[2], "11:41", "port 65536 is out of range");
    assert_error(&e[3], "11:52", "\"http\" is not a port number");
}

#[test]
fn empty_ports_list() {
    assert_error(&one_error(&policy_with("{ proto: tcp, ports: [] }")), "11:30", "leave ports out to allow every port");
}

#[test]
fn ports_on_icmp() {
    let e = one_error(&policy_with("{ proto: icmp, ports: [8] }"));
    assert_error(&e, "11:24", "icmp has no ports; remove ports (an entry without ports allows all icmp)");
    let e = one_error(&policy_with("{ proto: 47, ports: [8] }"));
    assert_error(&e, "11:22", "protocol 47 has no ports; remove ports (an entry without ports allows all protocol 47)");
}

#[test]
fn ports_on_a_numbered_port_protocol_are_fine() {
    let rules = valid(&[("r.yaml", &policy_with("{ proto: 6, ports: [22] }"))]);
    assert_eq!(rules.policies[0].allow[0].proto, backplane_rules::Proto::TCP);
}

#[test]
fn bad_protocol() {
    let e = errors(&[("r.yaml", &policy_with("{ proto: tpc }\n      - { proto: 255 }\n      - { ports: [80] }"))]);
    assert_eq!(e.len(), 3, "{e:#?}");
    assert_error(
        &e[0],
        "11:18",
        "unknown protocol \"tpc\"; expected tcp, udp, icmp, icmpv6, sctp or a protocol number 0-254",
    );
    assert_error(&e[1], "12:18", "protocol 255 is reserved");
    assert_error(&e[2], "13:9", "missing field \"proto\" in an allow entry");
}

#[test]
fn bad_mode() {
    let text = format!("{ZONES}policies:\n  - name: p\n    from: web\n    to: db\n    allow: []\n    mode: dryrun\n");
    assert_error(&one_error(&text), "11:11", "expected enforce or audit for mode, found \"dryrun\"");
}

#[test]
fn empty_allow_list_is_fine() {
    let rules =
        valid(&[("r.yaml", &format!("{ZONES}policies:\n  - name: p\n    from: web\n    to: db\n    allow: []\n"))]);
    assert!(rules.policies[0].allow.is_empty());
}

#[test]
fn duplicate_zone_names() {
    let e = errors(&[("a.yaml", ZONES), ("b.yaml", "zones:\n  mgmt: {}\n  web: {}\n")]);
    assert_eq!(e, vec!["b.yaml:3:3: zone \"web\" is defined twice (first at a.yaml:2:3)"]);
    // Within one mapping too: YAML maps would silently keep the last one.
    let e = one_error("zones:\n  web: {}\n  web: {}\n");
    assert_error(&e, "3:3", "zone \"web\" is defined twice (first at r.yaml:2:3)");
}

#[test]
fn duplicate_field() {
    let e = one_error("zones:\n  web:\n    intra_zone: deny\n    intra_zone: allow\n");
    assert_error(&e, "4:5", "field \"intra_zone\" is given twice (first at line 3)");
}

#[test]
fn duplicate_policy_names() {
    let p = "policies:\n  - name: web-to-db\n    from: web\n    to: db\n    allow: []\n";
    let e = errors(&[("a.yaml", ZONES), ("b.yaml", p), ("c.yaml", p)]);
    assert_eq!(e, vec!["c.yaml:2:11: policy \"web-to-db\" is defined twice (first at b.yaml:2:11)"]);
}

#[test]
fn default_inter_zone_at_most_once() {
    let e = errors(&[("a.yaml", "default_inter_zone: deny\n"), ("b.yaml", "default_inter_zone: allow\n")]);
    assert_eq!(e, vec!["b.yaml:1:21: default_inter_zone is set twice (first at a.yaml:1:21)"]);
}

#[test]
fn all_errors_of_all_files_are_collected_in_order() {
    let e = errors(&[
        ("a.yaml", "zones:\n  web:\n    members: [ { mac: nope }, { cidr: 10.0.0.1/8 } ]\n"),
        (
            "b.yaml",
            "zones: { db: { members: [ { cidr: 10.0.0.0/8 } ] } }\npolicies:\n  - { name: p, from: web, to: nowhere, allow: [ { proto: icmp, ports: [1] } ] }\n",
        ),
        ("c.yaml", "zones: [\n"),
    ]);
    let places: Vec<&str> = e.iter().map(|e| e.split(": ").next().unwrap()).collect();
    assert_eq!(places, vec!["a.yaml:3:23", "a.yaml:3:39", "b.yaml:3:31", "b.yaml:3:64", "c.yaml:2:1"], "{e:#?}");
}

#[test]
fn zones_and_policies_in_separate_files() {
    let rules = valid(&[
        ("10-zones.yaml", ZONES),
        (
            "20-policies.yaml",
            "policies:\n  - { name: p, from: web, to: db, allow: [ { proto: tcp, ports: [5432] } ] }\ndefault_inter_zone: allow\n",
        ),
    ]);
    assert_eq!(rules.policies[0].location.to_string(), "20-policies.yaml:2:13");
    assert_eq!(rules.default_inter_zone, backplane_rules::Access::Allow);
}

#[test]
fn empty_files_are_an_empty_rule_set() {
    let rules = valid(&[("a.yaml", ""), ("b.yaml", "# comments only\n"), ("c.yaml", "zones:\npolicies:\n")]);
    assert!(rules.zones.is_empty() && rules.policies.is_empty());
    assert_eq!(rules.default_inter_zone, backplane_rules::Access::Deny);
}

#[test]
fn loading_a_directory_or_a_file() {
    use backplane_rules::load_rules;
    let dir = std::env::temp_dir().join(format!("backplane-rules-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let empty = load_rules(&dir).unwrap_err();
    assert_eq!(empty.len(), 1);
    assert_eq!(empty[0].to_string(), format!("{}: no *.yaml rule files in this directory", dir.display()));

    std::fs::write(dir.join("b-policies.yaml"), "policies:\n  - { name: p, from: web, to: db, allow: [] }\n").unwrap();
    std::fs::write(dir.join("a-zones.yaml"), ZONES).unwrap();
    std::fs::write(dir.join("notes.txt"), "not: [yaml").unwrap();
    std::fs::write(dir.join("old.yaml.bak"), "not: [yaml").unwrap();
    let rules = load_rules(&dir).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(rules.zones.len(), 2);
    assert_eq!(rules.policies[0].location.file.as_ref(), dir.join("b-policies.yaml").as_path());

    // A single file is a rule set too (here one whose policy names unknown zones).
    let e = load_rules(&dir.join("b-policies.yaml")).unwrap_err();
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[0].to_string().ends_with("b-policies.yaml:2:22: unknown zone \"web\" in from; known zones: world"),
        "{}",
        e[0]
    );

    std::fs::write(dir.join("c.yaml"), "zones: {web2: {members: [{mac: x}]}}\n").unwrap();
    let e = load_rules(&dir).unwrap_err();
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].file.as_path(), e[0].line, e[0].column), (dir.join("c.yaml").as_path(), 1, 32));

    let missing = load_rules(&dir.join("missing.yaml")).unwrap_err();
    assert!(missing[0].to_string().contains("missing.yaml: cannot read rule file"), "{}", missing[0]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unquoted_values_are_read_as_written() {
    // YAML 1.1 would read 52:54:00:10:00:01 as a base-60 number and 6000-6010 as a
    // string; both are taken as the text written.
    let rules = valid(&[(
        "r.yaml",
        "zones:\n  web:\n    members:\n      - mac: 52:54:00:10:00:01\n      - cidr: fd00:30::/64\npolicies:\n  - name: p\n    from: web\n    to: world\n    allow: [ { proto: 6, ports: [6000-6010, '22'] } ]\n",
    )]);
    let members: Vec<String> = rules.zones[0].members.iter().map(|m| m.matcher.to_string()).collect();
    assert_eq!(members, vec!["mac 52:54:00:10:00:01", "cidr fd00:30::/64"]);
    let ports: Vec<String> = rules.policies[0].allow[0].ports.iter().map(ToString::to_string).collect();
    assert_eq!(ports, vec!["6000-6010", "22"]);
}

#[test]
fn large_rule_sets_load_quickly() {
    use std::fmt::Write as _;
    let mut text = String::from("zones:\n");
    for z in 0..5000u32 {
        let (hi, lo) = (z / 256, z % 256);
        writeln!(
            text,
            "  z{z}:\n    members:\n      - cidr: 10.{hi}.{lo}.0/24\n      - mac: \"52:54:00:00:{hi:02x}:{lo:02x}\""
        )
        .unwrap();
    }
    text.push_str("policies:\n");
    for p in 0..5000u32 {
        writeln!(
            text,
            "  - {{ name: p{p}, from: z{p}, to: z{}, allow: [ {{ proto: tcp, ports: [\"1000-2000\"] }} ] }}",
            (p + 1) % 5000
        )
        .unwrap();
    }
    let start = std::time::Instant::now();
    let rules = valid(&[("big.yaml", &text)]);
    let compiled = backplane_rules::compile(&rules, &backplane_rules::ZoneIds::new());
    assert_eq!(compiled.endpoints.len(), 5000);
    assert_eq!(compiled.pair_markers.len(), 5000);
    assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
}
