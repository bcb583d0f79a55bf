//! Configuration the agent writes and the data path reads.

/// Index of the single entry of the `CONFIG` array.
pub const CONFIG_INDEX: u32 = 0;

/// `DatapathConfig::flags` bit: enforce verdicts (drop denied flows). Without it the
/// data path observes only.
pub const CONFIG_ENFORCE: u8 = 1 << 0;
/// `DatapathConfig::flags` bit: some zone has `binding: learn`, so an unbound VM port
/// sending from a MAC outside the inventory is locked to it (`LEARNED`).
pub const CONFIG_LEARN: u8 = 1 << 1;
/// `DatapathConfig::flags` bit: `world` learns too: a learning port whose first address
/// is in no zone's networks is locked into `world`.
pub const CONFIG_LEARN_WORLD: u8 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Rule generation in force; flows decided under another generation are judged again.
    pub generation: u32,
    /// Which half (0 or 1) of the double-buffered rule tables is in force. The agent
    /// writes a new rule set into the other half, then flips this byte: a packet reads
    /// it once, so no packet is judged by half of an old and half of a new rule set.
    pub active_slot: u8,
    /// `CONFIG_*` bits.
    pub flags: u8,
    /// [`crate::Verdict`] for inter-zone traffic no policy covers.
    pub default_inter_zone: u8,
    /// What a VM port nobody bound (and that cannot learn) gets: an `UNBOUND_*` value.
    pub unbound_ports: u8,
    /// Changes whenever the agent changes `PORTS` (never 0 once it manages the ports): the
    /// data path may keep the entry of the port it saw last per CPU while it stays the
    /// same. 0: no such promise, every frame looks its port up.
    pub ports_epoch: u32,
    pub _pad2: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 16);

/// [`DatapathConfig::unbound_ports`]: a VM port nobody bound is quarantined: what it
/// sends is judged as from a quarantined endpoint (only remediation zones), and so is
/// what is delivered to it. The default (0, also what an older CONFIG entry reads as).
pub const UNBOUND_QUARANTINE: u8 = 0;
/// [`DatapathConfig::unbound_ports`]: everything from and to an unbound VM port is
/// dropped (counted as `unbound_port`).
pub const UNBOUND_DENY: u8 = 1;
/// [`DatapathConfig::unbound_ports`]: an unbound VM port's frames are judged by the
/// addresses they carry, as before ports were bound: a guest there picks its own zone.
/// Only for watching a rule set before bindings exist.
pub const UNBOUND_OBSERVE: u8 = 2;

/// What a port connects the switch to.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRole {
    /// A VM-facing port (tap, veth, bridge port).
    Vm = 1,
    /// An uplink to other nodes.
    Uplink = 2,
}

/// `PortInfo::flags` bit: the port may send VLAN-tagged frames (a trunk to a VM that
/// tags its own traffic). Without it, tagged frames from a VM port are dropped while a
/// rule set is in force.
pub const PORT_ALLOW_TAGGED: u8 = 1 << 0;
/// [`PortInfo::flags`]: the port's ingress program is attached and judges what enters
/// through it, so `to_port` leaves those frames alone. Set by the agent once the ingress
/// link exists, cleared (with the entry) before it is detached.
pub const PORT_INGRESS_LIVE: u8 = 1 << 1;
/// [`PortInfo::flags`]: the bound endpoint has fixed addresses (inventory `ips`,
/// `allowed_addresses`): a source address must be one `ADDR_OWNERS` gives this port (or
/// IPv6 link-local). Without it, any address inside the endpoint's zone's networks that
/// no other port owns.
pub const PORT_ADDRS_FIXED: u8 = 1 << 2;

/// [`PortInfo::binding`]: nobody bound the port (the rules' `unbound_ports` applies,
/// or it learns on first use: see `LEARNED`).
pub const BINDING_NONE: u8 = 0;
/// [`PortInfo::binding`]: the host bound the port to an endpoint (`backplane endpoint
/// bind`, the libvirt hook, an `interface` member, an operator's `moved`).
pub const BINDING_HOST: u8 = 1;
/// [`PortInfo::binding`]: the port learned its endpoint on first use (a zone with
/// `binding: learn`) and the agent confirmed it.
pub const BINDING_LEARNED: u8 = 2;

/// `PORTS` map value, keyed by ifindex: the port's role and, for a VM port, its binding,
/// the identity of whatever sends through it. The data path checks every frame's source
/// MAC against `mac` (one compare) and judges the sender as the bound endpoint; frame
/// fields never choose it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortInfo {
    /// A [`PortRole`].
    pub role: u8,
    pub flags: u8,
    /// The zone of the port's identity per rule-table half: the bound endpoint's zone,
    /// else the zone `interface:` members give the port; 0 = none.
    pub zone: [u16; 2],
    /// Where the agent attached `from_port` (a `PORT_INGRESS_*` value): kept here, in a
    /// pinned map, so that an agent adopting the port's links knows. Not read by the
    /// data path.
    pub ingress: u8,
    /// A `BINDING_*` value.
    pub binding: u8,
    /// The bound endpoint's standing per rule-table half (`ENDPOINT_*` flags).
    pub standing: [u16; 2],
    /// The bound endpoint's MAC (when `binding` is not [`BINDING_NONE`]).
    pub mac: [u8; 6],
    pub _pad: [u8; 6],
}

