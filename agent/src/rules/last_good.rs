//! The copy of the last good rule files, kept in the state directory.
//!
//! Every rule set put in force from the rules path is saved as it was read (the files'
//! exact contents) with the zone ids it was compiled with and its generation:
//! `<state-dir>/rules.last-good/` holds the `*.yaml` files and `meta.json`. A start with
//! rule files that cannot be loaded uses it: for the names of a generation a previous
//! agent left in force, or, when nothing is in force, for the failure rule set of each
//! zone's `on_rules_failure` (see `backplane_rules::RuleSet::failure_rules`). Zone ids
//! are also taken from it at every start, so a zone keeps its id across restarts and
//! flows judged before a restart keep their zone names.
//!
//! A save writes a new directory beside the old one and swaps them by renames: a crash
//! leaves either copy whole.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use backplane_rules::{RuleSet, ZoneIds, parse_rules};
use serde::{Deserialize, Serialize};

/// Name of the copy under the state directory.
pub const LAST_GOOD_DIR: &str = "rules.last-good";
/// The copy's description, beside the rule files.
const META_FILE: &str = "meta.json";

/// What `meta.json` says about the copy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The rule generation the copy was put in force as.
    pub generation: u32,
    /// The rules path it was read from.
    pub source: String,
    /// When it was saved (Unix milliseconds).
    pub saved_at_ms: i64,
    /// The zone ids it was compiled with.
    pub zone_ids: ZoneIds,
    /// The rule files, in load order.
    pub files: Vec<String>,
}

/// The last good copy of a node's rules.
#[derive(Clone, Debug)]
pub struct LastGood {
    dir: PathBuf,
}

impl LastGood {
    #[must_use]
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join(LAST_GOOD_DIR) }
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.dir.file_name().unwrap_or_default().to_owned();
        name.push(suffix);
        self.dir.with_file_name(name)
    }

    /// The copy's directory: the current one, or the previous one if a save was cut
    /// short between its two renames.
    fn current(&self) -> Option<PathBuf> {
        [self.dir.clone(), self.sibling(".old")].into_iter().find(|d| d.join(META_FILE).is_file())
    }

    /// Saves `sources` (path, contents) as the last good copy, with `meta`.
    pub fn save(&self, sources: &[(PathBuf, String)], meta: &Meta) -> io::Result<()> {
        let parent = self.dir.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(parent)?;
        let new = self.sibling(".new");
        let old = self.sibling(".old");
        let _ = fs::remove_dir_all(&new);
        fs::create_dir_all(&new)?;
        let mut files = Vec::with_capacity(sources.len());
        for (i, (path, text)) in sources.iter().enumerate() {
            // Names keep the load order (byte order of the names) whatever the source.
            let base = path.file_name().map_or_else(|| "rules.yaml".into(), |n| n.to_string_lossy().into_owned());
            let name = format!("{i:04}-{base}");
            let name =
                if Path::new(&name).extension().is_some_and(|e| e == "yaml") { name } else { format!("{name}.yaml") };
            fs::write(new.join(&name), text)?;
            files.push(name);
        }
        let meta = Meta { files, ..meta.clone() };
        fs::write(new.join(META_FILE), serde_json::to_vec_pretty(&meta).map_err(io::Error::other)?)?;
        let _ = fs::remove_dir_all(&old);
        if self.dir.exists() {
            fs::rename(&self.dir, &old)?;
        }
        fs::rename(&new, &self.dir)?;
        let _ = fs::remove_dir_all(&old);
        Ok(())
    }

    /// The copy's description, if there is a copy.
    #[must_use]
    pub fn meta(&self) -> Option<Meta> {
        let dir = self.current()?;
        let bytes = fs::read(dir.join(META_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Loads the copy: its rule set and description, or why there is none to use.
    pub fn load(&self) -> Result<(RuleSet, Meta), String> {
        let dir = self.current().ok_or_else(|| format!("there is no copy of good rules in {}", self.dir.display()))?;
        let meta = self.meta().ok_or_else(|| format!("{}: unreadable {META_FILE}", dir.display()))?;
        let mut texts = Vec::with_capacity(meta.files.len());
        for name in &meta.files {
            let path = dir.join(name);
            let text = backplane_rules::read_rule_file(&path).map_err(|e| e.to_string())?;
            texts.push((path, text));
        }
        let rules = parse_rules(texts.iter().map(|(p, t)| (p.as_path(), t.as_str()))).map_err(|errors| {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            format!("the copy in {} does not load: {}", dir.display(), lines.join("; "))
        })?;
        Ok((rules, meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_round_trips_and_replaces_the_previous_one() {
        let state = std::env::temp_dir().join(format!("backplane-last-good-{}", std::process::id()));
        let _ = fs::remove_dir_all(&state);
        let copy = LastGood::new(&state);
        assert!(copy.meta().is_none());
        assert!(copy.load().unwrap_err().contains("no copy"));
        let zones = "zones:\n  web:\n    members: [ { cidr: 10.30.0.0/24 } ]\n".to_owned();
        let policies = "policies: []\n".to_owned();
        let sources = vec![(PathBuf::from("/etc/r/zones.yaml"), zones), (PathBuf::from("/etc/r/a.yaml"), policies)];
        let meta = Meta { generation: 3, source: "/etc/r".into(), ..Meta::default() };
        copy.save(&sources, &meta).unwrap();
        let (rules, meta) = copy.load().unwrap();
        assert_eq!(meta.generation, 3);
        assert_eq!(meta.files, ["0000-zones.yaml", "0001-a.yaml"], "the load order is kept");
        assert!(rules.zone("web").is_some());
        copy.save(&sources[..1], &Meta { generation: 4, ..meta }).unwrap();
        assert_eq!(copy.meta().unwrap().generation, 4);
        assert_eq!(fs::read_dir(copy.dir()).unwrap().count(), 2, "only the new copy's files");
        // A save cut short after moving the old copy aside still leaves a copy.
        fs::rename(copy.dir(), copy.sibling(".old")).unwrap();
        assert_eq!(copy.load().unwrap().1.generation, 4);
        fs::remove_dir_all(&state).unwrap();
    }
}
