//! Endpoints in the data path: announcements (RARP, gratuitous ARP, unsolicited
//! neighbour advertisements) reach the agent once per burst, and from a VM port only
//! for the MAC it is bound to; a MAC bound to a port cannot be used from another, and a
//! bound port sends only its binding's MAC; quarantine, remediation zones and virtual
//! patches, the standing of the endpoint a port is bound to, decide before zone policy
//! (at both ends: a copy delivered to a quarantined endpoint's port is judged for it);
//! router advertisements from VMs are dropped.
//!
//! A VM port's sender is its binding (`PortInfo::binding`, `mac`), never the frame: each
//! test binds the port a frame comes from to the endpoint it stands for. `BPF_PROG_TEST_RUN`
//! runs a program as if on loopback; a second VM port is a veth device of the test's own
//! (`TestLinks`), given to the program through its context.

mod common;

use aya::maps::{Array, HashMap, LpmTrie, MapData, RingBuf, lpm_trie::Key};
use backplane_common::{
    DatapathConfig, FlowEvent, FlowEventKind, PortInfo, PortRole, Verdict,
    config::{
        ALLOWED_MAC, AllowedKey, BINDING_HOST, CONFIG_ENFORCE, CONFIG_LEARN, CONFIG_LEARN_WORLD, LEARNED_ENDPOINT,
        LEARNED_HELD, LEARNED_MAC_ONLY, LEARNED_ZONE, LearnedAddr, LearnedValue, PORT_ADDRS_FIXED, PORT_INGRESS_LIVE,
        PORT_INGRESS_TC, UNBOUND_DENY, UNBOUND_QUARANTINE,
    },
    event::Announcement,
    flow::FAMILY_IPV4,
    maps::{
        ADDR_OWNERS, CONFIG, ENDPOINTS, FLOW_EVENTS, LEARNED, LEARNED_ADDR_COUNT, LEARNED_ADDRS, PORT_ALLOWED, PORTS,
        VPATCHES, ZONE_CIDRS, ZONES,
    },
    policy::{
        ADDR_KEY_HEADER_BITS, AddrKey, ENDPOINT_ELSEWHERE, ENDPOINT_PATCHED, ENDPOINT_QUARANTINED, EndpointKey,
        EndpointValue, OWNER_SHARED, OwnerKey, OwnerValue, VPATCH_KEY_BITS, VpatchKey, VpatchValue, ZONE_LEARN,
        ZONE_REMEDIATION, ZoneKey, ZoneValue,
    },
    reason::{Counter, Reason},
};
use common::{
    datapath::{TestDatapath, TestLinks},
    frames::*,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// `TC_ACT_UNSPEC`: the classifiers pass a frame by handing it to the next program.
const TC_PASS: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const LOOPBACK_IFINDEX: u32 = 1;
const A: [u8; 4] = [10, 0, 0, 1];
const B: [u8; 4] = [10, 0, 0, 2];
const C: [u8; 4] = [10, 0, 0, 3];
/// A MAC no endpoint has.
const MAC_C: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0c];

/// Enforcing an empty rule set (everything `world`, inter-zone allowed), with the
/// loopback port a VM port bound to `MAC_A`, the source of `tcp4` frames.
fn enforcing_datapath() -> TestDatapath {
    let mut dp = enforcing_datapath_unbound();
    bind_port(&mut dp, LOOPBACK_IFINDEX, MAC_A, 0, 0);
    dp
}

