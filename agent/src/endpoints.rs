//! Endpoints that move: the inventory (from the rules and added at run time), where each
//! endpoint is, what it may do there, and moving its flows with it.
//!
//! - **Identity follows the MAC.** An endpoint is bound to the port where its MAC is
//!   announced (RARP, gratuitous ARP, unsolicited NA) or where the operator says it is
//!   (`backplane endpoint moved`): `EndpointValue::ifindex`, so that the data path drops
//!   its MAC from any other VM port. A port that goes away unbinds its endpoints.
//! - **Standing.** Each endpoint is `active`, `quarantined` (its zone's `max_patch_age`
//!   is exceeded or its patch date unknown; a MAC outside the inventory on a port of a
//!   zone that quarantines unknown MACs) or `isolated` (on a node its zone's placement
//!   forbids, with `on_violation: isolate`). The flags are written into the half of the
//!   rule tables in force, one entry at a time, and into every rule set put in force
//!   later (see [`Endpoints::overlay`]); the endpoint's flows are judged again.
//! - **Moves.** An announcement of an endpoint last seen on another node (or port) is an
//!   arrival: its established flows (published by the node it left, or read from this
//!   node's flow table for a port move) are installed at once with their counters, the
//!   generation in force and reason `migrated`, so its next packet is not judged as a new
//!   flow. Every move is written to the audit log with both nodes' labels.
//! - **State** (runtime endpoints, attestations, last locations) is kept in
//!   `<state-dir>/endpoints.json`, and shared through etcd when the agent has one (see
//!   [`crate::cluster`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use backplane_common::{
    FlowEvent, FlowKey, FlowValue, Verdict,
    event::Announcement,
    flow::{FAMILY_IPV4, STATE_ENDED, STATE_INSTALLED},
    policy::{
        ENDPOINT_ISOLATED, ENDPOINT_PATCHED, ENDPOINT_QUARANTINED, EndpointValue, OWNER_ELSEWHERE, OwnerKey,
        OwnerValue, ZONE_WORLD,
    },
    reason::Reason,
};
use backplane_rules::{CompiledRules, MacAddr, OnViolation, PatchDate, RuleSet, UnknownMacs, VpatchEntry};
use serde::{Deserialize, Serialize};

use crate::{
    audit::{AuditLog, AuditRecord},
    clock::{Clock, monotonic_now_ns, now_unix_ms, rfc3339_ms},
    datapath::Datapath,
    datapath::rule_tables::{EndpointOverlay, owner_key},
    error::report,
    flows::SharedFlows,
};

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

/// An endpoint added at run time (`backplane endpoint add`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeEndpoint {
    pub name: String,
    pub mac: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// `YYYY-MM-DD`.
    #[serde(default)]
    pub patched_at: Option<String>,
}

/// Where an endpoint is (or was last seen).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub node: String,
    pub port: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub since_unix_ms: i64,
    /// The endpoint's name there.
    #[serde(default)]
    pub name: String,
    /// Its standing there.
    #[serde(default)]
    pub state: String,
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
}

/// One flow of an endpoint as it travels between nodes: node-independent (zones by
/// name, times as Unix ms, no ports).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverFlow {
    pub family: u8,
    pub proto: u8,
    pub vlan: u16,
    pub addr_lo: IpAddr,
    pub addr_hi: IpAddr,
    pub port_lo: u16,
    pub port_hi: u16,
    /// Which side of the key is the endpoint (0: lo, 1: hi).
    pub side: u8,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub tcp_flags: [u8; 2],
    pub initiator: u8,
    pub verdict: u8,
    pub policy_id: u32,
    pub zones: [String; 2],
    pub first_seen_unix_ms: i64,
}

/// The flows of one endpoint, as the node hosting it publishes them every second.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverSet {
    pub name: String,
    pub mac: String,
    pub node: String,
    pub port: String,
    pub updated_unix_ms: i64,
    pub flows: Vec<HandoverFlow>,
}

/// One row of `backplane endpoint list`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub name: String,
    pub mac: String,
    /// `inventory`, `runtime` or `unknown` (a MAC outside the inventory).
    pub source: String,
    pub zone: Option<String>,
    pub ips: Vec<String>,
    pub tags: Vec<String>,
    pub patched_at: Option<String>,
    /// `active`, `quarantined` or `isolated`.
    pub state: String,
    pub reasons: Vec<String>,
    pub node: Option<String>,
    pub port: Option<String>,
    /// Whether it is bound to a port of this node.
    pub here: bool,
    pub endpoint_id: u32,
}

/// The `endpoints` object of `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointsStatus {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub state_dir: String,
    pub audit_log: String,
    pub audit_records: u64,
    pub flow_handover: bool,
    pub total: u64,
    pub here: u64,
    pub active: u64,
    pub quarantined: u64,
    pub isolated: u64,
    /// Arrivals from another node or port seen by this node.
    pub moves: u64,
    /// The most recent alerts (placement, co-mingling, quarantine), newest last.
    pub alerts: Vec<String>,
    pub etcd: EtcdStatus,
}

/// etcd connectivity, as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdStatus {
    /// Whether the agent was started with `--etcd`.
    pub configured: bool,
    pub urls: Vec<String>,
    pub connected: bool,
    pub lease_id: i64,
    /// When the state last changed (RFC 3339).
    pub since: Option<String>,
    pub last_error: Option<String>,
    /// Times the agent found etcd again after losing it.
    pub reconnects: u64,
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
}

/// An endpoint bound to a port of this node.
#[derive(Clone, Debug)]
struct Bound {
    ifindex: u32,
    port: String,
}

