//! Prometheus metrics: what the agent and the data path know, served as text on
//! `/metrics` (`--metrics-addr`, loopback by default).
//!
//! Most values are read at scrape time from where they already live: the data path's
//! per-CPU counters, the zone-pair drop counters, the flow table's statistics and its
//! per-zone-pair traffic totals, the rules in force, the kernel's program statistics and
//! the pinned maps' fill. They are kept in `prometheus` counters that only ever move up
//! by the growth since the last scrape, so a counter never goes backwards (flows that
//! expire leave their packets in the totals). A few are fed as things happen: exports,
//! payload sample parsing, migrations.
//!
//! Labels are bounded sets: zone names, verdicts, reasons, map and program names,
//! exporters, outcomes; never addresses or ports. Every metric is listed in the README
//! (`## Metrics`).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
    sync::{Arc, Mutex},
};

use aya::maps::MapData;
use backplane_common::{
    Counter,
    config::CONFIG_ENFORCE,
    maps::{
        ADDR_OWNERS, ANNOUNCES, ENDPOINTS, FRAGMENTS, POLICIES, PORTS, VPATCHES, ZONE_CIDRS, ZONE_PAIR_STATS, ZONES,
    },
    policy::{ENDPOINT_ISOLATED, ENDPOINT_QUARANTINED, EndpointKey, EndpointValue},
};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::{
    CounterVec, Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::{agent::Agent, datapath::ProgramStats};

/// Default `--metrics-addr`: loopback only, Prometheus' exporter port range.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9469";

/// Content type of the Prometheus text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Migration outcomes the metric starts with (at zero).
pub const MIGRATION_OUTCOMES: &[&str] = &["completed", "failed", "aborted"];

/// Endpoint states of `backplane_endpoints`.
pub const ENDPOINT_STATES: &[&str] = &["active", "quarantined", "isolated"];

/// Port states of `backplane_ports`.
pub const PORT_STATES: &[&str] = &["attached", "blocked", "unguarded"];

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
];

