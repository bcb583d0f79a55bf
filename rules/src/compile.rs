//! The compiler: a [`RuleSet`] to the entries of the kernel's rule tables.
//!
//! The entries carry no rule-table half (`slot`): the agent writes them into the half
//! not in force and then flips `DatapathConfig::active_slot`. Each entry type has a
//! `key(slot)` helper that builds the kernel key.

use std::{
    collections::{BTreeMap, HashSet, btree_map::Entry},
    net::IpAddr,
};

use backplane_common::{
    Verdict,
    flow::{FAMILY_IPV4, FAMILY_IPV6},
    policy::{
        ADDR_KEY_HEADER_BITS, AddrKey, ENDPOINT_PATCHED, EndpointKey, EndpointValue, MODE_AUDIT, MODE_ENFORCE,
        POLICY_ID_DEFAULT_INTER_ZONE, POLICY_ID_INTRA_ZONE, POLICY_ID_NONE, POLICY_KEY_BITS, POLICY_KEY_PROTO_BITS,
        PolicyKey, PolicyValue, VPATCH_KEY_PROTO_BITS, VpatchKey, VpatchValue, ZONE_HAS_CIDRS, ZONE_LEARN,
        ZONE_REMEDIATION, ZONE_WORLD, ZoneKey, ZoneValue,
    },
};
use globset::{GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::{
    ruleset::{Access, Binding, MemberMatch, Mode, RuleSet, UnboundPorts, WORLD},
    types::MacAddr,
};

pub use backplane_common::policy::PAIR_MARKER_PROTO;

/// Zone names to the 16-bit ids the kernel tables use, `world` = 0.
///
/// Ids are stable across reloads: the agent keeps the `ZoneIds` of the rule set in
/// force and compiles the next one against it, so a zone keeps its id (and flow
/// records and counters keyed by it keep their meaning) as long as the agent runs.
/// Serializes as a map of name to id, for an agent that keeps it across restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, u16>", into = "BTreeMap<String, u16>")]
pub struct ZoneIds {
    by_name: BTreeMap<String, u16>,
    by_id: BTreeMap<u16, String>,
}

impl Default for ZoneIds {
    fn default() -> Self {
        Self::new()
    }
}

impl ZoneIds {
    /// Only `world`, id 0.
    #[must_use]
    pub fn new() -> Self {
        let mut ids = Self { by_name: BTreeMap::new(), by_id: BTreeMap::new() };
        ids.insert(WORLD.to_owned(), ZONE_WORLD);
        ids
    }

    fn insert(&mut self, name: String, id: u16) {
        self.by_id.insert(id, name.clone());
        self.by_name.insert(name, id);
    }

    #[must_use]
    pub fn id(&self, name: &str) -> Option<u16> {
        self.by_name.get(name).copied()
    }

    #[must_use]
    pub fn name(&self, id: u16) -> Option<&str> {
        self.by_id.get(&id).map(String::as_str)
    }

    /// (name, id) in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u16)> {
        self.by_name.iter().map(|(n, i)| (n.as_str(), *i))
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// These ids plus new ones for the zones of `rules` that have none. A new zone
    /// takes the lowest free id; only when all 65535 are taken are the names that
    /// `rules` no longer uses forgotten.
    #[must_use]
    pub fn extended_for(&self, rules: &RuleSet) -> Self {
        let mut ids = self.clone();
        let names: Vec<&str> = rules.zone_names().collect();
        let missing = names.iter().filter(|n| ids.id(n).is_none()).count();
        if ids.len() + missing > usize::from(u16::MAX) + 1 {
            let used: HashSet<&str> = names.iter().copied().collect();
            ids.by_name.retain(|n, _| used.contains(n.as_str()));
            ids.by_id.retain(|_, n| used.contains(n.as_str()));
        }
        let mut next = 1u16;
        for name in names {
            if ids.id(name).is_some() {
                continue;
            }
            while ids.by_id.contains_key(&next) {
                next += 1;
            }
            ids.insert(name.to_owned(), next);
        }
        ids
    }
}

impl TryFrom<BTreeMap<String, u16>> for ZoneIds {
    type Error = String;

    fn try_from(map: BTreeMap<String, u16>) -> Result<Self, String> {
        let mut ids = Self::new();
        for (name, id) in map {
            if (name == WORLD) != (id == ZONE_WORLD) {
                return Err(format!("zone id 0 is world's alone, not {name}'s"));
            }
            if let Some(other) = ids.name(id).filter(|o| *o != name) {
                return Err(format!("zones {other} and {name} share the id {id}"));
            }
            ids.insert(name, id);
        }
        Ok(ids)
    }
}

impl From<ZoneIds> for BTreeMap<String, u16> {
    fn from(ids: ZoneIds) -> Self {
        ids.by_name
    }
}

/// An `ENDPOINTS` entry: a MAC member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    pub mac: MacAddr,
    /// The zone, no flags yet; `endpoint_id` is the entry's 1-based index in
    /// [`CompiledRules::endpoints`].
    pub value: EndpointValue,
}

