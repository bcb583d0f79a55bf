//! Which interfaces are ports, and following them as they come and go; [`guard`]: the
//! port guard, which cuts off the ports that cannot be attached.
//!
//! The watcher is level-triggered: every link event (`RTM_NEWLINK`/`RTM_DELLINK` on
//! `RTNLGRP_LINK`), and a timer as a safety net for lost netlink messages, triggers a
//! full listing of the host's links that is compared with the attached ports. A link
//! that appears down, or appears under one name and is renamed later, is attached as
//! soon as it exists under a matching name; a deleted one is forgotten.
//!
//! A port that cannot be attached is tried again later, and handed to the port guard
//! ([`guard`]) in the same step: while a rule set is in force a VM port is
//! blocked from its first failed try until it can be attached, so that no port passes
//! unjudged; it is tried again every few seconds then, since its VM is cut off. A port
//! that is only busy (another program is still on it, as a port that just arrived from
//! another node's namespace is for a moment) is blocked all the same, tried again within
//! 200 ms (then doubling), and counts as failed (logged as an error) once it has been busy
//! for 2 s. An uplink is blocked only with `--guard-uplinks`: otherwise it is reported,
//! since what enters through it is still judged at the VM ports' egress.
//!
//! A failed port that is renamed (and still matches, in the same role) is followed under
//! its new name in the step that sees the rename; the guard's set holds ifindexes, so the
//! kernel goes on blocking it without a gap.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use backplane_common::PortRole;
use futures_util::{FutureExt as _, StreamExt as _, TryStreamExt as _, stream::BoxStream};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use rtnetlink::{Handle, MulticastGroup};
use thiserror::Error;

use crate::{
    datapath::{Datapath, IngressHook, PortError, role_name},
    error::report,
    ifnames::IfNames,
};

pub mod guard;

use guard::{Guarding, Left, PortGuard, Unattached};

/// Following the host's interfaces through netlink.
#[derive(Debug, Error)]
pub enum WatchError {
    #[error("cannot open a netlink socket for link events: {0}")]
    Socket(#[source] std::io::Error),

    #[error("cannot list the host's interfaces: {0}")]
    Dump(#[source] rtnetlink::Error),

    #[error("invalid interface pattern {pattern:?}: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
}

/// Safety-net period of a full comparison when no link event arrives.
const RESYNC_PERIOD: Duration = Duration::from_secs(5);
/// Polling period when the netlink event stream has failed.
const POLL_PERIOD: Duration = Duration::from_secs(1);
/// How long an interface whose attachment failed is left alone before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long an interface that was busy (another program still attached, e.g. a port
/// that just arrived from another node's namespace) is left alone.
const RETRY_BUSY_AFTER: Duration = Duration::from_millis(200);
/// How long a port that is blocked (cut off while it cannot be attached) is left alone.
pub const RETRY_BLOCKED_AFTER: Duration = Duration::from_secs(3);
/// How long a port may stay busy before it counts as failed (it is blocked from the first
/// failed try while a rule set is in force; this decides how loudly it is logged).
pub const BUSY_FAILS_AFTER: Duration = Duration::from_secs(2);

/// Whether an error says the device is busy (`EBUSY`) somewhere in its chain.
fn is_busy(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error) == Some(libc::EBUSY) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A port whose attachment failed, until it is attached, goes or stops matching.
#[derive(Clone, Debug)]
struct Failure {
    name: String,
    role: PortRole,
    /// When the first try of this run of failures failed.
    since: Instant,
    since_wall: SystemTime,
    last_try: Instant,
    /// The pause after the last try (for a busy port: doubling from [`RETRY_BUSY_AFTER`]).
    pause: Duration,
    /// Whether the last try failed because the port was busy.
    busy: bool,
    /// The last error, for the log and `status`.
    error: String,
    /// Whether the port guard blocks it now.
    blocked: bool,
}

impl Failure {
    /// When to try again: sooner while blocked; for a busy port, at the latest when it has
    /// been busy for [`BUSY_FAILS_AFTER`] (then it counts as failed).
    fn next_try(&self) -> Instant {
        let pause = if self.blocked { self.pause.min(RETRY_BLOCKED_AFTER) } else { self.pause };
        let mut at = self.last_try + pause;
        let fails_at = self.since + BUSY_FAILS_AFTER;
        if self.busy && fails_at > self.last_try {
            at = at.min(fails_at);
        }
        at
    }

    /// Whether it counts as failed to attach: busy ports only once busy for long.
    fn has_failed(&self) -> bool {
        !self.busy || self.last_try.duration_since(self.since) >= BUSY_FAILS_AFTER
    }
}

/// Interfaces the data path attaches to, by name.
#[derive(Clone, Debug)]
pub struct PortSelector {
    vm: Vec<glob::Pattern>,
    uplinks: Vec<glob::Pattern>,
}

fn patterns(list: &[String]) -> Result<Vec<glob::Pattern>, WatchError> {
    list.iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|p| glob::Pattern::new(p).map_err(|source| WatchError::Pattern { pattern: p.into(), source }))
        .collect()
}

impl PortSelector {
    /// VM-facing ports match `interfaces` (shell patterns, comma-separated allowed);
    /// uplinks are named by `uplinks` (names or patterns). An uplink match wins.
    pub fn new(interfaces: &[String], uplinks: &[String]) -> Result<Self, WatchError> {
        Ok(Self { vm: patterns(interfaces)?, uplinks: patterns(uplinks)? })
    }

