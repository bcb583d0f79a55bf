//! A corpus of malformed and adversarial frames, made by a deterministic generator (a
//! seed reproduces it): every prefix of well-formed frames, VLAN stacks, IPv4 options
//! and fragments (overlapping, tiny, rewriting ports), IPv6 extension header chains,
//! ARP and RARP that claim another endpoint's MAC or address, random bytes and random
//! mutations of good frames.
//!
//! Frames come in sequences: the frames of one sequence belong together (the fragments
//! of one datagram), and a test clears the data path's tables between sequences.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a test generator: every value is drawn below the bound of the type it is cast to"
)]

use super::frames::{MAC_A, MAC_B, TCP_ACK, TCP_SYN, arp, eth, icmp_echo, ipv4, ipv4_full, ipv6, ipv6_ext, tcp, udp};

/// splitmix64: small, fast and deterministic.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn byte(&mut self) -> u8 {
        (self.next() & 0xff) as u8
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// One sequence of the corpus.
#[derive(Clone, Debug)]
pub struct Hostile {
    /// What it is, for messages: `truncated tcp4 at 37`, `ipv6 chain [0, 43, 60]`...
    pub label: String,
    pub frames: Vec<Vec<u8>>,
    /// Frames that claim the MAC of the victim endpoint (as Ethernet source or as the
    /// sender of an ARP/RARP): a data path that binds the victim to another port drops
    /// them while enforcing.
    pub spoofs_victim: bool,
    /// Frames that send from (or claim, in ARP or neighbour discovery) the victim's IP
    /// address with the sender's own MAC: a data path that gives the victim's addresses
    /// to another port drops them while enforcing.
    pub spoofs_victim_address: bool,
}

impl Hostile {
    fn one(label: impl Into<String>, frame: Vec<u8>) -> Self {
        Self { label: label.into(), frames: vec![frame], spoofs_victim: false, spoofs_victim_address: false }
    }

    fn spoofing_mac(label: &str, frame: Vec<u8>) -> Self {
        Self { spoofs_victim: true, ..Self::one(label, frame) }
    }

    fn spoofing_address(label: &str, frame: Vec<u8>) -> Self {
        Self { spoofs_victim_address: true, ..Self::one(label, frame) }
    }
}

/// The MAC of the endpoint that spoofed frames pretend to be.
pub const VICTIM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x76];
/// The victim's IPv4 address (in zone `a`); its IPv6 address is `a6(76)`.
pub const VICTIM_IP4: [u8; 4] = [10, 1, 0, 76];
/// The last byte of the victim's IPv6 address `a6(VICTIM_IP6_LAST)`.
pub const VICTIM_IP6_LAST: u8 = 76;

/// Addresses of the corpus: zone `a` is 10.1.0.0/16 (`fd00:1::/32`), zone `b` 10.2.0.0/16
/// (`fd00:2::/32`); anything else is `world`.
pub const A4: [u8; 4] = [10, 1, 0, 1];
pub const B4: [u8; 4] = [10, 2, 0, 1];
pub const WORLD4: [u8; 4] = [192, 0, 2, 7];

pub fn a6(last: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&[0xfd, 0x00, 0x00, 0x01]);
    a[15] = last;
    a
}

pub fn b6(last: u8) -> [u8; 16] {
    let mut a = a6(last);
    a[3] = 2;
    a
}

