//! Restart and upgrade without a gap: an agent killed with `kill -9` leaves its data
//! path attached and enforcing; the next agent adopts its maps (flows and counters
//! carry on) and its links (same link ids, the program on each replaced in place).

mod common;

use std::time::Duration;

use backplane_lab::{Capture, Lab};
use common::{
    agent::{Agent, copy_example_rules, field},
    traffic::{Stream, connects},
};
use serde_json::Value;

/// The stream's flow (web -> db:port).
fn stream_flow(agent: &Agent, port: u16) -> Value {
    agent
        .flows()
        .into_iter()
        .find(|f| f["proto"] == "tcp" && f["dst_port"] == port && f["src_ip"] == "10.30.0.1")
        .unwrap_or_else(|| panic!("no flow of the stream in {:#?}", agent.flows()))
}

#[test]
fn a_killed_agent_is_adopted_without_a_gap() {
    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let db = lab.add_tap_vm("db", "10.40.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let rules_arg = rules.to_str().unwrap();
    let first = Agent::start_keeping_pins(&lab, &["--rules", rules_arg]);
    let generation = first.status()["rules"]["generation"].as_u64().unwrap();

    // web -> db tcp/5432 is allowed; db -> web is denied (default_inter_zone).
    let stream = Stream::start(&web, &db, 5432);
    assert!(stream.progress(Duration::from_millis(500)) > 0, "the allowed stream flows");
    assert!(!connects(&db, &web, 8080), "db -> web is denied");
    let before = first.wait_for(Duration::from_secs(3), "the stream's flow with packets", |a| {
        let f = stream_flow(a, 5432);
        (field(&f, "rev_packets") > 10).then_some(f)
    });
    let links_before = first.port_links();
    assert_eq!(links_before.len(), 2, "two ports: {links_before:?}");
    assert!(links_before.iter().all(|l| l.1 != 0 && l.2 != 0), "pinned links: {links_before:?}");
    let programs_before = first.status()["program_ids"].clone();
    let dropped_before = first.status()["counters"]["dropped"].as_u64().unwrap();

    // kill -9: nothing is detached, the rules stay in force.
    let retrans_before = stream.retransmits();
    stream.reset_pause();
    first.kill_9();
    for port in [web.host_port(), db.host_port()] {
        assert_eq!(common::links_on(port), ["tc-egress", "tc-ingress"], "{port} still attached while no agent runs");
    }
    let capture = Capture::start_filtered(web.host_port(), "tcp port 8081");
    assert!(!connects(&db, &web, 8081), "db -> web stays denied while no agent runs");
    assert!(capture.stop().is_empty(), "nothing of the denied connection reached web");
    assert!(stream.progress(Duration::from_secs(1)) > 0, "the allowed stream flows while no agent runs");

    // A new agent on the same pins (with --detach-on-exit: it cleans up at the end).
    let second = Agent::start(&lab, &["--rules", rules_arg]);
    assert!(stream.progress(Duration::from_millis(500)) > 0, "the allowed stream flows on");
    let links_after = second.port_links();
    let programs = second.status()["program_ids"].clone();
    for (b, a) in links_before.iter().zip(&links_after) {
        assert_eq!((&b.0, b.1, b.2), (&a.0, a.1, a.2), "the same links, never detached");
        assert_eq!((a.3, a.4), (programs["from_port_tc"].as_u64().unwrap(), programs["to_port"].as_u64().unwrap()));
        assert_ne!((a.3, a.4), (b.3, b.4), "the links run the new agent's programs");
    }
    assert_ne!(programs, programs_before);
    let status = second.status();
    assert!(status["rules"]["generation"].as_u64().unwrap() > generation, "the generation carries on: {status:#}");
    assert!(status["counters"]["dropped"].as_u64().unwrap() > dropped_before, "the counters carry on: {status:#}");
    let after = stream_flow(&second, 5432);
    assert!(
        field(&after, "rev_packets") > field(&before, "rev_packets")
            && field(&after, "fwd_packets") >= field(&before, "fwd_packets"),
        "the flow's counters carry on, not reset:\nbefore {before:#}\nafter {after:#}"
    );
    assert_eq!(after["verdict"], "allowed", "{after:#}");
    assert_eq!(stream.retransmits(), retrans_before, "no segment of the stream was lost across the restart");
    let pause = stream.longest_pause();
    assert!(pause < Duration::from_secs(1), "the stream never paused long: {pause:?}");
    assert!(!connects(&db, &web, 8082), "db -> web is still denied");
    drop(stream);
    second.stop();
    assert!(common::links_on(web.host_port()).is_empty(), "--detach-on-exit still removes everything");
    assert!(!lab.pin_dir().exists(), "and the pins");
}

#[test]
fn pinned_maps_of_another_layout_end_the_start_and_leave_everything_as_it_was() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.76.0.1/24", None, None);
    let pin_dir = lab.pin_dir();
    std::fs::create_dir_all(&pin_dir).unwrap();
    // A FLOWS map of another layout, as an older data path could have left it.
    common::datapath::pin_foreign_map(&pin_dir.join("FLOWS"), 32, 64);
    let mut cmd = std::process::Command::new(common::agent::BACKPLANE);
    cmd.arg("run").args(lab.agent_args()).arg("--state-dir").arg(lab.work_dir().join("state"));
    let out = cmd.output().expect("run backplane");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FLOWS: pinned type 1, key 32 bytes, value 64 bytes"), "names the map and layouts: {text}");
    assert!(text.contains("rm -r"), "says how to replace it: {text}");
    assert!(pin_dir.join("FLOWS").exists(), "the pinned map is left alone");
    assert!(common::links_on(a.host_port()).is_empty(), "nothing was attached");
}

