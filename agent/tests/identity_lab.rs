//! Hostile guests against identity from the host (issue 13), on the wire. Each VM is a
//! network namespace behind a port of the lab's bridge; the hostile one writes its frames
//! with a real packet tool (scapy, in its namespace, as a root guest would), and the
//! oracle is what the victim receives: a capture on the victim's own `eth0`, or a
//! listener in the victim VM. Nothing here asks the agent who a sender is. Beside every
//! negative check, the same tool sends an allowed frame that does arrive (the positive
//! control: the frames are well made, the capture works, the path is open).
//!
//! A check that fails is a breach. A test notes every breach it sees before it fails, so
//! that one run shows all that got through.

mod common;

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use backplane_lab::{Capture, Lab, Packet, Vm};
use common::{
    agent::{Agent, copy_example_rules},
    frames::arp,
    scapy::{self, mac},
    traffic::connects,
};
use serde_json::Value;

/// The attacker, a web VM (10.30.0.10).
const ATT_MAC: &str = "52:54:00:30:00:0a";
/// A second web VM (10.30.0.2), a victim in the attacker's own zone.
const WEB2_MAC: &str = "52:54:00:30:00:02";
/// The database (10.40.0.1).
const DB_MAC: &str = "52:54:00:40:00:01";
/// A second database (10.40.0.2).
const DB2_MAC: &str = "52:54:00:40:00:02";
/// An administrator's VM (10.50.0.5), in mgmt.
const ADMIN_MAC: &str = "52:54:00:50:00:05";
/// A `mac:` member of mgmt that no VM here has.
const MGMT_MEMBER_MAC: &str = "52:54:00:50:00:aa";
/// The gateway, behind the uplink (10.30.0.254, `fd00:30::fe`).
const GW_MAC: &str = "52:54:00:fe:00:01";

/// Breaches seen so far: a test notes each check and fails at its end with all of them.
#[derive(Default)]
struct Breaches(Vec<String>);

impl Breaches {
    /// Notes the outcome of a check that must `hold`.
    fn check(&mut self, held: bool, what: impl Into<String>) {
        let what = what.into();
        if held {
            eprintln!("held:   {what}");
        } else {
            eprintln!("BREACH: {what}");
            self.0.push(what);
        }
    }

    fn assert_none(self) {
        assert!(self.0.is_empty(), "{} breach(es):\n  {}", self.0.len(), self.0.join("\n  "));
    }
}

/// A lab VM, its prefixes wide enough that every zone is on-link. `tap`: a real tap
/// port, fed as QEMU feeds one (the hostile guests have one).
fn add_vm(lab: &Lab, tap: bool, name: &str, ip4: &str, ip6: Option<&str>, mac: &str) -> Vm {
    if tap { lab.add_tap_vm(name, ip4, ip6, Some(mac)) } else { lab.add_veth_vm(name, ip4, ip6, Some(mac)) }
}

/// `rules/examples/three-zones` in the lab, with `mgmt_members` appended to mgmt's
/// members (the last list of zones.yaml) and `extra` as a file of its own.
fn three_zones(lab: &Lab, mgmt_members: &str, extra: &str) -> PathBuf {
    let dir = copy_example_rules(lab, "three-zones");
    if !mgmt_members.is_empty() {
        let zones = dir.join("zones.yaml");
        let text = std::fs::read_to_string(&zones).expect("read zones.yaml");
        std::fs::write(&zones, text + mgmt_members).expect("write zones.yaml");
    }
    if !extra.is_empty() {
        std::fs::write(dir.join("extra.yaml"), extra).expect("write extra.yaml");
    }
    dir
}

fn start_agent(lab: &Lab, rules: &std::path::Path, extra: &[&str]) -> Agent {
    let mut args = vec!["--rules", rules.to_str().unwrap()];
    args.extend_from_slice(extra);
    Agent::start(lab, &args)
}

/// The VM comes up: a gratuitous ARP for its own address, as a guest sends when its
/// interface comes up.
fn boot(vm: &Vm) {
    let ip = vm.ip().octets();
    vm.send_raw_frames(&[arp(0x0806, 1, vm.mac(), ip, ip)]);
}

/// The host binds `vm`'s port (as the libvirt hook does): to the inventory endpoint
/// `name`, or to the VM's MAC.
fn host_bind(agent: &Agent, vm: &Vm, name: Option<&str>) {
    let mac = vm.mac_string();
    let mut args = vec!["endpoint", "bind"];
    match name {
        Some(name) => args.push(name),
        None => args.extend(["--mac", mac.as_str()]),
    }
    args.extend(["--port", vm.host_port()]);
    let out = agent.cli(&args);
    assert!(
        out.status.success(),
        "backplane {}: {}\nagent log:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        agent.child.output()
    );
}

/// Setup, not an oracle: waits until the agent lists endpoint `name` on `vm`'s port in
/// `state`.
fn wait_bound(agent: &Agent, name: &str, vm: &Vm, state: &str) {
    let port = vm.host_port().to_owned();
    agent.wait_for(Duration::from_secs(5), &format!("{name} {state} on {port}"), |a| {
        let list = a.cli_json(&["endpoint", "list", "--json"]);
        list.as_array()?
            .iter()
            .find(|e| e["name"] == name && e["port"] == port.as_str() && e["state"] == state)
            .map(|_| ())
    });
}

/// Prints the agent's drop counters that concern identity (diagnostics, not an oracle).
fn show_counters(agent: &Agent, when: &str) {
    let status = agent.status();
    let names = [
        "spoofed",
        "spoofed_mac",
        "spoofed_address",
        "to_own_mac",
        "egress_judged",
        "egress_denied",
        "unbound_port",
        "dropped",
    ];
    let shown: Vec<String> = names
        .iter()
        .filter_map(|n| status["counters"].get(*n).and_then(Value::as_u64).map(|v| format!("{n}={v}")))
        .collect();
    eprintln!("counters {when}: {}", shown.join(" "));
}

/// Prints the agent's flow records whose text mentions `needle` (diagnostics for the
/// report of a breach, not an oracle).
fn show_flows(agent: &Agent, needle: &str) {
    for flow in agent.flows() {
        let text = flow.to_string();
        if text.contains(needle) {
            eprintln!("flow: {text}");
        }
    }
}

/// Waits for what is on its way, then stops the capture.
fn settle(capture: Capture) -> Vec<Packet> {
    std::thread::sleep(Duration::from_millis(400));
    capture.stop()
}

/// The transport fields of a captured IPv4 or IPv6 (no extension headers) frame.
#[derive(Debug)]
struct Seen {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: String,
    dst: String,
    proto: u8,
    sport: u16,
    dport: u16,
    payload: Vec<u8>,
}

