//! The kernel's rule tables: writing a compiled rule set into the half (slot) of the
//! double-buffered tables that is not in force, then switching the data path to it
//! with one write of `CONFIG`. A packet reads `CONFIG` once, so it is judged wholly by
//! the old rule set or wholly by the new one.
//!
//! The half that was in force stays as it is until the next switch, when it is
//! cleared and rewritten: a packet that read the old `CONFIG` just before the switch
//! still finds every entry of the old rule set.

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use backplane_common::{
    DatapathConfig, PortInfo,
    config::{CONFIG_ENFORCE, CONFIG_INDEX, CONFIG_LEARN, CONFIG_LEARN_WORLD},
    maps::{ADDR_OWNERS, CONFIG, ENDPOINTS, POLICIES, PORTS, VPATCHES, ZONE_CIDRS, ZONES},
    policy::{
        AddrKey, EndpointKey, EndpointValue, OwnerKey, OwnerValue, PolicyKey, PolicyValue, VpatchKey, VpatchValue,
        ZoneKey, ZoneValue,
    },
};
use backplane_rules::{CompiledRules, MacAddr, VpatchEntry};

/// Endpoint entries the agent adds to (or overrides in) a compiled rule set: runtime
/// endpoints, the flags of quarantined and isolated endpoints, port bindings, and the
/// virtual patches of runtime endpoints (see [`crate::endpoints`]).
#[derive(Clone, Debug, Default)]
pub struct EndpointOverlay {
    pub endpoints: Vec<(MacAddr, EndpointValue)>,
    pub vpatches: Vec<VpatchEntry>,
}

/// A change of the endpoint entries in the half of the rule tables in force, as the
/// endpoints describe it; the data path writes it (`Datapath::write_endpoints`), as the
/// tables' only writer.
#[derive(Clone, Debug, Default)]
pub struct EndpointChange {
    /// Entries to write: new or changed.
    pub write: Vec<(MacAddr, EndpointValue)>,
    /// Entries no longer overlaid: back to the compiled rule set's value, or removed where
    /// it has none.
    pub reset: Vec<(MacAddr, Option<EndpointValue>)>,
    /// Virtual-patch entries to write, and to remove.
    pub add_vpatches: Vec<VpatchEntry>,
    pub remove_vpatches: Vec<VpatchEntry>,
    /// What `ADDR_OWNERS` must hold; `None`: left as it is.
    pub owners: Option<std::collections::HashMap<OwnerKey, OwnerValue>>,
    /// The binding of every VM port (ports not here are unbound); `None`: left as
    /// they are.
    pub ports: Option<std::collections::HashMap<u32, crate::datapath::PortBinding>>,
}

/// What was written of an [`EndpointChange`].
#[derive(Debug, Default)]
pub struct EndpointChangeDone {
    /// The MACs of [`EndpointChange::write`] whose entry was written.
    pub written: Vec<MacAddr>,
    /// How many `ADDR_OWNERS` entries changed, or the first failure; `None` when the
    /// change did not touch them.
    pub owners: Option<Result<usize, TableError>>,
}

/// A rule table operation that failed, naming the map.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("map {map} is missing from the data path object")]
    MissingMap { map: &'static str },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> TableError {
    move |source| TableError::Map { map, source }
}

/// The keys one slot holds, so that it can be cleared exactly.
#[derive(Default)]
struct SlotKeys {
    endpoints: Vec<EndpointKey>,
    cidrs: Vec<(u32, AddrKey)>,
    zones: Vec<ZoneKey>,
    policies: Vec<(u32, PolicyKey)>,
    vpatches: Vec<(u32, VpatchKey)>,
}

impl SlotKeys {
    fn len(&self) -> usize {
        self.endpoints.len() + self.cidrs.len() + self.zones.len() + self.policies.len() + self.vpatches.len()
    }
}

