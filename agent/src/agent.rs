//! `backplane run`: the agent's life from start to orderly exit.
//!
//! Start: read the rules (`--rules`; errors end the start before anything is touched),
//! mount bpffs if needed, prepare the pin directory, load the data path, put the rules
//! in force, attach the ports that exist, start the event reader, the flow refresh, the
//! interface watch and the rules watch, and only then create the control socket: the
//! socket appearing means ready. The port guard (an nftables table that blocks ports that
//! cannot be attached while rules are in force) is taken over from a previous agent
//! before the first port is looked at.
//! Exit (SIGINT/SIGTERM): stop serving, remove the socket, and either leave the data
//! path attached through its pins and the port guard in place or, with
//! `--detach-on-exit`, detach and unpin it all and remove the port guard's table.

use std::{
    collections::{BTreeMap, HashSet},
    io,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use backplane_common::{
    Counter, Verdict,
    config::CONFIG_ENFORCE,
    policy::{ZONE_WORLD, ZonePairStats},
    reason::Reason,
};
use backplane_rules::WORLD;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
};

use crate::{
    clock::Clock,
    cluster::Cluster,
    cluster::etcd::Etcd,
    control::{ControlError, server},
    datapath::DatapathError,
    datapath::kernel::{self, TcAttach, TcAttachChoice},
    datapath::pin_layout,
    datapath::{
        self, DATAPATH_OBJECT, Datapath, DatapathOptions, IngressHook, PortStatus, ProgramIds, map_fill::MapFills,
    },
    endpoints::{EndpointOptions, Endpoints, Peers, model::EndpointsStatus, standing::Standing},
    export::flow_log::{self, FlowLogOptions, RotatingFile},
    export::ipfix::{self, IpfixOptions},
    export::{
        metrics::{MapFill, Metrics, ProgramRuns, Scrape, ZoneJudged, ZoneTraffic as ScrapedTraffic},
        metrics_http,
    },
    flows::{
        FlowRecord, FlowStats, FlowTable, FollowMessage, SharedFlows, names::RuleNames, payload::SampleStats, rings,
    },
    ifnames::IfNames,
    ports::guard::{self, PortGuard, PortGuardStatus},
    ports::{PortSelector, PortWatcher, WatchError},
    rules::explain::{ExplainError, ExplainQuery, ExplainReply},
    rules::last_good::LastGood,
    rules::{LoadedRules, RuleSync, RulesError, RulesStatus, StartRules},
};

/// How often the kernel flow table is read.
const REFRESH_PERIOD: Duration = Duration::from_secs(1);

/// Everything `backplane run` is told.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub interfaces: Vec<String>,
    pub uplinks: Vec<String>,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub node: String,
    pub flow_table_size: u32,
    pub ring_size: u32,
    pub idle_timeout: Duration,
    /// Where `from_port` runs on VM ports and on uplinks (`--ingress`, `--uplink-ingress`).
    pub ingress: IngressHook,
    pub uplink_ingress: IngressHook,
    /// How TC programs attach (`--tc-attach`): TCX links, legacy filters, or chosen by
    /// probing the kernel.
    pub tc_attach: TcAttachChoice,
    pub detach_on_exit: bool,
    /// The rule set (a directory of `*.yaml` files, or one file), followed for changes;
    /// `None`: observe only.
    pub rules: Option<PathBuf>,
    /// Size in bytes of the payload sample ring buffer.
    pub payload_ring_size: u32,
    /// Where `/metrics` is served (`--metrics-addr`); `None`: not served.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Whether the metrics address was asked for explicitly: then failing to bind it
    /// ends the start; the default address, when taken, only costs the metrics.
    pub metrics_required: bool,
    /// Whether to turn on the kernel's BPF run statistics while metrics are served.
    pub program_stats: bool,
    /// `--flow-log`: flow starts and ends as JSON lines.
    pub flow_log: Option<FlowLogOptions>,
    /// `--ipfix`: flow records to an IPFIX collector.
    pub ipfix: Option<IpfixOptions>,
    /// This node's labels (`--labels k=v,...`), for zone placement.
    pub labels: BTreeMap<String, String>,
    /// etcd client URLs (`--etcd`); empty: a single node.
    pub etcd: Vec<String>,
    /// Where endpoint state and the audit log live (`--state-dir`).
    pub state_dir: PathBuf,
    /// Install the established flows of arriving endpoints (off: `--no-flow-handover`).
    pub flow_handover: bool,
    /// Block uplinks that cannot be attached while rules are in force (`--guard-uplinks`).
    pub guard_uplinks: bool,
}

