//! Throughput across the bridge between two lab VMs: TCP bulk (iperf3, one stream) and
//! small UDP packets (backplane's generator, 60-byte frames), under several
//! configurations measured in one run.
//!
//! Every configuration of a suite gets a testbed of its own, built once: a worker
//! thread in a network namespace of its own (see `worker`) holding a bridge, two VMs,
//! an iperf3 server and the configuration (agent, nftables table and `br_netfilter`
//! switch, or attached programs). All testbeds of a suite live side by side, idle unless
//! measured, and are measured in short alternation: each round runs TCP on every
//! testbed in turn, then UDP on every testbed in turn, in an order that rotates each
//! round. A noisy shared machine then affects them alike; ratios are taken within a
//! round (each configuration against "nothing attached" of the same round) and their
//! median reported.
//!
//! Suites:
//! - `policy`: nothing attached; the backplane agent observing; the agent enforcing
//!   generated zone rule sets of N policies (default 10 and 1,000); an nftables rule
//!   set enforcing the same zones statefully through `br_netfilter`, at the same sizes.
//! - `attach`: per port kind (veth, tap), the data path attached as XDP generic + TC,
//!   XDP native + TC, or TC only (ingress and egress), beside nothing attached.
//!
//! The generator's ceiling (sending into a port that is in no bridge) is measured first.

#![expect(clippy::cast_precision_loss, reason = "packet counts far below 2^52 become rates")]

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use backplane_benches::{
    agent,
    datapath::{self, AttachMode, Loaded},
    isolation,
    netfilter::{self, NftTable, SysctlGuard},
    pktgen::{self, Rates, SendSpec, Stream},
    procfs, report,
    rulegen::{BenchTraffic, ZoneRuleSet},
    stats::{Summary, summarize},
    worker::NetnsWorker,
};
use backplane_lab::{ChildGuard, Lab, PortKind, Vm};
use clap::{Parser, ValueEnum};

const IPERF_PORT: u16 = 5201;
const UDP_PORT: u16 = 9000;
/// A UDP port no policy allows.
const DENIED_PORT: u16 = 9001;
const CLIENT_MAC: &str = "02:00:00:00:30:0a";
const SERVER_MAC: &str = "02:00:00:00:40:0a";
const NFT_TABLE: &str = "backplane_bench";
/// Frames sent to the denied port once per configuration.
const PROBE_FRAMES: u64 = 2_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Suite {
    Policy,
    Attach,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Veth,
    Tap,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Veth => "veth",
            Kind::Tap => "tap",
        }
    }

    fn port_kind(self) -> PortKind {
        match self {
            Kind::Veth => PortKind::Veth,
            Kind::Tap => PortKind::Tap,
        }
    }
}

#[derive(Parser)]
struct Args {
    /// Rounds; every configuration is measured once per round.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Length of each iperf3 run (plus 1 s of slow start left out).
    #[arg(long, default_value_t = 4)]
    tcp_seconds: u64,
    /// Length of each UDP window (after 1 s of warm-up).
    #[arg(long, default_value_t = 2)]
    udp_seconds: u64,
    /// Distinct UDP flows the generator cycles through.
    #[arg(long, default_value_t = 100)]
    udp_flows: u32,
    /// Rule set sizes (policies) for the enforcing configurations.
    #[arg(long, value_delimiter = ',', default_values_t = vec![10, 1000])]
    policies: Vec<usize>,
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Suite::Policy, Suite::Attach])]
    suites: Vec<Suite>,
    /// Port kinds of the attach suite.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Kind::Veth, Kind::Tap])]
    port_kinds: Vec<Kind>,
    /// Write results to benches/results (otherwise print only).
    #[arg(long)]
    write: bool,
}

/// One way of filtering the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Setup {
    Nothing,
    AgentObserve,
    AgentEnforce(usize),
    /// The same with `from_port` as generic XDP (`--ingress xdp-skb`), the default
    /// before TC ingress measured faster.
    AgentEnforceXdp(usize),
    Nft(usize),
    Attach(AttachMode),
}

