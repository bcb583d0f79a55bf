//! A guest's word against another node's: claims of an endpoint bound on another node.
//!
//! An endpoint bound on another node moves here only on host-side evidence:
//! - the host binds it here (`backplane endpoint bind`, which the libvirt hook runs on the
//!   destination of a migration) or the operator says so (`endpoint moved`): at once;
//! - or a port here locked to its MAC on first use, or announces it (QEMU's RARP after a
//!   live migration), **and** the node it is bound on says its port there is gone (its
//!   location carries `port_gone_unix_ms`), **and** the port locked to the MAC no earlier
//!   than [`LOCK_SLACK_MS`] before that: a port that locked the MAC while the endpoint
//!   still ran elsewhere was squatting, and a release does not make it the endpoint.
//!
//! A location etcd no longer holds (the other node's lease expired: it died, or lost
//! etcd) is no release: the last one seen is kept, and only the host's word moves the
//! endpoint then.
//!
//! Until the move is taken the claim is *held*: nothing is bound, no flow is handed over,
//! no location is published (so the other node does not let go); the data path judges the
//! port as unbound and drops its frames (`LEARNED_HELD`, counter `claim_held`; before the
//! agent marks it, the endpoint's entry says `ENDPOINT_ELSEWHERE` wherever etcd places it
//! on another node). The agent asks etcd again every [`HOLD_POLL`] for up to
//! [`HOLD_WAIT`]; a live migration's source QEMU exits (and its tap goes) within moments
//! of the RARP. A claim refused stays held until the host binds the port or it goes.
//!
//! What the cluster channel must keep (small on purpose, for the authenticated channel
//! that replaces today's): `endpoints/<mac>` is written only by the node the endpoint is
//! bound on, under that node's lease; that node adds `port_gone_unix_ms` when the port
//! goes or the host unbinds it, after writing the endpoint's final flows; another node
//! takes a guest's claim only on that field, for a port locked after it (less the slack).

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
/// How long a held claim waits for that before it is refused.
pub const HOLD_WAIT: Duration = Duration::from_secs(120);
/// How long before the other node's `port_gone_unix_ms` a port may have locked the MAC
/// and still be the endpoint that moved (a live migration's RARP comes moments before
/// the source's tap goes; clocks of two nodes differ a little).
pub const LOCK_SLACK_MS: i64 = 10_000;

/// A claim waiting for the other node to let go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Held {
    pub(super) ifindex: u32,
    /// When the port locked the MAC (Unix ms; 0: not seen by this agent, long ago).
    pub(super) locked_unix_ms: i64,
}

/// Whether a port that locked the MAC at `locked_unix_ms` may be the endpoint that left
/// its port at `l` (released).
fn after_release(locked_unix_ms: i64, l: &Location) -> bool {
    l.port_gone_unix_ms.is_some_and(|gone| locked_unix_ms.saturating_add(LOCK_SLACK_MS) >= gone)
}

/// Whether an arrival's cause is the host's word (a bind, the operator), not the guest's.
fn host_word(cause: &str) -> bool {
    matches!(cause, "host" | "operator")
}

impl Endpoints {
    /// Whether `a` may take the endpoint here now. A move from another node on the guest's
    /// word alone waits until that node lets go: the claim is held and `false` returned.
    pub(super) async fn may_take(self: &Arc<Self>, a: &Arrival<'_>) -> bool {
        if a.kind != ArrivalKind::Move || a.from_here || host_word(a.cause) {
            return true;
        }
        let locked_unix_ms = {
            let st = self.lock();
            if st.held.get(&a.mac).is_some_and(|h| h.ifindex == a.ifindex) {
                // Already held: the waiter asks etcd.
                return false;
            }
            st.locked_at.get(&a.ifindex).copied().unwrap_or(0)
        };
        let Some(peers) = &self.peers else { return true };
        let holder = match peers.location(a.mac).await {
            Ok(Some(l)) if l.node == self.opts.node => return true,
            Ok(Some(l)) if after_release(locked_unix_ms, &l) => {
                self.lock().locations.insert(a.mac, l);
                return true;
            }
            Ok(Some(l)) => Ok(l),
            Ok(None) => Err("etcd holds no location for it: the node that had it may be down".to_owned()),
            Err(e) => Err(format!("etcd cannot say which node holds it ({e})")),
        };
        self.hold(a, &holder, locked_unix_ms);
        false
    }

    /// Holds a claim (alert, audit record `claim_held`, `LEARNED_HELD` in the data path)
    /// and waits in the background for the node holding the endpoint to let go.
    fn hold(self: &Arc<Self>, a: &Arrival<'_>, holder: &Result<Location, String>, locked_unix_ms: i64) {
        let (mac, name) = (a.mac, &a.def.name);
        let held_by = match holder {
            Ok(l) => format!("node {} holds it on port {}", l.node, l.port),
            Err(e) => e.clone(),
        };
        let text = format!(
            "endpoint {name} ({mac}) claimed on {} by the guest ({}) while {held_by}: held until that node \
             reports the port gone or the host binds it here",
            a.port, a.cause
        );
        self.datapath.lock().expect("datapath lock").hold_learned(a.ifindex, mac.0, true);
        {
            let mut st = self.lock();
            st.held.insert(mac, Held { ifindex: a.ifindex, locked_unix_ms });
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
        self.sync_kernel();
        let (port, cause) = (a.port.to_owned(), a.cause.to_owned());
        Arc::clone(self).await_release(mac, a.ifindex, port, cause);
    }

    /// Asks etcd every [`HOLD_POLL`] whether the node holding `mac` let go; then the held
    /// claim on port `ifindex` is an arrival (a move), if the port locked the MAC after
    /// that. Gives up when the port no longer carries the claim, when the host decided
    /// otherwise, or after [`HOLD_WAIT`]; a refused claim stays held in the data path.
    fn await_release(self: Arc<Self>, mac: MacAddr, ifindex: u32, port: String, cause: String) {
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut why = format!("the node holding it did not let go in {} s", HOLD_WAIT.as_secs());
            while started.elapsed() < HOLD_WAIT {
                tokio::time::sleep(HOLD_POLL).await;
                let locked =
                    self.datapath.lock().expect("datapath lock").learned(ifindex).is_some_and(|l| l.mac == mac.0);
                let Some(held) = self.lock().held.get(&mac).copied().filter(|h| h.ifindex == ifindex) else { return };
                if !locked {
                    self.lock().held.remove(&mac);
                    return;
                }
                let Some(peers) = &self.peers else { return };
                match peers.location(mac).await {
                    Ok(Some(l)) if l.released() && after_release(held.locked_unix_ms, &l) => {
                        log::info!("{port}: node {} let go of {mac}: its claim here is taken as a move", l.node);
                        {
                            let mut st = self.lock();
                            st.held.remove(&mac);
                            st.locations.insert(mac, l);
                        }
                        self.arrive(mac, ifindex, &port, None, &cause).await;
                        return;
                    }
                    Ok(Some(l)) if l.released() => {
                        why = format!(
                            "the port locked {mac} before node {} let go of it: it was not the endpoint that left",
                            l.node
                        );
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => log::debug!("held claim of {mac} on {port}: cannot ask etcd ({e})"),
                }
            }
            let mut st = self.lock();
            if st.held.get(&mac).is_some_and(|h| h.ifindex == ifindex) {
                st.held.remove(&mac);
                let text =
                    format!("claim of {mac} on {port} refused: {why}; the port stays held until the host binds it");
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
