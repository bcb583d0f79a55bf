//! The hostile corpus (`common::hostile`) through `BPF_PROG_TEST_RUN`: both programs,
//! observing and enforcing, from a VM port and from an uplink. No frame makes a program
//! abort or return anything but pass or drop; every flow a frame creates carries the
//! verdict `backplane_rules::evaluate` gives it, and from a VM port a denied flow's first
//! frame is dropped. Frames claiming the MAC of an endpoint bound to another port are
//! dropped and counted, and pass once the endpoint is bound to the sending port; so are
//! frames that send from or claim (ARP, neighbour discovery) the victim's IP addresses
//! with the sender's own MAC.

mod common;

use std::{collections::HashMap as StdHashMap, net::IpAddr, path::Path};

use aya::maps::{Array, HashMap, MapData};
use backplane::datapath::rule_tables::{RuleTables, activate, owner_key, write_port_zones};
use backplane_common::{
    DatapathConfig, FlowKey, FlowValue, PortInfo, PortRole, Verdict,
    flow::{FAMILY_IPV4, FragmentKey, FragmentPorts},
    maps::{CONFIG, FLOWS, FRAGMENTS, PORTS},
    policy::{EndpointValue, OWNER_ELSEWHERE, OwnerValue},
    reason::Counter,
};
use backplane_rules::{MacAddr, PacketView, RuleSet, ZoneIds, compile, evaluate, parse_rules};
use common::{
    datapath::TestDatapath,
    frames::{MAC_A, replace_mac},
    hostile::{self, Hostile, VICTIM_IP4, VICTIM_IP6_LAST, VICTIM_MAC, a6},
};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// `TC_ACT_UNSPEC`: the classifiers pass a frame by handing it to the next program.
const TC_PASS: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
/// `BPF_PROG_TEST_RUN` runs programs as if on the loopback device.
const LOOPBACK_IFINDEX: u32 = 1;
/// A port the victim endpoint is bound to: not the one the frames come from.
const OTHER_PORT: u32 = 99;
const SEED: u64 = 0x0b5e_55ed;

/// The data path with the loopback port registered as `role`, enforcing the corpus's
/// rule set or observing only, and the victim endpoint bound to `victim_port`.
struct Setup {
    dp: TestDatapath,
    tables: RuleTables,
    rules: Option<RuleSet>,
}

fn setup(enforce: bool, role: PortRole, victim_port: u32) -> Setup {
    let mut dp = TestDatapath::load(4096);
    let mut tables = RuleTables::from_ebpf(&mut dp.ebpf).expect("rule tables");
    let mut ports: HashMap<MapData, u32, PortInfo> = HashMap::try_from(dp.ebpf.take_map(PORTS).unwrap()).unwrap();
    ports.insert(LOOPBACK_IFINDEX, PortInfo { role: role as u8, ..PortInfo::default() }, 0).unwrap();
    let rules = enforce.then(|| {
        let rules = parse_rules([(Path::new("hostile.yaml"), hostile::RULES)]).expect("the corpus's rules");
        let compiled = compile(&rules, &ZoneIds::new());
        let mut config: Array<MapData, DatapathConfig> = Array::try_from(dp.ebpf.take_map(CONFIG).unwrap()).unwrap();
        tables.write_slot(0, &compiled).expect("write the rules");
        write_port_zones(&mut ports, 0, &compiled, [(LOOPBACK_IFINDEX, "lo")], &Default::default()).unwrap();
        activate(&mut config, 0, &compiled).expect("activate");
        let zone_a = compiled.zone_ids.id("a").expect("zone a");
        let victim = EndpointValue { zone: zone_a, ifindex: victim_port, ..EndpointValue::default() };
        tables.write_endpoint(0, MacAddr(VICTIM_MAC), victim).unwrap();
        give_victim_addresses(&mut tables, victim_port);
        rules
    });
    Setup { dp, tables, rules }
}

/// The victim's IPv4 and IPv6 addresses belong to `port`.
fn give_victim_addresses(tables: &mut RuleTables, port: u32) {
    let owner = OwnerValue { ifindex: port, endpoint_id: 7, mac: VICTIM_MAC, _pad: [0; 2] };
    let owners: StdHashMap<_, _> = [IpAddr::from(VICTIM_IP4), IpAddr::from(a6(VICTIM_IP6_LAST))]
        .into_iter()
        .map(|ip| (owner_key(ip), owner))
        .collect();
    tables.set_owners(&owners).expect("write ADDR_OWNERS");
}

