//! The port guard: an nftables table that cuts off the ports backplane cannot inspect.
//!
//! A port that matches `--interfaces`/`--uplink` but cannot be attached (another
//! product's XDP program holds it, its driver refuses, ...) would otherwise forward
//! everything unjudged while `status` says a rule set is in force. So while one is (the
//! failure rule set too), such a VM port's ifindex goes into the set `blocked` of this
//! agent's table in the `bridge` family, whose two base chains drop, and count, every
//! frame that enters the switch from it (`prerouting`: `iif @blocked`, in this family the
//! bridge port the frame came in on) and every frame the switch sends to it, forwarded or
//! from the host (`postrouting`: `oif @blocked`). It goes in at the first failed try, also
//! when the port is only busy for a moment (the watcher then tries again within 200 ms),
//! and leaves the set when the port is attached, goes away or stops matching. While
//! observing only, nothing is blocked: the port is reported.
//!
//! Uplinks are reported, not blocked, unless the operator asks for it (`--guard-uplinks`):
//! cutting off an uplink cuts the node off the fabric, its management traffic included,
//! while what enters through an unattached uplink is still judged where it leaves the
//! switch to a VM (`to_port` judges every frame whose ingress port has no live ingress
//! program: `PORT_INGRESS_LIVE` in `PORTS`).
//!
//! Why the bridge hooks: they see every frame of every port of a Linux bridge, whatever
//! else is attached to the port, and need nothing of the port itself. `bridge link set
//! ... isolated on` only keeps isolated ports from each other, a port's STP state cannot
//! be set while STP runs, and taking the port out of the bridge would undo the operator's
//! setup. Why ifindexes (set type `iface_index`, matched by `meta iif`/`oif`) rather than
//! interface names (`ifname`, `iifname`/`oifname`): an ifindex stays with its device
//! through a rename, so a blocked port that is renamed stays blocked in the kernel without
//! a moment in which it passes (a set of names lets it pass until the agent has put the
//! new name in); and names are reused (libvirt gives `vnetN` to the next VM), so a set of
//! names keeps blocking whatever device gets a blocked port's name, also while no agent
//! runs. A device made again under the same name has another ifindex: it is a new port,
//! tried and blocked as one. The rules stay fixed; only the set changes.
//!
//! How it talks to nftables: the `nft` binary (Debian package `nftables`, which the
//! product's package depends on) through its JSON API (`nft -j`, libnftables-json(5)).
//! Every change is one `nft -j -f -` batch, which the kernel commits as one transaction:
//! the table is rebuilt, or its set replaced, without a moment in which a blocked port
//! passes. Why not the alternatives:
//! - netlink directly would re-implement nftables' message encoding of tables, sets and
//!   expressions, which grows with the kernel and which nft (libnftables) is the
//!   reference user of; `rustables` does that but is GPL-3.0, which this MIT/Apache
//!   project cannot take, and `nftnl` binds the C library libnftnl;
//! - the `nftables` crate (0.6) runs the same binary with typed JSON; a handful of
//!   statements do not need its dependencies (schemars, strum, ...) nor its strict
//!   parsing of whole rule sets.
//!
//! Ifindexes travel as JSON numbers; nft lists an element by its device's name while the
//! ifindex has a device (its number otherwise), and the agent maps names back with
//! `if_nametoindex` (which also reads the set of names an earlier agent left). Every run
//! has a time limit. A failure is logged once (and once when it works again), shown in `status`, and
//! the port is reported as unguarded; the agent goes on.
//!
//! One table per agent, named after the node, and after the pin directory when that is
//! not the node's default (several agents on one machine, as in the tests). The table
//! stays when the agent exits or dies, so enforcement stays closed; the next agent of the
//! same pin directory reads its set and rebuilds the table with the same ports blocked,
//! then keeps only what it blocks itself once it has looked at the ports.
//! `--detach-on-exit` deletes the table. The table is made only once a port needs it.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, Write as _},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, SystemTime},
};

use backplane_common::PortRole;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use thiserror::Error;

use crate::{clock::rfc3339_ms, datapath::role_name, paths::default_pin_dir};

