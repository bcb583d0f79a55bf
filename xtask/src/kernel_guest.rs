//! `cargo xtask test-kernel`: backplane on Debian 12's stock kernel (Linux 6.1), in a QEMU
//! guest.
//!
//! Why: the README names Debian 12, whose stock kernel is 6.1, while the machines the
//! project is built and tested on run a much newer kernel. 6.1 has no TCX links (TC
//! programs attach through a `clsact` qdisc and `cls_bpf` filters) and a verifier that
//! refuses what newer ones accept, so only a run on that very kernel shows that the data
//! path loads, attaches and enforces there. The guest boots in seconds under TCG and needs
//! no disk image: the kernel package and an initramfs built here are enough.
//!
//! What it does:
//! 1. Fetches the kernel: `apt-get download` of the package that `linux-image-cloud-amd64`
//!    depends on (`linux-image-6.1.0-<abi>-cloud-amd64`, found with `apt-cache depends`),
//!    extracted with `dpkg-deb -x` into `target/kernel-guest/<package>/`, reused while
//!    that package stays the one Debian points at.
//! 2. Builds an initramfs (cpio newc, written here, gzip'd): busybox-static with its applet
//!    links; the debug `backplane` (its DWARF stripped: about 150 MB less to load under
//!    TCG, symbols kept), iproute2's `ip` and `tc`, and `nft` when the host has it, each
//!    with the libraries `ldd` lists and the dynamic loader; the kernel modules the lab
//!    needs with their dependencies (`modinfo -F depends`) in load order, decompressed;
//!    [`INIT_SCRIPT`] as `/init` and [`RULES`] as the rule set.
//! 3. Boots it: `qemu-system-x86_64 -accel tcg`, no network device, the serial console
//!    written to `target/kernel-guest/console.log` (and the verdict lines echoed live),
//!    QEMU killed after the timeout.
//! 4. Reads the verdicts: every check of [`CHECKS`] must print `BPTEST <check> PASS`, and
//!    the guest must reach `BPTEST DONE`; otherwise the failing lines and the end of the
//!    console make the error.
//!
//! The guest's `/init` (xtask/kernel-guest/init.sh) builds the lab inside the guest (a
//! bridge, three namespaces as VMs on veth ports `bpv-web`, `bpv-db`, `bpv-dev`), checks it
//! without an agent, then runs `backplane run` and checks what it allows and drops, kills
//! it with SIGKILL, checks that the pinned data path goes on enforcing, and starts a second
//! agent that must adopt it.
//!
//! Nothing stays on the host but the cache under `target/kernel-guest/` (the extracted
//! kernel and the last console log): the run's own directory (`run-<pid>`, the stripped
//! binary and the initramfs) is removed at the end, and a directory left by a run that
//! was killed is removed by the next one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead as _, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, stdout_of, target_dir};

/// The guest's `/init`.
const INIT_SCRIPT: &str = include_str!("../kernel-guest/init.sh");

/// The rule set the guest's agent enforces (`/etc/bptest/rules.yaml`).
const RULES: &str = include_str!("../kernel-guest/rules.yaml");

/// Debian's metapackage for the cloud kernel; it depends on the concrete image package.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Checks the guest must pass, in the order it runs them (names as init.sh prints them).
const CHECKS: &[&str] = &[
    "boot",
    "modules",
    "lab",
    "rules",
    "agent-start",
    "allowed",
    "denied",
    "reverse",
    "no-agent",
    "adopt",
    "adopted-enforces",
];

/// The check the guest runs when `nft` was shipped.
const NFT_CHECK: &str = "nft-bridge";

/// Modules the lab needs: the bridge, veth ports, the `clsact` qdisc and `cls_bpf`
/// filters that attach TC programs on a kernel without TCX.
const MODULES: &[&str] = &["bridge", "veth", "sch_ingress", "cls_bpf"];

/// Modules for tables of `nft`'s bridge family, such as the agent's port guard: the
/// chains, sets and counters are part of `nf_tables`; without `nft_meta_bridge` a `meta`
/// expression (`iifname`, and the `meta protocol` behind `ip saddr`) in a bridge table
/// fails with "No such file or directory".
const NFT_MODULES: &[&str] = &["nf_tables", "nft_meta_bridge"];

/// Where the modules go in the guest (`<name>.ko`); init.sh loads them from there.
const GUEST_MODULE_DIR: &str = "lib/modules/bptest";

/// How many lines of the console end an error report.
const CONSOLE_TAIL_LINES: usize = 60;

/// Guest memory in MiB.
const GUEST_MEMORY_MB: u32 = 1024;

/// The guest's console lines that carry a verdict, and those for the record.
const VERDICT_PREFIX: &str = "BPTEST ";
const INFO_PREFIX: &str = "BPINFO ";