/// As [`enforcing_datapath`], with the loopback port a VM port nobody bound: under the
/// configuration's default (`unbound_ports: quarantine`, nothing learns) its sender is
/// quarantined.
fn enforcing_datapath_unbound() -> TestDatapath {
    let mut dp = TestDatapath::load(1024);
    unbind_port(&mut dp, LOOPBACK_IFINDEX);
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

/// Makes `ifindex` a VM port the host bound to `mac`, with the zone and standing of its
/// endpoint (as the agent writes them from the endpoint's entry).
fn bind_port(dp: &mut TestDatapath, ifindex: u32, mac: [u8; 6], zone: u16, standing: u16) {
    let mut ports: HashMap<&mut MapData, u32, PortInfo> = HashMap::try_from(dp.ebpf.map_mut(PORTS).unwrap()).unwrap();
    let info = PortInfo {
        role: PortRole::Vm as u8,
        binding: BINDING_HOST,
        mac,
        zone: [zone; 2],
        standing: [standing; 2],
        ..PortInfo::default()
    };
    ports.insert(ifindex, info, 0).unwrap();
}

/// Makes `ifindex` a VM port nobody bound (and no `interface:` member gives a zone).
fn unbind_port(dp: &mut TestDatapath, ifindex: u32) {
    let mut ports: HashMap<&mut MapData, u32, PortInfo> = HashMap::try_from(dp.ebpf.map_mut(PORTS).unwrap()).unwrap();
    ports.insert(ifindex, PortInfo { role: PortRole::Vm as u8, ..PortInfo::default() }, 0).unwrap();
}

/// Marks the port's ingress program as attached (`PORT_INGRESS_LIVE`, at TC): what
/// `to_port` delivers after it entered there was judged there, and is judged again only
/// for a receiving port whose endpoint is not the one it was judged for.
fn ingress_live(dp: &mut TestDatapath, ifindex: u32) {
    let mut ports: HashMap<&mut MapData, u32, PortInfo> = HashMap::try_from(dp.ebpf.map_mut(PORTS).unwrap()).unwrap();
    let mut info = ports.get(&ifindex, 0).unwrap();
    info.flags |= PORT_INGRESS_LIVE;
    info.ingress = PORT_INGRESS_TC;
    ports.insert(ifindex, info, 0).unwrap();
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
fn a_vm_port_announces_only_the_mac_it_is_bound_to() {
    // An announcement moves an endpoint's binding in the agent: while enforcing, a VM
    // port announces its binding's MAC, and nothing else.
    let mut dp = enforcing_datapath();
    assert_eq!(dp.from_port(&arp(0x8035, 3, MAC_A, [0; 4], [0; 4])), XDP_PASS, "its own MAC");
    assert_eq!(dp.from_port(&arp(0x8035, 3, MAC_C, [0; 4], [0; 4])), XDP_DROP, "another MAC");
    let mut lying = arp(0x0806, 1, MAC_C, C, C);
    lying[6..12].copy_from_slice(&MAC_A);
    assert_eq!(dp.from_port(&lying), XDP_DROP, "ARP whose sender is not the frame's source");
    assert_eq!(dp.counter(Counter::SpoofedMac), 2);
    // A port nobody bound (quarantined, learning off) may ARP, and announces nothing.
    unbind_port(&mut dp, LOOPBACK_IFINDEX);
    let gratuitous = arp(0x0806, 1, MAC_B, B, B);
    assert_eq!(dp.from_port(&gratuitous), XDP_PASS, "ARP is needed and passes");
    // Bound to B, the same frame is B's announcement.
    bind_port(&mut dp, LOOPBACK_IFINDEX, MAC_B, 0, 0);
    assert_eq!(dp.from_port(&gratuitous), XDP_PASS);
    let ann = announcements(&mut dp);
    let got: Vec<(u8, [u8; 6])> = ann.iter().map(|e| (e.key.proto, e.key.addr_lo[..6].try_into().unwrap())).collect();
    assert_eq!(got, [(Announcement::Rarp as u8, MAC_A), (Announcement::GratuitousArp as u8, MAC_B)]);
}

#[test]
fn an_unbound_port_locks_to_its_first_mac_where_zones_learn() {
    let mut dp = enforcing_datapath_unbound();
    let mut config: Array<&mut MapData, DatapathConfig> = Array::try_from(dp.ebpf.map_mut(CONFIG).unwrap()).unwrap();
    let mut cfg = config.get(&0, 0).unwrap();
    cfg.flags |= CONFIG_LEARN | CONFIG_LEARN_WORLD;
    config.set(0, cfg, 0).unwrap();
    // The first frame locks the port to C (no zone has networks: its address puts it in
    // `world`, which learns) and tells the agent.
    let from_c = eth(MAC_B, MAC_C, &[], 0x0800, &ipv4(C, B, 6, &tcp(4000, 80, TCP_SYN, &[])));
    assert_eq!(dp.from_port(&from_c), XDP_PASS);
    let learned: HashMap<&MapData, u32, LearnedValue> = HashMap::try_from(dp.ebpf.map(LEARNED).unwrap()).unwrap();
    let locked = learned.get(&LOOPBACK_IFINDEX, 0).expect("the port locked");
    assert_eq!((locked.mac, locked.zone, locked.flags), (MAC_C, 0, LEARNED_ZONE));
    assert_eq!(dp.counter(Counter::PortsLearned), 1);
    let v = flow(&dp, 4000, 80);
    assert_eq!((v.verdict, v.reason), (Verdict::Allowed as u8, Reason::IntraZone as u8), "judged as learned: world");
    let ann = announcements(&mut dp);
    assert_eq!(ann.len(), 1, "{ann:?}");
    assert_eq!((ann[0].key.proto, &ann[0].key.addr_lo[..6]), (Announcement::Learned as u8, &MAC_C[..]));
    // From then on the port sends C's MAC only.
    assert_eq!(dp.from_port(&tcp4(A, 4001, B, 80, TCP_SYN)), XDP_DROP, "another MAC on the locked port");
    assert_eq!(dp.counter(Counter::SpoofedMac), 1);
    assert_eq!(dp.from_port(&from_c), XDP_PASS, "its own");
    // A MAC bound to another port never locks a port.
    let mut other = enforcing_datapath_unbound();
    let mut config: Array<&mut MapData, DatapathConfig> = Array::try_from(other.ebpf.map_mut(CONFIG).unwrap()).unwrap();
    config.set(0, cfg, 0).unwrap();
    endpoint(&mut other, MAC_A, EndpointValue { zone: 0, ifindex: 4242, ..EndpointValue::default() });
    assert_eq!(other.from_port(&tcp4(A, 4002, B, 80, TCP_SYN)), XDP_DROP);
    assert_eq!((other.counter(Counter::Spoofed), other.counter(Counter::PortsLearned)), (1, 0));
}

/// A port that locks itself on first use to the MAC of an inventory endpoint that
/// another node holds (its entry says `ENDPOINT_ELSEWHERE`) is not that endpoint: it is
/// judged as an unbound port until the agent confirms a move.
#[test]
fn a_port_locked_to_an_endpoint_another_node_holds_is_judged_unbound() {
    let run = |flags: u16| {
        let mut dp = enforcing_datapath_unbound();
        let mut zones: HashMap<&mut MapData, ZoneKey, ZoneValue> =
            HashMap::try_from(dp.ebpf.map_mut(ZONES).unwrap()).unwrap();
        let learning = ZoneValue { intra_zone: Verdict::Allowed as u8, flags: ZONE_LEARN, _pad: [0; 2] };
        zones.insert(ZoneKey { slot: 0, _pad: 0, zone: 1 }, learning, 0).unwrap();
        endpoint(&mut dp, MAC_A, EndpointValue { zone: 1, flags, endpoint_id: 1, ..EndpointValue::default() });
        let verdict = dp.from_port(&tcp4(A, 6000, B, 80, TCP_SYN));
        let learned: HashMap<&MapData, u32, LearnedValue> = HashMap::try_from(dp.ebpf.map(LEARNED).unwrap()).unwrap();
        let locked = learned.get(&LOOPBACK_IFINDEX, 0).ok().map(|l| l.mac);
        let v = flow(&dp, 6000, 80);
        (verdict, locked, v.verdict, v.reason)
    };
    // Positive control: nobody else holds A, the port is A (inter-zone allowed here).
    assert_eq!(
        run(0),
        (XDP_PASS, Some(MAC_A), Verdict::Allowed as u8, Reason::DefaultInterZone as u8),
        "an endpoint nobody holds is taken on first use"
    );
    assert_eq!(
        run(ENDPOINT_ELSEWHERE),
        (XDP_DROP, Some(MAC_A), Verdict::Denied as u8, Reason::UnboundPort as u8),
        "held: judged as an unbound port (quarantined)"
    );
    // Once the agent holds the claim (`LEARNED_HELD`), the port's frames are dropped: they
    // would move the endpoint's MAC in every switch's forwarding table.
    let mut dp = enforcing_datapath_unbound();
    let mut learned: HashMap<&mut MapData, u32, LearnedValue> =
        HashMap::try_from(dp.ebpf.map_mut(LEARNED).unwrap()).unwrap();
    let lock = LearnedValue { mac: MAC_A, flags: LEARNED_ENDPOINT | LEARNED_HELD, ..LearnedValue::default() };
    learned.insert(LOOPBACK_IFINDEX, lock, 0).unwrap();
    assert_eq!(dp.from_port(&arp(0x8035, 3, MAC_A, [0; 4], [0; 4])), XDP_DROP, "its RARP");
    assert_eq!(dp.from_port(&tcp4(A, 6001, B, 80, TCP_SYN)), XDP_DROP, "its TCP");
    assert_eq!(dp.counter(Counter::ClaimHeld), 2);
    let mut learned: HashMap<&mut MapData, u32, LearnedValue> =
        HashMap::try_from(dp.ebpf.map_mut(LEARNED).unwrap()).unwrap();
    learned.insert(LOOPBACK_IFINDEX, LearnedValue { flags: LEARNED_ENDPOINT, ..lock }, 0).unwrap();
    assert_eq!(dp.from_port(&arp(0x8035, 3, MAC_A, [0; 4], [0; 4])), XDP_PASS, "positive control: not held");
}

/// `allowed_macs` and `allowed_addresses` (`PORT_ALLOWED`): a bound port with fixed
/// addresses sends from its own, and from what the rules allow its endpoint besides
/// (a VRRP virtual MAC, a shared virtual IP), still inside its zone's networks.
#[test]
fn a_bound_port_sends_from_the_macs_and_addresses_allowed_to_it() {
    const VMAC: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x0a];
    let mut dp = enforcing_datapath();
    let mut ports: HashMap<&mut MapData, u32, PortInfo> = HashMap::try_from(dp.ebpf.map_mut(PORTS).unwrap()).unwrap();
    let mut info = ports.get(&LOOPBACK_IFINDEX, 0).unwrap();
    info.flags |= PORT_ADDRS_FIXED;
    ports.insert(LOOPBACK_IFINDEX, info, 0).unwrap();
    let mut owners: HashMap<&mut MapData, OwnerKey, OwnerValue> =
        HashMap::try_from(dp.ebpf.map_mut(ADDR_OWNERS).unwrap()).unwrap();
    let key4 = |a: [u8; 4]| {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&a);
        addr
    };
    let own = OwnerKey { family: FAMILY_IPV4, _pad: [0; 3], addr: key4(A) };
    owners.insert(own, OwnerValue { ifindex: LOOPBACK_IFINDEX, endpoint_id: 1, mac: MAC_A, _pad: [0; 2] }, 0).unwrap();
    let from = |mac: [u8; 6], src: [u8; 4], sport: u16| {
        eth(MAC_B, mac, &[], 0x0800, &ipv4(src, B, 6, &tcp(sport, 80, TCP_SYN, &[])))
    };
    assert_eq!(dp.from_port(&from(MAC_A, A, 7000)), XDP_PASS, "positive control: its own MAC and address");
    assert_eq!(dp.from_port(&from(MAC_A, C, 7001)), XDP_DROP, "another address");
    assert_eq!(dp.from_port(&from(VMAC, A, 7002)), XDP_DROP, "another MAC");
    assert_eq!((dp.counter(Counter::SpoofedAddress), dp.counter(Counter::SpoofedMac)), (1, 1));
    let mut allowed: HashMap<&mut MapData, AllowedKey, u8> =
        HashMap::try_from(dp.ebpf.map_mut(PORT_ALLOWED).unwrap()).unwrap();
    let mut vmac = [0u8; 16];
    vmac[..6].copy_from_slice(&VMAC);
    allowed
        .insert(AllowedKey { ifindex: LOOPBACK_IFINDEX, kind: ALLOWED_MAC, _pad: [0; 3], value: vmac }, 1, 0)
        .unwrap();
    allowed
        .insert(AllowedKey { ifindex: LOOPBACK_IFINDEX, kind: FAMILY_IPV4, _pad: [0; 3], value: key4(C) }, 1, 0)
        .unwrap();
    // Allowed to another port only: nothing for this one.
    allowed
        .insert(AllowedKey { ifindex: 4242, kind: FAMILY_IPV4, _pad: [0; 3], value: key4([10, 0, 0, 9]) }, 1, 0)
        .unwrap();
    assert_eq!(dp.from_port(&from(MAC_A, C, 7003)), XDP_PASS, "an allowed address");
    assert_eq!(dp.from_port(&from(VMAC, C, 7004)), XDP_PASS, "the allowed MAC");
    assert_eq!(dp.from_port(&from(MAC_A, [10, 0, 0, 9], 7005)), XDP_DROP, "another port's allowed address");
    assert_eq!(dp.counter(Counter::SpoofedAddress), 2);
    // An allowed address in another zone's networks (A's zone, world, has none) is not.
    let mut cidrs: LpmTrie<&mut MapData, AddrKey, u32> =
        LpmTrie::try_from(dp.ebpf.map_mut(ZONE_CIDRS).unwrap()).unwrap();
    let key = AddrKey { slot: 0, family: FAMILY_IPV4, _pad: [0; 2], addr: key4(C) };
    cidrs.insert(&Key::new(ADDR_KEY_HEADER_BITS + 32, key), 2, 0).unwrap();
    assert_eq!(dp.from_port(&from(MAC_A, C, 7006)), XDP_DROP, "allowed, but it would be judged as zone 2");
    assert_eq!(dp.counter(Counter::SpoofedAddress), 3);
    // A virtual IP (`OWNER_SHARED`): the ports allowed it, and no other port, not even
    // one that would take an address on first use.
    let vip = [10, 0, 0, 100];
    let mut owners: HashMap<&mut MapData, OwnerKey, OwnerValue> =
        HashMap::try_from(dp.ebpf.map_mut(ADDR_OWNERS).unwrap()).unwrap();
    let shared = OwnerValue { ifindex: OWNER_SHARED, endpoint_id: 0, mac: [0; 6], _pad: [0; 2] };
    owners.insert(OwnerKey { family: FAMILY_IPV4, _pad: [0; 3], addr: key4(vip) }, shared, 0).unwrap();
    let mut allowed: HashMap<&mut MapData, AllowedKey, u8> =
        HashMap::try_from(dp.ebpf.map_mut(PORT_ALLOWED).unwrap()).unwrap();
    allowed
        .insert(AllowedKey { ifindex: LOOPBACK_IFINDEX, kind: FAMILY_IPV4, _pad: [0; 3], value: key4(vip) }, 1, 0)
        .unwrap();
    let links = TestLinks::new();
    let other = links.ifindex[0];
    bind_port(&mut dp, other, MAC_B, 0, 0);
    let from_other = eth(MAC_B, MAC_B, &[], 0x0800, &ipv4(vip, B, 6, &tcp(7007, 80, TCP_SYN, &[])));
    let from_other = [&MAC_C[..], &from_other[6..]].concat();
    assert_eq!(dp.from_port_on(other, &from_other), XDP_DROP, "another port may not take the virtual IP");
    assert_eq!(dp.counter(Counter::SpoofedAddress), 4);
    assert_eq!(dp.from_port(&from(MAC_A, vip, 7008)), XDP_PASS, "the port allowed it sends from it");
}

