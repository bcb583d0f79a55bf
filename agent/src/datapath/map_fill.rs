//! How full the pinned maps are, for the metrics: each map's capacity and its keys,
//! counted by walking them (`BPF_MAP_GET_NEXT_KEY`). The flow table's fill comes from the
//! flow table's own read instead.

use std::{os::fd::AsFd as _, path::Path};

use super::pins;
use aya::maps::MapData;
use backplane_common::maps::{
    ADDR_OWNERS, ANNOUNCES, ENDPOINTS, FRAGMENTS, POLICIES, PORTS, VPATCHES, ZONE_CIDRS, ZONE_PAIR_STATS, ZONES,
};

/// Maps whose fill is reported by walking their keys (FLOWS comes from the flow table's
/// own read): `(map name, label)`.
const WALKED_MAPS: &[(&str, &str)] = &[
    (PORTS, "ports"),
    (ENDPOINTS, "endpoints"),
    (ZONE_CIDRS, "zone_cidrs"),
    (ZONES, "zones"),
    (POLICIES, "policies"),
    (ZONE_PAIR_STATS, "zone_pair_stats"),
    (FRAGMENTS, "fragments"),
    (VPATCHES, "vpatches"),
    (ANNOUNCES, "announces"),
    (ADDR_OWNERS, "addr_owners"),
];

/// The pinned maps whose fill is reported, opened once.
pub struct MapFills {
    walked: Vec<(&'static str, MapData)>,
}

impl MapFills {
    /// Opens the maps of `WALKED_MAPS` pinned in `maps_dir`; one that cannot be opened
    /// is left out (and said so).
    #[must_use]
    pub fn open(maps_dir: &Path) -> Self {
        let walked = WALKED_MAPS
            .iter()
            .filter_map(|(name, label)| match MapData::from_pin(maps_dir.join(name)) {
                Ok(map) => Some((*label, map)),
                Err(e) => {
                    log::warn!("metrics: cannot open pinned map {name}: {e}; its fill is not reported");
                    None
                }
            })
            .collect();
        Self { walked }
    }

    /// `(label, entries, capacity)` of each map whose information can be read. Blocking.
    #[must_use]
    pub fn read(&self) -> Vec<(&'static str, u64, u32)> {
        self.walked
            .iter()
            .filter_map(|(label, map)| {
                let info = map.info().ok()?;
                Some((*label, count_keys(map, info.key_size() as usize, info.max_entries()), info.max_entries()))
            })
            .collect()
    }
}

/// Counts a map's keys by walking them (at most `max_entries` + 1 steps).
fn count_keys(map: &MapData, key_size: usize, max_entries: u32) -> u64 {
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n = 0u64;
    while n <= u64::from(max_entries) {
        match pins::next_key(map.fd().as_fd(), (n > 0).then_some(key.as_slice()), &mut next) {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
        n += 1;
        std::mem::swap(&mut key, &mut next);
    }
    n
}
