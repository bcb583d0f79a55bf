//! Names of maps and programs, shared by the eBPF object and the agent.

/// Flow table: `LRU_HASH<FlowKey, FlowValue>`, one entry per bidirectional flow.
pub const FLOWS: &str = "FLOWS";
/// Flow start/end events: `RINGBUF` of [`crate::FlowEvent`].
pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
/// Per-CPU counters indexed by [`crate::Counter`]: `PERCPU_ARRAY<u64>`.
pub const COUNTERS: &str = "COUNTERS";
/// Data path configuration, one entry: `ARRAY<DatapathConfig>`.
pub const CONFIG: &str = "CONFIG";
/// Attached ports: `HASH<u32 ifindex, PortInfo>`.
pub const PORTS: &str = "PORTS";
/// Endpoints by MAC: `HASH<EndpointKey, EndpointValue>`.
pub const ENDPOINTS: &str = "ENDPOINTS";
/// Zone membership by address: `LPM_TRIE<AddrKey, u32>` (the zone id).
pub const ZONE_CIDRS: &str = "ZONE_CIDRS";
/// Per-zone settings: `HASH<ZoneKey, ZoneValue>`.
pub const ZONES: &str = "ZONES";
/// Zone-pair policy: `LPM_TRIE<PolicyKey, PolicyValue>`.
pub const POLICIES: &str = "POLICIES";
/// Per-CPU packet/byte/drop counters by zone pair and verdict: `PERCPU_HASH<ZonePairKey, ZonePairStats>`.
pub const ZONE_PAIR_STATS: &str = "ZONE_PAIR_STATS";

/// Ports of fragmented datagrams, from their first fragment:
/// `LRU_HASH<FragmentKey, FragmentPorts>`.
pub const FRAGMENTS: &str = "FRAGMENTS";

/// Virtual patches: `LPM_TRIE<VpatchKey, VpatchValue>`.
pub const VPATCHES: &str = "VPATCHES";
/// When each (MAC, port) last announced itself, to send one event per announcement
/// burst: `LRU_HASH<AnnounceKey, u64>`.
pub const ANNOUNCES: &str = "ANNOUNCES";

/// Which port each IP address of a bound endpoint belongs to:
/// `HASH<OwnerKey, OwnerValue>`, kept by the agent's endpoint manager.
pub const ADDR_OWNERS: &str = "ADDR_OWNERS";

/// What unbound VM ports locked on first use: `HASH<u32 ifindex, LearnedValue>`.
pub const LEARNED: &str = "LEARNED";
/// Which port a locked MAC is behind, for judging frames sent to it before the agent
/// confirmed it: `HASH<MacKey, u32 ifindex>`, written with `LEARNED`.
pub const PORT_MACS: &str = "PORT_MACS";
/// What a bound VM port may send from besides its binding's MAC and its endpoint's
/// addresses: `HASH<AllowedKey, u8>`, written by the agent from the rules.
pub const PORT_ALLOWED: &str = "PORT_ALLOWED";
/// Addresses VM ports took on first use: `HASH<OwnerKey, LearnedAddr>`, written by the
/// data path, freed by the agent (and taken over by the data path once idle).
pub const LEARNED_ADDRS: &str = "LEARNED_ADDRS";
/// How many `LEARNED_ADDRS` entries each port holds: `HASH<u32 ifindex, u32>`.
pub const LEARNED_ADDR_COUNT: &str = "LEARNED_ADDR_COUNT";

/// Payload samples of the first packets of flows: `RINGBUF` of
/// [`crate::sample::PayloadSample`], apart from `FLOW_EVENTS` so that samples never crowd
/// out flow events.
pub const PAYLOAD_SAMPLES: &str = "PAYLOAD_SAMPLES";
/// Per-CPU sample budget of the current second: `PERCPU_ARRAY<SampleBudget>`, one entry.
pub const SAMPLE_BUDGET: &str = "SAMPLE_BUDGET";

/// XDP program on a port: what the VM (or the uplink's peer) sends into the switch.
pub const PROG_FROM_PORT: &str = "from_port";
/// The same at TC ingress (TCX), for ports where XDP costs more than TC.
pub const PROG_FROM_PORT_TC: &str = "from_port_tc";
/// TC egress program on a port: what the switch delivers to the VM (or the uplink).
pub const PROG_TO_PORT: &str = "to_port";

/// XDP program that only passes: the benchmarks' baseline, never attached.
pub const PROG_BASELINE_PASS: &str = "baseline_pass";
/// XDP program that does one `FLOWS` lookup and nothing else: the benchmarks' floor for
/// a flow-table fast path, never attached.
pub const PROG_BASELINE_LOOKUP: &str = "baseline_lookup";

/// Version of the pinned layout: which maps are pinned, with which key and value types.
/// Raise it with every change of a pinned map's type, key, value or meaning; an agent that
/// finds an older version upgrades it (the agent's `pin_layout` module says how).
/// - 1: the maps directly under the pin directory (agents up to 2026-12-05).
/// - 2: the maps under `<pin-dir>/v2/`, same types as 1.
/// - 3: `PORTS` values grow from 8 to 24 bytes (the port's binding; the first 8 bytes
///   keep their meaning, so an older entry is copied and zero-extended), `LEARNED` added.
///
/// A map added without changing the others (`PORT_ALLOWED`, `LEARNED_ADDRS`,
/// `LEARNED_ADDR_COUNT`) needs no new version: an
/// agent finds it missing from the pins of the same layout and creates it.
pub const PIN_LAYOUT_VERSION: u32 = 3;

/// All maps that are pinned under the agent's pin directory, so that they survive
/// a restart of the agent.
pub const PINNED_MAPS: &[&str] = &[
    FLOWS,
    FLOW_EVENTS,
    COUNTERS,
    CONFIG,
    PORTS,
    ENDPOINTS,
    ZONE_CIDRS,
    ZONES,
    POLICIES,
    ZONE_PAIR_STATS,
    FRAGMENTS,
    VPATCHES,
    ANNOUNCES,
    ADDR_OWNERS,
    LEARNED,
    PORT_MACS,
    PORT_ALLOWED,
    LEARNED_ADDRS,
    LEARNED_ADDR_COUNT,
    PAYLOAD_SAMPLES,
    SAMPLE_BUDGET,
];