/// How `run` runs the guest.
pub(crate) struct Options<'a> {
    /// How long the guest may run before QEMU is killed.
    pub(crate) timeout: Duration,
    /// Environment variables for QEMU (`cargo xtask test` marks its processes so that a
    /// leftover one is found).
    pub(crate) env: Vec<(&'a str, String)>,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(600), env: Vec::new() }
    }
}

fn say(what: &str) {
    println!("test-kernel: {what}");
}

pub(crate) fn run(options: &Options<'_>) -> Result<()> {
    let started = Instant::now();
    let cache = target_dir().join("kernel-guest");
    std::fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    remove_stale_run_dirs(&cache);

    let kernel = fetch_kernel(&cache)?;
    say(&format!("kernel {} ({})", kernel.release, kernel.package));
    say("building backplane: cargo build -p backplane-agent --bin backplane");
    util::run(util::cargo().args(["build", "-p", "backplane-agent", "--bin", "backplane"]))?;
    let agent_bin = target_dir().join("debug").join("backplane");
    if !agent_bin.is_file() {
        bail!("{} is missing after the build", agent_bin.display());
    }

    let work = RunDir::create(&cache)?;
    let initrd = work.path().join("initrd.img");
    let guest = build_initramfs(&kernel, &agent_bin, work.path(), &initrd)?;
    say(&format!(
        "initramfs {} ({:.1} MB gzip'd; modules: {}; nft: {})",
        initrd.display(),
        megabytes(file_size(&initrd)),
        guest.modules.join(" "),
        if guest.has_nft { "yes" } else { "not installed on the host" }
    ));

    // Written in the run's directory, then moved where the last run's console is kept.
    let console = cache.join("console.log");
    let run_console = work.path().join("console.log");
    say(&format!(
        "booting the guest (TCG, 1 CPU, {GUEST_MEMORY_MB} MiB; up to {} s); console: {}",
        options.timeout.as_secs(),
        console.display()
    ));
    let boot = boot(&kernel.vmlinuz, &initrd, &run_console, options)?;
    std::fs::rename(&run_console, &console)
        .with_context(|| format!("cannot move {} to {}", run_console.display(), console.display()))?;
    drop(work);

    let text = std::fs::read(&console).with_context(|| format!("cannot read {}", console.display()))?;
    let text = String::from_utf8_lossy(&text);
    let mut expected: Vec<&str> = CHECKS.to_vec();
    if guest.has_nft {
        expected.insert(3, NFT_CHECK);
    }
    let verdicts = Verdicts::parse(&text);
    let problems = verdicts.problems(&expected);
    let guest_time = format!("the guest ran {:.1} s", boot.elapsed.as_secs_f64());
    let ending = if boot.timed_out {
        format!("QEMU was killed after {} s", options.timeout.as_secs())
    } else {
        format!("QEMU {}", boot.status)
    };
    if problems.is_empty() {
        say(&format!(
            "all {} checks passed on {}; {guest_time}, {:.1} s in all",
            expected.len(),
            kernel.release,
            started.elapsed().as_secs_f64()
        ));
        return Ok(());
    }
    eprintln!("test-kernel: the last {CONSOLE_TAIL_LINES} lines of the console ({}):", console.display());
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..] {
        eprintln!("  | {}", line.trim_end());
    }
    eprintln!("test-kernel: what went wrong:");
    for problem in &problems {
        eprintln!("  {problem}");
    }
    bail!(
        "the guest on Linux {1} failed: {0} problem(s) ({guest_time}; {ending}); console: {2}",
        problems.len(),
        kernel.release,
        console.display()
    )
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |meta| meta.len())
}

#[expect(clippy::cast_precision_loss, reason = "a size for display")]
fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

// ---- the kernel ---------------------------------------------------------------------------

