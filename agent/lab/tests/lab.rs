//! The lab itself, on real namespaces, bridges, veths and taps (run as root).

use std::path::Path;
use std::time::Duration;

use backplane_lab::{Capture, Lab, PREFIX, PortKind, host_run, leftovers};

fn netns_exists(name: &str) -> bool {
    host_run(&["ip", "netns", "list"]).lines().any(|line| line.split_whitespace().next() == Some(name))
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn echo_count(capture: Capture) -> usize {
    capture.stop().iter().filter(|packet| packet.is_icmp_echo()).count()
}

#[test]
fn two_veth_vms_ping_each_other_over_the_bridge() {
    let lab = Lab::new(PREFIX);
    let a = lab.add_veth_vm("a", "10.77.1.1/24", Some("fd00:77:1::1/64"), None);
    let b = lab.add_veth_vm("b", "10.77.1.2/24", Some("fd00:77:1::2/64"), Some("02:00:00:77:01:02"));
    assert_eq!(b.mac(), [2, 0, 0, 0x77, 1, 2]);
    assert_eq!(b.mac_string(), "02:00:00:77:01:02");
    assert_eq!(a.kind(), PortKind::Veth);
    assert!(a.host_port().starts_with(&format!("bpv{}", lab.suffix())), "{}", a.host_port());
    assert!(a.host_port().len() <= backplane_lab::MAX_IFNAME_LEN);
    let mut ports = lab.bridge_ports();
    ports.sort();
    assert_eq!(ports, [a.host_port(), b.host_port()]);

    let capture = Capture::start_filtered(b.host_port(), "icmp or icmp6");
    assert!(a.ping(b.ip(), 3), "a cannot ping b");
    assert!(b.ping(a.ip(), 3), "b cannot ping a");
    assert!(a.ping(b.ip6().unwrap(), 3), "a cannot ping b over IPv6");
    // Each ping run puts 3 requests and 3 replies through b's port.
    assert_eq!(echo_count(capture), 18);

    let inside = a.run(&["ip", "-o", "address", "show", "dev", "eth0"]);
    assert!(inside.contains("10.77.1.1/24") && inside.contains("fd00:77:1::1/64"), "{inside}");
}

#[test]
fn tap_vm_pings_a_veth_vm_through_a_real_tap() {
    let lab = Lab::new(PREFIX);
    let a = lab.add_veth_vm("a", "10.77.2.1/24", Some("fd00:77:2::1/64"), None);
    let c = lab.add_tap_vm("c", "10.77.2.3/24", Some("fd00:77:2::3/64"), Some("02:00:00:77:02:03"));
    assert_eq!(c.kind(), PortKind::Tap);
    assert!(c.host_port().starts_with(&format!("bpt{}", lab.suffix())));
    // The host port really is a tun/tap device.
    assert!(Path::new("/sys/class/net").join(c.host_port()).join("tun_flags").exists());

    let capture = Capture::start_filtered(c.host_port(), "icmp or icmp6");
    assert!(c.ping(a.ip(), 3), "c cannot ping a");
    assert!(a.ping(c.ip6().unwrap(), 3), "a cannot ping c over IPv6");
    assert_eq!(echo_count(capture), 12);

    // A TCP transfer through the tap, with frames bigger than a ping.
    let mut server = c.spawn(&["iperf3", "-s", "-1", "-B", &c.ip().to_string(), "--forceflush"]);
    assert!(server.wait_for_output("Server listening", Duration::from_secs(5)), "{}", server.output());
    let client = a.exec(&["iperf3", "-c", &c.ip().to_string(), "-n", "1M", "--connect-timeout", "3000"]);
    assert!(client.status.success(), "iperf3: {}{}", String::from_utf8_lossy(&client.stdout), server.output());
}

#[test]
fn raw_frames_leave_through_the_vm_port() {
    let lab = Lab::new(PREFIX);
    let a = lab.add_veth_vm("a", "10.77.3.1/24", None, None);
    let c = lab.add_tap_vm("c", "10.77.3.3/24", None, None);
    for vm in [&a, &c] {
        let capture = Capture::start_filtered(vm.host_port(), "ether proto 0x88b5");
        let mut frame = vec![0xff; 6];
        frame.extend(vm.mac());
        frame.extend([0x88, 0xb5]);
        frame.extend(b"backplane lab raw frame, padded to sixty bytes..");
        vm.send_raw_frames(&[frame.clone(), frame.clone(), frame.clone()]);
        let packets = capture.stop();
        assert_eq!(packets.len(), 3, "{} sent 3 frames", vm.name());
        assert_eq!(packets[0].data, frame);
        assert_eq!(packets[0].ethertype(), Some(0x88b5));
    }
}

#[test]
fn unplugged_vm_is_cut_off_until_plugged_back() {
    let lab = Lab::new(PREFIX);
    let a = lab.add_veth_vm("a", "10.77.4.1/24", None, None);
    let b = lab.add_tap_vm("b", "10.77.4.2/24", None, None);
    assert!(a.ping(b.ip(), 1));
    lab.unplug(&b);
    assert!(!a.ping(b.ip(), 1), "an unplugged VM still answers");
    lab.plug(&b);
    assert!(a.ping(b.ip(), 2), "a plugged-back VM does not answer");
    // A VM added later joins the same switch.
    let late = lab.add_veth_vm("late", "10.77.4.3/24", None, None);
    assert!(late.ping(a.ip(), 1));
}

#[test]
fn a_stopped_vm_takes_its_processes_and_links_with_it() {
    let lab = Lab::new(PREFIX);
    let b = lab.add_tap_vm("b", "10.77.5.2/24", None, None);
    let a = lab.add_veth_vm("a", "10.77.5.1/24", None, None);
    let mut sleeper = a.spawn(&["sleep", "1000"]);
    let pid = sleeper.id();
    // Wait until `ip netns exec` has entered the namespace and become `sleep`.
    for _ in 0..500 {
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "sleep") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (netns, port) = (a.netns().to_owned(), a.host_port().to_owned());
    drop(a);
    assert!(!netns_exists(&netns));
    assert!(!link_exists(&port));
    assert!(sleeper.wait_timeout(Duration::from_secs(5)).is_some(), "process {pid} survived its VM");
    assert!(link_exists(b.host_port()), "the other VM lost its port");
}

#[test]
fn dropping_everything_leaves_nothing() {
    let lab = Lab::new(PREFIX);
    let a = lab.add_veth_vm("a", "10.77.6.1/24", Some("fd00:77:6::1/64"), None);
    let c = lab.add_tap_vm("c", "10.77.6.3/24", None, None);
    let remote = lab.add_uplink("remote", "10.77.6.254/24", None, None);
    assert_eq!(remote.kind(), PortKind::Uplink);
    assert!(remote.host_port().starts_with(&format!("bpu{}", lab.suffix())));
    assert!(remote.ping(c.ip(), 1));
    std::fs::create_dir_all(lab.pin_dir()).expect("bpffs is mounted (cargo xtask setup)");
    let suffix = lab.suffix().to_owned();
    let netns = [a.netns().to_owned(), c.netns().to_owned(), remote.netns().to_owned()];
    let links = [lab.bridge_name().to_owned(), a.host_port().to_owned(), c.host_port().to_owned()];
    let dirs = [lab.pin_dir(), lab.work_dir().to_path_buf()];
    drop((remote, c, a, lab));
    for name in &netns {
        assert!(!netns_exists(name), "namespace {name} is left");
    }
    for name in &links {
        assert!(!link_exists(name), "link {name} is left");
    }
    for dir in &dirs {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    let mine: Vec<_> = leftovers(PREFIX).into_iter().filter(|l| l.name.contains(&suffix)).collect();
    assert!(mine.is_empty(), "left: {mine:?}");
}

#[test]
#[should_panic(expected = "did not create")]
fn an_agent_that_exits_at_once_fails_with_its_output() {
    let lab = Lab::new(PREFIX);
    let _agent = lab.start_agent("/bin/false", &[]);
}