/// A rule set for the corpus: `a` may reach `b` on tcp/80, udp/53 and ICMP echo; the
/// rest between zones is denied.
pub const RULES: &str = "
zones:
  a:
    members: [ { cidr: 10.1.0.0/16 }, { cidr: \"fd00:1::/32\" } ]
  b:
    members: [ { cidr: 10.2.0.0/16 }, { cidr: \"fd00:2::/32\" } ]
    intra_zone: deny
policies:
  - name: a-to-b
    from: a
    to: b
    allow: [ { proto: tcp, ports: [80] }, { proto: udp, ports: [53] }, { proto: icmp }, { proto: icmpv6 } ]
";

fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    eth(MAC_B, MAC_A, &[], 0x0800, &ipv4(src, dst, proto, l4))
}

fn v6(src: [u8; 16], dst: [u8; 16], proto: u8, l4: &[u8]) -> Vec<u8> {
    eth(MAC_B, MAC_A, &[], 0x86dd, &ipv6(src, dst, proto, l4))
}

/// Well-formed frames whose every prefix is tried.
fn good_frames() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("tcp4", v4(A4, B4, 6, &tcp(40000, 80, TCP_SYN, b"GET / HTTP/1.1\r\n"))),
        ("udp4", v4(A4, B4, 17, &udp(40001, 53, &[0x12; 20]))),
        ("icmp4", v4(A4, B4, 1, &icmp_echo(8, 77, 1))),
        ("tcp6", v6(a6(1), b6(1), 6, &tcp(40002, 80, TCP_SYN, &[]))),
        ("icmp6", v6(a6(1), b6(1), 58, &icmp_echo(128, 78, 1))),
        (
            "tcp6 ext",
            eth(
                MAC_B,
                MAC_A,
                &[],
                0x86dd,
                &ipv6_ext(
                    a6(2),
                    b6(2),
                    &[(0, vec![1, 0, 0, 0, 0, 0]), (60, vec![1, 4, 0, 0, 0, 0])],
                    6,
                    &tcp(40003, 80, TCP_SYN, &[]),
                ),
            ),
        ),
        (
            "qinq tcp4",
            eth(MAC_B, MAC_A, &[(0x88a8, 10), (0x8100, 20)], 0x0800, &ipv4(A4, B4, 6, &tcp(40004, 80, TCP_ACK, &[]))),
        ),
        (
            "ipv4 options",
            eth(
                MAC_B,
                MAC_A,
                &[],
                0x0800,
                &ipv4_full(A4, B4, 17, &[0x94, 0x04, 0, 0, 1, 1, 1, 0], 0, &udp(40005, 53, b"q")),
            ),
        ),
        ("arp", arp(0x0806, 1, MAC_A, A4, B4)),
        ("rarp", arp(0x8035, 3, MAC_A, [0; 4], [0; 4])),
    ]
}

/// Every prefix (including the empty frame) of each well-formed frame.
fn truncations(out: &mut Vec<Hostile>) {
    for (name, frame) in good_frames() {
        for len in 0..frame.len() {
            out.push(Hostile::one(format!("truncated {name} at {len}"), frame[..len].to_vec()));
        }
    }
}

fn vlan_stacks(rng: &mut Rng, out: &mut Vec<Hostile>) {
    for depth in 0..=6 {
        for _ in 0..4 {
            let tags: Vec<(u16, u16)> =
                (0..depth).map(|_| (rng.pick(&[0x8100, 0x88a8, 0x9100]), (rng.below(4096)) as u16)).collect();
            let ethertype = rng.pick(&[0x0800, 0x86dd, 0x0806, 0x8100, 0x1234]);
            let payload = match ethertype {
                0x0800 => ipv4(A4, B4, 6, &tcp(41000 + depth as u16, 80, TCP_SYN, &[])),
                0x86dd => ipv6(a6(3), b6(3), 17, &udp(41000, 53, b"x")),
                _ => rng.bytes(28),
            };
            out.push(Hostile::one(
                format!("vlan stack {tags:?} then {ethertype:#06x}"),
                eth(MAC_B, MAC_A, &tags, ethertype, &payload),
            ));
        }
    }
}

/// IPv4 headers with options of every length, broken lengths and checksums.
fn ipv4_headers(rng: &mut Rng, out: &mut Vec<Hostile>) {
    for words in 0..=10 {
        let options = rng.bytes(words * 4);
        let frame = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4_full(A4, B4, 6, &options, 0, &tcp(42000, 80, TCP_SYN, &[])));
        out.push(Hostile::one(format!("ipv4 with {} option bytes", words * 4), frame));
    }
    let base = ipv4(A4, B4, 6, &tcp(42001, 80, TCP_SYN, &[]));
    for ihl in [0u8, 1, 4, 5, 6, 15] {
        let mut h = base.clone();
        h[0] = 0x40 | ihl;
        out.push(Hostile::one(format!("ipv4 ihl {ihl}"), eth(MAC_B, MAC_A, &[], 0x0800, &h)));
    }
    for version in [0u8, 5, 6, 15] {
        let mut h = base.clone();
        h[0] = (version << 4) | 5;
        out.push(Hostile::one(format!("ipv4 version {version}"), eth(MAC_B, MAC_A, &[], 0x0800, &h)));
    }
    for total in [0u16, 1, 19, 20, 39, 41, 1500, 65535] {
        let mut h = base.clone();
        h[2..4].copy_from_slice(&total.to_be_bytes());
        out.push(Hostile::one(format!("ipv4 total length {total}"), eth(MAC_B, MAC_A, &[], 0x0800, &h)));
    }
    for proto in [0u8, 4, 41, 47, 50, 51, 132, 255] {
        let len = rng.below(24) as usize;
        let l4 = rng.bytes(len);
        out.push(Hostile::one(format!("ipv4 proto {proto}"), v4(A4, B4, proto, &l4)));
    }
    // TCP data offsets that point before or past the end.
    for offset in [0u8, 1, 4, 15] {
        let mut t = tcp(42002, 80, TCP_SYN, &[]);
        t[12] = offset << 4;
        out.push(Hostile::one(format!("tcp data offset {offset}"), v4(A4, B4, 6, &t)));
    }
}

