//! Configuration the agent writes and the data path reads.

/// Index of the single entry of the `CONFIG` array.
pub const CONFIG_INDEX: u32 = 0;

/// `DatapathConfig::flags` bit: enforce verdicts (drop denied flows). Without it the
/// data path observes only.
pub const CONFIG_ENFORCE: u8 = 1 << 0;

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
    pub _pad: u8,
    pub _pad2: [u8; 8],
}

const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 16);

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

/// `PORTS` map value, keyed by ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortInfo {
    /// A [`PortRole`].
    pub role: u8,
    pub flags: u8,
    /// Zone given to the port by `interface:` members, per rule-table half; 0 = none.
    pub zone: [u16; 2],
    /// Where the agent attached `from_port` (a `PORT_INGRESS_*` value): kept here, in a
    /// pinned map, so that an agent adopting the port's links knows. Not read by the
    /// data path.
    pub ingress: u8,
    pub _pad: u8,
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

const _: () = assert!(core::mem::size_of::<PortInfo>() == 8);
