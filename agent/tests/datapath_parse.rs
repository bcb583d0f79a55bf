//! The data path under `BPF_PROG_TEST_RUN`: well-formed frames make flows with exact
//! counters; malformed frames pass and are counted by reason, never aborted.

mod common;

use backplane_common::{
    flow::{DIR_HI_TO_LO, DIR_LO_TO_HI, FAMILY_IPV4, FAMILY_IPV6, STATE_ENDED},
    reason::Counter,
};
use common::{datapath::TestDatapath, frames::*};

const XDP_PASS: u32 = 2;
/// `TC_ACT_UNSPEC`: the classifiers pass a frame by handing it to the next program.
const TC_PASS: i32 = -1;

const A: [u8; 4] = [10, 0, 0, 1];
const B: [u8; 4] = [10, 0, 0, 2];

#[test]
fn tcp_flow_counts_both_directions_exactly() {
    let mut dp = TestDatapath::load(1024);
    let syn = tcp4(A, 40000, B, 80, TCP_SYN);
    let synack = eth(MAC_A, MAC_B, &[], 0x0800, &ipv4(B, A, 6, &tcp(80, 40000, TCP_SYN | TCP_ACK, &[])));
    let data = tcp4(A, 40000, B, 80, TCP_ACK | TCP_PSH);
    assert_eq!(dp.from_port(&syn), XDP_PASS);
    assert_eq!(dp.from_port(&synack), XDP_PASS);
    for _ in 0..5 {
        assert_eq!(dp.from_port(&data), XDP_PASS);
    }
    let fin = tcp4(A, 40000, B, 80, TCP_FIN | TCP_ACK);
    assert_eq!(dp.from_port(&fin), XDP_PASS);

    let flows = dp.flows();
    assert_eq!(flows.len(), 1, "one bidirectional flow: {flows:?}");
    let (key, value) = flows[0];
    assert_eq!(key.family, FAMILY_IPV4);
    assert_eq!(key.proto, 6);
    assert_eq!(&key.addr_lo[..4], &A);
    assert_eq!(&key.addr_hi[..4], &B);
    assert_eq!((key.port_lo, key.port_hi), (40000, 80));
    assert_eq!(value.initiator, DIR_LO_TO_HI);
    let fwd = usize::from(DIR_LO_TO_HI);
    let rev = usize::from(DIR_HI_TO_LO);
    assert_eq!(value.packets[fwd], 7, "SYN + 5 data + FIN");
    assert_eq!(value.packets[rev], 1, "SYN-ACK");
    assert_eq!(value.bytes[fwd], 7 * syn.len() as u64);
    assert_eq!(value.bytes[rev], synack.len() as u64);
    assert_eq!(value.tcp_flags[fwd], TCP_SYN | TCP_ACK | TCP_PSH | TCP_FIN);
    assert_eq!(value.tcp_flags[rev], TCP_SYN | TCP_ACK);
    assert_ne!(value.state & STATE_ENDED, 0, "FIN ends the flow");
    assert!(value.last_seen_ns >= value.first_seen_ns);
    assert_eq!(dp.counter(Counter::FlowsCreated), 1);
    assert_eq!(dp.counter(Counter::Packets), 8);
    assert_eq!(dp.counter(Counter::FlowPackets), 8);
}

#[test]
fn egress_counts_only_what_no_ingress_program_saw() {
    let mut dp = TestDatapath::load(1024);
    let frame = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4(A, B, 17, &udp(5000, 53, b"hello")));
    // The host itself sends it (only the egress program sees it): counted once.
    assert_eq!(dp.to_port(&frame), TC_PASS);
    assert_eq!(dp.to_port(&frame), TC_PASS);
    let flows = dp.flows();
    assert_eq!(flows.len(), 1);
    let v = flows[0].1;
    assert_eq!(v.packets.iter().sum::<u64>(), 2);
    assert_eq!(dp.counter(Counter::EgressOnly), 2);
    // Seen entering the switch: counted there, and no longer at egress.
    let mut dp = TestDatapath::load(1024);
    assert_eq!(dp.from_port(&frame), XDP_PASS);
    assert_eq!(dp.to_port(&frame), TC_PASS);
    let v = dp.flows()[0].1;
    assert_eq!(v.packets.iter().sum::<u64>(), 1);
    assert_eq!(dp.counter(Counter::EgressOnly), 0);
}