impl RunOptions {
    /// Checks every value that does not depend on the machine, before anything is
    /// touched; each error names its argument (the CLI exits 2 with it).
    pub fn validate(&self) -> Result<(), String> {
        validate_node(&self.node).map_err(|e| format!("--node: {e}"))?;
        if self.idle_timeout < Duration::from_secs(1) {
            return Err(AgentError::BadIdleTimeout.to_string());
        }
        PortSelector::new(&self.interfaces, &[]).map_err(|e| format!("--interfaces: {e}"))?;
        PortSelector::new(&[], &self.uplinks).map_err(|e| format!("--uplink: {e}"))?;
        let dp = self.datapath_options(TcAttach::Tcx);
        dp.validate().map_err(|e| match e {
            DatapathError::InvalidOption(text) => text,
            other => other.to_string(),
        })?;
        if !self.etcd.is_empty() {
            Etcd::new(&self.etcd).map_err(|e| format!("--etcd: {e}"))?;
        }
        if self.flow_log.as_ref().is_some_and(|f| f.max_bytes == 0) {
            return Err("--flow-log-max-bytes must be at least 1 byte".into());
        }
        Ok(())
    }
}

/// Why the agent could not start.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The kernel lacks a feature the data path needs, or the asked TC attachment.
    #[error("{0}")]
    Kernel(String),

    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot start: {0}")]
    BadRules(#[source] RulesError),
    #[error(transparent)]
    Rules(RulesError),
    #[error(
        "cannot start: {error}\nno rule set is in force to keep and the last good copy cannot be used ({why}): \
         nothing could be enforced"
    )]
    NothingToEnforce {
        #[source]
        error: Box<RulesError>,
        why: String,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] io::Error),
    #[error("invalid node name {0:?}: it names a directory under the pin root")]
    BadNode(String),
    #[error("--idle-timeout must be at least 1 second")]
    BadIdleTimeout,
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the flow log {path}: {source}")]
    FlowLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot use the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a socket to the IPFIX collector {addr}: {source}")]
    Ipfix {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Etcd(#[from] crate::cluster::etcd::EtcdError),
}

/// The flow table's place in `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTableStatus {
    /// Entries in the kernel map at the last read.
    pub entries: u64,
    /// `--flow-table-size`.
    pub capacity: u32,
    #[serde(flatten)]
    pub stats: FlowStats,
}

/// What `status` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub pin_dir: String,
    pub socket: String,
    /// Where `from_port` runs on new VM ports and new uplinks (`tc`, `xdp-skb`,
    /// `xdp-native`); each port in `ports` says what it has.
    pub ingress: String,
    pub uplink_ingress: String,
    /// How TC programs attach to new ports: `tcx` or `legacy`; each port in `ports`
    /// says what it has.
    #[serde(default)]
    pub tc_attach: String,
    pub idle_timeout_secs: u64,
    pub detach_on_exit: bool,
    pub program_ids: ProgramIds,
    /// Rule generation and flags in force (CONFIG[0]).
    pub config_generation: u32,
    pub config_flags: u8,
    pub ports: Vec<PortStatus>,
    /// Ports that match but are not attached, and the nftables table that blocks them
    /// while rules are in force.
    #[serde(default)]
    pub port_guard: PortGuardStatus,
    pub flows: FlowTableStatus,
    /// Start/end events the data path could not put in the ring buffer.
    pub events_lost: u64,
    /// Every data path counter by name, summed over CPUs.
    pub counters: BTreeMap<String, u64>,
    /// The parse-failure counters (a subset of `counters`): why frames were not parsed.
    pub parse_failures: BTreeMap<String, u64>,
    /// The rule set in force and its reloads.
    #[serde(default)]
    pub rules: RulesStatus,
    /// Packets denied or passed in audit mode, by zone pair, verdict and reason.
    #[serde(default)]
    pub zone_pairs: Vec<ZonePairStatus>,
    /// Packets and bytes of all flows since start, by zone pair and verdict (from the
    /// flows' counters; what `backplane top` shows).
    #[serde(default)]
    pub zone_traffic: Vec<ZoneTrafficStatus>,
    /// The node's labels, endpoints, moves, alerts and etcd connectivity.
    #[serde(default)]
    pub endpoints: EndpointsStatus,
}

