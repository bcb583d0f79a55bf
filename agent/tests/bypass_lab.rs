//! No bypass: frames a guest can write to its tap in ways the tun driver handles on
//! other paths than small frames — GSO super-frames with a virtio-net header, jumbo
//! frames — and VLAN-tagged frames from a port that should send untagged, are judged
//! like any other: denied ones never reach the other VM. Another product's TCX program on
//! the same port neither runs before backplane nor is cut off by it.

mod common;

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::fd::AsRawFd as _,
    time::Duration,
};

use backplane_lab::{Capture, Lab, host_run};
use common::{
    agent::{Agent, copy_example_rules, field},
    frames::{TCP_ACK, eth, ipv4, tcp},
};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;

/// A tap whose frames the test writes itself, with a virtio-net header, as QEMU's
/// vhost-less backend does. Removed when dropped (it is not persistent).
struct VnetTap {
    file: File,
    name: String,
}

impl VnetTap {
    fn open(name: &str) -> VnetTap {
        let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun").expect("open /dev/net/tun");
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // SAFETY: TUNSETIFF reads a struct ifreq (40 bytes) that lives through the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        assert_eq!(rc, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4) };
        assert_eq!(rc, 0, "TUNSETOFFLOAD: {}", std::io::Error::last_os_error());
        VnetTap { file, name: name.to_owned() }
    }

    /// Writes one frame behind a virtio-net header (10 bytes).
    fn write(&mut self, vnet_hdr: [u8; 10], frame: &[u8]) {
        let mut buf = vnet_hdr.to_vec();
        buf.extend_from_slice(frame);
        self.file.write_all(&buf).expect("write to the tap");
    }
}

/// A virtio-net header for a `TCPv4` GSO frame of `hdr_len` bytes of headers cut into
/// `gso_size`-byte segments, checksum to be completed from `csum_start`.
fn gso_tcp4_hdr(hdr_len: u16, gso_size: u16) -> [u8; 10] {
    const NEEDS_CSUM: u8 = 1;
    const GSO_TCPV4: u8 = 1;
    let mut h = [0u8; 10];
    h[0] = NEEDS_CSUM;
    h[1] = GSO_TCPV4;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start: the TCP header
    h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset: TCP checksum
    h
}

