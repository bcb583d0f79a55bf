//! Several hypervisor nodes on one machine: each node is a network namespace with its
//! own bridge (`br0`), VMs hang off the bridges, bridges are joined by veth "uplinks",
//! and a management namespace (`mgmt`, 10.254.0.1/24) reaches every node for services
//! such as etcd. Everything is guarded: dropping a [`Node`], [`Vm`] or the
//! [`NodeLab`] removes what it made.
//!
//! ```text
//!   bp-<s>-mgmt: bridge mgmt 10.254.0.1 ── m<i> ══ m0 10.254.0.<10+i> (each node)
//!   bp-<s>-<node>: bridge br0 ─┬─ bpv<s><n> ══ eth0  bp-<s>-<vm>
//!                              └─ uplink0 ═══════════ uplink0 (other node's br0)
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::lab::WORK_DIR_BASE;
use crate::names::{self, LinkRole};
use crate::netns::in_netns;
use crate::process::{ChildGuard, expect_success, host_exec, run_quietly};
use crate::vm::{PortKind, Vm, VmSpec, kill_netns_processes};

/// The management network's address in the `mgmt` namespace.
pub const MGMT_IP: &str = "10.254.0.1";

/// Name of each node's bridge (inside the node's namespace).
pub const NODE_BRIDGE: &str = "br0";

/// Name of the uplink port on each node (inside the node's namespace).
pub const UPLINK_PORT: &str = "uplink0";

fn host(args: &[&str]) -> String {
    expect_success(args, &host_exec(args))
}

/// The nodes of one test: names, the management namespace and a work directory.
#[derive(Debug)]
pub struct NodeLab {
    prefix: String,
    suffix: String,
    mgmt: String,
    work_dir: PathBuf,
    next_index: AtomicU32,
}

/// A hypervisor node: a namespace with a bridge.
#[derive(Debug)]
pub struct Node {
    name: String,
    netns: String,
    index: u32,
}

