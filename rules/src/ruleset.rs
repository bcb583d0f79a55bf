//! The validated, typed rule set: what the YAML files say, with the place each item
//! came from.

use std::{fmt, net::IpAddr};

use globset::GlobMatcher;

use crate::{
    inventory::{Endpoint, UnknownMacs, VirtualPatch, ZoneEndpoints},
    types::{Cidr, MacAddr, PortRange, Proto, SourcePos},
};

/// Name of the built-in zone of addresses outside every zone.
pub const WORLD: &str = "world";

/// A whole rule set: every `*.yaml` file of a directory, merged and validated.
///
/// Order matters and is stable: files are read in the byte order of their names, and
/// zones and policies keep the order in which they are written. A policy's id is its
/// index in [`RuleSet::policies`].
#[derive(Clone, Debug)]
pub struct RuleSet {
    /// The zones written in the files, in order. `world` is here only when the files
    /// give it an `intra_zone` setting; it never has members.
    pub zones: Vec<Zone>,
    pub policies: Vec<Policy>,
    /// What happens to traffic between two zones that no policy covers.
    pub default_inter_zone: Access,
    /// Where `default_inter_zone` was set, if it was.
    pub default_inter_zone_at: Option<SourcePos>,
    /// The endpoint inventory (`endpoints:`), in written order.
    pub endpoints: Vec<Endpoint>,
    /// `virtual_patches:`, in written order; a patch's id is its index here.
    pub virtual_patches: Vec<VirtualPatch>,
    /// What a VM port nobody bound gets (`unbound_ports:`).
    pub unbound_ports: UnboundPorts,
    /// `infrastructure:`: gateways, DHCP and DNS servers behind the uplink, whose MACs and
    /// addresses no VM port may send from or claim.
    pub infrastructure: Vec<Infrastructure>,
}

/// One `infrastructure:` entry.
#[derive(Clone, Debug)]
pub struct Infrastructure {
    pub name: String,
    pub mac: Option<crate::MacAddr>,
    pub ips: Vec<std::net::IpAddr>,
    pub location: SourcePos,
}

/// A zone's `binding:` setting: who may say that a VM port's endpoint is in the zone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Binding {
    /// Trust on first use: an unbound VM port is locked to the first source MAC it sends
    /// and, for a MAC outside the inventory, to the zone of the first address it sends
    /// from inside this zone's networks (as a switch's port security learns). What that
    /// trusts: the first frames of a port decide its identity, so a guest that sends
    /// before the VM meant to be there (or a VM that boots with another's MAC while that
    /// one is not running here) takes that identity. The default, so that rule sets
    /// written before bindings existed keep working.
    #[default]
    Learn,
    /// Only the host binds (`backplane endpoint bind`, the libvirt hook): an unbound port
    /// never becomes this zone's.
    Host,
}

impl Binding {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Learn => "learn",
            Self::Host => "host",
        }
    }
}

/// The rule set's `unbound_ports:` setting: what a VM port gets while nobody bound it
/// and it cannot learn an identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum UnboundPorts {
    /// Judged as a quarantined endpoint: it reaches only remediation zones.
    #[default]
    Quarantine,
    /// Everything from and to it is dropped.
    Deny,
    /// Judged by the addresses its frames carry, as before bindings: a guest there picks
    /// its own zone. For watching a rule set before bindings exist.
    Observe,
}

impl UnboundPorts {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quarantine => "quarantine",
            Self::Deny => "deny",
            Self::Observe => "observe",
        }
    }
}

impl RuleSet {
    /// The zone of this name, if the files define it.
    #[must_use]
    pub fn zone(&self, name: &str) -> Option<&Zone> {
        self.zones.iter().find(|z| z.name == name)
    }

    /// The `intra_zone` setting of a zone (`allow` for `world` unless the files say
    /// otherwise, and for zones without the setting).
    #[must_use]
    pub fn intra_zone(&self, name: &str) -> Access {
        self.zone(name).map_or(Access::Allow, |z| z.intra_zone)
    }

