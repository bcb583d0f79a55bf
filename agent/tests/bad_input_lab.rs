//! Bad input while the agent runs: an etcd that cannot be reached from the start, a
//! rules directory that disappears and comes back, and an endpoint added with a MAC or
//! an address that is already another's. Each is reported clearly and enforcement goes on.

mod common;

use std::{net::TcpListener, time::Duration};

use backplane_lab::Lab;
use common::agent::{Agent, copy_example_rules};

#[test]
fn an_etcd_that_cannot_be_reached_at_start_is_reported_and_the_rules_are_enforced() {
    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let db = lab.add_veth_vm("db", "10.40.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    // A loopback port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap(), "--etcd", &url, "--node", "hv-soak"]);
    let etcd = agent.wait_for(Duration::from_secs(10), "etcd reported unreachable", |a| {
        let e = a.status()["endpoints"]["etcd"].clone();
        (e["connected"] == false && e["last_error"].is_string()).then_some(e)
    });
    let error = etcd["last_error"].as_str().unwrap();
    assert!(error.contains(&format!("127.0.0.1:{port}")), "the error names the etcd: {etcd:#}");
    let text = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("DISCONNECTED"), "{text}");
    assert!(web.ping(db.ip(), 2), "web -> db is allowed without etcd");
    assert!(!db.ping(web.ip(), 1), "db -> web is denied without etcd");
    agent.stop();
}

#[test]
fn a_rules_directory_that_disappears_keeps_the_last_good_rules_and_says_so() {
    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let db = lab.add_veth_vm("db", "10.40.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap()]);
    let moved = lab.work_dir().join("rules.moved");
    std::fs::rename(&rules, &moved).unwrap();
    let r = agent.wait_for(Duration::from_secs(3), "the rejection in status", |a| {
        let r = a.status()["rules"].clone();
        (!r["last_error"].as_array().unwrap().is_empty()).then_some(r)
    });
    let error = serde_json::to_string(&r["last_error"]).unwrap();
    assert!(error.contains("rules directory") && error.contains("is gone"), "{error}");
    assert_eq!(r["generation"], 1, "the last good rules stay in force: {r:#}");
    let text = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("last rejection") && text.contains("is gone"), "{text}");
    assert!(web.ping(db.ip(), 2), "web -> db is still allowed");
    assert!(!db.ping(web.ip(), 1), "db -> web is still denied");
    // It comes back: the rules go in force again, and the error is cleared.
    std::fs::rename(&moved, &rules).unwrap();
    let r = agent.wait_for(Duration::from_secs(3), "the rules back in force", |a| {
        let r = a.status()["rules"].clone();
        (r["generation"] == 2).then_some(r)
    });
    assert!(r["last_error"].as_array().unwrap().is_empty(), "{r:#}");
    assert_eq!(r["reloads_rejected"], 1, "{r:#}");
    agent.stop();
}

#[test]
fn an_endpoint_with_a_mac_or_address_already_known_is_refused() {
    let lab = Lab::new("bp");
    let _web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap()]);
    let add = |name: &str, mac: &str| agent.cli(&["endpoint", "add", name, "--mac", mac, "--ip", "10.30.0.9"]);
    let first = add("db-7", "52:54:00:40:00:07");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    // The same MAC under another name, written in another way.
    let again = add("db-8", "52-54-00-40-00-07");
    let text = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "a second endpoint with the same MAC is refused");
    assert!(text.contains("db-7") && text.contains("52:54:00:40:00:07") && text.contains("already"), "{text}");
    // Another MAC with the same address: an address belongs to one endpoint.
    let same_ip = add("db-10", "52:54:00:40:00:10");
    let text = String::from_utf8_lossy(&same_ip.stderr);
    assert!(!same_ip.status.success(), "a second endpoint with the same address is refused");
    assert!(text.contains("address 10.30.0.9 is already endpoint \"db-7\"'s"), "{text}");
    let bad = add("db-9", "52:54:00:40:00");
    assert!(!bad.status.success(), "a malformed MAC is refused: {}", String::from_utf8_lossy(&bad.stdout));
    let list = agent.cli_json(&["endpoint", "list", "--json"]);
    // (The list also shows the lab VM's port: locked on first use, or unbound.)
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["source"] == "runtime")
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, ["db-7"], "{list:#}");
    agent.stop();
}
