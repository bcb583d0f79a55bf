//! A "VM": a network namespace with one interface, `eth0`, whose other end is a port of
//! the lab's bridge in the host namespace.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::process::{Command, Output, Stdio};

use crate::capture::Capture;
use crate::netns::in_netns;
use crate::process::{ChildGuard, expect_success, host_exec, run_quietly};
use crate::tap::TapForwarder;

/// What kind of host port connects a [`Vm`] to the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// A veth pair: `eth0` in the namespace, `bpv<suffix><n>` on the bridge.
    Veth,
    /// A real tap device `bpt<suffix><n>` on the bridge, fed through /dev/net/tun as QEMU
    /// would feed it; `eth0` in the namespace is a second tap joined to it by a forwarder
    /// thread.
    Tap,
    /// A veth pair like [`PortKind::Veth`] but named `bpu<suffix><n>`: the node's uplink,
    /// with a "remote" host behind it.
    Uplink,
}

/// What [`crate::Lab`] passes to [`Vm::create`].
pub(crate) struct VmSpec<'a> {
    pub(crate) name: &'a str,
    pub(crate) netns: String,
    pub(crate) host_port: String,
    pub(crate) bridge: &'a str,
    pub(crate) kind: PortKind,
    pub(crate) ipv4: &'a str,
    pub(crate) ipv6: Option<&'a str>,
    pub(crate) mac: Option<&'a str>,
    /// The namespace of the bridge and host port (a [`crate::Node`]); `None`: the host's.
    pub(crate) host_netns: Option<&'a str>,
}

/// A VM of the lab. Dropping it is a VM that stops: its processes are killed, its
/// namespace and both ends of its link are deleted.
#[derive(Debug)]
pub struct Vm {
    name: String,
    netns: String,
    host_port: String,
    kind: PortKind,
    ip: Ipv4Addr,
    ip_prefix_len: u8,
    ip6: Option<Ipv6Addr>,
    mac: [u8; 6],
    forwarder: Option<TapForwarder>,
}

impl Vm {
    /// Makes the namespace, the link and the addresses. Panics with context on failure,
    /// after removing whatever it had made.
    pub(crate) fn create(spec: &VmSpec<'_>) -> Vm {
        let (ip, ip_prefix_len) = parse_cidr::<Ipv4Addr>(spec.ipv4);
        let ip6 = spec.ipv6.map(|cidr| parse_cidr::<Ipv6Addr>(cidr).0);
        let wanted_mac = spec.mac.map(|mac| parse_mac(mac).unwrap_or_else(|| panic!("bad MAC address {mac:?}")));
        host(&["ip", "netns", "add", &spec.netns]);
        // From here on, a panic drops `vm`, which removes what exists so far.
        let mut vm = Vm {
            name: spec.name.to_owned(),
            netns: spec.netns.clone(),
            host_port: spec.host_port.clone(),
            kind: spec.kind,
            ip,
            ip_prefix_len,
            ip6,
            mac: [0; 6],
            forwarder: None,
        };
        // Before eth0 exists, so that it inherits the defaults: no DAD (IPv6 usable at
        // once), no router solicitations (less noise); no IPv6 at all for an IPv4-only VM.
        // (/proc/sys/net shows the namespace of the thread that opens it.)
        let disable_ipv6 = if ip6.is_some() { "0" } else { "1" };
        vm.in_netns(|| {
            for (key, value) in [
                ("all/accept_dad", "0"),
                ("default/accept_dad", "0"),
                ("default/router_solicitations", "0"),
                ("all/disable_ipv6", disable_ipv6),
                ("default/disable_ipv6", disable_ipv6),
            ] {
                let path = format!("/proc/sys/net/ipv6/conf/{key}");
                std::fs::write(&path, value).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
            }
        });
        if let Some(node) = spec.host_netns {
            // The host port lives in a node's namespace, on that node's bridge.
            host(&[
                "ip",
                "-n",
                node,
                "link",
                "add",
                &vm.host_port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &vm.netns,
            ]);
            let port = vm.host_port.clone();
            in_netns(node, || {
                let sysctl = format!("/proc/sys/net/ipv6/conf/{port}/disable_ipv6");
                std::fs::write(&sysctl, "1").unwrap_or_else(|e| panic!("cannot write {sysctl}: {e}"));
            });
            host(&["ip", "-n", node, "link", "set", "dev", &vm.host_port, "master", spec.bridge, "up"]);
        }
        match spec.kind {
            _ if spec.host_netns.is_some() => {}
            PortKind::Veth | PortKind::Uplink => {
                host(&["ip", "link", "add", &vm.host_port, "type", "veth", "peer", "name", "eth0", "netns", &vm.netns]);
            }
            PortKind::Tap => {
                host(&["ip", "tuntap", "add", "dev", &vm.host_port, "mode", "tap"]);
                vm.forwarder = Some(TapForwarder::start(&vm.host_port, &vm.netns));
            }
        }
        // The host side is a switch port: no addresses, no IPv6 chatter of its own.
        let sysctl = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", vm.host_port);
        if spec.host_netns.is_none() {
            std::fs::write(&sysctl, "1").unwrap_or_else(|e| panic!("cannot write {sysctl}: {e}"));
        }
        if spec.host_netns.is_none() {
            host(&["ip", "link", "set", "dev", &vm.host_port, "master", spec.bridge, "up"]);
        }

        let mut batch = Vec::new();
        if let Some(mac) = spec.mac {
            batch.push(format!("link set dev eth0 address {mac}"));
        }
        batch.push(format!("address add {} dev eth0", spec.ipv4));
        if let Some(ipv6) = spec.ipv6 {
            batch.push(format!("address add {ipv6} dev eth0 nodad"));
        }
        batch.push("link set dev eth0 up".to_owned());
        batch.push("link set dev lo up".to_owned());
        ip_batch(&vm.netns, &batch.join("\n"));
        vm.mac = wanted_mac.unwrap_or_else(|| vm.read_mac());
        vm
    }

