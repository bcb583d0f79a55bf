//! Endpoints that move: the inventory (from the rules and added at run time), where each
//! endpoint is, what it may do there, and moving its flows with it.
//!
//! - **Identity follows the MAC.** An endpoint is bound to the port where its MAC is
//!   announced or where the operator says it is: `EndpointValue::ifindex`, so that the
//!   data path drops its MAC from any other VM port ([`arrival`]).
//! - **Standing.** Each endpoint is active, quarantined or isolated ([`standing`]). The
//!   flags are written into the half of the rule tables in force, one entry at a time
//!   ([`kernel_sync`]), and into every rule set put in force later (see
//!   [`Endpoints::overlay`]); the endpoint's flows are judged again.
//! - **Moves.** An arrival of an endpoint last seen on another node (or port) carries its
//!   established flows ([`arrival`]); every move is written to the audit log ([`audit`]).
//! - **State** (runtime endpoints, attestations, last locations, [`model`]) is kept in
//!   `<state-dir>/endpoints.json`, and shared with the other nodes through [`Peers`]
//!   ([`peers`]), which `crate::cluster` implements over etcd.
//!
//! This file holds the state and what the control socket and the cluster ask of it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use backplane_common::{
    FlowKey, FlowValue, Verdict,
    flow::{FAMILY_IPV4, STATE_ENDED},
    policy::{EndpointValue, ZONE_WORLD},
};
use backplane_rules::{CompiledRules, MacAddr, PatchDate, RuleSet, VpatchEntry};
use serde::{Deserialize, Serialize};

use crate::{
    clock::{Clock, now_unix_ms, rfc3339_ms},
    datapath::{Datapath, rule_tables::EndpointOverlay},
    flows::SharedFlows,
};

pub mod arrival;
pub mod audit;
pub mod binding;
pub mod claim;
pub mod kernel_sync;
pub mod model;
pub mod peers;
pub mod standing;

use audit::{AuditLog, AuditRecord};
use model::{EndpointInfo, EndpointsStatus, EtcdStatus, HandoverFlow, HandoverSet, Location, RuntimeEndpoint};
pub use peers::Peers;
use standing::Standing;

/// File name of the endpoint state in the state directory.
pub const STATE_FILE: &str = "endpoints.json";

/// First endpoint id given to runtime endpoints and unknown MACs (compiled ids count
/// from 1 and stay far below).
const RUNTIME_ID_BASE: u32 = 0x4000_0000;

/// Most flows handed over per endpoint.
pub const MAX_HANDOVER_FLOWS: usize = 4096;

/// How many alerts `status` keeps.
const ALERTS_KEPT: usize = 50;

/// What `backplane run` says about the node and its endpoints.
#[derive(Clone, Debug)]
pub struct EndpointOptions {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub state_dir: PathBuf,
    /// Install the flows of arriving endpoints (off: `--no-flow-handover`).
    pub handover: bool,
}

/// `<state-dir>/endpoints.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Persisted {
    #[serde(default)]
    runtime: Vec<RuntimeEndpoint>,
    /// Endpoint name to patch date (`endpoint attest`).
    #[serde(default)]
    attested: BTreeMap<String, String>,
    /// MAC to last known location.
    #[serde(default)]
    locations: BTreeMap<String, Location>,
    /// What the host bound (`endpoint bind`), by port.
    #[serde(default)]
    host_bindings: Vec<binding::HostBinding>,
}

/// An endpoint as the agent knows it: from the inventory or added at run time.
#[derive(Clone, Debug)]
struct Def {
    name: String,
    mac: MacAddr,
    ips: Vec<IpAddr>,
    zone: Option<String>,
    tags: Vec<String>,
    patched_at: Option<PatchDate>,
    runtime: bool,
    /// What its port may send from besides its MAC and `ips` (rule files only).
    allowed_macs: Vec<MacAddr>,
    allowed_addresses: Vec<IpAddr>,
}

/// An endpoint bound to a port of this node.
#[derive(Clone, Debug)]
struct Bound {
    ifindex: u32,
    port: String,
    /// The host bound it (`endpoint bind`, `moved`); else the port locked it on first use.
    host: bool,
}

