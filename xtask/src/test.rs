//! `cargo xtask test`: every test of the workspace, privileged ones included, one at a
//! time, then (on a full run, without arguments) `cargo xtask test-kernel`'s guest on
//! Debian 12's stock kernel, then a check that the run left nothing behind.
//!
//! "Left behind" means, after the run: a namespace `bp-*`, a link `bp*`, a pin directory
//! `/sys/fs/bpf/backplane-test*` or a lab directory that was not there before the run and
//! whose maker is no longer running, or any process still carrying this run's
//! [`RUN_MARKER`] in its environment (an agent, a tcpdump...). Those are printed, removed,
//! and fail the run. Objects of other live processes (a colleague's test run on the same
//! machine) are left alone.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use backplane_lab::{Leftover, PREFIX, cleanup_stale, leftovers};

use crate::{kernel_guest, util};

/// Environment variable set for the test run, with this process's pid as value: every
/// process the tests start inherits it, which is how leftover processes are found.
pub(crate) const RUN_MARKER: &str = "BACKPLANE_XTASK_TEST_RUN";

/// Packages that `cargo test --workspace` must not build for the host.
const EXCLUDED: &[&str] = &["backplane-ebpf"];

/// The habits a full run holds the code to, before any test: the format of
/// `rustfmt.toml`, clippy (the workspace's pedantic lints) with warnings as errors over
/// every target of the default members (the eBPF crate is linted by its own build, with
/// the nightly toolchain it needs), and documentation without broken links.
fn check_habits() -> Result<()> {
    let mut fmt = util::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    let mut clippy = util::cargo();
    clippy.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    let mut doc = util::cargo();
    doc.args(["doc", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings");
    for (what, command) in [("format", &mut fmt), ("clippy", &mut clippy), ("docs", &mut doc)] {
        println!("test: {what}: {}", util::describe(command));
        util::run(command).with_context(|| format!("the {what} check failed"))?;
    }
    Ok(())
}

pub(crate) fn run(cargo_args: &[String], test_args: &[String]) -> Result<()> {
    if cargo_args.is_empty() && test_args.is_empty() {
        check_habits()?;
    }
    for stale in cleanup_stale(PREFIX) {
        println!("test: removed a leftover of an earlier run: {stale}");
    }
    let before: HashSet<String> = leftovers(PREFIX).into_iter().map(|leftover| leftover.name).collect();

    let marker = std::process::id().to_string();
    let mut cargo = util::cargo();
    // Every test binary runs even after one fails: a run says everything that fails.
    cargo.args(["test", "--no-fail-fast"]);
    let picks_packages = cargo_args.iter().any(|arg| arg == "-p" || arg.starts_with("--package"));
    if !picks_packages {
        cargo.arg("--workspace");
        for package in EXCLUDED {
            cargo.args(["--exclude", package]);
        }
    }
    cargo.args(cargo_args).arg("--").arg("--test-threads=1").args(test_args);
    cargo.env(RUN_MARKER, &marker);
    // The upgrade test starts the previous release's agent before this one's.
    cargo.env("BACKPLANE_PREVIOUS", crate::previous::binary()?);
    println!("test: {}", util::describe(&cargo));
    let status = util::status(&mut cargo)?;

    // A full run also boots Debian 12's stock kernel; QEMU carries the marker too.
    let guest = if cargo_args.is_empty() && test_args.is_empty() {
        kernel_guest::run(&kernel_guest::Options { env: vec![(RUN_MARKER, marker.clone())], ..Default::default() })
    } else {
        Ok(())
    };
    let problems = check_nothing_left(&marker, &before);
    let failed = match (status.success(), guest) {
        (true, Ok(())) => None,
        (false, Ok(())) => Some(format!("tests failed ({status})")),
        (true, Err(error)) => Some(format!("the kernel guest failed: {error:#}")),
        (false, Err(error)) => Some(format!("tests failed ({status}), and the kernel guest failed: {error:#}")),
    };
    match (failed, problems) {
        (None, 0) => {
            println!("test: all tests passed; nothing left behind");
            Ok(())
        }
        (None, n) => bail!("the tests passed but left {n} thing(s) behind (removed now)"),
        (Some(failed), 0) => bail!("{failed}"),
        (Some(failed), n) => bail!("{failed}; and the run left {n} thing(s) behind (removed now)"),
    }
}

/// Prints, removes and counts what the run left behind.
fn check_nothing_left(marker: &str, before: &HashSet<String>) -> usize {
    let processes = marked_processes(marker);
    for (pid, command) in &processes {
        eprintln!("test: LEFT BEHIND: process {pid}: {command}");
        if let Ok(pid) = libc::pid_t::try_from(*pid) {
            // SAFETY: kill has no memory effects; the process carries our marker.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if !processes.is_empty() {
        std::thread::sleep(Duration::from_millis(200));
    }
    let objects: Vec<Leftover> = leftovers(PREFIX)
        .into_iter()
        .filter(|leftover| !before.contains(&leftover.name) && !leftover.owner_alive())
        .collect();
    for leftover in &objects {
        eprintln!("test: LEFT BEHIND: {leftover}");
        leftover.remove();
    }
    processes.len() + objects.len()
}

/// Processes (other than this one) whose environment has `RUN_MARKER=marker`, with their
/// command lines.
fn marked_processes(marker: &str) -> Vec<(u32, String)> {
    let needle = format!("{RUN_MARKER}={marker}");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(Path::new("/proc").join(pid.to_string()).join("environ"))
                .is_ok_and(|environ| environ.split(|&b| b == 0).any(|var| var == needle.as_bytes()))
        })
        .map(|pid| {
            let cmdline = std::fs::read(Path::new("/proc").join(pid.to_string()).join("cmdline")).unwrap_or_default();
            let words: Vec<String> = cmdline
                .split(|&b| b == 0)
                .filter(|word| !word.is_empty())
                .map(|word| String::from_utf8_lossy(word).into_owned())
                .collect();
            (pid, words.join(" "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_processes_by_marker() {
        let marker = format!("xtask-selftest-{}", std::process::id());
        let mut child = std::process::Command::new("sleep").arg("30").env(RUN_MARKER, &marker).spawn().unwrap();
        // Right after spawn the child may not have exec'd yet (its environment and
        // command line are still the parent's): look until it has, for up to 2 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut found = marked_processes(&marker);
        while found.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            found = marked_processes(&marker);
        }
        let _ignored = child.kill();
        let _ignored = child.wait();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, child.id());
        assert_eq!(found[0].1, "sleep 30");
    }
}
