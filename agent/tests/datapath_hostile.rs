//! The hostile corpus (`common::hostile`) through `BPF_PROG_TEST_RUN`: both programs,
//! observing and enforcing, from a VM port and from an uplink. No frame makes a program
//! abort or return anything but pass or drop. Every flow a frame creates carries the
//! verdict `backplane_rules::evaluate` gives it, where the port is judged by the frame's
//! fields (`unbound_ports: observe`, the identity the evaluator models); from a port
//! bound to the corpus's sender every flow is that endpoint's, whatever the frame says,
//! and from a quarantined port every flow is denied; from a VM port a denied flow's
//! first frame is dropped. Frames claiming the MAC of an endpoint bound to another port
//! are dropped and counted, and pass when that endpoint sends them from its own port;
//! so are frames that send from or claim (ARP, neighbour discovery) the victim's IP
//! addresses with the sender's own MAC.
//!
//! `BPF_PROG_TEST_RUN` runs the programs as if on loopback: the corpus's port. The
//! victim's port (and a port nobody bound, where an endpoint arrives) are a veth pair of
//! the test's own (`TestLinks`), given to `from_port` through its context.

mod common;

use std::{collections::HashMap as StdHashMap, net::IpAddr, path::Path};

use aya::maps::{Array, HashMap, MapData};
use backplane::datapath::rule_tables::{EndpointOverlay, RuleTables, activate, owner_key, write_port_zones};
use backplane_common::{
    DatapathConfig, FlowKey, FlowValue, PortInfo, PortRole, Verdict,
    config::{
        BINDING_HOST, CONFIG_LEARN, CONFIG_LEARN_WORLD, LearnedValue, PORT_ADDRS_FIXED, UNBOUND_OBSERVE,
        UNBOUND_QUARANTINE,
    },
    flow::{FAMILY_IPV4, FragmentKey, FragmentPorts},
    maps::{CONFIG, FLOWS, FRAGMENTS, LEARNED, PORTS},
    policy::{EndpointValue, OWNER_ELSEWHERE, OwnerValue},
    reason::{Counter, Reason},
};
use backplane_rules::{MacAddr, PacketView, RuleSet, ZoneIds, compile, evaluate, parse_rules};
use common::{
    datapath::{TestDatapath, TestLinks},
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
const SEED: u64 = 0x0b5e_55ed;

/// What the loopback port, the one the corpus's frames come from, is as a VM port while
/// enforcing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lo {
    /// Nobody bound it, and it is judged by the fields of its frames as before ports were
    /// bound (`unbound_ports: observe`, no zone learns): the identity
    /// `backplane_rules::evaluate` models, so the only mode its verdicts are compared in.
    Legacy,
    /// Nobody bound it and it cannot learn (no zone learns): `unbound_ports: quarantine`.
    Quarantined,
    /// The host bound it to the corpus's sender (`MAC_A`) in zone `a` (the rules'
    /// defaults otherwise: zones learn, unbound ports are quarantined).
    Bound,
}

/// The data path with the loopback port registered as `role`, enforcing the corpus's
/// rule set or observing only. While enforcing, the victim endpoint (zone `a`) is bound
/// to a port of its own, `victim_port`, which owns its addresses; `arrival_port` is a VM
/// port nobody bound.
struct Setup {
    dp: TestDatapath,
    tables: RuleTables,
    ports: HashMap<MapData, u32, PortInfo>,
    rules: Option<RuleSet>,
    zone_a: u16,
    zone_b: u16,
    victim_port: u32,
    arrival_port: u32,
    _links: TestLinks,
}