impl EndpointEntry {
    #[must_use]
    pub fn key(&self, slot: u8) -> EndpointKey {
        EndpointKey { slot, _pad: 0, mac: self.mac.0 }
    }
}

/// A `ZONE_CIDRS` entry: a CIDR member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrEntry {
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
    /// The network; an IPv4 address fills the first 4 bytes.
    pub addr: [u8; 16],
    /// Prefix length of the address alone (0-32 or 0-128).
    pub prefix_len: u8,
    pub zone: u32,
}

impl CidrEntry {
    /// The LPM trie key and its prefix length in bits (header included).
    #[must_use]
    pub fn key(&self, slot: u8) -> (u32, AddrKey) {
        (
            ADDR_KEY_HEADER_BITS + u32::from(self.prefix_len),
            AddrKey { slot, family: self.family, _pad: [0; 2], addr: self.addr },
        )
    }
}

/// An interface member: ports whose name matches `glob` are in `zone`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceEntry {
    pub glob: String,
    pub zone: u16,
}

/// A `ZONES` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneEntry {
    pub zone: u16,
    pub value: ZoneValue,
}

impl ZoneEntry {
    #[must_use]
    pub fn key(&self, slot: u8) -> ZoneKey {
        ZoneKey { slot, _pad: 0, zone: self.zone }
    }
}

/// A `POLICIES` entry: an allowed (protocol, zone pair, port prefix), or a pair marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyEntry {
    pub proto: u8,
    pub src_zone: u16,
    pub dst_zone: u16,
    /// First port of the prefix (its low bits are zero).
    pub port: u16,
    /// LPM prefix length of the whole key: `POLICY_KEY_PROTO_BITS` (48) for every port,
    /// up to `POLICY_KEY_BITS` (64) for one port.
    pub prefix_len: u32,
    pub value: PolicyValue,
}

impl PolicyEntry {
    /// The LPM trie key and its prefix length in bits.
    #[must_use]
    pub fn key(&self, slot: u8) -> (u32, PolicyKey) {
        (
            self.prefix_len,
            PolicyKey {
                slot,
                proto: self.proto,
                src_zone: self.src_zone.to_be_bytes(),
                dst_zone: self.dst_zone.to_be_bytes(),
                port: self.port.to_be_bytes(),
            },
        )
    }

    /// The inclusive port range this entry covers.
    #[must_use]
    pub fn ports(&self) -> (u16, u16) {
        let host_bits = POLICY_KEY_BITS - self.prefix_len;
        let last = u32::from(self.port) | ((1u32 << host_bits) - 1);
        (self.port, u16::try_from(last).expect("prefix within the port"))
    }
}

/// A `VPATCHES` entry: traffic of one protocol (and port prefix) denied to and from one
/// endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VpatchEntry {
    pub endpoint_id: u32,
    pub proto: u8,
    /// First port of the prefix (its low bits are zero).
    pub port: u16,
    /// LPM prefix length of the whole key: `VPATCH_KEY_PROTO_BITS` (64) for every port,
    /// up to `VPATCH_KEY_BITS` (80) for one port.
    pub prefix_len: u32,
    /// The patch's index in `RuleSet::virtual_patches`.
    pub patch_id: u32,
}

impl VpatchEntry {
    /// The LPM trie key and its prefix length in bits.
    #[must_use]
    pub fn key(&self, slot: u8) -> (u32, VpatchKey) {
        (
            self.prefix_len,
            VpatchKey {
                slot,
                proto: self.proto,
                _pad: [0; 2],
                endpoint_id: self.endpoint_id.to_be_bytes(),
                port: self.port.to_be_bytes(),
            },
        )
    }