    /// The role of an interface, or `None` if it is not a port.
    #[must_use]
    pub fn role(&self, name: &str) -> Option<PortRole> {
        if self.uplinks.iter().any(|p| p.matches(name)) {
            Some(PortRole::Uplink)
        } else if self.vm.iter().any(|p| p.matches(name)) {
            Some(PortRole::Vm)
        } else {
            None
        }
    }

    /// The patterns, for logs.
    #[must_use]
    pub fn describe(&self) -> String {
        let join = |v: &[glob::Pattern]| v.iter().map(glob::Pattern::as_str).collect::<Vec<_>>().join(",");
        format!("vm ports [{}], uplinks [{}]", join(&self.vm), join(&self.uplinks))
    }
}

/// A link of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLink {
    pub ifindex: u32,
    pub name: String,
}

/// A step towards the wanted set of ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortAction {
    Attach { ifindex: u32, name: String, role: PortRole },
    Detach { ifindex: u32, name: String },
    Rename { ifindex: u32, from: String, to: String },
}

/// Compares the host's links with the attached ports. Detaches come first so that a
/// port whose role changed with its name is attached afresh.
#[must_use]
pub fn plan(
    links: &[HostLink],
    attached: &BTreeMap<u32, (String, PortRole)>,
    selector: &PortSelector,
) -> Vec<PortAction> {
    let by_index: HashMap<u32, &str> = links.iter().map(|l| (l.ifindex, l.name.as_str())).collect();
    let mut detach = Vec::new();
    let mut other = Vec::new();
    let mut keep = HashSet::new();
    for (&ifindex, (name, role)) in attached {
        match by_index.get(&ifindex) {
            None => detach.push(PortAction::Detach { ifindex, name: name.clone() }),
            Some(&now) if now == name => {
                keep.insert(ifindex);
            }
            Some(&now) => {
                if selector.role(now) == Some(*role) {
                    keep.insert(ifindex);
                    other.push(PortAction::Rename { ifindex, from: name.clone(), to: now.into() });
                } else {
                    detach.push(PortAction::Detach { ifindex, name: name.clone() });
                }
            }
        }
    }
    for link in links {
        if keep.contains(&link.ifindex) {
            continue;
        }
        if let Some(role) = selector.role(&link.name) {
            other.push(PortAction::Attach { ifindex: link.ifindex, name: link.name.clone(), role });
        }
    }
    detach.extend(other);
    detach
}

fn host_link(msg: &LinkMessage) -> Option<HostLink> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(HostLink { ifindex: msg.header.index, name: name.clone() }),
        _ => None,
    })
}

/// Lists the links of the agent's network namespace.
pub async fn list_links(handle: &Handle) -> Result<Vec<HostLink>, WatchError> {
    let mut links = Vec::new();
    let mut dump = handle.link().get().execute();
    while let Some(msg) = dump.try_next().await.map_err(WatchError::Dump)? {
        if let Some(link) = host_link(&msg) {
            links.push(link);
        }
    }
    Ok(links)
}

