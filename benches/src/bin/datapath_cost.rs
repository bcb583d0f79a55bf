//! Per-packet cost of the data path under `BPF_PROG_TEST_RUN`, beside an XDP program
//! that only passes (`baseline_pass`) and one that only looks the frame's flow key up in
//! `FLOWS` (`baseline_lookup`), timed in the same run.
//!
//! Scenarios: the established-flow fast path (IPv4, IPv6), a denied flow whose verdict
//! is cached, a new allowed flow and a new denied flow; at 0 (observe only), 10, 1,000
//! and 100,000 policies and 1,000 / 100,000 / 1,000,000 flows already in the table.
//! Repeated runs use the kernel's own timer (`repeat`); new flows need a different
//! packet each time, so they are timed one run per packet over many packets, and so
//! is the baseline they are compared with.

use std::{fmt::Write as _, time::Duration};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
    programs::{TestRun, TestRunOptions, Xdp},
};
use backplane_benches::{
    datapath::{self, Loaded},
    report,
};
use backplane_common::{
    DatapathConfig, FlowKey, FlowValue, PortInfo, PortRole, Verdict,
    config::CONFIG_ENFORCE,
    flow::FAMILY_IPV4,
    maps,
    policy::{
        ADDR_KEY_HEADER_BITS, AddrKey, MODE_ENFORCE, POLICY_KEY_BITS, POLICY_KEY_PROTO_BITS, PolicyKey, PolicyValue,
    },
};
use clap::Parser;

#[path = "../../../agent/tests/common/frames.rs"]
mod frames;

#[derive(Parser)]
struct Args {
    /// Runs per timed measurement for repeated scenarios.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Distinct packets for the new-flow scenarios.
    #[arg(long, default_value_t = 20_000)]
    new_flows: u32,
    /// Measurements per scenario (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Policy counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0, 10, 1_000, 100_000])]
    policies: Vec<u32>,
    /// Flow-table fill levels to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1_000, 100_000, 1_000_000])]
    flows: Vec<u32>,
    /// Write results to benches/results (otherwise print only).
    #[arg(long)]
    write: bool,
}

fn load(flow_capacity: u32) -> anyhow::Result<Loaded> {
    datapath::load(flow_capacity, &[maps::PROG_FROM_PORT, maps::PROG_BASELINE_PASS, maps::PROG_BASELINE_LOOKUP])
}

fn run(ebpf: &mut Ebpf, prog: &str, frame: &[u8], repeat: u32) -> anyhow::Result<Duration> {
    let p: &mut Xdp = ebpf.program_mut(prog).context("program")?.try_into()?;
    let mut out = vec![0u8; frame.len() + 256];
    let r = p.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    })?;
    Ok(r.duration)
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Zone id of address 10.a.b.x: zones are /24s numbered from 1.
/// `fd00:0:<zone>::<host>`: the zone's IPv6 network is `fd00:0:<zone>::/48`.
fn zone_v6(zone: u16, host: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..2].copy_from_slice(&[0xfd, 0x00]);
    a[4..6].copy_from_slice(&zone.to_be_bytes());
    a[15] = host;
    a
}

fn zone_cidr(zone: u16) -> [u8; 4] {
    [10, (zone >> 8) as u8, (zone & 0xff) as u8, 0]
}