fn seen(p: &Packet) -> Option<Seen> {
    let d = &p.data;
    let (src_mac, dst_mac) = (d.get(6..12)?.try_into().ok()?, d.get(0..6)?.try_into().ok()?);
    let (src, dst, proto, l4) = match p.ethertype()? {
        0x0800 => {
            let ihl = usize::from(d.get(14)? & 0x0f) * 4;
            let a = |at: usize| Some(Ipv4Addr::from(<[u8; 4]>::try_from(d.get(at..at + 4)?).ok()?).to_string());
            (a(26)?, a(30)?, *d.get(23)?, 14 + ihl)
        }
        0x86dd => {
            let a = |at: usize| Some(Ipv6Addr::from(<[u8; 16]>::try_from(d.get(at..at + 16)?).ok()?).to_string());
            (a(22)?, a(38)?, *d.get(20)?, 54)
        }
        _ => return None,
    };
    let port = |at: usize| d.get(at..at + 2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let (sport, dport) = if matches!(proto, 6 | 17) { (port(l4), port(l4 + 2)) } else { (0, 0) };
    let header = match proto {
        6 => d.get(l4 + 12).map_or(20, |b| usize::from(b >> 4) * 4),
        17 | 1 | 58 => 8,
        _ => 0,
    };
    let payload = d.get(l4 + header..).unwrap_or_default().to_vec();
    Some(Seen { src_mac, dst_mac, src, dst, proto, sport, dport, payload })
}

/// The TCP segments in `packets` from source port `sport`.
fn from_sport(packets: &[Packet], sport: u16) -> usize {
    packets.iter().filter_map(seen).filter(|s| s.proto == 6 && s.sport == sport).count()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The VM's IPv6 link-local address (from its MAC; the kernel made it).
fn link_local(vm: &Vm) -> String {
    let out = vm.run(&["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]);
    out.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no link-local address in {}: {out}", vm.name()))
        .to_owned()
}

/// A TCP service in `vm` on every address (IPv4 and IPv6) at `port`.
fn listen(vm: &Vm, port: u16) -> TcpListener {
    vm.in_netns(|| TcpListener::bind(("::", port))).unwrap_or_else(|e| panic!("listen on {}:{port}: {e}", vm.name()))
}

/// A UDP service in `vm` on every address at `port`.
fn udp_service(vm: &Vm, port: u16) -> UdpSocket {
    let socket =
        vm.in_netns(|| UdpSocket::bind(("::", port))).unwrap_or_else(|e| panic!("udp on {}:{port}: {e}", vm.name()));
    socket.set_read_timeout(Some(Duration::from_millis(300))).expect("read timeout");
    socket
}

/// What the UDP service received until it was quiet for a moment.
fn datagrams(socket: &UdpSocket) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = socket.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

/// Whether the guest's own TCP (python's socket module in the VM) connects from
/// `src`:`sport` to `dst`:`dport` within 1.5 s. Addresses as text; a link-local one
/// with `%eth0`.
fn tcp_connects(vm: &Vm, src: &str, sport: u16, dst: &str, dport: u16) -> bool {
    let code = format!(
        "import socket, sys
src = socket.getaddrinfo('{src}', {sport}, 0, socket.SOCK_STREAM)[0]
dst = socket.getaddrinfo('{dst}', {dport}, 0, socket.SOCK_STREAM)[0]
s = socket.socket(dst[0], socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(src[4])
s.settimeout(1.5)
try:
    s.connect(dst[4])
except OSError as e:
    print('no connection:', e)
    sys.exit(3)
print('connected')
"
    );
    let out = vm.exec(&[scapy::PYTHON, "-c", &code]);
    let ok = out.status.success();
    eprintln!("{}: tcp {src}:{sport} -> {dst}:{dport}: {}", vm.name(), String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        ok || out.status.code() == Some(3),
        "the connect script failed in {}: {}",
        vm.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    ok
}

/// Accepts one connection within `wait`.
fn accept_within(listener: &TcpListener, wait: Duration) -> Option<TcpStream> {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                return Some(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return None,
        }
    }
}

/// Whether `text` crosses from `from` to `to` within a second.
fn carries(from: &mut TcpStream, to: &mut TcpStream, text: &[u8]) -> bool {
    to.set_read_timeout(Some(Duration::from_secs(1))).expect("read timeout");
    if from.write_all(text).is_err() {
        return false;
    }
    let mut got = vec![0u8; text.len()];
    to.read_exact(&mut got).is_ok() && got == text
}

#[test]
fn a_vm_sending_from_an_unused_address_of_another_zone_reaches_nothing_that_zone_may() {
    let lab = Lab::new("bp");
    let att = add_vm(&lab, true, "att", "10.30.0.10/8", Some("fd00:30::10/16"), ATT_MAC);
    let db = add_vm(&lab, false, "db", "10.40.0.1/8", Some("fd00:40::1/16"), DB_MAC);
    let rules = three_zones(&lab, "", "");
    let agent = start_agent(&lab, &rules, &[]);
    // The attacker's port learns it (its first frame is honest); the host binds db's
    // before db boots, as the libvirt hook does when it starts a VM.
    host_bind(&agent, &db, None);
    boot(&att);
    boot(&db);
    let _ssh = listen(&db, 22);
    let _pg = listen(&db, 5432);
    let mut breaches = Breaches::default();

    // Positive control, the guest's own TCP: web reaches db:5432.
    assert!(tcp_connects(&att, "10.30.0.10", 41000, "10.40.0.1", 5432), "positive control: web -> db:5432 connects");
    show_counters(&agent, "before");

    // Unused mgmt addresses (mgmt may reach db on 22, 5432 and 9100-9110).
    let db_mac = DB_MAC;
    let capture = db.capture(Some("tcp"));
    scapy::sendp(
        &att,
        &[
            format!(
                "Ether(dst='{db_mac}')/IP(src='10.30.0.10', dst='10.40.0.1')/TCP(sport=41001, dport=5432, flags='S')"
            ),
            format!(
                "Ether(dst='{db_mac}')/IP(src='10.50.0.77', dst='10.40.0.1')/TCP(sport=41002, dport=22, flags='S')"
            ),
            format!(
                "Ether(dst='{db_mac}')/IP(src='10.50.0.77', dst='10.40.0.1')/TCP(sport=41003, dport=9100, flags='S')"
            ),
            format!(
                "Ether(dst='{db_mac}')/IPv6(src='fd00:50::77', dst='fd00:40::1')/TCP(sport=41004, dport=22, flags='S')"
            ),
        ],
    );
    let at_db = settle(capture);
    assert!(from_sport(&at_db, 41001) > 0, "positive control: the SYN from web's own address reaches db:5432");
    breaches.check(from_sport(&at_db, 41002) == 0, "SYN from unused 10.50.0.77 (mgmt) to db:22 not delivered");
    breaches.check(from_sport(&at_db, 41003) == 0, "SYN from unused 10.50.0.77 (mgmt) to db:9100 not delivered");
    breaches.check(from_sport(&at_db, 41004) == 0, "SYN from unused fd00:50::77 (mgmt) to db:22 not delivered");

    // The guest takes the address for itself and connects with its own TCP.
    att.run(&["ip", "addr", "add", "10.50.0.77/8", "dev", "eth0"]);
    breaches.check(
        !tcp_connects(&att, "10.50.0.77", 41005, "10.40.0.1", 22),
        "a connection from unused 10.50.0.77 to db:22 does not open",
    );
    assert!(
        tcp_connects(&att, "10.30.0.10", 41006, "10.40.0.1", 5432),
        "positive control: from its own address, web still connects to db:5432"
    );
    show_counters(&agent, "after");
    agent.stop();
    breaches.assert_none();
}

/// Rules for quarantine and isolation: web quarantines endpoints patched more than 30
/// days ago, dmz may run only in the eu and isolates endpoints elsewhere (the agent runs
/// with `jurisdiction=us`). Both may reach db on tcp/5432.
const STANDING_RULES: &str = r#"
zones:
  web:
    members: [ { cidr: 10.30.0.0/24 } ]
    max_patch_age: 30d
  db:
    members: [ { cidr: 10.40.0.0/24 } ]
    intra_zone: deny
  dmz:
    members: [ { cidr: 10.60.0.0/24 } ]
    placement: { jurisdiction: [eu] }
    on_violation: isolate
  remediation:
    members: [ { cidr: 10.90.0.0/24 } ]
    remediation: true
policies:
  - name: web-to-db
    from: web
    to: db
    allow: [ { proto: tcp, ports: [5432] } ]
  - name: dmz-to-db
    from: dmz
    to: db
    allow: [ { proto: tcp, ports: [5432] } ]
endpoints:
  web-stale:
    mac: "52:54:00:30:00:0a"
    ips: [10.30.0.10]
    patched_at: 2020-01-01
  web-fresh:
    mac: "52:54:00:30:00:0b"
    ips: [10.30.0.11]
    patched_at: TODAY
  dmz-1:
    mac: "52:54:00:60:00:01"
    ips: [10.60.0.1]
"#;

#[test]
fn quarantined_and_isolated_vms_that_change_their_mac_stay_quarantined_and_isolated() {
    let lab = Lab::new("bp");
    let stale = add_vm(&lab, true, "stale", "10.30.0.10/8", None, "52:54:00:30:00:0a");
    let iso = add_vm(&lab, true, "iso", "10.60.0.1/8", None, "52:54:00:60:00:01");
    let fresh = add_vm(&lab, false, "fresh", "10.30.0.11/8", None, "52:54:00:30:00:0b");
    let db = add_vm(&lab, false, "db", "10.40.0.1/8", None, DB_MAC);
    let fix = add_vm(&lab, false, "fix", "10.90.0.1/8", None, "52:54:00:90:00:01");
    let today = String::from_utf8(std::process::Command::new("date").args(["-u", "+%F"]).output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned();
    let rules = lab.work_dir().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("rules.yaml"), STANDING_RULES.replace("TODAY", &today)).unwrap();
    let agent = start_agent(&lab, &rules, &["--node", "n1", "--labels", "jurisdiction=us"]);
    for vm in [&stale, &iso, &fresh, &db, &fix] {
        boot(vm);
    }
    host_bind(&agent, &stale, Some("web-stale"));
    host_bind(&agent, &iso, Some("dmz-1"));
    host_bind(&agent, &fresh, Some("web-fresh"));
    wait_bound(&agent, "web-stale", &stale, "quarantined");
    wait_bound(&agent, "dmz-1", &iso, "isolated");
    wait_bound(&agent, "web-fresh", &fresh, "active");
    let _pg = listen(&db, 5432);
    let _fix_ssh = listen(&fix, 22);
    let mut breaches = Breaches::default();

    // As they are: a healthy web endpoint reaches db:5432; the quarantined one only the
    // remediation zone; the isolated one nothing.
    assert!(
        tcp_connects(&fresh, "10.30.0.11", 45010, "10.40.0.1", 5432),
        "positive control: a patched web endpoint connects to db:5432"
    );
    assert!(
        tcp_connects(&stale, "10.30.0.10", 45011, "10.90.0.1", 22),
        "positive control: the quarantined endpoint reaches remediation"
    );
    assert!(
        !tcp_connects(&stale, "10.30.0.10", 45012, "10.40.0.1", 5432),
        "precondition: the quarantined endpoint does not reach db:5432"
    );
    assert!(
        !tcp_connects(&iso, "10.60.0.1", 45013, "10.40.0.1", 5432),
        "precondition: the isolated endpoint does not reach db:5432"
    );
    show_counters(&agent, "before");

    // Both guests change their MAC and say so (a gratuitous ARP from the new MAC).
    for (vm, new_mac) in [(&stale, "52:54:00:30:00:fa"), (&iso, "52:54:00:60:00:fa")] {
        vm.run(&["ip", "link", "set", "dev", "eth0", "address", new_mac]);
        let ip = vm.ip();
        scapy::sendp(
            vm,
            &[format!(
                "Ether(src='{new_mac}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=1, hwsrc='{new_mac}', psrc='{ip}', pdst='{ip}')"
            )],
        );
    }
    let capture = db.capture(Some("tcp dst port 5432"));
    scapy::sendp(
        &stale,
        &[
            "Ether(dst='52:54:00:40:00:01')/IP(src='10.30.0.10', dst='10.40.0.1')/TCP(sport=45001, dport=5432, flags='S')",
        ],
    );
    scapy::sendp(
        &iso,
        &[
            "Ether(dst='52:54:00:40:00:01')/IP(src='10.60.0.1', dst='10.40.0.1')/TCP(sport=45002, dport=5432, flags='S')",
        ],
    );
    scapy::sendp(
        &fresh,
        &[
            "Ether(dst='52:54:00:40:00:01')/IP(src='10.30.0.11', dst='10.40.0.1')/TCP(sport=45003, dport=5432, flags='S')",
        ],
    );
    let at_db = settle(capture);
    assert!(from_sport(&at_db, 45003) > 0, "positive control: the patched endpoint's SYN reaches db:5432");
    breaches.check(from_sport(&at_db, 45001) == 0, "quarantined VM with a new MAC: its SYN to db:5432 not delivered");
    breaches.check(from_sport(&at_db, 45002) == 0, "isolated VM with a new MAC: its SYN to db:5432 not delivered");
    breaches.check(
        !tcp_connects(&stale, "10.30.0.10", 45004, "10.40.0.1", 5432),
        "quarantined VM with a new MAC does not connect to db:5432",
    );
    breaches.check(
        !tcp_connects(&iso, "10.60.0.1", 45005, "10.40.0.1", 5432),
        "isolated VM with a new MAC does not connect to db:5432",
    );
    assert!(tcp_connects(&fresh, "10.30.0.11", 45006, "10.40.0.1", 5432), "positive control: still open for web");
    show_counters(&agent, "after");
    agent.stop();
    breaches.assert_none();
}

#[test]
fn a_vm_sending_with_another_zones_member_mac_gains_nothing() {
    let lab = Lab::new("bp");
    let att = add_vm(&lab, true, "att", "10.30.0.10/8", None, ATT_MAC);
    // A second attacker that sends nothing before its spoof: its port learns from it.
    let fresh = add_vm(&lab, true, "att2", "10.30.0.12/8", None, "52:54:00:30:00:0c");
    let db = add_vm(&lab, false, "db", "10.40.0.1/8", None, DB_MAC);
    let rules = three_zones(&lab, &format!("      - mac: \"{MGMT_MEMBER_MAC}\"\n"), "");
    let agent = start_agent(&lab, &rules, &[]);
    boot(&att);
    host_bind(&agent, &att, None);
    boot(&db);
    let mut breaches = Breaches::default();

    let (member, db_mac) = (MGMT_MEMBER_MAC, DB_MAC);
    let capture = db.capture(Some("tcp or icmp"));
    // The spoofing frame first: the port of att2 has seen nothing before it.
    scapy::sendp(
        &fresh,
        &[format!(
            "Ether(src='{member}', dst='{db_mac}')/IP(src='10.30.0.12', dst='10.40.0.1')/TCP(sport=46004, dport=22, flags='S')"
        )],
    );
    scapy::sendp(
        &att,
        &[
            format!(
                "Ether(dst='{db_mac}')/IP(src='10.30.0.10', dst='10.40.0.1')/TCP(sport=46001, dport=5432, flags='S')"
            ),
            format!(
                "Ether(src='{member}', dst='{db_mac}')/IP(src='10.30.0.10', dst='10.40.0.1')/TCP(sport=46002, dport=22, flags='S')"
            ),
            format!(
                "Ether(src='{member}', dst='{db_mac}')/IP(src='10.50.0.78', dst='10.40.0.1')/TCP(sport=46003, dport=22, flags='S')"
            ),
            format!(
                "Ether(src='{member}', dst='{db_mac}')/IP(src='10.30.0.10', dst='10.40.0.1')/ICMP(id=0x4646)/Raw(b'member-mac')"
            ),
        ],
    );
    let at_db = settle(capture);
    assert!(from_sport(&at_db, 46001) > 0, "positive control: web's own SYN reaches db:5432");
    breaches
        .check(from_sport(&at_db, 46002) == 0, "host-bound web VM with mgmt's member MAC: SYN to db:22 not delivered");
    breaches.check(
        from_sport(&at_db, 46003) == 0,
        "host-bound web VM with mgmt's member MAC and a mgmt address: SYN to db:22 not delivered",
    );
    breaches.check(
        from_sport(&at_db, 46004) == 0,
        "learning port whose first frame has mgmt's member MAC: SYN to db:22 not delivered",
    );
    let delivered_from_member =
        at_db.iter().filter_map(seen).filter(|s| s.src_mac == mac_bytes(MGMT_MEMBER_MAC) && s.dport != 22).count();
    breaches.check(delivered_from_member == 0, "no frame with mgmt's member MAC from a web port reaches db");
    show_counters(&agent, "after");
    agent.stop();
    breaches.assert_none();
}

/// "52:54:00:00:00:01" as bytes.
fn mac_bytes(text: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (byte, part) in out.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).expect("a MAC");
    }
    out
}

#[test]
fn a_forged_frame_from_the_peer_does_not_precreate_a_flow_the_attackers_syn_can_ride() {
    let lab = Lab::new("bp");
    let att = add_vm(&lab, true, "att", "10.30.0.10/8", Some("fd00:30::10/16"), ATT_MAC);
    let db = add_vm(&lab, false, "db", "10.40.0.1/8", Some("fd00:40::1/16"), DB_MAC);
    // db calls back into web on tcp/8440-8449; web may not reach db:22.
    let extra = "
policies:
  - name: db-to-web-callbacks
    from: db
    to: web
    allow:
      - { proto: tcp, ports: [\"8440-8449\"] }
";
    let rules = three_zones(&lab, "", extra);
    let agent = start_agent(&lab, &rules, &[]);
    boot(&att);
    boot(&db);
    let _ssh = listen(&db, 22);
    let _pg = listen(&db, 5432);
    let mut breaches = Breaches::default();

    // Positive controls: web reaches db:5432, and db reaches web's callback ports, so a
    // flow started by db towards web:844x is allowed.
    assert!(tcp_connects(&att, "10.30.0.10", 8447, "10.40.0.1", 5432), "positive control: web -> db:5432");
    assert!(connects(&db, &att, 8448), "positive control: db -> web:8448 (the callback policy)");
    show_counters(&agent, "before");

    // Forged frames "from db:22" to the attacker's callback ports: to its own MAC,
    // broadcast, misaddressed to db, with db's MAC, a SYN-ACK, over IPv6.
    let (a, d) = (ATT_MAC, DB_MAC);
    let capture = db.capture(Some("tcp dst port 22"));
    scapy::sendp(
        &att,
        &[
            format!(
                "Ether(src='{a}', dst='{a}')/IP(src='10.40.0.1', dst='10.30.0.10')/TCP(sport=22, dport=8441, flags='S')"
            ),
            format!(
                "Ether(src='{a}', dst='ff:ff:ff:ff:ff:ff')/IP(src='10.40.0.1', dst='10.30.0.10')/TCP(sport=22, dport=8442, flags='S')"
            ),
            format!(
                "Ether(src='{a}', dst='{d}')/IP(src='10.40.0.1', dst='10.30.0.10')/TCP(sport=22, dport=8443, flags='S')"
            ),
            format!(
                "Ether(src='{d}', dst='ff:ff:ff:ff:ff:ff')/IP(src='10.40.0.1', dst='10.30.0.10')/TCP(sport=22, dport=8444, flags='S')"
            ),
            format!(
                "Ether(src='{a}', dst='{a}')/IP(src='10.40.0.1', dst='10.30.0.10')/TCP(sport=22, dport=8445, flags='SA')"
            ),
            format!(
                "Ether(src='{a}', dst='{a}')/IPv6(src='fd00:40::1', dst='fd00:30::10')/TCP(sport=22, dport=8446, flags='S')"
            ),
        ],
    );
    // The frame with db's MAC may have taught the bridge that db is behind the attacker's
    // port: db speaks, as it would, and the bridge knows better again.
    boot(&db);
    std::thread::sleep(Duration::from_millis(300));
    let rides = [
        (8441, "to the attacker's own MAC"),
        (8442, "broadcast"),
        (8443, "misaddressed to db's MAC"),
        (8444, "with db's MAC as source"),
        (8445, "a SYN-ACK to the attacker's own MAC"),
    ];
    for (port, how) in rides {
        breaches.check(
            !tcp_connects(&att, "10.30.0.10", port, "10.40.0.1", 22),
            format!("after a forged db:22 -> web:{port} frame ({how}), web:{port} -> db:22 does not connect"),
        );
    }
    breaches.check(
        !tcp_connects(&att, "fd00:30::10", 8446, "fd00:40::1", 22),
        "after a forged [db]:22 -> [web]:8446 frame (IPv6, own MAC), [web]:8446 -> [db]:22 does not connect",
    );
    let at_db = settle(capture);
    let syns: Vec<_> = at_db
        .iter()
        .filter_map(seen)
        .filter(|s| s.src.starts_with("10.30.") || s.src.starts_with("fd00:30:"))
        .collect();
    breaches.check(syns.is_empty(), format!("no segment from web to db:22 delivered ({} seen)", syns.len()));
    assert!(
        tcp_connects(&att, "10.30.0.10", 8449, "10.40.0.1", 5432),
        "positive control: web -> db:5432 still connects"
    );
    show_counters(&agent, "after");
    agent.stop();
    breaches.assert_none();
}

#[test]
fn announcements_naming_another_endpoints_mac_move_nothing_and_the_real_vm_works_afterwards() {
    let lab = Lab::new("bp");
    let att = add_vm(&lab, true, "att", "10.30.0.10/8", Some("fd00:30::10/16"), ATT_MAC);
    let db = add_vm(&lab, false, "db", "10.40.0.1/8", Some("fd00:40::1/16"), DB_MAC);
    // Its port exists (the host made it) but the guest has not booted yet: it sends nothing.
    let admin = add_vm(&lab, false, "admin", "10.50.0.5/8", Some("fd00:50::5/16"), ADMIN_MAC);
    let extra = format!(
        "
endpoints:
  admin:
    mac: \"{ADMIN_MAC}\"
    ips: [10.50.0.5, \"fd00:50::5\"]
"
    );
    let rules = three_zones(&lab, "", &extra);
    let agent = start_agent(&lab, &rules, &[]);
    boot(&att);
    boot(&db);
    host_bind(&agent, &admin, Some("admin"));
    let ssh = listen(&db, 22);
    let _pg = listen(&db, 5432);
    let mut breaches = Breaches::default();

    let (a, m) = (ATT_MAC, ADMIN_MAC);
    let admin_ll = link_local(&admin);
    let att_ll = link_local(&att);
    let announcements = [
        // QEMU's RARP after a migration, three times.
        format!(
            "Ether(src='{m}', dst='ff:ff:ff:ff:ff:ff', type=0x8035)/ARP(op=3, hwsrc='{m}', psrc='0.0.0.0', hwdst='{m}', pdst='0.0.0.0')"
        ),
        format!(
            "Ether(src='{m}', dst='ff:ff:ff:ff:ff:ff', type=0x8035)/ARP(op=3, hwsrc='{m}', psrc='0.0.0.0', hwdst='{m}', pdst='0.0.0.0')"
        ),
        format!(
            "Ether(src='{m}', dst='ff:ff:ff:ff:ff:ff', type=0x8035)/ARP(op=3, hwsrc='{m}', psrc='0.0.0.0', hwdst='{m}', pdst='0.0.0.0')"
        ),
        // Gratuitous ARP: admin's MAC as source; the attacker's source with admin's as sender.
        format!("Ether(src='{m}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=1, hwsrc='{m}', psrc='10.50.0.5', pdst='10.50.0.5')"),
        format!("Ether(src='{a}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=1, hwsrc='{m}', psrc='10.50.0.5', pdst='10.50.0.5')"),
        // Unsolicited neighbour advertisements of admin's address, from its MAC and from ours.
        format!(
            "Ether(src='{m}', dst='33:33:00:00:00:01')/IPv6(src='{admin_ll}', dst='ff02::1', hlim=255)/ICMPv6ND_NA(tgt='fd00:50::5', R=0, S=0, O=1)/ICMPv6NDOptDstLLAddr(lladdr='{m}')"
        ),
        format!(
            "Ether(src='{a}', dst='33:33:00:00:00:01')/IPv6(src='{att_ll}', dst='ff02::1', hlim=255)/ICMPv6ND_NA(tgt='fd00:50::5', R=0, S=0, O=1)/ICMPv6NDOptDstLLAddr(lladdr='{m}')"
        ),
    ];
    scapy::sendp(&att, &announcements);
    // Time for whatever the agent does with announcements.
    std::thread::sleep(Duration::from_millis(700));
    show_counters(&agent, "after the announcements");

    // Speaking as admin gets the attacker nothing (mgmt may reach db:22).
    let d = DB_MAC;
    let capture = db.capture(Some("tcp"));
    scapy::sendp(
        &att,
        &[
            format!(
                "Ether(src='{a}', dst='{d}')/IP(src='10.30.0.10', dst='10.40.0.1')/TCP(sport=47003, dport=5432, flags='S')"
            ),
            format!(
                "Ether(src='{m}', dst='{d}')/IP(src='10.50.0.5', dst='10.40.0.1')/TCP(sport=47001, dport=22, flags='S')"
            ),
            format!(
                "Ether(src='{a}', dst='{d}')/IP(src='10.50.0.5', dst='10.40.0.1')/TCP(sport=47002, dport=22, flags='S')"
            ),
        ],
    );
    let at_db = settle(capture);
    assert!(from_sport(&at_db, 47003) > 0, "positive control: the attacker's own SYN reaches db:5432");
    breaches.check(
        from_sport(&at_db, 47001) == 0,
        "after the announcements, a SYN with admin's MAC and address to db:22 not delivered",
    );
    breaches.check(
        from_sport(&at_db, 47002) == 0,
        "after the announcements, a SYN from admin's address to db:22 not delivered",
    );

    // The real admin boots and works: its gratuitous ARP, then ssh to db.
    boot(&admin);
    std::thread::sleep(Duration::from_millis(300));
    breaches.check(admin.ping(db.ip(), 2), "the real admin VM pings db after the attack");
    let dst = std::net::SocketAddr::from((db.ip(), 22));
    let client = admin.in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(2))).ok();
    let server = client.as_ref().and_then(|_| accept_within(&ssh, Duration::from_secs(2)));
    breaches.check(client.is_some() && server.is_some(), "the real admin VM connects to db:22 after the attack");
    if let (Some(mut client), Some(mut server)) = (client, server) {
        breaches.check(carries(&mut client, &mut server, b"hello db"), "admin -> db data flows");
        steal_attempt(&att, &db, &announcements, &mut client, &mut server, &mut breaches);
    }
    show_counters(&agent, "after");
    agent.stop();
    breaches.assert_none();
}

/// The attacker announces admin again in the middle of admin's connection to db:22,
/// and injects a segment into it as admin: the connection goes on, the injected segment
/// does not reach db, and nothing of the connection reaches the attacker.
fn steal_attempt(
    att: &Vm,
    db: &Vm,
    announcements: &[String],
    client: &mut TcpStream,
    server: &mut TcpStream,
    breaches: &mut Breaches,
) {
    let (a, m, d) = (ATT_MAC, ADMIN_MAC, DB_MAC);
    let admin_port = client.local_addr().unwrap().port();
    let at_att = att.capture(Some("ip or ip6"));
    let at_db = db.capture(Some("tcp"));
    scapy::sendp(att, announcements);
    scapy::sendp(
        att,
        &[
            format!(
                "Ether(src='{m}', dst='{d}')/IP(src='10.50.0.5', dst='10.40.0.1')/TCP(sport={admin_port}, dport=22, flags='PA', seq=1, ack=1)/Raw(b'INJECTED-BY-ATT')"
            ),
            format!(
                "Ether(src='{a}', dst='{d}')/IP(src='10.50.0.5', dst='10.40.0.1')/TCP(sport={admin_port}, dport=22, flags='PA', seq=1, ack=1)/Raw(b'INJECTED-BY-ATT')"
            ),
        ],
    );
    std::thread::sleep(Duration::from_millis(700));
    breaches.check(carries(server, client, b"db to admin"), "db -> admin data still flows after the announcements");
    breaches.check(carries(client, server, b"admin to db"), "admin -> db data still flows after the announcements");
    let (at_att, at_db) = (settle(at_att), settle(at_db));
    let injected = at_db.iter().filter_map(seen).filter(|s| contains(&s.payload, b"INJECTED")).count();
    breaches.check(injected == 0, format!("no injected segment delivered to db ({injected} seen)"));
    let stolen: Vec<_> = at_att
        .iter()
        .filter_map(seen)
        .filter(|s| s.dst == "10.50.0.5" || (s.dst_mac == mac_bytes(ADMIN_MAC) && s.proto == 6))
        .collect();
    breaches.check(
        stolen.is_empty(),
        format!("nothing of admin's connection delivered to the attacker ({} seen)", stolen.len()),
    );
}

/// An ARP frame as captured: opcode, Ethernet source, sender MAC and address, target
/// address.
struct Arp {
    op: u16,
    src_mac: [u8; 6],
    sha: [u8; 6],
    spa: [u8; 4],
    tpa: [u8; 4],
}

fn arp_of(p: &Packet) -> Option<Arp> {
    let d = &p.data;
    if p.ethertype() != Some(0x0806) || d.len() < 42 {
        return None;
    }
    Some(Arp {
        op: u16::from_be_bytes([d[20], d[21]]),
        src_mac: d[6..12].try_into().ok()?,
        sha: d[22..28].try_into().ok()?,
        spa: d[28..32].try_into().ok()?,
        tpa: d[38..42].try_into().ok()?,
    })
}

/// ICMP echo requests with identifier `id` in `packets`.
fn echo_requests(packets: &[Packet], id: u16) -> usize {
    packets
        .iter()
        .filter(|p| p.ethertype() == Some(0x0800) && p.data.len() >= 40 && p.data[23] == 1 && p.data[34] == 8)
        .filter(|p| u16::from_be_bytes([p.data[38], p.data[39]]) == id)
        .count()
}

/// Neighbour advertisements of `target` sent from Ethernet source `from` in `packets`.
fn advertisements(packets: &[Packet], target: &str, from: [u8; 6]) -> usize {
    let target: Ipv6Addr = target.parse().expect("an IPv6 address");
    packets
        .iter()
        .filter(|p| p.ethertype() == Some(0x86dd) && p.data.len() >= 78 && p.data[54] == 136)
        .filter(|p| p.data[62..78] == target.octets() && p.data[6..12] == from)
        .count()
}

/// After the attack: the victim's neighbour entries for its gateway are not the
/// attacker's, and its traffic for the gateway reaches the gateway, not the attacker.
fn victim_still_knows_its_gateway(victim: &Vm, att: &Vm, gw: &Vm, breaches: &mut Breaches) {
    let v4 = victim.run(&["ip", "neigh", "show", "10.30.0.254"]).to_lowercase();
    let v6 = victim.run(&["ip", "-6", "neigh", "show", "fd00:30::fe"]).to_lowercase();
    breaches.check(
        !v4.contains(ATT_MAC),
        format!("the victim's ARP entry for the gateway is not the attacker's: {}", v4.trim()),
    );
    breaches.check(
        !v6.contains(ATT_MAC),
        format!("the victim's neighbour entry for the gateway is not the attacker's: {}", v6.trim()),
    );
    let gw_mac = mac_bytes(GW_MAC);
    let at_att = att.capture(Some("icmp or icmp6"));
    let reached = victim.ping(gw.ip(), 3);
    let at_att = settle(at_att);
    let diverted = at_att.iter().filter_map(seen).filter(|s| s.dst == "10.30.0.254" || s.dst_mac == gw_mac).count();
    breaches.check(
        diverted == 0,
        format!("no traffic of the victim for the gateway delivered to the attacker ({diverted} seen)"),
    );
    breaches.check(reached, "the victim still reaches its gateway");
}

#[test]
fn claims_of_the_gateways_address_or_mac_from_a_vm_port_are_dropped() {
    let lab = Lab::new("bp");
    let att = add_vm(&lab, true, "att", "10.30.0.10/8", Some("fd00:30::10/16"), ATT_MAC);
    let victim = add_vm(&lab, false, "victim", "10.30.0.2/8", Some("fd00:30::2/16"), WEB2_MAC);
    let gw = lab.add_uplink("gw", "10.30.0.254/8", Some("fd00:30::fe/16"), Some(GW_MAC));
    // The operator names the segment's gateway as infrastructure: its MAC and addresses
    // are no VM port's.
    let infra = format!("infrastructure:\n  gateway: {{ mac: \"{GW_MAC}\", ips: [10.30.0.254, \"fd00:30::fe\"] }}\n");
    let rules = three_zones(&lab, "", &infra);
    let agent = start_agent(&lab, &rules, &["--uplink", &lab.uplink_glob()]);
    boot(&att);
    boot(&victim);
    let mut breaches = Breaches::default();

    // The victim knows its gateway (both families).
    assert!(victim.ping(gw.ip(), 2), "positive control: the victim pings its gateway");
    assert!(victim.ping(gw.ip6().unwrap(), 2), "positive control: the victim pings its gateway over IPv6");
    let entry = victim.run(&["ip", "neigh", "show", "10.30.0.254"]).to_lowercase();
    assert!(entry.contains(GW_MAC), "the victim's ARP entry is the gateway's: {entry}");
    show_counters(&agent, "before");

    let (a, v, g) = (ATT_MAC, WEB2_MAC, GW_MAC);
    let capture = victim.capture(Some("arp or icmp or icmp6"));
    scapy::sendp(
        &att,
        &[
            // ARP reply and gratuitous ARP claiming the gateway's address with our MAC.
            format!(
                "Ether(src='{a}', dst='{v}')/ARP(op=2, hwsrc='{a}', psrc='10.30.0.254', hwdst='{v}', pdst='10.30.0.2')"
            ),
            format!(
                "Ether(src='{a}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=1, hwsrc='{a}', psrc='10.30.0.254', pdst='10.30.0.254')"
            ),
            // Neighbour advertisements of the gateway's IPv6 address with our MAC.
            format!(
                "Ether(src='{a}', dst='33:33:00:00:00:01')/IPv6(src='fd00:30::10', dst='ff02::1', hlim=255)/ICMPv6ND_NA(tgt='fd00:30::fe', R=1, S=0, O=1)/ICMPv6NDOptDstLLAddr(lladdr='{a}')"
            ),
            format!(
                "Ether(src='{a}', dst='{v}')/IPv6(src='fd00:30::10', dst='fd00:30::2', hlim=255)/ICMPv6ND_NA(tgt='fd00:30::fe', R=1, S=1, O=1)/ICMPv6NDOptDstLLAddr(lladdr='{a}')"
            ),
            // Frames with the gateway's MAC as source.
            format!("Ether(src='{g}', dst='{v}')/IP(src='10.30.0.254', dst='10.30.0.2')/ICMP(id=0x6a6a)"),
            format!(
                "Ether(src='{g}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=1, hwsrc='{g}', psrc='10.30.0.254', pdst='10.30.0.99')"
            ),
            // Positive controls: the same kinds of frame for the attacker's own address.
            format!(
                "Ether(src='{a}', dst='{v}')/ARP(op=2, hwsrc='{a}', psrc='10.30.0.10', hwdst='{v}', pdst='10.30.0.2')"
            ),
            format!(
                "Ether(src='{a}', dst='{v}')/IPv6(src='fd00:30::10', dst='fd00:30::2', hlim=255)/ICMPv6ND_NA(tgt='fd00:30::10', R=0, S=1, O=1)/ICMPv6NDOptDstLLAddr(lladdr='{a}')"
            ),
            format!("Ether(src='{a}', dst='{v}')/IP(src='10.30.0.10', dst='10.30.0.2')/ICMP(id=0x6b6b)"),
        ],
    );
    let at_victim = settle(capture);
    let (att_mac, gw_mac) = (mac_bytes(ATT_MAC), mac_bytes(GW_MAC));
    let arps: Vec<Arp> = at_victim.iter().filter_map(arp_of).collect();
    assert!(
        arps.iter().any(|a| a.op == 2 && a.sha == att_mac && a.spa == [10, 30, 0, 10]),
        "positive control: the attacker's ARP reply for its own address reaches the victim"
    );
    assert_eq!(
        advertisements(&at_victim, "fd00:30::10", att_mac),
        1,
        "positive control: the attacker's advertisement of its own address arrives"
    );
    assert_eq!(echo_requests(&at_victim, 0x6b6b), 1, "positive control: the attacker's echo request arrives");
    let claims_gw =
        arps.iter().filter(|a| a.spa == [10, 30, 0, 254] && (a.sha != gw_mac || a.src_mac != gw_mac)).count();
    breaches.check(
        claims_gw == 0,
        format!("no ARP claiming the gateway's address with another MAC delivered ({claims_gw} seen)"),
    );
    breaches.check(
        advertisements(&at_victim, "fd00:30::fe", att_mac) == 0,
        "no advertisement of the gateway's IPv6 address with the attacker's MAC delivered",
    );
    breaches.check(
        echo_requests(&at_victim, 0x6a6a) == 0,
        "no frame with the gateway's MAC as source (ICMP) from the attacker delivered",
    );
    let gw_arp = arps.iter().filter(|a| a.src_mac == gw_mac && a.tpa == [10, 30, 0, 99]).count();
    breaches.check(gw_arp == 0, "no frame with the gateway's MAC as source (ARP) from the attacker delivered");
    victim_still_knows_its_gateway(&victim, &att, &gw, &mut breaches);
    show_counters(&agent, "after");
    agent.stop();
    breaches.assert_none();
}

#[test]
fn a_frame_to_a_victims_mac_with_a_foreign_destination_address_is_not_delivered_across_zones() {
    let lab = Lab::new("bp");
    let att = add_vm(&lab, true, "att", "10.30.0.10/8", Some("fd00:30::10/16"), ATT_MAC);
    let web2 = add_vm(&lab, false, "web2", "10.30.0.2/8", Some("fd00:30::2/16"), WEB2_MAC);
    let db = add_vm(&lab, false, "db", "10.40.0.1/8", Some("fd00:40::1/16"), DB_MAC);
    let db2 = add_vm(&lab, false, "db2", "10.40.0.2/8", Some("fd00:40::2/16"), DB2_MAC);
    let rules = three_zones(&lab, "", "");
    let agent = start_agent(&lab, &rules, &[]);
    // The host binds db2's port before db2 boots (the libvirt hook starting a VM), and
    // db's while db runs (the hook's `reconnect`, after the host's daemon restarted).
    host_bind(&agent, &db2, None);
    for vm in [&att, &web2, &db, &db2] {
        boot(vm);
    }
    host_bind(&agent, &db, None);
    let mut breaches = Breaches::default();

    let at_web2 = web2.capture(Some("tcp"));
    let (at_db, at_db2) = (db.capture(Some("ip or ip6")), db2.capture(Some("ip or ip6")));
    let w = WEB2_MAC;
    let mut frames = Vec::new();
    for (victim, mac, ip, ip6, base) in
        [("db", DB_MAC, "10.40.0.1", "fd00:40::1", 43000), ("db2", DB2_MAC, "10.40.0.2", "fd00:40::2", 43100)]
    {
        eprintln!("to {victim}: source ports {}-{}", base + 1, base + 10);
        frames.extend([
            // To the victim's MAC, addressed to web2 (web -> web is allowed), to mgmt
            // (audited, so it passes), to the world, over IPv6; each to a service web may
            // not reach on db (web -> db allows tcp/5432 and ICMP only).
            format!(
                "Ether(dst='{mac}')/IP(src='10.30.0.10', dst='10.30.0.2')/TCP(sport={}, dport=22, flags='S')",
                base + 1
            ),
            format!(
                "Ether(dst='{mac}')/IP(src='10.30.0.10', dst='10.50.0.9')/TCP(sport={}, dport=22, flags='S')",
                base + 2
            ),
            format!("Ether(dst='{mac}')/IP(src='10.30.0.10', dst='192.0.2.7')/UDP(sport={}, dport=53)", base + 3),
            format!(
                "Ether(dst='{mac}')/IPv6(src='fd00:30::10', dst='fd00:30::2')/TCP(sport={}, dport=22, flags='S')",
                base + 4
            ),
            // Positive control: to the victim as the victim.
            format!(
                "Ether(dst='{mac}')/IP(src='10.30.0.10', dst='{ip}')/TCP(sport={}, dport=5432, flags='S')",
                base + 10
            ),
            format!(
                "Ether(dst='{mac}')/IPv6(src='fd00:30::10', dst='{ip6}')/TCP(sport={}, dport=5432, flags='S')",
                base + 11
            ),
        ]);
    }
    // Positive control: to web2 as web2.
    frames
        .push(format!("Ether(dst='{w}')/IP(src='10.30.0.10', dst='10.30.0.2')/TCP(sport=43211, dport=22, flags='S')"));
    scapy::sendp(&att, &frames);
    let (at_db, at_db2, at_web2) = (settle(at_db), settle(at_db2), settle(at_web2));
    show_flows(&agent, "\"dst_port\":22");
    assert!(from_sport(&at_web2, 43211) > 0, "positive control: web -> web2:22 reaches web2");
    let att_mac = mac_bytes(ATT_MAC);
    for (victim, packets, own, own6, base) in
        [("db", &at_db, "10.40.0.1", "fd00:40::1", 43000), ("db2", &at_db2, "10.40.0.2", "fd00:40::2", 43100)]
    {
        assert!(from_sport(packets, base + 10) > 0, "positive control: web -> {victim}:5432 reaches {victim}");
        assert!(from_sport(packets, base + 11) > 0, "positive control: web -> [{victim}]:5432 reaches {victim}");
        let bound = if victim == "db" { "bound while running" } else { "bound before boot" };
        let foreign: Vec<Seen> = packets
            .iter()
            .filter_map(seen)
            .filter(|s| s.src_mac == att_mac && matches!(s.proto, 6 | 17) && s.dst != own && s.dst != own6)
            .collect();
        for (what, dst) in [
            ("web2's address (intra-zone)", "10.30.0.2"),
            ("a mgmt address (audited)", "10.50.0.9"),
            ("a world address", "192.0.2.7"),
            ("web2's IPv6 address", "fd00:30::2"),
        ] {
            let n = foreign.iter().filter(|s| s.dst == dst).count();
            breaches.check(
                n == 0,
                format!("a frame to {victim}'s MAC ({bound}) for {what} is not delivered to {victim} ({n} seen)"),
            );
        }
    }
    show_counters(&agent, "after");
    agent.stop();
    breaches.assert_none();
}

/// The attacker is an inventory endpoint (the data path knows its MAC).
const WEB1_ENDPOINT: &str = "
endpoints:
  web-1:
    mac: \"52:54:00:30:00:0a\"
    ips: [10.30.0.10, \"fd00:30::10\"]
";

#[test]
fn a_syn_to_the_senders_own_or_a_multicast_mac_opens_no_flow_for_a_later_connection() {
    let lab = Lab::new("bp");
    let att = add_vm(&lab, true, "att", "10.30.0.10/8", Some("fd00:30::10/16"), ATT_MAC);
    let db = add_vm(&lab, false, "db", "10.40.0.1/8", Some("fd00:40::1/16"), DB_MAC);
    let rules = three_zones(&lab, "", WEB1_ENDPOINT);
    let agent = start_agent(&lab, &rules, &[]);
    boot(&att);
    boot(&db);
    host_bind(&agent, &att, Some("web-1"));
    wait_bound(&agent, "web-1", &att, "active");
    let _ssh = listen(&db, 22);
    let _pg = listen(&db, 5432);
    let (att_ll, db_ll) = (link_local(&att), link_local(&db));
    let mut breaches = Breaches::default();

    assert!(tcp_connects(&att, "10.30.0.10", 42010, "10.40.0.1", 5432), "positive control: web -> db:5432");
    assert!(tcp_connects(&att, "fd00:30::10", 42011, "fd00:40::1", 5432), "positive control: web -> [db]:5432");
    show_counters(&agent, "before");

    let a = ATT_MAC;
    let capture = db.capture(Some("tcp dst port 22"));
    let v4 = |mac: &str, sport: u16| {
        format!(
            "Ether(src='{a}', dst='{mac}')/IP(src='10.30.0.10', dst='10.40.0.1')/TCP(sport={sport}, dport=22, flags='S')"
        )
    };
    scapy::sendp(
        &att,
        &[
            v4(a, 42001),
            v4("ff:ff:ff:ff:ff:ff", 42002),
            v4("01:00:5e:00:00:01", 42003),
            format!(
                "Ether(src='{a}', dst='33:33:00:00:00:01')/IPv6(src='fd00:30::10', dst='fd00:40::1')/TCP(sport=42004, dport=22, flags='S')"
            ),
            format!(
                "Ether(src='{a}', dst='33:33:00:00:00:01')/IPv6(src='{att_ll}', dst='{db_ll}')/TCP(sport=42005, dport=22, flags='S')"
            ),
            format!(
                "Ether(src='{a}', dst='{a}')/IPv6(src='fd00:30::10', dst='fd00:40::1')/TCP(sport=42006, dport=22, flags='S')"
            ),
        ],
    );
    std::thread::sleep(Duration::from_millis(200));
    let att_ll_scoped = format!("{att_ll}%eth0");
    let db_ll_scoped = format!("{db_ll}%eth0");
    let rides: [(&str, &str, u16, &str); 6] = [
        ("10.30.0.10", "10.40.0.1", 42001, "to its own MAC"),
        ("10.30.0.10", "10.40.0.1", 42002, "to the broadcast MAC"),
        ("10.30.0.10", "10.40.0.1", 42003, "to an IPv4 multicast MAC"),
        ("fd00:30::10", "fd00:40::1", 42004, "to an IPv6 multicast MAC, global addresses"),
        (&att_ll_scoped, &db_ll_scoped, 42005, "to an IPv6 multicast MAC, link-local addresses"),
        ("fd00:30::10", "fd00:40::1", 42006, "to its own MAC, IPv6"),
    ];
    for (src, dst, sport, how) in rides {
        breaches.check(
            !tcp_connects(&att, src, sport, dst, 22),
            format!("after a SYN {how}, the same connection to db:22 (from port {sport}) does not open"),
        );
    }
    let at_db = settle(capture);
    for s in at_db.iter().filter_map(seen) {
        eprintln!("delivered to db:22: {} port {} (dst MAC {})", s.src, s.sport, mac(s.dst_mac));
    }
    breaches.check(at_db.is_empty(), format!("no segment to db:22 delivered ({} seen)", at_db.len()));
    assert!(tcp_connects(&att, "10.30.0.10", 42012, "10.40.0.1", 5432), "positive control: web -> db:5432 still");
    show_counters(&agent, "after");
    agent.stop();
    breaches.assert_none();
}

#[test]
fn udp_to_a_link_local_address_in_a_multicast_frame_does_not_reach_the_victims_service() {
    let lab = Lab::new("bp");
    let att = add_vm(&lab, true, "att", "10.30.0.10/8", Some("fd00:30::10/16"), ATT_MAC);
    let web2 = add_vm(&lab, false, "web2", "10.30.0.2/8", Some("fd00:30::2/16"), WEB2_MAC);
    let db = add_vm(&lab, false, "db", "10.40.0.1/8", Some("fd00:40::1/16"), DB_MAC);
    let rules = three_zones(&lab, "", "");
    let agent = start_agent(&lab, &rules, &[]);
    host_bind(&agent, &db, None);
    for vm in [&att, &web2, &db] {
        boot(vm);
    }
    let (att_ll, web2_ll, db_ll) = (link_local(&att), link_local(&web2), link_local(&db));
    let db_dns = udp_service(&db, 53);
    let web2_dns = udp_service(&web2, 53);
    let mut breaches = Breaches::default();

    let (a, d, w) = (ATT_MAC, DB_MAC, WEB2_MAC);
    let udp6 = |dst_mac: &str, dst: &str, sport: u16, text: &str| {
        format!(
            "Ether(src='{a}', dst='{dst_mac}')/IPv6(src='{att_ll}', dst='{dst}')/UDP(sport={sport}, dport=53)/Raw(b'{text}')"
        )
    };
    let db_solicited = format!("33:33:ff:{}", &DB_MAC[9..]);
    scapy::sendp(
        &att,
        &[
            udp6("33:33:00:00:00:01", &db_ll, 44001, "to-db-all-nodes"),
            udp6(&db_solicited, &db_ll, 44002, "to-db-solicited-node"),
            udp6(d, &db_ll, 44003, "to-db-unicast-link-local"),
            format!(
                "Ether(src='{a}', dst='01:00:5e:00:00:01')/IP(src='10.30.0.10', dst='10.40.0.1')/UDP(sport=44004, dport=53)/Raw(b'to-db-v4-multicast')"
            ),
            format!(
                "Ether(src='{a}', dst='ff:ff:ff:ff:ff:ff')/IP(src='10.30.0.10', dst='10.40.0.1')/UDP(sport=44005, dport=53)/Raw(b'to-db-v4-broadcast')"
            ),
            // For web2 (web -> web is allowed): the positive control, unicast; and the
            // multicast frame, which the switch may deliver to web2 or drop for all.
            udp6(w, &web2_ll, 44012, "to-web2-unicast-link-local"),
            udp6("33:33:00:00:00:01", &web2_ll, 44011, "to-web2-all-nodes"),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let (at_db, at_web2) = (datagrams(&db_dns), datagrams(&web2_dns));
    let text = |d: &Vec<u8>| String::from_utf8_lossy(d).into_owned();
    eprintln!("db's service got {:?}", at_db.iter().map(text).collect::<Vec<_>>());
    eprintln!("web2's service got {:?}", at_web2.iter().map(text).collect::<Vec<_>>());
    show_counters(&agent, "after");
    assert!(
        at_web2.iter().any(|d| text(d) == "to-web2-unicast-link-local"),
        "positive control: web2's service got the datagram to its link-local address"
    );
    for marker in [
        "to-db-all-nodes",
        "to-db-solicited-node",
        "to-db-unicast-link-local",
        "to-db-v4-multicast",
        "to-db-v4-broadcast",
    ] {
        breaches
            .check(!at_db.iter().any(|d| text(d) == marker), format!("db's service on udp/53 did not get {marker}"));
    }
    agent.stop();
    breaches.assert_none();
}

/// An administrator's VM (10.50.0.10, mgmt: may reach db:22), the first on the port.
const ADMIN_A_MAC: &str = "52:54:00:50:00:0a";
/// A second administrator's VM (10.50.0.12), on a port of its own throughout.
const ADMIN_C_MAC: &str = "52:54:00:50:00:0c";
/// A web VM (10.30.0.11: may reach db:5432 only), the next domain on the port's name.
const WEB_B_MAC: &str = "52:54:00:30:00:0b";

/// Three-zones where only the host binds (every zone and `world`), with the VMs of the
/// reuse test in the inventory.
fn three_zones_host_bound(lab: &Lab) -> PathBuf {
    let dir = three_zones(
        lab,
        "",
        &format!(
            "endpoints:
  admin-a: {{ mac: \"{ADMIN_A_MAC}\", ips: [10.50.0.10] }}
  admin-c: {{ mac: \"{ADMIN_C_MAC}\", ips: [10.50.0.12] }}
  web-b: {{ mac: \"{WEB_B_MAC}\", ips: [10.30.0.11] }}
  db-1: {{ mac: \"{DB_MAC}\", ips: [10.40.0.1] }}
"
        ),
    );
    let zones = dir.join("zones.yaml");
    let mut text = std::fs::read_to_string(&zones).expect("read zones.yaml");
    for zone in ["web", "db", "mgmt"] {
        text = text.replace(&format!("\n  {zone}:\n"), &format!("\n  {zone}:\n    binding: host\n"));
    }
    text.push_str("  world:\n    binding: host\n");
    std::fs::write(&zones, text).expect("write zones.yaml");
    dir
}

/// The port device's own MAC (the tap's, not the guest's).
fn device_mac(port: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{port}/address")).expect("the port's MAC").trim().to_owned()
}

/// The names of the `endpoint list` rows bound on `port` (`here`: bound to a port of this
/// node; a row that is not only names where the endpoint was last seen).
fn bound_on(agent: &Agent, port: &str) -> Vec<String> {
    let list = agent.cli_json(&["endpoint", "list", "--json"]);
    list.as_array()
        .expect("endpoint list --json is an array")
        .iter()
        .filter(|e| e["port"] == port && e["here"] == true)
        .map(|e| e["name"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// Setup, not an oracle: waits until `endpoint list` shows `name` bound on `vm`'s port
/// (not only last seen there, as [`wait_bound`] accepts).
fn wait_bound_here(agent: &Agent, name: &str, vm: &Vm) {
    let port = vm.host_port();
    agent.wait_for(Duration::from_secs(5), &format!("{name} bound on {port}"), |a| {
        bound_on(a, port).iter().any(|n| n == name).then_some(())
    });
}

/// `status`'s `binding` and `bound_mac` of `port`.
fn port_binding(agent: &Agent, port: &str) -> (String, String) {
    let status = agent.status();
    let p = status["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == port)
        .unwrap_or_else(|| panic!("{port} is not in status: {status:#}"));
    (p["binding"].as_str().unwrap_or_default().to_owned(), p["bound_mac"].as_str().unwrap_or_default().to_owned())
}

/// Issue 13, item 7: a host binding comes back after a restart only onto the same device.
/// While the agent is down, the domain on a tap (an administrator's VM, bound by the host)
/// is destroyed and another domain starts with a tap of the same name (libvirt reuses
/// `vnetN`): a new device, a new ifindex, a new device MAC, a web VM behind it. The
/// restarted agent binds nothing to that port: the new VM, with the administrator's MAC
/// and address, does not reach db:22 on the wire, while the other administrator's VM does;
/// the port is listed unbound. Once the host binds the new VM, it works as web.
#[test]
fn a_restart_after_a_tap_name_was_reused_by_another_vm_binds_nothing_wrongly() {
    restart_after_a_tap_name_was_reused(true);
}

/// The same after a clean stop: the next agent adopts no port, attaches every one
/// afresh, and brings back the host's bindings of the devices that did not change.
#[test]
fn after_a_clean_stop_the_host_bindings_of_unchanged_devices_come_back() {
    restart_after_a_tap_name_was_reused(false);
}

fn restart_after_a_tap_name_was_reused(keep_pins: bool) {
    let lab = Lab::new("bp");
    let a = add_vm(&lab, true, "a", "10.50.0.10/8", None, ADMIN_A_MAC);
    let c = add_vm(&lab, true, "c", "10.50.0.12/8", None, ADMIN_C_MAC);
    let db = add_vm(&lab, false, "db", "10.40.0.1/8", None, DB_MAC);
    let rules = three_zones_host_bound(&lab);
    let rules_arg = rules.to_str().unwrap();
    let first = if keep_pins {
        Agent::start_keeping_pins(&lab, &["--rules", rules_arg])
    } else {
        Agent::start(&lab, &["--rules", rules_arg])
    };
    for (vm, name) in [(&a, "admin-a"), (&c, "admin-c"), (&db, "db-1")] {
        host_bind(&first, vm, Some(name));
        boot(vm);
        wait_bound(&first, name, vm, "active");
    }
    let _ssh = listen(&db, 22);
    let _pg = listen(&db, 5432);
    let port = a.host_port().to_owned();
    assert!(tcp_connects(&a, "10.50.0.10", 47001, "10.40.0.1", 22), "positive control: admin-a -> db:22 connects");
    assert_eq!(bound_on(&first, &port), ["admin-a"], "admin-a is listed bound on {port}");
    assert_eq!(port_binding(&first, &port), ("host".to_owned(), ADMIN_A_MAC.to_owned()), "{port} host-bound");
    let (old_ifindex, old_device_mac) = (a.host_ifindex(), device_mac(&port));

    // The agent stops (its data path stays, for the next one to adopt); meanwhile libvirt
    // destroys a's domain and starts b's, whose tap gets the same name.
    first.stop();
    drop(a);
    let b = lab.add_tap_vm_on_port(&port, "b", "10.30.0.11/8", None, Some(WEB_B_MAC));
    assert_eq!(b.host_port(), port);
    assert_ne!(b.host_ifindex(), old_ifindex, "precondition: the new tap is another ifindex");
    assert_ne!(device_mac(&port), old_device_mac, "precondition: the new tap has another device MAC");

    let agent = Agent::start(&lab, &["--rules", rules_arg]);
    // Positive control: the bindings of the same devices come back.
    wait_bound_here(&agent, "admin-c", &c);
    wait_bound_here(&agent, "db-1", &db);
    boot(&b);
    let mut breaches = Breaches::default();
    show_counters(&agent, "before");

    // Hostile b: with a's MAC and address, with its own MAC and a's address, as itself.
    let (a_mac, b_mac, c_mac, db_mac) = (ADMIN_A_MAC, WEB_B_MAC, ADMIN_C_MAC, DB_MAC);
    let syn = |src_mac: &str, src: &str, sport: u16| {
        format!(
            "Ether(src='{src_mac}', dst='{db_mac}')/IP(src='{src}', dst='10.40.0.1')/TCP(sport={sport}, dport=22, flags='S')"
        )
    };
    let capture = db.capture(Some("tcp dst port 22"));
    scapy::sendp(
        &b,
        &[syn(a_mac, "10.50.0.10", 47101), syn(b_mac, "10.50.0.10", 47102), syn(b_mac, "10.30.0.11", 47103)],
    );
    scapy::sendp(&c, &[syn(c_mac, "10.50.0.12", 47110)]);
    let at_db = settle(capture);
    assert!(from_sport(&at_db, 47110) > 0, "positive control: admin-c's SYN reaches db:22");
    for (sport, how) in [(47101, "a's MAC and address"), (47102, "its own MAC and a's address"), (47103, "itself")] {
        breaches.check(from_sport(&at_db, sport) == 0, format!("b's SYN to db:22 with {how} not delivered"));
    }
    // The guest takes a's MAC and address and connects with its own TCP.
    b.run(&["ip", "link", "set", "dev", "eth0", "address", ADMIN_A_MAC]);
    b.run(&["ip", "addr", "add", "10.50.0.10/8", "dev", "eth0"]);
    breaches.check(
        !tcp_connects(&b, "10.50.0.10", 47104, "10.40.0.1", 22),
        "b with a's MAC and address does not connect to db:22",
    );
    assert!(tcp_connects(&c, "10.50.0.12", 47111, "10.40.0.1", 22), "positive control: admin-c -> db:22 connects");
    b.run(&["ip", "addr", "del", "10.50.0.10/8", "dev", "eth0"]);
    b.run(&["ip", "link", "set", "dev", "eth0", "address", WEB_B_MAC]);
    show_counters(&agent, "after");
    show_flows(&agent, "\"dst_port\":22");

    // What the agent says: nothing is bound to the port.
    let bound = bound_on(&agent, &port);
    breaches.check(bound == [format!("unbound:{port}")], format!("{port} is listed unbound, nothing bound: {bound:?}"));
    let (binding, bound_mac) = port_binding(&agent, &port);
    breaches.check(binding == "none", format!("status shows {port} unbound: binding {binding:?}, MAC {bound_mac:?}"));
    breaches.assert_none();

    // The host binds b: it works as the web VM it is.
    host_bind(&agent, &b, None);
    wait_bound(&agent, "web-b", &b, "active");
    assert_eq!(bound_on(&agent, &port), ["web-b"], "web-b is listed bound on {port}");
    assert_eq!(port_binding(&agent, &port), ("host".to_owned(), WEB_B_MAC.to_owned()), "{port} bound to b");
    assert!(tcp_connects(&b, "10.30.0.11", 47201, "10.40.0.1", 5432), "web-b -> db:5432 connects");
    assert!(!tcp_connects(&b, "10.30.0.11", 47202, "10.40.0.1", 22), "web-b -> db:22 does not (web may not)");
    agent.stop();
}

/// Issue 13, items 1 and 2: a VM of a learning zone outside the inventory takes the
/// addresses it uses on first use; another VM of the same zone cannot send from them or
/// claim them (its SYN from web2's address does not reach db, its ARP claim of web2's
/// address does not reach db), while its own address works (positive control).
#[test]
fn an_address_a_vm_took_on_first_use_is_no_other_vms() {
    let lab = Lab::new("bp");
    let web2 = add_vm(&lab, false, "web2", "10.30.0.20/8", None, WEB2_MAC);
    let att = add_vm(&lab, true, "att", "10.30.0.10/8", None, ATT_MAC);
    let db = add_vm(&lab, false, "db", "10.40.0.1/8", None, DB_MAC);
    let rules = three_zones(&lab, "", "");
    let agent = start_agent(&lab, &rules, &[]);
    host_bind(&agent, &db, None);
    for vm in [&web2, &att, &db] {
        boot(vm);
    }
    let _pg = listen(&db, 5432);
    assert!(tcp_connects(&web2, "10.30.0.20", 42000, "10.40.0.1", 5432), "positive control: web2 -> db:5432");
    assert!(tcp_connects(&att, "10.30.0.10", 42001, "10.40.0.1", 5432), "positive control: att -> db:5432");
    let mut breaches = Breaches::default();
    show_counters(&agent, "before");

    let (a, d) = (ATT_MAC, DB_MAC);
    let capture = db.capture(Some("tcp or arp"));
    scapy::sendp(
        &att,
        &[
            format!(
                "Ether(src='{a}', dst='{d}')/IP(src='10.30.0.10', dst='10.40.0.1')/TCP(sport=42101, dport=5432, flags='S')"
            ),
            format!(
                "Ether(src='{a}', dst='{d}')/IP(src='10.30.0.20', dst='10.40.0.1')/TCP(sport=42102, dport=5432, flags='S')"
            ),
            format!(
                "Ether(src='{a}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=2, hwsrc='{a}', psrc='10.30.0.20', hwdst='ff:ff:ff:ff:ff:ff', pdst='10.30.0.20')"
            ),
        ],
    );
    let at_db = settle(capture);
    assert!(from_sport(&at_db, 42101) > 0, "positive control: att's SYN from its own address reaches db");
    breaches.check(from_sport(&at_db, 42102) == 0, "att's SYN from web2's address not delivered");
    let claims = at_db.iter().filter_map(arp_of).filter(|x| x.spa == [10, 30, 0, 20] && x.sha == mac_bytes(ATT_MAC));
    breaches.check(claims.count() == 0, "att's ARP claim of web2's address not delivered");
    show_counters(&agent, "after");
    let status = agent.status();
    let held = status["ports"].as_array().unwrap().iter().find(|p| p["name"] == web2.host_port()).cloned();
    eprintln!("web2's port: {held:?}");
    agent.stop();
    breaches.assert_none();
}