/// Keeps the data path attached to the ports that exist.
pub struct PortWatcher {
    selector: PortSelector,
    datapath: Arc<Mutex<Datapath>>,
    ifnames: Arc<IfNames>,
    handle: Handle,
    messages: BoxStream<'static, NetlinkMessage<RouteNetlinkMessage>>,
    /// Ports whose attachment failed, by ifindex, to try again later.
    failed: HashMap<u32, Failure>,
    /// Blocks failed ports while a rule set is in force, and reports them.
    guard: Arc<PortGuard>,
    /// Whether uplinks that cannot be attached are blocked too (`--guard-uplinks`).
    guard_uplinks: bool,
    /// Told the ifindex of every port that goes away.
    on_removed: Option<Box<dyn Fn(u32) + Send + Sync>>,
}

impl PortWatcher {
    /// Subscribes to link events (before the first listing, so nothing falls between).
    pub fn subscribe(
        selector: PortSelector,
        datapath: Arc<Mutex<Datapath>>,
        ifnames: Arc<IfNames>,
        guard: Arc<PortGuard>,
    ) -> Result<Self, WatchError> {
        let (connection, handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).map_err(WatchError::Socket)?;
        tokio::spawn(connection);
        let messages = messages.map(|(msg, _addr)| msg).boxed();
        Ok(Self {
            selector,
            datapath,
            ifnames,
            handle,
            messages,
            failed: HashMap::new(),
            guard,
            guard_uplinks: false,
            on_removed: None,
        })
    }

    /// Blocks uplinks that cannot be attached while a rule set is in force, as VM ports
    /// are (`--guard-uplinks`). Off by default: such an uplink is reported, not cut off.
    #[must_use]
    pub fn guard_uplinks(mut self, on: bool) -> Self {
        self.guard_uplinks = on;
        self
    }

    /// Calls `f` with the ifindex of each port that is removed (after it is forgotten).
    #[must_use]
    pub fn on_port_removed(mut self, f: impl Fn(u32) + Send + Sync + 'static) -> Self {
        self.on_removed = Some(Box::new(f));
        self
    }

    /// Lists the links and attaches, detaches or renames ports to match.
    pub async fn reconcile(&mut self, deleted: &HashSet<u32>) -> Result<(), WatchError> {
        let links = list_links(&self.handle).await?;
        for link in &links {
            self.ifnames.remember(link.ifindex, &link.name);
        }
        let present: HashSet<u32> = links.iter().map(|l| l.ifindex).collect();
        // A failed port is followed while it exists and matches in the same role, renamed
        // or not: a blocked port that is renamed stays blocked (the guard's set holds
        // ifindexes) and is listed under its new name from this step on.
        let matching: HashMap<u32, (&str, PortRole)> = links
            .iter()
            .filter_map(|l| self.selector.role(&l.name).map(|role| (l.ifindex, (l.name.as_str(), role))))
            .collect();
        let mut left = Vec::new();
        self.failed.retain(|&ifindex, f| match matching.get(&ifindex) {
            Some(&(name, role)) if !deleted.contains(&ifindex) && role == f.role => {
                if f.name != name {
                    name.clone_into(&mut f.name);
                }
                true
            }
            _ => {
                left.push((ifindex, if present.contains(&ifindex) { Left::Unmatched } else { Left::Gone }));
                false
            }
        });

        let (removed, enforcing) = self.apply_plan(&links, deleted, &present, &mut left);
        self.guard_failed_ports(enforcing, left).await;
        if let Some(f) = &self.on_removed {
            for ifindex in removed {
                f(ifindex);
            }
        }
        Ok(())
    }