/// A port whose endpoint has no fixed addresses takes the addresses it sends from on
/// first use (inside its zone's networks): no other port may send from them while it uses
/// them; one left idle for ten minutes may be taken; a port holds at most 16.
#[test]
fn addresses_taken_on_first_use_are_the_ports_alone() {
    let mut dp = enforcing_datapath();
    let links = TestLinks::new();
    let other = links.ifindex[0];
    bind_port(&mut dp, other, MAC_B, 0, 0);
    let from = |mac: [u8; 6], src: [u8; 4], sport: u16| {
        eth(MAC_C, mac, &[], 0x0800, &ipv4(src, [10, 9, 9, 9], 6, &tcp(sport, 80, TCP_SYN, &[])))
    };
    assert_eq!(dp.from_port(&from(MAC_A, C, 8000)), XDP_PASS, "the first port takes C");
    assert_eq!(dp.from_port_on(other, &from(MAC_B, C, 8001)), XDP_DROP, "C is the first port's");
    assert_eq!(dp.counter(Counter::SpoofedAddress), 1);
    assert_eq!(dp.from_port_on(other, &arp(0x0806, 2, MAC_B, C, B)), XDP_DROP, "nor may it claim C");
    assert_eq!(dp.from_port_on(other, &from(MAC_B, B, 8002)), XDP_PASS, "positive control: B it takes");
    assert_eq!(dp.from_port(&from(MAC_A, C, 8003)), XDP_PASS, "C stays the first port's");
    let held: HashMap<&MapData, OwnerKey, LearnedAddr> =
        HashMap::try_from(dp.ebpf.map(LEARNED_ADDRS).unwrap()).unwrap();
    let key = |a: [u8; 4]| {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&a);
        OwnerKey { family: FAMILY_IPV4, _pad: [0; 3], addr }
    };
    let c = held.get(&key(C), 0).unwrap();
    assert_eq!((c.ifindex, c.mac), (LOOPBACK_IFINDEX, MAC_A));
    assert_eq!(held.get(&key(B), 0).unwrap().ifindex, other);
    // Left idle long enough, another port may take it (a DHCP pool hands it on).
    let mut held: HashMap<&mut MapData, OwnerKey, LearnedAddr> =
        HashMap::try_from(dp.ebpf.map_mut(LEARNED_ADDRS).unwrap()).unwrap();
    held.insert(key(C), LearnedAddr { last_used_ns: 1, ..c }, 0).unwrap();
    assert_eq!(dp.from_port_on(other, &from(MAC_B, C, 8004)), XDP_PASS, "idle: taken over");
    assert_eq!(dp.from_port(&from(MAC_A, C, 8005)), XDP_DROP, "and it is the other port's now");
    let counts: HashMap<&MapData, u32, u32> = HashMap::try_from(dp.ebpf.map(LEARNED_ADDR_COUNT).unwrap()).unwrap();
    assert_eq!((counts.get(&LOOPBACK_IFINDEX, 0).unwrap(), counts.get(&other, 0).unwrap()), (0, 2));
    // At most 16 a port.
    for i in 0..16u8 {
        let verdict = dp.from_port(&from(MAC_A, [10, 0, 1, i], 8100 + u16::from(i)));
        assert_eq!(verdict, XDP_PASS, "address {i} of 16");
    }
    assert_eq!(dp.from_port(&from(MAC_A, [10, 0, 1, 16], 8200)), XDP_DROP, "a 17th");
    assert_eq!(dp.counter(Counter::AddressesFull), 1);
    assert_eq!(dp.from_port(&from(MAC_A, [10, 0, 1, 3], 8201)), XDP_PASS, "one it holds");
}

