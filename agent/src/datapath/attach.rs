//! Attaching the data path to ports, and everything that outlives one agent: taking over
//! the links and legacy filters a previous agent left (adoption), putting this agent's
//! programs on them in place (upgrade), following renames, detaching.
//!
//! Each port has two attachments: `from_port` at its ingress hook (a TCX link, a legacy
//! `cls_bpf` filter, or XDP) and `to_port` at TC egress. Links are pinned under
//! `<pin-dir>/links/<ifname>:<kind>` so that they stay attached when the agent exits;
//! legacy filters stay in the port's `clsact` qdisc (see [`super::tc_legacy`]).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapError,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
};
use backplane_common::{
    PortInfo, PortRole,
    config::PORT_INGRESS_LIVE,
    maps::{CONFIG, PROG_FROM_PORT, PROG_FROM_PORT_TC, PROG_TO_PORT},
};

use crate::{
    datapath::{
        Datapath, IngressHook, PortError,
        kernel::TcAttach,
        pins,
        tc_legacy::{self, Direction, LegacyTcError},
    },
    error::report,
    ifnames::{index_to_name, name_to_index},
    paths::{TC_INGRESS_LINK_SUFFIX, TC_LINK_SUFFIX, XDP_LINK_SUFFIX, link_pin_kind, link_pin_path, links_dir},
};

/// One way a program is attached to a port.
#[derive(Debug)]
pub(super) enum Attachment {
    /// A bpf link pinned at `path`: it stays attached when the agent exits.
    Pinned { link: FdLink, path: PathBuf },
    /// A link a previous agent pinned at `path`, still running that agent's program
    /// until [`Datapath::upgrade_adopted`] puts this agent's program on it.
    Adopted { link: FdLink, path: PathBuf },
    /// An XDP link the kernel would not let us pin (netlink fallback): it lives as long
    /// as the agent.
    Xdp(XdpLink),
    /// A TC link that could not be pinned: it lives as long as the agent.
    Tc(SchedClassifierLink),
    /// A legacy `cls_bpf` filter at backplane's preference and handle ([`tc_legacy`]):
    /// it stays in the port's `clsact` qdisc when the agent exits. `adopted`: a previous
    /// agent's, running its program until [`Datapath::upgrade_adopted`].
    Filter { ifindex: u32, at: TcAttachType, prog_id: u32, adopted: bool },
}

impl Attachment {
    /// Whether it outlives the agent (a pinned link, or a legacy filter).
    pub(super) fn pinned(&self) -> bool {
        matches!(self, Self::Pinned { .. } | Self::Adopted { .. } | Self::Filter { .. })
    }

    /// How a TC program is attached: `tcx` or `legacy` (an XDP attachment: `xdp`).
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Self::Filter { .. } => TcAttach::Legacy.as_str(),
            Self::Xdp(_) => "xdp",
            Self::Pinned { .. } | Self::Adopted { .. } | Self::Tc(_) => TcAttach::Tcx.as_str(),
        }
    }

    fn adopted(&self) -> bool {
        matches!(self, Self::Adopted { .. } | Self::Filter { adopted: true, .. })
    }

    /// The kernel's link id and the program on the link, for a pinned link.
    pub(super) fn link_ids(&self) -> Option<(u32, u32)> {
        match self {
            Self::Pinned { link, .. } | Self::Adopted { link, .. } => {
                link.info().ok().map(|i| (i.id(), i.program_id()))
            }
            Self::Filter { prog_id, .. } => Some((0, *prog_id)),
            Self::Xdp(_) | Self::Tc(_) => None,
        }
    }

    /// Detaches: removes the pin (if any) and closes the link.
    fn detach(self) {
        match self {
            Self::Pinned { link, path } | Self::Adopted { link, path } => {
                if let Err(e) = fs::remove_file(&path)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    log::warn!("cannot remove link pin {}: {e}", path.display());
                }
                drop(link);
            }
            Self::Xdp(link) => drop(link),
            Self::Tc(link) => drop(link),
            Self::Filter { ifindex, at, prog_id, .. } => detach_filter(ifindex, at, prog_id),
        }
    }

    /// Moves the pin after the interface was renamed.
    fn rename(&mut self, new_path: PathBuf) {
        if let Self::Pinned { path, .. } | Self::Adopted { path, .. } = self {
            if *path == new_path {
                return;
            }
            match fs::rename(&*path, &new_path) {
                Ok(()) => *path = new_path,
                Err(e) => log::warn!("cannot move link pin {} to {}: {e}", path.display(), new_path.display()),
            }
        }
    }
}

