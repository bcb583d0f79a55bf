//! The rules in force: loading the rule set given with `--rules`, putting it into the
//! data path, and following changes of its files.
//!
//! Putting a rule set in force: compile it against the zone ids of the one before (so a
//! zone keeps its id), write it into the half of the double-buffered rule tables that is
//! not in force, give every attached port its zone in that half, then switch with one
//! write of `CONFIG` (see [`crate::datapath::rule_tables`]). A packet reads `CONFIG` once: it is
//! judged wholly by the old rule set or wholly by the new one.
//!
//! A rule set with any error is rejected whole and the last good one stays in force; so
//! does it when the rules directory disappears. Every rejection is logged with all its
//! errors and kept in `status` until a good rule set replaces it.
//!
//! Every rule set put in force from the files is saved as the last good copy in the
//! state directory (see [`crate::rules::last_good`]). At start, rule files that do not load
//! leave in force what a previous agent left in the kernel ([`StartRules::Inherited`]);
//! with nothing in force, the last good copy goes in force under each zone's
//! `on_rules_failure` ([`StartRules::FailureMode`]). Either way the files are watched and
//! a good rule set replaces it as soon as there is one.
//!
//! - this file: [`RuleSync`], the rule set in force and its reloads; what `check` and
//!   `status` show of a rule set;
//! - [`watch`]: noticing that the rule files changed; [`last_good`]: the copy of the last
//!   good rule files; [`explain`]: the verdict a rule set gives a flow, and why;
//!   [`error`]: why a rule set cannot be loaded or put in force.
//!
//! The rules sit above the endpoints and the flows: each rule set put in force carries
//! the endpoints' overlay ([`crate::endpoints::Endpoints::overlay`]) and is announced to
//! them, and the names of its zone and policy ids are published for the flow records
//! ([`crate::flows::names`]); the data path writes it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use backplane_rules::{
    OnRulesFailure, RuleError, RuleSet, WORLD, ZoneIds, compile, load_rules, parse_rules, rule_files,
};
use serde::{Deserialize, Serialize};

use crate::{
    clock::{now_unix_ms, rfc3339_ms},
    datapath::Datapath,
    endpoints::Endpoints,
    error::report,
    flows::names::RuleNames,
    rules::explain::{ExplainError, ExplainQuery, ExplainReply, explain_packet},
    rules::last_good::LastGood,
    rules::watch::{ChangeDetector, Fingerprint, POLL_PERIOD},
};

pub mod error;
pub mod explain;
pub mod last_good;
pub mod watch;

pub use error::RulesError;

/// Rule files as read: (path, contents), in load order.
pub type Sources = Vec<(PathBuf, String)>;

/// A rule set read from its files, not yet in force.
pub struct LoadedRules {
    pub rules: RuleSet,
    /// The files as they were when read.
    pub fingerprint: Fingerprint,
    /// Their contents as parsed (for the last good copy).
    pub sources: Sources,
}

/// Reads and parses the rule files of `path`, keeping what was read. Errors are those of
/// `backplane_rules::load_rules` (`file:line:column`, or whole-file problems).
pub fn read_rules(path: &Path) -> Result<(RuleSet, Sources), Vec<RuleError>> {
    let fallback = || load_rules(path).map(|rules| (rules, Vec::new()));
    let Ok(files) = rule_files(path) else { return fallback() };
    if files.is_empty() {
        return fallback();
    }
    let mut sources = Vec::with_capacity(files.len());
    for file in files {
        // Bounded: a file over the size limit is refused before it is read.
        match backplane_rules::read_rule_file(&file) {
            Ok(text) => sources.push((file, text)),
            Err(e) => return Err(vec![e]),
        }
    }
    let rules = parse_rules(sources.iter().map(|(p, t)| (p.as_path(), t.as_str())))?;
    Ok((rules, sources))
}

