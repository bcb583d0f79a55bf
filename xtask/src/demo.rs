//! `cargo xtask demo`: the agent on a lab of three VMs.
//!
//! Two veth VMs and one tap VM on a bridge; `backplane run` watches their ports. The VMs
//! ping each other, move 1 MiB over TCP and some UDP, and ping over IPv6; then the demo
//! prints `backplane flows` and `backplane status`. Everything (agent, VMs, bridge, pins)
//! is removed at the end, on error and on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use backplane_lab::{ChildGuard, Lab, PREFIX, Vm, cleanup_stale};

use crate::util::{self, target_dir};

/// Where the demo's agent pins its maps and programs.
const PIN_DIR: &str = "/sys/fs/bpf/backplane-demo";

/// How long the agent may take to create its control socket.
const AGENT_READY_TIMEOUT: Duration = backplane_lab::AGENT_READY_TIMEOUT;

/// How long a CLI query may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the agent may take to detach and exit after SIGINT.
const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);

/// The agent process: on every way out (error, Ctrl-C) it is asked to stop with SIGINT,
/// so that it detaches its programs, before its guard kills whatever remains.
struct Agent(ChildGuard);

impl Drop for Agent {
    fn drop(&mut self) {
        self.0.stop_with(libc::SIGINT, AGENT_STOP_GRACE);
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM only set a flag; the demo checks it between steps and unwinds, so
/// that every guard removes what it made.
fn catch_interrupts() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, handler) };
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

fn say(what: &str) {
    println!("demo: {what}");
}

pub(crate) fn run() -> Result<()> {
    catch_interrupts();
    let agent_bin = target_dir().join("debug").join("backplane");
    if !agent_bin.is_file() {
        bail!(
            "{} is missing: `cargo build -p backplane-agent` did not produce it",
            agent_bin.display()
        );
    }
    for stale in cleanup_stale(PREFIX) {
        say(&format!("removed a leftover of an earlier run: {stale}"));
    }
    remove_pin_dir();

    let result = run_lab(&agent_bin);
    remove_pin_dir();
    match &result {
        Ok(()) => say("done; lab removed"),
        Err(_) => say("lab removed"),
    }
    result
}

fn run_lab(agent_bin: &Path) -> Result<()> {
    say("creating a bridge and three VMs (a, b on veth ports; c on a tap port)");
    let lab = Lab::new(PREFIX);
    let a = lab.add_veth_vm("a", "10.77.0.1/24", Some("fd00:77::1/64"), None);
    let b = lab.add_veth_vm("b", "10.77.0.2/24", Some("fd00:77::2/64"), None);
    let c = lab.add_tap_vm("c", "10.77.0.3/24", Some("fd00:77::3/64"), None);
    for vm in [&a, &b, &c] {
        say(&format!(
            "  {}  {:<15} {:<12} port {} ({:?})",
            vm.name(),
            vm.ip(),
            vm.ip6().map(|ip| ip.to_string()).unwrap_or_default(),
            vm.host_port(),
            vm.kind()
        ));
    }
    check_interrupted()?;

    let socket = lab.socket_path();
    let mut agent_cmd = Command::new(agent_bin);
    agent_cmd
        .args(["run", "--interfaces", &lab.port_glob(), "--socket"])
        .arg(&socket)
        .args(["--pin-dir", PIN_DIR, "--detach-on-exit"])
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
        );
    say(&format!("starting `{}`", util::describe(&agent_cmd)));
    // Declared after the VMs, so it is stopped before they go.
    let mut agent = Agent(ChildGuard::spawn(&mut agent_cmd));
    wait_for_socket(&mut agent.0, &socket)?;
    say("agent ready");

    let failures = make_traffic(&a, &b, &c)?;
    // Flow starts travel through a ring buffer; give the agent a moment.
    std::thread::sleep(Duration::from_secs(1));
    check_interrupted()?;

    say("backplane flows:");
    print!("{}", cli(agent_bin, &["flows", "--socket"], &socket)?);
    check_interrupted()?;
    say("backplane status:");
    print!("{}", cli(agent_bin, &["status", "--socket"], &socket)?);

    say("stopping the agent (SIGINT; it detaches its programs)");
    let status = agent.0.stop_with(libc::SIGINT, AGENT_STOP_GRACE);
    if !status.success() {
        println!("{}", agent.0.output().trim_end());
        bail!("the agent exited with {status}");
    }
    if !failures.is_empty() {
        bail!(
            "traffic that should have passed did not: {}",
            failures.join("; ")
        );
    }
    Ok(())
}