/// What a previous agent left on a port: its ingress attachment (with the kind of its
/// pin, `None` for a legacy filter) and its egress attachment.
type Found = (Option<(Option<&'static str>, Attachment)>, Option<Attachment>);

/// A port the data path is attached to.
#[derive(Debug)]
pub(super) struct AttachedPort {
    pub(super) name: String,
    pub(super) role: PortRole,
    /// Where `from_port` runs, and its link.
    pub(super) hook: IngressHook,
    pub(super) ingress: Attachment,
    /// `to_port` (TCX egress).
    pub(super) tc: Attachment,
}

impl Datapath {
    /// Takes over the links a previous agent pinned under `<pin-dir>/links`.
    ///
    /// A link whose interface is gone, or whose interface `role_of` no longer takes for
    /// a port, is unpinned (detached). The others become this agent's ports, still
    /// running the previous agent's programs until [`Datapath::upgrade_adopted`]; a port
    /// that has only one of its two links gets the other attached now. `PORTS` entries of
    /// ports not adopted are removed. Returns the names of the adopted ports.
    pub fn adopt_links(&mut self, role_of: impl Fn(&str) -> Option<PortRole>) -> Vec<String> {
        let mut found: BTreeMap<u32, Found> = BTreeMap::new();
        let entries =
            fs::read_dir(links_dir(&self.pin_dir)).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
        for entry in entries {
            let path = entry.path();
            let Some(kind) = path.file_name().and_then(|n| n.to_str()).and_then(link_pin_kind) else { continue };
            let kind: &'static str = if kind == XDP_LINK_SUFFIX {
                XDP_LINK_SUFFIX
            } else if kind == TC_INGRESS_LINK_SUFFIX {
                TC_INGRESS_LINK_SUFFIX
            } else {
                TC_LINK_SUFFIX
            };
            let wanted_type = if kind == XDP_LINK_SUFFIX { pins::LINK_TYPE_XDP } else { pins::LINK_TYPE_TCX };
            let info = match pins::link_info(&path) {
                Ok(info) if info.link_type == wanted_type => info,
                Ok(info) => {
                    log::warn!("{}: a link of type {}, not ours; removing the pin", path.display(), info.link_type);
                    remove_stale_pin(&path);
                    continue;
                }
                Err(e) => {
                    log::warn!("{}: not a readable link ({e}); removing the pin", path.display());
                    remove_stale_pin(&path);
                    continue;
                }
            };
            if info.ifindex == 0 {
                log::info!("{}: its interface is gone; removing the pin", path.display());
                remove_stale_pin(&path);
                continue;
            }
            let link = match PinnedLink::from_pin(&path) {
                Ok(link) => FdLink::from(link),
                Err(e) => {
                    log::warn!("{}: cannot open the link: {}; removing the pin", path.display(), report(&e));
                    remove_stale_pin(&path);
                    continue;
                }
            };
            let slot = found.entry(info.ifindex).or_default();
            let taken = if kind == TC_LINK_SUFFIX { slot.1.is_some() } else { slot.0.is_some() };
            if taken {
                log::warn!("{}: a second {kind} link of ifindex {}; removing the pin", path.display(), info.ifindex);
                remove_stale_pin(&path);
                continue;
            }
            let adopted = Attachment::Adopted { link, path };
            if kind == TC_LINK_SUFFIX {
                slot.1 = Some(adopted);
            } else {
                slot.0 = Some((Some(kind), adopted));
            }
        }
        self.find_legacy_filters(&mut found);
        let mut adopted = Vec::new();
        for (ifindex, (ingress, tc)) in found {
            let name = index_to_name(ifindex);
            let role = name.as_deref().and_then(&role_of);
            let (Some(name), Some(role)) = (name, role) else {
                for a in ingress.map(|(_, a)| a).into_iter().chain(tc) {
                    log::info!("interface {ifindex} is no longer a port: detaching its {} attachment", a.kind());
                    a.detach();
                }
                continue;
            };
            match self.adopt_port(ifindex, &name, role, ingress, tc) {
                Ok(()) => adopted.push(name),
                Err(e) => log::error!("cannot adopt port {name}: {}; it is attached afresh", report(&e)),
            }
        }
        let stale: Vec<u32> = self.ports_map.keys().flatten().filter(|i| !self.ports.contains_key(i)).collect();
        for ifindex in stale {
            let _ = self.ports_map.remove(&ifindex);
        }
        adopted
    }

    /// Adds to `found` the legacy filters of this data path (see [`tc_legacy`]): filters
    /// at backplane's preference and handle whose program reads the `CONFIG` map this
    /// agent adopted. Filters of another agent's data path on the same machine read
    /// another `CONFIG` and are left alone.
    fn find_legacy_filters(&self, found: &mut BTreeMap<u32, Found>) {
        for (ifindex, ifname) in tc_legacy::host_interfaces() {
            for (direction, at) in
                [(Direction::Ingress, TcAttachType::Ingress), (Direction::Egress, TcAttachType::Egress)]
            {
                let filter = match tc_legacy::find_filter(ifindex, direction) {
                    Ok(Some(filter)) if self.owns_filter(filter.prog_id) => filter,
                    Ok(_) => continue,
                    Err(e) => {
                        log::warn!("{ifname}: {}", report(&e));
                        continue;
                    }
                };
                let slot = found.entry(ifindex).or_default();
                let taken = if at == TcAttachType::Egress { slot.1.is_some() } else { slot.0.is_some() };
                let attachment = Attachment::Filter { ifindex, at, prog_id: filter.prog_id, adopted: true };
                if taken {
                    // A port with a TCX link and a filter would judge its frames twice.
                    log::warn!("{ifname}: a legacy filter beside a pinned link; removing the filter ({filter})");
                    attachment.detach();
                } else if at == TcAttachType::Egress {
                    slot.1 = Some(attachment);
                } else {
                    slot.0 = Some((None, attachment));
                }
            }
        }
    }

    fn adopt_port(
        &mut self,
        ifindex: u32,
        name: &str,
        role: PortRole,
        ingress: Option<(Option<&'static str>, Attachment)>,
        tc: Option<Attachment>,
    ) -> Result<(), PortError> {
        let pin_dir = self.pin_dir.clone();
        // The interface may have been renamed while no agent ran.
        let renamed = |mut a: Attachment, kind: &str| {
            a.rename(link_pin_path(&pin_dir, name, kind));
            a
        };
        let info = self.ports_map.get(&ifindex, 0).unwrap_or_default();
        // An adopted ingress link keeps its hook (changing it would open a gap or count
        // twice); a missing one gets the hook configured for the role. A legacy filter
        // is a TC hook.
        let ingress = ingress.map(|(kind, a)| match kind {
            Some(kind) => (IngressHook::of_link(kind, info.ingress), renamed(a, kind)),
            None => (IngressHook::Tc, renamed(a, TC_INGRESS_LINK_SUFFIX)),
        });
        let tc = tc.map(|a| renamed(a, TC_LINK_SUFFIX));
        let hook = ingress.as_ref().map_or_else(|| self.hook_for(role), |(hook, _)| *hook);
        // An adopted ingress link is live; a missing one is not until attached below.
        let flags = if ingress.is_some() { info.flags | PORT_INGRESS_LIVE } else { info.flags & !PORT_INGRESS_LIVE };
        let info = PortInfo { role: role as u8, ingress: hook.port_info(), flags, ..info };
        if let Err(source) = self.ports_map.insert(ifindex, info, 0) {
            // Detached, so that the port is attached afresh without the old links.
            for a in ingress.map(|(_, a)| a).into_iter().chain(tc) {
                a.detach();
            }
            return Err(PortError::PortsMap { ifname: name.into(), ifindex, source });
        }
        let ingress = match ingress {
            Some((_, a)) => a,
            None => match self.attach_ingress(ifindex, name, hook) {
                Ok(a) => {
                    self.mark_ingress_live(ifindex, name);
                    a
                }
                Err(e) => {
                    if let Some(a) = tc {
                        a.detach();
                    }
                    let _ = self.ports_map.remove(&ifindex);
                    return Err(e);
                }
            },
        };
        let tc = match tc {
            Some(a) => a,
            None => match self.attach_tc(ifindex, name, PROG_TO_PORT, TcAttachType::Egress, TC_LINK_SUFFIX) {
                Ok(a) => a,
                Err(e) => {
                    let _ = self.ports_map.remove(&ifindex);
                    ingress.detach();
                    return Err(e);
                }
            },
        };
        self.ports.insert(ifindex, AttachedPort { name: name.into(), role, hook, ingress, tc });
        Ok(())
    }

    /// Sets [`PORT_INGRESS_LIVE`] on a port whose ingress link now exists: from here on
    /// `to_port` leaves alone what enters through it. Until then (or if this fails)
    /// `to_port` judges those frames itself.
    fn mark_ingress_live(&mut self, ifindex: u32, name: &str) {
        let result = self.ports_map.get(&ifindex, 0).and_then(|info| {
            self.ports_map.insert(ifindex, PortInfo { flags: info.flags | PORT_INGRESS_LIVE, ..info }, 0)
        });
        if let Err(e) = result {
            log::warn!("{name}: cannot mark its ingress program live in PORTS: {}", report(&e));
        }
        self.ports_changed();
    }

    /// The hook `from_port` gets on a new port of `role`.
    fn hook_for(&self, role: PortRole) -> IngressHook {
        if role == PortRole::Uplink { self.uplink_ingress } else { self.ingress }
    }

    /// Puts this agent's programs on the adopted links, one `BPF_LINK_UPDATE` per link:
    /// the kernel swaps the program of a link atomically, so every packet meets either
    /// the previous agent's program or this one's, never none. A port whose update fails
    /// is detached (its pins removed) so that the port watcher attaches it afresh.
    /// Returns the number of links updated.
    pub fn upgrade_adopted(&mut self) -> usize {
        let mut updated = 0;
        let adopted: Vec<u32> =
            self.ports.iter().filter(|(_, p)| p.ingress.adopted() || p.tc.adopted()).map(|(&i, _)| i).collect();
        for ifindex in adopted {
            let Some(mut port) = self.ports.remove(&ifindex) else { continue };
            let ingress = if port.hook == IngressHook::Tc {
                self.upgrade_tc(port.ingress, PROG_FROM_PORT_TC)
            } else {
                self.upgrade_xdp(port.ingress)
            };
            let tc = self.upgrade_tc(port.tc, PROG_TO_PORT);
            let mut why = Vec::new();
            let mut kept = |result: Result<(Attachment, bool), Kept>| match result {
                Ok((a, changed)) => {
                    updated += usize::from(changed);
                    Some(a)
                }
                Err(Kept { attachment, why: e }) => {
                    why.push(e);
                    attachment
                }
            };
            let (ingress, tc) = (kept(ingress), kept(tc));
            if !why.is_empty() {
                log::error!("{}: cannot put the new programs on it: {}", port.name, why.join("; "));
            }
            match (ingress, tc) {
                (Some(ingress), Some(tc)) => {
                    // A link whose update failed keeps the previous agent's program, which
                    // goes on judging the port (status shows its program id).
                    port.ingress = ingress;
                    port.tc = tc;
                    self.ports.insert(ifindex, port);
                }
                (ingress, tc) => {
                    log::error!("{}: an attachment was lost; attaching the port afresh", port.name);
                    // PORTS first: `to_port` judges the port's frames again before its
                    // ingress link goes.
                    let _ = self.ports_map.remove(&ifindex);
                    for a in [ingress, tc].into_iter().flatten() {
                        a.detach();
                    }
                }
            }
        }
        updated
    }

    /// Replaces the program of an adopted XDP link; returns the attachment and whether
    /// it was updated. On failure the link keeps the previous program.
    fn upgrade_xdp(&mut self, attachment: Attachment) -> Result<(Attachment, bool), Kept> {
        let Attachment::Adopted { link, path } = attachment else { return Ok((attachment, false)) };
        let prog = self.xdp_program();
        let result = XdpLink::try_from(link)
            .map_err(|e| report(&e))
            .and_then(|link| prog.attach_to_link(link).map_err(|e| report(&e)))
            .and_then(|id| prog.take_link(id).map_err(|e| report(&e)))
            .and_then(|link| FdLink::try_from(link).map_err(|e| report(&e)));
        upgraded(path, result, "XDP")
    }

    /// [`Datapath::upgrade_xdp`] for a TCX link or a legacy filter running `program`.
    fn upgrade_tc(&mut self, attachment: Attachment, program: &'static str) -> Result<(Attachment, bool), Kept> {
        if let Attachment::Filter { ifindex, at, prog_id, adopted: true } = attachment {
            let name = index_to_name(ifindex).unwrap_or_default();
            return match self.attach_filter(ifindex, &name, program, at) {
                Ok(a) => Ok((a, true)),
                Err(e) => Err(Kept {
                    attachment: Some(Attachment::Filter { ifindex, at, prog_id, adopted: true }),
                    why: format!("legacy TC {program}: {}", report(&e)),
                }),
            };
        }
        let Attachment::Adopted { link, path } = attachment else { return Ok((attachment, false)) };
        let prog = self.tc_program(program);
        let result = SchedClassifierLink::try_from(link)
            .map_err(|e| report(&e))
            .and_then(|link| prog.attach_to_link(link).map_err(|e| report(&e)))
            .and_then(|id| prog.take_link(id).map_err(|e| report(&e)))
            .and_then(|link| FdLink::try_from(link).map_err(|e| report(&e)));
        upgraded(path, result, "TC")
    }

    /// Attaches `from_port` (at the hook configured for `role`) and `to_port` (TCX
    /// egress) to a port and registers it in `PORTS`. On failure nothing of the port is
    /// left behind.
    pub fn attach_port(&mut self, ifindex: u32, name: &str, role: PortRole) -> Result<(), PortError> {
        let result = self.attach_port_entry(ifindex, name, role);
        self.ports_changed();
        result
    }

    fn attach_port_entry(&mut self, ifindex: u32, name: &str, role: PortRole) -> Result<(), PortError> {
        if name_to_index(name) != Some(ifindex) {
            return Err(PortError::Vanished { ifname: name.into(), ifindex });
        }
        let links = links_dir(&self.pin_dir);
        fs::create_dir_all(&links).map_err(|source| PortError::LinksDir {
            ifname: name.into(),
            path: links,
            source,
        })?;
        // Both halves of the rule tables get the zone of the rules in force: the half not
        // in force is rewritten for every port before it is next put in force.
        let zone = self.port_zone(name);
        let hook = self.hook_for(role);
        let info = PortInfo { role: role as u8, zone: [zone, zone], ingress: hook.port_info(), ..PortInfo::default() };
        // A fresh port starts unbound: a lock on first use or allowed sources left under
        // its ifindex were another device's.
        self.set_learned(ifindex, None);
        self.forget_allowed(ifindex);
        self.ports_map.insert(ifindex, info, 0).map_err(|source| PortError::PortsMap {
            ifname: name.into(),
            ifindex,
            source,
        })?;
        let ingress = match self.attach_ingress(ifindex, name, hook) {
            Ok(a) => {
                self.mark_ingress_live(ifindex, name);
                a
            }
            Err(e) => {
                let _ = self.ports_map.remove(&ifindex);
                return Err(e);
            }
        };
        let tc = match self.attach_tc(ifindex, name, PROG_TO_PORT, TcAttachType::Egress, TC_LINK_SUFFIX) {
            Ok(a) => a,
            Err(e) => {
                ingress.detach();
                let _ = self.ports_map.remove(&ifindex);
                return Err(e);
            }
        };
        if !(ingress.pinned() && tc.pinned()) {
            log::warn!("{name}: links could not be pinned; the port is inspected only while the agent runs");
        }
        self.ports.insert(ifindex, AttachedPort { name: name.into(), role, hook, ingress, tc });
        Ok(())
    }

    fn attach_error(ifindex: u32, name: &str, program: &'static str, source: aya::programs::ProgramError) -> PortError {
        // The device may have gone between listing and attaching.
        if name_to_index(name) != Some(ifindex) {
            return PortError::Vanished { ifname: name.into(), ifindex };
        }
        PortError::Attach { ifname: name.into(), ifindex, program, source }
    }

    fn xdp_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROG_FROM_PORT)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("from_port is in the object as XDP")
    }

    fn tc_program(&mut self, program: &'static str) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(program)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .expect("the classifiers were loaded at start")
    }

    /// Attaches `from_port` at `hook`, after removing a stale pin of either ingress kind
    /// under the port's name (an interface of the same name from before).
    fn attach_ingress(&mut self, ifindex: u32, name: &str, hook: IngressHook) -> Result<Attachment, PortError> {
        for kind in [XDP_LINK_SUFFIX, TC_INGRESS_LINK_SUFFIX] {
            remove_stale_pin(&link_pin_path(&self.pin_dir, name, kind));
        }
        match hook {
            IngressHook::Tc => {
                self.attach_tc(ifindex, name, PROG_FROM_PORT_TC, TcAttachType::Ingress, TC_INGRESS_LINK_SUFFIX)
            }
            IngressHook::XdpSkb => self.attach_xdp(ifindex, name, XdpMode::Skb),
            IngressHook::XdpNative => self.attach_xdp(ifindex, name, XdpMode::Driver),
        }
    }

    fn attach_xdp(&mut self, ifindex: u32, name: &str, mode: XdpMode) -> Result<Attachment, PortError> {
        if let Some(why) = &self.xdp_unavailable {
            return Err(PortError::XdpUnavailable { ifname: name.into(), ifindex, why: why.clone() });
        }
        let path = link_pin_path(&self.pin_dir, name, XDP_LINK_SUFFIX);
        remove_stale_pin(&path);
        let prog = self.xdp_program();
        let attach = |prog: &mut Xdp| -> Result<XdpLink, PortError> {
            let id = prog
                .attach_to_if_index(ifindex, mode)
                .map_err(|e| Self::attach_error(ifindex, name, PROG_FROM_PORT, e))?;
            prog.take_link(id).map_err(|e| Self::attach_error(ifindex, name, PROG_FROM_PORT, e))
        };
        let link = attach(prog)?;
        match FdLink::try_from(link) {
            Ok(fd) => match fd.pin(&path) {
                Ok(pinned) => return Ok(Attachment::Pinned { link: pinned.into(), path }),
                Err(e) => log::warn!("{name}: cannot pin XDP link at {}: {}", path.display(), report(&e)),
            },
            Err(e) => log::warn!("{name}: XDP attached through netlink, not a pinnable link: {e}"),
        }
        // The failed conversion or pin dropped (detached) the link: attach again and
        // keep the link in the agent.
        Ok(Attachment::Xdp(attach(self.xdp_program())?))
    }

    /// Attaches the classifier `program` to a TCX link at `at`, pinned as `kind`. It goes
    /// first in the port's chain, so that no other program there can let a frame through
    /// before it is judged; it hands what it passes on to the next program.
    fn attach_tc(
        &mut self,
        ifindex: u32,
        name: &str,
        program: &'static str,
        at: TcAttachType,
        kind: &str,
    ) -> Result<Attachment, PortError> {
        let path = link_pin_path(&self.pin_dir, name, kind);
        remove_stale_pin(&path);
        if self.tc_attach == TcAttach::Legacy {
            return self.attach_filter(ifindex, name, program, at);
        }
        let attach = |prog: &mut SchedClassifier| -> Result<SchedClassifierLink, PortError> {
            let id = prog
                .attach_with_options(name, at, TcAttachOptions::TcxOrder(LinkOrder::first()))
                .map_err(|e| Self::attach_error(ifindex, name, program, e))?;
            prog.take_link(id).map_err(|e| Self::attach_error(ifindex, name, program, e))
        };
        let link = attach(self.tc_program(program))?;
        match FdLink::try_from(link) {
            Ok(fd) => match fd.pin(&path) {
                Ok(pinned) => return Ok(Attachment::Pinned { link: pinned.into(), path }),
                Err(e) => log::warn!("{name}: cannot pin TC link at {}: {}", path.display(), report(&e)),
            },
            Err(e) => log::warn!("{name}: TC attached through netlink, not a pinnable link: {e}"),
        }
        Ok(Attachment::Tc(attach(self.tc_program(program))?))
    }

    /// Attaches the classifier `program` as a legacy `cls_bpf` filter at backplane's
    /// preference and handle on the `at` hook of the port, adding the port's `clsact`
    /// qdisc if it has none. A filter already there (a previous data path's) has its
    /// program replaced in place. The filter stays when the agent exits: aya's handle of
    /// it, which would detach it when dropped, is forgotten.
    fn attach_filter(
        &mut self,
        ifindex: u32,
        name: &str,
        program: &'static str,
        at: TcAttachType,
    ) -> Result<Attachment, PortError> {
        let legacy = |source: Box<dyn std::error::Error + Send + Sync>| PortError::Legacy {
            ifname: name.into(),
            ifindex,
            source,
        };
        tc_legacy::ensure_clsact(ifindex, name).map_err(legacy)?;
        let direction = if at == TcAttachType::Egress { Direction::Egress } else { Direction::Ingress };
        let existing = tc_legacy::find_filter(ifindex, direction).map_err(|e| legacy(Box::new(e)))?;
        if let Some(filter) = &existing
            && !self.owns_filter(filter.prog_id)
        {
            return Err(legacy(Box::new(LegacyTcError::Foreign { filter: filter.clone(), direction })));
        }
        let prog = self.tc_program(program);
        let id = match existing {
            Some(filter) => {
                log::info!("{name}: replacing the program of backplane's legacy filter there ({filter})");
                let link = SchedClassifierLink::attached(name, at, tc_legacy::PRIORITY, legacy_handle(), None)
                    .map_err(|e| legacy(Box::new(e)))?;
                prog.attach_to_link(link)
            }
            None => prog.attach_with_options(
                name,
                at,
                TcAttachOptions::Netlink(NlOptions {
                    priority: tc_legacy::PRIORITY,
                    handle: legacy_handle(),
                    classid: None,
                }),
            ),
        }
        .map_err(|e| Self::attach_error(ifindex, name, program, e))?;
        let link = prog.take_link(id).map_err(|e| Self::attach_error(ifindex, name, program, e))?;
        // The filter outlives the agent: the handle must not detach it when dropped.
        std::mem::forget(link);
        let prog_id = if program == PROG_TO_PORT { self.program_ids.to_port } else { self.program_ids.from_port_tc };
        Ok(Attachment::Filter { ifindex, at, prog_id, adopted: false })
    }

    /// Whether the program `prog_id` is this data path's: it reads this agent's `CONFIG`
    /// map, or the one of the older layout it upgrades from.
    fn owns_filter(&self, prog_id: u32) -> bool {
        [Some(&self.maps_dir), self.previous_maps.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|dir| aya::maps::MapInfo::from_pin(dir.join(CONFIG)).ok().map(|i| i.id()))
            .any(|config_id| tc_legacy::filter_uses_map(prog_id, config_id))
    }

    /// Checks that every port attached through legacy filters still has them, first on
    /// both hooks and running the programs this agent put there: filters have no pins,
    /// and `tc filter del`, a deleted `clsact` qdisc or another loader's filter at
    /// preference 1 (which runs before ours) would take the port's judging away behind
    /// the agent's back. Such a port is detached (its `PORTS` entry first, so that
    /// `to_port` judges its frames meanwhile) and returned by name: the port watcher
    /// attaches it again, or has the port guard cut it off.
    pub fn check_legacy_filters(&mut self) -> Vec<String> {
        let broken: Vec<u32> = self
            .ports
            .iter()
            .filter(|(_, p)| {
                [&p.ingress, &p.tc].into_iter().any(|a| match a {
                    Attachment::Filter { ifindex, at, prog_id, .. } => {
                        let direction =
                            if *at == TcAttachType::Egress { Direction::Egress } else { Direction::Ingress };
                        match tc_legacy::first_is_ours(*ifindex, direction, *prog_id) {
                            Ok(ours) => !ours,
                            Err(e) => {
                                log::warn!("{}: cannot check its legacy filters: {}", p.name, report(&e));
                                false
                            }
                        }
                    }
                    _ => false,
                })
            })
            .map(|(&i, _)| i)
            .collect();
        let mut names = Vec::new();
        for ifindex in broken {
            if let Some(name) = self.attached_name(ifindex).map(str::to_owned) {
                log::error!("{name}: its legacy filter is gone or no longer first; attaching it again");
                self.detach_port(ifindex);
                names.push(name);
            }
        }
        names
    }

    /// Forgets a port: removes it from `PORTS` and detaches (unpins) its links. When
    /// the device is already gone the kernel has dropped the attachments; this only
    /// cleans up.
    pub fn detach_port(&mut self, ifindex: u32) -> bool {
        let Some(port) = self.ports.remove(&ifindex) else { return false };
        match self.ports_map.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => log::warn!("{}: cannot remove PORTS entry: {}", port.name, report(&e)),
        }
        // What the port locked on first use was its VM's; the next device is another.
        self.set_learned(ifindex, None);
        self.forget_allowed(ifindex);
        self.ports_changed();
        self.free_addresses();
        port.ingress.detach();
        port.tc.detach();
        true
    }

    /// Follows a rename of an attached port: moves its link pins, and gives it the zone
    /// its new name has under the rules in force (interface members match names).
    pub fn rename_port(&mut self, ifindex: u32, new_name: &str) {
        let pin_dir = self.pin_dir.clone();
        let zone = self.port_zone(new_name);
        if let Some(port) = self.ports.get_mut(&ifindex) {
            port.ingress.rename(link_pin_path(&pin_dir, new_name, port.hook.link_kind()));
            port.tc.rename(link_pin_path(&pin_dir, new_name, TC_LINK_SUFFIX));
            new_name.clone_into(&mut port.name);
            match self.ports_map.get(&ifindex, 0) {
                Ok(info) if info.zone != [zone, zone] => {
                    if let Err(e) = self.ports_map.insert(ifindex, PortInfo { zone: [zone, zone], ..info }, 0) {
                        log::warn!("{new_name}: cannot update its zone in PORTS: {}", report(&e));
                    }
                }
                Ok(_) => {}
                Err(e) => log::warn!("{new_name}: cannot read its PORTS entry: {}", report(&e)),
            }
        }
        self.ports_changed();
    }
}