/// The four rule maps (`ENDPOINTS`, `ZONE_CIDRS`, `ZONES`, `POLICIES`) and what each
/// slot of them holds.
pub struct RuleTables {
    endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    cidrs: LpmTrie<MapData, AddrKey, u32>,
    zones: HashMap<MapData, ZoneKey, ZoneValue>,
    policies: LpmTrie<MapData, PolicyKey, PolicyValue>,
    vpatches: LpmTrie<MapData, VpatchKey, VpatchValue>,
    slots: [SlotKeys; 2],
    /// `ADDR_OWNERS` (not double-buffered) and what it holds.
    owners: HashMap<MapData, OwnerKey, OwnerValue>,
    owners_held: std::collections::HashMap<OwnerKey, OwnerValue>,
}

fn take(ebpf: &mut Ebpf, map: &'static str) -> Result<aya::maps::Map, TableError> {
    ebpf.take_map(map).ok_or(TableError::MissingMap { map })
}

impl RuleTables {
    /// Takes the rule maps out of the loaded object and learns what each slot holds
    /// already (maps adopted from pins after a restart keep their entries).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, TableError> {
        let mut tables = Self {
            endpoints: HashMap::try_from(take(ebpf, ENDPOINTS)?).map_err(map_err(ENDPOINTS))?,
            cidrs: LpmTrie::try_from(take(ebpf, ZONE_CIDRS)?).map_err(map_err(ZONE_CIDRS))?,
            zones: HashMap::try_from(take(ebpf, ZONES)?).map_err(map_err(ZONES))?,
            policies: LpmTrie::try_from(take(ebpf, POLICIES)?).map_err(map_err(POLICIES))?,
            vpatches: LpmTrie::try_from(take(ebpf, VPATCHES)?).map_err(map_err(VPATCHES))?,
            slots: [SlotKeys::default(), SlotKeys::default()],
            owners: HashMap::try_from(take(ebpf, ADDR_OWNERS)?).map_err(map_err(ADDR_OWNERS))?,
            owners_held: std::collections::HashMap::new(),
        };
        tables.scan()?;
        Ok(tables)
    }

    fn scan(&mut self) -> Result<(), TableError> {
        for key in self.endpoints.keys() {
            let key = key.map_err(map_err(ENDPOINTS))?;
            self.slots[usize::from(key.slot & 1)].endpoints.push(key);
        }
        for key in self.cidrs.keys() {
            let key = key.map_err(map_err(ZONE_CIDRS))?;
            let data = key.data();
            self.slots[usize::from(data.slot & 1)].cidrs.push((key.prefix_len(), data));
        }
        for key in self.zones.keys() {
            let key = key.map_err(map_err(ZONES))?;
            self.slots[usize::from(key.slot & 1)].zones.push(key);
        }
        for key in self.policies.keys() {
            let key = key.map_err(map_err(POLICIES))?;
            let data = key.data();
            self.slots[usize::from(data.slot & 1)].policies.push((key.prefix_len(), data));
        }
        for key in self.vpatches.keys() {
            let key = key.map_err(map_err(VPATCHES))?;
            let data = key.data();
            self.slots[usize::from(data.slot & 1)].vpatches.push((key.prefix_len(), data));
        }
        for entry in &self.owners {
            let (key, value) = entry.map_err(map_err(ADDR_OWNERS))?;
            self.owners_held.insert(key, value);
        }
        Ok(())
    }

    /// Entries held by a slot.
    #[must_use]
    pub fn slot_len(&self, slot: u8) -> usize {
        self.slots[usize::from(slot & 1)].len()
    }

    /// Removes every entry of `slot`.
    pub fn clear_slot(&mut self, slot: u8) -> Result<(), TableError> {
        let keys = std::mem::take(&mut self.slots[usize::from(slot & 1)]);
        let gone = |e: &MapError| matches!(e, MapError::KeyNotFound);
        for k in &keys.endpoints {
            self.endpoints.remove(k).or_else(|e| if gone(&e) { Ok(()) } else { Err(e) }).map_err(map_err(ENDPOINTS))?;
        }
        for (len, k) in &keys.cidrs {
            self.cidrs
                .remove(&Key::new(*len, *k))
                .or_else(|e| if gone(&e) { Ok(()) } else { Err(e) })
                .map_err(map_err(ZONE_CIDRS))?;
        }
        for k in &keys.zones {
            self.zones.remove(k).or_else(|e| if gone(&e) { Ok(()) } else { Err(e) }).map_err(map_err(ZONES))?;
        }
        for (len, k) in &keys.policies {
            self.policies
                .remove(&Key::new(*len, *k))
                .or_else(|e| if gone(&e) { Ok(()) } else { Err(e) })
                .map_err(map_err(POLICIES))?;
        }
        for (len, k) in &keys.vpatches {
            self.vpatches
                .remove(&Key::new(*len, *k))
                .or_else(|e| if gone(&e) { Ok(()) } else { Err(e) })
                .map_err(map_err(VPATCHES))?;
        }
        Ok(())
    }

    /// Clears `slot`, then writes `rules` into it. On failure the slot is cleared again
    /// and the error returned; the slot in force is never touched.
    pub fn write_slot(&mut self, slot: u8, rules: &CompiledRules) -> Result<(), TableError> {
        self.write_slot_with(slot, rules, &EndpointOverlay::default())
    }

    /// [`RuleTables::write_slot`], then the agent's endpoint entries over the compiled ones.
    pub fn write_slot_with(
        &mut self,
        slot: u8,
        rules: &CompiledRules,
        overlay: &EndpointOverlay,
    ) -> Result<(), TableError> {
        self.clear_slot(slot)?;
        let result = self.write_entries(slot, rules).and_then(|()| self.write_overlay(slot, overlay));
        if result.is_err() {
            let _ = self.clear_slot(slot);
        }
        result
    }

    fn write_entries(&mut self, slot: u8, rules: &CompiledRules) -> Result<(), TableError> {
        let keys = &mut self.slots[usize::from(slot & 1)];
        for e in &rules.endpoints {
            let k = e.key(slot);
            self.endpoints.insert(k, e.value, 0).map_err(map_err(ENDPOINTS))?;
            keys.endpoints.push(k);
        }
        for (mac, zone) in &rules.infrastructure_macs {
            let k = EndpointKey { slot: slot & 1, _pad: 0, mac: mac.0 };
            let value = EndpointValue {
                zone: *zone,
                ifindex: backplane_common::policy::OWNER_INFRA,
                ..EndpointValue::default()
            };
            self.endpoints.insert(k, value, 0).map_err(map_err(ENDPOINTS))?;
            keys.endpoints.push(k);
        }
        for e in &rules.cidrs {
            let (len, k) = e.key(slot);
            self.cidrs.insert(&Key::new(len, k), e.zone, 0).map_err(map_err(ZONE_CIDRS))?;
            keys.cidrs.push((len, k));
        }
        for e in &rules.zones {
            let k = e.key(slot);
            self.zones.insert(k, e.value, 0).map_err(map_err(ZONES))?;
            keys.zones.push(k);
        }
        for e in rules.policies.iter().chain(&rules.pair_markers) {
            let (len, k) = e.key(slot);
            self.policies.insert(&Key::new(len, k), e.value, 0).map_err(map_err(POLICIES))?;
            keys.policies.push((len, k));
        }
        for e in &rules.vpatches {
            let (len, k) = e.key(slot);
            self.vpatches.insert(&Key::new(len, k), e.value(), 0).map_err(map_err(VPATCHES))?;
            keys.vpatches.push((len, k));
        }
        Ok(())
    }

    fn write_overlay(&mut self, slot: u8, overlay: &EndpointOverlay) -> Result<(), TableError> {
        for (mac, value) in &overlay.endpoints {
            self.write_endpoint(slot, *mac, *value)?;
        }
        for e in &overlay.vpatches {
            self.write_vpatch(slot, e)?;
        }
        Ok(())
    }

    /// Writes one endpoint entry into `slot` (a single map update: the data path sees the
    /// old or the new value, never a mix).
    pub fn write_endpoint(&mut self, slot: u8, mac: MacAddr, value: EndpointValue) -> Result<(), TableError> {
        let key = EndpointKey { slot: slot & 1, _pad: 0, mac: mac.0 };
        self.endpoints.insert(key, value, 0).map_err(map_err(ENDPOINTS))?;
        let keys = &mut self.slots[usize::from(slot & 1)].endpoints;
        if !keys.contains(&key) {
            keys.push(key);
        }
        Ok(())
    }

    /// Removes one endpoint entry from `slot` (absent is fine).
    pub fn remove_endpoint(&mut self, slot: u8, mac: MacAddr) -> Result<(), TableError> {
        let key = EndpointKey { slot: slot & 1, _pad: 0, mac: mac.0 };
        match self.endpoints.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(TableError::Map { map: ENDPOINTS, source: e }),
        }
        self.slots[usize::from(slot & 1)].endpoints.retain(|k| *k != key);
        Ok(())
    }

    /// The endpoint entry of `mac` in `slot`, if any.
    #[must_use]
    pub fn endpoint(&self, slot: u8, mac: MacAddr) -> Option<EndpointValue> {
        self.endpoints.get(&EndpointKey { slot: slot & 1, _pad: 0, mac: mac.0 }, 0).ok()
    }

    /// The flags of every endpoint entry of `slot` (entries that cannot be read are
    /// skipped).
    #[must_use]
    pub fn endpoint_flags(&self, slot: u8) -> Vec<u16> {
        self.endpoints.iter().flatten().filter(|(key, _)| key.slot == slot).map(|(_, value)| value.flags).collect()
    }

    /// Writes one virtual-patch entry into `slot`.
    pub fn write_vpatch(&mut self, slot: u8, entry: &VpatchEntry) -> Result<(), TableError> {
        let (len, k) = entry.key(slot & 1);
        self.vpatches.insert(&Key::new(len, k), entry.value(), 0).map_err(map_err(VPATCHES))?;
        let keys = &mut self.slots[usize::from(slot & 1)].vpatches;
        if !keys.contains(&(len, k)) {
            keys.push((len, k));
        }
        Ok(())
    }

    /// Removes one virtual-patch entry from `slot` (absent is fine).
    pub fn remove_vpatch(&mut self, slot: u8, entry: &VpatchEntry) -> Result<(), TableError> {
        let (len, k) = entry.key(slot & 1);
        match self.vpatches.remove(&Key::new(len, k)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(TableError::Map { map: VPATCHES, source: e }),
        }
        self.slots[usize::from(slot & 1)].vpatches.retain(|x| *x != (len, k));
        Ok(())
    }

    /// Makes `ADDR_OWNERS` hold exactly `wanted`: writes what is new or changed, removes
    /// what is no longer wanted (entries left by an agent before a restart included).
    /// Every entry is tried; the first failure is returned.
    pub fn set_owners(
        &mut self,
        wanted: &std::collections::HashMap<OwnerKey, OwnerValue>,
    ) -> Result<usize, TableError> {
        let mut changed = 0;
        let mut first_error = None;
        for (key, value) in wanted {
            if self.owners_held.get(key) == Some(value) {
                continue;
            }
            match self.owners.insert(key, value, 0) {
                Ok(()) => {
                    self.owners_held.insert(*key, *value);
                    changed += 1;
                }
                Err(e) => {
                    first_error.get_or_insert(TableError::Map { map: ADDR_OWNERS, source: e });
                }
            }
        }
        let gone: Vec<OwnerKey> = self.owners_held.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for key in gone {
            match self.owners.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.owners_held.remove(&key);
                    changed += 1;
                }
                Err(e) => {
                    first_error.get_or_insert(TableError::Map { map: ADDR_OWNERS, source: e });
                }
            }
        }
        first_error.map_or(Ok(changed), Err)
    }

    /// What `ADDR_OWNERS` holds.
    #[must_use]
    pub fn owners(&self) -> &std::collections::HashMap<OwnerKey, OwnerValue> {
        &self.owners_held
    }
}