#[derive(Default)]
struct State {
    rules: Option<Arc<RuleSet>>,
    compiled: Option<Arc<CompiledRules>>,
    runtime: BTreeMap<String, RuntimeEndpoint>,
    attested: BTreeMap<String, PatchDate>,
    /// Last known location by MAC (this node's and, through etcd, the others').
    locations: HashMap<MacAddr, Location>,
    /// Endpoints bound to a port here.
    bound: HashMap<MacAddr, Bound>,
    /// Claims of endpoints another node holds, waiting for it to let go (see `claim`).
    held: HashMap<MacAddr, claim::Held>,
    /// When each port locked its MAC on first use, as this agent saw it (Unix ms).
    locked_at: HashMap<u32, i64>,
    /// MACs outside the inventory quarantined on a port here: (port binding, zone id).
    unknown: HashMap<MacAddr, (Bound, u16)>,
    /// Ports locked on first use to a MAC outside the inventory, by ifindex.
    learned_ports: HashMap<u32, binding::LearnedPort>,
    /// What the host bound, as the state file keeps it.
    host_bindings: Vec<binding::HostBinding>,
    /// Ports the host bound to a MAC outside the inventory (their binding is the host's).
    host_unknown: HashSet<u32>,
    /// Endpoint ids of runtime endpoints and unknown MACs.
    ids: HashMap<MacAddr, u32>,
    next_id: u32,
    /// What the half in force holds for each MAC the agent wrote, and the runtime
    /// virtual-patch entries.
    written: HashMap<MacAddr, EndpointValue>,
    written_vpatches: HashSet<VpatchEntry>,
    /// The overlay written with the rule set being put in force.
    staged: Option<(HashMap<MacAddr, EndpointValue>, HashSet<VpatchEntry>)>,
    /// Flows published by other nodes, by MAC (from etcd).
    remote_flows: HashMap<MacAddr, HandoverSet>,
    moves: u64,
    alerts: Vec<String>,
    /// Co-mingling pairs alerted and not yet resolved.
    co_mingled: HashSet<(String, String)>,
    /// Runtime definitions and attestations changed locally and not yet in etcd.
    dirty_shared: bool,
    /// Whether the bindings of a previous run were restored onto the attached ports:
    /// until then `ADDR_OWNERS` keeps what the previous agent left in it.
    bindings_restored: bool,
    etcd: EtcdStatus,
}

/// The endpoints of this node and what the agent knows of the others'.
pub struct Endpoints {
    opts: EndpointOptions,
    datapath: Arc<Mutex<Datapath>>,
    flows: Arc<SharedFlows>,
    clock: Clock,
    audit: AuditLog,
    state: Mutex<State>,
    /// The other nodes (`--etcd`); `None`: a single node.
    peers: Option<Arc<dyn Peers>>,
}

/// A MAC as text (`52:54:00:00:00:01`).
#[must_use]
pub fn mac_text(mac: MacAddr) -> String {
    mac.to_string()
}

/// The name a MAC outside the inventory goes by (`unknown-525400000001`).
fn unknown_name(mac: MacAddr) -> String {
    format!("unknown-{}", mac.to_string().replace(':', ""))
}

