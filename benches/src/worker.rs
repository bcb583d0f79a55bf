//! A thread with a network namespace of its own that runs jobs on a value it owns.
//!
//! Several benchmark configurations can then live side by side, each with its own
//! bridge, firewall tables and `net.bridge.*` switches (those are per namespace), and be
//! measured in quick alternation instead of being built and torn down in turn. The
//! value is built, used and dropped on the worker thread, so everything its guards undo
//! (links, tables, sysctls) is undone in the right namespace; processes the worker
//! starts inherit its namespace.

use std::{
    sync::mpsc::{self, Sender},
    thread::JoinHandle,
};

use anyhow::{Context as _, anyhow};

type Job<T> = Box<dyn FnOnce(&mut T) + Send>;

/// A worker owning a `T`; dropping it drops the `T` on the worker thread and joins it.
pub struct NetnsWorker<T> {
    jobs: Option<Sender<Job<T>>>,
    handle: Option<JoinHandle<()>>,
    name: String,
}

impl<T: 'static> NetnsWorker<T> {
    /// Starts a thread, moves it into a new network namespace (loopback up), and builds
    /// the value there with `build`. Returns once it is built, or its error.
    pub fn spawn(name: &str, build: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job<T>>();
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut value = match enter_new_netns().and_then(|()| build()) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                for job in rx {
                    job(&mut value);
                }
                drop(value);
            })
            .context("spawn worker thread")?;
        let mut worker = Self { jobs: Some(jobs), handle: Some(handle), name: name.to_owned() };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(worker),
            Ok(Err(e)) => Err(e.context(format!("build {name}"))),
            Err(_) => {
                let panic = worker.handle.take().map(JoinHandle::join);
                Err(anyhow!("{name}: the worker panicked while building ({panic:?})"))
            }
        }
    }

    /// Runs `f` on the worker's value and returns its result.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut T) -> anyhow::Result<R> + Send + 'static,
    ) -> anyhow::Result<R> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .context("worker stopped")?
            .send(Box::new(move |value: &mut T| {
                let _ = tx.send(f(value));
            }))
            .map_err(|_| anyhow!("{}: the worker has stopped", self.name))?;
        rx.recv().map_err(|_| anyhow!("{}: the worker panicked", self.name))?
    }
}

impl<T> Drop for NetnsWorker<T> {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Moves the calling thread into a new network namespace with loopback up.
fn enter_new_netns() -> anyhow::Result<()> {
    // SAFETY: unshare has no memory effects; it affects the calling thread only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    let status =
        std::process::Command::new("ip").args(["link", "set", "dev", "lo", "up"]).status().context("run ip")?;
    if !status.success() {
        anyhow::bail!("ip link set lo up failed");
    }
    Ok(())
}
