//! `cargo xtask demo`: zone isolation on a lab of three VMs.
//!
//! Three VMs on one bridge, one per zone of `rules/examples/three-zones`: web
//! (10.30.0.1), db (10.40.0.1, behind a tap port) and mgmt (10.50.0.1), all in one /8 so
//! they share one L2 segment. `backplane check` validates the rules, `backplane run
//! --rules` enforces them, and the VMs try flows the rules allow, deny and audit; then
//! `backplane flows` shows each flow with the zones and the policy that decided it,
//! `backplane explain` says why one was denied, a hot reload allows it, and a broken rule
//! file is rejected while the last good rules stay in force. Everything (agent, VMs,
//! bridge, pins) is removed at the end, on error and on Ctrl-C.

use std::ffi::OsStr;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
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

/// How long a flow attempt waits (a denied one waits this long, then gives up).
const FLOW_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a change of the rule files may take to show in `backplane status` (the agent
/// puts a change in force within a second).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(3);

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

pub(crate) fn check_interrupted() -> Result<()> {
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
        bail!("{} is missing: `cargo build -p backplane-agent` did not produce it", agent_bin.display());
    }
    for stale in cleanup_stale(PREFIX) {
        say(&format!("removed a leftover of an earlier run: {stale}"));
    }
    remove_pin_dir();

    let result = run_lab(&agent_bin).and_then(|()| crate::demo_migration::run(&agent_bin));
    remove_pin_dir();
    match &result {
        Ok(()) => say("done; lab removed"),
        Err(_) => say("lab removed"),
    }
    result
}

fn run_lab(agent_bin: &Path) -> Result<()> {
    let example = util::workspace_root().join("rules/examples/three-zones");
    say(&format!("checking the rules: backplane check {}", example.display()));
    print!("{}", run_cli(agent_bin, &["check".as_ref(), example.as_os_str()])?);

    say("creating a bridge and three VMs, one per zone, on one L2 segment (10.0.0.0/8)");
    let lab = Lab::new(PREFIX);
    let web = lab.add_veth_vm("web", "10.30.0.1/8", Some("fd00:30::1/16"), None);
    let db = lab.add_tap_vm("db", "10.40.0.1/8", Some("fd00:40::1/16"), None);
    let mgmt = lab.add_veth_vm("mgmt", "10.50.0.1/8", None, None);
    for (vm, zone) in [(&web, "web"), (&db, "db"), (&mgmt, "mgmt")] {
        say(&format!(
            "  {:<5} zone {zone:<5} {:<11} {:<11} port {} ({:?})",
            vm.name(),
            vm.ip(),
            vm.ip6().map(|ip| ip.to_string()).unwrap_or_default(),
            vm.host_port(),
            vm.kind()
        ));
    }
    check_interrupted()?;

    // A copy the demo may change: the reload steps edit it.
    let rules = lab.work_dir().join("rules");
    copy_rules(&example, &rules)?;
    let socket = lab.socket_path();
    let mut agent_cmd = Command::new(agent_bin);
    agent_cmd
        .args(["run", "--interfaces", &lab.port_glob(), "--socket"])
        .arg(&socket)
        .args(["--pin-dir", PIN_DIR, "--detach-on-exit", "--rules"])
        .arg(&rules)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()));
    say(&format!("starting `{}`", util::describe(&agent_cmd)));
    // Declared after the VMs, so it is stopped before they go.
    let mut agent = Agent(ChildGuard::spawn(&mut agent_cmd));
    wait_for_socket(&mut agent.0, &socket)?;
    say("agent ready; rules generation 1 in force");

    let mut surprises = make_traffic(&web, &db, &mgmt)?;
    // Flow starts travel through a ring buffer; give the agent a moment.
    std::thread::sleep(Duration::from_secs(1));
    check_interrupted()?;

    say("backplane flows (each flow with its zones and the policy that decided it):");
    print!("{}", cli(agent_bin, &["flows", "--socket"], &socket)?);
    check_interrupted()?;

    say("why db -> web tcp/8080 was dropped: backplane explain");
    let explain = format!("explain --from {} --to {} --proto tcp --port 8080 --socket", db.ip(), web.ip());
    let explain: Vec<&str> = explain.split_whitespace().collect();
    print!("{}", cli(agent_bin, &explain, &socket)?);
    check_interrupted()?;

    surprises.extend(hot_reload(agent_bin, &socket, &rules, &web, &db)?);
    check_interrupted()?;

    say("backplane status:");
    print!("{}", cli(agent_bin, &["status", "--socket"], &socket)?);

    say("stopping the agent (SIGINT; it detaches its programs)");
    let status = agent.0.stop_with(libc::SIGINT, AGENT_STOP_GRACE);
    if !status.success() {
        println!("{}", agent.0.output().trim_end());
        bail!("the agent exited with {status}");
    }
    if !surprises.is_empty() {
        bail!("flows the rules should have decided otherwise: {}", surprises.join("; "));
    }
    Ok(())
}