impl LoadedRules {
    /// Reads and validates the rule set at `path` (a directory of `*.yaml` files, or one
    /// file). Blocking.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        // Fingerprint first: if the files change while they are read, the watcher sees
        // a fingerprint that differs from this one and reads them again.
        let fingerprint = Fingerprint::of(path);
        let (rules, sources) =
            read_rules(path).map_err(|errors| RulesError::Invalid { path: path.to_owned(), errors })?;
        Ok(Self { rules, fingerprint, sources })
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
    /// Where the rules in force come from: `files` (the rules path), `previous_agent`
    /// (the generation a previous agent left in force, kept because the files did not
    /// load at start) or `failure_mode` (the last good copy under each zone's
    /// `on_rules_failure`, because the files did not load and nothing was in force).
    #[serde(default)]
    pub in_force_from: String,
    /// In failure mode: the zones whose traffic is denied and those whose traffic passes.
    #[serde(default)]
    pub failure_closed: Vec<String>,
    #[serde(default)]
    pub failure_open: Vec<String>,
    /// The last good copy of the rule files (in the state directory), if there is one.
    #[serde(default)]
    pub last_good_copy: Option<String>,
}

/// Where the rules in force come from (see [`RulesStatus::in_force_from`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum InForceFrom {
    #[default]
    Files,
    PreviousAgent,
    FailureMode {
        closed: Vec<String>,
        open: Vec<String>,
    },
}

impl InForceFrom {
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Files => "files",
            Self::PreviousAgent => "previous_agent",
            Self::FailureMode { .. } => "failure_mode",
        }
    }
}

/// What the agent puts in force at start.
pub enum StartRules {
    /// The rule files loaded.
    Loaded(LoadedRules),
    /// The files did not load; the generation a previous agent left in the kernel stays
    /// in force, untouched.
    Inherited { error: RulesError, generation: u32 },
    /// The files did not load and nothing was in force: the failure rule set of the last
    /// good copy.
    FailureMode { error: RulesError, copy: RuleSet, meta: last_good::Meta },
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
    from: InForceFrom,
    /// The zone ids of the rule sets put in force so far; the next is compiled against them.
    zone_ids: ZoneIds,
    reloads_ok: u64,
    reloads_rejected: u64,
    last_error: Vec<String>,
    last_error_at_ms: Option<i64>,
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
    /// The last good copy, saved whenever the files' rules go in force.
    last_good: LastGood,
}

impl RuleSync {
    /// Puts the rules of the start in force (see [`StartRules`]). Fails if the rule
    /// tables cannot be written.
    pub fn start(
        path: &Path,
        start: StartRules,
        datapath: Arc<Mutex<Datapath>>,
        names: Arc<RuleNames>,
        endpoints: Arc<Endpoints>,
        last_good: LastGood,
    ) -> Result<Arc<Self>, RulesError> {
        // Zone ids carry on across restarts: flows judged before keep their zone names.
        let zone_ids = last_good.meta().map(|m| m.zone_ids).unwrap_or_default();
        let fingerprint = match &start {
            StartRules::Loaded(loaded) => loaded.fingerprint.clone(),
            _ => Fingerprint::of(path),
        };
        let sync = Arc::new(Self {
            path: path.to_owned(),
            was_dir: path.is_dir(),
            datapath,
            names,
            state: Mutex::new(RuleState { zone_ids, ..RuleState::default() }),
            detector: Mutex::new(ChangeDetector::new(fingerprint)),
            endpoints,
            last_good,
        });
        match start {
            StartRules::Loaded(loaded) => {
                let counts = loaded.counts();
                let generation = sync.put_in_force(loaded.rules, counts, &InForceFrom::Files, &loaded.sources)?;
                log::info!("rules generation {generation} in force ({counts}) from {}", path.display());
            }
            StartRules::Inherited { error, generation } => {
                sync.record_error(&error, &format!("the generation {generation} a previous agent left in force stays"));
                sync.keep_inherited(generation);
            }
            StartRules::FailureMode { error, copy, meta } => {
                let failure = copy.failure_rules();
                let (closed, open): (Vec<String>, Vec<String>) = {
                    let names: Vec<String> = failure.zone_names().map(str::to_owned).collect();
                    names.into_iter().partition(|z| copy.on_rules_failure(z) == OnRulesFailure::Closed)
                };
                let counts = RuleCounts::of(&failure, meta.files.len());
                let from = InForceFrom::FailureMode { closed: closed.clone(), open: open.clone() };
                let generation = sync.put_in_force(failure, counts, &from, &[])?;
                sync.record_error(
                    &error,
                    &format!(
                        "nothing was in force: generation {generation} is the last good copy ({}) under on_rules_failure: \
                         closed [{}], open [{}]",
                        sync.last_good.dir().display(),
                        closed.join(","),
                        open.join(",")
                    ),
                );
            }
        }
        Ok(sync)
    }