#[test]
fn icmp_echo_and_reply_share_one_flow() {
    let mut dp = TestDatapath::load(1024);
    for seq in 0..10 {
        let req = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4(A, B, 1, &icmp_echo(8, 77, seq)));
        let rep = eth(MAC_A, MAC_B, &[], 0x0800, &ipv4(B, A, 1, &icmp_echo(0, 77, seq)));
        assert_eq!(dp.from_port(&req), XDP_PASS);
        assert_eq!(dp.from_port(&rep), XDP_PASS);
    }
    let flows = dp.flows();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let (k, v) = flows[0];
    assert_eq!((k.port_lo, k.port_hi), (77, 77));
    assert_eq!(v.packets, [10, 10]);
}

#[test]
fn ipv6_with_extension_headers_and_vlan_tags() {
    let mut dp = TestDatapath::load(1024);
    let exts = vec![(0u8, vec![0u8; 6]), (60u8, vec![0u8; 14]), (44u8, vec![0u8; 6])];
    let frame = eth(
        MAC_B,
        MAC_A,
        &[(0x88a8, 100), (0x8100, 200)],
        0x86dd,
        &ipv6_ext(v6(1), v6(2), &exts, 17, &udp(1000, 2000, b"x")),
    );
    assert_eq!(dp.from_port(&frame), XDP_PASS);
    let flows = dp.flows();
    assert_eq!(flows.len(), 1);
    let (k, v) = flows[0];
    assert_eq!(k.family, FAMILY_IPV6);
    assert_eq!(k.proto, 17);
    assert_eq!(k.vlan, 100, "outermost VLAN ID");
    assert_eq!((k.port_lo, k.port_hi), (1000, 2000));
    assert_eq!(v.bytes[0], frame.len() as u64);
}

/// Every malformed frame passes (`XDP_PASS` / `TC_PASS`) and is counted under its reason.
#[test]
fn malformed_frames_pass_and_are_counted_by_reason() {
    let good_tcp = ipv4(A, B, 6, &tcp(1, 2, TCP_SYN, &[]));
    let mut bad_ihl = good_tcp.clone();
    bad_ihl[0] = 0x43; // IHL 3 (< 5)
    let mut huge_ihl = ipv4(A, B, 17, &[]);
    huge_ihl[0] = 0x4f; // IHL 15 = 60 bytes, frame has 20
    let mut bad_version = good_tcp.clone();
    bad_version[0] = 0x55;
    let deep_chain: Vec<(u8, Vec<u8>)> = (0..8).map(|_| (60u8, vec![0u8; 6])).collect();
    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        ("vlan tag cut short", eth(MAC_B, MAC_A, &[], 0x8100, &[0x00]), Counter::ParseTruncatedVlan),
        (
            "three vlan tags",
            eth(MAC_B, MAC_A, &[(0x88a8, 1), (0x8100, 2), (0x8100, 3)], 0x0800, &good_tcp),
            Counter::ParseVlanTooDeep,
        ),
        ("arp cut short", eth([0xff; 6], MAC_A, &[], 0x0806, &[0, 1, 8, 0]), Counter::ParseTruncatedArp),
        ("ipv4 cut at 10 bytes", eth(MAC_B, MAC_A, &[], 0x0800, &good_tcp[..10]), Counter::ParseTruncatedIpv4),
        ("ipv4 ihl 3", eth(MAC_B, MAC_A, &[], 0x0800, &bad_ihl), Counter::ParseBadIpv4Ihl),
        ("ipv4 ihl beyond the frame", eth(MAC_B, MAC_A, &[], 0x0800, &huge_ihl), Counter::ParseBadIpv4Ihl),
        ("ip version 5", eth(MAC_B, MAC_A, &[], 0x0800, &bad_version), Counter::ParseBadIpVersion),
        (
            "ipv4 non-first fragment",
            eth(MAC_B, MAC_A, &[], 0x0800, &ipv4_full(A, B, 6, &[], 185, &[0u8; 16])),
            Counter::ParseIpv4Fragment,
        ),
        ("tcp cut at 8 bytes", eth(MAC_B, MAC_A, &[], 0x0800, &ipv4(A, B, 6, &[0u8; 8])), Counter::ParseTruncatedL4),
        ("udp cut at 2 bytes", eth(MAC_B, MAC_A, &[], 0x0800, &ipv4(A, B, 17, &[0u8; 2])), Counter::ParseTruncatedL4),
        (
            "ipv6 cut at 30 bytes",
            eth(MAC_B, MAC_A, &[], 0x86dd, &ipv6(v6(1), v6(2), 17, &[])[..30]),
            Counter::ParseTruncatedIpv6,
        ),
        (
            "ipv6 extension chain longer than the walk",
            eth(MAC_B, MAC_A, &[], 0x86dd, &ipv6_ext(v6(1), v6(2), &deep_chain, 17, &udp(1, 2, &[]))),
            Counter::ParseIpv6ExtTooDeep,
        ),
        (
            "ipv6 extension header cut short",
            eth(MAC_B, MAC_A, &[], 0x86dd, &ipv6(v6(1), v6(2), 0, &[])),
            Counter::ParseBadIpv6Ext,
        ),
        ("not ip (LLDP)", eth([0x01, 0x80, 0xc2, 0, 0, 0x0e], MAC_A, &[], 0x88cc, &[0u8; 30]), Counter::ParseNotIp),
    ];
    let mut refused_by_skb_test_run = Vec::new();
    for (name, frame, reason) in &cases {
        let mut dp = TestDatapath::load(64);
        assert_eq!(dp.from_port(frame), XDP_PASS, "{name}: from_port must pass");
        // The kernel's skb test run refuses some truncated IP headers before running
        // the program; every frame it accepts must pass.
        match dp.try_to_port(frame) {
            Ok(action) => assert_eq!(action, TC_PASS, "{name}: to_port must pass"),
            Err(_) => refused_by_skb_test_run.push(*name),
        }
        assert_eq!(dp.counter(*reason), 1, "{name}: counted as {}", reason.as_str());
        let parse_failures: u64 = Counter::ALL.iter().filter(|c| c.is_parse_failure()).map(|c| dp.counter(*c)).sum();
        assert_eq!(parse_failures, 1, "{name}: counted under one reason only");
        assert!(dp.flows().is_empty(), "{name}: no flow from a malformed frame");
    }
    assert!(
        refused_by_skb_test_run.iter().all(|n| n.starts_with("ipv4 cut") || n.starts_with("ipv6 cut")),
        "only truncated IP headers may be refused by the skb test run: {refused_by_skb_test_run:?}"
    );
}

