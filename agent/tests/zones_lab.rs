//! Zone isolation in the lab: the three-zones example rule set enforced on real traffic
//! between VMs on one bridge, verdicts observed on the wire, hot reload, a broken file.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use backplane_lab::{Capture, Lab, Vm};
use common::agent::{Agent, copy_example_rules, field};

/// Whether a TCP connection from `from` to `to:port` opens and carries 64 KiB both ways.
fn tcp_works(from: &Vm, to: &Vm, port: u16) -> bool {
    let listener = to.in_netns(|| TcpListener::bind(("0.0.0.0", port))).expect("listen");
    listener.set_nonblocking(false).unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().ok()?;
        c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        let mut buf = vec![0u8; 65536];
        c.read_exact(&mut buf).ok()?;
        c.write_all(&buf).ok()?;
        Some(())
    });
    let dst = SocketAddr::new(IpAddr::V4(to.ip()), port);
    let ok = from.in_netns(|| {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.write_all(&vec![9u8; 65536]).ok()?;
        let mut back = vec![0u8; 65536];
        s.read_exact(&mut back).ok()?;
        Some(())
    });
    if ok.is_none() {
        // Unblock the accept so the server thread ends.
        let _ = to.in_netns(|| {
            TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(to.ip()), port), Duration::from_millis(200))
        });
    }
    let answered = server.join().expect("server thread");
    ok.is_some() && answered.is_some()
}

/// Whether one UDP datagram from `from` reaches `to:port`.
fn udp_arrives(from: &Vm, to: &Vm, port: u16) -> bool {
    let rx = to.in_netns(|| UdpSocket::bind(("0.0.0.0", port))).expect("bind");
    rx.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let tx = from.in_netns(|| UdpSocket::bind("0.0.0.0:0")).expect("bind");
    tx.send_to(b"hello", (to.ip(), port)).expect("send");
    let mut buf = [0u8; 16];
    rx.recv_from(&mut buf).is_ok()
}

fn ping_once(from: &Vm, to: &Vm) -> bool {
    from.exec(&["ping", "-n", "-q", "-c", "1", "-W", "1", &to.ip().to_string()]).status.success()
}

fn flow(agent: &Agent, proto: &str, from: &Vm, to: &Vm, dport: u16) -> serde_json::Value {
    let (src, dst) = (from.ip().to_string(), to.ip().to_string());
    agent
        .flows()
        .into_iter()
        .find(|f| {
            f["proto"] == proto
                && f["src_ip"] == src.as_str()
                && f["dst_ip"] == dst.as_str()
                && (dport == 0 || f["dst_port"] == dport)
        })
        .unwrap_or_else(|| panic!("no {proto} flow {src} -> {dst}:{dport}"))
}

