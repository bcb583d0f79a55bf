//! Loading the data path, attaching it to ports, putting rule sets in force (staged into
//! the idle half of the rule tables, then activated; see [`crate::rule_tables`]), and
//! reading its counters.
//!
//! Maps are pinned under the pin directory (`<pin-dir>/<MAP>`) and each port's two
//! links under `<pin-dir>/links/<ifname>:tcin` (or `:xdp`) and `:tc`, so the programs stay attached
//! and the maps keep their state when the agent exits without `--detach-on-exit`.
//! (bpffs forbids dots in names, hence `:` rather than `.`; see [`crate::paths`].)

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
};
use backplane_common::{
    Counter, DatapathConfig, FlowKey, FlowValue, PortInfo, PortRole,
    config::{CONFIG_ENFORCE, CONFIG_INDEX},
    config::{PORT_INGRESS_LIVE, PORT_INGRESS_TC, PORT_INGRESS_XDP_NATIVE, PORT_INGRESS_XDP_SKB},
    maps::{
        CONFIG, COUNTERS, FLOW_EVENTS, FLOWS, PAYLOAD_SAMPLES, PIN_LAYOUT_VERSION, PINNED_MAPS, PORTS, PROG_FROM_PORT,
        PROG_FROM_PORT_TC, PROG_TO_PORT, ZONE_PAIR_STATS,
    },
    policy::{ZonePairKey, ZonePairStats},
};
use backplane_rules::CompiledRules;
use serde::{Deserialize, Serialize};

use crate::{
    error::{DatapathError, PortError, report},
    ifnames::{index_to_name, name_to_index},
    kernel::TcAttach,
    paths::{
        BPF_PIN_ROOT, BPFFS_ROOT, TC_INGRESS_LINK_SUFFIX, TC_LINK_SUFFIX, XDP_LINK_SUFFIX, link_pin_kind,
        link_pin_path, links_dir,
    },
    pin_layout,
    pins::{self, PinCheck},
    rule_tables::{self, EndpointOverlay, RuleTables, TableError},
    tc_legacy::{self, Direction, LegacyTcError},
};

/// `statfs(2)` magic number of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
    /// see [`crate::kernel`]); adopted ports keep the kind they have.
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

/// One way a program is attached to a port.
#[derive(Debug)]
enum Attachment {
    /// A bpf link pinned at `path`: it stays attached when the agent exits.
    Pinned { link: FdLink, path: PathBuf },
    /// A link a previous agent pinned at `path`, still running that agent's program
    /// until [`Datapath::upgrade_adopted`] puts this agent's program on it.
    Adopted { link: FdLink, path: PathBuf },
    /// An XDP link the kernel would not let us pin (netlink fallback): it lives as long
    /// as the agent.
    Xdp(XdpLink),
    /// A TC link that could not be pinned: it lives as long as the agent.
    Tc(SchedClassifierLink),
    /// A legacy `cls_bpf` filter at backplane's preference and handle ([`tc_legacy`]):
    /// it stays in the port's `clsact` qdisc when the agent exits. `adopted`: a previous
    /// agent's, running its program until [`Datapath::upgrade_adopted`].
    Filter { ifindex: u32, at: TcAttachType, prog_id: u32, adopted: bool },
}

impl Attachment {
    /// Whether it outlives the agent (a pinned link, or a legacy filter).
    fn pinned(&self) -> bool {
        matches!(self, Self::Pinned { .. } | Self::Adopted { .. } | Self::Filter { .. })
    }

    /// How a TC program is attached: `tcx` or `legacy` (an XDP attachment: `xdp`).
    fn kind(&self) -> &'static str {
        match self {
            Self::Filter { .. } => TcAttach::Legacy.as_str(),
            Self::Xdp(_) => "xdp",
            Self::Pinned { .. } | Self::Adopted { .. } | Self::Tc(_) => TcAttach::Tcx.as_str(),
        }
    }

    fn adopted(&self) -> bool {
        matches!(self, Self::Adopted { .. } | Self::Filter { adopted: true, .. })
    }

    /// The kernel's link id and the program on the link, for a pinned link.
    fn link_ids(&self) -> Option<(u32, u32)> {
        match self {
            Self::Pinned { link, .. } | Self::Adopted { link, .. } => {
                link.info().ok().map(|i| (i.id(), i.program_id()))
            }
            Self::Filter { prog_id, .. } => Some((0, *prog_id)),
            Self::Xdp(_) | Self::Tc(_) => None,
        }
    }

    /// Detaches: removes the pin (if any) and closes the link.
    fn detach(self) {
        match self {
            Self::Pinned { link, path } | Self::Adopted { link, path } => {
                if let Err(e) = fs::remove_file(&path)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    log::warn!("cannot remove link pin {}: {e}", path.display());
                }
                drop(link);
            }
            Self::Xdp(link) => drop(link),
            Self::Tc(link) => drop(link),
            Self::Filter { ifindex, at, prog_id, .. } => detach_filter(ifindex, at, prog_id),
        }
    }

    /// Moves the pin after the interface was renamed.
    fn rename(&mut self, new_path: PathBuf) {
        if let Self::Pinned { path, .. } | Self::Adopted { path, .. } = self {
            if *path == new_path {
                return;
            }
            match fs::rename(&*path, &new_path) {
                Ok(()) => *path = new_path,
                Err(e) => log::warn!("cannot move link pin {} to {}: {e}", path.display(), new_path.display()),
            }
        }
    }
}

