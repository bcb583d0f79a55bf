//! What a zone gets when the agent starts with rule files it cannot load and no rule
//! set is in force: its `on_rules_failure` setting, applied to the last rule set that
//! was good.
//!
//! The agent keeps a copy of the last good rule files. Starting with broken files and
//! nothing in force (no previous agent's generation in the kernel), it puts in force
//! [`RuleSet::failure_rules`] of that copy: the zones and their members as they were,
//! none of the policies, and
//!
//! - `closed` (the default): every flow from or to the zone is denied, within the zone
//!   too;
//! - `open`: flows between open zones, and within one, pass.
//!
//! A flow between a closed zone and an open one is denied: closed wins. `world` takes
//! the setting given in `zones: { world: { on_rules_failure: ... } }`, `closed`
//! otherwise.

use std::fmt;

use crate::{
    WORLD,
    ruleset::{Access, Mode, Policy, RuleSet, Zone},
    types::SourcePos,
};

/// A zone's `on_rules_failure` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum OnRulesFailure {
    /// Deny every flow from and to the zone.
    #[default]
    Closed,
    /// Let flows with other open zones (and within the zone) pass.
    Open,
}

impl OnRulesFailure {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }
}

impl fmt::Display for OnRulesFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Prefix of the names of the policies [`RuleSet::failure_rules`] makes.
pub const FAILURE_POLICY_PREFIX: &str = "on_rules_failure:";

impl RuleSet {
    /// The `on_rules_failure` of a zone (`closed` unless the files say otherwise).
    #[must_use]
    pub fn on_rules_failure(&self, zone: &str) -> OnRulesFailure {
        self.zone(zone).map_or(OnRulesFailure::Closed, |z| z.on_rules_failure)
    }

    /// The rule set to put in force in place of this one when the rule files cannot be
    /// loaded at start and nothing is in force: the same zones, members, endpoints and
    /// virtual patches; each zone's traffic `closed` (denied, within the zone too) or
    /// `open` (passes with other open zones) by its `on_rules_failure`.
    ///
    /// It is made of ordinary rules: a closed zone's `intra_zone` is `deny`; every pair
    /// of zones with a closed end is covered by a policy
    /// `on_rules_failure:<from>-><to>` that allows nothing (so its flows are denied with
    /// the reason `policy_no_match`); `default_inter_zone` is `allow` for the pairs
    /// left, whose ends are both open.
    #[must_use]
    pub fn failure_rules(&self) -> RuleSet {
        let mut zones: Vec<Zone> = self.zones.clone();
        if !zones.iter().any(|z| z.name == WORLD) {
            let location = zones.first().map_or_else(
                || SourcePos { file: std::path::Path::new("(built in)").into(), line: 0, column: 0 },
                |z| z.location.clone(),
            );
            zones.insert(
                0,
                Zone {
                    name: WORLD.to_owned(),
                    members: Vec::new(),
                    intra_zone: Access::Allow,
                    location,
                    endpoints: crate::ZoneEndpoints::default(),
                    on_rules_failure: OnRulesFailure::Closed,
                    binding: crate::Binding::default(),
                },
            );
        }
        for zone in &mut zones {
            zone.intra_zone = match zone.on_rules_failure {
                OnRulesFailure::Closed => Access::Deny,
                OnRulesFailure::Open => Access::Allow,
            };
        }
        let mut policies = Vec::new();
        for from in &zones {
            for to in &zones {
                let closed =
                    from.on_rules_failure == OnRulesFailure::Closed || to.on_rules_failure == OnRulesFailure::Closed;
                if from.name == to.name || !closed {
                    continue;
                }
                policies.push(Policy {
                    name: format!("{FAILURE_POLICY_PREFIX}{}->{}", from.name, to.name),
                    from: from.name.clone(),
                    to: to.name.clone(),
                    allow: Vec::new(),
                    mode: Mode::Enforce,
                    location: from.location.clone(),
                });
            }
        }
        RuleSet {
            zones,
            policies,
            default_inter_zone: Access::Allow,
            default_inter_zone_at: None,
            endpoints: self.endpoints.clone(),
            virtual_patches: self.virtual_patches.clone(),
            unbound_ports: self.unbound_ports,
            infrastructure: self.infrastructure.clone(),
        }
    }
}
