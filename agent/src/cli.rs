//! The `backplane` command line: `run` (the agent), `flows`, `status` and `explain`
//! (clients of its control socket), and `check` (a rule set, offline).

use std::{fmt::Write as _, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, CommandFactory as _, Parser, Subcommand, error::ErrorKind};

use crate::{
    clock::rfc3339_ms,
    control::{Client, ControlError, Request},
    datapath::IngressHook,
    datapath::kernel::TcAttachChoice,
    endpoints::audit::AuditRecord,
    endpoints::{
        arrival::ArrivalKind,
        model::{EndpointInfo, RuntimeEndpoint},
        parse_labels,
    },
    export::flow_log::FlowLogOptions,
    export::ipfix::IpfixOptions,
    flows::{FlowRecord, FollowEvent, FollowMessage},
    options::RunOptions,
    paths::{DEFAULT_SOCKET, default_pin_dir, default_state_dir},
    rules::LoadedRules,
    rules::explain::{ExplainQuery, ExplainReply, explain_packet},
    run,
    status::Status,
};
use backplane_common::Counter;

/// Exit status of `check` and `explain --rules` when the rule set has errors.
const EXIT_INVALID_RULES: u8 = 1;

/// backplane: inline traffic inspection for the ports of a hypervisor's virtual switch.
#[derive(Debug, Parser)]
#[command(name = "backplane", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load the data path, attach it to the ports, serve the control socket.
    Run(RunArgs),
    /// Show the flows the agent knows.
    Flows(FlowsArgs),
    /// Show the agent's ports, maps, counters, rules in force and drops by zone pair.
    Status(StatusArgs),
    /// Validate a rule set (a directory of *.yaml files, or one file) without an agent.
    Check(CheckArgs),
    /// Show the verdict the rules give a flow, and why: the rules in force (asked from
    /// the agent) or, with --rules, the rule set at a path.
    Explain(ExplainArgs),
    /// Show traffic and drops as a zone-by-zone matrix, refreshed every second.
    Top(TopArgs),
    /// The endpoint inventory at run time: add, remove, attest a patch, list, moved.
    Endpoint(EndpointArgs),
    /// Show the audit log: moves, boots, placement violations, co-mingling, quarantines.
    Audit(AuditArgs),
    /// Show what the running kernel offers the data path (exit 1 if a required feature
    /// is missing) and, with --programs, each program's verifier figures.
    Kernel(KernelArgs),
}

