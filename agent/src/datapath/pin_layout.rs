//! Which version of the pinned layout a pin directory holds, and the upgrade of an older
//! one into this agent's.
//!
//! The maps of layout version N live in their own directory ([`maps_dir`]): version 1
//! directly in the pin directory (every agent before versions existed), version 2 and
//! later in `<pin-dir>/v<N>/`. Links are pinned apart from the maps
//! (`<pin-dir>/links/`) and are the same objects whatever the version: they are what the
//! new programs take over.
//!
//! An agent that finds an older layout does not refuse to start and does not start
//! afresh. It upgrades, keeping enforcement through the switch:
//! 1. its own maps are created in its version's directory, and the state of the older
//!    layout is copied into them entry by entry: flows with their counters, counters,
//!    ports, address owners, fragments, zone-pair statistics, and the configuration with
//!    its rule generation (so generations only grow: no flow judged under an old
//!    generation escapes being judged again). The rule tables are not copied (longest
//!    prefix tries cannot be read back entry by entry), and ring buffers carry no state;
//! 2. the rules are put in force in the new maps, as at any start: until then no program
//!    uses them, and a start whose rules do not load ends before any port is switched
//!    (or puts the last good copy's failure rule set in force, as any start does);
//! 3. the programs of every port are replaced in place (TCX links: `BPF_LINK_UPDATE`;
//!    legacy filters: a filter replace), port by port: a packet meets the old programs
//!    with the old maps or the new ones with the new maps, never none, and a denied flow
//!    stays denied on both sides;
//! 4. [`Migration::finish`] copies the flows the old programs created between the first
//!    copy and the switch, then removes the older layout's pins.
//!
//! What is not carried: packets the old programs counted on flows that already existed
//! during the few milliseconds between the first copy and the switch of their port.
//! A map whose key or value changed between versions needs a converter here; without one
//! the start ends (see `check_pins`) and the old data path stays attached and in force.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use backplane_common::maps::{
    CONFIG, ENDPOINTS, FLOWS, PIN_LAYOUT_VERSION, PINNED_MAPS, POLICIES, PORTS, VPATCHES, ZONE_CIDRS, ZONES,
};

use crate::datapath::pins::{next_key, obj_get, sys_bpf};

/// The double-buffered rule tables: rewritten by the agent, never copied.
const RULE_TABLES: [&str; 5] = [ENDPOINTS, ZONE_CIDRS, ZONES, POLICIES, VPATCHES];
/// Maps whose values grew at their end since an older layout (`PORTS`: 8 bytes up to
/// layout 2, 24 from 3; the binding fields start unbound).
const GROWN: [&str; 1] = [PORTS];

/// `BPF_MAP_LOOKUP_ELEM`, `BPF_MAP_UPDATE_ELEM`.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
/// `BPF_ANY`, `BPF_NOEXIST`.
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
/// Map types whose values are per CPU: `PERCPU_HASH`, `PERCPU_ARRAY`, `LRU_PERCPU_HASH`.
const PER_CPU_TYPES: [u32; 3] = [5, 6, 10];
/// `BPF_MAP_TYPE_RINGBUF`: nothing in it to carry.
const RINGBUF: u32 = 27;

/// Whether map `name` of an older layout, pinned as `pinned`, is the same map as this
/// layout's `wanted` but for values that grew at their end (copied zero-extended).
#[must_use]
pub fn grown_from(name: &str, pinned: &super::pins::MapLayout, wanted: &super::pins::MapLayout) -> bool {
    GROWN.contains(&name)
        && (pinned.map_type, pinned.key_size, pinned.flags) == (wanted.map_type, wanted.key_size, wanted.flags)
        && pinned.value_size < wanted.value_size
}

/// Where the maps of layout `version` are pinned under `pin_dir`.
#[must_use]
pub fn maps_dir(pin_dir: &Path, version: u32) -> PathBuf {
    if version <= 1 { pin_dir.to_owned() } else { pin_dir.join(format!("v{version}")) }
}

/// What a pin directory holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing pinned: a first start.
    Nothing,
    /// Maps of this agent's layout: adopted as they are.
    Current,
    /// Maps of an older layout, in `dir`: upgraded.
    Older { version: u32, dir: PathBuf },
}

impl Found {
    /// The directory whose maps this agent starts from.
    #[must_use]
    pub fn dir(&self, pin_dir: &Path) -> PathBuf {
        match self {
            Self::Older { dir, .. } => dir.clone(),
            Self::Nothing | Self::Current => maps_dir(pin_dir, PIN_LAYOUT_VERSION),
        }
    }
}

/// What `pin_dir` holds. Maps of an older layout mean an upgrade to do, or to resume:
/// an upgrade removes them only once it ended, so an agent that stopped half-way (this
/// layout's maps created, the older one's still there) leaves the next agent to copy and
/// switch again. A directory holds a layout when it holds any of the data path's maps (a
/// layout with maps of unexpected types is found too, and refused by `check_pins` with
/// their names).
#[must_use]
pub fn find(pin_dir: &Path) -> Found {
    let holds_maps = |dir: &Path| PINNED_MAPS.iter().any(|name| dir.join(name).exists());
    let older = (1..PIN_LAYOUT_VERSION)
        .rev()
        .map(|version| (version, maps_dir(pin_dir, version)))
        .find(|(_, dir)| holds_maps(dir));
    match older {
        Some((version, dir)) => Found::Older { version, dir },
        None if holds_maps(&maps_dir(pin_dir, PIN_LAYOUT_VERSION)) => Found::Current,
        None => Found::Nothing,
    }
}