/// Waits until the agent's control socket exists; fails (with the agent's output) if the
/// agent exits first or takes too long.
fn wait_for_socket(agent: &mut ChildGuard, socket: &Path) -> Result<()> {
    let deadline = Instant::now() + AGENT_READY_TIMEOUT;
    while !backplane_lab::wait_for_socket(agent, socket, Duration::from_millis(200)) {
        check_interrupted()?;
        if let Some(status) = agent.try_wait() {
            println!("{}", agent.output().trim_end());
            bail!(
                "`backplane run` exited ({status}) before its control socket {} appeared",
                socket.display()
            );
        }
        if Instant::now() >= deadline {
            println!("{}", agent.output().trim_end());
            bail!(
                "`backplane run` did not create {} within {AGENT_READY_TIMEOUT:?}",
                socket.display()
            );
        }
    }
    Ok(())
}

/// Pings, TCP, UDP and IPv6 between the VMs. Returns what failed (the demo goes on to
/// show the flows either way).
fn make_traffic(a: &Vm, b: &Vm, c: &Vm) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    let mut check = |what: String, ok: bool| {
        say(&format!(
            "  {what:<46} {}",
            if ok { "ok" } else { "FAILED" }
        ));
        if !ok {
            failures.push(what);
        }
    };
    check(format!("a -> b  ping {}", b.ip()), a.ping(b.ip(), 3));
    check_interrupted()?;
    check(
        format!("c -> a  ping {} (from the tap VM)", a.ip()),
        c.ping(a.ip(), 3),
    );
    check_interrupted()?;
    let b6 = b.ip6().context("b has IPv6")?;
    check(format!("a -> b  ping {b6}"), a.ping(b6, 3));
    check_interrupted()?;
    check(
        format!("c -> b  TCP, 1 MiB (iperf3) to {}", b.ip()),
        iperf3(c, b, false),
    );
    check_interrupted()?;
    check(
        format!("b -> a  UDP, 256 KiB (iperf3) to {}", a.ip()),
        iperf3(b, a, true),
    );
    check_interrupted()?;
    Ok(failures)
}

/// One iperf3 transfer from `client` to `server` (TCP 1 MiB, or UDP 256 KiB at 10 Mbit/s).
fn iperf3(client: &Vm, server: &Vm, udp: bool) -> bool {
    let server_ip = server.ip().to_string();
    let mut listener = server.spawn(&[
        "iperf3",
        "--server",
        "--one-off",
        "--bind",
        &server_ip,
        "--forceflush",
    ]);
    // Its output goes to a file: without --forceflush, "Server listening" would sit in a buffer.
    if !listener.wait_for_output("Server listening", Duration::from_secs(5)) {
        println!("{}", listener.output().trim_end());
        return false;
    }
    let mut args = vec![
        "iperf3",
        "--client",
        &server_ip,
        "--connect-timeout",
        "3000",
    ];
    if udp {
        args.extend(["--udp", "--bitrate", "10M", "--bytes", "256K"]);
    } else {
        args.extend(["--bytes", "1M"]);
    }
    let output = client.exec(&args);
    if !output.status.success() {
        println!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output.status.success()
}

/// Runs `backplane <args> <socket>` and returns its stdout.
fn cli(agent_bin: &Path, args: &[&str], socket: &Path) -> Result<String> {
    let mut command = Command::new(agent_bin);
    command.args(args).arg(socket);
    let output = util::output_with_timeout(&mut command, CLI_TIMEOUT)?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            util::describe(&command),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Removes the demo's pins, whether the agent left them (it should not) or a killed
/// demo did.
fn remove_pin_dir() {
    let dir = PathBuf::from(PIN_DIR);
    if dir.exists() {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => say(&format!("removed {PIN_DIR}")),
            Err(e) => say(&format!("cannot remove {PIN_DIR}: {e}")),
        }
    }
}