/// A port nobody bound that cannot learn (its zone binds by the host only) is held to
/// its first MAC all the same (the bridge learns where a MAC lives from every frame),
/// with no identity: it stays unbound (quarantined) and the agent is not told.
#[test]
fn an_unbound_port_that_cannot_learn_is_held_to_its_first_mac() {
    let mut dp = enforcing_datapath_unbound();
    let from = |mac: [u8; 6], sport: u16| eth(MAC_B, mac, &[], 0x0800, &ipv4(C, B, 6, &tcp(sport, 80, TCP_SYN, &[])));
    assert_eq!(dp.from_port(&from(MAC_C, 9000)), XDP_DROP, "quarantined, as before");
    let v = flow(&dp, 9000, 80);
    assert_eq!((v.verdict, v.reason), (Verdict::Denied as u8, Reason::UnboundPort as u8));
    assert_eq!(dp.counter(Counter::SpoofedMac), 0, "its first MAC is no spoof");
    let other_mac = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0d];
    assert_eq!(dp.from_port(&from(other_mac, 9001)), XDP_DROP);
    assert_eq!(dp.counter(Counter::SpoofedMac), 1, "another MAC from the same port is");
    assert!(dp.flows().iter().all(|(k, _)| k.port_lo != 9001 && k.port_hi != 9001), "and makes no flow");
    let learned: HashMap<&MapData, u32, LearnedValue> = HashMap::try_from(dp.ebpf.map(LEARNED).unwrap()).unwrap();
    let lock = learned.get(&LOOPBACK_IFINDEX, 0).unwrap();
    assert_eq!((lock.mac, lock.flags), (MAC_C, LEARNED_MAC_ONLY));
    assert_eq!(dp.counter(Counter::PortsLearned), 0, "no identity learned");
    assert!(announcements(&mut dp).is_empty(), "and the agent is not told");
    // Another port may not send from the MAC this one is held to.
    let links = TestLinks::new();
    let other = links.ifindex[0];
    unbind_port(&mut dp, other);
    assert_eq!(dp.from_port_on(other, &from(MAC_C, 9002)), XDP_DROP);
    assert_eq!(dp.counter(Counter::Spoofed), 1);
    // Once the port may learn (a reload: the agent removes such locks as the rule set
    // goes in force), its next frame locks it for real.
    let mut config: Array<&mut MapData, DatapathConfig> = Array::try_from(dp.ebpf.map_mut(CONFIG).unwrap()).unwrap();
    let mut cfg = config.get(&0, 0).unwrap();
    cfg.flags |= CONFIG_LEARN | CONFIG_LEARN_WORLD;
    config.set(0, cfg, 0).unwrap();
    assert_eq!(dp.from_port(&from(MAC_C, 9003)), XDP_DROP, "still held to its MAC with no identity");
    let mut learned: HashMap<&mut MapData, u32, LearnedValue> =
        HashMap::try_from(dp.ebpf.map_mut(LEARNED).unwrap()).unwrap();
    learned.remove(&LOOPBACK_IFINDEX).unwrap();
    assert_eq!(dp.from_port(&from(MAC_C, 9004)), XDP_PASS, "now it learns world");
    assert_eq!(dp.counter(Counter::PortsLearned), 1);
    let ann = announcements(&mut dp);
    assert_eq!(ann.len(), 1, "the agent is told: {ann:?}");
}

