//! Header parsing: Ethernet, up to two VLAN tags (802.1ad, 802.1Q), ARP/RARP, IPv4
//! (options, fragments), IPv6 (a bounded walk over extension headers), TCP, UDP, ICMP
//! and ICMPv6. A frame that cannot be parsed down to a flow yields the [`Counter`]
//! that says why; the caller passes it and counts it, never aborts.

use backplane_common::{
    flow::{FAMILY_IPV4, FAMILY_IPV6},
    reason::Counter,
};

use crate::frame::{Frame, load_be16, load_pair};

pub const ETH_HDR_LEN: usize = 14;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_RARP: u16 = 0x8035;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

pub const ICMPV6_ROUTER_ADVERT: u8 = 134;
pub const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;
pub const ICMPV6_REDIRECT: u8 = 137;

/// IPv6 extension headers walked before giving up.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;
/// VLAN tags walked (an 802.1ad outer tag and an 802.1Q inner tag).
pub const MAX_VLAN_TAGS: usize = 2;

/// TCP flags that end a flow.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// What a frame carries, as far as the data path needs to know.
pub struct Packet {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Outermost VLAN ID, 0 when untagged.
    pub vlan: u16,
    /// Number of VLAN tags.
    pub vlan_tags: u8,
    pub family: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// Offset of the transport payload (first byte after the L4 header).
    pub payload_offset: u16,
    /// `FRAG_FIRST` for the first fragment of a fragmented datagram.
    pub frag: u8,
    /// Identification of a fragmented datagram (IPv4 16 bits, IPv6 32 bits).
    pub frag_id: u32,
    /// Offset of a later fragment, in 8-byte units.
    pub frag_offset: u16,
}

/// [`Packet::end`]: the frame's destination (else its source).
pub const END_DST: u8 = 1 << 0;
/// With the frame's source: it is the sender of the frame in hand, whose address may set
/// a learning port's zone.
pub const END_SENDS: u8 = 1 << 1;
/// The end's port has sent (a stored flow's end): it is not a port that never spoke.
pub const END_SPOKE: u8 = 1 << 2;

impl Packet {
    /// The flow this packet belongs to, and its direction in the flow's key.
    #[inline(always)]
    pub fn flow_key(&self) -> (backplane_common::FlowKey, u8) {
        backplane_common::FlowKey::canonical(
            &self.src,
            self.sport,
            &self.dst,
            self.dport,
            self.vlan,
            self.proto,
            self.family,
        )
    }

    /// Family, MAC and address of one end of the frame ([`END_DST`] or the source).
    #[inline(always)]
    pub fn end(&self, end: u8) -> (u8, &[u8; 6], &[u8; 16]) {
        if end & END_DST != 0 {
            (self.family, &self.dst_mac, &self.dst)
        } else {
            (self.family, &self.src_mac, &self.src)
        }
    }
}

/// One program run's working memory, in the per-CPU `SCRATCH` map.
pub struct Scratch {
    pub packet: Packet,
    /// The `PORTS` entry of the port this CPU saw last, under `ports_epoch`.
    pub port: PortCache,
    /// A new flow's value, built before it is inserted into `FLOWS`.
    pub value: backplane_common::FlowValue,
    /// A `PORT_ALLOWED` key being looked up.
    pub allowed: backplane_common::config::AllowedKey,
    /// An `ADDR_OWNERS` or `LEARNED_ADDRS` key being looked up.
    pub owner: backplane_common::policy::OwnerKey,
    /// A `ZONE_CIDRS` key being looked up.
    pub cidr: aya_ebpf::maps::lpm_trie::Key<backplane_common::policy::AddrKey>,
}

/// One CPU's copy of a `PORTS` entry, valid while `DatapathConfig::ports_epoch` is
/// `epoch` (never for epoch 0).
pub struct PortCache {
    pub ifindex: u32,
    pub epoch: u32,
    /// Whether the port has an entry (`info` is it).
    pub present: bool,
    pub info: backplane_common::PortInfo,
}

