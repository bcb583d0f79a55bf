//! The in-motion audit log: one JSON object per line in `<state-dir>/audit.jsonl`, for
//! every move, boot, placement violation, co-mingling, quarantine and release.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, BufRead as _, Write as _},
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

/// File name of the audit log in the state directory.
pub const AUDIT_FILE: &str = "audit.jsonl";
/// Size at which the audit log is rotated (`audit.jsonl.1`, `.2`, ...), as the flow log
/// is: what a guest can make the agent record (moves, claims, quarantines) stays bounded
/// on disk, and `backplane audit` reads one file of at most this size.
pub const AUDIT_MAX_BYTES: u64 = 16 << 20;
/// Rotated audit files kept.
pub const AUDIT_KEEP: usize = 4;

/// One audit record.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC.
    pub time: String,
    pub unix_ms: i64,
    /// `move`, `boot`, `placement_violation`, `co_mingling`, `quarantined`, `released`,
    /// `unknown_mac`, `departed`.
    pub kind: String,
    pub endpoint: String,
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_port: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub from_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_port: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub to_labels: BTreeMap<String, String>,
    /// Established flows installed on the destination (moves).
    #[serde(default)]
    pub flows_carried: u64,
    /// From the announcement (or the operator's `moved`) to the flows installed, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_ms: Option<f64>,
    /// The endpoint's state after the event: active, quarantined, isolated.
    #[serde(default)]
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// The audit log file of a node.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    /// Serializes appends of this process.
    lock: Mutex<u64>,
    max_bytes: u64,
}

impl AuditLog {
    /// The log at `<state_dir>/audit.jsonl` (created on the first record).
    #[must_use]
    pub fn new(state_dir: &Path) -> Self {
        let path = state_dir.join(AUDIT_FILE);
        let existing = fs::File::open(&path).map_or(0, |f| io::BufReader::new(f).lines().count() as u64);
        Self { path, lock: Mutex::new(existing), max_bytes: AUDIT_MAX_BYTES }
    }

    /// Rotates the log at `max_bytes` instead of [`AUDIT_MAX_BYTES`].
    #[must_use]
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records in the current file (all runs since it was last rotated).
    #[must_use]
    pub fn len(&self) -> u64 {
        *self.lock.lock().expect("audit lock")
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a record; a failure is logged, never fatal.
    pub fn append(&self, record: &AuditRecord) {
        let mut count = self.lock.lock().expect("audit lock");
        let result = serde_json::to_string(record).map_err(io::Error::other).and_then(|line| {
            let size = fs::symlink_metadata(&self.path).map_or(0, |m| m.len());
            let rotated = size > 0 && size + line.len() as u64 + 1 > self.max_bytes;
            if rotated {
                crate::export::flow_log::rotate_files(&self.path, AUDIT_KEEP)?;
            }
            let mut file = crate::files::open_append(&self.path)?;
            file.write_all(format!("{line}\n").as_bytes())?;
            Ok(rotated)
        });
        match result {
            Ok(true) => *count = 1,
            Ok(false) => *count += 1,
            Err(e) => log::error!("cannot append to the audit log {}: {e}", self.path.display()),
        }
    }

    /// Every record of the file; lines that do not parse are skipped.
    #[must_use]
    pub fn read(&self) -> Vec<AuditRecord> {
        let _guard = self.lock.lock().expect("audit lock");
        let Ok(file) = fs::File::open(&self.path) else { return Vec::new() };
        io::BufReader::new(file).lines().map_while(Result::ok).filter_map(|l| serde_json::from_str(&l).ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_and_read() {
        let dir = std::env::temp_dir().join(format!("bp-audit-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = AuditLog::new(&dir);
        assert!(log.is_empty());
        let r = AuditRecord { kind: "move".into(), endpoint: "db".into(), flows_carried: 2, ..AuditRecord::default() };
        log.append(&r);
        log.append(&AuditRecord { kind: "boot".into(), ..r.clone() });
        assert_eq!(log.len(), 2);
        let back = log.read();
        assert_eq!(back[0], r);
        assert_eq!(back[1].kind, "boot");
        assert_eq!(AuditLog::new(&dir).len(), 2, "counts what the file holds");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_log_is_rotated_at_its_size_and_keeps_its_last_files() {
        let dir = std::env::temp_dir().join(format!("bp-audit-rotate-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let log = AuditLog::new(&dir).with_max_bytes(400);
        let r = AuditRecord { kind: "claim_held".into(), endpoint: "db".into(), ..AuditRecord::default() };
        let line = serde_json::to_string(&r).unwrap().len() as u64 + 1;
        let per_file = 400 / line;
        for _ in 0..per_file * 10 {
            log.append(&r);
        }
        let size = |p: &std::path::Path| fs::metadata(p).map_or(0, |m| m.len());
        assert!(size(log.path()) <= 400, "the current file stays under the limit");
        assert_eq!(log.read().len() as u64, log.len());
        let kept: Vec<_> =
            (1..=AUDIT_KEEP + 1).map(|n| dir.join(format!("{AUDIT_FILE}.{n}"))).filter(|p| p.exists()).collect();
        assert_eq!(kept.len(), AUDIT_KEEP, "{kept:?}");
        assert!(kept.iter().all(|p| size(p) <= 400 && size(p) >= line));
        fs::remove_dir_all(&dir).unwrap();
    }
}
