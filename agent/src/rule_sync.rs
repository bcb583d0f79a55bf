//! The rules in force: loading the rule set given with `--rules`, putting it into the
//! data path, and following changes of its files.
//!
//! Putting a rule set in force: compile it against the zone ids of the one before (so a
//! zone keeps its id), write it into the half of the double-buffered rule tables that is
//! not in force, give every attached port its zone in that half, then switch with one
//! write of `CONFIG` (see [`crate::rule_tables`]). A packet reads `CONFIG` once: it is
//! judged wholly by the old rule set or wholly by the new one.
//!
//! A rule set with any error is rejected whole and the last good one stays in force; so
//! does it when the rules directory disappears. Every rejection is logged with all its
//! errors and kept in `status` until a good rule set replaces it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use backplane_rules::{RuleSet, WORLD, ZoneIds, compile, load_rules};
use serde::{Deserialize, Serialize};

use crate::{
    clock::rfc3339_ms,
    datapath::Datapath,
    endpoints::Endpoints,
    error::{ExplainError, RulesError, report},
    explain::{ExplainQuery, ExplainReply, explain_packet},
    rule_names::RuleNames,
    rule_watch::{ChangeDetector, Fingerprint, POLL_PERIOD},
};

/// A rule set read from its files, not yet in force.
pub struct LoadedRules {
    pub rules: RuleSet,
    /// The files as they were when read.
    pub fingerprint: Fingerprint,
}

impl LoadedRules {
    /// Reads and validates the rule set at `path` (a directory of `*.yaml` files, or one
    /// file). Blocking.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        // Fingerprint first: if the files change while they are read, the watcher sees
        // a fingerprint that differs from this one and reads them again.
        let fingerprint = Fingerprint::of(path);
        let rules = load_rules(path).map_err(|errors| RulesError::Invalid { path: path.to_owned(), errors })?;
        Ok(Self { rules, fingerprint })
    }

    #[must_use]
    pub fn counts(&self) -> RuleCounts {
        RuleCounts::of(&self.rules, self.fingerprint.files())
    }
}

/// Counts of a rule set, as `check`, the logs and `status` show them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounts {
    pub files: usize,
    /// Zones the files define (`world` is built in and not counted).
    pub zones: usize,
    pub policies: usize,
}

impl RuleCounts {
    #[must_use]
    pub fn of(rules: &RuleSet, files: usize) -> Self {
        Self { files, zones: rules.zones.iter().filter(|z| z.name != WORLD).count(), policies: rules.policies.len() }
    }
}

impl std::fmt::Display for RuleCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let policies = if self.policies == 1 { "1 policy".to_owned() } else { format!("{} policies", self.policies) };
        write!(f, "{}, {}, {policies}", plural(self.files, "file"), plural(self.zones, "zone"))
    }
}

/// The `rules` object of `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesStatus {
    /// `--rules`; `None` when the agent runs without rules (observe only).
    pub path: Option<String>,
    /// The `CONFIG` generation in force; 0: no rule set has been put in force.
    pub generation: u32,
    /// When the rule set in force was put in force (RFC 3339).
    pub loaded_at: Option<String>,
    pub files: u64,
    pub zones: u64,
    pub policies: u64,
    /// Changes of the rule files put in force after the first rule set.
    pub reloads_ok: u64,
    /// Changes of the rule files rejected (errors, directory gone, table write failed).
    pub reloads_rejected: u64,
    /// The errors of the last rejection (`file:line:column: message`), until a good
    /// rule set is put in force.
    pub last_error: Vec<String>,
    pub last_error_at: Option<String>,
}

/// The rule set in force.
struct InForce {
    rules: Arc<RuleSet>,
    generation: u32,
    loaded_at_ms: i64,
    counts: RuleCounts,
}

#[derive(Default)]
struct RuleState {
    in_force: Option<InForce>,
    /// The zone ids of the rule sets put in force so far; the next is compiled against them.
    zone_ids: ZoneIds,
    reloads_ok: u64,
    reloads_rejected: u64,
    last_error: Vec<String>,
    last_error_at_ms: Option<i64>,
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The rules given with `--rules`: what is in force, and the watch on their files.
pub struct RuleSync {
    path: PathBuf,
    /// Whether `path` was a directory at start (for messages once it is gone).
    was_dir: bool,
    datapath: Arc<Mutex<Datapath>>,
    names: Arc<RuleNames>,
    state: Mutex<RuleState>,
    detector: Mutex<ChangeDetector>,
    /// The endpoints the agent adds to every rule set it writes.
    endpoints: Arc<Endpoints>,
}

impl RuleSync {
    /// Puts the rule set loaded at start in force. Fails, leaving the data path observing
    /// only, if the rule tables cannot be written.
    pub fn start(
        path: &Path,
        loaded: LoadedRules,
        datapath: Arc<Mutex<Datapath>>,
        names: Arc<RuleNames>,
        endpoints: Arc<Endpoints>,
    ) -> Result<Arc<Self>, RulesError> {
        let sync = Arc::new(Self {
            path: path.to_owned(),
            was_dir: path.is_dir(),
            datapath,
            names,
            state: Mutex::new(RuleState::default()),
            detector: Mutex::new(ChangeDetector::new(loaded.fingerprint.clone())),
            endpoints,
        });
        let counts = loaded.counts();
        let generation = sync.put_in_force(loaded.rules, counts)?;
        log::info!("rules generation {generation} in force ({counts}) from {}", path.display());
        Ok(sync)
    }

