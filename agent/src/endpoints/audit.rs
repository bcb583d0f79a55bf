//! The in-motion audit log: one JSON object per line in `<state-dir>/audit.jsonl`, for
//! every move, boot, placement violation, co-mingling, quarantine and release.

use std::{
    collections::BTreeMap,
    fs::{self, OpenOptions},
    io::{self, BufRead as _, Write as _},
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

/// File name of the audit log in the state directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

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
}

impl AuditLog {
    /// The log at `<state_dir>/audit.jsonl` (created on the first record).
    #[must_use]
    pub fn new(state_dir: &Path) -> Self {
        let path = state_dir.join(AUDIT_FILE);
        let existing = fs::File::open(&path).map_or(0, |f| io::BufReader::new(f).lines().count() as u64);
        Self { path, lock: Mutex::new(existing) }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records written so far (this file, all runs).
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
            let mut file = OpenOptions::new().create(true).append(true).open(&self.path)?;
            file.write_all(format!("{line}\n").as_bytes())
        });
        match result {
            Ok(()) => *count += 1,
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
}
