//! Every input the fuzzers found worth keeping (`agent/fuzz/regressions/<target>/`),
//! replayed through the same checks the fuzz targets make (`agent/fuzz/src/checks.rs`),
//! as plain tests: no nightly toolchain, no cargo-fuzz.

use std::path::Path;

#[path = "../fuzz/src/checks.rs"]
mod checks;

/// Runs `check` on every file of the target's regressions; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    for file in &files {
        let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let outcome = std::panic::catch_unwind(|| check(&bytes));
        assert!(outcome.is_ok(), "{target}: {} fails again", file.display());
    }
    files.len()
}

#[test]
fn rules_parser_inputs() {
    assert!(replay("rules_parser", checks::rules_input) > 0);
}

#[test]
fn flow_event_inputs() {
    assert!(replay("flow_event", checks::flow_event_input) > 0);
}

#[test]
fn payload_sample_inputs() {
    assert!(replay("payload_sample", checks::payload_sample_input) > 0);
}

/// The hand-made seeds of the payload sample decoder are what they claim to be, so the
/// fuzzer starts from records that reach the name parsers.
#[test]
fn payload_seeds_name_their_flows() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/payload_sample");
    let app =
        |name: &str| backplane::flows::payload::parse_record(&std::fs::read(dir.join(name)).unwrap()).unwrap().app;
    assert_eq!(app("dns-query").dns_query.as_deref(), Some("www.example.com"));
    assert_eq!(app("tls-client-hello").tls_sni.as_deref(), Some("shop.example.org"));
    assert_eq!(app("http-get").http_host.as_deref(), Some("intranet.example.net"));
    assert!(
        backplane::flows::payload::parse_record(&std::fs::read(dir.join("captured-past-the-buffer")).unwrap()).is_err()
    );
}
