//! Zone rule sets of any size, rendered both as backplane YAML and as the nftables
//! rule set a careful administrator would write for the same zones.
//!
//! The benchmark's client VM sits in zone `web` (10.30.0.0/24) and its server in zone
//! `db` (10.40.0.0/24); the policy `web-to-db` allows what the benchmark sends (iperf3's
//! TCP port, the generator's UDP port, ICMP) and sits in the middle of the list, not
//! first. The other policies connect filler zones `zNNN` (10.100.0.0/24, 10.100.1.0/24,
//! ...) pairwise, each allowing a few TCP ports, a port range, DNS and ICMP, as a real
//! rule set would. Everything a policy does not allow is denied (`default_inter_zone:
//! deny`); traffic inside a zone is allowed.

use std::{fmt::Write as _, net::Ipv4Addr};

/// The zone pair and ports the benchmark traffic uses.
#[derive(Clone, Debug)]
pub struct BenchTraffic {
    pub client_cidr: (Ipv4Addr, u8),
    pub server_cidr: (Ipv4Addr, u8),
    /// TCP ports the client opens to the server (iperf3).
    pub tcp_ports: Vec<u16>,
    /// UDP ports the client sends to (the generator).
    pub udp_ports: Vec<u16>,
}

impl Default for BenchTraffic {
    fn default() -> Self {
        Self {
            client_cidr: (Ipv4Addr::new(10, 30, 0, 0), 24),
            server_cidr: (Ipv4Addr::new(10, 40, 0, 0), 24),
            tcp_ports: vec![5201, 5432],
            udp_ports: vec![9000],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

/// One allow entry: a protocol and inclusive port ranges (none for ICMP).
#[derive(Clone, Debug)]
pub struct Allow {
    pub proto: Proto,
    pub ports: Vec<(u16, u16)>,
}

#[derive(Clone, Debug)]
pub struct Zone {
    pub name: String,
    pub cidr: (Ipv4Addr, u8),
    /// MAC members (endpoints), if any.
    pub macs: Vec<[u8; 6]>,
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    pub from: usize,
    pub to: usize,
    pub allow: Vec<Allow>,
}

/// A generated rule set.
#[derive(Clone, Debug)]
pub struct ZoneRuleSet {
    pub zones: Vec<Zone>,
    pub policies: Vec<Policy>,
}

fn mac_string(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl ZoneRuleSet {
    /// `policies` policies (at least 1) over as few zones as hold them, one of them
    /// allowing `traffic`; `endpoints` MAC members spread evenly over the filler zones.
    #[must_use]
    pub fn generate(policies: usize, endpoints: usize, traffic: &BenchTraffic) -> Self {
        let policies = policies.max(1);
        // Zones 0 (web) and 1 (db) plus fillers, enough for `policies` ordered pairs.
        let mut n = 2usize;
        while n * (n - 1) < policies {
            n += 1;
        }
        let mut zones = vec![
            Zone { name: "web".into(), cidr: traffic.client_cidr, macs: Vec::new() },
            Zone { name: "db".into(), cidr: traffic.server_cidr, macs: Vec::new() },
        ];
        for k in 0..n - 2 {
            let k16 = u16::try_from(k).expect("fewer than 65536 zones");
            let [hi, lo] = k16.to_be_bytes();
            zones.push(Zone {
                name: format!("z{k:03}"),
                cidr: (Ipv4Addr::new(10, 100 + hi, lo, 0), 24),
                macs: Vec::new(),
            });
        }
        let fillers = zones.len() - 2;
        for e in 0..endpoints {
            let zone = if fillers == 0 { e % 2 } else { 2 + e % fillers };
            let id = u32::try_from(e).expect("fewer than 2^32 endpoints").to_be_bytes();
            zones[zone].macs.push([0x52, 0x54, id[0], id[1], id[2], id[3]]);
        }
        // Pairs in an order that mixes sources and destinations, the benchmark pair
        // (0 -> 1) moved to the middle.
        let mut pairs: Vec<(usize, usize)> =
            (0..n).flat_map(|a| (0..n).map(move |b| (a, b))).filter(|(a, b)| a != b && (*a, *b) != (0, 1)).collect();
        pairs.sort_by_key(|&(a, b)| ((a * 7919 + b * 104_729) % 1_000_003, a, b));
        pairs.truncate(policies - 1);
        pairs.insert(pairs.len() / 2, (0, 1));
        let policies = pairs
            .into_iter()
            .enumerate()
            .map(|(i, (from, to))| {
                let allow = if (from, to) == (0, 1) {
                    vec![
                        Allow { proto: Proto::Tcp, ports: traffic.tcp_ports.iter().map(|&p| (p, p)).collect() },
                        Allow { proto: Proto::Udp, ports: traffic.udp_ports.iter().map(|&p| (p, p)).collect() },
                        Allow { proto: Proto::Icmp, ports: Vec::new() },
                    ]
                } else {
                    let app = 8000 + u16::try_from(i % 1000).expect("small");
                    vec![
                        Allow { proto: Proto::Tcp, ports: vec![(22, 22), (443, 443), (app, app), (9100, 9110)] },
                        Allow { proto: Proto::Udp, ports: vec![(53, 53)] },
                        Allow { proto: Proto::Icmp, ports: Vec::new() },
                    ]
                };
                let name = if (from, to) == (0, 1) {
                    "web-to-db".to_owned()
                } else {
                    format!("p{i:05}-{}-to-{}", zones[from].name, zones[to].name)
                };
                Policy { name, from, to, allow }
            })
            .collect();
        Self { zones, policies }
    }

    /// The rule set as one backplane YAML file.
    #[must_use]
    pub fn to_yaml(&self) -> String {
        let mut y = String::from("# Generated by backplane-benches (rulegen): benchmark zones and policies.\nzones:\n");
        for z in &self.zones {
            let _ = writeln!(y, "  {}:\n    members:\n      - cidr: {}/{}", z.name, z.cidr.0, z.cidr.1);
            for m in &z.macs {
                let _ = writeln!(y, "      - mac: \"{}\"", mac_string(*m));
            }
        }
        y.push_str("policies:\n");
        for p in &self.policies {
            let _ = writeln!(
                y,
                "  - name: {}\n    from: {}\n    to: {}\n    allow:",
                p.name, self.zones[p.from].name, self.zones[p.to].name
            );
            for a in &p.allow {
                if a.ports.is_empty() {
                    let _ = writeln!(y, "      - {{ proto: {} }}", a.proto.name());
                } else {
                    let ports: Vec<String> = a
                        .ports
                        .iter()
                        .map(|&(lo, hi)| if lo == hi { lo.to_string() } else { format!("\"{lo}-{hi}\"") })
                        .collect();
                    let _ = writeln!(y, "      - {{ proto: {}, ports: [{}] }}", a.proto.name(), ports.join(", "));
                }
            }
        }
        y.push_str("default_inter_zone: deny\n");
        y
    }

    /// The same policy as an nftables rule set for bridged traffic (`br_netfilter`): table
    /// `inet <table>`, a forward chain that keeps to frames of `bridge`, accepts
    /// established and related connections through conntrack, decides new ones with
    /// one lookup in concatenated interval sets (zone CIDR . zone CIDR . protocol .
    /// port; ICMP and intra-zone by address pair), and drops the rest.
    #[must_use]
    pub fn to_nft(&self, table: &str, bridge: &str) -> String {
        let cidr = |z: usize| format!("{}/{}", self.zones[z].cidr.0, self.zones[z].cidr.1);
        let mut l4 = Vec::new();
        let mut icmp = Vec::new();
        for p in &self.policies {
            for a in &p.allow {
                match a.proto {
                    Proto::Icmp => icmp.push(format!("{} . {}", cidr(p.from), cidr(p.to))),
                    proto => {
                        for &(lo, hi) in &a.ports {
                            let ports = if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") };
                            l4.push(format!("{} . {} . {} . {ports}", cidr(p.from), cidr(p.to), proto.name()));
                        }
                    }
                }
            }
        }
        let intra: Vec<String> = (0..self.zones.len()).map(|z| format!("{} . {}", cidr(z), cidr(z))).collect();
        let elements = |v: &[String]| v.join(",\n      ");
        format!(
            "table inet {table} {{
  set allow_l4 {{
    type ipv4_addr . ipv4_addr . inet_proto . inet_service
    flags interval
    elements = {{
      {}
    }}
  }}
  set allow_icmp {{
    type ipv4_addr . ipv4_addr
    flags interval
    elements = {{
      {}
    }}
  }}
  set intra_zone {{
    type ipv4_addr . ipv4_addr
    flags interval
    elements = {{
      {}
    }}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname != \"{bridge}\" accept
    ct state established,related accept
    ct state invalid drop
    ip saddr . ip daddr . meta l4proto . th dport @allow_l4 accept
    meta l4proto icmp ip saddr . ip daddr @allow_icmp accept
    ip saddr . ip daddr @intra_zone accept
    drop
  }}
}}
",
            elements(&l4),
            elements(&icmp),
            elements(&intra)
        )
    }
}

#[cfg(test)]
mod tests {
    use backplane_common::Verdict;

    use super::*;

    #[test]
    fn sizes_and_the_benchmark_policy() {
        for (n, zones) in [(1, 2), (10, 4), (1000, 33), (10_000, 101)] {
            let set = ZoneRuleSet::generate(n, 0, &BenchTraffic::default());
            assert_eq!(set.policies.len(), n);
            assert_eq!(set.zones.len(), zones, "{n} policies");
            assert_eq!(set.policies.iter().filter(|p| p.name == "web-to-db").count(), 1);
            let mut pairs: Vec<_> = set.policies.iter().map(|p| (p.from, p.to)).collect();
            pairs.sort_unstable();
            pairs.dedup();
            assert_eq!(pairs.len(), n, "one policy per pair");
        }
    }

    #[test]
    fn the_yaml_parses_and_allows_the_benchmark() {
        let set = ZoneRuleSet::generate(50, 200, &BenchTraffic::default());
        let yaml = set.to_yaml();
        let rules = backplane_rules::parse_rules([(std::path::Path::new("bench.yaml"), yaml.as_str())])
            .unwrap_or_else(|e| panic!("{e:?}\n{yaml}"));
        let view = |dport: u16, proto: u8| backplane_rules::PacketView {
            src_mac: backplane_rules::MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: backplane_rules::MacAddr([2, 0, 0, 0, 0, 2]),
            src_ip: "10.30.0.10".parse().unwrap(),
            dst_ip: "10.40.0.10".parse().unwrap(),
            proto,
            dport,
            src_interface: None,
            dst_interface: None,
            src_port: None,
            dst_port: None,
        };
        assert_eq!(backplane_rules::evaluate(&rules, &view(5201, 6)).verdict, Verdict::Allowed);
        assert_eq!(backplane_rules::evaluate(&rules, &view(9000, 17)).verdict, Verdict::Allowed);
        assert_eq!(backplane_rules::evaluate(&rules, &view(9001, 17)).verdict, Verdict::Denied);
    }
}
