//! Finding and removing what labs of killed processes left behind.
//!
//! Lab names carry the creating process's pid (see `names`), so a leftover whose process
//! is gone can be removed without disturbing a lab that another live process (a test run
//! next door) is using.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::lab::{PIN_DIR_BASE, WORK_DIR_BASE};
use crate::names::{self, owner_pid};
use crate::process::run_quietly;
use crate::vm::kill_netns_processes;

/// What kind of object a [`Leftover`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LeftoverKind {
    /// A network namespace (under /run/netns).
    Netns,
    /// A link in the host namespace.
    Link,
    /// A directory of pins under bpffs.
    PinDir,
    /// A lab work directory.
    WorkDir,
    /// A log or capture file of the lab's guards.
    TempFile,
    /// An agent's port guard, an nftables table in the `bridge` family (see
    /// [`NFT_TABLE_MARK`]).
    NftTable,
}

/// How an agent whose pin directory is a lab's (`<PIN_DIR_BASE>-<suffix>`) names its port
/// guard's nftables table: `backplane_<node>_backplane-test-<suffix>` (the agent adds the
/// pin directory's name to the node's when the pin directory is not the node's default).
/// A table of the `bridge` family with this mark in its name belongs to the maker of
/// the pin directory.
pub const NFT_TABLE_MARK: &str = "_backplane-test-";

/// The nftables family of the agents' port guard tables.
const NFT_FAMILY: &str = "bridge";

/// An object named like a lab's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// What it is.
    pub kind: LeftoverKind,
    /// Its name (namespace, link) or path (directory, file).
    pub name: String,
    /// The pid of the process that made it, if its name says.
    pub owner: Option<u32>,
}

impl Leftover {
    /// Whether the process that made it is still running (never true without an owner).
    #[must_use]
    pub fn owner_alive(&self) -> bool {
        self.owner.is_some_and(|pid| Path::new("/proc").join(pid.to_string()).exists())
    }

    /// Removes it; processes still inside a namespace are killed first. Errors are
    /// ignored.
    pub fn remove(&self) {
        match self.kind {
            LeftoverKind::Netns => {
                kill_netns_processes(&self.name);
                run_quietly(&["ip", "netns", "del", &self.name]);
            }
            LeftoverKind::Link => run_quietly(&["ip", "link", "del", "dev", &self.name]),
            LeftoverKind::PinDir | LeftoverKind::WorkDir => {
                let _ignored = std::fs::remove_dir_all(&self.name);
            }
            LeftoverKind::TempFile => {
                let _ignored = std::fs::remove_file(&self.name);
            }
            LeftoverKind::NftTable => {
                run_quietly(&["nft", "delete", "table", NFT_FAMILY, &self.name]);
            }
        }
    }
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            LeftoverKind::Netns => "network namespace",
            LeftoverKind::Link => "link",
            LeftoverKind::PinDir => "pin directory",
            LeftoverKind::WorkDir => "work directory",
            LeftoverKind::TempFile => "file",
            LeftoverKind::NftTable => "nft table bridge",
        };
        write!(f, "{kind} {}", self.name)?;
        match self.owner {
            Some(pid) if self.owner_alive() => write!(f, " (made by pid {pid}, still running)"),
            Some(pid) => write!(f, " (made by pid {pid}, gone)"),
            None => write!(f, " (maker unknown)"),
        }
    }
}

/// Everything that looks like a lab's, whoever made it: namespaces named `<prefix>-*`,
/// host links named `<prefix>*`, `/sys/fs/bpf/backplane-test*`, lab work directories,
/// guard files and the port guard tables of agents with a lab's pin directory (see
/// [`NFT_TABLE_MARK`]). Namespaces come first, so that removing in order works.
pub fn leftovers(prefix: &str) -> Vec<Leftover> {
    names::check_prefix(prefix);
    let mut found = Vec::new();
    let netns_list = std::process::Command::new("ip").args(["netns", "list"]).output();
    if let Ok(output) = netns_list {
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if name.starts_with(&format!("{prefix}-")) {
                let owner = names::suffix_of_netns(prefix, name).and_then(owner_pid);
                found.push(Leftover { kind: LeftoverKind::Netns, name: name.to_owned(), owner });
            }
        }
    }
    for name in dir_names(Path::new("/sys/class/net")) {
        if name.starts_with(prefix) {
            let owner = names::suffix_of_link(prefix, &name).and_then(owner_pid);
            found.push(Leftover { kind: LeftoverKind::Link, name, owner });
        }
    }
    let (pin_parent, pin_stem) = split_base(PIN_DIR_BASE);
    for name in dir_names(&pin_parent) {
        if let Some(rest) = name.strip_prefix(&pin_stem) {
            let owner = rest.strip_prefix('-').and_then(pin_dir_owner);
            let path = pin_parent.join(&name).to_string_lossy().into_owned();
            found.push(Leftover { kind: LeftoverKind::PinDir, name: path, owner });
        }
    }
    let (work_parent, work_stem) = split_base(WORK_DIR_BASE);
    for name in dir_names(&work_parent) {
        // Only directories whose suffix decodes: other tools may share the stem.
        if let Some(owner) = name.strip_prefix(&format!("{work_stem}-")).and_then(owner_pid) {
            let path = work_parent.join(&name).to_string_lossy().into_owned();
            found.push(Leftover { kind: LeftoverKind::WorkDir, name: path, owner: Some(owner) });
        }
    }
    let temp = std::env::temp_dir();
    for (dir, stem) in [(temp.join("backplane-lab-logs"), ""), (temp.clone(), "backplane-lab-capture-")] {
        for name in dir_names(&dir) {
            let Some(rest) = name.strip_prefix(stem) else {
                continue;
            };
            if let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) {
                let path = dir.join(&name).to_string_lossy().into_owned();
                found.push(Leftover { kind: LeftoverKind::TempFile, name: path, owner: Some(pid) });
            }
        }
    }
    found.extend(nft_tables());
    found.sort_by_key(|leftover| leftover.kind);
    found
}

