//! Small-packet generator and receiver (see `backplane_benches::pktgen`).
//!
//! ```text
//! pktgen send --netns NS --src-mac M --dst-mac M --src-ip A --dst-ip A [--port 9000] [--flows 1] [--seconds 5]
//! pktgen recv --netns NS [--port 9000] [--seconds 5]
//! pktgen ceiling [--seconds 5] [--flows 1]     # own lab; prints the generator's ceiling
//! ```
//! `send` and `recv` print one line per second; the throughput benchmark drives the same
//! code in-process.

#![expect(clippy::cast_precision_loss, reason = "packet counts far below 2^52 become rates")]

use std::{
    net::Ipv4Addr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use backplane_benches::{
    isolation,
    pktgen::{self, NetnsThread, RecvCounters, SendCounters, SendSpec},
};
use backplane_lab::{Lab, PortKind};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send UDP frames from a namespace's interface.
    Send {
        /// Network namespace (`ip netns` name) to send from; default: this one.
        #[arg(long)]
        netns: Option<String>,
        #[arg(long, default_value = "eth0")]
        ifname: String,
        #[arg(long, value_parser = parse_mac)]
        src_mac: [u8; 6],
        #[arg(long, value_parser = parse_mac)]
        dst_mac: [u8; 6],
        #[arg(long)]
        src_ip: Ipv4Addr,
        #[arg(long)]
        dst_ip: Ipv4Addr,
        #[arg(long, default_value_t = 9000)]
        port: u16,
        /// Distinct flows (source address/port pairs), round-robin.
        #[arg(long, default_value_t = 1)]
        flows: u32,
        #[arg(long, default_value_t = pktgen::DEFAULT_BATCH)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Count UDP datagrams arriving on a port.
    Recv {
        #[arg(long)]
        netns: Option<String>,
        #[arg(long, default_value_t = 9000)]
        port: u16,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Measure the generator's ceiling: send into a veth and a tap port that are in no bridge.
    Ceiling {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 1)]
        flows: u32,
    },
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = parts.next().and_then(|p| u8::from_str_radix(p, 16).ok()).ok_or_else(|| format!("bad MAC {s:?}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("bad MAC {s:?}"));
    }
    Ok(mac)
}

fn every_second(seconds: u64, mut f: impl FnMut(f64)) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last = start;
    while start.elapsed() < Duration::from_secs(seconds) {
        isolation::sleep(Duration::from_secs(1))?;
        let now = Instant::now();
        f((now - last).as_secs_f64());
        last = now;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    isolation::install_interrupt_handler();
    match Cli::parse().command {
        Command::Send { netns, ifname, src_mac, dst_mac, src_ip, dst_ip, port, flows, batch, seconds } => {
            let spec = SendSpec {
                ifname,
                src_mac,
                dst_mac,
                src_ip,
                dst_ip,
                dst_port: port,
                flows,
                first_flow: 0,
                batch,
                max_frames: None,
            };
            let counters = Arc::new(SendCounters::default());
            let c = Arc::clone(&counters);
            let sender = NetnsThread::spawn("send", netns.as_deref(), move |stop| pktgen::send(&spec, &c, stop));
            let mut prev = 0;
            let printed = every_second(seconds, |secs| {
                let now = counters.sent.load(Ordering::Relaxed);
                println!(
                    "sent {:.0} frames/s (refused so far {})",
                    (now - prev) as f64 / secs,
                    counters.refused.load(Ordering::Relaxed)
                );
                prev = now;
            });
            let (sent, refused) = sender.stop()?;
            println!("total: sent {sent}, refused {refused}");
            printed
        }
        Command::Recv { netns, port, seconds } => {
            let counters = Arc::new(RecvCounters::default());
            let c = Arc::clone(&counters);
            let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let r = Arc::clone(&ready);
            let receiver =
                NetnsThread::spawn("recv", netns.as_deref(), move |stop| pktgen::receive(port, &c, stop, &r));
            let mut prev = 0;
            let printed = every_second(seconds, |secs| {
                let now = counters.received.load(Ordering::Relaxed);
                println!("received {:.0} datagrams/s", (now - prev) as f64 / secs);
                prev = now;
            });
            println!("total: received {}", receiver.stop()?);
            printed
        }
        Command::Ceiling { seconds, flows } => {
            isolation::enter_private_netns()?;
            let lab = Lab::new("bp");
            for kind in [PortKind::Veth, PortKind::Tap] {
                let rates = pktgen::ceiling(&lab, kind, flows, Duration::from_secs(1), Duration::from_secs(seconds))
                    .context("ceiling")?;
                println!(
                    "{kind:?}: {:.0} frames/s accepted by the VM's eth0 ({:.0} refused/s), {:.0} frames/s received by the host port",
                    rates.sent_pps, rates.refused_pps, rates.probe_pps
                );
            }
            Ok(())
        }
    }
}