/// What a previous agent left on a port: its ingress attachment (with the kind of its
/// pin, `None` for a legacy filter) and its egress attachment.
type Found = (Option<(Option<&'static str>, Attachment)>, Option<Attachment>);

/// A port the data path is attached to.
#[derive(Debug)]
struct AttachedPort {
    name: String,
    role: PortRole,
    /// Where `from_port` runs, and its link.
    hook: IngressHook,
    ingress: Attachment,
    /// `to_port` (TCX egress).
    tc: Attachment,
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
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, DatapathConfig>,
    ports: BTreeMap<u32, AttachedPort>,
    /// The double-buffered rule tables (`ENDPOINTS`, `ZONE_CIDRS`, `ZONES`, `POLICIES`).
    rule_tables: RuleTables,
    zone_pair_stats: PerCpuHashMap<MapData, ZonePairKey, ZonePairStats>,
    /// The compiled rule set in force, which gives ports their zones; `None`: observe only.
    rules: Option<Arc<CompiledRules>>,
}

/// A rule set written into the half of the rule tables that is not in force, waiting for
/// [`Datapath::activate_rules`].
#[must_use = "a staged rule set is not in force until activated"]
pub struct StagedRules {
    slot: u8,
    compiled: Arc<CompiledRules>,
}

/// Mounts bpffs at /sys/fs/bpf unless something is mounted there already.
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(DatapathError::Mounts)?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_src, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some(BPFFS_ROOT) && fstype == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    log::info!("bpffs is not mounted; mounting it at {BPFFS_ROOT}");
    let path = PathBuf::from(BPFFS_ROOT);
    fs::create_dir_all(&path).map_err(|source| DatapathError::MountBpffs { path: path.clone(), source })?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("bpf"), c(BPFFS_ROOT), c("bpf"));
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(DatapathError::MountBpffs { path, source: io::Error::last_os_error() });
    }
    Ok(())
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is plain old data; zeroed is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[expect(clippy::useless_conversion, reason = "f_type's width differs between targets")]
    Ok(i64::from(st.f_type))
}

/// Creates the pin directory (and its `links/`) on bpffs. What a previous agent left
/// there is kept: its maps are reused and its links adopted (see [`Datapath::load`]).
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
    let err = |source| DatapathError::PinDir { path: pin_dir.to_owned(), source };
    fs::create_dir_all(pin_dir).map_err(err)?;
    let magic = fs_magic(pin_dir).map_err(err)?;
    if magic != BPF_FS_MAGIC {
        return Err(DatapathError::NotBpffs { path: pin_dir.to_owned(), magic });
    }
    for dir in [links_dir(pin_dir), pin_layout::maps_dir(pin_dir, PIN_LAYOUT_VERSION)] {
        fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir { path: dir, source })?;
    }
    Ok(())
}

/// Takes the pin directory's lock (`flock` on the directory) for as long as the returned
/// file is open: a second agent on the same pins would adopt, and fight over, a live
/// agent's links. The kernel releases the lock when the agent dies, even by `kill -9`.
pub fn lock_pin_dir(pin_dir: &Path) -> Result<fs::File, DatapathError> {
    use std::os::fd::AsRawFd as _;
    let dir = fs::File::open(pin_dir).map_err(|source| DatapathError::PinDir { path: pin_dir.to_owned(), source })?;
    // SAFETY: flock takes a descriptor we own and plain flags.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(DatapathError::PinDirInUse { path: pin_dir.to_owned() });
        }
        return Err(DatapathError::PinDir { path: pin_dir.to_owned(), source });
    }
    Ok(dir)
}

/// Checks the maps pinned in `maps_dir` (this agent's layout, or the older one it
/// upgrades: see [`pin_layout`]) against the layouts the object defines: a map of
/// another layout would be misread by the new programs, so the start ends (nothing
/// touched; a previous data path stays attached and in force).
pub fn check_pins(object: &[u8], opts: &DatapathOptions, maps_dir: &Path) -> Result<PinCheck, DatapathError> {
    let sizes =
        [(FLOWS, opts.flow_table_size), (FLOW_EVENTS, opts.ring_size), (PAYLOAD_SAMPLES, opts.payload_ring_size)];
    let wanted = pins::object_layouts(object, &sizes).map_err(DatapathError::ObjectMaps)?;
    let check = pins::check_pinned_maps(maps_dir, &wanted)
        .map_err(|reason| DatapathError::PinnedMaps { path: maps_dir.to_owned(), reason })?;
    if !check.mismatches.is_empty() {
        return Err(DatapathError::IncompatiblePins { path: opts.pin_dir.clone(), mismatches: check.mismatches });
    }
    for (map, pinned, asked) in &check.resized {
        log::warn!(
            "{map}: reusing the pinned map of {pinned} entries (asked for {asked}); the new size takes effect \
             after the pins are removed (`backplane run --detach-on-exit`, then start again)"
        );
    }
    Ok(check)
}