/// Fragments: in order, out of order, tiny, overlapping the TCP header, rewriting ports.
fn fragments(rng: &mut Rng, out: &mut Vec<Hostile>) {
    const MF: u16 = 0x2000;
    let id = |h: &mut Vec<u8>, v: u16| h[4..6].copy_from_slice(&v.to_be_bytes());
    let frag = |src: [u8; 4], proto: u8, flags_offset: u16, ident: u16, payload: &[u8]| {
        let mut h = ipv4_full(src, B4, proto, &[], flags_offset, payload);
        id(&mut h, ident);
        // The checksum covers the id; the data path does not check it.
        eth(MAC_B, MAC_A, &[], 0x0800, &h)
    };
    for (n, proto) in [(0u16, 17u8), (1, 6)] {
        let l4 = if proto == 6 { tcp(43000, 80, TCP_SYN, &[0x55; 16]) } else { udp(43000, 53, &[0x55; 24]) };
        let ident = 0x4000 + n;
        let first = frag(A4, proto, MF, ident, &l4[..16]);
        let second = frag(A4, proto, 2, ident, &l4[16..]);
        out.push(Hostile {
            label: format!("proto {proto} fragments in order"),
            frames: vec![first.clone(), second.clone()],
            spoofs_victim: false,
            spoofs_victim_address: false,
        });
        out.push(Hostile {
            label: format!("proto {proto} fragments reversed"),
            frames: vec![second.clone(), first.clone()],
            spoofs_victim: false,
            spoofs_victim_address: false,
        });
        out.push(Hostile::one(format!("proto {proto} later fragment alone"), second));
        // A tiny first fragment: 8 bytes, no room for a TCP header's flags.
        out.push(Hostile::one(format!("proto {proto} tiny first fragment"), frag(A4, proto, MF, ident + 10, &l4[..8])));
        // Offset 8 bytes: rewrites the TCP header's flags after the first was judged.
        let overlap = frag(A4, proto, 1 | MF, ident, &rng.bytes(16));
        out.push(Hostile {
            label: format!("proto {proto} fragment overlapping the header"),
            frames: vec![first.clone(), overlap],
            spoofs_victim: false,
            spoofs_victim_address: false,
        });
        // A second "first fragment" of the same datagram with other ports.
        let other = if proto == 6 { tcp(43001, 22, TCP_SYN, &[0; 16]) } else { udp(43001, 5353, &[0; 24]) };
        let refirst = frag(A4, proto, MF, ident, &other[..16]);
        out.push(Hostile {
            label: format!("proto {proto} first fragment twice"),
            frames: vec![first.clone(), refirst],
            spoofs_victim: false,
            spoofs_victim_address: false,
        });
        // From a denied direction (b -> a), its later fragment must not pass alone.
        let denied_first = frag(B4, proto, MF, ident + 20, &l4[..16]);
        out.push(Hostile::one(format!("proto {proto} first fragment from b"), denied_first));
    }
    // Random fragment fields.
    for i in 0..40u16 {
        let offset =
            (rng.below(0x2000) as u16) | if rng.chance(50) { MF } else { 0 } | if rng.chance(10) { 0x4000 } else { 0 };
        let proto = rng.pick(&[6u8, 17, 1, 47]);
        let len = rng.below(40) as usize;
        out.push(Hostile::one(
            format!("random fragment {i} ({offset:#06x})"),
            frag(A4, proto, offset, 0x5000 + i, &rng.bytes(len)),
        ));
    }
}

