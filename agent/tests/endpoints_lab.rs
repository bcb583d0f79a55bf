//! Endpoints on one node, in the lab: zones that must not share a node raise a
//! co-mingling alert when their VMs announce themselves on it, and a MAC outside the
//! inventory on a port of a zone that has an inventory is quarantined: it reaches only
//! the remediation zone.

mod common;

use std::time::Duration;

use backplane_lab::{Lab, Vm};
use common::{agent::Agent, frames::arp};
use serde_json::Value;

const RULES: &str = r#"
zones:
  db:
    members: [ { cidr: 10.40.0.0/24 }, { interface: "STRANGER_PORT" } ]
    must_not_share_node_with: [dmz]
  dmz:
    members: [ { cidr: 10.60.0.0/24 } ]
  remediation:
    members: [ { cidr: 10.90.0.0/24 } ]
    remediation: true
endpoints:
  db-1:
    mac: "52:54:00:40:00:01"
    ips: [10.40.0.1]
  dmz-1:
    mac: "52:54:00:60:00:01"
    ips: [10.60.0.1]
policies: []
"#;

/// A gratuitous ARP from the VM, as a guest sends when its interface comes up.
fn announce(vm: &Vm) {
    let ip = vm.ip().octets();
    vm.send_raw_frames(&[arp(0x0806, 1, vm.mac(), ip, ip)]);
}

fn ping_once(from: &Vm, to: &Vm) -> bool {
    from.exec(&["ping", "-n", "-q", "-c", "1", "-W", "1", &to.ip().to_string()]).status.success()
}

fn audit_kinds(agent: &Agent) -> Vec<Value> {
    match agent.cli_json(&["audit", "--json"]) {
        Value::Array(records) => records,
        other => panic!("audit --json is not an array: {other}"),
    }
}

fn endpoint<'a>(list: &'a [Value], mac: &str) -> Option<&'a Value> {
    list.iter().find(|e| e["mac"].as_str().is_some_and(|m| m.eq_ignore_ascii_case(mac)))
}

#[test]
fn co_mingled_zones_raise_an_alert_and_an_unknown_mac_is_quarantined() {
    let lab = Lab::new("bp");
    let db = lab.add_veth_vm("db", "10.40.0.1/8", None, Some("52:54:00:40:00:01"));
    let dmz = lab.add_veth_vm("dmz", "10.60.0.1/8", None, Some("52:54:00:60:00:01"));
    let stranger = lab.add_veth_vm("x", "10.40.0.9/8", None, Some("52:54:00:40:00:99"));
    let fixer = lab.add_veth_vm("fix", "10.90.0.1/8", None, Some("52:54:00:90:00:01"));
    let rules = lab.work_dir().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    // The stranger's port is a db port (an `interface` member): a MAC outside the
    // inventory on it is quarantined.
    std::fs::write(rules.join("rules.yaml"), RULES.replace("STRANGER_PORT", stranger.host_port())).unwrap();
    let state = lab.work_dir().join("state");
    let agent = Agent::start(
        &lab,
        &[
            "--rules",
            rules.to_str().unwrap(),
            "--node",
            "n1",
            "--state-dir",
            state.to_str().unwrap(),
            "--metrics-addr",
            "none",
        ],
    );

    announce(&db);
    announce(&dmz);
    let alert = agent.wait_for(Duration::from_secs(3), "a co-mingling record in the audit log", |a| {
        audit_kinds(a).into_iter().find(|r| r["kind"] == "co_mingling")
    });
    let detail = alert["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("db") && detail.contains("dmz"), "names both zones: {alert:#}");
    let alerts = agent.status()["endpoints"]["alerts"].clone();
    assert!(
        alerts.as_array().is_some_and(|a| a.iter().any(|t| t.as_str().is_some_and(|t| t.contains("co-mingling")))),
        "status shows the alert: {alerts:#}"
    );

    // A MAC outside the inventory, in zone db (which has an inventory), is quarantined.
    announce(&stranger);
    let list = agent.wait_for(Duration::from_secs(3), "the stranger quarantined", |a| {
        let list = a.cli_json(&["endpoint", "list", "--json"]);
        let list = list.as_array().cloned().unwrap_or_default();
        endpoint(&list, "52:54:00:40:00:99").is_some_and(|e| e["state"] == "quarantined").then_some(list)
    });
    assert_eq!(endpoint(&list, "52:54:00:40:00:01").unwrap()["state"], "active", "db-1 itself is active: {list:#?}");
    assert!(audit_kinds(&agent).iter().any(|r| r["kind"] == "unknown_mac"), "the quarantine is audited");
    assert!(!ping_once(&stranger, &db), "the quarantined stranger cannot reach db-1 (same zone)");
    assert!(ping_once(&stranger, &fixer), "but reaches the remediation zone");
    // The alert does not isolate (on_violation concerns placement): db and dmz are
    // judged by policy, and no policy covers them (default deny).
    assert!(!ping_once(&db, &dmz), "db -> dmz: no policy, denied");
    agent.stop();
}
