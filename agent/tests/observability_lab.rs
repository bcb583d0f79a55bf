//! Seeing the backplane, in the lab: `/metrics` checked by `promtool` and scraped by a
//! real Prometheus, flows exported to a real IPFIX collector (nfcapd), names from the
//! first packets of DNS, TLS and HTTP flows, and ring-buffer losses counted under a
//! flood of new flows. Prometheus and nfcapd listen on loopback ports of their own and
//! keep their files in the lab's work directory; both are stopped by their guards.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use backplane_lab::{ChildGuard, Lab, Vm};
use common::{
    agent::{Agent, copy_example_rules},
    frames,
};
use serde_json::Value;

/// A loopback TCP port nobody listens on now.
fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A loopback UDP port nobody listens on now.
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on a loopback HTTP server; returns the status code and the body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP header end: {text}"));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, body.to_owned())
}

/// The value of the sample `line_start` (name with labels, as printed) in a text
/// exposition, if present.
fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

fn ping(from: &Vm, to: Ipv4Addr, count: u32) -> bool {
    from.exec(&["ping", "-n", "-q", "-i", "0.2", "-c", &count.to_string(), "-W", "1", &to.to_string()]).status.success()
}

fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_pass_promtool_and_a_real_prometheus_sees_the_drops_of_a_zone_pair() {
    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let db = lab.add_tap_vm("db", "10.40.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let port = free_tcp_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap(), "--metrics-addr", &addr, "--program-stats"]);

    assert!(ping(&web, db.ip(), 2), "web -> db icmp is allowed");
    assert!(!ping(&db, web.ip(), 3), "db -> web is denied (default_inter_zone)");

    let (code, text) = http_get(port, "/metrics");
    assert_eq!(code, 200, "{text}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (cargo xtask setup installs Debian's prometheus)");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let denied = r#"backplane_zone_pair_packets_total{dst_zone="web",src_zone="db",verdict="denied"}"#;
    assert_eq!(metric(&text, denied), Some(3.0), "{text}");
    let allowed = r#"backplane_zone_pair_packets_total{dst_zone="db",src_zone="web",verdict="allowed"}"#;
    let (code, _) = http_get(port, "/nothing");
    assert_eq!(code, 404);
    // The flow counters of allowed flows reach the metrics with the next flow table read.
    let text = wait_until(Duration::from_secs(5), "allowed web->db packets", || {
        let (_, text) = http_get(port, "/metrics");
        (metric(&text, allowed) == Some(4.0)).then_some(text)
    });
    assert!(metric(&text, r#"backplane_dropped_packets_total{reason="default_inter_zone"}"#) >= Some(3.0), "{text}");
    assert_eq!(metric(&text, "backplane_rules_generation"), Some(1.0), "{text}");
    assert!(metric(&text, r#"backplane_map_capacity{map="flows"}"#) > Some(0.0), "{text}");
    assert!(metric(&text, r#"backplane_map_entries{map="ports"}"#) == Some(2.0), "{text}");
    assert!(
        metric(&text, r#"backplane_program_runs_total{program="from_port_tc"}"#) > Some(0.0),
        "BPF stats on: {text}"
    );
    assert!(
        metric(&text, r#"backplane_program_run_time_seconds_total{program="from_port_tc"}"#) > Some(0.0),
        "run time: {text}"
    );

    // `backplane top --once`: the same drops in the zone matrix.
    let top = agent.cli(&["top", "--once"]);
    let top = String::from_utf8_lossy(&top.stdout).into_owned();
    let db_row = top.lines().find(|l| l.starts_with("db ")).unwrap_or_else(|| panic!("{top}"));
    assert!(db_row.contains("0 / 3"), "{top}");

    // A real Prometheus, on a port of its own, scraping the agent every second.
    let prom_dir = lab.work_dir().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: backplane\n    \
             static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let prom_port = free_tcp_port();
    let mut prometheus = ChildGuard::spawn(Command::new("prometheus").args([
        &format!("--config.file={}", config.display()),
        &format!("--storage.tsdb.path={}", prom_dir.join("data").display()),
        &format!("--web.listen-address=127.0.0.1:{prom_port}"),
    ]));
    let query = "/api/v1/query?query=backplane_zone_pair_packets_total%7Bsrc_zone%3D%22db%22%2Cdst_zone%3D%22web%22%2Cverdict%3D%22denied%22%7D";
    let value = wait_until(Duration::from_secs(60), "Prometheus to have scraped the drop counter", || {
        if TcpStream::connect(("127.0.0.1", prom_port)).is_err() {
            return None;
        }
        let (code, body) = http_get(prom_port, query);
        let json: Value = serde_json::from_str(&body).ok()?;
        (code == 200).then_some(())?;
        json["data"]["result"][0]["value"][1].as_str().and_then(|v| v.parse::<f64>().ok())
    });
    assert!((value - 3.0).abs() < f64::EPSILON, "Prometheus' answer for db -> web denied packets: {value}");
    let status = prometheus.stop();
    assert!(status.success() || status.code().is_none(), "prometheus exited with {status}:\n{}", prometheus.output());
    agent.stop();
}

/// Columns of `nfdump -o csv` by name.
fn csv_rows(csv: &str) -> Vec<std::collections::HashMap<String, String>> {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let names: Vec<&str> = header.split(',').collect();
    lines
        .filter(|l| l.contains('.') || l.contains(':'))
        .map(|l| names.iter().zip(l.split(',')).map(|(n, v)| ((*n).to_owned(), v.trim().to_owned())).collect())
        .filter(|row: &std::collections::HashMap<String, String>| row.contains_key("sa"))
        .collect()
}

#[test]
fn ipfix_records_reach_nfcapd_with_addresses_ports_and_packet_counts() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.77.0.1/24", None, None);
    let b = lab.add_veth_vm("b", "10.77.0.2/24", None, None);
    let flows_dir = lab.work_dir().join("nfcapd");
    std::fs::create_dir_all(&flows_dir).unwrap();
    let port = free_udp_port();
    let mut nfcapd = ChildGuard::spawn(Command::new("nfcapd").args([
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-w",
        flows_dir.to_str().unwrap(),
        "-t",
        "3600",
    ]));
    std::thread::sleep(Duration::from_millis(500));
    let collector = format!("127.0.0.1:{port}");
    let agent = Agent::start(&lab, &["--ipfix", &collector, "--idle-timeout", "1", "--metrics-addr", "none"]);

    assert!(ping(&a, b.ip(), 5), "pings a -> b");
    let server = b.in_netns(|| UdpSocket::bind("0.0.0.0:5077")).unwrap();
    let client = a.in_netns(|| UdpSocket::bind("0.0.0.0:40077")).unwrap();
    for _ in 0..7 {
        client.send_to(&[1u8; 64], (b.ip(), 5077)).unwrap();
    }
    server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 128];
    for _ in 0..7 {
        server.recv_from(&mut buf).unwrap();
    }
    for _ in 0..3 {
        server.send_to(&[2u8; 32], (a.ip(), 40077)).unwrap();
    }
    // Both flows expire (idle for a second) and are exported with their final counts.
    agent.wait_for(Duration::from_secs(15), "both flows expired", |ag| {
        (ag.status()["flows"]["expired"].as_u64().unwrap_or(0) >= 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let status = nfcapd.stop();
    assert!(status.success(), "nfcapd exited with {status}:\n{}", nfcapd.output());
    let out = Command::new("nfdump").args(["-R", flows_dir.to_str().unwrap(), "-o", "csv", "-q"]).output().unwrap();
    let csv = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "nfdump: {}\n{csv}", String::from_utf8_lossy(&out.stderr));
    // -q leaves the header out on some versions; ask for it once more to be sure.
    let csv = if csv.starts_with("ts,") {
        csv
    } else {
        let with_header =
            Command::new("nfdump").args(["-R", flows_dir.to_str().unwrap(), "-o", "csv"]).output().unwrap();
        String::from_utf8_lossy(&with_header.stdout).into_owned()
    };
    eprintln!("nfdump -o csv:\n{csv}");
    let rows = csv_rows(&csv);
    let find = |sa: &str, da: &str, sp: &str, dp: &str| {
        rows.iter()
            .find(|r| r["sa"] == sa && r["da"] == da && r["sp"] == sp && r["dp"] == dp)
            .unwrap_or_else(|| panic!("no record {sa}:{sp} -> {da}:{dp} in\n{csv}"))
    };
    let fwd = find("10.77.0.1", "10.77.0.2", "40077", "5077");
    assert_eq!(fwd["ipkt"], "7", "{csv}");
    // 64 payload + 8 UDP + 20 IPv4 + 14 Ethernet.
    assert_eq!(fwd["ibyt"], (7 * 106).to_string(), "{csv}");
    assert!(fwd["pr"] == "17" || fwd["pr"].eq_ignore_ascii_case("udp"), "{csv}");
    let rev = find("10.77.0.2", "10.77.0.1", "5077", "40077");
    assert_eq!(rev["ipkt"], "3", "{csv}");
    let icmp = rows
        .iter()
        .find(|r| {
            r["sa"] == "10.77.0.1" && r["da"] == "10.77.0.2" && (r["pr"] == "1" || r["pr"].eq_ignore_ascii_case("icmp"))
        })
        .unwrap_or_else(|| panic!("no ICMP record a -> b in\n{csv}"));
    assert_eq!(icmp["ipkt"], "5", "{csv}");
    agent.stop();
}

/// A minimal TLS 1.2 `ClientHello` carrying `sni`.
fn client_hello(sni: &str) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0xc0, 0x2f]);
    body.extend_from_slice(&[1, 0]);
    let name = sni.as_bytes();
    let n = u16::try_from(name.len()).unwrap();
    let mut exts = vec![0x00, 0x0b, 0x00, 0x02, 0x01, 0x00];
    exts.extend_from_slice(&[0, 0]);
    exts.extend_from_slice(&(n + 5).to_be_bytes());
    exts.extend_from_slice(&(n + 3).to_be_bytes());
    exts.push(0);
    exts.extend_from_slice(&n.to_be_bytes());
    exts.extend_from_slice(name);
    body.extend_from_slice(&u16::try_from(exts.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// A DNS query (type A) for `name`.
fn dns_query(name: &str) -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        m.push(u8::try_from(label.len()).unwrap());
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// Sends `payload` over a TCP connection from `from` to `to:port` and waits until the
/// listener read it.
fn tcp_send(from: &Vm, to: &Vm, port: u16, payload: &[u8]) {
    let listener = to.in_netns(|| TcpListener::bind(("0.0.0.0", port))).unwrap();
    let want = payload.len();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = vec![0u8; want];
        c.read_exact(&mut buf).unwrap();
    });
    let dst = SocketAddr::new(IpAddr::V4(to.ip()), port);
    let mut s = from.in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3))).unwrap();
    s.write_all(payload).unwrap();
    server.join().unwrap();
}

#[test]
fn dns_tls_and_http_names_appear_in_flow_records_and_the_flow_log() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.78.0.1/24", None, None);
    let b = lab.add_tap_vm("b", "10.78.0.2/24", None, None);
    let log = lab.work_dir().join("log/flows.jsonl");
    let agent =
        Agent::start(&lab, &["--flow-log", log.to_str().unwrap(), "--idle-timeout", "1", "--metrics-addr", "none"]);

    let dns = b.in_netns(|| UdpSocket::bind("0.0.0.0:53")).unwrap();
    dns.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let resolver = a.in_netns(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    resolver.send_to(&dns_query("db.backplane.test"), (b.ip(), 53)).unwrap();
    let mut buf = [0u8; 512];
    dns.recv_from(&mut buf).expect("the query reached b");
    tcp_send(&a, &b, 443, &client_hello("shop.backplane.test"));
    tcp_send(&a, &b, 8080, b"GET /index.html HTTP/1.1\r\nHost: intranet.backplane.test\r\nAccept: */*\r\n\r\n");

    let named = |field: &str, proto: &str, port: u64| {
        agent.wait_for(Duration::from_secs(5), &format!("{field} in the {proto}/{port} flow"), |ag| {
            ag.flows()
                .into_iter()
                .find(|f| f["proto"] == proto && f["dst_port"] == port && f["src_ip"] == "10.78.0.1")
                .and_then(|f| f[field].as_str().map(str::to_owned))
        })
    };
    assert_eq!(named("dns_query", "udp", 53), "db.backplane.test");
    assert_eq!(named("tls_sni", "tcp", 443), "shop.backplane.test");
    assert_eq!(named("http_host", "tcp", 8080), "intranet.backplane.test");
    let flows = agent.flows();
    let https = flows.iter().find(|f| f["dst_port"] == 443).unwrap();
    assert!(https["dns_query"].is_null() && https["http_host"].is_null(), "absent names are null: {https:#}");

    let status = agent.status();
    assert!(status["counters"]["payload_samples"].as_u64().unwrap_or(0) >= 3, "{status:#}");

    // The flow log: a start line for each flow, and an expired line with the final
    // counters and the name once the DNS flow has been idle.
    let line = wait_until(Duration::from_secs(15), "the DNS flow's expired line in the flow log", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["event"] == "expired" && l["dst_port"] == 53)
    });
    assert_eq!(line["dns_query"], "db.backplane.test", "{line:#}");
    assert_eq!((line["fwd_packets"].as_u64(), line["verdict"].as_str()), (Some(1), Some("observed")), "{line:#}");
    let text = std::fs::read_to_string(&log).unwrap();
    let starts = text.lines().filter(|l| l.contains(r#""event":"start""#)).count();
    assert!(starts >= 3, "start lines:\n{text}");
    agent.stop();
}

#[test]
fn a_flood_of_new_flows_into_tiny_ring_buffers_counts_every_loss() {
    const FLOWS: u16 = 4000;
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.79.0.1/24", None, None);
    let b = lab.add_veth_vm("b", "10.79.0.2/24", None, None);
    let port = free_tcp_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start(&lab, &["--ring-size", "4096", "--payload-ring-size", "4096", "--metrics-addr", &addr]);
    let created_before = agent.status()["counters"]["flows_created"].as_u64().unwrap_or(0);
    let frames: Vec<Vec<u8>> = (0..FLOWS)
        .map(|i| {
            let udp = frames::udp(20_000 + i, 9999, &[0x42; 100]);
            frames::eth(b.mac(), a.mac(), &[], 0x0800, &frames::ipv4([10, 79, 0, 1], [10, 79, 0, 2], 17, &udp))
        })
        .collect();
    a.send_raw_frames(&frames);

    let status = agent.wait_for(Duration::from_secs(10), "every new flow accounted for", |ag| {
        let s = ag.status();
        let created = s["counters"]["flows_created"].as_u64()? - created_before;
        let seen = s["flows"]["start_events"].as_u64()?;
        let lost = s["events_lost"].as_u64()?;
        (created >= u64::from(FLOWS) && seen + lost >= created).then_some(s)
    });
    let c = &status["counters"];
    let created = c["flows_created"].as_u64().unwrap();
    let (seen, lost) = (status["flows"]["start_events"].as_u64().unwrap(), status["events_lost"].as_u64().unwrap());
    eprintln!("flows created {created}, start events read {seen}, lost {lost}");
    assert!(lost > 0, "a 4 KiB ring cannot hold {FLOWS} start events at once: {status:#}");
    assert_eq!(seen + lost, created, "every start event was read or counted as lost: {status:#}");
    let sent = c["payload_samples"].as_u64().unwrap();
    let samples_lost = c["payload_samples_lost"].as_u64().unwrap();
    let skipped = c["payload_samples_skipped"].as_u64().unwrap();
    eprintln!("payload samples: sent {sent}, lost {samples_lost}, skipped {skipped}");
    assert!(samples_lost + skipped > 0, "{c:#}");
    assert!(sent + samples_lost + skipped >= u64::from(FLOWS), "every sample attempt counted once: {c:#}");

    let (_, text) = http_get(port, "/metrics");
    let ring_lost = metric(&text, r#"backplane_ring_events_lost_total{ring="flow_events"}"#).unwrap_or(0.0);
    assert!(ring_lost > 0.0, "{text}");
    let ring_samples_lost = metric(&text, r#"backplane_ring_events_lost_total{ring="payload_samples"}"#);
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let expected = samples_lost as f64;
    assert_eq!(ring_samples_lost, Some(expected), "{text}");
    // The client side of the flood, for the record.
    let out = agent.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("lost (ring buffer full)"));
    agent.stop();
}