/// Copies the `*.yaml` files of `from` into a new directory `to`.
fn copy_rules(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let dest = to.join(path.file_name().context("a file name")?);
            std::fs::copy(&path, &dest).with_context(|| format!("copying {} to {}", path.display(), dest.display()))?;
        }
    }
    Ok(())
}

/// Records whether a flow went as the rules say; returns a description of it if not.
fn expect(what: &str, passed: bool, allowed: bool, policy: &str) -> Option<String> {
    let verdict = if passed { "passed " } else { "dropped" };
    let expected = passed == allowed;
    say(&format!(
        "  {what:<32} {verdict}  {}",
        if expected {
            format!("as {policy} says")
        } else {
            format!("UNEXPECTED ({policy} should have {})", if allowed { "allowed it" } else { "denied it" })
        }
    ));
    (!expected).then(|| what.to_owned())
}

/// Flows between the zones: allowed, denied by a policy, denied by the default, and
/// audited. Returns the flows that did not go as the rules say.
fn make_traffic(web: &Vm, db: &Vm, mgmt: &Vm) -> Result<Vec<String>> {
    say("flows between the zones:");
    let mut surprises = Vec::new();
    let steps: [(&str, &dyn Fn() -> bool, bool, &str); 9] = [
        ("web  -> db    ping", &|| web.ping(db.ip(), 2), true, "web-to-db"),
        ("web  -> db    ping6", &|| web.ping(db.ip6().expect("db has IPv6"), 2), true, "web-to-db"),
        ("web  -> db    tcp/5432", &|| tcp_works(web, db, 5432), true, "web-to-db"),
        ("web  -> db    tcp/5433", &|| tcp_works(web, db, 5433), false, "web-to-db"),
        ("web  -> db    udp/5353", &|| udp_arrives(web, db, 5353), false, "web-to-db"),
        ("db   -> web   tcp/8080", &|| tcp_works(db, web, 8080), false, "default_inter_zone"),
        ("mgmt -> db    tcp/22", &|| tcp_works(mgmt, db, 22), true, "mgmt-to-db"),
        ("mgmt -> web   tcp/9100", &|| tcp_works(mgmt, web, 9100), true, "mgmt-to-web"),
        ("web  -> mgmt  tcp/9999 (audit)", &|| tcp_works(web, mgmt, 9999), true, "web-to-mgmt (audit mode)"),
    ];
    for (what, attempt, allowed, policy) in steps {
        surprises.extend(expect(what, attempt(), allowed, policy));
        check_interrupted()?;
    }
    Ok(surprises)
}

/// Hot reload: a new rule file allows db -> web tcp/8080, in force within a second; then
/// a broken file is rejected and the last good rules stay in force.
fn hot_reload(agent_bin: &Path, socket: &Path, rules: &Path, web: &Vm, db: &Vm) -> Result<Vec<String>> {
    say(&format!("hot reload: writing {}/reload.yaml to allow db -> web tcp/8080", rules.display()));
    let reload = "policies:\n  - name: db-to-web-8080\n    from: db\n    to: web\n    allow: [ { proto: tcp, ports: [8080] } ]\n";
    write_atomically(&rules.join("reload.yaml"), reload)?;
    let written = Instant::now();
    wait_for_status(agent_bin, socket, "\"generation\": 2,", "rules generation 2")?;
    say(&format!("  rules generation 2 in force {} ms after the write", written.elapsed().as_millis()));
    let mut surprises = Vec::new();
    surprises.extend(expect("db   -> web   tcp/8080", tcp_works(db, web, 8080), true, "db-to-web-8080"));
    check_interrupted()?;

    say("a broken rule file: policies to a zone that does not exist");
    let broken = "policies:\n  - name: db-to-nowhere\n    from: db\n    to: nowhere\n    allow: []\n";
    write_atomically(&rules.join("broken.yaml"), broken)?;
    wait_for_status(agent_bin, socket, "\"reloads_rejected\": 1,", "the rejection")?;
    let status = cli(agent_bin, &["status", "--socket"], socket)?;
    for line in status
        .lines()
        .skip_while(|line| !line.starts_with("rules:"))
        .take_while(|line| !line.starts_with("drops and audits"))
    {
        println!("{line}");
    }
    surprises.extend(expect("web  -> db    tcp/5433", tcp_works(web, db, 5433), false, "web-to-db (still)"));
    surprises.extend(expect("db   -> web   tcp/8080", tcp_works(db, web, 8080), true, "db-to-web-8080 (still)"));
    Ok(surprises)
}

