//! `cargo xtask <task>`: backplane's developer tasks.
//!
//! Every task that builds or runs something first runs `setup`, which installs what a
//! fresh Debian 12 machine lacks (as root) and takes well under two seconds once done.
//! Adding a task: a variant in [`Task`], a module, and a line in [`run`].

mod bench;
mod demo;
mod demo_migration;
mod fuzz;
mod kernel_guest;
mod previous;
mod setup;
mod soak;
mod test;
mod util;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about = "backplane's developer tasks (run as root)")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building, testing and the demo need: Debian packages, the nightly
    /// toolchain with rust-src, bpf-linker, and bpffs at /sys/fs/bpf. Idempotent.
    Setup,
    /// Setup, then build the workspace's default members.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Setup, then build and run every test of the workspace (privileged ones too), one
    /// test at a time, then (without arguments) `test-kernel`, and fail if anything is
    /// left behind.
    Test {
        /// Arguments for `cargo test` (e.g. `-p backplane-lab`).
        #[arg(allow_hyphen_values = true, value_name = "CARGO_TEST_ARGS")]
        cargo_args: Vec<String>,
        /// Arguments for the test binaries, after `--` (e.g. a test name filter).
        #[arg(last = true, value_name = "TEST_BINARY_ARGS")]
        test_args: Vec<String>,
    },
    /// Setup, then boot Debian 12's stock kernel (Linux 6.1) in a QEMU guest (TCG) and
    /// check there that the agent loads, attaches, enforces zone rules on a lab of three
    /// VMs, and that a second agent adopts the data path after a SIGKILL.
    TestKernel {
        /// Seconds the guest may run before QEMU is killed.
        #[arg(long, default_value_t = 600, value_name = "SECS")]
        timeout: u64,
    },
    /// Setup, build the agent, and run it with the three-zones rules on a lab of three
    /// VMs (web, db, mgmt): flows allowed, denied and audited, each shown with the policy
    /// that decided it; explain, a hot reload and a rejected broken rule file.
    Demo,
    /// Setup, build in release, and run the benchmarks (`all`, or one of `datapath`,
    /// `throughput`, `agent`); results go to benches/results/. Arguments after `--` go
    /// to the one benchmark named (e.g. `throughput -- --rounds 3`).
    Bench {
        #[arg(default_value = "all", value_name = "BENCH")]
        which: String,
        #[arg(last = true, value_name = "BENCH_ARGS")]
        bench_args: Vec<String>,
    },
    /// Setup, install cargo-fuzz if missing, and run each fuzz target of agent/fuzz (the
    /// rule parser, the flow event decoder, the payload sample decoder) for N seconds.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60, value_name = "N")]
        seconds: u64,
        /// One target only (`rules_parser`, `flow_event`, `payload_sample`).
        #[arg(value_name = "TARGET")]
        target: Option<String>,
    },
    /// Setup, then the soak lab for N minutes: VMs starting and stopping, rules reloaded
    /// every second, traffic and verdicts checked throughout; no growth of kernel maps,
    /// descriptors or memory at the end.
    Soak {
        #[arg(long, default_value_t = 10, value_name = "N")]
        minutes: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    util::put_cargo_bin_on_path();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            let mut cargo = util::cargo();
            cargo.arg("build");
            if release {
                cargo.arg("--release");
            }
            util::run(&mut cargo)
        }
        Task::Test { cargo_args, test_args } => {
            setup::run()?;
            let (cargo_args, test_args) = split_test_args(cargo_args, test_args);
            test::run(&cargo_args, &test_args)
        }
        Task::TestKernel { timeout } => {
            setup::run()?;
            kernel_guest::run(&kernel_guest::Options {
                timeout: std::time::Duration::from_secs(timeout),
                ..Default::default()
            })
        }
        Task::Demo => {
            setup::run()?;
            util::run(util::cargo().args(["build", "-p", "backplane-agent"]))?;
            demo::run()
        }
        Task::Bench { which, bench_args } => {
            setup::run()?;
            bench::run(&which, &bench_args)
        }
        Task::Fuzz { seconds, target } => {
            setup::run()?;
            fuzz::run(seconds, target.as_deref())
        }
        Task::Soak { minutes } => {
            setup::run()?;
            soak::run(minutes)
        }
    }
}

/// clap gives `-p x -- filter` all to the hyphen-accepting `cargo_args`, and only a
/// leading `-- filter` to `test_args`: split at the first `--` either way.
fn split_test_args(mut cargo_args: Vec<String>, mut test_args: Vec<String>) -> (Vec<String>, Vec<String>) {
    if let Some(at) = cargo_args.iter().position(|arg| arg == "--") {
        let mut after = cargo_args.split_off(at);
        after.remove(0);
        after.append(&mut test_args);
        test_args = after;
    }
    (cargo_args, test_args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(line: &[&str]) -> (Vec<String>, Vec<String>) {
        match Cli::try_parse_from(line).unwrap().task {
            Task::Test { cargo_args, test_args } => split_test_args(cargo_args, test_args),
            other => panic!("{other:?}"),
        }
    }

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|word| (*word).to_owned()).collect()
    }

    #[test]
    fn bench_arguments_after_double_dash_go_to_the_benchmark() {
        match Cli::try_parse_from(["xtask", "bench", "throughput", "--", "--rounds", "3"]).unwrap().task {
            Task::Bench { which, bench_args } => {
                assert_eq!(which, "throughput");
                assert_eq!(bench_args, strings(&["--rounds", "3"]));
            }
            other => panic!("{other:?}"),
        }
        match Cli::try_parse_from(["xtask", "bench"]).unwrap().task {
            Task::Bench { which, bench_args } => {
                assert_eq!((which.as_str(), bench_args.len()), ("all", 0));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_arguments_split_at_double_dash() {
        assert_eq!(test_args(&["xtask", "test"]), (vec![], vec![]));
        assert_eq!(test_args(&["xtask", "test", "--", "ping"]), (vec![], strings(&["ping"])));
        assert_eq!(
            test_args(&["xtask", "test", "-p", "backplane-lab", "--", "ping", "--nocapture"]),
            (strings(&["-p", "backplane-lab"]), strings(&["ping", "--nocapture"]))
        );
        assert_eq!(test_args(&["xtask", "test", "--release"]), (strings(&["--release"]), vec![]));
    }
}