/// Traffic of one (initiator's zone, responder's zone, verdict) since the agent started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneTrafficStatus {
    pub src_zone: String,
    pub dst_zone: String,
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Denied or audited packets of one (source zone, destination zone, verdict, reason),
/// summed over CPUs. The source is the zone of the end that started the flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZonePairStatus {
    pub src_zone: String,
    pub dst_zone: String,
    pub verdict: String,
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The running agent, as the control socket sees it.
pub struct Agent {
    opts: RunOptions,
    datapath: Arc<Mutex<Datapath>>,
    flows: Arc<SharedFlows>,
    rule_names: Arc<RuleNames>,
    /// `None` without `--rules`.
    rules: Option<Arc<RuleSync>>,
    sample_stats: Arc<SampleStats>,
    endpoints: Arc<Endpoints>,
    port_guard: Arc<PortGuard>,
    /// The pinned maps whose fill the metrics report.
    map_fills: MapFills,
}

/// Denied or audited packets by (source zone, destination zone, verdict, reason): counts.
type ZonePairCounts = Vec<(String, String, u8, u8, ZonePairStats)>;
/// Packets and bytes of all flows by (initiator's zone, responder's zone, verdict).
type ZoneTrafficCounts = Vec<(String, String, u8, u64, u64)>;

/// A verdict or reason number as `status` names it: the data path's name, or
/// `unknown(N)`.
fn name_or_unknown(name: Option<&'static str>, n: u8) -> String {
    name.map_or_else(|| format!("unknown({n})"), str::to_owned)
}

impl Agent {
    /// The endpoints of this node.
    #[must_use]
    pub fn endpoints(&self) -> &Arc<Endpoints> {
        &self.endpoints
    }

    /// All flow records, after a fresh read of the kernel table.
    pub async fn flows(&self) -> Vec<FlowRecord> {
        let flows = Arc::clone(&self.flows);
        tokio::task::spawn_blocking(move || {
            flows.refresh();
            flows.snapshot()
        })
        .await
        .unwrap_or_else(|e| {
            log::error!("flow refresh task failed: {e}");
            self.flows.snapshot()
        })
    }

    #[must_use]
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FollowMessage> {
        self.flows.subscribe()
    }

    /// Explains a flow under the rules in force.
    pub fn explain(&self, query: &ExplainQuery) -> Result<ExplainReply, ExplainError> {
        self.rules.as_ref().ok_or(ExplainError::NoRules)?.explain(query)
    }

    /// Traffic and drops by zone pair, zones named. Takes the rule names' lock: call it
    /// with the data path locked (lock order: data path, then rule names, then rule state,
    /// as a reload takes them).
    fn zone_counts(&self, datapath: &Datapath) -> (ZonePairCounts, ZoneTrafficCounts) {
        let zone_traffic = self.flows.zone_traffic();
        let names = self.rule_names.read();
        let zone = |id: u16| if id == ZONE_WORLD { WORLD.to_owned() } else { names.zone(id) };
        let traffic = zone_traffic
            .into_iter()
            .map(|((src, dst, verdict), (packets, bytes))| (zone(src), zone(dst), verdict, packets, bytes))
            .collect();
        let pairs = datapath
            .zone_pair_stats()
            .into_iter()
            .map(|(k, v)| (names.zone(k.src_zone), names.zone(k.dst_zone), k.verdict, k.reason, v))
            .collect();
        (pairs, traffic)
    }

    /// The `rules` object of `status`, with the generation `CONFIG` holds.
    fn rules_status(&self, generation: u32) -> RulesStatus {
        match &self.rules {
            Some(sync) => sync.status(generation),
            None => RulesStatus { generation, ..RulesStatus::default() },
        }
    }

