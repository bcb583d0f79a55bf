//! The value types of rule files: where an item was written ([`SourcePos`], a file, line
//! and column), protocols, port ranges, MAC addresses and networks. Each parses from the
//! text a rule file holds and says why when it cannot.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    str::FromStr,
    sync::Arc,
};

use crate::RuleError;

/// Where an item of a rule set was written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourcePos {
    pub file: Arc<Path>,
    pub line: usize,
    pub column: usize,
}

impl SourcePos {
    /// An error at this place.
    #[must_use]
    pub fn error(&self, message: impl Into<String>) -> RuleError {
        RuleError::new(self.file.to_path_buf(), self.line, self.column, message)
    }
}

impl fmt::Display for SourcePos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// An IP protocol number, 0-254 (255 is reserved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Proto(u8);

impl Proto {
    pub const ICMP: Self = Self(1);
    pub const TCP: Self = Self(6);
    pub const UDP: Self = Self(17);
    pub const ICMPV6: Self = Self(58);
    pub const SCTP: Self = Self(132);

    /// The protocol of this number; `None` for the reserved 255.
    #[must_use]
    pub fn new(number: u8) -> Option<Self> {
        (number != u8::MAX).then_some(Self(number))
    }

    #[must_use]
    pub fn number(self) -> u8 {
        self.0
    }

    /// Whether rules may name destination ports for this protocol.
    #[must_use]
    pub fn has_ports(self) -> bool {
        matches!(self, Self::TCP | Self::UDP | Self::SCTP)
    }

    /// The name used in rule files, when it has one.
    #[must_use]
    pub fn name(self) -> Option<&'static str> {
        match self {
            Self::ICMP => Some("icmp"),
            Self::TCP => Some("tcp"),
            Self::UDP => Some("udp"),
            Self::ICMPV6 => Some("icmpv6"),
            Self::SCTP => Some("sctp"),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "{}", self.0),
        }
    }
}

impl FromStr for Proto {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let expected = "expected tcp, udp, icmp, icmpv6, sctp or a protocol number 0-254";
        match s {
            "tcp" => Ok(Self::TCP),
            "udp" => Ok(Self::UDP),
            "icmp" => Ok(Self::ICMP),
            "icmpv6" => Ok(Self::ICMPV6),
            "sctp" => Ok(Self::SCTP),
            _ if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => match s.parse::<u32>() {
                Ok(n) if n < 255 => Ok(Self(u8::try_from(n).expect("below 255"))),
                Ok(255) => Err("protocol 255 is reserved; expected a protocol number 0-254".into()),
                _ => Err(format!("protocol number {s} is out of range; {expected}")),
            },
            _ => Err(format!("unknown protocol \"{s}\"; {expected}")),
        }
    }
}

/// An inclusive range of destination ports, `first <= last`, both at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    #[must_use]
    pub fn contains(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}-{}", self.first, self.last) }
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `"80"` or `"6000-6010"`.
    fn from_str(s: &str) -> Result<Self, String> {
        fn port(s: &str) -> Result<u16, String> {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("\"{s}\" is not a port number; expected a number 1-65535 or a range \"a-b\""));
            }
            match s.parse::<u64>() {
                Ok(0) => Err("port 0 is not a valid destination port; expected 1-65535".into()),
                Ok(n) => u16::try_from(n).map_err(|_| format!("port {s} is out of range; expected 1-65535")),
                Err(_) => Err(format!("port {s} is out of range; expected 1-65535")),
            }
        }
        let (first, last) = if let Some((a, b)) = s.split_once('-') {
            (port(a)?, port(b)?)
        } else {
            let p = port(s)?;
            (p, p)
        };
        if first > last {
            return Err(format!("port range {first}-{last} is backwards; write {last}-{first}"));
        }
        Ok(Self { first, last })
    }
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for MacAddr {
    type Err = String;

    /// Six pairs of hex digits separated by `:` or `-`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("\"{s}\" is not a MAC address; expected six hex pairs like 52:54:00:12:34:56");
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut mac = [0u8; 6];
        let mut parts = s.split(sep);
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(mac))
    }
}