#[test]
fn unbound_ports_deny_drops_what_an_unbound_port_sends() {
    let mut dp = enforcing_datapath_unbound();
    let mut config: Array<&mut MapData, DatapathConfig> = Array::try_from(dp.ebpf.map_mut(CONFIG).unwrap()).unwrap();
    let mut cfg = config.get(&0, 0).unwrap();
    cfg.unbound_ports = UNBOUND_DENY;
    config.set(0, cfg, 0).unwrap();
    assert_eq!(dp.from_port(&tcp4(A, 5000, B, 80, TCP_SYN)), XDP_DROP);
    assert_eq!(dp.from_port(&arp(0x0806, 1, MAC_A, A, B)), XDP_DROP, "ARP too");
    assert_eq!(dp.counter(Counter::UnboundPort), 2);
    assert!(dp.flows().is_empty());
    bind_port(&mut dp, LOOPBACK_IFINDEX, MAC_A, 0, 0);
    assert_eq!(dp.from_port(&tcp4(A, 5000, B, 80, TCP_SYN)), XDP_PASS, "once bound");
    // And what the switch delivers to an unbound port from another, even from a
    // remediation zone (which reaches a quarantined one).
    unbind_port(&mut dp, LOOPBACK_IFINDEX);
    let links = TestLinks::new();
    let sender_port = links.ifindex[0];
    let mut zones: HashMap<&mut MapData, ZoneKey, ZoneValue> =
        HashMap::try_from(dp.ebpf.map_mut(ZONES).unwrap()).unwrap();
    zones
        .insert(
            ZoneKey { slot: 0, _pad: 0, zone: 3 },
            ZoneValue { intra_zone: Verdict::Allowed as u8, flags: ZONE_REMEDIATION, _pad: [0; 2] },
            0,
        )
        .unwrap();
    endpoint(
        &mut dp,
        MAC_B,
        EndpointValue { zone: 3, endpoint_id: 2, ifindex: sender_port, ..EndpointValue::default() },
    );
    bind_port(&mut dp, sender_port, MAC_B, 3, 0);
    ingress_live(&mut dp, sender_port);
    let to_a = eth(MAC_A, MAC_B, &[], 0x0800, &ipv4(B, A, 6, &tcp(5001, 22, TCP_SYN, &[])));
    assert_eq!(dp.from_port_on(sender_port, &to_a), XDP_PASS, "B may send (its receiver is judged where it leaves)");
    assert_eq!(dp.to_port_on(LOOPBACK_IFINDEX, sender_port, &to_a), TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::UnboundPort), 3);
    // Positive control: under the default (quarantine) the same copy reaches it.
    cfg.unbound_ports = UNBOUND_QUARANTINE;
    let mut config: Array<&mut MapData, DatapathConfig> = Array::try_from(dp.ebpf.map_mut(CONFIG).unwrap()).unwrap();
    config.set(0, cfg, 0).unwrap();
    assert_eq!(dp.to_port_on(LOOPBACK_IFINDEX, sender_port, &to_a), TC_PASS, "a remediation zone reaches it");
}