#[test]
fn three_zones_enforced_on_the_wire_with_hot_reload() {
    let lab = Lab::new("bp");
    // One L2 segment; zones by address (/24s inside an on-link /8).
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let db = lab.add_tap_vm("db", "10.40.0.1/8", None, None);
    let mgmt = lab.add_veth_vm("mgmt", "10.50.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap()]);
    let status = agent.status();
    assert_eq!(status["rules"]["generation"], 1, "rules in force: {status:#}");

    // Allowed: web -> db on TCP 5432 (both directions of the connection pass), ICMP.
    assert!(tcp_works(&web, &db, 5432), "web -> db tcp/5432 is allowed");
    let f = flow(&agent, "tcp", &web, &db, 5432);
    assert_eq!((f["verdict"].as_str(), f["policy"].as_str()), (Some("allowed"), Some("web-to-db")), "{f:#}");
    assert_eq!((f["src_zone"].as_str(), f["dst_zone"].as_str()), (Some("web"), Some("db")), "{f:#}");
    assert!(field(&f, "rev_packets") > 0, "replies of an allowed flow pass: {f:#}");
    assert!(ping_once(&web, &db), "web -> db icmp is allowed");

    // Denied on the wire: another port of the same pair; nothing reaches db's port.
    let capture = Capture::start_filtered(db.host_port(), "tcp port 5433");
    assert!(!tcp_works(&web, &db, 5433), "web -> db tcp/5433 is not in the policy");
    assert!(capture.stop().is_empty(), "no packet of the denied flow was delivered to db");
    let f = flow(&agent, "tcp", &web, &db, 5433);
    assert_eq!(
        (f["verdict"].as_str(), f["reason"].as_str(), f["policy"].as_str()),
        (Some("denied"), Some("policy_no_match"), Some("web-to-db")),
        "{f:#}"
    );
    assert!(field(&f, "fwd_packets") >= 1, "the SYNs were counted: {f:#}");

    // UDP: web -> db is not allowed at all.
    assert!(!udp_arrives(&web, &db, 5353), "web -> db udp is denied");
    // The reverse direction: a new flow db -> web is denied (default_inter_zone),
    // although replies db -> web of the allowed flow passed above.
    assert!(!tcp_works(&db, &web, 8080), "db -> web is denied as a new flow");
    let f = flow(&agent, "tcp", &db, &web, 8080);
    assert_eq!(
        (f["verdict"].as_str(), f["reason"].as_str(), f["policy"].as_str()),
        (Some("denied"), Some("default_inter_zone"), Some("default_inter_zone")),
        "{f:#}"
    );
    assert!(!ping_once(&db, &web), "db -> web icmp is denied");

    // Allowed UDP and audit: mgmt -> db allows tcp only; web -> mgmt is an audit policy.
    assert!(tcp_works(&mgmt, &db, 22), "mgmt -> db ssh allowed");
    assert!(tcp_works(&web, &mgmt, 9999), "web -> mgmt passes in audit mode");
    let f = flow(&agent, "tcp", &web, &mgmt, 9999);
    assert_eq!((f["verdict"].as_str(), f["policy"].as_str()), (Some("audit"), Some("web-to-mgmt")), "{f:#}");

    // Drops are counted per zone pair and reason.
    let drops = agent.status()["zone_pairs"].clone();
    let db_web = drops
        .as_array()
        .expect("zone_pairs")
        .iter()
        .find(|d| d["src_zone"] == "db" && d["dst_zone"] == "web" && d["verdict"] == "denied");
    assert!(db_web.is_some_and(|d| d["packets"].as_u64() >= Some(2)), "db -> web drops counted: {drops:#}");

    // Hot reload: allow db -> web UDP 7000; in force within a second.
    std::fs::write(
        rules.join("reload.yaml"),
        "policies:\n  - name: db-to-web-udp\n    from: db\n    to: web\n    allow: [ { proto: udp, ports: [7000] } ]\n",
    )
    .unwrap();
    let written = Instant::now();
    agent.wait_for(Duration::from_secs(1), "generation 2 in force", |a| {
        (a.status()["rules"]["generation"] == 2).then_some(())
    });
    eprintln!("reload in force {:?} after the write", written.elapsed());
    assert!(udp_arrives(&db, &web, 7000), "db -> web udp/7000 allowed after the reload");
    assert!(!udp_arrives(&db, &web, 7001), "db -> web udp/7001 still denied");

    // A broken file changes nothing: the error is reported with file:line:column.
    std::fs::write(
        rules.join("broken.yaml"),
        "policies:\n  - name: bad\n    from: db\n    to: nowhere\n    allow: []\n",
    )
    .unwrap();
    let rejection = agent.wait_for(Duration::from_secs(2), "the rejection in status", |a| {
        let r = a.status()["rules"].clone();
        r["last_error"].as_array().filter(|e| !e.is_empty()).cloned()
    });
    let text = serde_json::to_string(&rejection).unwrap();
    assert!(text.contains("broken.yaml:4:"), "names file and line: {text}");
    assert!(text.contains("nowhere"), "names the unknown zone: {text}");
    assert_eq!(agent.status()["rules"]["generation"], 2, "the last good rules stay in force");
    assert!(udp_arrives(&db, &web, 7000), "still allowed by the last good rules");
    assert!(!tcp_works(&web, &db, 5433), "still denied by the last good rules");
    agent.stop();
}

#[test]
fn check_and_explain() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/examples/three-zones");
    let out = std::process::Command::new(common::agent::BACKPLANE).arg("check").arg(&example).output().unwrap();
    assert!(out.status.success(), "the example is valid: {}", String::from_utf8_lossy(&out.stderr));

    let dir = std::env::temp_dir().join(format!("bp-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), "zones:\n  web:\n    members: [ { cidr: 10.0.0.0/24 } ]\npolicies:\n  - { name: p, from: web, to: db, allow: [ { proto: tcp, ports: [\"90-80\"] } ] }\n").unwrap();
    let out = std::process::Command::new(common::agent::BACKPLANE).arg("check").arg(&dir).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "invalid rules exit 1: {text}");
    // The policy is on line 5 of a.yaml (zones:, web:, members:, policies:, - {...}).
    assert!(text.contains("a.yaml:5:"), "file:line of the errors: {text}");
    assert!(text.contains("db"), "the unknown zone is named: {text}");
    assert!(text.contains("90-80"), "the backwards range is named: {text}");

    let out = std::process::Command::new(common::agent::BACKPLANE)
        .args(["explain", "--rules"])
        .arg(&example)
        .args(["--from", "10.30.0.5", "--to", "10.40.0.9", "--proto", "tcp", "--port", "5432", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("explain --json");
    assert_eq!((v["verdict"].as_str(), v["policy"].as_str()), (Some("allowed"), Some("web-to-db")), "{v:#}");
    let out = std::process::Command::new(common::agent::BACKPLANE)
        .args(["explain", "--rules"])
        .arg(&example)
        .args(["--from", "10.40.0.9", "--to", "10.30.0.5", "--proto", "tcp", "--port", "80", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("explain --json");
    assert_eq!((v["verdict"].as_str(), v["reason"].as_str()), (Some("denied"), Some("default_inter_zone")), "{v:#}");
}
