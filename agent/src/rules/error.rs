//! Why a rule set cannot be loaded or put in force. A rule file error keeps its place
//! (`file:line:column: message`), so that `check`, the logs and `status` show every
//! problem on its own line.

use std::path::PathBuf;

use thiserror::Error;

use crate::{datapath::rule_tables::TableError, error::report};

/// Loading a rule set and putting it in force.
#[derive(Debug, Error)]
pub enum RulesError {
    /// The rule files have errors; each prints as `file:line:column: message`.
    #[error("{}", invalid_rules(path, errors))]
    Invalid { path: PathBuf, errors: Vec<backplane_rules::RuleError> },

    #[error("rules {kind} {path} is gone", kind = if *was_dir { "directory" } else { "file" })]
    Gone { path: PathBuf, was_dir: bool },

    #[error("rules path {path} cannot be read: {reason}")]
    Unreadable { path: PathBuf, reason: String },

    #[error("cannot write the rules of {path} into the data path: {source}")]
    Tables {
        path: PathBuf,
        #[source]
        source: TableError,
    },
}

/// `N error(s) in PATH:` and then each error on its own line.
fn invalid_rules(path: &std::path::Path, errors: &[backplane_rules::RuleError]) -> String {
    let mut text = format!(
        "{} error{} in the rules at {}:",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" },
        path.display()
    );
    for e in errors {
        text.push('\n');
        text.push_str(&e.to_string());
    }
    text
}

impl RulesError {
    /// Each problem as one line: `file:line:column: message` for rule file errors.
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::Invalid { errors, .. } => errors.iter().map(ToString::to_string).collect(),
            other => vec![report(other)],
        }
    }
}