/// IPv6 extension header chains: long, unknown, overrunning, ending nowhere, fragments.
fn ipv6_chains(rng: &mut Rng, out: &mut Vec<Hostile>) {
    const KINDS: [u8; 6] = [0, 43, 60, 44, 51, 135];
    for length in 0..=10 {
        for _ in 0..3 {
            let chain: Vec<(u8, Vec<u8>)> = (0..length)
                .map(|_| {
                    let kind = rng.pick(&KINDS);
                    let len = 6 + 8 * rng.below(3) as usize;
                    let body = if kind == 44 { vec![0, 0, 0, 0, 0, 0] } else { rng.bytes(len) };
                    (kind, body)
                })
                .collect();
            let kinds: Vec<u8> = chain.iter().map(|(k, _)| *k).collect();
            let proto = rng.pick(&[6u8, 17, 58, 59, 41]);
            let l4 = match proto {
                6 => tcp(44000, 80, TCP_SYN, &[]),
                17 => udp(44000, 53, b"x"),
                58 => icmp_echo(128, 5, 1),
                _ => rng.bytes(8),
            };
            let frame = eth(MAC_B, MAC_A, &[], 0x86dd, &ipv6_ext(a6(4), b6(4), &chain, proto, &l4));
            out.push(Hostile::one(format!("ipv6 chain {kinds:?} then {proto}"), frame));
        }
    }
    // A header whose length runs past the frame.
    let mut h = ipv6_ext(a6(5), b6(5), &[(60, vec![0; 6])], 6, &tcp(44001, 80, TCP_SYN, &[]));
    h[41] = 200;
    out.push(Hostile::one("ipv6 ext header longer than the frame", eth(MAC_B, MAC_A, &[], 0x86dd, &h)));
    // Payload length lies.
    for plen in [0u16, 1, 7, 65535] {
        let mut h = ipv6(a6(6), b6(6), 6, &tcp(44002, 80, TCP_SYN, &[]));
        h[4..6].copy_from_slice(&plen.to_be_bytes());
        out.push(Hostile::one(format!("ipv6 payload length {plen}"), eth(MAC_B, MAC_A, &[], 0x86dd, &h)));
    }
    // Router advertisement and redirect from a VM.
    for icmp_type in [134u8, 137, 135, 136] {
        let mut body = vec![icmp_type, 0, 0, 0];
        body.extend(rng.bytes(20));
        let mut frame = v6(a6(7), b6(7), 58, &body);
        frame[21] = 255; // hop limit, as neighbour discovery requires
        out.push(Hostile::one(format!("icmpv6 type {icmp_type}"), frame));
    }
}