    #[must_use]
    pub fn status(&self) -> Status {
        let datapath = self.datapath.lock().expect("datapath lock");
        let counters = datapath.counters();
        let config = datapath.config().unwrap_or_default();
        let stats = self.flows.stats();
        let (pairs, traffic) = self.zone_counts(&datapath);
        let verdict = |v: u8| name_or_unknown(Verdict::from_u8(v).map(Verdict::as_str), v);
        let zone_traffic = traffic
            .into_iter()
            .map(|(src_zone, dst_zone, v, packets, bytes)| ZoneTrafficStatus {
                src_zone,
                dst_zone,
                verdict: verdict(v),
                packets,
                bytes,
            })
            .collect();
        let zone_pairs = pairs
            .into_iter()
            .map(|(src_zone, dst_zone, v, reason, counts)| ZonePairStatus {
                src_zone,
                dst_zone,
                verdict: verdict(v),
                reason: name_or_unknown(Reason::from_u8(reason).map(Reason::as_str), reason),
                packets: counts.packets,
                bytes: counts.bytes,
            })
            .collect();
        let rules = self.rules_status(config.generation);
        drop(datapath);
        let endpoints = self.endpoints.status();
        let datapath = self.datapath.lock().expect("datapath lock");
        Status {
            endpoints,
            node: self.opts.node.clone(),
            pin_dir: datapath.pin_dir().display().to_string(),
            socket: self.opts.socket.display().to_string(),
            ingress: datapath.ingress_hooks().0.as_str().into(),
            uplink_ingress: datapath.ingress_hooks().1.as_str().into(),
            tc_attach: datapath.tc_attach().as_str().into(),
            idle_timeout_secs: self.opts.idle_timeout.as_secs(),
            detach_on_exit: self.opts.detach_on_exit,
            program_ids: datapath.program_ids(),
            config_generation: config.generation,
            config_flags: config.flags,
            ports: datapath.port_status(),
            port_guard: self.port_guard.status(),
            flows: FlowTableStatus { entries: stats.kernel_entries, capacity: datapath.flow_table_size(), stats },
            events_lost: counters.iter().find(|(c, _)| *c == Counter::EventsLost).map_or(0, |(_, v)| *v),
            counters: counters.iter().map(|(c, v)| (c.as_str().to_owned(), *v)).collect(),
            parse_failures: counters
                .iter()
                .filter(|(c, _)| c.is_parse_failure())
                .map(|(c, v)| (c.as_str().to_owned(), *v))
                .collect(),
            rules,
            zone_pairs,
            zone_traffic,
        }
    }

    /// What the metrics read, for one scrape. Blocking (map reads).
    #[must_use]
    pub fn scrape(&self) -> Scrape {
        let datapath = self.datapath.lock().expect("datapath lock");
        let counters = datapath.counters();
        let config = datapath.config().unwrap_or_default();
        let stats = self.flows.stats();
        let (pairs, traffic) = self.zone_counts(&datapath);
        let rules = self.rules_status(config.generation);
        let flow_capacity = datapath.flow_table_size();
        drop(datapath);
        let endpoints = self.endpoints.status();
        let (ports_blocked, ports_unguarded) = self.port_guard.status().counts();
        let datapath = self.datapath.lock().expect("datapath lock");
        let ports_attached = datapath.attached().len();
        let kernel_flags = if endpoints.total > 0 { None } else { datapath.endpoint_flags_in_force() };
        let programs = datapath.program_stats();
        drop(datapath);
        let endpoint_counts = Standing::ALL
            .iter()
            .map(|standing| {
                let n = if endpoints.total > 0 {
                    // The endpoints this node knows, by the standing the endpoint manager
                    // gives them (inventory, runtime and unknown MACs).
                    match standing {
                        Standing::Active => endpoints.active,
                        Standing::Quarantined => endpoints.quarantined,
                        Standing::Isolated => endpoints.isolated,
                    }
                } else {
                    // Without any: the entries of the rule-table half in force; none without
                    // rules.
                    let flags = kernel_flags.iter().flatten();
                    flags.filter(|f| Standing::of_flags(**f) == *standing).count() as u64
                };
                (standing.as_str(), n)
            })
            .collect();
        Scrape {
            counters,
            flows_active: stats.active_records,
            flows_expired: stats.expired,
            flows_evicted: stats.evicted,
            flow_entries: stats.kernel_entries,
            flow_capacity,
            zone_traffic: traffic
                .into_iter()
                .map(|(src_zone, dst_zone, v, packets, bytes)| ScrapedTraffic {
                    src_zone,
                    dst_zone,
                    verdict: Verdict::from_u8(v).ok_or(v),
                    packets,
                    bytes,
                })
                .collect(),
            zone_pairs: pairs
                .into_iter()
                .map(|(src_zone, dst_zone, v, reason, counts)| ZoneJudged {
                    src_zone,
                    dst_zone,
                    verdict: Verdict::from_u8(v).ok_or(v),
                    reason: Reason::from_u8(reason).ok_or(reason),
                    packets: counts.packets,
                    bytes: counts.bytes,
                })
                .collect(),
            payload_parsed: self.sample_stats.snapshot().to_vec(),
            ports_attached,
            ports_blocked,
            ports_unguarded,
            rule_reloads_ok: rules.reloads_ok,
            rule_reloads_rejected: rules.reloads_rejected,
            rules_generation: config.generation,
            maps: self
                .map_fills
                .read()
                .into_iter()
                .map(|(map, entries, capacity)| MapFill { map, entries, capacity })
                .collect(),
            endpoints: endpoint_counts,
            moves: endpoints.moves,
            programs: programs
                .into_iter()
                .map(|(name, p)| (name, ProgramRuns { run_time_ns: p.run_time_ns, run_count: p.run_count }))
                .collect(),
        }
    }
}

