//! The data path's maps. Names match `backplane_common::maps`; all are pinned by name
//! under the agent's pin directory so that they outlive the agent.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use backplane_common::{
    DatapathConfig, FlowKey, FlowValue, PortInfo,
    config::{AllowedKey, LearnedAddr, LearnedValue, MacKey},
    event::AnnounceKey,
    flow::{FragmentKey, FragmentPorts},
    policy::{
        AddrKey, EndpointKey, EndpointValue, OwnerKey, OwnerValue, PolicyKey, PolicyValue, VpatchKey, VpatchValue,
        ZoneKey, ZonePairKey, ZonePairStats, ZoneValue,
    },
    reason::COUNTER_SLOTS,
    sample::SampleBudget,
};

/// Default flow table size; the agent sets the real one (`--flow-table-size`) at load.
const FLOWS_DEFAULT: u32 = 65_536;
/// Default ring buffer size in bytes; the agent sets the real one at load.
const EVENTS_DEFAULT: u32 = 1 << 22;
/// Default payload sample ring buffer size in bytes; the agent sets the real one at load.
const SAMPLES_DEFAULT: u32 = 1 << 20;

#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(FLOWS_DEFAULT, 0);

#[map(name = "FLOW_EVENTS")]
pub static FLOW_EVENTS: RingBuf = RingBuf::pinned(EVENTS_DEFAULT, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[map(name = "CONFIG")]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

#[map(name = "PORTS")]
pub static PORTS: HashMap<u32, PortInfo> = HashMap::pinned(4096, 0);

/// `BPF_F_NO_PREALLOC`: for tables read only when a flow is judged (or written only
/// on the drop path), memory follows what is in them instead of their capacity.
const NO_PREALLOC: u32 = 1;

#[map(name = "ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointValue> = HashMap::pinned(262_144, NO_PREALLOC);

#[map(name = "ZONE_CIDRS")]
pub static ZONE_CIDRS: LpmTrie<AddrKey, u32> = LpmTrie::pinned(262_144, 0);

#[map(name = "ZONES")]
pub static ZONES: HashMap<ZoneKey, ZoneValue> = HashMap::pinned(8192, NO_PREALLOC);

#[map(name = "POLICIES")]
pub static POLICIES: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(1_048_576, 0);

#[map(name = "ZONE_PAIR_STATS")]
pub static ZONE_PAIR_STATS: PerCpuHashMap<ZonePairKey, ZonePairStats> = PerCpuHashMap::pinned(65_536, NO_PREALLOC);

#[map(name = "FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> = LruHashMap::pinned(16_384, 0);

#[map(name = "VPATCHES")]
pub static VPATCHES: LpmTrie<VpatchKey, VpatchValue> = LpmTrie::pinned(262_144, 0);

#[map(name = "ANNOUNCES")]
pub static ANNOUNCES: LruHashMap<AnnounceKey, u64> = LruHashMap::pinned(16_384, 0);

/// Read only when a flow starts, when a direction of a flow shows up on a new port, and
/// for ARP / neighbour discovery from VM ports.
#[map(name = "ADDR_OWNERS")]
pub static ADDR_OWNERS: HashMap<OwnerKey, OwnerValue> = HashMap::pinned(262_144, NO_PREALLOC);

/// What unbound VM ports locked on first use; written by the data path (once per
/// port), confirmed into `PORTS` and removed by the agent.
#[map(name = "LEARNED")]
pub static LEARNED: HashMap<u32, LearnedValue> = HashMap::pinned(4096, 0);

/// Which port each `LEARNED` MAC is behind (written with it; removed by the agent).
#[map(name = "PORT_MACS")]
pub static PORT_MACS: HashMap<MacKey, u32> = HashMap::pinned(4096, 0);

/// What each bound VM port may send from besides its binding (the rules' `allowed_macs`
/// and `allowed_addresses`); read only when a frame's MAC or a new flow's address is not
/// the binding's own.
#[map(name = "PORT_ALLOWED")]
pub static PORT_ALLOWED: HashMap<AllowedKey, u8> = HashMap::pinned(16_384, 0);

/// Addresses VM ports took on first use (see `LearnedAddr`): 4096 ports with their
/// 16 each. Not LRU: an entry leaves only when the agent frees it or another port takes
/// it over once idle, so that `LEARNED_ADDR_COUNT` stays true.
#[map(name = "LEARNED_ADDRS")]
pub static LEARNED_ADDRS: HashMap<OwnerKey, LearnedAddr> = HashMap::pinned(65_536, NO_PREALLOC);

/// How many `LEARNED_ADDRS` entries each port holds.
#[map(name = "LEARNED_ADDR_COUNT")]
pub static LEARNED_ADDR_COUNT: HashMap<u32, u32> = HashMap::pinned(4096, 0);

#[map(name = "PAYLOAD_SAMPLES")]
pub static PAYLOAD_SAMPLES: RingBuf = RingBuf::pinned(SAMPLES_DEFAULT, 0);

#[map(name = "SAMPLE_BUDGET")]
pub static SAMPLE_BUDGET: PerCpuArray<SampleBudget> = PerCpuArray::pinned(1, 0);

/// Per-CPU working memory of one program run (the parsed packet, a new flow's value):
/// kept off the 512-byte BPF stack. Not pinned: nothing in it outlives a run.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<crate::parse::Scratch> = PerCpuArray::with_max_entries(1, 0);
