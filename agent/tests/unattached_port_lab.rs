//! No port passes unjudged while rules are in force: a port that matches `--interfaces`
//! but cannot be attached is cut off by the port guard (an nftables table in the bridge
//! family) from the first failed try until the agent attaches it, also across a rename,
//! and only reported while observing. An uplink that cannot be attached is reported, not
//! cut off (what enters through it is judged at the VM ports' egress), unless the agent
//! runs with `--guard-uplinks`.
//!
//! The obstacle is real: another product's XDP program (the data path object's
//! `baseline_pass`, loaded and attached by this test through a BPF link in generic mode)
//! holds the port, so the agent, running with `--ingress xdp-skb` (`--uplink-ingress
//! xdp-skb` for the uplink), gets `EBUSY` on every try until the test detaches it.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    time::Duration,
};

use aya::programs::{Xdp, XdpMode, xdp::XdpLinkId};
use backplane_common::maps::PROG_BASELINE_PASS;
use backplane_lab::{Capture, Lab, Vm, host_exec, host_run};
use common::{
    agent::{Agent, copy_example_rules},
    datapath::TestDatapath,
};
use serde_json::Value;

/// Another product's XDP program on a port (generic mode, through a BPF link owned by
/// this test): gone when detached or dropped, also if the test panics.
struct ForeignXdp {
    datapath: TestDatapath,
    link: Option<XdpLinkId>,
}

impl ForeignXdp {
    fn attach(port: &str) -> ForeignXdp {
        let mut datapath = TestDatapath::load(1024);
        let prog: &mut Xdp =
            datapath.ebpf.program_mut(PROG_BASELINE_PASS).expect("baseline_pass").try_into().expect("xdp");
        prog.load().expect("load baseline_pass");
        let link = prog.attach(port, XdpMode::Skb).unwrap_or_else(|e| panic!("attach baseline_pass to {port}: {e}"));
        ForeignXdp { datapath, link: Some(link) }
    }

    fn detach(&mut self) {
        if let Some(link) = self.link.take() {
            let prog: &mut Xdp = self.datapath.ebpf.program_mut(PROG_BASELINE_PASS).unwrap().try_into().unwrap();
            prog.detach(link).expect("detach baseline_pass");
        }
    }
}

/// Deletes an nftables table of the bridge family when dropped, in case the agent that
/// should have removed it did not get to.
struct NftTableGuard(String);

impl Drop for NftTableGuard {
    fn drop(&mut self) {
        if bridge_tables().contains(&self.0) {
            let _ = host_exec(&["nft", "delete", "table", "bridge", &self.0]);
        }
    }
}

/// The names of the bridge family's nftables tables, as the kernel has them.
fn bridge_tables() -> Vec<String> {
    let out = host_exec(&["nft", "-j", "list", "tables", "bridge"]);
    assert!(out.status.success(), "nft list tables: {}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("nft JSON");
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["table"]["name"].as_str().map(str::to_owned))
        .collect()
}