/// The nftables family of the table: the bridge hooks.
pub const FAMILY: &str = "bridge";
/// The set of blocked ports (ifindexes, type `iface_index`).
pub const SET: &str = "blocked";
/// The chain that drops what blocked ports send (hook prerouting).
pub const CHAIN_FROM: &str = "from_blocked_ports";
/// The chain that drops what the switch sends to blocked ports (hook postrouting).
pub const CHAIN_TO: &str = "to_blocked_ports";
/// Prefix of every table name.
pub const TABLE_PREFIX: &str = "backplane_";
/// The priority of both chains: `filter` of the bridge family. A drop in any base chain
/// drops the frame, whatever other tables accept.
const PRIORITY: i32 = -200;
/// Where Debian installs nft; `nft` on `PATH` otherwise.
const NFT_PATHS: &[&str] = &["/usr/sbin/nft", "/sbin/nft"];
/// Longest an nft run may take before it is killed.
const NFT_TIMEOUT: Duration = Duration::from_secs(10);
/// Why a port busy for a moment (see `ports`) and not blocked is unguarded.
const BUSY_TEXT: &str = "busy (another program holds it) for a moment; trying again shortly";
/// Why an unattached uplink is unguarded while rules are in force (without `--guard-uplinks`).
pub const UPLINK_TEXT: &str = "uplink: judged at the VM ports' egress; not cut off";

/// Why the port guard could not do its work.
#[derive(Debug, Error)]
pub enum GuardError {
    #[error("cannot run {binary}: {source} (the port guard needs nft, from the Debian package `nftables`)")]
    Spawn {
        binary: String,
        #[source]
        source: io::Error,
    },
    #[error("`nft {args}` failed ({status}): {stderr}")]
    Failed { args: String, status: ExitStatus, stderr: String },
    #[error("`nft {args}` did not finish within {}s and was killed", NFT_TIMEOUT.as_secs())]
    Timeout { args: String },
    #[error("cannot run `nft {args}` to its end: {source}")]
    Wait {
        args: String,
        #[source]
        source: io::Error,
    },
    #[error("`nft {args}` printed something else than nftables JSON: {source}")]
    Output {
        args: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The table's name for the agent of `node` with pins in `pin_dir`: `backplane_<node>`,
/// plus `_<pin dir name>` when the pin directory is not the node's default. Characters
/// nft does not take in a name are replaced by `_`, with a hash of the original added.
#[must_use]
pub fn table_name(node: &str, pin_dir: &Path) -> String {
    let mut name = format!("{TABLE_PREFIX}{}", identifier(node));
    if pin_dir != default_pin_dir(node) {
        let dir = pin_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.push('_');
        name.push_str(&identifier(&dir));
    }
    name
}

/// `s` as an nft identifier part (`[A-Za-z0-9_.-]`, at most 64 bytes); a changed or
/// shortened text gets an FNV-1a hash of the original, so that two names stay apart.
fn identifier(s: &str) -> String {
    const MAX: usize = 64;
    let clean: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '_' }).collect();
    if clean == s && clean.len() <= MAX {
        return clean;
    }
    let hash = s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    // Only ASCII is left, so any byte index is a character boundary.
    format!("{}_{:08x}", &clean[..clean.len().min(MAX - 9)], hash & 0xffff_ffff)
}

/// What the watcher wants for a port it could not attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guarding {
    /// A rule set is in force: block it.
    Block,
    /// Observing only: reported, never blocked.
    ReportOnly,
    /// A rule set is in force but the port is an uplink (and `--guard-uplinks` is off):
    /// reported, not blocked; what enters through it is judged at the VM ports' egress.
    ReportUplink,
}

/// A port that matches but is not attached, as the watcher hands it to the guard.
#[derive(Clone, Debug)]
pub struct Unattached {
    pub ifindex: u32,
    pub name: String,
    pub role: PortRole,
    /// The last attach error.
    pub error: String,
    /// When attaching it first failed.
    pub failing_since: SystemTime,
    pub guarding: Guarding,
    /// Busy for a moment only (another program is still on it, as on a port that just
    /// arrived): blocked all the same when `guarding` says so, but logged quietly.
    pub busy_briefly: bool,
}

/// Why a port that was unattached is no longer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Left {
    Attached,
    Gone,
    Unmatched,
}

