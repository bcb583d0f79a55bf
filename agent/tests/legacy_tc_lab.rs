//! Legacy TC attachment (`--tc-attach legacy`: a `clsact` qdisc with `cls_bpf`
//! direct-action filters), the way kernels without TCX (before 6.6, Debian 12's 6.1)
//! run the data path, forced here on a newer kernel so that both paths run in every CI
//! run. The filters must give what TCX links give: first on the port, enforcement that
//! outlives the agent, adoption and an in-place program upgrade by the next agent.
//!
//! The oracle is `tc filter show` (iproute2), not the agent's own view.

mod common;

use std::{process::Command, time::Duration};

use aya::programs::{
    SchedClassifier, TcAttachType,
    tc::{NlOptions, TcAttachOptions},
};
use backplane_common::maps::PROG_FROM_PORT_TC;
use backplane_lab::{Capture, Lab};
use common::{
    agent::{Agent, copy_example_rules},
    traffic::{Stream, connects},
};

/// The `cls_bpf` filters of a hook as `tc filter show` prints them, in the order a packet
/// meets them: (preference, program name, program id).
fn filters(port: &str, hook: &str) -> Vec<(u32, String, u64)> {
    let out = Command::new("tc").args(["filter", "show", "dev", port, hook]).output().expect("run tc");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = Vec::new();
    for line in text.lines().filter(|l| l.contains(" bpf ") && l.contains(" handle ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
        let pref = after("pref").and_then(|p| p.parse().ok()).expect("a preference");
        let id = after("id").and_then(|p| p.parse().ok()).expect("a program id");
        // The program's name follows the handle ("handle 0xb9a from_port_tc direct-action").
        let name = after(after("handle").expect("a handle")).unwrap_or_default().to_owned();
        found.push((pref, name, id));
    }
    // In the order tc lists them: the order a packet meets them.
    found
}

/// Another loader's filter on `port`'s ingress, at `priority` and `handle` (0: the
/// kernel picks): an observing copy of our data path with maps of its own, whose flow
/// table shows what it saw. Its qdisc must exist.
fn other_filter(port: &str, priority: u16, handle: u16) -> common::datapath::TestDatapath {
    let mut other = common::datapath::TestDatapath::load(1024);
    let prog: &mut SchedClassifier = other.ebpf.program_mut(PROG_FROM_PORT_TC).unwrap().try_into().unwrap();
    prog.load().expect("load the other program");
    let handle = aya::programs::tc::TcHandle::new(0, handle);
    prog.attach_with_options(
        port,
        TcAttachType::Ingress,
        TcAttachOptions::Netlink(NlOptions { priority, handle, classid: None }),
    )
    .expect("attach the other filter");
    other
}

/// Our filter (preference 1) on the `hook` of `port`: (name, program id).
fn ours(port: &str, hook: &str) -> Option<(String, u64)> {
    filters(port, hook).into_iter().find(|f| f.0 == 1).map(|f| (f.1, f.2))
}

#[test]
fn legacy_filters_go_first_enforce_without_an_agent_and_are_upgraded_in_place() {
    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let db = lab.add_tap_vm("db", "10.40.0.1/8", None, None);
    // Another product's filter on web's port before backplane starts: an observing copy
    // of our own data path (maps of its own) at the preference tc picks by default.
    aya::programs::tc::qdisc_add_clsact(web.host_port()).expect("add clsact");
    let other = other_filter(web.host_port(), 100, 0);

    let rules = copy_example_rules(&lab, "three-zones");
    let rules_arg = rules.to_str().unwrap();
    let first = Agent::start_keeping_pins(&lab, &["--rules", rules_arg, "--tc-attach", "legacy"]);
    let status = first.status();
    assert_eq!(status["tc_attach"], "legacy", "{status:#}");
    let ids = status["program_ids"].clone();
    for p in status["ports"].as_array().unwrap() {
        assert_eq!(p["tc_attach"], "legacy", "{p:#}");
        assert_eq!(p["pinned"], true, "a filter outlives the agent: {p:#}");
    }
    for port in [web.host_port(), db.host_port()] {
        assert!(common::links_on(port).is_empty(), "{port}: no TCX link in legacy mode");
        assert_eq!(
            ours(port, "ingress"),
            Some(("from_port_tc".into(), ids["from_port_tc"].as_u64().unwrap())),
            "{port}"
        );
        assert_eq!(ours(port, "egress"), Some(("to_port".into(), ids["to_port"].as_u64().unwrap())), "{port}");
    }
    let prefs: Vec<u32> = filters(web.host_port(), "ingress").iter().map(|f| f.0).collect();
    assert_eq!(prefs, [1, 100], "ours first, the other product's after it");

    // web -> db tcp/5432 is allowed, tcp/5433 and db -> web denied. The other filter runs
    // after ours for what ours passes and never sees what ours drops.
    common::datapath::assert_first_in_chain(&other, &web, &db, 5432, 5433);

    let stream = Stream::start(&web, &db, 5432);
    assert!(stream.progress(Duration::from_millis(500)) > 0, "the allowed stream flows");
    assert!(!connects(&db, &web, 8080), "db -> web is denied");

    // kill -9: the filters stay, and enforce, while no agent runs.
    let retrans_before = stream.retransmits();
    stream.reset_pause();
    first.kill_9();
    for port in [web.host_port(), db.host_port()] {
        assert_eq!(ours(port, "ingress").map(|f| f.0), Some("from_port_tc".into()), "{port}: still there");
        assert_eq!(ours(port, "egress").map(|f| f.0), Some("to_port".into()), "{port}: still there");
    }
    let capture = Capture::start_filtered(web.host_port(), "tcp port 8081");
    assert!(!connects(&db, &web, 8081), "db -> web stays denied while no agent runs");
    assert!(capture.stop().is_empty(), "nothing of the denied connection reached web");
    assert!(stream.progress(Duration::from_secs(1)) > 0, "the allowed stream flows while no agent runs");

    // The next agent adopts the filters and replaces their programs in place.
    let second = Agent::start(&lab, &["--rules", rules_arg, "--tc-attach", "legacy"]);
    let status = second.status();
    let new_ids = status["program_ids"].clone();
    assert_ne!(new_ids, ids, "a new agent loads new programs");
    for port in [web.host_port(), db.host_port()] {
        assert_eq!(
            ours(port, "ingress"),
            Some(("from_port_tc".into(), new_ids["from_port_tc"].as_u64().unwrap())),
            "{port}"
        );
        assert_eq!(ours(port, "egress"), Some(("to_port".into(), new_ids["to_port"].as_u64().unwrap())), "{port}");
        assert_eq!(
            filters(port, "ingress").iter().filter(|f| f.0 == 1).count(),
            1,
            "{port}: one filter of ours, replaced"
        );
    }
    assert!(stream.progress(Duration::from_millis(500)) > 0, "the allowed stream flows on");
    assert_eq!(stream.retransmits(), retrans_before, "no segment of the stream was lost across the restart");
    assert!(!connects(&db, &web, 8082), "db -> web is still denied");
    drop(stream);

    // --detach-on-exit removes our filters and only ours.
    second.stop();
    for port in [web.host_port(), db.host_port()] {
        assert_eq!(ours(port, "ingress"), None, "{port}: our ingress filter removed");
        assert_eq!(ours(port, "egress"), None, "{port}: our egress filter removed");
    }
    assert_eq!(filters(web.host_port(), "ingress").len(), 1, "the other product's filter stays");
    drop(other);
}

#[test]
fn a_port_with_an_ingress_qdisc_is_reported_and_the_others_are_attached() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.77.0.1/24", None, None);
    let b = lab.add_veth_vm("b", "10.77.0.2/24", None, None);
    // A rate limit as libvirt's <bandwidth> sets it up: an ingress qdisc with a policer.
    let tc = |args: &[&str]| {
        let out = Command::new("tc").args(args).output().expect("run tc");
        assert!(out.status.success(), "tc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    tc(&["qdisc", "add", "dev", b.host_port(), "ingress"]);
    let agent = Agent::start(&lab, &["--tc-attach", "legacy"]);
    let log = agent.wait_for(Duration::from_secs(5), "the refusal of b's port in the log", |agent| {
        let log = agent.child.output();
        log.contains("`ingress` qdisc").then_some(log)
    });
    assert!(log.contains(b.host_port()), "the log names the port: {log}");
    let status = agent.status();
    let ports: Vec<&str> = status["ports"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(ports, [a.host_port()], "a is attached, b is not: {status:#}");
    assert!(ours(a.host_port(), "ingress").is_some(), "a has our filter");
    let out = Command::new("tc").args(["qdisc", "show", "dev", b.host_port()]).output().expect("run tc");
    assert!(String::from_utf8_lossy(&out.stdout).contains("qdisc ingress"), "b's rate limit is left as it was");
    agent.stop();
}

#[test]
fn a_filter_of_someone_else_at_our_preference_and_handle_is_neither_replaced_nor_removed() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.77.1.1/24", None, None);
    let b = lab.add_veth_vm("b", "10.77.1.2/24", None, None);
    // Another loader's program (an observing copy of our data path, maps of its own) at
    // exactly backplane's preference and handle on a's ingress.
    aya::programs::tc::qdisc_add_clsact(a.host_port()).expect("add clsact");
    let other = other_filter(a.host_port(), 1, 0x0b9a);
    let foreign = ours(a.host_port(), "ingress").expect("the other filter");

    let agent = Agent::start(&lab, &["--tc-attach", "legacy"]);
    let log = agent.wait_for(Duration::from_secs(5), "the refusal of a's port", |agent| {
        let log = agent.child.output();
        log.contains("not backplane's").then_some(log)
    });
    assert!(log.contains(a.host_port()), "the log names the port: {log}");
    let status = agent.status();
    let ports: Vec<&str> = status["ports"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(ports, [b.host_port()], "b is attached, a is not: {status:#}");
    assert_eq!(ours(a.host_port(), "ingress"), Some(foreign.clone()), "the other filter was not replaced");
    agent.stop();
    assert_eq!(ours(a.host_port(), "ingress"), Some(foreign), "nor removed when the agent left");
    drop(other);
}

#[test]
fn a_legacy_filter_removed_or_preceded_behind_the_agents_back_is_put_back_first() {
    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let db = lab.add_veth_vm("db", "10.40.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap(), "--tc-attach", "legacy"]);
    let ids = agent.status()["program_ids"].clone();
    let from_port_tc = ids["from_port_tc"].as_u64().unwrap();
    let first = |port: &str| filters(port, "ingress").into_iter().next();

    // Removed: `tc filter del` of our ingress filter on web's port.
    let out = Command::new("tc")
        .args(["filter", "del", "dev", web.host_port(), "ingress", "pref", "1", "handle", "0xb9a", "bpf"])
        .output()
        .expect("run tc");
    assert!(out.status.success(), "tc filter del: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ours(web.host_port(), "ingress"), None, "removed");
    agent.wait_for(Duration::from_secs(8), "our filter back on web's ingress", |_| {
        (first(web.host_port()) == Some((1, "from_port_tc".into(), from_port_tc))).then_some(())
    });

    // Preceded: another loader's filter at preference 1 (another handle) joins the head
    // of the list cls_bpf walks, ahead of ours.
    let other = other_filter(db.host_port(), 1, 7);
    assert_ne!(first(db.host_port()).map(|f| f.2), Some(from_port_tc), "the other filter came first");
    agent.wait_for(Duration::from_secs(8), "our filter first again on db's ingress", |_| {
        (first(db.host_port()).map(|f| f.2) == Some(from_port_tc)).then_some(())
    });

    // Enforcement holds after both: db -> web is denied, web -> db 5432 allowed.
    assert!(!connects(&db, &web, 8080), "db -> web is denied");
    assert!(connects(&web, &db, 5432), "web -> db 5432 is allowed");
    agent.stop();
    drop(other);
}
