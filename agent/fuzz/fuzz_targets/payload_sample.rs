//! Fuzz target: see `checks::payload_sample_input`.
#![no_main]

#[allow(dead_code, reason = "each target uses one of the checks")]
#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::payload_sample_input(data));
