//! Running the `backplane` agent in a benchmark and giving it a rule set.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use backplane_lab::{ChildGuard, Lab};
use backplane_rules::parse_rules;

/// The agent binary: `$BACKPLANE_BIN`, else `backplane` next to this benchmark's binary
/// (both are built into the same target directory).
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("BACKPLANE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("current_exe")?;
    let path = me.parent().context("exe dir")?.join("backplane");
    if !path.exists() {
        bail!("{} not found; build it (cargo build --release -p backplane-agent) or set BACKPLANE_BIN", path.display());
    }
    Ok(path)
}

/// Whether `backplane run` takes `--rules DIR`.
#[must_use]
pub fn supports_rules(binary: &Path) -> bool {
    Command::new(binary)
        .args(["run", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--rules"))
}

/// Starts `backplane run` on `lab` with `--detach-on-exit`, `extra` arguments and, if
/// given, `--rules <rules>`, and waits for its control socket. The guard stops it
/// (SIGTERM, then SIGKILL) on drop.
pub fn start(lab: &Lab, binary: &Path, extra: &[&str], rules: Option<&Path>) -> ChildGuard {
    let mut args: Vec<String> = vec!["--detach-on-exit".into()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    if let Some(dir) = rules {
        args.push("--rules".into());
        args.push(dir.display().to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.start_agent(binary, &refs)
}

/// `backplane status --json` of the agent at `socket`.
pub fn status(binary: &Path, socket: &Path) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(binary)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .context("run backplane status")?;
    if !out.status.success() {
        bail!("backplane status failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).context("parse status JSON")
}

/// A number in a status JSON by path (`["counters", "dropped"]`), 0 when absent.
#[must_use]
pub fn status_u64(status: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter().try_fold(status, |v, k| v.get(k)).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

/// Parses every YAML file text as one rule set (a check before handing it to anything).
pub fn check_rules(yaml: &str) -> anyhow::Result<()> {
    parse_rules([(Path::new("rules.yaml"), yaml)])
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("generated rule set is invalid: {e:?}"))
}