impl Setup {
    fn label(&self) -> String {
        match self {
            Setup::Nothing => "nothing attached".into(),
            Setup::AgentObserve => "backplane, observe only".into(),
            Setup::AgentEnforce(n) => format!("backplane enforcing, {n} policies"),
            Setup::AgentEnforceXdp(n) => format!("backplane enforcing, {n} policies, --ingress xdp-skb"),
            Setup::Nft(n) => format!("nftables + br_netfilter, {n} policies"),
            Setup::Attach(mode) => mode.label().into(),
        }
    }

    fn short(&self) -> String {
        match self {
            Setup::Nothing => "none".into(),
            Setup::AgentObserve => "bp observe".into(),
            Setup::AgentEnforce(n) => format!("bp {n}"),
            Setup::AgentEnforceXdp(n) => format!("bp {n} xdp"),
            Setup::Nft(n) => format!("nft {n}"),
            Setup::Attach(AttachMode::XdpSkb) => "XDP skb".into(),
            Setup::Attach(AttachMode::XdpNative) => "XDP native".into(),
            Setup::Attach(AttachMode::TcOnly) => "TC only".into(),
        }
    }
}

/// What keeps a configuration in force; dropping it undoes it.
#[expect(dead_code, reason = "the fields are guards, held for their Drop")]
enum Active {
    Nothing,
    Agent(ChildGuard),
    Nft(NftTable),
    Attached(Loaded),
}

/// One testbed: two VMs on a bridge, an iperf3 server on one, and a configuration in
/// force. Lives on its worker thread, in its worker's network namespace.
struct Bed {
    // Field order is drop order: the configuration first, then its switches, the
    // server process, the VMs, the lab.
    active: Active,
    _sysctls: Vec<SysctlGuard>,
    _iperf_server: ChildGuard,
    client: Vm,
    server: Vm,
    lab: Lab,
    agent_binary: PathBuf,
}

