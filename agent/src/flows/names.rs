//! Names for the ids the data path records: zone ids and policy ids in flows and in the
//! zone-pair counters.
//!
//! Zone ids are stable for the agent's life (each rule set is compiled against the ids
//! of the one before), so the newest [`ZoneIds`] names every zone id a flow can carry.
//! Policy ids are indexes in one rule set and may mean another policy after a reload, so
//! policy names are kept per rule generation: a flow is named by the rule set that
//! judged it.

use std::{
    collections::VecDeque,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use backplane_common::policy::{POLICY_ID_DEFAULT_INTER_ZONE, POLICY_ID_INTRA_ZONE, POLICY_ID_NONE};
use backplane_rules::{CompiledRules, ZoneIds};

/// How many rule generations keep their policy names. A flow judged by an older one
/// (idle through that many reloads) shows its policy as `policy-<id>`.
pub const POLICY_NAME_GENERATIONS: usize = 32;

/// The name of a policy id that stands for a default rather than a policy:
/// `default_inter_zone`, `intra_zone`; `None` for any other id.
#[must_use]
pub fn default_policy_name(id: u32) -> Option<&'static str> {
    match id {
        POLICY_ID_DEFAULT_INTER_ZONE => Some("default_inter_zone"),
        POLICY_ID_INTRA_ZONE => Some("intra_zone"),
        _ => None,
    }
}

/// Zone and policy names of the rule sets put in force, as plain data.
#[derive(Clone, Debug, Default)]
pub struct NameTable {
    zone_ids: ZoneIds,
    /// (generation, policy names by id), oldest first.
    policies: VecDeque<(u32, Arc<[String]>)>,
}

impl NameTable {
    /// Records the names of a rule set put in force as `generation`.
    pub fn publish(&mut self, generation: u32, compiled: &CompiledRules) {
        self.zone_ids = compiled.zone_ids.clone();
        // Reloads that keep the policies share one list.
        let names = match self.policies.back() {
            Some((_, last)) if **last == *compiled.policy_names => Arc::clone(last),
            _ => Arc::from(compiled.policy_names.clone()),
        };
        self.policies.retain(|(g, _)| *g != generation);
        self.policies.push_back((generation, names));
        while self.policies.len() > POLICY_NAME_GENERATIONS {
            self.policies.pop_front();
        }
    }

    /// A zone id's name; `zone-<id>` for an id no rule set named.
    #[must_use]
    pub fn zone(&self, id: u16) -> String {
        self.zone_ids.name(id).map_or_else(|| format!("zone-{id}"), str::to_owned)
    }

    /// The name of policy `id` as rule generation `generation` knew it:
    /// `default_inter_zone` and `intra_zone` for the defaults, `None` for "no rule set",
    /// `policy-<id>` when that generation's names are no longer kept.
    #[must_use]
    pub fn policy(&self, generation: u32, id: u32) -> Option<String> {
        if let Some(name) = default_policy_name(id) {
            return Some(name.to_owned());
        }
        if id == POLICY_ID_NONE {
            return None;
        }
        let names = self.policies.iter().rev().find(|(g, _)| *g == generation).map(|(_, n)| n);
        let name = names.and_then(|n| n.get(usize::try_from(id).ok()?));
        Some(name.map_or_else(|| format!("policy-{id}"), Clone::clone))
    }
}

/// The [`NameTable`] shared by the rule sync (writer) and the flow table (readers).
#[derive(Debug, Default)]
pub struct RuleNames {
    table: RwLock<NameTable>,
}

impl RuleNames {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, NameTable> {
        self.table.write().expect("rule names lock")
    }

    pub fn read(&self) -> RwLockReadGuard<'_, NameTable> {
        self.table.read().expect("rule names lock")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use backplane_rules::{compile, parse_rules};

    use super::*;

    fn compiled(text: &str, ids: &ZoneIds) -> CompiledRules {
        let rules = parse_rules([(Path::new("r.yaml"), text)]).expect("valid rules");
        compile(&rules, ids)
    }

    const TWO: &str = "zones:\n  a: { members: [ { cidr: 10.1.0.0/16 } ] }\n  b: { members: [ { cidr: 10.2.0.0/16 } ] }\n\
                       policies:\n  - { name: a-to-b, from: a, to: b, allow: [] }\n  - { name: b-to-a, from: b, to: a, allow: [] }\n";

    #[test]
    fn zones_by_id_and_unknown_ids() {
        let mut t = NameTable::default();
        assert_eq!(t.zone(0), "world");
        let c = compiled(TWO, &ZoneIds::new());
        t.publish(1, &c);
        let a = c.zone_ids.id("a").unwrap();
        assert_eq!(t.zone(a), "a");
        assert_eq!(t.zone(0), "world");
        assert_eq!(t.zone(999), "zone-999");
    }

    #[test]
    fn policies_are_named_by_the_generation_that_judged() {
        let mut t = NameTable::default();
        let first = compiled(TWO, &ZoneIds::new());
        t.publish(1, &first);
        // The same policies in the other order: ids swap meaning.
        let swapped = TWO.replace("  - { name: a-to-b, from: a, to: b, allow: [] }\n", "")
            + "  - { name: a-to-b, from: a, to: b, allow: [] }\n";
        let second = compiled(&swapped, &first.zone_ids);
        t.publish(2, &second);
        assert_eq!(t.policy(1, 0).as_deref(), Some("a-to-b"));
        assert_eq!(t.policy(2, 0).as_deref(), Some("b-to-a"));
        assert_eq!(t.policy(2, POLICY_ID_DEFAULT_INTER_ZONE).as_deref(), Some("default_inter_zone"));
        assert_eq!(t.policy(2, POLICY_ID_INTRA_ZONE).as_deref(), Some("intra_zone"));
        assert_eq!(t.policy(2, POLICY_ID_NONE), None);
        assert_eq!(t.policy(2, 7).as_deref(), Some("policy-7"), "an id past the rule set");
        assert_eq!(t.policy(9, 0).as_deref(), Some("policy-0"), "a generation never seen");
        // Zone ids stay: a is still a.
        assert_eq!(second.zone_ids.id("a"), first.zone_ids.id("a"));
    }

    #[test]
    fn only_recent_generations_are_kept() {
        let mut t = NameTable::default();
        let c = compiled(TWO, &ZoneIds::new());
        for g in 1..=u32::try_from(POLICY_NAME_GENERATIONS).unwrap() + 5 {
            t.publish(g, &c);
        }
        assert_eq!(t.policies.len(), POLICY_NAME_GENERATIONS);
        assert_eq!(t.policy(1, 0).as_deref(), Some("policy-0"));
        assert_eq!(t.policy(6, 0).as_deref(), Some("a-to-b"));
        // Unchanged names are shared, not copied.
        assert!(Arc::ptr_eq(&t.policies[0].1, &t.policies[1].1));
    }
}
