//! The flow table's key and value.
//!
//! A flow is bidirectional: its key orders the two (address, port) ends so that both
//! directions of a conversation find the same entry. Counters are kept per *side of
//! the key* (`[lo -> hi, hi -> lo]`) so the per-packet path never swaps fields;
//! `initiator` says which of the two directions started the flow.

/// Direction of a packet relative to its [`FlowKey`]: from the `lo` end to the `hi` end.
pub const DIR_LO_TO_HI: u8 = 0;
/// Direction of a packet relative to its [`FlowKey`]: from the `hi` end to the `lo` end.
pub const DIR_HI_TO_LO: u8 = 1;

/// Address families as stored in [`FlowKey::family`].
pub const FAMILY_IPV4: u8 = 4;
/// See [`FAMILY_IPV4`].
pub const FAMILY_IPV6: u8 = 6;

/// `FlowValue::state` bit: a TCP FIN or RST was seen and the end event sent.
pub const STATE_ENDED: u8 = 1 << 0;
/// `FlowValue::state` bit: the flow was installed by the agent (migration hand-over,
/// restart adoption) rather than created by a packet.
pub const STATE_INSTALLED: u8 = 1 << 1;

/// Bidirectional flow identity: VLAN, both addresses and ports, protocol.
///
/// IPv4 addresses occupy the first four bytes of the 16-byte fields, the rest zero.
/// For ICMP and `ICMPv6` echo, both ports carry the echo identifier; for other ICMP
/// messages both are zero. Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    pub port_lo: u16,
    pub port_hi: u16,
    /// Outermost VLAN ID (0 when untagged).
    pub vlan: u16,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 `ICMPv6`, ...).
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
}

impl FlowKey {
    /// Builds the canonical key for a packet from `src` to `dst` and returns it with the
    /// packet's direction ([`DIR_LO_TO_HI`] or [`DIR_HI_TO_LO`]).
    #[inline(always)]
    #[must_use]
    pub fn canonical(
        src: &[u8; 16],
        sport: u16,
        dst: &[u8; 16],
        dport: u16,
        vlan: u16,
        proto: u8,
        family: u8,
    ) -> (Self, u8) {
        let src_first = match cmp_addr(src, dst) {
            core::cmp::Ordering::Less => true,
            core::cmp::Ordering::Greater => false,
            core::cmp::Ordering::Equal => sport <= dport,
        };
        if src_first {
            (Self { addr_lo: *src, addr_hi: *dst, port_lo: sport, port_hi: dport, vlan, proto, family }, DIR_LO_TO_HI)
        } else {
            (Self { addr_lo: *dst, addr_hi: *src, port_lo: dport, port_hi: sport, vlan, proto, family }, DIR_HI_TO_LO)
        }
    }

    /// The (address, port) that sends in direction `dir`.
    #[must_use]
    pub fn sender(&self, dir: u8) -> (&[u8; 16], u16) {
        if dir == DIR_LO_TO_HI { (&self.addr_lo, self.port_lo) } else { (&self.addr_hi, self.port_hi) }
    }

    /// The (address, port) that receives in direction `dir`.
    #[must_use]
    pub fn receiver(&self, dir: u8) -> (&[u8; 16], u16) {
        self.sender(dir ^ 1)
    }
}

/// Compares two addresses as big-endian numbers, in a form the verifier accepts
/// (a fixed, unrolled number of steps).
#[inline(always)]
#[allow(clippy::comparison_chain, reason = "two compares of u64 halves: what the BPF verifier reads best")]
fn cmp_addr(a: &[u8; 16], b: &[u8; 16]) -> core::cmp::Ordering {
    let a_hi = u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let b_hi = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    if a_hi != b_hi {
        return if a_hi < b_hi { core::cmp::Ordering::Less } else { core::cmp::Ordering::Greater };
    }
    let a_lo = u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    let b_lo = u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    if a_lo < b_lo {
        core::cmp::Ordering::Less
    } else if a_lo > b_lo {
        core::cmp::Ordering::Greater
    } else {
        core::cmp::Ordering::Equal
    }
}

/// Per-flow state: counters by direction, timestamps, ports, verdict.
///
/// Arrays of two are indexed by direction ([`DIR_LO_TO_HI`], [`DIR_HI_TO_LO`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// `bpf_ktime_get_coarse_ns()` (`CLOCK_MONOTONIC_COARSE`, tick resolution) of the
    /// first and last packet.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Port (ifindex) where frames of each direction entered the switch; 0 if unseen.
    pub ifindex: [u32; 2],
    /// Policy that decided the verdict, or one of the `policy::POLICY_ID_*` defaults.
    pub policy_id: u32,
    /// Rule generation under which the verdict was decided; a packet of a flow whose
    /// generation differs from the one in force is judged again.
    pub generation: u32,
    /// Zone of each end: `[zone of lo, zone of hi]`.
    pub zone: [u16; 2],
    /// TCP flags seen (OR of all packets) in each direction.
    pub tcp_flags: [u8; 2],
    /// Direction of the flow's first packet: the side that started it.
    pub initiator: u8,
    /// A [`crate::Verdict`].
    pub verdict: u8,
    /// A [`crate::reason::Reason`].
    pub reason: u8,
    /// `STATE_*` bits.
    pub state: u8,
    /// Payload samples sent for this flow (see [`crate::sample`]), at most
    /// [`crate::sample::SAMPLES_PER_FLOW`].
    pub samples: u8,
    pub _pad: [u8; 5],
}

/// `FRAGMENTS` key: one fragmented datagram (IPv4 identification, or the IPv6
/// fragment header's identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// `FRAGMENTS` value: the ports read from the datagram's first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    pub sport: u16,
    pub dport: u16,
    pub _pad: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<FragmentKey>() == 40);
const _: () = assert!(core::mem::size_of::<FragmentPorts>() == 8);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::align_of::<FlowKey>() == 2);
const _: () = assert!(core::mem::size_of::<FlowValue>() == 80);
const _: () = assert!(core::mem::align_of::<FlowValue>() == 8);
// Issue goal: at most 128 bytes of key + value per flow entry.
const _: () = assert!(core::mem::size_of::<FlowKey>() + core::mem::size_of::<FlowValue>() <= 128);
