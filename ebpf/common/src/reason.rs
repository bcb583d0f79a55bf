//! Verdicts, the reasons behind them, and the data path's counters: one set of enums
//! shared by the data path, the flow records and the metrics, so that every dropped or
//! unparsed packet says why.

/// What the data path did with a flow.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No rule set is in force: the flow is observed and passed.
    Observed = 0,
    Allowed = 1,
    Denied = 2,
    /// A policy in audit mode would have denied it; it passed.
    Audit = 3,
}

impl Verdict {
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Observed),
            1 => Some(Self::Allowed),
            2 => Some(Self::Denied),
            3 => Some(Self::Audit),
            _ => None,
        }
    }

    /// The name used in flow records and metric labels.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Observed => "observed",
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Audit => "audit",
        }
    }
}

/// Why a verdict was given.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No rule set in force.
    NoRules = 0,
    /// A policy's allow list matched.
    PolicyAllow = 1,
    /// The zone pair has a policy but none of its allow entries matched.
    PolicyNoMatch = 2,
    /// No policy for the zone pair: `default_inter_zone` decided.
    DefaultInterZone = 3,
    /// Both ends in one zone: its `intra_zone` setting decided.
    IntraZone = 4,
    /// A TCP packet without SYN matched no known flow (no mid-stream pickup).
    TcpNotSyn = 5,
    /// The endpoint is quarantined.
    Quarantined = 6,
    /// The endpoint is isolated.
    Isolated = 7,
    /// A virtual patch denies it.
    VirtualPatch = 8,
    /// The source address or MAC is not owned by the port that sent it.
    Spoofed = 9,
    /// A reply of a flow that policy allowed in the other direction.
    EstablishedReply = 10,
    /// The flow was handed over from another node.
    Migrated = 11,
    /// A quarantined endpoint talking to a remediation zone.
    Remediation = 12,
    /// One end is a VM port nobody bound (`unbound_ports: quarantine`): it reaches only
    /// remediation zones.
    UnboundPort = 13,
}

impl Reason {
    pub const ALL: [Self; 14] = [
        Self::NoRules,
        Self::PolicyAllow,
        Self::PolicyNoMatch,
        Self::DefaultInterZone,
        Self::IntraZone,
        Self::TcpNotSyn,
        Self::Quarantined,
        Self::Isolated,
        Self::VirtualPatch,
        Self::Spoofed,
        Self::EstablishedReply,
        Self::Migrated,
        Self::Remediation,
        Self::UnboundPort,
    ];

    #[must_use]
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRules => "no_rules",
            Self::PolicyAllow => "policy_allow",
            Self::PolicyNoMatch => "policy_no_match",
            Self::DefaultInterZone => "default_inter_zone",
            Self::IntraZone => "intra_zone",
            Self::TcpNotSyn => "tcp_not_syn",
            Self::Quarantined => "quarantined",
            Self::Isolated => "isolated",
            Self::VirtualPatch => "virtual_patch",
            Self::Spoofed => "spoofed",
            Self::EstablishedReply => "established_reply",
            Self::Migrated => "migrated",
            Self::Remediation => "remediation",
            Self::UnboundPort => "unbound_port",
        }
    }
}