impl Setup {
    fn flow_keys(&self) -> Vec<(FlowKey, FlowValue)> {
        self.dp.flows()
    }

    fn clear(&mut self) {
        let mut flows: HashMap<&mut MapData, FlowKey, FlowValue> =
            HashMap::try_from(self.dp.ebpf.map_mut(FLOWS).unwrap()).unwrap();
        let keys: Vec<FlowKey> = flows.keys().map(Result::unwrap).collect();
        for k in keys {
            flows.remove(&k).unwrap();
        }
        let mut frags: HashMap<&mut MapData, FragmentKey, FragmentPorts> =
            HashMap::try_from(self.dp.ebpf.map_mut(FRAGMENTS).unwrap()).unwrap();
        let keys: Vec<FragmentKey> = frags.keys().map(Result::unwrap).collect();
        for k in keys {
            frags.remove(&k).unwrap();
        }
    }
}

/// The first packet of a flow as the evaluator sees it, from the kernel's entry and the
/// frame that created it.
fn view(key: &FlowKey, value: &FlowValue, frame: &[u8], egress: bool) -> PacketView {
    let addr = |a: &[u8; 16]| -> IpAddr {
        if key.family == FAMILY_IPV4 { IpAddr::from([a[0], a[1], a[2], a[3]]) } else { IpAddr::from(*a) }
    };
    let (src, _) = key.sender(value.initiator);
    let (dst, dport) = key.receiver(value.initiator);
    let mac = |at: usize| MacAddr(frame[at..at + 6].try_into().unwrap());
    PacketView {
        src_mac: mac(6),
        dst_mac: mac(0),
        src_ip: addr(src),
        dst_ip: addr(dst),
        proto: key.proto,
        dport,
        src_interface: (!egress).then(|| "lo".to_owned()),
        dst_interface: egress.then(|| "lo".to_owned()),
    }
}

#[derive(Default, Debug)]
struct Tally {
    frames: usize,
    refused_by_kernel: usize,
    dropped: usize,
    flows_compared: usize,
}

/// Runs the corpus through one program; returns what happened, or panics naming the
/// sequence and frame that misbehaved.
fn run_corpus(setup: &mut Setup, corpus: &[Hostile], egress: bool, vm_port: bool) -> Tally {
    let mut tally = Tally::default();
    for seq in corpus {
        setup.clear();
        for (i, frame) in seq.frames.iter().enumerate() {
            let before: Vec<FlowKey> = setup.flow_keys().into_iter().map(|(k, _)| k).collect();
            let spoofed_before = setup.dp.counter(Counter::Spoofed);
            let spoofed_address_before = setup.dp.counter(Counter::SpoofedAddress);
            let what = format!("{} (frame {i} of {}, {} bytes)", seq.label, seq.frames.len(), frame.len());
            tally.frames += 1;
            let dropped = if egress {
                // The kernel builds an skb of the frame before the program runs and
                // refuses some malformed ones itself (short, or with broken IP headers):
                // such a frame never reaches a TC program.
                let Ok(action) = setup.dp.try_to_port(frame) else {
                    tally.refused_by_kernel += 1;
                    continue;
                };
                assert!(action == TC_PASS || action == TC_ACT_SHOT, "{what}: TC action {action}");
                action == TC_ACT_SHOT
            } else {
                match setup.dp.try_from_port(frame) {
                    Ok(action) => {
                        assert_ne!(action, XDP_ABORTED, "{what}: XDP aborted");
                        assert!(action == XDP_PASS || action == XDP_DROP, "{what}: XDP action {action}");
                        action == XDP_DROP
                    }
                    Err(e) => {
                        assert!(frame.len() < 14, "{what}: BPF_PROG_TEST_RUN refused it: {e}");
                        tally.refused_by_kernel += 1;
                        continue;
                    }
                }
            };
            tally.dropped += usize::from(dropped);
            let created: Vec<(FlowKey, FlowValue)> =
                setup.flow_keys().into_iter().filter(|(k, _)| !before.contains(k)).collect();
            let enforcing_here = setup.rules.is_some() && !egress;
            if seq.spoofs_victim && enforcing_here && vm_port {
                assert!(dropped, "{what}: a frame claiming the victim's MAC from another port passed");
                assert_eq!(setup.dp.counter(Counter::Spoofed), spoofed_before + 1, "{what}: counted as spoofed");
                assert!(created.is_empty(), "{what}: a spoofed frame made a flow");
                continue;
            }
            if seq.spoofs_victim_address && enforcing_here && vm_port {
                assert!(dropped, "{what}: a frame claiming the victim's address from another port passed");
                let counted = setup.dp.counter(Counter::SpoofedAddress) - spoofed_address_before;
                assert_eq!(counted, 1, "{what}: counted as spoofed_address");
                assert!(created.is_empty(), "{what}: a spoofed frame made a flow");
                continue;
            }
            for (key, value) in &created {
                tally.flows_compared += 1;
                let got = Verdict::from_u8(value.verdict);
                let want = match &setup.rules {
                    Some(rules) => evaluate(rules, &view(key, value, frame, egress)).verdict,
                    None => Verdict::Observed,
                };
                assert_eq!(got, Some(want), "{what}: kernel vs evaluator for {key:?}");
                if enforcing_here && vm_port {
                    assert_eq!(dropped, want == Verdict::Denied, "{what}: dropped iff denied");
                }
            }
        }
    }
    tally
}