/// Sets each attached port's zone and standing for `slot`: a bound port's from its
/// endpoint's entry in `overlay` (the entries whose `ifindex` is the port), any other's
/// from the rule set's interface members. `ports` yields (ifindex, name).
pub fn write_port_zones<'a>(
    ports_map: &mut HashMap<MapData, u32, PortInfo>,
    slot: u8,
    rules: &CompiledRules,
    ports: impl IntoIterator<Item = (u32, &'a str)>,
    overlay: &EndpointOverlay,
) -> Result<(), TableError> {
    let s = usize::from(slot & 1);
    for (ifindex, name) in ports {
        let Ok(mut info) = ports_map.get(&ifindex, 0) else { continue };
        let bound = (info.binding != backplane_common::config::BINDING_NONE)
            .then(|| overlay.endpoints.iter().find(|(mac, v)| v.ifindex == ifindex && mac.0 == info.mac))
            .flatten();
        match bound {
            Some((_, value)) => {
                info.zone[s] = value.zone;
                info.standing[s] = value.flags;
            }
            // A learned port outside the inventory: the zone its name gives it under these
            // rules, else the zone it learned (zone ids last across rule sets).
            None if info.binding != backplane_common::config::BINDING_NONE => {
                info.zone[s] = rules.zone_for_interface(name).unwrap_or(info.zone[s ^ 1]);
                info.standing[s] = 0;
            }
            None => {
                info.zone[s] = rules.zone_for_interface(name).unwrap_or(0);
                info.standing[s] = 0;
            }
        }
        ports_map.insert(ifindex, info, 0).map_err(map_err(PORTS))?;
    }
    Ok(())
}

