//! Every misuse of the command line ends with exit status 2 and a message that names
//! the argument, before anything is touched: unknown flags and subcommands, and a bad
//! value for each option of `run` (sizes, globs, addresses, durations, names, URLs).

mod common;

use std::{path::PathBuf, process::Command, time::Duration};

use common::agent::BACKPLANE;

/// A scratch directory for the pin, socket and state paths given to `run`: nothing may
/// appear in it.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bp-cli-misuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `backplane args...` (with a time limit) and returns (exit code, stderr).
fn backplane(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(BACKPLANE)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run backplane");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("backplane {args:?} did not end: it should have refused its arguments");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn every_bad_run_option_exits_2_naming_the_argument() {
    let dir = scratch();
    let pin_dir = dir.join("pins");
    let socket = dir.join("bp.sock");
    let state = dir.join("state");
    let base: Vec<String> = vec![
        "run".into(),
        "--pin-dir".into(),
        pin_dir.to_string_lossy().into_owned(),
        "--socket".into(),
        socket.to_string_lossy().into_owned(),
        "--state-dir".into(),
        state.to_string_lossy().into_owned(),
    ];
    // (arguments, what the message must name)
    let cases: &[(&[&str], &str)] = &[
        (&["--no-such-flag"], "--no-such-flag"),
        (&["--ring-size"], "--ring-size"),
        (&["--ring-size", "4Q"], "--ring-size"),
        (&["--ring-size", "8G"], "--ring-size"),
        (&["--ring-size", "3M"], "--ring-size"),
        (&["--ring-size", "1024"], "--ring-size"),
        (&["--ring-size", "-4M"], "--ring-size"),
        (&["--payload-ring-size", "5000"], "--payload-ring-size"),
        (&["--flow-table-size", "0"], "--flow-table-size"),
        (&["--flow-table-size", "many"], "--flow-table-size"),
        (&["--flow-table-size", "99999999999"], "--flow-table-size"),
        (&["--flow-log-max-bytes", "10X"], "--flow-log-max-bytes"),
        (&["--flow-log", "/tmp/x.jsonl", "--flow-log-max-bytes", "0"], "--flow-log-max-bytes"),
        (&["--flow-log-keep", "-1"], "--flow-log-keep"),
        (&["--idle-timeout", "0"], "--idle-timeout"),
        (&["--idle-timeout", "5s"], "--idle-timeout"),
        (&["--idle-timeout", "-1"], "--idle-timeout"),
        (&["--ipfix-active-timeout", "soon"], "--ipfix-active-timeout"),
        (&["--ipfix-domain", "-3"], "--ipfix-domain"),
        (&["--interfaces", "tap[0-"], "--interfaces"),
        (&["--uplink", "eth[0"], "--uplink"),
        (&["--ingress", "turbo"], "--ingress"),
        (&["--uplink-ingress", "xdp"], "--uplink-ingress"),
        (&["--metrics-addr", "localhost"], "--metrics-addr"),
        (&["--metrics-addr", "127.0.0.1:99999"], "--metrics-addr"),
        (&["--metrics-addr", "127.0.0.1"], "--metrics-addr"),
        (&["--ipfix", "127.0.0.1"], "--ipfix"),
        (&["--ipfix", "no-such-host.invalid:4739"], "--ipfix"),
        (&["--node", "a/b"], "--node"),
        (&["--node", ".."], "--node"),
        (&["--labels", "rack"], "--labels"),
        (&["--labels", "a=1,a=2"], "--labels"),
        (&["--etcd", "ftp://10.0.0.1:2379"], "--etcd"),
        (&["--etcd", "http://10.0.0.1"], "--etcd"),
        (&["--detach-on-exit=yes"], "--detach-on-exit"),
    ];
    let mut failures = Vec::new();
    for (args, names) in cases {
        let mut argv: Vec<&str> = base.iter().map(String::as_str).collect();
        argv.extend_from_slice(args);
        let (code, stderr) = backplane(&argv);
        if code != Some(2) || !stderr.contains(names) {
            failures.push(format!("{args:?}: exit {code:?}, stderr:\n{stderr}"));
        }
    }
    let touched = [&pin_dir, &socket, &state].into_iter().filter(|p| p.exists()).count();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "{} misuse(s) not refused as they should be:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(touched, 0, "a refused start touched nothing");
}

