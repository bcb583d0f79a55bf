//! Zones by switch port name (`interface:` members) in the lab: a port attached after
//! the agent started gets its zone from the rules in force, and a reload that moves a
//! port to another zone takes effect in the half of the rule tables it switches to. The
//! port's zone is its endpoint's whether it sends or receives: addresses pick nothing.

mod common;

use std::time::Duration;

use backplane_lab::Lab;
use common::agent::Agent;

/// veth ports (`bpv*`) are in zone `veths`, tap ports (`bpt*`) in `taps`; addresses are
/// in no zone: each end of a VM-to-VM flow is in its port's zone, the receiver too
/// (the frame is judged again where it leaves for the receiver's port).
const RULES: &str = "zones:
  veths: { members: [ { interface: \"bpv*\" } ] }
  taps: { members: [ { interface: \"bpt*\" } ] }
policies:
  - { name: veths-to-taps, from: veths, to: taps, allow: [ { proto: icmp } ] }
";

fn ping_once(from: &backplane_lab::Vm, to: &backplane_lab::Vm) -> bool {
    from.exec(&["ping", "-n", "-q", "-c", "1", "-W", "1", &to.ip().to_string()]).status.success()
}

#[test]
fn a_late_port_gets_its_zone_and_a_reload_moves_it() {
    let lab = Lab::new("bp");
    let rules = lab.work_dir().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("zones.yaml"), RULES).unwrap();
    let a = lab.add_veth_vm("a", "10.61.0.1/24", None, None);
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap()]);
    assert_eq!(agent.status()["rules"]["generation"], 1);

    // b comes after the agent: its tap port is attached later, in zone `taps`.
    let b = lab.add_tap_vm("b", "10.61.0.2/24", None, None);
    agent.wait_for(Duration::from_secs(3), "b's port attached", |a| {
        (a.status()["ports"].as_array().map(Vec::len) == Some(2)).then_some(())
    });
    assert!(ping_once(&a, &b), "veths -> taps icmp is allowed");
    let f = agent.wait_for(Duration::from_secs(3), "the a -> b flow judged for b's port", |agent| {
        agent.find_flow("icmp", "10.61.0.1", "10.61.0.2").filter(|f| f["dst_zone"] == "taps")
    });
    assert_eq!(f["src_zone"].as_str(), Some("veths"), "{f:#}");
    assert_eq!((f["verdict"].as_str(), f["policy"].as_str()), (Some("allowed"), Some("veths-to-taps")), "{f:#}");
    // Were b's port in no zone, b would be `world` and world -> world is allowed.
    assert!(!ping_once(&b, &a), "taps -> veths is denied: b's late port is in zone taps");
    let f = agent.wait_for(Duration::from_secs(3), "the b -> a flow", |agent| {
        agent.find_flow("icmp", "10.61.0.2", "10.61.0.1").filter(|f| f["dst_zone"] == "veths")
    });
    assert_eq!((f["src_zone"].as_str(), f["verdict"].as_str()), (Some("taps"), Some("denied")), "{f:#}");
    assert_eq!((f["reason"].as_str(), f["policy"].as_str()), (Some("default_inter_zone"), Some("default_inter_zone")));

    // Reload: tap ports move to a new zone that may ping out. Only if the reload wrote
    // b's port zone into the half it switched to does b's ping pass.
    let moved = RULES.replace("taps:", "taps-v2:").replace("to: taps,", "to: taps-v2,")
        + "  - { name: taps-out, from: taps-v2, to: world, allow: [ { proto: icmp } ] }\n"
        + "  - { name: taps-to-veths, from: taps-v2, to: veths, allow: [ { proto: icmp } ] }\n";
    let tmp = rules.join("zones.yaml.tmp");
    std::fs::write(&tmp, moved).unwrap();
    std::fs::rename(&tmp, rules.join("zones.yaml")).unwrap();
    agent.wait_for(Duration::from_secs(2), "generation 2", |a| (a.status()["rules"]["generation"] == 2).then_some(()));
    assert!(ping_once(&b, &a), "taps-v2 -> veths icmp is allowed after the reload");
    let f = agent
        .flows()
        .into_iter()
        .find(|f| f["proto"] == "icmp" && f["src_ip"] == "10.61.0.2" && f["verdict"] == "allowed")
        .expect("an allowed b -> a flow");
    assert_eq!((f["src_zone"].as_str(), f["policy"].as_str()), (Some("taps-v2"), Some("taps-to-veths")), "{f:#}");

    // explain, asked from the agent, answers with the rules in force.
    let ask = ["explain", "--from", "10.61.0.2", "--to", "10.61.0.1", "--proto", "icmp", "--json", "--from-interface"];
    let v = agent.cli_json(&[&ask[..], &[b.host_port()]].concat());
    assert_eq!((v["src_zone"].as_str(), v["dst_zone"].as_str()), (Some("taps-v2"), Some("world")), "{v:#}");
    assert_eq!((v["verdict"].as_str(), v["policy"].as_str()), (Some("allowed"), Some("taps-out")), "{v:#}");
    let text = agent.cli(&ask[..ask.len() - 2]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("source:      zone world"), "without --from-interface b is in world: {text}");
    assert!(text.contains("verdict:     allowed (reason intra_zone"), "{text}");
    agent.stop();
}
