//! Flow capture in the lab: real VMs (network namespaces behind veth and tap ports of a
//! Linux bridge), real traffic, the real agent; counters checked against what was sent
//! and against a capture on the same port.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use backplane_lab::{Capture, Lab};
use common::agent::{Agent, field};

fn src_ipv4(p: &backplane_lab::Packet) -> Option<Ipv4Addr> {
    (p.ethertype() == Some(0x0800)).then(|| Ipv4Addr::new(p.data[26], p.data[27], p.data[28], p.data[29]))
}

#[test]
fn ten_pings_make_one_icmp_flow_with_ten_packets_each_way() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.71.0.1/24", None, None);
    let b = lab.add_veth_vm("b", "10.71.0.2/24", None, None);
    let agent = Agent::start(&lab, &[]);
    assert!(a.ping(b.ip(), 10), "pings a -> b");
    let flow = agent.find_flow("icmp", "10.71.0.1", "10.71.0.2").expect("an ICMP flow a -> b");
    assert_eq!(field(&flow, "fwd_packets"), 10, "{flow:#}");
    assert_eq!(field(&flow, "rev_packets"), 10, "{flow:#}");
    // 56 data bytes + 8 ICMP + 20 IPv4 + 14 Ethernet = 98 bytes per frame.
    assert_eq!(field(&flow, "fwd_bytes"), 10 * 98, "{flow:#}");
    assert_eq!(field(&flow, "rev_bytes"), 10 * 98, "{flow:#}");
    let ifaces: Vec<&str> =
        flow["interfaces"].as_array().expect("interfaces").iter().filter_map(|v| v.as_str()).collect();
    assert!(ifaces.contains(&a.host_port()) && ifaces.contains(&b.host_port()), "seen on both ports: {ifaces:?}");
    assert_eq!(flow["verdict"], "observed");
    agent.stop();
}

#[test]
fn tcp_transfer_counts_equal_a_capture_on_the_same_port() {
    const MIB: usize = 1 << 20;
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.72.0.1/24", None, None);
    let b = lab.add_tap_vm("b", "10.72.0.2/24", None, None);
    let agent = Agent::start(&lab, &[]);
    let listener = b.in_netns(|| TcpListener::bind("0.0.0.0:5001")).expect("listen in b");
    let capture = Capture::start_filtered(a.host_port(), "tcp");
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).expect("read");
        buf.len()
    });
    let dst = SocketAddr::new(IpAddr::V4(b.ip()), 5001);
    let mut stream = a.in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(5))).expect("connect a -> b");
    stream.write_all(&vec![0x5a; MIB]).expect("send 1 MiB");
    stream.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_eq!(server.join().expect("server"), MIB, "b received 1 MiB");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    drop(stream);
    std::thread::sleep(Duration::from_millis(500));
    let packets = capture.stop();
    let from_a: Vec<_> = packets.iter().filter(|p| src_ipv4(p) == Some(a.ip())).collect();
    let from_b: Vec<_> = packets.iter().filter(|p| src_ipv4(p) == Some(b.ip())).collect();
    let flow = agent.find_flow("tcp", "10.72.0.1", "10.72.0.2").expect("a TCP flow a -> b");
    assert_eq!(field(&flow, "dst_port"), 5001);
    assert!(field(&flow, "fwd_bytes") >= MIB as u64, "{flow:#}");
    assert_eq!(field(&flow, "fwd_packets"), from_a.len() as u64, "packets a -> b: flow vs capture; {flow:#}");
    assert_eq!(field(&flow, "rev_packets"), from_b.len() as u64, "packets b -> a: flow vs capture; {flow:#}");
    let captured_bytes: u64 = from_a.iter().map(|p| u64::from(p.orig_len)).sum();
    assert_eq!(field(&flow, "fwd_bytes"), captured_bytes, "bytes a -> b: flow vs capture");
    let flags = flow["tcp_flags"].as_str().unwrap_or_default();
    assert!(flags.contains("SYN") && flags.contains("FIN"), "flags seen: {flags}");
    agent.stop();
}

