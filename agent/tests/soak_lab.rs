//! Soak: VMs start and stop, the rules are reloaded every second, traffic flows, and
//! verdicts are checked on the wire throughout. At the end (once idle flows expired)
//! the kernel maps hold no more than the live flows and the ports and rules there are,
//! and the agent has no more descriptors and no more memory than its live state needs.
//!
//! About a minute in `cargo xtask test`; `cargo xtask soak --minutes N` runs it longer
//! (`BACKPLANE_SOAK_SECONDS`).

mod common;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use backplane_lab::Lab;
use common::{
    agent::{Agent, copy_example_rules},
    traffic::{Stream, connects},
};

const RELOAD_A: &str =
    "policies:\n  - { name: mgmt-to-web-udp, from: mgmt, to: web, allow: [ { proto: udp, ports: [7000] } ] }\n";
const RELOAD_B: &str =
    "policies:\n  - { name: mgmt-to-web-udp, from: mgmt, to: web, allow: [ { proto: udp, ports: [7000, 7001] } ] }\n";

/// What is measured of the agent and its maps.
#[derive(Debug, Clone)]
struct Sample {
    rss_kib: u64,
    fds: usize,
    /// `backplane_map_entries` by map.
    maps: BTreeMap<String, u64>,
    active_records: u64,
    ended_records: u64,
}