impl Bed {
    fn new(kind: PortKind, setup: &Setup, agent_binary: &Path, agent_rules: bool) -> anyhow::Result<Self> {
        let lab = Lab::new("bp");
        // One /8 for both, so they talk directly; the rule sets split it into /24 zones.
        let add = |name: &str, ip: &str, mac: &str| match kind {
            PortKind::Tap => lab.add_tap_vm(name, ip, None, Some(mac)),
            _ => lab.add_veth_vm(name, ip, None, Some(mac)),
        };
        let client = add("client", "10.30.0.10/8", CLIENT_MAC);
        let server = add("server", "10.40.0.10/8", SERVER_MAC);
        let mut iperf_server = server.spawn(&["iperf3", "-s", "-p", &IPERF_PORT.to_string(), "--forceflush"]);
        if !iperf_server.wait_for_output("Server listening", Duration::from_secs(10)) {
            bail!("iperf3 server did not start: {}", iperf_server.output());
        }
        // Plain bridging unless nftables is the point: netfilter off for bridged frames.
        let sysctls = netfilter::bridge_netfilter(matches!(setup, Setup::Nft(_)))?;
        let rules = |n: usize| -> anyhow::Result<ZoneRuleSet> {
            let set = ZoneRuleSet::generate(n, 0, &BenchTraffic::default());
            agent::check_rules(&set.to_yaml())?;
            Ok(set)
        };
        let active = match setup {
            Setup::Nothing => Active::Nothing,
            Setup::AgentObserve => Active::Agent(agent::start(&lab, agent_binary, &[], None)),
            Setup::AgentEnforce(n) | Setup::AgentEnforceXdp(n) => {
                let dir = lab.work_dir().join(format!("rules-{n}"));
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("zones.yaml"), rules(*n)?.to_yaml())?;
                let extra: &[&str] =
                    if matches!(setup, Setup::AgentEnforceXdp(_)) { &["--ingress", "xdp-skb"] } else { &[] };
                Active::Agent(agent::start(&lab, agent_binary, extra, agent_rules.then_some(dir.as_path())))
            }
            Setup::Nft(n) => {
                Active::Nft(NftTable::load("inet", NFT_TABLE, &rules(*n)?.to_nft(NFT_TABLE, lab.bridge_name()))?)
            }
            Setup::Attach(mode) => {
                let ports = [client.host_port(), server.host_port()].map(|p| (ifindex(p), p.to_owned()));
                Active::Attached(datapath::attach(&ports, *mode)?)
            }
        };
        // Learned neighbours and bridge FDB entries both ways before anything is timed.
        if !client.ping(server.ip(), 2) || !server.ping(client.ip(), 1) {
            bail!("the VMs cannot reach each other under {}", setup.label());
        }
        Ok(Self {
            active,
            _sysctls: sysctls,
            _iperf_server: iperf_server,
            client,
            server,
            lab,
            agent_binary: agent_binary.to_owned(),
        })
    }

    fn agent_pid(&self) -> Option<u32> {
        match &self.active {
            Active::Agent(a) => Some(a.id()),
            _ => None,
        }
    }

    /// iperf3 from client to server: received bits/s and the sender's retransmissions.
    fn tcp(&self, seconds: u64) -> anyhow::Result<(f64, u64)> {
        let ip = self.server.ip().to_string();
        let (port, secs) = (IPERF_PORT.to_string(), seconds.to_string());
        let out = self.client.exec(&["iperf3", "-c", &ip, "-p", &port, "-t", &secs, "-O", "1", "-J"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
        if let Some(e) = json.get("error") {
            bail!("iperf3: {e}");
        }
        let end = &json["end"];
        let bps = end["sum_received"]["bits_per_second"].as_f64().context("no sum_received in iperf3 output")?;
        Ok((bps, end["sum_sent"]["retransmits"].as_u64().unwrap_or(0)))
    }

    fn udp_spec(&self, port: u16, flows: u32) -> SendSpec {
        SendSpec::from_vm(&self.client, self.server.mac(), self.server.ip(), port, flows)
    }

    /// The generator from client to server over `window` after 1 s of warm-up.
    fn udp(&self, flows: u32, window: Duration) -> anyhow::Result<UdpSample> {
        let drops0 = self.server.in_netns(procfs::udp_rcvbuf_errors)?;
        let cpu0 = self.agent_pid().map(procfs::cpu_seconds).transpose()?;
        let stream =
            Stream::start(self.udp_spec(UDP_PORT, flows), self.client.netns(), Some((self.server.netns(), UDP_PORT)))?;
        let rates = stream.measure(Duration::from_secs(1), window);
        stream.stop()?;
        let drops1 = self.server.in_netns(procfs::udp_rcvbuf_errors)?;
        let cpu1 = self.agent_pid().map(procfs::cpu_seconds).transpose()?;
        let secs = window.as_secs_f64() + 1.0;
        Ok(UdpSample {
            rates: rates?,
            socket_drops_per_second: drops1.saturating_sub(drops0) as f64 / secs,
            agent_cpu_share: cpu0.zip(cpu1).map(|(a, b)| (b - a) / (secs + 0.1)),
        })
    }

    /// Sends [`PROBE_FRAMES`] to a port no policy allows; returns how many arrived, and
    /// the agent's `dropped` counter afterwards.
    fn denied_probe(&self) -> anyhow::Result<(u64, Option<u64>)> {
        let mut spec = self.udp_spec(DENIED_PORT, 10);
        spec.max_frames = Some(PROBE_FRAMES);
        let stream = Stream::start(spec, self.client.netns(), Some((self.server.netns(), DENIED_PORT)))?;
        stream.wait_sender(Duration::from_secs(10));
        let (_, _, received) = stream.stop()?;
        let dropped = match self.agent_pid() {
            Some(_) => Some(agent::status_u64(
                &agent::status(&self.agent_binary, &self.lab.socket_path())?,
                &["counters", "dropped"],
            )),
            None => None,
        };
        Ok((received, dropped))
    }
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: c is a valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
struct UdpSample {
    rates: Rates,
    socket_drops_per_second: f64,
    /// The agent's CPU time over the stream's life, as a share of one core.
    agent_cpu_share: Option<f64>,
}

#[derive(Clone, Debug, serde::Serialize)]
struct Sample {
    suite: &'static str,
    port_kind: &'static str,
    setup: String,
    round: usize,
    tcp_bits_per_second: f64,
    tcp_retransmits: u64,
    udp: UdpSample,
}

#[derive(Clone, Debug, serde::Serialize)]
struct Probe {
    suite: &'static str,
    port_kind: &'static str,
    setup: String,
    delivered: u64,
    agent_dropped_counter: Option<u64>,
}

/// A testbed per setup, built side by side.
fn build_beds(kind: Kind, setups: &[Setup], agent_binary: &Path) -> anyhow::Result<Vec<(Setup, NetnsWorker<Bed>)>> {
    let agent_rules = agent::supports_rules(agent_binary);
    let mut beds = Vec::new();
    for setup in setups {
        isolation::check_interrupted()?;
        eprintln!("building testbed: {} ({})", setup.label(), kind.name());
        let (s, b) = (setup.clone(), agent_binary.to_owned());
        let worker = NetnsWorker::spawn(&format!("bed-{}", setup.short()), move || {
            Bed::new(kind.port_kind(), &s, &b, agent_rules)
        })?;
        beds.push((setup.clone(), worker));
    }
    Ok(beds)
}

/// Measures every testbed once per round: TCP on each in turn, then UDP on each in turn,
/// the order rotating every round. Then one denied probe per testbed.
fn run_suite(
    suite: &'static str,
    kind: Kind,
    setups: &[Setup],
    args: &Args,
    agent_binary: &Path,
) -> anyhow::Result<(Vec<Sample>, Vec<Probe>)> {
    let beds = build_beds(kind, setups, agent_binary)?;
    let n = beds.len();
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        let order: Vec<usize> = (0..n).map(|i| (i + round) % n).collect();
        let mut tcp = vec![(0.0, 0); n];
        for &i in &order {
            isolation::check_interrupted()?;
            let secs = args.tcp_seconds;
            tcp[i] = beds[i].1.run(move |b| b.tcp(secs)).with_context(|| format!("TCP under {}", beds[i].0.label()))?;
        }
        for &i in &order {
            isolation::check_interrupted()?;
            let (flows, window) = (args.udp_flows, Duration::from_secs(args.udp_seconds));
            let udp = beds[i]
                .1
                .run(move |b| b.udp(flows, window))
                .with_context(|| format!("UDP under {}", beds[i].0.label()))?;
            eprintln!(
                "[{suite}/{}] round {}/{}: {:<40} TCP {:5.2} Gbit/s ({} retr.), UDP {:4.0} kpps",
                kind.name(),
                round + 1,
                args.rounds,
                beds[i].0.label(),
                tcp[i].0 / 1e9,
                tcp[i].1,
                udp.rates.received_pps / 1e3
            );
            samples.push(Sample {
                suite,
                port_kind: kind.name(),
                setup: beds[i].0.label(),
                round,
                tcp_bits_per_second: tcp[i].0,
                tcp_retransmits: tcp[i].1,
                udp,
            });
        }
    }
    let mut probes = Vec::new();
    for (setup, bed) in &beds {
        let (delivered, agent_dropped_counter) = bed.run(|b| b.denied_probe())?;
        eprintln!("[{suite}/{}] {}: denied probe delivered {delivered}/{PROBE_FRAMES}", kind.name(), setup.label());
        probes.push(Probe { suite, port_kind: kind.name(), setup: setup.label(), delivered, agent_dropped_counter });
    }
    Ok((samples, probes))
}

/// One setup's results: medians of the absolute numbers and of the per-round ratios to
/// "nothing attached".
struct Row {
    setup: Setup,
    tcp: Summary,
    udp_rx: Summary,
    tcp_ratio: Summary,
    udp_ratio: Summary,
    agent_cpu: Summary,
    probe: Option<u64>,
}

fn rows(samples: &[Sample], probes: &[Probe], suite: &str, kind: &str, setups: &[Setup]) -> Vec<Row> {
    let of = |label: &str| -> Vec<&Sample> {
        samples.iter().filter(|s| s.suite == suite && s.port_kind == kind && s.setup == label).collect()
    };
    let base = of(&Setup::Nothing.label());
    let base_in = |round: usize| base.iter().find(|b| b.round == round);
    setups
        .iter()
        .map(|setup| {
            let mine = of(&setup.label());
            let ratio =
                |f: fn(&Sample) -> f64| summarize(mine.iter().filter_map(|s| base_in(s.round).map(|b| f(s) / f(b))));
            Row {
                setup: setup.clone(),
                tcp: summarize(mine.iter().map(|s| s.tcp_bits_per_second / 1e9)),
                udp_rx: summarize(mine.iter().map(|s| s.udp.rates.received_pps / 1e3)),
                tcp_ratio: ratio(|s| s.tcp_bits_per_second),
                udp_ratio: ratio(|s| s.udp.rates.received_pps),
                agent_cpu: summarize(mine.iter().filter_map(|s| s.udp.agent_cpu_share.map(|c| 100.0 * c))),
                probe: probes
                    .iter()
                    .find(|p| p.suite == suite && p.port_kind == kind && p.setup == setup.label())
                    .map(|p| p.delivered),
            }
        })
        .collect()
}

fn pct(s: &Summary) -> String {
    if s.count == 0 {
        return "-".into();
    }
    format!("{:.0}% ({:.0}-{:.0})", 100.0 * s.median, 100.0 * s.min, 100.0 * s.max)
}

fn table(rows: &[Row], with_agent_cpu: bool) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                r.setup.label(),
                r.tcp.cell(2),
                pct(&r.tcp_ratio),
                r.udp_rx.cell(0),
                pct(&r.udp_ratio),
                r.probe.map_or_else(|| "-".into(), |p| format!("{p} / {PROBE_FRAMES}")),
            ];
            if with_agent_cpu {
                row.push(if r.agent_cpu.count == 0 { "-".into() } else { format!("{:.1}%", r.agent_cpu.median) });
            }
            row
        })
        .collect();
    let mut header = vec![
        "configuration",
        "TCP Gbit/s",
        "TCP vs nothing (same round)",
        "UDP received kpps",
        "UDP vs nothing (same round)",
        "denied probe delivered",
    ];
    if with_agent_cpu {
        header.push("agent CPU during UDP");
    }
    report::markdown_table(&header, &body)
}

