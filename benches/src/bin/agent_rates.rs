//! The agent's side of the cost: how fast it consumes flow events, how long a large
//! rule set takes to compile and put in force, and what a flow costs in memory.
//!
//! 1. Flow events: the generator opens new flows (each frame a flow not seen before)
//!    from one lab VM to another as fast as it can, against `backplane run` (observe
//!    mode) with a given `--ring-size`; the agent's `status --json` says how many start
//!    events it consumed and how many the data path lost; /proc says how much CPU the
//!    agent used for them.
//! 2. Rule sets: a generated rule set of N policies and M MAC endpoints, timed through
//!    `parse_rules`, `compile`, and the agent's `RuleTables::write_slot` + `activate` on
//!    a loaded data path (first load, then a reload that clears the other half).
//!    The same events also go through the agent's own decoder and flow table in this
//!    process, without a kernel: what one core of the agent does per event.
//! 3. Memory: the kernel's accounting (`memlock` in fdinfo; `bpftool map show`) of the
//!    flow table at several capacities, empty and filled; the agent's resident memory
//!    with 0 and N flows.

#![expect(clippy::cast_precision_loss, reason = "counts and byte sizes far below 2^52 become rates and ratios")]

use std::{fmt::Write as _, path::Path, time::Duration, time::Instant};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap, MapData};
use backplane::rule_tables::{RuleTables, activate, next_slot};
use backplane_benches::{
    agent, datapath, isolation,
    pktgen::{SendSpec, Stream},
    procfs, report,
    rulegen::{BenchTraffic, ZoneRuleSet},
    stats::{Summary, summarize},
};
use backplane_common::{DatapathConfig, FlowKey, FlowValue, Verdict, flow::FAMILY_IPV4, maps};
use backplane_lab::{ChildGuard, Lab, Vm};
use backplane_rules::{ZoneIds, compile, parse_rules};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Ring buffer sizes (`--ring-size`) for the flow event test.
    #[arg(long, value_delimiter = ',', default_values = ["256K", "4M"])]
    ring_sizes: Vec<String>,
    /// New flows opened per event round.
    #[arg(long, default_value_t = 300_000)]
    new_flows: u32,
    /// Rounds of each measurement (medians reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Policies of the compile-and-apply test.
    #[arg(long, default_value_t = 10_000)]
    policies: usize,
    /// MAC endpoints of the compile-and-apply test.
    #[arg(long, default_value_t = 100_000)]
    endpoints: usize,
    /// Flow table capacities for the kernel memory test.
    #[arg(long, value_delimiter = ',', default_values_t = vec![65_536, 262_144, 1_048_576])]
    capacities: Vec<u32>,
    /// Sections to run (a subset cannot be written to benches/results).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Part::Events, Part::Processing, Part::Rules, Part::Memory])]
    sections: Vec<Part>,
    /// Events of the in-process event processing test.
    #[arg(long, default_value_t = 1_000_000)]
    processed_events: u32,
    /// Flow counts at which the agent's memory is read.
    #[arg(long, value_delimiter = ',', default_values_t = vec![50_000, 200_000])]
    agent_flows: Vec<u32>,
    /// Write results to benches/results (otherwise print only).
    #[arg(long)]
    write: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Events,
    Processing,
    Rules,
    Memory,
}

const UDP_PORT: u16 = 9000;

/// Two VMs and a receiver-friendly setup for opening many flows.
struct Pair {
    client: Vm,
    server: Vm,
    lab: Lab,
}

fn pair() -> anyhow::Result<Pair> {
    let lab = Lab::new("bp");
    let client = lab.add_veth_vm("client", "10.30.0.10/8", None, Some("02:00:00:00:30:0a"));
    let server = lab.add_veth_vm("server", "10.40.0.10/8", None, Some("02:00:00:00:40:0a"));
    if !client.ping(server.ip(), 2) || !server.ping(client.ip(), 1) {
        bail!("the VMs cannot reach each other");
    }
    Ok(Pair { client, server, lab })
}

