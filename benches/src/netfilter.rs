//! The nftables comparison: sysctls and tables that are put back as they were when their
//! guard drops (also on a panic or an interrupt).
//!
//! The bridge family of nftables has no conntrack on this kernel, so stateful filtering
//! of bridged traffic goes through `br_netfilter`: bridged IPv4 frames are handed to the
//! `inet` family's hooks when `net.bridge.bridge-nf-call-iptables` is 1 (`br_netfilter`).

use std::{io::Write as _, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// A sysctl (a path under /proc/sys/net, read in the calling thread's namespace) set to
/// a value; the old value is written back on drop.
pub struct SysctlGuard {
    path: PathBuf,
    previous: String,
}

impl SysctlGuard {
    /// Sets `key` (dotted, e.g. `net.bridge.bridge-nf-call-iptables`) to `value`.
    pub fn set(key: &str, value: &str) -> anyhow::Result<Self> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let previous =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?.trim().to_owned();
        std::fs::write(&path, value).with_context(|| format!("write {value} to {}", path.display()))?;
        Ok(Self { path, previous })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.previous) {
            eprintln!("warning: cannot restore {} to {}: {e}", self.path.display(), self.previous);
        }
    }
}

/// Makes sure `br_netfilter` is there (`modprobe br_netfilter` when its sysctls are
/// missing). A module this loads stays loaded: unloading it could pull it from under
/// someone else's bridge; in the benchmark's own namespace it does nothing while its
/// sysctls are 0.
pub fn ensure_br_netfilter() -> anyhow::Result<()> {
    if std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        return Ok(());
    }
    let status = Command::new("modprobe").arg("br_netfilter").status().context("run modprobe")?;
    if !status.success() || !std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        bail!("br_netfilter is not available (modprobe br_netfilter: {status})");
    }
    Ok(())
}

/// Bridged traffic through netfilter (`true`) or not, for as long as the guard lives:
/// `bridge-nf-call-iptables` to 1 or 0, `-ip6tables` and `-arptables` to 0.
pub fn bridge_netfilter(on: bool) -> anyhow::Result<Vec<SysctlGuard>> {
    ensure_br_netfilter()?;
    Ok(vec![
        SysctlGuard::set("net.bridge.bridge-nf-call-iptables", if on { "1" } else { "0" })?,
        SysctlGuard::set("net.bridge.bridge-nf-call-ip6tables", "0")?,
        SysctlGuard::set("net.bridge.bridge-nf-call-arptables", "0")?,
    ])
}

/// An nftables table loaded from text; deleted on drop.
pub struct NftTable {
    family: String,
    name: String,
}

impl NftTable {
    /// Loads `ruleset` (which must define exactly the table `family name`) with `nft -f -`.
    pub fn load(family: &str, name: &str, ruleset: &str) -> anyhow::Result<Self> {
        // A table of the same name left by an earlier run in this namespace goes first.
        let _ =
            Command::new("nft").args(["delete", "table", family, name]).stderr(std::process::Stdio::null()).status();
        // The guard exists before the table does, so a half-loaded table is removed too.
        let guard = Self { family: family.to_owned(), name: name.to_owned() };
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("run nft")?;
        child.stdin.take().context("stdin")?.write_all(ruleset.as_bytes()).context("feed nft")?;
        let out = child.wait_with_output().context("wait for nft")?;
        if !out.status.success() {
            bail!("nft -f failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(guard)
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let ok =
            Command::new("nft").args(["delete", "table", &self.family, &self.name]).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: cannot delete nftables table {} {}", self.family, self.name);
        }
    }
}
