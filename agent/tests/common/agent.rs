//! Runs the real `backplane` binary against a lab and asks it questions over its
//! control socket, as an operator would.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use backplane_lab::{ChildGuard, Lab};
use serde_json::Value;

/// Path of the `backplane` binary built for these tests.
pub const BACKPLANE: &str = env!("CARGO_BIN_EXE_backplane");

/// A running agent; stopped (and its pins removed: it runs with `--detach-on-exit`)
/// when dropped. Declare it after the [`Lab`] so that it drops first.
pub struct Agent {
    pub child: ChildGuard,
    pub socket: PathBuf,
}

impl Agent {
    /// Starts `backplane run` on the lab's ports with `extra` arguments and waits until
    /// its control socket answers.
    pub fn start(lab: &Lab, extra: &[&str]) -> Agent {
        Self::start_with(lab, extra, true)
    }

    /// Starts `backplane run` without `--detach-on-exit`: when it exits (or is killed)
    /// its programs stay attached through their pins, for the next agent to adopt.
    pub fn start_keeping_pins(lab: &Lab, extra: &[&str]) -> Agent {
        Self::start_with(lab, extra, false)
    }

    /// The lab's agent; its state (endpoints, last good rules) goes to `<work>/state`
    /// unless `extra` names a `--state-dir`.
    fn start_with(lab: &Lab, extra: &[&str], detach_on_exit: bool) -> Agent {
        Self::start_binary(BACKPLANE, lab, extra, detach_on_exit)
    }

    /// [`Agent::start`] of another `backplane` binary (an earlier release, for upgrades).
    pub fn start_binary(binary: &str, lab: &Lab, extra: &[&str], detach_on_exit: bool) -> Agent {
        let mut cmd = Command::new(binary);
        cmd.arg("run").args(lab.agent_args());
        if detach_on_exit {
            cmd.arg("--detach-on-exit");
        }
        if !extra.contains(&"--state-dir") {
            cmd.arg("--state-dir").arg(lab.work_dir().join("state"));
        }
        cmd.args(extra);
        cmd.env("RUST_LOG", "info");
        let child = ChildGuard::spawn(&mut cmd);
        let mut agent = Agent { child, socket: lab.socket_path() };
        agent.wait_ready(Duration::from_secs(30));
        agent
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait() {
                panic!("backplane run exited with {status} before it was ready:\n{}", self.child.output());
            }
            if self.socket.exists() && self.cli(&["status", "--json"]).status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "backplane run not ready after {timeout:?}:\n{}", self.child.output());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a `backplane` client command against this agent's socket.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BACKPLANE).args(args).arg("--socket").arg(&self.socket).output().expect("run backplane client")
    }

    /// Runs a client command that must succeed and returns its stdout parsed as JSON.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "backplane {} failed: {}\nagent log:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.child.output()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("backplane {} printed no JSON ({e}): {}", args.join(" "), String::from_utf8_lossy(&out.stdout))
        })
    }

    /// `backplane flows --json`.
    pub fn flows(&self) -> Vec<Value> {
        match self.cli_json(&["flows", "--json"]) {
            Value::Array(flows) => flows,
            other => panic!("flows --json is not an array: {other}"),
        }
    }

    /// `backplane status --json`.
    pub fn status(&self) -> Value {
        self.cli_json(&["status", "--json"])
    }

    /// (port name, ingress link id, egress link id, program on the ingress, program on the
    /// egress) of each attached port, sorted by name: what restarts and upgrades must keep
    /// (the links) and change (the programs).
    pub fn port_links(&self) -> Vec<(String, u64, u64, u64, u64)> {
        let field = |p: &Value, f: &str| p[f].as_u64().unwrap_or_else(|| panic!("port without {f}: {p:#}"));
        let mut out: Vec<_> = self.status()["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| {
                let name = p["name"].as_str().expect("a port name").to_owned();
                (
                    name,
                    field(p, "ingress_link_id"),
                    field(p, "tc_link_id"),
                    field(p, "from_port_id"),
                    field(p, "to_port_id"),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// The one flow matching `proto`, `src` and `dst` (as strings), if any.
    pub fn find_flow(&self, proto: &str, src: &str, dst: &str) -> Option<Value> {
        let matching: Vec<Value> = self
            .flows()
            .into_iter()
            .filter(|f| f["proto"] == proto && f["src_ip"] == src && f["dst_ip"] == dst)
            .collect();
        assert!(matching.len() <= 1, "more than one {proto} flow {src} -> {dst}: {matching:#?}");
        matching.into_iter().next()
    }

    /// Polls until `f` returns `Some`, or panics after `timeout` with `what`.
    pub fn wait_for<T>(&self, timeout: Duration, what: &str, mut f: impl FnMut(&Agent) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}\nagent log:\n{}",
                self.child.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent with SIGKILL, as a crash would, and waits for it to be gone.
    pub fn kill_9(mut self) {
        self.child.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Stops the agent with SIGTERM and asserts it exits cleanly.
    pub fn stop(mut self) {
        let status = self.child.stop();
        assert!(status.success(), "backplane run exited with {status}:\n{}", self.child.output());
    }
}

/// Asserts a flow record's numeric field.
pub fn field(flow: &Value, name: &str) -> u64 {
    flow[name].as_u64().unwrap_or_else(|| panic!("flow has no numeric {name}: {flow:#}"))
}

/// A copy of `rules/examples/<example>` in the lab's work directory (`<work>/rules`),
/// for tests that edit the rules under a running agent.
pub fn copy_example_rules(lab: &Lab, example: &str) -> PathBuf {
    let dir = lab.work_dir().join("rules");
    std::fs::create_dir_all(&dir).expect("create the rules directory");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/examples").join(example);
    for entry in std::fs::read_dir(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display())) {
        let entry = entry.expect("read the example directory");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy an example rule file");
    }
    dir
}