#[derive(Debug, Args)]
pub struct KernelArgs {
    /// Load every program (with maps of its own, removed at the end) and show the
    /// instructions the verifier processed and the stack of its deepest call chain.
    #[arg(long)]
    pub programs: bool,
    /// Print JSON: {kernel, programs}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EndpointArgs {
    #[command(subcommand)]
    pub command: EndpointCommand,
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH", global = true)]
    pub socket: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Add an endpoint (identity: its MAC); shared with the other nodes through etcd.
    Add {
        name: String,
        #[arg(long, value_name = "MAC")]
        mac: String,
        /// Its addresses (repeat, or comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "ADDR")]
        ip: Vec<std::net::IpAddr>,
        /// Its zone [default: from the rules' MAC and CIDR members].
        #[arg(long, value_name = "ZONE")]
        zone: Option<String>,
        /// Tags (virtual patches apply by tag; repeat, or comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "TAG")]
        tag: Vec<String>,
        /// When it was last patched (YYYY-MM-DD).
        #[arg(long, value_name = "DATE")]
        patched_at: Option<String>,
    },
    /// Remove an endpoint added with `add`.
    Remove { name: String },
    /// Record that an endpoint was patched on a date; a quarantined endpoint whose patch
    /// is recent enough is released.
    Attest {
        name: String,
        #[arg(long, value_name = "DATE")]
        patched_at: String,
    },
    /// List the endpoints: standing, reasons, location, last patch.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Tell this node's agent that an endpoint is here now (its flows follow it).
    Moved {
        name: String,
        /// The port it is behind now [default: where it was last announced here].
        #[arg(long, value_name = "IFACE")]
        to_port: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Print JSON (an array of records).
    #[arg(long)]
    pub json: bool,
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
#[expect(clippy::struct_excessive_bools, reason = "each is an independent on/off flag of `run`")]
pub struct RunArgs {
    /// VM-facing ports: shell patterns of interface names, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "tap*,vnet*", value_name = "GLOB[,GLOB]")]
    pub interfaces: Vec<String>,

    /// Uplink ports (to other nodes): interface names, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "IFACE[,IFACE]")]
    pub uplink: Vec<String>,

    /// Control socket to create.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,

    /// bpffs directory for the pinned maps and links [default: /sys/fs/bpf/backplane/<node>].
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,

    /// This node's name [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// Capacity of the kernel flow table (entries).
    #[arg(long, default_value_t = 262_144, value_name = "N", allow_negative_numbers = true)]
    pub flow_table_size: u32,

    /// Size of the flow event ring buffer in bytes (a power of two; K/M/G suffixes allowed).
    #[arg(long, default_value = "4M", value_parser = parse_size, value_name = "BYTES", allow_hyphen_values = true)]
    pub ring_size: u32,

    /// Seconds without packets after which a flow is removed (flows that saw FIN/RST: 5 s).
    #[arg(long, default_value_t = 60, value_name = "SECS", allow_negative_numbers = true)]
    pub idle_timeout: u64,

    /// Where the data path sees what VM ports send: `tc` (TC ingress: a TCX link or a legacy filter),
    /// `xdp-skb` (generic XDP) or `xdp-native` (driver XDP). On veth ports TC keeps
    /// GRO/TSO super-frames whole and measured fastest; native XDP on a veth disables
    /// GRO/TSO (TCP 8.3 -> 1.6 Gbit/s in our measurements). See benches/README.md.
    #[arg(long, value_enum, default_value_t = IngressHook::Tc, value_name = "HOOK")]
    pub ingress: IngressHook,

    /// The same for uplinks: `xdp-native` suits a physical NIC whose driver supports XDP.
    #[arg(long, value_enum, default_value_t = IngressHook::Tc, value_name = "HOOK")]
    pub uplink_ingress: IngressHook,

    /// How TC programs attach to ports: `tcx` (bpf links, Linux 6.6+), `legacy` (a
    /// clsact qdisc with cls_bpf filters at preference 1, any kernel) or `auto` (TCX
    /// where the kernel has it). Ports a previous agent attached keep what they have.
    #[arg(long, value_enum, default_value_t = TcAttachChoice::Auto, value_name = "MODE")]
    pub tc_attach: TcAttachChoice,

    /// On SIGINT/SIGTERM detach from every port and remove all pins. Without it the
    /// programs stay attached through their pinned links and the maps stay pinned, so
    /// inspection goes on while the agent is away.
    #[arg(long)]
    pub detach_on_exit: bool,

    /// Zone rules to enforce: a directory of *.yaml files, or one file. Checked before
    /// anything is attached (errors end the start); then watched, and a valid change is
    /// put in force within a second. Without it the agent observes only.
    #[arg(long, value_name = "PATH")]
    pub rules: Option<PathBuf>,

    /// Serve Prometheus metrics on `http://ADDR/metrics`, or `none` [default:
    /// 127.0.0.1:9469; if that port is taken, the agent runs without metrics and says so].
    #[arg(long, value_name = "ADDR|none")]
    pub metrics_addr: Option<String>,

    /// Turn on the kernel's BPF run statistics while metrics are served, for the program
    /// run time and run count metrics. Off by default: while on, they cost every BPF
    /// program on the node two clock reads per run (about 45 ns per packet per program on
    /// this project's machines). Without it the metrics show what the kernel collects
    /// anyway (when `kernel.bpf_stats_enabled` is 1).
    #[arg(long)]
    pub program_stats: bool,

    /// Write flow starts and ends (with final counters, zones, verdict, policy and the
    /// names seen in their first packets) as JSON lines to this file.
    #[arg(long, value_name = "PATH")]
    pub flow_log: Option<PathBuf>,

    /// Rotate the flow log when it would grow past this size (K/M/G suffixes allowed).
    #[arg(long, default_value = "100M", value_parser = parse_size, value_name = "BYTES", allow_hyphen_values = true)]
    pub flow_log_max_bytes: u32,

    /// Rotated flow log files to keep (PATH.1 ... PATH.N).
    #[arg(long, default_value_t = 5, value_name = "N", allow_negative_numbers = true)]
    pub flow_log_keep: usize,

    /// Export flow records as IPFIX (RFC 7011) over UDP to this collector.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_collector)]
    pub ipfix: Option<std::net::SocketAddr>,

    /// Seconds between IPFIX records of a flow that lives on (its counters so far).
    #[arg(long, default_value_t = 60, value_name = "SECS", allow_negative_numbers = true)]
    pub ipfix_active_timeout: u64,

    /// IPFIX observation domain id of this node.
    #[arg(long, default_value_t = 1, value_name = "N", allow_negative_numbers = true)]
    pub ipfix_domain: u32,

    /// Size of the payload sample ring buffer in bytes (a power of two; K/M/G suffixes).
    #[arg(long, default_value = "1M", value_parser = parse_size, value_name = "BYTES", allow_hyphen_values = true)]
    pub payload_ring_size: u32,

    /// This node's labels, for zone placement: KEY=VALUE, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "K=V[,K=V]", value_parser = parse_label)]
    pub labels: Vec<String>,

    /// etcd client URLs (http://HOST:PORT, comma-separated) to share endpoints, their
    /// locations and flows with the other nodes. Without it: a single node.
    #[arg(long, value_delimiter = ',', value_name = "URL[,URL]")]
    pub etcd: Vec<String>,

    /// Endpoint state and the audit log [default: /var/lib/backplane/<node>].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Do not install the established flows of endpoints that arrive (they are judged
    /// again as new flows).
    #[arg(long)]
    pub no_flow_handover: bool,

    /// While rules are in force, also cut off an uplink that cannot be attached (nftables
    /// drops its frames both ways). Without it such an uplink is only reported: what
    /// enters through it is judged at the VM ports' egress, and the node stays reachable.
    #[arg(long)]
    pub guard_uplinks: bool,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Print one snapshot (totals since the agent started) and exit.
    #[arg(long)]
    pub once: bool,
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
}

fn parse_label(s: &str) -> Result<String, String> {
    parse_labels(&[s.to_owned()]).map(|_| s.to_owned())
}

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Print JSON (an array of flow records; with --follow, one JSON object per line).
    #[arg(long)]
    pub json: bool,
    /// Keep printing flow starts and ends as they happen.
    #[arg(long)]
    pub follow: bool,
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// A directory of *.yaml rule files, or one rule file.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Address of the end that starts the flow.
    #[arg(long, value_name = "ADDR")]
    pub from: String,
    /// Address of the other end.
    #[arg(long, value_name = "ADDR")]
    pub to: String,
    /// IP protocol: tcp, udp, icmp, icmpv6, sctp, or a number 0-254.
    #[arg(long, value_name = "PROTO")]
    pub proto: String,
    /// Destination port (required for tcp, udp and sctp; not allowed for others).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// MAC address of the source (for `mac` members). Without it the source is placed by
    /// its address and interface alone.
    #[arg(long, value_name = "MAC")]
    pub from_mac: Option<String>,
    /// MAC address of the destination.
    #[arg(long, value_name = "MAC")]
    pub to_mac: Option<String>,
    /// The switch port the source is behind (for `interface` members).
    #[arg(long, value_name = "IFNAME")]
    pub from_interface: Option<String>,
    /// Print JSON: `verdict`, `reason`, `policy`, `policy_id`, `src_zone`, `dst_zone`,
    /// `explanation`.
    #[arg(long)]
    pub json: bool,
    /// Explain with the rule set at this path (a directory or one file) instead of the
    /// agent's rules in force.
    #[arg(long, value_name = "PATH", conflicts_with = "socket")]
    pub rules: Option<PathBuf>,
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
}

impl ExplainArgs {
    #[must_use]
    pub fn query(&self) -> ExplainQuery {
        ExplainQuery {
            from: self.from.clone(),
            to: self.to.clone(),
            proto: self.proto.clone(),
            port: self.port,
            from_mac: self.from_mac.clone(),
            to_mac: self.to_mac.clone(),
            from_interface: self.from_interface.clone(),
        }
    }
}

/// Parses `4194304`, `4096K`, `4M`, `4MiB`, `1G`.
fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size in bytes"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    n.checked_mul(mult).and_then(|v| u32::try_from(v).ok()).ok_or_else(|| format!("{s:?} is too large"))
}