#[test]
fn a_second_agent_on_the_same_pins_is_refused_and_the_first_goes_on() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.79.0.1/24", None, None);
    let b = lab.add_veth_vm("b", "10.79.0.2/24", None, None);
    let first = Agent::start(&lab, &[]);
    let links_before = first.port_links();
    let out = std::process::Command::new(common::agent::BACKPLANE)
        .args(["run", "--interfaces", &lab.port_glob(), "--pin-dir"])
        .arg(lab.pin_dir())
        .arg("--socket")
        .arg(lab.work_dir().join("second.sock"))
        .arg("--state-dir")
        .arg(lab.work_dir().join("state2"))
        .args(["--metrics-addr", "none"])
        .output()
        .expect("run a second agent");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("another agent is running on the pin directory"), "{text}");
    assert_eq!(first.port_links(), links_before, "the first agent's links are untouched");
    assert!(a.ping(b.ip(), 2), "and it goes on");
    assert!(first.find_flow("icmp", "10.79.0.1", "10.79.0.2").is_some());
    first.stop();
}

#[test]
fn an_adopted_port_keeps_its_ingress_hook_and_a_new_port_gets_the_configured_one() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.78.0.1/24", None, None);
    let b = lab.add_veth_vm("b", "10.78.0.2/24", None, None);
    let first = Agent::start_keeping_pins(&lab, &["--ingress", "xdp-skb"]);
    for port in [a.host_port(), b.host_port()] {
        assert_eq!(common::links_on(port), ["tc-egress", "xdp"], "{port}: generic XDP as asked");
    }
    first.kill_9();

    // The next agent is configured for TC: the adopted ports keep XDP, on the new program.
    let second = Agent::start(&lab, &[]);
    let status = second.status();
    assert_eq!((&status["ingress"], &status["uplink_ingress"]), (&"tc".into(), &"tc".into()), "{status:#}");
    for p in status["ports"].as_array().unwrap() {
        assert_eq!(p["ingress"], "xdp-skb", "{p:#}");
        assert_eq!(p["from_port_id"], status["program_ids"]["from_port"], "{p:#}");
    }
    let c = lab.add_veth_vm("c", "10.78.0.3/24", None, None);
    let port_c = c.host_port().to_owned();
    let p = second.wait_for(Duration::from_secs(2), "the new port attached", |agent| {
        agent.status()["ports"].as_array()?.iter().find(|p| p["name"] == port_c.as_str()).cloned()
    });
    assert_eq!(p["ingress"], "tc", "{p:#}");
    assert_eq!(p["from_port_id"], second.status()["program_ids"]["from_port_tc"], "{p:#}");
    assert_eq!(common::links_on(&port_c), ["tc-egress", "tc-ingress"]);
    assert_eq!(common::links_on(a.host_port()), ["tc-egress", "xdp"]);

    // Each frame is counted once, whichever hook saw it enter.
    assert!(a.ping(c.ip(), 3), "a -> c");
    let flow = second.wait_for(Duration::from_secs(3), "the ping's flow", |agent| {
        agent.find_flow("icmp", "10.78.0.1", "10.78.0.3").filter(|f| field(f, "rev_packets") == 3)
    });
    assert_eq!((field(&flow, "fwd_packets"), field(&flow, "rev_packets")), (3, 3), "{flow:#}");
    second.stop();
    for port in [a.host_port(), b.host_port(), &port_c] {
        assert!(common::links_on(port).is_empty(), "{port}: detached on exit");
    }
}

/// Issue 14, item 5: a start without `--rules` on a data path whose rules are in force
/// (a restart that lost its arguments) ends, says so, and changes nothing: the denied
/// flow stays denied on the wire; `--observe-only` lifts the rules on purpose.
#[test]
fn a_start_without_rules_does_not_lift_the_rules_in_force_unless_told() {
    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.10/8", None, None);
    let db = lab.add_veth_vm("db", "10.40.0.10/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let first = Agent::start_keeping_pins(&lab, &["--rules", rules.to_str().unwrap()]);
    // db -> web is denied by the rules (no policy from db to web); web -> db ICMP allowed.
    assert!(web.ping(db.ip(), 2), "positive control: web pings db");
    assert!(!db.ping(web.ip(), 1), "db -> web is denied");
    let generation = first.status()["rules"]["generation"].as_u64().unwrap();
    first.stop();

    let mut child = std::process::Command::new(common::agent::BACKPLANE)
        .arg("run")
        .args(lab.agent_args())
        .arg("--state-dir")
        .arg(lab.work_dir().join("state"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run backplane");
    // It must end by itself; one that runs on (lifting the rules) is stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ran_on = child.try_wait().unwrap().is_none();
    if ran_on {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!ran_on, "a start without --rules ran on over the rules in force:\n{text}");
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("rules are in force in {} (generation {generation})", lab.pin_dir().display()))
            && text.contains("--observe-only"),
        "names the rules in force and the way out: {text}"
    );
    assert!(!db.ping(web.ip(), 1), "db -> web still denied after the refused start");
    assert!(web.ping(db.ip(), 2), "and web -> db still passes");

    let observing = Agent::start(&lab, &["--observe-only"]);
    assert!(db.ping(web.ip(), 2), "--observe-only lifts the rules: db -> web passes");
    observing.stop();
}