    /// Attaches, detaches and renames ports (under the data path's lock). Returns the
    /// ports removed and whether a rule set is in force.
    fn apply_plan(
        &mut self,
        links: &[HostLink],
        deleted: &HashSet<u32>,
        present: &HashSet<u32>,
        left: &mut Vec<(u32, Left)>,
    ) -> (Vec<u32>, bool) {
        let mut removed = Vec::new();
        let mut datapath = self.datapath.lock().expect("datapath lock");
        let enforcing = datapath.enforcing();
        // A deleted ifindex may already be reused by a new link: forget the old port first.
        for &ifindex in deleted {
            if let Some(name) = datapath.attached_name(ifindex).map(str::to_owned)
                && datapath.detach_port(ifindex)
            {
                log::info!("port {name} (ifindex {ifindex}) was removed; forgotten");
                removed.push(ifindex);
            }
        }
        let attached: BTreeMap<u32, (String, PortRole)> = datapath.attached_ports();
        for action in plan(links, &attached, &self.selector) {
            match action {
                PortAction::Attach { ifindex, name, role } => {
                    if let Some(f) = self.failed.get(&ifindex)
                        && f.name == name
                        && Instant::now() < f.next_try()
                    {
                        continue;
                    }
                    match datapath.attach_port(ifindex, &name, role) {
                        Ok(()) => {
                            let failed_for = self.failed.remove(&ifindex).map(|f| f.since.elapsed());
                            log::info!(
                                "attached to port {name} (ifindex {ifindex}, role {}, ingress {}){}",
                                role_name(role),
                                datapath.port_hook(ifindex).map_or("?", IngressHook::as_str),
                                failed_for.map_or_else(String::new, |d| format!(
                                    " after {:.1}s of failed tries",
                                    d.as_secs_f64()
                                ))
                            );
                            if failed_for.is_some() {
                                left.push((ifindex, Left::Attached));
                            }
                        }
                        Err(PortError::Vanished { .. }) => {
                            log::debug!("interface {name} (ifindex {ifindex}) went away before it could be attached");
                        }
                        Err(e) => note_failure(&mut self.failed, ifindex, &name, role, &e),
                    }
                }
                PortAction::Detach { ifindex, name } => {
                    if datapath.detach_port(ifindex) {
                        removed.push(ifindex);
                        if present.contains(&ifindex) {
                            log::info!("port {name} (ifindex {ifindex}) no longer matches; detached");
                        } else {
                            log::info!("port {name} (ifindex {ifindex}) was removed; forgotten");
                        }
                    }
                }
                PortAction::Rename { ifindex, from, to } => {
                    datapath.rename_port(ifindex, &to);
                    log::info!("port {from} (ifindex {ifindex}) was renamed to {to}");
                }
            }
        }
        (removed, enforcing)
    }

    /// Hands the failed ports to the port guard: blocked while a rule set is in force
    /// (busy ones too; uplinks only with `--guard-uplinks`), reported otherwise; `left` are
    /// the ports that are no longer failed.
    async fn guard_failed_ports(&mut self, enforcing: bool, left: Vec<(u32, Left)>) {
        let guarding = |role| match role {
            _ if !enforcing => Guarding::ReportOnly,
            PortRole::Uplink if !self.guard_uplinks => Guarding::ReportUplink,
            PortRole::Vm | PortRole::Uplink => Guarding::Block,
        };
        let ports: Vec<Unattached> = self
            .failed
            .iter()
            .map(|(&ifindex, f)| Unattached {
                ifindex,
                name: f.name.clone(),
                role: f.role,
                error: f.error.clone(),
                failing_since: f.since_wall,
                guarding: guarding(f.role),
                busy_briefly: !f.has_failed(),
            })
            .collect();
        let guard = Arc::clone(&self.guard);
        match tokio::task::spawn_blocking(move || guard.update(&ports, &left)).await {
            Ok(blocked) => {
                for (ifindex, f) in &mut self.failed {
                    f.blocked = blocked.contains(ifindex);
                }
            }
            Err(e) => log::error!("port guard: the update task failed: {e}"),
        }
    }

