//! What an endpoint may do where it is: its [`Standing`] (active, quarantined or
//! isolated) and the endpoint entry that says so to the data path, worked out from the
//! rules in force, its patch date and the node it is on (`Assessment`); and the
//! overlay of every endpoint's entry that the agent writes over each compiled rule set.
//!
//! - **Quarantined**: its zone's `max_patch_age` is exceeded or its patch date unknown;
//!   or a MAC outside the inventory on a port of a zone that quarantines unknown MACs.
//! - **Isolated**: on a node its zone's placement forbids, with `on_violation: isolate`.

use std::time::SystemTime;

use backplane_common::policy::{ENDPOINT_ISOLATED, ENDPOINT_PATCHED, ENDPOINT_QUARANTINED, EndpointValue, ZONE_WORLD};
use backplane_rules::{MacAddr, OnViolation, PatchDate};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::rule_tables::EndpointOverlay,
    endpoints::{Bound, Def, Endpoints, State},
};

/// An endpoint's standing, as `endpoint list`, `status`, the audit log and the metrics
/// name it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    #[default]
    Active,
    Quarantined,
    Isolated,
}

impl Standing {
    /// Every standing, in the order `status` counts them.
    pub const ALL: [Self; 3] = [Self::Active, Self::Quarantined, Self::Isolated];

    /// The standing the flags of an endpoint entry give (isolation wins over quarantine).
    #[must_use]
    pub fn of_flags(flags: u16) -> Self {
        if flags & ENDPOINT_ISOLATED != 0 {
            Self::Isolated
        } else if flags & ENDPOINT_QUARANTINED != 0 {
            Self::Quarantined
        } else {
            Self::Active
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Quarantined => "quarantined",
            Self::Isolated => "isolated",
        }
    }
}

impl std::fmt::Display for Standing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an endpoint may do, worked out from the rules, its patch date and where it is.
#[derive(Clone, Debug, Default)]
pub(super) struct Assessment {
    pub(super) zone: Option<String>,
    pub(super) value: EndpointValue,
    pub(super) reasons: Vec<String>,
    /// Placement problems that only raise alerts.
    pub(super) placement: Vec<String>,
}

impl Assessment {
    pub(super) fn standing(&self) -> Standing {
        Standing::of_flags(self.value.flags)
    }
}

/// Today's date (UTC).
fn today() -> PatchDate {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    PatchDate::from_days_since_epoch(i64::try_from(secs / 86_400).unwrap_or(0))
}