/// Installs `n` policies between distinct zone pairs (each allows TCP 5432 and ICMP)
/// and turns enforcement on. The measured pair (zone 1 -> zone 2) is always one of them.
fn install_policies(ebpf: &mut Ebpf, n: u32) -> anyhow::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let root = n.isqrt() + u32::from(n.isqrt() * n.isqrt() < n);
    let zones = u16::try_from(root).context("too many policies")?.max(2) + 1;
    {
        let mut cidrs: LpmTrie<&mut MapData, AddrKey, u32> =
            LpmTrie::try_from(ebpf.map_mut(maps::ZONE_CIDRS).context("map")?)?;
        for z in 1..=zones {
            let c = zone_cidr(z);
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&c);
            cidrs.insert(
                &Key::new(ADDR_KEY_HEADER_BITS + 24, AddrKey { slot: 0, family: FAMILY_IPV4, _pad: [0; 2], addr }),
                u32::from(z),
                0,
            )?;
            // The same zone in IPv6 (the established IPv6 scenario goes zone 1 -> zone 2).
            let key =
                AddrKey { slot: 0, family: backplane_common::flow::FAMILY_IPV6, _pad: [0; 2], addr: zone_v6(z, 0) };
            cidrs.insert(&Key::new(ADDR_KEY_HEADER_BITS + 48, key), u32::from(z), 0)?;
        }
    }
    let mut policies: LpmTrie<&mut MapData, PolicyKey, PolicyValue> =
        LpmTrie::try_from(ebpf.map_mut(maps::POLICIES).context("map")?)?;
    let mut id = 0u32;
    'outer: for src in 1..=zones {
        for dst in 1..=zones {
            if src == dst {
                continue;
            }
            let value = PolicyValue { policy_id: id, mode: MODE_ENFORCE, _pad: [0; 3] };
            let key = |proto: u8, port: u16| PolicyKey {
                slot: 0,
                proto,
                src_zone: src.to_be_bytes(),
                dst_zone: dst.to_be_bytes(),
                port: port.to_be_bytes(),
            };
            policies.insert(&Key::new(POLICY_KEY_BITS, key(6, 5432)), value, 0)?;
            policies.insert(&Key::new(POLICY_KEY_PROTO_BITS, key(1, 0)), value, 0)?;
            policies.insert(&Key::new(POLICY_KEY_PROTO_BITS, key(255, 0)), value, 0)?;
            id += 1;
            if id == n {
                break 'outer;
            }
        }
    }
    // BPF_PROG_TEST_RUN's port (loopback, ifindex 1) is a VM port bound to the sender
    // (MAC_A) in zone 1, as a port the host bound: every frame pays the binding's checks.
    let mut ports: HashMap<&mut MapData, u32, PortInfo> = HashMap::try_from(ebpf.map_mut(maps::PORTS).context("map")?)?;
    let bound = PortInfo {
        role: PortRole::Vm as u8,
        zone: [1, 1],
        binding: backplane_common::config::BINDING_HOST,
        mac: frames::MAC_A,
        ..PortInfo::default()
    };
    ports.insert(1, bound, 0)?;
    let mut config: Array<&mut MapData, DatapathConfig> = Array::try_from(ebpf.map_mut(maps::CONFIG).context("map")?)?;
    config.set(
        0,
        DatapathConfig {
            generation: 1,
            flags: CONFIG_ENFORCE,
            default_inter_zone: Verdict::Denied as u8,
            // As the agent sets it: the data path may keep its copy of the port's entry.
            ports_epoch: 1,
            ..Default::default()
        },
        0,
    )?;
    Ok(())
}

/// Fills the flow table with `n` established flows that the measured packets never hit.
fn prefill_flows(ebpf: &mut Ebpf, n: u32) -> anyhow::Result<()> {
    let mut flows: HashMap<&mut MapData, FlowKey, FlowValue> =
        HashMap::try_from(ebpf.map_mut(maps::FLOWS).context("map")?)?;
    let value = FlowValue {
        packets: [1, 1],
        bytes: [64, 64],
        generation: 1,
        verdict: Verdict::Allowed as u8,
        ..Default::default()
    };
    for i in 0..n {
        let mut lo = [0u8; 16];
        let b = i.to_be_bytes();
        lo[..4].copy_from_slice(&[172, 16, b[1], b[2]]);
        let mut hi = [0u8; 16];
        hi[..4].copy_from_slice(&[172, 17, 0, b[3]]);
        let key = FlowKey {
            addr_lo: lo,
            addr_hi: hi,
            port_lo: 1024 + (i % 50_000) as u16,
            port_hi: 80,
            vlan: 0,
            proto: 6,
            family: FAMILY_IPV4,
        };
        flows.insert(key, value, 0)?;
    }
    Ok(())
}

struct Row {
    policies: u32,
    flows: u32,
    scenario: &'static str,
    baseline_ns: f64,
    datapath_ns: f64,
    /// `baseline_lookup` on the same frame (repeated scenarios only).
    lookup_ns: Option<f64>,
}