#[test]
fn a_vm_started_after_the_agent_is_attached_within_a_second_and_forgotten_when_gone() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.73.0.1/24", None, None);
    let agent = Agent::start(&lab, &[]);
    let attached = |agent: &Agent, port: &str| {
        agent.status()["ports"].as_array().is_some_and(|l| l.iter().any(|i| i["name"] == port))
    };
    for (name, ip, tap) in [("c", "10.73.0.3/24", false), ("d", "10.73.0.4/24", true)] {
        let late = if tap { lab.add_tap_vm(name, ip, None, None) } else { lab.add_veth_vm(name, ip, None, None) };
        let since = Instant::now();
        let port = late.host_port().to_owned();
        agent.wait_for(Duration::from_secs(1), &format!("{port} attached"), |ag| attached(ag, &port).then_some(()));
        eprintln!("{port} attached {:?} after the VM was up", since.elapsed());
        assert!(late.ping(a.ip(), 3), "pings {} -> a", late.name());
        let src = late.ip().to_string();
        let flow = agent.find_flow("icmp", &src, "10.73.0.1").expect("the late VM's flow");
        assert_eq!(field(&flow, "fwd_packets"), 3, "{flow:#}");
        assert_eq!(field(&flow, "rev_packets"), 3, "{flow:#}");
        drop(late);
        agent.wait_for(Duration::from_secs(1), &format!("{port} forgotten"), |ag| (!attached(ag, &port)).then_some(()));
    }
    agent.stop();
}

#[test]
fn udp_and_ipv6_flows_are_seen() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.74.0.1/24", Some("fd00:74::1/64"), None);
    let b = lab.add_veth_vm("b", "10.74.0.2/24", Some("fd00:74::2/64"), None);
    let agent = Agent::start(&lab, &[]);
    let server = b.in_netns(|| UdpSocket::bind("0.0.0.0:5353")).expect("bind in b");
    let client = a.in_netns(|| UdpSocket::bind("0.0.0.0:40053")).expect("bind in a");
    for _ in 0..7 {
        client.send_to(&[7u8; 100], (b.ip(), 5353)).expect("send");
    }
    let mut buf = [0u8; 200];
    server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for _ in 0..7 {
        server.recv_from(&mut buf).expect("datagram reached b");
    }
    let flow = agent.find_flow("udp", "10.74.0.1", "10.74.0.2").expect("a UDP flow");
    assert_eq!((field(&flow, "src_port"), field(&flow, "dst_port")), (40053, 5353));
    assert_eq!(field(&flow, "fwd_packets"), 7, "{flow:#}");
    // 100 payload + 8 UDP + 20 IPv4 + 14 Ethernet.
    assert_eq!(field(&flow, "fwd_bytes"), 7 * 142, "{flow:#}");
    assert_eq!(field(&flow, "rev_packets"), 0, "{flow:#}");

    let b6 = b.ip6().expect("b has IPv6");
    assert!(a.ping(b6, 5), "ping6 a -> b");
    let flow = agent.find_flow("icmpv6", "fd00:74::1", "fd00:74::2").expect("an ICMPv6 echo flow");
    assert_eq!(field(&flow, "fwd_packets"), 5, "{flow:#}");
    assert_eq!(field(&flow, "rev_packets"), 5, "{flow:#}");
    // 56 data + 8 ICMPv6 + 40 IPv6 + 14 Ethernet = 118 bytes per frame.
    assert_eq!(field(&flow, "fwd_bytes"), 5 * 118, "{flow:#}");
    agent.stop();
}

#[test]
fn stopping_with_detach_on_exit_leaves_no_program_or_pin() {
    let lab = Lab::new("bp");
    let a = lab.add_veth_vm("a", "10.75.0.1/24", None, None);
    let agent = Agent::start(&lab, &[]);
    let pin_dir = lab.pin_dir();
    let maps_dir = backplane::datapath::pin_layout::maps_dir(&pin_dir, backplane_common::maps::PIN_LAYOUT_VERSION);
    assert!(maps_dir.join("FLOWS").exists(), "maps are pinned under {}", maps_dir.display());
    assert_eq!(common::links_on(a.host_port()), ["tc-egress", "tc-ingress"], "attached to {}", a.host_port());
    agent.stop();
    assert!(!pin_dir.exists(), "pin dir removed: {:?}", std::fs::read_dir(&pin_dir).map(Iterator::count));
    assert!(common::links_on(a.host_port()).is_empty(), "every link of {} detached", a.host_port());
}