#[test]
fn a_mac_bound_to_another_port_is_spoofed_and_makes_no_flow() {
    // From a port nobody bound: another port's MAC neither passes nor locks the port.
    let mut dp = enforcing_datapath_unbound();
    endpoint(&mut dp, MAC_A, EndpointValue { zone: 0, ifindex: 4242, ..EndpointValue::default() });
    let frame = tcp4(A, 1000, B, 80, TCP_SYN);
    assert_eq!(dp.from_port(&frame), XDP_DROP);
    assert_eq!(dp.from_port(&arp(0x0806, 2, MAC_A, A, B)), XDP_DROP, "ARP with the bound MAC from another port");
    assert_eq!(dp.counter(Counter::Spoofed), 2);
    assert!(dp.flows().is_empty(), "a spoofed frame creates no flow entry");
    // From a port bound to another endpoint (B): every frame must carry B's MAC. A's,
    // bound elsewhere, is `spoofed`; a MAC that is nobody's is `spoofed_mac`.
    bind_port(&mut dp, LOOPBACK_IFINDEX, MAC_B, 0, 0);
    assert_eq!(dp.from_port(&frame), XDP_DROP);
    assert_eq!(dp.from_port(&arp(0x0806, 2, MAC_A, A, B)), XDP_DROP);
    assert_eq!(dp.counter(Counter::Spoofed), 4);
    let nobodys = eth(MAC_B, MAC_C, &[], 0x0800, &ipv4(C, B, 6, &tcp(1000, 80, TCP_SYN, &[])));
    assert_eq!(dp.from_port(&nobodys), XDP_DROP, "a MAC that is not the binding's");
    assert_eq!(dp.counter(Counter::SpoofedMac), 1);
    assert_eq!(dp.counter(Counter::Spoofed), 4, "not another endpoint's MAC");
    assert!(dp.flows().is_empty(), "a spoofed frame creates no flow entry");
    // Bound to this very port (its endpoint entry and the port's binding): not spoofed.
    endpoint(&mut dp, MAC_A, EndpointValue { zone: 0, ifindex: LOOPBACK_IFINDEX, ..EndpointValue::default() });
    bind_port(&mut dp, LOOPBACK_IFINDEX, MAC_A, 0, 0);
    assert_eq!(dp.from_port(&frame), XDP_PASS);
    assert_eq!(dp.from_port(&arp(0x0806, 2, MAC_A, A, B)), XDP_PASS);
    // Its own MAC as destination: a guest never needs the switch for that.
    let to_itself = eth(MAC_A, MAC_A, &[], 0x0800, &ipv4(A, B, 6, &tcp(1001, 80, TCP_SYN, &[])));
    assert_eq!(dp.from_port(&to_itself), XDP_DROP);
    assert_eq!(dp.counter(Counter::ToOwnMac), 1);
    assert_eq!((dp.counter(Counter::Spoofed), dp.counter(Counter::SpoofedMac)), (4, 1), "none counted as spoofed");
}

/// The flow whose ports are `sport` and `dport`.
fn flow(dp: &TestDatapath, sport: u16, dport: u16) -> backplane_common::FlowValue {
    let flows = dp.flows();
    let found = flows
        .iter()
        .find(|(k, _)| (k.port_lo, k.port_hi) == (sport, dport) || (k.port_lo, k.port_hi) == (dport, sport));
    found.unwrap_or_else(|| panic!("a flow {sport} -> {dport}: {flows:?}")).1
}