/// Maps whose fill is reported by walking their keys (FLOWS comes from the flow table's
/// own read): `(map name, label)`.
const WALKED_MAPS: &[(&str, &str)] = &[
    (PORTS, "ports"),
    (ENDPOINTS, "endpoints"),
    (ZONE_CIDRS, "zone_cidrs"),
    (ZONES, "zones"),
    (POLICIES, "policies"),
    (ZONE_PAIR_STATS, "zone_pair_stats"),
    (FRAGMENTS, "fragments"),
    (VPATCHES, "vpatches"),
    (ANNOUNCES, "announces"),
    (ADDR_OWNERS, "addr_owners"),
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
    migrations: IntCounterVec,
    program_run_time: CounterVec,
    program_runs: IntCounterVec,
    payload_samples: IntCounterVec,
    payload_parsed: IntCounterVec,
    export_records: IntCounterVec,
    export_errors: IntCounterVec,
    /// Endpoint counts set by the endpoint work; `None`: counted from `ENDPOINTS`.
    endpoint_override: Mutex<Option<BTreeMap<String, i64>>>,
    /// The pinned maps whose keys are walked at scrape time.
    walked: Vec<(&'static str, MapData)>,
    /// `ENDPOINTS`, read for the endpoint states.
    endpoint_table: Option<aya::maps::HashMap<MapData, EndpointKey, EndpointValue>>,
    /// Keeps kernel BPF statistics (run time, run count) on while the agent runs.
    _bpf_stats: Option<OwnedFd>,
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
    /// Registers every metric. `maps_dir` holds the pinned maps whose fill is reported;
    /// `bpf_stats` is the descriptor that keeps kernel program statistics on.
    #[must_use]
    #[expect(clippy::too_many_lines, reason = "one registration per metric")]
    pub fn new(maps_dir: Option<&Path>, bpf_stats: Option<OwnedFd>) -> Self {
        let r = Registry::new();
        let walked = maps_dir
            .map(|dir| {
                WALKED_MAPS
                    .iter()
                    .filter_map(|(name, label)| match MapData::from_pin(dir.join(name)) {
                        Ok(map) => Some((*label, map)),
                        Err(e) => {
                            log::warn!("metrics: cannot open pinned map {name}: {e}; its fill is not reported");
                            None
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
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
                "Records the data path could not put into a ring buffer because it was full.",
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
            endpoint_override: Mutex::new(None),
            walked,
            endpoint_table: maps_dir.and_then(|dir| {
                let map = MapData::from_pin(dir.join(ENDPOINTS)).ok()?;
                aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(map).ok()?).ok()
            }),
            _bpf_stats: bpf_stats,
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

    /// Sets the endpoint counts by state, replacing the count taken from the kernel's
    /// `ENDPOINTS` table. For the endpoint work: call it whenever endpoint states change.
    pub fn set_endpoints(&self, by_state: &[(&str, i64)]) {
        let map = by_state.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect();
        *self.endpoint_override.lock().expect("endpoint override lock") = Some(map);
    }

    /// Counts flow records an exporter delivered.
    pub fn exported(&self, exporter: &str, records: u64) {
        self.export_records.with_label_values(&[exporter]).inc_by(records);
    }

    /// Counts a delivery failure of an exporter (`error`: a short, fixed word).
    pub fn export_error(&self, exporter: &str, error: &str, n: u64) {
        self.export_errors.with_label_values(&[exporter, error]).inc_by(n);
    }

    /// Reads everything the agent knows into the metrics. Blocking (map reads).
    pub fn update(&self, agent: &Agent) {
        let status = agent.status();
        let counters = &status.counters;
        let get = |c: Counter| counters.get(c.as_str()).copied().unwrap_or(0);
        raise(&self.packets, get(Counter::Packets));
        raise(&self.bytes, get(Counter::Bytes));
        raise(&self.flows_created, get(Counter::FlowsCreated));
        raise(&self.flow_insert_failures, get(Counter::FlowInsertFailed));
        let f = &status.flows.stats;
        self.flows_active.set(i64::try_from(f.active_records).unwrap_or(i64::MAX));
        raise(&self.flows_expired, f.expired);
        raise(&self.flows_evicted, f.evicted);

        // Traffic by zone pair: denied and audited packets are counted per packet by the
        // data path (ZONE_PAIR_STATS); allowed and observed ones from the flows' counters.
        let mut pairs: BTreeMap<(String, String, String), (u64, u64)> = BTreeMap::new();
        for t in &status.zone_traffic {
            if t.verdict == "allowed" || t.verdict == "observed" {
                let e = pairs.entry((t.src_zone.clone(), t.dst_zone.clone(), t.verdict.clone())).or_default();
                e.0 += t.packets;
                e.1 += t.bytes;
            }
        }
        let mut drops: BTreeMap<String, u64> = BTreeMap::new();
        for p in &status.zone_pairs {
            let e = pairs.entry((p.src_zone.clone(), p.dst_zone.clone(), p.verdict.clone())).or_default();
            e.0 += p.packets;
            e.1 += p.bytes;
            if p.verdict == "denied" {
                *drops.entry(p.reason.clone()).or_default() += p.packets;
            }
        }
        for ((src, dst, verdict), (packets, bytes)) in &pairs {
            raise(&self.zone_pair_packets.with_label_values(&[src, dst, verdict]), *packets);
            raise(&self.zone_pair_bytes.with_label_values(&[src, dst, verdict]), *bytes);
        }
        for (label, c) in COUNTER_DROP_REASONS {
            drops.insert((*label).to_owned(), get(*c));
        }
        let named: u64 = drops.values().sum();
        drops.insert("other".into(), get(Counter::Dropped).saturating_sub(named));
        for (reason, n) in &drops {
            raise(&self.dropped_packets.with_label_values(&[reason]), *n);
        }

        raise(&self.ring_events_lost.with_label_values(&["flow_events"]), get(Counter::EventsLost));
        raise(&self.ring_events_lost.with_label_values(&["payload_samples"]), get(Counter::PayloadSamplesLost));
        raise(&self.payload_samples.with_label_values(&["sent"]), get(Counter::PayloadSamples));
        raise(&self.payload_samples.with_label_values(&["lost"]), get(Counter::PayloadSamplesLost));
        raise(&self.payload_samples.with_label_values(&["skipped"]), get(Counter::PayloadSamplesSkipped));
        for (result, n) in agent.sample_stats().snapshot() {
            raise(&self.payload_parsed.with_label_values(&[result]), n);
        }
        for c in Counter::ALL.iter().filter(|c| c.is_parse_failure()) {
            raise(&self.parse_failures.with_label_values(&[c.as_str()]), get(*c));
        }

        let (blocked, unguarded) = status.port_guard.counts();
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.ports.with_label_values(&["attached"]).set(n(status.ports.len()));
        self.ports.with_label_values(&["blocked"]).set(n(blocked));
        self.ports.with_label_values(&["unguarded"]).set(n(unguarded));

        raise(&self.rule_reloads.with_label_values(&["ok"]), status.rules.reloads_ok);
        raise(&self.rule_reloads.with_label_values(&["rejected"]), status.rules.reloads_rejected);
        self.rules_generation.set(i64::from(status.config_generation));

        self.map_entries.with_label_values(&["flows"]).set(i64::try_from(status.flows.entries).unwrap_or(i64::MAX));
        self.map_capacity.with_label_values(&["flows"]).set(i64::from(status.flows.capacity));
        for (label, map) in &self.walked {
            if let Ok(info) = map.info() {
                self.map_capacity.with_label_values(&[label]).set(i64::from(info.max_entries()));
                let n = count_keys(map, info.key_size() as usize, info.max_entries());
                self.map_entries.with_label_values(&[label]).set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }

        let override_counts = self.endpoint_override.lock().expect("endpoint override lock").clone();
        let counts = override_counts.unwrap_or_else(|| {
            let here = &status.endpoints;
            if here.total > 0 {
                // The endpoints this node knows, by the state the endpoint manager gives
                // them (inventory, runtime and unknown MACs).
                let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                return BTreeMap::from([
                    ("active".to_owned(), n(here.active)),
                    ("quarantined".to_owned(), n(here.quarantined)),
                    ("isolated".to_owned(), n(here.isolated)),
                ]);
            }
            let enforcing = status.config_flags & CONFIG_ENFORCE != 0;
            let slot = agent.active_slot();
            self.endpoints_from_kernel(enforcing.then_some(slot))
        });
        // Moves handled by this node (arrivals from another node or port), as the
        // endpoint manager counts them; the counter follows that count upwards.
        let completed = self.migrations.with_label_values(&["completed"]);
        if status.endpoints.moves > completed.get() {
            completed.inc_by(status.endpoints.moves - completed.get());
        }
        for (state, n) in counts {
            self.endpoints.with_label_values(&[&state]).set(n);
        }

        for (program, stats) in agent.program_stats() {
            self.set_program(program, stats);
        }
    }

    fn set_program(&self, program: &str, stats: ProgramStats) {
        raise(&self.program_runs.with_label_values(&[program]), stats.run_count);
        let c = self.program_run_time.with_label_values(&[program]);
        #[expect(clippy::cast_precision_loss, reason = "seconds as a float, as Prometheus wants them")]
        let total = stats.run_time_ns as f64 / 1e9;
        let now = c.get();
        if total > now {
            c.inc_by(total - now);
        }
    }

    /// Endpoints of the rule-table half in force by state; all zero without rules.
    fn endpoints_from_kernel(&self, slot: Option<u8>) -> BTreeMap<String, i64> {
        let mut counts: BTreeMap<String, i64> = ENDPOINT_STATES.iter().map(|s| ((*s).to_owned(), 0)).collect();
        let Some(slot) = slot else { return counts };
        let Some(table) = &self.endpoint_table else {
            return counts;
        };
        for (key, value) in table.iter().flatten() {
            if key.slot != slot {
                continue;
            }
            let state = if value.flags & ENDPOINT_ISOLATED != 0 {
                "isolated"
            } else if value.flags & ENDPOINT_QUARANTINED != 0 {
                "quarantined"
            } else {
                "active"
            };
            *counts.entry(state.to_owned()).or_default() += 1;
        }
        counts
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

/// `BPF_MAP_GET_NEXT_KEY` from `enum bpf_cmd`.
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `union bpf_attr` as the map element commands use it.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// Counts a map's keys by walking them (at most `max_entries` + 1 steps).
fn count_keys(map: &MapData, key_size: usize, max_entries: u32) -> u64 {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n = 0u64;
    let mut first = true;
    while n <= u64::from(max_entries) {
        let attr = ElemAttr {
            map_fd: u32::try_from(fd).unwrap_or(0),
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` points to valid buffers of the map's key size for the syscall's
        // duration; the kernel writes at most key_size bytes into `next`.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_GET_NEXT_KEY, std::ptr::from_ref(&attr), size_of::<ElemAttr>())
        };
        if rc != 0 {
            break;
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    n
}

/// Turns on the kernel's BPF run statistics (run time, run count) for as long as the
/// returned descriptor lives; the kernel turns them off again when the last holder
/// closes it, so nothing is left changed when the agent exits, even on a crash.
#[must_use]
pub fn enable_bpf_stats() -> Option<OwnedFd> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::warn!("cannot enable BPF run statistics ({e}); program run time reads 0");
            None
        }
    }
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                log::warn!("metrics: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = Arc::clone(&agent);
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, Arc::clone(&agent)));
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                log::debug!("metrics: connection from {peer}: {e}");
            }
        });
    }
}

async fn respond(req: Request<Incoming>, agent: Arc<Agent>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Vec<u8>, content_type: &str| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            response.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        Ok(response)
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let body = tokio::task::spawn_blocking(move || {
                let metrics = agent.metrics();
                metrics.update(&agent);
                metrics.render()
            })
            .await;
            match body {
                Ok(body) => reply(StatusCode::OK, body, TEXT_FORMAT),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n").into_bytes(), "text/plain"),
            }
        }
        (&Method::GET, "/") => {
            reply(StatusCode::OK, b"backplane agent: metrics at /metrics\n".to_vec(), "text/plain; charset=utf-8")
        }
        _ => reply(StatusCode::NOT_FOUND, b"not found: try /metrics\n".to_vec(), "text/plain; charset=utf-8"),
    }
}

/// Binds `--metrics-addr`.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
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
        let readme = include_str!("../../README.md");
        let metrics_section = readme.split("## Metrics").nth(1).expect("README has ## Metrics");
        for name in &names {
            assert!(metrics_section.contains(&format!("| `{name}` |")), "README ## Metrics lacks a row for {name}");
        }
        let dashboard = include_str!("../../deploy/grafana/backplane.json");
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
        let m = Metrics::new(None, None);
        let c = m.zone_pair_packets.with_label_values(&["web", "db", "allowed"]);
        raise(&c, 10);
        raise(&c, 7);
        assert_eq!(c.get(), 10, "never backwards");
        raise(&c, 12);
        assert_eq!(c.get(), 12);
        m.record_migration("completed");
        m.set_program("from_port", ProgramStats { run_time_ns: 1_500_000_000, run_count: 3 });
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
