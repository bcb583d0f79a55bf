//! The data path as userspace drives it: the loaded eBPF object, its maps and the ports
//! it is attached to.
//!
//! - this file: loading the object ([`Datapath::load`]), the reads `status` and the
//!   metrics make, and putting rule sets in force: staged into the half of the rule
//!   tables that is not in force, then activated (see [`rule_tables`]). The data path is
//!   the only writer of the rule tables: the rules and the endpoints describe what they
//!   want (a compiled rule set, an endpoint overlay) and it writes them;
//! - `attach`: attaching to ports, adopting and upgrading what a previous agent left,
//!   detaching; `bpffs`: mounting bpffs, the pin directory and its lock;
//! - [`kernel`]: what the running kernel offers (feature probes, verifier figures);
//!   [`tc_legacy`]: TC programs as `cls_bpf` filters where TCX is missing;
//!   [`pins`]: whether a previous agent's pinned maps can be adopted; [`pin_layout`]: the
//!   versioned pinned layout and the upgrade of an older one; [`map_batch`]: whole-map
//!   reads in batches; [`rule_tables`]: the double-buffered rule maps;
//! - [`DatapathError`], [`PortError`]: what goes wrong here.
//!
//! Maps are pinned under the pin directory (`<pin-dir>/v<N>/<MAP>`) and each port's two
//! links under `<pin-dir>/links/<ifname>:tcin` (or `:xdp`) and `:tc`, so the programs stay
//! attached and the maps keep their state when the agent exits without
//! `--detach-on-exit`. (bpffs forbids dots in names, hence `:` rather than `.`; see
//! [`crate::paths`].)

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{SchedClassifier, Xdp},
};
use backplane_common::{
    Counter, DatapathConfig, FlowKey, FlowValue, PortInfo, PortRole,
    config::{
        AllowedKey, BINDING_NONE, CONFIG_ENFORCE, CONFIG_INDEX, LEARNED_HELD, LEARNED_MAC_ONLY, LearnedAddr,
        LearnedValue, MacKey, PORT_ADDRS_FIXED,
    },
    config::{PORT_INGRESS_TC, PORT_INGRESS_XDP_NATIVE, PORT_INGRESS_XDP_SKB},
    maps::{
        CONFIG, COUNTERS, FLOW_EVENTS, FLOWS, LEARNED, LEARNED_ADDR_COUNT, LEARNED_ADDRS, PAYLOAD_SAMPLES,
        PIN_LAYOUT_VERSION, PINNED_MAPS, PORT_ALLOWED, PORT_MACS, PORTS, PROG_FROM_PORT, PROG_FROM_PORT_TC,
        PROG_TO_PORT, ZONE_PAIR_STATS,
    },
    policy::{OwnerKey, ZonePairKey, ZonePairStats},
};
use backplane_rules::CompiledRules;
use serde::{Deserialize, Serialize};

use crate::{
    error::report,
    paths::{BPF_PIN_ROOT, TC_INGRESS_LINK_SUFFIX, XDP_LINK_SUFFIX, links_dir},
};

mod attach;
mod bpffs;
mod error;
pub mod kernel;
pub mod map_batch;
pub mod map_fill;
pub mod pin_layout;
pub mod pins;
pub mod rule_tables;
pub mod tc_legacy;

use attach::AttachedPort;
pub use bpffs::{check_pins, ensure_bpffs, lock_pin_dir, pinned_config, prepare_pin_dir};
pub use error::{DatapathError, PortError};
use kernel::TcAttach;
use rule_tables::{EndpointChange, EndpointChangeDone, EndpointOverlay, RuleTables, TableError};

/// The compiled data path (eBPF object), embedded at build time.
pub static DATAPATH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/backplane-datapath"));

/// Where `from_port` runs on a port (`--ingress`, `--uplink-ingress`).
///
/// Measured on this project's machines (benches/results/throughput.md): TC ingress keeps
/// TCP bulk at 96% (veth) and 97% (tap) of the unfiltered rate where generic XDP keeps
/// 86% and 87% (generic XDP must give every frame a linear buffer with XDP headroom,
/// which copies GRO/TSO super-frames), and native XDP on a veth disables GRO/TSO for the
/// pair (37%). Hence `tc` by default for both roles; `xdp-native` suits physical uplinks
/// whose driver supports XDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IngressHook {
    /// `from_port_tc` on a TCX ingress link.
    #[default]
    Tc,
    /// `from_port` as generic (skb) XDP.
    XdpSkb,
    /// `from_port` as native (driver) XDP.
    XdpNative,
}

impl IngressHook {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tc => "tc",
            Self::XdpSkb => "xdp-skb",
            Self::XdpNative => "xdp-native",
        }
    }

    /// The kind of the port's link pin (`<ifname>:<kind>`).
    fn link_kind(self) -> &'static str {
        if self == Self::Tc { TC_INGRESS_LINK_SUFFIX } else { XDP_LINK_SUFFIX }
    }

    /// [`PortInfo::ingress`] value.
    fn port_info(self) -> u8 {
        match self {
            Self::Tc => PORT_INGRESS_TC,
            Self::XdpSkb => PORT_INGRESS_XDP_SKB,
            Self::XdpNative => PORT_INGRESS_XDP_NATIVE,
        }
    }

    /// The hook of an adopted link of `kind`, with what `PORTS` recorded for it.
    fn of_link(kind: &str, recorded: u8) -> Self {
        match (kind, recorded) {
            (TC_INGRESS_LINK_SUFFIX, _) => Self::Tc,
            (_, PORT_INGRESS_XDP_NATIVE) => Self::XdpNative,
            // PORT_INGRESS_XDP_SKB, or PORT_INGRESS_UNKNOWN: agents before PORTS recorded
            // hooks attached generic XDP only.
            _ => Self::XdpSkb,
        }
    }
}

