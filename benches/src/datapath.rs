//! Loading backplane's data path object in a benchmark, without the agent: for
//! `BPF_PROG_TEST_RUN` timings, for writing rule tables, and for attaching the programs
//! to ports in a chosen way (XDP generic, XDP native, TC only).
//!
//! Everything is guarded: dropping a [`Loaded`] detaches whatever it attached (aya
//! detaches a program's links when the program goes) and removes its pin directory.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode, tc::TcAttachOptions},
};
use backplane_common::{PortInfo, PortRole, maps};

/// The data path object loaded with its maps pinned in a directory of its own.
pub struct Loaded {
    pub ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Loaded {
    /// Where its maps are pinned.
    #[must_use]
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.pin_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}

/// Loads the data path object embedded in the agent with a flow table of
/// `flow_capacity` entries, and verifies (loads) the named programs. The pins go to
/// `/sys/fs/bpf/backplane-bench-<pid>-<n>`.
pub fn load(flow_capacity: u32, programs: &[&str]) -> anyhow::Result<Loaded> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/backplane-bench-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&pin_dir).context("create pin dir (is bpffs mounted at /sys/fs/bpf?)")?;
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(&pin_dir)
        .map_max_entries(maps::FLOWS, flow_capacity)
        .load(backplane::DATAPATH_OBJECT);
    // From here on `loaded` removes the pins, also on error.
    let mut loaded = Loaded { ebpf: ebpf.context("load data path")?, pin_dir };
    for &name in programs {
        let program = loaded.ebpf.program_mut(name).with_context(|| format!("no program {name}"))?;
        match program {
            aya::programs::Program::Xdp(p) => p.load(),
            aya::programs::Program::SchedClassifier(p) => p.load(),
            _ => anyhow::bail!("{name}: unexpected program type"),
        }
        .with_context(|| format!("verify {name}"))?;
    }
    Ok(loaded)
}

/// How the data path is attached to a port, for comparing the choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// `from_port` as generic (skb) XDP, `to_port` at TCX egress (`--ingress xdp-skb`).
    XdpSkb,
    /// `from_port` as native (driver) XDP, `to_port` at TCX egress (`--ingress xdp-native`).
    XdpNative,
    /// `from_port_tc` at TCX ingress, `to_port` at TCX egress: the agent's default
    /// (`--ingress tc`).
    TcOnly,
}

impl AttachMode {
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            AttachMode::XdpSkb => "XDP generic (skb) + TC egress",
            AttachMode::XdpNative => "XDP native + TC egress",
            AttachMode::TcOnly => "TC ingress + TC egress (no XDP; the default)",
        }
    }
}

/// Loads the data path and attaches it to the ports `(ifindex, name)` of this process's
/// namespace in `mode`, each registered in `PORTS` as a VM port. Observe mode (no rule
/// set); nobody drains the event ring, so once it is full flow events are counted as
/// lost, at no cost to the packets. Dropping the result detaches everything.
pub fn attach(ports: &[(u32, String)], mode: AttachMode) -> anyhow::Result<Loaded> {
    let mut loaded = load(65_536, &[maps::PROG_FROM_PORT, maps::PROG_FROM_PORT_TC, maps::PROG_TO_PORT])?;
    {
        let mut ports_map: HashMap<&mut MapData, u32, PortInfo> =
            HashMap::try_from(loaded.ebpf.map_mut(maps::PORTS).context("PORTS")?)?;
        for (ifindex, _) in ports {
            ports_map.insert(*ifindex, PortInfo { role: PortRole::Vm as u8, ..PortInfo::default() }, 0)?;
        }
    }
    for (ifindex, name) in ports {
        match mode {
            AttachMode::XdpSkb | AttachMode::XdpNative => {
                let flags = if mode == AttachMode::XdpSkb { XdpMode::Skb } else { XdpMode::Driver };
                let xdp: &mut Xdp = loaded.ebpf.program_mut(maps::PROG_FROM_PORT).context("from_port")?.try_into()?;
                xdp.attach_to_if_index(*ifindex, flags).with_context(|| format!("attach XDP ({mode:?}) to {name}"))?;
            }
            AttachMode::TcOnly => {
                let tc: &mut SchedClassifier =
                    loaded.ebpf.program_mut(maps::PROG_FROM_PORT_TC).context("from_port_tc")?.try_into()?;
                tc.attach_with_options(name, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default()))
                    .with_context(|| format!("attach TC ingress to {name}"))?;
            }
        }
        let tc: &mut SchedClassifier = loaded.ebpf.program_mut(maps::PROG_TO_PORT).context("to_port")?.try_into()?;
        tc.attach_with_options(name, TcAttachType::Egress, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .with_context(|| format!("attach TC egress to {name}"))?;
    }
    Ok(loaded)
}

/// Kernel memory of a BPF map as the kernel accounts it (`memlock:` of the map's fdinfo;
/// since Linux 6.4 the map's real usage).
pub fn map_memory_bytes(map: &MapData) -> anyhow::Result<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).context("read fdinfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no memlock in the map's fdinfo")
}
