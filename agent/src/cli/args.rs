//! The arguments of `backplane run` ([`RunArgs`]) and the [`RunOptions`] made of them:
//! defaults that depend on the node (its name, pin and state directories), sizes with
//! K/M/G suffixes, the metrics address, the IPFIX collector; then every value is checked
//! once ([`RunOptions::validate`]).

use std::{path::PathBuf, time::Duration};

use clap::Args;

use crate::{
    datapath::{IngressHook, kernel::TcAttachChoice},
    endpoints::parse_labels,
    export::{flow_log::FlowLogOptions, ipfix::IpfixOptions, metrics_http::DEFAULT_METRICS_ADDR},
    options::RunOptions,
    paths::{DEFAULT_SOCKET, default_pin_dir, default_state_dir},
};

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

    /// bpffs directory for the pinned maps and links [default: /sys/fs/bpf/backplane/NODE, NODE being --node].
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
    /// `clsact` qdisc with `cls_bpf` filters at preference 1, any kernel) or `auto` (TCX
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
    #[arg(long, value_name = "PATH", conflicts_with = "observe_only")]
    pub rules: Option<PathBuf>,

    /// Start without rules and lift the rules a previous agent left in force (every flow
    /// passes, `observed`). Without `--rules` and without this, a start that finds rules
    /// in force ends instead, so that a restart that lost its arguments does not open the
    /// switch.
    #[arg(long)]
    pub observe_only: bool,

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

    /// Endpoint state and the audit log [default: /var/lib/backplane/NODE].
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

fn parse_label(s: &str) -> Result<String, String> {
    parse_labels(&[s.to_owned()]).map(|_| s.to_owned())
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
        None => Ok(Some((DEFAULT_METRICS_ADDR.parse().expect("valid default"), false))),
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
            observe_only: self.observe_only,
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command, TopArgs};

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
}
