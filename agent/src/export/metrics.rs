//! Prometheus metrics: a registry of every metric the agent exports, fed from a
//! [`Scrape`] (served as text on `/metrics` by [`super::metrics_http`]).
//!
//! This file imports nothing of the agent. What a scrape reads (the data path's per-CPU
//! counters, the zone-pair drop counters, the flow table's statistics and its
//! per-zone-pair traffic totals, the rules in force, the endpoints by standing, the
//! kernel's program statistics, the pinned maps' fill) is gathered by the agent into a
//! [`Scrape`], as plain numbers and the data path's own enums; [`Metrics::update`] turns
//! it into metrics. Counters only ever move up by the growth since the last scrape, so a
//! counter never goes backwards (flows that expire leave their packets in the totals). A
//! few are fed as things happen: exports, migrations.
//!
//! Labels are bounded sets: zone names, verdicts, reasons, map and program names,
//! exporters, outcomes; never addresses or ports. Every metric is listed in the README
//! (`## Metrics`).

use std::collections::BTreeMap;

use backplane_common::{Counter, Verdict, reason::Reason};
use prometheus::{
    CounterVec, Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Migration outcomes the metric starts with (at zero).
pub const MIGRATION_OUTCOMES: &[&str] = &["completed", "failed", "aborted"];

/// Endpoint states of `backplane_endpoints`.
pub const ENDPOINT_STATES: &[&str] = &["active", "quarantined", "isolated"];

/// Port states of `backplane_ports`.
pub const PORT_STATES: &[&str] = &["attached", "blocked", "unguarded"];

/// Bindings of `backplane_port_bindings` (`PortStatus::binding` of VM ports).
pub const PORT_BINDINGS: &[&str] = &["held", "host", "learned", "locked", "none"];

/// Exporters counted in `backplane_export_*`.
pub const EXPORTERS: &[&str] = &["flow_log", "ipfix"];

/// Reasons of `backplane_dropped_packets_total` that come from data path counters
/// rather than from a verdict: (label, counter).
const COUNTER_DROP_REASONS: &[(&str, Counter)] = &[
    ("spoofed", Counter::Spoofed),
    ("spoofed_address", Counter::SpoofedAddress),
    ("tagged_from_vm_port", Counter::TaggedFromVmPort),
    ("unjudged", Counter::UnjudgedDropped),
    ("router_advert_from_vm", Counter::RouterAdvertFromVm),
    ("spoofed_mac", Counter::SpoofedMac),
    ("unbound_port", Counter::UnboundPort),
    ("to_own_mac", Counter::ToOwnMac),
    ("egress_denied", Counter::EgressDenied),
    ("foreign_sender", Counter::ForeignSender),
    ("claim_held", Counter::ClaimHeld),
];

/// Raises a counter to `total` (never lowers it).
fn raise(counter: &IntCounter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// Every metric of the agent, registered in its own registry.
pub struct Metrics {
    registry: Registry,
    zone_pair_packets: IntCounterVec,
    zone_pair_bytes: IntCounterVec,
    dropped_packets: IntCounterVec,
    packets: IntCounter,
    bytes: IntCounter,
    flows_active: IntGauge,
    flows_created: IntCounter,
    flows_expired: IntCounter,
    flows_evicted: IntCounter,
    flow_insert_failures: IntCounter,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    ring_events_lost: IntCounterVec,
    parse_failures: IntCounterVec,
    rule_reloads: IntCounterVec,
    rules_generation: IntGauge,
    endpoints: IntGaugeVec,
    ports: IntGaugeVec,
    port_bindings: IntGaugeVec,
    migrations: IntCounterVec,
    program_run_time: CounterVec,
    program_runs: IntCounterVec,
    payload_samples: IntCounterVec,
    payload_parsed: IntCounterVec,
    export_records: IntCounterVec,
    export_errors: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::with_opts(Opts::new(name, help)).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::with_opts(Opts::new(name, help)).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    /// Registers every metric.
    #[must_use]
    #[expect(clippy::too_many_lines, reason = "one registration per metric")]
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Self {
            zone_pair_packets: counter_vec(
                &r,
                "backplane_zone_pair_packets_total",
                "Packets by zone pair (initiator's zone to responder's zone) and verdict.",
                &["src_zone", "dst_zone", "verdict"],
            ),
            zone_pair_bytes: counter_vec(
                &r,
                "backplane_zone_pair_bytes_total",
                "Bytes (L2) by zone pair (initiator's zone to responder's zone) and verdict.",
                &["src_zone", "dst_zone", "verdict"],
            ),
            dropped_packets: counter_vec(
                &r,
                "backplane_dropped_packets_total",
                "Packets the data path dropped, by reason.",
                &["reason"],
            ),
            packets: counter(&r, "backplane_packets_total", "Frames that entered the switch through a port."),
            bytes: counter(&r, "backplane_bytes_total", "Bytes (L2) of frames that entered the switch through a port."),
            flows_active: gauge(&r, "backplane_flows_active", "Flows the agent holds as live."),
            flows_created: counter(&r, "backplane_flows_created_total", "Flow entries created by the data path."),
            flows_expired: counter(&r, "backplane_flows_expired_total", "Flows removed after being idle."),
            flows_evicted: counter(
                &r,
                "backplane_flows_evicted_total",
                "Flows whose kernel entry vanished without the agent removing it (LRU eviction).",
            ),
            flow_insert_failures: counter(
                &r,
                "backplane_flow_insert_failures_total",
                "Flows the data path could not insert into its flow table.",
            ),
            map_entries: gauge_vec(&r, "backplane_map_entries", "Entries in a kernel map.", &["map"]),
            map_capacity: gauge_vec(&r, "backplane_map_capacity", "Capacity (max entries) of a kernel map.", &["map"]),
            ring_events_lost: counter_vec(
                &r,
                "backplane_ring_events_lost_total",
                "Records lost because a ring buffer (or the agent's announcement queue) was full.",
                &["ring"],
            ),
            parse_failures: counter_vec(
                &r,
                "backplane_parse_failures_total",
                "Frames the data path could not parse down to a flow, by reason.",
                &["reason"],
            ),
            rule_reloads: counter_vec(
                &r,
                "backplane_rule_reloads_total",
                "Changes of the rule files, by result (ok: put in force; rejected: the last good rules stay).",
                &["result"],
            ),
            rules_generation: gauge(&r, "backplane_rules_generation", "Rule generation in force (0: observing only)."),
            endpoints: gauge_vec(
                &r,
                "backplane_endpoints",
                "Endpoints known to the rules in force, by state.",
                &["state"],
            ),
            ports: gauge_vec(
                &r,
                "backplane_ports",
                "Ports that match --interfaces/--uplink, by state: attached, blocked (not attached, cut off by the \
                 port guard while rules are in force), unguarded (not attached, passing unjudged).",
                &["state"],
            ),
            port_bindings: gauge_vec(
                &r,
                "backplane_port_bindings",
                "Attached VM ports by who says which endpoint is behind them: host, learned (first use), locked (first \
                 MAC locked, identity not confirmed yet), none (the rules' unbound_ports applies).",
                &["binding"],
            ),
            migrations: counter_vec(
                &r,
                "backplane_migrations_total",
                "VM migrations handled, by outcome.",
                &["outcome"],
            ),
            program_run_time: {
                let c = CounterVec::new(
                    Opts::new(
                        "backplane_program_run_time_seconds_total",
                        "Time the kernel spent running a data path program (BPF statistics).",
                    ),
                    &["program"],
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            program_runs: counter_vec(
                &r,
                "backplane_program_runs_total",
                "Runs of a data path program (BPF statistics).",
                &["program"],
            ),
            payload_samples: counter_vec(
                &r,
                "backplane_payload_samples_total",
                "Payload samples of flows' first packets, by outcome in the data path (sent, lost: ring full, skipped: budget).",
                &["outcome"],
            ),
            payload_parsed: counter_vec(
                &r,
                "backplane_payload_samples_parsed_total",
                "Payload samples parsed by the agent, by result.",
                &["result"],
            ),
            export_records: counter_vec(
                &r,
                "backplane_export_records_total",
                "Flow records exported, by exporter.",
                &["exporter"],
            ),
            export_errors: counter_vec(
                &r,
                "backplane_export_errors_total",
                "Flow records or messages an exporter could not deliver, by exporter and error.",
                &["exporter", "error"],
            ),
            registry: r,
        };
        for outcome in MIGRATION_OUTCOMES {
            m.migrations.with_label_values(&[outcome]);
        }
        for state in ENDPOINT_STATES {
            m.endpoints.with_label_values(&[state]);
        }
        for state in PORT_STATES {
            m.ports.with_label_values(&[state]);
        }
        for exporter in EXPORTERS {
            m.export_records.with_label_values(&[exporter]);
        }
        for result in ["ok", "rejected"] {
            m.rule_reloads.with_label_values(&[result]);
        }
        m
    }

    /// Counts one migration with its outcome (`completed`, `failed`, `aborted`, ...).
    /// For the migration work: call it where a migration ends.
    pub fn record_migration(&self, outcome: &str) {
        self.migrations.with_label_values(&[outcome]).inc();
    }

    /// Counts flow records an exporter delivered.
    pub fn exported(&self, exporter: &str, records: u64) {
        self.export_records.with_label_values(&[exporter]).inc_by(records);
    }

    /// Counts a delivery failure of an exporter (`error`: a short, fixed word).
    pub fn export_error(&self, exporter: &str, error: &str, n: u64) {
        self.export_errors.with_label_values(&[exporter, error]).inc_by(n);
    }

    /// Brings every metric up to what a scrape read.
    pub fn update(&self, s: &Scrape) {
        let get = |c: Counter| s.counters.iter().find(|(k, _)| *k == c).map_or(0, |(_, v)| *v);
        raise(&self.packets, get(Counter::Packets));
        raise(&self.bytes, get(Counter::Bytes));
        raise(&self.flows_created, get(Counter::FlowsCreated));
        raise(&self.flow_insert_failures, get(Counter::FlowInsertFailed));
        self.flows_active.set(i64::try_from(s.flows_active).unwrap_or(i64::MAX));
        raise(&self.flows_expired, s.flows_expired);
        raise(&self.flows_evicted, s.flows_evicted);

        // Traffic by zone pair: denied and audited packets are counted per packet by the
        // data path (ZONE_PAIR_STATS); allowed and observed ones from the flows' counters.
        let mut pairs: BTreeMap<(String, String, String), (u64, u64)> = BTreeMap::new();
        for t in &s.zone_traffic {
            if matches!(t.verdict, Ok(Verdict::Allowed | Verdict::Observed)) {
                let e = pairs.entry((t.src_zone.clone(), t.dst_zone.clone(), label(t.verdict))).or_default();
                e.0 += t.packets;
                e.1 += t.bytes;
            }
        }
        let mut drops: BTreeMap<String, u64> = BTreeMap::new();
        for p in &s.zone_pairs {
            let e = pairs.entry((p.src_zone.clone(), p.dst_zone.clone(), label(p.verdict))).or_default();
            e.0 += p.packets;
            e.1 += p.bytes;
            if p.verdict == Ok(Verdict::Denied) {
                *drops.entry(reason_label(p.reason)).or_default() += p.packets;
            }
        }
        for ((src, dst, verdict), (packets, bytes)) in &pairs {
            raise(&self.zone_pair_packets.with_label_values(&[src, dst, verdict]), *packets);
            raise(&self.zone_pair_bytes.with_label_values(&[src, dst, verdict]), *bytes);
        }
        for (label, c) in COUNTER_DROP_REASONS {
            // `unbound_port` is also a verdict reason (`unbound_ports: quarantine`); the
            // counter holds what `deny` dropped.
            *drops.entry((*label).to_owned()).or_default() += get(*c);
        }
        let named: u64 = drops.values().sum();
        drops.insert("other".into(), get(Counter::Dropped).saturating_sub(named));
        for (reason, n) in &drops {
            raise(&self.dropped_packets.with_label_values(&[reason]), *n);
        }

        raise(&self.ring_events_lost.with_label_values(&["flow_events"]), get(Counter::EventsLost));
        raise(&self.ring_events_lost.with_label_values(&["payload_samples"]), get(Counter::PayloadSamplesLost));
        raise(&self.ring_events_lost.with_label_values(&["announcements"]), s.announcements_dropped);
        raise(&self.payload_samples.with_label_values(&["sent"]), get(Counter::PayloadSamples));
        raise(&self.payload_samples.with_label_values(&["lost"]), get(Counter::PayloadSamplesLost));
        raise(&self.payload_samples.with_label_values(&["skipped"]), get(Counter::PayloadSamplesSkipped));
        for (result, n) in &s.payload_parsed {
            raise(&self.payload_parsed.with_label_values(&[result]), *n);
        }
        for c in Counter::ALL.iter().filter(|c| c.is_parse_failure()) {
            raise(&self.parse_failures.with_label_values(&[c.as_str()]), get(*c));
        }

        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.ports.with_label_values(&["attached"]).set(n(s.ports_attached));
        self.ports.with_label_values(&["blocked"]).set(n(s.ports_blocked));
        self.ports.with_label_values(&["unguarded"]).set(n(s.ports_unguarded));
        for binding in PORT_BINDINGS {
            let count = s.port_bindings.iter().filter(|b| b == binding).count();
            self.port_bindings.with_label_values(&[binding]).set(n(count));
        }

        raise(&self.rule_reloads.with_label_values(&["ok"]), s.rule_reloads_ok);
        raise(&self.rule_reloads.with_label_values(&["rejected"]), s.rule_reloads_rejected);
        self.rules_generation.set(i64::from(s.rules_generation));

        self.map_entries.with_label_values(&["flows"]).set(i64::try_from(s.flow_entries).unwrap_or(i64::MAX));
        self.map_capacity.with_label_values(&["flows"]).set(i64::from(s.flow_capacity));
        for m in &s.maps {
            self.map_capacity.with_label_values(&[m.map]).set(i64::from(m.capacity));
            self.map_entries.with_label_values(&[m.map]).set(i64::try_from(m.entries).unwrap_or(i64::MAX));
        }

        // Moves handled by this node (arrivals from another node or port), as the
        // endpoint manager counts them; the counter follows that count upwards.
        let completed = self.migrations.with_label_values(&["completed"]);
        if s.moves > completed.get() {
            completed.inc_by(s.moves - completed.get());
        }
        for (state, n) in &s.endpoints {
            self.endpoints.with_label_values(&[state]).set(i64::try_from(*n).unwrap_or(i64::MAX));
        }

        for (program, runs) in &s.programs {
            self.set_program(program, *runs);
        }
    }

    fn set_program(&self, program: &str, stats: ProgramRuns) {
        raise(&self.program_runs.with_label_values(&[program]), stats.run_count);
        let c = self.program_run_time.with_label_values(&[program]);
        #[expect(clippy::cast_precision_loss, reason = "seconds as a float, as Prometheus wants them")]
        let total = stats.run_time_ns as f64 / 1e9;
        let now = c.get();
        if total > now {
            c.inc_by(total - now);
        }
    }

    /// The text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::warn!("metrics: cannot encode: {e}");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A verdict as a metric label: the data path's name, or `unknown(N)` for a number this
/// agent does not know.
fn label(verdict: Result<Verdict, u8>) -> String {
    verdict.map_or_else(|n| format!("unknown({n})"), |v| v.as_str().into())
}

/// A reason as a metric label (see [`label`]).
fn reason_label(reason: Result<Reason, u8>) -> String {
    reason.map_or_else(|n| format!("unknown({n})"), |r| r.as_str().into())
}

/// What one scrape read, for [`Metrics::update`]: gathered by the agent, in the data
/// path's own terms (counters, verdicts and reasons as its enums, zones by name).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    /// Every data path counter, summed over CPUs.
    pub counters: Vec<(Counter, u64)>,
    /// Records of live flows, and the flows the table expired and saw evicted so far.
    pub flows_active: u64,
    pub flows_expired: u64,
    pub flows_evicted: u64,
    /// Announcements dropped on their way to the endpoints (queue full).
    pub announcements_dropped: u64,
    /// Entries in the kernel flow table at the last read, and its capacity.
    pub flow_entries: u64,
    pub flow_capacity: u32,
    /// Packets and bytes of all flows since start, by zone pair and verdict.
    pub zone_traffic: Vec<ZoneTraffic>,
    /// Packets and bytes denied or audited, by zone pair, verdict and reason.
    pub zone_pairs: Vec<ZoneJudged>,
    /// Payload samples parsed, by result (`dns_query`, ..., `malformed`).
    pub payload_parsed: Vec<(&'static str, u64)>,
    /// Ports attached, and matching ports not attached: blocked or unguarded.
    pub ports_attached: usize,
    pub ports_blocked: usize,
    pub ports_unguarded: usize,
    /// The binding of each attached VM port ([`PORT_BINDINGS`]).
    pub port_bindings: Vec<String>,
    /// Changes of the rule files put in force and rejected, and the generation in force.
    pub rule_reloads_ok: u64,
    pub rule_reloads_rejected: u64,
    pub rules_generation: u32,
    /// The fill of the pinned maps other than the flow table.
    pub maps: Vec<MapFill>,
    /// Endpoints by standing ([`ENDPOINT_STATES`]).
    pub endpoints: Vec<(&'static str, u64)>,
    /// Arrivals from another node or port this node handled.
    pub moves: u64,
    /// Kernel run statistics of each program.
    pub programs: Vec<(&'static str, ProgramRuns)>,
}

/// Packets and bytes of one (initiator's zone, responder's zone, verdict).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneTraffic {
    pub src_zone: String,
    pub dst_zone: String,
    /// The verdict, or its number when the agent does not know it.
    pub verdict: Result<Verdict, u8>,
    pub packets: u64,
    pub bytes: u64,
}

/// Packets and bytes denied or audited of one (source zone, destination zone, verdict,
/// reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneJudged {
    pub src_zone: String,
    pub dst_zone: String,
    pub verdict: Result<Verdict, u8>,
    pub reason: Result<Reason, u8>,
    pub packets: u64,
    pub bytes: u64,
}

/// Entries and capacity of one pinned map, by its label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u32,
}

/// Kernel run statistics of one program (`BPF_ENABLE_STATS`), summed over its runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramRuns {
    pub run_time_ns: u64,
    pub run_count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metric names registered in this file.
    fn registered() -> Vec<String> {
        let source = include_str!("metrics.rs");
        let mut names: Vec<String> = source
            .split('"')
            .filter(|s| {
                s.starts_with("backplane_")
                    && !s.ends_with('_')
                    && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn readme_and_dashboard_know_every_metric() {
        let names = registered();
        assert!(names.len() >= 24, "{names:?}");
        let readme = include_str!("../../../README.md");
        let metrics_section = readme.split("## Metrics").nth(1).expect("README has ## Metrics");
        for name in &names {
            assert!(metrics_section.contains(&format!("| `{name}` |")), "README ## Metrics lacks a row for {name}");
        }
        let dashboard = include_str!("../../../deploy/grafana/backplane.json");
        let json: serde_json::Value = serde_json::from_str(dashboard).expect("the dashboard is JSON");
        assert_eq!(json["uid"], "backplane");
        let mut used = 0;
        for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("backplane_") {
                assert!(names.iter().any(|n| n == word), "the dashboard uses {word}, which the agent does not export");
                used += 1;
            }
        }
        assert!(used >= 20, "the dashboard uses {used} metric references");
    }

    #[test]
    fn counters_only_go_up_and_render_as_text() {
        let m = Metrics::new();
        let c = m.zone_pair_packets.with_label_values(&["web", "db", "allowed"]);
        raise(&c, 10);
        raise(&c, 7);
        assert_eq!(c.get(), 10, "never backwards");
        raise(&c, 12);
        assert_eq!(c.get(), 12);
        m.record_migration("completed");
        m.set_program("from_port", ProgramRuns { run_time_ns: 1_500_000_000, run_count: 3 });
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("backplane_zone_pair_packets_total{dst_zone=\"db\",src_zone=\"web\",verdict=\"allowed\"} 12"),
            "{text}"
        );
        assert!(text.contains("backplane_migrations_total{outcome=\"completed\"} 1"), "{text}");
        assert!(text.contains("backplane_migrations_total{outcome=\"failed\"} 0"), "{text}");
        for state in PORT_STATES {
            assert!(text.contains(&format!("backplane_ports{{state=\"{state}\"}} 0")), "{text}");
        }
        assert!(text.contains("backplane_program_run_time_seconds_total{program=\"from_port\"} 1.5"), "{text}");
        assert!(text.contains("# TYPE backplane_flows_active gauge"), "{text}");
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert!(name.starts_with("backplane_"), "{name}");
            if line.ends_with("counter") {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
    }
}
