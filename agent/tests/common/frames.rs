//! Builds Ethernet frames byte by byte, well-formed or deliberately broken, for
//! `BPF_PROG_TEST_RUN` and for raw sends in the lab.
#![allow(dead_code, reason = "each test binary uses a different part")]
#![allow(
    clippy::cast_possible_truncation,
    reason = "header fields are written at their wire width; a test frame that overflows one is a broken frame on purpose"
)]

pub const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0a];
pub const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0b];

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Ethernet header with optional VLAN tags `(tpid, vid)`, outermost first.
pub fn eth(dst: [u8; 6], src: [u8; 6], vlans: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for &(tpid, vid) in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from(chunk[0]) << 8 };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 header (with `options`, padded to 4 bytes) followed by `payload`.
/// `frag` is the flags+fragment-offset field.
pub fn ipv4_full(src: [u8; 4], dst: [u8; 4], proto: u8, options: &[u8], frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let ihl = (20 + opts.len()) / 4;
    let total = 20 + opts.len() + payload.len();
    let mut h = vec![0u8; 20];
    h[0] = 0x40 | ihl as u8;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    h.extend_from_slice(&opts);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_full(src, dst, proto, &[], 0, payload)
}

/// IPv6 header followed by extension headers `(type, body)` and `payload` with next
/// header `proto`. Each extension body is padded so that its length fits the type.
pub fn ipv6_ext(src: [u8; 16], dst: [u8; 16], exts: &[(u8, Vec<u8>)], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, (kind, body)) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(proto, |e| e.0);
        let mut e = vec![next, 0];
        e.extend_from_slice(body);
        match kind {
            44 => e.resize(8, 0),
            51 => {
                while !e.len().is_multiple_of(4) || e.len() < 12 {
                    e.push(0);
                }
                e[1] = (e.len() / 4 - 2) as u8;
            }
            _ => {
                while !e.len().is_multiple_of(8) {
                    e.push(0);
                }
                e[1] = (e.len() / 8 - 1) as u8;
            }
        }
        chain.extend_from_slice(&e);
    }
    let first = exts.first().map_or(proto, |e| e.0);
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&((chain.len() + payload.len()) as u16).to_be_bytes());
    h[6] = first;
    h[7] = 64;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&dst);
    h.extend_from_slice(&chain);
    h.extend_from_slice(payload);
    h
}

pub fn ipv6(src: [u8; 16], dst: [u8; 16], proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv6_ext(src, dst, &[], proto, payload)
}

/// TCP header (no options, checksum left zero: the data path does not verify it).
pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&65535u16.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// ICMP or `ICMPv6` echo (`kind` 8/0 for ICMP, 128/129 for `ICMPv6`).
pub fn icmp_echo(kind: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut h = vec![kind, 0, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(&[0xab; 16]);
    h
}

/// A complete IPv4 TCP frame from `MAC_A` to `MAC_B`.
pub fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    eth(MAC_B, MAC_A, &[], 0x0800, &ipv4(src, dst, 6, &tcp(sport, dport, flags, &[])))
}

/// ARP (oper 1 request, 2 reply) or RARP (oper 3) frame for Ethernet/IPv4.
pub fn arp(ethertype: u16, oper: u16, sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4];
    a.extend_from_slice(&oper.to_be_bytes());
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender_ip);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target_ip);
    eth([0xff; 6], sender_mac, &[], ethertype, &a)
}

pub fn v6(last: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[1] = 0x00;
    a[15] = last;
    a
}

/// Replaces every occurrence of the MAC `from` in `frame` (Ethernet header, ARP body) by `to`.
pub fn replace_mac(frame: &mut [u8], from: [u8; 6], to: [u8; 6]) {
    let mut i = 0;
    while i + 6 <= frame.len() {
        if frame[i..i + 6] == from {
            frame[i..i + 6].copy_from_slice(&to);
            i += 6;
        } else {
            i += 1;
        }
    }
}
