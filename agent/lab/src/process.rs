//! Running commands: one-shot helpers that panic with context, and [`ChildGuard`], a
//! child process that is killed (with its whole process group) when dropped.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Runs `args[0]` with the rest as arguments in the host namespace and returns its output,
/// whatever its exit status. Panics only if the program cannot be started.
#[must_use]
pub fn host_exec(args: &[&str]) -> Output {
    let (program, rest) = args.split_first().expect("host_exec needs a program");
    Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args.join(" ")))
}

/// Like [`host_exec`], but panics unless the command succeeds; returns its stdout.
#[expect(clippy::must_use_candidate, reason = "called for its effect; the returned text is a convenience")]
pub fn host_run(args: &[&str]) -> String {
    expect_success(args, &host_exec(args))
}

/// Runs a command and ignores every failure: for use in `Drop`.
pub(crate) fn run_quietly(args: &[&str]) {
    let (program, rest) = args.split_first().expect("run_quietly needs a program");
    let _status =
        Command::new(program).args(rest).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Panics with the command, its status and its stderr unless `output` is a success;
/// returns its stdout.
pub(crate) fn expect_success(args: &[&str], output: &Output) -> String {
    assert!(
        output.status.success(),
        "`{}` failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim_end(),
        String::from_utf8_lossy(&output.stdout).trim_end(),
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// How long a dropped [`ChildGuard`] waits after SIGTERM before SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(2);

/// A child process in its own process group, whose stdout and stderr go to a log file.
///
/// Dropping the guard sends SIGTERM to the group if the child still runs, waits up to
/// 2 s, then kills whatever is left of the group with SIGKILL, reaps the child and
/// deletes the log. If the thread is panicking at that moment (a failing test),
/// the end of the log is printed to stderr first, so a test failure shows what the child
/// said.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    label: String,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Starts `command` with stdin from /dev/null and stdout + stderr into a fresh log
    /// file, in a new process group. Panics if it cannot be started.
    pub fn spawn(command: &mut Command) -> ChildGuard {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let label = format!("{command:?}");
        let dir = std::env::temp_dir().join("backplane-lab-logs");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let program = Path::new(command.get_program())
            .file_name()
            .map_or_else(|| "child".to_owned(), |name| name.to_string_lossy().into_owned());
        let log_path =
            dir.join(format!("{}-{}-{program}.log", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let log = File::create(&log_path).unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("cannot duplicate a log file descriptor");
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        ChildGuard { child, label, log_path, status: None }
    }

    /// The child's pid (also its process group id).
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The command line, for messages.
    #[must_use]
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Where the child's stdout and stderr go.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// What the child wrote to stdout and stderr so far.
    #[must_use]
    pub fn output(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            let mut bytes = Vec::new();
            let _ignored = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    /// The exit status if the child has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap_or_else(|e| panic!("cannot poll {}: {e}", self.label));
        }
        self.status
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` until the child's output contains `needle` (e.g. a
    /// "listening" line). False if it exits or the time runs out first. A program whose
    /// stdout is a file may buffer it: ask it to flush (`iperf3 --forceflush`).
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return true;
            }
            if self.try_wait().is_some() || Instant::now() >= deadline {
                return self.output().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the child to exit, however long it takes.
    pub fn wait(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let status = self.child.wait().unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.label));
        self.status = Some(status);
        status
    }

    /// Sends `signal` (for example `libc::SIGTERM`) to the child's process group, if the
    /// child has not exited yet.
    pub fn signal(&mut self, signal: i32) {
        if self.try_wait().is_none() {
            let pgid = libc::pid_t::try_from(self.child.id()).expect("pid fits in pid_t");
            // SAFETY: killpg has no memory effects; the group is ours and not yet reaped.
            unsafe { libc::killpg(pgid, signal) };
        }
    }

    /// Asks the child to stop with `signal`, waits up to `grace`, then kills its group.
    /// Returns the exit status.
    pub fn stop_with(&mut self, signal: i32, grace: Duration) -> ExitStatus {
        self.signal(signal);
        if let Some(status) = self.wait_timeout(grace) {
            return status;
        }
        self.signal(libc::SIGKILL);
        self.wait()
    }

    /// [`ChildGuard::stop_with`] SIGTERM and a 5 s grace period.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM, Duration::from_secs(5))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let output = self.output();
            let tail_start = output.len().saturating_sub(4096);
            let tail = output.get(tail_start..).unwrap_or(&output);
            let mut message = format!("--- output of {} ---\n", self.label);
            let _infallible = write!(message, "{tail}");
            eprintln!("{message}\n--- end ---");
        }
        // Politely first (an agent detaches its programs on SIGTERM), briefly.
        if self.try_wait().is_none() {
            self.signal(libc::SIGTERM);
            let _exited = self.wait_timeout(DROP_GRACE);
        }
        // Kill the whole group even if its leader has exited: a shell's children may live on.
        // The group id cannot be reused while any member of the group is alive.
        let pgid = libc::pid_t::try_from(self.child.id()).unwrap_or(0);
        if pgid > 0 {
            // SAFETY: killpg has no memory effects.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
        if self.status.is_none() {
            let _ignored = self.child.wait();
        }
        let _ignored = std::fs::remove_file(&self.log_path);
    }
}