    /// The name given at creation (`"web"`).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its network namespace's name, for `ip netns exec` (`"bp-<suffix>-web"`).
    #[must_use]
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The name of its port on the bridge, in the host namespace.
    #[must_use]
    pub fn host_port(&self) -> &str {
        &self.host_port
    }

    /// The host port's interface index in the host namespace.
    #[must_use]
    pub fn host_ifindex(&self) -> u32 {
        let name = std::ffi::CString::new(self.host_port.as_str()).expect("no NUL in interface names");
        // SAFETY: name is a valid C string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index != 0, "no interface {}: {}", self.host_port, io::Error::last_os_error());
        index
    }

    /// What kind of port it has.
    #[must_use]
    pub fn kind(&self) -> PortKind {
        self.kind
    }

    /// Its IPv4 address on `eth0`.
    #[must_use]
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its IPv4 address with the prefix length (`"10.77.0.1/24"`).
    #[must_use]
    pub fn ip_cidr(&self) -> String {
        format!("{}/{}", self.ip, self.ip_prefix_len)
    }

    /// Its global IPv6 address on `eth0`, if it was given one.
    #[must_use]
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ip6
    }

    /// The MAC address of its `eth0`.
    #[must_use]
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// [`Vm::mac`] as `"02:00:00:00:00:01"`.
    #[must_use]
    pub fn mac_string(&self) -> String {
        self.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
    }

    /// Runs a command inside the VM (`ip netns exec`) and returns its output, whatever its
    /// exit status. Panics only if it cannot be started.
    #[must_use]
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `{}` in {}: {e}", args.join(" "), self.netns))
    }

    /// Like [`Vm::exec`] but panics (with stderr) unless the command succeeds; returns
    /// its stdout.
    #[expect(clippy::must_use_candidate, reason = "called for its effect; the returned text is a convenience")]
    pub fn run(&self, args: &[&str]) -> String {
        let output = self.exec(args);
        let mut full = vec!["ip", "netns", "exec", &self.netns];
        full.extend_from_slice(args);
        expect_success(&full, &output)
    }

    /// Starts a long-running command inside the VM; it is killed when the guard drops.
    #[must_use]
    pub fn spawn(&self, args: &[&str]) -> ChildGuard {
        ChildGuard::spawn(Command::new("ip").args(["netns", "exec", &self.netns]).args(args))
    }

    /// Pings `to` `count` times (0.2 s apart, 2 s timeout each); true if every echo was
    /// answered.
    pub fn ping(&self, to: impl Into<IpAddr>, count: u32) -> bool {
        let to = to.into().to_string();
        let count = count.to_string();
        self.exec(&["ping", "-n", "-q", "-c", &count, "-i", "0.2", "-W", "2", &to]).status.success()
    }

    /// Runs `f` on a thread inside the VM's namespace (sockets it opens live there).
    pub fn in_netns<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        in_netns(&self.netns, f)
    }

    /// Captures on the VM's own `eth0` (inside its namespace), with an optional filter.
    #[must_use]
    pub fn capture(&self, filter: Option<&str>) -> Capture {
        Capture::start_in(Some(&self.netns), "eth0", filter)
    }

    /// Sends raw Ethernet frames (each from the destination MAC on, at least 14 bytes) out
    /// of the VM's `eth0`, as the VM would: through an `AF_PACKET` socket inside its
    /// namespace. They reach the host port as frames the VM sent. Panics on failure.
    pub fn send_raw_frames(&self, frames: &[Vec<u8>]) {
        self.try_send_raw_frames(frames).unwrap_or_else(|e| panic!("cannot send raw frames from {}: {e}", self.name));
    }

    /// [`Vm::send_raw_frames`] returning the error instead of panicking.
    pub fn try_send_raw_frames(&self, frames: &[Vec<u8>]) -> io::Result<()> {
        self.in_netns(|| send_raw(frames))
    }

    /// Reads the MAC address of eth0 inside the namespace.
    fn read_mac(&self) -> [u8; 6] {
        let out = expect_success(
            &["ip", "-n", &self.netns, "-o", "link", "show", "dev", "eth0"],
            &host_exec(&["ip", "-n", &self.netns, "-o", "link", "show", "dev", "eth0"]),
        );
        out.split_whitespace()
            .skip_while(|word| *word != "link/ether")
            .nth(1)
            .and_then(parse_mac)
            .unwrap_or_else(|| panic!("no MAC address for eth0 in {}: {out}", self.netns))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Stop the wire first: it holds a descriptor (and so a reference) in the namespace.
        self.forwarder.take();
        kill_netns_processes(&self.netns);
        run_quietly(&["ip", "link", "del", "dev", &self.host_port]);
        run_quietly(&["ip", "netns", "del", &self.netns]);
    }
}

