//! The capabilities `backplane run` keeps: only what it needs while it runs.
//!
//! Capabilities belong to each thread, and a thread inherits its creator's; so they are
//! dropped first thing in `main`, before the async runtime starts any thread, and every
//! thread of the agent has exactly the kept set. Kept:
//!
//! - `CAP_BPF`: map reads and writes, program loads, links;
//! - `CAP_NET_ADMIN`: attaching XDP and TCX to ports as they come, netlink;
//! - `CAP_SYS_ADMIN`: mounting bpffs when it is absent, `BPF_ENABLE_STATS`
//!   (`--program-stats`), reading programs and maps by id;
//! - `CAP_PERFMON`: what the verifier allows BPF programs that read kernel memory;
//! - `CAP_NET_BIND_SERVICE` only when `--metrics-addr` names a port below 1024.
//!
//! Everything else is removed from the effective, permitted, inheritable, ambient and
//! bounding sets, and `no_new_privs` is set: not even an `execve` could regain them.

use caps::{CapSet, Capability, CapsHashSet};

/// What the agent keeps while it runs.
pub const KEPT: [Capability; 4] =
    [Capability::CAP_BPF, Capability::CAP_NET_ADMIN, Capability::CAP_SYS_ADMIN, Capability::CAP_PERFMON];

/// Drops every capability but [`KEPT`] (and `CAP_NET_BIND_SERVICE` if `low_port`) from
/// this thread's sets, which the threads it starts afterwards inherit. Capabilities the
/// process does not have are not added. Returns the set kept.
pub fn drop_for_run(low_port: bool) -> Result<CapsHashSet, caps::errors::CapsError> {
    let mut keep: CapsHashSet = KEPT.into_iter().collect();
    if low_port {
        keep.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    let permitted = caps::read(None, CapSet::Permitted)?;
    let keep: CapsHashSet = keep.intersection(&permitted).copied().collect();
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    let bounding = caps::read(None, CapSet::Bounding)?;
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in bounding.difference(&keep) {
            caps::drop(None, CapSet::Bounding, *cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers and has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    Ok(keep)
}

/// The bit mask of a set of capabilities, as `/proc/<pid>/status` shows it (`CapEff`).
#[must_use]
pub fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0, |m, c| m | c.bitmask())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_mask() {
        let kept: CapsHashSet = KEPT.into_iter().collect();
        // CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21, CAP_PERFMON 38, CAP_BPF 39.
        assert_eq!(mask(&kept), (1 << 12) | (1 << 21) | (1 << 38) | (1 << 39));
    }
}
