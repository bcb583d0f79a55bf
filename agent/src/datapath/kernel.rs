//! What the running kernel offers the data path, and what the data path asks of it.
//!
//! backplane runs on the kernels operators have: Debian 12's stock 6.1 and newer. Each
//! BPF feature the data path uses is probed here (by asking the kernel, never by its
//! version number), so that a kernel that lacks one is refused at start with the name of
//! what is missing, and the one optional feature, TCX links (6.6), chooses how TC
//! programs attach (see [`TcAttach`]).
//!
//! The same module reports the verifier's figures of every program in the embedded
//! object (`backplane kernel --programs`): the instructions the verifier processed (its
//! budget is 1,000,000 on every kernel) and the stack of the longest call chain, counted
//! the way the running kernel counts it: before Linux 6.9 the verifier rounds each frame
//! of a chain up to 32 bytes, from 6.9 JIT-compiled programs round to 16 (commit
//! 682158ab532a), and the sum must stay within 512.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    path::Path,
};

use aya::{
    EbpfLoader,
    maps::MapType,
    programs::{ProgramType, SchedClassifier, Xdp},
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use backplane_common::maps::{
    PROG_BASELINE_LOOKUP, PROG_BASELINE_PASS, PROG_FROM_PORT, PROG_FROM_PORT_TC, PROG_TO_PORT,
};
use serde::{Deserialize, Serialize};

/// The verifier's budget of processed instructions (`BPF_COMPLEXITY_LIMIT_INSNS`).
pub const VERIFIER_INSN_LIMIT: u32 = 1_000_000;
/// The BPF stack limit of one call chain (`MAX_BPF_STACK`).
pub const STACK_LIMIT: u32 = 512;

/// `BPF_PROG_QUERY`.
const BPF_PROG_QUERY: libc::c_long = 16;
/// `enum bpf_attach_type`: `BPF_TCX_INGRESS`.
const BPF_TCX_INGRESS: u32 = 46;

/// How TC programs (`from_port_tc`, `to_port`) attach to a port (`--tc-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TcAttachChoice {
    /// TCX links where the kernel has them (Linux 6.6+), legacy filters elsewhere.
    #[default]
    Auto,
    /// TCX links only; a kernel without TCX is refused at start.
    Tcx,
    /// A `clsact` qdisc with `cls_bpf` direct-action filters, on any kernel.
    Legacy,
}

/// How this agent attaches TC programs, once decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcAttach {
    /// A bpf link of type TCX per program and port, pinned under the pin directory.
    Tcx,
    /// A `cls_bpf` direct-action filter at backplane's own preference and handle in the
    /// port's `clsact` qdisc; it stays in the qdisc when the agent exits.
    Legacy,
}

impl TcAttach {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Legacy => "legacy",
        }
    }
}

impl fmt::Display for TcAttach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A feature the data path needs, or may use, and whether the kernel has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Feature {
    pub name: &'static str,
    /// What the data path uses it for, and the kernel release that brought it.
    pub why: &'static str,
    pub present: bool,
    /// A missing required feature refuses the start.
    pub required: bool,
}

/// What the kernel offers, as probed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelReport {
    pub release: String,
    pub features: Vec<Feature>,
    /// Whether TCX links exist (Linux 6.6).
    pub tcx: bool,
}

impl KernelReport {
    /// The required features the kernel lacks.
    #[must_use]
    pub fn missing(&self) -> Vec<&Feature> {
        self.features.iter().filter(|f| f.required && !f.present).collect()
    }

    /// How TC programs attach, given the operator's choice; an error names what is
    /// missing when the choice cannot be honoured.
    pub fn tc_attach(&self, choice: TcAttachChoice) -> Result<TcAttach, String> {
        match choice {
            TcAttachChoice::Auto | TcAttachChoice::Tcx if self.tcx => Ok(TcAttach::Tcx),
            TcAttachChoice::Auto | TcAttachChoice::Legacy => Ok(TcAttach::Legacy),
            TcAttachChoice::Tcx => Err(format!(
                "--tc-attach tcx: kernel {} has no TCX links (Linux 6.6); use --tc-attach legacy or auto",
                self.release
            )),
        }
    }
}

