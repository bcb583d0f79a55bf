//! A guest's word against another node's: claims of an endpoint bound on another node.
//!
//! An endpoint bound on another node moves here only on host-side evidence:
//! - the host binds it here (`backplane endpoint bind`, which the libvirt hook runs on the
//!   destination of a migration) or the operator says so (`endpoint moved`): at once;
//! - or a port here locked to its MAC on first use, or announces it (QEMU's RARP after a
//!   live migration), **and** the node it is bound on says its port there is gone (its
//!   location carries `port_gone_unix_ms`), or no node holds it any more (that node's
//!   lease expired with it).
//!
//! Until then the claim is *held*: nothing is bound, no flow is handed over, no location
//! is published (so the other node does not let go), and the data path judges the port
//! as unbound (`unbound_ports`), because the endpoint's entry says `ENDPOINT_ELSEWHERE`
//! wherever etcd places it on another node. The agent asks etcd again every
//! [`HOLD_POLL`] for up to [`HOLD_WAIT`]; a live migration's source QEMU exits (and its
//! tap goes) within moments of the RARP, so a real move waits that long at most.
//!
//! What the cluster channel must keep (small on purpose, for the authenticated channel
//! that replaces today's): `endpoints/<mac>` is written only by the node the endpoint is
//! bound on, under that node's lease; that node adds `port_gone_unix_ms` when the port
//! goes or the host unbinds it, after writing the endpoint's final flows; another node
//! takes a guest's claim only when the key is absent or carries that field.

use std::{sync::Arc, time::Duration};

use backplane_rules::MacAddr;

use crate::{
    clock::now_unix_ms,
    endpoints::{
        Bound, Endpoints,
        arrival::{Arrival, ArrivalKind},
        carried,
        model::Location,
    },
};

/// How often a held claim asks etcd whether the other node let go.
pub const HOLD_POLL: Duration = Duration::from_millis(200);
/// How long a held claim waits for that before it is refused (a later announcement of
/// the same MAC on that port is a new claim).
pub const HOLD_WAIT: Duration = Duration::from_secs(120);

/// Whether an arrival's cause is the host's word (a bind, the operator), not the guest's.
fn host_word(cause: &str) -> bool {
    matches!(cause, "host" | "operator")
}

impl Endpoints {
    /// Whether `a` may take the endpoint here now. A move from another node on the guest's
    /// word alone waits until that node lets go: the claim is held and `false` returned.
    pub(super) async fn may_take(self: &Arc<Self>, a: &Arrival<'_>, since_ns: Option<u64>) -> bool {
        if a.kind != ArrivalKind::Move || a.from_here || host_word(a.cause) {
            return true;
        }
        let Some(peers) = &self.peers else { return true };
        let holder = match peers.location(a.mac).await {
            Ok(Some(l)) if l.node != self.opts.node && !l.released() => Ok(l),
            Ok(found) => {
                if let Some(l) = found {
                    self.lock().locations.insert(a.mac, l);
                }
                return true;
            }
            Err(e) => Err(e),
        };
        self.hold(a, &holder, since_ns);
        false
    }

    /// Holds a claim (alert, audit record `claim_held`) and waits in the background for
    /// the node holding the endpoint to let go.
    fn hold(self: &Arc<Self>, a: &Arrival<'_>, holder: &Result<Location, String>, since_ns: Option<u64>) {
        let (mac, name) = (a.mac, &a.def.name);
        let held_by = match holder {
            Ok(l) => format!("node {} holds it on port {}", l.node, l.port),
            Err(e) => format!("etcd cannot say which node holds it ({e})"),
        };
        let text = format!(
            "endpoint {name} ({mac}) claimed on {} by the guest ({}) while {held_by}: held until that node \
             reports the port gone or the host binds it here",
            a.port, a.cause
        );
        {
            let mut st = self.lock();
            if st.held.insert(mac, a.ifindex) == Some(a.ifindex) {
                // Already waiting for this port.
                return;
            }
            if let Ok(l) = holder {
                st.locations.insert(mac, l.clone());
            }
            Self::alert(&mut st, &text);
            let mut record = self.record_here("claim_held", name, mac, a.port);
            if let Ok(l) = holder {
                record.from_node = Some(l.node.clone());
                record.from_port = Some(l.port.clone());
                record.from_labels = l.labels.clone();
            }
            record.detail = text;
            self.record(record);
        }
        // The endpoint's entry says where it is: the port stays unbound in the data path.
        self.sync_kernel();
        let (port, cause) = (a.port.to_owned(), a.cause.to_owned());
        Arc::clone(self).await_release(mac, a.ifindex, port, cause, since_ns);
    }