/// A network: an address whose host bits are zero, and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// The network, or why not (host bits set, prefix too long).
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, String> {
        let max = max_prefix(addr);
        if prefix_len > max {
            return Err(format!("prefix length /{prefix_len} is longer than the {max} bits of the address"));
        }
        let network = mask(addr, prefix_len);
        if network != addr {
            return Err(format!("{addr}/{prefix_len} has host bits set; did you mean {network}/{prefix_len}?"));
        }
        Ok(Self { addr, prefix_len })
    }

    #[must_use]
    pub fn addr(self) -> IpAddr {
        self.addr
    }

    #[must_use]
    pub fn prefix_len(self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is in this network (never across families).
    #[must_use]
    pub fn contains(self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }

    /// Whether the two networks share an address (one then holds the other).
    #[must_use]
    pub fn overlaps(self, other: Self) -> bool {
        if self.prefix_len <= other.prefix_len { self.contains(other.addr) } else { other.contains(self.addr) }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `10.30.0.0/24`, `fd00::/64`, or a bare address (a /32 or /128).
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("\"{s}\" is not a CIDR; expected an IPv4 or IPv6 network like 10.30.0.0/24 or fd00:30::/64")
        })?;
        let prefix_len = match len {
            None => max_prefix(addr),
            Some(l) => l.parse::<u8>().ok().filter(|n| *n <= max_prefix(addr)).ok_or_else(|| {
                format!("\"{l}\" is not a prefix length of an {} address (0-{})", family_name(addr), max_prefix(addr))
            })?,
        };
        Self::new(addr, prefix_len)
    }
}

fn family_name(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix_len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        assert_eq!("10.30.0.0/24".parse::<Cidr>().unwrap().to_string(), "10.30.0.0/24");
        assert_eq!("10.30.0.7".parse::<Cidr>().unwrap().to_string(), "10.30.0.7/32");
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix_len(), 0);
        assert_eq!("fd00:30::/64".parse::<Cidr>().unwrap().to_string(), "fd00:30::/64");
        let e = "10.30.0.1/24".parse::<Cidr>().unwrap_err();
        assert!(e.contains("host bits set") && e.contains("10.30.0.0/24"), "{e}");
        assert!("10.30.0.0/33".parse::<Cidr>().is_err());
        assert!("10.30.0/24".parse::<Cidr>().is_err());
    }

    #[test]
    fn cidr_overlap() {
        let a: Cidr = "10.30.0.0/16".parse().unwrap();
        let b: Cidr = "10.30.5.0/24".parse().unwrap();
        let c: Cidr = "10.31.0.0/24".parse().unwrap();
        let v6: Cidr = "::/0".parse().unwrap();
        assert!(a.overlaps(b) && b.overlaps(a));
        assert!(!a.overlaps(c) && !c.overlaps(a));
        assert!(!v6.overlaps(a));
        assert!(a.contains("10.30.255.1".parse().unwrap()));
        assert!(!a.contains("::1".parse().unwrap()));
    }

    #[test]
    fn mac_parsing() {
        assert_eq!("52:54:00:10:00:01".parse::<MacAddr>().unwrap().0, [0x52, 0x54, 0, 0x10, 0, 1]);
        assert_eq!("52-54-00-10-00-0A".parse::<MacAddr>().unwrap().to_string(), "52:54:00:10:00:0a");
        for bad in ["52:54:00:10:00", "52:54:00:10:00:01:02", "5:54:00:10:00:01", "zz:54:00:10:00:01", ""] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn port_ranges() {
        assert_eq!("80".parse::<PortRange>().unwrap(), PortRange { first: 80, last: 80 });
        assert_eq!("6000-6010".parse::<PortRange>().unwrap(), PortRange { first: 6000, last: 6010 });
        assert!("6010-6000".parse::<PortRange>().unwrap_err().contains("backwards"));
        assert!("0".parse::<PortRange>().unwrap_err().contains("port 0"));
        assert!("65536".parse::<PortRange>().unwrap_err().contains("out of range"));
        assert!("http".parse::<PortRange>().is_err());
    }

    #[test]
    fn protocols() {
        assert_eq!("tcp".parse::<Proto>().unwrap(), Proto::TCP);
        assert_eq!("47".parse::<Proto>().unwrap().number(), 47);
        assert!("255".parse::<Proto>().is_err());
        assert!("256".parse::<Proto>().is_err());
        assert!("TCP".parse::<Proto>().is_err());
        assert!(Proto::new(6).unwrap().has_ports());
        assert!(!Proto::ICMP.has_ports());
    }
}