/// Resolves `HOST:PORT` of an IPFIX collector.
fn parse_collector(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// `--metrics-addr`: `(address, given explicitly)`, or `None` for `none`.
fn metrics_listen(arg: Option<&str>) -> Result<Option<(std::net::SocketAddr, bool)>, String> {
    match arg {
        None => Ok(Some((crate::export::metrics_http::DEFAULT_METRICS_ADDR.parse().expect("valid default"), false))),
        Some("none" | "off") => Ok(None),
        Some(addr) => addr
            .parse()
            .map(|a| Some((a, true)))
            .map_err(|e| format!("--metrics-addr {addr:?}: {e} (an IP:PORT such as 127.0.0.1:9469, or none)")),
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl RunArgs {
    /// The options of `run`; panics on an invalid `--metrics-addr` (see [`RunArgs::options`]).
    #[must_use]
    pub fn into_options(self) -> RunOptions {
        self.options().expect("valid --metrics-addr")
    }

    /// The options of `run`, or why they are invalid.
    pub fn options(self) -> Result<RunOptions, String> {
        let metrics = metrics_listen(self.metrics_addr.as_deref())?;
        let node = self.node.unwrap_or_else(hostname);
        let pin_dir = self.pin_dir.unwrap_or_else(|| default_pin_dir(&node));
        let state_dir = self.state_dir.unwrap_or_else(|| default_state_dir(&node));
        let labels = parse_labels(&self.labels).map_err(|e| format!("--labels: {e}"))?;
        let opts = RunOptions {
            labels,
            etcd: self.etcd,
            state_dir,
            flow_handover: !self.no_flow_handover,
            guard_uplinks: self.guard_uplinks,
            interfaces: self.interfaces,
            uplinks: self.uplink,
            socket: self.socket,
            pin_dir,
            node,
            flow_table_size: self.flow_table_size,
            ring_size: self.ring_size,
            idle_timeout: Duration::from_secs(self.idle_timeout),
            ingress: self.ingress,
            uplink_ingress: self.uplink_ingress,
            tc_attach: self.tc_attach,
            detach_on_exit: self.detach_on_exit,
            rules: self.rules,
            payload_ring_size: self.payload_ring_size,
            metrics_addr: metrics.map(|(addr, _)| addr),
            metrics_required: metrics.is_some_and(|(_, explicit)| explicit),
            program_stats: self.program_stats,
            flow_log: self.flow_log.map(|path| FlowLogOptions {
                path,
                max_bytes: u64::from(self.flow_log_max_bytes),
                keep: self.flow_log_keep,
            }),
            ipfix: self.ipfix.map(|collector| IpfixOptions {
                collector,
                active_timeout: Duration::from_secs(self.ipfix_active_timeout.max(1)),
                domain: self.ipfix_domain,
            }),
        };
        opts.validate()?;
        Ok(opts)
    }
}

/// `backplane kernel`: exit 1 when a required feature is missing or a program is refused.
fn kernel_report(args: &KernelArgs) -> anyhow::Result<ExitCode> {
    let report = crate::datapath::kernel::probe();
    let programs = if args.programs {
        Some(crate::datapath::kernel::program_figures(crate::datapath::DATAPATH_OBJECT).map_err(anyhow::Error::msg)?)
    } else {
        None
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "kernel": report, "programs": programs }))?);
    } else {
        print!("{}", crate::datapath::kernel::render(&report, programs.as_deref()));
    }
    let refused = programs.iter().flatten().any(|p| p.load_error.is_some());
    Ok(if report.missing().is_empty() && !refused { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Runs a parsed command line; returns the exit status of a command that printed its
/// own errors (invalid rules, invalid arguments).
pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                log::warn!("not running as root: loading and attaching the data path will likely fail");
            }
            let opts = match args.options() {
                Ok(opts) => opts,
                Err(e) => {
                    let usage = Cli::command().error(ErrorKind::ValueValidation, e);
                    let _ = usage.print();
                    return Ok(ExitCode::from(u8::try_from(usage.exit_code()).unwrap_or(2)));
                }
            };
            run::run(opts).await?;
        }
        Command::Top(args) => top(&args).await?,
        Command::Flows(args) => flows(args).await?,
        Command::Status(args) => {
            let status: Status = Client::connect(&args.socket).await?.call(Request::Status).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_status(&status));
            }
        }
        Command::Check(args) => return Ok(check(&args)),
        Command::Kernel(args) => return kernel_report(&args),
        Command::Explain(args) => return explain(&args).await,
        Command::Endpoint(args) => endpoint_command(args).await?,
        Command::Audit(args) => {
            let records: Vec<AuditRecord> = Client::connect(&args.socket).await?.call(Request::Audit).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else {
                print!("{}", render_audit(&records));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `backplane endpoint ...`.
async fn endpoint_command(args: EndpointArgs) -> anyhow::Result<()> {
    let mut client = Client::connect(&args.socket).await?;
    match args.command {
        EndpointCommand::Add { name, mac, ip, zone, tag, patched_at } => {
            let r = RuntimeEndpoint { name, mac, ips: ip, zone, tags: tag, patched_at };
            let info: EndpointInfo = client.call(Request::EndpointAdd(r)).await?;
            print!("{}", render_endpoints(std::slice::from_ref(&info)));
        }
        EndpointCommand::Remove { name } => {
            let _: serde_json::Value = client.call(Request::EndpointRemove { name: name.clone() }).await?;
            println!("removed {name}");
        }
        EndpointCommand::Attest { name, patched_at } => {
            let info: EndpointInfo = client.call(Request::EndpointAttest { name, patched_at }).await?;
            print!("{}", render_endpoints(std::slice::from_ref(&info)));
        }
        EndpointCommand::List { json } => {
            let list: Vec<EndpointInfo> = client.call(Request::EndpointList).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", render_endpoints(&list));
            }
        }
        EndpointCommand::Moved { name, to_port } => {
            let info: EndpointInfo = client.call(Request::EndpointMoved { name, to_port }).await?;
            print!("{}", render_endpoints(std::slice::from_ref(&info)));
        }
    }
    Ok(())
}

/// The table of `backplane endpoint list`.
#[must_use]
pub fn render_endpoints(list: &[EndpointInfo]) -> String {
    let mut rows: Vec<[String; 8]> =
        vec![["NAME", "MAC", "ZONE", "STATE", "NODE", "PORT", "PATCHED", "REASONS"].map(String::from)];
    for e in list {
        rows.push([
            e.name.clone(),
            e.mac.clone(),
            e.zone.clone().unwrap_or_else(|| "-".into()),
            e.state.to_string(),
            e.node.clone().unwrap_or_else(|| "-".into()),
            e.port.clone().unwrap_or_else(|| "-".into()),
            e.patched_at.clone().unwrap_or_else(|| "unknown".into()),
            if e.reasons.is_empty() { "-".into() } else { e.reasons.join("; ") },
        ]);
    }
    table(&rows, if list.is_empty() { "(no endpoints)\n" } else { "" })
}

/// The table of `backplane audit`.
#[must_use]
pub fn render_audit(records: &[AuditRecord]) -> String {
    let labels = |l: &std::collections::BTreeMap<String, String>| {
        if l.is_empty() {
            String::new()
        } else {
            format!(" [{}]", l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
        }
    };
    let mut out = String::new();
    for r in records {
        let from = r.from_node.as_ref().map(|n| {
            format!(
                " from {n}{}{}",
                r.from_port.as_ref().map(|p| format!(":{p}")).unwrap_or_default(),
                labels(&r.from_labels)
            )
        });
        let to = r.to_node.as_ref().map(|n| {
            format!(
                " to {n}{}{}",
                r.to_port.as_ref().map(|p| format!(":{p}")).unwrap_or_default(),
                labels(&r.to_labels)
            )
        });
        let _ = write!(
            out,
            "{}  {:<19} {}{}{}",
            r.time,
            r.kind,
            r.endpoint,
            from.unwrap_or_default(),
            to.unwrap_or_default()
        );
        if r.kind == ArrivalKind::Move.as_str() {
            let _ = write!(out, "  {} flow(s) carried", r.flows_carried);
            if let Some(ms) = r.handover_ms {
                let _ = write!(out, " in {ms:.2} ms");
            }
        }
        if !r.state.is_empty() {
            let _ = write!(out, "  {}", r.state);
        }
        if !r.detail.is_empty() {
            let _ = write!(out, "  ({})", r.detail);
        }
        out.push('\n');
    }
    if records.is_empty() {
        out.push_str("(no audit records)\n");
    }
    out
}

fn table<const N: usize>(rows: &[[String; N]], empty: &str) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(empty);
    out
}

/// Loads a rule set; on errors prints each as `file:line:column: message` on stderr.
fn load_or_print(path: &std::path::Path) -> Option<LoadedRules> {
    match LoadedRules::load(path) {
        Ok(loaded) => Some(loaded),
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            None
        }
    }
}