    /// Leaves the generation a previous agent left in force as it is. If the last good
    /// copy is that generation, it names its zones and policies, places ports by name
    /// and answers `explain`, without a write to the tables.
    fn keep_inherited(&self, generation: u32) {
        let copy = self.last_good.load().ok().filter(|(_, meta)| meta.generation == generation);
        let mut state = self.state.lock().expect("rule state lock");
        state.from = InForceFrom::PreviousAgent;
        let Some((rules, meta)) = copy else {
            log::warn!(
                "the rules of generation {generation} are not known (no matching copy in {}): zone and policy names, \
                 explain and interface members wait for a good rule set",
                self.last_good.dir().display()
            );
            return;
        };
        let compiled = Arc::new(compile(&rules, &meta.zone_ids));
        let rules = Arc::new(rules);
        let counts = RuleCounts::of(&rules, meta.files.len());
        state.zone_ids = compiled.zone_ids.clone();
        state.in_force =
            Some(InForce { rules: Arc::clone(&rules), generation, loaded_at_ms: meta.saved_at_ms, counts });
        drop(state);
        let mut datapath = self.datapath.lock().expect("datapath lock");
        datapath.know_rules(Arc::clone(&compiled));
        self.names.write().publish(generation, &compiled);
        drop(datapath);
        self.endpoints.rules_in_force(rules, compiled);
        log::info!("generation {generation} in force is the last good copy of {}: its names are known", meta.source);
    }

    /// Records a rule set that could not be put in force at start (not a reload).
    fn record_error(&self, error: &RulesError, kept: &str) {
        let lines = error.lines();
        log::error!("rules at {} cannot be loaded; {kept}:", self.path.display());
        for line in &lines {
            log::error!("  {line}");
        }
        let mut state = self.state.lock().expect("rule state lock");
        state.last_error = lines;
        state.last_error_at_ms = Some(now_unix_ms());
    }

    /// Compiles a rule set and puts it in force; returns its generation. A rule set from
    /// the files (`sources` not empty) becomes the last good copy.
    fn put_in_force(
        &self,
        rules: RuleSet,
        counts: RuleCounts,
        from: &InForceFrom,
        sources: &[(PathBuf, String)],
    ) -> Result<u32, RulesError> {
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
            state.in_force =
                Some(InForce { rules: Arc::clone(&rules), generation, loaded_at_ms: now_unix_ms(), counts });
            state.from = from.clone();
            state.last_error.clear();
            state.last_error_at_ms = None;
        }
        if !sources.is_empty() {
            let meta = last_good::Meta {
                generation,
                source: self.path.display().to_string(),
                saved_at_ms: now_unix_ms(),
                zone_ids: compiled.zone_ids.clone(),
                files: Vec::new(),
            };
            if let Err(e) = self.last_good.save(sources, &meta) {
                log::error!("cannot save the last good rules in {}: {e}", self.last_good.dir().display());
            }
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
            files @ Fingerprint::Files(_) => read_rules(&self.path)
                .map_err(|errors| RulesError::Invalid { path: self.path.clone(), errors })
                .and_then(|(rules, sources)| {
                    let counts = RuleCounts::of(&rules, files.files());
                    self.put_in_force(rules, counts, &InForceFrom::Files, &sources)
                        .map(|generation| (generation, counts))
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
            in_force_from: state.from.as_str().into(),
            failure_closed: match &state.from {
                InForceFrom::FailureMode { closed, .. } => closed.clone(),
                _ => Vec::new(),
            },
            failure_open: match &state.from {
                InForceFrom::FailureMode { open, .. } => open.clone(),
                _ => Vec::new(),
            },
            last_good_copy: self.last_good.meta().map(|_| self.last_good.dir().display().to_string()),
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
