//! Keys and values of the zone and policy tables.
//!
//! Every rule table is double-buffered: its keys start with a `slot` (0 or 1) and the
//! data path reads only the half named by `DatapathConfig::active_slot`.

/// Zone id of the built-in zone `world` (addresses outside every zone).
pub const ZONE_WORLD: u16 = 0;

/// `policy_id` for verdicts decided by a default rather than by a policy.
pub const POLICY_ID_DEFAULT_INTER_ZONE: u32 = u32::MAX;
/// `policy_id` for verdicts decided by a zone's `intra_zone` setting.
pub const POLICY_ID_INTRA_ZONE: u32 = u32::MAX - 1;
/// `policy_id` when no rule set is in force.
pub const POLICY_ID_NONE: u32 = u32::MAX - 2;

/// Policy mode: enforce verdicts.
pub const MODE_ENFORCE: u8 = 0;
/// Policy mode: pass, but record the verdict that enforcing would have given.
pub const MODE_AUDIT: u8 = 1;

/// `ENDPOINTS` key: a MAC address in one rule-table half.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub slot: u8,
    pub _pad: u8,
    pub mac: [u8; 6],
}

/// [`EndpointValue::flags`]: the endpoint may reach only remediation zones.
pub const ENDPOINT_QUARANTINED: u16 = 1 << 0;
/// [`EndpointValue::flags`]: all traffic to and from the endpoint is denied.
pub const ENDPOINT_ISOLATED: u16 = 1 << 1;
/// [`EndpointValue::flags`]: virtual patches apply to the endpoint (look it up in
/// `VPATCHES`).
pub const ENDPOINT_PATCHED: u16 = 1 << 2;
/// [`EndpointValue::flags`]: the endpoint has fixed addresses (inventory `ips`): wherever
/// it is bound or locked, it sends only from those (as `ADDR_OWNERS` gives them to its
/// port), IPv6 link-local and the unspecified address.
pub const ENDPOINT_ADDRS_FIXED: u16 = 1 << 3;
/// [`EndpointValue::flags`]: the endpoint is bound on another node (as etcd says) and
/// that node has not reported its port gone. A port of this node that locks itself to
/// the endpoint's MAC on first use is not that endpoint until the agent confirms the
/// move: it is judged as an unbound port meanwhile.
pub const ENDPOINT_ELSEWHERE: u16 = 1 << 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    pub zone: u16,
    pub flags: u16,
    /// Identity used by `VPATCHES` keys; 0 = none.
    pub endpoint_id: u32,
    /// The port the endpoint's MAC lives behind; frames with this source MAC from any
    /// other VM port are spoofed. 0 = not bound to a port yet.
    pub ifindex: u32,
    pub _pad: [u8; 4],
}

/// `VPATCHES` LPM key data: `slot, proto, endpoint_id (big-endian), port (big-endian)`.
/// A patch on a whole protocol has prefix length [`VPATCH_KEY_PROTO_BITS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VpatchKey {
    pub slot: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
    pub endpoint_id: [u8; 4],
    pub port: [u8; 2],
}

/// Bits of a [`VpatchKey`] before its port.
pub const VPATCH_KEY_PROTO_BITS: u32 = 64;
/// Bits of a whole [`VpatchKey`].
pub const VPATCH_KEY_BITS: u32 = 80;

/// `VPATCHES` value: which virtual patch denies the traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VpatchValue {
    pub patch_id: u32,
    pub _pad: [u8; 4],
}

/// `ZONE_CIDRS` LPM key data. The prefix length counts the 32 bits of
/// `slot`, `family` and padding before the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrKey {
    pub slot: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}

/// Bits of an [`AddrKey`] before its address.
pub const ADDR_KEY_HEADER_BITS: u32 = 32;

/// `ADDR_OWNERS` key: one IP address of a bound endpoint. Not double-buffered: where an
/// address lives is a fact about ports, like `PORTS`, not part of a rule set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OwnerKey {
    pub family: u8,
    pub _pad: [u8; 3],
    /// IPv4 in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
}