/// `Packet::frag`: the first fragment of a fragmented datagram (it has the ports).
pub const FRAG_FIRST: u8 = 1;

/// An ARP or RARP frame: who announces which MAC (and, for ARP, which IPv4 address).
pub struct Announce {
    pub rarp: bool,
    /// An ARP whose sender and target addresses are equal: the sender announces its own
    /// address (a gratuitous ARP, as a guest sends after it moved or booted).
    pub gratuitous: bool,
    pub sender_mac: [u8; 6],
    pub sender_ip: [u8; 4],
    pub vlan: u16,
}

pub enum Parsed {
    /// `packet` holds a flow's packet.
    Flow,
    /// A later fragment: `packet` has addresses, protocol and `frag_id`, not the ports.
    Fragment,
    /// IPv6 neighbour discovery or multicast listener control (ICMPv6 130-137, 143):
    /// link-local plumbing like ARP, not a flow. `packet.src` holds the address the
    /// sender claims: a neighbour advertisement's target address, else the source
    /// address. For an unsolicited advertisement (to ff02::1) `announce` is set.
    Neighbor {
        icmp_type: u8,
        announce: bool,
    },
    Announce(Announce),
    /// Not a flow: the counter says why (not IP, truncated, ...).
    Skip(Counter),
}

impl Packet {
    #[inline(always)]
    pub const fn new() -> Self {
        Self {
            src_mac: [0; 6],
            dst_mac: [0; 6],
            vlan: 0,
            vlan_tags: 0,
            family: 0,
            proto: 0,
            tcp_flags: 0,
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            payload_offset: 0,
            frag: 0,
            frag_id: 0,
            frag_offset: 0,
        }
    }
}

/// Parses a frame into `packet`. Never fails: what cannot be parsed is
/// `Parsed::Skip(reason)`.
///
/// Loads are checked one at a time, each followed by its early return: evaluating
/// several fallible loads before testing them lets LLVM compute on a register that,
/// on the failing path, still holds a packet pointer, which the verifier rejects.
#[inline(always)]
pub fn parse<F: Frame>(frame: &F, packet: &mut Packet) -> Parsed {
    match parse_frame(frame, packet) {
        Ok(parsed) => parsed,
        Err(reason) => Parsed::Skip(reason),
    }
}

#[inline(always)]
fn parse_frame<F: Frame>(frame: &F, packet: &mut Packet) -> Result<Parsed, Counter> {
    packet.dst_mac = frame.load::<[u8; 6]>(0).ok_or(Counter::ParseTruncatedEthernet)?;
    packet.src_mac = frame.load::<[u8; 6]>(6).ok_or(Counter::ParseTruncatedEthernet)?;
    let mut ethertype = load_be16(frame, 12).ok_or(Counter::ParseTruncatedEthernet)?;
    let mut offset = ETH_HDR_LEN;
    if let Some(tci) = frame.offloaded_vlan() {
        packet.vlan = tci & 0x0fff;
        packet.vlan_tags = 1;
    }
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD || usize::from(packet.vlan_tags) >= MAX_VLAN_TAGS {
            break;
        }
        let tci = load_be16(frame, offset).ok_or(Counter::ParseTruncatedVlan)?;
        ethertype = load_be16(frame, offset + 2).ok_or(Counter::ParseTruncatedVlan)?;
        if packet.vlan_tags == 0 {
            packet.vlan = tci & 0x0fff;
        }
        packet.vlan_tags += 1;
        offset += 4;
    }
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(frame, offset, packet),
        ETH_P_IPV6 => parse_ipv6(frame, offset, packet),
        ETH_P_ARP | ETH_P_RARP => parse_arp(frame, offset, ethertype == ETH_P_RARP, packet.vlan),
        ETH_P_8021Q | ETH_P_8021AD => Err(Counter::ParseVlanTooDeep),
        _ => Err(Counter::ParseNotIp),
    }
}

