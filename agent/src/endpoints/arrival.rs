//! Endpoints arriving on this node's ports, and leaving them.
//!
//! An endpoint is bound to the port where its MAC is announced (RARP, gratuitous ARP,
//! unsolicited NA) or where the operator says it is (`backplane endpoint moved`). An
//! arrival of an endpoint last seen on another node (or port) is a move: its established
//! flows (published by the node it left, or read from this node's flow table for a port
//! move) are installed at once with their counters, the generation in force and reason
//! `migrated`, so that its next packet is not judged as a new flow. Every arrival is
//! written to the audit log with both nodes' labels. A port that goes away unbinds its
//! endpoints, and hands their flows to the node they go to.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Instant,
};

use backplane_common::{
    FlowEvent, FlowKey, FlowValue,
    event::Announcement,
    flow::STATE_INSTALLED,
    policy::{ENDPOINT_ISOLATED, ENDPOINT_QUARANTINED, ZONE_WORLD},
    reason::Reason,
};
use backplane_rules::{MacAddr, UnknownMacs};

use crate::{
    clock::{monotonic_now_ns, now_unix_ms},
    endpoints::{
        Bound, Def, Endpoints, MAX_HANDOVER_FLOWS, addr_bytes, carried, key_addr,
        model::{EndpointInfo, HandoverFlow, HandoverSet, Location},
        side_of,
        standing::{Assessment, Standing},
        unknown_name,
    },
};

/// What an endpoint showing up on a port of this node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArrivalKind {
    /// Seen for the first time, or again on the port where it was last seen (a VM that
    /// boots, an agent that restarts).
    Boot,
    /// Last seen on another node or on another port of this one: its flows follow it.
    Move,
}

impl ArrivalKind {
    /// The name in the audit log (`kind`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Boot => "boot",
            Self::Move => "move",
        }
    }
}

/// An endpoint showing up on a port of this node.
pub(super) struct Arrival<'a> {
    pub(super) def: Def,
    pub(super) mac: MacAddr,
    pub(super) ifindex: u32,
    pub(super) port: &'a str,
    pub(super) kind: ArrivalKind,
    /// Where it was last seen, here or on another node.
    previous: Option<Location>,
    /// Whether that was on this node.
    pub(super) from_here: bool,
    /// The port of this node it was bound to, if any.
    old_ifindex: Option<u32>,
    /// What told the agent: `rarp`, `gratuitous arp`, `neighbour advertisement`,
    /// `first use`, `host`, `operator`.
    pub(super) cause: &'a str,
}

/// The flows a move carried, and how long after the announcement they were in place.
#[derive(Default)]
struct Handover {
    flows: u64,
    ms: Option<f64>,
}

impl Endpoints {
    /// Consumes announcement events until the channel closes.
    pub async fn follow_announcements(self: Arc<Self>, mut rx: tokio::sync::mpsc::Receiver<FlowEvent>) {
        while let Some(event) = rx.recv().await {
            self.announced(event).await;
        }
    }

