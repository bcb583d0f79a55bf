//! The second part of `cargo xtask demo`: two hypervisor nodes (each a namespace with its
//! own bridge, joined by an uplink), etcd on a management network, one agent per node.
//! A VM streams to another over a TCP connection while it moves from one node to the
//! other; its flow goes with it and the move is in the audit log. Every object is a
//! guard: all of it goes away on success, error and Ctrl-C alike.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use backplane_lab::{ChildGuard, MGMT_IP, Node, NodeLab, UPLINK_PORT, Vm};

use crate::demo::check_interrupted;

const RULES: &str = "\
zones:
  web: { members: [ { cidr: 10.30.0.0/24 } ] }
  db: { members: [ { cidr: 10.40.0.0/24 } ] }
policies:
  - { name: web-to-db, from: web, to: db, allow: [ { proto: tcp, ports: [5432] } ] }
endpoints:
  web: { mac: \"02:00:00:30:00:01\", ips: [10.30.0.1] }
  db: { mac: \"02:00:00:40:00:01\", ips: [10.40.0.1] }
";

fn say(what: &str) {
    println!("demo: {what}");
}

/// An agent on a node and its socket.
struct NodeAgent {
    _child: ChildGuard,
    socket: PathBuf,
}

fn cli(bin: &Path, agent: &NodeAgent, args: &[&str]) -> Result<String> {
    let out = Command::new(bin).args(args).arg("--socket").arg(&agent.socket).output().context("run backplane")?;
    if !out.status.success() {
        bail!("`backplane {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim_end());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        check_interrupted()?;
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn start_agent(bin: &Path, lab: &NodeLab, node: &Node, labels: &str, rules: &Path) -> Result<NodeAgent> {
    let work = lab.work_dir();
    let socket = work.join(format!("{}.sock", node.name()));
    let state = work.join(format!("state-{}", node.name()));
    let etcd = format!("http://{MGMT_IP}:2379");
    let glob = lab.port_glob();
    let bin_s = bin.to_string_lossy().into_owned();
    let args = [
        bin_s.as_str(),
        "run",
        "--node",
        node.name(),
        "--labels",
        labels,
        "--interfaces",
        &glob,
        "--uplink",
        UPLINK_PORT,
        "--socket",
        &socket.to_string_lossy(),
        "--pin-dir",
        &format!("/sys/fs/bpf/backplane-demo-{}", node.name()),
        "--state-dir",
        &state.to_string_lossy(),
        "--rules",
        &rules.to_string_lossy(),
        "--etcd",
        &etcd,
        "--detach-on-exit",
    ]
    .map(str::to_owned);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = node.spawn(&refs);
    let deadline = Instant::now() + backplane_lab::AGENT_READY_TIMEOUT;
    while !backplane_lab::wait_for_socket(&mut child, &socket, Duration::from_millis(200)) {
        check_interrupted()?;
        if child.try_wait().is_some() || Instant::now() >= deadline {
            println!("{}", child.output().trim_end());
            bail!("the agent of {} did not start", node.name());
        }
    }
    let agent = NodeAgent { _child: child, socket };
    wait_until("the agent connected to etcd", Duration::from_secs(15), || {
        cli(bin, &agent, &["status"]).is_ok_and(|s| s.contains("connected, lease"))
    })?;
    Ok(agent)
}

/// An ARP-format frame (RARP 0x8035 opcode 3, or a gratuitous ARP) from a VM.
fn announce(vm: &Vm, rarp: bool) -> Vec<u8> {
    let (ethertype, op, ip) = if rarp { (0x8035u16, 3u16, [0; 4]) } else { (0x0806, 1, vm.ip().octets()) };
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&vm.mac());
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&vm.mac());
    f.extend_from_slice(&ip);
    let target = if rarp { vm.mac() } else { [0; 6] };
    f.extend_from_slice(&target);
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}

fn port_attached(bin: &Path, agent: &NodeAgent, vm: &Vm) -> bool {
    cli(bin, agent, &["status"]).is_ok_and(|s| s.contains(vm.host_port()))
}

/// Runs the two-node part of the demo.
pub(crate) fn run(bin: &Path) -> Result<()> {
    say("part 2: two nodes, etcd, and a VM that moves while it talks");
    let lab = NodeLab::new("bp");
    let hv1 = lab.add_node("hv1");
    let hv2 = lab.add_node("hv2");
    lab.connect(&hv1, &hv2);
    let rules = lab.work_dir().join("rules.yaml");
    std::fs::write(&rules, RULES)?;
    say(&format!("etcd on the management network ({MGMT_IP}:2379)"));
    let mut etcd = lab.start_etcd().map_err(anyhow::Error::msg)?;
    say("agents: hv1 (jurisdiction=eu, rack=r1) and hv2 (jurisdiction=eu, rack=r2), each with ip netns exec");
    let a1 = start_agent(bin, &lab, &hv1, "jurisdiction=eu,rack=r1", &rules)?;
    let a2 = start_agent(bin, &lab, &hv2, "jurisdiction=eu,rack=r2", &rules)?;
    let web = lab.add_vm(&hv1, "web", "10.30.0.1/8", Some("02:00:00:30:00:01"));
    let db = lab.add_vm(&hv1, "db", "10.40.0.1/8", Some("02:00:00:40:00:01"));
    for vm in [&web, &db] {
        wait_until("the VM port attached", Duration::from_secs(10), || port_attached(bin, &a1, vm))?;
        vm.send_raw_frames(&[announce(vm, false)]);
    }
    wait_until("web and db bound on hv1", Duration::from_secs(5), || {
        cli(bin, &a1, &["endpoint", "list"]).is_ok_and(|s| s.lines().filter(|l| l.contains("hv1")).count() >= 2)
    })?;
    print!("{}", cli(bin, &a1, &["endpoint", "list"])?);

    say("web opens tcp/5432 to db (policy web-to-db); db streams to web over it");
    let listener = db.in_netns(|| TcpListener::bind(("0.0.0.0", 5432)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let s = Arc::clone(&stop);
    let server = std::thread::spawn(move || {
        let Ok((mut c, _)) = listener.accept() else { return };
        let _ = c.set_write_timeout(Some(Duration::from_millis(200)));
        while !s.load(Ordering::Relaxed) {
            if let Err(e) = c.write(&[7u8; 1000]) {
                if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let dst = SocketAddr::new(IpAddr::V4(db.ip()), 5432);
    let mut conn = web.in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3)))?;
    conn.set_read_timeout(Some(Duration::from_millis(200)))?;
    let (s, r) = (Arc::clone(&stop), Arc::clone(&received));
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !s.load(Ordering::Relaxed) {
            if let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    return;
                }
                r.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    });
    let result = (|| -> Result<()> {
        std::thread::sleep(Duration::from_secs(2));
        say(&format!("web received {} bytes; hv1's flow table:", received.load(Ordering::Relaxed)));
        print!("{}", cli(bin, &a1, &["flows"])?);
        say("moving db's port from hv1 to hv2 (same MAC and address); hv2 binds it as the libvirt hook does, \
             then db sends RARP as QEMU does (a hint, not authority)");
        lab.move_vm(&db, &hv1, &hv2);
        wait_until("db's port attached on hv2", Duration::from_secs(10), || port_attached(bin, &a2, &db))?;
        // What deploy/libvirt/qemu runs on the destination when the domain starts there.
        print!("{}", cli(bin, &a2, &["endpoint", "bind", "db", "--port", db.host_port(), "--domain", "db"])?);
        // Five RARP frames over 350 ms, as QEMU announces a migrated VM.
        let rarp = announce(&db, true);
        for delay_ms in [0, 50, 100, 100, 100] {
            std::thread::sleep(Duration::from_millis(delay_ms));
            db.send_raw_frames(std::slice::from_ref(&rarp));
        }
        wait_until("the move in hv2's audit log", Duration::from_secs(5), || {
            cli(bin, &a2, &["audit"]).is_ok_and(|s| s.contains(" move "))
        })?;
        let before = received.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(3));
        let after = received.load(Ordering::Relaxed) - before;
        say(&format!("after the move web received {after} more bytes in 3 s: the connection lives on"));
        say("hv2's flow table (the record continues hv1's counters):");
        print!("{}", cli(bin, &a2, &["flows"])?);
        say("hv2's audit log:");
        print!("{}", cli(bin, &a2, &["audit"])?);
        print!("{}", cli(bin, &a2, &["endpoint", "list"])?);
        if after == 0 {
            bail!("the connection stopped after the move");
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let _ = server.join();
    drop((web, db));
    drop((a1, a2));
    etcd.stop();
    say("part 2 done; nodes, VMs, agents and etcd removed");
    result
}