/// ARP/RARP for Ethernet + IPv4: htype(2) ptype(2) hlen(1) plen(1) oper(2) sha(6) spa(4) ...
#[inline(always)]
fn parse_arp<F: Frame>(frame: &F, offset: usize, rarp: bool, vlan: u16) -> Result<Parsed, Counter> {
    let sender_mac = frame.load::<[u8; 6]>(offset + 8).ok_or(Counter::ParseTruncatedArp)?;
    let sender_ip = frame.load::<u32>(offset + 14).ok_or(Counter::ParseTruncatedArp)?.to_ne_bytes();
    let target_ip = frame.load::<u32>(offset + 24).ok_or(Counter::ParseTruncatedArp)?.to_ne_bytes();
    let gratuitous = !rarp && sender_ip == target_ip && sender_ip != [0; 4];
    Ok(Parsed::Announce(Announce { rarp, gratuitous, sender_mac, sender_ip, vlan }))
}

#[inline(always)]
fn parse_ipv4<F: Frame>(frame: &F, offset: usize, packet: &mut Packet) -> Result<Parsed, Counter> {
    // version/IHL(1) tos(1) total_len(2) id(2) flags/frag(2) ttl(1) proto(1) csum(2) src(4) dst(4)
    let [vihl, _tos] = load_pair(frame, offset).ok_or(Counter::ParseTruncatedIpv4)?;
    let id = load_be16(frame, offset + 4).ok_or(Counter::ParseTruncatedIpv4)?;
    let frag = load_be16(frame, offset + 6).ok_or(Counter::ParseTruncatedIpv4)?;
    let [_ttl, proto] = load_pair(frame, offset + 8).ok_or(Counter::ParseTruncatedIpv4)?;
    let src = frame.load::<u32>(offset + 12).ok_or(Counter::ParseTruncatedIpv4)?.to_ne_bytes();
    let dst = frame.load::<u32>(offset + 16).ok_or(Counter::ParseTruncatedIpv4)?.to_ne_bytes();
    if vihl >> 4 != 4 {
        return Err(Counter::ParseBadIpVersion);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(Counter::ParseBadIpv4Ihl);
    }
    let l4 = offset + ihl;
    if l4 > frame.frame_len() as usize {
        return Err(Counter::ParseBadIpv4Ihl);
    }
    packet.family = FAMILY_IPV4;
    packet.proto = proto;
    packet.src = [src[0], src[1], src[2], src[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    packet.dst = [dst[0], dst[1], dst[2], dst[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    packet.frag_id = u32::from(id);
    packet.frag_offset = frag & 0x1fff;
    if frag & 0x1fff != 0 {
        // A later fragment carries no transport header.
        return Ok(Parsed::Fragment);
    }
    if frag & 0x2000 != 0 {
        packet.frag = FRAG_FIRST;
    }
    parse_l4(frame, l4, packet)
}

#[inline(always)]
fn parse_ipv6<F: Frame>(frame: &F, offset: usize, packet: &mut Packet) -> Result<Parsed, Counter> {
    // version(4 bits) ... payload_len(2) next_header(1) hop_limit(1) src(16) dst(16)
    let [ver, _] = load_pair(frame, offset).ok_or(Counter::ParseTruncatedIpv6)?;
    let [mut next, _hop_limit] = load_pair(frame, offset + 6).ok_or(Counter::ParseTruncatedIpv6)?;
    packet.src = frame.load::<[u8; 16]>(offset + 8).ok_or(Counter::ParseTruncatedIpv6)?;
    packet.dst = frame.load::<[u8; 16]>(offset + 24).ok_or(Counter::ParseTruncatedIpv6)?;
    if ver >> 4 != 6 {
        return Err(Counter::ParseBadIpVersion);
    }
    packet.family = FAMILY_IPV6;
    let mut off = offset + 40;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let [n, len] = load_pair(frame, off).ok_or(Counter::ParseBadIpv6Ext)?;
                next = n;
                off += (len as usize + 1) * 8;
            }
            // Fragment header: 8 bytes; a non-first fragment has no transport header.
            44 => {
                let [n, _] = load_pair(frame, off).ok_or(Counter::ParseBadIpv6Ext)?;
                let frag = load_be16(frame, off + 2).ok_or(Counter::ParseBadIpv6Ext)?;
                let id = frame.load::<[u8; 4]>(off + 4).ok_or(Counter::ParseBadIpv6Ext)?;
                packet.frag_id = u32::from_be_bytes(id);
                packet.frag_offset = frag >> 3;
                if frag & 0xfff8 != 0 {
                    packet.proto = n;
                    return Ok(Parsed::Fragment);
                }
                if frag & 1 != 0 {
                    packet.frag = FRAG_FIRST;
                }
                next = n;
                off += 8;
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let [n, len] = load_pair(frame, off).ok_or(Counter::ParseBadIpv6Ext)?;
                next = n;
                off += (len as usize + 2) * 4;
            }
            _ => break,
        }
        if off > crate::frame::MAX_HEADER_OFFSET {
            return Err(Counter::ParseBadIpv6Ext);
        }
    }
    if matches!(next, 0 | 43 | 44 | 51 | 60) {
        return Err(Counter::ParseIpv6ExtTooDeep);
    }
    packet.proto = next;
    parse_l4(frame, off, packet)
}

#[inline(always)]
fn parse_l4<F: Frame>(frame: &F, l4: usize, packet: &mut Packet) -> Result<Parsed, Counter> {
    match packet.proto {
        IPPROTO_TCP => {
            packet.sport = load_be16(frame, l4).ok_or(Counter::ParseTruncatedL4)?;
            packet.dport = load_be16(frame, l4 + 2).ok_or(Counter::ParseTruncatedL4)?;
            let [doff, flags] = load_pair(frame, l4 + 12).ok_or(Counter::ParseTruncatedL4)?;
            packet.tcp_flags = flags;
            packet.payload_offset = (l4 + ((doff >> 4) as usize) * 4) as u16;
        }
        // UDP and SCTP both start with source and destination ports.
        IPPROTO_UDP | IPPROTO_SCTP => {
            packet.sport = load_be16(frame, l4).ok_or(Counter::ParseTruncatedL4)?;
            packet.dport = load_be16(frame, l4 + 2).ok_or(Counter::ParseTruncatedL4)?;
            packet.payload_offset = (l4 + if packet.proto == IPPROTO_UDP { 8 } else { 12 }) as u16;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let [icmp_type, _code] = load_pair(frame, l4).ok_or(Counter::ParseTruncatedL4)?;
            if packet.proto == IPPROTO_ICMPV6 && matches!(icmp_type, 130..=137 | 143) {
                let all_nodes = packet.dst[0] == 0xff
                    && packet.dst[1] == 0x02
                    && packet.dst[15] == 1
                    && packet.dst[2..15] == [0; 13];
                let announce = icmp_type == ICMPV6_NEIGHBOR_ADVERT && all_nodes;
                if icmp_type == ICMPV6_NEIGHBOR_ADVERT {
                    packet.src = frame.load::<[u8; 16]>(l4 + 8).ok_or(Counter::ParseTruncatedL4)?;
                }
                return Ok(Parsed::Neighbor { icmp_type, announce });
            }
            // Echo request/reply (ICMP 8/0, ICMPv6 128/129): the identifier names the flow.
            if matches!((packet.proto, icmp_type), (IPPROTO_ICMP, 0 | 8) | (IPPROTO_ICMPV6, 128 | 129)) {
                let id = load_be16(frame, l4 + 4).ok_or(Counter::ParseTruncatedL4)?;
                packet.sport = id;
                packet.dport = id;
            }
            packet.payload_offset = (l4 + 8) as u16;
        }
        _ => packet.payload_offset = l4 as u16,
    }
    Ok(Parsed::Flow)
}