/// An upgrade under way: the older layout's maps were copied into this agent's.
#[derive(Debug)]
pub struct Migration {
    pub version: u32,
    pub from: PathBuf,
    pub to: PathBuf,
    /// Entries copied, by map.
    pub copied: Vec<(&'static str, usize)>,
}

/// Copies the pinned maps of the older layout in `from` (all but the rule tables) into
/// the maps of the same names in `to` (this agent's: just created, or left by an upgrade
/// that stopped half-way, whose copy is simply made again). A map that cannot be copied
/// ends the upgrade with its name: the caller ends the start before anything is
/// attached, and the older data path stays in force.
///
/// `resume`: an earlier agent began this upgrade, and its maps in `to` may already serve
/// ports it switched; then only what `to` lacks is copied (never the configuration, whose
/// rules may be in force there), so nothing newer is overwritten by older state.
pub fn upgrade(version: u32, from: &Path, to: &Path, resume: bool) -> Result<Migration, String> {
    let mut copied = Vec::new();
    for &name in PINNED_MAPS {
        let (old, new) = (from.join(name), to.join(name));
        if !old.exists() || RULE_TABLES.contains(&name) || (resume && name == CONFIG) {
            continue;
        }
        let n = copy_map(&old, &new, if resume { BPF_NOEXIST } else { BPF_ANY }, GROWN.contains(&name))
            .map_err(|e| format!("copying {name} from {} to {}: {e}", old.display(), new.display()))?;
        copied.push((name, n));
    }
    Ok(Migration { version, from: from.to_owned(), to: to.to_owned(), copied })
}

impl Migration {
    /// Once every port runs this agent's programs: copies the flows the old programs
    /// created since [`upgrade`], then removes the older layout's map pins (the maps go
    /// when the last program that uses them does). Returns the flows copied late.
    #[must_use = "the number of flows copied late is worth a log line"]
    pub fn finish(self) -> usize {
        let late = copy_map(&self.from.join(FLOWS), &self.to.join(FLOWS), BPF_NOEXIST, false).unwrap_or_else(|e| {
            log::warn!("upgrade: copying the last flows of layout {}: {e}", self.version);
            0
        });
        for name in PINNED_MAPS {
            let path = self.from.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("upgrade: cannot remove {}: {e}", path.display()),
            }
        }
        if self.version > 1 {
            let _ = std::fs::remove_dir(&self.from);
        }
        late
    }
}

/// What the kernel says of a pinned map: type, key size, value size as the syscalls
/// read and write it (per-CPU values: one 8-byte-aligned slot per possible CPU).
fn layout(path: &Path) -> io::Result<(u32, usize, usize)> {
    let info = aya::maps::MapInfo::from_pin(path).map_err(|e| io::Error::other(crate::error::report(&e)))?;
    let map_type = info.map_type().map_err(|e| io::Error::other(crate::error::report(&e)))? as u32;
    let key = info.key_size() as usize;
    let mut value = info.value_size() as usize;
    if PER_CPU_TYPES.contains(&map_type) {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        value = value.div_ceil(8) * 8 * cpus;
    }
    Ok((map_type, key, value))
}

/// Copies every entry of the map pinned at `from` into the map pinned at `to` with
/// update `flags`; entries that vanish while being copied are skipped, and with
/// `BPF_NOEXIST` entries already in `to` are left as they are. Returns the number copied.
/// `grown`: the map's values grew at their end in this layout (their old bytes keep
/// their meaning): each old value is copied and zero-extended.
fn copy_map(from: &Path, to: &Path, flags: u64, grown: bool) -> io::Result<usize> {
    let (map_type, key_size, value_size) = layout(from)?;
    if map_type == RINGBUF {
        return Ok(0);
    }
    let (to_type, to_key, to_value) = layout(to)?;
    let extends = grown && (to_type, to_key) == (map_type, key_size) && to_value > value_size;
    if !extends && (to_type, to_key, to_value) != (map_type, key_size, value_size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "type {map_type}, key {key_size}, value {value_size} bytes cannot go into type {to_type}, key {to_key}, value {to_value}"
            ),
        ));
    }
    let (src, dst) = (obj_get(from)?, obj_get(to)?);
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut value = vec![0u8; value_size.max(1)];
    let mut grown_value = vec![0u8; to_value.max(1)];
    let mut copied = 0;
    let mut first = true;
    loop {
        if !next_key(src.as_fd(), if first { None } else { Some(&key) }, &mut next)? {
            return Ok(copied);
        }
        first = false;
        key.copy_from_slice(&next);
        if !elem(&src, BPF_MAP_LOOKUP_ELEM, &key, &mut value, 0)? {
            continue;
        }
        let value = if extends {
            grown_value[..value_size].copy_from_slice(&value);
            &mut grown_value
        } else {
            &mut value
        };
        match elem(&dst, BPF_MAP_UPDATE_ELEM, &key, value, flags) {
            Ok(_) => copied += 1,
            // Already there (arrays always are): left as it is.
            Err(e) if flags == BPF_NOEXIST && e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
}

/// A lookup (into `value`) or an update (from `value`); false when the key is gone.
fn elem(fd: &OwnedFd, cmd: libc::c_long, key: &[u8], value: &mut [u8], flags: u64) -> io::Result<bool> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd().cast_unsigned());
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_mut_ptr() as u64;
    attr[3] = flags;
    match sys_bpf(cmd, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if cmd == BPF_MAP_LOOKUP_ELEM && e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}