/// Role of a port as shown in `status`.
#[must_use]
pub fn role_name(role: PortRole) -> &'static str {
    match role {
        PortRole::Vm => "vm",
        PortRole::Uplink => "uplink",
    }
}

/// Turns on the kernel's BPF run statistics (run time, run count) for as long as the
/// returned descriptor lives; the kernel turns them off again when the last holder
/// closes it, so nothing is left changed when the agent exits, even on a crash.
#[must_use]
pub fn enable_program_stats() -> Option<OwnedFd> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::warn!("cannot enable BPF run statistics ({e}); program run time reads 0");
            None
        }
    }
}

/// Options for loading the data path.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    pub pin_dir: PathBuf,
    pub flow_table_size: u32,
    pub ring_size: u32,
    /// Size in bytes of the payload sample ring buffer (`PAYLOAD_SAMPLES`).
    pub payload_ring_size: u32,
    /// Where `from_port` runs on VM ports and on uplinks.
    pub ingress: IngressHook,
    pub uplink_ingress: IngressHook,
    /// How TC programs attach to new ports (decided from the kernel and `--tc-attach`,
    /// see [`crate::datapath::kernel`]); adopted ports keep the kind they have.
    pub tc_attach: TcAttach,
}

impl DatapathOptions {
    pub fn validate(&self) -> Result<(), DatapathError> {
        if self.flow_table_size == 0 {
            return Err(DatapathError::InvalidOption("--flow-table-size must be at least 1".into()));
        }
        if !self.ring_size.is_power_of_two() || self.ring_size < 4096 {
            return Err(DatapathError::InvalidOption(format!(
                "--ring-size must be a power of two of at least 4096 bytes, not {}",
                self.ring_size
            )));
        }
        if !self.payload_ring_size.is_power_of_two() || self.payload_ring_size < 4096 {
            return Err(DatapathError::InvalidOption(format!(
                "--payload-ring-size must be a power of two of at least 4096 bytes, not {}",
                self.payload_ring_size
            )));
        }
        Ok(())
    }
}

/// Ids of the loaded programs, as `bpftool prog` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramIds {
    pub from_port: u32,
    #[serde(default)]
    pub from_port_tc: u32,
    pub to_port: u32,
}

impl ProgramIds {
    /// The id of the program `hook` runs.
    #[must_use]
    pub fn ingress(&self, hook: IngressHook) -> u32 {
        if hook == IngressHook::Tc { self.from_port_tc } else { self.from_port }
    }
}

/// What `status` shows about a port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStatus {
    pub name: String,
    pub ifindex: u32,
    pub role: String,
    /// Where `from_port` runs: `tc`, `xdp-skb` or `xdp-native`.
    pub ingress: String,
    /// Program id of `from_port` (or `from_port_tc`) on this port.
    pub from_port_id: u32,
    /// Program id of `to_port` (TC egress, TCX) on this port.
    pub to_port_id: u32,
    /// Whether both links are pinned (survive the agent).
    pub pinned: bool,
    /// How its TC programs are attached: `tcx` (bpf links) or `legacy` (`cls_bpf`
    /// filters in a `clsact` qdisc).
    #[serde(default)]
    pub tc_attach: String,
    /// Kernel ids of the port's ingress and egress links (0: not a pinned link). A
    /// restarted agent adopts the same links: their ids stay, the programs on them change.
    #[serde(default)]
    pub ingress_link_id: u32,
    #[serde(default)]
    pub tc_link_id: u32,
    /// Who says which endpoint is behind a VM port: `host`, `learned` (first use,
    /// confirmed), `locked` (its first MAC locked, identity not confirmed yet), or `none`
    /// (the rules' `unbound_ports` applies). Empty for uplinks.
    #[serde(default)]
    pub binding: String,
    /// The MAC a VM port is bound or locked to.
    #[serde(default)]
    pub bound_mac: Option<String>,
    /// The addresses a VM port whose endpoint has no fixed addresses took on first use
    /// (no other port may send from them while it uses them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learned_addresses: Vec<String>,
}

/// Maps that other parts of the agent own once the data path is loaded.
pub struct DatapathMaps {
    pub flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    pub events: RingBuf<MapData>,
    /// `PAYLOAD_SAMPLES`: the first bytes of flows' first payload packets.
    pub samples: RingBuf<MapData>,
}

/// Kernel run statistics of one program (`BPF_ENABLE_STATS`), summed over its runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// The loaded data path and its ports.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// Where this layout's maps are pinned (`<pin-dir>/v<N>`, see [`pin_layout`]).
    maps_dir: PathBuf,
    /// The maps of an older layout this agent upgrades from, until the upgrade ends:
    /// legacy filters whose programs use them are this data path's too.
    previous_maps: Option<PathBuf>,
    ingress: IngressHook,
    uplink_ingress: IngressHook,
    tc_attach: TcAttach,
    flow_table_size: u32,
    program_ids: ProgramIds,
    /// Why `from_port` (XDP) could not be loaded, if it could not: only ports whose
    /// ingress hook is XDP need it, and they are refused with this reason.
    xdp_unavailable: Option<String>,
    ports_map: BpfHashMap<MapData, u32, PortInfo>,
    /// What unbound VM ports locked on first use (see the data path's `identity`).
    learned: BpfHashMap<MapData, u32, LearnedValue>,
    port_macs: BpfHashMap<MapData, MacKey, u32>,
    /// What bound ports may send from besides their binding (`allowed_macs`,
    /// `allowed_addresses`).
    port_allowed: BpfHashMap<MapData, AllowedKey, u8>,
    /// What `PORT_ALLOWED` was last brought to (`None`: read it again).
    allowed_written: Option<std::collections::HashSet<AllowedKey>>,
    /// Addresses ports took on first use, and how many each holds (the data path's).
    learned_addrs: BpfHashMap<MapData, OwnerKey, LearnedAddr>,
    learned_addr_count: BpfHashMap<MapData, u32, u32>,
    /// The MAC each VM port's learned addresses were last kept for (see
    /// [`Datapath::free_addresses`]).
    addr_identity: std::collections::HashMap<u32, [u8; 6]>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, DatapathConfig>,
    ports: BTreeMap<u32, AttachedPort>,
    /// The double-buffered rule tables (`ENDPOINTS`, `ZONE_CIDRS`, `ZONES`, `POLICIES`).
    rule_tables: RuleTables,
    zone_pair_stats: PerCpuHashMap<MapData, ZonePairKey, ZonePairStats>,
    /// The compiled rule set in force, which gives ports their zones; `None`: observe only.
    rules: Option<Arc<CompiledRules>>,
}

