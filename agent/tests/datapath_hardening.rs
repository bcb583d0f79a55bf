//! No bypass while a rule set is in force: fragments are judged with their first
//! fragment's ports, and frames that cannot be judged (malformed, not IP, tagged from a
//! VM port, later fragments without a first one) are dropped and counted, where without
//! rules they are passed.
//!
//! None of this is about who sends: the simulated VM port is bound to the MAC its frames
//! come from (`MAC_A`), so that each frame is judged as that port's endpoint's and what
//! is tested is what the frame's shape does.

mod common;

use aya::maps::{Array, HashMap, MapData};
use backplane_common::{
    DatapathConfig, PortInfo, PortRole, Verdict,
    config::{BINDING_HOST, CONFIG_ENFORCE, PORT_ALLOW_TAGGED},
    maps::{CONFIG, PORTS},
    reason::Counter,
};
use common::{datapath::TestDatapath, frames::*};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const LOOPBACK_IFINDEX: u32 = 1;
const A: [u8; 4] = [10, 0, 0, 1];
const B: [u8; 4] = [10, 0, 0, 2];

/// Loads the data path with `BPF_PROG_TEST_RUN`'s port (loopback) registered with
/// `role` and `flags`, enforcing an empty rule set (everything is `world`, allowed) or
/// only observing. As a VM port it is bound to `MAC_A`, the source of every frame here.
fn datapath(enforce: bool, role: PortRole, flags: u8) -> TestDatapath {
    let mut dp = TestDatapath::load(1024);
    let mut ports: HashMap<&mut MapData, u32, PortInfo> = HashMap::try_from(dp.ebpf.map_mut(PORTS).unwrap()).unwrap();
    let port = match role {
        PortRole::Vm => PortInfo { role: role as u8, flags, binding: BINDING_HOST, mac: MAC_A, ..PortInfo::default() },
        PortRole::Uplink => PortInfo { role: role as u8, flags, ..PortInfo::default() },
    };
    ports.insert(LOOPBACK_IFINDEX, port, 0).unwrap();
    if enforce {
        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(dp.ebpf.map_mut(CONFIG).unwrap()).unwrap();
        config
            .set(
                0,
                DatapathConfig {
                    generation: 1,
                    flags: CONFIG_ENFORCE,
                    default_inter_zone: Verdict::Allowed as u8,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
    }
    dp
}

fn udp_fragments(id_payload: usize) -> (Vec<u8>, Vec<u8>) {
    // A 2-fragment UDP datagram: the first carries the UDP header, the second (offset
    // 16 bytes = 2 units of 8) only data.
    let first =
        eth(MAC_B, MAC_A, &[], 0x0800, &ipv4_full(A, B, 17, &[], 0x2000, &udp(5000, 6000, &vec![1u8; id_payload])));
    let later = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4_full(A, B, 17, &[], 2, &[2u8; 40]));
    (first, later)
}

#[test]
fn later_fragments_join_their_first_fragments_flow() {
    let mut dp = datapath(true, PortRole::Vm, 0);
    let (first, later) = udp_fragments(8);
    assert_eq!(dp.from_port(&first), XDP_PASS);
    assert_eq!(dp.from_port(&later), XDP_PASS);
    let flows = dp.flows();
    assert_eq!(flows.len(), 1, "both fragments in one flow: {flows:?}");
    let (k, v) = flows[0];
    assert_eq!((k.port_lo, k.port_hi), (5000, 6000));
    assert_eq!(v.packets[0], 2);
    assert_eq!(v.bytes[0], (first.len() + later.len()) as u64);
    assert_eq!(dp.counter(Counter::FragmentsTracked), 1);
    assert_eq!(dp.counter(Counter::FragmentWithoutFirst), 0);
}

#[test]
fn a_later_fragment_without_its_first_is_dropped_only_while_enforcing() {
    let (_, later) = udp_fragments(8);
    let mut observing = datapath(false, PortRole::Vm, 0);
    assert_eq!(observing.from_port(&later), XDP_PASS);
    assert_eq!(observing.counter(Counter::FragmentWithoutFirst), 1);
    let mut enforcing = datapath(true, PortRole::Vm, 0);
    assert_eq!(enforcing.from_port(&later), XDP_DROP);
    assert_eq!(enforcing.counter(Counter::FragmentWithoutFirst), 1);
    assert_eq!(enforcing.counter(Counter::Dropped), 1);
}

#[test]
fn a_tiny_first_fragment_without_the_transport_header_is_dropped_while_enforcing() {
    // First fragment with only 4 bytes of TCP header: ports cannot be read.
    let tiny = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4_full(A, B, 6, &[], 0x2000, &[0x13, 0x88, 0x00]));
    let mut dp = datapath(true, PortRole::Vm, 0);
    assert_eq!(dp.from_port(&tiny), XDP_DROP);
    assert_eq!(dp.counter(Counter::ParseTruncatedL4), 1);
    assert_eq!(dp.counter(Counter::UnjudgedDropped), 1);
    let mut dp = datapath(false, PortRole::Vm, 0);
    assert_eq!(dp.from_port(&tiny), XDP_PASS, "observed only without rules");
}

