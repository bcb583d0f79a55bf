//! The running agent as its servers see it ([`Agent`]): what the control socket answers
//! (flows, status, explain, the endpoints) and what a metrics scrape reads
//! ([`Agent::scrape`]). `backplane run` (`crate::run`) makes it once everything runs;
//! the servers only read through it.

use std::sync::{Arc, Mutex};

use backplane_common::{
    Counter, Verdict,
    policy::{ZONE_WORLD, ZonePairStats},
    reason::Reason,
};
use backplane_rules::WORLD;

use crate::{
    datapath::{Datapath, map_fill::MapFills},
    endpoints::{Endpoints, standing::Standing},
    export::metrics::{MapFill, ProgramRuns, Scrape, ZoneJudged, ZoneTraffic as ScrapedTraffic},
    flows::{FlowRecord, FollowMessage, SharedFlows, names::RuleNames, payload::SampleStats},
    options::RunOptions,
    ports::guard::PortGuard,
    rules::{
        RuleSync, RulesStatus,
        explain::{ExplainError, ExplainQuery, ExplainReply},
    },
    status::{FlowTableStatus, Status, ZonePairStatus, ZoneTrafficStatus},
};

/// The running agent, as the control socket sees it.
pub struct Agent {
    pub(crate) opts: RunOptions,
    pub(crate) datapath: Arc<Mutex<Datapath>>,
    pub(crate) flows: Arc<SharedFlows>,
    pub(crate) rule_names: Arc<RuleNames>,
    /// `None` without `--rules`.
    pub(crate) rules: Option<Arc<RuleSync>>,
    pub(crate) sample_stats: Arc<SampleStats>,
    pub(crate) endpoints: Arc<Endpoints>,
    pub(crate) port_guard: Arc<PortGuard>,
    /// The pinned maps whose fill the metrics report.
    pub(crate) map_fills: MapFills,
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
            ports: datapath.port_status_with_addresses(),
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
        let port_bindings =
            datapath.port_status().into_iter().filter(|p| !p.binding.is_empty()).map(|p| p.binding).collect();
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
            announcements_dropped: stats.announcements_dropped,
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
            port_bindings,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_count_every_standing() {
        let names: Vec<&str> = Standing::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, crate::export::metrics::ENDPOINT_STATES);
    }
}