#[test]
fn quarantined_endpoints_reach_only_remediation_zones() {
    let mut dp = enforcing_datapath();
    // A (quarantined) in zone 1, bound to this port; B in zone 2, then zone 3
    // (remediation). A's quarantine is the standing of the endpoint the port is bound to.
    endpoint(
        &mut dp,
        MAC_A,
        EndpointValue {
            zone: 1,
            flags: ENDPOINT_QUARANTINED,
            endpoint_id: 1,
            ifindex: LOOPBACK_IFINDEX,
            ..EndpointValue::default()
        },
    );
    bind_port(&mut dp, LOOPBACK_IFINDEX, MAC_A, 1, ENDPOINT_QUARANTINED);
    endpoint(&mut dp, MAC_B, EndpointValue { zone: 2, endpoint_id: 2, ..EndpointValue::default() });
    assert_eq!(dp.from_port(&tcp4(A, 1000, B, 80, TCP_SYN)), XDP_DROP);
    let v = flow(&dp, 1000, 80);
    assert_eq!((v.verdict, v.reason), (Verdict::Denied as u8, Reason::Quarantined as u8));
    // The guest cannot leave its quarantine by sending as someone else: a frame with a
    // MAC that is not the binding's is dropped, not judged as another sender.
    let other_mac = eth(MAC_B, MAC_C, &[], 0x0800, &ipv4(A, B, 6, &tcp(1002, 80, TCP_SYN, &[])));
    assert_eq!(dp.from_port(&other_mac), XDP_DROP);
    assert_eq!(dp.counter(Counter::SpoofedMac), 1);
    assert!(dp.flows().iter().all(|(k, _)| k.port_lo != 1002 && k.port_hi != 1002), "no flow for it");
    // A port nobody bound is quarantined the same way (`unbound_ports: quarantine`, the
    // default), with its own reason.
    unbind_port(&mut dp, LOOPBACK_IFINDEX);
    let from_unbound = |sport| eth(MAC_B, MAC_C, &[], 0x0800, &ipv4(C, B, 6, &tcp(sport, 80, TCP_SYN, &[])));
    assert_eq!(dp.from_port(&from_unbound(1003)), XDP_DROP);
    let v = flow(&dp, 1003, 80);
    assert_eq!((v.verdict, v.reason), (Verdict::Denied as u8, Reason::UnboundPort as u8));

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
    assert_eq!(dp.from_port(&from_unbound(1004)), XDP_PASS, "an unbound port reaches a remediation zone");
    let v = flow(&dp, 1004, 80);
    assert_eq!((v.verdict, v.reason), (Verdict::Allowed as u8, Reason::Remediation as u8));
    bind_port(&mut dp, LOOPBACK_IFINDEX, MAC_A, 1, ENDPOINT_QUARANTINED);
    assert_eq!(dp.from_port(&tcp4(A, 1001, B, 80, TCP_SYN)), XDP_PASS);
    let v = flow(&dp, 1001, 80);
    assert_eq!((v.verdict, v.reason), (Verdict::Allowed as u8, Reason::Remediation as u8));
}

#[test]
fn what_is_delivered_to_a_quarantined_endpoints_port_is_judged_for_it() {
    // Only remediation zones reach a quarantined endpoint, whatever the frame's
    // destination MAC says: a sender names someone else (a MAC that is nobody's, judged
    // `world`) and the switch delivers the copy to the quarantined endpoint's port.
    let links = TestLinks::new();
    let [sender_port, peer_port] = links.ifindex;
    let mut dp = enforcing_datapath();
    // The sender: C in zone 2, on a port whose ingress program runs.
    endpoint(
        &mut dp,
        MAC_C,
        EndpointValue { zone: 2, endpoint_id: 3, ifindex: sender_port, ..EndpointValue::default() },
    );
    bind_port(&mut dp, sender_port, MAC_C, 2, 0);
    ingress_live(&mut dp, sender_port);
    // B in zone 2 on the other port; A (quarantined, zone 1) on loopback.
    endpoint(&mut dp, MAC_B, EndpointValue { zone: 2, endpoint_id: 2, ifindex: peer_port, ..EndpointValue::default() });
    bind_port(&mut dp, peer_port, MAC_B, 2, 0);
    endpoint(
        &mut dp,
        MAC_A,
        EndpointValue {
            zone: 1,
            flags: ENDPOINT_QUARANTINED,
            endpoint_id: 1,
            ifindex: LOOPBACK_IFINDEX,
            ..EndpointValue::default()
        },
    );
    bind_port(&mut dp, LOOPBACK_IFINDEX, MAC_A, 1, ENDPOINT_QUARANTINED);
    let misaddressed =
        eth([0x52, 0x54, 0, 0, 0, 0x0d], MAC_C, &[], 0x0800, &ipv4(C, A, 6, &tcp(3000, 80, TCP_SYN, &[])));
    assert_eq!(dp.from_port_on(sender_port, &misaddressed), XDP_PASS, "judged for the receiver it names");
    // The copy for B (zone 2, like C) passes: the positive control.
    assert_eq!(dp.to_port_on(peer_port, sender_port, &misaddressed), TC_PASS);
    let before = dp.counter(Counter::EgressDenied);
    assert_eq!(dp.to_port_on(LOOPBACK_IFINDEX, sender_port, &misaddressed), TC_ACT_SHOT, "the copy for A");
    assert_eq!(dp.counter(Counter::EgressDenied), before + 1);
}