/// `backplane check PATH`.
fn check(args: &CheckArgs) -> ExitCode {
    match load_or_print(&args.path) {
        Some(loaded) => {
            println!("{}: valid: {}", args.path.display(), loaded.counts());
            ExitCode::SUCCESS
        }
        None => ExitCode::from(EXIT_INVALID_RULES),
    }
}

/// `backplane explain`.
async fn explain(args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let query = args.query();
    // Checked here too, so that a wrong argument is a usage error whichever rules answer.
    let packet = match query.packet() {
        Ok(packet) => packet,
        Err(e) => {
            let mut cli = Cli::command();
            cli.build();
            let usage = match cli.find_subcommand_mut("explain") {
                Some(explain) => explain.error(ErrorKind::ValueValidation, e),
                None => cli.error(ErrorKind::ValueValidation, e),
            };
            let _ = usage.print();
            return Ok(ExitCode::from(u8::try_from(usage.exit_code()).unwrap_or(2)));
        }
    };
    let reply: ExplainReply = match &args.rules {
        Some(path) => {
            let Some(loaded) = load_or_print(path) else { return Ok(ExitCode::from(EXIT_INVALID_RULES)) };
            explain_packet(&loaded.rules, &packet)
        }
        None => Client::connect(&args.socket).await?.call(Request::Explain(query)).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        println!("{}", reply.explanation);
    }
    Ok(ExitCode::SUCCESS)
}

async fn flows(args: FlowsArgs) -> Result<(), ControlError> {
    let mut client = Client::connect(&args.socket).await?;
    if args.follow {
        let json = args.json;
        let color = crate::top::stdout_wants_color();
        return client
            .follow(|msg| {
                if json {
                    match serde_json::to_string(&msg) {
                        Ok(line) => println!("{line}"),
                        Err(e) => log::warn!("{e}"),
                    }
                } else if let Some(line) = render_follow_colored(&msg, color) {
                    println!("{line}");
                }
                true
            })
            .await;
    }
    let records: Vec<FlowRecord> = client.call(Request::Flows).await?;
    if args.json {
        println!("{}", serde_json::to_string(&records).map_err(ControlError::BadReply)?);
    } else {
        print!("{}", render_flows(&records));
    }
    Ok(())
}

fn endpoint(ip: &str, port: u16) -> String {
    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
}

/// `web->db`, or `-` for a flow no rule set judged.
fn zones_text(r: &FlowRecord) -> String {
    match (&r.src_zone, &r.dst_zone) {
        (Some(src), Some(dst)) => format!("{src}->{dst}"),
        _ => "-".into(),
    }
}

/// The human table of `backplane flows`.
#[must_use]
pub fn render_flows(records: &[FlowRecord]) -> String {
    let header = [
        "PROTO",
        "SOURCE",
        "",
        "DESTINATION",
        "FWD PKTS/BYTES",
        "REV PKTS/BYTES",
        "VERDICT",
        "ZONES",
        "POLICY",
        "INTERFACES",
        "STATE",
    ];
    let mut rows: Vec<[String; 11]> = vec![header.map(String::from)];
    for r in records {
        rows.push([
            r.proto.clone(),
            endpoint(&r.src_ip, r.src_port),
            "->".into(),
            endpoint(&r.dst_ip, r.dst_port),
            format!("{}/{}", r.fwd_packets, r.fwd_bytes),
            format!("{}/{}", r.rev_packets, r.rev_bytes),
            r.verdict.clone(),
            zones_text(r),
            r.policy.clone().unwrap_or_else(|| "-".into()),
            if r.interfaces.is_empty() { "-".into() } else { r.interfaces.join(",") },
            r.state.clone(),
        ]);
    }
    let mut widths = [0usize; 11];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if records.is_empty() {
        out.push_str("(no flows)\n");
    }
    out
}