fn metrics(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

fn sample(agent: &Agent, port: u16) -> Sample {
    let pid = agent.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let maps = metrics(port)
        .lines()
        .filter_map(|l| l.strip_prefix("backplane_map_entries{map=\""))
        .filter_map(|l| {
            let (name, rest) = l.split_once('"')?;
            Some((name.to_owned(), rest.rsplit(' ').next()?.parse::<u64>().ok()?))
        })
        .collect();
    let flows = agent.status()["flows"].clone();
    Sample {
        rss_kib,
        fds,
        maps,
        active_records: flows["active_records"].as_u64().unwrap(),
        ended_records: flows["ended_records"].as_u64().unwrap(),
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "the soak, in order, reads best as one sequence")]
fn vms_come_and_go_rules_reload_every_second_and_nothing_grows() {
    let seconds: u64 = std::env::var("BACKPLANE_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let db = lab.add_tap_vm("db", "10.40.0.1/8", None, None);
    let mgmt = lab.add_veth_vm("mgmt", "10.50.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let agent =
        Agent::start(&lab, &["--rules", rules.to_str().unwrap(), "--idle-timeout", "2", "--metrics-addr", &addr]);

    // The rules change every second (renamed into place, as the README asks).
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let reloader = {
        let (stop, writes, dir) = (Arc::clone(&stop), Arc::clone(&writes), rules.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = writes.fetch_add(1, Ordering::Relaxed);
                let tmp = dir.join("reload.tmp");
                std::fs::write(&tmp, if n % 2 == 0 { RELOAD_A } else { RELOAD_B }).unwrap();
                std::fs::rename(&tmp, dir.join("reload.yaml")).unwrap();
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    // A long allowed connection (web -> db tcp/5432) and a sink on web that no denied
    // datagram from db may reach.
    let stream = Stream::start(&web, &db, 5432);
    let sink = web.in_netns(|| UdpSocket::bind("0.0.0.0:7100")).unwrap();
    sink.set_nonblocking(true).unwrap();
    let sender = db.in_netns(|| UdpSocket::bind("0.0.0.0:0")).unwrap();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let baseline_at = started + Duration::from_secs((seconds / 6).max(10));
    let mut baseline: Option<Sample> = None;
    let mut wrong: Vec<String> = Vec::new();
    let (mut vms, mut checks) = (0u32, 0u32);
    let mut last_bytes = stream.bytes();
    while Instant::now() < deadline {
        vms += 1;
        let name = format!("c{vms}");
        // A web VM that comes, talks and goes.
        let vm = lab.add_veth_vm(&name, &format!("10.30.0.{}/8", 10 + vms % 200), None, None);
        let host_port = vm.host_port().to_owned();
        agent.wait_for(Duration::from_secs(3), "the new VM's port attached", |a| {
            a.status()["ports"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == host_port.as_str()))
                .then_some(())
        });
        let mut check = |ok: bool, what: &str| {
            checks += 1;
            if !ok {
                wrong.push(format!("{:.1}s: {what}", started.elapsed().as_secs_f64()));
            }
        };
        check(vm.ping(db.ip(), 1), &format!("{name} (web) -> db icmp was not allowed"));
        check(!connects(&vm, &db, 5433), &format!("{name} (web) -> db tcp/5433 was not denied"));
        check(connects(&mgmt, &db, 22), "mgmt -> db tcp/22 was not allowed");
        sender.send_to(b"denied", (web.ip(), 7100)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 16];
        check(sink.recv_from(&mut buf).is_err(), "a db -> web datagram was delivered");
        let bytes = stream.bytes();
        check(bytes > last_bytes, "the allowed stream stalled");
        last_bytes = bytes;
        drop(vm);
        if baseline.is_none() && Instant::now() >= baseline_at {
            baseline = Some(sample(&agent, port));
        }
    }
    stop.store(true, Ordering::Relaxed);
    reloader.join().unwrap();
    let rules_status = agent.status()["rules"].clone();
    assert!(stream.progress(Duration::from_millis(500)) > 0, "the stream still flows");
    let pause = stream.longest_pause();
    drop(stream);
    // Idle flows expire after 2 s, ended ones after 5 s: wait for the refresh after that.
    std::thread::sleep(Duration::from_secs(8));
    let end = sample(&agent, port);
    let baseline = baseline.expect("a baseline sample");
    eprintln!(
        "soak: {seconds} s, {vms} VMs started and stopped, {} rule reloads ({} rejected), {checks} verdict checks, {} wrong; \
         longest pause of the stream {pause:?}",
        rules_status["reloads_ok"],
        rules_status["reloads_rejected"],
        wrong.len()
    );
    eprintln!(
        "soak: baseline at {:?}: rss {} KiB, {} fds, {} active / {} ended flow records, maps {:?}",
        baseline_at - started,
        baseline.rss_kib,
        baseline.fds,
        baseline.active_records,
        baseline.ended_records,
        baseline.maps
    );
    eprintln!(
        "soak: end: rss {} KiB, {} fds, {} active / {} ended flow records, maps {:?}",
        end.rss_kib, end.fds, end.active_records, end.ended_records, end.maps
    );
    assert!(wrong.is_empty(), "wrong verdicts: {wrong:#?}");
    assert!(vms >= 5, "VMs came and went: {vms}");
    let reloads = rules_status["reloads_ok"].as_u64().unwrap();
    assert!(reloads >= seconds / 3, "the rules were reloaded about every second: {rules_status:#}");
    assert_eq!(rules_status["reloads_rejected"], 0, "{rules_status:#}");

    // Kernel maps: only the live state.
    assert_eq!(end.maps["flows"], end.active_records, "every kernel flow is a live record, and no more");
    assert!(end.maps["flows"] <= 4, "no flow left behind but the live ones: {}", end.maps["flows"]);
    assert_eq!(end.maps["ports"], 3, "the three VMs that stayed");
    for table in ["endpoints", "zone_cidrs", "zones", "policies", "vpatches"] {
        assert!(end.maps[table] <= baseline.maps[table], "{table}: {} -> {}", baseline.maps[table], end.maps[table]);
    }
    assert!(end.maps["zone_pair_stats"] <= baseline.maps["zone_pair_stats"] + 4, "zone pairs are bounded");
    // Descriptors: none leaked.
    assert!(end.fds <= baseline.fds + 2, "descriptors: {} -> {}", baseline.fds, end.fds);
    // Memory: the flow history (bounded, 10,000 records) grows with the flows that
    // ended; beyond that, no growth.
    let history = end.ended_records.saturating_sub(baseline.ended_records);
    let allowed = baseline.rss_kib + 8 * 1024 + 2 * history;
    assert!(end.rss_kib <= allowed, "rss {} -> {} KiB (allowed {allowed} KiB)", baseline.rss_kib, end.rss_kib);
    agent.stop();
}