impl Pair {
    /// Sends one frame per flow for flows `first .. first + count` (each new to the
    /// agent), with a receiver on the server; returns the time the sender took.
    fn open_flows(&self, first: u32, count: u32) -> anyhow::Result<Duration> {
        let mut spec = SendSpec::from_vm(&self.client, self.server.mac(), self.server.ip(), UDP_PORT, count);
        spec.first_flow = first;
        spec.max_frames = Some(u64::from(count));
        let stream = Stream::start(spec, self.client.netns(), Some((self.server.netns(), UDP_PORT)))?;
        let took = stream.wait_sender(Duration::from_secs(120));
        stream.stop()?;
        Ok(took)
    }
}

struct AgentProbe<'a> {
    binary: &'a Path,
    socket: std::path::PathBuf,
    pid: u32,
}

impl AgentProbe<'_> {
    fn status(&self) -> anyhow::Result<serde_json::Value> {
        agent::status(self.binary, &self.socket)
    }
}

#[derive(Default, Clone, serde::Serialize)]
struct EventRound {
    ring_size: String,
    /// The agent was stopped (SIGSTOP) while the flows were opened, resumed after.
    stalled: bool,
    new_flows: u32,
    /// Entries in the kernel flow table before the round (`status`: `flows.entries`).
    table_before: u64,
    generate_seconds: f64,
    flows_created: u64,
    start_events: u64,
    events_lost: u64,
    drain_seconds: f64,
    agent_cpu_seconds: f64,
}

/// A stopped process (SIGSTOP to its group), continued (SIGCONT) on drop.
struct Stopped<'a>(&'a mut ChildGuard);