/// Indexes of the per-CPU `COUNTERS` array. The agent sums them over CPUs.
///
/// `Parse*` counters say why a frame could not be parsed down to a flow; such
/// frames are passed, never aborted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Frames seen by any program.
    Packets = 0,
    /// Bytes of those frames (L2 length).
    Bytes,
    /// Frames that belonged to a flow.
    FlowPackets,
    /// Flow entries created by packets.
    FlowsCreated,
    /// Flow entries that could not be created (map update failed).
    FlowInsertFailed,
    /// Start/end events lost because the ring buffer was full.
    EventsLost,
    /// Frames dropped by verdict.
    Dropped,
    /// ARP frames seen.
    Arp,
    /// RARP frames seen (QEMU's announcement after a live migration).
    Rarp,
    /// Frames with an ethertype that is not ARP, RARP, IPv4 or IPv6.
    ParseNotIp,
    /// Frame shorter than an Ethernet header.
    ParseTruncatedEthernet,
    /// A VLAN tag cut short.
    ParseTruncatedVlan,
    /// More VLAN tags than the data path walks (2: 802.1ad + 802.1Q).
    ParseVlanTooDeep,
    /// ARP/RARP cut short.
    ParseTruncatedArp,
    /// IPv4 header cut short.
    ParseTruncatedIpv4,
    /// IPv4 IHL below 5, or a header longer than the frame.
    ParseBadIpv4Ihl,
    /// IPv4 version field is not 4 (or IPv6's not 6).
    ParseBadIpVersion,
    /// IPv4 non-first fragment: no transport header to read.
    ParseIpv4Fragment,
    /// IPv6 header cut short.
    ParseTruncatedIpv6,
    /// IPv6 extension header chain longer than the bounded walk.
    ParseIpv6ExtTooDeep,
    /// IPv6 extension header cut short, or a non-first fragment.
    ParseBadIpv6Ext,
    /// TCP/UDP/ICMP header cut short.
    ParseTruncatedL4,
    /// Frames the TC egress program counted because no ingress program saw them.
    EgressOnly,
    /// First fragments whose ports were remembered for the later fragments.
    FragmentsTracked,
    /// Later fragments whose first fragment was not seen (their ports are unknown);
    /// dropped while a rule set is in force.
    FragmentWithoutFirst,
    /// VLAN-tagged frames sent by a VM port (not an uplink); dropped while a rule set
    /// is in force.
    TaggedFromVmPort,
    /// Frames from a VM port that could not be judged (not IP, ARP or RARP, or
    /// malformed), dropped while a rule set is in force.
    UnjudgedDropped,
    /// Frames whose source MAC belongs to an endpoint bound to another port.
    Spoofed,
    /// Frames from a VM port with a source IP address (or an address claimed in ARP or
    /// neighbour discovery) that belongs to an endpoint bound to another port.
    SpoofedAddress,
    /// IPv6 router advertisements and redirects from VM ports, dropped while a rule set
    /// is in force (a VM is not the segment's router).
    RouterAdvertFromVm,
    /// TCP fragments at offset 8, which can only overlap the first fragment's header
    /// (RFC 1858), dropped while a rule set is in force.
    OverlappingFragment,
    /// Announcement events sent (RARP, gratuitous ARP, unsolicited neighbour
    /// advertisement; at most one per MAC and port per second).
    Announcements,
    /// Payload samples put in the `PAYLOAD_SAMPLES` ring buffer.
    PayloadSamples,
    /// Payload samples lost because the `PAYLOAD_SAMPLES` ring buffer was full.
    PayloadSamplesLost,
    /// Payload samples skipped because this CPU's budget for the second was spent, or
    /// the frame could not be copied.
    PayloadSamplesSkipped,
    /// Frames from a bound (or learned) VM port whose source MAC is not the binding's
    /// (and not an endpoint bound to another port: that is `spoofed`), or whose ARP
    /// sender hardware address is not the frame's source; dropped while a rule set is in
    /// force.
    SpoofedMac,
    /// Frames from or to a VM port nobody bound, dropped by `unbound_ports: deny` (or
    /// an unbound port sending from a MAC it may not learn).
    UnboundPort,
    /// Unbound VM ports locked to their first MAC (trust on first use, `binding: learn`).
    PortsLearned,
    /// Frames judged again where they leave for a VM port, because the receiver the
    /// flow was judged for is not that port's endpoint (broadcast, multicast, flooded or
    /// misaddressed copies, ports without a binding).
    EgressJudged,
    /// Of those, frames dropped: the copy's receiver may not get it.
    EgressDenied,
    /// Frames a VM port sent to its own MAC (a guest never needs the switch for that):
    /// dropped while a rule set is in force.
    ToOwnMac,
    /// Frames of a flow's direction sent from another port than the flow knew for it,
    /// by an end the flow's verdict does not hold for (judged as itself, it would be
    /// denied): an injection into another endpoint's flow; dropped, the flow untouched.
    ForeignSender,
    /// New addresses a port that learns its addresses could not take: it holds
    /// [`crate::config::LEARNED_ADDRS_PER_PORT`] in use already (the frame is counted as
    /// `spoofed_address` too).
    AddressesFull,
    /// Frames from a port whose claim of an endpoint another node has is held (see
    /// `LEARNED_HELD`): dropped.
    ClaimHeld,
    /// Number of counters; not a counter.
    Count,
}

/// Entries of the `COUNTERS` array: more than there are counters, so that a data path
/// with new counters still fits the array an older agent pinned, and the next agent
/// adopts it (a pinned array must keep its size).
pub const COUNTER_SLOTS: u32 = 64;

const _: () = assert!((Counter::Count as u32) <= COUNTER_SLOTS);