/// `backplane top`: the zone matrix every second, or once.
async fn top(args: &TopArgs) -> Result<(), ControlError> {
    let mut client = Client::connect(&args.socket).await?;
    let first: Status = client.call(Request::Status).await?;
    if args.once {
        print!("{}", crate::top::render(&first, None, false));
        return Ok(());
    }
    let color = crate::top::stdout_wants_color();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (mut prev, mut at) = (first, std::time::Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now: Status = Client::connect(&args.socket).await?.call(Request::Status).await?;
        let secs = at.elapsed().as_secs_f64();
        let screen = crate::top::render(&now, Some((&prev, secs)), color);
        if tty {
            // Home, clear the screen, draw.
            print!("\x1b[H\x1b[2J{screen}");
        } else {
            println!("{screen}");
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        (prev, at) = (now, std::time::Instant::now());
    }
}

/// One line of `backplane flows --follow`; updates are not shown.
#[must_use]
pub fn render_follow(msg: &FollowMessage) -> Option<String> {
    render_follow_colored(msg, false)
}

/// [`render_follow`], with the event and the verdict in colour when `color`.
#[must_use]
pub fn render_follow_colored(msg: &FollowMessage, color: bool) -> Option<String> {
    use crate::top::paint;
    if msg.event == FollowEvent::Lagged {
        return Some(format!("-- too slow: missed {} message(s)", msg.missed.unwrap_or(0)));
    }
    let what = msg.event.flow_event_name()?;
    let r = msg.flow.as_ref()?;
    let when = match msg.event {
        FollowEvent::Start => r.first_seen_unix_ms,
        _ => r.last_seen_unix_ms,
    };
    // A start is announced before the kernel table is read: its counters mean nothing yet.
    let counts = if msg.event == FollowEvent::Start {
        String::new()
    } else {
        format!("  fwd {}/{} rev {}/{}", r.fwd_packets, r.fwd_bytes, r.rev_packets, r.rev_bytes)
    };
    let decided = match &r.policy {
        Some(policy) => format!(" {} by {policy}", zones_text(r)),
        None => String::new(),
    };
    let verdict_color = match r.verdict.as_str() {
        "denied" => "31",
        "audit" => "33",
        "allowed" => "32",
        _ => "2",
    };
    let mut names = String::new();
    for (label, name) in [("dns", &r.dns_query), ("sni", &r.tls_sni), ("host", &r.http_host)] {
        if let Some(name) = name {
            let _ = write!(names, "  {label}={name}");
        }
    }
    Some(format!(
        "{}  {} {:<6} {} -> {}{counts}  {}{decided}  [{}]{}{names}",
        paint(&rfc3339_ms(when), "2", color),
        paint(&format!("{what:<7}"), "1", color),
        r.proto,
        endpoint(&r.src_ip, r.src_port),
        endpoint(&r.dst_ip, r.dst_port),
        paint(&r.verdict, verdict_color, color),
        r.interfaces.join(","),
        if r.tcp_flags.is_empty() { String::new() } else { format!("  {}", r.tcp_flags) },
    ))
}

/// The human view of `backplane status`.
#[must_use]
pub fn render_status(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "node:          {}", s.node);
    let _ = writeln!(o, "pin dir:       {}", s.pin_dir);
    let _ = writeln!(o, "socket:        {}", s.socket);
    let _ = writeln!(
        o,
        "programs:      from_port_tc id {} (TC ingress), from_port id {} (XDP), to_port id {} (TC egress)",
        s.program_ids.from_port_tc, s.program_ids.from_port, s.program_ids.to_port
    );
    let _ = writeln!(o, "ingress hook:  {} on VM ports, {} on uplinks", s.ingress, s.uplink_ingress);
    let _ = writeln!(o, "tc attach:     {}", s.tc_attach);
    let mode = if s.config_flags & backplane_common::config::CONFIG_ENFORCE != 0 { "enforce" } else { "observe" };
    let _ = writeln!(o, "config:        generation {}, {mode}", s.config_generation);
    let _ =
        writeln!(o, "on exit:       {}", if s.detach_on_exit { "detach and unpin" } else { "stay attached (pinned)" });
    let _ = writeln!(o, "ports ({}):", s.ports.len());
    if s.ports.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    for p in &s.ports {
        let _ = writeln!(
            o,
            "  {:<16} ifindex {:<5} {:<7} ingress {:<10} from_port {} to_port {}{}",
            p.name,
            p.ifindex,
            p.role,
            p.ingress,
            p.from_port_id,
            p.to_port_id,
            if p.pinned { "" } else { "  (not pinned)" }
        );
    }
    render_port_guard(&mut o, s);
    let f = &s.flows;
    #[expect(clippy::cast_precision_loss, reason = "a percentage for display")]
    let fill = if f.capacity == 0 { 0.0 } else { f.entries as f64 * 100.0 / f64::from(f.capacity) };
    let _ = writeln!(o, "flow table:    {} / {} entries ({fill:.1}%)", f.entries, f.capacity);
    let _ = writeln!(
        o,
        "flow records:  {} active, {} ended in history; expired {}, evicted {}, history dropped {}, without start event {}",
        f.stats.active_records,
        f.stats.ended_records,
        f.stats.expired,
        f.stats.evicted,
        f.stats.history_dropped,
        f.stats.without_start_event
    );
    let _ = writeln!(
        o,
        "events:        {} start, {} end, {} lost (ring buffer full), {} undecodable",
        f.stats.start_events, f.stats.end_events, s.events_lost, f.stats.decode_errors
    );
    let _ = writeln!(o, "counters:");
    for c in Counter::ALL.iter().filter(|c| !c.is_parse_failure()) {
        let _ = writeln!(o, "  {:<22} {}", c.as_str(), s.counters.get(c.as_str()).copied().unwrap_or(0));
    }
    let _ = writeln!(o, "parse failures:");
    for c in Counter::ALL.iter().filter(|c| c.is_parse_failure()) {
        let _ = writeln!(o, "  {:<22} {}", c.as_str(), s.counters.get(c.as_str()).copied().unwrap_or(0));
    }
    render_rules(&mut o, s);
    render_endpoint_status(&mut o, s);
    o
}

