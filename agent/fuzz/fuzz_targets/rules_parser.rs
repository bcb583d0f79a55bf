//! Fuzz target: see `checks::rules_input`.
#![no_main]

#[allow(dead_code, reason = "each target uses one of the checks")]
#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::rules_input(data));
