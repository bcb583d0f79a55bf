//! Endpoints in the data path: announcements (RARP, gratuitous ARP, unsolicited
//! neighbour advertisements) reach the agent once per burst; a MAC bound to a port
//! cannot be used from another; quarantine, remediation zones and virtual patches
//! decide before zone policy; router advertisements from VMs are dropped.

mod common;

use aya::maps::{Array, HashMap, LpmTrie, MapData, RingBuf, lpm_trie::Key};
use backplane_common::{
    DatapathConfig, FlowEvent, FlowEventKind, PortInfo, PortRole, Verdict,
    config::CONFIG_ENFORCE,
    event::Announcement,
    maps::{CONFIG, ENDPOINTS, FLOW_EVENTS, PORTS, VPATCHES, ZONES},
    policy::{
        ENDPOINT_PATCHED, ENDPOINT_QUARANTINED, EndpointKey, EndpointValue, VPATCH_KEY_BITS, VpatchKey, VpatchValue,
        ZONE_REMEDIATION, ZoneKey, ZoneValue,
    },
    reason::{Counter, Reason},
};
use common::{datapath::TestDatapath, frames::*};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const LOOPBACK_IFINDEX: u32 = 1;
const A: [u8; 4] = [10, 0, 0, 1];
const B: [u8; 4] = [10, 0, 0, 2];

fn enforcing_datapath() -> TestDatapath {
    let mut dp = TestDatapath::load(1024);
    let mut ports: HashMap<&mut MapData, u32, PortInfo> = HashMap::try_from(dp.ebpf.map_mut(PORTS).unwrap()).unwrap();
    ports.insert(LOOPBACK_IFINDEX, PortInfo { role: PortRole::Vm as u8, ..PortInfo::default() }, 0).unwrap();
    let mut config: Array<&mut MapData, DatapathConfig> = Array::try_from(dp.ebpf.map_mut(CONFIG).unwrap()).unwrap();
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
    dp
}

fn endpoint(dp: &mut TestDatapath, mac: [u8; 6], value: EndpointValue) {
    let mut eps: HashMap<&mut MapData, EndpointKey, EndpointValue> =
        HashMap::try_from(dp.ebpf.map_mut(ENDPOINTS).unwrap()).unwrap();
    eps.insert(EndpointKey { slot: 0, _pad: 0, mac }, value, 0).unwrap();
}

fn events(dp: &mut TestDatapath) -> Vec<FlowEvent> {
    let mut ring = RingBuf::try_from(dp.ebpf.map_mut(FLOW_EVENTS).unwrap()).unwrap();
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<FlowEvent>());
        // SAFETY: the ring holds FlowEvent records of exactly this size.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
    }
    out
}

fn announcements(dp: &mut TestDatapath) -> Vec<FlowEvent> {
    events(dp).into_iter().filter(|e| e.kind == FlowEventKind::Announce as u8).collect()
}

#[test]
fn a_rarp_burst_makes_one_announcement_with_the_mac_and_port() {
    let mut dp = TestDatapath::load(64);
    let rarp = arp(0x8035, 3, MAC_A, [0; 4], [0; 4]);
    for _ in 0..5 {
        assert_eq!(dp.from_port(&rarp), XDP_PASS);
    }
    let ann = announcements(&mut dp);
    assert_eq!(ann.len(), 1, "one event for a burst: {ann:?}");
    assert_eq!(ann[0].key.proto, Announcement::Rarp as u8);
    assert_eq!(&ann[0].key.addr_lo[..6], &MAC_A);
    assert_eq!(ann[0].ifindex, LOOPBACK_IFINDEX);
    assert_eq!(dp.counter(Counter::Rarp), 5);
    assert_eq!(dp.counter(Counter::Announcements), 1);
}

#[test]
fn gratuitous_arp_and_unsolicited_neighbour_advertisements_announce_addresses() {
    let mut dp = TestDatapath::load(64);
    assert_eq!(dp.from_port(&arp(0x0806, 1, MAC_B, B, B)), XDP_PASS);
    assert_eq!(dp.from_port(&arp(0x0806, 1, MAC_A, A, B)), XDP_PASS, "an ordinary request announces nothing");
    let mut na = vec![136u8, 0, 0, 0, 0x20, 0, 0, 0];
    na.extend_from_slice(&v6(9));
    let all_nodes = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    assert_eq!(
        dp.from_port(&eth([0x33, 0x33, 0, 0, 0, 1], MAC_A, &[], 0x86dd, &ipv6(v6(9), all_nodes, 58, &na))),
        XDP_PASS
    );
    let ann = announcements(&mut dp);
    assert_eq!(ann.len(), 2, "{ann:?}");
    assert_eq!(ann[0].key.proto, Announcement::GratuitousArp as u8);
    assert_eq!(&ann[0].key.addr_hi[..4], &B);
    assert_eq!(ann[1].key.proto, Announcement::NeighborAdvert as u8);
    assert_eq!(ann[1].key.addr_hi, v6(9));
    assert!(dp.flows().is_empty(), "neighbour discovery is not a flow");
}