/// An attachment whose program could not be replaced: still attached, running the
/// previous agent's program (`None` if it could not even be opened again), and why.
struct Kept {
    attachment: Option<Attachment>,
    why: String,
}

/// The end of a link upgrade: the link, pinned at `path` and now running this agent's
/// program; or, on failure, the link as it was (still pinned, still attached, running
/// the previous program: detaching it would leave the port unjudged) and the error.
fn upgraded(path: PathBuf, result: Result<FdLink, String>, what: &str) -> Result<(Attachment, bool), Kept> {
    match result {
        Ok(link) => Ok((Attachment::Pinned { link, path }, true)),
        Err(e) => {
            let attachment =
                PinnedLink::from_pin(&path).ok().map(|link| Attachment::Adopted { link: link.into(), path });
            Err(Kept { attachment, why: format!("{what}: {e}") })
        }
    }
}

/// backplane's legacy filter handle, as aya takes it.
fn legacy_handle() -> TcHandle {
    TcHandle::new((tc_legacy::HANDLE >> 16) as u16, (tc_legacy::HANDLE & 0xffff) as u16)
}

/// Removes backplane's legacy filter from the `at` hook of `ifindex`, if it still runs
/// `prog_id` (a filter that runs another program is someone else's now and stays;
/// nothing to do when the interface is gone: its filters went with it).
fn detach_filter(ifindex: u32, at: TcAttachType, prog_id: u32) {
    let direction = if at == TcAttachType::Egress { Direction::Egress } else { Direction::Ingress };
    match tc_legacy::find_filter(ifindex, direction) {
        Ok(Some(filter)) if filter.prog_id == prog_id => {}
        Ok(Some(filter)) => {
            log::warn!(
                "ifindex {ifindex}: the legacy filter there runs a program that is not ours now ({filter}); left alone"
            );
            return;
        }
        Ok(None) => return,
        Err(e) => {
            log::warn!("ifindex {ifindex}: {}; its legacy filter is left alone", report(&e));
            return;
        }
    }
    let Some(ifname) = index_to_name(ifindex) else { return };
    match SchedClassifierLink::attached(&ifname, at, tc_legacy::PRIORITY, legacy_handle(), None) {
        // Dropping the handle removes the filter.
        Ok(link) => drop(link),
        Err(e) => log::debug!("{ifname}: no legacy filter to remove ({e})"),
    }
}

fn remove_stale_pin(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => log::debug!("removed stale link pin {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot remove stale link pin {}: {e}", path.display()),
    }
}