/// Probes the running kernel.
#[must_use]
pub fn probe() -> KernelReport {
    let map = |t: MapType| is_map_supported(t).unwrap_or(false);
    let prog = |t: ProgramType| is_program_supported(t).unwrap_or(false);
    let helper = |h: BpfHelper| is_helper_supported(ProgramType::SchedClassifier, h).unwrap_or(false);
    let tcx = tcx_supported();
    let features = vec![
        Feature {
            name: "btf",
            why: "kernel BTF (/sys/kernel/btf/vmlinux), which the loader reads (5.4)",
            present: Path::new("/sys/kernel/btf/vmlinux").exists(),
            required: true,
        },
        Feature {
            name: "sched_cls programs",
            why: "from_port_tc and to_port at TC ingress and egress (4.1)",
            present: prog(ProgramType::SchedClassifier),
            required: true,
        },
        Feature {
            name: "xdp programs",
            why: "from_port on ports whose ingress hook is XDP (4.8); only those ports need it",
            present: prog(ProgramType::Xdp),
            required: false,
        },
        Feature {
            name: "ring buffer maps",
            why: "flow events and payload samples to the agent (5.8)",
            present: map(MapType::RingBuf) && helper(BpfHelper::BPF_FUNC_ringbuf_reserve),
            required: true,
        },
        Feature {
            name: "coarse clock helper",
            why: "bpf_ktime_get_coarse_ns: flow timestamps and rate limits (5.11)",
            present: helper(BpfHelper::BPF_FUNC_ktime_get_coarse_ns),
            required: true,
        },
        Feature {
            name: "lru hash maps",
            why: "the flow table and the fragment table (4.10)",
            present: map(MapType::LruHash),
            required: true,
        },
        Feature {
            name: "lpm trie maps",
            why: "zone CIDRs, policies and virtual patches (4.11)",
            present: map(MapType::LpmTrie),
            required: true,
        },
        Feature {
            name: "per-cpu maps",
            why: "counters, zone-pair statistics and the sample budget (4.6)",
            present: map(MapType::PerCpuArray) && map(MapType::PerCpuHash),
            required: true,
        },
        Feature {
            name: "tcx links",
            why: "TC programs as bpf links, ordered first in a port's chain (6.6); without them: clsact + cls_bpf",
            present: tcx,
            required: false,
        },
    ];
    KernelReport { release: release(), features, tcx }
}

/// The kernel release (`uname -r`).
#[must_use]
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

/// Whether the kernel knows TCX attach types: `BPF_PROG_QUERY` of `BPF_TCX_INGRESS` on
/// the loopback device answers on 6.6 and later and fails with `EINVAL` (an attach type
/// it does not know) before. Asking costs nothing and attaches nothing.
#[must_use]
pub fn tcx_supported() -> bool {
    // union bpf_attr, query: target_ifindex (u32), attach_type (u32), query_flags,
    // attach_flags, prog_ids (u64 pointer), prog_cnt ...: a count of 0 asks for none.
    let mut attr = [0u64; 16];
    attr[0] = 1 | (u64::from(BPF_TCX_INGRESS) << 32);
    // With prog_ids null and prog_cnt 0 the kernel writes only into `attr` itself.
    super::pins::sys_bpf(BPF_PROG_QUERY, &mut attr).is_ok()
}

/// The verifier's figures of one program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramFigures {
    pub program: String,
    /// Instructions in the object (the program and the functions it calls).
    pub instructions: usize,
    /// Stack of each frame of the deepest call chain, in bytes, as written.
    pub frames: Vec<u32>,
    /// The chain's stack as a kernel before 6.9 counts it (frames rounded to 32 bytes).
    pub stack_round32: u32,
    /// The same from 6.9 (JIT-compiled: frames rounded to 16 bytes).
    pub stack_round16: u32,
    /// Instructions the verifier processed, when the program was loaded.
    pub verified_insns: Option<u32>,
    /// Why it could not be loaded, if it could not.
    pub load_error: Option<String>,
}

/// Programs the agent may attach, and the benchmarks' baselines.
pub const PROGRAMS: [&str; 5] =
    [PROG_FROM_PORT_TC, PROG_TO_PORT, PROG_FROM_PORT, PROG_BASELINE_PASS, PROG_BASELINE_LOOKUP];

/// The stack figures of every program of `object`, read from its instructions: the
/// functions each program calls are linked as the loader links them, and each frame's
/// depth is the deepest store or load below the frame pointer (r10).
pub fn stack_figures(object: &[u8]) -> Result<BTreeMap<String, ProgramFigures>, String> {
    let mut obj = aya_obj::Object::parse(object).map_err(|e| format!("cannot parse the data path object: {e}"))?;
    let text: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_calls(&text).map_err(|e| format!("cannot link the data path's functions: {e}"))?;
    let mut out = BTreeMap::new();
    for (name, program) in &obj.programs {
        let Some(function) = obj.functions.get(&program.function_key()) else { continue };
        let (frames, count) = deepest_chain(&function.instructions);
        let round = |to: u32| frames.iter().map(|&f| f.max(1).div_ceil(to) * to).sum::<u32>();
        out.insert(
            name.clone(),
            ProgramFigures {
                program: name.clone(),
                instructions: count,
                stack_round32: round(32),
                stack_round16: round(16),
                frames,
                verified_insns: None,
                load_error: None,
            },
        );
    }
    Ok(out)
}