/// An extracted kernel package.
struct Kernel {
    package: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-57-cloud-amd64`.
    release: String,
    vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the extracted package.
    modules: PathBuf,
}

/// The kernel package Debian points at, downloaded and extracted into `cache/<package>/`
/// unless it already is. Other packages' directories (an older ABI) are removed.
fn fetch_kernel(cache: &Path) -> Result<Kernel> {
    let package = concrete_kernel_package()?;
    let root = cache.join(&package);
    let complete = root.join(".complete");
    if !complete.exists() {
        say(&format!("downloading {package} (apt-get download) into {}", cache.display()));
        let _ignored = std::fs::remove_dir_all(&root);
        let mut download = Command::new("apt-get");
        download.arg("download").arg(&package).current_dir(cache);
        if util::is_root() {
            // apt's sandbox user may not be able to write into the target directory.
            download.args(["-o", "APT::Sandbox::User=root"]);
        }
        util::run(&mut download)?;
        let deb = find_deb(cache, &package)?;
        let extracted = util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        let _ignored = std::fs::remove_file(&deb);
        extracted?;
        std::fs::write(&complete, "").with_context(|| format!("cannot write {}", complete.display()))?;
    }
    for entry in std::fs::read_dir(cache).with_context(|| format!("cannot list {}", cache.display()))?.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("linux-image-") && name != *package.as_str() {
            say(&format!("removing the cached {}", name.to_string_lossy()));
            let _ignored = std::fs::remove_dir_all(entry.path());
        }
    }
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("cannot list {}", boot.display()))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz-")))
        .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
    let release = vmlinuz
        .file_name()
        .and_then(|name| name.to_str()?.strip_prefix("vmlinuz-"))
        .context("vmlinuz file name")?
        .to_owned();
    let modules = root.join("lib/modules").join(&release);
    if !modules.is_dir() {
        bail!("{package} has no lib/modules/{release}");
    }
    Ok(Kernel { package, release, vmlinuz, modules })
}

/// The package `linux-image-cloud-amd64` depends on, from `apt-cache depends`; with one
/// `apt-get update` first when apt does not know the metapackage yet (a fresh machine).
fn concrete_kernel_package() -> Result<String> {
    let depends = || stdout_of(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]));
    let listing = match depends() {
        Ok(listing) => listing,
        Err(_) if util::is_root() => {
            say(&format!("apt does not know {KERNEL_METAPACKAGE}: apt-get update"));
            util::run(Command::new("apt-get").args(["update", "-q"]))?;
            depends()?
        }
        Err(error) => return Err(error.context("run `apt-get update` as root first")),
    };
    image_dependency(&listing)
        .with_context(|| format!("`apt-cache depends {KERNEL_METAPACKAGE}` names no linux-image-*-cloud-amd64"))
}

/// The `linux-image-*-cloud-amd64` package in an `apt-cache depends` listing.
fn image_dependency(listing: &str) -> Option<String> {
    listing
        .lines()
        .filter_map(|line| line.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && name.ends_with("-cloud-amd64") && *name != KERNEL_METAPACKAGE)
        .map(str::to_owned)
}

/// The `.deb` that `apt-get download <package>` wrote into `dir`.
fn find_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with(&prefix))
                && path.extension().is_some_and(|ext| ext == "deb")
        })
        .with_context(|| format!("apt-get download left no {prefix}*.deb in {}", dir.display()))
}

// ---- kernel modules -------------------------------------------------------------------------

/// The modules of an extracted kernel: files by module name, and the built-in ones.
struct ModuleTree {
    files: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

/// A module's name as the kernel knows it: `-` and `_` are the same.
fn module_name(name: &str) -> String {
    name.replace('-', "_")
}

/// `x.ko`, `x.ko.xz`, `x.ko.zst`, `x.ko.gz` -> `x`.
fn module_name_of_file(file_name: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|ext| file_name.strip_suffix(ext))?;
    Some(module_name(stem))
}

impl ModuleTree {
    fn read(dir: &Path) -> Result<Self> {
        let mut files = HashMap::new();
        let mut pending = vec![dir.join("kernel")];
        while let Some(current) = pending.pop() {
            let entries = std::fs::read_dir(&current).with_context(|| format!("cannot list {}", current.display()))?;
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    pending.push(path);
                } else if let Some(name) = entry.file_name().to_str().and_then(module_name_of_file) {
                    files.insert(name, path);
                }
            }
        }
        // modules.builtin: `kernel/net/ipv6/ipv6.ko`, one a line.
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| module_name_of_file(line.rsplit('/').next()?))
            .collect();
        Ok(Self { files, builtin })
    }

    /// What `modinfo -F depends` says the module needs; `None` for a built-in module.
    fn depends(&self, name: &str) -> Result<Option<Vec<String>>> {
        let Some(file) = self.files.get(name) else {
            if self.builtin.contains(name) {
                return Ok(None);
            }
            bail!("the kernel has no module {name} (neither a file nor built in)");
        };
        let listing = stdout_of(Command::new("modinfo").args(["-F", "depends"]).arg(file))?;
        Ok(Some(listing.trim().split(',').filter(|dep| !dep.is_empty()).map(module_name).collect()))
    }

    /// The module's contents, decompressed.
    fn contents(&self, name: &str) -> Result<Vec<u8>> {
        let file = self.files.get(name).with_context(|| format!("no file for module {name}"))?;
        let decompressor = match file.extension().and_then(|ext| ext.to_str()) {
            Some("xz") => "xz",
            Some("zst") => "zstd",
            Some("gz") => "gzip",
            _ => return std::fs::read(file).with_context(|| format!("cannot read {}", file.display())),
        };
        let output = Command::new(decompressor)
            .arg("-dc")
            .arg(file)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {decompressor} for {}", file.display()))?;
        if !output.status.success() {
            bail!(
                "`{decompressor} -dc {}` failed: {}",
                file.display(),
                String::from_utf8_lossy(&output.stderr).trim_end()
            );
        }
        Ok(output.stdout)
    }
}

/// `wanted` and everything they depend on, each after its dependencies; built-in modules
/// (`depends` gives `None`) are left out.
fn load_order(wanted: &[&str], mut depends: impl FnMut(&str) -> Result<Option<Vec<String>>>) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        depends: &mut dyn FnMut(&str) -> Result<Option<Vec<String>>>,
        done: &mut HashSet<String>,
        path: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if path.iter().any(|on_path| on_path == name) {
            bail!("modules depend on each other in a cycle: {} -> {name}", path.join(" -> "));
        }
        let Some(deps) = depends(name)? else {
            done.insert(name.to_owned());
            return Ok(());
        };
        path.push(name.to_owned());
        for dep in &deps {
            visit(dep, depends, done, path, order)?;
        }
        path.pop();
        done.insert(name.to_owned());
        order.push(name.to_owned());
        Ok(())
    }
    let (mut done, mut path, mut order) = (HashSet::new(), Vec::new(), Vec::new());
    for name in wanted {
        visit(&module_name(name), &mut depends, &mut done, &mut path, &mut order)?;
    }
    Ok(order)
}

// ---- the initramfs --------------------------------------------------------------------------

/// What the initramfs holds, as far as the verdicts depend on it.
struct Guest {
    modules: Vec<String>,
    has_nft: bool,
}

/// Writes the gzip'd initramfs to `out`; `work` takes the stripped agent binary.
fn build_initramfs(kernel: &Kernel, agent_bin: &Path, work: &Path, out: &Path) -> Result<Guest> {
    let mut archive = Archive::default();
    for dir in ["dev", "proc", "sys", "run", "tmp", "root", "etc/bptest", GUEST_MODULE_DIR] {
        archive.add(dir, Node::Dir)?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    archive.add_with_mode("dev/console", Node::CharDevice { major: 5, minor: 1 }, 0o600)?;
    archive.add("var/run", Node::Symlink("../run".into()))?;
    archive.add_with_mode("init", Node::Bytes(INIT_SCRIPT.as_bytes().to_vec()), 0o755)?;
    archive.add("etc/bptest/rules.yaml", Node::Bytes(RULES.as_bytes().to_vec()))?;

    let busybox = find_program("busybox").context("busybox is not installed (Debian: busybox-static)")?;
    let ip = find_program("ip").context("ip is not installed (Debian: iproute2)")?;
    let tc = find_program("tc").context("tc is not installed (Debian: iproute2)")?;
    let nft = find_program("nft");
    let stripped = work.join("backplane");
    util::run(Command::new("strip").arg("--strip-debug").arg("-o").arg(&stripped).arg(agent_bin))
        .context("strip (Debian: binutils) is needed to make the agent small enough to load under TCG")?;

    let mut programs = vec![
        ("bin/busybox", busybox.clone()),
        ("usr/bin/backplane", stripped),
        ("usr/sbin/ip", ip),
        ("usr/sbin/tc", tc),
    ];
    if let Some(nft) = nft.clone() {
        programs.push(("usr/sbin/nft", nft));
    }
    for (guest_path, host_path) in &programs {
        archive.add_with_mode(guest_path, Node::File(host_path.clone()), 0o755)?;
        for library in shared_libraries(host_path)? {
            let guest_library = library.to_string_lossy().trim_start_matches('/').to_owned();
            archive.add_with_mode(&guest_library, Node::File(library), 0o755)?;
        }
    }
    // busybox's applets, except those a real program stands in for (ip, tc, nft).
    let applets = stdout_of(Command::new(&busybox).arg("--list-full"))?;
    for applet in applets.lines().map(str::trim).filter(|applet| !applet.is_empty()) {
        let name = applet.rsplit('/').next().unwrap_or(applet);
        let replaced = programs.iter().any(|(path, _)| path.rsplit('/').next() == Some(name));
        if !replaced && !archive.contains(applet) {
            archive.add(applet, Node::Symlink("/bin/busybox".into()))?;
        }
    }

    let tree = ModuleTree::read(&kernel.modules)?;
    let mut wanted: Vec<&str> = MODULES.to_vec();
    if nft.is_some() {
        wanted.extend(NFT_MODULES);
    }
    let modules = load_order(&wanted, |name| tree.depends(name))?;
    for module in &modules {
        archive.add(&format!("{GUEST_MODULE_DIR}/{module}.ko"), Node::Bytes(tree.contents(module)?))?;
    }
    let list = modules.join("\n") + "\n";
    archive.add("etc/bptest/modules", Node::Bytes(list.into_bytes()))?;

    write_gzip(out, |sink| archive.write_newc(sink))?;
    Ok(Guest { modules, has_nft: nft.is_some() })
}

/// `name` in PATH or in the sbin directories (not on a normal user's PATH).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The libraries and the dynamic loader that `ldd` lists for a program; none for a
/// static one.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(program)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run ldd {}", program.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if [&stdout, &stderr]
        .iter()
        .any(|text| text.contains("not a dynamic executable") || text.contains("statically linked"))
    {
        return Ok(Vec::new());
    }
    if !output.status.success() {
        bail!("`ldd {}` failed ({}): {}", program.display(), output.status, stderr.trim_end());
    }
    parse_ldd(&stdout).with_context(|| format!("ldd {}", program.display()))
}

/// The paths in `ldd`'s output: `name => /path (0x...)` and the loader's `/path (0x...)`;
/// the vDSO has no path. A library `not found` is an error.
fn parse_ldd(listing: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in listing.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let target = line.split_once("=>").map_or(line, |(_, target)| target.trim());
        if target.starts_with("not found") {
            bail!("a library is missing: {line}");
        }
        let path = target.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

/// Writes what `write` produces through `gzip` into `out`.
fn write_gzip(out: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut gzip = Command::new("gzip")
        .args(["-6", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("cannot run gzip")?;
    let mut sink = BufWriter::new(gzip.stdin.take().context("gzip's stdin")?);
    let written = write(&mut sink).and_then(|()| sink.flush().context("cannot write to gzip"));
    drop(sink);
    let status = gzip.wait().context("gzip")?;
    written?;
    if !status.success() {
        bail!("gzip failed ({status})");
    }
    Ok(())
}

/// One entry of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    /// A host file, read when the archive is written.
    File(PathBuf),
    Bytes(Vec<u8>),
    Symlink(String),
    CharDevice {
        major: u32,
        minor: u32,
    },
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    node: Node,
    mode: u32,
}

/// A cpio archive in the "newc" format the kernel unpacks as its initramfs, owned by
/// root whoever builds it. Paths are relative (`usr/bin/ip`); parents are added as
/// directories, and a path comes before the paths under it.
#[derive(Default)]
struct Archive {
    entries: BTreeMap<String, Entry>,
}

const NEWC_MAGIC: &str = "070701";
const NEWC_TRAILER: &str = "TRAILER!!!";

impl Archive {
    fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_matches('/'))
    }

    /// Adds a node with the usual mode: 0755 for directories, 0777 for symlinks, 0644
    /// for the rest.
    fn add(&mut self, path: &str, node: Node) -> Result<()> {
        let mode = match node {
            Node::Dir => 0o755,
            Node::Symlink(_) => 0o777,
            _ => 0o644,
        };
        self.add_with_mode(path, node, mode)
    }

    /// Adds a node (and its missing parents); adding the same node twice is harmless,
    /// two different nodes at one path are an error.
    fn add_with_mode(&mut self, path: &str, node: Node, mode: u32) -> Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || path.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
            bail!("initramfs: bad path {path:?}");
        }
        let mut parent = String::new();
        for part in path.split('/').collect::<Vec<_>>().split_last().map_or(&[][..], |(_, parents)| parents) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), Entry { node: Node::Dir, mode: 0o755 });
                }
                Some(Entry { node: Node::Dir, .. }) => {}
                Some(other) => bail!("initramfs: {parent} is a {:?}, not a directory (adding {path})", other.node),
            }
        }
        let entry = Entry { node, mode };
        match self.entries.get(path) {
            None => {
                self.entries.insert(path.to_owned(), entry);
                Ok(())
            }
            Some(existing) if *existing == entry => Ok(()),
            Some(existing) => bail!("initramfs: {path} added twice ({:?}, then {:?})", existing.node, entry.node),
        }
    }

    fn write_newc(&self, out: &mut dyn Write) -> Result<()> {
        let mut written = 0u64;
        for (index, (path, entry)) in self.entries.iter().enumerate() {
            let inode = u32::try_from(index + 1).context("initramfs: too many entries")?;
            let (kind, nlink, rdev) = match entry.node {
                Node::Dir => (0o040_000, 2, (0, 0)),
                Node::File(_) | Node::Bytes(_) => (0o100_000, 1, (0, 0)),
                Node::Symlink(_) => (0o120_000, 1, (0, 0)),
                Node::CharDevice { major, minor } => (0o020_000, 1, (major, minor)),
            };
            let size = match &entry.node {
                Node::File(host) => {
                    std::fs::metadata(host).with_context(|| format!("cannot read {}", host.display()))?.len()
                }
                Node::Bytes(bytes) => bytes.len() as u64,
                Node::Symlink(target) => target.len() as u64,
                Node::Dir | Node::CharDevice { .. } => 0,
            };
            let header = NewcHeader { inode, mode: kind | entry.mode, nlink, size, rdev, name: path };
            written += header.write(out)?;
            let copied = match &entry.node {
                Node::File(host) => {
                    let mut file = File::open(host).with_context(|| format!("cannot read {}", host.display()))?;
                    std::io::copy(&mut file, out).with_context(|| format!("cannot copy {}", host.display()))?
                }
                Node::Bytes(bytes) => {
                    out.write_all(bytes)?;
                    bytes.len() as u64
                }
                Node::Symlink(target) => {
                    out.write_all(target.as_bytes())?;
                    target.len() as u64
                }
                Node::Dir | Node::CharDevice { .. } => 0,
            };
            if copied != size {
                bail!("initramfs: {path} changed while it was archived ({size} bytes, then {copied})");
            }
            written += copied + pad4(out, written + copied)?;
        }
        let trailer = NewcHeader { inode: 0, mode: 0, nlink: 1, size: 0, rdev: (0, 0), name: NEWC_TRAILER };
        written += trailer.write(out)?;
        // The kernel reads the archive in 512-byte blocks, as cpio writes them.
        let end = written.next_multiple_of(512);
        out.write_all(&vec![0; usize::try_from(end - written).unwrap_or(0)])?;
        Ok(())
    }
}

struct NewcHeader<'a> {
    inode: u32,
    mode: u32,
    nlink: u32,
    size: u64,
    rdev: (u32, u32),
    name: &'a str,
}

impl NewcHeader<'_> {
    /// Writes the header and the name, padded to 4 bytes; returns the bytes written.
    fn write(&self, out: &mut dyn Write) -> Result<u64> {
        let size = u32::try_from(self.size).with_context(|| format!("initramfs: {} is over 4 GiB", self.name))?;
        let name_size = u32::try_from(self.name.len() + 1).context("initramfs: name too long")?;
        // ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize, check.
        let fields = [self.inode, self.mode, 0, 0, self.nlink, 0, size, 0, 0, self.rdev.0, self.rdev.1, name_size, 0];
        let header: String =
            std::iter::once(NEWC_MAGIC.to_owned()).chain(fields.iter().map(|field| format!("{field:08x}"))).collect();
        out.write_all(header.as_bytes())?;
        out.write_all(self.name.as_bytes())?;
        out.write_all(&[0])?;
        let length = (header.len() + self.name.len() + 1) as u64;
        Ok(length + pad4(out, length)?)
    }
}

/// Pads to the next multiple of 4 bytes after `length` bytes; returns the padding's size.
fn pad4(out: &mut dyn Write, length: u64) -> Result<u64> {
    let padding = length.next_multiple_of(4) - length;
    out.write_all(&[0; 3][..usize::try_from(padding).unwrap_or(0)])?;
    Ok(padding)
}

// ---- booting ----------------------------------------------------------------------------------

/// `target/kernel-guest/run-<pid>`: this run's files, removed when dropped.
struct RunDir(PathBuf);

impl RunDir {
    fn create(cache: &Path) -> Result<Self> {
        let path = cache.join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ignored = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes `run-<pid>` directories of processes that are gone (a run killed before it
/// could clean up).
fn remove_stale_run_dirs(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| name.strip_prefix("run-")) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ignored = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// QEMU, killed and reaped if still running when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ignored = self.0.kill();
        }
        let _ignored = self.0.wait();
    }
}

struct Boot {
    elapsed: Duration,
    timed_out: bool,
    status: String,
}

/// Boots the guest and waits for QEMU to exit (the guest powers off) or the timeout.
/// The serial console goes to `console`; verdict and info lines are echoed as they come.
fn boot(vmlinuz: &Path, initrd: &Path, console: &Path, options: &Options<'_>) -> Result<Boot> {
    let log = File::create(console).with_context(|| format!("cannot create {}", console.display()))?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", &GUEST_MEMORY_MB.to_string()])
        .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.try_clone().context("console log")?);
    for (name, value) in &options.env {
        qemu.env(name, value);
    }
    let started = Instant::now();
    let mut child = Qemu(
        qemu.spawn().with_context(|| format!("cannot run `{}` (Debian: qemu-system-x86)", util::describe(&qemu)))?,
    );
    let stdout = child.0.stdout.take().context("QEMU's stdout")?;
    let copier = std::thread::spawn(move || copy_console(stdout, log));

    let deadline = started + options.timeout;
    let (timed_out, status) = loop {
        if let Some(status) = child.0.try_wait().context("waiting for QEMU")? {
            break (false, status.to_string());
        }
        if Instant::now() >= deadline {
            let _ignored = child.0.kill();
            let status = child.0.wait().map_or_else(|error| error.to_string(), |status| status.to_string());
            break (true, status);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = started.elapsed();
    drop(child);
    match copier.join() {
        Ok(result) => result?,
        Err(_) => bail!("the console copier panicked"),
    }
    Ok(Boot { elapsed, timed_out, status })
}

/// Copies the console to the log, echoing verdict and info lines.
fn copy_console(console: impl std::io::Read, mut log: File) -> Result<()> {
    let mut reader = BufReader::new(console);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).context("reading QEMU's console")? == 0 {
            return Ok(());
        }
        log.write_all(&line).context("writing the console log")?;
        let text = String::from_utf8_lossy(&line);
        if let Some(text) = from_marker(&text, VERDICT_PREFIX).or_else(|| from_marker(&text, INFO_PREFIX)) {
            println!("test-kernel: guest: {text}");
        }
    }
}

// ---- verdicts ---------------------------------------------------------------------------------

/// The part of a console line from `marker` on, without trailing white space; a line may
/// start with what the firmware left on the terminal (escape sequences).
fn from_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|at| line[at..].trim_end())
}

/// The guest's verdict lines.
#[derive(Debug, Default)]
struct Verdicts {
    /// Check name -> `None` for PASS, `Some(detail)` for FAIL (the last line per check).
    results: BTreeMap<String, Option<String>>,
    /// Lines that start like a verdict but are none.
    garbled: Vec<String>,
    done: bool,
}

impl Verdicts {
    fn parse(console: &str) -> Self {
        let mut verdicts = Self::default();
        for line in console.lines() {
            let Some(line) = from_marker(line, VERDICT_PREFIX) else {
                continue;
            };
            let rest = line.get(VERDICT_PREFIX.len()..).unwrap_or_default();
            let mut words = rest.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("DONE"), None, None) => verdicts.done = true,
                (Some(check), Some("PASS"), None) => {
                    verdicts.results.insert(check.to_owned(), None);
                }
                (Some(check), Some("FAIL"), detail) => {
                    verdicts.results.insert(check.to_owned(), Some(detail.unwrap_or("").trim().to_owned()));
                }
                _ => verdicts.garbled.push(line.to_owned()),
            }
        }
        verdicts
    }

    /// Every way the run falls short of `expected` all passing and DONE: failed or missing
    /// checks, failed checks not expected, garbled lines, no DONE.
    fn problems(&self, expected: &[&str]) -> Vec<String> {
        let mut problems = Vec::new();
        for check in expected {
            match self.results.get(*check) {
                Some(None) => {}
                Some(Some(detail)) => problems.push(format!("{VERDICT_PREFIX}{check} FAIL {detail}")),
                None => problems.push(format!("{check}: no verdict on the console")),
            }
        }
        for (check, result) in &self.results {
            if let (false, Some(detail)) = (expected.contains(&check.as_str()), result) {
                problems.push(format!("{VERDICT_PREFIX}{check} FAIL {detail}"));
            }
        }
        problems.extend(self.garbled.iter().map(|line| format!("not a verdict: {line}")));
        if !self.done {
            problems.push("the guest did not reach BPTEST DONE".to_owned());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_concrete_kernel_package() {
        let listing = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n";
        assert_eq!(image_dependency(listing).as_deref(), Some("linux-image-6.1.0-57-cloud-amd64"));
        let alternatives = "linux-image-cloud-amd64\n |Depends: linux-image-6.1.0-58-cloud-amd64\n  Depends: x\n";
        assert_eq!(image_dependency(alternatives).as_deref(), Some("linux-image-6.1.0-58-cloud-amd64"));
        assert_eq!(image_dependency("linux-image-cloud-amd64\n  Depends: <virtual>\n"), None);
    }

    #[test]
    fn orders_modules_after_their_dependencies() {
        let deps = |name: &str| -> Result<Option<Vec<String>>> {
            Ok(match name {
                "bridge" => Some(vec!["stp".into(), "llc".into()]),
                "stp" => Some(vec!["llc".into()]),
                "llc" | "veth" | "nfnetlink" => Some(vec![]),
                "ipv6" => None,
                "nf_tables" => Some(vec!["nfnetlink".into(), "ipv6".into()]),
                other => bail!("unknown module {other}"),
            })
        };
        let order = load_order(&["bridge", "veth", "nf-tables"], deps).unwrap();
        assert_eq!(order, ["llc", "stp", "bridge", "veth", "nfnetlink", "nf_tables"]);
        assert!(load_order(&["nope"], deps).is_err());
        let cycle = |name: &str| -> Result<Option<Vec<String>>> {
            Ok(Some(vec![if name == "a" { "b".into() } else { "a".into() }]))
        };
        let error = load_order(&["a"], cycle).unwrap_err().to_string();
        assert!(error.contains("a -> b -> a"), "{error}");
    }

    #[test]
    fn names_module_files() {
        assert_eq!(module_name_of_file("sch_ingress.ko").as_deref(), Some("sch_ingress"));
        assert_eq!(module_name_of_file("nf-tables.ko.xz").as_deref(), Some("nf_tables"));
        assert_eq!(module_name_of_file("modules.dep"), None);
    }

    #[test]
    fn reads_ldd_output() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                       \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f6e)\n\
                       \t/lib64/ld-linux-x86-64.so.2 (0x00007f6e)\n";
        assert_eq!(
            parse_ldd(listing).unwrap(),
            [PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    /// Reads a newc archive back: (name, mode, data) per entry, up to the trailer.
    fn unpack(mut bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&bytes[..6], NEWC_MAGIC.as_bytes(), "magic at {offset}");
            let field = |i: usize| u32::from_str_radix(std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap(), 16);
            let (mode, size, name_size) = (field(1).unwrap(), field(6).unwrap() as usize, field(11).unwrap() as usize);
            let name = std::str::from_utf8(&bytes[110..110 + name_size - 1]).unwrap().to_owned();
            let data_at = (110 + name_size).next_multiple_of(4);
            let data = bytes[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            if name == NEWC_TRAILER {
                return entries;
            }
            entries.push((name, mode, data));
            bytes = &bytes[next..];
            offset += next;
        }
    }

    #[test]
    fn writes_a_newc_archive_with_parents_first() {
        let mut archive = Archive::default();
        archive.add_with_mode("init", Node::Bytes(b"#!/bin/sh\n".to_vec()), 0o755).unwrap();
        archive.add("usr/bin/nc", Node::Symlink("/bin/busybox".into())).unwrap();
        archive.add_with_mode("dev/console", Node::CharDevice { major: 5, minor: 1 }, 0o600).unwrap();
        archive.add("usr/bin/nc", Node::Symlink("/bin/busybox".into())).unwrap();
        assert!(archive.add("usr/bin/nc", Node::Bytes(vec![1])).is_err(), "two nodes at one path");
        assert!(archive.add("usr/bin/nc/x", Node::Dir).is_err(), "a symlink is no parent");
        assert!(archive.add("../etc", Node::Dir).is_err());
        let mut bytes = Vec::new();
        archive.write_newc(&mut bytes).unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let entries = unpack(&bytes);
        let summary: Vec<(&str, u32, &[u8])> =
            entries.iter().map(|(name, mode, data)| (name.as_str(), *mode, data.as_slice())).collect();
        assert_eq!(
            summary,
            [
                ("dev", 0o040_755, &b""[..]),
                ("dev/console", 0o020_600, b""),
                ("init", 0o100_755, b"#!/bin/sh\n"),
                ("usr", 0o040_755, b""),
                ("usr/bin", 0o040_755, b""),
                ("usr/bin/nc", 0o120_777, b"/bin/busybox"),
            ]
        );
    }

    #[test]
    fn every_check_needs_a_pass_and_done() {
        let console = "boot noise\r\n\x1bc\x1b[?7lBPTEST boot PASS\r\nBPTEST agent-start FAIL the agent exited (status 1)\r\n\
                       BPTEST extra FAIL skipped: x\nBPTEST lab\nBPTEST DONE\n";
        let verdicts = Verdicts::parse(console);
        assert!(verdicts.done);
        let problems = verdicts.problems(&["boot", "agent-start", "modules"]);
        assert_eq!(
            problems,
            [
                "BPTEST agent-start FAIL the agent exited (status 1)",
                "modules: no verdict on the console",
                "BPTEST extra FAIL skipped: x",
                "not a verdict: BPTEST lab",
            ]
        );
        let all_good = Verdicts::parse("BPTEST boot PASS\nBPTEST DONE\n");
        assert!(all_good.problems(&["boot"]).is_empty());
        assert_eq!(Verdicts::parse("BPTEST boot PASS\n").problems(&["boot"]), ["the guest did not reach BPTEST DONE"]);
    }

    #[test]
    fn the_init_script_runs_every_check() {
        for check in CHECKS.iter().chain([&NFT_CHECK]) {
            let reported = [format!("report {check} "), format!("pass {check}"), format!("agent_up {check} ")];
            assert!(reported.iter().any(|call| INIT_SCRIPT.contains(call.as_str())), "init.sh never reports {check}");
        }
    }
}