    /// Follows link events until the task is dropped.
    pub async fn run(mut self) {
        let mut resync = tokio::time::interval(RESYNC_PERIOD);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.reset();
        let mut events_alive = true;
        loop {
            let mut deleted = HashSet::new();
            let retry = self.failed.values().map(Failure::next_try).min();
            let retry_sleep =
                tokio::time::sleep_until(tokio::time::Instant::from_std(retry.unwrap_or_else(Instant::now)));
            tokio::select! {
                () = retry_sleep, if retry.is_some() => {}
                msg = self.messages.next(), if events_alive => {
                    if let Some(msg) = msg {
                        note_deleted(&msg, &mut deleted);
                        // Coalesce a burst of events into one comparison.
                        while let Some(Some(msg)) = self.messages.next().now_or_never() {
                            note_deleted(&msg, &mut deleted);
                        }
                    } else {
                        log::error!(
                            "the netlink link-event stream ended; polling the interfaces every {}s instead",
                            POLL_PERIOD.as_secs()
                        );
                        events_alive = false;
                        resync = tokio::time::interval(POLL_PERIOD);
                    }
                }
                _ = resync.tick() => {
                    // Legacy filters have no link events: on the periodic look (not on
                    // every link event), one removed or preceded behind the agent's back
                    // detaches its port, and the comparison below attaches it again.
                    let reattach = self.datapath.lock().expect("datapath lock").check_legacy_filters();
                    if !reattach.is_empty() {
                        log::warn!("legacy filters missing or preceded on {}: attaching again", reattach.join(", "));
                    }
                }
            }
            if let Err(e) = self.reconcile(&deleted).await {
                log::warn!("{}", report(&e));
            }
        }
    }
}

/// Records a failed try: the error (logged by the port guard when the port's state
/// changes, here at debug level) and when to try again.
fn note_failure(failed: &mut HashMap<u32, Failure>, ifindex: u32, name: &str, role: PortRole, e: &PortError) {
    let busy = is_busy(e);
    let error = report(e);
    log::debug!("{error}");
    let now = Instant::now();
    match failed.get_mut(&ifindex) {
        Some(f) if f.name == name => {
            f.pause = match (busy, f.busy) {
                // Busy for a moment: doubling up to the usual pause.
                (true, true) => (f.pause * 2).min(RETRY_AFTER),
                (true, false) => RETRY_BUSY_AFTER,
                (false, _) => RETRY_AFTER,
            };
            f.last_try = now;
            f.busy = busy;
            f.error = error;
            f.role = role;
        }
        _ => {
            let failure = Failure {
                name: name.to_owned(),
                role,
                since: now,
                since_wall: SystemTime::now(),
                last_try: now,
                pause: if busy { RETRY_BUSY_AFTER } else { RETRY_AFTER },
                busy,
                error,
                blocked: false,
            };
            failed.insert(ifindex, failure);
        }
    }
}

