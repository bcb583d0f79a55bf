//! Which endpoint is behind each VM port, as the host says it or as the port locked it on
//! first use; never as a guest's announcement says it.
//!
//! - **The host** binds: `backplane endpoint bind --port IFACE --mac MAC` (the libvirt hook
//!   runs it when a domain starts or arrives), `unbind` when it is released. A host binding
//!   outlives the agent in `<state-dir>/endpoints.json` and comes back after a restart only
//!   onto the same device: same name, same ifindex, same device MAC.
//! - **First use** (`binding: learn` zones): the data path locks an unbound port to the
//!   first MAC it sends (`LEARNED`) and tells the agent, which binds the inventory endpoint
//!   of that MAC (an arrival, as a boot or a move) or, for a MAC outside the inventory,
//!   confirms the zone the port's first address chose once the data path has it.
//! - **Announcements** (RARP, gratuitous ARP, unsolicited NA) are hints: the data path
//!   forwards them only from a port whose frames carry its bound or locked MAC, and the
//!   agent acts on them only for that MAC on that port.

use std::{sync::Arc, time::Duration};

use backplane_common::config::{
    ALLOWED_MAC, AllowedKey, BINDING_HOST, BINDING_LEARNED, LEARNED_ENDPOINT, LEARNED_HELD, LEARNED_MAC_ONLY,
    LEARNED_ZONE, LearnedValue,
};
use backplane_rules::MacAddr;
use serde::{Deserialize, Serialize};

use crate::{
    datapath::{PortBinding, rule_tables::owner_key},
    endpoints::{Bound, Endpoints, State, mac_text, model::EndpointInfo},
    ifnames::name_to_index,
};

/// How long `bind` waits for the agent to attach a port that was just created.
const ATTACH_WAIT: Duration = Duration::from_secs(3);
/// How long a port locked on first use has to send from an address that picks its zone.
const ZONE_WAIT: Duration = Duration::from_secs(30);

/// A host binding as the state file keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostBinding {
    pub port: String,
    pub ifindex: u32,
    /// The port device's own MAC (the tap's, not the guest's): with the ifindex, what
    /// makes a restart bind only the same device again.
    pub device_mac: String,
    /// The guest's MAC.
    pub mac: String,
    #[serde(default)]
    pub domain: Option<String>,
}

/// A port outside the inventory locked on first use, with the zone its first address
/// chose (a zone id, which lasts across rule sets), or `None`: the zone its name gives
/// it (`interface:` members), whatever the rules in force say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LearnedPort {
    pub mac: MacAddr,
    pub zone: Option<u16>,
}

/// What `def`'s port may send from besides its own, as `PORT_ALLOWED` keys (the port
/// is filled in by the writer).
fn allowed_keys(def: &super::Def) -> Vec<AllowedKey> {
    let macs = def.allowed_macs.iter().map(|m| {
        let mut value = [0u8; 16];
        value[..6].copy_from_slice(&m.0);
        AllowedKey { kind: ALLOWED_MAC, value, ..AllowedKey::default() }
    });
    let addrs = def.allowed_addresses.iter().map(|ip| {
        let key = owner_key(*ip);
        AllowedKey { kind: key.family, value: key.addr, ..AllowedKey::default() }
    });
    macs.chain(addrs).collect()
}

/// The device MAC of a port, as sysfs shows it.
fn device_mac(port: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/net/{port}/address")).ok().map(|s| s.trim().to_owned())
}