    #[must_use]
    pub fn value(&self) -> VpatchValue {
        VpatchValue { patch_id: self.patch_id, _pad: [0; 4] }
    }
}

/// A virtual patch, compiled: its tag and the (protocol, port, port prefix bits) it
/// denies, for any endpoint id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPatch {
    pub name: String,
    pub tag: String,
    pub denies: Vec<(u8, u16, u8)>,
}

/// A rule set as kernel table entries, slot-free.
#[derive(Clone, Debug)]
pub struct CompiledRules {
    /// The ids used here: the ones given to [`compile`] plus any new zone's. Keep these
    /// for the next compile once the tables are written.
    pub zone_ids: ZoneIds,
    pub endpoints: Vec<EndpointEntry>,
    pub cidrs: Vec<CidrEntry>,
    /// Interface members in rule-set order; see [`CompiledRules::zone_for_interface`].
    pub interfaces: Vec<InterfaceEntry>,
    interface_globs: GlobSet,
    /// Every zone of the rule set (`world` only if the files set its `intra_zone`).
    pub zones: Vec<ZoneEntry>,
    /// Allowed traffic, port ranges split into aligned prefixes; no two entries overlap.
    pub policies: Vec<PolicyEntry>,
    /// One entry per zone pair covered by a policy: protocol [`PAIR_MARKER_PROTO`],
    /// port 0, prefix length 48.
    pub pair_markers: Vec<PolicyEntry>,
    /// `DatapathConfig::default_inter_zone`: a `Verdict` as u8.
    pub default_inter_zone: u8,
    /// `DatapathConfig::unbound_ports`: an `UNBOUND_*` value.
    pub unbound_ports: u8,
    /// Some zone learns bindings on first use (`CONFIG_LEARN`).
    pub learn: bool,
    /// MACs of `infrastructure:`: `ENDPOINTS` entries owned by no port of this node
    /// ([`OWNER_INFRA`](backplane_common::policy::OWNER_INFRA)), so that no VM port sends
    /// from them or locks itself to them.
    /// Each with the zone its first address's networks give it (else `world`), as a
    /// frame from it is judged.
    pub infrastructure_macs: Vec<(MacAddr, u16)>,
    /// `world` learns too (`CONFIG_LEARN_WORLD`): a port whose first address is in no
    /// zone's networks is locked into `world` (unless `world` says `binding: host`).
    pub learn_world: bool,
    /// Policy names by policy id.
    pub policy_names: Vec<String>,
    /// Virtual patches by patch id.
    pub patches: Vec<CompiledPatch>,
    /// `VPATCHES` entries of the inventory's endpoints (by their tags).
    pub vpatches: Vec<VpatchEntry>,
}

impl CompiledRules {
    /// The zone of a switch port by its name: the first interface member (in rule-set
    /// order) whose glob matches, or `None` (the data path's 0).
    #[must_use]
    pub fn zone_for_interface(&self, ifname: &str) -> Option<u16> {
        self.interface_globs.matches(ifname).into_iter().min().map(|i| self.interfaces[i].zone)
    }

    /// The `ENDPOINTS` entry of a MAC (a `mac` member or an inventory endpoint).
    #[must_use]
    pub fn endpoint(&self, mac: MacAddr) -> Option<&EndpointEntry> {
        self.endpoints.iter().find(|e| e.mac == mac)
    }

    /// The `VPATCHES` entries for an endpoint id carrying `tags` (runtime endpoints).
    #[must_use]
    pub fn vpatch_entries(&self, endpoint_id: u32, tags: &[String]) -> Vec<VpatchEntry> {
        compiled_vpatches(&self.patches, endpoint_id, tags)
    }

    /// A virtual patch's name by id.
    #[must_use]
    pub fn patch_name(&self, id: u32) -> Option<&str> {
        self.patches.get(usize::try_from(id).ok()?).map(|p| p.name.as_str())
    }

    /// A policy id's name, or what the special ids stand for.
    #[must_use]
    pub fn policy_name(&self, id: u32) -> Option<&str> {
        match id {
            POLICY_ID_DEFAULT_INTER_ZONE => Some("default_inter_zone"),
            POLICY_ID_INTRA_ZONE => Some("intra_zone"),
            POLICY_ID_NONE => None,
            _ => self.policy_names.get(usize::try_from(id).ok()?).map(String::as_str),
        }
    }
}