fn key_addr(addr: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// Which side of a flow is the endpoint bound to `ifindex` with addresses `ips`.
fn side_of(key: &FlowKey, value: &FlowValue, ifindex: Option<u32>, ips: &[IpAddr]) -> Option<u8> {
    if let Some(ifindex) = ifindex.filter(|i| *i != 0) {
        if value.ifindex[0] == ifindex {
            return Some(0);
        }
        if value.ifindex[1] == ifindex {
            return Some(1);
        }
    }
    let lo = key_addr(&key.addr_lo, key.family);
    let hi = key_addr(&key.addr_hi, key.family);
    if ips.contains(&lo) {
        Some(0)
    } else if ips.contains(&hi) {
        Some(1)
    } else {
        None
    }
}

/// Whether a flow is worth carrying: live and not denied.
fn carried(value: &FlowValue) -> bool {
    value.state & STATE_ENDED == 0 && value.verdict != Verdict::Denied as u8
}

impl Endpoints {
    /// The endpoints of a node, with their state read from `<state-dir>`.
    pub fn new(
        opts: EndpointOptions,
        datapath: Arc<Mutex<Datapath>>,
        flows: Arc<SharedFlows>,
        clock: Clock,
        peers: Option<Arc<dyn Peers>>,
    ) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(&opts.state_dir)?;
        let mut state = State { next_id: RUNTIME_ID_BASE, ..State::default() };
        let path = opts.state_dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Persisted>(&bytes) {
                Ok(p) => {
                    for r in p.runtime {
                        state.runtime.insert(r.name.clone(), r);
                    }
                    state.attested = p.attested.into_iter().filter_map(|(n, d)| Some((n, d.parse().ok()?))).collect();
                    // Locations of other nodes are only as good as etcd's; ours are
                    // re-established by announcements.
                    state.locations =
                        p.locations.into_iter().filter_map(|(m, l)| Some((m.parse::<MacAddr>().ok()?, l))).collect();
                    state.host_bindings = p.host_bindings;
                    log::info!(
                        "endpoint state from {}: {} runtime endpoints, {} attestations, {} locations",
                        path.display(),
                        state.runtime.len(),
                        state.attested.len(),
                        state.locations.len()
                    );
                }
                Err(e) => log::error!("ignoring {}: {e}", path.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::error!("cannot read {}: {e}", path.display()),
        }
        let audit = AuditLog::new(&opts.state_dir);
        Ok(Arc::new(Self { opts, datapath, flows, clock, audit, state: Mutex::new(state), peers }))
    }

    #[must_use]
    pub fn options(&self) -> &EndpointOptions {
        &self.opts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("endpoint state lock")
    }

    fn persist(&self, st: &State) {
        let p = Persisted {
            runtime: st.runtime.values().cloned().collect(),
            attested: st.attested.iter().map(|(n, d)| (n.clone(), d.to_string())).collect(),
            locations: st.locations.iter().map(|(m, l)| (m.to_string(), l.clone())).collect(),
            host_bindings: st.host_bindings.clone(),
        };
        let path = self.opts.state_dir.join(STATE_FILE);
        let result = serde_json::to_vec_pretty(&p)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::files::write_replace(&path, &bytes));
        if let Err(e) = result {
            log::error!("cannot save the endpoint state to {}: {e}", path.display());
        }
    }

    /// Every endpoint definition: the inventory (with attestations), then runtime ones.
    fn defs(st: &State) -> Vec<Def> {
        let mut out = Vec::new();
        if let Some(rules) = &st.rules {
            for e in &rules.endpoints {
                out.push(Def {
                    name: e.name.clone(),
                    mac: e.mac,
                    ips: e.ips.clone(),
                    zone: e.zone.clone(),
                    tags: e.tags.clone(),
                    patched_at: st.attested.get(&e.name).copied().max(e.patched_at),
                    runtime: false,
                    allowed_macs: e.allowed_macs.clone(),
                    allowed_addresses: e.allowed_addresses.clone(),
                });
            }
        }
        for r in st.runtime.values() {
            let Ok(mac) = r.mac.parse::<MacAddr>() else { continue };
            if out.iter().any(|d| d.mac == mac || d.name == r.name) {
                continue;
            }
            out.push(Def {
                name: r.name.clone(),
                mac,
                ips: r.ips.clone(),
                zone: r.zone.clone(),
                tags: r.tags.clone(),
                patched_at: st.attested.get(&r.name).copied().max(r.patched_at.as_deref().and_then(|d| d.parse().ok())),
                runtime: true,
                allowed_macs: Vec::new(),
                allowed_addresses: Vec::new(),
            });
        }
        out
    }

    fn id_for(st: &mut State, mac: MacAddr) -> u32 {
        if let Some(id) = st.ids.get(&mac) {
            return *id;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.ids.insert(mac, id);
        id
    }

    /// The overlay to write with a rule set about to be put in force (called by the rule
    /// sync before it stages the rule set).
    pub fn overlay(&self, rules: &Arc<RuleSet>, compiled: &Arc<CompiledRules>) -> EndpointOverlay {
        let mut st = self.lock();
        let (old_rules, old_compiled) =
            (st.rules.replace(Arc::clone(rules)), st.compiled.replace(Arc::clone(compiled)));
        // Port zones of the new rule set are known only once it is staged; unbound
        // endpoints without a zone are world until then.
        let overlay = self.compute(&mut st, &|_| ZONE_WORLD);
        st.rules = old_rules;
        st.compiled = old_compiled;
        st.staged = Some((overlay.endpoints.iter().copied().collect(), overlay.vpatches.iter().copied().collect()));
        overlay
    }

    /// A rule set is in force: keep it, and bring the half in force up to date.
    pub fn rules_in_force(&self, rules: Arc<RuleSet>, compiled: Arc<CompiledRules>) {
        {
            let mut st = self.lock();
            st.rules = Some(rules);
            st.compiled = Some(compiled);
            if let Some((written, vpatches)) = st.staged.take() {
                st.written = written;
                st.written_vpatches = vpatches;
            }
        }
        self.sync_kernel();
    }

    /// The definition of the endpoint with this MAC.
    fn def_by_mac(st: &State, mac: MacAddr) -> Option<Def> {
        Self::defs(st).into_iter().find(|d| d.mac == mac)
    }

    fn def_by_name(st: &State, name: &str) -> Option<Def> {
        Self::defs(st).into_iter().find(|d| d.name == name)
    }

    fn alert(st: &mut State, text: &str) {
        log::warn!("ALERT: {text}");
        st.alerts.push(format!("{} {text}", rfc3339_ms(now_unix_ms())));
        let excess = st.alerts.len().saturating_sub(ALERTS_KEPT);
        st.alerts.drain(..excess);
    }

    fn record(&self, mut r: AuditRecord) {
        let ms = now_unix_ms();
        r.unix_ms = ms;
        r.time = rfc3339_ms(ms);
        self.audit.append(&r);
    }

    /// An audit record of `kind` about an endpoint on a port of this node.
    fn record_here(&self, kind: &str, endpoint: &str, mac: MacAddr, port: &str) -> AuditRecord {
        AuditRecord {
            kind: kind.into(),
            endpoint: endpoint.into(),
            mac: mac_text(mac),
            to_node: Some(self.opts.node.clone()),
            to_port: Some(port.to_owned()),
            ..AuditRecord::default()
        }
    }

    /// The flows of an endpoint of this node, as they travel.
    fn handover_set(&self, def: &Def, port: String, updated_unix_ms: i64, flows: Vec<HandoverFlow>) -> HandoverSet {
        HandoverSet {
            name: def.name.clone(),
            mac: mac_text(def.mac),
            node: self.opts.node.clone(),
            port,
            updated_unix_ms,
            flows,
        }
    }

    /// Alerts when endpoints of zones that must not share a node are both here.
    fn check_co_mingling(&self, st: &mut State) {
        let Some(rules) = st.rules.clone() else { return };
        let defs = Self::defs(st);
        let zones_here: HashSet<String> = defs
            .iter()
            .filter(|d| st.bound.contains_key(&d.mac))
            .filter_map(|d| rules.zone_for(d.zone.as_deref(), d.mac, &d.ips).map(str::to_owned))
            .collect();
        let mut now = HashSet::new();
        for zone in &rules.zones {
            if !zones_here.contains(&zone.name) {
                continue;
            }
            for other in &zone.endpoints.must_not_share_node_with {
                if zones_here.contains(other) {
                    now.insert((zone.name.clone(), other.clone()));
                }
            }
        }
        for (a, b) in now.difference(&st.co_mingled.clone()) {
            let text =
                format!("co-mingling on node {}: endpoints of zones {a} and {b} must not share a node", self.opts.node);
            Self::alert(st, &text);
            self.record(AuditRecord {
                kind: "co_mingling".into(),
                endpoint: format!("{a}+{b}"),
                to_node: Some(self.opts.node.clone()),
                to_labels: self.opts.labels.clone(),
                detail: text,
                ..AuditRecord::default()
            });
        }
        st.co_mingled = now;
    }

    /// The flows of every endpoint bound here, for etcd (every second).
    pub(crate) fn local_handover_sets(&self) -> Vec<(MacAddr, HandoverSet)> {
        let (bound, defs): (Vec<(MacAddr, Bound)>, Vec<Def>) = {
            let st = self.lock();
            (st.bound.iter().map(|(m, b)| (*m, b.clone())).collect(), Self::defs(&st))
        };
        if bound.is_empty() {
            return Vec::new();
        }
        let entries = self.flows.entries();
        bound
            .into_iter()
            .filter_map(|(mac, b)| {
                let def = defs.iter().find(|d| d.mac == mac)?;
                let flows = self.to_handover(&entries, Some(b.ifindex), &def.ips);
                Some((mac, self.handover_set(def, b.port, now_unix_ms(), flows)))
            })
            .collect()
    }

    /// The locations of the endpoints bound here (to publish after a reconnect).
    pub(crate) fn local_locations(&self) -> Vec<(MacAddr, Location)> {
        let st = self.lock();
        st.bound
            .keys()
            .filter_map(|m| Some((*m, st.locations.get(m).filter(|l| l.node == self.opts.node)?.clone())))
            .collect()
    }

    /// What etcd says about other nodes' endpoints (a poll): locations and their flows.
    /// An endpoint bound here that another node claims since later has left.
    pub(crate) fn merge_remote(&self, locations: Vec<(MacAddr, Location)>, flows: Vec<(MacAddr, HandoverSet)>) {
        let mut departed = Vec::new();
        // Where an endpoint is bound elsewhere decides which addresses local VM ports may
        // not use: a new node for a MAC is a change for `ADDR_OWNERS`.
        let mut elsewhere_changed = false;
        {
            let mut st = self.lock();
            // A location of another node that etcd no longer holds (its lease expired) is
            // kept: the endpoint may still run there (see `claim`).
            for (mac, loc) in locations {
                if loc.node == self.opts.node {
                    continue;
                }
                if let Some(b) = st.bound.get(&mac) {
                    let ours = st.locations.get(&mac).map_or(0, |l| l.since_unix_ms);
                    if loc.since_unix_ms >= ours {
                        departed.push((mac, b.port.clone(), loc.clone()));
                    } else {
                        continue;
                    }
                }
                elsewhere_changed |=
                    st.locations.get(&mac).is_none_or(|old| old.node != loc.node || old.released() != loc.released());
                st.locations.insert(mac, loc);
            }
            st.remote_flows = flows.into_iter().filter(|(_, s)| s.node != self.opts.node).collect();
            for (mac, port, loc) in &departed {
                st.bound.remove(mac);
                log::info!("endpoint {mac} left port {port}: it is on node {} port {} now", loc.node, loc.port);
                self.record(AuditRecord {
                    kind: "departed".into(),
                    endpoint: loc.name.clone(),
                    mac: mac_text(*mac),
                    from_node: Some(self.opts.node.clone()),
                    from_port: Some(port.clone()),
                    from_labels: self.opts.labels.clone(),
                    to_node: Some(loc.node.clone()),
                    to_port: Some(loc.port.clone()),
                    to_labels: loc.labels.clone(),
                    ..AuditRecord::default()
                });
            }
            if !departed.is_empty() {
                self.check_co_mingling(&mut st);
                self.persist(&st);
            }
        }
        if !departed.is_empty() || elsewhere_changed {
            self.sync_kernel();
        }
    }

    /// Runtime endpoints and attestations as etcd holds them (a poll), unless local
    /// changes wait to be written there.
    pub(crate) fn merge_shared(&self, runtime: Vec<RuntimeEndpoint>, attested: BTreeMap<String, PatchDate>) {
        let changed = {
            let mut st = self.lock();
            if st.dirty_shared {
                return;
            }
            let runtime: BTreeMap<String, RuntimeEndpoint> = runtime.into_iter().map(|r| (r.name.clone(), r)).collect();
            let changed = runtime != st.runtime || attested != st.attested;
            if changed {
                st.runtime = runtime;
                st.attested = attested;
                self.persist(&st);
            }
            changed
        };
        if changed {
            self.sync_kernel();
        }
    }

    /// The runtime definitions and attestations to write to etcd, if they changed here.
    pub(crate) fn take_dirty_shared(&self) -> Option<(Vec<RuntimeEndpoint>, BTreeMap<String, PatchDate>)> {
        let st = self.lock();
        st.dirty_shared.then(|| (st.runtime.values().cloned().collect(), st.attested.clone()))
    }

    pub(crate) fn shared_written(&self) {
        self.lock().dirty_shared = false;
    }

    pub(crate) fn set_etcd_status(&self, f: impl FnOnce(&mut EtcdStatus)) {
        f(&mut self.lock().etcd);
    }

    /// `backplane endpoint add`.
    pub fn add(self: &Arc<Self>, r: RuntimeEndpoint) -> Result<EndpointInfo, String> {
        backplane_rules::check_endpoint_name(&r.name)?;
        let mac: MacAddr = r.mac.parse()?;
        if let Some(d) = r.patched_at.as_deref() {
            d.parse::<PatchDate>()?;
        }
        {
            let mut st = self.lock();
            if let Some(zone) = &r.zone {
                let known =
                    st.rules.as_ref().is_none_or(|rules| zone == backplane_rules::WORLD || rules.zone(zone).is_some());
                if !known {
                    return Err(format!("unknown zone \"{zone}\""));
                }
            }
            if let Some(other) = Self::defs(&st)
                .into_iter()
                .find(|d| (d.mac == mac || d.name == r.name) && !(d.runtime && d.name == r.name))
            {
                return Err(format!(
                    "endpoint \"{}\" ({}) is already {}",
                    other.name,
                    other.mac,
                    if other.runtime { "known" } else { "in the inventory" }
                ));
            }
            let others = Self::defs(&st).into_iter().filter(|d| !(d.runtime && d.name == r.name));
            if let Some((other, ip)) =
                others.into_iter().find_map(|d| r.ips.iter().find(|ip| d.ips.contains(ip)).map(|ip| (d.clone(), *ip)))
            {
                return Err(format!(
                    "address {ip} is already endpoint \"{}\"'s ({}); an address belongs to one endpoint",
                    other.name, other.mac
                ));
            }
            let mut r = r;
            r.mac = mac_text(mac);
            st.runtime.insert(r.name.clone(), r.clone());
            st.unknown.remove(&mac);
            st.dirty_shared = true;
            self.persist(&st);
            log::info!("endpoint {} ({mac}) added", r.name);
        }
        self.sync_kernel();
        self.kick_peers();
        self.list().into_iter().find(|i| i.mac == mac_text(mac)).ok_or_else(|| "added, but not listed".into())
    }

    /// `backplane endpoint remove`.
    pub fn remove(self: &Arc<Self>, name: &str) -> Result<(), String> {
        {
            let mut st = self.lock();
            if st.runtime.remove(name).is_none() {
                return Err(if st.rules.as_ref().and_then(|r| r.endpoint(name)).is_some() {
                    format!("endpoint \"{name}\" is in the inventory of the rules; remove it from the rule files")
                } else {
                    format!("no endpoint \"{name}\"")
                });
            }
            st.attested.remove(name);
            st.dirty_shared = true;
            self.persist(&st);
        }
        log::info!("endpoint {name} removed");
        self.sync_kernel();
        self.kick_peers();
        Ok(())
    }

    /// `backplane endpoint attest NAME --patched-at DATE`.
    pub fn attest(self: &Arc<Self>, name: &str, date: &str) -> Result<EndpointInfo, String> {
        let date: PatchDate = date.parse()?;
        let (before, def) = {
            let mut st = self.lock();
            let Some(def) = Self::def_by_name(&st, name) else { return Err(format!("no endpoint \"{name}\"")) };
            let before = self.info_locked(&mut st, &def).state;
            st.attested.insert(name.to_owned(), date);
            st.dirty_shared = true;
            self.persist(&st);
            (before, def)
        };
        self.sync_kernel();
        self.kick_peers();
        let info = self.info(name)?;
        log::info!("endpoint {name} attested as patched on {date}: {}", info.state);
        if before != info.state {
            self.record(AuditRecord {
                kind: if info.state == Standing::Active { "released" } else { "quarantined" }.into(),
                endpoint: name.to_owned(),
                mac: mac_text(def.mac),
                to_node: info.node.clone(),
                to_port: info.port.clone(),
                state: info.state.as_str().into(),
                detail: format!("attested as patched on {date}"),
                ..AuditRecord::default()
            });
        }
        Ok(info)
    }

    fn kick_peers(&self) {
        if let Some(peers) = &self.peers {
            peers.kick();
        }
    }

    fn info_locked(&self, st: &mut State, def: &Def) -> EndpointInfo {
        let s = self.assess(st, def, &|_| ZONE_WORLD);
        let bound = st.bound.get(&def.mac).cloned();
        let loc = st.locations.get(&def.mac).cloned();
        let (node, port) = match (&bound, &loc) {
            (Some(b), _) => (Some(self.opts.node.clone()), Some(b.port.clone())),
            (None, Some(l)) => (Some(l.node.clone()), Some(l.port.clone())),
            _ => (None, None),
        };
        let zone = s.zone.clone().or_else(|| {
            st.written.get(&def.mac).and_then(|v| st.compiled.as_ref()?.zone_ids.name(v.zone).map(str::to_owned))
        });
        EndpointInfo {
            name: def.name.clone(),
            mac: mac_text(def.mac),
            source: if def.runtime { "runtime" } else { "inventory" }.into(),
            zone,
            ips: def.ips.iter().map(ToString::to_string).collect(),
            tags: def.tags.clone(),
            patched_at: def.patched_at.map(|d| d.to_string()),
            state: st.written.get(&def.mac).map_or(s.standing(), |v| Standing::of_flags(v.flags)),
            reasons: s.reasons,
            node,
            port,
            here: bound.is_some(),
            endpoint_id: s.value.endpoint_id,
        }
    }

    fn info(&self, name: &str) -> Result<EndpointInfo, String> {
        let mut st = self.lock();
        let def = Self::def_by_name(&st, name).ok_or_else(|| format!("no endpoint \"{name}\""))?;
        Ok(self.info_locked(&mut st, &def))
    }

    /// `backplane endpoint list`.
    #[must_use]
    pub fn list(&self) -> Vec<EndpointInfo> {
        // The data path's lock before the state's, as everywhere.
        type Unbound = Vec<(String, Option<String>)>;
        let (port_names, unbound): (HashMap<u32, String>, Unbound) = {
            let dp = self.datapath.lock().expect("datapath lock");
            let ports = dp.port_status();
            let unbound = ports
                .iter()
                .filter(|p| p.binding == "none" || p.binding == "locked" || p.binding == "held")
                .map(|p| (p.name.clone(), p.bound_mac.clone()))
                .collect();
            (ports.into_iter().map(|p| (p.ifindex, p.name)).collect(), unbound)
        };
        let mut st = self.lock();
        let mut out: Vec<EndpointInfo> = Self::defs(&st).iter().map(|d| self.info_locked(&mut st, d)).collect();
        let names = st.compiled.clone();
        for (mac, (bound, zone)) in &st.unknown {
            out.push(EndpointInfo {
                name: unknown_name(*mac),
                mac: mac_text(*mac),
                source: "unknown".into(),
                zone: names.as_ref().and_then(|c| c.zone_ids.name(*zone)).map(str::to_owned),
                state: Standing::Quarantined,
                reasons: vec!["MAC not in the inventory".into()],
                node: Some(self.opts.node.clone()),
                port: Some(bound.port.clone()),
                here: true,
                endpoint_id: st.ids.get(mac).copied().unwrap_or(0),
                ..EndpointInfo::default()
            });
        }
        // Ports locked on first use to a MAC outside the inventory.
        for (ifindex, l) in &st.learned_ports {
            if st.unknown.contains_key(&l.mac) {
                continue;
            }
            out.push(EndpointInfo {
                name: unknown_name(l.mac),
                mac: mac_text(l.mac),
                source: "learned".into(),
                zone: l.zone.and_then(|z| names.as_ref().and_then(|c| c.zone_ids.name(z))).map(str::to_owned),
                state: Standing::Active,
                reasons: vec!["locked to its port on first use".into()],
                node: Some(self.opts.node.clone()),
                port: port_names.get(ifindex).cloned(),
                here: true,
                endpoint_id: st.ids.get(&l.mac).copied().unwrap_or(0),
                ..EndpointInfo::default()
            });
        }
        // VM ports nobody bound: the rules' `unbound_ports` applies to them, and an
        // operator must see them (a VM there may be cut off).
        let mode = st.rules.as_ref().map_or("observe", |r| r.unbound_ports.as_str());
        for (port, mac) in unbound {
            out.push(EndpointInfo {
                name: format!("unbound:{port}"),
                mac: mac.unwrap_or_default(),
                source: "unbound".into(),
                state: if mode == "quarantine" { Standing::Quarantined } else { Standing::Active },
                reasons: vec![format!("no binding on this port: unbound_ports {mode}")],
                node: Some(self.opts.node.clone()),
                port: Some(port),
                here: true,
                ..EndpointInfo::default()
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The audit log's records.
    #[must_use]
    pub fn audit_records(&self) -> Vec<AuditRecord> {
        self.audit.read()
    }

    #[must_use]
    pub fn audit_path(&self) -> &Path {
        self.audit.path()
    }

    /// The `endpoints` object of `status`.
    #[must_use]
    pub fn status(&self) -> EndpointsStatus {
        let list = self.list();
        let st = self.lock();
        let count = |s: Standing| list.iter().filter(|i| i.state == s).count() as u64;
        EndpointsStatus {
            node: self.opts.node.clone(),
            labels: self.opts.labels.clone(),
            state_dir: self.opts.state_dir.display().to_string(),
            audit_log: self.audit.path().display().to_string(),
            audit_records: self.audit.len(),
            flow_handover: self.opts.handover,
            total: list.len() as u64,
            here: list.iter().filter(|i| i.here).count() as u64,
            active: count(Standing::Active),
            quarantined: count(Standing::Quarantined),
            isolated: count(Standing::Isolated),
            moves: st.moves,
            alerts: st.alerts.clone(),
            etcd: st.etcd.clone(),
        }
    }

    /// Binds again what was bound on the adopted ports (see
    /// [`Endpoints::restore_port_bindings`]): never by a port's name alone.
    pub fn bind_last_locations(&self) -> usize {
        self.restore_port_bindings(false)
    }

    /// Binds the endpoints last seen here to their ports once every port is attached,
    /// then writes the kernel: from here on `ADDR_OWNERS` follows this agent's bindings
    /// (until then it keeps what a previous agent left in it).
    pub fn restore_bindings(self: &Arc<Self>) {
        let restored = self.restore_port_bindings(true);
        self.lock().bindings_restored = true;
        if restored > 0 {
            log::info!("{restored} endpoint(s) bound again to the ports they were last seen on");
        }
        self.sync_kernel();
    }
}

/// Parses `k=v,k=v` node labels.
pub fn parse_labels(text: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for item in text.iter().flat_map(|t| t.split(',')).map(str::trim).filter(|t| !t.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| format!("label {item:?} is not KEY=VALUE"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || v.is_empty() {
            return Err(format!("label {item:?} is not KEY=VALUE"));
        }
        if labels.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(format!("label {k} is given twice"));
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let l = parse_labels(&["jurisdiction=eu, rack=r1".into()]).unwrap();
        assert_eq!(l.get("jurisdiction").map(String::as_str), Some("eu"));
        assert_eq!(l.len(), 2);
        assert!(parse_labels(&["x".into()]).is_err());
        assert!(parse_labels(&["a=1,a=2".into()]).is_err());
        assert!(parse_labels(&[]).unwrap().is_empty());
    }

    #[test]
    fn sides_by_port_then_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (key, dir) =
            FlowKey::canonical(&addr_bytes(ip("10.0.0.1")), 1, &addr_bytes(ip("10.0.0.2")), 2, 0, 6, FAMILY_IPV4);
        let value = FlowValue { ifindex: [7, 9], initiator: dir, ..FlowValue::default() };
        assert_eq!(side_of(&key, &value, Some(9), &[]), Some(1));
        assert_eq!(side_of(&key, &value, Some(3), &[ip("10.0.0.1")]), Some(0));
        assert_eq!(side_of(&key, &value, None, &[ip("10.0.0.3")]), None);
    }
}
