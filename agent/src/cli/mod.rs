//! The `backplane` command line: `run` (the agent), `flows`, `status`, `explain`, `top`,
//! `endpoint` and `audit` (clients of its control socket), `check` (a rule set, offline)
//! and `kernel` (what the running kernel offers).
//!
//! - this file: the commands and their arguments, and [`dispatch`];
//! - [`args`]: the arguments of `run` and the [`RunOptions`](crate::options::RunOptions)
//!   made of them; [`render`]: the tables and lines the clients print; [`top`]: the
//!   zone-by-zone matrix of `backplane top`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, CommandFactory as _, Parser, Subcommand, error::ErrorKind};

use crate::{
    control::{Client, ControlError, Request},
    datapath::{DATAPATH_OBJECT, kernel},
    endpoints::{
        audit::AuditRecord,
        model::{EndpointInfo, RuntimeEndpoint},
    },
    flows::FlowRecord,
    paths::DEFAULT_SOCKET,
    rules::{
        LoadedRules,
        explain::{ExplainQuery, ExplainReply, explain_packet},
    },
    run,
    status::Status,
};

pub mod args;
pub mod libvirt_hook;
pub mod render;
pub mod top;

pub use args::RunArgs;
pub use render::{render_audit, render_endpoints, render_flows, render_follow, render_follow_colored, render_status};

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
    /// libvirt's qemu hook (deploy/libvirt/qemu runs it, the domain XML on stdin): binds
    /// each interface's MAC to its tap when a guest starts, unbinds it when it stops.
    LibvirtHook(libvirt_hook::LibvirtHookArgs),
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
    /// Bind a VM port to the endpoint behind it (the host's word, as the libvirt hook
    /// says it): the port's frames must carry the endpoint's MAC and are judged as it.
    Bind {
        /// The endpoint's name [or give --mac].
        name: Option<String>,
        /// The VM port (tap) the endpoint is behind.
        #[arg(long, value_name = "IFACE")]
        port: String,
        /// The endpoint's MAC: an inventory endpoint's, or any other (then its zone is
        /// learned from its first address where zones allow it, else it is quarantined).
        #[arg(long, value_name = "MAC")]
        mac: Option<String>,
        /// The orchestrator's name of the VM, for the audit log.
        #[arg(long, value_name = "NAME")]
        domain: Option<String>,
    },
    /// The VM behind a port is gone: unbind the port.
    Unbind {
        #[arg(long, value_name = "IFACE")]
        port: String,
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
pub struct TopArgs {
    /// Print one snapshot (totals since the agent started) and exit.
    #[arg(long)]
    pub once: bool,
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
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

/// `backplane kernel`: exit 1 when a required feature is missing or a program is refused.
fn kernel_report(args: &KernelArgs) -> anyhow::Result<ExitCode> {
    let report = kernel::probe();
    let programs =
        if args.programs { Some(kernel::program_figures(DATAPATH_OBJECT).map_err(anyhow::Error::msg)?) } else { None };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "kernel": report, "programs": programs }))?);
    } else {
        print!("{}", kernel::render(&report, programs.as_deref()));
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
        Command::Top(args) => top::run(&args).await?,
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
        Command::LibvirtHook(args) => return Ok(libvirt_hook::run(&args).await),
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
        EndpointCommand::Bind { name, port, mac, domain } => {
            if name.is_none() == mac.is_none() {
                anyhow::bail!("say which endpoint: its NAME or --mac MAC (one of them)");
            }
            let info: EndpointInfo = client.call(Request::EndpointBind { port, mac, name, domain }).await?;
            print!("{}", render_endpoints(std::slice::from_ref(&info)));
        }
        EndpointCommand::Unbind { port } => {
            let _: serde_json::Value = client.call(Request::EndpointUnbind { port: port.clone() }).await?;
            println!("unbound {port}");
        }
        EndpointCommand::Moved { name, to_port } => {
            let info: EndpointInfo = client.call(Request::EndpointMoved { name, to_port }).await?;
            print!("{}", render_endpoints(std::slice::from_ref(&info)));
        }
    }
    Ok(())
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
        let color = top::stdout_wants_color();
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
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
}