/// Writes a rule file the way configuration tools should: a temporary name the agent
/// ignores (not `*.yaml`), then a rename, so the agent never reads half a file.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Polls `backplane status --json` until it contains `needle`.
fn wait_for_status(agent_bin: &Path, socket: &Path, needle: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    loop {
        if cli(agent_bin, &["status", "--json", "--socket"], socket)?.contains(needle) {
            return Ok(());
        }
        check_interrupted()?;
        if Instant::now() >= deadline {
            bail!("{what} not in `backplane status` within {RELOAD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a TCP connection from `from` to `to:port` opens and carries 64 KiB both ways.
fn tcp_works(from: &Vm, to: &Vm, port: u16) -> bool {
    let Ok(listener) = to.in_netns(|| TcpListener::bind(("0.0.0.0", port))) else {
        return false;
    };
    let server = std::thread::spawn(move || -> Option<()> {
        let (mut conn, _) = listener.accept().ok()?;
        conn.set_read_timeout(Some(FLOW_TIMEOUT)).ok()?;
        let mut buf = vec![0u8; 65536];
        conn.read_exact(&mut buf).ok()?;
        conn.write_all(&buf).ok()
    });
    let dst = SocketAddr::new(IpAddr::V4(to.ip()), port);
    let client = from.in_netns(|| -> Option<()> {
        let mut conn = TcpStream::connect_timeout(&dst, FLOW_TIMEOUT).ok()?;
        conn.set_read_timeout(Some(FLOW_TIMEOUT)).ok()?;
        conn.write_all(&vec![7u8; 65536]).ok()?;
        let mut back = vec![0u8; 65536];
        conn.read_exact(&mut back).ok()
    });
    if client.is_none() {
        // Unblock the accept (from inside `to`) so that the server thread ends.
        let local = SocketAddr::new(IpAddr::V4(to.ip()), port);
        let _ = to.in_netns(|| TcpStream::connect_timeout(&local, Duration::from_millis(200)));
    }
    let answered = server.join().ok().flatten();
    client.is_some() && answered.is_some()
}

/// Whether one UDP datagram from `from` reaches `to:port`.
fn udp_arrives(from: &Vm, to: &Vm, port: u16) -> bool {
    let Ok(rx) = to.in_netns(|| UdpSocket::bind(("0.0.0.0", port))) else {
        return false;
    };
    let Ok(tx) = from.in_netns(|| UdpSocket::bind("0.0.0.0:0")) else {
        return false;
    };
    let mut buf = [0u8; 16];
    rx.set_read_timeout(Some(FLOW_TIMEOUT)).is_ok()
        && tx.send_to(b"hello", (to.ip(), port)).is_ok()
        && rx.recv_from(&mut buf).is_ok()
}

/// Waits until the agent's control socket exists; fails (with the agent's output) if the
/// agent exits first or takes too long.
fn wait_for_socket(agent: &mut ChildGuard, socket: &Path) -> Result<()> {
    let deadline = Instant::now() + AGENT_READY_TIMEOUT;
    while !backplane_lab::wait_for_socket(agent, socket, Duration::from_millis(200)) {
        check_interrupted()?;
        if let Some(status) = agent.try_wait() {
            println!("{}", agent.output().trim_end());
            bail!("`backplane run` exited ({status}) before its control socket {} appeared", socket.display());
        }
        if Instant::now() >= deadline {
            println!("{}", agent.output().trim_end());
            bail!("`backplane run` did not create {} within {AGENT_READY_TIMEOUT:?}", socket.display());
        }
    }
    Ok(())
}

/// Runs `backplane <args> <socket>` and returns its stdout.
fn cli(agent_bin: &Path, args: &[&str], socket: &Path) -> Result<String> {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.push(socket.as_os_str());
    run_cli(agent_bin, &all)
}

/// Runs `backplane <args>` and returns its stdout; fails with its stderr unless it
/// succeeds.
fn run_cli(agent_bin: &Path, args: &[&OsStr]) -> Result<String> {
    let mut command = Command::new(agent_bin);
    command.args(args);
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