#[test]
fn no_frame_of_the_corpus_aborts_and_every_verdict_equals_the_evaluator() {
    let corpus = hostile::corpus(SEED, 3000);
    let frames: usize = corpus.iter().map(|s| s.frames.len()).sum();
    assert!(frames > 3000, "a corpus worth the name: {frames} frames");
    for (enforce, role) in [(false, PortRole::Vm), (true, PortRole::Vm), (true, PortRole::Uplink)] {
        for egress in [false, true] {
            let mut setup = setup(enforce, role, OTHER_PORT);
            let tally = run_corpus(&mut setup, &corpus, egress, role == PortRole::Vm);
            eprintln!(
                "{} {:?} {}: {tally:?}",
                if enforce { "enforcing" } else { "observing" },
                role,
                if egress { "to_port" } else { "from_port" }
            );
            assert!(tally.flows_compared > 500, "enough frames made flows to compare: {tally:?}");
            assert!(tally.refused_by_kernel * 4 < tally.frames, "most frames reached the program: {tally:?}");
            if enforce && role == PortRole::Vm && !egress {
                assert!(tally.dropped > 1000, "malformed frames from a VM port are dropped: {tally:?}");
            }
        }
    }
}

#[test]
fn spoofed_frames_are_dropped_and_counted_unless_the_port_owns_the_mac() {
    let spoofs: Vec<Hostile> = hostile::corpus(SEED, 0).into_iter().filter(|s| s.spoofs_victim).collect();
    assert!(spoofs.len() >= 5, "{spoofs:?}");
    let mut setup = setup(true, PortRole::Vm, OTHER_PORT);
    let tally = run_corpus(&mut setup, &spoofs, false, true);
    assert_eq!(tally.dropped, spoofs.len(), "{tally:?}");
    assert_eq!(setup.dp.counter(Counter::Spoofed), spoofs.len() as u64);
    // Bound to the port they come from, the same frames are the victim's own.
    let zone_a = {
        let rules = setup.rules.as_ref().unwrap();
        compile(rules, &ZoneIds::new()).zone_ids.id("a").unwrap()
    };
    let owner = EndpointValue { zone: zone_a, ifindex: LOOPBACK_IFINDEX, ..EndpointValue::default() };
    setup.tables.write_endpoint(0, MacAddr(VICTIM_MAC), owner).unwrap();
    give_victim_addresses(&mut setup.tables, LOOPBACK_IFINDEX);
    for seq in &spoofs {
        setup.clear();
        for frame in &seq.frames {
            assert_eq!(setup.dp.from_port(frame), XDP_PASS, "{}: the owner's own frame", seq.label);
        }
    }
    assert_eq!(setup.dp.counter(Counter::Spoofed), spoofs.len() as u64, "no more counted as spoofed");
}