/// A frame truncated at every offset never aborts the program.
#[test]
fn truncation_at_every_offset_passes() {
    let mut dp = TestDatapath::load(1024);
    let exts = vec![(0u8, vec![0u8; 6]), (43u8, vec![0u8; 6])];
    let frames = [
        eth(
            MAC_B,
            MAC_A,
            &[(0x8100, 5)],
            0x0800,
            &ipv4_full(A, B, 6, &[1, 1, 1, 1, 1, 1, 1, 0], 0, &tcp(1, 2, TCP_SYN, b"abc")),
        ),
        eth(MAC_B, MAC_A, &[], 0x86dd, &ipv6_ext(v6(1), v6(2), &exts, 6, &tcp(1, 2, TCP_SYN, b"abc"))),
        eth(MAC_B, MAC_A, &[], 0x0800, &ipv4(A, B, 1, &icmp_echo(8, 1, 1))),
        arp(0x8035, 3, MAC_A, A, A),
    ];
    let mut runs = 0u64;
    for f in &frames {
        // Shorter than an Ethernet header: the kernel refuses to run the program on it
        // (as tun and veth refuse to deliver it), so it never reaches the parser.
        for cut in 1..14 {
            assert!(dp.try_from_port(&f[..cut]).is_err(), "cut at {cut} refused by the kernel");
        }
        for cut in 14..=f.len() {
            assert_eq!(dp.from_port(&f[..cut]), XDP_PASS, "cut at {cut}");
            if let Ok(action) = dp.try_to_port(&f[..cut]) {
                assert_eq!(action, TC_PASS, "cut at {cut}");
            }
            runs += 1;
        }
    }
    // Every run returned, and every frame was counted as seen.
    assert_eq!(dp.counter(Counter::Packets), runs);
}

#[test]
fn rarp_and_arp_are_counted() {
    let mut dp = TestDatapath::load(64);
    assert_eq!(dp.from_port(&arp(0x8035, 3, MAC_A, [0; 4], [0; 4])), XDP_PASS);
    assert_eq!(dp.from_port(&arp(0x0806, 2, MAC_A, A, A)), XDP_PASS);
    assert_eq!(dp.counter(Counter::Rarp), 1);
    assert_eq!(dp.counter(Counter::Arp), 1);
}