#[test]
fn a_virtual_patch_denies_its_protocol_and_port_to_and_from_the_tagged_endpoint() {
    // A on loopback (bound to MAC_A); B, the patched endpoint, on a port of its own.
    let links = TestLinks::new();
    let b_port = links.ifindex[0];
    let mut dp = enforcing_datapath();
    endpoint(
        &mut dp,
        MAC_B,
        EndpointValue { zone: 0, flags: ENDPOINT_PATCHED, endpoint_id: 7, ifindex: b_port, ..EndpointValue::default() },
    );
    bind_port(&mut dp, b_port, MAC_B, 0, ENDPOINT_PATCHED);
    let mut patches: LpmTrie<&mut MapData, VpatchKey, VpatchValue> =
        LpmTrie::try_from(dp.ebpf.map_mut(VPATCHES).unwrap()).unwrap();
    let key =
        VpatchKey { slot: 0, proto: 6, _pad: [0; 2], endpoint_id: 7u32.to_be_bytes(), port: 445u16.to_be_bytes() };
    patches.insert(&Key::new(VPATCH_KEY_BITS, key), VpatchValue { patch_id: 3, _pad: [0; 4] }, 0).unwrap();
    assert_eq!(dp.from_port(&tcp4(A, 1000, B, 445, TCP_SYN)), XDP_DROP, "to the patched endpoint");
    assert_eq!(dp.from_port(&tcp4(A, 1000, B, 80, TCP_SYN)), XDP_PASS, "another port");
    let f = flow(&dp, 1000, 445);
    assert_eq!((f.verdict, f.reason, f.policy_id), (Verdict::Denied as u8, Reason::VirtualPatch as u8, 3));
    // From B's own port, as B: the patch holds for what it sends, and only on 445.
    let from_b = |dport| eth(MAC_A, MAC_B, &[], 0x0800, &ipv4(B, A, 6, &tcp(2000, dport, TCP_SYN, &[])));
    assert_eq!(dp.from_port_on(b_port, &from_b(445)), XDP_DROP, "from the patched endpoint");
    let f = flow(&dp, 2000, 445);
    assert_eq!((f.verdict, f.reason, f.policy_id), (Verdict::Denied as u8, Reason::VirtualPatch as u8, 3));
    assert_eq!(dp.from_port_on(b_port, &from_b(80)), XDP_PASS, "from the patched endpoint, another port");
    assert_eq!((dp.counter(Counter::Spoofed), dp.counter(Counter::SpoofedMac)), (0, 0), "each from its own port");
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

#[test]
fn a_flow_direction_from_another_port_must_be_that_ports_to_use() {
    // A (active, on loopback) opens a flow to B from a virtual IP the rules allow both A
    // and Q (a keepalived pair). Q, quarantined on another port, sends a frame of the
    // same direction from it (the address check lets it through): judged as Q, the
    // flow's verdict does not hold for it.
    let links = TestLinks::new();
    let q_port = links.ifindex[0];
    let mut dp = enforcing_datapath();
    let mut allowed: HashMap<&mut MapData, AllowedKey, u8> =
        HashMap::try_from(dp.ebpf.map_mut(PORT_ALLOWED).unwrap()).unwrap();
    let mut vip = [0u8; 16];
    vip[..4].copy_from_slice(&A);
    for ifindex in [LOOPBACK_IFINDEX, q_port] {
        allowed.insert(AllowedKey { ifindex, kind: FAMILY_IPV4, _pad: [0; 3], value: vip }, 1, 0).unwrap();
    }
    // Reserved for the two, as the agent writes it.
    let mut owners: HashMap<&mut MapData, OwnerKey, OwnerValue> =
        HashMap::try_from(dp.ebpf.map_mut(ADDR_OWNERS).unwrap()).unwrap();
    let shared = OwnerValue { ifindex: OWNER_SHARED, endpoint_id: 0, mac: [0; 6], _pad: [0; 2] };
    owners.insert(OwnerKey { family: FAMILY_IPV4, _pad: [0; 3], addr: vip }, shared, 0).unwrap();
    endpoint(
        &mut dp,
        MAC_C,
        EndpointValue {
            zone: 0,
            flags: ENDPOINT_QUARANTINED,
            endpoint_id: 3,
            ifindex: q_port,
            ..EndpointValue::default()
        },
    );
    bind_port(&mut dp, q_port, MAC_C, 0, ENDPOINT_QUARANTINED);
    let from_a = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4(A, B, 6, &tcp(4000, 80, TCP_SYN, &[])));
    assert_eq!(dp.from_port(&from_a), XDP_PASS, "A's own flow");
    let injected = eth(MAC_B, MAC_C, &[], 0x0800, &ipv4(A, B, 6, &tcp(4000, 80, TCP_ACK, &[])));
    let before = dp.counter(Counter::ForeignSender);
    assert_eq!(dp.from_port_on(q_port, &injected), XDP_DROP, "Q may not ride A's flow");
    assert_eq!(dp.counter(Counter::ForeignSender), before + 1);
    let (_, value) = dp.flows().pop().expect("the flow");
    assert_eq!(value.ifindex[usize::from(value.initiator & 1)], LOOPBACK_IFINDEX, "the flow still knows A's port");
    assert_eq!(value.verdict, Verdict::Allowed as u8, "and its verdict");
    // The positive control: A's next frame passes.
    let again = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4(A, B, 6, &tcp(4000, 80, TCP_ACK, &[])));
    assert_eq!(dp.from_port(&again), XDP_PASS);
}