    /// Names of all zones, `world` included, in rule-set order (`world` first).
    pub fn zone_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(WORLD).chain(self.zones.iter().map(|z| z.name.as_str()).filter(|n| *n != WORLD))
    }

    /// The inventory endpoint with this MAC.
    #[must_use]
    pub fn endpoint_by_mac(&self, mac: MacAddr) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.mac == mac)
    }

    /// The inventory endpoint of this name.
    #[must_use]
    pub fn endpoint(&self, name: &str) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// The zone of an endpoint: the one the inventory names; else the zone of a `mac`
    /// member with its MAC; else the zone of the longest `cidr` member holding one of its
    /// addresses (the first address that has one). `None`: the endpoint takes the zone
    /// of the port it is behind, or `world`.
    #[must_use]
    pub fn endpoint_zone<'a>(&'a self, endpoint: &'a Endpoint) -> Option<&'a str> {
        self.zone_for(endpoint.zone.as_deref(), endpoint.mac, &endpoint.ips)
    }

    /// [`RuleSet::endpoint_zone`] for an endpoint given by its parts (runtime endpoints).
    #[must_use]
    pub fn zone_for<'a>(&'a self, zone: Option<&'a str>, mac: MacAddr, ips: &[IpAddr]) -> Option<&'a str> {
        if zone.is_some() {
            return zone;
        }
        let members = || self.zones.iter().flat_map(|z| z.members.iter().map(move |m| (z, m)));
        if let Some((z, _)) = members().find(|(_, m)| matches!(&m.matcher, MemberMatch::Mac(x) if *x == mac)) {
            return Some(&z.name);
        }
        ips.iter().find_map(|ip| {
            members()
                .filter_map(|(z, m)| match &m.matcher {
                    MemberMatch::Cidr(c) if c.contains(*ip) => Some((z, c.prefix_len())),
                    _ => None,
                })
                .fold(None, |best: Option<(&Zone, u8)>, cur| match best {
                    Some(b) if b.1 >= cur.1 => Some(b),
                    _ => Some(cur),
                })
                .map(|(z, _)| z.name.as_str())
        })
    }

    /// Whether any inventory endpoint is in this zone.
    #[must_use]
    pub fn has_inventory(&self, zone: &str) -> bool {
        self.endpoints.iter().any(|e| self.endpoint_zone(e) == Some(zone))
    }

    /// What happens to a MAC outside the inventory that appears on a port of this zone:
    /// the zone's `unknown_macs`, else `quarantine` for a zone with inventory endpoints
    /// and `allow` for any other.
    #[must_use]
    pub fn unknown_macs(&self, zone: &str) -> UnknownMacs {
        match self.zone(zone).and_then(|z| z.endpoints.unknown_macs) {
            Some(setting) => setting,
            None if self.has_inventory(zone) => UnknownMacs::Quarantine,
            None => UnknownMacs::Allow,
        }
    }

    /// The ids (indexes in [`RuleSet::virtual_patches`]) of the patches of these tags.
    pub fn patches_for<'a>(&'a self, tags: &'a [String]) -> impl Iterator<Item = (u32, &'a VirtualPatch)> + 'a {
        self.virtual_patches
            .iter()
            .enumerate()
            .filter(|(_, p)| tags.contains(&p.tag))
            .map(|(i, p)| (u32::try_from(i).expect("fewer than 2^32 patches"), p))
    }
}

#[derive(Clone, Debug)]
pub struct Zone {
    pub name: String,
    pub members: Vec<Member>,
    pub intra_zone: Access,
    pub location: SourcePos,
    /// Patch age, remediation, placement, neighbours and unknown MACs.
    pub endpoints: ZoneEndpoints,
    /// What the zone gets when the rules cannot be loaded at start and nothing is in
    /// force (see [`RuleSet::failure_rules`]).
    pub on_rules_failure: crate::OnRulesFailure,
    /// Who may bind a VM port into the zone.
    pub binding: Binding,
}

/// One `members:` entry: something that puts an end of a flow into a zone.
#[derive(Clone, Debug)]
pub struct Member {
    pub matcher: MemberMatch,
    pub location: SourcePos,
}

#[derive(Clone, Debug)]
pub enum MemberMatch {
    /// The endpoint with this MAC address (the strongest match).
    Mac(MacAddr),
    /// Addresses in this network.
    Cidr(Cidr),
    /// Endpoints behind a switch port whose name matches this glob.
    Interface(InterfaceGlob),
}

impl fmt::Display for MemberMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mac(m) => write!(f, "mac {m}"),
            Self::Cidr(c) => write!(f, "cidr {c}"),
            Self::Interface(g) => write!(f, "interface \"{}\"", g.pattern()),
        }
    }
}

/// A glob on switch port names (`*`, `?`, `[...]`, `{a,b}`).
#[derive(Clone, Debug)]
pub struct InterfaceGlob {
    pattern: String,
    matcher: GlobMatcher,
}

impl InterfaceGlob {
    pub(crate) fn new(pattern: &str) -> Result<Self, String> {
        let glob =
            globset::GlobBuilder::new(pattern).literal_separator(false).build().map_err(|e| e.kind().to_string())?;
        Ok(Self { pattern: pattern.to_owned(), matcher: glob.compile_matcher() })
    }

    #[must_use]
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    #[must_use]
    pub fn matches(&self, ifname: &str) -> bool {
        self.matcher.is_match(ifname)
    }
}

/// `allow` or `deny`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Access {
    #[default]
    Allow,
    Deny,
}

impl Access {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// A policy's mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Traffic of the pair that no allow entry matches is denied.
    #[default]
    Enforce,
    /// Such traffic passes, with the verdict `audit`.
    Audit,
}

impl Mode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

/// A policy: the traffic it allows from one zone to another.
#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    pub from: String,
    pub to: String,
    pub allow: Vec<AllowEntry>,
    pub mode: Mode,
    pub location: SourcePos,
}

/// One entry of a policy's `allow` list.
#[derive(Clone, Debug)]
pub struct AllowEntry {
    pub proto: Proto,
    /// Destination port ranges; empty means every port (and, for protocols without
    /// ports, every packet of the protocol).
    pub ports: Vec<PortRange>,
    pub location: SourcePos,
}

impl AllowEntry {
    /// Whether this entry allows a flow of `proto` to destination port `dport`.
    #[must_use]
    pub fn matches(&self, proto: u8, dport: u16) -> bool {
        self.proto.number() == proto && (self.ports.is_empty() || self.ports.iter().any(|r| r.contains(dport)))
    }
}