/// The port guard tables of agents that ran with a lab's pin directory; none when nft is
/// not installed.
fn nft_tables() -> Vec<Leftover> {
    let Ok(output) = std::process::Command::new("nft").args(["list", "tables", NFT_FAMILY]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.strip_prefix(&format!("table {NFT_FAMILY} ")))
        .filter_map(|name| {
            let (_, rest) = name.split_once(NFT_TABLE_MARK)?;
            Some(Leftover {
                kind: LeftoverKind::NftTable,
                name: name.trim().to_owned(),
                owner: pin_dir_owner(rest.trim()),
            })
        })
        .collect()
}

/// Removes every leftover (see [`leftovers`]) whose maker is not a running process, and
/// returns what it removed: what a killed run left behind. Objects of running processes,
/// this one included, are kept.
#[expect(clippy::must_use_candidate, reason = "called for its effect; the list is for reporting")]
pub fn cleanup_stale(prefix: &str) -> Vec<Leftover> {
    let stale: Vec<Leftover> = leftovers(prefix).into_iter().filter(|leftover| !leftover.owner_alive()).collect();
    for leftover in &stale {
        leftover.remove();
    }
    stale
}

/// The maker of `backplane-test-<rest>`: a lab suffix, or `<decimal pid>[-<anything>]`
/// as the agent's own tests name theirs.
fn pin_dir_owner(rest: &str) -> Option<u32> {
    owner_pid(rest).or_else(|| rest.split('-').next()?.parse().ok())
}

fn split_base(base: &str) -> (PathBuf, String) {
    let path = Path::new(base);
    let parent = path.parent().unwrap_or_else(|| Path::new("/")).to_path_buf();
    let stem = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    (parent, stem)
}

fn dir_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries.filter_map(Result::ok).map(|entry| entry.file_name().to_string_lossy().into_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{LinkRole, link_name, netns_name, suffix_for};
    use crate::process::host_run;

    /// A pid that no process has now: that of a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        pid
    }

    #[test]
    fn pin_dirs_name_their_maker() {
        assert_eq!(pin_dir_owner("0000a01"), Some(10));
        assert_eq!(pin_dir_owner("14195-17"), Some(14195));
        assert_eq!(pin_dir_owner("14195"), Some(14195));
        assert_eq!(pin_dir_owner("demo"), None);
    }

    #[test]
    fn removes_what_dead_processes_left_and_keeps_what_live_ones_use() {
        let dead = suffix_for(dead_pid(), 1295);
        let live = suffix_for(std::process::id(), 1294);
        let dead_ns = netns_name("bp", &dead, "x");
        let live_ns = netns_name("bp", &live, "x");
        let dead_link = link_name("bp", LinkRole::Bridge, &dead, None);
        let live_link = link_name("bp", LinkRole::TapPort, &live, Some(0));
        for ns in [&dead_ns, &live_ns] {
            host_run(&["ip", "netns", "add", ns]);
        }
        host_run(&["ip", "link", "add", "name", &dead_link, "type", "bridge"]);
        host_run(&["ip", "tuntap", "add", "dev", &live_link, "mode", "tap"]);
        let dead_dir = format!("{WORK_DIR_BASE}-{dead}");
        std::fs::create_dir_all(&dead_dir).unwrap();
        // Port guard tables of agents with a dead and a live lab's pin directory.
        let dead_table = format!("backplane_hv{NFT_TABLE_MARK}{dead}");
        let live_table = format!("backplane_hv{NFT_TABLE_MARK}{live}");
        for table in [&dead_table, &live_table] {
            host_run(&["nft", "add", "table", NFT_FAMILY, table]);
        }

        let removed: Vec<String> = cleanup_stale("bp").into_iter().map(|leftover| leftover.name).collect();
        let found: Vec<String> = leftovers("bp").into_iter().map(|leftover| leftover.name).collect();
        // Clean up the live ones before asserting, so that a failure leaves nothing.
        Leftover { kind: LeftoverKind::Netns, name: live_ns.clone(), owner: None }.remove();
        Leftover { kind: LeftoverKind::Link, name: live_link.clone(), owner: None }.remove();
        Leftover { kind: LeftoverKind::NftTable, name: live_table.clone(), owner: None }.remove();

        for name in [&dead_ns, &dead_link, &dead_dir, &dead_table] {
            assert!(removed.contains(name), "{name} not removed: {removed:?}");
            assert!(!found.contains(name), "{name} still there");
        }
        for name in [&live_ns, &live_link, &live_table] {
            assert!(found.contains(name), "{name} of a live process was removed");
        }
    }
}
