//! `cargo xtask fuzz [--seconds N] [TARGET]`: runs each fuzz target of `agent/fuzz` (a
//! cargo-fuzz crate outside the workspace) for N seconds, installing cargo-fuzz first if
//! it is missing.
//!
//! Seeds: the example rule sets (for the rule parser) and every input kept in
//! `agent/fuzz/regressions/<target>/`. New corpus entries go to `agent/fuzz/corpus/`
//! (not in git). A crash stops the run with the path of the input: copy it into
//! `agent/fuzz/regressions/<target>/`, where `cargo xtask test` replays it as a plain
//! test (`agent/tests/fuzz_regressions.rs`), and fix the code.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::util;

/// The fuzz targets, in the order `cargo xtask fuzz` runs them.
pub(crate) const TARGETS: &[&str] = &["rules_parser", "flow_event", "payload_sample"];

/// Seed directories of a target, besides its regressions.
fn seeds(target: &str) -> Vec<PathBuf> {
    let root = util::workspace_root();
    match target {
        "rules_parser" => {
            ["three-zones", "hypervisor", "inventory"].iter().map(|e| root.join("rules/examples").join(e)).collect()
        }
        _ => Vec::new(),
    }
}

pub(crate) fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    let picked: Vec<&str> = match only {
        None => TARGETS.to_vec(),
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("fuzz: unknown target {t:?}; one of: {}", TARGETS.join(", ")),
    };
    ensure_cargo_fuzz()?;
    let root = util::workspace_root();
    let fuzz_dir = root.join("agent/fuzz");
    for target in picked {
        let corpus = fuzz_dir.join("corpus").join(target);
        let regressions = fuzz_dir.join("regressions").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&regressions)?;
        let started = Instant::now();
        println!("fuzz: {target} for {seconds} s");
        let mut cargo = Command::new("cargo");
        cargo
            .current_dir(&root)
            .args(["+nightly", "fuzz", "run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(target)
            .arg(&corpus)
            .arg(&regressions)
            .args(seeds(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1");
        let status = util::status(&mut cargo)?;
        if !status.success() {
            bail!(
                "fuzz: {target} found a failing input (see above; saved under {}): copy it into {} so that \
                 `cargo xtask test` replays it, and fix the code",
                fuzz_dir.join("artifacts").join(target).display(),
                regressions.display()
            );
        }
        println!("fuzz: {target} done in {:.0} s, nothing found", started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Installs cargo-fuzz unless `cargo fuzz` already runs.
fn ensure_cargo_fuzz() -> Result<()> {
    let works =
        Command::new("cargo").args(["+nightly", "fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if works {
        println!("fuzz: cargo-fuzz ok");
        return Ok(());
    }
    println!("fuzz: installing cargo-fuzz (about 2 minutes)");
    util::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}
