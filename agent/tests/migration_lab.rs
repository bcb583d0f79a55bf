//! Endpoints that move between nodes: two nodes (each a namespace with its own bridge,
//! joined by an uplink), one etcd on a management network, one agent per node started
//! with `ip netns exec`. A VM's port moves from one node to the other with its MAC and
//! address, then the VM announces itself with a RARP frame as QEMU does after a live
//! migration.

mod common;

use std::{
    io::{Read as _, Write as _},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use backplane_lab::{ChildGuard, MGMT_IP, Node, NodeLab, UPLINK_PORT, Vm};
use common::{agent::BACKPLANE, traffic::Stream};
use serde_json::Value;

const WEB_MAC: &str = "02:00:00:30:00:01";
const DB_MAC: &str = "02:00:00:40:00:01";

const ZONES: &str = "\
zones:
  web:
    members: [ { cidr: 10.30.0.0/24 } ]
  db:
    members: [ { cidr: 10.40.0.0/24 } ]
    DB_SETTINGS
  remediation:
    members: [ { cidr: 10.90.0.0/24 } ]
    remediation: true
policies:
  - name: web-to-db
    from: web
    to: db
    allow: [ { proto: tcp, ports: [5432] }, { proto: icmp } ]
endpoints:
  web:
    mac: \"02:00:00:30:00:01\"
    ips: [10.30.0.1]
  db:
    mac: \"02:00:00:40:00:01\"
    ips: [10.40.0.1]
    DB_PATCH
";

/// An agent on a node.
struct NodeAgent {
    child: ChildGuard,
    socket: PathBuf,
    name: String,
}

impl NodeAgent {
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BACKPLANE).args(args).arg("--socket").arg(&self.socket).output().expect("run backplane client")
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "backplane {} on {} failed: {}\nagent log:\n{}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr),
            self.child.output()
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    }

    fn status(&self) -> Value {
        self.json(&["status", "--json"])
    }

    fn endpoint(&self, name: &str) -> Value {
        let list = self.json(&["endpoint", "list", "--json"]);
        list.as_array().unwrap().iter().find(|e| e["name"] == name).cloned().unwrap_or(Value::Null)
    }

    fn audit(&self) -> Vec<Value> {
        self.json(&["audit", "--json"]).as_array().unwrap().clone()
    }

    fn wait_for<T>(&self, timeout: Duration, what: &str, mut f: impl FnMut(&Self) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out after {timeout:?} waiting for {what}\nagent log:\n{}",
                self.name,
                self.child.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Two nodes joined by an uplink, etcd on the management network, a rule set.
struct Cluster {
    lab: NodeLab,
    a: Node,
    b: Node,
    rules: PathBuf,
}

impl Cluster {
    fn new(db_settings: &str, db_patch: &str) -> Cluster {
        let lab = NodeLab::new("bp");
        let a = lab.add_node("nodea");
        let b = lab.add_node("nodeb");
        lab.connect(&a, &b);
        let rules = lab.work_dir().join("rules.yaml");
        std::fs::write(&rules, ZONES.replace("DB_SETTINGS", db_settings).replace("DB_PATCH", db_patch)).unwrap();
        Cluster { lab, a, b, rules }
    }

    fn etcd(&self) -> ChildGuard {
        self.lab.start_etcd().unwrap_or_else(|e| panic!("{e}"))
    }

    fn agent(&self, node: &Node, labels: &str, extra: &[&str]) -> NodeAgent {
        let work = self.lab.work_dir();
        let socket = work.join(format!("{}.sock", node.name()));
        let state = work.join(format!("state-{}", node.name()));
        let pins = format!("/sys/fs/bpf/backplane-test-{}-{}", self.lab.suffix(), node.name());
        let etcd = format!("http://{MGMT_IP}:2379");
        let port_glob = self.lab.port_glob();
        let mut args = vec![
            BACKPLANE,
            "run",
            "--node",
            node.name(),
            "--labels",
            labels,
            "--interfaces",
            &port_glob,
            "--uplink",
            UPLINK_PORT,
            "--socket",
            socket.to_str().unwrap(),
            "--pin-dir",
            &pins,
            "--state-dir",
            state.to_str().unwrap(),
            "--rules",
            self.rules.to_str().unwrap(),
            "--etcd",
            &etcd,
            "--detach-on-exit",
        ];
        args.extend_from_slice(extra);
        let child = node.spawn(&args);
        let agent = NodeAgent { child, socket, name: node.name().to_owned() };
        agent.wait_for(Duration::from_secs(30), "the control socket", |a| {
            (a.socket.exists() && a.cli(&["status", "--json"]).status.success()).then_some(())
        });
        agent.wait_for(Duration::from_secs(15), "etcd connected", |a| {
            (a.status()["endpoints"]["etcd"]["connected"] == true).then_some(())
        });
        agent
    }
}

/// An ARP-format frame (RARP 0x8035 or ARP 0x0806) from `mac`.
fn arp_frame(ethertype: u16, op: u16, mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(if op == 3 { &mac } else { &[0; 6] });
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}

/// QEMU's announcement after a live migration: RARP, opcode 3, sha = tha = the VM's MAC.
fn rarp(vm: &Vm) -> Vec<u8> {
    arp_frame(0x8035, 3, vm.mac(), [0; 4])
}

/// QEMU's self-announcement after a live migration: five RARP frames, the first right
/// away and the next ones 50, 150, 250 and 350 ms later (its defaults announce-initial
/// 50 ms, announce-step 100 ms, announce-rounds 5). One frame can race the port's
/// hand-over between the nodes' programs; the burst is what a real VM sends.
fn announce_like_qemu(vm: &Vm) {
    let frame = rarp(vm);
    for delay_ms in [0, 50, 100, 100, 100] {
        std::thread::sleep(Duration::from_millis(delay_ms));
        vm.send_raw_frames(std::slice::from_ref(&frame));
    }
}

/// A gratuitous ARP, as a guest sends when its interface comes up.
fn garp(vm: &Vm) -> Vec<u8> {
    arp_frame(0x0806, 1, vm.mac(), vm.ip().octets())
}

fn flow_of(agent: &NodeAgent, src: &str, dst: &str, dport: u16) -> Option<Value> {
    let flows = agent.json(&["flows", "--json"]);
    flows
        .as_array()?
        .iter()
        .find(|f| {
            f["proto"] == "tcp"
                && f["src_ip"] == src
                && f["dst_ip"] == dst
                && f["dst_port"] == dport
                && f["state"] == "active"
        })
        .cloned()
}

/// Boots web and db on node A, streams db -> web over web's connection, moves db to
/// node B; returns what the test needs to look at.
fn move_while_streaming(handover: bool) {
    let c = Cluster::new("", "");
    let _etcd = c.etcd();
    let extra: &[&str] = if handover { &[] } else { &["--no-flow-handover"] };
    let a = c.agent(&c.a, "jurisdiction=eu,rack=r1", extra);
    let b = c.agent(&c.b, "jurisdiction=eu,rack=r2", extra);
    let web = c.lab.add_vm(&c.a, "web", "10.30.0.1/8", Some(WEB_MAC));
    let db = c.lab.add_vm(&c.a, "db", "10.40.0.1/8", Some(DB_MAC));
    // The guests announce themselves as they come up.
    for vm in [&web, &db] {
        a.wait_for(Duration::from_secs(10), "the VM port attached", |a| {
            a.status()["ports"].as_array().unwrap().iter().any(|p| p["name"] == vm.host_port()).then_some(())
        });
        vm.send_raw_frames(&[garp(vm)]);
    }
    for name in ["web", "db"] {
        a.wait_for(Duration::from_secs(5), "the endpoint bound on A", |a| {
            (a.endpoint(name)["here"] == true).then_some(())
        });
    }
    // db streams to web over web's connection to db:5432.
    let stream = Stream::start(&web, &db, 5432);
    assert!(stream.progress(Duration::from_secs(2)) > 20_000, "db streams to web before the move");
    let on_a = a.wait_for(Duration::from_secs(5), "the flow on A", |a| flow_of(a, "10.30.0.1", "10.40.0.1", 5432));
    assert_eq!(on_a["verdict"], "allowed", "{on_a:#}");
    // Let A publish the flow (every second).
    std::thread::sleep(Duration::from_millis(1500));
    let a_rev = on_a["rev_bytes"].as_u64().unwrap();

    // The move: the port leaves A's bridge for B's, then the VM announces itself.
    c.lab.move_vm(&db, &c.a, &c.b);
    b.wait_for(Duration::from_secs(10), "db's port attached on B", |b| {
        b.status()["ports"].as_array().unwrap().iter().any(|p| p["name"] == db.host_port()).then_some(())
    });
    announce_like_qemu(&db);
    let record = b.wait_for(Duration::from_secs(5), "the move in B's audit log", |b| {
        b.audit().into_iter().find(|r| r["kind"] == "move" && r["endpoint"] == "db")
    });
    eprintln!("move record: {record}");
    assert_eq!(
        (record["from_node"].as_str(), record["to_node"].as_str()),
        (Some("nodea"), Some("nodeb")),
        "{record:#}"
    );
    assert_eq!(record["from_labels"]["rack"], "r1", "{record:#}");
    assert_eq!(record["to_labels"]["rack"], "r2", "{record:#}");
    assert_eq!(record["to_labels"]["jurisdiction"], "eu", "{record:#}");
    assert_eq!(b.status()["endpoints"]["moves"], 1);
    // The metrics say so too (each agent serves them on its node's own loopback).
    let metrics = backplane_lab::in_netns(c.b.netns(), || {
        let mut conn = std::net::TcpStream::connect("127.0.0.1:9469").expect("metrics on node B");
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
        let mut text = String::new();
        conn.read_to_string(&mut text).expect("response");
        text
    });
    assert!(metrics.contains("backplane_migrations_total{outcome=\"completed\"} 1"), "{metrics}");
    assert!(metrics.contains("backplane_endpoints{state=\"active\"}"), "{metrics}");

    std::thread::sleep(Duration::from_secs(1));
    let after = stream.progress(Duration::from_secs(3));
    if handover {
        assert!(record["flows_carried"].as_u64() >= Some(1), "{record:#}");
        let ms = record["handover_ms"].as_f64().expect("hand-over time");
        eprintln!("hand-over: RARP to flows installed in {ms:.2} ms");
        assert!(after > 20_000, "the connection carries data after the move ({after} bytes in 3 s)");
        let on_b = b.wait_for(Duration::from_secs(3), "the flow on B", |b| flow_of(b, "10.30.0.1", "10.40.0.1", 5432));
        eprintln!("flow on A before the move: {on_a}\nflow on B after the move: {on_b}");
        assert_eq!(
            (on_b["verdict"].as_str(), on_b["reason"].as_str()),
            (Some("allowed"), Some("migrated")),
            "{on_b:#}"
        );
        assert!(on_b["rev_bytes"].as_u64().unwrap() > a_rev, "B's record continues A's counters: {on_b:#} vs {a_rev}");
        assert!(on_b["first_seen_unix_ms"] == on_a["first_seen_unix_ms"], "one record across nodes: {on_b:#} {on_a:#}");
        assert_eq!(b.endpoint("db")["node"], "nodeb");
        a.wait_for(Duration::from_secs(5), "A to see db on B", |a| (a.endpoint("db")["node"] == "nodeb").then_some(()));
    } else {
        assert_eq!(record["flows_carried"], 0, "{record:#}");
        assert!(after < 5_000, "without hand-over the connection breaks: {after} bytes in 3 s after the move");
        let denied = b.json(&["flows", "--json"]);
        let denied = denied
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["src_ip"] == "10.40.0.1" && f["dst_ip"] == "10.30.0.1" && f["proto"] == "tcp")
            .cloned();
        let denied = denied.unwrap_or_else(|| panic!("B judged db's packets as a new flow db -> web"));
        assert_eq!(denied["verdict"], "denied", "{denied:#}");
    }
    drop(stream);
    drop((web, db));
    drop((a, b));
}