/// Reads aya-log records of the data path, if it has a log map.
fn start_ebpf_logger(datapath: &mut Datapath) -> Option<JoinHandle<()>> {
    match aya_log::EbpfLogger::init(datapath.ebpf_mut()) {
        Ok(logger) => Some(tokio::spawn(async move {
            // SAFETY: the logger owns its ring buffer map and returns that same open fd
            // for as long as it lives, which is as long as the AsyncFd that owns it.
            let mut fd = match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
                Ok(fd) => fd,
                Err(e) => {
                    log::warn!("cannot poll the data path's log buffer: {e}");
                    return;
                }
            };
            loop {
                let Ok(mut guard) = fd.readable_mut().await else { return };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        })),
        Err(aya_log::Error::MapNotFound) => {
            log::warn!("the data path has no log map (AYA_LOGS); its log lines are off");
            None
        }
        Err(e) => {
            log::warn!("cannot read the data path's log lines: {}", crate::error::report(&e));
            None
        }
    }
}

fn validate_node(node: &str) -> Result<(), AgentError> {
    if node.is_empty() || node == "." || node == ".." || node.contains('/') || node.contains('\0') {
        return Err(AgentError::BadNode(node.into()));
    }
    Ok(())
}

/// Puts the rules of the start in force, if there are any.
fn start_rules(
    path: Option<&std::path::Path>,
    start: Option<StartRules>,
    datapath: &Arc<Mutex<Datapath>>,
    rule_names: &Arc<RuleNames>,
    endpoints: &Arc<Endpoints>,
    last_good: LastGood,
) -> Result<Option<Arc<RuleSync>>, AgentError> {
    if let (Some(path), Some(start)) = (path, start) {
        let sync = RuleSync::start(
            path,
            start,
            Arc::clone(datapath),
            Arc::clone(rule_names),
            Arc::clone(endpoints),
            last_good,
        )
        .map_err(AgentError::Rules)?;
        return Ok(Some(sync));
    }
    log::info!("no --rules: observing only (every flow passes with the verdict `observed`)");
    Ok(None)
}

/// What goes in force at start when the rule files do not load: the generation a
/// previous agent left in force; else the last good copy under each zone's
/// `on_rules_failure`; else nothing can be enforced and the start ends.
fn rules_after_failure(
    error: RulesError,
    inherited: Option<u32>,
    last_good: &LastGood,
) -> Result<StartRules, AgentError> {
    if let Some(generation) = inherited {
        return Ok(StartRules::Inherited { error, generation });
    }
    match last_good.load() {
        Ok((copy, meta)) => Ok(StartRules::FailureMode { error, copy, meta }),
        Err(why) => Err(AgentError::NothingToEnforce { error: Box::new(error), why }),
    }
}

impl RunOptions {
    /// The data path's options, with how TC programs attach once that is decided.
    #[must_use]
    pub fn datapath_options(&self, tc_attach: TcAttach) -> DatapathOptions {
        DatapathOptions {
            pin_dir: self.pin_dir.clone(),
            flow_table_size: self.flow_table_size,
            ring_size: self.ring_size,
            payload_ring_size: self.payload_ring_size,
            ingress: self.ingress,
            uplink_ingress: self.uplink_ingress,
            tc_attach,
        }
    }
}

/// Checks the kernel for what the data path needs (a missing feature ends the start,
/// named) and decides how TC programs attach.
fn check_kernel(choice: TcAttachChoice) -> Result<TcAttach, AgentError> {
    let report = kernel::probe();
    let missing = report.missing();
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|f| format!("{} ({})", f.name, f.why)).collect();
        return Err(AgentError::Kernel(format!(
            "kernel {} lacks what the data path needs: {}",
            report.release,
            names.join("; ")
        )));
    }
    let tc_attach = report.tc_attach(choice).map_err(AgentError::Kernel)?;
    log::info!(
        "kernel {}: TC programs attach as {} ({})",
        report.release,
        tc_attach,
        if report.tcx { "TCX links available" } else { "no TCX links: clsact + cls_bpf filters" }
    );
    Ok(tc_attach)
}