    /// Asks etcd every [`HOLD_POLL`] whether the node holding `mac` let go; then the held
    /// claim on port `ifindex` is an arrival (a move). Gives up when the port no longer
    /// carries the claim, when the host decided otherwise, or after [`HOLD_WAIT`].
    fn await_release(self: Arc<Self>, mac: MacAddr, ifindex: u32, port: String, cause: String, since_ns: Option<u64>) {
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            while started.elapsed() < HOLD_WAIT {
                tokio::time::sleep(HOLD_POLL).await;
                let locked =
                    self.datapath.lock().expect("datapath lock").learned(ifindex).is_some_and(|l| l.mac == mac.0);
                if self.lock().held.get(&mac) != Some(&ifindex) {
                    return;
                }
                if !locked {
                    self.lock().held.remove(&mac);
                    return;
                }
                let Some(peers) = &self.peers else { return };
                match peers.location(mac).await {
                    Ok(Some(l)) if l.node != self.opts.node && !l.released() => {}
                    Err(e) => log::debug!("held claim of {mac} on {port}: cannot ask etcd ({e})"),
                    Ok(found) => {
                        let from = found.as_ref().map_or_else(|| "no node".to_owned(), |l| format!("node {}", l.node));
                        log::info!("{port}: {from} holds {mac} no more: its claim here is taken as a move");
                        self.lock().held.remove(&mac);
                        self.arrive(mac, ifindex, &port, since_ns, &cause).await;
                        return;
                    }
                }
            }
            let mut st = self.lock();
            if st.held.get(&mac) == Some(&ifindex) {
                st.held.remove(&mac);
                let text = format!(
                    "claim of {mac} on {port} refused: the node holding it did not let go in {} s",
                    HOLD_WAIT.as_secs()
                );
                Self::alert(&mut st, &text);
                let name = Self::def_by_mac(&st, mac).map_or_else(|| super::unknown_name(mac), |d| d.name);
                let mut record = self.record_here("claim_refused", &name, mac, &port);
                record.detail = text;
                self.record(record);
            }
        });
    }

    /// Endpoints left their ports here (the port is gone, or the host unbound it): their
    /// flows as they were, for the node they go to, then their locations marked released.
    pub(super) fn publish_departures(&self, gone: &[(MacAddr, Bound)]) {
        let Some(peers) = &self.peers else {
            for (mac, _) in gone {
                self.released(*mac);
            }
            return;
        };
        let entries = self.flows.kernel_entries(|_, v| carried(v));
        for (mac, bound) in gone {
            let def = Self::def_by_mac(&self.lock(), *mac);
            let set = def.map(|def| {
                let flows = self.to_handover(&entries, Some(bound.ifindex), &def.ips);
                self.handover_set(&def, bound.port.clone(), now_unix_ms(), flows)
            });
            if let Some(location) = self.released(*mac) {
                Arc::clone(peers).publish_departure(*mac, set, location);
            }
        }
    }

    /// The endpoint `mac` left its port here: its location, marked released, for the other
    /// nodes (`None` when this node does not hold it).
    pub(super) fn released(&self, mac: MacAddr) -> Option<Location> {
        let mut st = self.lock();
        let loc = st.locations.get_mut(&mac).filter(|l| l.node == self.opts.node)?;
        loc.port_gone_unix_ms = Some(now_unix_ms());
        Some(loc.clone())
    }
}
