//! Restart and upgrade without a gap: an agent killed with `kill -9` leaves its data
//! path attached and enforcing; the next agent adopts its maps (flows and counters
//! carry on) and its links (same link ids, the program on each replaced in place).

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use backplane_lab::{Capture, Lab, Vm, host_run};
use common::agent::{Agent, copy_example_rules, field};
use serde_json::Value;

/// A TCP connection from `client` to `server` on an allowed port, the server sending
/// 1000 bytes every 10 ms; the client notes the longest pause between two reads.
struct Stream {
    received: Arc<AtomicU64>,
    longest_pause: Arc<Mutex<Duration>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(client: &Vm, server: &Vm, port: u16) -> Stream {
        let listener = server.in_netns(|| TcpListener::bind(("0.0.0.0", port))).expect("listen");
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let longest_pause = Arc::new(Mutex::new(Duration::ZERO));
        let s = Arc::clone(&stop);
        let writer = std::thread::spawn(move || {
            let Ok((mut c, _)) = listener.accept() else { return };
            c.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
            let chunk = [7u8; 1000];
            while !s.load(Ordering::Relaxed) {
                match c.write(&chunk) {
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let dst = SocketAddr::new(IpAddr::V4(server.ip()), port);
        let mut conn = client.in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3))).expect("connect");
        conn.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let (s, r, p) = (Arc::clone(&stop), Arc::clone(&received), Arc::clone(&longest_pause));
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                match conn.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        r.fetch_add(n as u64, Ordering::Relaxed);
                        let mut longest = p.lock().unwrap();
                        *longest = (*longest).max(last.elapsed());
                        last = Instant::now();
                    }
                    Err(_) => {}
                }
            }
        });
        Stream { received, longest_pause, stop, threads: vec![writer, reader] }
    }

    fn bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn reset_pause(&self) {
        *self.longest_pause.lock().unwrap() = Duration::ZERO;
    }

    fn longest_pause(&self) -> Duration {
        *self.longest_pause.lock().unwrap()
    }

    /// Bytes received during `d`.
    fn progress(&self, d: Duration) -> u64 {
        let before = self.bytes();
        std::thread::sleep(d);
        self.bytes() - before
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// TCP segments the kernel of `vm` retransmitted so far (`TcpRetransSegs`).
fn retransmits(vm: &Vm) -> u64 {
    let out = vm.run(&["cat", "/proc/net/snmp"]);
    let tcp: Vec<&str> = out.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (names, values) = (tcp[0].split_whitespace(), tcp[1].split_whitespace());
    let (_, value) = names.zip(values).find(|(n, _)| *n == "RetransSegs").expect("RetransSegs");
    value.parse().expect("a number")
}

/// Whether a new TCP connection from `from` to `to:port` opens within a second.
fn connects(from: &Vm, to: &Vm, port: u16) -> bool {
    let listener = to.in_netns(|| TcpListener::bind(("0.0.0.0", port))).expect("listen");
    let dst = SocketAddr::new(IpAddr::V4(to.ip()), port);
    let ok = from.in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(1))).is_ok();
    drop(listener);
    ok
}

/// The stream's flow (web -> db:port).
fn stream_flow(agent: &Agent, port: u16) -> Value {
    agent
        .flows()
        .into_iter()
        .find(|f| f["proto"] == "tcp" && f["dst_port"] == port && f["src_ip"] == "10.30.0.1")
        .unwrap_or_else(|| panic!("no flow of the stream in {:#?}", agent.flows()))
}

/// (port name, xdp link id, tc link id, `from_port` id, `to_port` id) of each port.
fn links(agent: &Agent) -> Vec<(String, u64, u64, u64, u64)> {
    let mut out: Vec<_> = agent.status()["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["xdp_link_id"].as_u64().unwrap(),
                p["tc_link_id"].as_u64().unwrap(),
                p["from_port_id"].as_u64().unwrap(),
                p["to_port_id"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
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
    let links_before = links(&first);
    assert_eq!(links_before.len(), 2, "two ports: {links_before:?}");
    assert!(links_before.iter().all(|l| l.1 != 0 && l.2 != 0), "pinned links: {links_before:?}");
    let programs_before = first.status()["program_ids"].clone();
    let dropped_before = first.status()["counters"]["dropped"].as_u64().unwrap();

    // kill -9: nothing is detached, the rules stay in force.
    let retrans_before = retransmits(&db);
    stream.reset_pause();
    first.kill_9();
    let link = host_run(&["ip", "-d", "link", "show", "dev", web.host_port()]);
    assert!(link.contains("xdp"), "XDP still attached while no agent runs: {link}");
    let capture = Capture::start_filtered(web.host_port(), "tcp port 8081");
    assert!(!connects(&db, &web, 8081), "db -> web stays denied while no agent runs");
    assert!(capture.stop().is_empty(), "nothing of the denied connection reached web");
    assert!(stream.progress(Duration::from_secs(1)) > 0, "the allowed stream flows while no agent runs");

    // A new agent on the same pins (with --detach-on-exit: it cleans up at the end).
    let second = Agent::start(&lab, &["--rules", rules_arg]);
    assert!(stream.progress(Duration::from_millis(500)) > 0, "the allowed stream flows on");
    let links_after = links(&second);
    let programs = second.status()["program_ids"].clone();
    for (b, a) in links_before.iter().zip(&links_after) {
        assert_eq!((&b.0, b.1, b.2), (&a.0, a.1, a.2), "the same links, never detached");
        assert_eq!((a.3, a.4), (programs["from_port"].as_u64().unwrap(), programs["to_port"].as_u64().unwrap()));
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
    assert_eq!(retransmits(&db), retrans_before, "no segment of the stream was lost across the restart");
    let pause = stream.longest_pause();
    assert!(pause < Duration::from_secs(1), "the stream never paused long: {pause:?}");
    assert!(!connects(&db, &web, 8082), "db -> web is still denied");
    drop(stream);
    second.stop();
    let link = host_run(&["ip", "-d", "link", "show", "dev", web.host_port()]);
    assert!(!link.contains("xdp"), "--detach-on-exit still removes everything: {link}");
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
    let link = host_run(&["ip", "-d", "link", "show", "dev", a.host_port()]);
    assert!(!link.contains("xdp"), "nothing was attached: {link}");
}