#[test]
fn a_mac_bound_to_another_port_is_spoofed_and_makes_no_flow() {
    let mut dp = enforcing_datapath();
    endpoint(&mut dp, MAC_A, EndpointValue { zone: 0, ifindex: 4242, ..EndpointValue::default() });
    let frame = tcp4(A, 1000, B, 80, TCP_SYN);
    assert_eq!(dp.from_port(&frame), XDP_DROP);
    assert_eq!(dp.from_port(&arp(0x0806, 2, MAC_A, A, B)), XDP_DROP, "ARP with the bound MAC from another port");
    assert_eq!(dp.counter(Counter::Spoofed), 2);
    assert!(dp.flows().is_empty(), "a spoofed frame creates no flow entry");
    // Bound to this very port: not spoofed.
    endpoint(&mut dp, MAC_A, EndpointValue { zone: 0, ifindex: LOOPBACK_IFINDEX, ..EndpointValue::default() });
    assert_eq!(dp.from_port(&frame), XDP_PASS);
}

#[test]
fn quarantined_endpoints_reach_only_remediation_zones() {
    let mut dp = enforcing_datapath();
    // A (quarantined) in zone 1; B in zone 2, then zone 3 (remediation).
    endpoint(
        &mut dp,
        MAC_A,
        EndpointValue { zone: 1, flags: ENDPOINT_QUARANTINED, endpoint_id: 1, ..EndpointValue::default() },
    );
    endpoint(&mut dp, MAC_B, EndpointValue { zone: 2, endpoint_id: 2, ..EndpointValue::default() });
    assert_eq!(dp.from_port(&tcp4(A, 1000, B, 80, TCP_SYN)), XDP_DROP);
    let v = dp.flows()[0].1;
    assert_eq!((v.verdict, v.reason), (Verdict::Denied as u8, Reason::Quarantined as u8));
    let mut zones: HashMap<&mut MapData, ZoneKey, ZoneValue> =
        HashMap::try_from(dp.ebpf.map_mut(ZONES).unwrap()).unwrap();
    zones
        .insert(
            ZoneKey { slot: 0, _pad: 0, zone: 3 },
            ZoneValue { intra_zone: Verdict::Allowed as u8, flags: ZONE_REMEDIATION, _pad: [0; 2] },
            0,
        )
        .unwrap();
    endpoint(&mut dp, MAC_B, EndpointValue { zone: 3, endpoint_id: 2, ..EndpointValue::default() });
    assert_eq!(dp.from_port(&tcp4(A, 1001, B, 80, TCP_SYN)), XDP_PASS);
    let v = dp.flows().into_iter().find(|(k, _)| k.port_lo == 80 && k.port_hi == 1001 || k.port_lo == 1001).unwrap().1;
    assert_eq!((v.verdict, v.reason), (Verdict::Allowed as u8, Reason::Remediation as u8));
}

#[test]
fn a_virtual_patch_denies_its_protocol_and_port_to_and_from_the_tagged_endpoint() {
    let mut dp = enforcing_datapath();
    endpoint(
        &mut dp,
        MAC_B,
        EndpointValue { zone: 0, flags: ENDPOINT_PATCHED, endpoint_id: 7, ..EndpointValue::default() },
    );
    let mut patches: LpmTrie<&mut MapData, VpatchKey, VpatchValue> =
        LpmTrie::try_from(dp.ebpf.map_mut(VPATCHES).unwrap()).unwrap();
    let key =
        VpatchKey { slot: 0, proto: 6, _pad: [0; 2], endpoint_id: 7u32.to_be_bytes(), port: 445u16.to_be_bytes() };
    patches.insert(&Key::new(VPATCH_KEY_BITS, key), VpatchValue { patch_id: 3, _pad: [0; 4] }, 0).unwrap();
    assert_eq!(dp.from_port(&tcp4(A, 1000, B, 445, TCP_SYN)), XDP_DROP, "to the patched endpoint");
    assert_eq!(dp.from_port(&tcp4(A, 1000, B, 80, TCP_SYN)), XDP_PASS, "another port");
    let f = dp.flows().into_iter().find(|(k, _)| k.port_hi == 445 || k.port_lo == 445).unwrap().1;
    assert_eq!((f.verdict, f.reason, f.policy_id), (Verdict::Denied as u8, Reason::VirtualPatch as u8, 3));
    let from_b = eth(MAC_A, MAC_B, &[], 0x0800, &ipv4(B, A, 6, &tcp(2000, 445, TCP_SYN, &[])));
    assert_eq!(dp.from_port(&from_b), XDP_DROP, "from the patched endpoint");
}

#[test]
fn router_advertisements_from_vm_ports_are_dropped_while_enforcing() {
    let ra = eth(
        [0x33, 0x33, 0, 0, 0, 1],
        MAC_A,
        &[],
        0x86dd,
        &ipv6(v6(1), v6(2), 58, &[134, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    );
    let ns = eth([0x33, 0x33, 0, 0, 0, 1], MAC_A, &[], 0x86dd, &ipv6(v6(1), v6(2), 58, &[135, 0, 0, 0, 0, 0, 0, 0]));
    let mut dp = enforcing_datapath();
    assert_eq!(dp.from_port(&ra), XDP_DROP);
    assert_eq!(dp.from_port(&ns), XDP_PASS, "neighbour solicitations pass");
    assert_eq!(dp.counter(Counter::RouterAdvertFromVm), 1);
    let mut observing = TestDatapath::load(64);
    assert_eq!(observing.from_port(&ra), XDP_PASS);
}