#[test]
fn frames_from_another_endpoints_address_are_dropped_and_counted_unless_the_port_owns_it() {
    let spoofs: Vec<Hostile> = hostile::corpus(SEED, 0).into_iter().filter(|s| s.spoofs_victim_address).collect();
    assert!(spoofs.len() >= 8, "{spoofs:?}");
    let mut setup = setup(true, PortRole::Vm, OTHER_PORT);
    let tally = run_corpus(&mut setup, &spoofs, false, true);
    assert_eq!(tally.dropped, spoofs.len(), "{tally:?}");
    assert_eq!(setup.dp.counter(Counter::SpoofedAddress), spoofs.len() as u64);
    assert_eq!(setup.dp.counter(Counter::Spoofed), 0, "not a MAC spoof");

    // A flow the victim started from its own port (OTHER_PORT); then the same flow's
    // packets from this port (a hijack of the established flow) are dropped.
    give_victim_addresses(&mut setup.tables, LOOPBACK_IFINDEX);
    let tcp = spoofs.iter().find(|s| s.label == "tcp from the victim's address").expect("the tcp spoof");
    setup.clear();
    assert_eq!(setup.dp.from_port(&tcp.frames[0]), XDP_PASS, "the owner's own flow");
    let (key, mut value) = setup.dp.flows().pop().expect("the flow");
    let d = usize::from(value.initiator & 1);
    assert_eq!(value.ifindex[d], LOOPBACK_IFINDEX);
    value.ifindex[d] = OTHER_PORT;
    let mut flows: HashMap<&mut MapData, FlowKey, FlowValue> =
        HashMap::try_from(setup.dp.ebpf.map_mut(FLOWS).unwrap()).unwrap();
    flows.insert(key, value, 0).unwrap();
    give_victim_addresses(&mut setup.tables, OTHER_PORT);
    let before = setup.dp.counter(Counter::SpoofedAddress);
    assert_eq!(setup.dp.from_port(&tcp.frames[0]), XDP_DROP, "the same flow from a port that does not own the address");
    assert_eq!(setup.dp.counter(Counter::SpoofedAddress), before + 1);
    let (_, value) = setup.dp.flows().pop().unwrap();
    assert_eq!(value.packets.iter().sum::<u64>(), 1, "the hijacking packet is not counted on the flow");

    // Owned by the port they come from, the same frames are the victim's own.
    give_victim_addresses(&mut setup.tables, LOOPBACK_IFINDEX);
    let before = setup.dp.counter(Counter::SpoofedAddress);
    for seq in &spoofs {
        setup.clear();
        for frame in &seq.frames {
            assert_eq!(setup.dp.from_port(frame), XDP_PASS, "{}: the owner's own frame", seq.label);
        }
    }
    assert_eq!(setup.dp.counter(Counter::SpoofedAddress), before, "no more counted as spoofed");
    // Nobody owns them: anyone may use them (as before an endpoint is bound).
    setup.tables.set_owners(&StdHashMap::new()).unwrap();
    for seq in &spoofs {
        setup.clear();
        assert_eq!(setup.dp.from_port(&seq.frames[0]), XDP_PASS, "{}: an address nobody owns", seq.label);
    }
    assert_eq!(setup.dp.counter(Counter::SpoofedAddress), before);

    // An uplink carries routed and hairpinned frames with any source address: the same
    // frames from an uplink are not address spoofing.
    let mut uplink = self::setup(true, PortRole::Uplink, OTHER_PORT);
    for seq in &spoofs {
        uplink.clear();
        assert_eq!(uplink.dp.from_port(&seq.frames[0]), XDP_PASS, "{}: from an uplink", seq.label);
    }
    assert_eq!(uplink.dp.counter(Counter::SpoofedAddress), 0);

    // Owned by an endpoint bound on another node: spoofed, unless the frame comes from
    // the owner's own MAC (the endpoint arriving here before the agent binds it).
    let zone_a = compile(setup.rules.as_ref().unwrap(), &ZoneIds::new()).zone_ids.id("a").unwrap();
    let unbound = EndpointValue { zone: zone_a, ifindex: 0, ..EndpointValue::default() };
    setup.tables.write_endpoint(0, MacAddr(VICTIM_MAC), unbound).unwrap();
    give_victim_addresses(&mut setup.tables, OWNER_ELSEWHERE);
    let before = setup.dp.counter(Counter::SpoofedAddress);
    for seq in &spoofs {
        setup.clear();
        assert_eq!(setup.dp.from_port(&seq.frames[0]), XDP_DROP, "{}: owned on another node", seq.label);
        let mut own = seq.frames[0].clone();
        replace_mac(&mut own, MAC_A, VICTIM_MAC);
        assert_eq!(setup.dp.from_port(&own), XDP_PASS, "{}: from the owner's own MAC", seq.label);
    }
    assert_eq!(setup.dp.counter(Counter::SpoofedAddress), before + spoofs.len() as u64);
}