/// A port that matches but is not attached, as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnattachedPort {
    pub name: String,
    pub ifindex: u32,
    pub role: String,
    /// The last attach error.
    pub error: String,
    /// Since when attaching it fails (RFC 3339).
    pub failing_since: String,
    /// `blocked` (its frames are dropped both ways) or `unguarded` (its traffic passes
    /// unjudged).
    pub state: String,
    /// Since when it is in `state` (RFC 3339).
    pub since: String,
    /// Why an unguarded port is not blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The port guard in `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortGuardStatus {
    /// `bridge <table name>`.
    pub table: String,
    /// Whether the table is in place (made or taken over by this agent).
    pub in_place: bool,
    /// The last nftables error, while it lasts, and since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_since: Option<String>,
    /// Ports that match but are not attached.
    pub unattached: Vec<UnattachedPort>,
}

impl PortGuardStatus {
    /// How many unattached ports are blocked and how many pass unjudged.
    #[must_use]
    pub fn counts(&self) -> (usize, usize) {
        let blocked = self.unattached.iter().filter(|p| p.state == "blocked").count();
        (blocked, self.unattached.len() - blocked)
    }
}

/// What the kernel's set holds, as far as the agent knows.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kernel {
    /// No table (none was found at start and none was needed since).
    Absent,
    /// The table is in place with these ifindexes blocked.
    Known(BTreeSet<u32>),
    /// A change failed: the next one rebuilds the table.
    Unknown,
}

/// The kind of state an unattached port is in; a change of it is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StateKind {
    Blocked,
    /// Blocked, busy for a moment only (as a port that just arrived from another node).
    BlockedBusy,
    ObservingOnly,
    /// Unguarded (observing only, or an uplink), busy for a moment only.
    Busy,
    Uplink,
    GuardFailed,
}

impl StateKind {
    fn blocked(self) -> bool {
        matches!(self, StateKind::Blocked | StateKind::BlockedBusy)
    }
}

#[derive(Clone, Debug)]
struct PortState {
    name: String,
    role: PortRole,
    error: String,
    failing_since: SystemTime,
    kind: StateKind,
    since: SystemTime,
}

#[derive(Debug, Default)]
struct Report {
    ports: BTreeMap<u32, PortState>,
    error: Option<(String, SystemTime)>,
    in_place: bool,
}

/// The nftables table of one agent and the ports it blocks.
pub struct PortGuard {
    table: String,
    /// Taken for every nft run, so that changes go in order.
    kernel: Mutex<Kernel>,
    /// What `status` reads (never held during an nft run).
    report: Mutex<Report>,
}

impl PortGuard {
    /// The guard of table `table` (see [`table_name`]); nothing is touched yet.
    #[must_use]
    pub fn new(table: String) -> Self {
        Self { table, kernel: Mutex::new(Kernel::Absent), report: Mutex::new(Report::default()) }
    }

    /// The table's name.
    #[must_use]
    pub fn table(&self) -> &str {
        &self.table
    }

    /// At start: takes over the table a previous agent left, if any. It is rebuilt with
    /// the ports it blocks, which stay blocked until the first [`PortGuard::update`].
    /// Failures are logged (as a warning when `enforcing`) and shown in `status`.
    pub fn take_over(&self, enforcing: bool) {
        let mut kernel = self.kernel.lock().expect("port guard lock");
        let outcome = match self.read() {
            Ok(None) => Ok(Kernel::Absent),
            Ok(Some(blocked)) => run_batch(&self.rebuild_batch(&blocked)).map(|()| {
                let kept = if blocked.is_empty() {
                    String::new()
                } else {
                    format!(", keeping {} blocked until this agent has tried to attach them", describe(&blocked))
                };
                log::info!("port guard: took over the nft table {FAMILY} {} a previous agent left{kept}", self.table);
                Kernel::Known(blocked)
            }),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(state) => {
                self.report.lock().expect("port guard report lock").in_place = matches!(state, Kernel::Known(_));
                *kernel = state;
            }
            Err(e) => {
                // Without nft nothing of a previous agent can be touched, nor made: there is
                // nothing to rebuild until a port needs blocking. Else the first change
                // rebuilds the table.
                *kernel = if matches!(e, GuardError::Spawn { .. }) { Kernel::Absent } else { Kernel::Unknown };
                if enforcing {
                    log::warn!("port guard: {e}; a port that cannot be attached will pass unjudged until this works");
                } else {
                    log::info!("port guard: {e} (observing only: nothing would be blocked anyway)");
                }
                self.report.lock().expect("port guard report lock").error = Some((e.to_string(), SystemTime::now()));
            }
        }
    }