/// The ports that match but are not attached, and the port guard, in `backplane status`.
fn render_port_guard(o: &mut String, s: &Status) {
    let g = &s.port_guard;
    if !g.unattached.is_empty() {
        let _ = writeln!(o, "unattached ports ({}):", g.unattached.len());
    }
    for p in &g.unattached {
        let state = if p.state == "blocked" {
            "BLOCKED".to_owned()
        } else {
            format!("UNGUARDED ({})", p.reason.as_deref().unwrap_or("-"))
        };
        let _ = writeln!(o, "  {:<16} ifindex {:<5} {:<7} {state} since {}", p.name, p.ifindex, p.role, p.since);
        let _ = writeln!(o, "    failing since {}: {}", p.failing_since, p.error);
    }
    let (blocked, _) = g.counts();
    let table = if g.table.is_empty() { "-" } else { g.table.as_str() };
    let state = match (&g.error, g.in_place) {
        (Some(e), _) => format!("UNAVAILABLE since {}: {e}", g.error_since.as_deref().unwrap_or("-")),
        (None, true) => format!("nft table {table}, {blocked} port(s) blocked"),
        (None, false) => format!("nft table {table}, not made (no port needed blocking)"),
    };
    let _ = writeln!(o, "port guard:    {state}");
}

/// The `endpoints` part of `backplane status`.
fn render_endpoint_status(o: &mut String, s: &Status) {
    let e = &s.endpoints;
    let labels: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(o, "node labels:   {}", if labels.is_empty() { "(none)".into() } else { labels.join(",") });
    let _ = writeln!(
        o,
        "endpoints:     {} known, {} here; {} active, {} quarantined, {} isolated; {} move(s) arrived",
        e.total, e.here, e.active, e.quarantined, e.isolated, e.moves
    );
    let _ = writeln!(o, "flow handover: {}", if e.flow_handover { "on" } else { "off (--no-flow-handover)" });
    let _ = writeln!(o, "state dir:     {}", e.state_dir);
    let _ = writeln!(o, "audit log:     {} ({} records)", e.audit_log, e.audit_records);
    let etcd = &e.etcd;
    if etcd.configured {
        let state = if etcd.connected {
            format!("connected, lease {:x}", etcd.lease_id)
        } else {
            "DISCONNECTED (working from local state)".into()
        };
        let _ = writeln!(
            o,
            "etcd:          {} {state} since {}; {} reconnect(s){}",
            etcd.urls.join(","),
            etcd.since.as_deref().unwrap_or("-"),
            etcd.reconnects,
            etcd.last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default()
        );
    } else {
        let _ = writeln!(o, "etcd:          none (a single node)");
    }
    if !e.alerts.is_empty() {
        let _ = writeln!(o, "alerts:");
        for a in &e.alerts {
            let _ = writeln!(o, "  {a}");
        }
    }
}