impl<'a> Stopped<'a> {
    fn new(child: &'a mut ChildGuard) -> Self {
        child.signal(libc::SIGSTOP);
        Self(child)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

/// One round: open `n` new flows, wait until the agent has consumed what it will.
/// With `stall`, the agent is stopped while the flows are opened, and the time and CPU
/// counted are those of draining what the ring held once it resumes.
fn event_round(
    p: &Pair,
    a: &AgentProbe,
    agent: &mut ChildGuard,
    ring_size: &str,
    first: u32,
    n: u32,
    stall: bool,
) -> anyhow::Result<EventRound> {
    let s0 = a.status()?;
    let mut cpu0 = procfs::cpu_seconds(a.pid)?;
    let mut started = Instant::now();
    let gen_time = if stall {
        let stopped = Stopped::new(agent);
        let t = p.open_flows(first, n)?;
        drop(stopped);
        started = Instant::now();
        cpu0 = procfs::cpu_seconds(a.pid)?;
        t
    } else {
        p.open_flows(first, n)?
    };
    // Wait until start events stop arriving (1 s without change).
    let mut last = agent::status_u64(&s0, &["flows", "start_events"]);
    let mut last_change = Instant::now();
    let mut s1 = a.status()?;
    while last_change.elapsed() < Duration::from_secs(1) && started.elapsed() < Duration::from_secs(120) {
        isolation::sleep(Duration::from_millis(50))?;
        s1 = a.status()?;
        let now = agent::status_u64(&s1, &["flows", "start_events"]);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    let cpu1 = procfs::cpu_seconds(a.pid)?;
    let d = |path: &[&str]| agent::status_u64(&s1, path).saturating_sub(agent::status_u64(&s0, path));
    Ok(EventRound {
        ring_size: ring_size.to_owned(),
        stalled: stall,
        new_flows: n,
        table_before: agent::status_u64(&s0, &["flows", "entries"]),
        generate_seconds: gen_time.as_secs_f64(),
        flows_created: d(&["counters", "flows_created"]),
        start_events: d(&["flows", "start_events"]),
        events_lost: d(&["events_lost"]),
        drain_seconds: (last_change - started).as_secs_f64(),
        agent_cpu_seconds: cpu1 - cpu0,
    })
}

fn flow_events(args: &Args, binary: &Path) -> anyhow::Result<Vec<EventRound>> {
    let mut out = Vec::new();
    for ring in &args.ring_sizes {
        let p = pair()?;
        let table =
            (args.new_flows * 2 * u32::try_from(args.rounds).unwrap_or(1)).next_power_of_two().max(262_144).to_string();
        let mut guard: ChildGuard = agent::start(
            &p.lab,
            binary,
            &["--ring-size", ring, "--flow-table-size", &table, "--idle-timeout", "3600"],
            None,
        );
        let probe = AgentProbe { binary, socket: p.lab.socket_path(), pid: guard.id() };
        isolation::sleep(Duration::from_secs(1))?;
        for round in 0..2 * args.rounds {
            // Running and stalled rounds alternate.
            let stall = round % 2 == 1;
            let first = u32::try_from(round).unwrap_or(0) * args.new_flows;
            let r = event_round(&p, &probe, &mut guard, ring, first, args.new_flows, stall)?;
            eprintln!(
                "ring {ring}, round {}{}: {} flows created in {:.2} s, {} start events consumed, {} lost, agent CPU {:.2} s, drained after {:.2} s",
                round / 2 + 1,
                if stall { " (agent stalled)" } else { "" },
                r.flows_created,
                r.generate_seconds,
                r.start_events,
                r.events_lost,
                r.agent_cpu_seconds,
                r.drain_seconds
            );
            out.push(r);
        }
        drop(guard);
    }
    Ok(out)
}

#[derive(Default, Clone, serde::Serialize)]
struct CompileRound {
    parse_seconds: f64,
    compile_seconds: f64,
    first_write_seconds: f64,
    first_activate_seconds: f64,
    reload_write_seconds: f64,
    reload_activate_seconds: f64,
    endpoints: usize,
    cidrs: usize,
    zones: usize,
    policy_entries: usize,
    yaml_bytes: usize,
}

fn compile_and_apply(policies: usize, endpoints: usize) -> anyhow::Result<CompileRound> {
    let set = ZoneRuleSet::generate(policies, endpoints, &BenchTraffic::default());
    let yaml = set.to_yaml();
    let t = Instant::now();
    let rules = parse_rules([(Path::new("rules.yaml"), yaml.as_str())])
        .map_err(|e| anyhow::anyhow!("{} errors, first: {:?}", e.len(), e.first()))?;
    let parse = t.elapsed();
    let t = Instant::now();
    let compiled = compile(&rules, &ZoneIds::new());
    let compile_time = t.elapsed();
    let mut loaded = datapath::load(65_536, &[])?;
    let mut tables = RuleTables::from_ebpf(&mut loaded.ebpf)?;
    let mut config: Array<MapData, DatapathConfig> =
        Array::try_from(loaded.ebpf.take_map(maps::CONFIG).context("CONFIG")?)?;
    let mut apply = || -> anyhow::Result<(Duration, Duration)> {
        let slot = next_slot(&config.get(&0, 0)?);
        let t = Instant::now();
        tables.write_slot(slot, &compiled)?;
        let write = t.elapsed();
        let t = Instant::now();
        activate(&mut config, slot, &compiled)?;
        Ok((write, t.elapsed()))
    };
    let (w1, a1) = apply()?;
    // The second apply fills the other half; the third clears and rewrites the first:
    // that is the steady-state reload.
    apply()?;
    let (w3, a3) = apply()?;
    Ok(CompileRound {
        parse_seconds: parse.as_secs_f64(),
        compile_seconds: compile_time.as_secs_f64(),
        first_write_seconds: w1.as_secs_f64(),
        first_activate_seconds: a1.as_secs_f64(),
        reload_write_seconds: w3.as_secs_f64(),
        reload_activate_seconds: a3.as_secs_f64(),
        endpoints: compiled.endpoints.len(),
        cidrs: compiled.cidrs.len(),
        zones: compiled.zones.len(),
        policy_entries: compiled.policies.len() + compiled.pair_markers.len(),
        yaml_bytes: yaml.len(),
    })
}

#[derive(Clone, serde::Serialize)]
struct KernelMemory {
    capacity: u32,
    filled: u32,
    memlock_empty: u64,
    memlock_filled: u64,
    bpftool_bytes_memlock: Option<u64>,
}

/// `bytes_memlock` of a pinned map as bpftool reports it, if bpftool is there.
fn bpftool_memlock(pin: &Path) -> Option<u64> {
    let out = std::process::Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(pin).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("bytes_memlock").and_then(serde_json::Value::as_u64)
}

fn kernel_memory(capacity: u32) -> anyhow::Result<KernelMemory> {
    let mut loaded = datapath::load(capacity, &[])?;
    let pin = loaded.pin_dir().join(maps::FLOWS);
    let filled = capacity / 2;
    let mut flows: HashMap<&mut MapData, FlowKey, FlowValue> =
        HashMap::try_from(loaded.ebpf.map_mut(maps::FLOWS).context("FLOWS")?)?;
    let empty = datapath::map_memory_bytes(&MapData::from_pin(&pin)?)?;
    let value = FlowValue {
        packets: [1, 1],
        bytes: [64, 64],
        generation: 1,
        verdict: Verdict::Allowed as u8,
        ..Default::default()
    };
    for i in 0..filled {
        let [_, b, c, d] = i.to_be_bytes();
        let mut lo = [0u8; 16];
        lo[..4].copy_from_slice(&[172, 16, b, c]);
        let mut hi = [0u8; 16];
        hi[..4].copy_from_slice(&[172, 17, 0, d]);
        let key =
            FlowKey { addr_lo: lo, addr_hi: hi, port_lo: 1024, port_hi: 80, vlan: 0, proto: 17, family: FAMILY_IPV4 };
        flows.insert(key, value, 0)?;
    }
    let full = datapath::map_memory_bytes(&MapData::from_pin(&pin)?)?;
    Ok(KernelMemory {
        capacity,
        filled,
        memlock_empty: empty,
        memlock_filled: full,
        bpftool_bytes_memlock: bpftool_memlock(&pin),
    })
}

#[derive(Clone, serde::Serialize)]
struct AgentMemory {
    flows: u64,
    rss_bytes: u64,
}

/// The agent's RSS with 0 flows and after opening each of `counts` (cumulative totals).
fn agent_memory(binary: &Path, counts: &[u32]) -> anyhow::Result<Vec<AgentMemory>> {
    let p = pair()?;
    let max = counts.iter().copied().max().unwrap_or(0);
    let table = (max + 65_536).next_power_of_two().to_string();
    let guard = agent::start(&p.lab, binary, &["--flow-table-size", &table, "--idle-timeout", "3600"], None);
    let probe = AgentProbe { binary, socket: p.lab.socket_path(), pid: guard.id() };
    isolation::sleep(Duration::from_secs(3))?;
    let records = |s: &serde_json::Value| agent::status_u64(s, &["flows", "active_records"]);
    let base_records = records(&probe.status()?);
    let mut out = vec![AgentMemory { flows: 0, rss_bytes: procfs::rss_bytes(guard.id())? }];
    let mut opened = 0u32;
    for &target in counts {
        if target <= opened {
            continue;
        }
        p.open_flows(opened, target - opened)?;
        opened = target;
        // Until the agent's records are complete and two more map reads have passed.
        let deadline = Instant::now() + Duration::from_secs(60);
        while records(&probe.status()?) < base_records + u64::from(target) * 99 / 100 && Instant::now() < deadline {
            isolation::sleep(Duration::from_millis(200))?;
        }
        isolation::sleep(Duration::from_secs(3))?;
        let s = probe.status()?;
        let flows = records(&s).saturating_sub(base_records);
        let rss = procfs::rss_bytes(guard.id())?;
        eprintln!("agent with {flows} flows: RSS {}", mib(rss));
        out.push(AgentMemory { flows, rss_bytes: rss });
    }
    drop(guard);
    Ok(out)
}

/// `256K` / `4M` / plain bytes.
fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split].parse().ok()?;
    let mult = match t[split..].to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    Some(n * mult)
}

fn secs(s: &Summary) -> String {
    if s.median < 1.0 {
        format!("{:.1} ms ({:.1}-{:.1})", s.median * 1e3, s.min * 1e3, s.max * 1e3)
    } else {
        format!("{:.2} s ({:.2}-{:.2})", s.median, s.min, s.max)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// A section of the report: its Markdown, its raw numbers, and the bars of its plot.
struct Section {
    markdown: String,
    json: serde_json::Value,
    bars: Vec<(String, f64)>,
}

fn events_section(args: &Args, binary: &Path) -> anyhow::Result<Section> {
    let events = flow_events(args, binary)?;
    let event_size = backplane::events::FLOW_EVENT_SIZE;
    let record = event_size as u64 + 8;
    let mut doc = format!(
        "## Flow events consumed\n\nThe generator opens {} new flows per round (one 60-byte UDP frame each, distinct source address/port) from one VM \
         to another as fast as it can, against one `backplane run` per ring size, in observe mode (`--flow-table-size` large enough to hold every flow, \
         `--idle-timeout 3600`, so the table grows by {} flows every round). A start event is {event_size} bytes plus the ring buffer's 8-byte record \
         header, so a ring of R bytes holds R/{record} events. Rounds alternate: the agent running, and the agent stopped (SIGSTOP) during the burst and \
         resumed (SIGCONT) after it, which shows what the ring alone absorbs.\n\n\
         \"consumed/s\" is start events over the time from the first frame to the last event consumed; \"per agent CPU-second\" divides them by the \
         agent's CPU time (user + system, all threads) over the same span: the rate one fully busy core would sustain. That CPU time includes the \
         agent's reads of the whole kernel flow table (every second, or as long after the last as it took), so it grows with the flows already in the table (first column).\n\n",
        args.new_flows, args.new_flows
    );
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|r| {
            let capacity = parse_size(&r.ring_size).map_or_else(|| "-".into(), |b| (b / record).to_string());
            vec![
                format!("{} ({capacity} events)", r.ring_size),
                r.table_before.to_string(),
                if r.stalled { "stalled".into() } else { "running".into() },
                format!("{:.0}", r.flows_created as f64 / r.generate_seconds / 1e3),
                r.start_events.to_string(),
                format!("{} ({:.1}%)", r.events_lost, 100.0 * r.events_lost as f64 / r.flows_created.max(1) as f64),
                if r.stalled { "-".into() } else { format!("{:.0}", r.start_events as f64 / r.drain_seconds / 1e3) },
                format!("{:.2}", r.agent_cpu_seconds),
                format!("{:.0}", r.start_events as f64 / r.agent_cpu_seconds.max(1e-3) / 1e3),
            ]
        })
        .collect();
    let _ = writeln!(
        doc,
        "{}",
        report::markdown_table(
            &[
                "--ring-size",
                "flows in table before",
                "agent",
                "new flows/s created (k)",
                "start events consumed",
                "events lost",
                "consumed/s (k)",
                "agent CPU s",
                "events per agent CPU-second (k)",
            ],
            &rows
        )
    );
    let bars = events
        .iter()
        .filter(|r| !r.stalled)
        .map(|r| {
            (
                format!("{}, {}k in table", r.ring_size, r.table_before / 1000),
                r.start_events as f64 / r.agent_cpu_seconds.max(1e-3) / 1e3,
            )
        })
        .collect();
    Ok(Section { markdown: doc, json: serde_json::to_value(&events)?, bars })
}

/// Thread CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Start events of `n` distinct UDP flows, as the ring buffer hands them to the agent.
#[expect(clippy::cast_possible_truncation, reason = "the bytes of a flow number become an address")]
fn synthetic_events(n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut src = [0u8; 16];
            src[..4].copy_from_slice(&[10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            let mut dst = [0u8; 16];
            dst[..4].copy_from_slice(&[10, 40, 0, 10]);
            let (key, direction) =
                FlowKey::canonical(&src, 1024 + (i % 60_000) as u16, &dst, UDP_PORT, 0, 17, FAMILY_IPV4);
            let event = backplane_common::FlowEvent {
                key,
                ts_ns: u64::from(i),
                ifindex: 3,
                kind: backplane_common::FlowEventKind::Start as u8,
                direction,
                verdict: Verdict::Observed as u8,
                tcp_flags: 0,
            };
            backplane::events::to_bytes(&event)
        })
        .collect()
}

/// One round of the in-process event test: decode and apply `events` in batches of
/// `batch` (as the ring reader does), on a fresh flow table; returns the thread's CPU
/// seconds.
fn process_events(events: &[Vec<u8>], batch: usize) -> f64 {
    use backplane::{clock::Clock, events::FlowEventDecode as _, flows, ifnames::IfNames, rule_names::RuleNames};
    let table = flows::FlowTable::new(
        Clock::measure(),
        3600 * 1_000_000_000,
        std::sync::Arc::new(IfNames::new()),
        std::sync::Arc::new(RuleNames::new()),
    );
    let shared = flows::SharedFlows::new(table, None);
    let started = thread_cpu();
    for chunk in events.chunks(batch) {
        let decoded = chunk.iter().map(|bytes| backplane_common::FlowEvent::from_bytes(bytes)).collect();
        shared.apply_events(decoded);
    }
    let seconds = thread_cpu().saturating_sub(started).as_secs_f64();
    assert_eq!(shared.stats().start_events, events.len() as u64, "every event applied");
    seconds
}

fn processing_section(args: &Args) -> Section {
    const BATCH: usize = 4096;
    let events = synthetic_events(args.processed_events);
    let rounds: Vec<f64> = (0..args.rounds).map(|_| process_events(&events, BATCH)).collect();
    let per_second = summarize(rounds.iter().map(|s| f64::from(args.processed_events) / s / 1e6));
    let ns_per_event = summarize(rounds.iter().map(|s| s * 1e9 / f64::from(args.processed_events)));
    let doc = format!(
        "## Flow events processed by the agent's code, in process\n\n\
         {} start events of distinct flows, encoded as the data path writes them, decoded with the agent's `FlowEvent::from_bytes` and applied \
         with `SharedFlows::apply_events` (the ring reader's calls) in batches of {BATCH}, into an empty flow table, on one thread; timed with \
         the thread's CPU clock. No kernel: this is the agent's own work per event, without ring wake-ups, other threads or table reads. \
         {} rounds; medians (min-max).\n\n{}\n",
        args.processed_events,
        args.rounds,
        report::markdown_table(
            &["events", "million events per CPU-second", "ns per event"],
            &[vec![args.processed_events.to_string(), per_second.cell(2), ns_per_event.cell(0)]]
        )
    );
    let json = serde_json::json!({ "events": args.processed_events, "batch": BATCH, "cpu_seconds": rounds });
    Section { markdown: doc, json, bars: vec![("in process".into(), per_second.median * 1e3)] }
}

fn compile_section(args: &Args) -> anyhow::Result<Section> {
    let mut rounds = Vec::new();
    for i in 0..args.rounds {
        isolation::check_interrupted()?;
        let r = compile_and_apply(args.policies, args.endpoints)?;
        eprintln!(
            "rules round {}: parse {:.2} s, compile {:.2} s, write {:.2} s, reload write {:.2} s",
            i + 1,
            r.parse_seconds,
            r.compile_seconds,
            r.first_write_seconds,
            r.reload_write_seconds
        );
        rounds.push(r);
    }
    let s = |f: fn(&CompileRound) -> f64| summarize(rounds.iter().map(f));
    let first = rounds.first().context("no rounds")?;
    let mut doc = format!(
        "## Compiling and applying a rule set\n\n{} policies over {} zones (each zone a /24), {} MAC endpoints; {:.1} MB of YAML. \
         Compiled: {} endpoint entries, {} CIDR entries, {} zone entries, {} policy-trie entries (port ranges split into prefixes, plus one marker per zone pair). \
         Timed in-process with the agent's own code: `backplane_rules::parse_rules` (YAML, validation), `compile`, then `RuleTables::write_slot` into the idle half \
         of the data path's rule maps and `activate` (one `CONFIG` write) on a loaded data path. The reload is the third apply, which first deletes the previous \
         contents of its half. {} rounds; medians (min-max).\n\n",
        args.policies,
        first.zones,
        args.endpoints,
        first.yaml_bytes as f64 / 1e6,
        first.endpoints,
        first.cidrs,
        first.zones,
        first.policy_entries,
        args.rounds
    );
    let steps: [(&str, Summary); 7] = [
        ("parse + validate", s(|r| r.parse_seconds)),
        ("compile", s(|r| r.compile_seconds)),
        ("write tables, first load", s(|r| r.first_write_seconds)),
        ("activate (switch halves)", s(|r| r.first_activate_seconds)),
        ("write tables, reload (clear + write)", s(|r| r.reload_write_seconds)),
        (
            "total, first load",
            s(|r| r.parse_seconds + r.compile_seconds + r.first_write_seconds + r.first_activate_seconds),
        ),
        (
            "total, reload",
            s(|r| r.parse_seconds + r.compile_seconds + r.reload_write_seconds + r.reload_activate_seconds),
        ),
    ];
    let rows: Vec<Vec<String>> = steps.iter().map(|(name, v)| vec![(*name).to_owned(), secs(v)]).collect();
    let _ = writeln!(doc, "{}", report::markdown_table(&["step", "time"], &rows));
    let bars = steps.iter().take(5).map(|(name, v)| ((*name).to_owned(), v.median)).collect();
    Ok(Section { markdown: doc, json: serde_json::to_value(&rounds)?, bars })
}

fn memory_section(args: &Args, binary: &Path) -> anyhow::Result<Section> {
    let mut kernel = Vec::new();
    for &c in &args.capacities {
        let k = kernel_memory(c)?;
        eprintln!(
            "FLOWS capacity {c}: memlock {} empty, {} with {} entries",
            k.memlock_empty, k.memlock_filled, k.filled
        );
        kernel.push(k);
    }
    let key_value = size_of::<FlowKey>() + size_of::<FlowValue>();
    let mut doc = format!(
        "## Memory per flow\n\n### Kernel\n\nBy type: `FlowKey` {} bytes + `FlowValue` {} bytes = {key_value} bytes of key and value per flow. \
         `FLOWS` is an `LRU_HASH`, which the kernel preallocates whole when the map is created: its memory depends on the capacity \
         (`--flow-table-size`), not on the number of flows in it. Kernel accounting from the map's fdinfo (`memlock`, the map's real \
         usage since Linux 6.4) and `bpftool map show` (`bytes_memlock`):\n\n",
        size_of::<FlowKey>(),
        size_of::<FlowValue>()
    );
    let kernel_rows: Vec<Vec<String>> = kernel
        .iter()
        .map(|k| {
            vec![
                k.capacity.to_string(),
                mib(k.memlock_empty),
                format!("{} entries: {}", k.filled, mib(k.memlock_filled)),
                k.bpftool_bytes_memlock.map_or_else(|| "-".into(), mib),
                format!("{:.0}", k.memlock_empty as f64 / f64::from(k.capacity)),
            ]
        })
        .collect();
    let _ = writeln!(
        doc,
        "{}",
        report::markdown_table(
            &["capacity", "memlock, empty", "memlock, filled half", "bpftool bytes_memlock", "bytes per slot"],
            &kernel_rows
        )
    );
    if let (Some(a), Some(b)) = (kernel.first(), kernel.last())
        && b.capacity > a.capacity
    {
        let slope = (b.memlock_empty - a.memlock_empty) as f64 / f64::from(b.capacity - a.capacity);
        let _ = writeln!(
            doc,
            "Marginal cost of one more slot of capacity: **{slope:.0} bytes** (difference between the smallest and largest capacity).\n"
        );
    }
    let agent_mem = agent_memory(binary, &args.agent_flows)?;
    let base = agent_mem.first().map_or(0, |m| m.rss_bytes);
    let agent_rows: Vec<Vec<String>> = agent_mem
        .iter()
        .map(|m| {
            let per = if m.flows > 0 {
                format!("{:.0}", (m.rss_bytes as f64 - base as f64) / m.flows as f64)
            } else {
                "-".into()
            };
            vec![m.flows.to_string(), mib(m.rss_bytes), per]
        })
        .collect();
    let _ = writeln!(
        doc,
        "### Agent\n\nResident memory (`VmRSS`) of `backplane run` (observe mode, default `--ring-size` 4M) after the generator opened the flows and the agent's \
         records of them were complete (read through `status --json`, `flows.active_records`):\n\n{}",
        report::markdown_table(&["flows", "RSS", "bytes per flow vs 0 flows"], &agent_rows)
    );
    if let [.., a, b] = agent_mem.as_slice()
        && b.flows > a.flows
    {
        let _ = writeln!(
            doc,
            "Between {} and {} flows: **{:.0} bytes per flow** (this slope leaves out the event ring's pages, which the first flows already touched).\n",
            a.flows,
            b.flows,
            (b.rss_bytes as f64 - a.rss_bytes as f64) / (b.flows - a.flows) as f64
        );
    }
    let json = serde_json::json!({ "kernel": kernel, "agent": agent_mem });
    Ok(Section { markdown: doc, json, bars: Vec::new() })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    isolation::install_interrupt_handler();
    isolation::enter_private_netns()?;
    let binary = agent::binary()?;
    let cmd = std::env::args().collect::<Vec<_>>().join(" ");
    if args.sections.len() < 4 {
        if args.write {
            bail!("--write needs every section");
        }
        for part in &args.sections {
            let section = match part {
                Part::Events => events_section(&args, &binary)?,
                Part::Processing => processing_section(&args),
                Part::Rules => compile_section(&args)?,
                Part::Memory => memory_section(&args, &binary)?,
            };
            println!("{}", section.markdown);
        }
        return Ok(());
    }
    let processing = processing_section(&args);
    let mut events = events_section(&args, &binary)?;
    events.bars.extend(processing.bars.iter().cloned());
    let rules = compile_section(&args)?;
    let memory = memory_section(&args, &binary)?;
    let doc = format!(
        "# Agent rates and memory\n\nMachine: {}  \nSource: {}  \nCommand: `cargo xtask bench agent` (ran `{cmd}`)\n\n{}{}{}{}",
        report::machine_line(),
        report::source_line(),
        events.markdown,
        processing.markdown,
        rules.markdown,
        memory.markdown
    );
    println!("{doc}");
    if args.write {
        let dir = report::results_dir();
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("agent-rates.md"), &doc)?;
        let json = serde_json::json!({ "flow_events": events.json, "processing": processing.json, "compile_and_apply": rules.json, "memory": memory.json });
        std::fs::write(dir.join("agent-rates.json"), serde_json::to_string_pretty(&json)?)?;
        report::bar_chart(
            &dir.join("agent-events.svg"),
            "Flow start events consumed per agent CPU-second",
            "k events / CPU-s",
            &events.bars,
        )?;
        report::bar_chart(
            &dir.join("rules-apply.svg"),
            &format!("{} policies, {} endpoints: seconds per step", args.policies, args.endpoints),
            "seconds",
            &rules.bars,
        )?;
        eprintln!("wrote {}", dir.display());
    }
    Ok(())
}
