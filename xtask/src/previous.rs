//! The previous release of backplane, built from this repository's own history, for the
//! upgrade test (`agent/tests/upgrade_lab.rs`): an agent of today must take over, under
//! traffic, the data path an agent of the previous release left attached.
//!
//! The source is taken with `git archive` (no worktree is registered) into a directory of
//! this run's own under `<target>/previous/<commit>/` and built with a target directory
//! of its own, so that neither build disturbs the other's artifacts; the binary is put at
//! `<target>/previous/<commit>/backplane` by a rename (never half-written) and reused by
//! later runs. A lock serializes runs that would build it at the same time.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::util;

/// The previous release: main as it stood before the pinned layout got versions (pin
/// layout 1).
pub(crate) const COMMIT: &str = "b40b4c137491047933d36a6eb6f16f82715c0ece";

/// Builds (once) and returns the previous release's `backplane` binary.
pub(crate) fn binary() -> Result<PathBuf> {
    let dir = util::target_dir().join("previous").join(COMMIT);
    let binary = dir.join("backplane");
    if binary.exists() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let lock = std::fs::File::create(dir.join(".lock")).context("create the build lock")?;
    // SAFETY: flock takes a descriptor this function owns; the lock goes when it closes.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!("cannot lock {}: {}", dir.join(".lock").display(), std::io::Error::last_os_error());
    }
    if binary.exists() {
        // Another run built it while this one waited.
        return Ok(binary);
    }
    let root = util::workspace_root();
    let known = Command::new("git")
        .current_dir(&root)
        .args(["cat-file", "-e", &format!("{COMMIT}^{{commit}}")])
        .output()
        .context("cannot run git")?;
    if !known.status.success() {
        bail!(
            "the upgrade test needs the previous release's source, commit {COMMIT}, from this repository's history, \
             and git cannot give it ({}); a shallow clone lacks it (`git fetch --unshallow` brings it)",
            String::from_utf8_lossy(&known.stderr).trim()
        );
    }
    let run = std::process::id();
    let src = dir.join(format!("src-{run}"));
    std::fs::create_dir_all(&src).with_context(|| format!("create {}", src.display()))?;
    println!("test: building the previous release ({COMMIT}) for the upgrade test, once");
    let archive = Command::new("git")
        .current_dir(&root)
        .args(["archive", "--format=tar", COMMIT])
        .output()
        .context("cannot run git archive")?;
    if !archive.status.success() {
        bail!("git archive {COMMIT} failed: {}", String::from_utf8_lossy(&archive.stderr));
    }
    let mut tar =
        Command::new("tar").arg("-x").arg("-C").arg(&src).stdin(Stdio::piped()).spawn().context("cannot run tar")?;
    std::io::Write::write_all(tar.stdin.as_mut().context("tar's stdin")?, &archive.stdout)
        .context("unpack the source")?;
    if !tar.wait().context("tar")?.success() {
        bail!("unpacking the previous release's source into {} failed", src.display());
    }
    let target = dir.join(format!("target-{run}"));
    let mut cargo = Command::new("cargo");
    cargo.current_dir(&src).env("CARGO_TARGET_DIR", &target).args([
        "build",
        "--quiet",
        "-p",
        "backplane-agent",
        "--bin",
        "backplane",
    ]);
    util::run(&mut cargo)?;
    let partial = dir.join(format!("backplane.partial-{run}"));
    std::fs::copy(target.join("debug").join("backplane"), &partial)
        .with_context(|| format!("keep the previous release's binary at {}", partial.display()))?;
    std::fs::rename(&partial, &binary)
        .with_context(|| format!("rename {} to {}", partial.display(), binary.display()))?;
    // The build's own files are not needed again: only the binary is kept.
    let _ = std::fs::remove_dir_all(&target);
    let _ = std::fs::remove_dir_all(&src);
    Ok(binary)
}
