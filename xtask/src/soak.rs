//! `cargo xtask soak [--minutes N]`: the soak lab test (`agent/tests/soak_lab.rs`) for N
//! minutes instead of the minute it runs in `cargo xtask test`: VMs starting and
//! stopping, the rules reloaded every second, traffic flowing and verdicts checked on
//! the wire throughout; at the end no growth of the kernel maps beyond the live flows,
//! of the agent's descriptors or of its memory. Prints the numbers it measured.

use anyhow::Result;

use crate::util;

pub(crate) fn run(minutes: u64) -> Result<()> {
    if !util::is_root() {
        anyhow::bail!("soak: run as root (it builds network namespaces and loads eBPF programs)");
    }
    let seconds = minutes.saturating_mul(60).max(10);
    println!("soak: {seconds} s");
    let mut cargo = util::cargo();
    cargo
        .args(["test", "-p", "backplane-agent", "--test", "soak_lab", "--", "--test-threads=1", "--nocapture"])
        .env("BACKPLANE_SOAK_SECONDS", seconds.to_string());
    util::run(&mut cargo)
}