/// `BPF_JMP | BPF_CALL` with `src_reg == BPF_PSEUDO_CALL`: a call of another BPF function.
fn pseudo_call_target(insns: &[aya_obj::generated::bpf_insn], at: usize) -> Option<usize> {
    let insn = &insns[at];
    if insn.code != 0x85 || insn.src_reg() != 1 {
        return None;
    }
    let target = isize::try_from(at).ok()? + 1 + isize::try_from(insn.imm).ok()?;
    usize::try_from(target).ok().filter(|&t| t < insns.len())
}

/// The frames of the deepest call chain of a linked program (its subprograms start at
/// the targets of its pseudo calls), and the number of instructions.
fn deepest_chain(insns: &[aya_obj::generated::bpf_insn]) -> (Vec<u32>, usize) {
    let mut starts: Vec<usize> = vec![0];
    starts.extend((0..insns.len()).filter_map(|i| pseudo_call_target(insns, i)));
    starts.sort_unstable();
    starts.dedup();
    let end_of = |start: usize| starts.iter().copied().find(|&s| s > start).unwrap_or(insns.len());
    let depth = |start: usize| -> u32 {
        let mut deepest = 0i32;
        let frame = &insns[start..end_of(start)];
        for (i, insn) in frame.iter().enumerate() {
            let class = insn.code & 0x07;
            // LDX reads through src_reg; ST and STX write through dst_reg.
            let base = if class == 0x01 { insn.src_reg() } else { insn.dst_reg() };
            if matches!(class, 0x01..=0x03) && base == 10 && insn.off < 0 {
                deepest = deepest.max(-i32::from(insn.off));
            }
            // A pointer into the frame handed to a helper or a callee: `rX = r10` (ALU64
            // MOV X) followed by `rX += -N` (ALU64 ADD K).
            if insn.code == 0xbf
                && insn.src_reg() == 10
                && let Some(next) = frame.get(i + 1)
                && next.code == 0x07
                && next.dst_reg() == insn.dst_reg()
                && next.imm < 0
            {
                deepest = deepest.max(-next.imm);
            }
        }
        deepest.unsigned_abs()
    };
    (deepest_from(0, insns, &end_of, &depth, 0), insns.len())
}

/// A chain's stack as kernels before 6.9 count it (the larger of the two roundings).
fn chain_depth(frames: &[u32]) -> u32 {
    frames.iter().map(|f| (*f).max(1).div_ceil(32) * 32).sum()
}

/// The frames of the deepest chain of calls from the subprogram at `start`, depth-first
/// (the call graph has no cycles: BPF forbids recursion; `level` bounds the walk anyway).
fn deepest_from(
    start: usize,
    insns: &[aya_obj::generated::bpf_insn],
    end_of: &dyn Fn(usize) -> usize,
    depth: &dyn Fn(usize) -> u32,
    level: usize,
) -> Vec<u32> {
    let mut deepest: Vec<u32> = Vec::new();
    if level <= 8 {
        for i in start..end_of(start) {
            if let Some(target) = pseudo_call_target(insns, i) {
                let chain = deepest_from(target, insns, end_of, depth, level + 1);
                if chain_depth(&chain) > chain_depth(&deepest) {
                    deepest = chain;
                }
            }
        }
    }
    let mut frames = vec![depth(start)];
    frames.extend(deepest);
    frames
}

