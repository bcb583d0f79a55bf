//! The `backplane` command line: `run` (the agent), `flows` and `status` (clients of
//! its control socket).

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    agent::{self, RunOptions, Status},
    clock::rfc3339_ms,
    control::{Client, Request},
    datapath::XdpAttachMode,
    error::ControlError,
    flows::{FlowRecord, FollowEvent, FollowMessage},
    paths::{DEFAULT_SOCKET, default_pin_dir},
};
use backplane_common::Counter;

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
    /// Show the agent's ports, maps and counters.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
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
    #[arg(long, default_value_t = 262_144, value_name = "N")]
    pub flow_table_size: u32,

    /// Size of the flow event ring buffer in bytes (a power of two; K/M/G suffixes allowed).
    #[arg(long, default_value = "4M", value_parser = parse_size, value_name = "BYTES")]
    pub ring_size: u32,

    /// Seconds without packets after which a flow is removed (flows that saw FIN/RST: 5 s).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub idle_timeout: u64,

    /// XDP mode on the ports. `skb` (generic) keeps GRO/TSO working on veth and tap
    /// ports; `native` runs in the driver, but on a veth it disables GRO/TSO and cut
    /// TCP throughput from 8.3 to 1.6 Gbit/s in our measurements: use it for physical
    /// uplinks with XDP-capable drivers.
    #[arg(long, value_enum, default_value_t = XdpAttachMode::Skb)]
    pub xdp_mode: XdpAttachMode,

    /// On SIGINT/SIGTERM detach from every port and remove all pins. Without it the
    /// programs stay attached through their pinned links and the maps stay pinned, so
    /// inspection goes on while the agent is away.
    #[arg(long)]
    pub detach_on_exit: bool,
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
    #[must_use]
    pub fn into_options(self) -> RunOptions {
        let node = self.node.unwrap_or_else(hostname);
        let pin_dir = self.pin_dir.unwrap_or_else(|| default_pin_dir(&node));
        RunOptions {
            interfaces: self.interfaces,
            uplinks: self.uplink,
            socket: self.socket,
            pin_dir,
            node,
            flow_table_size: self.flow_table_size,
            ring_size: self.ring_size,
            idle_timeout: Duration::from_secs(self.idle_timeout),
            xdp_mode: self.xdp_mode,
            detach_on_exit: self.detach_on_exit,
        }
    }
}

/// Runs a parsed command line.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                log::warn!("not running as root: loading and attaching the data path will likely fail");
            }
            agent::run(args.into_options()).await?;
        }
        Command::Flows(args) => flows(args).await?,
        Command::Status(args) => {
            let status: Status = Client::connect(&args.socket).await?.call(Request::Status).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_status(&status));
            }
        }
    }
    Ok(())
}

async fn flows(args: FlowsArgs) -> Result<(), ControlError> {
    let mut client = Client::connect(&args.socket).await?;
    if args.follow {
        let json = args.json;
        return client
            .follow(|msg| {
                if json {
                    match serde_json::to_string(&msg) {
                        Ok(line) => println!("{line}"),
                        Err(e) => log::warn!("{e}"),
                    }
                } else if let Some(line) = render_follow(&msg) {
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

/// The human table of `backplane flows`.
#[must_use]
pub fn render_flows(records: &[FlowRecord]) -> String {
    let header =
        ["PROTO", "SOURCE", "", "DESTINATION", "FWD PKTS/BYTES", "REV PKTS/BYTES", "VERDICT", "INTERFACES", "STATE"];
    let mut rows: Vec<[String; 9]> = vec![header.map(String::from)];
    for r in records {
        rows.push([
            r.proto.clone(),
            endpoint(&r.src_ip, r.src_port),
            "->".into(),
            endpoint(&r.dst_ip, r.dst_port),
            format!("{}/{}", r.fwd_packets, r.fwd_bytes),
            format!("{}/{}", r.rev_packets, r.rev_bytes),
            r.verdict.clone(),
            if r.interfaces.is_empty() { "-".into() } else { r.interfaces.join(",") },
            r.state.clone(),
        ]);
    }
    let mut widths = [0usize; 9];
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

/// One line of `backplane flows --follow`; updates are not shown.
#[must_use]
pub fn render_follow(msg: &FollowMessage) -> Option<String> {
    let what = match msg.event {
        FollowEvent::Start => "start",
        FollowEvent::End => "end",
        FollowEvent::Expired => "expired",
        FollowEvent::Evicted => "evicted",
        FollowEvent::Update => return None,
        FollowEvent::Lagged => {
            return Some(format!("-- too slow: missed {} message(s)", msg.missed.unwrap_or(0)));
        }
    };
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
    Some(format!(
        "{}  {what:<7} {:<6} {} -> {}{counts}  {}  [{}]{}",
        rfc3339_ms(when),
        r.proto,
        endpoint(&r.src_ip, r.src_port),
        endpoint(&r.dst_ip, r.dst_port),
        r.verdict,
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
        "programs:      from_port id {} (XDP, {}), to_port id {} (TCX egress)",
        s.program_ids.from_port, s.xdp_mode, s.program_ids.to_port
    );
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
            "  {:<16} ifindex {:<5} {:<7} xdp {:<6} from_port {} to_port {}{}",
            p.name,
            p.ifindex,
            p.role,
            p.xdp_mode,
            p.from_port_id,
            p.to_port_id,
            if p.pinned { "" } else { "  (not pinned)" }
        );
    }
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
    o
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
        assert_eq!(o.xdp_mode, XdpAttachMode::Skb);
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
            "--xdp-mode",
            "native",
            "--detach-on-exit",
            "--pin-dir",
            "/sys/fs/bpf/x",
        ]);
        let Command::Run(args) = cli.command else { panic!() };
        let o = args.into_options();
        assert_eq!(o.interfaces, vec!["bpvx*", "veth*"]);
        assert_eq!(o.uplinks, vec!["eth0", "eth1"]);
        assert_eq!(o.ring_size, 1 << 20);
        assert_eq!(o.xdp_mode, XdpAttachMode::Native);
        assert!(o.detach_on_exit);
        assert_eq!(o.pin_dir, PathBuf::from("/sys/fs/bpf/x"));
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
        }
    }

    #[test]
    fn flow_table_rendering() {
        let out = render_flows(&[record()]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("PROTO"));
        assert!(lines[1].contains("10.0.0.1:7") && lines[1].contains("-> ") && lines[1].contains("3/294"));
        assert!(lines[1].contains("tap0,tap1") && lines[1].ends_with("active"));
        assert!(render_flows(&[]).contains("(no flows)"));
        let msg = FollowMessage { event: FollowEvent::Start, flow: Some(record()), missed: None };
        assert!(render_follow(&msg).unwrap().contains("start   icmp   10.0.0.1:7 -> 10.0.0.2:7"));
        let upd = FollowMessage { event: FollowEvent::Update, ..msg };
        assert!(render_follow(&upd).is_none());
        assert_eq!(endpoint("fd00::1", 80), "[fd00::1]:80");
    }
}