    /// Puts the ports that cannot be attached into the set (those to block) or takes them
    /// out, logs each port's change of state once, and returns the ifindexes blocked now.
    /// `left`: ports no longer unattached since the last call, and why. Blocking (runs nft).
    pub fn update(&self, ports: &[Unattached], left: &[(u32, Left)]) -> BTreeSet<u32> {
        // Busy ones too: a port busy "for a moment" would otherwise pass unjudged meanwhile.
        let wanted: BTreeSet<u32> = ports.iter().filter(|p| p.guarding == Guarding::Block).map(|p| p.ifindex).collect();
        let mut kernel = self.kernel.lock().expect("port guard lock");
        let result = self.sync(&mut kernel, &wanted);
        let in_place = matches!(&*kernel, Kernel::Known(_));
        drop(kernel);

        let now = SystemTime::now();
        let mut report = self.report.lock().expect("port guard report lock");
        report.in_place = in_place;
        match &result {
            Ok(true) => {
                if let Some((e, _)) = report.error.take() {
                    log::info!("port guard: the nft table {FAMILY} {} works again (it failed: {e})", self.table);
                }
            }
            Ok(false) => {}
            Err(e) => {
                let text = e.to_string();
                if report.error.as_ref().is_none_or(|(old, _)| *old != text) {
                    log::error!("port guard: {text}");
                    report.error = Some((text, now));
                }
            }
        }
        let guard_error = report.error.as_ref().map(|(e, _)| e.clone()).unwrap_or_default();
        let mut blocked = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for p in ports {
            seen.insert(p.ifindex);
            let kind = if result.is_ok() && wanted.contains(&p.ifindex) {
                blocked.insert(p.ifindex);
                if p.busy_briefly { StateKind::BlockedBusy } else { StateKind::Blocked }
            } else if p.busy_briefly {
                StateKind::Busy
            } else {
                match p.guarding {
                    Guarding::ReportOnly => StateKind::ObservingOnly,
                    Guarding::ReportUplink => StateKind::Uplink,
                    Guarding::Block => StateKind::GuardFailed,
                }
            };
            let previous = report.ports.get(&p.ifindex);
            let changed = previous.is_none_or(|s| s.kind != kind);
            // Blocked, busy or not, is one state for `status`: since it went in.
            let since = match previous {
                Some(s) if !changed || (s.kind.blocked() && kind.blocked()) => s.since,
                _ => now,
            };
            if changed {
                self.log_state(p, kind, &guard_error);
            } else if let Some(old) = previous.map(|s| &s.name).filter(|&old| *old != p.name) {
                // The set holds ifindexes: a renamed port is in the same state as before.
                let state = if kind.blocked() { "blocked" } else { "unguarded" };
                log::info!("port {old} (ifindex {}) is now named {}: still {state}", p.ifindex, p.name);
            }
            report.ports.insert(
                p.ifindex,
                PortState {
                    name: p.name.clone(),
                    role: p.role,
                    error: p.error.clone(),
                    failing_since: p.failing_since,
                    kind,
                    since,
                },
            );
        }
        let why: BTreeMap<u32, Left> = left.iter().copied().collect();
        report.ports.retain(|ifindex, s| {
            if seen.contains(ifindex) {
                return true;
            }
            let cause = why.get(ifindex).copied().unwrap_or(Left::Gone);
            if s.kind.blocked() {
                let what = match cause {
                    Left::Attached => "is attached now: unblocked",
                    Left::Gone => "is gone: out of the port guard",
                    Left::Unmatched => "no longer matches --interfaces/--uplink: unblocked",
                };
                log::info!("port {} (ifindex {ifindex}) {what}", s.name);
            }
            false
        });
        blocked
    }

    /// One line per change of an unattached port's state.
    fn log_state(&self, p: &Unattached, kind: StateKind, guard_error: &str) {
        let port = format!("port {} (ifindex {}, {})", p.name, p.ifindex, role_name(p.role));
        match kind {
            StateKind::Blocked => log::error!(
                "{port}: {}; BLOCKED while rules are in force: nft table {FAMILY} {} drops its frames both ways until \
                 it can be attached (tried again every few seconds)",
                p.error,
                self.table
            ),
            StateKind::BlockedBusy => log::info!(
                "{port}: {}; busy for a moment: blocked while rules are in force (nft table {FAMILY} {}) until it \
                 can be attached, trying again shortly",
                p.error,
                self.table
            ),
            StateKind::ObservingOnly => log::warn!(
                "{port}: {}; left uninspected: observing only (no rules in force), so it is reported, not blocked",
                p.error
            ),
            StateKind::Busy => log::debug!("{port}: {}; {BUSY_TEXT}", p.error),
            StateKind::Uplink => log::warn!(
                "{port}: {}; left uninspected at its ingress while rules are in force: {UPLINK_TEXT} \
                 (--guard-uplinks would block it)",
                p.error
            ),
            StateKind::GuardFailed => log::error!(
                "{port}: {}; UNGUARDED: its traffic passes unjudged while rules are in force, because the port guard \
                 cannot block it: {guard_error}",
                p.error
            ),
        }
    }