/// The configuration a previous agent left in the `CONFIG` map pinned in `maps_dir`, if
/// there is one of the right layout.
#[must_use]
pub fn pinned_config(maps_dir: &Path) -> Option<DatapathConfig> {
    let data = MapData::from_pin(maps_dir.join(CONFIG)).ok()?;
    let array: Array<MapData, DatapathConfig> = Array::try_from(aya::maps::Map::Array(data)).ok()?;
    array.get(&CONFIG_INDEX, 0).ok()
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

    /// Takes over the links a previous agent pinned under `<pin-dir>/links`.
    ///
    /// A link whose interface is gone, or whose interface `role_of` no longer takes for
    /// a port, is unpinned (detached). The others become this agent's ports, still
    /// running the previous agent's programs until [`Datapath::upgrade_adopted`]; a port
    /// that has only one of its two links gets the other attached now. `PORTS` entries of
    /// ports not adopted are removed. Returns the names of the adopted ports.
    pub fn adopt_links(&mut self, role_of: impl Fn(&str) -> Option<PortRole>) -> Vec<String> {
        let mut found: BTreeMap<u32, Found> = BTreeMap::new();
        let entries =
            fs::read_dir(links_dir(&self.pin_dir)).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
        for entry in entries {
            let path = entry.path();
            let Some(kind) = path.file_name().and_then(|n| n.to_str()).and_then(link_pin_kind) else { continue };
            let kind: &'static str = if kind == XDP_LINK_SUFFIX {
                XDP_LINK_SUFFIX
            } else if kind == TC_INGRESS_LINK_SUFFIX {
                TC_INGRESS_LINK_SUFFIX
            } else {
                TC_LINK_SUFFIX
            };
            let wanted_type = if kind == XDP_LINK_SUFFIX { pins::LINK_TYPE_XDP } else { pins::LINK_TYPE_TCX };
            let info = match pins::link_info(&path) {
                Ok(info) if info.link_type == wanted_type => info,
                Ok(info) => {
                    log::warn!("{}: a link of type {}, not ours; removing the pin", path.display(), info.link_type);
                    remove_stale_pin(&path);
                    continue;
                }
                Err(e) => {
                    log::warn!("{}: not a readable link ({e}); removing the pin", path.display());
                    remove_stale_pin(&path);
                    continue;
                }
            };
            if info.ifindex == 0 {
                log::info!("{}: its interface is gone; removing the pin", path.display());
                remove_stale_pin(&path);
                continue;
            }
            let link = match PinnedLink::from_pin(&path) {
                Ok(link) => FdLink::from(link),
                Err(e) => {
                    log::warn!("{}: cannot open the link: {}; removing the pin", path.display(), report(&e));
                    remove_stale_pin(&path);
                    continue;
                }
            };
            let slot = found.entry(info.ifindex).or_default();
            let taken = if kind == TC_LINK_SUFFIX { slot.1.is_some() } else { slot.0.is_some() };
            if taken {
                log::warn!("{}: a second {kind} link of ifindex {}; removing the pin", path.display(), info.ifindex);
                remove_stale_pin(&path);
                continue;
            }
            let adopted = Attachment::Adopted { link, path };
            if kind == TC_LINK_SUFFIX {
                slot.1 = Some(adopted);
            } else {
                slot.0 = Some((Some(kind), adopted));
            }
        }
        self.find_legacy_filters(&mut found);
        let mut adopted = Vec::new();
        for (ifindex, (ingress, tc)) in found {
            let name = index_to_name(ifindex);
            let role = name.as_deref().and_then(&role_of);
            let (Some(name), Some(role)) = (name, role) else {
                for a in ingress.map(|(_, a)| a).into_iter().chain(tc) {
                    log::info!("interface {ifindex} is no longer a port: detaching its {} attachment", a.kind());
                    a.detach();
                }
                continue;
            };
            match self.adopt_port(ifindex, &name, role, ingress, tc) {
                Ok(()) => adopted.push(name),
                Err(e) => log::error!("cannot adopt port {name}: {}; it is attached afresh", report(&e)),
            }
        }
        let stale: Vec<u32> = self.ports_map.keys().flatten().filter(|i| !self.ports.contains_key(i)).collect();
        for ifindex in stale {
            let _ = self.ports_map.remove(&ifindex);
        }
        adopted
    }

    /// Adds to `found` the legacy filters of this data path (see [`tc_legacy`]): filters
    /// at backplane's preference and handle whose program reads the `CONFIG` map this
    /// agent adopted. Filters of another agent's data path on the same machine read
    /// another `CONFIG` and are left alone.
    fn find_legacy_filters(&self, found: &mut BTreeMap<u32, Found>) {
        for (ifindex, ifname) in tc_legacy::host_interfaces() {
            for (direction, at) in
                [(Direction::Ingress, TcAttachType::Ingress), (Direction::Egress, TcAttachType::Egress)]
            {
                let filter = match tc_legacy::find_filter(ifindex, direction) {
                    Ok(Some(filter)) if self.owns_filter(filter.prog_id) => filter,
                    Ok(_) => continue,
                    Err(e) => {
                        log::warn!("{ifname}: {}", report(&e));
                        continue;
                    }
                };
                let slot = found.entry(ifindex).or_default();
                let taken = if at == TcAttachType::Egress { slot.1.is_some() } else { slot.0.is_some() };
                let attachment = Attachment::Filter { ifindex, at, prog_id: filter.prog_id, adopted: true };
                if taken {
                    // A port with a TCX link and a filter would judge its frames twice.
                    log::warn!("{ifname}: a legacy filter beside a pinned link; removing the filter ({filter})");
                    attachment.detach();
                } else if at == TcAttachType::Egress {
                    slot.1 = Some(attachment);
                } else {
                    slot.0 = Some((None, attachment));
                }
            }
        }
    }

    fn adopt_port(
        &mut self,
        ifindex: u32,
        name: &str,
        role: PortRole,
        ingress: Option<(Option<&'static str>, Attachment)>,
        tc: Option<Attachment>,
    ) -> Result<(), PortError> {
        let pin_dir = self.pin_dir.clone();
        // The interface may have been renamed while no agent ran.
        let renamed = |mut a: Attachment, kind: &str| {
            a.rename(link_pin_path(&pin_dir, name, kind));
            a
        };
        let info = self.ports_map.get(&ifindex, 0).unwrap_or_default();
        // An adopted ingress link keeps its hook (changing it would open a gap or count
        // twice); a missing one gets the hook configured for the role. A legacy filter
        // is a TC hook.
        let ingress = ingress.map(|(kind, a)| match kind {
            Some(kind) => (IngressHook::of_link(kind, info.ingress), renamed(a, kind)),
            None => (IngressHook::Tc, renamed(a, TC_INGRESS_LINK_SUFFIX)),
        });
        let tc = tc.map(|a| renamed(a, TC_LINK_SUFFIX));
        let hook = ingress.as_ref().map_or_else(|| self.hook_for(role), |(hook, _)| *hook);
        // An adopted ingress link is live; a missing one is not until attached below.
        let flags = if ingress.is_some() { info.flags | PORT_INGRESS_LIVE } else { info.flags & !PORT_INGRESS_LIVE };
        let info = PortInfo { role: role as u8, ingress: hook.port_info(), flags, ..info };
        if let Err(source) = self.ports_map.insert(ifindex, info, 0) {
            // Detached, so that the port is attached afresh without the old links.
            for a in ingress.map(|(_, a)| a).into_iter().chain(tc) {
                a.detach();
            }
            return Err(PortError::PortsMap { ifname: name.into(), ifindex, source });
        }
        let ingress = match ingress {
            Some((_, a)) => a,
            None => match self.attach_ingress(ifindex, name, hook) {
                Ok(a) => {
                    self.mark_ingress_live(ifindex, name);
                    a
                }
                Err(e) => {
                    if let Some(a) = tc {
                        a.detach();
                    }
                    let _ = self.ports_map.remove(&ifindex);
                    return Err(e);
                }
            },
        };
        let tc = match tc {
            Some(a) => a,
            None => match self.attach_tc(ifindex, name, PROG_TO_PORT, TcAttachType::Egress, TC_LINK_SUFFIX) {
                Ok(a) => a,
                Err(e) => {
                    let _ = self.ports_map.remove(&ifindex);
                    ingress.detach();
                    return Err(e);
                }
            },
        };
        self.ports.insert(ifindex, AttachedPort { name: name.into(), role, hook, ingress, tc });
        Ok(())
    }

    /// Sets [`PORT_INGRESS_LIVE`] on a port whose ingress link now exists: from here on
    /// `to_port` leaves alone what enters through it. Until then (or if this fails)
    /// `to_port` judges those frames itself.
    fn mark_ingress_live(&mut self, ifindex: u32, name: &str) {
        let result = self.ports_map.get(&ifindex, 0).and_then(|info| {
            self.ports_map.insert(ifindex, PortInfo { flags: info.flags | PORT_INGRESS_LIVE, ..info }, 0)
        });
        if let Err(e) = result {
            log::warn!("{name}: cannot mark its ingress program live in PORTS: {}", report(&e));
        }
    }

    /// The hook `from_port` gets on a new port of `role`.
    fn hook_for(&self, role: PortRole) -> IngressHook {
        if role == PortRole::Uplink { self.uplink_ingress } else { self.ingress }
    }

    /// Puts this agent's programs on the adopted links, one `BPF_LINK_UPDATE` per link:
    /// the kernel swaps the program of a link atomically, so every packet meets either
    /// the previous agent's program or this one's, never none. A port whose update fails
    /// is detached (its pins removed) so that the port watcher attaches it afresh.
    /// Returns the number of links updated.
    pub fn upgrade_adopted(&mut self) -> usize {
        let mut updated = 0;
        let adopted: Vec<u32> =
            self.ports.iter().filter(|(_, p)| p.ingress.adopted() || p.tc.adopted()).map(|(&i, _)| i).collect();
        for ifindex in adopted {
            let Some(mut port) = self.ports.remove(&ifindex) else { continue };
            let ingress = if port.hook == IngressHook::Tc {
                self.upgrade_tc(port.ingress, PROG_FROM_PORT_TC)
            } else {
                self.upgrade_xdp(port.ingress)
            };
            let tc = self.upgrade_tc(port.tc, PROG_TO_PORT);
            let mut why = Vec::new();
            let mut kept = |result: Result<(Attachment, bool), Kept>| match result {
                Ok((a, changed)) => {
                    updated += usize::from(changed);
                    Some(a)
                }
                Err(Kept { attachment, why: e }) => {
                    why.push(e);
                    attachment
                }
            };
            let (ingress, tc) = (kept(ingress), kept(tc));
            if !why.is_empty() {
                log::error!("{}: cannot put the new programs on it: {}", port.name, why.join("; "));
            }
            match (ingress, tc) {
                (Some(ingress), Some(tc)) => {
                    // A link whose update failed keeps the previous agent's program, which
                    // goes on judging the port (status shows its program id).
                    port.ingress = ingress;
                    port.tc = tc;
                    self.ports.insert(ifindex, port);
                }
                (ingress, tc) => {
                    log::error!("{}: an attachment was lost; attaching the port afresh", port.name);
                    // PORTS first: `to_port` judges the port's frames again before its
                    // ingress link goes.
                    let _ = self.ports_map.remove(&ifindex);
                    for a in [ingress, tc].into_iter().flatten() {
                        a.detach();
                    }
                }
            }
        }
        updated
    }

    /// Replaces the program of an adopted XDP link; returns the attachment and whether
    /// it was updated. On failure the link keeps the previous program.
    fn upgrade_xdp(&mut self, attachment: Attachment) -> Result<(Attachment, bool), Kept> {
        let Attachment::Adopted { link, path } = attachment else { return Ok((attachment, false)) };
        let prog = self.xdp_program();
        let result = XdpLink::try_from(link)
            .map_err(|e| report(&e))
            .and_then(|link| prog.attach_to_link(link).map_err(|e| report(&e)))
            .and_then(|id| prog.take_link(id).map_err(|e| report(&e)))
            .and_then(|link| FdLink::try_from(link).map_err(|e| report(&e)));
        upgraded(path, result, "XDP")
    }

    /// [`Datapath::upgrade_xdp`] for a TCX link or a legacy filter running `program`.
    fn upgrade_tc(&mut self, attachment: Attachment, program: &'static str) -> Result<(Attachment, bool), Kept> {
        if let Attachment::Filter { ifindex, at, prog_id, adopted: true } = attachment {
            let name = index_to_name(ifindex).unwrap_or_default();
            return match self.attach_filter(ifindex, &name, program, at) {
                Ok(a) => Ok((a, true)),
                Err(e) => Err(Kept {
                    attachment: Some(Attachment::Filter { ifindex, at, prog_id, adopted: true }),
                    why: format!("legacy TC {program}: {}", report(&e)),
                }),
            };
        }
        let Attachment::Adopted { link, path } = attachment else { return Ok((attachment, false)) };
        let prog = self.tc_program(program);
        let result = SchedClassifierLink::try_from(link)
            .map_err(|e| report(&e))
            .and_then(|link| prog.attach_to_link(link).map_err(|e| report(&e)))
            .and_then(|id| prog.take_link(id).map_err(|e| report(&e)))
            .and_then(|link| FdLink::try_from(link).map_err(|e| report(&e)));
        upgraded(path, result, "TC")
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
    /// [`crate::metrics::BpfStatsGuard`]).
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

    /// The configuration in force (CONFIG[0]).
    pub fn config(&self) -> Result<DatapathConfig, MapError> {
        self.config.get(&CONFIG_INDEX, 0)
    }

    /// The attached port of `ifindex`, with its name.
    #[must_use]
    pub fn attached_name(&self, ifindex: u32) -> Option<&str> {
        self.ports.get(&ifindex).map(|p| p.name.as_str())
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

    /// Attaches `from_port` (at the hook configured for `role`) and `to_port` (TCX
    /// egress) to a port and registers it in `PORTS`. On failure nothing of the port is
    /// left behind.
    pub fn attach_port(&mut self, ifindex: u32, name: &str, role: PortRole) -> Result<(), PortError> {
        if name_to_index(name) != Some(ifindex) {
            return Err(PortError::Vanished { ifname: name.into(), ifindex });
        }
        let links = links_dir(&self.pin_dir);
        fs::create_dir_all(&links).map_err(|source| PortError::LinksDir {
            ifname: name.into(),
            path: links,
            source,
        })?;
        // Both halves of the rule tables get the zone of the rules in force: the half not
        // in force is rewritten for every port before it is next put in force.
        let zone = self.port_zone(name);
        let hook = self.hook_for(role);
        let info = PortInfo { role: role as u8, zone: [zone, zone], ingress: hook.port_info(), ..PortInfo::default() };
        self.ports_map.insert(ifindex, info, 0).map_err(|source| PortError::PortsMap {
            ifname: name.into(),
            ifindex,
            source,
        })?;
        let ingress = match self.attach_ingress(ifindex, name, hook) {
            Ok(a) => {
                self.mark_ingress_live(ifindex, name);
                a
            }
            Err(e) => {
                let _ = self.ports_map.remove(&ifindex);
                return Err(e);
            }
        };
        let tc = match self.attach_tc(ifindex, name, PROG_TO_PORT, TcAttachType::Egress, TC_LINK_SUFFIX) {
            Ok(a) => a,
            Err(e) => {
                ingress.detach();
                let _ = self.ports_map.remove(&ifindex);
                return Err(e);
            }
        };
        if !(ingress.pinned() && tc.pinned()) {
            log::warn!("{name}: links could not be pinned; the port is inspected only while the agent runs");
        }
        self.ports.insert(ifindex, AttachedPort { name: name.into(), role, hook, ingress, tc });
        Ok(())
    }

    fn attach_error(ifindex: u32, name: &str, program: &'static str, source: aya::programs::ProgramError) -> PortError {
        // The device may have gone between listing and attaching.
        if name_to_index(name) != Some(ifindex) {
            return PortError::Vanished { ifname: name.into(), ifindex };
        }
        PortError::Attach { ifname: name.into(), ifindex, program, source }
    }

    fn xdp_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROG_FROM_PORT)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("from_port is in the object as XDP")
    }

    fn tc_program(&mut self, program: &'static str) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(program)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .expect("the classifiers were loaded at start")
    }

    /// Attaches `from_port` at `hook`, after removing a stale pin of either ingress kind
    /// under the port's name (an interface of the same name from before).
    fn attach_ingress(&mut self, ifindex: u32, name: &str, hook: IngressHook) -> Result<Attachment, PortError> {
        for kind in [XDP_LINK_SUFFIX, TC_INGRESS_LINK_SUFFIX] {
            remove_stale_pin(&link_pin_path(&self.pin_dir, name, kind));
        }
        match hook {
            IngressHook::Tc => {
                self.attach_tc(ifindex, name, PROG_FROM_PORT_TC, TcAttachType::Ingress, TC_INGRESS_LINK_SUFFIX)
            }
            IngressHook::XdpSkb => self.attach_xdp(ifindex, name, XdpMode::Skb),
            IngressHook::XdpNative => self.attach_xdp(ifindex, name, XdpMode::Driver),
        }
    }

    fn attach_xdp(&mut self, ifindex: u32, name: &str, mode: XdpMode) -> Result<Attachment, PortError> {
        if let Some(why) = &self.xdp_unavailable {
            return Err(PortError::XdpUnavailable { ifname: name.into(), ifindex, why: why.clone() });
        }
        let path = link_pin_path(&self.pin_dir, name, XDP_LINK_SUFFIX);
        remove_stale_pin(&path);
        let prog = self.xdp_program();
        let attach = |prog: &mut Xdp| -> Result<XdpLink, PortError> {
            let id = prog
                .attach_to_if_index(ifindex, mode)
                .map_err(|e| Self::attach_error(ifindex, name, PROG_FROM_PORT, e))?;
            prog.take_link(id).map_err(|e| Self::attach_error(ifindex, name, PROG_FROM_PORT, e))
        };
        let link = attach(prog)?;
        match FdLink::try_from(link) {
            Ok(fd) => match fd.pin(&path) {
                Ok(pinned) => return Ok(Attachment::Pinned { link: pinned.into(), path }),
                Err(e) => log::warn!("{name}: cannot pin XDP link at {}: {}", path.display(), report(&e)),
            },
            Err(e) => log::warn!("{name}: XDP attached through netlink, not a pinnable link: {e}"),
        }
        // The failed conversion or pin dropped (detached) the link: attach again and
        // keep the link in the agent.
        Ok(Attachment::Xdp(attach(self.xdp_program())?))
    }

    /// Attaches the classifier `program` to a TCX link at `at`, pinned as `kind`. It goes
    /// first in the port's chain, so that no other program there can let a frame through
    /// before it is judged; it hands what it passes on to the next program.
    fn attach_tc(
        &mut self,
        ifindex: u32,
        name: &str,
        program: &'static str,
        at: TcAttachType,
        kind: &str,
    ) -> Result<Attachment, PortError> {
        let path = link_pin_path(&self.pin_dir, name, kind);
        remove_stale_pin(&path);
        if self.tc_attach == TcAttach::Legacy {
            return self.attach_filter(ifindex, name, program, at);
        }
        let attach = |prog: &mut SchedClassifier| -> Result<SchedClassifierLink, PortError> {
            let id = prog
                .attach_with_options(name, at, TcAttachOptions::TcxOrder(LinkOrder::first()))
                .map_err(|e| Self::attach_error(ifindex, name, program, e))?;
            prog.take_link(id).map_err(|e| Self::attach_error(ifindex, name, program, e))
        };
        let link = attach(self.tc_program(program))?;
        match FdLink::try_from(link) {
            Ok(fd) => match fd.pin(&path) {
                Ok(pinned) => return Ok(Attachment::Pinned { link: pinned.into(), path }),
                Err(e) => log::warn!("{name}: cannot pin TC link at {}: {}", path.display(), report(&e)),
            },
            Err(e) => log::warn!("{name}: TC attached through netlink, not a pinnable link: {e}"),
        }
        Ok(Attachment::Tc(attach(self.tc_program(program))?))
    }

    /// Attaches the classifier `program` as a legacy `cls_bpf` filter at backplane's
    /// preference and handle on the `at` hook of the port, adding the port's `clsact`
    /// qdisc if it has none. A filter already there (a previous data path's) has its
    /// program replaced in place. The filter stays when the agent exits: aya's handle of
    /// it, which would detach it when dropped, is forgotten.
    fn attach_filter(
        &mut self,
        ifindex: u32,
        name: &str,
        program: &'static str,
        at: TcAttachType,
    ) -> Result<Attachment, PortError> {
        let legacy = |source: Box<dyn std::error::Error + Send + Sync>| PortError::Legacy {
            ifname: name.into(),
            ifindex,
            source,
        };
        tc_legacy::ensure_clsact(ifindex, name).map_err(legacy)?;
        let direction = if at == TcAttachType::Egress { Direction::Egress } else { Direction::Ingress };
        let existing = tc_legacy::find_filter(ifindex, direction).map_err(|e| legacy(Box::new(e)))?;
        if let Some(filter) = &existing
            && !self.owns_filter(filter.prog_id)
        {
            return Err(legacy(Box::new(LegacyTcError::Foreign { filter: filter.clone(), direction })));
        }
        let prog = self.tc_program(program);
        let id = match existing {
            Some(filter) => {
                log::info!("{name}: replacing the program of backplane's legacy filter there ({filter})");
                let link = SchedClassifierLink::attached(name, at, tc_legacy::PRIORITY, legacy_handle(), None)
                    .map_err(|e| legacy(Box::new(e)))?;
                prog.attach_to_link(link)
            }
            None => prog.attach_with_options(
                name,
                at,
                TcAttachOptions::Netlink(NlOptions {
                    priority: tc_legacy::PRIORITY,
                    handle: legacy_handle(),
                    classid: None,
                }),
            ),
        }
        .map_err(|e| Self::attach_error(ifindex, name, program, e))?;
        let link = prog.take_link(id).map_err(|e| Self::attach_error(ifindex, name, program, e))?;
        // The filter outlives the agent: the handle must not detach it when dropped.
        std::mem::forget(link);
        let prog_id = if program == PROG_TO_PORT { self.program_ids.to_port } else { self.program_ids.from_port_tc };
        Ok(Attachment::Filter { ifindex, at, prog_id, adopted: false })
    }

    /// Whether the program `prog_id` is this data path's: it reads this agent's `CONFIG`
    /// map, or the one of the older layout it upgrades from.
    fn owns_filter(&self, prog_id: u32) -> bool {
        [Some(&self.maps_dir), self.previous_maps.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|dir| aya::maps::MapInfo::from_pin(dir.join(CONFIG)).ok().map(|i| i.id()))
            .any(|config_id| tc_legacy::filter_uses_map(prog_id, config_id))
    }

    /// Checks that every port attached through legacy filters still has them, first on
    /// both hooks and running the programs this agent put there: filters have no pins,
    /// and `tc filter del`, a deleted `clsact` qdisc or another loader's filter at
    /// preference 1 (which runs before ours) would take the port's judging away behind
    /// the agent's back. Such a port is detached (its `PORTS` entry first, so that
    /// `to_port` judges its frames meanwhile) and returned by name: the port watcher
    /// attaches it again, or has the port guard cut it off.
    pub fn check_legacy_filters(&mut self) -> Vec<String> {
        let broken: Vec<u32> = self
            .ports
            .iter()
            .filter(|(_, p)| {
                [&p.ingress, &p.tc].into_iter().any(|a| match a {
                    Attachment::Filter { ifindex, at, prog_id, .. } => {
                        let direction =
                            if *at == TcAttachType::Egress { Direction::Egress } else { Direction::Ingress };
                        match tc_legacy::first_is_ours(*ifindex, direction, *prog_id) {
                            Ok(ours) => !ours,
                            Err(e) => {
                                log::warn!("{}: cannot check its legacy filters: {}", p.name, report(&e));
                                false
                            }
                        }
                    }
                    _ => false,
                })
            })
            .map(|(&i, _)| i)
            .collect();
        let mut names = Vec::new();
        for ifindex in broken {
            if let Some(name) = self.attached_name(ifindex).map(str::to_owned) {
                log::error!("{name}: its legacy filter is gone or no longer first; attaching it again");
                self.detach_port(ifindex);
                names.push(name);
            }
        }
        names
    }

    /// Forgets a port: removes it from `PORTS` and detaches (unpins) its links. When
    /// the device is already gone the kernel has dropped the attachments; this only
    /// cleans up.
    pub fn detach_port(&mut self, ifindex: u32) -> bool {
        let Some(port) = self.ports.remove(&ifindex) else { return false };
        match self.ports_map.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => log::warn!("{}: cannot remove PORTS entry: {}", port.name, report(&e)),
        }
        port.ingress.detach();
        port.tc.detach();
        true
    }

    /// Follows a rename of an attached port: moves its link pins, and gives it the zone
    /// its new name has under the rules in force (interface members match names).
    pub fn rename_port(&mut self, ifindex: u32, new_name: &str) {
        let pin_dir = self.pin_dir.clone();
        let zone = self.port_zone(new_name);
        if let Some(port) = self.ports.get_mut(&ifindex) {
            port.ingress.rename(link_pin_path(&pin_dir, new_name, port.hook.link_kind()));
            port.tc.rename(link_pin_path(&pin_dir, new_name, TC_LINK_SUFFIX));
            new_name.clone_into(&mut port.name);
            match self.ports_map.get(&ifindex, 0) {
                Ok(info) if info.zone != [zone, zone] => {
                    if let Err(e) = self.ports_map.insert(ifindex, PortInfo { zone: [zone, zone], ..info }, 0) {
                        log::warn!("{new_name}: cannot update its zone in PORTS: {}", report(&e));
                    }
                }
                Ok(_) => {}
                Err(e) => log::warn!("{new_name}: cannot read its PORTS entry: {}", report(&e)),
            }
        }
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
        rule_tables::write_port_zones(&mut self.ports_map, slot, &compiled, ports)?;
        Ok(StagedRules { slot, compiled })
    }

    /// Puts a staged rule set in force with one write of `CONFIG`; returns its generation.
    /// Flows judged under an earlier generation are judged again on their next packet.
    pub fn activate_rules(&mut self, staged: StagedRules) -> Result<u32, TableError> {
        let generation = rule_tables::activate(&mut self.config, staged.slot, &staged.compiled)?;
        self.rules = Some(staged.compiled);
        Ok(generation)
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

    /// The rule tables, for single-entry writes into the half in force (endpoints).
    pub fn rule_tables_mut(&mut self) -> &mut RuleTables {
        &mut self.rule_tables
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
                PortStatus {
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

/// An attachment whose program could not be replaced: still attached, running the
/// previous agent's program (`None` if it could not even be opened again), and why.
struct Kept {
    attachment: Option<Attachment>,
    why: String,
}

/// The end of a link upgrade: the link, pinned at `path` and now running this agent's
/// program; or, on failure, the link as it was (still pinned, still attached, running
/// the previous program: detaching it would leave the port unjudged) and the error.
fn upgraded(path: PathBuf, result: Result<FdLink, String>, what: &str) -> Result<(Attachment, bool), Kept> {
    match result {
        Ok(link) => Ok((Attachment::Pinned { link, path }, true)),
        Err(e) => {
            let attachment =
                PinnedLink::from_pin(&path).ok().map(|link| Attachment::Adopted { link: link.into(), path });
            Err(Kept { attachment, why: format!("{what}: {e}") })
        }
    }
}

/// backplane's legacy filter handle, as aya takes it.
fn legacy_handle() -> TcHandle {
    TcHandle::new((tc_legacy::HANDLE >> 16) as u16, (tc_legacy::HANDLE & 0xffff) as u16)
}

/// Removes backplane's legacy filter from the `at` hook of `ifindex`, if it still runs
/// `prog_id` (a filter that runs another program is someone else's now and stays;
/// nothing to do when the interface is gone: its filters went with it).
fn detach_filter(ifindex: u32, at: TcAttachType, prog_id: u32) {
    let direction = if at == TcAttachType::Egress { Direction::Egress } else { Direction::Ingress };
    match tc_legacy::find_filter(ifindex, direction) {
        Ok(Some(filter)) if filter.prog_id == prog_id => {}
        Ok(Some(filter)) => {
            log::warn!(
                "ifindex {ifindex}: the legacy filter there runs a program that is not ours now ({filter}); left alone"
            );
            return;
        }
        Ok(None) => return,
        Err(e) => {
            log::warn!("ifindex {ifindex}: {}; its legacy filter is left alone", report(&e));
            return;
        }
    }
    let Some(ifname) = index_to_name(ifindex) else { return };
    match SchedClassifierLink::attached(&ifname, at, tc_legacy::PRIORITY, legacy_handle(), None) {
        // Dropping the handle removes the filter.
        Ok(link) => drop(link),
        Err(e) => log::debug!("{ifname}: no legacy filter to remove ({e})"),
    }
}

fn remove_stale_pin(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => log::debug!("removed stale link pin {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot remove stale link pin {}: {e}", path.display()),
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