impl Endpoints {
    /// `backplane endpoint bind`: the host says the endpoint with `mac` (or `name`) is
    /// behind VM port `port`. An endpoint bound elsewhere on this node moves here (the
    /// host is trusted); a MAC outside the inventory is locked to the port and its zone is
    /// learned from its first address where zones allow it (else `unbound_ports`).
    pub async fn bind(
        self: &Arc<Self>,
        port: &str,
        mac: Option<&str>,
        name: Option<&str>,
        domain: Option<&str>,
    ) -> Result<EndpointInfo, String> {
        let ifindex = self.wait_for_vm_port(port).await?;
        let mac = match (mac, name) {
            (Some(m), _) => m.parse::<MacAddr>().map_err(|e| format!("--mac {m}: {e}"))?,
            (None, Some(n)) => {
                Self::def_by_name(&self.lock(), n).ok_or_else(|| format!("no endpoint \"{n}\" in the inventory"))?.mac
            }
            (None, None) => return Err("say which endpoint: its name or its MAC".into()),
        };
        if mac.0[0] & 1 != 0 || mac.0 == [0; 6] {
            return Err(format!("{mac} is not a unicast MAC"));
        }
        let def = Self::def_by_mac(&self.lock(), mac);
        let record = HostBinding {
            port: port.to_owned(),
            ifindex,
            device_mac: device_mac(port).unwrap_or_default(),
            mac: mac_text(mac),
            domain: domain.map(str::to_owned),
        };
        {
            let mut st = self.lock();
            // Whatever the port was bound to or locked to before is not behind it now.
            st.bound.retain(|m, b| !(b.ifindex == ifindex && *m != mac));
            st.unknown.retain(|m, (b, _)| !(b.ifindex == ifindex && *m != mac));
            st.learned_ports.remove(&ifindex);
            st.host_unknown.remove(&ifindex);
            st.host_bindings.retain(|h| h.port != port && h.ifindex != ifindex);
            st.host_bindings.push(record.clone());
            if def.is_some() && st.bound.get(&mac).is_some_and(|b| b.ifindex == ifindex) {
                // Bound here already (first use): now the host's word.
                st.bound.insert(mac, Bound { ifindex, port: port.to_owned(), host: true });
            }
            self.persist(&st);
        }
        let learned_zone = {
            let mut dp = self.datapath.lock().expect("datapath lock");
            let current = dp.learned(ifindex).filter(|l| l.mac == mac.0);
            match (&def, current) {
                // Locked to this MAC already (the VM runs): keep what it learned.
                (None, Some(l)) => (l.flags & LEARNED_ZONE != 0).then_some(l.zone),
                // The lock of a MAC outside the inventory waits for its zone.
                (None, None) => {
                    dp.set_learned(ifindex, Some(LearnedValue { mac: mac.0, ..LearnedValue::default() }));
                    None
                }
                // An inventory endpoint's binding is written with the endpoint entries.
                (Some(_), _) => {
                    dp.set_learned(ifindex, None);
                    None
                }
            }
        };
        let by = domain.map_or_else(|| "host".to_owned(), |d| format!("host (domain {d})"));
        log::info!("{port}: bound to {mac} by the {by}");
        if let Some(def) = def {
            self.arrive_bound(mac, ifindex, port, "host").await;
            return self.info(&def.name);
        }
        self.lock().host_unknown.insert(ifindex);
        let port_zone = self.datapath.lock().expect("datapath lock").zone_of_port(ifindex);
        if port_zone != 0 {
            self.confirm_learned(ifindex, port, mac, None);
        } else if let Some(zone) = learned_zone {
            self.confirm_learned(ifindex, port, mac, Some(zone));
        } else {
            self.sync_kernel();
            Arc::clone(self).follow_learning(ifindex, port.to_owned(), mac);
        }
        Ok(self.unknown_info(mac, port))
    }

    /// `backplane endpoint unbind`: the VM behind `port` is gone or leaving.
    pub fn unbind(self: &Arc<Self>, port: &str) -> Result<(), String> {
        let ifindex = self.datapath.lock().expect("datapath lock").vm_port_named(port).ok();
        let mut gone: Vec<(MacAddr, Bound)> = Vec::new();
        let known = {
            let mut st = self.lock();
            let before = st.host_bindings.len();
            st.host_bindings.retain(|h| h.port != port);
            let had_record = st.host_bindings.len() != before;
            let mut had_binding = false;
            if let Some(ifindex) = ifindex {
                had_binding = st.bound.values().any(|b| b.ifindex == ifindex)
                    || st.unknown.values().any(|(b, _)| b.ifindex == ifindex)
                    || st.learned_ports.contains_key(&ifindex);
                gone = st.bound.iter().filter(|(_, b)| b.ifindex == ifindex).map(|(m, b)| (*m, b.clone())).collect();
                st.unknown.retain(|_, (b, _)| b.ifindex != ifindex);
                st.learned_ports.remove(&ifindex);
                st.locked_at.remove(&ifindex);
                st.held.retain(|_, h| h.ifindex != ifindex);
                st.host_unknown.remove(&ifindex);
            }
            self.persist(&st);
            had_record || had_binding
        };
        // The host's word that the endpoint left: the node it goes to may take it.
        self.publish_departures(&gone);
        {
            let mut st = self.lock();
            for (mac, _) in &gone {
                st.bound.remove(mac);
            }
            self.persist(&st);
        }
        let Some(ifindex) = ifindex else {
            return if known { Ok(()) } else { Err(format!("{port} is not a port this agent is attached to")) };
        };
        self.datapath.lock().expect("datapath lock").set_learned(ifindex, None);
        log::info!("{port}: unbound by the host");
        self.sync_kernel();
        Ok(())
    }

