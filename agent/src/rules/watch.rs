//! Noticing that the rule files changed: a fingerprint of the rules path (the names,
//! sizes, modification times and contents of its `*.yaml` files) taken every
//! [`POLL_PERIOD`], and a detector that acts on a change once it has settled.
//!
//! Polling is simple and robust: it sees edits in place, renames, deletions, a
//! directory replaced by another (a symlink swapped, as configuration management tools
//! do) and a directory that disappears, with no inotify limits and no lost events.
//! Contents are hashed so that a rewrite within one mtime tick is still seen.

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::Hasher as _,
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use backplane_rules::rule_files;

/// How often the rules path is fingerprinted.
pub const POLL_PERIOD: Duration = Duration::from_millis(250);

/// One rule file as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub path: PathBuf,
    pub size: u64,
    pub modified: Option<SystemTime>,
    /// Hash of the contents (`None` when the file could not be read: the loader will say why).
    pub contents: Option<u64>,
}

/// The state of a rules path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fingerprint {
    /// The rule files, in load order.
    Files(Vec<FileStamp>),
    /// The path does not exist.
    Gone,
    /// The path exists but cannot be listed.
    Unreadable(String),
}

impl Fingerprint {
    /// Takes the fingerprint of a rules path (a directory or one file).
    #[must_use]
    pub fn of(path: &Path) -> Self {
        let files = match rule_files(path) {
            Ok(files) => files,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Self::Gone,
            Err(e) => return Self::Unreadable(e.to_string()),
        };
        Self::Files(files.into_iter().map(stamp).collect())
    }

    /// How many rule files it holds.
    #[must_use]
    pub fn files(&self) -> usize {
        match self {
            Self::Files(f) => f.len(),
            Self::Gone | Self::Unreadable(_) => 0,
        }
    }
}

fn stamp(path: PathBuf) -> FileStamp {
    let meta = fs::metadata(&path).ok();
    let contents = fs::read(&path).ok().map(|bytes| {
        let mut h = DefaultHasher::new();
        h.write(&bytes);
        h.finish()
    });
    FileStamp {
        size: meta.as_ref().map_or(0, fs::Metadata::len),
        modified: meta.and_then(|m| m.modified().ok()),
        contents,
        path,
    }
}

/// Decides when a change of the rules path is acted upon: when a fingerprint that
/// differs from the last one acted upon has been seen twice in a row. A file caught
/// half-written (an editor or `cp` still at work) is thus not loaded; a change is
/// acted upon one or two poll periods after it is complete.
#[derive(Clone, Debug)]
pub struct ChangeDetector {
    acted_on: Fingerprint,
    pending: Option<Fingerprint>,
}

impl ChangeDetector {
    /// Starts from the fingerprint of the rules loaded at start.
    #[must_use]
    pub fn new(loaded: Fingerprint) -> Self {
        Self { acted_on: loaded, pending: None }
    }

    /// Takes a new fingerprint; returns it when the change should be acted upon now.
    pub fn observe(&mut self, now: Fingerprint) -> Option<Fingerprint> {
        if now == self.acted_on {
            self.pending = None;
            return None;
        }
        if self.pending.as_ref() == Some(&now) {
            self.pending = None;
            self.acted_on = now.clone();
            return Some(now);
        }
        self.pending = Some(now);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("backplane-rule-watch-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn fingerprint_sees_names_contents_and_only_yaml() {
        let dir = TempDir::new("fp");
        fs::write(dir.0.join("b.yaml"), "zones: {}\n").unwrap();
        fs::write(dir.0.join("a.yaml"), "policies: []\n").unwrap();
        fs::write(dir.0.join("notes.txt"), "ignored").unwrap();
        fs::create_dir(dir.0.join("sub.yaml")).unwrap();
        let first = Fingerprint::of(&dir.0);
        let Fingerprint::Files(files) = &first else { panic!("{first:?}") };
        let names: Vec<_> = files.iter().map(|f| f.path.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["a.yaml", "b.yaml"], "yaml files in load order, nothing else");
        assert_eq!(first.files(), 2);
        assert_eq!(Fingerprint::of(&dir.0), first, "nothing changed");

        fs::write(dir.0.join("notes.txt"), "still ignored").unwrap();
        assert_eq!(Fingerprint::of(&dir.0), first, "other files do not count");

        // Same size, same name: only the contents differ.
        let mtime = fs::metadata(dir.0.join("a.yaml")).unwrap().modified().unwrap();
        fs::write(dir.0.join("a.yaml"), "policies: {}\n").unwrap();
        fs::File::options().write(true).open(dir.0.join("a.yaml")).unwrap().set_modified(mtime).unwrap();
        let edited = Fingerprint::of(&dir.0);
        assert_ne!(edited, first, "a rewrite within one mtime is seen");

        fs::write(dir.0.join("c.yaml"), "").unwrap();
        assert_eq!(Fingerprint::of(&dir.0).files(), 3, "a new file is seen");
        fs::remove_file(dir.0.join("c.yaml")).unwrap();
        assert_eq!(Fingerprint::of(&dir.0), edited, "and its removal");
    }

    #[test]
    fn a_single_file_and_a_missing_path() {
        let dir = TempDir::new("one");
        let file = dir.0.join("rules.yaml");
        fs::write(&file, "zones: {}\n").unwrap();
        assert_eq!(Fingerprint::of(&file).files(), 1);
        assert_eq!(Fingerprint::of(&dir.0.join("nope")), Fingerprint::Gone);
        drop(dir);
        assert_eq!(Fingerprint::of(&file), Fingerprint::Gone);
    }

    fn fp(n: u64) -> Fingerprint {
        Fingerprint::Files(vec![FileStamp { path: "r.yaml".into(), size: n, modified: None, contents: Some(n) }])
    }

    #[test]
    fn a_change_is_acted_upon_once_it_has_settled() {
        let mut d = ChangeDetector::new(fp(1));
        assert_eq!(d.observe(fp(1)), None, "no change");
        assert_eq!(d.observe(fp(2)), None, "a change, seen once: maybe half-written");
        assert_eq!(d.observe(fp(3)), None, "still changing");
        assert_eq!(d.observe(fp(3)), Some(fp(3)), "settled: act");
        assert_eq!(d.observe(fp(3)), None, "acted upon already");
        // A change that is undone before it settles is never acted upon.
        assert_eq!(d.observe(fp(4)), None);
        assert_eq!(d.observe(fp(3)), None);
        assert_eq!(d.observe(fp(4)), None);
        assert_eq!(d.observe(fp(4)), Some(fp(4)));
        // A path that disappears is a change like any other, acted upon once.
        assert_eq!(d.observe(Fingerprint::Gone), None);
        assert_eq!(d.observe(Fingerprint::Gone), Some(Fingerprint::Gone));
        assert_eq!(d.observe(Fingerprint::Gone), None);
        assert_eq!(d.observe(fp(4)), None);
        assert_eq!(d.observe(fp(4)), Some(fp(4)), "coming back is a change too");
    }
}
