//! `cargo xtask bench`: builds the agent and the benchmarks in release and runs the
//! benchmarks, which write their tables and plots into `benches/results/`.
//!
//! Benchmarks (binaries of the `backplane-benches` crate):
//! - `datapath`: per-packet cost of the data path under `BPF_PROG_TEST_RUN`;
//! - `throughput`: TCP and small-packet UDP across the bridge, backplane vs nftables,
//!   and XDP generic vs native vs TC only;
//! - `agent`: flow events consumed, rule set compile-and-apply time, memory per flow.
//!
//! Each runs in a private network namespace of its own and cleans up after itself. The
//! benchmarks are not part of `cargo xtask test`.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::util::{self, target_dir};

/// The benchmarks, their binaries and what `all` runs, in order.
pub(crate) const BENCHES: &[(&str, &str)] =
    &[("datapath", "datapath_cost"), ("throughput", "throughput"), ("agent", "agent_rates")];

pub(crate) fn run(which: &str, extra: &[String]) -> Result<()> {
    if !util::is_root() {
        bail!("bench: run as root (the benchmarks load eBPF programs and build network namespaces)");
    }
    let picked: Vec<&(&str, &str)> = match which {
        "all" => BENCHES.iter().collect(),
        name => match BENCHES.iter().find(|(n, _)| *n == name) {
            Some(b) => vec![b],
            None => bail!(
                "bench: unknown benchmark {name:?}; one of: all, {}",
                BENCHES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        },
    };
    if which == "all" && !extra.is_empty() {
        bail!("bench: extra arguments need one benchmark (cargo xtask bench throughput -- --rounds 3)");
    }
    util::run(util::cargo().args(["build", "--release", "-p", "backplane-agent", "-p", "backplane-benches"]))?;
    let release = target_dir().join("release");
    for (name, binary) in picked {
        let started = Instant::now();
        println!("bench: {name}");
        let mut command = std::process::Command::new(release.join(binary));
        command
            .current_dir(util::workspace_root())
            .arg("--write")
            .args(extra)
            .env("BACKPLANE_BIN", release.join("backplane"));
        util::run(&mut command)?;
        println!("bench: {name} done in {:.0} s", started.elapsed().as_secs_f64());
    }
    println!("bench: results in {}", util::workspace_root().join("benches/results").display());
    Ok(())
}