impl NodeLab {
    /// Makes the management namespace (bridge `mgmt`, 10.254.0.1/24) and a work
    /// directory. `prefix` as for [`crate::Lab::new`].
    #[must_use]
    pub fn new(prefix: &str) -> NodeLab {
        names::check_prefix(prefix);
        let suffix = names::new_suffix();
        let lab = NodeLab {
            prefix: prefix.to_owned(),
            mgmt: names::netns_name(prefix, &suffix, "mgmt"),
            work_dir: PathBuf::from(format!("{WORK_DIR_BASE}-{suffix}")),
            suffix,
            next_index: AtomicU32::new(0),
        };
        let _ignored = std::fs::remove_dir_all(&lab.work_dir);
        std::fs::create_dir_all(&lab.work_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", lab.work_dir.display()));
        host(&["ip", "netns", "add", &lab.mgmt]);
        host(&["ip", "-n", &lab.mgmt, "link", "add", "mgmt", "type", "bridge", "stp_state", "0"]);
        host(&["ip", "-n", &lab.mgmt, "address", "add", &format!("{MGMT_IP}/24"), "dev", "mgmt"]);
        host(&["ip", "-n", &lab.mgmt, "link", "set", "mgmt", "up"]);
        host(&["ip", "-n", &lab.mgmt, "link", "set", "lo", "up"]);
        lab
    }

    /// This lab's suffix.
    #[must_use]
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// Scratch space (state directories, sockets, etcd's data), deleted with the lab.
    #[must_use]
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The management namespace's name (run services there with [`NodeLab::spawn_in_mgmt`]).
    #[must_use]
    pub fn mgmt_netns(&self) -> &str {
        &self.mgmt
    }

    /// Starts a command in the management namespace.
    #[must_use]
    pub fn spawn_in_mgmt(&self, args: &[&str]) -> ChildGuard {
        ChildGuard::spawn(Command::new("ip").args(["netns", "exec", &self.mgmt]).args(args))
    }

    /// Starts a one-member etcd on the management network (`http://MGMT_IP:2379`, data in
    /// the lab's work directory) and waits until it serves clients; stopped when the guard
    /// drops. The error carries etcd's output.
    pub fn start_etcd(&self) -> Result<ChildGuard, String> {
        let data = self.work_dir().join("etcd");
        let client = format!("http://{MGMT_IP}:2379");
        let data = data.to_string_lossy();
        let mut etcd = self.spawn_in_mgmt(&[
            "etcd",
            "--name",
            "lab",
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "lab=http://127.0.0.1:2380",
        ]);
        if etcd.wait_for_output("ready to serve client requests", std::time::Duration::from_secs(20)) {
            Ok(etcd)
        } else {
            Err(format!("etcd did not start:\n{}", etcd.output()))
        }
    }

    /// Adds a node: namespace `<prefix>-<suffix>-<name>` with bridge `br0` and `m0` on the
    /// management network.
    #[must_use]
    pub fn add_node(&self, name: &str) -> Node {
        names::check_vm_name(name);
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let node = Node { name: name.to_owned(), netns: names::netns_name(&self.prefix, &self.suffix, name), index };
        host(&["ip", "netns", "add", &node.netns]);
        let ns = node.netns.as_str();
        host(&["ip", "-n", ns, "link", "add", NODE_BRIDGE, "type", "bridge", "stp_state", "0", "mcast_snooping", "0"]);
        in_netns(ns, || {
            for key in ["all/disable_ipv6", "default/disable_ipv6"] {
                let path = format!("/proc/sys/net/ipv6/conf/{key}");
                std::fs::write(&path, "1").unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
            }
        });
        host(&["ip", "-n", ns, "link", "set", NODE_BRIDGE, "up"]);
        host(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        let peer = format!("m{index}");
        host(&["ip", "-n", ns, "link", "add", "m0", "type", "veth", "peer", "name", &peer, "netns", &self.mgmt]);
        host(&["ip", "-n", &self.mgmt, "link", "set", &peer, "master", "mgmt", "up"]);
        host(&["ip", "-n", ns, "address", "add", &format!("10.254.0.{}/24", 10 + index), "dev", "m0"]);
        host(&["ip", "-n", ns, "link", "set", "m0", "up"]);
        node
    }

    /// Joins the bridges of two nodes with a veth pair, `uplink0` on both sides.
    pub fn connect(&self, a: &Node, b: &Node) {
        host(&[
            "ip",
            "-n",
            &a.netns,
            "link",
            "add",
            UPLINK_PORT,
            "type",
            "veth",
            "peer",
            "name",
            UPLINK_PORT,
            "netns",
            &b.netns,
        ]);
        for n in [a, b] {
            host(&["ip", "-n", &n.netns, "link", "set", UPLINK_PORT, "master", NODE_BRIDGE, "up"]);
        }
    }

    /// Adds a VM on `node`: its own namespace with `eth0` (address, MAC), host port
    /// `<prefix>v<suffix><n>` on the node's bridge.
    #[must_use]
    pub fn add_vm(&self, node: &Node, name: &str, ipv4_cidr: &str, mac: Option<&str>) -> Vm {
        names::check_vm_name(name);
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        Vm::create(&VmSpec {
            name,
            netns: names::netns_name(&self.prefix, &self.suffix, name),
            host_port: names::link_name(&self.prefix, LinkRole::VethPort, &self.suffix, Some(index)),
            bridge: NODE_BRIDGE,
            kind: PortKind::Veth,
            ipv4: ipv4_cidr,
            ipv6: None,
            mac,
            host_netns: Some(&node.netns),
        })
    }

    /// Moves a VM's port from one node to another (same port name, MAC and addresses),
    /// as a migration moves its tap: the port leaves `from`'s bridge and joins `to`'s.
    pub fn move_vm(&self, vm: &Vm, from: &Node, to: &Node) {
        host(&["ip", "-n", &from.netns, "link", "set", "dev", vm.host_port(), "netns", &to.netns]);
        host(&["ip", "-n", &to.netns, "link", "set", "dev", vm.host_port(), "master", NODE_BRIDGE, "up"]);
    }

    /// The glob of the VM ports of this lab, for `--interfaces`.
    #[must_use]
    pub fn port_glob(&self) -> String {
        format!("{}v{}*", self.prefix, self.suffix)
    }
}

impl Drop for NodeLab {
    fn drop(&mut self) {
        kill_netns_processes(&self.mgmt);
        run_quietly(&["ip", "netns", "del", &self.mgmt]);
        let _ignored = std::fs::remove_dir_all(&self.work_dir);
    }
}

impl Node {
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's namespace, for `ip netns exec`.
    #[must_use]
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its address on the management network.
    #[must_use]
    pub fn mgmt_ip(&self) -> String {
        format!("10.254.0.{}", 10 + self.index)
    }

    /// Starts a command on the node (`ip netns exec`), e.g. its agent.
    #[must_use]
    pub fn spawn(&self, args: &[&str]) -> ChildGuard {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).args(args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        ChildGuard::spawn(&mut cmd)
    }

    /// Runs a command on the node and returns its output.
    #[must_use]
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `{}` on {}: {e}", args.join(" "), self.netns))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kill_netns_processes(&self.netns);
        run_quietly(&["ip", "netns", "del", &self.netns]);
    }
}
