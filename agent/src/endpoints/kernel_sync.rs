//! Bringing the data path up to the endpoints: each endpoint's entry (binding, zone,
//! standing flags) and the runtime virtual patches in the half of the rule tables in
//! force, and the owners of endpoint addresses (`ADDR_OWNERS`). The endpoints describe the
//! change from what they wrote before; the data path writes it. Then the flows of
//! endpoints whose standing changed are judged again, and flow directions whose sender
//! address got another owner are checked again.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use backplane_common::{
    FlowKey, FlowValue,
    policy::{EndpointValue, OWNER_ELSEWHERE, OwnerKey, OwnerValue},
};
use backplane_rules::{MacAddr, VpatchEntry};

use crate::{
    datapath::rule_tables::{EndpointChange, EndpointChangeDone, owner_key},
    endpoints::{Endpoints, State, side_of},
    error::report,
};

/// What a write of the endpoint entries leaves to do once the locks are released.
#[derive(Default)]
struct Written {
    /// Endpoints whose standing changed: (port, addresses) of the flows to judge again.
    rejudge: Vec<(Option<u32>, Vec<IpAddr>)>,
    /// The owners of endpoint addresses, when they changed (or could not be written).
    moved_senders: Option<HashMap<OwnerKey, OwnerValue>>,
}

impl Endpoints {
    /// Writes what changed into the half of the rule tables in force; judges again the
    /// flows of endpoints whose standing changed, and checks again the flow directions
    /// whose sender address now belongs to another port.
    pub fn sync_kernel(&self) {
        let Some(written) = self.write_entries() else { return };
        if let Some(owners) = written.moved_senders {
            self.recheck_senders(&owners, &self.vm_ports());
        }
        self.rejudge(&written.rejudge);
    }

