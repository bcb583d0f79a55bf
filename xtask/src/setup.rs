//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks to build, test and
//! demo backplane. Each step checks first and prints one line: `ok` or what it did.
//!
//! bpf-linker must be linked against an LLVM of the same major version as rustc's, which
//! Debian 12 does not ship; every Rust toolchain ships its own libLLVM, so bpf-linker is
//! built against nightly's (see docs: toolchain.md in the project's shared notes).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::util::{self, cargo_bin_dir, stdout_of, target_dir};

/// Debian packages the tests and the demo use.
pub(crate) const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "tcpdump",
    "iperf3",
    "bpftool",
    "nftables",
    "etcd-server",
    "prometheus",
    "nfdump",
    // identity_lab: hostile guests write their frames with scapy.
    "python3-scapy",
    // `cargo xtask test-kernel`: a QEMU guest with a busybox initramfs; modinfo reads the
    // guest kernel's module dependencies.
    "qemu-system-x86",
    "busybox-static",
    "kmod",
];

/// The toolchain that builds the eBPF crate (`-Z build-std=core`).
const NIGHTLY: &str = "nightly";

/// Where bpffs must be mounted for the agent's pins.
const BPFFS: &str = "/sys/fs/bpf";

pub(crate) fn run() -> Result<()> {
    let started = Instant::now();
    debian_packages()?;
    nightly_toolchain()?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    println!("setup: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn report(step: &str, what: &str) {
    println!("setup: {step:<22} {what}");
}

fn need_root(step: &str) -> Result<()> {
    if !util::is_root() {
        bail!("setup: {step} needs root; run `cargo xtask setup` as root");
    }
    Ok(())
}

/// `apt-get install` of the packages that `dpkg` does not list as installed, with one
/// `apt-get update` first. Services that the packages bring are not started (a
/// policy-rc.d denies it while installing): tests start their own instances.
fn debian_packages() -> Result<()> {
    let step = "debian packages";
    let missing = missing_packages()?;
    if missing.is_empty() {
        report(step, "ok");
        return Ok(());
    }
    need_root(step)?;
    report(step, &format!("installing {}", missing.join(" ")));
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(policy, "#!/bin/sh\n# written by cargo xtask setup while installing\nexit 101\n")
            .with_context(|| format!("cannot write {}", policy.display()))?;
        make_executable(policy)?;
    }
    let installed = apt_get(&["update", "-q"]).and_then(|()| {
        let mut args = vec!["install", "-y", "-q"];
        args.extend(missing.iter().map(String::as_str));
        apt_get(&args)
    });
    if own_policy {
        let _ignored = std::fs::remove_file(policy);
    }
    installed?;
    let still_missing = missing_packages()?;
    if !still_missing.is_empty() {
        bail!("setup: apt-get did not install {}", still_missing.join(" "));
    }
    Ok(())
}

fn missing_packages() -> Result<Vec<String>> {
    // One dpkg-query for all (exit status 1 when some are unknown: read the output).
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package}\t${db:Status-Abbrev}\n"])
        .args(DEBIAN_PACKAGES)
        .output()
        .context("cannot run dpkg-query (is this Debian?)")?;
    let listing = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, status)| status.starts_with("ii"))
        .map(|(name, _)| name.split(':').next().unwrap_or(name))
        .collect();
    Ok(DEBIAN_PACKAGES.iter().filter(|name| !installed.contains(name)).map(|name| (*name).to_owned()).collect())
}

fn apt_get(args: &[&str]) -> Result<()> {
    util::run(Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive"))
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

fn nightly_toolchain() -> Result<()> {
    let step = "nightly toolchain";
    let list = stdout_of(Command::new("rustup").args(["toolchain", "list"]))?;
    if list.lines().any(|line| line.starts_with(&format!("{NIGHTLY}-"))) {
        report(step, "ok");
        return Ok(());
    }
    report(step, "installing (rustup, minimal profile)");
    util::run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
}

fn rust_src() -> Result<()> {
    let step = "rust-src (nightly)";
    let installed =
        stdout_of(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        report(step, "ok");
        return Ok(());
    }
    report(step, "installing");
    util::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// bpf-linker is fine if one on PATH (or in cargo's bin directory) runs: a bpf-linker
/// whose libLLVM went away (a new nightly, a `cargo clean`) does not, and is rebuilt.
fn bpf_linker() -> Result<()> {
    let step = "bpf-linker";
    if let Some(found) = find_working_bpf_linker() {
        report(step, &format!("ok ({})", found.display()));
        return Ok(());
    }
    let sysroot = PathBuf::from(rustc_nightly(&["--print", "sysroot"])?.trim());
    let lib_dir = sysroot.join("lib");
    let libllvm = real_libllvm(&lib_dir)?;
    let major = llvm_major(&rustc_nightly(&["-vV"])?)?;
    let prefix = target_dir().join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib).with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    let soname = libllvm.file_name().context("libLLVM path has a file name")?;
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(soname)] {
        let _ignored = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), libllvm.display()))?;
    }
    report(step, &format!("building against {} (LLVM {major}); about 2 minutes", libllvm.display()));
    util::run(
        Command::new("cargo")
            // --force: to cargo, a bpf-linker that no longer runs is still installed.
            .args(["install", "--force", "bpf-linker", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    match find_working_bpf_linker() {
        Some(found) => {
            report(step, &format!("installed {}", found.display()));
            Ok(())
        }
        None => bail!("setup: bpf-linker was built but does not run"),
    }
}

fn find_working_bpf_linker() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([cargo_bin_dir()])
        .map(|dir| dir.join("bpf-linker"))
        .filter(|candidate| candidate.is_file())
        .find(|candidate| Command::new(candidate).arg("--version").output().is_ok_and(|output| output.status.success()))
}

fn rustc_nightly(args: &[&str]) -> Result<String> {
    stdout_of(Command::new("rustc").arg(format!("+{NIGHTLY}")).args(args))
}

/// The real libLLVM of a toolchain: `libLLVM.so.<version>`, not the small linker script
/// `libLLVM-<major>-rust-....so` next to it.
fn real_libllvm(lib_dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(lib_dir).with_context(|| format!("cannot list {}", lib_dir.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("libLLVM.so."))
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .collect();
    found.sort();
    found.pop().with_context(|| format!("no libLLVM.so.* in {} (nightly toolchain incomplete?)", lib_dir.display()))
}

/// The major version from `rustc -vV`'s `LLVM version: 22.1.4` line.
fn llvm_major(version_info: &str) -> Result<u32> {
    version_info
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .and_then(|version| version.trim().split('.').next()?.parse().ok())
        .context("`rustc +nightly -vV` printed no `LLVM version:` line")
}

fn bpffs() -> Result<()> {
    let step = "bpffs at /sys/fs/bpf";
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    });
    if mounted {
        report(step, "ok");
        return Ok(());
    }
    need_root(step)?;
    report(step, "mounting");
    util::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_llvm_major_version() {
        let info = "rustc 1.97.0-nightly\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(info).unwrap(), 22);
        assert!(llvm_major("rustc 1.0").is_err());
    }

    #[test]
    fn finds_the_real_libllvm_not_the_linker_script() {
        let dir = std::env::temp_dir().join(format!("xtask-libllvm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("libLLVM-22-rust-1.97.0-nightly.so"), "INPUT(libLLVM.so.22.1-rust)").unwrap();
        std::fs::write(dir.join("libLLVM.so.22.1-rust-1.97.0-nightly"), "ELF").unwrap();
        let found = real_libllvm(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.file_name().unwrap(), "libLLVM.so.22.1-rust-1.97.0-nightly");
    }
}
