//! `backplane run`: the composition root. It checks what it is told, loads the data path,
//! makes every part of the agent and wires them together, serves, and shuts it all down
//! in order. Nothing else makes the parts: each subsystem gets what it uses here.
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
    collections::HashSet,
    io,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use backplane_common::{FlowEvent, config::CONFIG_ENFORCE};
use thiserror::Error;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc::Sender,
    task::JoinHandle,
};

use crate::{
    agent::Agent,
    clock::Clock,
    cluster::{Cluster, etcd::Etcd},
    control::{ControlError, server},
    datapath::{
        self, DATAPATH_OBJECT, Datapath, DatapathError, DatapathMaps, DatapathOptions,
        kernel::{self, TcAttach, TcAttachChoice},
        map_fill::MapFills,
        pin_layout,
    },
    endpoints::{EndpointOptions, Endpoints, Peers},
    error::report,
    export::{
        flow_log::{self, RotatingFile},
        ipfix,
        metrics::Metrics,
        metrics_http,
    },
    flows::{FlowTable, SharedFlows, names::RuleNames, payload::SampleStats, rings},
    ifnames::IfNames,
    options::RunOptions,
    ports::{
        PortSelector, PortWatcher, WatchError,
        guard::{self, PortGuard},
    },
    rules::{LoadedRules, RuleSync, RulesError, StartRules, last_good::LastGood},
};

/// Announcements waiting for the endpoints (each one may ask etcd and sync the kernel).
const ANNOUNCE_QUEUE: usize = 1024;

/// How often the kernel flow table is read.
const REFRESH_PERIOD: Duration = Duration::from_secs(1);

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
    /// What the start found makes it end: a state or pin directory others could change,
    /// rules in force with none given.
    #[error("cannot start: {0}")]
    Refused(String),
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(opts: RunOptions) -> Result<(), AgentError> {
    // Signals first: a SIGTERM during start-up must still lead to an orderly exit.
    let mut signals = Signals::install()?;
    let mut checked = check(&opts)?;
    let Loaded { mut datapath, maps, rules, adopting, migration, pin_lock: _pin_lock, guard } =
        load_datapath(&opts, &mut checked)?;
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    tasks.extend(start_ebpf_logger(&mut datapath));
    let (parts, map_fills) = Parts::new(&opts, datapath, maps.flows, checked.clock, guard);
    let rest = Rest { checked, rules, adopting, migration, events: maps.events, samples: maps.samples, map_fills };
    let result = start(&opts, &parts, rest, &mut tasks).await;
    if result.is_ok() {
        let mode = if opts.rules.is_some() { "enforcing the rules" } else { "observing only" };
        crate::notify::notify(&format!("READY=1\nSTATUS={mode}"));
        signals.wait().await;
        crate::notify::notify("STOPPING=1");
    }
    shut_down(&opts, tasks, &parts.datapath, &parts.guard, result.is_ok(), adopting).await;
    result
}

/// SIGTERM and SIGINT, installed before anything else.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> Result<Self, AgentError> {
        let term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
        let int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
        Ok(Self { term, int })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => log::info!("SIGTERM: shutting down"),
            _ = self.int.recv() => log::info!("SIGINT: shutting down"),
        }
    }
}

/// What the start learns before it touches anything (the options themselves were
/// validated when they were made: [`RunOptions::validate`]).
struct Checked {
    selector: PortSelector,
    dp_opts: DatapathOptions,
    /// The rule files as read; `None` without `--rules`.
    rules: Option<Result<LoadedRules, RulesError>>,
    last_good: LastGood,
    clock: Clock,
    cluster: Option<Arc<Cluster>>,
}

