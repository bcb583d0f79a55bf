//! Keeping a benchmark to itself on a shared machine, and stopping it cleanly.
//!
//! [`enter_private_netns`] moves the benchmark process into a network namespace of its
//! own before it builds anything. The lab's bridge and host ports, the nftables tables
//! and the per-namespace `net.bridge.bridge-nf-call-*` switches then exist only there:
//! other people's bridges on the machine never pass through the benchmark's firewall,
//! and whatever the process leaves behind (even when killed) goes with the namespace.
//! The "VMs" are namespaces of their own as always; bpffs and pins are not per
//! namespace and are cleaned up by their guards.
//!
//! [`install_interrupt_handler`] turns SIGINT/SIGTERM into a flag that measurement loops
//! poll ([`check_interrupted`]), so that a Ctrl-C unwinds through every guard.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag instead of killing the process.
pub fn install_interrupt_handler() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
}

/// An error once SIGINT or SIGTERM has arrived.
pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `duration`, waking early (with an error) on SIGINT/SIGTERM.
pub fn sleep(duration: std::time::Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + duration;
    loop {
        check_interrupted()?;
        let now = std::time::Instant::now();
        if now >= deadline {
            return Ok(());
        }
        std::thread::sleep((deadline - now).min(std::time::Duration::from_millis(50)));
    }
}

/// Moves this process into a new network namespace with loopback up. Call it first
/// thing in `main`, before any thread exists (a namespace is per thread; threads and
/// children started later inherit it).
pub fn enter_private_netns() -> anyhow::Result<()> {
    // SAFETY: unshare has no memory effects; the process is single-threaded here.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET) (run as root)");
    }
    let status =
        std::process::Command::new("ip").args(["link", "set", "dev", "lo", "up"]).status().context("run ip")?;
    if !status.success() {
        bail!("ip link set lo up failed");
    }
    Ok(())
}
