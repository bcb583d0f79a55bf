//! `backplane kernel --programs` on the kernel the tests run on: every program the
//! agent may attach is taken by the verifier with room to grow (under half of the
//! instruction budget), and each fits the stack as kernels before 6.9 count it. The
//! same command runs in the Debian 12 (6.1) guest of `cargo xtask test-kernel`.

use std::process::Command;

use serde_json::Value;

#[test]
fn every_program_loads_with_headroom_and_fits_the_old_stack_accounting() {
    let out = Command::new(env!("CARGO_BIN_EXE_backplane"))
        .args(["kernel", "--programs", "--json"])
        .output()
        .expect("run backplane kernel");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "backplane kernel failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(&text).expect("JSON");
    let features = report["kernel"]["features"].as_array().expect("features");
    assert!(features.iter().any(|f| f["name"] == "ring buffer maps" && f["present"] == true), "{report:#}");
    let programs = report["programs"].as_array().expect("programs");
    for name in ["from_port_tc", "to_port", "from_port"] {
        let p = programs.iter().find(|p| p["program"] == name).unwrap_or_else(|| panic!("{name} in {report:#}"));
        assert!(p["load_error"].is_null(), "{name} refused: {p:#}");
        let insns = p["verified_insns"].as_u64().expect("verified instructions");
        let stack = p["stack_round32"].as_u64().expect("stack");
        println!("{name}: verified {insns} insns, stack {stack} bytes (rounded as before 6.9)");
        assert!(insns < 500_000, "{name}: {insns} instructions verified, over half of the budget");
        assert!(stack <= 512, "{name}: {stack} bytes of stack as 6.1 counts it");
    }
}