#[test]
fn a_vm_moves_between_nodes_while_it_streams_and_its_flow_follows() {
    move_while_streaming(true);
}

#[test]
fn without_flow_handover_the_moved_vm_connection_breaks() {
    move_while_streaming(false);
}

fn ping(from: &Vm, to: &Vm) -> bool {
    from.exec(&["ping", "-n", "-q", "-c", "2", "-i", "0.3", "-W", "1", &to.ip().to_string()]).status.success()
}

/// Boots `vm` on a node: its port is attached, then the guest announces itself.
fn boot(agent: &NodeAgent, vm: &Vm) {
    agent.wait_for(Duration::from_secs(10), "the VM port attached", |a| {
        a.status()["ports"].as_array().unwrap().iter().any(|p| p["name"] == vm.host_port()).then_some(())
    });
    vm.send_raw_frames(&[garp(vm)]);
}

/// Moves `vm` from node `from` to node `to` and announces it there with RARP.
fn migrate(c: &Cluster, vm: &Vm, from: &Node, to: &Node, dest: &NodeAgent) {
    c.lab.move_vm(vm, from, to);
    dest.wait_for(Duration::from_secs(10), "the port attached on the destination", |b| {
        b.status()["ports"].as_array().unwrap().iter().any(|p| p["name"] == vm.host_port()).then_some(())
    });
    announce_like_qemu(vm);
    dest.wait_for(Duration::from_secs(5), "the move in the audit log", |b| {
        b.audit().into_iter().find(|r| r["kind"] == "move" && r["endpoint"] == vm.name())
    });
}