impl Counter {
    pub const ALL: [Self; Self::Count as usize] = [
        Self::Packets,
        Self::Bytes,
        Self::FlowPackets,
        Self::FlowsCreated,
        Self::FlowInsertFailed,
        Self::EventsLost,
        Self::Dropped,
        Self::Arp,
        Self::Rarp,
        Self::ParseNotIp,
        Self::ParseTruncatedEthernet,
        Self::ParseTruncatedVlan,
        Self::ParseVlanTooDeep,
        Self::ParseTruncatedArp,
        Self::ParseTruncatedIpv4,
        Self::ParseBadIpv4Ihl,
        Self::ParseBadIpVersion,
        Self::ParseIpv4Fragment,
        Self::ParseTruncatedIpv6,
        Self::ParseIpv6ExtTooDeep,
        Self::ParseBadIpv6Ext,
        Self::ParseTruncatedL4,
        Self::EgressOnly,
        Self::FragmentsTracked,
        Self::FragmentWithoutFirst,
        Self::TaggedFromVmPort,
        Self::UnjudgedDropped,
        Self::Spoofed,
        Self::SpoofedAddress,
        Self::RouterAdvertFromVm,
        Self::OverlappingFragment,
        Self::Announcements,
        Self::PayloadSamples,
        Self::PayloadSamplesLost,
        Self::PayloadSamplesSkipped,
        Self::SpoofedMac,
        Self::UnboundPort,
        Self::PortsLearned,
        Self::EgressJudged,
        Self::EgressDenied,
        Self::ToOwnMac,
        Self::ForeignSender,
        Self::AddressesFull,
        Self::ClaimHeld,
    ];

    /// Snake-case name for status output and metric labels.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Packets => "packets",
            Self::Bytes => "bytes",
            Self::FlowPackets => "flow_packets",
            Self::FlowsCreated => "flows_created",
            Self::FlowInsertFailed => "flow_insert_failed",
            Self::EventsLost => "events_lost",
            Self::Dropped => "dropped",
            Self::Arp => "arp",
            Self::Rarp => "rarp",
            Self::ParseNotIp => "not_ip",
            Self::ParseTruncatedEthernet => "truncated_ethernet",
            Self::ParseTruncatedVlan => "truncated_vlan",
            Self::ParseVlanTooDeep => "vlan_too_deep",
            Self::ParseTruncatedArp => "truncated_arp",
            Self::ParseTruncatedIpv4 => "truncated_ipv4",
            Self::ParseBadIpv4Ihl => "bad_ipv4_ihl",
            Self::ParseBadIpVersion => "bad_ip_version",
            Self::ParseIpv4Fragment => "ipv4_fragment",
            Self::ParseTruncatedIpv6 => "truncated_ipv6",
            Self::ParseIpv6ExtTooDeep => "ipv6_ext_too_deep",
            Self::ParseBadIpv6Ext => "bad_ipv6_ext",
            Self::ParseTruncatedL4 => "truncated_l4",
            Self::EgressOnly => "egress_only",
            Self::FragmentsTracked => "fragments_tracked",
            Self::FragmentWithoutFirst => "fragment_without_first",
            Self::TaggedFromVmPort => "tagged_from_vm_port",
            Self::UnjudgedDropped => "unjudged_dropped",
            Self::Spoofed => "spoofed",
            Self::SpoofedAddress => "spoofed_address",
            Self::RouterAdvertFromVm => "router_advert_from_vm",
            Self::OverlappingFragment => "overlapping_fragment",
            Self::Announcements => "announcements",
            Self::PayloadSamples => "payload_samples",
            Self::PayloadSamplesLost => "payload_samples_lost",
            Self::PayloadSamplesSkipped => "payload_samples_skipped",
            Self::SpoofedMac => "spoofed_mac",
            Self::UnboundPort => "unbound_port",
            Self::PortsLearned => "ports_learned",
            Self::EgressJudged => "egress_judged",
            Self::EgressDenied => "egress_denied",
            Self::ToOwnMac => "to_own_mac",
            Self::ForeignSender => "foreign_sender",
            Self::AddressesFull => "addresses_full",
            Self::ClaimHeld => "claim_held",
            Self::Count => "count",
        }
    }

    /// Whether this counter is a parse failure reason.
    #[must_use]
    pub fn is_parse_failure(self) -> bool {
        (self as u32) >= (Self::ParseNotIp as u32) && (self as u32) <= (Self::ParseTruncatedL4 as u32)
    }
}
