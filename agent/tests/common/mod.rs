//! Shared by the integration tests.
#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod agent;
pub mod datapath;
pub mod frames;
pub mod hostile;
pub mod scapy;
pub mod traffic;

/// The data path links the kernel has on host port `port`, by kind: `xdp`, `tc-ingress`,
/// `tc-egress` (empty once the port is gone). Asked of the kernel, not of the agent.
pub fn links_on(port: &str) -> Vec<&'static str> {
    use backplane::datapath::pins::{ATTACH_TCX_INGRESS, LINK_TYPE_TCX, LINK_TYPE_XDP, links_on};
    let Ok(text) = std::fs::read_to_string(format!("/sys/class/net/{port}/ifindex")) else { return Vec::new() };
    let ifindex: u32 = text.trim().parse().expect("an ifindex");
    let mut kinds: Vec<&'static str> = links_on(ifindex)
        .expect("list the machine's BPF links")
        .into_iter()
        .map(|l| match (l.link_type, l.attach_type) {
            (LINK_TYPE_XDP, _) => "xdp",
            (LINK_TYPE_TCX, ATTACH_TCX_INGRESS) => "tc-ingress",
            (LINK_TYPE_TCX, _) => "tc-egress",
            _ => "other",
        })
        .collect();
    kinds.sort_unstable();
    kinds
}
