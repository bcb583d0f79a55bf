//! Entering a named network namespace from a thread.
//!
//! A network namespace is a per-thread property on Linux, so a thread can join one with
//! `setns(2)` while the rest of the process stays in the host namespace. Sockets and
//! tun/tap descriptors opened by that thread belong to the namespace for their whole life,
//! whichever thread uses them later.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;

/// The file that `ip netns add NAME` bind-mounts for a namespace.
pub(crate) fn netns_path(netns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(netns)
}

/// Moves the calling thread into the network namespace `netns` (a name made by
/// `ip netns add`). Use it only on a thread you created for that purpose: the thread
/// stays there.
pub fn enter_netns(netns: &str) -> io::Result<()> {
    let path = netns_path(netns);
    let file = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    // SAFETY: setns only reads the descriptor, which stays open for the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("setns into {netns}: {e}")));
    }
    Ok(())
}

/// Runs `f` on a new thread inside the network namespace `netns` and returns its result.
/// Panics (with context) if the namespace cannot be entered, or if `f` panics.
///
/// ```no_run
/// fn listen_in(vm: &backplane_lab::Vm) -> std::net::TcpListener {
///     // The listener keeps accepting connections inside the VM's namespace.
///     backplane_lab::in_netns(vm.netns(), || std::net::TcpListener::bind("0.0.0.0:5001")).expect("bind")
/// }
/// ```
pub fn in_netns<F, R>(netns: &str, f: F) -> R
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name(format!("netns-{netns}"))
            .spawn_scoped(scope, || {
                enter_netns(netns).unwrap_or_else(|e| panic!("{e}"));
                f()
            })
            .expect("cannot spawn a thread")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
