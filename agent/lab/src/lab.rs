//! The lab: a Linux bridge standing in for a hypervisor's virtual switch, and the names
//! of everything made around it.

use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::names::{self, LinkRole};
use crate::process::{ChildGuard, host_run, run_quietly};
use crate::vm::{PortKind, Vm, VmSpec};

/// Where lab pin directories go: `<PIN_DIR_BASE>-<suffix>` under bpffs.
pub const PIN_DIR_BASE: &str = "/sys/fs/bpf/backplane-test";

/// How long [`Lab::start_agent`] waits for the agent's control socket.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where lab work directories go: `<WORK_DIR_BASE>-<suffix>`.
pub const WORK_DIR_BASE: &str = "/tmp/backplane-lab";

/// A bridge in the host namespace plus the names for everything plugged into it.
///
/// Dropping the lab deletes the bridge, [`Lab::pin_dir`] (if anything made it) and
/// [`Lab::work_dir`]. VMs are separate guards: declare them after the lab (and the agent
/// after them) so that they drop first.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    suffix: String,
    bridge: String,
    next_index: AtomicU32,
    work_dir: PathBuf,
}

impl Lab {
    /// Creates a lab whose every name starts with `prefix` (1 to 3 lowercase letters; the
    /// project's tests and demo use `"bp"`, which `cargo xtask test` checks for leftovers).
    ///
    /// Makes the bridge `<prefix>br<suffix>` (up, no address, no STP, no multicast
    /// snooping, no IPv6 of its own) and an empty work directory. Panics with context on
    /// failure.
    #[must_use]
    pub fn new(prefix: &str) -> Lab {
        names::check_prefix(prefix);
        let suffix = names::new_suffix();
        let bridge = names::link_name(prefix, LinkRole::Bridge, &suffix, None);
        let work_dir = PathBuf::from(format!("{WORK_DIR_BASE}-{suffix}"));
        let lab = Lab { prefix: prefix.to_owned(), suffix, bridge, next_index: AtomicU32::new(0), work_dir };
        // From here on, a panic drops `lab`, which removes what exists so far.
        let _ignored = std::fs::remove_dir_all(&lab.work_dir);
        std::fs::create_dir_all(&lab.work_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", lab.work_dir.display()));
        host_run(&[
            "ip",
            "link",
            "add",
            "name",
            &lab.bridge,
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ]);
        let sysctl = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", lab.bridge);
        std::fs::write(&sysctl, "1").unwrap_or_else(|e| panic!("cannot write {sysctl}: {e}"));
        host_run(&["ip", "link", "set", "dev", &lab.bridge, "up"]);
        lab
    }

    /// The prefix given to [`Lab::new`].
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// This lab's unique suffix (7 characters of `[0-9a-z]`).
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// The bridge's name, `<prefix>br<suffix>`.
    pub fn bridge_name(&self) -> &str {
        &self.bridge
    }

    /// The glob of this lab's VM-facing ports, for `backplane run --interfaces`:
    /// `"<prefix>v<suffix>*,<prefix>t<suffix>*"`.
    pub fn port_glob(&self) -> String {
        format!("{0}v{1}*,{0}t{1}*", self.prefix, self.suffix)
    }

    /// The glob of this lab's uplink ports, `"<prefix>u<suffix>*"`.
    pub fn uplink_glob(&self) -> String {
        format!("{}u{}*", self.prefix, self.suffix)
    }

    /// A scratch directory of this lab (sockets, logs), deleted with the lab.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// A control-socket path inside [`Lab::work_dir`]: `<work_dir>/bp.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.work_dir.join("bp.sock")
    }