#[test]
fn unknown_subcommands_flags_and_missing_arguments_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "Usage"),
        (&["frobnicate"], "frobnicate"),
        (&["--verbose"], "--verbose"),
        (&["status", "--bogus"], "--bogus"),
        (&["flows", "--format", "xml"], "--format"),
        (&["check"], "<PATH>"),
        (&["explain", "--from", "10.0.0.1"], "--to"),
        (&["explain", "--from", "a", "--to", "b", "--proto", "tcp", "--port", "70000"], "--port"),
        (&["explain", "--from", "a", "--to", "b", "--proto", "tcp", "--rules", "r", "--socket", "s"], "--socket"),
        (&["endpoint"], "Usage"),
        (&["endpoint", "add", "x"], "--mac"),
        (&["endpoint", "add", "x", "--mac", "52:54:00:00:00:01", "--ip", "300.1.1.1"], "--ip"),
        (&["endpoint", "attest", "x"], "--patched-at"),
        (&["top", "--once", "--interval", "1"], "--interval"),
        (&["audit", "--jsonl"], "--jsonl"),
    ];
    let mut failures = Vec::new();
    for (args, names) in cases {
        let (code, stderr) = backplane(args);
        if code != Some(2) || !stderr.contains(names) {
            failures.push(format!("{args:?}: exit {code:?}, stderr:\n{stderr}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} misuse(s) not refused as they should be:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Directories removed when dropped, also when a test fails.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// The state and pin directories decide what an agent trusts at its start (the last
/// good rules, host bindings, a previous agent's maps): one that another user owns or
/// may write, or a symbolic link, ends the start with a message naming it and what is
/// wrong. Positive control: the same start with a directory of its own gets past the
/// check (and ends at the missing rule files instead).
#[test]
fn a_state_or_pin_directory_others_could_change_ends_the_start_naming_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("bp-dirs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let pin_dir = format!("/sys/fs/bpf/bp-dirs-test-{}", std::process::id());
    // Whatever a start that should have been refused left is removed, also on failure.
    let _cleanup = Cleanup(vec![dir.clone(), pin_dir.clone().into()]);
    let start = |state: &std::path::Path, pins: &str, extra: &[&str]| {
        let socket = dir.join("bp.sock");
        let mut argv =
            vec!["run", "--interfaces", "bp-none-*", "--pin-dir", pins, "--socket", socket.to_str().unwrap()];
        argv.extend(["--state-dir", state.to_str().unwrap()]);
        argv.extend_from_slice(extra);
        backplane(&argv)
    };
    let mut failures = Vec::new();
    let expect = |failures: &mut Vec<String>, what: &str, (code, stderr): (Option<i32>, String), needles: &[&str]| {
        if code == Some(0) || !needles.iter().all(|n| stderr.contains(n)) {
            failures.push(format!("{what}: exit {code:?}, wanted {needles:?} in:\n{stderr}"));
        }
    };
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let open_text = format!("the state directory {} is writable by everyone", open.display());
    expect(&mut failures, "a state directory anyone may write", start(&open, &pin_dir, &[]), &[&open_text]);
    let theirs = dir.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown (the tests run as root)");
    expect(
        &mut failures,
        "a state directory of another user",
        start(&theirs, &pin_dir, &[]),
        &["is owned by uid 65534"],
    );
    let own = dir.join("own");
    std::fs::create_dir(&own).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&own, &link).unwrap();
    expect(&mut failures, "a state directory that is a link", start(&link, &pin_dir, &[]), &["is a symbolic link"]);
    let missing = dir.join("no-such-rules");
    let control = start(&own, &pin_dir, &["--rules", missing.to_str().unwrap()]);
    expect(&mut failures, "positive control: its own directory", control.clone(), &["no-such-rules"]);
    if control.1.contains("state directory") {
        failures.push(format!("positive control: the state directory was refused:\n{}", control.1));
    }
    // A pin directory others may write.
    std::fs::create_dir_all(&pin_dir).unwrap();
    std::fs::set_permissions(&pin_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let pin_text = format!("the pin directory {pin_dir} is writable by everyone");
    let refused = start(&own, &pin_dir, &[]);
    let _ = std::fs::remove_dir_all(&pin_dir);
    expect(&mut failures, "a pin directory anyone may write", refused, &[&pin_text]);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