/// Compiles `rules`, giving zones the ids of `zone_ids` and new ids to zones it does
/// not know (see [`ZoneIds::extended_for`]).
///
/// Policy ids are indexes in `rules.policies`. When several policies cover one zone
/// pair, all their allow entries apply; where entries overlap the first policy's id
/// wins; the pair marker takes the first policy's id and is audit only if all the
/// pair's policies are.
#[must_use]
pub fn compile(rules: &RuleSet, zone_ids: &ZoneIds) -> CompiledRules {
    let zone_ids = zone_ids.extended_for(rules);
    let id = |name: &str| zone_ids.id(name).expect("every zone of the rule set has an id");

    let mut endpoints: Vec<EndpointEntry> = Vec::new();
    let mut macs = HashSet::new();
    let mut cidrs: Vec<CidrEntry> = Vec::new();
    let mut networks = HashSet::new();
    let mut interfaces = Vec::new();
    let mut globs = GlobSetBuilder::new();
    let mut zones = Vec::new();
    for zone in &rules.zones {
        let zid = id(&zone.name);
        let intra = match zone.intra_zone {
            Access::Allow => Verdict::Allowed,
            Access::Deny => Verdict::Denied,
        };
        let mut flags = if zone.endpoints.remediation { ZONE_REMEDIATION } else { 0 };
        if zone.binding == Binding::Learn {
            flags |= ZONE_LEARN;
        }
        if zone.members.iter().any(|m| matches!(m.matcher, MemberMatch::Cidr(_))) {
            flags |= ZONE_HAS_CIDRS;
        }
        zones.push(ZoneEntry { zone: zid, value: ZoneValue { intra_zone: intra as u8, flags, _pad: [0; 2] } });
        for member in &zone.members {
            match &member.matcher {
                MemberMatch::Mac(mac) => {
                    if macs.insert(*mac) {
                        let endpoint_id = u32::try_from(endpoints.len() + 1).expect("fewer than 2^32 endpoints");
                        endpoints.push(EndpointEntry {
                            mac: *mac,
                            value: EndpointValue { zone: zid, endpoint_id, ..EndpointValue::default() },
                        });
                    }
                }
                MemberMatch::Cidr(c) => {
                    let (family, addr) = match c.addr() {
                        IpAddr::V4(a) => {
                            let mut addr = [0; 16];
                            addr[..4].copy_from_slice(&a.octets());
                            (FAMILY_IPV4, addr)
                        }
                        IpAddr::V6(a) => (FAMILY_IPV6, a.octets()),
                    };
                    if networks.insert(*c) {
                        cidrs.push(CidrEntry { family, addr, prefix_len: c.prefix_len(), zone: u32::from(zid) });
                    }
                }
                MemberMatch::Interface(g) => {
                    let glob = globset::GlobBuilder::new(g.pattern())
                        .literal_separator(false)
                        .build()
                        .expect("interface globs are checked when loaded");
                    globs.add(glob);
                    interfaces.push(InterfaceEntry { glob: g.pattern().to_owned(), zone: zid });
                }
            }
        }
    }

    let patches = compile_patches(rules);
    let vpatches = compile_inventory(rules, &zone_ids, &patches, &mut endpoints);
    let (policies, pair_markers) = compile_policies(rules, &zone_ids);
    let default_inter_zone = match rules.default_inter_zone {
        Access::Allow => Verdict::Allowed,
        Access::Deny => Verdict::Denied,
    } as u8;
    let learn_world = rules.zone(WORLD).is_none_or(|w| w.binding == Binding::Learn);
    let learn = learn_world || rules.zones.iter().any(|z| z.binding == Binding::Learn);
    let unbound_ports = match rules.unbound_ports {
        UnboundPorts::Quarantine => backplane_common::config::UNBOUND_QUARANTINE,
        UnboundPorts::Deny => backplane_common::config::UNBOUND_DENY,
        UnboundPorts::Observe => backplane_common::config::UNBOUND_OBSERVE,
    };
    CompiledRules {
        infrastructure_macs: compile_infrastructure(rules, &zone_ids),
        unbound_ports,
        learn,
        learn_world,
        endpoints,
        cidrs,
        interfaces,
        interface_globs: globs.build().expect("interface globs are checked when loaded"),
        zones,
        policies,
        pair_markers,
        default_inter_zone,
        policy_names: rules.policies.iter().map(|p| p.name.clone()).collect(),
        zone_ids,
        patches,
        vpatches,
    }
}