fn setup(enforce: bool, role: PortRole, lo: Lo) -> Setup {
    let links = TestLinks::new();
    let [victim_port, arrival_port] = links.ifindex;
    let mut dp = TestDatapath::load(4096);
    let mut tables = RuleTables::from_ebpf(&mut dp.ebpf).expect("rule tables");
    let mut ports: HashMap<MapData, u32, PortInfo> = HashMap::try_from(dp.ebpf.take_map(PORTS).unwrap()).unwrap();
    ports.insert(LOOPBACK_IFINDEX, PortInfo { role: role as u8, ..PortInfo::default() }, 0).unwrap();
    let (mut zone_a, mut zone_b) = (0, 0);
    let rules = enforce.then(|| {
        let rules = parse_rules([(Path::new("hostile.yaml"), hostile::RULES)]).expect("the corpus's rules");
        let compiled = compile(&rules, &ZoneIds::new());
        (zone_a, zone_b) = (compiled.zone_ids.id("a").expect("zone a"), compiled.zone_ids.id("b").expect("zone b"));
        let mut config: Array<MapData, DatapathConfig> = Array::try_from(dp.ebpf.take_map(CONFIG).unwrap()).unwrap();
        tables.write_slot(0, &compiled).expect("write the rules");
        write_port_zones(&mut ports, 0, &compiled, [(LOOPBACK_IFINDEX, "lo")], &EndpointOverlay::default()).unwrap();
        activate(&mut config, 0, &compiled).expect("activate");
        let mut cfg = config.get(&0, 0).unwrap();
        match lo {
            Lo::Legacy => {
                cfg.flags &= !(CONFIG_LEARN | CONFIG_LEARN_WORLD);
                cfg.unbound_ports = UNBOUND_OBSERVE;
            }
            Lo::Quarantined => {
                cfg.flags &= !(CONFIG_LEARN | CONFIG_LEARN_WORLD);
                cfg.unbound_ports = UNBOUND_QUARANTINE;
            }
            Lo::Bound => {}
        }
        config.set(0, cfg, 0).unwrap();
        rules
    });
    let mut setup = Setup { dp, tables, ports, rules, zone_a, zone_b, victim_port, arrival_port, _links: links };
    if enforce {
        if lo == Lo::Bound && role == PortRole::Vm {
            setup.bind(LOOPBACK_IFINDEX, MAC_A, zone_a, 0);
        }
        setup.bind(victim_port, VICTIM_MAC, zone_a, 0);
        setup.unbind(arrival_port);
        let victim = EndpointValue { zone: zone_a, endpoint_id: 7, ifindex: victim_port, ..EndpointValue::default() };
        setup.tables.write_endpoint(0, MacAddr(VICTIM_MAC), victim).unwrap();
        give_victim_addresses(&mut setup.tables, victim_port);
    }
    setup
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

/// A frame of the corpus as the victim sends it: from its own MAC, the one its port is
/// bound to (the corpus's frames come from `MAC_A`).
fn as_victim(frame: &[u8]) -> Vec<u8> {
    let mut own = frame.to_vec();
    replace_mac(&mut own, MAC_A, VICTIM_MAC);
    own
}

impl Setup {
    fn flow_keys(&self) -> Vec<(FlowKey, FlowValue)> {
        self.dp.flows()
    }

    /// Makes `ifindex` a VM port the host bound to `mac`, in `zone`, with port `flags`.
    fn bind(&mut self, ifindex: u32, mac: [u8; 6], zone: u16, flags: u8) {
        let info = PortInfo {
            role: PortRole::Vm as u8,
            flags,
            binding: BINDING_HOST,
            mac,
            zone: [zone; 2],
            ..PortInfo::default()
        };
        self.ports.insert(ifindex, info, 0).unwrap();
    }

    /// Makes `ifindex` a VM port nobody bound.
    fn unbind(&mut self, ifindex: u32) {
        self.ports.insert(ifindex, PortInfo { role: PortRole::Vm as u8, ..PortInfo::default() }, 0).unwrap();
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
/// frame that created it. No port identity (`src_port`, `dst_port`): each end is placed
/// by its frame fields, as the data path does for a port under `unbound_ports: observe`.
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
        src_port: None,
        dst_port: None,
    }
}

/// What every flow a frame creates must be.
#[derive(Clone, Copy, Debug)]
enum Oracle {
    /// Its verdict is the evaluator's (only with [`Lo::Legacy`], or without rules).
    Evaluator,
    /// The loopback port's end of it (the sender at `from_port`, the receiver at
    /// `to_port`) is in this zone, the binding's, whatever the frame's fields say.
    PortZone(u16),
    /// Denied for the quarantined port's end (`unbound_port`: no zone of the rules is a
    /// remediation zone).
    Quarantined,
}

#[derive(Default, Debug)]
struct Tally {
    frames: usize,
    refused_by_kernel: usize,
    dropped: usize,
    flows_compared: usize,
    flows_allowed: usize,
}

/// Runs the corpus through one program; returns what happened, or panics naming the
/// sequence and frame that misbehaved.
fn run_corpus(setup: &mut Setup, corpus: &[Hostile], egress: bool, vm_port: bool, oracle: Oracle) -> Tally {
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
                tally.flows_allowed += usize::from(got == Some(Verdict::Allowed));
                match oracle {
                    Oracle::Evaluator => {
                        let want = match &setup.rules {
                            Some(rules) => evaluate(rules, &view(key, value, frame, egress)).verdict,
                            None => Verdict::Observed,
                        };
                        assert_eq!(got, Some(want), "{what}: kernel vs evaluator for {key:?}");
                    }
                    Oracle::PortZone(zone) => {
                        let port_end = usize::from((value.initiator ^ u8::from(egress)) & 1);
                        assert_eq!(value.zone[port_end], zone, "{what}: the port's end of {key:?} is its binding's");
                        assert!(
                            matches!(got, Some(Verdict::Allowed | Verdict::Denied)),
                            "{what}: judged under the rules: {value:?}"
                        );
                    }
                    Oracle::Quarantined => {
                        assert_eq!(
                            (got, value.reason),
                            (Some(Verdict::Denied), Reason::UnboundPort as u8),
                            "{what}: {key:?} from or to a quarantined port"
                        );
                    }
                }
                if enforcing_here && vm_port {
                    assert_eq!(dropped, got == Some(Verdict::Denied), "{what}: dropped iff denied");
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
    // The evaluator's identity is the frame's fields: the VM port is unbound and judged
    // by them (`Lo::Legacy`). What binding changes is checked below, against the binding.
    for (enforce, role) in [(false, PortRole::Vm), (true, PortRole::Vm), (true, PortRole::Uplink)] {
        for egress in [false, true] {
            let mut setup = setup(enforce, role, Lo::Legacy);
            let tally = run_corpus(&mut setup, &corpus, egress, role == PortRole::Vm, Oracle::Evaluator);
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
fn the_corpus_from_a_bound_port_is_its_endpoints_whatever_the_frames_say() {
    let corpus = hostile::corpus(SEED, 3000);
    let address_spoofs = corpus.iter().filter(|s| s.spoofs_victim_address).count() as u64;
    for egress in [false, true] {
        let mut setup = setup(true, PortRole::Vm, Lo::Bound);
        let zone_a = setup.zone_a;
        let tally = run_corpus(&mut setup, &corpus, egress, true, Oracle::PortZone(zone_a));
        eprintln!("bound {}: {tally:?}", if egress { "to_port" } else { "from_port" });
        assert!(tally.flows_compared > 500, "enough frames made flows to check: {tally:?}");
        assert!(tally.flows_allowed > 100, "a -> b on the allowed services passes: {tally:?}");
        assert!(tally.refused_by_kernel * 4 < tally.frames, "most frames reached the program: {tally:?}");
        if !egress {
            assert!(tally.dropped > 1000, "malformed frames from a VM port are dropped: {tally:?}");
            // The corpus's frames from b's addresses (and from the world's) are not the
            // sender's to send from: its zone has networks, and they are not in them.
            let refused = setup.dp.counter(Counter::SpoofedAddress);
            assert!(refused > address_spoofs, "addresses outside zone a refused: {refused}");
        }
    }
}

#[test]
fn the_corpus_from_a_quarantined_port_makes_only_denied_flows() {
    let corpus = hostile::corpus(SEED, 3000);
    for egress in [false, true] {
        let mut setup = setup(true, PortRole::Vm, Lo::Quarantined);
        let tally = run_corpus(&mut setup, &corpus, egress, true, Oracle::Quarantined);
        eprintln!("quarantined {}: {tally:?}", if egress { "to_port" } else { "from_port" });
        assert!(tally.flows_compared > 500, "enough frames made flows to check: {tally:?}");
        assert_eq!(tally.flows_allowed, 0, "{tally:?}");
    }
}

#[test]
fn spoofed_frames_are_dropped_and_counted_unless_the_port_owns_the_mac() {
    let spoofs: Vec<Hostile> = hostile::corpus(SEED, 0).into_iter().filter(|s| s.spoofs_victim).collect();
    assert!(spoofs.len() >= 5, "{spoofs:?}");
    // From a port nobody bound, and from one bound to the corpus's sender: the victim's
    // MAC (as Ethernet source, or as ARP sender) is only its own port's to send.
    for lo in [Lo::Quarantined, Lo::Bound] {
        let mut setup = setup(true, PortRole::Vm, lo);
        let oracle = if lo == Lo::Bound { Oracle::PortZone(setup.zone_a) } else { Oracle::Quarantined };
        let tally = run_corpus(&mut setup, &spoofs, false, true, oracle);
        assert_eq!(tally.dropped, spoofs.len(), "{lo:?}: {tally:?}");
        assert_eq!(setup.dp.counter(Counter::Spoofed), spoofs.len() as u64, "{lo:?}");
    }
    // From the port the victim is bound to, the same frames as the victim sends them are
    // its own. (The one whose Ethernet source is the corpus's sender, `MAC_A`, with the
    // victim as ARP sender, is sent with the victim's MAC as Ethernet source too: a port
    // bound to the victim sends nothing else, as the next check shows.)
    let mut setup = setup(true, PortRole::Vm, Lo::Bound);
    let victim_port = setup.victim_port;
    for seq in &spoofs {
        setup.clear();
        for frame in &seq.frames {
            assert_eq!(
                setup.dp.from_port_on(victim_port, &as_victim(frame)),
                XDP_PASS,
                "{}: the owner's own",
                seq.label
            );
        }
    }
    assert_eq!(setup.dp.counter(Counter::Spoofed), 0, "none counted as spoofed");
    let lying = spoofs.iter().find(|s| s.frames[0][6..12] == MAC_A).expect("the ARP whose Ethernet source is ours");
    assert_eq!(
        setup.dp.from_port_on(victim_port, &lying.frames[0]),
        XDP_DROP,
        "{}: from the victim's port",
        lying.label
    );
    assert_eq!(setup.dp.counter(Counter::SpoofedMac), 1, "not the binding's MAC: spoofed_mac");
}

#[test]
fn frames_from_another_endpoints_address_are_dropped_and_counted_unless_the_port_owns_it() {
    let spoofs: Vec<Hostile> = hostile::corpus(SEED, 0).into_iter().filter(|s| s.spoofs_victim_address).collect();
    assert!(spoofs.len() >= 8, "{spoofs:?}");
    // The corpus's port is bound to its sender (`MAC_A`) in zone `a`, the victim's zone:
    // the victim's addresses are in its zone's networks, but they are the victim's port's.
    let mut setup = setup(true, PortRole::Vm, Lo::Bound);
    let (zone_a, zone_b, victim_port, arrival_port) =
        (setup.zone_a, setup.zone_b, setup.victim_port, setup.arrival_port);
    let tally = run_corpus(&mut setup, &spoofs, false, true, Oracle::PortZone(zone_a));
    assert_eq!(tally.dropped, spoofs.len(), "{tally:?}");
    assert_eq!(setup.dp.counter(Counter::SpoofedAddress), spoofs.len() as u64);
    assert_eq!(setup.dp.counter(Counter::Spoofed), 0, "not a MAC spoof");

    // A flow the victim started from its own port; then the same flow's packets from
    // this port (a hijack of the established flow) are dropped.
    let tcp = spoofs.iter().find(|s| s.label == "tcp from the victim's address").expect("the tcp spoof");
    setup.clear();
    assert_eq!(setup.dp.from_port_on(victim_port, &as_victim(&tcp.frames[0])), XDP_PASS, "the owner's own flow");
    let (_, value) = setup.dp.flows().pop().expect("the flow");
    assert_eq!(value.ifindex[usize::from(value.initiator & 1)], victim_port);
    let before = setup.dp.counter(Counter::SpoofedAddress);
    assert_eq!(setup.dp.from_port(&tcp.frames[0]), XDP_DROP, "the same flow from a port that does not own the address");
    assert_eq!(setup.dp.counter(Counter::SpoofedAddress), before + 1);
    let (_, value) = setup.dp.flows().pop().unwrap();
    assert_eq!(value.packets.iter().sum::<u64>(), 1, "the hijacking packet is not counted on the flow");

    // Sent by the victim from the port that owns them, the same frames are its own.
    let before = setup.dp.counter(Counter::SpoofedAddress);
    for seq in &spoofs {
        setup.clear();
        for frame in &seq.frames {
            assert_eq!(
                setup.dp.from_port_on(victim_port, &as_victim(frame)),
                XDP_PASS,
                "{}: the owner's own",
                seq.label
            );
        }
    }
    assert_eq!(setup.dp.counter(Counter::SpoofedAddress), before, "no more counted as spoofed");

    // Nobody owns them (the victim is bound nowhere). They are not anyone's, as they were
    // before ports were bound: a bound sender may send from an address nobody owns only
    // inside its own zone's networks, and not at all when its addresses are fixed.
    let unbound = EndpointValue { zone: zone_a, endpoint_id: 7, ifindex: 0, ..EndpointValue::default() };
    setup.tables.write_endpoint(0, MacAddr(VICTIM_MAC), unbound).unwrap();
    setup.unbind(victim_port);
    setup.tables.set_owners(&StdHashMap::new()).unwrap();
    for seq in &spoofs {
        setup.clear();
        assert_eq!(setup.dp.from_port(&seq.frames[0]), XDP_PASS, "{}: nobody's address in its zone", seq.label);
    }
    assert_eq!(setup.dp.counter(Counter::SpoofedAddress), before);
    for (zone, flags, whose) in [(zone_b, 0, "in another zone"), (zone_a, PORT_ADDRS_FIXED, "with fixed addresses")] {
        setup.bind(LOOPBACK_IFINDEX, MAC_A, zone, flags);
        let before = setup.dp.counter(Counter::SpoofedAddress);
        for seq in &spoofs {
            setup.clear();
            assert_eq!(setup.dp.from_port(&seq.frames[0]), XDP_DROP, "{}: from a sender {whose}", seq.label);
        }
        assert_eq!(setup.dp.counter(Counter::SpoofedAddress), before + spoofs.len() as u64, "{whose}");
    }
    setup.bind(LOOPBACK_IFINDEX, MAC_A, zone_a, 0);

    // An uplink carries routed and hairpinned frames with any source address: the same
    // frames from an uplink are not address spoofing.
    let mut uplink = self::setup(true, PortRole::Uplink, Lo::Bound);
    for seq in &spoofs {
        uplink.clear();
        assert_eq!(uplink.dp.from_port(&seq.frames[0]), XDP_PASS, "{}: from an uplink", seq.label);
    }
    assert_eq!(uplink.dp.counter(Counter::SpoofedAddress), 0);

    // Owned by an endpoint bound on another node: spoofed, unless the frame comes from
    // the owner's own MAC (the endpoint arriving here before the agent binds it): on a
    // port nobody bound, which its first frame locks to it (its zone learns).
    give_victim_addresses(&mut setup.tables, OWNER_ELSEWHERE);
    let before = setup.dp.counter(Counter::SpoofedAddress);
    for seq in &spoofs {
        setup.clear();
        assert_eq!(setup.dp.from_port(&seq.frames[0]), XDP_DROP, "{}: owned on another node", seq.label);
        let own = as_victim(&seq.frames[0]);
        assert_eq!(setup.dp.from_port_on(arrival_port, &own), XDP_PASS, "{}: from the owner's own MAC", seq.label);
    }
    assert_eq!(setup.dp.counter(Counter::SpoofedAddress), before + spoofs.len() as u64);
    let learned: HashMap<&MapData, u32, LearnedValue> = HashMap::try_from(setup.dp.ebpf.map(LEARNED).unwrap()).unwrap();
    assert_eq!(learned.get(&arrival_port, 0).expect("the arrival port locked").mac, VICTIM_MAC);
    assert_eq!(setup.dp.counter(Counter::PortsLearned), 1);
}