    /// Makes the kernel's set hold `wanted`. Returns whether nft ran (and worked).
    fn sync(&self, kernel: &mut Kernel, wanted: &BTreeSet<u32>) -> Result<bool, GuardError> {
        let result = match &*kernel {
            Kernel::Absent if wanted.is_empty() => return Ok(false),
            Kernel::Absent | Kernel::Unknown => run_batch(&self.rebuild_batch(wanted)),
            Kernel::Known(blocked) if blocked != wanted => run_batch(&self.replace_batch(wanted)).or_else(|e| {
                log::warn!("port guard: {e}; rebuilding the nft table {FAMILY} {}", self.table);
                run_batch(&self.rebuild_batch(wanted))
            }),
            Kernel::Known(_) if wanted.is_empty() => return Ok(false),
            // Ports are blocked: check that nobody removed them (a firewall reload that
            // flushes the whole rule set, an operator), and put them back if so.
            Kernel::Known(_) => match self.read() {
                Ok(Some(found)) if found == *wanted => Ok(()),
                Ok(found) => {
                    log::warn!(
                        "port guard: the nft table {FAMILY} {} was changed from outside (blocked: {}); rebuilding it",
                        self.table,
                        found.as_ref().map_or_else(|| "no table".to_owned(), describe)
                    );
                    run_batch(&self.rebuild_batch(wanted))
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => {
                *kernel = Kernel::Known(wanted.clone());
                Ok(true)
            }
            Err(e) => {
                *kernel = Kernel::Unknown;
                Err(e)
            }
        }
    }

    /// At exit with `--detach-on-exit`: deletes the table (if this agent made or took
    /// over one, or the last change failed).
    pub fn remove(&self) {
        let mut kernel = self.kernel.lock().expect("port guard lock");
        if *kernel == Kernel::Absent {
            return;
        }
        let batch = json!({ "nftables": [
            { "add": { "table": { "family": FAMILY, "name": self.table } } },
            { "delete": { "table": { "family": FAMILY, "name": self.table } } },
        ]});
        match run_batch(&batch) {
            Ok(()) => {
                log::info!("port guard: removed the nft table {FAMILY} {}", self.table);
                *kernel = Kernel::Absent;
            }
            Err(e) => log::warn!("port guard: cannot remove the nft table {FAMILY} {}: {e}", self.table),
        }
    }

    /// At exit without `--detach-on-exit`: the table stays, and says so if it blocks.
    pub fn leave_in_place(&self) {
        if let Kernel::Known(blocked) = &*self.kernel.lock().expect("port guard lock")
            && !blocked.is_empty()
        {
            log::info!(
                "port guard: {} stay blocked by the nft table {FAMILY} {} until the next agent takes it over",
                describe(blocked),
                self.table
            );
        }
    }

    /// What `status` shows.
    #[must_use]
    pub fn status(&self) -> PortGuardStatus {
        let report = self.report.lock().expect("port guard report lock");
        let ms = |t: SystemTime| {
            rfc3339_ms(
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            )
        };
        let guard_error = report.error.as_ref().map_or("unknown", |(e, _)| e.as_str());
        PortGuardStatus {
            table: format!("{FAMILY} {}", self.table),
            in_place: report.in_place,
            error: report.error.as_ref().map(|(e, _)| e.clone()),
            error_since: report.error.as_ref().map(|(_, t)| ms(*t)),
            unattached: report
                .ports
                .iter()
                .map(|(&ifindex, s)| UnattachedPort {
                    name: s.name.clone(),
                    ifindex,
                    role: role_name(s.role).into(),
                    error: s.error.clone(),
                    failing_since: ms(s.failing_since),
                    state: if s.kind.blocked() { "blocked" } else { "unguarded" }.into(),
                    since: ms(s.since),
                    reason: match s.kind {
                        StateKind::Blocked | StateKind::BlockedBusy => None,
                        StateKind::ObservingOnly => {
                            Some("observing only (no rules in force): reported, not blocked".into())
                        }
                        StateKind::Busy => Some(BUSY_TEXT.into()),
                        StateKind::Uplink => Some(UPLINK_TEXT.into()),
                        StateKind::GuardFailed => Some(format!("the port guard cannot block it: {guard_error}")),
                    },
                })
                .collect(),
        }
    }

    /// The ifindexes in the table's set; `None` when the table does not exist.
    fn read(&self) -> Result<Option<BTreeSet<u32>>, GuardError> {
        let tables = run_json(&["-j", "list", "tables", FAMILY])?;
        let exists = objects(&tables, "table").any(|t| t["name"].as_str() == Some(self.table.as_str()));
        if !exists {
            return Ok(None);
        }
        let table = run_json(&["-j", "list", "table", FAMILY, &self.table])?;
        Ok(Some(set_members(&table)))
    }

    /// Deletes and makes the table afresh with `blocked` in its set, in one transaction
    /// (the `add` first makes the `delete` work when there is no table yet).
    fn rebuild_batch(&self, blocked: &BTreeSet<u32>) -> Value {
        let t = self.table.as_str();
        let chain = |name: &str, hook: &str| {
            json!({ "add": { "chain": {
                "family": FAMILY, "table": t, "name": name,
                "type": "filter", "hook": hook, "prio": PRIORITY, "policy": "accept",
            } } })
        };
        let rule = |chain: &str, key: &str| {
            json!({ "add": { "rule": { "family": FAMILY, "table": t, "chain": chain, "expr": [
                { "match": { "op": "==", "left": { "meta": { "key": key } }, "right": format!("@{SET}") } },
                { "counter": null },
                { "drop": null },
            ] } } })
        };
        let mut batch = vec![
            json!({ "add": { "table": { "family": FAMILY, "name": t } } }),
            json!({ "delete": { "table": { "family": FAMILY, "name": t } } }),
            json!({ "add": { "table": { "family": FAMILY, "name": t } } }),
            json!({ "add": { "set": { "family": FAMILY, "table": t, "name": SET, "type": "iface_index" } } }),
            chain(CHAIN_FROM, "prerouting"),
            chain(CHAIN_TO, "postrouting"),
            rule(CHAIN_FROM, "iif"),
            rule(CHAIN_TO, "oif"),
        ];
        batch.extend(self.add_elements(blocked));
        json!({ "nftables": batch })
    }

    /// Replaces the set's ports with `blocked`, in one transaction.
    fn replace_batch(&self, blocked: &BTreeSet<u32>) -> Value {
        let mut batch = vec![json!({ "flush": { "set": { "family": FAMILY, "table": self.table, "name": SET } } })];
        batch.extend(self.add_elements(blocked));
        json!({ "nftables": batch })
    }

    /// Ifindexes as JSON numbers: nft takes a string as a device name, to resolve.
    fn add_elements(&self, blocked: &BTreeSet<u32>) -> Option<Value> {
        (!blocked.is_empty()).then(
            || json!({ "add": { "element": { "family": FAMILY, "table": self.table, "name": SET, "elem": blocked } } }),
        )
    }
}

/// Runs `batch` as one `nft -j -f -` transaction.
fn run_batch(batch: &Value) -> Result<(), GuardError> {
    run_nft(&["-j", "-f", "-"], Some(batch.to_string())).map(drop)
}

/// Blocked ports for the log: `tap7 (ifindex 7)`, or `ifindex 9 (no such device)`.
fn describe(blocked: &BTreeSet<u32>) -> String {
    if blocked.is_empty() {
        return "none".into();
    }
    blocked
        .iter()
        .map(|&i| {
            crate::ifnames::index_to_name(i)
                .map_or_else(|| format!("ifindex {i} (no such device)"), |n| format!("{n} (ifindex {i})"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The objects of kind `kind` (`table`, `set`, ...) in nft's JSON output.
fn objects<'a>(output: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> {
    output["nftables"].as_array().into_iter().flatten().filter_map(move |o| o.get(kind))
}

/// The ifindexes in the set [`SET`] of a listed table. nft lists an element as its
/// device's name while there is one, else as its number (a string, or a JSON number), or
/// as an object `{"elem": {"val": ...}}` when it carries a timeout or comment. A name is
/// mapped back to its ifindex, also from a set of names an earlier agent left; a name no
/// device has is left out (there is nothing to block).
fn set_members(table: &Value) -> BTreeSet<u32> {
    objects(table, "set")
        .filter(|s| s["name"].as_str() == Some(SET))
        .flat_map(|s| s["elem"].as_array().into_iter().flatten())
        .filter_map(|e| match e.get("elem").map_or(e, |o| &o["val"]) {
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            Value::String(s) => crate::ifnames::name_to_index(s).or_else(|| s.parse().ok()),
            _ => None,
        })
        .collect()
}

/// Runs nft with `args` and parses what it prints as JSON.
fn run_json(args: &[&str]) -> Result<Value, GuardError> {
    let out = run_nft(args, None)?;
    serde_json::from_str(&out).map_err(|source| GuardError::Output { args: args.join(" "), source })
}

/// Runs nft with `args` (and `input` on its standard input) and returns what it printed,
/// killing it after [`NFT_TIMEOUT`].
fn run_nft(args: &[&str], input: Option<String>) -> Result<String, GuardError> {
    let binary = NFT_PATHS.iter().copied().find(|p| Path::new(p).exists()).unwrap_or("nft");
    let shown = args.join(" ");
    let mut child = Command::new(binary)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| GuardError::Spawn { binary: binary.into(), source })?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    // Writing and waiting happen on a thread of their own, so that an nft that hangs
    // (reading its input or later) is killed at the time limit.
    let waiter = std::thread::Builder::new().name("nft".into()).spawn(move || {
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            // A failed write shows in nft's exit status and error output.
            let _ = stdin.write_all(text.as_bytes());
        }
        let _ = tx.send(child.wait_with_output());
    });
    let kill = || {
        // SAFETY: kill has no memory effects; the child is not reaped until its waiter
        // returns, so the pid is still the child's.
        unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap_or(0).max(1), libc::SIGKILL) };
    };
    if let Err(source) = waiter {
        kill();
        return Err(GuardError::Wait { args: shown, source });
    }
    match rx.recv_timeout(NFT_TIMEOUT) {
        Ok(Ok(output)) if output.status.success() => Ok(String::from_utf8_lossy(&output.stdout).into_owned()),
        Ok(Ok(output)) => Err(GuardError::Failed {
            args: shown,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).split_whitespace().collect::<Vec<_>>().join(" "),
        }),
        Ok(Err(source)) => Err(GuardError::Wait { args: shown, source }),
        Err(_) => {
            kill();
            Err(GuardError::Timeout { args: shown })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn table_names_follow_the_node_and_a_pin_dir_of_its_own() {
        assert_eq!(table_name("hv-01", &default_pin_dir("hv-01")), "backplane_hv-01");
        assert_eq!(table_name("hv1.example.org", &default_pin_dir("hv1.example.org")), "backplane_hv1.example.org");
        assert_eq!(
            table_name("hv1", &PathBuf::from("/sys/fs/bpf/backplane-test-0k3x901")),
            "backplane_hv1_backplane-test-0k3x901"
        );
        // Other characters are replaced, with a hash that keeps two such names apart.
        let a = table_name("hv 1", &default_pin_dir("hv 1"));
        let b = table_name("hv@1", &default_pin_dir("hv@1"));
        assert!(a.starts_with("backplane_hv_1_") && b.starts_with("backplane_hv_1_"), "{a} {b}");
        assert_ne!(a, b);
        let long = table_name(&"n".repeat(300), &default_pin_dir(&"n".repeat(300)));
        assert!(long.len() <= TABLE_PREFIX.len() + 64, "{long}");
        assert!(long.bytes().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c)), "{long}");
    }

    #[test]
    fn batches_are_one_transaction_each() {
        let guard = PortGuard::new("backplane_t".into());
        let blocked: BTreeSet<u32> = [12, 7].into();
        let batch = guard.rebuild_batch(&blocked);
        let cmds = batch["nftables"].as_array().unwrap();
        assert_eq!(cmds[0]["add"]["table"]["name"], "backplane_t");
        assert!(cmds[1]["delete"]["table"].is_object(), "{batch}");
        // By ifindex: a renamed port stays blocked, a reused name does not block a new device.
        assert_eq!(cmds[3]["add"]["set"]["type"], "iface_index");
        assert_eq!(cmds[4]["add"]["chain"]["hook"], "prerouting");
        assert_eq!(cmds[5]["add"]["chain"]["hook"], "postrouting");
        assert_eq!(cmds[6]["add"]["rule"]["expr"][0]["match"]["left"]["meta"]["key"], "iif");
        assert_eq!(cmds[7]["add"]["rule"]["expr"][0]["match"]["left"]["meta"]["key"], "oif");
        assert_eq!(cmds[7]["add"]["rule"]["expr"][2], json!({ "drop": null }));
        // Numbers: nft would take strings for device names.
        assert_eq!(cmds[8]["add"]["element"]["elem"], json!([7, 12]));
        let empty = guard.replace_batch(&BTreeSet::new());
        assert_eq!(empty["nftables"].as_array().unwrap().len(), 1, "only the flush: {empty}");
    }

    #[test]
    fn set_members_are_read_from_a_listed_table() {
        // nft 1.0.6 lists an ifindex that has a device by its name ("lo" is 1 in every
        // network namespace), one without as a number in a string.
        let listed: Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
                {"table": {"family": "bridge", "name": "backplane_t", "handle": 1}},
                {"set": {"family": "bridge", "name": "blocked", "table": "backplane_t", "type": "iface_index",
                         "handle": 1, "elem": ["lo", "4000000", 9, {"elem": {"val": "77", "comment": "x"}}]}},
                {"set": {"family": "bridge", "name": "other", "table": "backplane_t", "type": "iface_index",
                         "elem": ["5"]}}]}"#,
        )
        .unwrap();
        assert_eq!(set_members(&listed), [1, 9, 77, 4_000_000].into());
        // The set of names an earlier agent left: names of devices are mapped, others left out.
        let names: Value = serde_json::from_str(
            r#"{"nftables": [{"set": {"family": "bridge", "name": "blocked", "table": "t", "type": "ifname",
                                      "elem": ["lo", "bp-no-such-dev"]}}]}"#,
        )
        .unwrap();
        assert_eq!(set_members(&names), [1].into());
        let empty: Value = serde_json::from_str(
            r#"{"nftables": [{"set": {"family": "bridge", "name": "blocked", "table": "t", "type": "iface_index"}}]}"#,
        )
        .unwrap();
        assert!(set_members(&empty).is_empty());
        assert_eq!(describe(&[1, 4_000_000].into()), "lo (ifindex 1), ifindex 4000000 (no such device)");
    }

    #[test]
    fn nothing_runs_while_nothing_needs_blocking() {
        // No table and nothing to block: no nft run at all (observe-only nodes need none).
        let guard = PortGuard::new("backplane_never_made".into());
        let port = Unattached {
            ifindex: 7,
            name: "tap7".into(),
            role: PortRole::Vm,
            error: "cannot attach".into(),
            failing_since: SystemTime::UNIX_EPOCH,
            guarding: Guarding::ReportOnly,
            busy_briefly: false,
        };
        assert!(guard.update(std::slice::from_ref(&port), &[]).is_empty());
        let status = guard.status();
        assert!(!status.in_place && status.error.is_none(), "{status:?}");
        assert_eq!(status.unattached.len(), 1);
        assert_eq!(status.unattached[0].state, "unguarded");
        assert!(status.unattached[0].reason.as_deref().unwrap().contains("observing only"));
        assert_eq!(status.unattached[0].failing_since, "1970-01-01T00:00:00.000Z");
        assert_eq!(status.counts(), (0, 1));
        // Busy for a moment while observing: said so.
        let busy = Unattached { busy_briefly: true, ..port.clone() };
        assert!(guard.update(std::slice::from_ref(&busy), &[]).is_empty());
        assert_eq!(guard.status().unattached[0].reason.as_deref(), Some(BUSY_TEXT));
        // An uplink while rules are in force (without --guard-uplinks): reported, not cut off.
        let uplink =
            Unattached { name: "eth7".into(), role: PortRole::Uplink, guarding: Guarding::ReportUplink, ..port };
        assert!(guard.update(std::slice::from_ref(&uplink), &[]).is_empty());
        let status = guard.status();
        assert!(!status.in_place, "{status:?}");
        assert_eq!(status.unattached[0].name, "eth7", "renamed, the same port");
        assert_eq!(status.unattached[0].reason.as_deref(), Some(UPLINK_TEXT));
        assert_eq!(status.counts(), (0, 1));
        guard.update(&[], &[(7, Left::Attached)]);
        assert!(guard.status().unattached.is_empty());
        guard.remove();
    }
}