/// The port guard table as the kernel has it: the names in its set `blocked`, and the
/// packets counted by the drop rule of each chain.
fn guard_table(table: &str) -> (Vec<String>, u64, u64) {
    let out = host_exec(&["nft", "-j", "list", "table", "bridge", table]);
    assert!(out.status.success(), "nft list table bridge {table}: {}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("nft JSON");
    let objects = json["nftables"].as_array().expect("nftables array");
    let names = objects
        .iter()
        .filter(|o| o["set"]["name"] == "blocked")
        .flat_map(|o| o["set"]["elem"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect();
    let counted = |chain: &str| {
        objects
            .iter()
            .filter(|o| o["rule"]["chain"] == chain)
            .flat_map(|o| o["rule"]["expr"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["counter"]["packets"].as_u64())
            .sum::<u64>()
    };
    (names, counted("from_blocked_ports"), counted("to_blocked_ports"))
}

/// Echo replies `from` gets to `count` pings of `to` (0.2 s apart, 1 s wait each).
fn replies(from: &Vm, to: Ipv4Addr, count: u32) -> u32 {
    replies_every(from, to, count, "0.2")
}

/// Echo replies `from` gets to `count` pings of `to`, `interval` seconds apart.
fn replies_every(from: &Vm, to: Ipv4Addr, count: u32, interval: &str) -> u32 {
    let out = from.exec(&["ping", "-n", "-q", "-c", &count.to_string(), "-i", interval, "-W", "1", &to.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(',')
        .find_map(|part| part.trim().strip_suffix(" received").and_then(|n| n.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no ping summary in: {text}"))
}

/// Frames seen on `port` whose source MAC is `mac`, while `f` runs.
fn frames_from(port: &str, mac: &str, f: impl FnOnce()) -> usize {
    let capture = Capture::start_filtered(port, &format!("ether src {mac}"));
    f();
    std::thread::sleep(Duration::from_millis(200));
    capture.stop().len()
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The value of `backplane_ports{state="<state>"}` on the agent's `/metrics`.
fn ports_metric(port: u16, state: &str) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect to metrics: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let line_start = format!("backplane_ports{{state=\"{state}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{text}"))
}

/// The port's entry under `port_guard.unattached` in `status --json`, if it has one.
fn unattached(agent: &Agent, port: &str) -> Option<Value> {
    agent.status()["port_guard"]["unattached"].as_array()?.iter().find(|p| p["name"] == port).cloned()
}

fn attached(agent: &Agent, port: &str) -> bool {
    agent.status()["ports"].as_array().is_some_and(|ports| ports.iter().any(|p| p["name"] == port))
}

fn wait_blocked(agent: &Agent, port: &str) -> Value {
    agent.wait_for(Duration::from_secs(10), "the unattachable port blocked", |a| {
        unattached(a, port).filter(|p| p["state"] == "blocked")
    })
}

/// Renames a host link; on kernels before 6.2, which refuse to rename a link that is up
/// (EBUSY), it is taken down for the rename and brought up again.
fn rename_link(from: &str, to: &str) {
    if !host_exec(&["ip", "link", "set", "dev", from, "name", to]).status.success() {
        host_run(&["ip", "link", "set", "dev", from, "down"]);
        host_run(&["ip", "link", "set", "dev", from, "name", to]);
        host_run(&["ip", "link", "set", "dev", to, "up"]);
    }
}

/// A static neighbour entry in `vm` for `peer`, so that pings are echo frames only (no ARP
/// that a blocked port would hold up).
fn know_neighbour(vm: &Vm, peer: &Vm) {
    vm.run(&["ip", "neigh", "replace", &peer.ip().to_string(), "lladdr", &peer.mac_string(), "dev", "eth0"]);
}

#[test]
fn an_unattached_port_is_cut_off_while_rules_are_in_force_until_it_is_attached() {
    let lab = Lab::new("bp");
    // three-zones: web -> db and mgmt -> web/db allow ICMP; web -> mgmt passes in audit.
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let db = lab.add_veth_vm("db", "10.40.0.1/8", None, None);
    let mgmt = lab.add_veth_vm("mgmt", "10.50.0.1/8", None, None);
    let mut foreign = ForeignXdp::attach(mgmt.host_port());
    let rules = copy_example_rules(&lab, "three-zones");
    let rules = rules.to_str().unwrap();
    let metrics_port = free_tcp_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let first =
        Agent::start_keeping_pins(&lab, &["--rules", rules, "--ingress", "xdp-skb", "--metrics-addr", &metrics_addr]);

    // The port is blocked from the first failed try, although only busy (EBUSY): the first
    // `status` (the control socket answers once the agent has looked at the ports) shows
    // it blocked, and nothing of its passes in the 2 s a busy port once had to pass
    // unjudged; the others are attached.
    let blocked = unattached(&first, mgmt.host_port()).expect("listed from the first look at the ports");
    assert_eq!(blocked["state"], "blocked", "blocked at the first failed try, busy or not: {blocked:#}");
    assert_eq!(replies(&mgmt, web.ip(), 3), 0, "nothing passes while the port is only busy");
    assert!(blocked["error"].as_str().unwrap().contains("busy"), "the error says why: {blocked:#}");
    assert!(blocked["since"].as_str().is_some_and(|s| s.ends_with('Z')), "{blocked:#}");
    assert!(blocked["failing_since"].as_str().is_some_and(|s| s.ends_with('Z')), "{blocked:#}");
    assert!(attached(&first, web.host_port()) && attached(&first, db.host_port()));
    assert!(!attached(&first, mgmt.host_port()));
    let guard = first.status()["port_guard"].clone();
    assert_eq!(guard["in_place"], true, "{guard:#}");
    let table = guard["table"].as_str().unwrap().strip_prefix("bridge ").expect("a bridge table").to_owned();
    let _table_guard = NftTableGuard(table.clone());
    assert_eq!(guard_table(&table).0, [mgmt.host_port()], "the kernel's set holds the port");
    let text = String::from_utf8_lossy(&first.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("unattached ports (1):") && text.contains("BLOCKED since"), "{text}");
    assert!(text.contains(&format!("port guard:    nft table bridge {table}, 1 port(s) blocked")), "{text}");
    assert_eq!(ports_metric(metrics_port, "blocked"), 1);
    assert_eq!(ports_metric(metrics_port, "attached"), 2);
    assert_eq!(ports_metric(metrics_port, "unguarded"), 0);

    // On the wire: nothing of mgmt's leaves its port, nothing reaches it; the other two
    // VMs still talk.
    assert_eq!(replies(&web, db.ip(), 3), 3, "web -> db (allowed) passes");
    let (_, from_before, to_before) = guard_table(&table);
    let seen = frames_from(web.host_port(), &mgmt.mac_string(), || assert_eq!(replies(&mgmt, web.ip(), 3), 0));
    assert_eq!(seen, 0, "nothing mgmt sent reached web's port");
    let seen = frames_from(mgmt.host_port(), &web.mac_string(), || assert_eq!(replies(&web, mgmt.ip(), 3), 0));
    assert_eq!(seen, 0, "nothing web sent reached mgmt's port");
    let (_, from_after, to_after) = guard_table(&table);
    assert!(from_after > from_before, "the guard dropped what mgmt sent ({from_before} -> {from_after})");
    assert!(to_after > to_before, "the guard dropped what went to mgmt ({to_before} -> {to_after})");

    // Renamed (still matching --interfaces) while its VM pings every 10 ms: the set holds
    // the ifindex, so nothing passes at any moment (a set of names would let frames through
    // until the agent had put the new name in); `status` and the kernel's set follow the
    // new name. On kernels that refuse a live rename the port is down for the rename.
    let renamed = format!("{}x", mgmt.host_port());
    know_neighbour(&mgmt, &web);
    know_neighbour(&web, &mgmt);
    let seen = frames_from(web.host_port(), &mgmt.mac_string(), || {
        std::thread::scope(|s| {
            let pings = s.spawn(|| replies_every(&mgmt, web.ip(), 300, "0.01"));
            std::thread::sleep(Duration::from_secs(1));
            rename_link(mgmt.host_port(), &renamed);
            assert_eq!(pings.join().unwrap(), 0, "mgmt gets no reply while it is renamed");
        });
    });
    assert_eq!(seen, 0, "nothing mgmt sent reached web's port across the rename");
    let listed = wait_blocked(&first, &renamed);
    assert_eq!(unattached(&first, mgmt.host_port()), None, "listed under its new name only");
    assert_eq!(guard_table(&table).0, [renamed.as_str()], "the kernel's set shows the new name");
    assert_eq!(replies(&web, mgmt.ip(), 3), 0, "web -> mgmt is still cut off under the new name");
    assert_eq!(replies(&web, db.ip(), 3), 3, "web -> db (allowed) still passes");
    assert_eq!(listed["since"], blocked["since"], "blocked all along: {listed:#}");
    rename_link(&renamed, mgmt.host_port());
    wait_blocked(&first, mgmt.host_port());
    assert_eq!(replies(&mgmt, web.ip(), 2), 0, "still cut off under its first name");

    // Told once, not at every try (it has been tried every few seconds meanwhile).
    let log = first.child.output();
    let says = |needle: &str| log.lines().filter(|l| l.contains(mgmt.host_port()) && l.contains(needle)).count();
    assert_eq!(says("BLOCKED while rules are in force"), 1, "{log}");
    assert!(log.contains(&format!("is now named {renamed}: still blocked")), "{log}");

    // The agent dies: the table stays and mgmt stays cut off.
    first.kill_9();
    assert_eq!(guard_table(&table).0, [mgmt.host_port()], "the table outlives the agent");
    assert_eq!(replies(&mgmt, web.ip(), 2), 0, "mgmt stays cut off while no agent runs");

    // The next agent takes the table over: mgmt stays blocked without a gap, the agent
    // stays up, and once the other program is gone it attaches mgmt at its next try.
    let metrics_port = free_tcp_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut second = Agent::start(&lab, &["--rules", rules, "--ingress", "xdp-skb", "--metrics-addr", &metrics_addr]);
    assert!(second.child.output().contains("took over the nft table"), "{}", second.child.output());
    assert_eq!(guard_table(&table).0, [mgmt.host_port()], "still blocked under the new agent");
    wait_blocked(&second, mgmt.host_port());
    assert_eq!(replies(&mgmt, web.ip(), 2), 0, "still cut off under the new agent");
    assert!(second.child.try_wait().is_none(), "an unattachable port does not stop the agent");

    foreign.detach();
    // The port is attached first and leaves the guard's set right after (a moment in
    // which it is judged and still cut off: closed, never open).
    second.wait_for(Duration::from_secs(8), "mgmt attached at a retry and unblocked", |a| {
        (attached(a, mgmt.host_port()) && unattached(a, mgmt.host_port()).is_none()).then_some(())
    });
    second.wait_for(Duration::from_secs(3), "mgmt out of the kernel's set", |_| {
        guard_table(&table).0.is_empty().then_some(())
    });
    assert_eq!(replies(&mgmt, web.ip(), 3), 3, "mgmt -> web (allowed) passes once attached");
    assert_eq!(replies(&web, mgmt.ip(), 3), 3, "web -> mgmt (audit) passes once attached");
    let flows = second.flows();
    assert!(
        flows.iter().any(|f| f["src_ip"] == "10.50.0.1" && f["dst_ip"] == "10.30.0.1" && f["verdict"] == "allowed"),
        "mgmt's traffic is judged now: {flows:#?}"
    );
    assert_eq!(ports_metric(metrics_port, "blocked"), 0);
    assert_eq!(ports_metric(metrics_port, "attached"), 3);
    assert!(second.child.output().contains("is attached now: unblocked"), "{}", second.child.output());

    // --detach-on-exit removes the table.
    second.stop();
    assert!(!bridge_tables().contains(&table), "the agent removed its table on exit");
}

#[test]
fn an_unattached_port_is_only_reported_while_observing() {
    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let mgmt = lab.add_veth_vm("mgmt", "10.50.0.1/8", None, None);
    let _foreign = ForeignXdp::attach(mgmt.host_port());
    let agent = Agent::start(&lab, &["--ingress", "xdp-skb", "--metrics-addr", "none"]);

    // Busy for more than 2 s, it is listed, unguarded since nothing is enforced...
    let port = agent.wait_for(Duration::from_secs(10), "the port reported", |a| {
        unattached(a, mgmt.host_port()).filter(|p| p["reason"].as_str().is_some_and(|r| r.contains("observing only")))
    });
    assert_eq!(port["state"], "unguarded", "{port:#}");
    let text = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("UNGUARDED (observing only"), "{text}");
    // ... and its traffic passes: no table was made for it.
    assert_eq!(replies(&mgmt, web.ip(), 3), 3, "observing only: nothing is blocked");
    let guard = agent.status()["port_guard"].clone();
    let table = guard["table"].as_str().unwrap().strip_prefix("bridge ").expect("a bridge table").to_owned();
    assert_eq!(guard["in_place"], false, "{guard:#}");
    assert!(!bridge_tables().contains(&table), "no nft table while observing");
    let log = agent.child.output();
    assert_eq!(
        log.lines().filter(|l| l.contains(mgmt.host_port()) && l.contains("left uninspected")).count(),
        1,
        "{log}"
    );
    agent.stop();
}

#[test]
fn an_unattached_uplink_is_reported_not_cut_off_unless_asked() {
    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    // A host behind the uplink, in db's zone: web -> it is allowed (ICMP), it -> web denied.
    let remote = lab.add_uplink("remote", "10.40.0.9/8", None, None);
    let _foreign = ForeignXdp::attach(remote.host_port());
    let rules = copy_example_rules(&lab, "three-zones");
    let mut args =
        vec!["--rules", rules.to_str().unwrap(), "--uplink", remote.host_port(), "--uplink-ingress", "xdp-skb"];
    args.extend(["--metrics-addr", "none"]);
    let agent = Agent::start(&lab, &args);

    // Reported (once busy for 2 s it is said why it is not blocked), not cut off.
    let port = agent.wait_for(Duration::from_secs(10), "the uplink reported", |a| {
        unattached(a, remote.host_port())
            .filter(|p| p["reason"] == "uplink: judged at the VM ports' egress; not cut off")
    });
    assert_eq!((port["state"].as_str(), port["role"].as_str()), (Some("unguarded"), Some("uplink")), "{port:#}");
    assert!(attached(&agent, web.host_port()));
    let table = agent.status()["port_guard"]["table"].as_str().unwrap().strip_prefix("bridge ").unwrap().to_owned();
    let _table_guard = NftTableGuard(table.clone());
    assert!(!bridge_tables().contains(&table), "nothing to block: no nft table");
    assert_eq!(replies(&web, remote.ip(), 3), 3, "web -> db zone (allowed) crosses the unattached uplink");
    // What enters through it is judged where it leaves the switch, at web's egress.
    assert_eq!(replies(&remote, web.ip(), 3), 0, "db zone -> web (denied) is dropped at web's port");
    let denied =
        agent.wait_for(Duration::from_secs(5), "the denied flow", |a| a.find_flow("icmp", "10.40.0.9", "10.30.0.1"));
    assert_eq!(denied["verdict"], "denied", "{denied:#}");
    let text = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("UNGUARDED (uplink: judged at the VM ports' egress; not cut off)"), "{text}");
    let log = agent.child.output();
    let says = |needle: &str| log.lines().filter(|l| l.contains(remote.host_port()) && l.contains(needle)).count();
    assert_eq!(says("left uninspected at its ingress while rules are in force"), 1, "{log}");
    agent.stop();

    // --guard-uplinks: cut off as a VM port is, from the first failed try.
    args.push("--guard-uplinks");
    let agent = Agent::start(&lab, &args);
    let port = unattached(&agent, remote.host_port()).expect("listed from the first look at the ports");
    assert_eq!(port["state"], "blocked", "{port:#}");
    assert_eq!(guard_table(&table).0, [remote.host_port()], "the kernel's set holds the uplink");
    assert_eq!(replies(&web, remote.ip(), 3), 0, "the uplink is cut off");
    agent.stop();
    assert!(!bridge_tables().contains(&table), "the agent removed its table on exit");
}