/// The MACs of `infrastructure:`, each with the zone its first address's networks give
/// it (longest prefix), else `world`.
fn compile_infrastructure(rules: &RuleSet, zone_ids: &ZoneIds) -> Vec<(MacAddr, u16)> {
    let zone_of = |ip: IpAddr| {
        rules
            .zones
            .iter()
            .flat_map(|z| z.members.iter().map(move |m| (z, m)))
            .filter_map(|(z, m)| match m.matcher {
                MemberMatch::Cidr(c) if c.contains(ip) => Some((c.prefix_len(), z.name.as_str())),
                _ => None,
            })
            .max_by_key(|(len, _)| *len)
            .and_then(|(_, name)| zone_ids.id(name))
    };
    rules
        .infrastructure
        .iter()
        .filter_map(|i| Some((i.mac?, i.ips.first().and_then(|ip| zone_of(*ip)).unwrap_or(ZONE_WORLD))))
        .collect()
}

/// The virtual patches by id: tag and denied (protocol, port prefix).
fn compile_patches(rules: &RuleSet) -> Vec<CompiledPatch> {
    rules
        .virtual_patches
        .iter()
        .map(|p| CompiledPatch {
            name: p.name.clone(),
            tag: p.tag.clone(),
            denies: p
                .deny
                .iter()
                .flat_map(|d| {
                    let proto = d.proto.number();
                    let prefixes = if d.ports.is_empty() {
                        vec![(0, 0)]
                    } else {
                        d.ports.iter().flat_map(|r| port_prefixes(r.first, r.last)).collect()
                    };
                    prefixes.into_iter().map(move |(port, bits)| (proto, port, bits))
                })
                .collect(),
        })
        .collect()
}

/// Adds the inventory's endpoints to `endpoints` (or their flags to the entry of a
/// `mac` member with the same MAC) and returns their `VPATCHES` entries.
fn compile_inventory(
    rules: &RuleSet,
    zone_ids: &ZoneIds,
    patches: &[CompiledPatch],
    endpoints: &mut Vec<EndpointEntry>,
) -> Vec<VpatchEntry> {
    let mut vpatches = Vec::new();
    for e in &rules.endpoints {
        let zone = rules.endpoint_zone(e).and_then(|z| zone_ids.id(z)).unwrap_or(ZONE_WORLD);
        let has_patches = rules.patches_for(&e.tags).next().is_some();
        let mut flags = if has_patches { ENDPOINT_PATCHED } else { 0 };
        if !e.ips.is_empty() {
            flags |= backplane_common::policy::ENDPOINT_ADDRS_FIXED;
        }
        let entry = if let Some(member) = endpoints.iter_mut().find(|x| x.mac == e.mac) {
            member.value.flags |= flags;
            *member
        } else {
            let endpoint_id = u32::try_from(endpoints.len() + 1).expect("fewer than 2^32 endpoints");
            let entry = EndpointEntry {
                mac: e.mac,
                value: EndpointValue { zone, flags, endpoint_id, ..EndpointValue::default() },
            };
            endpoints.push(entry);
            entry
        };
        if has_patches {
            vpatches.extend(compiled_vpatches(patches, entry.value.endpoint_id, &e.tags));
        }
    }
    vpatches
}

fn compiled_vpatches(patches: &[CompiledPatch], endpoint_id: u32, tags: &[String]) -> Vec<VpatchEntry> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (id, patch) in patches.iter().enumerate().filter(|(_, p)| tags.contains(&p.tag)) {
        let patch_id = u32::try_from(id).expect("fewer than 2^32 patches");
        for &(proto, port, bits) in &patch.denies {
            if seen.insert((proto, port, bits)) {
                out.push(VpatchEntry {
                    endpoint_id,
                    proto,
                    port,
                    prefix_len: VPATCH_KEY_PROTO_BITS + u32::from(bits),
                    patch_id,
                });
            }
        }
    }
    out
}

/// Ports as u32 so that 65535 + 1 does not overflow; inclusive ranges.
type Ranges = Vec<(u32, u32)>;

/// What one policy allows for one (source zone, destination zone, protocol).
struct Grant {
    policy_id: u32,
    mode: u8,
    ports: Ranges,
}