/// Checks what can be checked before anything is touched: no live agent on the socket,
/// the kernel's features (and how TC programs attach); reads the rule files.
fn check(opts: &RunOptions) -> Result<Checked, AgentError> {
    server::ensure_not_in_use(&opts.socket)?;
    // What the agent trusts at a start comes from these: no other user may write there.
    crate::files::ensure_dir(&opts.state_dir, "state directory").map_err(AgentError::Refused)?;
    let selector = PortSelector::new(&opts.interfaces, &opts.uplinks)?;
    let dp_opts = opts.datapath_options(check_kernel(opts.tc_attach)?);
    // The rules are read before anything is loaded or attached: a rule set with errors
    // ends the start here.
    let rules = opts.rules.as_deref().map(LoadedRules::load);
    let last_good = LastGood::new(&opts.state_dir);
    let clock = Clock::measure();
    let etcd = if opts.etcd.is_empty() { None } else { Some(Etcd::new(&opts.etcd)?) };
    let cluster = etcd.map(|etcd| Cluster::new(etcd, &opts.node, &opts.labels));
    Ok(Checked { selector, dp_opts, rules, last_good, clock, cluster })
}

/// The data path as loaded, with what a previous agent left; nothing attached yet.
struct Loaded {
    datapath: Datapath,
    maps: DatapathMaps,
    /// The rules the start puts in force; `None` without `--rules`.
    rules: Option<StartRules>,
    /// Whether a previous agent's maps and links were adopted.
    adopting: bool,
    /// The upgrade of an older pinned layout, finished once the rules are in force.
    migration: Option<pin_layout::Migration>,
    /// Held until the agent is gone: one agent per pin directory (and port guard table).
    pin_lock: std::fs::File,
    guard: Arc<PortGuard>,
}

/// Mounts bpffs, checks what a previous agent pinned, decides the rules of the start and
/// loads the data path: maps reused or upgraded, links adopted.
fn load_datapath(opts: &RunOptions, checked: &mut Checked) -> Result<Loaded, AgentError> {
    let dp_opts = &checked.dp_opts;
    datapath::ensure_bpffs()?;
    // A previous agent's maps are reused (flows, counters and the rules in force carry
    // on) if their layout fits; its links stay attached, running its programs, until
    // this agent's programs replace them in place once the rules are in force.
    // An older pinned layout is upgraded (see `pin_layout`): its state is copied into this
    // agent's maps, its ports switched to this agent's programs once the rules are in
    // force. Its rule tables are not carried, so nothing of it counts as in force here.
    let found = pin_layout::find(&opts.pin_dir);
    let upgrading = matches!(found, pin_layout::Found::Older { .. });
    let pins = datapath::check_pins(DATAPATH_OBJECT, dp_opts, &found.dir(&opts.pin_dir), upgrading)?;
    let inherited = datapath::pinned_config(&found.dir(&opts.pin_dir))
        .filter(|c| pins.adopting() && !upgrading && c.flags & CONFIG_ENFORCE != 0);
    if let Some(c) = inherited.filter(|_| opts.rules.is_none() && !opts.observe_only) {
        return Err(AgentError::Refused(format!(
            "rules are in force in {} (generation {}) and this start gives no --rules: give the rules \
             (--rules PATH), or --observe-only to lift them; nothing was changed",
            opts.pin_dir.display(),
            c.generation
        )));
    }
    // Rule files that do not load keep what is in force, or put the last good copy in
    // force under each zone's on_rules_failure; with neither, the start ends here.
    let rules = match checked.rules.take() {
        None => None,
        Some(Ok(loaded)) => Some(StartRules::Loaded(loaded)),
        Some(Err(error)) => Some(rules_after_failure(error, inherited.map(|c| c.generation), &checked.last_good)?),
    };
    datapath::prepare_pin_dir(&opts.pin_dir)?;
    crate::files::check_dir(&opts.pin_dir, "pin directory").map_err(AgentError::Refused)?;
    let pin_lock = datapath::lock_pin_dir(&opts.pin_dir)?;
    let guard = Arc::new(PortGuard::new(guard::table_name(&opts.node, &opts.pin_dir)));
    let (mut dp, maps) = Datapath::load(DATAPATH_OBJECT, dp_opts)?;
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
    let migration = match &found {
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
        let ports = dp.adopt_links(|name| checked.selector.role(name));
        dp.ports_changed();
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
        log::warn!("--observe-only: the rules the previous agent left in force are lifted (observing only)");
        dp.observe_only().map_err(|e| DatapathError::Map { map: backplane_common::maps::CONFIG, source: e })?;
    }
    Ok(Loaded { datapath: dp, maps, rules, adopting, migration, pin_lock, guard })
}