/// Runs the agent until SIGINT or SIGTERM.
#[expect(clippy::too_many_lines, reason = "the start, in order, reads best as one sequence")]
pub async fn run(opts: RunOptions) -> Result<(), AgentError> {
    // Signals first: a SIGTERM during start-up must still lead to an orderly exit.
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;

    validate_node(&opts.node)?;
    if opts.idle_timeout < Duration::from_secs(1) {
        return Err(AgentError::BadIdleTimeout);
    }
    server::ensure_not_in_use(&opts.socket)?;
    let selector = PortSelector::new(&opts.interfaces, &opts.uplinks)?;
    let dp_opts = opts.datapath_options(check_kernel(opts.tc_attach)?);
    dp_opts.validate()?;
    // The rules are read before anything is loaded or attached: a rule set with errors
    // ends the start here.
    let loaded_rules = opts.rules.as_deref().map(LoadedRules::load);
    let last_good = LastGood::new(&opts.state_dir);
    let clock = Clock::measure();
    let etcd = if opts.etcd.is_empty() { None } else { Some(Etcd::new(&opts.etcd)?) };
    let cluster = etcd.map(|etcd| Cluster::new(etcd, &opts.node, &opts.labels));

    datapath::ensure_bpffs()?;
    // A previous agent's maps are reused (flows, counters and the rules in force carry
    // on) if their layout fits; its links stay attached, running its programs, until
    // this agent's programs replace them in place once the rules are in force.
    // An older pinned layout is upgraded (see `pin_layout`): its state is copied into this
    // agent's maps, its ports switched to this agent's programs once the rules are in
    // force. Its rule tables are not carried, so nothing of it counts as in force here.
    let found = pin_layout::find(&opts.pin_dir);
    let pins = datapath::check_pins(DATAPATH_OBJECT, &dp_opts, &found.dir(&opts.pin_dir))?;
    let upgrading = matches!(found, pin_layout::Found::Older { .. });
    let inherited = datapath::pinned_config(&found.dir(&opts.pin_dir))
        .filter(|c| pins.adopting() && !upgrading && c.flags & CONFIG_ENFORCE != 0);
    // Rule files that do not load keep what is in force, or put the last good copy in
    // force under each zone's on_rules_failure; with neither, the start ends here.
    let start_rules_with = match loaded_rules {
        None => None,
        Some(Ok(loaded)) => Some(StartRules::Loaded(loaded)),
        Some(Err(error)) => Some(rules_after_failure(error, inherited.map(|c| c.generation), &last_good)?),
    };
    datapath::prepare_pin_dir(&opts.pin_dir)?;
    // Held until the agent is gone: one agent per pin directory (and port guard table).
    let _pin_lock = datapath::lock_pin_dir(&opts.pin_dir)?;
    let guard = Arc::new(PortGuard::new(guard::table_name(&opts.node, &opts.pin_dir)));
    let (mut dp, maps) = Datapath::load(DATAPATH_OBJECT, &dp_opts)?;
    let ids = dp.program_ids();
    log::info!(
        "data path loaded: from_port (XDP) id {}, from_port_tc (TC ingress) id {}, to_port (TC egress) id {}, \
         attached as {}; from_port at {} on VM ports, {} on uplinks; maps pinned in {}",
        ids.from_port,
        ids.from_port_tc,
        ids.to_port,
        dp_opts.tc_attach,
        opts.ingress.as_str(),
        opts.uplink_ingress.as_str(),
        opts.pin_dir.display()
    );
    let mut migration = match &found {
        pin_layout::Found::Older { version, dir } => {
            let migration = dp.upgrade_from(*version, dir)?;
            log::info!(
                "upgrading the pinned layout {version} in {} to layout {} in {}: copied {}",
                dir.display(),
                backplane_common::maps::PIN_LAYOUT_VERSION,
                migration.to.display(),
                migration.copied.iter().map(|(m, n)| format!("{m} {n}")).collect::<Vec<_>>().join(", ")
            );
            Some(migration)
        }
        pin_layout::Found::Nothing | pin_layout::Found::Current => None,
    };
    let adopting = pins.adopting();
    if adopting {
        let ports = dp.adopt_links(|name| selector.role(name));
        log::info!(
            "adopting the data path a previous agent left in {}: {} maps reused, {} port(s) ({}) still running its \
             programs until they are replaced; {}",
            opts.pin_dir.display(),
            pins.reused.len(),
            ports.len(),
            ports.join(","),
            inherited.map_or_else(
                || "no rules in force".to_owned(),
                |c| format!("rule generation {} in force", c.generation)
            )
        );
    }
    if inherited.is_some() && opts.rules.is_none() {
        log::warn!("no --rules: the rules the previous agent left in force are lifted (observing only)");
        dp.observe_only().map_err(|e| DatapathError::Map { map: backplane_common::maps::CONFIG, source: e })?;
    }
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    tasks.extend(start_ebpf_logger(&mut dp));

    let maps_dir = dp.maps_dir().to_owned();
    let datapath = Arc::new(Mutex::new(dp));
    let ifnames = Arc::new(IfNames::new());
    let idle_ns = u64::try_from(opts.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
    let rule_names = Arc::new(RuleNames::new());
    let flows = Arc::new(SharedFlows::new(
        FlowTable::new(clock, idle_ns, Arc::clone(&ifnames), Arc::clone(&rule_names)),
        Some(maps.flows),
    ));

    // Kernel run statistics cost every BPF program two clock reads per run: on only
    // while metrics are served.
    let _program_stats =
        opts.metrics_addr.filter(|_| opts.program_stats).and_then(|_| datapath::enable_program_stats());
    let metrics = Arc::new(Metrics::new());
    let map_fills = MapFills::open(&maps_dir);
    let sample_stats = Arc::new(SampleStats::default());

    let endpoint_opts = EndpointOptions {
        node: opts.node.clone(),
        labels: opts.labels.clone(),
        state_dir: opts.state_dir.clone(),
        handover: opts.flow_handover,
    };
    let state_dir = opts.state_dir.clone();
    let result = async {
        // Exporters subscribe before the first port is attached: they miss no flow.
        if let Some(log_opts) = &opts.flow_log {
            let file = RotatingFile::open(log_opts.clone())
                .map_err(|source| AgentError::FlowLog { path: log_opts.path.clone(), source })?;
            let (rx, m) = (flows.subscribe(), Arc::clone(&metrics));
            std::thread::Builder::new()
                .name("flow-log".into())
                .spawn(move || flow_log::run(file, rx, &m))
                .map_err(|source| AgentError::FlowLog { path: log_opts.path.clone(), source })?;
            log::info!("flow log: {}", log_opts.path.display());
        }
        if let Some(ipfix_opts) = &opts.ipfix {
            let exporter = ipfix::Exporter::connect(ipfix_opts.clone(), Arc::clone(&metrics))
                .await
                .map_err(|source| AgentError::Ipfix { addr: ipfix_opts.collector, source })?;
            tasks.push(tokio::spawn(exporter.run(flows.subscribe())));
            log::info!("IPFIX export to {}", ipfix_opts.collector);
        }
        let peers = cluster.clone().map(|c| c as Arc<dyn Peers>);
        let endpoints = Endpoints::new(endpoint_opts, Arc::clone(&datapath), Arc::clone(&flows), clock, peers)
            .map_err(|source| AgentError::StateDir { path: state_dir, source })?;
        let (announce_tx, announce_rx) = tokio::sync::mpsc::unbounded_channel();
        tasks.push(tokio::spawn(Arc::clone(&endpoints).follow_announcements(announce_rx)));
        // Endpoints last seen on adopted ports are bound before the first rule tables are
        // written, so that those tables bind their MACs from the start.
        endpoints.bind_last_locations();
        // The rules go in force before any port is attached: no packet passes unjudged.
        let rules =
            start_rules(opts.rules.as_deref(), start_rules_with, &datapath, &rule_names, &endpoints, last_good)?;
        if rules.is_none() {
            endpoints.sync_kernel();
        }
        tasks.extend(rules.as_ref().map(|sync| tokio::spawn(Arc::clone(sync).watch())));
        if adopting {
            // The rules are in force: this agent's programs take over the adopted links.
            let updated = datapath.lock().expect("datapath lock").upgrade_adopted();
            log::info!("replaced the programs of {updated} adopted link(s) or filter(s) in place");
        }
        if let Some(migration) = migration.take() {
            // Every adopted port runs this agent's programs on this layout's maps now.
            let version = migration.version;
            let late = migration.finish();
            log::info!(
                "upgrade from layout {version} done: {late} flow(s) created meanwhile copied, old map pins removed"
            );
        }
        // A previous agent's blocked ports stay blocked until the first look at the ports.
        let enforcing = datapath.lock().expect("datapath lock").config().is_ok_and(|c| c.flags & CONFIG_ENFORCE != 0);
        let taking_over = Arc::clone(&guard);
        tokio::task::spawn_blocking(move || taking_over.take_over(enforcing))
            .await
            .unwrap_or_else(|e| log::error!("port guard: the take-over task failed: {e}"));
        log::info!("watching interfaces: {}", selector.describe());
        let removed = Arc::clone(&endpoints);
        let mut watcher =
            PortWatcher::subscribe(selector, Arc::clone(&datapath), Arc::clone(&ifnames), Arc::clone(&guard))?
                .on_port_removed(move |ifindex| removed.port_removed(ifindex))
                .guard_uplinks(opts.guard_uplinks);
        watcher.reconcile(&HashSet::new()).await?;
        tasks.push(tokio::spawn(watcher.run()));
        endpoints.restore_bindings();
        if let Some(cluster) = &cluster {
            log::info!("sharing endpoints through etcd at {} as node {}", cluster.urls().join(","), opts.node);
            tasks.push(cluster.start(Arc::clone(&endpoints)));
        } else {
            log::info!("no --etcd: a single node; endpoint state in {}", opts.state_dir.display());
        }

        let events_flows = Arc::clone(&flows);
        let ring = maps.events;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = rings::consume_events(ring, events_flows, announce_tx).await {
                log::error!("flow event reader stopped: {e}; flows are still read from the kernel table");
            }
        }));

        let (sample_flows, sample_ring, stats) = (Arc::clone(&flows), maps.samples, Arc::clone(&sample_stats));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = rings::consume_samples(sample_ring, sample_flows, stats).await {
                log::error!("payload sample reader stopped: {e}; flows are no longer named");
            }
        }));

        let refresh_flows = Arc::clone(&flows);
        tasks.push(tokio::spawn(async move {
            loop {
                let started = std::time::Instant::now();
                let f = Arc::clone(&refresh_flows);
                if let Err(e) = tokio::task::spawn_blocking(move || f.refresh()).await {
                    log::error!("flow refresh failed: {e}");
                }
                // A big table takes long to read: at most half of the time goes to it,
                // the rest to events, exports and clients.
                let took = started.elapsed();
                tokio::time::sleep(REFRESH_PERIOD.saturating_sub(took).max(took)).await;
            }
        }));

        let agent = Arc::new(Agent {
            opts: opts.clone(),
            datapath: Arc::clone(&datapath),
            flows: Arc::clone(&flows),
            rule_names: Arc::clone(&rule_names),
            rules,
            map_fills,
            sample_stats: Arc::clone(&sample_stats),
            endpoints,
            port_guard: Arc::clone(&guard),
        });
        if let Some(addr) = opts.metrics_addr {
            match metrics_http::bind(addr).await {
                Ok(listener) => {
                    log::info!("metrics: http://{}/metrics", listener.local_addr().unwrap_or(addr));
                    let scraped = Arc::clone(&agent);
                    let scrape: metrics_http::ScrapeFn = Arc::new(move || scraped.scrape());
                    tasks.push(tokio::spawn(metrics_http::serve(listener, Arc::clone(&metrics), scrape)));
                }
                Err(source) if opts.metrics_required => return Err(AgentError::Metrics { addr, source }),
                Err(e) => log::warn!("metrics: cannot listen on the default {addr} ({e}); running without /metrics"),
            }
        }
        let listener = server::bind(&opts.socket)?;
        tasks.push(tokio::spawn(server::serve(listener, agent)));
        log::info!("ready: control socket {}", opts.socket.display());
        Ok::<(), AgentError>(())
    }
    .await;

    if result.is_ok() {
        tokio::select! {
            _ = sigterm.recv() => log::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => log::info!("SIGINT: shutting down"),
        }
    }

    shut_down(&opts, tasks, &datapath, &guard, result.is_ok(), adopting).await;
    result
}