#[test]
fn tagged_frames_from_a_vm_port_are_dropped_unless_allowed() {
    let tagged = eth(MAC_B, MAC_A, &[(0x8100, 42)], 0x0800, &ipv4(A, B, 17, &udp(1, 2, b"x")));
    let mut dp = datapath(true, PortRole::Vm, 0);
    assert_eq!(dp.from_port(&tagged), XDP_DROP);
    assert_eq!(dp.counter(Counter::TaggedFromVmPort), 1);
    assert!(dp.flows().is_empty(), "not tracked");
    let mut trunk = datapath(true, PortRole::Vm, PORT_ALLOW_TAGGED);
    assert_eq!(trunk.from_port(&tagged), XDP_PASS);
    assert_eq!(trunk.flows()[0].0.vlan, 42);
    let mut uplink = datapath(true, PortRole::Uplink, 0);
    assert_eq!(uplink.from_port(&tagged), XDP_PASS, "uplinks carry tagged traffic");
}

#[test]
fn frames_that_cannot_be_judged_are_dropped_from_vm_ports_while_enforcing() {
    let lldp = eth([0x01, 0x80, 0xc2, 0, 0, 0x0e], MAC_A, &[], 0x88cc, &[0u8; 30]);
    let mut bad_ihl = ipv4(A, B, 6, &tcp(1, 2, TCP_SYN, &[]));
    bad_ihl[0] = 0x43;
    let bad_ihl = eth(MAC_B, MAC_A, &[], 0x0800, &bad_ihl);
    let arp_reply = arp(0x0806, 2, MAC_A, A, B);
    let mut vm = datapath(true, PortRole::Vm, 0);
    assert_eq!(vm.from_port(&lldp), XDP_DROP);
    assert_eq!(vm.from_port(&bad_ihl), XDP_DROP);
    assert_eq!(vm.from_port(&arp_reply), XDP_PASS, "ARP is needed and passes");
    assert_eq!(vm.counter(Counter::UnjudgedDropped), 2);
    let mut uplink = datapath(true, PortRole::Uplink, 0);
    assert_eq!(uplink.from_port(&lldp), XDP_PASS, "an uplink's L2 traffic is not a VM's");
    let mut observing = datapath(false, PortRole::Vm, 0);
    assert_eq!(observing.from_port(&bad_ihl), XDP_PASS);
}

#[test]
fn a_tcp_fragment_overlapping_the_first_fragments_header_is_dropped() {
    // RFC 1858: a later fragment at offset 1 (8 bytes) rewrites the TCP header's
    // flags and window after the first fragment passed.
    let first = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4_full(A, B, 6, &[], 0x2000, &tcp(5000, 80, TCP_SYN, &[])));
    let overlap = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4_full(A, B, 6, &[], 1, &[0u8; 16]));
    let mut dp = datapath(true, PortRole::Vm, 0);
    assert_eq!(dp.from_port(&first), XDP_PASS);
    assert_eq!(dp.from_port(&overlap), XDP_DROP);
    assert_eq!(dp.counter(Counter::OverlappingFragment), 1);
    let later = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4_full(A, B, 6, &[], 5, &[0u8; 16]));
    assert_eq!(dp.from_port(&later), XDP_PASS, "a fragment past the header joins the flow");
}