    /// Compiles a rule set and puts it in force; returns its generation.
    fn put_in_force(&self, rules: RuleSet, counts: RuleCounts) -> Result<u32, RulesError> {
        let zone_ids = self.state.lock().expect("rule state lock").zone_ids.clone();
        let compiled = Arc::new(compile(&rules, &zone_ids));
        let rules = Arc::new(rules);
        // The endpoints' runtime state goes into the new half with the rules.
        let overlay = self.endpoints.overlay(&rules, &compiled);
        // Lock order: data path, then names, then state (as `status` takes them).
        let mut datapath = self.datapath.lock().expect("datapath lock");
        let tables = |source| RulesError::Tables { path: self.path.clone(), source };
        let staged = datapath.stage_rules(Arc::clone(&compiled), &overlay).map_err(tables)?;
        let generation = {
            // Flow records of the new generation must find its names: hold them back
            // from the switch until the names are published.
            let mut names = self.names.write();
            let generation = datapath.activate_rules(staged).map_err(tables)?;
            names.publish(generation, &compiled);
            generation
        };
        drop(datapath);
        {
            let mut state = self.state.lock().expect("rule state lock");
            state.zone_ids = compiled.zone_ids.clone();
            state.in_force = Some(InForce { rules: Arc::clone(&rules), generation, loaded_at_ms: now_unix_ms(), counts });
            state.last_error.clear();
            state.last_error_at_ms = None;
        }
        self.endpoints.rules_in_force(rules, compiled);
        Ok(generation)
    }

    /// Looks at the rule files once; puts a settled change in force or records why not.
    /// Blocking (file reads, compile, map writes).
    pub fn poll(&self) {
        let now = Fingerprint::of(&self.path);
        let Some(changed) = self.detector.lock().expect("rule detector lock").observe(now) else { return };
        let result = match changed {
            Fingerprint::Gone => Err(RulesError::Gone { path: self.path.clone(), was_dir: self.was_dir }),
            Fingerprint::Unreadable(reason) => Err(RulesError::Unreadable { path: self.path.clone(), reason }),
            files @ Fingerprint::Files(_) => load_rules(&self.path)
                .map_err(|errors| RulesError::Invalid { path: self.path.clone(), errors })
                .and_then(|rules| {
                    let counts = RuleCounts::of(&rules, files.files());
                    self.put_in_force(rules, counts).map(|generation| (generation, counts))
                }),
        };
        match result {
            Ok((generation, counts)) => {
                self.state.lock().expect("rule state lock").reloads_ok += 1;
                log::info!("rules generation {generation} in force ({counts}) from {}", self.path.display());
            }
            Err(e) => self.reject(&e),
        }
    }

    fn reject(&self, error: &RulesError) {
        let lines = error.lines();
        let mut state = self.state.lock().expect("rule state lock");
        let kept = state.in_force.as_ref().map_or(0, |f| f.generation);
        log::error!(
            "rules at {} rejected ({} problem{}); generation {kept} stays in force:",
            self.path.display(),
            lines.len(),
            if lines.len() == 1 { "" } else { "s" }
        );
        for line in &lines {
            log::error!("  {line}");
        }
        state.reloads_rejected += 1;
        state.last_error = lines;
        state.last_error_at_ms = Some(now_unix_ms());
    }

    /// Follows the rule files until the task is dropped.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(POLL_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let sync = Arc::clone(&self);
            if let Err(e) = tokio::task::spawn_blocking(move || sync.poll()).await {
                log::error!("watching the rules at {} failed once: {}", self.path.display(), report(&e));
            }
        }
    }

    /// The `rules` object of `status`. `generation` is the one `CONFIG` holds.
    #[must_use]
    pub fn status(&self, generation: u32) -> RulesStatus {
        let state = self.state.lock().expect("rule state lock");
        let counts = state.in_force.as_ref().map(|f| f.counts).unwrap_or_default();
        RulesStatus {
            path: Some(self.path.display().to_string()),
            generation,
            loaded_at: state.in_force.as_ref().map(|f| rfc3339_ms(f.loaded_at_ms)),
            files: counts.files as u64,
            zones: counts.zones as u64,
            policies: counts.policies as u64,
            reloads_ok: state.reloads_ok,
            reloads_rejected: state.reloads_rejected,
            last_error: state.last_error.clone(),
            last_error_at: state.last_error_at_ms.map(rfc3339_ms),
        }
    }

    /// Explains a flow under the rule set in force.
    pub fn explain(&self, query: &ExplainQuery) -> Result<ExplainReply, ExplainError> {
        let packet = query.packet()?;
        let rules = {
            let state = self.state.lock().expect("rule state lock");
            state.in_force.as_ref().map(|f| Arc::clone(&f.rules))
        };
        let rules = rules.ok_or(ExplainError::NoRules)?;
        Ok(explain_packet(&rules, &packet))
    }
}