fn compile_policies(rules: &RuleSet, zone_ids: &ZoneIds) -> (Vec<PolicyEntry>, Vec<PolicyEntry>) {
    let mut grants: BTreeMap<(u16, u16, u8), Vec<Grant>> = BTreeMap::new();
    let mut pairs: BTreeMap<(u16, u16), (u32, bool)> = BTreeMap::new();
    for (index, policy) in rules.policies.iter().enumerate() {
        let policy_id = u32::try_from(index).expect("fewer than 2^32 policies");
        let src = zone_ids.id(&policy.from).expect("policy zones are checked when loaded");
        let dst = zone_ids.id(&policy.to).expect("policy zones are checked when loaded");
        let mode = match policy.mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Audit => MODE_AUDIT,
        };
        match pairs.entry((src, dst)) {
            Entry::Vacant(v) => {
                v.insert((policy_id, policy.mode == Mode::Audit));
            }
            Entry::Occupied(mut o) => o.get_mut().1 &= policy.mode == Mode::Audit,
        }
        for entry in &policy.allow {
            let ports: Ranges = if entry.ports.is_empty() {
                vec![(0, u32::from(u16::MAX))]
            } else {
                entry.ports.iter().map(|r| (u32::from(r.first), u32::from(r.last))).collect()
            };
            let list = grants.entry((src, dst, entry.proto.number())).or_default();
            match list.last_mut() {
                Some(g) if g.policy_id == policy_id => g.ports.extend(ports),
                _ => list.push(Grant { policy_id, mode, ports }),
            }
        }
    }

    let mut entries = Vec::new();
    for ((src, dst, proto), list) in grants {
        let mut covered: Ranges = Vec::new();
        for grant in list {
            let ports = merge(grant.ports);
            for (first, last) in subtract(&ports, &covered) {
                let first = u16::try_from(first).expect("a port");
                let last = u16::try_from(last).expect("a port");
                for (port, bits) in port_prefixes(first, last) {
                    entries.push(PolicyEntry {
                        proto,
                        src_zone: src,
                        dst_zone: dst,
                        port,
                        prefix_len: POLICY_KEY_PROTO_BITS + u32::from(bits),
                        value: PolicyValue { policy_id: grant.policy_id, mode: grant.mode, _pad: [0; 3] },
                    });
                }
            }
            covered = merge(covered.into_iter().chain(ports).collect());
        }
    }
    let markers = pairs
        .into_iter()
        .map(|((src, dst), (policy_id, audit))| PolicyEntry {
            proto: PAIR_MARKER_PROTO,
            src_zone: src,
            dst_zone: dst,
            port: 0,
            prefix_len: POLICY_KEY_PROTO_BITS,
            value: PolicyValue { policy_id, mode: if audit { MODE_AUDIT } else { MODE_ENFORCE }, _pad: [0; 3] },
        })
        .collect();
    (entries, markers)
}