/// Loads every program of `object` (with fresh, unpinned maps of small sizes) and adds
/// the instructions the verifier processed to the stack figures.
pub fn program_figures(object: &[u8]) -> Result<Vec<ProgramFigures>, String> {
    let mut figures = stack_figures(object)?;
    let mut loader = EbpfLoader::new();
    for (map, size) in [("FLOWS", 1024), ("FLOW_EVENTS", 1 << 16), ("PAYLOAD_SAMPLES", 1 << 16)] {
        loader.map_max_entries(map, size);
    }
    // The object pins its maps by name: they are created afresh in a directory of this
    // process's own (nothing is adopted), removed again at the end.
    crate::datapath::ensure_bpffs().map_err(|e| crate::error::report(&e))?;
    let dir = std::path::PathBuf::from(format!(
        "{}/backplane-kernel-report-{}",
        crate::paths::BPFFS_ROOT,
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _remove = RemoveDir(dir.clone());
    loader.default_map_pin_directory(&dir);
    let mut ebpf =
        loader.load(object).map_err(|e| format!("cannot load the data path's maps: {}", crate::error::report(&e)))?;
    for name in PROGRAMS {
        let Some(entry) = figures.get_mut(name) else { continue };
        let outcome = match ebpf.program_mut(name) {
            Some(aya::programs::Program::Xdp(p)) => load_xdp(p),
            Some(aya::programs::Program::SchedClassifier(p)) => load_tc(p),
            Some(_) | None => Err(format!("{name} is not in the object as an XDP or TC program")),
        };
        match outcome {
            Ok(insns) => entry.verified_insns = insns,
            Err(e) => entry.load_error = Some(e),
        }
    }
    Ok(PROGRAMS.iter().filter_map(|name| figures.remove(*name)).collect())
}

/// Removes a directory of pins when dropped.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            log::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}

fn load_xdp(p: &mut Xdp) -> Result<Option<u32>, String> {
    p.load().map_err(|e| crate::error::report(&e))?;
    Ok(p.info().ok().and_then(|i| i.verified_instruction_count()))
}

fn load_tc(p: &mut SchedClassifier) -> Result<Option<u32>, String> {
    p.load().map_err(|e| crate::error::report(&e))?;
    Ok(p.info().ok().and_then(|i| i.verified_instruction_count()))
}

/// `backplane kernel` as text.
#[must_use]
pub fn render(report: &KernelReport, programs: Option<&[ProgramFigures]>) -> String {
    use std::fmt::Write as _;
    let mut out = format!("kernel {}\n", report.release);
    for f in &report.features {
        let state = match (f.present, f.required) {
            (true, _) => "yes",
            (false, true) => "MISSING",
            (false, false) => "no",
        };
        let _ = writeln!(out, "  {:<20} {:<8} {}", f.name, state, f.why);
    }
    let _ = writeln!(
        out,
        "tc attach (auto): {}",
        report.tc_attach(TcAttachChoice::Auto).map_or_else(|e| e, |a| a.to_string())
    );
    if let Some(programs) = programs {
        let _ =
            writeln!(out, "programs (verifier budget {VERIFIER_INSN_LIMIT} instructions, stack {STACK_LIMIT} bytes):");
        for p in programs {
            let insns = match (p.verified_insns, &p.load_error) {
                (_, Some(e)) => format!("REJECTED: {e}"),
                (Some(n), None) => format!(
                    "verified {n} insns ({:.1}% of the budget)",
                    f64::from(n) * 100.0 / f64::from(VERIFIER_INSN_LIMIT)
                ),
                (None, None) => "loaded (the kernel does not report verified instructions)".into(),
            };
            let frames = p.frames.iter().map(u32::to_string).collect::<Vec<_>>().join("+");
            let _ = writeln!(
                out,
                "  {:<16} {} insns, stack {frames} = {} (<6.9) / {} (6.9+); {insns}",
                p.program, p.instructions, p.stack_round32, p.stack_round16
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_fits_the_stack_of_kernels_before_6_9() {
        let figures = stack_figures(crate::datapath::DATAPATH_OBJECT).unwrap();
        for name in PROGRAMS {
            let f = &figures[name];
            assert!(
                f.stack_round32 <= STACK_LIMIT,
                "{name}: stack {:?} = {} > {STACK_LIMIT}",
                f.frames,
                f.stack_round32
            );
        }
    }

    #[test]
    fn the_choice_of_tc_attach_follows_the_kernel() {
        let mut report = KernelReport { release: "6.1.0".into(), features: Vec::new(), tcx: false };
        assert_eq!(report.tc_attach(TcAttachChoice::Auto), Ok(TcAttach::Legacy));
        assert_eq!(report.tc_attach(TcAttachChoice::Legacy), Ok(TcAttach::Legacy));
        assert!(report.tc_attach(TcAttachChoice::Tcx).unwrap_err().contains("no TCX"));
        report.tcx = true;
        assert_eq!(report.tc_attach(TcAttachChoice::Auto), Ok(TcAttach::Tcx));
        assert_eq!(report.tc_attach(TcAttachChoice::Legacy), Ok(TcAttach::Legacy));
    }
}
