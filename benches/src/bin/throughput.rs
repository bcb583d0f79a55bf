//! Throughput across the bridge between two lab VMs: TCP bulk (iperf3, one stream) and
//! small UDP packets (backplane's generator, 60-byte frames), under several
//! configurations measured in one run, round-robin (the order rotates every round), so
//! that a noisy shared machine affects them alike. Medians over the rounds are reported.
//!
//! Suites:
//! - `policy`: nothing attached; the backplane agent observing; the agent enforcing
//!   generated zone rule sets of N policies (default 10 and 1,000); an nftables rule
//!   set enforcing the same zones statefully through `br_netfilter`, at the same sizes.
//! - `attach`: per port kind (veth, tap), the data path attached as XDP generic + TC,
//!   XDP native + TC, or TC only (ingress and egress), beside nothing attached.
//!
//! The generator's ceiling (sending into a port that is in no bridge) is measured first.
//! The whole run happens in a private network namespace (see `isolation`).

#![expect(clippy::cast_precision_loss, reason = "packet counts far below 2^52 become rates")]

use std::{
    collections::BTreeMap,
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
/// Frames sent to the denied port in the first round of each configuration.
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

#[derive(Parser)]
struct Args {
    /// Rounds; every configuration is measured once per round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Length of each iperf3 run (plus 1 s of slow start left out).
    #[arg(long, default_value_t = 5)]
    tcp_seconds: u64,
    /// Length of each UDP window (after 1 s of warm-up).
    #[arg(long, default_value_t = 3)]
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
    Nft(usize),
    Attach(AttachMode),
}

impl Setup {
    fn label(&self) -> String {
        match self {
            Setup::Nothing => "nothing attached".into(),
            Setup::AgentObserve => "backplane, observe only".into(),
            Setup::AgentEnforce(n) => format!("backplane enforcing, {n} policies"),
            Setup::Nft(n) => format!("nftables + br_netfilter, {n} policies"),
            Setup::Attach(mode) => mode.label().into(),
        }
    }

    fn short(&self) -> String {
        match self {
            Setup::Nothing => "none".into(),
            Setup::AgentObserve => "bp observe".into(),
            Setup::AgentEnforce(n) => format!("bp {n}"),
            Setup::Nft(n) => format!("nft {n}"),
            Setup::Attach(AttachMode::XdpSkb) => "XDP skb".into(),
            Setup::Attach(AttachMode::XdpNative) => "XDP native".into(),
            Setup::Attach(AttachMode::TcOnly) => "TC only".into(),
        }
    }
}

/// What a configuration keeps alive while it is measured; dropping it undoes it.
#[expect(dead_code, reason = "the fields are guards, held for their Drop")]
enum Active {
    Nothing,
    Agent(ChildGuard),
    Nft(NftTable),
    Attached(Loaded),
}

/// Two VMs on a bridge, an iperf3 server on one, rule sets written out.
struct Bench {
    // Field order is drop order: the server process, the VMs, then the lab.
    _iperf_server: ChildGuard,
    client: Vm,
    server: Vm,
    lab: Lab,
    rule_dirs: BTreeMap<usize, PathBuf>,
    rule_sets: BTreeMap<usize, ZoneRuleSet>,
    agent_binary: PathBuf,
    agent_rules: bool,
}

impl Bench {
    fn new(kind: PortKind, policies: &[usize], agent_binary: &Path) -> anyhow::Result<Self> {
        let lab = Lab::new("bp");
        // One /8 for both, so they talk directly; the rule sets split it into /24 zones.
        let add = |name: &str, ip: &str, mac: &str| match kind {
            PortKind::Tap => lab.add_tap_vm(name, ip, None, Some(mac)),
            _ => lab.add_veth_vm(name, ip, None, Some(mac)),
        };
        let client = add("client", "10.30.0.10/8", CLIENT_MAC);
        let server = add("server", "10.40.0.10/8", SERVER_MAC);
        // Learned neighbours and bridge FDB entries both ways before anything is timed.
        if !client.ping(server.ip(), 2) || !server.ping(client.ip(), 1) {
            bail!("the VMs cannot reach each other");
        }
        let mut iperf_server = server.spawn(&["iperf3", "-s", "-p", &IPERF_PORT.to_string(), "--forceflush"]);
        if !iperf_server.wait_for_output("Server listening", Duration::from_secs(10)) {
            bail!("iperf3 server did not start: {}", iperf_server.output());
        }
        let traffic = BenchTraffic::default();
        let mut rule_dirs = BTreeMap::new();
        let mut rule_sets = BTreeMap::new();
        for &n in policies {
            let set = ZoneRuleSet::generate(n, 0, &traffic);
            let yaml = set.to_yaml();
            agent::check_rules(&yaml)?;
            let dir = lab.work_dir().join(format!("rules-{n}"));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("zones.yaml"), yaml)?;
            rule_dirs.insert(n, dir);
            rule_sets.insert(n, set);
        }
        Ok(Self {
            _iperf_server: iperf_server,
            client,
            server,
            lab,
            rule_dirs,
            rule_sets,
            agent_binary: agent_binary.to_owned(),
            agent_rules: agent::supports_rules(agent_binary),
        })
    }

    fn activate(&self, setup: &Setup) -> anyhow::Result<(Active, Vec<SysctlGuard>)> {
        // Plain bridging unless nftables is the point: netfilter off for bridged frames.
        let netfilter_off = || netfilter::bridge_netfilter(false);
        Ok(match setup {
            Setup::Nothing => (Active::Nothing, netfilter_off()?),
            Setup::AgentObserve => {
                (Active::Agent(agent::start(&self.lab, &self.agent_binary, &[], None)), netfilter_off()?)
            }
            Setup::AgentEnforce(n) => {
                let rules = self.agent_rules.then(|| self.rule_dirs[n].as_path());
                (Active::Agent(agent::start(&self.lab, &self.agent_binary, &[], rules)), netfilter_off()?)
            }
            Setup::Nft(n) => {
                let sysctls = netfilter::bridge_netfilter(true)?;
                let table =
                    NftTable::load("inet", NFT_TABLE, &self.rule_sets[n].to_nft(NFT_TABLE, self.lab.bridge_name()))?;
                (Active::Nft(table), sysctls)
            }
            Setup::Attach(mode) => {
                let ports = [self.client.host_port(), self.server.host_port()].map(|p| (ifindex(p), p.to_owned()));
                (Active::Attached(datapath::attach(&ports, *mode)?), netfilter_off()?)
            }
        })
    }

    /// iperf3 from client to server: received bits/s and the sender's retransmissions.
    fn tcp(&self, seconds: u64) -> anyhow::Result<(f64, u64)> {
        let out = self.client.exec(&[
            "iperf3",
            "-c",
            &self.server.ip().to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &seconds.to_string(),
            "-O",
            "1",
            "-J",
        ]);
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

    /// The generator from client to server: rates over the window, and datagrams the
    /// server's socket dropped per second (receive buffer full).
    fn udp(&self, flows: u32, window: Duration) -> anyhow::Result<(Rates, f64)> {
        let before = self.server.in_netns(procfs::udp_rcvbuf_errors)?;
        let stream =
            Stream::start(self.udp_spec(UDP_PORT, flows), self.client.netns(), Some((self.server.netns(), UDP_PORT)))?;
        let rates = stream.measure(Duration::from_secs(1), window);
        stream.stop()?;
        let after = self.server.in_netns(procfs::udp_rcvbuf_errors)?;
        let secs = window.as_secs_f64() + 1.0;
        Ok((rates?, after.saturating_sub(before) as f64 / secs))
    }

    /// Sends [`PROBE_FRAMES`] to a port no policy allows; returns how many arrived.
    fn denied_probe(&self) -> anyhow::Result<u64> {
        let mut spec = self.udp_spec(DENIED_PORT, 10);
        spec.max_frames = Some(PROBE_FRAMES);
        let stream = Stream::start(spec, self.client.netns(), Some((self.server.netns(), DENIED_PORT)))?;
        stream.wait_sender(Duration::from_secs(10));
        let (_, _, received) = stream.stop()?;
        Ok(received)
    }
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: c is a valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

#[derive(Clone, Debug, serde::Serialize)]
struct Sample {
    suite: &'static str,
    port_kind: &'static str,
    setup: String,
    round: usize,
    tcp_bits_per_second: f64,
    tcp_retransmits: u64,
    udp: Rates,
    udp_socket_drops_per_second: f64,
    denied_probe_delivered: Option<u64>,
    agent_dropped: Option<u64>,
}

/// Measures every setup once per round on `bench`, rotating the order.
fn run_suite(
    bench: &Bench,
    suite: &'static str,
    port_kind: &'static str,
    setups: &[Setup],
    args: &Args,
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        for i in 0..setups.len() {
            isolation::check_interrupted()?;
            let setup = &setups[(i + round) % setups.len()];
            eprintln!("[{suite}/{port_kind}] round {}/{}: {}", round + 1, args.rounds, setup.label());
            let (active, _sysctls) = bench.activate(setup).with_context(|| format!("set up {}", setup.label()))?;
            if !bench.client.ping(bench.server.ip(), 1) {
                bail!("{}: the client cannot ping the server", setup.label());
            }
            let (tcp_bps, retransmits) =
                bench.tcp(args.tcp_seconds).with_context(|| format!("TCP under {}", setup.label()))?;
            let (udp, socket_drops) = bench
                .udp(args.udp_flows, Duration::from_secs(args.udp_seconds))
                .with_context(|| format!("UDP under {}", setup.label()))?;
            let probe = if round == 0 { Some(bench.denied_probe()?) } else { None };
            let agent_dropped = match &active {
                Active::Agent(_) => Some(agent::status_u64(
                    &agent::status(&bench.agent_binary, &bench.lab.socket_path())?,
                    &["counters", "dropped"],
                )),
                _ => None,
            };
            eprintln!(
                "    TCP {:.2} Gbit/s ({retransmits} retr.), UDP sent {:.0} kpps, received {:.0} kpps{}",
                tcp_bps / 1e9,
                udp.sent_pps / 1e3,
                udp.received_pps / 1e3,
                probe.map(|p| format!(", denied probe delivered {p}/{PROBE_FRAMES}")).unwrap_or_default()
            );
            samples.push(Sample {
                suite,
                port_kind,
                setup: setup.label(),
                round,
                tcp_bits_per_second: tcp_bps,
                tcp_retransmits: retransmits,
                udp,
                udp_socket_drops_per_second: socket_drops,
                denied_probe_delivered: probe,
                agent_dropped,
            });
            drop(active);
        }
    }
    Ok(samples)
}

/// Medians of one setup's samples.
struct Row {
    setup: Setup,
    tcp: Summary,
    udp_rx: Summary,
    udp_tx: Summary,
    probe: Option<u64>,
}

fn rows(samples: &[Sample], suite: &str, kind: &str, setups: &[Setup]) -> Vec<Row> {
    setups
        .iter()
        .map(|setup| {
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.suite == suite && s.port_kind == kind && s.setup == setup.label())
                .collect();
            Row {
                setup: setup.clone(),
                tcp: summarize(mine.iter().map(|s| s.tcp_bits_per_second / 1e9)),
                udp_rx: summarize(mine.iter().map(|s| s.udp.received_pps / 1e3)),
                udp_tx: summarize(mine.iter().map(|s| s.udp.sent_pps / 1e3)),
                probe: mine.iter().find_map(|s| s.denied_probe_delivered),
            }
        })
        .collect()
}