/// Sorted, disjoint, non-adjacent ranges covering the same ports.
fn merge(mut ranges: Ranges) -> Ranges {
    ranges.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(ranges.len());
    for (first, last) in ranges {
        match out.last_mut() {
            Some(prev) if first <= prev.1 + 1 => prev.1 = prev.1.max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// The ports of `ranges` not in `minus` (both sorted and disjoint).
fn subtract(ranges: &[(u32, u32)], minus: &[(u32, u32)]) -> Ranges {
    let mut out = Vec::new();
    for &(first, last) in ranges {
        let mut start = first;
        for &(mf, ml) in minus {
            if ml < start || mf > last {
                continue;
            }
            if mf > start {
                out.push((start, mf - 1));
            }
            start = ml + 1;
            if start > last {
                break;
            }
        }
        if start <= last {
            out.push((start, last));
        }
    }
    out
}

/// The fewest aligned prefixes that cover exactly `first..=last`, in port order, as
/// (first port of the prefix, prefix length in bits of the 16-bit port). The whole
/// range 0-65535 is one prefix of length 0.
#[must_use]
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    if first > last {
        return out;
    }
    let mut start = u32::from(first);
    let end = u32::from(last) + 1;
    while start < end {
        // The largest block aligned at `start` that does not pass `end`.
        let mut size = if start == 0 { 1u32 << 16 } else { 1u32 << start.trailing_zeros() };
        while start + size > end {
            size >>= 1;
        }
        let bits = 16 - u8::try_from(size.trailing_zeros()).expect("at most 16");
        out.push((u16::try_from(start).expect("a port"), bits));
        start += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_port_is_one_full_prefix() {
        assert_eq!(port_prefixes(5432, 5432), vec![(5432, 16)]);
        assert_eq!(port_prefixes(0, 0), vec![(0, 16)]);
        assert_eq!(port_prefixes(65535, 65535), vec![(65535, 16)]);
    }

    #[test]
    fn range_6000_6010() {
        // 6000 = 0b1_0111_0111_0000: 6000-6007 (/13), 6008-6009 (/15), 6010 (/16).
        assert_eq!(port_prefixes(6000, 6010), vec![(6000, 13), (6008, 15), (6010, 16)]);
    }

    #[test]
    fn whole_and_almost_whole_ranges() {
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        // 1-65535: every power-of-two block from 1 up to 32768.
        let p = port_prefixes(1, 65535);
        assert_eq!(p.len(), 16);
        assert_eq!(p[0], (1, 16));
        assert_eq!(p[1], (2, 15));
        assert_eq!(p[15], (32768, 1));
        assert_eq!(
            port_prefixes(1024, 65535),
            vec![(1024, 6), (2048, 5), (4096, 4), (8192, 3), (16384, 2), (32768, 1)]
        );
    }

    #[test]
    fn merge_and_subtract() {
        assert_eq!(merge(vec![(5, 9), (1, 3), (4, 4), (20, 30), (25, 26)]), vec![(1, 9), (20, 30)]);
        assert_eq!(subtract(&[(0, 100)], &[(10, 20), (50, 60)]), vec![(0, 9), (21, 49), (61, 100)]);
        assert_eq!(subtract(&[(10, 20)], &[(0, 100)]), vec![]);
        assert_eq!(subtract(&[(0, 65535)], &[(0, 0), (65535, 65535)]), vec![(1, 65534)]);
    }

    /// splitmix64: a small deterministic generator, enough for property tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn port(&mut self) -> u16 {
            // Mix uniform ports with ones near powers of two, where splitting is hardest.
            let r = self.next();
            let v = if r & 1 == 0 {
                r >> 16
            } else {
                let p = 1u64 << ((r >> 8) % 17);
                p.wrapping_add((r >> 32) % 3).wrapping_sub(1)
            };
            u16::try_from(v & 0xffff).expect("masked")
        }
    }

    #[test]
    fn random_ranges_are_covered_exactly_by_aligned_prefixes() {
        let mut rng = Rng(0x5eed);
        for _ in 0..2000 {
            let (a, b) = (rng.port(), rng.port());
            let (first, last) = (a.min(b), a.max(b));
            let prefixes = port_prefixes(first, last);
            // Aligned, in order, adjacent, and together exactly first..=last.
            let mut next = u32::from(first);
            for &(port, bits) in &prefixes {
                let size = 1u32 << (16 - bits);
                assert_eq!(u32::from(port) % size, 0, "{first}-{last}: {port}/{bits} not aligned");
                assert_eq!(u32::from(port), next, "{first}-{last}: gap or overlap at {port}");
                next += size;
            }
            assert_eq!(next, u32::from(last) + 1, "{first}-{last}: wrong end");
            // Minimal: no two neighbours could merge into one aligned prefix.
            for w in prefixes.windows(2) {
                let ((p1, b1), (_, b2)) = (w[0], w[1]);
                let merged = 1u32 << (16 - b1 + 1);
                assert!(!(b1 == b2 && u32::from(p1) % merged == 0), "{first}-{last}: {w:?} could merge");
            }
            // Spot-check membership as an LPM lookup would see it.
            for _ in 0..20 {
                let probe = rng.port();
                let hit = prefixes.iter().any(|&(port, bits)| {
                    let shift = 16 - u32::from(bits);
                    u32::from(probe) >> shift << shift == u32::from(port)
                });
                assert_eq!(hit, (first..=last).contains(&probe), "{first}-{last}: port {probe}");
            }
        }
    }

    #[test]
    fn prefix_count_is_bounded() {
        // An aligned split of any range needs at most 2 * 16 - 2 prefixes.
        let mut rng = Rng(7);
        for _ in 0..2000 {
            let (a, b) = (rng.port(), rng.port());
            assert!(port_prefixes(a.min(b), a.max(b)).len() <= 30);
        }
    }
}