    /// A bpffs directory for the agent's pins, `/sys/fs/bpf/backplane-test-<suffix>`. The lab
    /// does not create it, but deletes it (with all pins in it) when dropped.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("{PIN_DIR_BASE}-{}", self.suffix))
    }

    /// The arguments of `backplane run` for this lab, after `run`: `--interfaces`,
    /// `--socket` and `--pin-dir` (add `--uplink`, `--rules`... as needed).
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--interfaces".to_owned(),
            self.port_glob(),
            "--socket".to_owned(),
            self.socket_path().to_string_lossy().into_owned(),
            "--pin-dir".to_owned(),
            self.pin_dir().to_string_lossy().into_owned(),
        ]
    }

    /// Starts the agent on this lab: `<binary> run` with [`Lab::agent_args`] and then
    /// `extra_args` (`--uplink`, `--rules`, `--detach-on-exit`...; not the ones
    /// `agent_args` gives), with `RUST_LOG=info` unless the caller's environment sets it,
    /// and waits up to [`AGENT_READY_TIMEOUT`] for its control socket. Panics with the
    /// agent's output if it exits first or the socket does not appear.
    ///
    /// The guard stops it with SIGTERM (then SIGKILL) when dropped; call
    /// [`ChildGuard::stop_with`] to check how it exits.
    ///
    /// ```no_run
    /// let lab = backplane_lab::Lab::new("bp");
    /// let a = lab.add_veth_vm("a", "10.77.0.1/24", None, None);
    /// // In the agent's integration tests: env!("CARGO_BIN_EXE_backplane").
    /// let agent = lab.start_agent("target/debug/backplane", &["--detach-on-exit"]);
    /// ```
    pub fn start_agent(&self, binary: impl AsRef<Path>, extra_args: &[&str]) -> ChildGuard {
        let mut command = Command::new(binary.as_ref());
        command.arg("run").args(self.agent_args()).args(extra_args);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let mut agent = ChildGuard::spawn(&mut command);
        let socket = self.socket_path();
        if !wait_for_socket(&mut agent, &socket, AGENT_READY_TIMEOUT) {
            let exit = agent.try_wait();
            panic!(
                "`{}` did not create {} within {AGENT_READY_TIMEOUT:?} (exit: {:?}):\n{}",
                agent.label(),
                socket.display(),
                exit,
                agent.output().trim_end()
            );
        }
        agent
    }

    /// Adds a VM connected by a veth pair: namespace `<prefix>-<suffix>-<name>` with
    /// `eth0` (addresses `ipv4_cidr` and, if given, `ipv6_cidr` without DAD; MAC `mac` or
    /// a random one), host side `<prefix>v<suffix><n>` plugged into the bridge, all up.
    ///
    /// ```no_run
    /// let lab = backplane_lab::Lab::new("bp");
    /// let web = lab.add_veth_vm("web", "10.77.0.1/24", Some("fd00:77::1/64"), None);
    /// let db = lab.add_veth_vm("db", "10.77.0.2/24", None, Some("02:00:00:00:00:02"));
    /// assert!(web.ping(db.ip(), 3));
    /// ```
    pub fn add_veth_vm(&self, name: &str, ipv4_cidr: &str, ipv6_cidr: Option<&str>, mac: Option<&str>) -> Vm {
        self.add_vm(PortKind::Veth, name, ipv4_cidr, ipv6_cidr, mac)
    }

    /// Adds a VM whose bridge port is a real tap `<prefix>t<suffix><n>`, fed through
    /// /dev/net/tun as QEMU feeds one (see [`PortKind::Tap`]); otherwise as
    /// [`Lab::add_veth_vm`].
    pub fn add_tap_vm(&self, name: &str, ipv4_cidr: &str, ipv6_cidr: Option<&str>, mac: Option<&str>) -> Vm {
        self.add_vm(PortKind::Tap, name, ipv4_cidr, ipv6_cidr, mac)
    }

    /// Adds a tap VM as [`Lab::add_tap_vm`] does, but on a port named `port`: the
    /// [`Vm::host_port`] of a tap VM of this lab that was dropped, as libvirt names a new
    /// domain's tap `vnetN` again once the domain that had it is gone. The port is a new
    /// device (a new ifindex, a new device MAC) with the old name.
    pub fn add_tap_vm_on_port(
        &self,
        port: &str,
        name: &str,
        ipv4_cidr: &str,
        ipv6_cidr: Option<&str>,
        mac: Option<&str>,
    ) -> Vm {
        let ours = names::link_name(&self.prefix, LinkRole::TapPort, &self.suffix, None);
        assert!(
            port.strip_prefix(ours.as_str()).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
            "{port} is not a tap port name of this lab ({ours}<n>)"
        );
        self.add_vm_on(PortKind::Tap, name, port.to_owned(), ipv4_cidr, ipv6_cidr, mac)
    }

    /// Adds a "remote" host behind an uplink port `<prefix>u<suffix><n>` (a veth into the
    /// bridge), as a [`Vm`] of kind [`PortKind::Uplink`].
    pub fn add_uplink(&self, name: &str, ipv4_cidr: &str, ipv6_cidr: Option<&str>, mac: Option<&str>) -> Vm {
        self.add_vm(PortKind::Uplink, name, ipv4_cidr, ipv6_cidr, mac)
    }

    /// Takes the VM's port out of the bridge (the port itself stays, and up).
    pub fn unplug(&self, vm: &Vm) {
        host_run(&["ip", "link", "set", "dev", vm.host_port(), "nomaster"]);
    }

    /// Puts the VM's port (back) into the bridge, up.
    pub fn plug(&self, vm: &Vm) {
        host_run(&["ip", "link", "set", "dev", vm.host_port(), "master", &self.bridge, "up"]);
    }

    /// The names of the ports currently in the bridge (from `ip link show master`).
    pub fn bridge_ports(&self) -> Vec<String> {
        let out = host_run(&["ip", "-o", "link", "show", "master", &self.bridge]);
        out.lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .collect()
    }

    fn add_vm(&self, kind: PortKind, name: &str, ipv4: &str, ipv6: Option<&str>, mac: Option<&str>) -> Vm {
        let role = match kind {
            PortKind::Veth => LinkRole::VethPort,
            PortKind::Tap => LinkRole::TapPort,
            PortKind::Uplink => LinkRole::UplinkPort,
        };
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let host_port = names::link_name(&self.prefix, role, &self.suffix, Some(index));
        self.add_vm_on(kind, name, host_port, ipv4, ipv6, mac)
    }

    fn add_vm_on(
        &self,
        kind: PortKind,
        name: &str,
        host_port: String,
        ipv4: &str,
        ipv6: Option<&str>,
        mac: Option<&str>,
    ) -> Vm {
        names::check_vm_name(name);
        Vm::create(&VmSpec {
            name,
            netns: names::netns_name(&self.prefix, &self.suffix, name),
            host_port,
            bridge: &self.bridge,
            kind,
            ipv4,
            ipv6,
            mac,
            host_netns: None,
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            run_quietly(&["ip", "link", "del", "dev", &self.bridge]);
        }
        let _ignored = std::fs::remove_dir_all(self.pin_dir());
        let _ignored = std::fs::remove_dir_all(&self.work_dir);
    }
}

/// Waits up to `timeout` until `path` is a Unix socket (an agent's control socket
/// appears when the agent is ready). False if `process` exits first or time runs out.
pub fn wait_for_socket(process: &mut ChildGuard, path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_socket()) {
            return true;
        }
        if process.try_wait().is_some() || Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