    /// Works out the entries wanted now, describes the change from what was written and
    /// has the data path write it, under its lock and the state's (in that order). `None`
    /// when the half in force cannot be known.
    fn write_entries(&self) -> Option<Written> {
        let mut dp = self.datapath.lock().expect("datapath lock");
        let slot = match dp.active_slot() {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot read CONFIG: {}", report(&e));
                return None;
            }
        };
        let port_zones: HashMap<u32, u16> = dp.attached().into_iter().map(|i| (i, dp.zone_of_port(i))).collect();
        let mut st = self.lock();
        let overlay = self.compute(&mut st, &|i| port_zones.get(&i).copied().unwrap_or(0));
        let wanted: HashMap<MacAddr, EndpointValue> = overlay.endpoints.iter().copied().collect();
        let vpatches: HashSet<VpatchEntry> = overlay.vpatches.iter().copied().collect();
        let ips_of: HashMap<MacAddr, Vec<IpAddr>> = Self::defs(&st).into_iter().map(|d| (d.mac, d.ips)).collect();
        let change = self.describe_change(&st, &wanted, &vpatches, &ips_of);
        let done = dp.write_endpoints(slot, &change);
        Some(Self::note_written(&mut st, change, done, vpatches, &ips_of))
    }

    /// The change from what the half in force holds (as far as the agent wrote it) to
    /// `wanted` and `vpatches`: entries new or changed, entries no longer overlaid (back to
    /// the compiled rule set's), virtual patches to add and remove, and, once the bindings
    /// of a previous run are restored, the owners of endpoint addresses.
    fn describe_change(
        &self,
        st: &State,
        wanted: &HashMap<MacAddr, EndpointValue>,
        vpatches: &HashSet<VpatchEntry>,
        ips_of: &HashMap<MacAddr, Vec<IpAddr>>,
    ) -> EndpointChange {
        let compiled = st.compiled.clone();
        let write = wanted.iter().filter(|(mac, value)| st.written.get(*mac) != Some(*value)).map(|(m, v)| (*m, *v));
        let reset = st
            .written
            .keys()
            .filter(|mac| !wanted.contains_key(*mac))
            .map(|mac| (*mac, compiled.as_ref().and_then(|c| c.endpoint(*mac)).map(|entry| entry.value)));
        let remove_vpatches = st
            .written_vpatches
            .difference(vpatches)
            .filter(|e| !compiled.as_ref().is_some_and(|c| c.vpatches.contains(*e)))
            .copied();
        // Until the bindings are restored, `ADDR_OWNERS` keeps what a previous agent left.
        let owners = st.bindings_restored.then(|| {
            // Endpoints bound on another node (as etcd last said), not here.
            let elsewhere: Vec<MacAddr> = st
                .locations
                .iter()
                .filter(|(m, l)| l.node != self.opts.node && !st.bound.contains_key(*m))
                .map(|(m, _)| *m)
                .collect();
            let mut owners = Self::address_owners(wanted, &elsewhere, ips_of);
            // Virtual IPs the rules allow some endpoints (`allowed_addresses`): no port
            // takes them on first use; only the ports whose endpoints they are allowed.
            for def in Self::defs(st) {
                for ip in &def.allowed_addresses {
                    let shared = OwnerValue {
                        ifindex: backplane_common::policy::OWNER_SHARED,
                        endpoint_id: 0,
                        mac: [0; 6],
                        _pad: [0; 2],
                    };
                    owners.entry(owner_key(*ip)).or_insert(shared);
                }
            }
            // Infrastructure addresses are no VM port's, whatever the inventory says.
            for infra in st.rules.iter().flat_map(|r| r.infrastructure.iter()) {
                let mac = infra.mac.map_or([0; 6], |m| m.0);
                for ip in &infra.ips {
                    let owner = OwnerValue {
                        ifindex: backplane_common::policy::OWNER_INFRA,
                        endpoint_id: 0,
                        mac,
                        _pad: [0; 2],
                    };
                    owners.insert(owner_key(*ip), owner);
                }
            }
            owners
        });
        let ports = st.bindings_restored.then(|| Self::port_bindings(st, wanted));
        EndpointChange {
            ports,
            write: write.collect(),
            reset: reset.collect(),
            add_vpatches: vpatches.difference(&st.written_vpatches).copied().collect(),
            remove_vpatches: remove_vpatches.collect(),
            owners,
        }
    }

    /// Records what was written: an entry whose standing (flags or zone) changed has its
    /// flows judged again; entries reset are no longer the agent's. Changed owners of
    /// addresses (or owners that could not be written) have their senders checked again.
    fn note_written(
        st: &mut State,
        change: EndpointChange,
        done: EndpointChangeDone,
        vpatches: HashSet<VpatchEntry>,
        ips_of: &HashMap<MacAddr, Vec<IpAddr>>,
    ) -> Written {
        let mut out = Written::default();
        let written: HashSet<MacAddr> = done.written.into_iter().collect();
        for (mac, value) in change.write.iter().filter(|(mac, _)| written.contains(mac)) {
            let old = st.written.get(mac).copied();
            let standing_changed = old.is_none_or(|o| o.flags != value.flags || o.zone != value.zone);
            if standing_changed && old.is_some() {
                let ifindex = (value.ifindex != 0).then_some(value.ifindex).or(old.map(|o| o.ifindex));
                out.rejudge.push((ifindex, ips_of.get(mac).cloned().unwrap_or_default()));
            }
            st.written.insert(*mac, *value);
        }
        for (mac, _) in &change.reset {
            st.written.remove(mac);
        }
        st.written_vpatches = vpatches;
        match done.owners {
            None | Some(Ok(0)) => {}
            Some(Ok(_)) => out.moved_senders = change.owners,
            Some(Err(e)) => {
                log::error!("cannot write the owners of endpoint addresses: {}", report(&e));
                out.moved_senders = change.owners;
            }
        }
        out
    }

    /// The attached VM ports.
    fn vm_ports(&self) -> HashSet<u32> {
        let dp = self.datapath.lock().expect("datapath lock");
        dp.attached().into_iter().filter(|i| dp.is_vm_port(*i)).collect()
    }

    /// Makes the data path judge again the flows of the endpoints on these ports or with
    /// these addresses.
    fn rejudge(&self, endpoints: &[(Option<u32>, Vec<IpAddr>)]) {
        if endpoints.is_empty() {
            return;
        }
        let entries = self.flows.entries();
        let keys: Vec<FlowKey> = entries
            .iter()
            .filter(|(k, v)| endpoints.iter().any(|(ifindex, ips)| side_of(k, v, *ifindex, ips).is_some()))
            .map(|(k, _)| *k)
            .collect();
        if !keys.is_empty() {
            log::info!("judging {} flow(s) again: their endpoints' standing changed", keys.len());
            self.flows.rejudge(&keys);
        }
    }

    /// After the owners of addresses changed: a flow direction seen on a VM port whose
    /// sender address now belongs to another port (or node) forgets that port, so that its
    /// next frame is checked again (and dropped if it still comes from the wrong port).
    /// Without this, a flow an attacker started from an address before its owner was
    /// bound (or known) would go on.
    fn recheck_senders(&self, owners: &HashMap<OwnerKey, OwnerValue>, vm_ports: &HashSet<u32>) {
        let suspect = |key: &FlowKey, value: &FlowValue, dir: u8| {
            let (addr, _) = key.sender(dir);
            let port = value.ifindex[usize::from(dir)];
            let owner = owners.get(&OwnerKey { family: key.family, _pad: [0; 3], addr: *addr });
            vm_ports.contains(&port)
                && owner.is_some_and(|o| o.ifindex != port && o.ifindex != backplane_common::policy::OWNER_SHARED)
        };
        let entries = self.flows.kernel_entries(|key, value| (0u8..2).any(|dir| suspect(key, value, dir)));
        if entries.is_empty() {
            return;
        }
        let forget: Vec<(FlowKey, u8)> = entries
            .iter()
            .flat_map(|(key, value)| (0u8..2).filter(|&dir| suspect(key, value, dir)).map(|dir| (*key, dir)))
            .collect();
        log::info!(
            "{} flow direction(s) seen on another port than their sender address's owner: checked again",
            forget.len()
        );
        self.flows.forget_ports(&forget);
    }

    /// Which port each address of a bound endpoint belongs to, and which addresses belong
    /// to endpoints bound on other nodes (`elsewhere`): the data path drops frames from
    /// other VM ports that send from (or claim) them. An address two endpoints claim
    /// (runtime endpoints can, the rule files cannot) belongs to neither.
    pub(super) fn address_owners(
        wanted: &HashMap<MacAddr, EndpointValue>,
        elsewhere: &[MacAddr],
        ips_of: &HashMap<MacAddr, Vec<IpAddr>>,
    ) -> HashMap<OwnerKey, OwnerValue> {
        let here = wanted.iter().filter(|(_, v)| v.ifindex != 0).map(|(mac, v)| {
            (*mac, OwnerValue { ifindex: v.ifindex, endpoint_id: v.endpoint_id, mac: mac.0, _pad: [0; 2] })
        });
        let there = elsewhere.iter().map(|mac| {
            let endpoint_id = wanted.get(mac).map_or(0, |v| v.endpoint_id);
            (*mac, OwnerValue { ifindex: OWNER_ELSEWHERE, endpoint_id, mac: mac.0, _pad: [0; 2] })
        });
        let mut owners: HashMap<OwnerKey, OwnerValue> = HashMap::new();
        let mut disputed = HashSet::new();
        for (mac, owner) in here.chain(there) {
            for ip in ips_of.get(&mac).into_iter().flatten() {
                match owners.insert(owner_key(*ip), owner) {
                    Some(other) if other != owner => {
                        disputed.insert(*ip);
                    }
                    _ => {}
                }
            }
        }
        for ip in disputed {
            log::warn!("address {ip} is claimed by two endpoints; no port owns it");
            owners.remove(&owner_key(ip));
        }
        owners
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_belong_to_the_port_or_node_of_their_endpoint_and_disputed_ones_to_nobody() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b, c, d) = (
            MacAddr([2, 0, 0, 0, 0, 1]),
            MacAddr([2, 0, 0, 0, 0, 2]),
            MacAddr([2, 0, 0, 0, 0, 3]),
            MacAddr([2, 0, 0, 0, 0, 4]),
        );
        let bound = |ifindex: u32, endpoint_id: u32| EndpointValue { ifindex, endpoint_id, ..EndpointValue::default() };
        // a bound here on port 7, b on another node, c known but nowhere, d bound here and
        // claiming b's address too.
        let wanted = HashMap::from([(a, bound(7, 1)), (b, bound(0, 2)), (c, bound(0, 3)), (d, bound(8, 4))]);
        let ips_of = HashMap::from([
            (a, vec![ip("10.0.0.1"), ip("fd00::1")]),
            (b, vec![ip("10.0.0.2"), ip("10.0.0.9")]),
            (c, vec![ip("10.0.0.3")]),
            (d, vec![ip("10.0.0.4"), ip("::ffff:10.0.0.9")]),
        ]);
        let owners = Endpoints::address_owners(&wanted, &[b], &ips_of);
        let owner = |s: &str| owners.get(&owner_key(ip(s))).map(|o| (o.ifindex, o.mac));
        assert_eq!(owner("10.0.0.1"), Some((7, a.0)));
        assert_eq!(owner("fd00::1"), Some((7, a.0)));
        assert_eq!(owner("10.0.0.2"), Some((OWNER_ELSEWHERE, b.0)));
        assert_eq!(owner("10.0.0.3"), None, "an endpoint bound nowhere owns nothing");
        assert_eq!(owner("10.0.0.4"), Some((8, d.0)));
        assert_eq!(owner("10.0.0.9"), None, "claimed by b (elsewhere) and d (as IPv4-mapped): nobody's");
        assert_eq!(owners.len(), 4);
    }
}