/// The address of an `ADDR_OWNERS` / `LEARNED_ADDRS` key.
fn owner_ip(key: &OwnerKey) -> std::net::IpAddr {
    if key.family == backplane_common::flow::FAMILY_IPV4 {
        std::net::IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    } else {
        std::net::IpAddr::from(key.addr)
    }
}

/// What the endpoints want a VM port bound to, for one half of the rule tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortBinding {
    /// `BINDING_HOST` or `BINDING_LEARNED`.
    pub kind: u8,
    pub mac: [u8; 6],
    /// The endpoint's addresses are fixed (inventory `ips`).
    pub fixed: bool,
    /// Its zone; `None`: the one `interface:` members give the port.
    pub zone: Option<u16>,
    pub standing: u16,
    /// MACs and addresses it may send from besides its own (`allowed_macs`,
    /// `allowed_addresses`), as `PORT_ALLOWED` keys without the port.
    pub allowed: Vec<AllowedKey>,
}

/// A rule set written into the half of the rule tables that is not in force, waiting for
/// [`Datapath::activate_rules`].
#[must_use = "a staged rule set is not in force until activated"]
pub struct StagedRules {
    slot: u8,
    compiled: Arc<CompiledRules>,
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))
}

impl Datapath {
    /// Loads the object, creates (and pins) its maps, loads both programs and writes the
    /// initial configuration (observe only). Attaches nothing.
    pub fn load(object: &[u8], opts: &DatapathOptions) -> Result<(Self, DatapathMaps), DatapathError> {
        opts.validate()?;
        let maps_dir = pin_layout::maps_dir(&opts.pin_dir, PIN_LAYOUT_VERSION);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(FLOWS, opts.flow_table_size)
            .map_max_entries(FLOW_EVENTS, opts.ring_size)
            .map_max_entries(PAYLOAD_SAMPLES, opts.payload_ring_size)
            .load(object)
            .map_err(|e| match e {
                aya::EbpfError::ProgramError(p) => DatapathError::program("(object)", p),
                e => DatapathError::Object(Box::new(e)),
            })?;

        let xdp: &mut Xdp = ebpf
            .program_mut(PROG_FROM_PORT)
            .ok_or(DatapathError::MissingProgram(PROG_FROM_PORT))?
            .try_into()
            .map_err(|e| DatapathError::program(PROG_FROM_PORT, e))?;
        // The XDP program serves only ports whose ingress hook is XDP: a kernel that
        // refuses it fails those ports, not the start, unless the options ask for XDP.
        let (from_port, xdp_unavailable) = match xdp.load().and_then(|()| xdp.info()) {
            Ok(info) => (info.id(), None),
            Err(e) if opts.ingress == IngressHook::Tc && opts.uplink_ingress == IngressHook::Tc => {
                let why = report(&DatapathError::program(PROG_FROM_PORT, e));
                log::warn!("{why}; ports with an XDP ingress hook cannot be attached");
                (0, Some(why))
            }
            Err(e) => return Err(DatapathError::program(PROG_FROM_PORT, e)),
        };

        let mut load_classifier = |name: &'static str| -> Result<u32, DatapathError> {
            let tc: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|e| DatapathError::program(name, e))?;
            tc.load().map_err(|e| DatapathError::program(name, e))?;
            Ok(tc.info().map_err(|e| DatapathError::program(name, e))?.id())
        };
        let from_port_tc = load_classifier(PROG_FROM_PORT_TC)?;
        let to_port = load_classifier(PROG_TO_PORT)?;

        let flows = BpfHashMap::try_from(take_map(&mut ebpf, FLOWS)?).map_err(DatapathError::map(FLOWS))?;
        let events = RingBuf::try_from(take_map(&mut ebpf, FLOW_EVENTS)?).map_err(DatapathError::map(FLOW_EVENTS))?;
        let samples =
            RingBuf::try_from(take_map(&mut ebpf, PAYLOAD_SAMPLES)?).map_err(DatapathError::map(PAYLOAD_SAMPLES))?;
        let ports_map = BpfHashMap::try_from(take_map(&mut ebpf, PORTS)?).map_err(DatapathError::map(PORTS))?;
        let learned = BpfHashMap::try_from(take_map(&mut ebpf, LEARNED)?).map_err(DatapathError::map(LEARNED))?;
        let port_macs = BpfHashMap::try_from(take_map(&mut ebpf, PORT_MACS)?).map_err(DatapathError::map(PORT_MACS))?;
        let port_allowed =
            BpfHashMap::try_from(take_map(&mut ebpf, PORT_ALLOWED)?).map_err(DatapathError::map(PORT_ALLOWED))?;
        let learned_addrs =
            BpfHashMap::try_from(take_map(&mut ebpf, LEARNED_ADDRS)?).map_err(DatapathError::map(LEARNED_ADDRS))?;
        let learned_addr_count = BpfHashMap::try_from(take_map(&mut ebpf, LEARNED_ADDR_COUNT)?)
            .map_err(DatapathError::map(LEARNED_ADDR_COUNT))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, COUNTERS)?).map_err(DatapathError::map(COUNTERS))?;
        // A new CONFIG is all zeros: generation 0, observe only until rule sets arrive. An
        // adopted one keeps the generation in force (see `observe_only`).
        let config: Array<MapData, DatapathConfig> =
            Array::try_from(take_map(&mut ebpf, CONFIG)?).map_err(DatapathError::map(CONFIG))?;
        // The flow table pinned by a previous agent keeps its size.
        let flow_table_size =
            aya::maps::MapInfo::from_pin(maps_dir.join(FLOWS)).map_or(opts.flow_table_size, |i| i.max_entries());
        let rule_tables = RuleTables::from_ebpf(&mut ebpf).map_err(DatapathError::RuleTables)?;
        let zone_pair_stats = PerCpuHashMap::try_from(take_map(&mut ebpf, ZONE_PAIR_STATS)?)
            .map_err(DatapathError::map(ZONE_PAIR_STATS))?;

        let datapath = Self {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            maps_dir,
            previous_maps: None,
            ingress: opts.ingress,
            uplink_ingress: opts.uplink_ingress,
            tc_attach: opts.tc_attach,
            flow_table_size,
            program_ids: ProgramIds { from_port, from_port_tc, to_port },
            xdp_unavailable,
            ports_map,
            learned,
            port_macs,
            port_allowed,
            allowed_written: None,
            learned_addrs,
            learned_addr_count,
            addr_identity: std::collections::HashMap::new(),
            counters,
            config,
            ports: BTreeMap::new(),
            rule_tables,
            zone_pair_stats,
            rules: None,
        };
        Ok((datapath, DatapathMaps { flows, events, samples }))
    }

    /// The object, for aya-log (which takes its own map out of it).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Writes the observe-only configuration (generation 0, no flags): for an agent that
    /// runs without rules on maps a previous agent left enforcing.
    pub fn observe_only(&mut self) -> Result<(), MapError> {
        self.config.set(CONFIG_INDEX, DatapathConfig::default(), 0)
    }

    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Where this layout's maps are pinned.
    #[must_use]
    pub fn maps_dir(&self) -> &Path {
        &self.maps_dir
    }

    /// Copies the state of an older layout's maps into this data path's (see
    /// [`pin_layout`]); its ports are then adopted and switched as any adopted port. The
    /// copied configuration observes only until this agent puts its rules in force: the
    /// rule tables are not carried.
    pub fn upgrade_from(&mut self, version: u32, dir: &Path) -> Result<pin_layout::Migration, DatapathError> {
        // A configuration of this layout that is not all zeros: an earlier agent began
        // this upgrade, and ports it switched may be judged by these maps already.
        let resume = self.config.get(&CONFIG_INDEX, 0).is_ok_and(|c| c != DatapathConfig::default());
        let migration = pin_layout::upgrade(version, dir, &self.maps_dir, resume)
            .map_err(|reason| DatapathError::PinnedMaps { path: dir.to_owned(), reason })?;
        self.previous_maps = Some(dir.to_owned());
        if resume {
            log::warn!("resuming an upgrade from layout {version} that an earlier agent began in {}", dir.display());
            return Ok(migration);
        }
        // The generation carries on (so that every copied flow is judged again under the
        // rules this agent puts in force); enforcement waits for those rules.
        let observing = self
            .config
            .get(&CONFIG_INDEX, 0)
            .and_then(|c| self.config.set(CONFIG_INDEX, DatapathConfig { flags: c.flags & !CONFIG_ENFORCE, ..c }, 0));
        observing.map_err(|e| DatapathError::Map { map: CONFIG, source: e })?;
        Ok(migration)
    }

    /// The hooks `from_port` gets on new VM ports and new uplinks.
    #[must_use]
    pub fn ingress_hooks(&self) -> (IngressHook, IngressHook) {
        (self.ingress, self.uplink_ingress)
    }

    /// How TC programs attach to new ports.
    #[must_use]
    pub fn tc_attach(&self) -> TcAttach {
        self.tc_attach
    }

    #[must_use]
    pub fn flow_table_size(&self) -> u32 {
        self.flow_table_size
    }

    #[must_use]
    pub fn program_ids(&self) -> ProgramIds {
        self.program_ids
    }

    /// Run time and run count the kernel keeps for `from_port`, `from_port_tc` and
    /// `to_port` (zero unless BPF statistics are enabled; see
    /// [`enable_program_stats`]).
    #[must_use]
    pub fn program_stats(&self) -> [(&'static str, ProgramStats); 3] {
        let stats = |name: &'static str| {
            let info = self.ebpf.program(name).and_then(|p| p.info().ok());
            info.map_or_else(ProgramStats::default, |i| ProgramStats {
                run_time_ns: u64::try_from(i.run_time().as_nanos()).unwrap_or(u64::MAX),
                run_count: i.run_count(),
            })
        };
        [
            (PROG_FROM_PORT, stats(PROG_FROM_PORT)),
            (PROG_FROM_PORT_TC, stats(PROG_FROM_PORT_TC)),
            (PROG_TO_PORT, stats(PROG_TO_PORT)),
        ]
    }

    /// Whether a rule set is in force. A `CONFIG` that cannot be read counts as enforcing:
    /// a port is rather blocked than let through unjudged.
    #[must_use]
    pub fn enforcing(&self) -> bool {
        self.config().map_or(true, |c| c.flags & backplane_common::config::CONFIG_ENFORCE != 0)
    }

    /// The configuration in force (`CONFIG[0]`).
    pub fn config(&self) -> Result<DatapathConfig, MapError> {
        self.config.get(&CONFIG_INDEX, 0)
    }

    /// The attached port of `ifindex`, with its name.
    #[must_use]
    pub fn attached_name(&self, ifindex: u32) -> Option<&str> {
        self.ports.get(&ifindex).map(|p| p.name.as_str())
    }

    /// The attached port named `name`: its ifindex and role.
    #[must_use]
    pub fn port_named(&self, name: &str) -> Option<(u32, PortRole)> {
        self.ports.iter().find(|(_, p)| p.name == name).map(|(&i, p)| (i, p.role))
    }

    /// The ifindex of the attached VM port named `name`; the error says why not.
    pub fn vm_port_named(&self, name: &str) -> Result<u32, String> {
        match self.port_named(name) {
            Some((ifindex, PortRole::Vm)) => Ok(ifindex),
            Some(_) => Err(format!("{name} is not a VM port")),
            None => Err(format!("{name} is not a port this agent is attached to")),
        }
    }

    /// Attached ports by ifindex: name and role.
    #[must_use]
    pub fn attached_ports(&self) -> BTreeMap<u32, (String, PortRole)> {
        self.ports.iter().map(|(&i, p)| (i, (p.name.clone(), p.role))).collect()
    }

    /// Where `from_port` runs on the attached port of `ifindex`.
    #[must_use]
    pub fn port_hook(&self, ifindex: u32) -> Option<IngressHook> {
        self.ports.get(&ifindex).map(|p| p.hook)
    }

    /// Ifindexes of all attached ports.
    #[must_use]
    pub fn attached(&self) -> Vec<u32> {
        self.ports.keys().copied().collect()
    }

    /// The zone a port of this name has under the rules in force (0: none).
    fn port_zone(&self, name: &str) -> u16 {
        self.rules.as_ref().and_then(|r| r.zone_for_interface(name)).unwrap_or(0)
    }

    /// Writes a compiled rule set into the half of the rule tables that is not in force,
    /// with the zones of the attached ports for that half. The rules in force are not
    /// touched; on failure the half written is cleared again.
    pub fn stage_rules(
        &mut self,
        compiled: Arc<CompiledRules>,
        overlay: &EndpointOverlay,
    ) -> Result<StagedRules, TableError> {
        let config = self.config.get(&CONFIG_INDEX, 0).map_err(|source| TableError::Map { map: CONFIG, source })?;
        let slot = rule_tables::next_slot(&config);
        self.rule_tables.write_slot_with(slot, &compiled, overlay)?;
        let ports: Vec<(u32, &str)> = self.ports.iter().map(|(&i, p)| (i, p.name.as_str())).collect();
        rule_tables::write_port_zones(&mut self.ports_map, slot, &compiled, ports, overlay)?;
        Ok(StagedRules { slot, compiled })
    }

    /// Puts a staged rule set in force with one write of `CONFIG`; returns its generation.
    /// Flows judged under an earlier generation are judged again on their next packet.
    pub fn activate_rules(&mut self, staged: StagedRules) -> Result<u32, TableError> {
        let generation = rule_tables::activate(&mut self.config, staged.slot, &staged.compiled)?;
        self.rules = Some(staged.compiled);
        self.release_mac_only_locks();
        Ok(generation)
    }

    /// Removes the locks that hold unbound ports to their first MAC without an identity
    /// (`LEARNED_MAC_ONLY`): under the rule set now in force such a port may learn, and
    /// its next frame locks it again as these rules say.
    fn release_mac_only_locks(&mut self) {
        let held: Vec<u32> = self
            .learned
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, l)| l.flags & LEARNED_MAC_ONLY != 0)
            .map(|(i, _)| i)
            .collect();
        for ifindex in held {
            self.set_learned(ifindex, None);
        }
    }

    /// Takes `compiled` as the rule set in force without writing it: the rule set a
    /// previous agent left in the tables (ports are placed by name with it).
    pub fn know_rules(&mut self, compiled: Arc<CompiledRules>) {
        self.rules = Some(compiled);
    }

    /// The half of the rule tables the data path reads now (0 while observing only).
    pub fn active_slot(&self) -> Result<u8, TableError> {
        let config = self.config.get(&CONFIG_INDEX, 0).map_err(|source| TableError::Map { map: CONFIG, source })?;
        Ok(config.active_slot & 1)
    }

    /// Writes what the endpoints want changed in the half `slot` of the rule tables
    /// (the half in force, one entry at a time: a packet sees the old or the new entry).
    /// Every entry is tried; a failure is logged and leaves that entry as it was. The
    /// ports' bindings are written first: a standing that tightens closes `to_port`'s
    /// shortcut before the entry changes.
    pub fn write_endpoints(&mut self, slot: u8, change: &EndpointChange) -> EndpointChangeDone {
        if let Some(bindings) = &change.ports {
            self.write_port_bindings(slot, bindings);
        }
        let tables = &mut self.rule_tables;
        let mut done = EndpointChangeDone::default();
        for (mac, value) in &change.write {
            match tables.write_endpoint(slot, *mac, *value) {
                Ok(()) => done.written.push(*mac),
                Err(e) => log::error!("cannot write endpoint {mac}: {}", report(&e)),
            }
        }
        for (mac, compiled) in &change.reset {
            let result = match compiled {
                Some(value) => tables.write_endpoint(slot, *mac, *value),
                None => tables.remove_endpoint(slot, *mac),
            };
            if let Err(e) = result {
                log::error!("cannot reset endpoint {mac}: {}", report(&e));
            }
        }
        for entry in &change.add_vpatches {
            if let Err(e) = tables.write_vpatch(slot, entry) {
                log::error!("cannot write a virtual patch entry: {}", report(&e));
            }
        }
        for entry in &change.remove_vpatches {
            let _ = tables.remove_vpatch(slot, entry);
        }
        done.owners = change.owners.as_ref().map(|owners| tables.set_owners(owners));
        done
    }

    /// Writes the bindings of the attached VM ports into `PORTS` for the half `slot`: a
    /// port in `bindings` gets its endpoint's MAC, zone and standing; any other VM port is
    /// unbound (its zone: the one `interface:` members give it).
    pub fn write_port_bindings(&mut self, slot: u8, bindings: &std::collections::HashMap<u32, PortBinding>) {
        let vm_ports: Vec<(u32, String)> =
            self.ports.iter().filter(|(_, p)| p.role == PortRole::Vm).map(|(&i, p)| (i, p.name.clone())).collect();
        let mut changed = false;
        for (ifindex, name) in vm_ports {
            let Ok(info) = self.ports_map.get(&ifindex, 0) else { continue };
            let s = usize::from(slot & 1);
            let mut new = info;
            if let Some(b) = bindings.get(&ifindex) {
                new.binding = b.kind;
                new.mac = b.mac;
                new.zone[s] = b.zone.unwrap_or_else(|| self.port_zone(&name));
                new.standing[s] = b.standing;
                new.flags = if b.fixed { new.flags | PORT_ADDRS_FIXED } else { new.flags & !PORT_ADDRS_FIXED };
            } else {
                new.binding = BINDING_NONE;
                new.mac = [0; 6];
                new.standing = [0; 2];
                new.zone[s] = self.port_zone(&name);
                new.flags &= !PORT_ADDRS_FIXED;
            }
            if new != info {
                changed = true;
                if let Err(e) = self.ports_map.insert(ifindex, new, 0) {
                    log::error!("{name}: cannot write its binding into PORTS: {}", report(&e));
                }
            }
        }
        if changed {
            self.ports_changed();
        }
        self.write_allowed(bindings);
        self.free_addresses();
    }

    /// Frees the addresses ports took on first use that are no longer their endpoint's:
    /// a port now bound to (or locked to) another MAC, or bound to nobody, or gone. Looks
    /// at the table only when some port's identity changed since the last look, and then
    /// also sets every port's count to what the table holds (nothing drifts).
    pub fn free_addresses(&mut self) {
        let identity: std::collections::HashMap<u32, [u8; 6]> = self
            .ports
            .iter()
            .filter(|(_, p)| p.role == PortRole::Vm)
            .filter_map(|(&i, _)| {
                let info = self.ports_map.get(&i, 0).ok()?;
                if info.binding != BINDING_NONE {
                    return Some((i, info.mac));
                }
                self.learned.get(&i, 0).ok().map(|l| (i, l.mac))
            })
            .collect();
        if identity == self.addr_identity {
            return;
        }
        let entries: Vec<(OwnerKey, LearnedAddr)> = self.learned_addrs.iter().filter_map(Result::ok).collect();
        let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        let mut freed = 0;
        for (key, held) in entries {
            if identity.get(&held.ifindex) == Some(&held.mac) {
                *counts.entry(held.ifindex).or_default() += 1;
            } else if self.learned_addrs.remove(&key).is_ok() {
                freed += 1;
            }
        }
        let known: Vec<u32> = self.learned_addr_count.keys().filter_map(Result::ok).collect();
        for ifindex in known.iter().filter(|i| !counts.contains_key(i)) {
            let _ = self.learned_addr_count.remove(ifindex);
        }
        for (ifindex, n) in &counts {
            if let Err(e) = self.learned_addr_count.insert(ifindex, n, 0) {
                log::error!("port {ifindex}: cannot write how many addresses it holds: {}", report(&e));
            }
        }
        if freed > 0 {
            log::info!("{freed} address(es) taken on first use freed: their ports' endpoints changed or left");
        }
        self.addr_identity = identity;
    }

    /// Brings `PORT_ALLOWED` up to what the bindings allow: entries of ports no longer
    /// bound (or no longer allowed) removed, new ones added.
    /// The map is read only when what is wanted differs from what was last written.
    fn write_allowed(&mut self, bindings: &std::collections::HashMap<u32, PortBinding>) {
        let wanted: std::collections::HashSet<AllowedKey> = bindings
            .iter()
            .filter(|(i, _)| self.ports.get(i).is_some_and(|p| p.role == PortRole::Vm))
            .flat_map(|(&ifindex, b)| b.allowed.iter().map(move |k| AllowedKey { ifindex, ..*k }))
            .collect();
        if self.allowed_written.as_ref() == Some(&wanted) {
            return;
        }
        let present: std::collections::HashSet<AllowedKey> = self.port_allowed.keys().filter_map(Result::ok).collect();
        for key in present.iter().filter(|k| !wanted.contains(k)) {
            if let Err(e) = self.port_allowed.remove(key) {
                log::error!("port {}: cannot remove an allowed source from PORT_ALLOWED: {}", key.ifindex, report(&e));
            }
        }
        for key in wanted.iter().filter(|k| !present.contains(k)) {
            if let Err(e) = self.port_allowed.insert(key, 1, 0) {
                log::error!("port {}: cannot write an allowed source into PORT_ALLOWED: {}", key.ifindex, report(&e));
            }
        }
        self.allowed_written = Some(wanted);
    }

    /// Tells the data path that `PORTS` changed (`DatapathConfig::ports_epoch`), so that
    /// no CPU goes on with its copy of an entry.
    pub fn ports_changed(&mut self) {
        let result = self.config.get(&CONFIG_INDEX, 0).and_then(|c| {
            let ports_epoch = c.ports_epoch.wrapping_add(1).max(1);
            self.config.set(CONFIG_INDEX, DatapathConfig { ports_epoch, ..c }, 0)
        });
        if let Err(e) = result {
            log::error!("cannot tell the data path that PORTS changed: {}", report(&e));
        }
    }

    /// What VM port `ifindex` locked on first use, if it did.
    #[must_use]
    pub fn learned(&self, ifindex: u32) -> Option<LearnedValue> {
        self.learned.get(&ifindex, 0).ok()
    }

    /// Every port's lock on first use (a previous agent's too: the map is pinned).
    #[must_use]
    pub fn all_learned(&self) -> Vec<(u32, LearnedValue)> {
        self.learned.iter().filter_map(Result::ok).collect()
    }

    /// Sets what VM port `ifindex` is locked to (the host said which MAC is behind it,
    /// and its zone is still to learn), or clears the lock (`None`: the port's VM is
    /// gone, or the host bound it).
    pub fn set_learned(&mut self, ifindex: u32, value: Option<LearnedValue>) {
        let not_found = |r: Result<(), MapError>| match r {
            Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        };
        // `PORT_MACS` says which port a locked MAC is behind: it follows `LEARNED`.
        if let Ok(old) = self.learned.get(&ifindex, 0) {
            let key = MacKey { mac: old.mac, _pad: [0; 2] };
            if self.port_macs.get(&key, 0).is_ok_and(|i| i == ifindex) {
                let _ = not_found(self.port_macs.remove(&key));
            }
        }
        let result = match value {
            Some(v) => self
                .learned
                .insert(ifindex, v, 0)
                .and_then(|()| self.port_macs.insert(MacKey { mac: v.mac, _pad: [0; 2] }, ifindex, 0)),
            None => not_found(self.learned.remove(&ifindex)),
        };
        if let Err(e) = result {
            log::error!("cannot write LEARNED for ifindex {ifindex}: {}", report(&e));
        }
    }

    /// Marks (or clears) port `ifindex`'s lock on first use as a held claim
    /// (`LEARNED_HELD`: judged unbound, its frames dropped) while it is locked to `mac`.
    pub fn hold_learned(&mut self, ifindex: u32, mac: [u8; 6], held: bool) {
        let Ok(mut lock) = self.learned.get(&ifindex, 0) else { return };
        if lock.mac != mac {
            return;
        }
        let flags = if held { lock.flags | LEARNED_HELD } else { lock.flags & !LEARNED_HELD };
        if flags == lock.flags {
            return;
        }
        lock.flags = flags;
        if let Err(e) = self.learned.insert(ifindex, lock, 0) {
            log::error!("cannot mark the claim on ifindex {ifindex} in LEARNED: {}", report(&e));
        }
    }

    /// Removes what the rules allowed port `ifindex` (it is gone, or a new device).
    pub(crate) fn forget_allowed(&mut self, ifindex: u32) {
        let keys: Vec<AllowedKey> =
            self.port_allowed.keys().filter_map(Result::ok).filter(|k| k.ifindex == ifindex).collect();
        for key in keys {
            let _ = self.port_allowed.remove(&key);
        }
        // Read the map again at the next write.
        self.allowed_written = None;
    }

    /// The flags of the endpoint entries in the half of the rule tables in force;
    /// `None` while observing only (no half is in force).
    #[must_use]
    pub fn endpoint_flags_in_force(&self) -> Option<Vec<u16>> {
        let config = self.config().unwrap_or_default();
        (config.flags & CONFIG_ENFORCE != 0).then(|| self.rule_tables.endpoint_flags(config.active_slot & 1))
    }

    /// The zone the rules in force give a port by its name (0: none).
    #[must_use]
    pub fn zone_of_port(&self, ifindex: u32) -> u16 {
        self.ports.get(&ifindex).map_or(0, |p| self.port_zone(&p.name))
    }

    /// Whether `ifindex` is an attached VM-facing port.
    #[must_use]
    pub fn is_vm_port(&self, ifindex: u32) -> bool {
        self.ports.get(&ifindex).is_some_and(|p| p.role == PortRole::Vm)
    }

    /// The compiled rule set in force, if any.
    #[must_use]
    pub fn rules(&self) -> Option<&Arc<CompiledRules>> {
        self.rules.as_ref()
    }

    /// Packets and bytes denied or audited, by (source zone, destination zone, verdict,
    /// reason), summed over CPUs; in key order. Entries that cannot be read are skipped.
    #[must_use]
    pub fn zone_pair_stats(&self) -> Vec<(ZonePairKey, ZonePairStats)> {
        let mut out: Vec<(ZonePairKey, ZonePairStats)> = self
            .zone_pair_stats
            .iter()
            .filter_map(|entry| match entry {
                Ok((key, per_cpu)) => Some((
                    key,
                    per_cpu.iter().fold(ZonePairStats::default(), |sum, s| ZonePairStats {
                        packets: sum.packets.wrapping_add(s.packets),
                        bytes: sum.bytes.wrapping_add(s.bytes),
                    }),
                )),
                Err(MapError::KeyNotFound) => None,
                Err(e) => {
                    log::debug!("reading {ZONE_PAIR_STATS}: {e}");
                    None
                }
            })
            .collect();
        out.sort_by_key(|(k, _)| (k.src_zone, k.dst_zone, k.verdict, k.reason));
        out
    }

    /// Ports as `status` shows them, by ifindex.
    #[must_use]
    pub fn port_status(&self) -> Vec<PortStatus> {
        self.ports
            .iter()
            .map(|(&ifindex, p)| {
                // The program a pinned link runs, as the kernel says (an adopted link
                // runs the previous agent's until it is upgraded).
                let (ingress_link_id, from_port_id) =
                    p.ingress.link_ids().unwrap_or((0, self.program_ids.ingress(p.hook)));
                let (tc_link_id, to_port_id) = p.tc.link_ids().unwrap_or((0, self.program_ids.to_port));
                let (binding, bound_mac) = self.binding_of(ifindex, p.role);
                PortStatus {
                    binding,
                    bound_mac,
                    learned_addresses: Vec::new(),
                    name: p.name.clone(),
                    ifindex,
                    role: role_name(p.role).into(),
                    ingress: p.hook.as_str().into(),
                    from_port_id,
                    to_port_id,
                    pinned: p.ingress.pinned() && p.tc.pinned(),
                    tc_attach: p.tc.kind().into(),
                    ingress_link_id,
                    tc_link_id,
                }
            })
            .collect()
    }

    /// [`Datapath::port_status`] with the addresses each port took on first use: one
    /// read of the whole `LEARNED_ADDRS` table, for `status` only (not for every metrics
    /// scrape).
    #[must_use]
    pub fn port_status_with_addresses(&self) -> Vec<PortStatus> {
        let mut learned: std::collections::HashMap<u32, Vec<String>> = std::collections::HashMap::new();
        for (key, held) in self.learned_addrs.iter().filter_map(Result::ok) {
            learned.entry(held.ifindex).or_default().push(owner_ip(&key).to_string());
        }
        let mut ports = self.port_status();
        for p in &mut ports {
            if let Some(mut addrs) = learned.remove(&p.ifindex) {
                addrs.sort();
                p.learned_addresses = addrs;
            }
        }
        ports
    }

    /// How a port is bound, as `status` says it (see [`PortStatus::binding`]).
    fn binding_of(&self, ifindex: u32, role: PortRole) -> (String, Option<String>) {
        if role != PortRole::Vm {
            return (String::new(), None);
        }
        let mac = |m: [u8; 6]| Some(backplane_rules::MacAddr(m).to_string());
        match self.ports_map.get(&ifindex, 0) {
            Ok(info) if info.binding == backplane_common::config::BINDING_HOST => ("host".into(), mac(info.mac)),
            Ok(info) if info.binding != BINDING_NONE => ("learned".into(), mac(info.mac)),
            _ => match self.learned(ifindex) {
                // Held to its MAC, with no identity: unbound all the same.
                Some(l) if l.flags & LEARNED_MAC_ONLY != 0 => ("none".into(), mac(l.mac)),
                Some(l) if l.flags & LEARNED_HELD != 0 => ("held".into(), mac(l.mac)),
                Some(l) => ("locked".into(), mac(l.mac)),
                None => ("none".into(), None),
            },
        }
    }

    /// All counters, summed over CPUs, in [`Counter::ALL`] order. A counter the map
    /// does not have (an older object) reads 0.
    #[must_use]
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let total = self
                    .counters
                    .get(&(c as u32), 0)
                    .map_or(0, |per_cpu| per_cpu.iter().copied().fold(0u64, u64::wrapping_add));
                (c, total)
            })
            .collect()
    }

    /// Detaches every port, removes every pin this agent made and the pin directory.
    /// The maps themselves live on until the agent's last descriptor closes.
    pub fn detach_all_and_unpin(&mut self) {
        for ifindex in self.attached() {
            self.detach_port(ifindex);
        }
        let pin_dir = self.pin_dir.clone();
        for name in PINNED_MAPS {
            let path = self.maps_dir.join(name);
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                log::warn!("cannot remove map pin {}: {e}", path.display());
            }
        }
        for dir in [links_dir(&pin_dir), self.maps_dir.clone(), pin_dir.clone()] {
            if let Err(e) = fs::remove_dir(&dir)
                && e.kind() != io::ErrorKind::NotFound
            {
                log::warn!("cannot remove {}: {e}", dir.display());
            }
        }
        // The shared parent of the default pin directories goes when the last node leaves.
        if pin_dir.parent() == Some(Path::new(BPF_PIN_ROOT)) {
            let _ = fs::remove_dir(BPF_PIN_ROOT);
        }
    }

    /// Leaves every port attached through its pinned links and every map pinned; links
    /// that could not be pinned are detached as the agent goes.
    pub fn leave_attached(&self) {
        let pinned = self.ports.values().filter(|p| p.ingress.pinned() && p.tc.pinned()).count();
        log::info!("leaving the data path attached to {pinned} port(s) through pins in {}", self.pin_dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated() {
        let ok = DatapathOptions {
            pin_dir: "/sys/fs/bpf/x".into(),
            flow_table_size: 262_144,
            ring_size: 4 << 20,
            payload_ring_size: 1 << 20,
            ingress: IngressHook::Tc,
            uplink_ingress: IngressHook::Tc,
            tc_attach: TcAttach::Tcx,
        };
        assert!(ok.validate().is_ok());
        assert!(DatapathOptions { ring_size: 3 << 20, ..ok.clone() }.validate().is_err());
        assert!(DatapathOptions { ring_size: 2048, ..ok.clone() }.validate().is_err());
        assert!(DatapathOptions { flow_table_size: 0, ..ok }.validate().is_err());
    }
}