/// Stops the tasks, removes the control socket (if the start got that far) and either
/// leaves the data path attached and the port guard in place, or detaches the data path
/// and removes the port guard's table (on `--detach-on-exit`, or after a failed start
/// that adopted nothing: a data path adopted from a previous agent stays).
async fn shut_down(
    opts: &RunOptions,
    tasks: Vec<JoinHandle<()>>,
    datapath: &Mutex<Datapath>,
    guard: &PortGuard,
    started: bool,
    adopted: bool,
) {
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    if started
        && let Err(e) = std::fs::remove_file(&opts.socket)
        && e.kind() != io::ErrorKind::NotFound
    {
        log::warn!("cannot remove control socket {}: {e}", opts.socket.display());
    }
    // Clients still connected may hold the agent; the data path is shut down through
    // the lock either way.
    let mut dp = datapath.lock().expect("datapath lock");
    if (started && opts.detach_on_exit) || (!started && !adopted) {
        let ports = dp.attached().len();
        dp.detach_all_and_unpin();
        log::info!("detached from {ports} port(s) and removed the pins in {}", opts.pin_dir.display());
        drop(dp);
        guard.remove();
    } else {
        dp.leave_attached();
        guard.leave_in_place();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_count_every_standing() {
        let names: Vec<&str> = Standing::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, crate::export::metrics::ENDPOINT_STATES);
    }

    #[test]
    fn node_names_must_be_one_path_component() {
        assert!(validate_node("hv-01").is_ok());
        for bad in ["", ".", "..", "a/b"] {
            assert!(validate_node(bad).is_err(), "{bad:?}");
        }
    }
}