/// `ADDR_OWNERS` value: the port the address belongs to. A VM port other than this one
/// that sends with this source address (or claims it in ARP or neighbour discovery)
/// spoofs it; for an address owned [`OWNER_ELSEWHERE`], unless the frame comes from the
/// owner's own MAC (the endpoint arriving here, before the agent has bound it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerValue {
    /// The owning port, or [`OWNER_ELSEWHERE`].
    pub ifindex: u32,
    /// The owning endpoint (`EndpointValue::endpoint_id`), for the agent's bookkeeping.
    pub endpoint_id: u32,
    /// The owning endpoint's MAC.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// [`OwnerValue::ifindex`]: the owner is bound on another node of the cluster.
pub const OWNER_ELSEWHERE: u32 = u32::MAX;
/// [`OwnerValue::ifindex`] and [`EndpointValue::ifindex`]: infrastructure behind the
/// uplink (a gateway, a DHCP or DNS server, the rules' `infrastructure:`): no VM port
/// may send from or claim its address or MAC.
pub const OWNER_INFRA: u32 = u32::MAX - 1;
/// [`OwnerValue::ifindex`]: an address the rules allow several endpoints to send from
/// (`allowed_addresses`: a shared virtual IP): only ports whose `PORT_ALLOWED` lists it
/// may send from or claim it.
pub const OWNER_SHARED: u32 = u32::MAX - 2;

/// `ZONES` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ZoneKey {
    pub slot: u8,
    pub _pad: u8,
    pub zone: u16,
}

/// [`ZoneValue::flags`]: quarantined endpoints may reach (and be reached from) this
/// zone.
pub const ZONE_REMEDIATION: u8 = 1 << 0;
/// [`ZoneValue::flags`]: `binding: learn`: an unbound VM port whose first frames put it
/// in this zone is locked to that MAC and zone (trust on first use).
pub const ZONE_LEARN: u8 = 1 << 1;
/// [`ZoneValue::flags`]: the zone has `cidr:` members: an endpoint bound into it without
/// fixed addresses may send only from inside them.
pub const ZONE_HAS_CIDRS: u8 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZoneValue {
    /// [`crate::Verdict`] for traffic within the zone.
    pub intra_zone: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// `POLICIES` LPM key data, all fields big-endian so that prefixes of the port are
/// prefixes of the key: `slot, proto, src_zone, dst_zone, port`. A rule for a whole
/// protocol has prefix length [`POLICY_KEY_PROTO_BITS`]; a port range is split into
/// prefixes of the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyKey {
    pub slot: u8,
    pub proto: u8,
    pub src_zone: [u8; 2],
    pub dst_zone: [u8; 2],
    pub port: [u8; 2],
}

/// Protocol number of the `POLICIES` entry that marks a zone pair as covered by a policy
/// (IANA reserves 255, so no real allow entry uses it); its value holds the id and mode
/// of the pair's policy. Packets of protocol 255 never match an allow entry.
pub const PAIR_MARKER_PROTO: u8 = 255;

/// Bits of a [`PolicyKey`] before its port.
pub const POLICY_KEY_PROTO_BITS: u32 = 48;
/// Bits of a whole [`PolicyKey`].
pub const POLICY_KEY_BITS: u32 = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub policy_id: u32,
    /// [`MODE_ENFORCE`] or [`MODE_AUDIT`].
    pub mode: u8,
    pub _pad: [u8; 3],
}

/// `ZONE_PAIR_STATS` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ZonePairKey {
    pub src_zone: u16,
    pub dst_zone: u16,
    pub verdict: u8,
    pub reason: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZonePairStats {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<EndpointKey>() == 8);
const _: () = assert!(core::mem::size_of::<EndpointValue>() == 16);
const _: () = assert!(core::mem::size_of::<VpatchKey>() == 10);
const _: () = assert!(core::mem::size_of::<VpatchValue>() == 8);
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);
const _: () = assert!(core::mem::size_of::<OwnerKey>() == 20);
const _: () = assert!(core::mem::size_of::<OwnerValue>() == 16);
const _: () = assert!(core::mem::size_of::<ZoneKey>() == 4);
const _: () = assert!(core::mem::size_of::<ZoneValue>() == 4);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 8);
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);
const _: () = assert!(core::mem::size_of::<ZonePairKey>() == 8);
const _: () = assert!(core::mem::size_of::<ZonePairStats>() == 16);