    /// Handles an announcement from the data path (RARP, gratuitous ARP, unsolicited NA).
    async fn announced(self: &Arc<Self>, event: FlowEvent) {
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
        if event.key.proto == Announcement::Learned as u8 {
            return self.learned(mac, event.ifindex, &port, event.ts_ns).await;
        }
        let kind = match event.key.proto {
            k if k == Announcement::Rarp as u8 => "rarp",
            k if k == Announcement::GratuitousArp as u8 => "gratuitous arp",
            _ => "neighbour advertisement",
        };
        // A hint, never a claim: only the MAC the port is bound or locked to counts.
        let bound_here = self.lock().bound.get(&mac).is_some_and(|b| b.ifindex == event.ifindex);
        let locked_here = self.datapath.lock().expect("datapath lock").learned(event.ifindex).is_some_and(|l| {
            l.mac == mac.0
                && l.flags & (backplane_common::config::LEARNED_MAC_ONLY | backplane_common::config::LEARNED_HELD) == 0
        });
        if !bound_here && !locked_here {
            log::debug!("{mac} announced itself on {port} ({kind}), which is not bound to it: ignored");
            return;
        }
        log::debug!("{mac} announced itself on {port} ({kind})");
        self.arrive(mac, event.ifindex, &port, Some(event.ts_ns), kind).await;
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
            if let Some(p) = to_port {
                (dp.vm_port_named(p)?, p.to_owned())
            } else {
                let st = self.lock();
                let b = st.bound.get(&mac).ok_or_else(|| {
                    format!("endpoint \"{name}\" was not seen on a port here; say where with --to-port")
                })?;
                (b.ifindex, b.port.clone())
            }
        };
        if to_port.is_some() {
            // Forget a binding to the same port so that the arrival is handled.
            let mut st = self.lock();
            if st.bound.get(&mac).is_some_and(|b| b.ifindex == ifindex) {
                st.bound.remove(&mac);
            }
        }
        if to_port.is_some() {
            self.arrive_bound(mac, ifindex, &port, "operator").await;
        } else {
            self.arrive(mac, ifindex, &port, None, "operator").await;
        }
        self.info(name)
    }

    /// An endpoint is on port `ifindex` here: bind it, and if it came from elsewhere,
    /// carry its flows. `since_ns`: the kernel time of the announcement.
    pub(super) async fn arrive(
        self: &Arc<Self>,
        mac: MacAddr,
        ifindex: u32,
        port: &str,
        since_ns: Option<u64>,
        cause: &str,
    ) {
        let started = Instant::now();
        let Some(arrival) = self.classify(mac, ifindex, port, cause).await else { return };
        if !self.may_take(&arrival).await {
            return;
        }
        self.lock().held.remove(&mac);
        // Whatever held the port's frames is over: it is the endpoint now.
        self.datapath.lock().expect("datapath lock").hold_learned(ifindex, mac.0, false);
        let location = self.bind_here(&arrival);
        // Bind and flag first: from here on the data path judges the endpoint as it
        // stands on this node.
        self.sync_kernel();
        let assessment = self.assess_here(&arrival.def);
        let handover = self.hand_over(&arrival, &assessment, since_ns, started).await;
        self.log_arrival(&arrival, &assessment, &handover);
        self.alert_and_save(&arrival, &assessment);
        if let Some(peers) = &self.peers {
            let mut location = location;
            location.state = assessment.standing().as_str().into();
            Arc::clone(peers).publish_location(mac, location);
        }
    }

    /// Who arrives, from where, and whether it is a boot or a move; `None` when there is
    /// nothing to do: a MAC outside the inventory (handled as such), or an endpoint already
    /// bound to this port.
    async fn classify<'a>(&self, mac: MacAddr, ifindex: u32, port: &'a str, cause: &'a str) -> Option<Arrival<'a>> {
        let (def, previous) = {
            let st = self.lock();
            (Self::def_by_mac(&st, mac), st.locations.get(&mac).cloned())
        };
        let Some(def) = def else {
            self.unknown_mac(mac, ifindex, port);
            return None;
        };
        let previous = self.last_location(mac, previous).await;
        let from_here = previous.as_ref().is_some_and(|l| l.node == self.opts.node);
        let same_port = from_here && previous.as_ref().is_some_and(|l| l.port == port);
        let already_bound = self.lock().bound.get(&mac).is_some_and(|b| b.ifindex == ifindex);
        if same_port && already_bound {
            return None;
        }
        let old_ifindex = self.lock().bound.get(&mac).map(|b| b.ifindex);
        let kind = match &previous {
            None => ArrivalKind::Boot,
            Some(_) if same_port => ArrivalKind::Boot,
            Some(_) => ArrivalKind::Move,
        };
        Some(Arrival { def, mac, ifindex, port, kind, previous, from_here, old_ifindex, cause })
    }

    /// Where an endpoint was last seen: this node's record of it; or, when that says
    /// nowhere or here, what the peers say now (a move to this node that the last poll
    /// has not brought yet).
    async fn last_location(&self, mac: MacAddr, previous: Option<Location>) -> Option<Location> {
        if previous.as_ref().is_none_or(|l| l.node == self.opts.node)
            && let Some(peers) = &self.peers
        {
            match peers.location(mac).await {
                Ok(Some(loc)) if loc.node != self.opts.node => {
                    self.lock().locations.insert(mac, loc.clone());
                    return Some(loc);
                }
                Ok(_) => {}
                Err(e) => log::debug!("cannot ask etcd where {mac} was: {e}"),
            }
        }
        previous
    }

    /// Binds the endpoint to its port here (an endpoint bound to that port before is no
    /// longer) and records its location; returns the location.
    fn bind_here(&self, a: &Arrival<'_>) -> Location {
        let location = Location {
            node: self.opts.node.clone(),
            port: a.port.to_owned(),
            labels: self.opts.labels.clone(),
            since_unix_ms: now_unix_ms(),
            name: a.def.name.clone(),
            state: String::new(),
            port_gone_unix_ms: None,
        };
        let mut st = self.lock();
        st.bound.retain(|m, b| *m == a.mac || b.ifindex != a.ifindex);
        let host = st.bound.get(&a.mac).is_some_and(|b| b.host && b.ifindex == a.ifindex);
        st.bound.insert(a.mac, Bound { ifindex: a.ifindex, port: a.port.to_owned(), host });
        st.locations.insert(a.mac, location.clone());
        location
    }

    /// What the endpoint may do on this node, with the zones the rules give the ports.
    fn assess_here(&self, def: &Def) -> Assessment {
        let port_zones: HashMap<u32, u16> = {
            let dp = self.datapath.lock().expect("datapath lock");
            dp.attached().into_iter().map(|i| (i, dp.zone_of_port(i))).collect()
        };
        let mut st = self.lock();
        self.assess(&mut st, def, &|i| port_zones.get(&i).copied().unwrap_or(0))
    }

    /// Installs the established flows of a moved endpoint (unless `--no-flow-handover`),
    /// as far as its standing here lets them go on.
    async fn hand_over(&self, a: &Arrival<'_>, s: &Assessment, since_ns: Option<u64>, started: Instant) -> Handover {
        if a.kind != ArrivalKind::Move || !self.opts.handover {
            return Handover::default();
        }
        let set =
            if a.from_here { Some(self.local_flows(&a.def, a.old_ifindex)) } else { self.remote_flows(a.mac).await };
        let flows = self.filter_for_standing(s, set);
        let carried = self.install(&flows, a.ifindex) as u64;
        let elapsed_ns = since_ns.map_or_else(
            || u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            |t| monotonic_now_ns().saturating_sub(t),
        );
        #[expect(clippy::cast_precision_loss, reason = "a duration in ms for people")]
        let ms = elapsed_ns as f64 / 1e6;
        Handover { flows: carried, ms: Some(ms) }
    }

    /// Logs the arrival (a move is counted) and writes it to the audit log.
    fn log_arrival(&self, a: &Arrival<'_>, s: &Assessment, handover: &Handover) {
        let (mac, port, name, standing) = (a.mac, a.port, &a.def.name, s.standing());
        let moved = a.kind == ArrivalKind::Move;
        let previous_node = a.previous.as_ref().map(|l| l.node.clone());
        if moved {
            self.lock().moves += 1;
            log::info!(
                "endpoint {name} ({mac}) arrived on {port} from {} port {} ({}); {} flow(s) handed over{}; {standing}",
                previous_node.as_deref().unwrap_or("?"),
                a.previous.as_ref().map_or("?", |l| l.port.as_str()),
                a.cause,
                handover.flows,
                handover.ms.map(|ms| format!(" in {ms:.2} ms")).unwrap_or_default(),
            );
        } else {
            log::info!("endpoint {name} ({mac}) is on {port} ({}); {standing}", a.cause);
        }
        let mut record = self.record_here(a.kind.as_str(), name, mac, port);
        record.from_node = previous_node.filter(|_| moved);
        record.from_port = a.previous.as_ref().filter(|_| moved).map(|l| l.port.clone());
        record.from_labels = a.previous.as_ref().filter(|_| moved).map(|l| l.labels.clone()).unwrap_or_default();
        record.to_labels = self.opts.labels.clone();
        record.flows_carried = handover.flows;
        record.handover_ms = handover.ms;
        record.state = standing.as_str().into();
        record.detail = format!("{}{}", a.cause, if self.opts.handover { "" } else { "; flow hand-over off" });
        self.record(record);
    }

    /// Raises the alerts of the endpoint's standing here (placement, quarantine), notes
    /// its standing in its location, checks co-mingling and saves the state.
    fn alert_and_save(&self, a: &Arrival<'_>, s: &Assessment) {
        let (mac, port, name, standing) = (a.mac, a.port, &a.def.name, s.standing());
        let mut st = self.lock();
        for text in &s.placement {
            let text = format!("endpoint {name}: {text}");
            Self::alert(&mut st, &text);
            let mut record = self.record_here("placement_violation", name, mac, port);
            record.to_labels = self.opts.labels.clone();
            record.state = standing.as_str().into();
            record.detail = text;
            self.record(record);
        }
        if s.value.flags & ENDPOINT_QUARANTINED != 0 {
            let text = format!("endpoint {name} quarantined on {}: {}", self.opts.node, s.reasons.join("; "));
            Self::alert(&mut st, &text);
            let mut record = self.record_here("quarantined", name, mac, port);
            record.state = standing.as_str().into();
            record.detail = text;
            self.record(record);
        }
        if let Some(loc) = st.locations.get_mut(&mac) {
            loc.state = standing.as_str().into();
        }
        self.check_co_mingling(&mut st);
        self.persist(&st);
    }

    /// Keeps a quarantined endpoint's flows to remediation zones only, an isolated
    /// endpoint's none.
    fn filter_for_standing(&self, s: &Assessment, set: Option<HandoverSet>) -> Vec<HandoverFlow> {
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
        set.flows.into_iter().filter(|f| remediation.contains(&f.zones[usize::from((f.side ^ 1) & 1)])).collect()
    }

    /// The flows of an endpoint that moved between two ports of this node.
    fn local_flows(&self, def: &Def, old_ifindex: Option<u32>) -> HandoverSet {
        let entries = self.flows.kernel_entries(|_, v| carried(v));
        let flows = self.to_handover(&entries, old_ifindex, &def.ips);
        self.handover_set(def, String::new(), 0, flows)
    }

    /// The flows an endpoint had on another node: from etcd now, else from the copy of
    /// the last poll.
    async fn remote_flows(&self, mac: MacAddr) -> Option<HandoverSet> {
        if let Some(peers) = &self.peers {
            match peers.flows(mac).await {
                Ok(Some(set)) => return Some(set),
                Ok(None) => {}
                Err(e) => log::warn!("cannot read the flows of {mac} from etcd ({e}); using the last copy"),
            }
        }
        self.lock().remote_flows.get(&mac).cloned()
    }

    /// Node-independent copies of the flows of the endpoint bound to `ifindex` (or using
    /// one of `ips`).
    pub(super) fn to_handover(
        &self,
        entries: &[(FlowKey, FlowValue)],
        ifindex: Option<u32>,
        ips: &[IpAddr],
    ) -> Vec<HandoverFlow> {
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
            st.unknown.insert(mac, (Bound { ifindex, port: port.to_owned(), host: false }, zone));
            let text =
                format!("unknown MAC {mac} on {port} (zone {zone_name}) quarantined until it is in the inventory");
            Self::alert(&mut st, &text);
            let mut record = self.record_here("unknown_mac", &unknown_name(mac), mac, port);
            record.state = Standing::Quarantined.as_str().into();
            record.detail = text;
            self.record(record);
        }
        self.sync_kernel();
    }

    /// A port of this node is gone: its endpoints are no longer bound to it.
    pub fn port_removed(self: &Arc<Self>, ifindex: u32) {
        let gone: Vec<(MacAddr, Bound)> = {
            let mut st = self.lock();
            st.unknown.retain(|_, (b, _)| b.ifindex != ifindex);
            st.learned_ports.remove(&ifindex);
            st.locked_at.remove(&ifindex);
            st.held.retain(|_, h| h.ifindex != ifindex);
            st.host_unknown.remove(&ifindex);
            st.host_bindings.retain(|h| h.ifindex != ifindex);
            let gone: Vec<(MacAddr, Bound)> =
                st.bound.iter().filter(|(_, b)| b.ifindex == ifindex).map(|(m, b)| (*m, b.clone())).collect();
            gone
        };
        if gone.is_empty() {
            return;
        }
        self.publish_departures(&gone);
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
}