#[expect(clippy::too_many_lines, reason = "the scenarios, in the order the results list them")]
fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let a = [10, 0, 1, 10];
    let b = [10, 0, 2, 20];
    let est_v4 = frames::tcp4(a, 40000, b, 5432, frames::TCP_ACK);
    let est_v6 = frames::eth(
        frames::MAC_B,
        frames::MAC_A,
        &[],
        0x86dd,
        &frames::ipv6(zone_v6(1, 10), zone_v6(2, 20), 6, &frames::tcp(40000, 5432, frames::TCP_ACK, &[])),
    );
    let denied = frames::tcp4(a, 40001, b, 9999, frames::TCP_SYN);
    let mut rows = Vec::new();
    for &n_flows in &args.flows {
        for &n_policies in &args.policies {
            let mut l = load(n_flows + 65_536)?;
            install_policies(&mut l.ebpf, n_policies)?;
            prefill_flows(&mut l.ebpf, n_flows)?;
            // Repeated scenarios: the first run creates the flow, the rest hit it.
            for (scenario, frame) in
                [("established IPv4", &est_v4), ("established IPv6", &est_v6), ("denied, cached", &denied)]
            {
                if n_policies == 0 && scenario == "denied, cached" {
                    continue;
                }
                run(&mut l.ebpf, maps::PROG_FROM_PORT, frame, 1)?;
                let mut base = Vec::new();
                let mut dp = Vec::new();
                let mut lookup = Vec::new();
                for _ in 0..args.rounds {
                    base.push(ns(run(&mut l.ebpf, maps::PROG_BASELINE_PASS, frame, args.repeat)?));
                    dp.push(ns(run(&mut l.ebpf, maps::PROG_FROM_PORT, frame, args.repeat)?));
                    lookup.push(ns(run(&mut l.ebpf, maps::PROG_BASELINE_LOOKUP, frame, args.repeat)?));
                }
                let lookup_ns = (scenario != "established IPv6").then(|| median(lookup));
                rows.push(Row {
                    policies: n_policies,
                    flows: n_flows,
                    scenario,
                    baseline_ns: median(base),
                    datapath_ns: median(dp),
                    lookup_ns,
                });
            }
            // New flows: one run per distinct packet.
            for (scenario, dport) in [("new flow, allowed", 5432u16), ("new flow, denied", 9999)] {
                if n_policies == 0 && dport == 9999 {
                    continue;
                }
                let mut base = Vec::new();
                let mut dp = Vec::new();
                for i in 0..args.new_flows {
                    let f = frames::tcp4(
                        a,
                        1024 + u16::try_from(i % 60_000).expect("below 60,000"),
                        [10, 0, 2, u8::try_from(100 + i / 60_000).context("--new-flows too large")?],
                        dport,
                        frames::TCP_SYN,
                    );
                    base.push(ns(run(&mut l.ebpf, maps::PROG_BASELINE_PASS, &f, 1)?));
                    dp.push(ns(run(&mut l.ebpf, maps::PROG_FROM_PORT, &f, 1)?));
                }
                let scenario = if n_policies == 0 { "new flow, observed" } else { scenario };
                rows.push(Row {
                    policies: n_policies,
                    flows: n_flows,
                    scenario,
                    baseline_ns: median(base),
                    datapath_ns: median(dp),
                    lookup_ns: None,
                });
            }
            eprintln!("measured {n_policies} policies, {n_flows} flows");
        }
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.flows.to_string(),
                r.policies.to_string(),
                r.scenario.to_owned(),
                format!("{:.1}", r.baseline_ns),
                r.lookup_ns.map_or_else(|| "-".into(), |l| format!("{l:.1}")),
                format!("{:.1}", r.datapath_ns),
                format!("{:.2}x", r.datapath_ns / r.baseline_ns),
            ]
        })
        .collect();
    let md_table = report::markdown_table(
        &["flows in table", "policies", "scenario", "baseline_pass ns", "baseline_lookup ns", "from_port ns", "ratio"],
        &table,
    );
    println!("{md_table}");
    // Goals: fast path at most 3x the baseline; unchanged (within 1.3x) from 10 to 100,000 policies.
    let mut summary = String::new();
    for scenario in ["established IPv4", "established IPv6"] {
        let worst =
            rows.iter().filter(|r| r.scenario == scenario).map(|r| r.datapath_ns / r.baseline_ns).fold(0.0, f64::max);
        let _ = writeln!(summary, "- {scenario}: worst ratio to baseline {worst:.2}x (goal <= 3x)");
        let lookups: Vec<f64> = rows
            .iter()
            .filter(|r| r.scenario == scenario)
            .filter_map(|r| r.lookup_ns.map(|l| l / r.baseline_ns))
            .collect();
        if let (Some(lo), Some(hi)) =
            (lookups.iter().copied().reduce(f64::min), lookups.iter().copied().reduce(f64::max))
        {
            let _ = writeln!(
                summary,
                "- {scenario}: one FLOWS lookup alone (baseline_lookup) costs {lo:.2}x-{hi:.2}x the baseline"
            );
        }
        for &f in &args.flows {
            let at = |p: u32| {
                rows.iter().find(|r| r.scenario == scenario && r.policies == p && r.flows == f).map(|r| r.datapath_ns)
            };
            if let (Some(lo), Some(hi)) = (at(10), at(100_000)) {
                let _ = writeln!(
                    summary,
                    "- {scenario}, {f} flows: 100,000 policies / 10 policies = {:.2}x (goal <= 1.3x)",
                    hi / lo
                );
            }
        }
    }
    println!("{summary}");
    if args.write {
        let dir = report::results_dir();
        std::fs::create_dir_all(&dir)?;
        let cmd = std::env::args().collect::<Vec<_>>().join(" ");
        let doc = format!(
            "# Data path cost per packet (BPF_PROG_TEST_RUN)\n\nMachine: {}\n\nCommand: `cargo xtask bench datapath` (ran `{cmd}`)\n\nMedian of {} rounds; repeated scenarios use repeat={}, new-flow scenarios one run per packet over {} packets (the baseline timed the same way).\n\n{md_table}\n{summary}",
            report::machine_line(),
            args.rounds,
            args.repeat,
            args.new_flows
        );
        std::fs::write(dir.join("datapath-cost.md"), doc)?;
        let bars: Vec<(String, f64)> = rows
            .iter()
            .filter(|r| r.flows == *args.flows.last().unwrap_or(&0))
            .map(|r| (format!("{} p, {}", r.policies, r.scenario), r.datapath_ns / r.baseline_ns))
            .collect();
        report::bar_chart(
            &dir.join("datapath-cost.svg"),
            "from_port cost / baseline_pass cost (largest flow table)",
            "ratio",
            &bars,
        )?;
    }
    Ok(())
}