/// ARP and RARP, honest and lying: the victim's MAC as Ethernet source or as sender;
/// our own MAC with the victim's address (in ARP, neighbour discovery, IPv4 and IPv6).
fn arp_spoofing(rng: &mut Rng, out: &mut Vec<Hostile>) {
    let victim_ip = VICTIM_IP4;
    let victim_ip6 = a6(VICTIM_IP6_LAST);
    out.push(Hostile::one("gratuitous arp of our own", arp(0x0806, 1, MAC_A, A4, A4)));
    out.push(Hostile::spoofing_mac("arp claiming the victim's mac", arp(0x0806, 2, VICTIM_MAC, victim_ip, B4)));
    out.push(Hostile::spoofing_mac(
        "gratuitous arp with the victim's mac",
        arp(0x0806, 1, VICTIM_MAC, victim_ip, victim_ip),
    ));
    out.push(Hostile::spoofing_mac("rarp with the victim's mac", arp(0x8035, 3, VICTIM_MAC, [0; 4], [0; 4])));
    // Our Ethernet source, the victim as ARP sender.
    let mut lying = arp(0x0806, 2, VICTIM_MAC, victim_ip, B4);
    lying[6..12].copy_from_slice(&MAC_A);
    out.push(Hostile::spoofing_mac("arp sender is the victim, ethernet source is ours", lying));
    // The victim's MAC as Ethernet source of ordinary traffic.
    let mut tcp_frame = v4(victim_ip, B4, 6, &tcp(45000, 80, TCP_SYN, &[]));
    tcp_frame[6..12].copy_from_slice(&VICTIM_MAC);
    out.push(Hostile::spoofing_mac("tcp from the victim's mac", tcp_frame));
    // Our MAC, the victim's address: ARP cache poisoning and source address spoofing.
    out.push(Hostile::spoofing_address(
        "arp reply claiming the victim's address",
        arp(0x0806, 2, MAC_A, victim_ip, B4),
    ));
    out.push(Hostile::spoofing_address(
        "gratuitous arp of the victim's address",
        arp(0x0806, 1, MAC_A, victim_ip, victim_ip),
    ));
    out.push(Hostile::spoofing_address("arp request from the victim's address", arp(0x0806, 1, MAC_A, victim_ip, B4)));
    out.push(Hostile::spoofing_address(
        "tcp from the victim's address",
        v4(victim_ip, B4, 6, &tcp(45001, 80, TCP_SYN, &[])),
    ));
    out.push(Hostile::spoofing_address("udp from the victim's address", v4(victim_ip, B4, 17, &udp(45002, 53, b"q"))));
    out.push(Hostile::spoofing_address("icmp from the victim's address", v4(victim_ip, B4, 1, &icmp_echo(8, 9, 1))));
    out.push(Hostile::spoofing_address(
        "tcp from the victim's ipv6 address",
        v6(victim_ip6, b6(1), 6, &tcp(45003, 80, TCP_SYN, &[])),
    ));
    for (icmp_type, label) in [
        (136u8, "neighbour advertisement of the victim's address"),
        (135, "neighbour solicitation from the victim's address"),
    ] {
        // Type, code, checksum, flags/reserved, target address.
        let mut body = vec![icmp_type, 0, 0, 0, 0x20, 0, 0, 0];
        let (src, target) = if icmp_type == 136 { (a6(7), victim_ip6) } else { (victim_ip6, b6(1)) };
        body.extend_from_slice(&target);
        let all_nodes = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let mut frame = eth(MAC_B, MAC_A, &[], 0x86dd, &ipv6(src, all_nodes, 58, &body));
        frame[21] = 255; // hop limit, as neighbour discovery requires
        out.push(Hostile::spoofing_address(label, frame));
    }
    // Broken ARP: wrong hardware and protocol lengths, truncated bodies.
    for (hlen, plen) in [(0u8, 4u8), (6, 16), (255, 255), (6, 0)] {
        let mut a = arp(0x0806, 1, MAC_A, A4, B4);
        a[18] = hlen;
        a[19] = plen;
        out.push(Hostile::one(format!("arp hlen {hlen} plen {plen}"), a));
    }
    for _ in 0..10 {
        let mut a = arp(rng.pick(&[0x0806u16, 0x8035]), rng.below(6) as u16, MAC_A, A4, B4);
        let i = 14 + rng.below(28) as usize;
        a[i] = rng.byte();
        out.push(Hostile::one("arp with a random byte", a));
    }
}

/// Random frames and random mutations of good ones.
fn noise(rng: &mut Rng, out: &mut Vec<Hostile>, count: usize) {
    let good = good_frames();
    for i in 0..count {
        if rng.chance(40) {
            let len = 14 + rng.below(120) as usize;
            let mut f = rng.bytes(len);
            f[12..14].copy_from_slice(&rng.pick(&[0x0800u16, 0x86dd, 0x0806, 0x8035, 0x8100, 0x88a8]).to_be_bytes());
            out.push(Hostile::one(format!("random frame {i}"), f));
        } else {
            let (name, mut f) = good[rng.below(good.len() as u64) as usize].clone();
            for _ in 0..=rng.below(4) {
                let at = 12 + rng.below((f.len() - 12) as u64) as usize;
                f[at] ^= 1 << rng.below(8);
            }
            if rng.chance(20) {
                f.truncate(14 + rng.below((f.len() - 14) as u64) as usize);
            }
            out.push(Hostile::one(format!("mutated {name} {i}"), f));
        }
    }
}

/// The whole corpus for `seed`, with `noise` random frames.
pub fn corpus(seed: u64, noise_frames: usize) -> Vec<Hostile> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    truncations(&mut out);
    vlan_stacks(&mut rng, &mut out);
    ipv4_headers(&mut rng, &mut out);
    fragments(&mut rng, &mut out);
    ipv6_chains(&mut rng, &mut out);
    arp_spoofing(&mut rng, &mut out);
    noise(&mut rng, &mut out, noise_frames);
    out
}
