//! `--flow-log PATH`: flow starts and ends as JSON lines, in a file rotated by size.
//!
//! Each line is one flow record (the fields of `backplane flows --json`, with zones,
//! verdict, reason, policy and the names found in its first packets) plus `time` (when
//! the line was written) and `event`: `start`, `end` (FIN/RST seen), `expired` (idle,
//! with its final counters) or `evicted` (gone from the kernel table, with the last
//! counters read). Flows whose verdict is `audit` are the audit events: they passed, and
//! enforcing would have dropped them. A reader that fell behind writes a line
//! `{"event":"lagged","missed":N}`; the missed records are also counted in
//! `backplane_export_errors_total{exporter="flow_log",error="lagged"}`.
//!
//! When a line would make the file larger than `--flow-log-max-bytes`, the file is
//! renamed to `PATH.1` (`PATH.1` to `PATH.2`, ...) and a new one started; `--flow-log-keep`
//! rotated files are kept.

use std::{
    fs::{self, File},
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;
use tokio::sync::broadcast::{Receiver, error::TryRecvError};

use crate::{
    clock::{now_unix_ms, rfc3339_ms},
    export::metrics::Metrics,
    flows::{FlowRecord, FollowEvent, FollowMessage},
};

/// `--flow-log*` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowLogOptions {
    pub path: PathBuf,
    /// Largest size of one file in bytes.
    pub max_bytes: u64,
    /// Rotated files kept besides the current one.
    pub keep: usize,
}

/// A file that is rotated by size: `PATH`, `PATH.1` ... `PATH.<keep>`.
pub struct RotatingFile {
    opts: FlowLogOptions,
    file: BufWriter<File>,
    size: u64,
}

/// Moves `path` to `path.1` (`.1` to `.2`, ..., dropping `.keep`); with `keep` 0 removes
/// it. The flow log and the audit log rotate this way.
pub fn rotate_files(path: &Path, keep: usize) -> io::Result<()> {
    if keep == 0 {
        return fs::remove_file(path);
    }
    match fs::remove_file(rotated(path, keep)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    for n in (1..keep).rev() {
        match fs::rename(rotated(path, n), rotated(path, n + 1)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    fs::rename(path, rotated(path, 1))
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

impl RotatingFile {
    /// Opens (appends to) the file, creating its directory.
    pub fn open(opts: FlowLogOptions) -> io::Result<Self> {
        if let Some(dir) = opts.path.parent()
            && !dir.as_os_str().is_empty()
        {
            fs::create_dir_all(dir)?;
        }
        let file = crate::files::open_append(&opts.path)?;
        let size = file.metadata()?.len();
        Ok(Self { opts, file: BufWriter::new(file), size })
    }

    /// Writes one line (a newline is added), rotating first if it would not fit.
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.opts.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.file.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        let path = &self.opts.path;
        rotate_files(path, self.opts.keep)?;
        let file = crate::files::open_append(path)?;
        self.file = BufWriter::new(file);
        self.size = 0;
        Ok(())
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    event: &'a str,
    #[serde(flatten)]
    flow: &'a FlowRecord,
}

#[derive(Serialize)]
struct LaggedLine {
    time: String,
    event: &'static str,
    missed: u64,
}

/// The line of one follow message, if it is one the log keeps.
#[must_use]
pub fn line_of(msg: &FollowMessage) -> Option<Vec<u8>> {
    if msg.event == FollowEvent::Lagged {
        let line = LaggedLine { time: rfc3339_ms(now_unix_ms()), event: "lagged", missed: msg.missed.unwrap_or(0) };
        return serde_json::to_vec(&line).ok();
    }
    let event = msg.event.flow_event_name()?;
    let flow = msg.flow.as_ref()?;
    serde_json::to_vec(&Line { time: rfc3339_ms(now_unix_ms()), event, flow }).ok()
}

/// Writes the follow stream into the log until the channel closes. Runs on its own
/// thread (file writes block).
pub fn run(mut log: RotatingFile, mut rx: Receiver<FollowMessage>, metrics: &Arc<Metrics>) {
    let write = |log: &mut RotatingFile, msg: &FollowMessage| {
        if msg.event == FollowEvent::Lagged {
            metrics.export_error("flow_log", "lagged", msg.missed.unwrap_or(0));
        }
        let Some(line) = line_of(msg) else { return };
        match log.write_line(&line) {
            Ok(()) => {
                if msg.event != FollowEvent::Lagged {
                    metrics.exported("flow_log", 1);
                }
            }
            Err(e) => {
                metrics.export_error("flow_log", "write", 1);
                log::warn!("flow log {}: {e}", log.opts.path.display());
            }
        }
    };
    loop {
        let first = match rx.blocking_recv() {
            Ok(msg) => msg,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                FollowMessage { event: FollowEvent::Lagged, flow: None, missed: Some(n) }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        };
        write(&mut log, &first);
        // Drain what is queued, then flush once.
        loop {
            match rx.try_recv() {
                Ok(msg) => write(&mut log, &msg),
                Err(TryRecvError::Lagged(n)) => {
                    write(&mut log, &FollowMessage { event: FollowEvent::Lagged, flow: None, missed: Some(n) });
                }
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        if let Err(e) = log.flush() {
            metrics.export_error("flow_log", "write", 1);
            log::warn!("flow log {}: {e}", log.opts.path.display());
        }
    }
    let _ = log.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = std::env::temp_dir().join(format!("backplane-flowlog-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("sub/flows.jsonl");
        let opts = FlowLogOptions { path: path.clone(), max_bytes: 100, keep: 2 };
        let mut log = RotatingFile::open(opts).unwrap();
        for i in 0..10 {
            log.write_line(format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(30)).as_bytes()).unwrap();
        }
        log.flush().unwrap();
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        // 49-byte lines: two per file; 10 lines -> files of lines 8-9 (current), 6-7, 4-5.
        assert!(read(&path).contains("\"n\":8") && read(&path).contains("\"n\":9"));
        assert!(read(&rotated(&path, 1)).contains("\"n\":6"));
        assert!(read(&rotated(&path, 2)).contains("\"n\":4"));
        assert!(!rotated(&path, 3).exists(), "only two rotated files kept");
        for p in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            assert!(fs::metadata(&p).unwrap().len() <= 100);
        }
        // Reopening appends.
        drop(log);
        let mut log = RotatingFile::open(FlowLogOptions { path: path.clone(), max_bytes: 1000, keep: 2 }).unwrap();
        log.write_line(b"{\"n\":10}").unwrap();
        log.flush().unwrap();
        assert!(read(&path).contains("\"n\":9") && read(&path).contains("\"n\":10"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