/// [`PortInfo::ingress`]: not recorded (ports attached by an agent that did not record
/// it ran generic XDP).
pub const PORT_INGRESS_UNKNOWN: u8 = 0;
/// [`PortInfo::ingress`]: `from_port_tc` at TC ingress.
pub const PORT_INGRESS_TC: u8 = 1;
/// [`PortInfo::ingress`]: `from_port` as generic (skb) XDP.
pub const PORT_INGRESS_XDP_SKB: u8 = 2;
/// [`PortInfo::ingress`]: `from_port` as native (driver) XDP.
pub const PORT_INGRESS_XDP_NATIVE: u8 = 3;

const _: () = assert!(core::mem::size_of::<PortInfo>() == 24);

impl PortInfo {
    /// The port's zone in rule-table half `slot` (written without indexing by a variable,
    /// which the verifier rejects on some stack copies).
    #[inline(always)]
    #[must_use]
    pub fn zone_in(&self, slot: u8) -> u16 {
        if slot & 1 == 0 { self.zone[0] } else { self.zone[1] }
    }

    /// The bound endpoint's standing in rule-table half `slot`.
    #[inline(always)]
    #[must_use]
    pub fn standing_in(&self, slot: u8) -> u16 {
        if slot & 1 == 0 { self.standing[0] } else { self.standing[1] }
    }
}

/// `LEARNED` value, keyed by ifindex: what an unbound VM port in a `binding: learn` zone
/// locked on first use, before the agent confirms it into `PORTS`. Inserted once
/// (`BPF_NOEXIST`: the first frame wins); the agent removes it when it unbinds the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedValue {
    /// The first source MAC the port sent; every later frame must carry it.
    pub mac: [u8; 6],
    /// The zone its first address put it in (valid with [`LEARNED_ZONE`]), an id of the
    /// rule-table half `slot`.
    pub zone: u16,
    pub slot: u8,
    /// `LEARNED_*` bits.
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// [`LearnedValue::flags`]: `zone` is set.
pub const LEARNED_ZONE: u8 = 1 << 0;
/// [`LearnedValue::flags`]: the MAC is an inventory endpoint's (its zone and standing
/// come from `ENDPOINTS`).
pub const LEARNED_ENDPOINT: u8 = 1 << 1;
/// [`LearnedValue::flags`]: the agent holds this port's claim of an inventory endpoint
/// that another node has (set by the agent): the port is judged as unbound and its
/// frames are dropped (`claim_held`) until the host binds it or the agent takes the
/// claim as a move.
pub const LEARNED_HELD: u8 = 1 << 2;
/// [`LearnedValue::flags`]: the port cannot learn an identity (its zone binds by the
/// host only), but it is held to its first MAC all the same, as a switch's port security
/// holds it: the bridge learns where a MAC lives from every frame. No identity comes with
/// it (the port stays unbound) and the agent is not told.
pub const LEARNED_MAC_ONLY: u8 = 1 << 3;

const _: () = assert!(core::mem::size_of::<LearnedValue>() == 16);

/// `PORT_MACS` key: a MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacKey {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<MacKey>() == 8);

/// [`AllowedKey::kind`] of a MAC (its 6 bytes first in `value`); the kind of an address
/// is its family (`FAMILY_IPV4`, the 4 bytes first; `FAMILY_IPV6`).
pub const ALLOWED_MAC: u8 = 1;

/// `PORT_ALLOWED` key: what the endpoint bound to VM port `ifindex` may send from besides
/// its own MAC and addresses (its `allowed_macs` and `allowed_addresses` in the rules:
/// a VRRP virtual MAC, a virtual IP it shares with a peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowedKey {
    pub ifindex: u32,
    pub kind: u8,
    pub _pad: [u8; 3],
    pub value: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<AllowedKey>() == 24);

/// `LEARNED_ADDRS` value (its key is a `policy::OwnerKey`): an address a VM port whose
/// endpoint has no fixed addresses took on first use (the first ARP/ND claim of it, or
/// the first flow from it), inside its zone's networks. No other port may send from it
/// or claim it while it is in use: until it is [`LEARNED_ADDR_IDLE_NS`] idle (neither
/// claimed nor the source of a new flow), or the agent frees it (the port went, or is
/// bound to another MAC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedAddr {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// When it was last claimed or opened a flow (`bpf_ktime_get_coarse_ns`).
    pub last_used_ns: u64,
}

const _: () = assert!(core::mem::size_of::<LearnedAddr>() == 24);

/// How many addresses one port may hold in `LEARNED_ADDRS` (IPv4 and IPv6 together:
/// a DHCP address, stable and temporary SLAAC addresses of a few prefixes).
pub const LEARNED_ADDRS_PER_PORT: u32 = 16;
/// How long an address learned by one port stays its without use before another port
/// may take it (a DHCP pool hands a released address to another VM).
pub const LEARNED_ADDR_IDLE_NS: u64 = 600 * 1_000_000_000;