/// The `rules` and `zone_pairs` parts of `backplane status`.
fn render_rules(o: &mut String, s: &Status) {
    let r = &s.rules;
    let Some(path) = &r.path else {
        let _ = writeln!(o, "rules:         none: observing only (start the agent with --rules PATH to enforce)");
        return;
    };
    let _ = writeln!(o, "rules:         {path}");
    let _ = writeln!(
        o,
        "  in force:    generation {}, since {}: {} files, {} zones, {} policies",
        r.generation,
        r.loaded_at.as_deref().unwrap_or("-"),
        r.files,
        r.zones,
        r.policies
    );
    match r.in_force_from.as_str() {
        "previous_agent" => {
            let _ = writeln!(
                o,
                "  KEPT:        the generation a previous agent left in force (the rules did not load at start)"
            );
        }
        "failure_mode" => {
            let _ = writeln!(
                o,
                "  FAILURE MODE: the rules did not load at start; the last good copy is in force with on_rules_failure: \
                 closed [{}], open [{}]",
                r.failure_closed.join(","),
                r.failure_open.join(",")
            );
        }
        _ => {}
    }
    if let Some(copy) = &r.last_good_copy {
        let _ = writeln!(o, "  last good:   {copy}");
    }
    let _ = writeln!(o, "  reloads:     {} put in force, {} rejected", r.reloads_ok, r.reloads_rejected);
    if !r.last_error.is_empty() {
        let _ = writeln!(
            o,
            "  last rejection at {} (generation {} stays in force):",
            r.last_error_at.as_deref().unwrap_or("-"),
            r.generation
        );
        for e in &r.last_error {
            let _ = writeln!(o, "    {e}");
        }
    }
    let _ = writeln!(o, "drops and audits by zone pair:");
    if s.zone_pairs.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    let width = s.zone_pairs.iter().map(|p| p.src_zone.len() + p.dst_zone.len() + 2).max().unwrap_or(0);
    for p in &s.zone_pairs {
        let pair = format!("{}->{}", p.src_zone, p.dst_zone);
        let _ =
            writeln!(o, "  {pair:<width$}  {:<7} {:<20} {} packets, {} bytes", p.verdict, p.reason, p.packets, p.bytes);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let cli = Cli::parse_from(["backplane", "run", "--node", "hv1"]);
        let Command::Run(args) = cli.command else { panic!() };
        let o = args.into_options();
        assert_eq!(o.interfaces, vec!["tap*", "vnet*"]);
        assert!(o.uplinks.is_empty());
        assert_eq!(o.socket, PathBuf::from("/run/backplane/backplane.sock"));
        assert_eq!(o.pin_dir, PathBuf::from("/sys/fs/bpf/backplane/hv1"));
        assert_eq!(o.flow_table_size, 262_144);
        assert_eq!(o.ring_size, 4 << 20);
        assert_eq!(o.idle_timeout, Duration::from_secs(60));
        assert_eq!((o.ingress, o.uplink_ingress), (IngressHook::Tc, IngressHook::Tc));
        assert!(!o.detach_on_exit);
    }

    #[test]
    fn run_options() {
        let cli = Cli::parse_from([
            "backplane",
            "run",
            "--interfaces",
            "bpvx*,veth*",
            "--uplink",
            "eth0,eth1",
            "--ring-size",
            "1M",
            "--ingress",
            "xdp-skb",
            "--uplink-ingress",
            "xdp-native",
            "--detach-on-exit",
            "--pin-dir",
            "/sys/fs/bpf/x",
            "--rules",
            "/etc/backplane/rules",
        ]);
        let Command::Run(args) = cli.command else { panic!() };
        let o = args.into_options();
        assert_eq!(o.rules, Some(PathBuf::from("/etc/backplane/rules")));
        assert_eq!(o.interfaces, vec!["bpvx*", "veth*"]);
        assert_eq!(o.uplinks, vec!["eth0", "eth1"]);
        assert_eq!(o.ring_size, 1 << 20);
        assert_eq!((o.ingress, o.uplink_ingress), (IngressHook::XdpSkb, IngressHook::XdpNative));
        assert!(o.detach_on_exit);
        assert_eq!(o.pin_dir, PathBuf::from("/sys/fs/bpf/x"));
    }

    #[test]
    fn explain_and_check_arguments() {
        let cli = Cli::parse_from([
            "backplane",
            "explain",
            "--from",
            "10.30.0.5",
            "--to",
            "10.40.0.9",
            "--proto",
            "tcp",
            "--port",
            "5432",
            "--from-mac",
            "52:54:00:00:00:01",
            "--from-interface",
            "tap-web-1",
            "--json",
            "--rules",
            "rules/",
        ]);
        let Command::Explain(args) = cli.command else { panic!() };
        assert!(args.json);
        assert_eq!(args.rules, Some(PathBuf::from("rules/")));
        let q = args.query();
        assert_eq!(
            (q.from.as_str(), q.to.as_str(), q.proto.as_str(), q.port),
            ("10.30.0.5", "10.40.0.9", "tcp", Some(5432))
        );
        assert_eq!((q.from_mac.as_deref(), q.to_mac.as_deref()), (Some("52:54:00:00:00:01"), None));
        assert_eq!(q.from_interface.as_deref(), Some("tap-web-1"));
        let p = q.packet().unwrap();
        assert_eq!((p.proto, p.dport, p.src_interface.as_deref()), (6, 5432, Some("tap-web-1")));

        // --rules (offline) and --socket (the agent) are two ways to ask; one at a time.
        let both =
            ["backplane", "explain", "--from", "a", "--to", "b", "--proto", "tcp", "--rules", "r", "--socket", "s"];
        assert_eq!(Cli::try_parse_from(both).unwrap_err().kind(), ErrorKind::ArgumentConflict);
        let missing = ["backplane", "explain", "--from", "10.0.0.1", "--to", "10.0.0.2"];
        assert_eq!(Cli::try_parse_from(missing).unwrap_err().kind(), ErrorKind::MissingRequiredArgument);
        let bad_port = ["backplane", "explain", "--from", "a", "--to", "b", "--proto", "tcp", "--port", "70000"];
        assert_eq!(Cli::try_parse_from(bad_port).unwrap_err().kind(), ErrorKind::ValueValidation);

        let Command::Check(args) = Cli::parse_from(["backplane", "check", "rules/"]).command else { panic!() };
        assert_eq!(args.path, PathBuf::from("rules/"));
        assert!(Cli::try_parse_from(["backplane", "check"]).is_err(), "check needs a path");
    }

    #[test]
    fn observability_options() {
        let o = Cli::parse_from(["backplane", "run"]);
        let Command::Run(args) = o.command else { panic!() };
        let o = args.options().unwrap();
        assert_eq!(o.metrics_addr, Some("127.0.0.1:9469".parse().unwrap()), "loopback by default");
        assert!(!o.metrics_required && !o.program_stats, "program stats cost every packet: off by default");
        assert_eq!((o.flow_log.as_ref(), o.ipfix.as_ref(), o.payload_ring_size), (None, None, 1 << 20));
        let cli = Cli::parse_from([
            "backplane",
            "run",
            "--metrics-addr",
            "0.0.0.0:9100",
            "--flow-log",
            "/var/log/backplane/flows.jsonl",
            "--flow-log-max-bytes",
            "10M",
            "--flow-log-keep",
            "3",
            "--ipfix",
            "127.0.0.1:4739",
            "--ipfix-active-timeout",
            "30",
            "--program-stats",
        ]);
        let Command::Run(args) = cli.command else { panic!() };
        let o = args.options().unwrap();
        assert_eq!(o.metrics_addr, Some("0.0.0.0:9100".parse().unwrap()));
        assert!(o.metrics_required && o.program_stats);
        let log = o.flow_log.unwrap();
        assert_eq!((log.max_bytes, log.keep), (10 << 20, 3));
        let ipfix = o.ipfix.unwrap();
        assert_eq!((ipfix.collector.port(), ipfix.active_timeout), (4739, Duration::from_secs(30)));
        let off = Cli::parse_from(["backplane", "run", "--metrics-addr", "none"]);
        let Command::Run(args) = off.command else { panic!() };
        assert_eq!(args.options().unwrap().metrics_addr, None);
        let bad = Cli::parse_from(["backplane", "run", "--metrics-addr", "localhost"]);
        let Command::Run(args) = bad.command else { panic!() };
        assert!(args.options().unwrap_err().contains("--metrics-addr"));
        let top = Cli::parse_from(["backplane", "top", "--once", "--socket", "/tmp/x.sock"]);
        assert!(matches!(top.command, Command::Top(TopArgs { once: true, .. })));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("8G").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("4Q").is_err());
    }

    fn record() -> FlowRecord {
        FlowRecord {
            src_ip: "10.0.0.1".into(),
            dst_ip: "10.0.0.2".into(),
            proto: "icmp".into(),
            src_port: 7,
            dst_port: 7,
            fwd_packets: 3,
            fwd_bytes: 294,
            rev_packets: 3,
            rev_bytes: 294,
            first_seen: rfc3339_ms(0),
            last_seen: rfc3339_ms(2000),
            first_seen_unix_ms: 0,
            last_seen_unix_ms: 2000,
            interfaces: vec!["tap0".into(), "tap1".into()],
            vlan: 0,
            tcp_flags: String::new(),
            state: "active".into(),
            verdict: "observed".into(),
            reason: "no_rules".into(),
            policy: None,
            src_zone: None,
            dst_zone: None,
            dns_query: None,
            tls_sni: None,
            http_host: None,
        }
    }

    #[test]
    fn flow_table_rendering() {
        let out = render_flows(&[record()]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("PROTO"));
        assert!(lines[1].contains("10.0.0.1:7") && lines[1].contains("-> ") && lines[1].contains("3/294"));
        assert!(lines[1].contains("tap0,tap1") && lines[1].ends_with("active"));
        assert!(lines[0].contains("ZONES") && lines[0].contains("POLICY"));
        assert!(render_flows(&[]).contains("(no flows)"));
        let judged = FlowRecord {
            verdict: "denied".into(),
            reason: "default_inter_zone".into(),
            policy: Some("default_inter_zone".into()),
            src_zone: Some("db".into()),
            dst_zone: Some("web".into()),
            ..record()
        };
        let out = render_flows(std::slice::from_ref(&judged));
        let row = out.lines().nth(1).unwrap();
        assert!(row.contains("denied") && row.contains("db->web") && row.contains("default_inter_zone"), "{row}");
        let msg = FollowMessage { event: FollowEvent::Start, flow: Some(judged), missed: None };
        assert!(render_follow(&msg).unwrap().contains("denied db->web by default_inter_zone"));
        let msg = FollowMessage { event: FollowEvent::Start, flow: Some(record()), missed: None };
        assert!(render_follow(&msg).unwrap().contains("start   icmp   10.0.0.1:7 -> 10.0.0.2:7"));
        let upd = FollowMessage { event: FollowEvent::Update, ..msg };
        assert!(render_follow(&upd).is_none());
        assert_eq!(endpoint("fd00::1", 80), "[fd00::1]:80");
    }

    #[test]
    fn status_shows_rules_and_zone_pairs() {
        let observe = render_status(&Status::default());
        assert!(observe.contains("rules:         none: observing only"), "{observe}");
        let status = Status {
            rules: crate::rules::RulesStatus {
                path: Some("/etc/backplane/rules".into()),
                generation: 2,
                loaded_at: Some(rfc3339_ms(0)),
                files: 3,
                zones: 3,
                policies: 6,
                reloads_ok: 1,
                reloads_rejected: 1,
                last_error: vec!["broken.yaml:4:9: unknown zone \"nowhere\" in to".into()],
                last_error_at: Some(rfc3339_ms(1000)),
                ..crate::rules::RulesStatus::default()
            },
            zone_pairs: vec![crate::status::ZonePairStatus {
                src_zone: "db".into(),
                dst_zone: "web".into(),
                verdict: "denied".into(),
                reason: "default_inter_zone".into(),
                packets: 3,
                bytes: 222,
            }],
            ..Status::default()
        };
        let out = render_status(&status);
        assert!(out.contains("generation 2, since 1970-01-01T00:00:00.000Z: 3 files, 3 zones, 6 policies"), "{out}");
        assert!(out.contains("1 put in force, 1 rejected"), "{out}");
        assert!(out.contains("    broken.yaml:4:9: unknown zone"), "{out}");
        assert!(out.contains("db->web  denied  default_inter_zone   3 packets, 222 bytes"), "{out}");
        assert!(!out.contains("FAILURE MODE") && !out.contains("KEPT"), "{out}");
        let mut failing = status.clone();
        failing.rules.in_force_from = "failure_mode".into();
        failing.rules.failure_closed = vec!["world".into(), "web".into()];
        failing.rules.failure_open = vec!["db".into()];
        failing.rules.last_good_copy = Some("/var/lib/backplane/hv1/rules.last-good".into());
        let out = render_status(&failing);
        assert!(out.contains("FAILURE MODE") && out.contains("closed [world,web], open [db]"), "{out}");
        assert!(out.contains("last good:   /var/lib/backplane/hv1/rules.last-good"), "{out}");
        failing.rules.in_force_from = "previous_agent".into();
        assert!(render_status(&failing).contains("KEPT:"), "{out}");
    }

    #[test]
    fn status_shows_unattached_ports_and_the_port_guard() {
        use crate::ports::guard::{PortGuardStatus, UnattachedPort};
        let out = render_status(&Status::default());
        assert!(!out.contains("unattached ports"), "{out}");
        assert!(out.contains("port guard:    nft table -, not made"), "{out}");
        let port = UnattachedPort {
            name: "vnet7".into(),
            ifindex: 12,
            role: "vm".into(),
            error: "interface vnet7 (ifindex 12): cannot attach from_port: busy".into(),
            failing_since: rfc3339_ms(0),
            state: "blocked".into(),
            since: rfc3339_ms(2000),
            reason: None,
        };
        let status = Status {
            port_guard: PortGuardStatus {
                table: "bridge backplane_hv1".into(),
                in_place: true,
                unattached: vec![
                    port.clone(),
                    UnattachedPort {
                        name: "vnet8".into(),
                        ifindex: 13,
                        state: "unguarded".into(),
                        reason: Some("observing only".into()),
                        ..port
                    },
                ],
                ..PortGuardStatus::default()
            },
            ..Status::default()
        };
        let out = render_status(&status);
        assert!(out.contains("unattached ports (2):"), "{out}");
        assert!(out.contains("vnet7            ifindex 12    vm      BLOCKED since 1970-01-01T00:00:02.000Z"), "{out}");
        assert!(
            out.contains("failing since 1970-01-01T00:00:00.000Z: interface vnet7 (ifindex 12): cannot attach"),
            "{out}"
        );
        assert!(out.contains("vnet8") && out.contains("UNGUARDED (observing only)"), "{out}");
        assert!(out.contains("port guard:    nft table bridge backplane_hv1, 1 port(s) blocked"), "{out}");
        let mut broken = status;
        broken.port_guard.error = Some("cannot run nft".into());
        assert!(render_status(&broken).contains("port guard:    UNAVAILABLE since -: cannot run nft"));
    }
}