    /// The VM port of this name, waiting a little for the agent to attach a port that was
    /// just created (the libvirt hook runs as QEMU's taps appear).
    async fn wait_for_vm_port(&self, port: &str) -> Result<u32, String> {
        let started = tokio::time::Instant::now();
        loop {
            {
                let dp = self.datapath.lock().expect("datapath lock");
                if dp.port_named(port).is_some() {
                    return dp.vm_port_named(port);
                }
            }
            if started.elapsed() > ATTACH_WAIT {
                return Err(match name_to_index(port) {
                    Some(_) => format!("{port} is not a port this agent is attached to (see --interfaces)"),
                    None => format!("there is no interface {port}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Binds an inventory endpoint to its port the host named (an arrival: boot or move).
    pub(super) async fn arrive_bound(self: &Arc<Self>, mac: MacAddr, ifindex: u32, port: &str, cause: &str) {
        {
            // Forget a binding to the same port so that the arrival is handled.
            let mut st = self.lock();
            if st.bound.get(&mac).is_some_and(|b| b.ifindex == ifindex) {
                st.bound.remove(&mac);
            }
        }
        self.arrive(mac, ifindex, port, None, cause).await;
        let mut st = self.lock();
        if let Some(b) = st.bound.get_mut(&mac) {
            b.host = true;
        }
        drop(st);
        self.sync_kernel();
    }

    /// The data path locked port `ifindex` to `mac` on first use.
    pub(super) async fn learned(self: &Arc<Self>, mac: MacAddr, ifindex: u32, port: &str, since_ns: u64) {
        let lock = self.datapath.lock().expect("datapath lock").learned(ifindex);
        let Some(lock) = lock.filter(|l| l.mac == mac.0) else { return };
        log::info!("{port}: locked to {mac} on first use");
        self.lock().locked_at.insert(ifindex, crate::clock::now_unix_ms());
        let known = Self::def_by_mac(&self.lock(), mac).is_some();
        // An `interface:` zone may quarantine a MAC outside the inventory (an arrival
        // handles that too).
        self.arrive(mac, ifindex, port, Some(since_ns), "first use").await;
        if known || lock.flags & LEARNED_ENDPOINT != 0 {
            return;
        }
        let port_zone = self.datapath.lock().expect("datapath lock").zone_of_port(ifindex);
        if port_zone != 0 {
            // The port's name gives it its zone: nothing left to learn.
            self.confirm_learned(ifindex, port, mac, None);
        } else {
            Arc::clone(self).follow_learning(ifindex, port.to_owned(), mac);
        }
    }

    /// Waits (in the background) for a port locked to a MAC outside the inventory to send
    /// from an address that picks its zone, then confirms the binding: from then on the
    /// port is judged as bound.
    fn follow_learning(self: Arc<Self>, ifindex: u32, port: String, mac: MacAddr) {
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut pause = Duration::from_millis(20);
            while started.elapsed() < ZONE_WAIT {
                let lock = self.datapath.lock().expect("datapath lock").learned(ifindex);
                match lock {
                    Some(l) if l.mac == mac.0 && l.flags & LEARNED_ZONE != 0 => {
                        self.confirm_learned(ifindex, &port, mac, Some(l.zone));
                        return;
                    }
                    Some(l) if l.mac == mac.0 => {}
                    // Unbound or bound to something else meanwhile.
                    _ => return,
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            log::info!("{port}: locked to {mac}, but no address of a learning zone seen yet; it stays unbound");
        });
    }

    fn confirm_learned(&self, ifindex: u32, port: &str, mac: MacAddr, zone: Option<u16>) {
        {
            let mut st = self.lock();
            if st.unknown.values().any(|(b, _)| b.ifindex == ifindex) {
                // Quarantined as a MAC outside the inventory on an `interface:` port.
                return;
            }
            let zone_name = match zone {
                Some(z) => st.compiled.as_ref().and_then(|c| c.zone_ids.name(z).map(str::to_owned)),
                None => Some("of the port's name".to_owned()),
            };
            st.learned_ports.insert(ifindex, LearnedPort { mac, zone });
            let mut record = self.record_here("learned", &super::unknown_name(mac), mac, port);
            record.detail = format!("locked on first use in zone {}", zone_name.as_deref().unwrap_or("?"));
            self.record(record);
        }
        self.sync_kernel();
    }

    /// Brings back bindings after a restart: the host's onto the same device only (name,
    /// ifindex and device MAC), and the locks on first use the data path keeps by ifindex.
    /// Called twice: before the first rule tables are written, with the adopted ports
    /// only (a host record whose port is not attached yet is kept for later), and once
    /// every port is attached (`every_port`: a record whose device is not there now is
    /// dropped). Returns how many.
    pub fn restore_port_bindings(&self, every_port: bool) -> usize {
        let ports: std::collections::HashMap<u32, String> = {
            let dp = self.datapath.lock().expect("datapath lock");
            dp.attached_ports().into_iter().filter(|(i, _)| dp.is_vm_port(*i)).map(|(i, (n, _))| (i, n)).collect()
        };
        let (learned, port_zones) = {
            let dp = self.datapath.lock().expect("datapath lock");
            let zones: std::collections::HashMap<u32, u16> = ports.keys().map(|&i| (i, dp.zone_of_port(i))).collect();
            (dp.all_learned(), zones)
        };
        let mut st = self.lock();
        let mut n = 0;
        let records = std::mem::take(&mut st.host_bindings);
        for h in records {
            let same = ports.get(&h.ifindex).is_some_and(|name| *name == h.port)
                && device_mac(&h.port).is_some_and(|m| m == h.device_mac);
            let Ok(mac) = h.mac.parse::<MacAddr>() else { continue };
            if !same && !every_port && !ports.contains_key(&h.ifindex) && !ports.values().any(|n| *n == h.port) {
                // Not attached yet: judged once every port is.
                st.host_bindings.push(h);
                continue;
            }
            if !same {
                log::warn!("{}: not bound to {} again: the port is not the device the host bound", h.port, h.mac);
                continue;
            }
            if Self::def_by_mac(&st, mac).is_some() {
                st.bound.insert(mac, Bound { ifindex: h.ifindex, port: h.port.clone(), host: true });
            } else {
                st.host_unknown.insert(h.ifindex);
            }
            n += 1;
            st.host_bindings.push(h);
        }
        let mut hold = Vec::new();
        for (ifindex, lock) in learned {
            let Some(port) = ports.get(&ifindex) else { continue };
            if lock.flags & LEARNED_MAC_ONLY != 0 {
                // Held to its MAC only: no identity to bring back.
                continue;
            }
            let mac = MacAddr(lock.mac);
            if st.bound.get(&mac).is_some_and(|b| b.ifindex != ifindex) {
                continue;
            }
            // A claim held before the restart, or of an endpoint another node holds
            // (etcd said so last): still a claim, not a binding (see `claim`).
            let elsewhere = st.locations.get(&mac).is_some_and(|l| l.node != self.opts.node && !l.released());
            if Self::def_by_mac(&st, mac).is_some() && (lock.flags & LEARNED_HELD != 0 || elsewhere) {
                hold.push((ifindex, mac));
                continue;
            }
            if Self::def_by_mac(&st, mac).is_some() {
                st.bound.entry(mac).or_insert(Bound { ifindex, port: port.clone(), host: false });
                n += 1;
            } else if lock.flags & LEARNED_ZONE != 0 {
                st.learned_ports.insert(ifindex, LearnedPort { mac, zone: Some(lock.zone) });
                n += 1;
            } else if port_zones.get(&ifindex).is_some_and(|z| *z != 0) {
                st.learned_ports.insert(ifindex, LearnedPort { mac, zone: None });
                n += 1;
            }
        }
        self.persist(&st);
        drop(st);
        let mut dp = self.datapath.lock().expect("datapath lock");
        for (ifindex, mac) in hold {
            log::warn!("ifindex {ifindex}: its claim of {mac} stays held (another node holds it)");
            dp.hold_learned(ifindex, mac.0, true);
        }
        n
    }

    /// The binding of every VM port bound here: the endpoint entries `wanted` (those with
    /// a port), then the ports locked on first use outside the inventory.
    pub(super) fn port_bindings(
        st: &State,
        wanted: &std::collections::HashMap<MacAddr, backplane_common::policy::EndpointValue>,
    ) -> std::collections::HashMap<u32, PortBinding> {
        let mut out = std::collections::HashMap::new();
        let defs: std::collections::HashMap<MacAddr, super::Def> =
            Self::defs(st).into_iter().map(|d| (d.mac, d)).collect();
        for (mac, value) in wanted.iter().filter(|(_, v)| v.ifindex != 0) {
            let host = st.bound.get(mac).is_some_and(|b| b.host);
            let def = defs.get(mac);
            out.insert(
                value.ifindex,
                PortBinding {
                    kind: if host { BINDING_HOST } else { BINDING_LEARNED },
                    mac: mac.0,
                    fixed: def.is_some_and(|d| !d.ips.is_empty()),
                    zone: Some(value.zone),
                    standing: value.flags,
                    allowed: def.map(allowed_keys).unwrap_or_default(),
                },
            );
        }
        for (&ifindex, l) in &st.learned_ports {
            out.entry(ifindex).or_insert(PortBinding {
                kind: if st.host_unknown.contains(&ifindex) { BINDING_HOST } else { BINDING_LEARNED },
                mac: l.mac.0,
                fixed: false,
                zone: l.zone,
                standing: 0,
                allowed: Vec::new(),
            });
        }
        out
    }

    /// The `endpoint bind` reply for a MAC outside the inventory.
    fn unknown_info(&self, mac: MacAddr, port: &str) -> EndpointInfo {
        EndpointInfo {
            name: super::unknown_name(mac),
            mac: mac_text(mac),
            source: "host".into(),
            node: Some(self.opts.node.clone()),
            port: Some(port.to_owned()),
            here: true,
            ..EndpointInfo::default()
        }
    }
}