/// Puts `slot` in force: one write of `CONFIG` with the next generation, the slot, the
/// enforcing flag and the rule set's default. Returns the new generation.
pub fn activate(
    config: &mut Array<MapData, DatapathConfig>,
    slot: u8,
    rules: &CompiledRules,
) -> Result<u32, TableError> {
    let old = config.get(&CONFIG_INDEX, 0).map_err(map_err(CONFIG))?;
    let generation = old.generation.wrapping_add(1).max(1);
    let mut flags = (old.flags | CONFIG_ENFORCE) & !(CONFIG_LEARN | CONFIG_LEARN_WORLD);
    if rules.learn {
        flags |= CONFIG_LEARN;
    }
    if rules.learn_world {
        flags |= CONFIG_LEARN_WORLD;
    }
    let new = DatapathConfig {
        generation,
        active_slot: slot & 1,
        flags,
        default_inter_zone: rules.default_inter_zone,
        unbound_ports: rules.unbound_ports,
        // The ports' zones of the half put in force changed: no CPU keeps its copy (0
        // stays 0: whoever writes `PORTS` without `Datapath::ports_changed` gets no copies).
        ports_epoch: if old.ports_epoch == 0 { 0 } else { old.ports_epoch.wrapping_add(1).max(1) },
        ..DatapathConfig::default()
    };
    config.set(CONFIG_INDEX, new, 0).map_err(map_err(CONFIG))?;
    Ok(generation)
}

/// The slot a new rule set goes into: the one not in force (slot 0 when no rule set
/// has been in force yet).
#[must_use]
pub fn next_slot(config: &DatapathConfig) -> u8 {
    if config.flags & CONFIG_ENFORCE == 0 { 0 } else { (config.active_slot & 1) ^ 1 }
}

/// The `ADDR_OWNERS` key of an address.
#[must_use]
pub fn owner_key(ip: std::net::IpAddr) -> OwnerKey {
    let mut addr = [0u8; 16];
    // An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address on the wire.
    let family = match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            backplane_common::flow::FAMILY_IPV4
        }
        std::net::IpAddr::V6(v6) => {
            addr = v6.octets();
            backplane_common::flow::FAMILY_IPV6
        }
    };
    OwnerKey { family, _pad: [0; 3], addr }
}