/// What an endpoint may do, worked out from the rules, its patch date and where it is.
#[derive(Clone, Debug, Default)]
struct Standing {
    zone: Option<String>,
    value: EndpointValue,
    reasons: Vec<String>,
    /// Placement problems that only raise alerts.
    placement: Vec<String>,
}

impl Standing {
    fn state(&self) -> &'static str {
        state_name(self.value.flags)
    }
}

/// The standing an endpoint entry's flags give: `isolated`, `quarantined` or `active`.
#[must_use]
pub fn state_name(flags: u16) -> &'static str {
    if flags & ENDPOINT_ISOLATED != 0 {
        "isolated"
    } else if flags & ENDPOINT_QUARANTINED != 0 {
        "quarantined"
    } else {
        "active"
    }
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
    /// MACs outside the inventory quarantined on a port here: (port binding, zone id).
    unknown: HashMap<MacAddr, (Bound, u16)>,
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
    /// The etcd link, once the cluster task runs.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

/// Today's date (UTC).
fn today() -> PatchDate {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    PatchDate::from_days_since_epoch(i64::try_from(secs / 86_400).unwrap_or(0))
}

/// A MAC as text (`52:54:00:00:00:01`).
#[must_use]
pub fn mac_text(mac: MacAddr) -> String {
    mac.to_string()
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
        Ok(Arc::new(Self {
            opts,
            datapath,
            flows,
            clock,
            audit,
            state: Mutex::new(state),
            cluster: std::sync::OnceLock::new(),
        }))
    }

    #[must_use]
    pub fn options(&self) -> &EndpointOptions {
        &self.opts
    }

    pub(crate) fn set_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("endpoint state lock")
    }

    fn persist(&self, st: &State) {
        let p = Persisted {
            runtime: st.runtime.values().cloned().collect(),
            attested: st.attested.iter().map(|(n, d)| (n.clone(), d.to_string())).collect(),
            locations: st.locations.iter().map(|(m, l)| (m.to_string(), l.clone())).collect(),
        };
        let path = self.opts.state_dir.join(STATE_FILE);
        let tmp = self.opts.state_dir.join(format!("{STATE_FILE}.tmp"));
        let result = serde_json::to_vec_pretty(&p)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
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

    /// What `def` may do under `rules`, bound (or not) to a port here.
    fn standing(&self, st: &mut State, def: &Def, port_zone: &dyn Fn(u32) -> u16) -> Standing {
        let bound = st.bound.get(&def.mac).cloned();
        let mut s = Standing::default();
        let (rules, compiled) = (st.rules.clone(), st.compiled.clone());
        let compiled_entry = compiled.as_ref().and_then(|c| c.endpoint(def.mac).copied());
        s.value.endpoint_id = match compiled_entry {
            Some(e) if !def.runtime => e.value.endpoint_id,
            _ => Self::id_for(st, def.mac),
        };
        s.value.ifindex = bound.as_ref().map_or(0, |b| b.ifindex);
        let zone_name =
            rules.as_ref().and_then(|r| r.zone_for(def.zone.as_deref(), def.mac, &def.ips).map(str::to_owned));
        s.value.zone = match (&zone_name, &compiled) {
            (Some(z), Some(c)) => c.zone_ids.id(z).unwrap_or(ZONE_WORLD),
            _ => bound.as_ref().map_or(ZONE_WORLD, |b| port_zone(b.ifindex)),
        };
        s.zone = zone_name.or_else(|| {
            let c = compiled.as_ref()?;
            (s.value.zone != ZONE_WORLD).then(|| c.zone_ids.name(s.value.zone).map(str::to_owned)).flatten()
        });
        if let (Some(rules), Some(c)) = (&rules, &compiled) {
            if rules.patches_for(&def.tags).next().is_some()
                || !c.vpatch_entries(s.value.endpoint_id, &def.tags).is_empty()
            {
                s.value.flags |= ENDPOINT_PATCHED;
            }
            if let Some(settings) = s.zone.as_deref().and_then(|z| rules.zone(z)).map(|z| &z.endpoints) {
                let zone = s.zone.as_deref().unwrap_or("");
                if let Some(max) = settings.max_patch_age {
                    match def.patched_at {
                        None => {
                            s.value.flags |= ENDPOINT_QUARANTINED;
                            s.reasons.push(format!("patch date unknown (zone {zone} requires a patch within {max})"));
                        }
                        Some(d) if d.age_days(today()) > i64::from(max.days) => {
                            s.value.flags |= ENDPOINT_QUARANTINED;
                            s.reasons.push(format!(
                                "patched {d}, {} days ago (zone {zone} allows {max})",
                                d.age_days(today())
                            ));
                        }
                        Some(_) => {}
                    }
                }
                if bound.is_some() {
                    let violations = settings.placement_violations(&self.opts.labels);
                    if !violations.is_empty() {
                        let text = format!(
                            "placement: zone {zone} may not run on node {} ({})",
                            self.opts.node,
                            violations.join(", ")
                        );
                        if settings.on_violation == OnViolation::Isolate {
                            s.value.flags |= ENDPOINT_ISOLATED;
                            s.reasons.push(text.clone());
                        }
                        s.placement.push(text);
                    }
                }
            }
        }
        s
    }

    /// The endpoint entries and runtime virtual patches for a rule set: what the agent
    /// writes over the compiled entries in every half it fills.
    fn compute(&self, st: &mut State, port_zone: &dyn Fn(u32) -> u16) -> EndpointOverlay {
        let mut overlay = EndpointOverlay::default();
        let compiled = st.compiled.clone();
        for def in Self::defs(st) {
            let s = self.standing(st, &def, port_zone);
            if def.runtime {
                if let Some(c) = &compiled {
                    overlay.vpatches.extend(c.vpatch_entries(s.value.endpoint_id, &def.tags));
                }
            }
            overlay.endpoints.push((def.mac, s.value));
        }
        let unknown: Vec<(MacAddr, Bound, u16)> = st.unknown.iter().map(|(m, (b, z))| (*m, b.clone(), *z)).collect();
        for (mac, bound, zone) in unknown {
            if overlay.endpoints.iter().any(|(m, _)| *m == mac) {
                st.unknown.remove(&mac);
                continue;
            }
            let endpoint_id = Self::id_for(st, mac);
            let value =
                EndpointValue { zone, flags: ENDPOINT_QUARANTINED, endpoint_id, ifindex: bound.ifindex, _pad: [0; 4] };
            overlay.endpoints.push((mac, value));
        }
        overlay
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

    /// Writes what changed into the half of the rule tables in force; judges again the
    /// flows of endpoints whose standing changed.
    pub fn sync_kernel(&self) {
        let mut rejudge: Vec<(Option<u32>, Vec<IpAddr>)> = Vec::new();
        let mut moved_senders = None;
        {
            let mut dp = self.datapath.lock().expect("datapath lock");
            let slot = match dp.active_slot() {
                Ok(s) => s,
                Err(e) => return log::error!("cannot read CONFIG: {}", report(&e)),
            };
            let port_zones: HashMap<u32, u16> = dp.attached().into_iter().map(|i| (i, dp.zone_of_port(i))).collect();
            let mut st = self.lock();
            let overlay = self.compute(&mut st, &|i| port_zones.get(&i).copied().unwrap_or(0));
            let compiled = st.compiled.clone();
            let wanted: HashMap<MacAddr, EndpointValue> = overlay.endpoints.iter().copied().collect();
            let ips_of: HashMap<MacAddr, Vec<IpAddr>> = Self::defs(&st).into_iter().map(|d| (d.mac, d.ips)).collect();
            let tables = dp.rule_tables_mut();
            for (mac, value) in &wanted {
                let old = st.written.get(mac).copied();
                if old == Some(*value) {
                    continue;
                }
                if let Err(e) = tables.write_endpoint(slot, *mac, *value) {
                    log::error!("cannot write endpoint {mac}: {}", report(&e));
                    continue;
                }
                let standing_changed = old.is_none_or(|o| o.flags != value.flags || o.zone != value.zone);
                if standing_changed && old.is_some() {
                    let ifindex = (value.ifindex != 0).then_some(value.ifindex).or(old.map(|o| o.ifindex));
                    rejudge.push((ifindex, ips_of.get(mac).cloned().unwrap_or_default()));
                }
                st.written.insert(*mac, *value);
            }
            let gone: Vec<MacAddr> = st.written.keys().filter(|m| !wanted.contains_key(m)).copied().collect();
            for mac in gone {
                let result = match compiled.as_ref().and_then(|c| c.endpoint(mac)) {
                    Some(entry) => tables.write_endpoint(slot, mac, entry.value),
                    None => tables.remove_endpoint(slot, mac),
                };
                if let Err(e) = result {
                    log::error!("cannot reset endpoint {mac}: {}", report(&e));
                }
                st.written.remove(&mac);
            }
            let vwanted: HashSet<VpatchEntry> = overlay.vpatches.iter().copied().collect();
            for e in vwanted.difference(&st.written_vpatches.clone()) {
                if let Err(err) = tables.write_vpatch(slot, e) {
                    log::error!("cannot write a virtual patch entry: {}", report(&err));
                }
            }
            for e in st.written_vpatches.difference(&vwanted) {
                let compiled_has = compiled.as_ref().is_some_and(|c| c.vpatches.contains(e));
                if !compiled_has {
                    let _ = tables.remove_vpatch(slot, e);
                }
            }
            st.written_vpatches = vwanted;
            if st.bindings_restored {
                // Endpoints bound on another node (as etcd last said), not here.
                let elsewhere: Vec<MacAddr> = st
                    .locations
                    .iter()
                    .filter(|(m, l)| l.node != self.opts.node && !st.bound.contains_key(m))
                    .map(|(m, _)| *m)
                    .collect();
                let owners = Self::address_owners(&wanted, &elsewhere, &ips_of);
                match tables.set_owners(&owners) {
                    Ok(0) => {}
                    Ok(_) => moved_senders = Some(owners),
                    Err(e) => {
                        log::error!("cannot write the owners of endpoint addresses: {}", report(&e));
                        moved_senders = Some(owners);
                    }
                }
            }
        }
        if let Some(owners) = moved_senders {
            let vm_ports: HashSet<u32> = {
                let dp = self.datapath.lock().expect("datapath lock");
                dp.attached().into_iter().filter(|i| dp.is_vm_port(*i)).collect()
            };
            self.recheck_senders(&owners, &vm_ports);
        }
        if !rejudge.is_empty() {
            let entries = self.flows.entries();
            let keys: Vec<FlowKey> = entries
                .iter()
                .filter(|(k, v)| rejudge.iter().any(|(ifindex, ips)| side_of(k, v, *ifindex, ips).is_some()))
                .map(|(k, _)| *k)
                .collect();
            if !keys.is_empty() {
                log::info!("judging {} flow(s) again: their endpoints' standing changed", keys.len());
                self.flows.rejudge(&keys);
            }
        }
    }

    /// After the owners of addresses changed: a flow direction seen on a VM port whose
    /// sender address now belongs to another port (or node) forgets that port, so that its
    /// next frame is checked again (and dropped if it still comes from the wrong port).
    /// Without this, a flow an attacker started from an address before its owner was
    /// bound (or known) would go on.
    fn recheck_senders(&self, owners: &HashMap<OwnerKey, OwnerValue>, vm_ports: &HashSet<u32>) {
        let suspect = |key: &FlowKey, value: &FlowValue, dir: u8| {
            let (addr, _) = key.sender(dir);
            let port = value.ifindex[usize::from(dir)];
            let owner = owners.get(&OwnerKey { family: key.family, _pad: [0; 3], addr: *addr });
            vm_ports.contains(&port) && owner.is_some_and(|o| o.ifindex != port)
        };
        let entries = self.flows.kernel_entries(|key, value| (0u8..2).any(|dir| suspect(key, value, dir)));
        if entries.is_empty() {
            return;
        }
        let forget: Vec<(FlowKey, u8)> = entries
            .iter()
            .flat_map(|(key, value)| (0u8..2).filter(|&dir| suspect(key, value, dir)).map(|dir| (*key, dir)))
            .collect();
        log::info!(
            "{} flow direction(s) seen on another port than their sender address's owner: checked again",
            forget.len()
        );
        self.flows.forget_ports(&forget);
    }

    /// Which port each address of a bound endpoint belongs to, and which addresses belong
    /// to endpoints bound on other nodes (`elsewhere`): the data path drops frames from
    /// other VM ports that send from (or claim) them. An address two endpoints claim
    /// (runtime endpoints can, the rule files cannot) belongs to neither.
    fn address_owners(
        wanted: &HashMap<MacAddr, EndpointValue>,
        elsewhere: &[MacAddr],
        ips_of: &HashMap<MacAddr, Vec<IpAddr>>,
    ) -> HashMap<OwnerKey, OwnerValue> {
        let here = wanted.iter().filter(|(_, v)| v.ifindex != 0).map(|(mac, v)| {
            (*mac, OwnerValue { ifindex: v.ifindex, endpoint_id: v.endpoint_id, mac: mac.0, _pad: [0; 2] })
        });
        let there = elsewhere.iter().map(|mac| {
            let endpoint_id = wanted.get(mac).map_or(0, |v| v.endpoint_id);
            (*mac, OwnerValue { ifindex: OWNER_ELSEWHERE, endpoint_id, mac: mac.0, _pad: [0; 2] })
        });
        let mut owners: HashMap<OwnerKey, OwnerValue> = HashMap::new();
        let mut disputed = HashSet::new();
        for (mac, owner) in here.chain(there) {
            for ip in ips_of.get(&mac).into_iter().flatten() {
                match owners.insert(owner_key(*ip), owner) {
                    Some(other) if other != owner => {
                        disputed.insert(*ip);
                    }
                    _ => {}
                }
            }
        }
        for ip in disputed {
            log::warn!("address {ip} is claimed by two endpoints; no port owns it");
            owners.remove(&owner_key(ip));
        }
        owners
    }

    /// The definition of the endpoint with this MAC.
    fn def_by_mac(st: &State, mac: MacAddr) -> Option<Def> {
        Self::defs(st).into_iter().find(|d| d.mac == mac)
    }

    fn def_by_name(st: &State, name: &str) -> Option<Def> {
        Self::defs(st).into_iter().find(|d| d.name == name)
    }

    fn alert(&self, st: &mut State, text: String) {
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

    /// Handles an announcement from the data path (RARP, gratuitous ARP, unsolicited NA).
    pub async fn announced(self: &Arc<Self>, event: FlowEvent) {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&event.key.addr_lo[..6]);
        let mac = MacAddr(mac);
        let (port, vm_port) = {
            let dp = self.datapath.lock().expect("datapath lock");
            (dp.attached_name(event.ifindex).map(str::to_owned), dp.is_vm_port(event.ifindex))
        };
        let Some(port) = port else { return };
        if !vm_port {
            // Seen through an uplink: the endpoint is on another node; etcd says which.
            return;
        }
        let kind = match event.key.proto {
            k if k == Announcement::Rarp as u8 => "rarp",
            k if k == Announcement::GratuitousArp as u8 => "gratuitous arp",
            _ => "neighbour advertisement",
        };
        log::debug!("{mac} announced itself on {port} ({kind})");
        self.arrive(mac, event.ifindex, &port, Some(event.ts_ns), kind).await;
    }

    /// An endpoint is on port `ifindex` here: bind it, and if it came from elsewhere,
    /// carry its flows. `since_ns`: the kernel time of the announcement.
    #[expect(clippy::too_many_lines, reason = "one arrival, step by step")]
    async fn arrive(self: &Arc<Self>, mac: MacAddr, ifindex: u32, port: &str, since_ns: Option<u64>, cause: &str) {
        let started = Instant::now();
        let (def, previous) = {
            let st = self.lock();
            (Self::def_by_mac(&st, mac), st.locations.get(&mac).cloned())
        };
        let Some(def) = def else {
            self.unknown_mac(mac, ifindex, port);
            return;
        };
        // A location on another node that the last poll has not brought yet.
        let mut previous = previous;
        if previous.as_ref().is_none_or(|l| l.node == self.opts.node) {
            if let Some(cluster) = self.cluster.get() {
                match cluster.fetch_location(mac).await {
                    Ok(Some(loc)) if loc.node != self.opts.node => {
                        self.lock().locations.insert(mac, loc.clone());
                        previous = Some(loc);
                    }
                    Ok(_) => {}
                    Err(e) => log::debug!("cannot ask etcd where {mac} was: {e}"),
                }
            }
        }
        let here = previous.as_ref().is_some_and(|l| l.node == self.opts.node);
        let same_port = here && previous.as_ref().is_some_and(|l| l.port == port);
        let already_bound = self.lock().bound.get(&mac).is_some_and(|b| b.ifindex == ifindex);
        if same_port && already_bound {
            return;
        }
        let old_ifindex = self.lock().bound.get(&mac).map(|b| b.ifindex);
        let kind = match &previous {
            None => "boot",
            Some(_) if same_port => "boot",
            Some(_) => "move",
        };
        let now_ms = now_unix_ms();
        let location = Location {
            node: self.opts.node.clone(),
            port: port.to_owned(),
            labels: self.opts.labels.clone(),
            since_unix_ms: now_ms,
            name: def.name.clone(),
            state: String::new(),
        };
        {
            let mut st = self.lock();
            st.bound.retain(|m, b| *m == mac || b.ifindex != ifindex);
            st.bound.insert(mac, Bound { ifindex, port: port.to_owned() });
            st.locations.insert(mac, location.clone());
        }
        // Bind and flag first: from here on the data path judges the endpoint as it
        // stands on this node.
        self.sync_kernel();
        let standing = {
            let dp_zones: HashMap<u32, u16> = {
                let dp = self.datapath.lock().expect("datapath lock");
                dp.attached().into_iter().map(|i| (i, dp.zone_of_port(i))).collect()
            };
            let mut st = self.lock();
            self.standing(&mut st, &def, &|i| dp_zones.get(&i).copied().unwrap_or(0))
        };
        let mut carried_flows = 0u64;
        let mut handover_ms = None;
        if kind == "move" && self.opts.handover {
            let set = if here { self.local_flows(&def, old_ifindex) } else { self.remote_flows(mac).await };
            let flows = self.filter_for_standing(&standing, set);
            carried_flows = self.install(&flows, ifindex) as u64;
            let elapsed_ns = since_ns.map_or_else(
                || u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
                |t| monotonic_now_ns().saturating_sub(t),
            );
            #[expect(clippy::cast_precision_loss, reason = "a duration in ms for people")]
            let ms = elapsed_ns as f64 / 1e6;
            handover_ms = Some(ms);
        }
        let previous_node = previous.as_ref().map(|l| l.node.clone());
        if kind == "move" {
            self.lock().moves += 1;
            log::info!(
                "endpoint {} ({mac}) arrived on {port} from {} port {} ({cause}); {carried_flows} flow(s) handed over{}; {}",
                def.name,
                previous_node.as_deref().unwrap_or("?"),
                previous.as_ref().map_or("?", |l| l.port.as_str()),
                handover_ms.map(|ms| format!(" in {ms:.2} ms")).unwrap_or_default(),
                standing.state()
            );
        } else {
            log::info!("endpoint {} ({mac}) is on {port} ({cause}); {}", def.name, standing.state());
        }
        self.record(AuditRecord {
            kind: kind.into(),
            endpoint: def.name.clone(),
            mac: mac_text(mac),
            from_node: previous_node.filter(|_| kind == "move"),
            from_port: previous.as_ref().filter(|_| kind == "move").map(|l| l.port.clone()),
            from_labels: previous.as_ref().filter(|_| kind == "move").map(|l| l.labels.clone()).unwrap_or_default(),
            to_node: Some(self.opts.node.clone()),
            to_port: Some(port.to_owned()),
            to_labels: self.opts.labels.clone(),
            flows_carried: carried_flows,
            handover_ms,
            state: standing.state().into(),
            detail: format!("{cause}{}", if self.opts.handover { "" } else { "; flow hand-over off" }),
            ..AuditRecord::default()
        });
        {
            let mut st = self.lock();
            for text in &standing.placement {
                let text = format!("endpoint {}: {text}", def.name);
                self.alert(&mut st, text.clone());
                self.record(AuditRecord {
                    kind: "placement_violation".into(),
                    endpoint: def.name.clone(),
                    mac: mac_text(mac),
                    to_node: Some(self.opts.node.clone()),
                    to_port: Some(port.to_owned()),
                    to_labels: self.opts.labels.clone(),
                    state: standing.state().into(),
                    detail: text,
                    ..AuditRecord::default()
                });
            }
            if standing.value.flags & ENDPOINT_QUARANTINED != 0 {
                let text =
                    format!("endpoint {} quarantined on {}: {}", def.name, self.opts.node, standing.reasons.join("; "));
                self.alert(&mut st, text.clone());
                self.record(AuditRecord {
                    kind: "quarantined".into(),
                    endpoint: def.name.clone(),
                    mac: mac_text(mac),
                    to_node: Some(self.opts.node.clone()),
                    to_port: Some(port.to_owned()),
                    state: standing.state().into(),
                    detail: text,
                    ..AuditRecord::default()
                });
            }
            if let Some(loc) = st.locations.get_mut(&mac) {
                loc.state = standing.state().into();
            }
            self.check_co_mingling(&mut st);
            self.persist(&st);
        }
        if let Some(cluster) = self.cluster.get() {
            let mut location = location;
            location.state = standing.state().into();
            cluster.publish_location(mac, location);
        }
    }

    /// Keeps a quarantined endpoint's flows to remediation zones only, an isolated
    /// endpoint's none.
    fn filter_for_standing(&self, s: &Standing, set: Option<HandoverSet>) -> Vec<HandoverFlow> {
        let Some(set) = set else { return Vec::new() };
        if s.value.flags & ENDPOINT_ISOLATED != 0 {
            return Vec::new();
        }
        if s.value.flags & ENDPOINT_QUARANTINED == 0 {
            return set.flows;
        }
        let st = self.lock();
        let remediation: HashSet<String> = st
            .rules
            .as_ref()
            .map(|r| r.zones.iter().filter(|z| z.endpoints.remediation).map(|z| z.name.clone()).collect())
            .unwrap_or_default();
        set.flows.into_iter().filter(|f| remediation.contains(&f.zones[usize::from(f.side ^ 1)])).collect()
    }

    /// The flows of an endpoint that moved between two ports of this node.
    fn local_flows(&self, def: &Def, old_ifindex: Option<u32>) -> Option<HandoverSet> {
        let entries = self.flows.kernel_entries(|_, v| carried(v));
        let flows = self.to_handover(&entries, old_ifindex, &def.ips);
        Some(HandoverSet {
            name: def.name.clone(),
            mac: mac_text(def.mac),
            node: self.opts.node.clone(),
            flows,
            ..HandoverSet::default()
        })
    }

    /// The flows an endpoint had on another node: from etcd now, else from the copy of
    /// the last poll.
    async fn remote_flows(&self, mac: MacAddr) -> Option<HandoverSet> {
        if let Some(cluster) = self.cluster.get() {
            match cluster.fetch_flows(mac).await {
                Ok(Some(set)) => return Some(set),
                Ok(None) => {}
                Err(e) => log::warn!("cannot read the flows of {mac} from etcd ({e}); using the last copy"),
            }
        }
        self.lock().remote_flows.get(&mac).cloned()
    }

    /// Node-independent copies of the flows of the endpoint bound to `ifindex` (or using
    /// one of `ips`).
    fn to_handover(&self, entries: &[(FlowKey, FlowValue)], ifindex: Option<u32>, ips: &[IpAddr]) -> Vec<HandoverFlow> {
        let names = self.lock().compiled.clone();
        let zone_name = |id: u16| names.as_ref().and_then(|c| c.zone_ids.name(id)).unwrap_or("world").to_owned();
        entries
            .iter()
            .filter(|(_, v)| carried(v))
            .filter_map(|(k, v)| {
                let side = side_of(k, v, ifindex, ips)?;
                Some(HandoverFlow {
                    family: k.family,
                    proto: k.proto,
                    vlan: k.vlan,
                    addr_lo: key_addr(&k.addr_lo, k.family),
                    addr_hi: key_addr(&k.addr_hi, k.family),
                    port_lo: k.port_lo,
                    port_hi: k.port_hi,
                    side,
                    packets: v.packets,
                    bytes: v.bytes,
                    tcp_flags: v.tcp_flags,
                    initiator: v.initiator,
                    verdict: v.verdict,
                    policy_id: v.policy_id,
                    zones: [zone_name(v.zone[0]), zone_name(v.zone[1])],
                    first_seen_unix_ms: self.clock.unix_ms(v.first_seen_ns),
                })
            })
            .take(MAX_HANDOVER_FLOWS)
            .collect()
    }

    /// Installs handed-over flows with the endpoint's side on port `ifindex`.
    fn install(&self, flows: &[HandoverFlow], ifindex: u32) -> usize {
        if flows.is_empty() {
            return 0;
        }
        let (generation, compiled) = {
            let dp = self.datapath.lock().expect("datapath lock");
            (dp.config().map_or(0, |c| c.generation), self.lock().compiled.clone())
        };
        let zone_id = |name: &str| compiled.as_ref().and_then(|c| c.zone_ids.id(name)).unwrap_or(ZONE_WORLD);
        let now = monotonic_now_ns();
        let entries: Vec<(FlowKey, FlowValue)> = flows
            .iter()
            .map(|f| {
                let key = FlowKey {
                    addr_lo: addr_bytes(f.addr_lo),
                    addr_hi: addr_bytes(f.addr_hi),
                    port_lo: f.port_lo,
                    port_hi: f.port_hi,
                    vlan: f.vlan,
                    proto: f.proto,
                    family: f.family,
                };
                let side = usize::from(f.side & 1);
                let mut ifindexes = [0u32; 2];
                ifindexes[side] = ifindex;
                let value = FlowValue {
                    packets: f.packets,
                    bytes: f.bytes,
                    first_seen_ns: self.clock.ktime_ns(f.first_seen_unix_ms),
                    last_seen_ns: now,
                    ifindex: ifindexes,
                    policy_id: f.policy_id,
                    generation,
                    zone: [zone_id(&f.zones[0]), zone_id(&f.zones[1])],
                    tcp_flags: f.tcp_flags,
                    initiator: f.initiator & 1,
                    verdict: f.verdict,
                    reason: Reason::Migrated as u8,
                    state: STATE_INSTALLED,
                    ..FlowValue::default()
                };
                (key, value)
            })
            .collect();
        self.flows.install(&entries)
    }

    /// A MAC outside the inventory on a VM port: quarantined when the port's zone says so.
    fn unknown_mac(&self, mac: MacAddr, ifindex: u32, port: &str) {
        let zone = self.datapath.lock().expect("datapath lock").zone_of_port(ifindex);
        let quarantine = {
            let st = self.lock();
            if st.unknown.contains_key(&mac) || zone == ZONE_WORLD {
                return;
            }
            let (Some(rules), Some(c)) = (&st.rules, &st.compiled) else { return };
            let Some(name) = c.zone_ids.name(zone) else { return };
            (rules.unknown_macs(name) == UnknownMacs::Quarantine).then(|| name.to_owned())
        };
        let Some(zone_name) = quarantine else { return };
        {
            let mut st = self.lock();
            st.unknown.insert(mac, (Bound { ifindex, port: port.to_owned() }, zone));
            let text =
                format!("unknown MAC {mac} on {port} (zone {zone_name}) quarantined until it is in the inventory");
            self.alert(&mut st, text.clone());
            self.record(AuditRecord {
                kind: "unknown_mac".into(),
                endpoint: format!("unknown-{}", mac.to_string().replace(':', "")),
                mac: mac_text(mac),
                to_node: Some(self.opts.node.clone()),
                to_port: Some(port.to_owned()),
                state: "quarantined".into(),
                detail: text,
                ..AuditRecord::default()
            });
        }
        self.sync_kernel();
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
            self.alert(st, text.clone());
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

    /// A port of this node is gone: its endpoints are no longer bound to it.
    pub fn port_removed(self: &Arc<Self>, ifindex: u32) {
        let gone: Vec<(MacAddr, Bound)> = {
            let mut st = self.lock();
            st.unknown.retain(|_, (b, _)| b.ifindex != ifindex);
            let gone: Vec<(MacAddr, Bound)> =
                st.bound.iter().filter(|(_, b)| b.ifindex == ifindex).map(|(m, b)| (*m, b.clone())).collect();
            gone
        };
        if gone.is_empty() {
            return;
        }
        // The flows as they were when the endpoint left, for the node it goes to.
        if let Some(cluster) = self.cluster.get() {
            let entries = self.flows.kernel_entries(|_, v| carried(v));
            for (mac, bound) in &gone {
                let def = Self::def_by_mac(&self.lock(), *mac);
                if let Some(def) = def {
                    let flows = self.to_handover(&entries, Some(bound.ifindex), &def.ips);
                    let set = HandoverSet {
                        name: def.name.clone(),
                        mac: mac_text(*mac),
                        node: self.opts.node.clone(),
                        port: bound.port.clone(),
                        updated_unix_ms: now_unix_ms(),
                        flows,
                    };
                    cluster.publish_final_flows(*mac, set);
                }
            }
        }
        {
            let mut st = self.lock();
            for (mac, bound) in &gone {
                st.bound.remove(mac);
                log::info!("endpoint {mac} left port {} (the port is gone); unbound", bound.port);
            }
            self.check_co_mingling(&mut st);
        }
        self.sync_kernel();
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
                Some((
                    mac,
                    HandoverSet {
                        name: def.name.clone(),
                        mac: mac_text(mac),
                        node: self.opts.node.clone(),
                        port: b.port,
                        updated_unix_ms: now_unix_ms(),
                        flows,
                    },
                ))
            })
            .collect()
    }

    /// The locations of the endpoints bound here (to publish after a reconnect).
    pub(crate) fn local_locations(&self) -> Vec<(MacAddr, Location)> {
        let st = self.lock();
        st.bound.keys().filter_map(|m| Some((*m, st.locations.get(m)?.clone()))).collect()
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
                elsewhere_changed |= st.locations.get(&mac).is_none_or(|old| old.node != loc.node);
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
        self.kick_cluster();
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
        self.kick_cluster();
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
        self.kick_cluster();
        let info = self.info(name)?;
        log::info!("endpoint {name} attested as patched on {date}: {}", info.state);
        if before != info.state {
            self.record(AuditRecord {
                kind: if info.state == "active" { "released" } else { "quarantined" }.into(),
                endpoint: name.to_owned(),
                mac: mac_text(def.mac),
                to_node: info.node.clone(),
                to_port: info.port.clone(),
                state: info.state.clone(),
                detail: format!("attested as patched on {date}"),
                ..AuditRecord::default()
            });
        }
        Ok(info)
    }

    /// `backplane endpoint moved NAME [--to-port IFACE]`: the operator says the endpoint
    /// is here now.
    pub async fn moved(self: &Arc<Self>, name: &str, to_port: Option<&str>) -> Result<EndpointInfo, String> {
        let mac = {
            let st = self.lock();
            Self::def_by_name(&st, name).ok_or_else(|| format!("no endpoint \"{name}\""))?.mac
        };
        let (ifindex, port) = {
            let dp = self.datapath.lock().expect("datapath lock");
            match to_port {
                Some(p) => {
                    let ifindex = dp
                        .attached_ports()
                        .into_iter()
                        .find(|(_, (n, _))| n == p)
                        .map(|(i, _)| i)
                        .ok_or_else(|| format!("{p} is not a port this agent is attached to"))?;
                    if !dp.is_vm_port(ifindex) {
                        return Err(format!("{p} is not a VM port"));
                    }
                    (ifindex, p.to_owned())
                }
                None => {
                    let st = self.lock();
                    let b = st.bound.get(&mac).ok_or_else(|| {
                        format!("endpoint \"{name}\" was not seen on a port here; say where with --to-port")
                    })?;
                    (b.ifindex, b.port.clone())
                }
            }
        };
        if to_port.is_some() {
            // Forget a binding to the same port so that the arrival is handled.
            let mut st = self.lock();
            if st.bound.get(&mac).is_some_and(|b| b.ifindex == ifindex) {
                st.bound.remove(&mac);
            }
        }
        self.arrive(mac, ifindex, &port, None, "operator").await;
        self.info(name)
    }

    fn kick_cluster(&self) {
        if let Some(cluster) = self.cluster.get() {
            cluster.kick();
        }
    }

    fn info_locked(&self, st: &mut State, def: &Def) -> EndpointInfo {
        let s = self.standing(st, def, &|_| ZONE_WORLD);
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
            state: st.written.get(&def.mac).map_or(s.state(), |v| state_name(v.flags)).into(),
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
        let mut st = self.lock();
        let mut out: Vec<EndpointInfo> = Self::defs(&st).iter().map(|d| self.info_locked(&mut st, d)).collect();
        let names = st.compiled.clone();
        for (mac, (bound, zone)) in &st.unknown {
            out.push(EndpointInfo {
                name: format!("unknown-{}", mac.to_string().replace(':', "")),
                mac: mac_text(*mac),
                source: "unknown".into(),
                zone: names.as_ref().and_then(|c| c.zone_ids.name(*zone)).map(str::to_owned),
                state: "quarantined".into(),
                reasons: vec!["MAC not in the inventory".into()],
                node: Some(self.opts.node.clone()),
                port: Some(bound.port.clone()),
                here: true,
                endpoint_id: st.ids.get(mac).copied().unwrap_or(0),
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
        let count = |s: &str| list.iter().filter(|i| i.state == s).count() as u64;
        EndpointsStatus {
            node: self.opts.node.clone(),
            labels: self.opts.labels.clone(),
            state_dir: self.opts.state_dir.display().to_string(),
            audit_log: self.audit.path().display().to_string(),
            audit_records: self.audit.len(),
            flow_handover: self.opts.handover,
            total: list.len() as u64,
            here: list.iter().filter(|i| i.here).count() as u64,
            active: count("active"),
            quarantined: count("quarantined"),
            isolated: count("isolated"),
            moves: st.moves,
            alerts: st.alerts.clone(),
            etcd: st.etcd.clone(),
        }
    }

    /// Consumes announcement events until the channel closes.
    pub async fn follow_announcements(self: Arc<Self>, mut rx: tokio::sync::mpsc::UnboundedReceiver<FlowEvent>) {
        while let Some(event) = rx.recv().await {
            self.announced(event).await;
        }
    }

    /// Binds the endpoints last seen on this node's ports again, to the ports attached
    /// now (without writing the kernel): called once the adopted ports are known, before
    /// the rules go in force, so that the first rule tables already bind their MACs.
    pub fn bind_last_locations(&self) -> usize {
        let ports: HashMap<String, u32> = {
            let dp = self.datapath.lock().expect("datapath lock");
            dp.attached_ports().into_iter().filter(|(i, _)| dp.is_vm_port(*i)).map(|(i, (n, _))| (n, i)).collect()
        };
        let mut st = self.lock();
        let mine: Vec<(MacAddr, Location)> =
            st.locations.iter().filter(|(_, l)| l.node == self.opts.node).map(|(m, l)| (*m, l.clone())).collect();
        let mut n = 0;
        for (mac, loc) in mine {
            if let Some(&ifindex) = ports.get(&loc.port) {
                st.bound.insert(mac, Bound { ifindex, port: loc.port.clone() });
                n += 1;
            }
        }
        n
    }

    /// Binds the endpoints last seen here to their ports once every port is attached,
    /// then writes the kernel: from here on `ADDR_OWNERS` follows this agent's bindings
    /// (until then it keeps what a previous agent left in it).
    pub fn restore_bindings(self: &Arc<Self>) {
        let restored = self.bind_last_locations();
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

    #[test]
    fn addresses_belong_to_the_port_or_node_of_their_endpoint_and_disputed_ones_to_nobody() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b, c, d) = (
            MacAddr([2, 0, 0, 0, 0, 1]),
            MacAddr([2, 0, 0, 0, 0, 2]),
            MacAddr([2, 0, 0, 0, 0, 3]),
            MacAddr([2, 0, 0, 0, 0, 4]),
        );
        let bound = |ifindex: u32, endpoint_id: u32| EndpointValue { ifindex, endpoint_id, ..EndpointValue::default() };
        // a bound here on port 7, b on another node, c known but nowhere, d bound here and
        // claiming b's address too.
        let wanted = HashMap::from([(a, bound(7, 1)), (b, bound(0, 2)), (c, bound(0, 3)), (d, bound(8, 4))]);
        let ips_of = HashMap::from([
            (a, vec![ip("10.0.0.1"), ip("fd00::1")]),
            (b, vec![ip("10.0.0.2"), ip("10.0.0.9")]),
            (c, vec![ip("10.0.0.3")]),
            (d, vec![ip("10.0.0.4"), ip("::ffff:10.0.0.9")]),
        ]);
        let owners = Endpoints::address_owners(&wanted, &[b], &ips_of);
        let owner = |s: &str| owners.get(&owner_key(ip(s))).map(|o| (o.ifindex, o.mac));
        assert_eq!(owner("10.0.0.1"), Some((7, a.0)));
        assert_eq!(owner("fd00::1"), Some((7, a.0)));
        assert_eq!(owner("10.0.0.2"), Some((OWNER_ELSEWHERE, b.0)));
        assert_eq!(owner("10.0.0.3"), None, "an endpoint bound nowhere owns nothing");
        assert_eq!(owner("10.0.0.4"), Some((8, d.0)));
        assert_eq!(owner("10.0.0.9"), None, "claimed by b (elsewhere) and d (as IPv4-mapped): nobody's");
        assert_eq!(owners.len(), 4);
    }

    #[test]
    fn handover_json_is_node_independent() {
        let f = HandoverFlow {
            family: 4,
            proto: 6,
            vlan: 0,
            addr_lo: "10.0.0.1".parse().unwrap(),
            addr_hi: "10.0.0.2".parse().unwrap(),
            port_lo: 5432,
            port_hi: 40000,
            side: 0,
            packets: [3, 4],
            bytes: [300, 400],
            tcp_flags: [0x12, 0x10],
            initiator: 1,
            verdict: 1,
            policy_id: 0,
            zones: ["db".into(), "web".into()],
            first_seen_unix_ms: 1_700_000_000_000,
        };
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains("\"zones\":[\"db\",\"web\"]"), "{json}");
        assert_eq!(serde_json::from_str::<HandoverFlow>(&json).unwrap(), f);
    }
}