/// The parts of the running agent that its tasks share, and that the shutdown takes
/// down.
struct Parts {
    datapath: Arc<Mutex<Datapath>>,
    guard: Arc<PortGuard>,
    flows: Arc<SharedFlows>,
    ifnames: Arc<IfNames>,
    rule_names: Arc<RuleNames>,
    metrics: Arc<Metrics>,
    sample_stats: Arc<SampleStats>,
    /// Keeps the kernel's program statistics on while the agent runs, if it turned them
    /// on.
    _program_stats: Option<std::os::fd::OwnedFd>,
}

impl Parts {
    /// Shares the data path and makes the flow table, the rule names and the metrics;
    /// opens the pinned maps whose fill the metrics report.
    fn new(
        opts: &RunOptions,
        dp: Datapath,
        kernel_flows: aya::maps::HashMap<MapData, backplane_common::FlowKey, backplane_common::FlowValue>,
        clock: Clock,
        guard: Arc<PortGuard>,
    ) -> (Self, MapFills) {
        let maps_dir = dp.maps_dir().to_owned();
        let datapath = Arc::new(Mutex::new(dp));
        let ifnames = Arc::new(IfNames::new());
        let idle_ns = u64::try_from(opts.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        let rule_names = Arc::new(RuleNames::new());
        let flows = Arc::new(SharedFlows::new(
            FlowTable::new(clock, idle_ns, Arc::clone(&ifnames), Arc::clone(&rule_names)),
            Some(kernel_flows),
        ));
        // Kernel run statistics cost every BPF program two clock reads per run: on only
        // while metrics are served.
        let program_stats =
            opts.metrics_addr.filter(|_| opts.program_stats).and_then(|_| datapath::enable_program_stats());
        let metrics = Arc::new(Metrics::new());
        let map_fills = MapFills::open(&maps_dir);
        let sample_stats = Arc::new(SampleStats::default());
        let parts =
            Self { datapath, guard, flows, ifnames, rule_names, metrics, sample_stats, _program_stats: program_stats };
        (parts, map_fills)
    }
}

/// What the start takes over from the loading, besides the parts.
struct Rest {
    checked: Checked,
    rules: Option<StartRules>,
    adopting: bool,
    migration: Option<pin_layout::Migration>,
    events: RingBuf<MapData>,
    samples: RingBuf<MapData>,
    map_fills: MapFills,
}

/// Starts everything, in order, up to the control socket, which appearing means ready.
async fn start(
    opts: &RunOptions,
    parts: &Parts,
    rest: Rest,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<(), AgentError> {
    let Rest { checked, rules, adopting, migration, events, samples, map_fills } = rest;
    // Exporters subscribe before the first port is attached: they miss no flow.
    start_exporters(opts, parts, tasks).await?;
    let (endpoints, announcements) = start_endpoints(opts, parts, checked.clock, checked.cluster.as_ref(), tasks)?;
    // Endpoints last seen on adopted ports are bound before the first rule tables are
    // written, so that those tables bind their MACs from the start.
    endpoints.bind_last_locations();
    // The rules go in force before any port is attached: no packet passes unjudged.
    let rules = start_rules(opts, parts, &endpoints, rules, checked.last_good, tasks)?;
    switch_to_this_agent(parts, adopting, migration);
    take_over_port_guard(parts).await;
    watch_ports(opts, parts, checked.selector, &endpoints, tasks).await?;
    endpoints.restore_bindings();
    if let Some(cluster) = &checked.cluster {
        log::info!("sharing endpoints through etcd at {} as node {}", cluster.urls().join(","), opts.node);
        tasks.push(cluster.start(Arc::clone(&endpoints)));
    } else {
        log::info!("no --etcd: a single node; endpoint state in {}", opts.state_dir.display());
    }
    start_flow_readers(parts, events, samples, announcements, tasks);
    let agent = Arc::new(Agent {
        opts: opts.clone(),
        datapath: Arc::clone(&parts.datapath),
        flows: Arc::clone(&parts.flows),
        rule_names: Arc::clone(&parts.rule_names),
        rules,
        map_fills,
        sample_stats: Arc::clone(&parts.sample_stats),
        endpoints,
        port_guard: Arc::clone(&parts.guard),
    });
    serve(opts, parts, agent, tasks).await
}

/// Starts the flow log and the IPFIX export (`--flow-log`, `--ipfix`).
async fn start_exporters(opts: &RunOptions, parts: &Parts, tasks: &mut Vec<JoinHandle<()>>) -> Result<(), AgentError> {
    if let Some(log_opts) = &opts.flow_log {
        let file = RotatingFile::open(log_opts.clone())
            .map_err(|source| AgentError::FlowLog { path: log_opts.path.clone(), source })?;
        let (rx, m) = (parts.flows.subscribe(), Arc::clone(&parts.metrics));
        std::thread::Builder::new()
            .name("flow-log".into())
            .spawn(move || flow_log::run(file, rx, &m))
            .map_err(|source| AgentError::FlowLog { path: log_opts.path.clone(), source })?;
        log::info!("flow log: {}", log_opts.path.display());
    }
    if let Some(ipfix_opts) = &opts.ipfix {
        let exporter = ipfix::Exporter::connect(ipfix_opts.clone(), Arc::clone(&parts.metrics))
            .await
            .map_err(|source| AgentError::Ipfix { addr: ipfix_opts.collector, source })?;
        tasks.push(tokio::spawn(exporter.run(parts.flows.subscribe())));
        log::info!("IPFIX export to {}", ipfix_opts.collector);
    }
    Ok(())
}

/// Makes the endpoints (with the cluster as their peers, if there is one) and starts
/// following announcements; returns where the flow event reader sends them.
fn start_endpoints(
    opts: &RunOptions,
    parts: &Parts,
    clock: Clock,
    cluster: Option<&Arc<Cluster>>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<(Arc<Endpoints>, Sender<FlowEvent>), AgentError> {
    let endpoint_opts = EndpointOptions {
        node: opts.node.clone(),
        labels: opts.labels.clone(),
        state_dir: opts.state_dir.clone(),
        handover: opts.flow_handover,
    };
    let peers = cluster.map(|c| Arc::clone(c) as Arc<dyn Peers>);
    let endpoints = Endpoints::new(endpoint_opts, Arc::clone(&parts.datapath), Arc::clone(&parts.flows), clock, peers)
        .map_err(|source| AgentError::StateDir { path: opts.state_dir.clone(), source })?;
    // Bounded: a guest announcing as fast as it can fills this queue, not the agent's
    // memory; what does not fit is dropped and counted (`announcements_dropped`).
    let (announce_tx, announce_rx) = tokio::sync::mpsc::channel(ANNOUNCE_QUEUE);
    tasks.push(tokio::spawn(Arc::clone(&endpoints).follow_announcements(announce_rx)));
    Ok((endpoints, announce_tx))
}

/// Puts the rules of the start in force, if there are any, and follows their files;
/// without rules, writes the endpoints' entries.
fn start_rules(
    opts: &RunOptions,
    parts: &Parts,
    endpoints: &Arc<Endpoints>,
    start: Option<StartRules>,
    last_good: LastGood,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Option<Arc<RuleSync>>, AgentError> {
    let (Some(path), Some(start)) = (opts.rules.as_deref(), start) else {
        log::info!("no --rules: observing only (every flow passes with the verdict `observed`)");
        endpoints.sync_kernel();
        return Ok(None);
    };
    let sync = RuleSync::start(
        path,
        start,
        Arc::clone(&parts.datapath),
        Arc::clone(&parts.rule_names),
        Arc::clone(endpoints),
        last_good,
    )
    .map_err(AgentError::Rules)?;
    tasks.push(tokio::spawn(Arc::clone(&sync).watch()));
    Ok(Some(sync))
}

/// Once the rules are in force: this agent's programs take over the adopted links, and
/// an upgrade of an older layout ends.
fn switch_to_this_agent(parts: &Parts, adopting: bool, migration: Option<pin_layout::Migration>) {
    if adopting {
        let updated = parts.datapath.lock().expect("datapath lock").upgrade_adopted();
        log::info!("replaced the programs of {updated} adopted link(s) or filter(s) in place");
    }
    if let Some(migration) = migration {
        // Every adopted port runs this agent's programs on this layout's maps now.
        let version = migration.version;
        let late = migration.finish();
        log::info!("upgrade from layout {version} done: {late} flow(s) created meanwhile copied, old map pins removed");
    }
}

/// Takes over the port guard a previous agent left: its blocked ports stay blocked until
/// the first look at the ports.
async fn take_over_port_guard(parts: &Parts) {
    let enforcing = parts.datapath.lock().expect("datapath lock").enforcing();
    let taking_over = Arc::clone(&parts.guard);
    tokio::task::spawn_blocking(move || taking_over.take_over(enforcing))
        .await
        .unwrap_or_else(|e| log::error!("port guard: the take-over task failed: {e}"));
}

/// Attaches the ports that exist and follows the interfaces; a port that goes away
/// unbinds its endpoints.
async fn watch_ports(
    opts: &RunOptions,
    parts: &Parts,
    selector: PortSelector,
    endpoints: &Arc<Endpoints>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<(), AgentError> {
    log::info!("watching interfaces: {}", selector.describe());
    let removed = Arc::clone(endpoints);
    let mut watcher = PortWatcher::subscribe(
        selector,
        Arc::clone(&parts.datapath),
        Arc::clone(&parts.ifnames),
        Arc::clone(&parts.guard),
    )?
    .on_port_removed(move |ifindex| removed.port_removed(ifindex))
    .guard_uplinks(opts.guard_uplinks);
    watcher.reconcile(&HashSet::new()).await?;
    tasks.push(tokio::spawn(watcher.run()));
    Ok(())
}

/// Starts the readers of both ring buffers and the periodic read of the kernel flow
/// table.
fn start_flow_readers(
    parts: &Parts,
    events: RingBuf<MapData>,
    samples: RingBuf<MapData>,
    announcements: Sender<FlowEvent>,
    tasks: &mut Vec<JoinHandle<()>>,
) {
    let events_flows = Arc::clone(&parts.flows);
    tasks.push(tokio::spawn(async move {
        if let Err(e) = rings::consume_events(events, events_flows, announcements).await {
            log::error!("flow event reader stopped: {e}; flows are still read from the kernel table");
        }
    }));

    let (sample_flows, stats) = (Arc::clone(&parts.flows), Arc::clone(&parts.sample_stats));
    tasks.push(tokio::spawn(async move {
        if let Err(e) = rings::consume_samples(samples, sample_flows, stats).await {
            log::error!("payload sample reader stopped: {e}; flows are no longer named");
        }
    }));

    let refresh_flows = Arc::clone(&parts.flows);
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
}

/// Serves `/metrics` (the server gets the registry and a closure that fills a scrape from
/// the agent) and then the control socket.
async fn serve(
    opts: &RunOptions,
    parts: &Parts,
    agent: Arc<Agent>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<(), AgentError> {
    if let Some(addr) = opts.metrics_addr {
        match metrics_http::bind(addr).await {
            Ok(listener) => {
                log::info!("metrics: http://{}/metrics", listener.local_addr().unwrap_or(addr));
                let scraped = Arc::clone(&agent);
                let scrape: metrics_http::ScrapeFn = Arc::new(move || scraped.scrape());
                tasks.push(tokio::spawn(metrics_http::serve(listener, Arc::clone(&parts.metrics), scrape)));
            }
            Err(source) if opts.metrics_required => return Err(AgentError::Metrics { addr, source }),
            Err(e) => log::warn!("metrics: cannot listen on the default {addr} ({e}); running without /metrics"),
        }
    }
    let listener = server::bind(&opts.socket)?;
    tasks.push(tokio::spawn(server::serve(listener, agent)));
    log::info!("ready: control socket {}", opts.socket.display());
    Ok(())
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
            log::warn!("cannot read the data path's log lines: {}", report(&e));
            None
        }
    }
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