impl Endpoints {
    /// What `def` may do under `rules`, bound (or not) to a port here.
    pub(super) fn assess(&self, st: &mut State, def: &Def, port_zone: &dyn Fn(u32) -> u16) -> Assessment {
        let bound = st.bound.get(&def.mac).cloned();
        let mut s = Assessment::default();
        let (rules, compiled) = (st.rules.clone(), st.compiled.clone());
        let compiled_entry = compiled.as_ref().and_then(|c| c.endpoint(def.mac).copied());
        s.value.endpoint_id = match compiled_entry {
            Some(e) if !def.runtime => e.value.endpoint_id,
            _ => Self::id_for(st, def.mac),
        };
        s.value.ifindex = bound.as_ref().map_or(0, |b| b.ifindex);
        let zone_name =
            rules.as_ref().and_then(|r| r.zone_for(def.zone.as_deref(), def.mac, &def.ips).map(str::to_owned));
        s.value.zone = match (&zone_name, &compiled) {
            (Some(z), Some(c)) => c.zone_ids.id(z).unwrap_or(ZONE_WORLD),
            _ => bound.as_ref().map_or(ZONE_WORLD, |b| port_zone(b.ifindex)),
        };
        s.zone = zone_name.or_else(|| {
            let c = compiled.as_ref()?;
            (s.value.zone != ZONE_WORLD).then(|| c.zone_ids.name(s.value.zone).map(str::to_owned)).flatten()
        });
        if !def.ips.is_empty() {
            s.value.flags |= backplane_common::policy::ENDPOINT_ADDRS_FIXED;
        }
        if bound.is_none() && st.locations.get(&def.mac).is_some_and(|l| l.node != self.opts.node && !l.released()) {
            s.value.flags |= backplane_common::policy::ENDPOINT_ELSEWHERE;
        }
        if let (Some(rules), Some(c)) = (&rules, &compiled) {
            if rules.patches_for(&def.tags).next().is_some()
                || !c.vpatch_entries(s.value.endpoint_id, &def.tags).is_empty()
            {
                s.value.flags |= ENDPOINT_PATCHED;
            }
            if let Some(settings) = s.zone.as_deref().and_then(|z| rules.zone(z)).map(|z| &z.endpoints) {
                let zone = s.zone.as_deref().unwrap_or("");
                if let Some(max) = settings.max_patch_age {
                    match def.patched_at {
                        None => {
                            s.value.flags |= ENDPOINT_QUARANTINED;
                            s.reasons.push(format!("patch date unknown (zone {zone} requires a patch within {max})"));
                        }
                        Some(d) if d.age_days(today()) > i64::from(max.days) => {
                            s.value.flags |= ENDPOINT_QUARANTINED;
                            s.reasons.push(format!(
                                "patched {d}, {} days ago (zone {zone} allows {max})",
                                d.age_days(today())
                            ));
                        }
                        Some(_) => {}
                    }
                }
                if bound.is_some() {
                    let violations = settings.placement_violations(&self.opts.labels);
                    if !violations.is_empty() {
                        let text = format!(
                            "placement: zone {zone} may not run on node {} ({})",
                            self.opts.node,
                            violations.join(", ")
                        );
                        if settings.on_violation == OnViolation::Isolate {
                            s.value.flags |= ENDPOINT_ISOLATED;
                            s.reasons.push(text.clone());
                        }
                        s.placement.push(text);
                    }
                }
            }
        }
        s
    }

    /// The endpoint entries and runtime virtual patches for a rule set: what the agent
    /// writes over the compiled entries in every half it fills.
    pub(super) fn compute(&self, st: &mut State, port_zone: &dyn Fn(u32) -> u16) -> EndpointOverlay {
        let mut overlay = EndpointOverlay::default();
        let compiled = st.compiled.clone();
        for def in Self::defs(st) {
            let s = self.assess(st, &def, port_zone);
            if def.runtime {
                if let Some(c) = &compiled {
                    overlay.vpatches.extend(c.vpatch_entries(s.value.endpoint_id, &def.tags));
                }
            }
            overlay.endpoints.push((def.mac, s.value));
        }
        let unknown: Vec<(MacAddr, Bound, u16)> = st.unknown.iter().map(|(m, (b, z))| (*m, b.clone(), *z)).collect();
        for (mac, bound, zone) in unknown {
            if overlay.endpoints.iter().any(|(m, _)| *m == mac) {
                st.unknown.remove(&mac);
                continue;
            }
            let endpoint_id = Self::id_for(st, mac);
            let value =
                EndpointValue { zone, flags: ENDPOINT_QUARANTINED, endpoint_id, ifindex: bound.ifindex, _pad: [0; 4] };
            overlay.endpoints.push((mac, value));
        }
        // Ports locked on first use to a MAC outside the inventory: the MAC is the port's
        // endpoint, in the zone its first address (or the port's name) chose, so that
        // frames to it are judged for that zone where they enter the switch.
        let learned: Vec<(u32, super::binding::LearnedPort)> = st.learned_ports.iter().map(|(i, l)| (*i, *l)).collect();
        for (ifindex, l) in learned {
            // A port whose name gives it its zone has no entry: its zone follows the rules.
            let Some(zone) = l.zone else { continue };
            if overlay.endpoints.iter().any(|(m, _)| *m == l.mac) {
                continue;
            }
            let endpoint_id = Self::id_for(st, l.mac);
            overlay.endpoints.push((l.mac, EndpointValue { zone, flags: 0, endpoint_id, ifindex, _pad: [0; 4] }));
        }
        overlay
    }
}