fn table(rows: &[Row]) -> String {
    let base = rows.iter().find(|r| r.setup == Setup::Nothing);
    let pct = |v: f64, b: Option<f64>| b.map_or_else(|| "-".into(), |b| format!("{:.0}%", 100.0 * v / b));
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.setup.label(),
                r.tcp.cell(2),
                pct(r.tcp.median, base.map(|b| b.tcp.median)),
                r.udp_rx.cell(0),
                pct(r.udp_rx.median, base.map(|b| b.udp_rx.median)),
                r.udp_tx.cell(0),
                r.probe.map_or_else(|| "-".into(), |p| format!("{p} / {PROBE_FRAMES}")),
            ]
        })
        .collect();
    report::markdown_table(
        &[
            "configuration",
            "TCP Gbit/s median (min-max)",
            "TCP vs nothing",
            "UDP received kpps median (min-max)",
            "UDP vs nothing",
            "UDP sent kpps",
            "denied probe delivered",
        ],
        &body,
    )
}

fn goal(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// The goals of the issue, judged from the policy suite's medians.
fn goals(rows: &[Row], policies: &[usize]) -> String {
    let mut out = String::new();
    let find = |s: &Setup| rows.iter().find(|r| &r.setup == s);
    let Some(base) = find(&Setup::Nothing) else { return out };
    for &n in policies {
        let (Some(bp), nft) = (find(&Setup::AgentEnforce(n)), find(&Setup::Nft(n))) else { continue };
        let tcp = bp.tcp.median / base.tcp.median;
        let udp = bp.udp_rx.median / base.udp_rx.median;
        let _ = writeln!(
            out,
            "- {n} policies: backplane TCP = {:.0}% of nothing attached (goal >= 90%): {}",
            100.0 * tcp,
            goal(tcp >= 0.9)
        );
        let _ = writeln!(
            out,
            "- {n} policies: backplane UDP small packets = {:.0}% of nothing attached (goal >= 80%): {}",
            100.0 * udp,
            goal(udp >= 0.8)
        );
        if let Some(nft) = nft {
            let want = if n >= 1000 { 2.0 } else { 1.0 };
            let t = bp.tcp.median / nft.tcp.median;
            let u = bp.udp_rx.median / nft.udp_rx.median;
            let _ = writeln!(
                out,
                "- {n} policies: backplane / nftables TCP = {t:.2}x (goal >= {want}x): {}",
                goal(t >= want)
            );
            let _ = writeln!(
                out,
                "- {n} policies: backplane / nftables UDP = {u:.2}x (goal >= {want}x): {}",
                goal(u >= want)
            );
        }
    }
    out
}

fn bars(rows: &[Row], prefix: &str, f: impl Fn(&Row) -> f64) -> Vec<(String, f64)> {
    rows.iter().map(|r| (format!("{prefix}{}", r.setup.short()), f(r))).collect()
}

/// The generator's ceiling per port kind, measured `times` times: (kind, frames
/// accepted by the VM's eth0 in kpps, frames received by the host port in kpps).
fn measure_ceilings(args: &Args, times: usize) -> anyhow::Result<Vec<(&'static str, Summary, Summary)>> {
    let lab = Lab::new("bp");
    let mut out = Vec::new();
    for (kind, name) in [(PortKind::Veth, "veth"), (PortKind::Tap, "tap")] {
        let mut runs = Vec::new();
        for _ in 0..times {
            let r = pktgen::ceiling(
                &lab,
                kind,
                args.udp_flows,
                Duration::from_secs(1),
                Duration::from_secs(args.udp_seconds),
            )?;
            eprintln!(
                "generator ceiling ({name}): {:.0} kpps accepted, {:.0} kpps crossed the link",
                r.sent_pps / 1e3,
                r.probe_pps / 1e3
            );
            runs.push(r);
        }
        out.push((
            name,
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
        .chain(args.policies.iter().map(|&n| Setup::Nft(n)))
        .collect()
}

const ATTACH_SETUPS: [Setup; 4] = [
    Setup::Nothing,
    Setup::Attach(AttachMode::XdpSkb),
    Setup::Attach(AttachMode::XdpNative),
    Setup::Attach(AttachMode::TcOnly),
];

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Veth => "veth",
        Kind::Tap => "tap",
    }
}

/// The Markdown report.
fn document(args: &Args, ceilings: &[(&str, Summary, Summary)], samples: &[Sample], agent_rules: bool) -> String {
    let mut doc = String::new();
    let cmd = std::env::args().collect::<Vec<_>>().join(" ");
    let _ = writeln!(doc, "# Throughput across the bridge\n");
    let _ = writeln!(
        doc,
        "Machine: {}  \nSource: {}  \nCommand: `cargo xtask bench throughput` (ran `{cmd}`)\n",
        report::machine_line(),
        report::source_line()
    );
    let _ = writeln!(
        doc,
        "Two VMs (network namespaces) on one Linux bridge. TCP: iperf3, one stream, {} s (+1 s of slow start omitted), client -> server. \
         UDP: backplane's generator (AF_PACKET, PACKET_QDISC_BYPASS, sendmmsg batches of {}), 60-byte frames over {} flows, \
         1 s warm-up then a {} s window; \"received\" counts datagrams read by a UDP socket (recvmmsg) in the server VM. \
         {} rounds, configurations interleaved (the order rotates each round); medians with (min-max). \
         The denied probe sends {PROBE_FRAMES} frames to UDP port {DENIED_PORT}, which no policy allows (first round only).\n",
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
        ceilings.iter().map(|(k, sent, rx)| vec![(*k).to_owned(), sent.cell(0), rx.cell(0)]).collect();
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
        let policy_rows = rows(samples, "policy", "veth", &policy_setups(args));
        let _ = writeln!(doc, "## Filtering the bridge: backplane vs nftables (veth ports)\n");
        if agent_rules {
            let _ = writeln!(
                doc,
                "backplane: `backplane run --rules <dir> --detach-on-exit` (XDP generic + TC egress, the defaults), a generated rule set with the client in zone `web`, \
                 the server in zone `db` and the policy allowing the benchmark in the middle of the list; `default_inter_zone: deny`.\n"
            );
        } else {
            let _ = writeln!(doc, "**The agent had no `--rules` option: the 'enforcing' rows ran in observe mode.**\n");
        }
        let _ = writeln!(
            doc,
            "nftables: br_netfilter with `net.bridge.bridge-nf-call-iptables=1` (0 in every other configuration), an `inet` table whose forward chain \
             accepts `ct state established,related`, decides new connections with one lookup in concatenated interval sets \
             (`ip saddr . ip daddr . meta l4proto . th dport`, ICMP and intra-zone by address pair) generated from the same zones and policies, and drops the rest.\n"
        );
        let _ = writeln!(doc, "{}", table(&policy_rows));
        let _ = writeln!(doc, "### Goals\n\n{}", goals(&policy_rows, &args.policies));
    }
    if args.suites.contains(&Suite::Attach) {
        let _ = writeln!(doc, "## Where to attach: XDP generic vs XDP native vs TC only\n");
        let _ = writeln!(
            doc,
            "The data path loaded and attached by the benchmark itself (no agent, observe mode, nobody draining the event ring) to both VMs' host ports.\n"
        );
        for kind in &args.port_kinds {
            let name = kind_name(*kind);
            let _ = writeln!(doc, "### {name} ports\n\n{}", table(&rows(samples, "attach", name, &ATTACH_SETUPS)));
        }
    }
    doc
}

fn write_results(args: &Args, doc: &str, samples: &[Sample]) -> anyhow::Result<()> {
    let dir = report::results_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("throughput.md"), doc)?;
    std::fs::write(dir.join("throughput.json"), serde_json::to_string_pretty(samples)?)?;
    if args.suites.contains(&Suite::Policy) {
        let policy_rows = rows(samples, "policy", "veth", &policy_setups(args));
        report::bar_chart(
            &dir.join("throughput-tcp.svg"),
            "TCP across the bridge (iperf3, median)",
            "Gbit/s",
            &bars(&policy_rows, "", |r| r.tcp.median),
        )?;
        report::bar_chart(
            &dir.join("throughput-udp.svg"),
            "60-byte UDP received (median)",
            "kpps",
            &bars(&policy_rows, "", |r| r.udp_rx.median),
        )?;
    }
    if args.suites.contains(&Suite::Attach) {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for kind in &args.port_kinds {
            let name = kind_name(*kind);
            let r = rows(samples, "attach", name, &ATTACH_SETUPS);
            tcp.extend(bars(&r, &format!("{name}: "), |r| r.tcp.median));
            udp.extend(bars(&r, &format!("{name}: "), |r| r.udp_rx.median));
        }
        report::bar_chart(&dir.join("attach-tcp.svg"), "TCP by attach mode (iperf3, median)", "Gbit/s", &tcp)?;
        report::bar_chart(&dir.join("attach-udp.svg"), "60-byte UDP received by attach mode (median)", "kpps", &udp)?;
    }
    eprintln!("wrote {}", dir.display());
    Ok(())
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
    let ceilings = measure_ceilings(&args, args.rounds.clamp(1, 3))?;
    let mut samples = Vec::new();
    if args.suites.contains(&Suite::Policy) {
        let bench = Bench::new(PortKind::Veth, &args.policies, &agent_binary)?;
        samples.extend(run_suite(&bench, "policy", "veth", &policy_setups(&args), &args)?);
    }
    if args.suites.contains(&Suite::Attach) {
        for kind in &args.port_kinds {
            let pk = if *kind == Kind::Veth { PortKind::Veth } else { PortKind::Tap };
            let bench = Bench::new(pk, &[], &agent_binary)?;
            samples.extend(run_suite(&bench, "attach", kind_name(*kind), &ATTACH_SETUPS, &args)?);
        }
    }
    let doc = document(&args, &ceilings, &samples, agent_rules);
    println!("{doc}");
    if args.write {
        write_results(&args, &doc, &samples)?;
    }
    Ok(())
}