fn goal(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Per-round ratios `a / b` of a measure between two setups of the policy suite.
fn paired(samples: &[Sample], a: &Setup, b: &Setup, f: fn(&Sample) -> f64) -> Summary {
    let of = |setup: &Setup| -> Vec<&Sample> {
        samples.iter().filter(|s| s.suite == "policy" && s.setup == setup.label()).collect()
    };
    let (xs, ys) = (of(a), of(b));
    summarize(xs.iter().filter_map(|x| ys.iter().find(|y| y.round == x.round).map(|y| f(x) / f(y))))
}

fn tcp_of(s: &Sample) -> f64 {
    s.tcp_bits_per_second
}

fn udp_of(s: &Sample) -> f64 {
    s.udp.rates.received_pps
}

/// The goals of the issue, judged from the policy suite by medians of same-round ratios.
fn goals(samples: &[Sample], policies: &[usize]) -> String {
    let mut out = String::new();
    let line = |out: &mut String, what: &str, r: &Summary, want: f64, unit: &str| {
        let (v, lo, hi) = if unit == "%" {
            (format!("{:.0}%", 100.0 * r.median), format!("{:.0}", 100.0 * r.min), format!("{:.0}", 100.0 * r.max))
        } else {
            (format!("{:.2}x", r.median), format!("{:.2}", r.min), format!("{:.2}", r.max))
        };
        let goal_text = if unit == "%" { format!("{:.0}%", 100.0 * want) } else { format!("{want}x") };
        let _ = writeln!(out, "- {what} = {v} (rounds: {lo}-{hi}; goal >= {goal_text}): {}", goal(r.median >= want));
    };
    for &n in policies {
        let bp = Setup::AgentEnforce(n);
        if r_count(samples, &bp) == 0 {
            continue;
        }
        line(
            &mut out,
            &format!("{n} policies: backplane TCP vs nothing attached"),
            &paired(samples, &bp, &Setup::Nothing, tcp_of),
            0.9,
            "%",
        );
        line(
            &mut out,
            &format!("{n} policies: backplane UDP small packets vs nothing attached"),
            &paired(samples, &bp, &Setup::Nothing, udp_of),
            0.8,
            "%",
        );
        if r_count(samples, &Setup::Nft(n)) > 0 {
            let want = if n >= 1000 { 2.0 } else { 1.0 };
            line(
                &mut out,
                &format!("{n} policies: backplane / nftables, TCP"),
                &paired(samples, &bp, &Setup::Nft(n), tcp_of),
                want,
                "x",
            );
            line(
                &mut out,
                &format!("{n} policies: backplane / nftables, UDP"),
                &paired(samples, &bp, &Setup::Nft(n), udp_of),
                want,
                "x",
            );
        }
    }
    out
}

fn r_count(samples: &[Sample], setup: &Setup) -> usize {
    samples.iter().filter(|s| s.suite == "policy" && s.setup == setup.label()).count()
}

fn bars(rows: &[Row], prefix: &str, f: impl Fn(&Row) -> f64) -> Vec<(String, f64)> {
    rows.iter().map(|r| (format!("{prefix}{}", r.setup.short()), f(r))).collect()
}

/// The generator's ceiling per port kind, measured `times` times: (kind, frames
/// accepted by the VM's eth0 in kpps, frames received by the host port in kpps).
fn measure_ceilings(args: &Args, times: usize) -> anyhow::Result<Vec<(&'static str, Summary, Summary)>> {
    let lab = Lab::new("bp");
    let mut out = Vec::new();
    for kind in [Kind::Veth, Kind::Tap] {
        let mut runs = Vec::new();
        for _ in 0..times {
            let window = Duration::from_secs(args.udp_seconds);
            let r = pktgen::ceiling(&lab, kind.port_kind(), args.udp_flows, Duration::from_secs(1), window)?;
            eprintln!(
                "generator ceiling ({}): {:.0} kpps accepted, {:.0} kpps crossed the link",
                kind.name(),
                r.sent_pps / 1e3,
                r.probe_pps / 1e3
            );
            runs.push(r);
        }
        out.push((
            kind.name(),
            summarize(runs.iter().map(|r| r.sent_pps / 1e3)),
            summarize(runs.iter().map(|r| r.probe_pps / 1e3)),
        ));
    }
    Ok(out)
}

fn policy_setups(args: &Args) -> Vec<Setup> {
    [Setup::Nothing, Setup::AgentObserve]
        .into_iter()
        .chain(args.policies.iter().map(|&n| Setup::AgentEnforce(n)))
        .chain(args.policies.first().map(|&n| Setup::AgentEnforceXdp(n)))
        .chain(args.policies.iter().map(|&n| Setup::Nft(n)))
        .collect()
}

const ATTACH_SETUPS: [Setup; 4] = [
    Setup::Nothing,
    Setup::Attach(AttachMode::XdpSkb),
    Setup::Attach(AttachMode::XdpNative),
    Setup::Attach(AttachMode::TcOnly),
];

/// Everything measured.
struct Results {
    ceilings: Vec<(&'static str, Summary, Summary)>,
    samples: Vec<Sample>,
    probes: Vec<Probe>,
    agent_rules: bool,
    load_before: String,
    load_after: String,
}

/// The Markdown report.
fn document(args: &Args, r: &Results) -> String {
    let mut doc = String::new();
    let cmd = std::env::args().collect::<Vec<_>>().join(" ");
    let _ = writeln!(doc, "# Throughput across the bridge\n");
    let _ = writeln!(
        doc,
        "Machine: {}  \nSource: {}  \nCommand: `cargo xtask bench throughput` (ran `{cmd}`)  \nLoad average before / after: {} / {}\n",
        report::machine_line(),
        report::source_line(),
        r.load_before,
        r.load_after
    );
    let _ = writeln!(
        doc,
        "Two VMs (network namespaces) on one Linux bridge. TCP: iperf3, one stream, {} s (+1 s of slow start omitted), client -> server. \
         UDP: backplane's generator (AF_PACKET, PACKET_QDISC_BYPASS, sendmmsg batches of {}), 60-byte frames over {} flows, \
         1 s of warm-up then a {} s window; \"received\" counts datagrams read by a UDP socket (recvmmsg) in the server VM. \
         The sender's system call carries each frame through the whole path (VM link, bridge, programs, firewall, the server's socket queue) \
         on its own CPU, so the received rate is the rate that path sustains on one core.\n\n\
         Each configuration has a testbed of its own (bridge, VMs, configuration) in a network namespace of its own, all built before the \
         first measurement; {} rounds, each measuring TCP on every testbed in turn and then UDP on every testbed in turn, the order \
         rotating each round. The machine is shared and noisy, so configurations are compared by the ratio to \"nothing attached\" \
         of the same round (median and range of those ratios); the absolute columns are medians and ranges over the rounds. \
         The denied probe sends {PROBE_FRAMES} frames to UDP port {DENIED_PORT}, which no policy allows, once per testbed after the rounds.\n",
        args.tcp_seconds,
        pktgen::DEFAULT_BATCH,
        args.udp_flows,
        args.udp_seconds,
        args.rounds
    );
    let _ = writeln!(doc, "## Generator ceiling\n");
    let _ = writeln!(
        doc,
        "Sending from a VM whose host port is in no bridge (frames cross the VM's link and are discarded by the host side):\n"
    );
    let ceiling_rows: Vec<Vec<String>> =
        r.ceilings.iter().map(|(k, sent, rx)| vec![(*k).to_owned(), sent.cell(0), rx.cell(0)]).collect();
    let _ = writeln!(
        doc,
        "{}",
        report::markdown_table(
            &["port kind", "accepted by the VM's eth0, kpps", "received by the host port, kpps"],
            &ceiling_rows
        )
    );
    let _ = writeln!(
        doc,
        "A tap VM of the lab is fed by a userspace forwarder thread (one read and one write per frame, as QEMU without vhost-net), which \
         bounds every tap measurement below.\n"
    );
    if args.suites.contains(&Suite::Policy) {
        let policy_rows = rows(&r.samples, &r.probes, "policy", "veth", &policy_setups(args));
        let _ = writeln!(doc, "## Filtering the bridge: backplane vs nftables (veth ports)\n");
        if r.agent_rules {
            let _ = writeln!(
                doc,
                "backplane: `backplane run --rules <dir> --detach-on-exit` (TC ingress + TC egress, the defaults; one row with `--ingress xdp-skb`), a generated rule set with the client \
                 in zone `web`, the server in zone `db` and the policy allowing the benchmark in the middle of the list; `default_inter_zone: deny`.\n"
            );
        } else {
            let _ = writeln!(doc, "**The agent had no `--rules` option: the 'enforcing' rows ran in observe mode.**\n");
        }
        let _ = writeln!(
            doc,
            "nftables: br_netfilter with `net.bridge.bridge-nf-call-iptables=1` (0 in every other testbed), an `inet` table whose forward chain \
             accepts `ct state established,related`, decides new connections with one lookup in concatenated interval sets \
             (`ip saddr . ip daddr . meta l4proto . th dport`, ICMP and intra-zone by address pair) generated from the same zones and policies, \
             and drops the rest.\n"
        );
        let _ = writeln!(doc, "{}", table(&policy_rows, true));
        let _ = writeln!(doc, "### Goals\n\n{}", goals(&r.samples, &args.policies));
    }
    if args.suites.contains(&Suite::Attach) {
        let _ = writeln!(doc, "## Where to attach: XDP generic vs XDP native vs TC\n");
        let _ = writeln!(
            doc,
            "The data path loaded and attached by the benchmark itself (no agent, observe mode, nobody draining the event ring) to both VMs' \
             host ports.\n"
        );
        for kind in &args.port_kinds {
            let name = kind.name();
            let _ = writeln!(
                doc,
                "### {name} ports\n\n{}",
                table(&rows(&r.samples, &r.probes, "attach", name, &ATTACH_SETUPS), false)
            );
        }
    }
    doc
}

fn write_results(args: &Args, doc: &str, r: &Results) -> anyhow::Result<()> {
    let dir = report::results_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("throughput.md"), doc)?;
    let json = serde_json::json!({ "samples": r.samples, "denied_probes": r.probes });
    std::fs::write(dir.join("throughput.json"), serde_json::to_string_pretty(&json)?)?;
    if args.suites.contains(&Suite::Policy) {
        let policy_rows = rows(&r.samples, &r.probes, "policy", "veth", &policy_setups(args));
        let pct = |s: &Summary| 100.0 * s.median;
        report::bar_chart(
            &dir.join("throughput-tcp.svg"),
            "TCP across the bridge, % of nothing attached (median of same-round ratios)",
            "%",
            &bars(&policy_rows, "", |r| pct(&r.tcp_ratio)),
        )?;
        report::bar_chart(
            &dir.join("throughput-udp.svg"),
            "60-byte UDP received, % of nothing attached (median of same-round ratios)",
            "%",
            &bars(&policy_rows, "", |r| pct(&r.udp_ratio)),
        )?;
    }
    if args.suites.contains(&Suite::Attach) {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for kind in &args.port_kinds {
            let name = kind.name();
            let r = rows(&r.samples, &r.probes, "attach", name, &ATTACH_SETUPS);
            tcp.extend(bars(&r, &format!("{name}: "), |r| 100.0 * r.tcp_ratio.median));
            udp.extend(bars(&r, &format!("{name}: "), |r| 100.0 * r.udp_ratio.median));
        }
        report::bar_chart(&dir.join("attach-tcp.svg"), "TCP by attach mode, % of nothing attached", "%", &tcp)?;
        report::bar_chart(&dir.join("attach-udp.svg"), "60-byte UDP by attach mode, % of nothing attached", "%", &udp)?;
    }
    eprintln!("wrote {}", dir.display());
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    isolation::install_interrupt_handler();
    isolation::enter_private_netns()?;
    netfilter::ensure_br_netfilter()?;
    for tool in ["iperf3", "nft"] {
        if std::process::Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is not installed (cargo xtask setup installs it)");
        }
    }
    let agent_binary = agent::binary()?;
    let agent_rules = agent::supports_rules(&agent_binary);
    if !agent_rules {
        eprintln!(
            "warning: {} has no --rules: the 'enforcing' configurations run in observe mode",
            agent_binary.display()
        );
    }
    let load_before = load_average();
    let ceilings = measure_ceilings(&args, 3)?;
    let mut samples = Vec::new();
    let mut probes = Vec::new();
    if args.suites.contains(&Suite::Policy) {
        let (s, p) = run_suite("policy", Kind::Veth, &policy_setups(&args), &args, &agent_binary)?;
        samples.extend(s);
        probes.extend(p);
    }
    if args.suites.contains(&Suite::Attach) {
        for kind in &args.port_kinds {
            let (s, p) = run_suite("attach", *kind, &ATTACH_SETUPS, &args, &agent_binary)?;
            samples.extend(s);
            probes.extend(p);
        }
    }
    let results = Results { ceilings, samples, probes, agent_rules, load_before, load_after: load_average() };
    let doc = document(&args, &results);
    println!("{doc}");
    if args.write {
        write_results(&args, &doc, &results)?;
    }
    Ok(())
}
