//! Rule files that cannot be loaded at start: the generation a previous agent left in
//! force stays; with nothing in force, the last good copy goes in force under each
//! zone's `on_rules_failure` (closed: denied everything, open: passes); with neither,
//! the start ends. Verdicts checked on the wire.

mod common;

use std::{path::Path, time::Duration};

use backplane_lab::{Lab, Vm};
use common::{
    agent::{Agent, BACKPLANE},
    traffic::connects,
};

const ZONES: &str = "\
zones:
  web:
    members: [ { cidr: 10.30.0.0/24 } ]
    on_rules_failure: closed
  db:
    members: [ { cidr: 10.40.0.0/24 } ]
    on_rules_failure: open
  mgmt:
    members: [ { cidr: 10.50.0.0/24 } ]
    on_rules_failure: open
";

const POLICIES: &str = "\
policies:
  - { name: web-to-db, from: web, to: db, allow: [ { proto: tcp, ports: [5432] } ] }
  - { name: mgmt-to-db, from: mgmt, to: db, allow: [ { proto: tcp, ports: [22] } ] }
";

const BROKEN: &str = "policies:\n  - { name: bad, from: db, to: nowhere, allow: [] }\n";

fn write_rules(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("zones.yaml"), ZONES).unwrap();
    std::fs::write(dir.join("policies.yaml"), POLICIES).unwrap();
}

struct Vms {
    web: Vm,
    db: Vm,
    mgmt: Vm,
}

fn vms(lab: &Lab) -> Vms {
    Vms {
        web: lab.add_veth_vm("web", "10.30.0.1/8", None, None),
        db: lab.add_veth_vm("db", "10.40.0.1/8", None, None),
        mgmt: lab.add_veth_vm("mgmt", "10.50.0.1/8", None, None),
    }
}

/// The verdicts of the rule files themselves.
fn assert_rules_in_force(v: &Vms, what: &str) {
    assert!(connects(&v.web, &v.db, 5432), "{what}: web -> db tcp/5432 is allowed");
    assert!(connects(&v.mgmt, &v.db, 22), "{what}: mgmt -> db tcp/22 is allowed");
    assert!(!connects(&v.mgmt, &v.db, 9999), "{what}: mgmt -> db tcp/9999 is denied");
    assert!(!connects(&v.db, &v.web, 8080), "{what}: db -> web is denied");
}

#[test]
fn with_nothing_in_force_the_last_good_copy_goes_in_force_closed_or_open_per_zone() {
    let lab = Lab::new("bp");
    let v = vms(&lab);
    let rules = lab.work_dir().join("rules");
    write_rules(&rules);
    let rules_arg = rules.to_str().unwrap();
    let first = Agent::start(&lab, &["--rules", rules_arg]);
    assert_rules_in_force(&v, "good rules");
    first.stop();
    assert!(!lab.pin_dir().exists(), "nothing is in force any more");
    assert!(lab.work_dir().join("state/rules.last-good/meta.json").exists(), "the last good copy was kept");

    std::fs::write(rules.join("broken.yaml"), BROKEN).unwrap();
    let agent = Agent::start(&lab, &["--rules", rules_arg]);
    let r = agent.status()["rules"].clone();
    assert_eq!(r["in_force_from"], "failure_mode", "{r:#}");
    assert_eq!(r["failure_closed"], serde_json::json!(["world", "web"]), "{r:#}");
    assert_eq!(r["failure_open"], serde_json::json!(["db", "mgmt"]), "{r:#}");
    let errors = serde_json::to_string(&r["last_error"]).unwrap();
    assert!(errors.contains("broken.yaml:2:") && errors.contains("nowhere"), "the error is shown: {errors}");
    let out = agent.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILURE MODE"), "{}", String::from_utf8_lossy(&out.stdout));
    // web is closed: even what its policy allowed is denied; db and mgmt are open.
    assert!(!connects(&v.web, &v.db, 5432), "web (closed) -> db is denied");
    assert!(!connects(&v.db, &v.web, 8080), "db -> web (closed) is denied");
    assert!(connects(&v.mgmt, &v.db, 9999), "mgmt (open) -> db (open) passes, any port");
    assert!(connects(&v.db, &v.mgmt, 7777), "db (open) -> mgmt (open) passes");
    let flow = agent
        .flows()
        .into_iter()
        .find(|f| f["src_ip"] == "10.30.0.1" && f["dst_port"] == 5432)
        .expect("the denied flow of web");
    assert_eq!(flow["policy"], "on_rules_failure:web->db", "{flow:#}");

    // Fixed rules replace the failure mode within a second or two.
    std::fs::remove_file(rules.join("broken.yaml")).unwrap();
    agent.wait_for(Duration::from_secs(3), "the fixed rules in force", |a| {
        (a.status()["rules"]["in_force_from"] == "files").then_some(())
    });
    assert!(agent.status()["rules"]["last_error"].as_array().unwrap().is_empty());
    assert_rules_in_force(&v, "fixed rules");
    agent.stop();
}

#[test]
fn a_previous_agents_generation_stays_in_force_when_the_rules_break() {
    let lab = Lab::new("bp");
    let v = vms(&lab);
    let rules = lab.work_dir().join("rules");
    write_rules(&rules);
    let rules_arg = rules.to_str().unwrap();
    let first = Agent::start_keeping_pins(&lab, &["--rules", rules_arg]);
    assert_eq!(first.status()["rules"]["generation"], 1);
    first.kill_9();

    std::fs::write(rules.join("broken.yaml"), BROKEN).unwrap();
    let agent = Agent::start(&lab, &["--rules", rules_arg]);
    let r = agent.status()["rules"].clone();
    assert_eq!(r["in_force_from"], "previous_agent", "{r:#}");
    assert_eq!(r["generation"], 1, "the generation in force is not touched: {r:#}");
    assert_eq!((r["zones"].as_u64(), r["policies"].as_u64()), (Some(3), Some(2)), "known from the copy: {r:#}");
    assert!(!r["last_error"].as_array().unwrap().is_empty(), "{r:#}");
    assert_rules_in_force(&v, "the previous agent's generation");
    let flow = agent.flows().into_iter().find(|f| f["dst_port"] == 5432).expect("web -> db");
    assert_eq!((flow["src_zone"].as_str(), flow["policy"].as_str()), (Some("web"), Some("web-to-db")), "{flow:#}");

    std::fs::remove_file(rules.join("broken.yaml")).unwrap();
    agent.wait_for(Duration::from_secs(3), "the fixed rules in force", |a| {
        (a.status()["rules"]["generation"] == 2).then_some(())
    });
    assert_eq!(agent.status()["rules"]["in_force_from"], "files");
    assert_rules_in_force(&v, "fixed rules");
    agent.stop();
}

#[test]
fn broken_rules_with_nothing_in_force_and_no_copy_end_the_start() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.30.0.1/8", None, None);
    let rules = lab.work_dir().join("rules");
    write_rules(&rules);
    std::fs::write(rules.join("broken.yaml"), BROKEN).unwrap();
    let out = std::process::Command::new(BACKPLANE)
        .arg("run")
        .args(lab.agent_args())
        .arg("--rules")
        .arg(&rules)
        .arg("--state-dir")
        .arg(lab.work_dir().join("state"))
        .output()
        .expect("run backplane");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("broken.yaml:2:") && text.contains("nothing could be enforced"), "{text}");
    assert!(!lab.pin_dir().exists(), "nothing was pinned");
    assert!(common::links_on(a.host_port()).is_empty(), "nothing was attached");
}