#[test]
fn gso_jumbo_and_tagged_frames_from_a_tap_are_judged() {
    let lab = Lab::new("bp");
    let db = lab.add_veth_vm("db", "10.40.0.1/8", None, None);
    let rules = copy_example_rules(&lab, "three-zones");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap()]);
    // The "guest" is this test, writing to a tap named like the lab's tap ports.
    let tap_name = format!("bpt{}9", lab.suffix());
    let mut tap = VnetTap::open(&tap_name);
    host_run(&["ip", "link", "set", "dev", &tap.name, "mtu", "9000"]);
    host_run(&["ip", "link", "set", "dev", &tap.name, "master", lab.bridge_name(), "up"]);
    agent.wait_for(Duration::from_secs(2), "the tap attached", |a| {
        a.status()["ports"].as_array().is_some_and(|p| p.iter().any(|p| p["name"] == tap_name.as_str())).then_some(())
    });
    let web_mac = [0x52, 0x54, 0x00, 0x30, 0x00, 0x09];
    let web_ip = [10, 30, 0, 9];
    let db_ip = db.ip().octets();
    let super_frame = |dport: u16| {
        eth(
            db.mac(),
            web_mac,
            &[],
            0x0800,
            &ipv4(web_ip, db_ip, 6, &tcp(40000, dport, TCP_ACK, &vec![0x42; 10 * 1448])),
        )
    };

    // Allowed (web -> db 5432): the kernel takes the GSO path and db receives it.
    let capture = Capture::start_filtered(db.host_port(), "tcp dst port 5432");
    tap.write(gso_tcp4_hdr(54, 1448), &super_frame(5432));
    std::thread::sleep(Duration::from_millis(300));
    let delivered: u64 = capture.stop().iter().map(|p| u64::from(p.orig_len)).sum();
    assert!(delivered >= 10 * 1448, "the allowed GSO frame was delivered ({delivered} bytes)");

    // Denied (web -> db 5433): the same GSO super-frame is dropped at the tap's port.
    let capture = Capture::start_filtered(db.host_port(), "tcp dst port 5433");
    tap.write(gso_tcp4_hdr(54, 1448), &super_frame(5433));
    // A jumbo frame without GSO, denied too.
    let jumbo =
        eth(db.mac(), web_mac, &[], 0x0800, &ipv4(web_ip, db_ip, 6, &tcp(40001, 5433, TCP_ACK, &vec![0x43; 8900])));
    tap.write([0u8; 10], &jumbo);
    // A VLAN-tagged frame from this VM port (which sends untagged), to an allowed port.
    let tagged =
        eth(db.mac(), web_mac, &[(0x8100, 7)], 0x0800, &ipv4(web_ip, db_ip, 6, &tcp(40002, 5432, TCP_ACK, b"tagged")));
    tap.write([0u8; 10], &tagged);
    std::thread::sleep(Duration::from_millis(300));
    assert!(capture.stop().is_empty(), "nothing of the denied frames reached db");

    let flows = agent.flows();
    let gso = flows.iter().find(|f| f["src_port"] == 40000 && f["dst_port"] == 5433).expect("the GSO frame's flow");
    assert_eq!(gso["verdict"], "denied", "{gso:#}");
    assert_eq!(field(gso, "fwd_packets"), 1, "one super-frame, judged whole: {gso:#}");
    assert_eq!(field(gso, "fwd_bytes"), super_frame(5433).len() as u64, "{gso:#}");
    let jumbo_flow = flows.iter().find(|f| f["src_port"] == 40001).expect("the jumbo frame's flow");
    assert_eq!(jumbo_flow["verdict"], "denied");
    assert_eq!(field(jumbo_flow, "fwd_bytes"), jumbo.len() as u64);
    let counters = agent.status()["counters"].clone();
    assert_eq!(counters["tagged_from_vm_port"], 1, "{counters:#}");
    assert!(flows.iter().all(|f| f["src_port"] != 40002), "the tagged frame made no flow");
    drop(tap);
    agent.stop();
}

#[test]
fn another_tcx_program_on_the_port_runs_after_ours_and_never_sees_what_we_drop() {
    use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};
    use backplane_common::maps::PROG_FROM_PORT_TC;

    let lab = Lab::new("bp");
    let web = lab.add_veth_vm("web", "10.30.0.1/8", None, None);
    let db = lab.add_veth_vm("db", "10.40.0.1/8", None, None);
    // Another product's program on web's port, attached first before backplane starts:
    // an observing copy of our own data path, with maps of its own.
    let mut other = common::datapath::TestDatapath::load(1024);
    let prog: &mut SchedClassifier = other.ebpf.program_mut(PROG_FROM_PORT_TC).unwrap().try_into().unwrap();
    prog.load().expect("load the other program");
    prog.attach_with_options(web.host_port(), TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::first()))
        .expect("attach the other program");
    let rules = copy_example_rules(&lab, "three-zones");
    let agent = Agent::start(&lab, &["--rules", rules.to_str().unwrap()]);

    // web -> db tcp/5432 is allowed, tcp/5433 denied. The other program still runs after
    // ours for what ours passes, and never sees what ours drops: backplane is first in the
    // chain and hands passed frames on.
    common::datapath::assert_first_in_chain(&other, &web, &db, 5432, 5433);
    let denied = agent
        .wait_for(Duration::from_secs(3), "the denied flow", |a| a.flows().into_iter().find(|f| f["dst_port"] == 5433));
    assert_eq!(denied["verdict"], "denied", "{denied:#}");
    agent.stop();
    drop(other);
}