#[test]
fn a_move_to_a_node_outside_the_zone_placement_raises_an_alert_and_isolates() {
    let c = Cluster::new("placement: { jurisdiction: [eu] }\n    on_violation: isolate", "");
    let _etcd = c.etcd();
    let a = c.agent(&c.a, "jurisdiction=eu", &[]);
    let b = c.agent(&c.b, "jurisdiction=us", &[]);
    let web = c.lab.add_vm(&c.a, "web", "10.30.0.1/8", Some(WEB_MAC));
    let db = c.lab.add_vm(&c.a, "db", "10.40.0.1/8", Some(DB_MAC));
    boot(&a, &web);
    boot(&a, &db);
    a.wait_for(Duration::from_secs(5), "db bound on A", |a| (a.endpoint("db")["here"] == true).then_some(()));
    assert!(ping(&web, &db), "web reaches db on an EU node");
    assert_eq!(a.endpoint("db")["state"], "active");

    migrate(&c, &db, &c.a, &c.b, &b);
    let violation = b.wait_for(Duration::from_secs(5), "the placement violation in the audit log", |b| {
        b.audit().into_iter().find(|r| r["kind"] == "placement_violation" && r["endpoint"] == "db")
    });
    eprintln!("violation: {violation}");
    assert!(violation["detail"].as_str().unwrap().contains("jurisdiction=us"), "{violation:#}");
    let status = b.status();
    let alerts = status["endpoints"]["alerts"].as_array().unwrap();
    assert!(alerts.iter().any(|a| a.as_str().unwrap().contains("placement")), "{alerts:#?}");
    assert_eq!(status["endpoints"]["isolated"], 1, "{:#}", status["endpoints"]);
    let info = b.endpoint("db");
    assert_eq!(info["state"], "isolated", "{info:#}");
    assert!(!ping(&web, &db), "an isolated VM's traffic stops");
    assert!(!ping(&db, &web), "an isolated VM's traffic stops both ways");
    drop((web, db));
}