/// Collects the ifindex of an `RTM_DELLINK` that removes a device (not the `AF_BRIDGE`
/// notification of a port leaving its bridge).
fn note_deleted(msg: &NetlinkMessage<RouteNetlinkMessage>, deleted: &mut HashSet<u32>) {
    if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) = &msg.payload
        && link.header.interface_family == AddressFamily::Unspec
    {
        deleted.insert(link.header.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(vm: &str, up: &str) -> PortSelector {
        PortSelector::new(&[vm.to_string()], &[up.to_string()]).unwrap()
    }

    fn link(ifindex: u32, name: &str) -> HostLink {
        HostLink { ifindex, name: name.into() }
    }

    #[test]
    fn glob_matching_and_roles() {
        let s = sel("tap*,vnet*", "eth0");
        assert_eq!(s.role("tap0"), Some(PortRole::Vm));
        assert_eq!(s.role("vnet12"), Some(PortRole::Vm));
        assert_eq!(s.role("eth0"), Some(PortRole::Uplink));
        assert_eq!(s.role("eth1"), None);
        assert_eq!(s.role("lo"), None);
        assert_eq!(s.role("br0"), None);
        assert_eq!(s.role("xtap0"), None);
        // An uplink that also matches a VM pattern is an uplink.
        let s = sel("*", "bond0");
        assert_eq!(s.role("bond0"), Some(PortRole::Uplink));
        // Character classes and repeated flags.
        let s = PortSelector::new(&["bpv[ab]?".into(), " veth* ".into()], &[]).unwrap();
        assert_eq!(s.role("bpva1"), Some(PortRole::Vm));
        assert_eq!(s.role("bpvc1"), None);
        assert_eq!(s.role("veth9"), Some(PortRole::Vm));
        assert!(PortSelector::new(&["tap[".into()], &[]).is_err());
    }

    #[test]
    fn plan_attaches_new_detaches_gone_and_follows_renames() {
        let s = sel("tap*", "up0");
        let mut attached = BTreeMap::new();
        attached.insert(2, ("tap0".to_string(), PortRole::Vm));
        attached.insert(3, ("tap1".to_string(), PortRole::Vm));
        attached.insert(4, ("tap2".to_string(), PortRole::Vm));
        attached.insert(5, ("tap3".to_string(), PortRole::Vm));
        let links = vec![
            link(1, "lo"),
            link(2, "tap0"), // unchanged
            link(4, "tap9"), // renamed, still a port
            link(5, "eth5"), // renamed away
            link(6, "tap4"), // new
            link(7, "up0"),  // new uplink
        ];
        let actions = plan(&links, &attached, &s);
        assert_eq!(
            actions,
            vec![
                PortAction::Detach { ifindex: 3, name: "tap1".into() },
                PortAction::Detach { ifindex: 5, name: "tap3".into() },
                PortAction::Rename { ifindex: 4, from: "tap2".into(), to: "tap9".into() },
                PortAction::Attach { ifindex: 6, name: "tap4".into(), role: PortRole::Vm },
                PortAction::Attach { ifindex: 7, name: "up0".into(), role: PortRole::Uplink },
            ]
        );
    }

    #[test]
    fn plan_reattaches_when_a_rename_changes_the_role() {
        let s = sel("tap*", "up*");
        let mut attached = BTreeMap::new();
        attached.insert(9, ("tap0".to_string(), PortRole::Vm));
        let actions = plan(&[link(9, "up1")], &attached, &s);
        assert_eq!(
            actions,
            vec![
                PortAction::Detach { ifindex: 9, name: "tap0".into() },
                PortAction::Attach { ifindex: 9, name: "up1".into(), role: PortRole::Uplink },
            ]
        );
    }

    fn failure(busy: bool) -> Failure {
        let now = Instant::now();
        Failure {
            name: "tap0".into(),
            role: PortRole::Vm,
            since: now,
            since_wall: SystemTime::now(),
            last_try: now,
            pause: if busy { RETRY_BUSY_AFTER } else { RETRY_AFTER },
            busy,
            error: "cannot attach".into(),
            blocked: false,
        }
    }

    #[test]
    fn failed_ports_are_tried_again_sooner_while_blocked() {
        // A failure: the usual pause, and it counts at once.
        let mut f = failure(false);
        assert!(f.has_failed());
        assert_eq!(f.next_try() - f.last_try, RETRY_AFTER);
        // Blocked (its VM is cut off): every few seconds.
        f.blocked = true;
        assert_eq!(f.next_try() - f.last_try, RETRY_BLOCKED_AFTER);

        // Busy: 200 ms, doubling; it counts as failed only once busy for 2 s, and is
        // tried again at that moment at the latest.
        let mut f = failure(true);
        assert!(!f.has_failed());
        assert_eq!(f.next_try() - f.last_try, RETRY_BUSY_AFTER);
        f.last_try = f.since + Duration::from_millis(1400);
        f.pause = Duration::from_millis(1600);
        assert_eq!(f.next_try(), f.since + BUSY_FAILS_AFTER);
        assert!(!f.has_failed());
        // Blocked at once while rules are in force: tried again as soon, 2 s mark included.
        f.blocked = true;
        assert_eq!(f.next_try(), f.since + BUSY_FAILS_AFTER);
        f.blocked = false;
        f.last_try = f.since + BUSY_FAILS_AFTER;
        f.pause = Duration::from_millis(3200);
        assert!(f.has_failed());
        assert_eq!(f.next_try() - f.last_try, Duration::from_millis(3200));
        f.blocked = true;
        assert_eq!(f.next_try() - f.last_try, RETRY_BLOCKED_AFTER);
    }

    #[test]
    fn plan_is_idle_when_in_sync() {
        let s = sel("tap*", "");
        let mut attached = BTreeMap::new();
        attached.insert(2, ("tap0".to_string(), PortRole::Vm));
        assert!(plan(&[link(1, "lo"), link(2, "tap0")], &attached, &s).is_empty());
    }
}