/// Kills (SIGKILL) every process whose network namespace is `netns`, except this one.
pub(crate) fn kill_netns_processes(netns: &str) {
    let Ok(output) = Command::new("ip").args(["netns", "pids", netns]).stderr(Stdio::null()).output() else {
        return;
    };
    let me = std::process::id();
    for pid in String::from_utf8_lossy(&output.stdout).split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
        if pid != me {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn host(args: &[&str]) -> String {
    expect_success(args, &host_exec(args))
}

/// Runs `ip -n NETNS -batch -` with `batch` on stdin; panics with ip's words on failure.
fn ip_batch(netns: &str, batch: &str) {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run ip: {e}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(batch.as_bytes())
        .unwrap_or_else(|e| panic!("cannot feed ip -batch: {e}"));
    let output = child.wait_with_output().unwrap_or_else(|e| panic!("cannot wait for ip: {e}"));
    assert!(
        output.status.success(),
        "`ip -n {netns} -batch -` failed: {}\nbatch was:\n{batch}",
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
}

fn parse_cidr<A: std::str::FromStr>(cidr: &str) -> (A, u8) {
    let parsed = cidr.split_once('/').and_then(|(addr, len)| Some((addr.parse().ok()?, len.parse().ok()?)));
    parsed.unwrap_or_else(|| panic!("{cidr:?} is not ADDRESS/PREFIX_LENGTH"))
}

/// Parses `"02:00:00:00:00:01"`.
pub(crate) fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Sends each frame through an `AF_PACKET` socket bound to `eth0` of the calling thread's
/// namespace.
fn send_raw(frames: &[Vec<u8>]) -> io::Result<()> {
    let name = std::ffi::CString::new("eth0").expect("no NUL");
    // SAFETY: name is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain socket creation; protocol 0 means the socket receives nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).expect("fits");
    addr.sll_ifindex = i32::try_from(ifindex).expect("ifindex fits in i32");
    let addr_len = u32::try_from(size_of::<libc::sockaddr_ll>()).expect("fits");
    for frame in frames {
        // SAFETY: frame and addr are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0, (&raw const addr).cast(), addr_len)
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_macs_and_cidrs() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:02"), None);
        assert_eq!(parse_cidr::<Ipv4Addr>("10.77.0.1/24"), (Ipv4Addr::new(10, 77, 0, 1), 24));
        assert_eq!(parse_cidr::<Ipv6Addr>("fd00:77::1/64").1, 64);
    }
}