fn today() -> String {
    let out = Command::new("date").args(["-u", "+%F"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn an_old_patch_is_quarantined_on_boot_and_on_arrival_until_attested() {
    let c = Cluster::new("max_patch_age: 30d", "patched_at: 2020-01-01");
    let _etcd = c.etcd();
    let a = c.agent(&c.a, "jurisdiction=eu", &[]);
    let b = c.agent(&c.b, "jurisdiction=eu", &[]);
    let web = c.lab.add_vm(&c.a, "web", "10.30.0.1/8", Some(WEB_MAC));
    let db = c.lab.add_vm(&c.a, "db", "10.40.0.1/8", Some(DB_MAC));
    let fixer = c.lab.add_vm(&c.a, "fixer", "10.90.0.1/8", None);
    boot(&a, &web);
    boot(&a, &db);
    // On boot: quarantined, reaching only the remediation zone.
    let info =
        a.wait_for(Duration::from_secs(5), "db bound on A", |a| Some(a.endpoint("db")).filter(|e| e["here"] == true));
    assert_eq!(info["state"], "quarantined", "{info:#}");
    assert!(info["reasons"][0].as_str().unwrap().contains("patched 2020-01-01"), "{info:#}");
    assert!(!ping(&web, &db), "web cannot reach a quarantined db");
    assert!(ping(&db, &fixer), "a quarantined db reaches the remediation zone");
    assert!(a.audit().iter().any(|r| r["kind"] == "quarantined" && r["endpoint"] == "db"));

    // On arrival: still quarantined.
    migrate(&c, &db, &c.a, &c.b, &b);
    let info = b.endpoint("db");
    assert_eq!((info["state"].as_str(), info["node"].as_str()), (Some("quarantined"), Some("nodeb")), "{info:#}");
    assert!(b.audit().iter().any(|r| r["kind"] == "move" && r["state"] == "quarantined"));
    assert!(!ping(&web, &db), "still quarantined after the move");
    assert!(ping(&db, &fixer), "the remediation zone is still reachable after the move");

    // Attested: released, here and (through etcd) on the other node.
    let out = b.cli(&["endpoint", "attest", "db", "--patched-at", &today()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(b.endpoint("db")["state"], "active");
    a.wait_for(Duration::from_secs(5), "A to see the attestation", |a| {
        (a.endpoint("db")["state"] == "active").then_some(())
    });
    assert!(ping(&web, &db), "web reaches db once it is attested");
    assert!(b.audit().iter().any(|r| r["kind"] == "released" && r["endpoint"] == "db"));
    drop((web, db, fixer));
}

#[test]
fn enforcement_goes_on_without_etcd_and_agents_reconnect() {
    let c = Cluster::new("", "");
    let mut etcd = c.etcd();
    let a = c.agent(&c.a, "jurisdiction=eu", &[]);
    let b = c.agent(&c.b, "jurisdiction=eu", &[]);
    let web = c.lab.add_vm(&c.a, "web", "10.30.0.1/8", Some(WEB_MAC));
    let db = c.lab.add_vm(&c.b, "db", "10.40.0.1/8", Some(DB_MAC));
    boot(&a, &web);
    boot(&b, &db);
    assert!(ping(&web, &db), "web -> db is allowed across nodes");
    assert!(!ping(&db, &web), "db -> web is denied");

    etcd.stop();
    for agent in [&a, &b] {
        agent.wait_for(Duration::from_secs(10), "etcd seen as gone", |x| {
            (x.status()["endpoints"]["etcd"]["connected"] == false).then_some(())
        });
    }
    assert!(ping(&web, &db), "allowed keeps working without etcd");
    assert!(!ping(&db, &web), "denied stays denied without etcd");
    let text = String::from_utf8_lossy(&a.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("DISCONNECTED"), "{text}");

    let _etcd = c.etcd();
    for agent in [&a, &b] {
        let s = agent.wait_for(Duration::from_secs(15), "etcd back", |x| {
            let s = x.status()["endpoints"]["etcd"].clone();
            (s["connected"] == true).then_some(s)
        });
        assert!(s["reconnects"].as_u64() >= Some(1), "{s:#}");
    }
    assert!(ping(&web, &db), "allowed after etcd returned");
    assert!(!ping(&db, &web), "denied after etcd returned");
    drop((web, db));
}

#[test]
fn a_vm_on_another_node_cannot_claim_an_address_bound_elsewhere() {
    let c = Cluster::new("", "");
    let _etcd = c.etcd();
    let a = c.agent(&c.a, "jurisdiction=eu,rack=r1", &[]);
    let b = c.agent(&c.b, "jurisdiction=eu,rack=r2", &[]);
    let web = c.lab.add_vm(&c.a, "web", "10.30.0.1/8", Some(WEB_MAC));
    a.wait_for(Duration::from_secs(10), "web's port attached", |a| {
        a.status()["ports"].as_array().unwrap().iter().any(|p| p["name"] == web.host_port()).then_some(())
    });
    web.send_raw_frames(&[garp(&web)]);
    // Node B learns through etcd where web is bound.
    b.wait_for(Duration::from_secs(10), "web located on node A", |b| {
        (b.endpoint("web")["node"] == "nodea").then_some(())
    });
    let attacker = c.lab.add_vm(&c.b, "att", "10.40.0.66/8", None);
    b.wait_for(Duration::from_secs(10), "the attacker's port attached", |b| {
        b.status()["ports"].as_array().unwrap().iter().any(|p| p["name"] == attacker.host_port()).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));

    // The attacker claims web's address (ARP) and sends from it, with its own MAC.
    let web_ip = [10, 30, 0, 1];
    let claim = arp_frame(0x0806, 2, attacker.mac(), web_ip);
    let mut from_web = vec![0xff; 6];
    from_web.extend_from_slice(&attacker.mac());
    from_web.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&web_ip);
    ip.extend_from_slice(&[10, 40, 0, 1]);
    ip.extend_from_slice(&[0x9c, 0x40, 0x15, 0x38, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    from_web.extend_from_slice(&ip);
    let before = b.status()["counters"]["spoofed_address"].as_u64().unwrap();
    attacker.send_raw_frames(&[claim, from_web]);
    let counted = b.wait_for(Duration::from_secs(3), "both frames counted", |b| {
        let n = b.status()["counters"]["spoofed_address"].as_u64().unwrap() - before;
        (n >= 2).then_some(n)
    });
    assert_eq!(counted, 2, "node B drops the frames that claim an address bound on node A");
    // Its own address is its own.
    attacker.send_raw_frames(&[garp(&attacker)]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        b.status()["counters"]["spoofed_address"].as_u64().unwrap() - before,
        2,
        "its own address is no spoofing"
    );
    drop(attacker);
    drop(web);
}

/// Echo requests from `src` (an IPv4 address) among captured packets.
fn echo_requests_from(packets: &[backplane_lab::Packet], src: [u8; 4]) -> usize {
    packets
        .iter()
        .filter(|p| p.is_icmp_echo() && p.ethertype() == Some(0x0800))
        .filter(|p| p.data.get(26..30) == Some(&src[..]) && p.data.get(34) == Some(&8))
        .count()
}

/// A guest on node B takes the MAC of db, bound on node A, on a fresh port: its port
/// locks to that MAC on first use and announces it as QEMU does after a migration. That
/// is the guest's word only, and node A still has db's port: nothing moves (no binding,
/// no flow, A keeps db), and what node B's switch delivers to the claiming port for db is
/// not delivered. Once the claimer is gone and db really moves (its port leaves A), the
/// same announcement is a move and db's stream goes on.
#[test]
fn a_claim_of_an_endpoint_another_node_holds_moves_nothing_until_that_node_lets_go() {
    let c = Cluster::new("", "");
    let _etcd = c.etcd();
    let a = c.agent(&c.a, "jurisdiction=eu,rack=r1", &[]);
    let b = c.agent(&c.b, "jurisdiction=eu,rack=r2", &[]);
    let web = c.lab.add_vm(&c.a, "web", "10.30.0.1/8", Some(WEB_MAC));
    let db = c.lab.add_vm(&c.a, "db", "10.40.0.1/8", Some(DB_MAC));
    boot(&a, &web);
    boot(&a, &db);
    for name in ["web", "db"] {
        a.wait_for(Duration::from_secs(5), "the endpoint bound on A", |a| {
            (a.endpoint(name)["here"] == true).then_some(())
        });
    }
    b.wait_for(Duration::from_secs(10), "db located on node A", |b| {
        (b.endpoint("db")["node"] == "nodea").then_some(())
    });
    let web2 = c.lab.add_vm(&c.b, "web2", "10.30.0.2/8", Some("02:00:00:30:00:02"));
    boot(&b, &web2);
    assert!(ping(&web2, &db), "positive control: web2 on B pings db on A");
    let stream = Stream::start(&web, &db, 5432);
    assert!(stream.progress(Duration::from_secs(2)) > 20_000, "db streams to web before the claim");

    // The claimer: a fresh VM on B whose interface has db's MAC (another address).
    let att = c.lab.add_vm(&c.b, "att", "10.40.0.66/8", Some(DB_MAC));
    b.wait_for(Duration::from_secs(10), "the claimer's port attached", |b| {
        b.status()["ports"].as_array().unwrap().iter().any(|p| p["name"] == att.host_port()).then_some(())
    });
    let at_att = att.capture(Some("icmp"));
    announce_like_qemu(&att);
    // Time for whatever the agents do with it (B asks etcd, A would see a move).
    std::thread::sleep(Duration::from_millis(1500));
    // While the claimer keeps B's switch pointing db's MAC at its port, web2 pings db.
    let pinger = std::thread::spawn({
        let (netns, dst) = (web2.netns().to_owned(), db.ip().to_string());
        move || {
            Command::new("ip")
                .args(["netns", "exec", &netns, "ping", "-n", "-q", "-c", "6", "-i", "0.2", "-W", "1", &dst])
                .output()
        }
    });
    for _ in 0..8 {
        att.send_raw_frames(&[garp(&att)]);
        std::thread::sleep(Duration::from_millis(150));
    }
    let _ = pinger.join();
    std::thread::sleep(Duration::from_millis(300));
    let stolen = echo_requests_from(&at_att.stop(), [10, 30, 0, 2]);
    assert_eq!(stolen, 0, "no echo request for db delivered to the claimer");
    let after_claim = stream.progress(Duration::from_secs(3));
    assert!(after_claim > 20_000, "db's stream on A goes on during the claim ({after_claim} bytes in 3 s)");
    assert!(
        b.audit().iter().all(|r| !(r["kind"] == "move" && r["endpoint"] == "db")),
        "B took no move: {:#?}",
        b.audit()
    );
    assert_eq!(a.endpoint("db")["here"], true, "A still holds db: {:#}", a.endpoint("db"));
    assert_eq!(b.endpoint("db")["node"], "nodea", "B still places db on A: {:#}", b.endpoint("db"));
    assert_eq!(a.status()["endpoints"]["moves"], 0);

    let held = b.wait_for(Duration::from_secs(5), "the claim held in B's audit log", |b| {
        b.audit().into_iter().find(|r| r["kind"] == "claim_held" && r["endpoint"] == "db")
    });
    eprintln!("held: {held}");
    assert_eq!(held["from_node"], "nodea", "{held:#}");
    // db really moves (its port leaves A, then it announces itself) while the claimer
    // still squats its MAC on B: the release is db's, not the claimer's.
    let at_att = att.capture(Some("icmp"));
    migrate(&c, &db, &c.a, &c.b, &b);
    let after_move = stream.progress(Duration::from_secs(3));
    assert!(after_move > 20_000, "the stream goes on after the real move ({after_move} bytes in 3 s)");
    assert!(ping(&web2, &db), "web2 pings db, now beside it on B");
    let stolen = echo_requests_from(&at_att.stop(), [10, 30, 0, 2]);
    assert_eq!(stolen, 0, "nothing for db delivered to the claimer after the move");
    let bound_port = b.endpoint("db")["port"].clone();
    assert_eq!(bound_port, db.host_port(), "db is bound to its own port on B: {:#}", b.endpoint("db"));
    drop(att);
    a.wait_for(Duration::from_secs(5), "A to see db on B", |a| (a.endpoint("db")["node"] == "nodeb").then_some(()));
    drop(stream);
    drop((web, db, web2));
    drop((a, b));
}
